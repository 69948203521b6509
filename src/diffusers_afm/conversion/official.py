"""Load the authors' released checkpoints (the reference DiT layout) into our models.

The reference layout (docs/method.md, "Reference checkpoint layout") differs from ours in three ways
that matter: `qkv` is one fused Linear (we keep diffusers' separate `to_q/to_k/to_v`), the final
adaLN emits (shift, scale) where diffusers' `AdaLayerNormContinuous` takes (scale, shift), and
`pos_embed` is a stored copy of the fixed sin-cos table that we recompute (and check).
"""

import math
import re
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..models import (
    AFM_PRESETS,
    AdversarialFlowClassifier,
    AdversarialFlowDiscriminator,
    AdversarialFlowTransformer2DModel,
    FlowMatchingTransformer2DModel,
)
from ..models.modules import TIME_PROJ_DIM

# (reference key pattern, our key template) shared by the three networks.
_TRUNK_RULES = [
    (r"x_embedder\.proj\.(weight|bias)", r"pos_embed.proj.\1"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"transformer_blocks.\1.attn.to_out.0.\2"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"transformer_blocks.\1.ff.net.0.proj.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"transformer_blocks.\1.ff.net.2.\2"),
    (r"blocks\.(\d+)\.adaLN_modulation\.1\.(weight|bias)", r"transformer_blocks.\1.norm1.linear.\2"),
]
_QKV = re.compile(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)")
_LABEL_KEY = "y_embedder.embedding_table.weight"
_LABEL_RULE = (re.escape(_LABEL_KEY), "class_embedder.embedding_table.weight")


def _time_rules(ref: str, ours: str) -> List[Tuple[str, str]]:
    return [
        (ref + r"\.mlp\.0\.(weight|bias)", ours + r".timestep_embedder.linear_1.\1"),
        (ref + r"\.mlp\.2\.(weight|bias)", ours + r".timestep_embedder.linear_2.\1"),
    ]


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """Reference final adaLN emits (shift, scale); diffusers' AdaLayerNormContinuous wants (scale, shift)."""
    shift, scale = tensor.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


_GENERATOR_RULES = (
    _TRUNK_RULES
    + [_LABEL_RULE]
    + _time_rules("t_embedder", "time_src_embed")
    + _time_rules("t_tgt_embedder", "time_tgt_embed")
    + [(r"final_layer\.linear\.(weight|bias)", r"proj_out.\1")]
)
_GENERATOR_TRANSFORMS = {r"final_layer\.adaLN_modulation\.1\.(weight|bias)": (r"norm_out.linear.\1", swap_halves)}
_DISCRIMINATOR_RULES = (
    _TRUNK_RULES
    + [_LABEL_RULE, (r"dis_embed", "token"), (r"final_layer\.1\.weight", "proj_out.weight")]
    + _time_rules("t_embedder", "time_embed")
)
_CLASSIFIER_RULES = (
    _TRUNK_RULES
    + [(r"cls_embed", "token"), (r"final_layer\.1\.(weight|bias)", r"proj_out.\1")]
    + _time_rules("t_embedder", "time_embed")
)


def strip_wrapper_prefixes(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drop the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes a saved state dict may carry."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def map_state_dict(
    state_dict: Dict[str, torch.Tensor],
    rules: List[Tuple[str, str]],
    transforms: Dict[str, Tuple[str, Callable]],
    model: torch.nn.Module,
    num_classes: int,
) -> Dict[str, torch.Tensor]:
    """Rename reference keys to ours, check the key set and every shape against `model`."""
    expected = model.state_dict()
    converted: Dict[str, torch.Tensor] = {}
    for ref_key, tensor in state_dict.items():
        if ref_key == "pos_embed":
            _check_pos_embed(tensor, model)
            continue
        targets = []
        qkv = _QKV.fullmatch(ref_key)
        if qkv:
            block, kind = qkv.groups()
            if tensor.shape[0] % 3:
                raise ValueError(f"Checkpoint key `{ref_key}` has shape {tuple(tensor.shape)}; its first dim must split in 3.")
            for name, part in zip(("to_q", "to_k", "to_v"), tensor.chunk(3, dim=0)):
                targets.append((f"transformer_blocks.{block}.attn.{name}.{kind}", part))
        else:
            for pattern, (template, fn) in transforms.items():
                if re.fullmatch(pattern, ref_key):
                    targets.append((re.sub(pattern, template, ref_key), fn(tensor)))
            for pattern, template in rules:
                if re.fullmatch(pattern, ref_key):
                    targets.append((re.sub(pattern, template, ref_key), tensor))
        label_target = "class_embedder.embedding_table.weight"
        if ref_key == _LABEL_KEY and label_target in expected and tensor.shape[0] == expected[label_target].shape[0] + 1:
            # Trained with class dropout: the extra "null class" row is unused by a model without CFG (AFM).
            targets = [(targets[0][0], tensor[:num_classes])]
        if not targets:
            raise ValueError(f"Checkpoint key `{ref_key}` does not fit this model (no counterpart in {type(model).__name__}).")
        for key, value in targets:
            if key not in expected:
                raise ValueError(f"Checkpoint key `{ref_key}` does not fit this model (it maps to `{key}`, which the config does not have).")
            if tuple(value.shape) != tuple(expected[key].shape):
                raise ValueError(
                    f"Checkpoint key `{ref_key}` has shape {tuple(tensor.shape)}, which does not fit `{key}` of shape "
                    f"{tuple(expected[key].shape)} under this config."
                )
            converted[key] = value
    missing = [key for key in expected if key not in converted]
    if missing:
        raise ValueError(f"The checkpoint has no weights for `{missing[0]}` (and {len(missing) - 1} more) that this config needs.")
    return converted


def _check_pos_embed(tensor: torch.Tensor, model: torch.nn.Module) -> None:
    ours = model.pos_embed.pos_embed
    if tuple(tensor.shape) != tuple(ours.shape):
        raise ValueError(f"Checkpoint key `pos_embed` has shape {tuple(tensor.shape)}, expected {tuple(ours.shape)}.")
    if not torch.allclose(tensor.float(), ours.float(), atol=1e-5):
        raise ValueError("Checkpoint key `pos_embed` is not the fixed 2-D sin-cos table this model computes.")


def infer_reference_kwargs(
    state_dict: Dict[str, torch.Tensor], model_size: Optional[str] = None, num_heads: Optional[int] = None
) -> dict:
    """The reference constructor's arguments (`input_size, patch_size, in_channels, hidden_size,
    depth, num_heads, num_classes`), read off the shapes of a generator, discriminator or classifier.

    The head count changes no shape: it is `num_heads`, else the `model_size` preset's, else that of
    the paper preset with the checkpoint's depth and width (every released checkpoint has one).
    `num_classes` is the class embedding's row count (AFM trains without a "null" class), or the
    classifier head's width.
    """
    state_dict = strip_wrapper_prefixes(state_dict)
    try:
        proj = state_dict["x_embedder.proj.weight"]  # (D, C, p, p)
        num_tokens = state_dict["pos_embed"].shape[1]
        classes = state_dict[_LABEL_KEY] if _LABEL_KEY in state_dict else state_dict["final_layer.1.weight"]
    except KeyError as err:
        raise ValueError(f"Not an AFM checkpoint in the reference layout: it has no key {err}.") from None
    hidden_size, in_channels, patch_size = proj.shape[0], proj.shape[1], proj.shape[2]
    blocks = {int(k.split(".")[1]) for k in state_dict if re.match(r"blocks\.\d+\.", k)}
    if not blocks:
        raise ValueError("Not an AFM checkpoint in the reference layout: it has no `blocks.<i>.*` keys.")
    depth = 1 + max(blocks)
    preset_heads = {
        (p["num_layers"], p["num_attention_heads"] * p["attention_head_dim"]): p["num_attention_heads"]
        for p in AFM_PRESETS.values()
    }
    if model_size is not None:
        if model_size not in AFM_PRESETS:
            raise ValueError(f"`model_size` (`--model_size`) must be one of {', '.join(AFM_PRESETS)}, got {model_size!r}.")
        preset = AFM_PRESETS[model_size]
        preset_width = preset["num_attention_heads"] * preset["attention_head_dim"]
        if (preset["num_layers"], preset_width) != (depth, hidden_size):
            raise ValueError(
                f"`model_size` (`--model_size`) {model_size} has {preset['num_layers']} layers of width {preset_width}, "
                f"but the checkpoint has {depth} layers of width {hidden_size}."
            )
        num_heads = num_heads or preset["num_attention_heads"]
    num_heads = num_heads or preset_heads.get((depth, hidden_size))
    if num_heads is None:
        raise ValueError(
            f"The checkpoint ({depth} layers of width {hidden_size}) is not a preset size, and the head count "
            "cannot be read off the weights: pass `num_heads` (`--num_heads`)."
        )
    return dict(
        input_size=int(round(num_tokens**0.5)) * patch_size,
        patch_size=patch_size,
        in_channels=in_channels,
        hidden_size=hidden_size,
        depth=depth,
        num_heads=num_heads,
        num_classes=classes.shape[0],
    )


def _with_inferred(state_dict: Dict[str, torch.Tensor], given: dict, model_size: Optional[str]) -> dict:
    """`given` constructor arguments, completed with those read off the weights."""
    needed = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes")
    if model_size is None and all(given.get(k) is not None for k in needed):
        return given
    inferred = infer_reference_kwargs(state_dict, model_size, given.get("num_heads"))
    return {**inferred, **{k: v for k, v in given.items() if v is not None}}


def _trunk_config(
    input_size: int,
    patch_size: int,
    in_channels: int,
    hidden_size: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float = 4.0,
    learn_sigma: bool = False,
    class_dropout_prob: float = 0.0,
) -> dict:
    if learn_sigma:
        raise ValueError("`learn_sigma=True` is not an AFM setting (AFM models predict no variance); allowed: False.")
    if hidden_size % num_heads:
        raise ValueError(f"`hidden_size` ({hidden_size}) must be divisible by `num_heads` ({num_heads}).")
    return dict(
        sample_size=input_size,
        patch_size=patch_size,
        in_channels=in_channels,
        num_layers=depth,
        num_attention_heads=num_heads,
        attention_head_dim=hidden_size // num_heads,
        mlp_ratio=mlp_ratio,
    )


def load_converted(model: torch.nn.Module, converted: Dict[str, torch.Tensor]) -> torch.nn.Module:
    model.load_state_dict(converted, strict=True)
    return model.eval()


def convert_official_generator(
    state_dict: Dict[str, torch.Tensor],
    *,
    num_classes: Optional[int] = None,
    use_t_src: Optional[bool] = None,
    use_t_tgt: Optional[bool] = None,
    repeat: int = 1,
    prediction_type: Optional[str] = None,
    nfe: Optional[int] = -1,
    model_size: Optional[str] = None,
    **reference_kwargs,
) -> AdversarialFlowTransformer2DModel:
    """A reference `Generator` / `GeneratorDeep` state dict as an `AdversarialFlowTransformer2DModel`.

    `reference_kwargs` are the reference constructor's (`input_size, patch_size, in_channels,
    hidden_size, depth, num_heads, learn_sigma, class_dropout_prob`); those not given are read off the
    weights (`infer_reference_kwargs`; `model_size` names a preset for the head count), and so are
    `use_t_src` / `use_t_tgt` (whether the time embedders are there; a deep model's `t_embedder` is
    its pass-time embedder, so with `repeat` > 1 it is not a source time). `prediction_type`
    defaults to x-prediction for a model without source time and v-prediction otherwise; `nfe`
    defaults to 1 without source time, to any-step (`None`) with a target time, and must be given
    otherwise.
    """
    state_dict = strip_wrapper_prefixes(state_dict)
    reference_kwargs = _with_inferred(state_dict, {"num_classes": num_classes, **reference_kwargs}, model_size)
    num_classes = reference_kwargs.pop("num_classes")
    if use_t_src is None:
        use_t_src = "t_embedder.mlp.0.weight" in state_dict and repeat == 1
    if use_t_tgt is None:
        use_t_tgt = "t_tgt_embedder.mlp.0.weight" in state_dict
    if prediction_type is None:
        prediction_type = "velocity" if use_t_src else "sample"
    if nfe == -1:
        if not use_t_src:
            nfe = 1
        elif use_t_tgt:
            nfe = None
        else:
            raise ValueError(
                "The checkpoint has a time embedder (`t_embedder`) and no target-time embedder: pass `nfe` (`--nfe`) "
                "for a multi-step model, or `repeat` (`--depth_repeat`) for a deep 1-NFE model."
            )
    model = AdversarialFlowTransformer2DModel(
        **_trunk_config(**reference_kwargs),
        num_classes=num_classes,
        use_timestep_src=use_t_src,
        use_timestep_tgt=use_t_tgt,
        depth_repeat=repeat,
        prediction_type=prediction_type,
        nfe=nfe,
    )
    return load_converted(model, map_state_dict(state_dict, _GENERATOR_RULES, _GENERATOR_TRANSFORMS, model, num_classes))


def convert_official_discriminator(
    state_dict: Dict[str, torch.Tensor],
    *,
    num_classes: Optional[int] = None,
    use_t: Optional[bool] = None,
    model_size: Optional[str] = None,
    **reference_kwargs,
) -> AdversarialFlowDiscriminator:
    """A reference `Discriminator` state dict as an `AdversarialFlowDiscriminator`; the arguments not
    given are read off the weights, as for `convert_official_generator`."""
    state_dict = strip_wrapper_prefixes(state_dict)
    reference_kwargs = _with_inferred(state_dict, {"num_classes": num_classes, **reference_kwargs}, model_size)
    num_classes = reference_kwargs.pop("num_classes")
    if use_t is None:
        use_t = "t_embedder.mlp.0.weight" in state_dict
    model = AdversarialFlowDiscriminator(**_trunk_config(**reference_kwargs), num_classes=num_classes, use_timestep=use_t)
    return load_converted(model, map_state_dict(state_dict, _DISCRIMINATOR_RULES, {}, model, num_classes))


def convert_official_classifier(
    state_dict: Dict[str, torch.Tensor],
    *,
    num_classes: Optional[int] = None,
    model_size: Optional[str] = None,
    **reference_kwargs,
) -> AdversarialFlowClassifier:
    """A reference `Classifier` state dict as an `AdversarialFlowClassifier`; the arguments not given
    are read off the weights, as for `convert_official_generator`."""
    state_dict = strip_wrapper_prefixes(state_dict)
    reference_kwargs = _with_inferred(state_dict, {"num_classes": num_classes, **reference_kwargs}, model_size)
    num_classes = reference_kwargs.pop("num_classes")
    model = AdversarialFlowClassifier(**_trunk_config(**reference_kwargs), num_classes=num_classes)
    return load_converted(model, map_state_dict(state_dict, _CLASSIFIER_RULES, {}, model, num_classes))


# ----------------------------------------------------------------------------- SiT and Continuous AFM
# SiT (and the CAFM reference built on it) runs time the other way: t = 1 is data and the network
# predicts x0-minus-noise, so the reference calls it as `v = -SiT(x, 1 - t, y)`; its time sinusoid
# takes t unscaled (DiT's takes t * 1000). Both flips are folded into the weights here, so the
# converted models follow our convention with no flag (docs/method.md, "Continuous AFM"):
# - the sinusoid of 1 - t is a fixed linear map of the sinusoid of t, which the time MLP's first
#   layer absorbs (`_fold_time_flip`);
# - the sign of the velocity goes into the output projection, whose `learn_sigma` half (SiT's
#   variance channels, unused by a flow model) is dropped.


def _fold_time_flip(weight: torch.Tensor) -> torch.Tensor:
    """W' with `W' s(t) = W s(1 - t)` for SiT's sinusoid `s(t) = [cos(f t), sin(f t)]`.

    `cos(f (1 - t)) = cos f cos(f t) + sin f sin(f t)` and `sin(f (1 - t)) = sin f cos(f t) - cos f sin(f t)`,
    so `s(1 - t) = M s(t)` with `M = [[C, S], [S, -C]]`, `C = diag(cos f)`, `S = diag(sin f)`.
    Computed in float64, then cast back.
    """
    half = TIME_PROJ_DIM // 2
    if weight.shape[1] != TIME_PROJ_DIM:
        raise ValueError(f"`t_embedder.mlp.0.weight` has shape {tuple(weight.shape)}; expected (D, {TIME_PROJ_DIM}).")
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    cos, sin = torch.cos(freqs), torch.sin(freqs)
    w = weight.double()
    w_cos, w_sin = w[:, :half], w[:, half:]
    folded = torch.cat([w_cos * cos + w_sin * sin, w_cos * sin - w_sin * cos], dim=1)
    return folded.to(weight.dtype)


def _velocity_rows(tensor: torch.Tensor, out_channels: int, channels: int) -> torch.Tensor:
    """SiT's output projection (rows `p * p * out_channels`, channel fastest) -> ours: the first
    `channels` of each patch position (SiT's `x.chunk(2, dim=1)[0]` under `learn_sigma`), sign flipped."""
    rows = tensor.reshape(-1, out_channels, *tensor.shape[1:])[:, :channels]
    return -rows.reshape(-1, *tensor.shape[1:])


_SIT_TIME_RULES = [
    (r"t_embedder\.mlp\.0\.bias", "time_embed.timestep_embedder.linear_1.bias"),
    (r"t_embedder\.mlp\.2\.(weight|bias)", r"time_embed.timestep_embedder.linear_2.\1"),
]
_SIT_TIME_TRANSFORMS = {r"t_embedder\.mlp\.0\.weight": ("time_embed.timestep_embedder.linear_1.weight", _fold_time_flip)}


def _sit_kwargs(state_dict, num_classes, model_size, reference_kwargs) -> Tuple[dict, int]:
    """Trunk kwargs and the number of real classes of a SiT-layout state dict: the label table has a
    null row (SiT trains with class dropout 0.1), unless `num_classes` says it has none."""
    if _LABEL_KEY not in state_dict:
        raise ValueError(f"Not a SiT checkpoint: it has no `{_LABEL_KEY}` (SiT is class-conditional).")
    rows = state_dict[_LABEL_KEY].shape[0]
    num_classes = rows - 1 if num_classes is None else num_classes
    if num_classes not in (rows, rows - 1):
        raise ValueError(f"`num_classes`={num_classes} does not fit the label table of {rows} rows (allowed: {rows - 1} "
                         f"real classes + the null class, or {rows} without one).")
    kwargs = _with_inferred(state_dict, {"num_classes": rows, **reference_kwargs}, model_size)
    kwargs.pop("num_classes")
    kwargs.pop("learn_sigma", None)
    kwargs.pop("class_dropout_prob", None)
    return kwargs, num_classes


def convert_sit_generator(
    state_dict: Dict[str, torch.Tensor],
    *,
    num_classes: Optional[int] = None,
    model_size: Optional[str] = None,
    **reference_kwargs,
) -> FlowMatchingTransformer2DModel:
    """A SiT state dict (the official `SiT-XL-2-256.pt`, or the CAFM reference's generator) as a
    `FlowMatchingTransformer2DModel` in our time convention: `ours(x, t, y) == -SiT(x, 1 - t, y)`.

    The shape is read off the weights (as for `convert_official_generator`: `model_size` or
    `num_heads` for a size that is not a preset). `learn_sigma` is read off the output projection
    (2C outputs) and its variance half dropped. `num_classes` defaults to the table's rows minus the
    null class.
    """
    state_dict = strip_wrapper_prefixes(state_dict)
    kwargs, num_classes = _sit_kwargs(state_dict, num_classes, model_size, reference_kwargs)
    channels = kwargs["in_channels"]
    try:
        rows = state_dict["final_layer.linear.weight"].shape[0]
    except KeyError:
        raise ValueError("Not a SiT generator: it has no `final_layer.linear.weight`.") from None
    per_position = rows // (kwargs["patch_size"] ** 2)
    if per_position not in (channels, 2 * channels):
        raise ValueError(f"`final_layer.linear.weight` has {rows} rows; a SiT of {channels} channels has "
                         f"{kwargs['patch_size'] ** 2 * channels} (or twice that with learn_sigma).")
    model = FlowMatchingTransformer2DModel(
        **_trunk_config(**kwargs),
        num_classes=num_classes,
        class_dropout_prob=0.1 if num_classes == state_dict[_LABEL_KEY].shape[0] - 1 else 0.0,
        time_scale=1.0,
    )
    velocity = lambda tensor: _velocity_rows(tensor, per_position, channels)  # noqa: E731
    transforms = {
        **_SIT_TIME_TRANSFORMS,
        r"final_layer\.linear\.(weight|bias)": (r"proj_out.\1", velocity),
        r"final_layer\.adaLN_modulation\.1\.(weight|bias)": (r"norm_out.linear.\1", swap_halves),
    }
    rules = _TRUNK_RULES + [_LABEL_RULE] + _SIT_TIME_RULES
    return load_converted(model, map_state_dict(state_dict, rules, transforms, model, num_classes))


def convert_cafm_discriminator(
    state_dict: Dict[str, torch.Tensor],
    *,
    num_classes: Optional[int] = None,
    model_size: Optional[str] = None,
    **reference_kwargs,
) -> AdversarialFlowDiscriminator:
    """The CAFM reference's SiT discriminator (RMSNorm blocks, `dis_embed` token, bias-free
    `final_layer.1`) as an `AdversarialFlowDiscriminator(norm_type="rms_norm", use_timestep=True)`,
    its time flipped as for `convert_sit_generator`."""
    state_dict = strip_wrapper_prefixes(state_dict)
    kwargs, num_classes = _sit_kwargs(state_dict, num_classes, model_size, reference_kwargs)
    kwargs.pop("norm_type", None)
    model = AdversarialFlowDiscriminator(
        **_trunk_config(**kwargs),
        num_classes=num_classes,
        use_timestep=True,
        norm_type="rms_norm",
        use_null_class=num_classes == state_dict[_LABEL_KEY].shape[0] - 1,
        time_scale=1.0,
    )
    rules = _TRUNK_RULES + [_LABEL_RULE, (r"dis_embed", "token"), (r"final_layer\.1\.weight", "proj_out.weight")]
    return load_converted(model, map_state_dict(state_dict, rules + _SIT_TIME_RULES, _SIT_TIME_TRANSFORMS, model, num_classes))
