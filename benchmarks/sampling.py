#!/usr/bin/env python
"""Sampling speed of `AFMPipeline` at 1, 2 and 4 steps, VAE decode included, and its split.

    OMP_NUM_THREADS=1 python benchmarks/sampling.py --device cpu       # S/2 width, 4 layers, 64 px, SD-VAE decoder
    python benchmarks/sampling.py --device cuda --size XL/2 --sample_size 32 --batch_size 64 --dtype bf16 --cuda_graph

For each step count the pipeline runs from given noise to a `"pt"` image (the generator's steps,
then the VAE decode); the same call with `output_type="latent"` times the generator alone, and
`vae.decode` on its own times the decoder, in the VAE's memory format both ways (contiguous and
channels-last), all alternating in one loop. The VAE is the real SD-VAE decoder (the
`sd-vae-ft-mse` architecture, written inline, random weights: nothing is downloaded); at a small
`--sample_size` it decodes a small image. Weights are random, so the images mean nothing; the
speed is that of trained weights.

The roofline fraction is the counted FLOPs of one batch (generator and decoder,
`torch.utils.flop_counter`) over its time, against a large matrix product in the same dtype measured
in the same run. `--cuda_graph` (CUDA only) adds a row for 1-NFE sampling replayed as one captured
CUDA graph (`AFMPipeline.enable_cuda_graph`), and checks it against the eager images.

Prints the table last; `--json` writes every figure.
"""

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    DTYPES,
    SD_VAE_CONFIG,
    count_flops,
    environment,
    format_table,
    matmul_rate,
    median,
    randomize_,
    spread,
    time_alternating,
    trunk,
    write_json,
)

COLUMNS = ["steps", "path", "img/s", "ms/batch", "spread", "generator ms", "VAE ms", "VAE share",
           "GFLOP/img", "TFLOP/s", "matmul TFLOP/s", "roofline"]


def build_transformer(size: str, nfe: int, sample_size: int, num_classes: int, device, dtype):
    from diffusers_afm import AdversarialFlowTransformer2DModel

    step_config = dict(nfe=1) if nfe == 1 else dict(nfe=nfe, prediction_type="velocity", use_timestep_src=True)
    with torch.device(device):
        model = AdversarialFlowTransformer2DModel(
            sample_size=sample_size, in_channels=4, num_classes=num_classes, **trunk(size), **step_config
        )
    return randomize_(model).to(dtype).eval()


