"""The paper's recipe: every default, and every rule that the step count and the depth imply (docs/method.md).

This is the one place where "a 2-NFE model is v-prediction with a source-time input, ot_scale
0.25 and clipping 5" is written. The trainer fills its unset flags from `recipe_defaults`, builds
its networks with `generator_time_inputs` / `discriminator_time_input`, and checks the whole set
once with `check_recipe`; `AFMObjective`, the converter and the toy experiments read the same rules.

| setting | 1 NFE | K NFE / any-step | deep (1 NFE, R repeats) |
|---|---|---|---|
| prediction_type | sample | velocity | sample |
| generator time inputs | none | s (any-step: s and t) | none |
| discriminator time input | no | t | no |
| ot_scale start (cosine to 0.005 over 1M D+G steps) | 0.2 | 0.25 | 0.2 |
| max_grad_norm | 50 | 5 | 5 |
| cg_scale (guided phase) | 0.003 | 0.02 | 0.003 |
| cg_max_time | 0.1 (re-noise to u ~ U(0, 0.1)) | 0.49 (score where t <= 0.49) | 0.1 |
| generator lr | lr | lr | lr / R |
"""

import difflib
import json
import os
import re
from typing import Dict, Optional

from ..models.transformer_afm import AFM_PRESETS
from ..models.transformer_jit import JIT_PRESETS, JiTTransformer2DModel
from ..utils import SettingError

# The objective and optimiser values that do not depend on the step count (docs/method.md).
PAPER_OBJECTIVE = dict(gp_scale=0.25, gp_eps=0.01, gp_batch_ratio=0.25, cp_scale=0.01, ot_scale_end=0.005,
                       ot_decay_steps=1_000_000)
PAPER_OPTIMIZER = dict(learning_rate=1e-4, adam_beta1=0.0, adam_beta2=0.9, adam_epsilon=1e-8,
                       adam_weight_decay=0.01, ema_decay=0.9999)
GUIDED_AUGMENT_P = 0.4


def is_multi_step(nfe: Optional[int]) -> bool:
    """K > 1 steps, or any-step (`nfe=None`)."""
    return nfe != 1


def prediction_type(nfe: Optional[int]) -> str:
    """x-prediction for 1 NFE, v-prediction for multi-step and any-step models."""
    return "velocity" if is_multi_step(nfe) else "sample"


def generator_time_inputs(nfe: Optional[int]) -> Dict[str, bool]:
    """The generator's time embeddings: the source time `s` for multi-step, also `t` for any-step."""
    return dict(use_timestep_src=is_multi_step(nfe), use_timestep_tgt=nfe is None)


def discriminator_time_input(nfe: Optional[int]) -> bool:
    """Multi-step discriminators also see the target time `t`."""
    return is_multi_step(nfe)


def ot_scale_start(nfe: Optional[int]) -> float:
    return 0.25 if is_multi_step(nfe) else 0.2


def max_grad_norm(nfe: Optional[int], depth_repeat: int = 1) -> float:
    """50 (effectively off) for 1 NFE; 5 for multi-step and deep models."""
    return 5.0 if is_multi_step(nfe) or depth_repeat > 1 else 50.0


def cg_scale(nfe: Optional[int], guided: bool) -> float:
    """The guidance weight of the guided phase (0 without a classifier)."""
    if not guided:
        return 0.0
    return 0.02 if is_multi_step(nfe) else 0.003


def cg_max_time(nfe: Optional[int]) -> float:
    """1 NFE: the fake is re-noised to u ~ U(0, 0.1); multi-step: guided where t <= 0.49."""
    return 0.49 if is_multi_step(nfe) else 0.1


def generator_learning_rate(learning_rate: float, depth_repeat: int = 1) -> float:
    """Deep models divide the generator's lr by the number of repeats (the discriminator keeps it)."""
    return learning_rate / depth_repeat


