#!/usr/bin/env python
"""Encode an image dataset once with the VAE into a latent cache that the trainer reads with `--latent_cache`.

    # ImageNet 256 with the SD-VAE, on every GPU of the machine
    accelerate launch examples/cache_latents.py --dataset_name ILSVRC/imagenet-1k --resolution 256 \\
        --vae stabilityai/sd-vae-ft-mse --output_dir imagenet256-latents

Each image is center-cropped and resized as the trainer does (`ImageTransform`), then encoded
together with its horizontal flip. The cache keeps the posterior mean and std of both, not a sample,
so that training from it draws the flips and the latent noise from the trainer's generator exactly
as on-the-fly encoding does (`diffusers_afm.data.cached_latents`). They are stored in the VAE's
dtype (`--dtype`): the trainer encodes in bf16 under `--mixed_precision bf16`, so use
`--dtype bfloat16` for such a run (it also halves the size).

Output: `shard-XXXXX.safetensors` files of `--shard_size` images (`latent_mean`, `latent_std`:
(n, 2, C, h, w); `class_labels`; `valid`, 0 for an image that could not be read) and
`cache_info.json` (the settings; `"complete": true` once every shard is there). Shard k is written
by process k % num_processes, under a temporary name then renamed; a rerun with the same flags
skips the shards that exist, so an interrupted run continues where it stopped.
"""

import argparse
import json
import os
import sys

import torch

from diffusers_afm.data import (
    LATENT_CACHE_FORMAT,
    LATENT_CACHE_INFO,
    ImageTransform,
    cache_shards,
    class_names,
    infer_num_classes,
    latent_cache_shard_name,
    load_image_dataset,
    prepare_dataset,
    write_latent_cache_shard,
)
from diffusers_afm.utils import atomic_file, distributed_state

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_name", default=None, help="Hub dataset or local imagefolder.")
    p.add_argument("--dataset_config_name", default=None)
    p.add_argument("--train_data_dir", default=None, help="A local folder of images (imagefolder layout).")
    p.add_argument("--cache_dir", default=None, help="The `datasets` cache.")
    p.add_argument("--split", default="train")
    p.add_argument("--image_column", default="image")
    p.add_argument("--label_column", default="label", help="Integer class column; if absent, one class.")
    p.add_argument("--num_classes", type=int, default=None)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--vae", default=DEFAULT_VAE, help="Local folder (or a pipeline folder with vae/) or Hub id.")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="The VAE's dtype, and the cache's.")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--shard_size", type=int, default=4096, help="Images per shard file.")
    p.add_argument("--batch_size", type=int, default=64, help="Images per VAE call (twice that with the flips).")
    p.add_argument("--dataloader_num_workers", type=int, default=4)
    p.add_argument("--max_shards", type=int, default=None, help="Stop after this process has written this many shards.")
    return p


def load_vae(name, device, dtype):
    from diffusers import AutoencoderKL

    subfolder = "vae" if os.path.isdir(os.path.join(name, "vae")) else None
    vae = AutoencoderKL.from_pretrained(name, subfolder=subfolder, dtype=dtype)
    return vae.requires_grad_(False).eval().to(device)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.dataset_name is None and args.train_data_dir is None:
        raise ValueError("pass --dataset_name or --train_data_dir (the embedded digits are trained in pixel space).")
    if args.shard_size < 1 or args.batch_size < 1:
        raise ValueError("--shard_size and --batch_size must be >= 1.")
    state = distributed_state()

    # 1. Data, exactly as the trainer prepares it (RGB, center crop), and the VAE
    dataset = load_image_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir, args.split)
    num_classes = infer_num_classes(dataset, args.label_column, args.num_classes)
    names = class_names(dataset, args.label_column)
    prepared = prepare_dataset(dataset, args.image_column, args.label_column, ImageTransform(args.resolution, True, "RGB"))
    vae = load_vae(args.vae, state.device, DTYPES[args.dtype])
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.resolution % down:
        raise ValueError(f"--resolution {args.resolution} is not a multiple of the VAE's downsampling factor {down}.")
    num_images = len(prepared)
    info = {
        "format": LATENT_CACHE_FORMAT,
        "version": 1,
        "dataset": {"name": args.dataset_name, "config": args.dataset_config_name, "train_data_dir": args.train_data_dir,
                    "split": args.split, "image_column": args.image_column, "label_column": args.label_column},
        "num_images": num_images,
        "num_classes": num_classes,
        "id2label": {str(i): n for i, n in enumerate(names)} if names else None,
        "resolution": args.resolution,
        "center_crop": True,
        "vae": args.vae,
        "scaling_factor": vae.config.scaling_factor,
        "dtype": args.dtype,
        "latent_shape": [vae.config.latent_channels, args.resolution // down, args.resolution // down],
        "orientations": ["image", "horizontal flip"],
        "shard_size": args.shard_size,
        "num_shards": -(-num_images // args.shard_size),
    }

    # 2. Check (every process) that an existing cache was made with the same settings; record them.
    info_path = os.path.join(args.output_dir, LATENT_CACHE_INFO)
    if os.path.exists(info_path):
        with open(info_path) as f:
            existing = json.load(f)
        different = [k for k in info if existing.get(k) != info[k]]
        if different:
            changes = ", ".join(f"{k}: {existing.get(k)!r} -> {info[k]!r}" for k in different)
            raise ValueError(f"{args.output_dir} holds a cache made with other settings ({changes}); "
                             "use another --output_dir or the same flags to resume.")
    state.wait_for_everyone()
    if state.is_main_process and not os.path.exists(info_path):
        with atomic_file(info_path, "w") as f:
            json.dump(dict(info, complete=False), f, indent=2)
    state.wait_for_everyone()

    # 3. This process's missing shards
    shards = cache_shards(num_images, args.shard_size, state.process_index, state.num_processes)
    todo = [k for k in shards if not os.path.exists(os.path.join(args.output_dir, latent_cache_shard_name(k)))]
    if args.max_shards is not None:
        todo = todo[: args.max_shards]
    from tqdm.auto import tqdm

    images = sum(min(args.shard_size, num_images - k * args.shard_size) for k in todo)
    with tqdm(total=images, unit="img", desc=f"encoding (rank {state.process_index})",
              disable=not state.is_local_main_process) as progress:
        for k in todo:
            write_latent_cache_shard(prepared, vae, args.output_dir, k, args.shard_size, args.batch_size,
                                     args.dataloader_num_workers, on_batch=progress.update)

    # 4. Mark the cache complete once every shard is there
    state.wait_for_everyone()
    if state.is_main_process:
        missing = [k for k in range(info["num_shards"])
                   if not os.path.exists(os.path.join(args.output_dir, latent_cache_shard_name(k)))]
        if missing:
            print(f"{len(missing)} of {info['num_shards']} shards still missing; rerun the same command to continue.")
        else:
            with atomic_file(info_path, "w") as f:
                json.dump(dict(info, complete=True), f, indent=2)
            print(f"Latent cache of {num_images} images in {args.output_dir}")
    state.wait_for_everyone()
    return args.output_dir


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        sys.exit(f"error: {err}")
