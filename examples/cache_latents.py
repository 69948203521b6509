#!/usr/bin/env python
"""Encode an image dataset once with the VAE into a latent cache that the trainer reads with `--latent_cache`.

    # ImageNet 256 with the SD-VAE, on every GPU of the machine
    accelerate launch examples/cache_latents.py --dataset_name ILSVRC/imagenet-1k --resolution 256 \\
        --vae stabilityai/sd-vae-ft-mse --output_dir imagenet256-latents

Each image is center-cropped and resized as the trainer does (`ImageTransform`), then encoded
together with its horizontal flip; training from the cache then draws the same flips and latents as
on-the-fly encoding (the format and that invariant: `diffusers_afm.data.latent_cache`). Latents are
stored in the VAE's dtype (`--dtype`): the trainer encodes in bf16 under `--mixed_precision bf16`,
so use `--dtype bfloat16` for such a run (it also halves the size).

A rerun with the same flags skips the shards that exist, so an interrupted run continues where it
stopped; a rerun with other flags is an error.
"""

import argparse
import sys

import torch

from diffusers_afm.data import (
    DEFAULT_VAE,
    ImageTransform,
    check_columns,
    class_names,
    infer_num_classes,
    latent_cache_info,
    load_image_dataset,
    load_vae,
    prepare_dataset,
    write_latent_cache,
)
from diffusers_afm.utils import HelpFormatter, distributed_state

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser():
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--dataset_name", default=None, help="Hub dataset or local imagefolder.")
    p.add_argument("--dataset_config_name", default=None, help="The Hub dataset's configuration, if it has several.")
    p.add_argument("--train_data_dir", default=None, help="A local folder of images (imagefolder layout).")
    p.add_argument("--cache_dir", default=None, help="The `datasets` cache.")
    p.add_argument("--split", default="train", help="The dataset split to encode.")
    p.add_argument("--image_column", default="image", help="The dataset's image column.")
    p.add_argument("--label_column", default=None,
                   help="The integer class column (an error if missing). Unset: 'label' if the dataset has it, else one class.")
    p.add_argument("--num_classes", type=int, default=None, help="Override the class count read off the data.")
    p.add_argument("--resolution", type=int, default=256, help="Image side (center crops), as the trainer's --resolution.")
    p.add_argument("--vae", default=DEFAULT_VAE, help="Local folder (or a pipeline folder with vae/) or Hub id.")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="The VAE's dtype, and the cache's.")
    p.add_argument("--output_dir", required=True, help="The cache folder (train with --latent_cache).")
    p.add_argument("--shard_size", type=int, default=4096, help="Images per shard file.")
    p.add_argument("--batch_size", type=int, default=64, help="Images per VAE call (twice that with the flips).")
    p.add_argument("--dataloader_num_workers", type=int, default=4, help="DataLoader worker processes.")
    p.add_argument("--max_shards", type=int, default=None, help="Stop after this process has written this many shards.")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.dataset_name is None and args.train_data_dir is None:
        raise ValueError("pass --dataset_name or --train_data_dir (the embedded digits are trained in pixel space).")
    if args.shard_size < 1 or args.batch_size < 1:
        raise ValueError("--shard_size and --batch_size must be >= 1.")
    state = distributed_state()

    # 1. Data, exactly as the trainer prepares it (RGB, center crop), and the VAE
    dataset = load_image_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir, args.split)
    args.label_column = check_columns(dataset, args.image_column, args.label_column)
    num_classes = infer_num_classes(dataset, args.label_column, args.num_classes)
    prepared = prepare_dataset(dataset, args.image_column, args.label_column, ImageTransform(args.resolution, True, "RGB"))
    vae = load_vae(args.vae, state.device, DTYPES[args.dtype])

    # 2. Encode this process's missing shards
    info = latent_cache_info(
        vae, args.vae, len(prepared), num_classes, class_names(dataset, args.label_column), args.resolution,
        args.shard_size,
        dataset={"name": args.dataset_name, "config": args.dataset_config_name, "train_data_dir": args.train_data_dir,
                 "split": args.split, "image_column": args.image_column, "label_column": args.label_column},
    )
    missing = write_latent_cache(prepared, vae, args.output_dir, info, state, args.batch_size,
                                 args.dataloader_num_workers, args.max_shards)
    if state.is_main_process:
        if missing:
            print(f"{len(missing)} of {info['num_shards']} shards still missing; rerun the same command to continue.")
        else:
            print(f"Latent cache of {info['num_images']} images in {args.output_dir}")
    return args.output_dir


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        sys.exit(f"error: {err}")
