#!/usr/bin/env python
"""How mixed precision biases the approximated R1/R2, and what keeping it honest costs.

    OMP_NUM_THREADS=2 python benchmarks/penalty_precision.py                       # CPU: B/2 at 32x32x4, ~6 min
    python benchmarks/penalty_precision.py --device cuda --allow_tf32 --batch_size 32 --time_size XL/2 --time_batch_size 32

R1 and R2 are `gp_scale * w / eps^2 * (D(x + eps n) - D(x))^2` with eps = 0.01 (docs/method.md):
a difference of two nearby logits. Under bf16 autocast each of the two forward passes rounds its
activations to 8 significant bits independently, and that noise, squared and divided by eps^2,
adds to the penalty. Three precisions, each an Accelerate run of the trainer's own code
(`AFMTrainingStep.discriminator_logits` and `.discriminator_step`):

- `fp32`: no autocast (the reference trains in fp32/TF32);
- `bf16`: bf16 autocast on every sample, as before the fix (`gp_full_precision=False`);
- `bf16+fix`: bf16 autocast, the penalty's 4n samples in full precision inside the one
  discriminator call (`gp_full_precision=True`, the default).

Part 1 (bias): the mean R1 and R2 of the same discriminator (randomly initialised at the real width),
the same data, the same (s, t), perturbations and fakes, over `--batches` forward-only batches;
each precision's ratio to fp32. Part 2 (cost): one D step (the generator's forward, the
discriminator's forward and backward, AdamW) of each precision, alternated, medians; on a CPU
without bf16 matrix units bf16 is slower than fp32, so read the GPU figures for the cost there.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, format_table, median, randomize_, spread, time_alternating, trunk, write_json  # noqa: E402

PRECISIONS = {"fp32": ("no", True), "bf16": ("bf16", False), "bf16+fix": ("bf16", True)}


def build_step(precision: str, size: str, sample_size: int, device: str, gp_batch_ratio: float, seed: int):
    """A fresh Accelerator and `AFMTrainingStep` for one precision; the same weights and seed every time."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from diffusers_afm import AdversarialFlowDiscriminator, AdversarialFlowTransformer2DModel
    from diffusers_afm.training import AFMObjective, AFMTrainingStep

    AcceleratorState._reset_state(True)
    mixed_precision, full_precision = PRECISIONS[precision]
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=device == "cpu")
    shape = dict(sample_size=sample_size, in_channels=4, num_classes=1000)
    # The generator only makes the fakes: a small one is enough and keeps the timing on D.
    torch.manual_seed(seed)
    generator = randomize_(AdversarialFlowTransformer2DModel(**trunk("tiny"), **shape), seed=seed)
    discriminator = open_gates_(AdversarialFlowDiscriminator(**trunk(size), **shape), seed=seed + 1)
    # lr 0: every timed step sees the same discriminator.
    opt_g = torch.optim.AdamW(generator.parameters(), lr=0.0)
    opt_d = torch.optim.AdamW(discriminator.parameters(), lr=0.0)
    generator, discriminator, opt_g, opt_d = accelerator.prepare(generator, discriminator, opt_g, opt_d)
    objective = AFMObjective(gp_batch_ratio=gp_batch_ratio, gp_full_precision=full_precision)
    noise = torch.Generator(accelerator.device).manual_seed(seed)
    return AFMTrainingStep(accelerator, generator, discriminator, opt_g, opt_d, objective, noise_generator=noise)


