#!/usr/bin/env python
"""Our generator against diffusers' `DiTTransformer2DModel` of the same size: forward + backward time.

    OMP_NUM_THREADS=1 python benchmarks/compare_dit.py --device cpu          # S/2 width, 4 layers, 256 tokens
    python benchmarks/compare_dit.py --device cuda --size XL/2 --batch_size 32 --dtype bf16

Both models get the same width, depth, heads, patch size, input channels and classes, adaLN-Zero
and GELU-tanh MLPs; the peer predicts no variance (`out_channels = in_channels`). Ours is the 1-NFE
generator, called as `(x, class_labels)`; the peer as `(x, timestep, class_labels)`. Each timed call
is one training-style forward and backward (`mean(out^2)`, gradients set to None first); the two
models alternate for `--repeats` rounds, and the reported ratio is the median of the per-round
ratios ours / peer (below 1: ours is faster). Prints a table, then `ratio <ours/peer>` last;
`--json` writes the figures.
"""

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    DTYPES,
    count_flops,
    environment,
    format_table,
    median,
    randomize_,
    spread,
    time_alternating,
    trunk,
    write_json,
)

PARAMETER_NOTE = (
    "DiT gives every block its own timestep MLP and class table (`norm1.emb`), so the peer has more "
    "parameters at the same width and depth; those embedders run once per sample, not per token, "
    "so they add almost no FLOPs."
)


def build_models(size: str, sample_size: int, num_classes: int, device: torch.device):
    from diffusers import DiTTransformer2DModel

    from diffusers_afm import AdversarialFlowTransformer2DModel

    config = trunk(size)
    with torch.device(device):
        ours = AdversarialFlowTransformer2DModel(sample_size=sample_size, in_channels=4, num_classes=num_classes, **config)
        peer = DiTTransformer2DModel(
            num_attention_heads=config["num_attention_heads"],
            attention_head_dim=config["attention_head_dim"],
            in_channels=4,
            out_channels=4,
            num_layers=config["num_layers"],
            sample_size=sample_size,
            patch_size=config["patch_size"],
            num_embeds_ada_norm=num_classes,
            norm_type="ada_norm_zero",
            activation_fn="gelu-approximate",
        )
    return randomize_(ours).train(), randomize_(peer).train()


def main(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", default="S/2-4", help="tiny, S/2-4 (S/2 width, 4 layers), S/2, B/2, M/2, L/2, XL/2")
    p.add_argument("--sample_size", type=int, default=32, help="latent side (32 = ImageNet 256, 256 tokens)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--num_classes", type=int, default=1000)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, fp32 weights")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    ours, peer = build_models(args.size, args.sample_size, args.num_classes, device)
    x = torch.randn(args.batch_size, 4, args.sample_size, args.sample_size, device=device)
    class_labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    timestep = torch.randint(0, 1000, (args.batch_size,), device=device)

    def autocast():
        if args.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=DTYPES[args.dtype])

    def ours_step():
        ours.zero_grad(set_to_none=True)
        with autocast():
            out = ours(x, class_labels).sample
        out.float().square().mean().backward()

    def peer_step():
        peer.zero_grad(set_to_none=True)
        with autocast():
            out = peer(x, timestep, class_labels).sample
        out.float().square().mean().backward()

    flops = {"ours": count_flops(ours_step), "peer": count_flops(peer_step)}
    times = time_alternating({"ours": ours_step, "peer": peer_step}, device, args.repeats, args.warmup)
    ratio = median([a / b for a, b in zip(times["ours"], times["peer"])])

    rows = []
    for name, model in (("ours", ours), ("peer", peer)):
        seconds = median(times[name])
        rows.append({
            "model": name,
            "class": type(model).__name__,
            "params (M)": sum(q.numel() for q in model.parameters()) / 1e6,
            "GFLOP fwd+bwd": flops[name] / 1e9,
            "ms": seconds * 1e3,
            "spread": spread(times[name]),
            "GFLOP/s": flops[name] / seconds / 1e9,
        })
    info = environment(device)
    write_json(args.json, {"benchmark": "compare_dit", "settings": vars(args), "environment": info,
                           "rows": rows, "times": times, "ratio": ratio, "note": PARAMETER_NOTE})
    print(PARAMETER_NOTE)
    print(f"{info['date']}  {info['device_name']}  threads={info['threads']}  torch {info['torch']}  "
          f"size {args.size}, {args.sample_size}x{args.sample_size} latents, batch {args.batch_size}, {args.dtype}, "
          f"{args.repeats} alternating rounds")
    print(format_table(rows, ["model", "class", "params (M)", "GFLOP fwd+bwd", "ms", "spread", "GFLOP/s"]))
    print(f"ratio {ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