def main(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_gpu = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if on_gpu else "cpu")
    p.add_argument("--size", default=None, help="default: S/2-4 on a CPU, XL/2 on a GPU")
    p.add_argument("--sample_size", type=int, default=None, help="latent side; default 8 (64 px) on a CPU, 32 (256 px) on a GPU")
    p.add_argument("--batch_size", type=int, default=None, help="default: 2 on a CPU, 64 on a GPU")
    p.add_argument("--num_classes", type=int, default=1000)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="weights of both networks; default bf16 on a GPU")
    p.add_argument("--cuda_graph", action="store_true", help="add 1-NFE sampling as a captured CUDA graph")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from diffusers import AutoencoderKL

    from diffusers_afm import AFMPipeline

    device = torch.device(args.device)
    small = device.type == "cpu"
    size = args.size or ("S/2-4" if small else "XL/2")
    sample_size = args.sample_size or (8 if small else 32)
    batch_size = args.batch_size or (2 if small else 64)
    dtype = DTYPES[args.dtype or ("fp32" if small else "bf16")]
    if args.cuda_graph and device.type != "cuda":
        p.error("--cuda_graph needs --device cuda")

    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKL(**SD_VAE_CONFIG)
    vae = vae.to(dtype).eval().requires_grad_(False)
    vae_channels_last = copy.deepcopy(vae).to(memory_format=torch.channels_last)
    generator = torch.Generator(device).manual_seed(0)
    noise = torch.randn(batch_size, 4, sample_size, sample_size, device=device, generator=generator)
    labels = torch.randint(0, args.num_classes, (batch_size,), generator=torch.Generator().manual_seed(0)).tolist()
    rate = matmul_rate(device, dtype)

    # The decoder alone, contiguous against channels-last, timed side by side.
    with torch.no_grad():
        def decode(model):
            return lambda: model.decode((noise / model.config.scaling_factor).to(dtype)).sample

        vae_flops = count_flops(decode(vae))
        vae_times = time_alternating({"contiguous": decode(vae), "channels_last": decode(vae_channels_last)},
                                     device, args.repeats)
    vae_layout = min(vae_times, key=lambda k: median(vae_times[k]))
    vae_ms = median(vae_times[vae_layout]) * 1e3
    decode_row = {"steps": "-", "path": "VAE decode alone, " + ", ".join(
        f"{k} {median(v) * 1e3:.1f} ms" for k, v in vae_times.items()) + f" (pipeline uses {vae_layout})"}

    rows, figures = [], {"vae_decode": {"flops": vae_flops, "times": vae_times}}
    for nfe in args.steps:
        transformer = build_transformer(size, nfe, sample_size, args.num_classes, device, dtype)
        pipe = AFMPipeline(transformer=transformer, vae=vae_channels_last if vae_layout == "channels_last" else vae)
        pipe.set_progress_bar_config(disable=True)

        def sample(output_type, pipe=pipe, nfe=nfe):
            return lambda: pipe(class_labels=labels, latents=noise, num_inference_steps=nfe, output_type=output_type)

        generator_flops = count_flops(sample("latent"))
        fns = {"eager": sample("pt"), "generator": sample("latent")}
        if args.cuda_graph and nfe == 1:
            # A second pipeline over the same modules holds the graph, so both paths alternate.
            graph_pipe = AFMPipeline(transformer=pipe.transformer, vae=pipe.vae)
            graph_pipe.set_progress_bar_config(disable=True)
            graph_pipe.enable_cuda_graph(batch_size)
            fns["CUDA graph"] = sample("pt", pipe=graph_pipe)
            del graph_pipe  # kept alive by fns
            difference = (fns["CUDA graph"]().images - fns["eager"]().images).abs().max()
            figures["cuda_graph_max_abs_diff"] = float(difference)
        times = time_alternating(fns, device, args.repeats)
        total_flops = generator_flops + vae_flops
        generator_ms = median(times["generator"]) * 1e3
        figures[f"{nfe}_steps"] = {"generator_flops": generator_flops, "times": times}
        for path in [k for k in ("eager", "CUDA graph") if k in times]:
            seconds = median(times[path])
            rows.append({
                "steps": nfe,
                "path": path,
                "img/s": batch_size / seconds,
                "ms/batch": seconds * 1e3,
                "spread": spread(times[path]),
                "generator ms": generator_ms,
                "VAE ms": vae_ms,
                "VAE share": f"{100 * vae_ms / (seconds * 1e3):.0f}%",
                "GFLOP/img": total_flops / batch_size / 1e9,
                "TFLOP/s": total_flops / seconds / 1e12,
                "matmul TFLOP/s": rate / 1e12,
                "roofline": f"{100 * total_flops / seconds / rate:.1f}%",
            })
        del pipe, transformer, fns  # and with them any captured graph and its memory
    rows.append(decode_row)

    info = environment(device)
    write_json(args.json, {"benchmark": "sampling", "settings": vars(args), "environment": info,
                           "rows": rows, "figures": figures})
    print(f"{info['date']}  {info['device_name']}  threads={info['threads']}  torch {info['torch']}  "
          f"{size} generator, SD-VAE decoder, {sample_size}x{sample_size} latents ({8 * sample_size} px), "
          f"batch {batch_size}, {str(dtype).replace('torch.', '')} weights")
    if "cuda_graph_max_abs_diff" in figures:
        print(f"CUDA graph against eager: max abs difference of the images {figures['cuda_graph_max_abs_diff']:.2e}")
    print(format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
