"""`afm-convert`: turn a released AFM generator checkpoint into an `AFMPipeline` folder.

    afm-convert --checkpoint xl2_1nfe_guided_FID2.38.pth --model_size XL/2 --nfe 1 \
        --vae stabilityai/sd-vae-ft-mse --output_dir afm-xl2-1nfe

The model's shape (width, depth, patch size, channels, classes, input size) is read off the
checkpoint; `--model_size` supplies the head count (and is checked against the shapes).
"""

import argparse
import json
import os
from importlib import resources
from typing import Dict, Optional

import torch

from ..models.transformer_afm import AFM_PRESETS
from ..utils import atomic_save_pretrained, parse_nfe
from .official import convert_official_generator, strip_wrapper_prefixes

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
# Keys under which training scripts commonly nest the weights; the EMA weights are what samples well.
_NESTED_KEYS = ("ema", "model_ema", "state_dict", "model", "gen", "generator")


def imagenet_id2label() -> Dict[int, str]:
    """The 1000 ImageNet-1k class names (WordNet synonyms, comma-separated), shipped with the package."""
    text = resources.files("diffusers_afm").joinpath("data/imagenet_classes.json").read_text(encoding="utf-8")
    return {int(k): v for k, v in json.loads(text).items()}


def load_checkpoint(path: str, state_dict_key: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Read a `.pth`/`.pt` (safely: `weights_only=True`) or `.safetensors` state dict."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`--checkpoint`: no file at {path!r}.")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        obj = load_file(path)
    elif path.endswith((".pth", ".pt", ".bin", ".ckpt")):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"`--checkpoint` must be a .pth, .pt, .bin, .ckpt or .safetensors file, got {path!r}.")
    if state_dict_key is not None:
        if state_dict_key not in obj:
            raise ValueError(f"`--state_dict_key`: {state_dict_key!r} is not in the checkpoint; it has {sorted(obj)}.")
        obj = obj[state_dict_key]
    elif not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _NESTED_KEYS:
            if key in obj:
                obj = obj[key]
                break
        else:
            raise ValueError(f"No tensors at the top of the checkpoint; pick one of {sorted(obj)} with `--state_dict_key`.")
    return strip_wrapper_prefixes(obj)


def infer_reference_kwargs(state_dict: Dict[str, torch.Tensor], model_size: Optional[str], num_heads: Optional[int]) -> dict:
    """Reference constructor arguments, read off the shapes (the head count comes from the size)."""
    try:
        proj = state_dict["x_embedder.proj.weight"]  # (D, C, p, p)
        num_tokens = state_dict["pos_embed"].shape[1]
        num_classes = state_dict["y_embedder.embedding_table.weight"].shape[0]
    except KeyError as err:
        raise ValueError(f"`--checkpoint` is not an AFM generator in the reference layout: missing key {err}.") from None
    hidden_size, in_channels, patch_size = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    if model_size is not None:
        if model_size not in AFM_PRESETS:
            raise ValueError(f"`--model_size` must be one of {', '.join(AFM_PRESETS)}, got {model_size!r}.")
        preset = AFM_PRESETS[model_size]
        preset_width = preset["num_attention_heads"] * preset["attention_head_dim"]
        if (preset["num_layers"], preset_width) != (depth, hidden_size):
            raise ValueError(
                f"`--model_size` {model_size} has {preset['num_layers']} layers of width {preset_width}, but the "
                f"checkpoint has {depth} layers of width {hidden_size}."
            )
        num_heads = num_heads or preset["num_attention_heads"]
    if num_heads is None:
        raise ValueError("Pass `--model_size` (B/2, M/2, L/2, XL/2, S/2) or `--num_heads`: heads cannot be read off the weights.")
    return dict(
        input_size=int(round(num_tokens**0.5)) * patch_size,
        patch_size=patch_size,
        in_channels=in_channels,
        hidden_size=hidden_size,
        depth=depth,
        num_heads=num_heads,
        num_classes=num_classes,
        learn_sigma=False,
        class_dropout_prob=0.0,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="Generator state dict (.pth read with weights_only=True, or .safetensors).")
    parser.add_argument("--output_dir", required=True, help="Where to write the AFMPipeline folder.")
    parser.add_argument("--model_size", default=None, help=f"One of {', '.join(AFM_PRESETS)} (gives the head count).")
    parser.add_argument("--num_heads", type=int, default=None, help="Head count, for a size that is not a preset.")
    parser.add_argument("--nfe", default="1", help="Steps the model was trained for: 1, 2, 4, ... or 'any'.")
    parser.add_argument("--depth_repeat", type=int, default=1, help="Deep models: 2 (56 layers) or 4 (112 layers).")
    parser.add_argument("--vae", default=DEFAULT_VAE, help="Local folder or Hub id of the VAE, or 'none' for pixel space.")
    parser.add_argument("--class_names", default="imagenet", help="'imagenet', a JSON file {id: name}, or 'none'.")
    parser.add_argument("--state_dict_key", default=None, help="Key of the weights inside a nested checkpoint (e.g. 'ema').")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="Dtype of the saved weights.")
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the folder to the Hub as --hub_model_id.")
    parser.add_argument("--hub_model_id", default=None)
    return parser


def main(argv=None) -> str:
    args = build_parser().parse_args(argv)
    # Check every argument before loading anything large.
    nfe = parse_nfe(args.nfe)
    if args.depth_repeat < 1 or (args.depth_repeat > 1 and nfe != 1):
        raise ValueError(f"`--depth_repeat` must be >= 1, and > 1 only with --nfe 1; got {args.depth_repeat} with --nfe {args.nfe}.")
    if args.class_names not in ("imagenet", "none") and not os.path.isfile(args.class_names):
        raise ValueError(f"`--class_names` must be 'imagenet', 'none' or a JSON file, got {args.class_names!r}.")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("`--push_to_hub` needs `--hub_model_id`.")

    state_dict = load_checkpoint(args.checkpoint, args.state_dict_key)
    kwargs = infer_reference_kwargs(state_dict, args.model_size, args.num_heads)
    use_t_src = "t_embedder.mlp.0.weight" in state_dict and args.depth_repeat == 1
    use_t_tgt = "t_tgt_embedder.mlp.0.weight" in state_dict
    if args.depth_repeat > 1:
        kwargs["repeat"] = args.depth_repeat
    transformer = convert_official_generator(state_dict, use_t_src=use_t_src, use_t_tgt=use_t_tgt, nfe=nfe, **kwargs)
    if args.dtype != "float32":
        transformer = transformer.to(getattr(torch, args.dtype))

    vae = None
    if args.vae.lower() != "none":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae, subfolder="vae" if os.path.isdir(os.path.join(args.vae, "vae")) else None)
    if args.class_names == "imagenet":
        id2label = imagenet_id2label() if kwargs["num_classes"] == 1000 else None
    elif args.class_names == "none":
        id2label = None
    else:
        with open(args.class_names, encoding="utf-8") as f:
            id2label = {int(k): v for k, v in json.load(f).items()}

    from ..pipelines import AFMPipeline

    pipe = AFMPipeline(transformer=transformer, vae=vae, id2label=id2label)
    atomic_save_pretrained(pipe, args.output_dir)
    print(f"Wrote an AFMPipeline ({transformer.num_parameters() / 1e6:.1f}M parameters) to {args.output_dir}")
    if args.push_to_hub:
        pipe.push_to_hub(args.hub_model_id)
    return args.output_dir


if __name__ == "__main__":
    main()
