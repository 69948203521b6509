#!/usr/bin/env python
"""The cost of a Continuous-AFM iteration on JiT against one on SiT of the same width and depth.

    OMP_NUM_THREADS=1 python benchmarks/cafm_jit_step.py --json benchmarks/results_cafm_jit_step_cpu.json
    python benchmarks/cafm_jit_step.py --device cuda --sizes B-12 --batch_size 32

Both pairs see the same number of patch tokens: SiT (`FlowMatchingTransformer2DModel` and
`AdversarialFlowDiscriminator.for_flow_model`) on `latent_size`^2 x 4 latents with patch 2, JiT
(`JiTTransformer2DModel` and `AdversarialFlowJiTDiscriminator.for_transformer`) on pixels 8 times
larger with patch 16, so the comparison is the architectures' (JiT: a bottleneck patch embedding,
32 in-context class tokens joining after a third of the blocks, RoPE, q/k RMSNorm, SwiGLU), not
their inputs'. Measured side by side in one process (alternating, medians), for each size:

- `D step`: `CAFMTrainingStep.discriminator_step` (the generator's forward without gradient, one
  discriminator call whose primal pass serves both tangents, backward, AdamW);
- `G step`: the generator's forward, the frozen discriminator's JVP, backward, AdamW;
- `D step, D checkpointed` (JiT only: its discriminator takes its JVP block by block, so it can be
  checkpointed; SiT's refuses);
- `flow matching step`: the baseline's forward, backward, AdamW;
- `mean iteration (N = 16)`: `(16 D + G) / 17`.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, format_table, median, randomize_, spread, time_alternating, write_json  # noqa: E402

SIZES = {
    "tiny": dict(num_layers=2, num_attention_heads=2, attention_head_dim=32),
    "S-4": dict(num_layers=4, num_attention_heads=6, attention_head_dim=64),
    "B-12": dict(num_layers=12, num_attention_heads=12, attention_head_dim=64),  # JiT-B/16's trunk
}
NUM_CLASSES = 10


def build(size: str, latent_size: int, device):
    from diffusers_afm import (
        AdversarialFlowDiscriminator,
        AdversarialFlowJiTDiscriminator,
        FlowMatchingTransformer2DModel,
        JiTTransformer2DModel,
    )

    torch.manual_seed(0)
    trunk = SIZES[size]
    sit = randomize_(FlowMatchingTransformer2DModel(**trunk, sample_size=latent_size, patch_size=2, in_channels=4,
                                                    num_classes=NUM_CLASSES)).to(device)
    jit = randomize_(JiTTransformer2DModel(**trunk, sample_size=8 * latent_size, patch_size=16, in_channels=3,
                                           bottleneck_dim=128, in_context_len=32, in_context_start=trunk["num_layers"] // 3,
                                           num_classes=NUM_CLASSES)).to(device)
    return {
        "SiT": (sit, AdversarialFlowDiscriminator.for_flow_model(sit).to(device), 4, latent_size),
        "JiT": (jit, AdversarialFlowJiTDiscriminator.for_transformer(jit).to(device), 3, 8 * latent_size),
    }


def run(size: str, args, device):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from diffusers_afm.training.cafm import CAFMObjective, CAFMTrainingStep
    from diffusers_afm.training import FlowMatchingTrainingStep

    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=device.type == "cpu")
    adam = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-6, betas=(0.0, 0.95))  # noqa: E731
    fns, tokens = {}, {}
    for name, (generator, discriminator, channels, pixels) in build(size, args.latent_size, device).items():
        rng = torch.Generator(device).manual_seed(0)
        cafm = CAFMTrainingStep(accelerator, generator, discriminator, adam(generator), adam(discriminator),
                                CAFMObjective(), null_class_id=NUM_CLASSES, noise_generator=rng)
        fm = FlowMatchingTrainingStep(accelerator, generator, adam(generator), null_class_id=NUM_CLASSES, noise_generator=rng)
        x0 = torch.randn(args.batch_size, channels, pixels, pixels, device=device)
        labels = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)
        tokens[name] = (pixels // generator.config.patch_size) ** 2

        def step(kind, cafm=cafm, x0=x0, labels=labels):
            return getattr(cafm, f"{kind}_step")(x0, *cafm.draw(x0, labels))

        def checkpointed(cafm=cafm, x0=x0, labels=labels):
            cafm.discriminator.enable_gradient_checkpointing()
            try:
                return cafm.discriminator_step(x0, *cafm.draw(x0, labels))
            finally:
                cafm.discriminator.disable_gradient_checkpointing()

        fns[(name, "D step")] = lambda step=step: step("discriminator")
        fns[(name, "G step")] = lambda step=step: step("generator")
        if name == "JiT":
            fns[(name, "D step, D checkpointed")] = checkpointed
        fns[(name, "flow matching step")] = lambda fm=fm, x0=x0, labels=labels: fm(x0, labels, 0)
    times = time_alternating(fns, device, args.repeats, warmup=1)
    ms = {key: median(t) * 1000 for key, t in times.items()}
    for name in ("SiT", "JiT"):
        ms[(name, "mean iteration (N = 16)")] = (16 * ms[(name, "D step")] + ms[(name, "G step")]) / 17
    rows = []
    for (name, step), value in ms.items():
        sit = ms.get(("SiT", step))
        rows.append({"size": size, "model": name, "tokens": tokens[name], "batch": args.batch_size, "step": step,
                     "ms": value, "spread": spread(times[(name, step)]) if (name, step) in times else None,
                     "JiT / SiT": value / sit if name == "JiT" and sit else None})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", nargs="+", default=["tiny", "S-4"], choices=list(SIZES))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--latent_size", type=int, default=16, help="SiT's latent side; JiT's pixels are 8 times larger.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = [row for size in args.sizes for row in run(size, args, device)]
    print(format_table(rows, ["size", "model", "tokens", "batch", "step", "ms", "spread", "JiT / SiT"]))
    write_json(args.json, {"environment": environment(device), "steps": rows})


if __name__ == "__main__":
    main()
