r"""`afm-convert`: turn a released AFM generator checkpoint, or a SiT or JiT flow-matching checkpoint
(the models Continuous AFM post-trains), into an `AFMPipeline` folder.

    afm-convert --checkpoint xl2_1nfe_guided_FID2.38.pth --model_size XL/2 --nfe 1 \
        --vae stabilityai/sd-vae-ft-mse --output_dir afm-xl2-1nfe
    afm-convert --checkpoint SiT-XL-2-256.pt --format sit --model_size XL/2 --output_dir sit-xl2
    afm-convert --checkpoint jit-h-16/checkpoint-last.pth --format jit --output_dir jit-h16

The model's shape (width, depth, patch size, channels, classes, input size) and its time
embedders are read off the checkpoint; the head count comes from `--model_size`, `--num_heads` or
the paper preset of that depth and width. The folder gets a model card (README.md), and with
`--standalone` the generated code that lets it load without diffusers-afm.

A bad flag exits with status 2 and a bad checkpoint file with status 1, each with a one-line error.
"""

import argparse
import json
import os
import sys
from typing import Dict, Optional

from ..data.training_data import DEFAULT_VAE
from ..models.transformer_afm import AFM_PRESETS
from ..models.transformer_jit import JIT_PRESETS
from ..utils import FlagValueError, atomic_directory, parse_nfe
from .files import (
    IMAGENET_DATASET,
    NESTED_KEYS,
    CheckpointError,
    imagenet_id2label,
    load_error_reason,
    load_reference_state_dict,
    read_checkpoint,
)
from .official import convert_official_generator, convert_sit_generator

FORMATS = ("afm", "sit", "jit")
_SOURCE_NAMES = {"afm": "reference", "sit": "SiT", "jit": "JiT"}

