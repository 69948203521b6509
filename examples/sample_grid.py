#!/usr/bin/env python
"""Load an AFMPipeline folder (or Hub id) and write a sample grid with one row per class.

    python examples/sample_grid.py --pipeline afm-digits --output digits_grid.png --label_rows
    # a flow-matching model: steps, the scheduler (by its solver name) and classifier-free guidance
    python examples/sample_grid.py --pipeline cafm-digits --num_inference_steps 8 --solver heun --guidance_scale 1.5
"""

import argparse

import torch

from diffusers_afm import AFMPipeline
from diffusers_afm.flow import SOLVERS
from diffusers_afm.pipelines import class_grid
from diffusers_afm.utils import atomic_file


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="AFMPipeline folder or Hub id.")
    parser.add_argument("--output", default="grid.png", help="PNG file to write (default: %(default)s).")
    parser.add_argument("--num_classes", type=int, default=10, help="Rows: this many classes, evenly spaced (default: %(default)s).")
    parser.add_argument("--per_class", type=int, default=8, help="Images per row (default: %(default)s).")
    parser.add_argument("--label_rows", action="store_true", help="Write each row's class name (from the pipeline's id2label) to its left.")
    parser.add_argument("--seed", type=int, default=0, help="Noise seed (default: %(default)s).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Default: %(default)s.")
    flow = parser.add_argument_group("flow-matching models (AFM generators sample in the steps they were trained for)")
    flow.add_argument("--num_inference_steps", type=positive_int, default=None,
                      help="Steps over [1, 0] (default: the pipeline's: 50 for a flow model; an AFM model's trained count).")
    flow.add_argument("--solver", choices=SOLVERS, default=None,
                      help="The scheduler, by its solver name: euler (FlowMatchEulerDiscreteScheduler), heun or "
                           "heun_final_euler (FlowHeunScheduler) (default: the folder's scheduler).")
    flow.add_argument("--guidance_scale", type=non_negative_float, default=None, help="Classifier-free guidance (1 = none).")
    flow.add_argument("--guidance_interval", type=float, nargs=2, metavar=("T_LOW", "T_HIGH"), default=None,
                      help="Guide only at flow times T_LOW < t < T_HIGH (1 = noise), as JiT does (0.0 0.9).")
    args = parser.parse_args(argv)

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    pipe = AFMPipeline.from_pretrained(args.pipeline, dtype=dtype).to(args.device)
    sampling = {name: getattr(args, name) for name in ("num_inference_steps", "solver", "guidance_scale", "guidance_interval")
                if getattr(args, name) is not None}
    if "guidance_interval" in sampling:
        sampling["guidance_interval"] = tuple(sampling["guidance_interval"])
    try:
        grid = class_grid(pipe, args.num_classes, args.per_class, args.seed, label_rows=args.label_rows, **sampling)
    except ValueError as err:  # a setting this model does not take (an AFM model's guidance, a step count)
        parser.error(str(err))
    with atomic_file(args.output) as f:
        grid.save(f, format="PNG")
    print(f"Wrote {args.output} ({grid.size[0]}x{grid.size[1]})")


if __name__ == "__main__":
    main()
