#!/usr/bin/env python
"""Load an AFMPipeline folder (or Hub id) and write a sample grid with one row per class.

    python examples/sample_grid.py --pipeline afm-digits --output digits_grid.png --label_rows
"""

import argparse

import torch

from diffusers_afm import AFMPipeline
from diffusers_afm.pipelines import class_grid
from diffusers_afm.utils import atomic_file


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="AFMPipeline folder or Hub id.")
    parser.add_argument("--output", default="grid.png", help="PNG file to write (default: %(default)s).")
    parser.add_argument("--num_classes", type=int, default=10, help="Rows: this many classes, evenly spaced (default: %(default)s).")
    parser.add_argument("--per_class", type=int, default=8, help="Images per row (default: %(default)s).")
    parser.add_argument("--label_rows", action="store_true", help="Write each row's class name (from the pipeline's id2label) to its left.")
    parser.add_argument("--seed", type=int, default=0, help="Noise seed (default: %(default)s).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Default: %(default)s.")
    args = parser.parse_args(argv)

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    pipe = AFMPipeline.from_pretrained(args.pipeline, dtype=dtype).to(args.device)
    grid = class_grid(pipe, args.num_classes, args.per_class, args.seed, label_rows=args.label_rows)
    with atomic_file(args.output) as f:
        grid.save(f, format="PNG")
    print(f"Wrote {args.output} ({grid.size[0]}x{grid.size[1]})")


if __name__ == "__main__":
    main()
