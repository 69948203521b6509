#!/usr/bin/env python
"""The cost of a Continuous-AFM iteration against an AFM iteration at the same size, and which
attention kernels support the discriminator's forward-mode JVP.

    OMP_NUM_THREADS=2 python benchmarks/cafm_step.py --device cpu --json benchmarks/results_cafm_step_cpu.json
    python benchmarks/cafm_step.py --device cuda --sizes B/2 XL/2 --batch_size 32 --dtype bf16

Measured side by side in one process (alternating, medians), for each size:

- `afm iteration`: `AFMTrainingStep`, one D step and one G step (what train_afm.py runs per batch);
- `cafm D step`: `CAFMTrainingStep.discriminator_step`: the flow model's forward without gradient,
  ONE discriminator call whose primal pass serves both tangents (vmap over `(v_real, 1)` and
  `(v_pred, 1)`), backward, AdamW;
- `cafm G step`: the generator's forward, the frozen discriminator's JVP along `(v_pred, 1)`,
  backward through the tangent, AdamW;
- `cafm D step, two JVPs`: the same D loss with the tangents in two separate JVP calls (two primal
  passes), the alternative that vmap replaces;
- `flow matching step`: the baseline's step (one forward and backward of the flow model).

A CAFM iteration is one D or one G step; with N D steps per G step, the mean cost of an iteration
is `(N * D + G) / (N + 1)`, also printed (N = 16). The attention probe runs `torch.func.jvp`
through `scaled_dot_product_attention` with each SDPA backend on the device and reports which
run and agree with the math kernel.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import DTYPES, environment, format_table, median, spread, time_alternating, trunk, write_json  # noqa: E402


def attention_probe(device, dtype):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 4, 64, 32, device=device, dtype=dtype)
    tangent = torch.randn_like(q)

    def f(x):
        return torch.nn.functional.scaled_dot_product_attention(x, x, x)

    with sdpa_kernel([SDPBackend.MATH]):
        _, reference = torch.func.jvp(f, (q,), (tangent,))
    rows = []
    for backend in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                _, derivative = torch.func.jvp(f, (q,), (tangent,))
            error = (derivative.float() - reference.float()).abs().max().item()
            rows.append({"backend": backend.name, "forward-mode AD": "yes", "max error vs math": error})
        except Exception as err:  # NotImplementedError (no formula) or RuntimeError (no kernel here)
            rows.append({"backend": backend.name, "forward-mode AD": f"no: {type(err).__name__}: {str(err).splitlines()[0][:90]}",
                         "max error vs math": None})
    return rows


def build(size, sample_size, in_channels, device):
    from diffusers_afm import AdversarialFlowDiscriminator, AdversarialFlowTransformer2DModel, FlowMatchingTransformer2DModel

    torch.manual_seed(0)
    shape = dict(trunk(size), sample_size=sample_size, in_channels=in_channels, num_classes=10)
    flow = FlowMatchingTransformer2DModel(**shape, class_dropout_prob=0.1).to(device)
    cafm_d = AdversarialFlowDiscriminator.for_flow_model(flow).to(device)
    afm_g = AdversarialFlowTransformer2DModel(**shape).to(device)
    afm_d = AdversarialFlowDiscriminator(**shape).to(device)
    for model in (flow, afm_g):  # zero-initialised outputs would make every step trivial
        for p in model.parameters():
            p.data.add_(0.02 * torch.randn_like(p))
    return flow, cafm_d, afm_g, afm_d


def run(size, args, device):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from diffusers_afm.training import AFMObjective, AFMTrainingStep, GradientNormalization, ModelEMA
    from diffusers_afm.training.cafm import CAFMObjective, CAFMTrainingStep
    from diffusers_afm.training.flow_matching import FlowMatchingTrainingStep

    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if args.dtype == "bf16" else "no")
    flow, cafm_d, afm_g, afm_d = build(size, args.sample_size, args.in_channels, device)
    adam = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-6, betas=(0.0, 0.95))  # noqa: E731
    rng = torch.Generator(device).manual_seed(0)
    cafm = CAFMTrainingStep(accelerator, flow, cafm_d, adam(flow), adam(cafm_d), CAFMObjective(), ema=ModelEMA(flow),
                            null_class_id=10, noise_generator=rng)
    afm = AFMTrainingStep(accelerator, afm_g, afm_d, adam(afm_g), adam(afm_d), AFMObjective(),
                          grad_norm=GradientNormalization().to(device), ema=ModelEMA(afm_g), noise_generator=rng)
    fm = FlowMatchingTrainingStep(accelerator, flow, adam(flow), null_class_id=10, noise_generator=rng)
    x0 = torch.randn(args.batch_size, args.in_channels, args.sample_size, args.sample_size, device=device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)
    draw = lambda: cafm.draw(x0, labels)  # noqa: E731

    def two_jvps():
        y, z, t = draw()
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * z
        with torch.no_grad(), accelerator.autocast():
            v_pred = flow(x_t, t, y).sample.float()
        with accelerator.autocast():
            out, real = cafm_d(x_t, y, t, tangents=(z - x0, torch.ones_like(t)))
            _, fake = cafm_d(x_t, y, t, tangents=(v_pred, torch.ones_like(t)))
        loss = (real - 1).square().mean() + (fake + 1).square().mean() + 1e-3 * out.square().mean()
        accelerator.backward(loss)
        cafm.optimizer_d.step()
        cafm.optimizer_d.zero_grad(set_to_none=True)

    fns = {
        "afm iteration (D + G)": lambda: afm(x0, labels, 0),
        "cafm D step": lambda: cafm.discriminator_step(x0, *draw()),
        "cafm G step": lambda: cafm.generator_step(x0, *draw()),
        "cafm D step, two JVPs": two_jvps,
        "flow matching step": lambda: fm(x0, labels, 0),
    }
    times = time_alternating(fns, device, args.repeats, warmup=1)
    afm_ms = median(times["afm iteration (D + G)"]) * 1000
    rows = [{"size": size, "batch": args.batch_size, "dtype": args.dtype, "step": name, "ms": median(t) * 1000,
             "spread": spread(t), "vs afm iteration": median(t) * 1000 / afm_ms} for name, t in times.items()]
    d_ms, g_ms = median(times["cafm D step"]) * 1000, median(times["cafm G step"]) * 1000
    mean = (16 * d_ms + g_ms) / 17
    rows.append({"size": size, "batch": args.batch_size, "dtype": args.dtype, "step": "cafm mean iteration (N = 16)",
                 "ms": mean, "spread": None, "vs afm iteration": mean / afm_ms})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", nargs="+", default=["tiny", "S/2-4"])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--sample_size", type=int, default=16)
    parser.add_argument("--in_channels", type=int, default=4)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    probe = attention_probe(device, DTYPES[args.dtype] if device.type == "cuda" else torch.float32)
    rows = [row for size in args.sizes for row in run(size, args, device)]
    print(format_table(probe, ["backend", "forward-mode AD", "max error vs math"]))
    print()
    print(format_table(rows, ["size", "batch", "dtype", "step", "ms", "spread", "vs afm iteration"]))
    write_json(args.json, {"environment": environment(device), "attention": probe, "steps": rows})


if __name__ == "__main__":
    main()
