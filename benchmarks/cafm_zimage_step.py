#!/usr/bin/env python
"""The cost of a text-to-image CAFM iteration on a Z-Image trunk, and the memory plan of the full model.

    OMP_NUM_THREADS=2 python benchmarks/cafm_zimage_step.py --device cpu --json benchmarks/results_cafm_zimage_step_cpu.json
    python benchmarks/cafm_zimage_step.py --device cuda --dim 3840 --n_layers 30 --resolution 512 --batch_size 1 --dtype bf16

Measured side by side in one process (alternating, medians) at one width (default 1536, 12 heads of
128 as in Z-Image; the full model is 3840 wide, 30 layers):

- `flow matching step`: the generator's forward and backward (the pretraining step, for scale);
- `cafm D step`: `ZImageCAFMTrainingStep.discriminator_step`: the generator's forward without
  gradient, ONE discriminator call whose block-by-block JVP vmaps both tangents, backward, AdamW;
- `cafm G step`: the generator's forward, the frozen discriminator's JVP along `(v_pred, 1)`,
  backward through the tangent into the generator, AdamW;
- both CAFM steps again with gradient checkpointing on both networks (what the full model needs).

`--memory_plan` prints the parameter counts of the full Z-Image generator and discriminator (built
on the meta device: nothing is allocated) and the per-GPU memory of the training state when FSDP
shards it over 8, 16 or 32 GPUs (docs/cafm.md, "Text-to-image").
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, format_table, median, spread, time_alternating, write_json  # noqa: E402

FULL = dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
            n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0,
            axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])
TEXT_ENCODER_PARAMS = 4.02e9  # Qwen3-4B, Z-Image's text encoder (bf16, frozen)


def memory_plan():
    from diffusers import ZImageTransformer2DModel

    from diffusers_afm.models.discriminator_zimage import AdversarialFlowZImageDiscriminator

    with torch.device("meta"):
        generator = ZImageTransformer2DModel(**FULL)
        discriminator = AdversarialFlowZImageDiscriminator.for_transformer(generator)
    g, d = generator.num_parameters(), discriminator.num_parameters()
    gib = 2 ** 30
    # fp32 master weights, fp32 gradients and two fp32 AdamW moments: 16 bytes per trained parameter;
    # the EMA is one more fp32 copy of the generator; the text encoder is frozen, bf16.
    state = 16 * (g + d) + 4 * g
    rows = [{"part": "generator (trained)", "parameters": f"{g / 1e9:.2f}B", "GiB": 16 * g / gib},
            {"part": "discriminator (trained)", "parameters": f"{d / 1e9:.2f}B", "GiB": 16 * d / gib},
            {"part": "generator EMA (fp32)", "parameters": f"{g / 1e9:.2f}B", "GiB": 4 * g / gib},
            {"part": "text encoder (frozen, bf16)", "parameters": f"{TEXT_ENCODER_PARAMS / 1e9:.2f}B",
             "GiB": 2 * TEXT_ENCODER_PARAMS / gib},
            {"part": "all, one GPU", "parameters": "", "GiB": (state + 2 * TEXT_ENCODER_PARAMS) / gib}]
    for gpus in (8, 16, 32):
        rows.append({"part": f"FSDP full shard over {gpus} GPUs, per GPU", "parameters": "",
                     "GiB": (state / gpus + 2 * TEXT_ENCODER_PARAMS / gpus) / gib})
    return rows, {"generator": g, "discriminator": d}


def run(args, device):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers import ZImageTransformer2DModel

    from diffusers_afm.models.discriminator_zimage import AdversarialFlowZImageDiscriminator
    from diffusers_afm.training import ModelEMA
    from diffusers_afm.training.cafm import CAFMObjective
    from diffusers_afm.training.cafm_zimage import ZImageCAFMTrainingStep, zimage_interpolate

    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if args.dtype == "bf16" else "no")
    torch.manual_seed(0)
    heads = args.dim // 128
    config = dict(FULL, dim=args.dim, n_heads=heads, n_kv_heads=heads, n_layers=args.n_layers,
                  n_refiner_layers=args.n_refiner_layers)
    generator = ZImageTransformer2DModel(**config).to(device)
    for p in generator.parameters():  # the final layer starts at zero: perturb so every path is exercised
        p.data.add_(0.02 * torch.randn_like(p))
    discriminator = AdversarialFlowZImageDiscriminator.for_transformer(generator)
    adam = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-7, betas=(0.0, 0.95))  # noqa: E731
    optimizer_g, optimizer_d = adam(generator), adam(discriminator)
    rng = torch.Generator(device).manual_seed(0)
    step = ZImageCAFMTrainingStep(accelerator, generator, discriminator, optimizer_g, optimizer_d, CAFMObjective(),
                                  ema=ModelEMA(generator), noise_generator=rng)
    side = args.resolution // 8
    latents = [torch.randn(16, 1, side, side, device=device) for _ in range(args.batch_size)]
    text = [torch.randn(args.caption_tokens, 2560, device=device) for _ in range(args.batch_size)]

    def flow_matching():
        text_, noises, t = step.draw(latents, text)
        with accelerator.autocast():
            v = generator(zimage_interpolate(latents, noises, t), t, text_).sample
        loss = torch.stack([(a.float() - (x - n)).square().mean() for a, x, n in zip(v, latents, noises)]).mean()
        accelerator.backward(loss)
        optimizer_g.step()
        optimizer_g.zero_grad(set_to_none=True)

    def checkpointed(fn):
        def call():
            generator.enable_gradient_checkpointing()
            discriminator.enable_gradient_checkpointing()
            try:
                return fn()
            finally:
                generator.disable_gradient_checkpointing()
                discriminator.disable_gradient_checkpointing()
        return call

    d_step = lambda: step.discriminator_step(latents, *step.draw(latents, text))  # noqa: E731
    g_step = lambda: step.generator_step(latents, *step.draw(latents, text))  # noqa: E731
    fns = {"flow matching step": flow_matching, "cafm D step": d_step, "cafm G step": g_step,
           "cafm D step, checkpointed": checkpointed(d_step), "cafm G step, checkpointed": checkpointed(g_step)}
    times = time_alternating(fns, device, args.repeats, warmup=1)
    base = median(times["flow matching step"]) * 1000
    tokens = (side // 2) ** 2 + args.caption_tokens
    rows = [{"width": args.dim, "layers": f"{args.n_layers}+{args.n_refiner_layers}", "batch": args.batch_size,
             "tokens": tokens, "dtype": args.dtype, "step": name, "ms": median(t) * 1000, "spread": spread(t),
             "vs flow matching": median(t) * 1000 / base} for name, t in times.items()]
    d_ms, g_ms = median(times["cafm D step"]) * 1000, median(times["cafm G step"]) * 1000
    mean = (16 * d_ms + g_ms) / 17
    rows.append({"width": args.dim, "layers": f"{args.n_layers}+{args.n_refiner_layers}", "batch": args.batch_size,
                 "tokens": tokens, "dtype": args.dtype, "step": "cafm mean iteration (N = 16)", "ms": mean,
                 "spread": None, "vs flow matching": mean / base})
    return rows, generator.num_parameters()


def main(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dim", type=int, default=1536, help="Trunk width (a multiple of 128; Z-Image: 3840).")
    parser.add_argument("--n_layers", type=int, default=2)
    parser.add_argument("--n_refiner_layers", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=256, help="Image side (latent side / 8).")
    parser.add_argument("--caption_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory_plan", action="store_true", help="Also print the full model's memory plan.")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows, params = run(args, device)
    print(format_table(rows, ["width", "layers", "batch", "tokens", "dtype", "step", "ms", "spread", "vs flow matching"]))
    result = {"environment": environment(device), "generator_parameters": params, "steps": rows}
    if args.memory_plan:
        plan, counts = memory_plan()
        print()
        print(format_table(plan, ["part", "parameters", "GiB"]))
        result.update(memory_plan=plan, full_model_parameters=counts)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