def recipe_defaults(nfe: Optional[int], depth_repeat: int = 1, guided: bool = False) -> Dict:
    """The step-count-dependent defaults, keyed by the trainer's flag names."""
    return dict(
        prediction_type=prediction_type(nfe),
        ot_scale=ot_scale_start(nfe),
        max_grad_norm=max_grad_norm(nfe, depth_repeat),
        cg_scale=cg_scale(nfe, guided),
        cg_max_time=cg_max_time(nfe),
    )


def check_recipe(nfe: Optional[int], prediction: str, depth_repeat: int = 1, cg_scale_value: float = 0.0,
                 guided: bool = False) -> None:
    """Reject the combinations the method does not define: a `SettingError` naming the setting
    (`nfe`, `depth_repeat`, `prediction_type`, `cg_scale`) and what is allowed."""
    if nfe is not None and (not isinstance(nfe, int) or nfe < 1):
        raise SettingError("nfe", nfe, "a positive integer, or any-step")
    if not isinstance(depth_repeat, int) or depth_repeat < 1:
        raise SettingError("depth_repeat", depth_repeat, "an integer >= 1")
    if depth_repeat > 1 and is_multi_step(nfe):
        raise SettingError("depth_repeat", depth_repeat, "1 unless nfe is 1 (deep models are 1-NFE)")
    if prediction not in ("sample", "velocity"):
        raise SettingError("prediction_type", prediction, "'sample' or 'velocity'")
    if prediction == "sample" and is_multi_step(nfe):
        raise SettingError("prediction_type", prediction, "'velocity' for multi-step and any-step models")
    if cg_scale_value > 0 and not guided:
        raise SettingError("cg_scale", cg_scale_value, "0 unless a classifier is given")


# ----------------------------------------------------------------------------- small data sets
# The paper's recipe is for ImageNet (1.28M images, XL/2, 500k iterations at 256 px). A folder of a
# few thousand images needs a model and a schedule sized to it: an XL/2 overfits and takes days.
# These are our choices, not the paper's (docs/training_recipes.md, "Your own images"); the trainer
# takes them when it counts at most SMALL_DATA_MAX_IMAGES images (`--defaults auto`).
SMALL_DATA_MAX_IMAGES = 100_000
TINY_DATA_MAX_IMAGES = 10_000
# Width 128, 4 blocks: the embedded digits' trunk, trains on 2 CPU cores in minutes.
TINY_TRUNK = dict(num_layers=4, num_attention_heads=4, attention_head_dim=32, mlp_ratio=4.0)
# Width 384, 12 blocks (S/2's trunk): a GPU model for tens of thousands of images.
SMALL_TRUNK = dict(num_layers=12, num_attention_heads=6, attention_head_dim=64, mlp_ratio=4.0)
# The embedded digits' model (8x8 grey images): the tiny trunk on 2x2 patches (`trunk_config`'s name).
DIGITS_MODEL = "T/2"
SMALL_DATA_RESOLUTION = 32
SMALL_DATA_PIXEL_MAX_RESOLUTION = 64  # above this a VAE is worth its cost (8x fewer positions)


