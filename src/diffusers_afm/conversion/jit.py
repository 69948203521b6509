"""JiT checkpoints -> `JiTTransformer2DModel` / `AdversarialFlowJiTDiscriminator` (docs/cafm.md, "JiT").

Two layouts hold the same JiT keys:
- JiT's own training checkpoints (`checkpoint-last.pth` of LTH14/JiT): a dict with `model`,
  `model_ema1`, `model_ema2` (each JiT's `Denoiser`, so every key starts with `net.`), the optimizer,
  the epoch and `args`, an `argparse.Namespace` of JiT's flags. We take `model_ema1`, the EMA JiT
  samples with (decay 0.9999; the CAFM recipe's `JiT-H-16-256-ema0.9999.pth`), and drop the leading
  `net.` (the authors' `misc/convert_from_jit_format.py` does the same; it replaces `net.` anywhere).
- The CAFM authors' checkpoints (their `cafm/jit_h16_cafm.pth`, and what their trainer saves): the
  plain state dict of their JiT generator (or discriminator), keys without `net.`.

Reading: `torch.load(weights_only=True)` with exactly one class allowed besides tensors,
`argparse.Namespace` (`torch.serialization.safe_globals`): a checkpoint that pickles anything else
(code to run included) is refused, never unpickled.

Mapping (every map is a rename, a split or a swap of halves, so it carries gradients as it carries
weights): fused `qkv` -> `to_q/to_k/to_v`; `q_norm/k_norm` -> `norm_q/norm_k`; SwiGLU's `w12`
halves swapped (JiT gates its first half, diffusers' `SwiGLU` its second); the final adaLN's
(shift, scale) -> diffusers' (scale, shift); `pos_embed` is checked against the table we compute.
The shape (width, depth, heads, patch, bottleneck, in-context tokens, classes, image size) is read
off the weights; only the block where the in-context tokens join is not in them (JiT's presets:
B 4, L 8, H 10).
"""

import argparse
import math
import re
from typing import Dict, Optional, Tuple

import torch

from ..models.discriminator_jit import AdversarialFlowJiTDiscriminator
from ..models.transformer_jit import JIT_PRESETS, JiTTransformer2DModel
from .files import CheckpointError, read_checkpoint, select_state_dict
from .official import load_converted, map_state_dict, strip_wrapper_prefixes, swap_halves

_EXPECTED = ("a JiT checkpoint: JiT's checkpoint-*.pth (with `model_ema1`) or a plain JiT state dict "
             "(.pth/.pt read with weights_only=True, or .safetensors)")
_LABEL_KEY = "y_embedder.embedding_table.weight"
_REQUIRED = ("x_embedder.proj1.weight", "x_embedder.proj2.weight", "pos_embed", _LABEL_KEY, "blocks.0.attn.q_norm.weight")

