#!/usr/bin/env python
"""Write a small real-image folder to train on: scikit-learn's handwritten digits in colour.

    python examples/make_color_digits.py --output_dir color-digits
    accelerate launch examples/train_afm.py --train_data_dir color-digits --resolution 16 --output_dir afm-color-digits

The folder has the layout of a user's own `imagefolder` (one sub-folder per class, `0/` ... `9/`,
PNG files), so the trainer reads it exactly as it reads any folder of photos: decoded, resized and
centre-cropped to `--resolution`. Each digit (8x8 grey, scaled to `--size` pixels) gets a stroke
colour of its own, a saturated hue drawn uniformly at random, on black: the model has to learn the
shape of the class and an independent colour. `--split train` (the default) writes the same 75% of
the digits that the embedded default trains on; `--split test` the held-out 25%, which
`benchmarks/quality_color_digits.py` measures against. No download: the digits ship with
scikit-learn.
"""

import argparse
import colorsys
import os

import numpy as np
import PIL.Image

from diffusers_afm.data import digits_dataset
from diffusers_afm.utils import atomic_directory


def color_digits(split: str = "train", size: int = 24, seed: int = 0):
    """`(images, labels)`: uint8 RGB arrays `(N, size, size, 3)` and the digit of each."""
    if size < 8:
        raise ValueError(f"`size` must be at least 8 (the digits are 8x8), got {size}.")
    dataset = digits_dataset(split)
    rng = np.random.default_rng(seed)
    hues = rng.uniform(0.0, 1.0, size=len(dataset))
    images = []
    for image, hue in zip(dataset["image"], hues):
        grey = np.asarray(image.resize((size, size), PIL.Image.BICUBIC), dtype=np.float32) / 255.0
        colour = np.asarray(colorsys.hsv_to_rgb(float(hue), 1.0, 1.0), dtype=np.float32)
        images.append(np.round(np.clip(grey, 0.0, 1.0)[..., None] * colour * 255.0).astype(np.uint8))
    return np.stack(images), np.asarray(dataset["label"])


def main(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="color-digits", help="The folder to write (one sub-folder per class).")
    parser.add_argument("--split", choices=("train", "test"), default="train",
                        help="The digits' fixed 75%% train split or the 25%% held out.")
    parser.add_argument("--size", type=int, default=24, help="Side of the written PNGs in pixels.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the stroke colours.")
    args = parser.parse_args(argv)
    if os.path.exists(args.output_dir):
        parser.error(f"--output_dir {args.output_dir!r} exists; pick a new folder.")
    images, labels = color_digits(args.split, args.size, args.seed)
    with atomic_directory(args.output_dir) as tmp:
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = os.path.join(tmp, str(label))
            os.makedirs(folder, exist_ok=True)
            PIL.Image.fromarray(image, mode="RGB").save(os.path.join(folder, f"{i:04d}.png"))
    print(f"wrote {len(images)} images of {args.size}x{args.size} in {len(set(labels.tolist()))} class folders "
          f"to {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
