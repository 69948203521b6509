#!/usr/bin/env python
"""Training-iteration time with a latent cache against on-the-fly VAE encoding.

    OMP_NUM_THREADS=1 python benchmarks/latent_cache_speed.py            # tiny VAE and model, CPU
    python benchmarks/latent_cache_speed.py --count_macs                  # + SD-VAE / DiT MACs at 256 px

Both paths run the trainer's loop on the same images with the same generator: a batch of the
trainer's loader (`load_training_data`), its latents (`TrainingData.latents`: VAE-encoded on the
fly, or drawn from a cache written by `examples/cache_latents.py`), then one `AFMTrainingStep` (a D
and a G step).
The tiny networks make the encoder's share here an illustration only: what matters at scale is the
ratio of the SD-VAE encoder (136 GMACs per 256 px image) to the AFM step, which `--count_macs`
counts on the meta device (no weights, no compute).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

# A 4-level SD-style VAE (8x downsampling, 4 latent channels) of small width, and a tiny AFM trunk.
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 64, 64), latent_channels=4,
                layers_per_block=1, norm_num_groups=16)
TINY_MODEL = dict(patch_size=2, num_layers=2, num_attention_heads=2, attention_head_dim=32)


def make_images(root, count, size, num_classes=4):
    rng = np.random.default_rng(0)
    for c in range(num_classes):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
    for i in range(count):
        image = rng.integers(0, 256, (size, size * 5 // 4, 3), dtype=np.uint8)
        PIL.Image.fromarray(image).save(os.path.join(root, f"class{i % num_classes}", f"{i}.png"))


def build_step(sample_size, num_classes, seed):
    from accelerate import Accelerator

    from diffusers_afm import AdversarialFlowDiscriminator, AdversarialFlowTransformer2DModel
    from diffusers_afm.training import AFMObjective, AFMTrainingStep, GradientNormalization, ModelEMA

    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=True)
    generator = AdversarialFlowTransformer2DModel(**TINY_MODEL, sample_size=sample_size, in_channels=4, num_classes=num_classes)
    discriminator = AdversarialFlowDiscriminator(**TINY_MODEL, sample_size=sample_size, in_channels=4, num_classes=num_classes)
    adamw = dict(lr=1e-4, betas=(0.0, 0.9), weight_decay=0.01)
    opt_g, opt_d = torch.optim.AdamW(generator.parameters(), **adamw), torch.optim.AdamW(discriminator.parameters(), **adamw)
    generator, discriminator, opt_g, opt_d = accelerator.prepare(generator, discriminator, opt_g, opt_d)
    noise = torch.Generator().manual_seed(seed)
    step = AFMTrainingStep(accelerator, generator, discriminator, opt_g, opt_d, AFMObjective(),
                           grad_norm=GradientNormalization(), ema=ModelEMA(generator), noise_generator=noise)
    return step, noise


def time_loop(loader, to_latents, step, iterations, warmup=2):
    """Seconds per iteration, all included (the batch from the loader, the latents, the step), and
    its data and latents parts; the first `warmup` iterations are not timed."""
    batches = iter(loader)
    data = latents = 0.0
    for i in range(warmup + iterations):
        if i == warmup:
            data = latents = 0.0
            start = time.perf_counter()
        t0 = time.perf_counter()
        batch = next(batches, None)
        if batch is None:  # a new epoch
            batches = iter(loader)
            batch = next(batches)
        t1 = time.perf_counter()
        x0, labels = to_latents(batch)
        t2 = time.perf_counter()
        step(x0, labels, i)
        data, latents = data + t1 - t0, latents + t2 - t1
    total = time.perf_counter() - start
    return {"seconds_per_iteration": total / iterations, "data_seconds": data / iterations,
            "latents_seconds": latents / iterations}


def count_macs():
    """MACs per image of the SD-VAE encoder and decoder at 256 px, and of DiT forwards (meta device)."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    from diffusers_afm import AdversarialFlowTransformer2DModel, preset_config

    def macs(fn):
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 2

    with torch.device("meta"):
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, latent_channels=4, norm_num_groups=32)
        result = {"sd_vae_encode_256": macs(lambda: vae.encode(torch.empty(1, 3, 256, 256))),
                  "sd_vae_decode_256": macs(lambda: vae.decode(torch.empty(1, 4, 32, 32)))}
        for size in ("B/2", "XL/2"):
            model = AdversarialFlowTransformer2DModel(**preset_config(size), sample_size=32, in_channels=4, num_classes=1000)
            one = torch.ones(1)
            result[f"{size}_forward"] = macs(lambda: model(torch.empty(1, 4, 32, 32), torch.zeros(1, dtype=torch.long), one, 0 * one))
    return result


def main(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_images", type=int, default=64)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--iterations", type=int, default=12)
    p.add_argument("--count_macs", action="store_true")
    p.add_argument("--output", default=None, help="Write the results as JSON.")
    args = p.parse_args(argv)

    import cache_latents
    from diffusers import AutoencoderKL

    from diffusers_afm.data import load_training_data

    with tempfile.TemporaryDirectory() as tmp:
        images_dir, vae_dir, cache_dir = (os.path.join(tmp, name) for name in ("images", "vae", "cache"))
        make_images(images_dir, args.num_images, args.resolution)
        torch.manual_seed(0)
        AutoencoderKL(**TINY_VAE, sample_size=args.resolution).save_pretrained(vae_dir)
        start = time.perf_counter()
        cache_latents.main(["--train_data_dir", images_dir, "--resolution", str(args.resolution), "--vae", vae_dir,
                            "--output_dir", cache_dir, "--batch_size", str(args.batch_size), "--dataloader_num_workers", "0"])
        cache_seconds = time.perf_counter() - start

        # The trainer's data both ways: the same loader seed, flips and posterior draws.
        common = dict(resolution=args.resolution, train_batch_size=args.batch_size, vae=vae_dir, random_flip=True)
        sources = {"on_the_fly": dict(train_data_dir=images_dir), "cache": dict(latent_cache=cache_dir)}
        results = {}
        for name, source in sources.items():
            data = load_training_data(**source, **common)
            step, noise = build_step(data.sample_size, data.num_classes, seed=0)

            def to_latents(batch):
                return data.latents(batch, noise), batch["class_labels"]

            results[name] = time_loop(data.dataloader, to_latents, step, args.iterations)
        results["speedup"] = results["on_the_fly"]["seconds_per_iteration"] / results["cache"]["seconds_per_iteration"]
        results["cache_write_seconds"] = cache_seconds
        results["settings"] = {"num_images": args.num_images, "resolution": args.resolution, "batch_size": args.batch_size,
                               "iterations": args.iterations, "threads": torch.get_num_threads(),
                               "vae": TINY_VAE["block_out_channels"], "model": TINY_MODEL}
    if args.count_macs:
        results["macs_per_image"] = count_macs()

    fly, cached = results["on_the_fly"], results["cache"]
    print(f"| path | s / iteration (batch {args.batch_size}) | data loading | latents (encode, or draw from cache) |")
    print("|---|---|---|---|")
    for label, r in (("on-the-fly encoding", fly), ("latent cache", cached)):
        print(f"| {label} | {r['seconds_per_iteration']:.3f} | {r['data_seconds']:.4f} | {r['latents_seconds']:.4f} |")
    print(f"speed-up {results['speedup']:.2f}x; writing the cache took {cache_seconds:.1f} s for {args.num_images} images")
    if args.count_macs:
        for key, value in results["macs_per_image"].items():
            print(f"{key}: {value / 1e9:.1f} GMACs per image")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