# (JiT key pattern, our key template); the blocks' qkv is split by `map_state_dict`.
_TRUNK_RULES = [
    (r"in_context_posemb", "in_context_pos_embed"),
    (r"t_embedder\.mlp\.0\.(weight|bias)", r"time_embed.timestep_embedder.linear_1.\1"),
    (r"t_embedder\.mlp\.2\.(weight|bias)", r"time_embed.timestep_embedder.linear_2.\1"),
    (re.escape(_LABEL_KEY), "class_embedder.embedding_table.weight"),
    (r"x_embedder\.proj1\.weight", "patch_embed.bottleneck.weight"),
    (r"x_embedder\.proj2\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"blocks\.(\d+)\.norm1\.weight", r"transformer_blocks.\1.norm1.norm.weight"),
    (r"blocks\.(\d+)\.norm2\.weight", r"transformer_blocks.\1.norm2.weight"),
    (r"blocks\.(\d+)\.attn\.q_norm\.weight", r"transformer_blocks.\1.attn.norm_q.weight"),
    (r"blocks\.(\d+)\.attn\.k_norm\.weight", r"transformer_blocks.\1.attn.norm_k.weight"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"transformer_blocks.\1.attn.to_out.0.\2"),
    (r"blocks\.(\d+)\.mlp\.w3\.(weight|bias)", r"transformer_blocks.\1.ff.net.2.\2"),
    (r"blocks\.(\d+)\.adaLN_modulation\.1\.(weight|bias)", r"transformer_blocks.\1.norm1.linear.\2"),
]
_TRUNK_TRANSFORMS = {r"blocks\.(\d+)\.mlp\.w12\.(weight|bias)": (r"transformer_blocks.\1.ff.net.0.proj.\2", swap_halves)}
_GENERATOR_RULES = _TRUNK_RULES + [
    (r"final_layer\.norm_final\.weight", "norm_out.norm.weight"),
    (r"final_layer\.linear\.(weight|bias)", r"proj_out.\1"),
]
_GENERATOR_TRANSFORMS = {
    **_TRUNK_TRANSFORMS,
    r"final_layer\.adaLN_modulation\.1\.(weight|bias)": (r"norm_out.linear.\1", swap_halves),
}
_DISCRIMINATOR_RULES = _TRUNK_RULES + [(r"proj_out\.1\.(weight|bias)", r"proj_out.\1")]


# ----------------------------------------------------------------------------- reading files
def load_jit_checkpoint(path: str, state_dict_key: Optional[str] = None
                        ) -> Tuple[Dict[str, torch.Tensor], Optional[argparse.Namespace]]:
    """The JiT state dict in `path` and, for JiT's own checkpoints, their `args` (else None).
    `state_dict_key` picks another entry of a JiT checkpoint than `model_ema1` (`model_ema2`, `model`).

    Raises `FileNotFoundError` for a missing file, `FlagValueError` for a file name it does not read,
    and `CheckpointError` (one line, naming the file) for a file it cannot read safely or that holds
    no JiT weights.
    """
    # JiT pickles its flags as an argparse.Namespace: that one class is allowed, nothing else.
    obj = read_checkpoint(path, allowed_globals=(argparse.Namespace,))
    args = obj.get("args") if isinstance(obj, dict) and isinstance(obj.get("args"), argparse.Namespace) else None
    state_dict = select_state_dict(obj, path, state_dict_key, nested_keys=("model_ema1",))
    if "model_ema1" in obj or state_dict_key is not None:  # JiT's Denoiser holds the network as `net`
        state_dict = {k[len("net."):] if k.startswith("net.") else k: v for k, v in state_dict.items()}
    missing = [k for k in _REQUIRED if k not in state_dict]
    if missing:
        raise CheckpointError(f"`--checkpoint` {path!r} is not a JiT checkpoint: it has no `{missing[0]}`; expected {_EXPECTED}.")
    return state_dict, args


# ----------------------------------------------------------------------------- sizes
def infer_jit_config(
    state_dict: Dict[str, torch.Tensor],
    model_size: Optional[str] = None,
    in_context_start: Optional[int] = None,
    args: Optional[argparse.Namespace] = None,
) -> dict:
    """The trunk config of a JiT state dict, read off its shapes. The heads come from the q/k norm's
    width (the head dim). `in_context_start` (not in the weights) comes from the argument, else
    `model_size`, else JiT's `args.model`, else the JiT preset of the checkpoint's depth and width.
    `model_size` (a `JIT_PRESETS` name) must fit the weights."""
    try:
        bottleneck = state_dict["x_embedder.proj1.weight"]  # (bottleneck, C, p, p)
        width = state_dict["x_embedder.proj2.weight"].shape[0]
        num_tokens = state_dict["pos_embed"].shape[1]
        head_dim = state_dict["blocks.0.attn.q_norm.weight"].shape[0]
        rows = state_dict[_LABEL_KEY].shape[0]
    except (KeyError, IndexError) as err:
        raise ValueError(f"Not a JiT checkpoint: it has no (well-shaped) key {err}.") from None
    patch_size = bottleneck.shape[-1]
    grid = math.isqrt(num_tokens)
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if re.match(r"blocks\.\d+\.", k))
    if grid * grid != num_tokens or width % head_dim:
        raise ValueError(f"Not a JiT checkpoint: `pos_embed` has {num_tokens} tokens (not a square grid) or the width "
                         f"{width} is not a multiple of the head dim {head_dim}.")
    in_context = state_dict.get("in_context_posemb")
    config = dict(
        sample_size=grid * patch_size, patch_size=patch_size, in_channels=bottleneck.shape[1], num_layers=depth,
        num_attention_heads=width // head_dim, attention_head_dim=head_dim, bottleneck_dim=bottleneck.shape[0],
        in_context_len=0 if in_context is None else in_context.shape[1], num_classes=rows - 1,
    )
    preset_names = [name for name in (model_size, getattr(args, "model", None)) if name is not None]
    preset_names += [name for name, preset in JIT_PRESETS.items()
                     if (preset["num_layers"], preset["num_attention_heads"] * preset["attention_head_dim"]) == (depth, width)]
    if model_size is not None:
        if model_size not in JIT_PRESETS:
            raise ValueError(f"`model_size` (`--model_size`) must be one of {', '.join(JIT_PRESETS)} for JiT, got {model_size!r}.")
        misfit = [f"{k} {config[k]} (not {v})" for k, v in JIT_PRESETS[model_size].items() if k in config and config[k] != v]
        if misfit:
            raise ValueError(f"`model_size` (`--model_size`) {model_size} does not fit the weights: they have {', '.join(misfit)}.")
    if in_context_start is None and config["in_context_len"] > 0:
        known = [JIT_PRESETS[name]["in_context_start"] for name in preset_names if name in JIT_PRESETS]
        if not known:
            raise ValueError(f"The checkpoint ({depth} layers of width {width}) is not a JiT preset size, and where its "
                             "in-context tokens join is not in the weights: pass `in_context_start` (`--in_context_start`).")
        in_context_start = known[0]
    return dict(config, in_context_start=0 if in_context_start is None else in_context_start)