@torch.no_grad()
def open_gates_(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """The model's own initialisation plus noise: adaLN-Zero's closed gates open, so every block acts
    on the logit, while the weights keep a trained network's scale (`randomize_`'s std-0.02 weights
    everywhere give a nearly constant discriminator whose input gradient is ~1e-4)."""
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(std * torch.randn(p.shape, generator=generator))
    return model


def data(batch_size: int, sample_size: int, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch_size, 4, sample_size, sample_size, generator=g).to(device)
    labels = torch.randint(0, 1000, (batch_size,), generator=g).to(device)
    return x0, labels


@torch.no_grad()
def penalties(step, batches):
    """Per-sample R1 and R2 terms (before the mean) over the batches, as the D step computes them."""
    from diffusers_afm.training import flow_weight, perturbed_batch_size
    from diffusers_afm.training.distributed import unwrap

    obj, r1, r2 = step.objective, [], []
    for x0, labels in batches:
        s, t, x_s, real = step._draw_pair(x0)
        fake = step._generate(unwrap(step.generator), x_s, labels, s, t)
        n = perturbed_batch_size(x0.shape[0], obj.gp_batch_ratio)
        logits_real, logits_fake, real_perturbed, fake_perturbed = step.discriminator_logits(real, fake, labels, t, n)
        scale = obj.gp_scale * flow_weight(s, t)[:n] / obj.gp_eps**2
        r1.append(scale * (real_perturbed - logits_real[:n]).square())
        r2.append(scale * (fake_perturbed - logits_fake[:n]).square())
    return torch.cat(r1), torch.cat(r2)


def main(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default="B/2", help="The discriminator of part 1 (a paper size or a small one).")
    p.add_argument("--sample_size", type=int, default=32, help="Latent side (32 = ImageNet 256 with the SD-VAE).")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--gp_batch_ratio", type=float, default=0.5, help="Part 1 only: more penalty samples per batch.")
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--time_size", default="S/2-4", help="The discriminator of part 2.")
    p.add_argument("--time_batch_size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow_tf32", action="store_true", help="CUDA: fp32 matmuls in TF32, as the reference trains.")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # Part 1: the bias of the penalty.
    batches = [data(args.batch_size, args.sample_size, device, args.seed + i) for i in range(args.batches)]
    values = {}
    for precision in PRECISIONS:
        step = build_step(precision, args.size, args.sample_size, args.device, args.gp_batch_ratio, args.seed)
        values[precision] = penalties(step, batches)
        print(f"{precision}: R1 {values[precision][0].mean().item():.4g}, R2 {values[precision][1].mean().item():.4g}",
              flush=True)
    fp32_r1, fp32_r2 = (v.mean().item() for v in values["fp32"])
    results = {"penalty": {}, "step": {}}
    for precision, (r1, r2) in values.items():
        results["penalty"][precision] = {
            "precision": precision, "R1 mean": r1.mean().item(), "R1 / fp32": r1.mean().item() / fp32_r1,
            "R2 mean": r2.mean().item(), "R2 / fp32": r2.mean().item() / fp32_r2, "samples": r1.numel(),
        }
    penalty_table = format_table(list(results["penalty"].values()),
                                 ["precision", "R1 mean", "R1 / fp32", "R2 mean", "R2 / fp32", "samples"])

    # Part 2: the cost of one D step (the paper's gp_batch_ratio 0.25).
    x0, labels = data(args.time_batch_size, args.sample_size, device, args.seed)
    steps = {name: build_step(name, args.time_size, args.sample_size, args.device, 0.25, args.seed) for name in PRECISIONS}
    calls = {name: (lambda step=step: step.discriminator_step(x0, labels, 0)) for name, step in steps.items()}
    times = time_alternating(calls, device, repeats=args.repeats)
    bf16 = median(times["bf16"])
    for name, seconds in times.items():
        results["step"][name] = {"precision": name, "D step ms": 1000 * median(seconds), "spread": spread(seconds),
                                 "vs bf16": median(seconds) / bf16}
    step_table = format_table(list(results["step"].values()), ["precision", "D step ms", "spread", "vs bf16"])

    settings = (f"part 1: D {args.size} at {args.sample_size}x{args.sample_size}x4, batch {args.batch_size}, "
                f"gp_batch_ratio {args.gp_batch_ratio}, {args.batches} batches; part 2: D {args.time_size}, "
                f"batch {args.time_batch_size}, gp_batch_ratio 0.25, {args.repeats} repeats; {args.device}")
    print(f"\n{settings}\n\n{penalty_table}\n\n{step_table}")
    if args.json:
        write_json(args.json, dict(settings=vars(args), environment=environment(device), **results))


if __name__ == "__main__":
    main()