def small_data_patch_size(side: int) -> int:
    """A patch size that leaves a 4x4 token grid for inputs up to 16 positions a side, 8x8 above.

    Attention cost grows with the square of the token count, and a few thousand images do not
    need fine patches. The largest patch no bigger than the target that divides `side` is taken.
    """
    if side < 1:
        raise ValueError(f"`side` must be >= 1, got {side}.")
    target = max(1, side // (4 if side <= 16 else 8))
    return max(p for p in range(1, target + 1) if side % p == 0)


def small_data_recipe(num_images: Optional[int], side: int) -> Dict:
    """The trunk and schedule for `num_images` training images whose model input is `side` a side.

    Returns `{"trunk": {...}, "model_config": name, "defaults": {...}}`: the trunk, its name for
    `trunk_config` (`"T/4"`, `"S/8"`, ...), and the defaults keyed by the trainer's flag names.
    Up to TINY_DATA_MAX_IMAGES images (or an unknown count below SMALL_DATA_MAX_IMAGES that the caller
    vouches for): the tiny trunk, 1,500 iterations at lr 3e-4 (the digits' schedule); more: the S/2
    trunk, 20,000 iterations at lr 1e-4. Both keep the paper's objective but end the OT decay at
    0.02 over the whole run and use an EMA of 0.999 with warm-up, which suits short runs.
    """
    tiny = num_images is not None and num_images <= TINY_DATA_MAX_IMAGES
    steps = 1500 if tiny else 20_000
    patch_size = small_data_patch_size(side)
    trunk = dict(TINY_TRUNK if tiny else SMALL_TRUNK, patch_size=patch_size)
    defaults = dict(
        train_batch_size=64,
        max_train_steps=steps,
        learning_rate=3e-4 if tiny else 1e-4,
        ema_decay=0.999,
        ema_warmup=True,
        ot_scale_end=0.02,
        ot_decay_steps=2 * steps,  # D+G steps: the whole run
        checkpointing_steps=500 if tiny else 2000,
        validation_steps=500 if tiny else 2000,
    )
    return {"trunk": trunk, "model_config": f"{'T' if tiny else 'S'}/{patch_size}", "defaults": defaults}


def data_defaults(kind: str, digits: Dict, paper: Dict, *, dataset_name: Optional[str], train_data_dir: Optional[str],
                  latent_cache: Optional[str], max_train_samples: Optional[int], resolution: Optional[int],
                  vae: Optional[str], num_train_epochs: Optional[int], default_vae: str,
                  small_schedule: Optional[Dict] = None) -> Dict:
    """A trainer's defaults for the flags a user left unset, keyed by flag name, for the `--defaults`
    `kind` that `data.choose_defaults` picked: `digits` or `paper` (the trainer's own dicts), or
    `small`: the data-sized model (`model_config`), resolution, VAE and schedule of
    `small_data_recipe` (its schedule replaced by `small_schedule` when given), with flips on.

    A latent cache's VAE and resolution win over all of them (the cache was written with them);
    with `num_train_epochs`, `max_train_steps` is left to the data's length.
    """
    from ..data.latent_cache import read_cache_info
    from ..data.planning import count_training_images, small_data_input

    if kind == "digits":
        defaults = dict(digits)
    elif kind == "paper":
        defaults = dict(paper)
    else:
        count = count_training_images(dataset_name, train_data_dir, latent_cache, max_train_samples)
        planned = small_data_input(resolution, vae, latent_cache, SMALL_DATA_RESOLUTION, SMALL_DATA_PIXEL_MAX_RESOLUTION,
                                   default_vae)
        small = small_data_recipe(count, planned.side)
        schedule = small["defaults"] if small_schedule is None else small_schedule
        defaults = dict(schedule, model_config=small["model_config"], resolution=planned.resolution, vae=planned.vae,
                        random_flip=True)
    info = read_cache_info(latent_cache) if latent_cache is not None else None
    if info is not None:
        defaults.update(vae=info["vae"], resolution=info["resolution"])
    if num_train_epochs is not None:
        defaults.pop("max_train_steps", None)
    return defaults


# ----------------------------------------------------------------------------- trunks
# The keys of a trunk: what a size name or a model JSON file (`--model_config FILE`) sets; the data
# and the method's settings decide the rest of a model's config.
TRUNK_KEYS = ("patch_size", "num_layers", "num_attention_heads", "attention_head_dim", "mlp_ratio")


def trunk_config(spec: str, name: str = "model_config") -> Dict:
    """A trunk from a size name or a JSON file of `TRUNK_KEYS`.

    A size name is DiT's `<size>/<patch size>`: `T` (the tiny trunk of the digits and small data
    sets), `S`, `B`, `M`, `L` or `XL` (`models.AFM_PRESETS`, the paper's sizes), with any patch size:
    `"XL/2"`, `"B/4"`, `"T/2"`. A file's keys are checked: a typo (`"num_layer"`) is a `SettingError`
    naming the setting `name`, not a silent default; keys a file leaves out take the model class's
    defaults.
    """
    sizes = trunk_sizes()
    match = re.fullmatch(r"([A-Z]+)/([1-9][0-9]*)", spec or "")
    if match and match.group(1) in sizes:
        return dict(sizes[match.group(1)], patch_size=int(match.group(2)))
    if spec is None or not os.path.isfile(spec):
        names = ", ".join(f"{size}/2" for size in sizes)
        raise SettingError(name, spec, f"a size ({names}, or another patch size: B/4) or a JSON file")
    try:
        with open(spec) as f:
            config = json.load(f)
    except json.JSONDecodeError as err:
        raise SettingError(name, spec, f"a valid JSON file ({err})") from None
    if not isinstance(config, dict):
        raise SettingError(name, spec, "a JSON file holding one object of trunk keys")
    for key in config:
        if key not in TRUNK_KEYS and not key.startswith("_"):
            close = difflib.get_close_matches(key, TRUNK_KEYS, n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise SettingError(name, spec, f"a JSON file of the keys {', '.join(TRUNK_KEYS)} (the data and the other "
                                           f"settings decide the rest); it has the unknown key {key!r}.{hint}")
    return {k: v for k, v in config.items() if k in TRUNK_KEYS}


def trunk_sizes() -> Dict[str, Dict]:
    """The named trunks without their patch size: `T` (ours) and the paper's (`AFM_PRESETS`)."""
    paper = {name.split("/")[0]: dict(trunk) for name, trunk in AFM_PRESETS.items()}
    return {"T": {k: v for k, v in TINY_TRUNK.items()}, **paper}


# ----------------------------------------------------------------------------- JiT (flow models only)
# What the data and the run decide in a JiT model's config, whatever a preset or file says.
JIT_DATA_KEYS = ("sample_size", "in_channels", "num_classes", "class_dropout_prob")


def is_jit_model(spec: Optional[str]) -> bool:
    """Whether `--model_config` names a JiT model: a JiT size (`"JiT-B/16"`) or a JSON file whose
    `_class_name` is `JiTTransformer2DModel` (a JiT model's own config.json works as it is)."""
    if spec in JIT_PRESETS:
        return True
    if spec is None or not os.path.isfile(spec):
        return False
    try:
        with open(spec) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False  # trunk_config reports the file
    return isinstance(config, dict) and config.get("_class_name") == JiTTransformer2DModel.__name__


def jit_model_config(spec: str, name: str = "model_config") -> Dict:
    """A JiT model's config from a size (`JIT_PRESETS`) or a JSON file of `JiTTransformer2DModel`'s
    config keys, without the keys the data and the run decide (`JIT_DATA_KEYS`). An unknown key is
    a `SettingError` naming the setting `name`."""
    import inspect

    if spec in JIT_PRESETS:
        config = dict(JIT_PRESETS[spec])
    else:
        with open(spec) as f:
            config = json.load(f)
    allowed = [k for k in inspect.signature(JiTTransformer2DModel.__init__).parameters if k != "self"]
    for key in config:
        if key not in allowed and not key.startswith("_"):
            close = difflib.get_close_matches(key, allowed, n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise SettingError(name, spec, f"a JiT config of JiTTransformer2DModel's keys; it has the unknown key {key!r}.{hint}")
    return {k: v for k, v in config.items() if k in allowed and k not in JIT_DATA_KEYS}


def model_patch_size(spec: str, name: str = "model_config") -> int:
    """The patch size of the model `--model_config` names (an AFM trunk or a JiT model)."""
    if is_jit_model(spec):
        return jit_model_config(spec, name).get("patch_size", 16)
    return trunk_config(spec, name)["patch_size"]