class _OneLineErrors(argparse.ArgumentParser):
    """argparse with its usage errors on one line, like every other error of the command."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(
        prog="afm-convert",
        allow_abbrev=False,  # `--check` must not quietly mean `--checkpoint`
        description=__doc__,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=32),
    )
    add = parser.add_argument
    add("--checkpoint", required=True, help="Generator state dict (.pth read with weights_only=True, or .safetensors).")
    add("--output_dir", required=True, help="Where to write the AFMPipeline folder (replaced as a whole).")
    add("--format", default="afm", choices=FORMATS,
        help="'afm': an AFM generator (the reference layout); 'sit': a SiT flow-matching model (the official "
        "SiT-XL-2-256.pt layout, or the CAFM reference's generator), converted to a FlowMatchingTransformer2DModel "
        "in this library's time convention; 'jit': a JiT pixel-space model (JiT's checkpoint-*.pth, whose "
        "`model_ema1` is taken, or the CAFM authors' JiT state dict), converted to a JiTTransformer2DModel "
        "(default: %(default)s).")
    add("--model_size", default=None, choices=list(AFM_PRESETS) + list(JIT_PRESETS),
        help="Preset size, for the head count (afm, sit; default: the preset of the checkpoint's depth and width); "
        "for jit, a JiT size the weights must have (they give every size but --in_context_start).")
    add("--in_context_start", type=int, default=None,
        help="jit: the block before which the in-context class tokens join, for a size that is not a JiT preset "
        "(default: the preset's: B 4, L 8, H 10).")
    add("--num_heads", type=int, default=None, help="Head count, for a size that is not a preset (default: from --model_size).")
    add("--nfe", type=parse_nfe, default=None,
        help="Steps the model was trained for: 1, 2, 4, ... or 'any' (default: 1 without a time embedder, "
        "'any' with a target-time embedder).")
    add("--depth_repeat", type=int, default=1, help="Deep models: 2 (56 layers) or 4 (112 layers) (default: %(default)s).")
    add("--vae", default=None,
        help=f"Local folder or Hub id of the VAE, or 'none' for pixel space (default: {DEFAULT_VAE}; none for jit).")
    add("--class_names", default="imagenet",
        help="'imagenet' (used for 1000 classes), a JSON file {id: name}, or 'none' (default: %(default)s).")
    add("--state_dict_key", default=None,
        help=f"Key of the weights inside a nested checkpoint, e.g. 'ema' (default: the first of {', '.join(NESTED_KEYS)} found).")
    add("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="Dtype of the saved weights (default: %(default)s).")
    add("--standalone", action="store_true",
        help="Also write the generated code with which the folder loads without diffusers-afm "
        "(DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)).")
    add("--dataset", default=None, help=f"Training data named on the model card (default: {IMAGENET_DATASET} for ImageNet class names).")
    add("--license", default=None, help="Licence id of the weights for the model card (default: none stated).")
    add("--push_to_hub", action="store_true", help="Upload the folder to the Hub as --hub_model_id.")
    add("--hub_model_id", default=None, help="Hub repository (default: the output folder's name, in your namespace).")
    return parser


def _check_flags(args: argparse.Namespace) -> None:
    """Every flag, before anything large is read."""
    if args.depth_repeat < 1 or (args.depth_repeat > 1 and args.nfe not in (1, None)):
        raise FlagValueError(
            f"`--depth_repeat` must be >= 1, and > 1 only for a 1-NFE model; got {args.depth_repeat} with --nfe {args.nfe}."
        )
    if args.num_heads is not None and args.num_heads < 1:
        raise FlagValueError(f"`--num_heads` must be a positive integer, got {args.num_heads}.")
    if args.format in ("sit", "jit") and (args.nfe is not None or args.depth_repeat != 1):
        raise FlagValueError(f"`--nfe` and `--depth_repeat` are AFM settings; a {args.format.upper()} (`--format "
                             f"{args.format}`) samples with any number of ODE steps. Leave them out.")
    if args.format == "jit":
        if args.vae not in (None, "none"):
            raise FlagValueError(f"`--vae` must be 'none' (or left out) for JiT, a pixel-space model; got {args.vae!r}.")
        if args.num_heads is not None:
            raise FlagValueError("`--num_heads` is not needed for JiT: the head count is read off the weights. Leave it out.")
        if args.model_size is not None and args.model_size not in JIT_PRESETS:
            raise FlagValueError(f"`--model_size` for JiT must be one of {', '.join(JIT_PRESETS)}, got {args.model_size!r}.")
    elif args.in_context_start is not None or args.model_size in JIT_PRESETS:
        raise FlagValueError(f"`--in_context_start` and the JiT sizes of `--model_size` are for `--format jit`, not "
                             f"{args.format!r}.")
    if args.class_names not in ("imagenet", "none") and not os.path.isfile(args.class_names):
        raise FlagValueError(f"`--class_names` must be 'imagenet', 'none' or a JSON file, got {args.class_names!r}.")


def _load_class_names(args: argparse.Namespace, num_classes: int) -> Optional[Dict[int, str]]:
    if args.class_names == "none":
        return None
    if args.class_names == "imagenet":
        return imagenet_id2label() if num_classes == 1000 else None
    try:
        with open(args.class_names, encoding="utf-8") as f:
            return {int(k): str(v) for k, v in json.load(f).items()}
    except (ValueError, AttributeError) as err:
        raise FlagValueError(f"`--class_names` {args.class_names!r} is not a JSON object {{id: name}} ({load_error_reason(err)}).") from None


def _load_vae(args: argparse.Namespace):
    """`--vae` (default: the SD-VAE; none for JiT), or None for a pixel-space model."""
    args.vae = args.vae or ("none" if args.format == "jit" else DEFAULT_VAE)
    if args.vae.lower() == "none":
        return None
    from diffusers import AutoencoderKL

    subfolder = "vae" if os.path.isdir(os.path.join(args.vae, "vae")) else None
    try:
        return AutoencoderKL.from_pretrained(args.vae, subfolder=subfolder)
    except (OSError, ValueError) as err:  # not a folder, not on the Hub, or offline and not cached
        raise FlagValueError(
            f"`--vae` {args.vae!r} cannot be loaded ({load_error_reason(err)}); pass a local VAE folder, a Hub id "
            "(online or cached), or 'none' for a pixel-space model."
        ) from None


def convert(args: argparse.Namespace) -> str:
    """Run a conversion from parsed flags; returns the output folder."""
    from ..hub import save_model_card
    from ..pipelines import AFMPipeline, export_standalone

    _check_flags(args)
    # 1. The checkpoint, read (safely) and checked against the model first: a missing, damaged or
    #    foreign file is reported as such, whatever the VAE (which may not even be reachable offline).
    if args.format == "jit":
        from .jit import load_jit_checkpoint

        state_dict, jit_args = load_jit_checkpoint(args.checkpoint, args.state_dict_key)
    else:
        state_dict = load_reference_state_dict(args.checkpoint, args.state_dict_key)
    try:
        if args.format == "jit":
            from .jit import convert_jit_generator

            transformer = convert_jit_generator(state_dict, model_size=args.model_size,
                                                in_context_start=args.in_context_start, args=jit_args)
        elif args.format == "sit":
            transformer = convert_sit_generator(state_dict, model_size=args.model_size, num_heads=args.num_heads)
        else:
            transformer = convert_official_generator(
                state_dict,
                nfe=-1 if args.nfe is None else args.nfe,
                repeat=args.depth_repeat,
                model_size=args.model_size,
                num_heads=args.num_heads,
            )
    except ValueError as err:
        raise CheckpointError(f"`--checkpoint` {args.checkpoint!r}: {err}") from None
    if args.dtype != "float32":
        import torch

        transformer = transformer.to(getattr(torch, args.dtype))
    # 2. The VAE, 3. the Hub repository (before anything is written, so that a missing token or a
    #    taken name fails first)
    vae = _load_vae(args)
    repo_id = None
    if args.push_to_hub:
        from huggingface_hub import create_repo

        repo_id = create_repo(args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)), exist_ok=True).repo_id
    num_classes = transformer.config.num_classes
    id2label = _load_class_names(args, num_classes)
    dataset = args.dataset or (IMAGENET_DATASET if args.class_names == "imagenet" and num_classes == 1000 else None)

    pipe = AFMPipeline(transformer=transformer, vae=vae, id2label=id2label)
    # The folder appears complete or not at all: weights, generated code, card.
    with atomic_directory(args.output_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if args.standalone:
            export_standalone(tmp)
        save_model_card(
            tmp,
            repo_id=repo_id or os.path.basename(os.path.abspath(args.output_dir)),
            dataset=dataset,
            description=f"Converted with `afm-convert` from the {_SOURCE_NAMES[args.format]} "
            f"checkpoint `{os.path.basename(args.checkpoint)}`.",
            license=args.license,
        )
    print(f"Wrote an AFMPipeline ({transformer.num_parameters() / 1e6:.1f}M parameters) to {args.output_dir}")
    if repo_id is not None:
        from huggingface_hub import upload_folder

        upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="afm-convert")
        print(f"Uploaded to https://huggingface.co/{repo_id}")
    return args.output_dir


def main(argv=None) -> None:
    """The `afm-convert` command: exit status 0 on success, 2 for a bad flag, 1 for a bad checkpoint,
    each error on one line (no traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        convert(args)
    except (FlagValueError, FileNotFoundError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except ValueError as err:  # CheckpointError, and the converter's key and shape checks
        parser.exit(1, f"{parser.prog}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