def _check_pos_embed(state_dict: Dict[str, torch.Tensor], model) -> Dict[str, torch.Tensor]:
    """Drop `pos_embed` after checking it is the fixed sin-cos table the model computes."""
    theirs, ours = state_dict["pos_embed"], model.patch_embed.pos_embed
    if tuple(theirs.shape) != tuple(ours.shape) or not torch.allclose(theirs.float(), ours.float(), atol=1e-5):
        raise ValueError("Checkpoint key `pos_embed` is not the fixed 2-D sin-cos table of this size.")
    return {k: v for k, v in state_dict.items() if k != "pos_embed"}


# ----------------------------------------------------------------------------- models
def convert_jit_generator(
    state_dict: Dict[str, torch.Tensor],
    *,
    model_size: Optional[str] = None,
    in_context_start: Optional[int] = None,
    args: Optional[argparse.Namespace] = None,
    **config_overrides,
) -> JiTTransformer2DModel:
    """A JiT state dict (JiT's keys without `net.`: `convert_from_jit_format.py`'s output, the CAFM
    authors' generator) as a `JiTTransformer2DModel`, sizes read off the weights (`infer_jit_config`).

    JiT's `args` (from `load_jit_checkpoint`) give the noise scale; without them it is JiT's pairing
    (1 up to 256 px, 2 at 512 px). `config_overrides` set any other config value (e.g. `dropout`).
    """
    state_dict = strip_wrapper_prefixes(state_dict)
    config = infer_jit_config(state_dict, model_size, in_context_start, args)
    default_noise = 2.0 if config["sample_size"] >= 512 else 1.0
    config.update(noise_scale=float(getattr(args, "noise_scale", default_noise)), class_dropout_prob=0.1)
    model = JiTTransformer2DModel(**{**config, **config_overrides})
    state_dict = _check_pos_embed(state_dict, model)
    return load_converted(model, map_state_dict(state_dict, _GENERATOR_RULES, _GENERATOR_TRANSFORMS, model, config["num_classes"]))


def convert_jit_discriminator(
    state_dict: Dict[str, torch.Tensor],
    *,
    model_size: Optional[str] = None,
    in_context_start: Optional[int] = None,
) -> AdversarialFlowJiTDiscriminator:
    """The CAFM reference's JiT discriminator state dict (JiT's trunk, `proj_out.1` head) as an
    `AdversarialFlowJiTDiscriminator`."""
    state_dict = strip_wrapper_prefixes(state_dict)
    model = AdversarialFlowJiTDiscriminator(**infer_jit_config(state_dict, model_size, in_context_start))
    state_dict = _check_pos_embed(state_dict, model)
    return load_converted(model, map_state_dict(state_dict, _DISCRIMINATOR_RULES, _TRUNK_TRANSFORMS, model, model.config.num_classes))


__all__ = ["convert_jit_discriminator", "convert_jit_generator", "infer_jit_config", "load_jit_checkpoint"]
