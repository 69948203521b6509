"""What a run's data will be, known before any of it is loaded.

A trainer sizes its defaults and checks its flags at parse time, before the Accelerator, the data
or a model exists: which defaults fit the data (`choose_defaults`: the embedded digits, a small
folder, ImageNet-sized), the model's input side and channels (`planned_model_inputs`), and whether
the resolution gives a whole number of patches (`check_model_input`). Everything here reads flags,
folder listings and config files only. The VAE's downsampling rule is written once, in
`downsampling_factor` (the pipeline keeps one documented copy: it must stay importable alone for
the standalone export).

Argument names are the trainers' flag names; a bad value is a `SettingError` naming it.
"""

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

from ..utils import SettingError, check_setting
from .images import count_local_images, is_embedded_digits
from .latent_cache import read_cache_info

DEFAULTS_CHOICES = ("auto", "digits", "small", "paper")
# The SD-VAE family's downsampling, assumed for a VAE whose config is not at hand yet.
ASSUMED_DOWNSAMPLING = 8


def hub_offline() -> bool:
    """Whether `HF_HUB_OFFLINE` is set (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


# ----------------------------------------------------------------------------- the VAE
def downsampling_factor(config: Optional[Dict]) -> int:
    """A VAE config's spatial downsampling: 2 per encoder block but the last (8 for the SD-VAE);
    the SD-VAE's 8 for a config not at hand."""
    if config is None:
        return ASSUMED_DOWNSAMPLING
    return 2 ** (len(config.get("block_out_channels", [0] * 4)) - 1)


def vae_config(vae: str) -> Optional[Dict]:
    """`vae`'s config.json (a folder, a pipeline folder's vae/, or the Hub cache); None when it is
    not downloaded yet. A Hub VAE that is not cached while offline is an error."""
    path = None
    for folder in (os.path.join(vae, "vae"), vae):
        if os.path.isfile(os.path.join(folder, "config.json")):
            path = os.path.join(folder, "config.json")
            break
    if path is None and not os.path.isdir(vae):
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(vae, "config.json")
        except ValueError:  # not a valid repository id
            cached = None
        if isinstance(cached, str):
            path = cached
        elif hub_offline():
            raise SettingError("vae", vae, "a local VAE folder, one in the Hub cache, or 'none' for pixel space "
                                           "(HF_HUB_OFFLINE is set and this VAE is not in the local cache)")
    if path is None:
        if os.path.isdir(vae):
            raise SettingError("vae", vae, "a folder with a VAE config.json (or a pipeline folder with vae/), or 'none'")
        return None
    with open(path) as f:
        return json.load(f)


def vae_downsampling(vae: str) -> int:
    """`vae`'s spatial downsampling: 1 for pixel space (`"none"`), else read from its config (8 for
    a Hub VAE not downloaded yet, which the data loader then checks)."""
    return 1 if vae.lower() == "none" else downsampling_factor(vae_config(vae))


# ----------------------------------------------------------------------------- the images
def local_data_folder(dataset_name: Optional[str], train_data_dir: Optional[str]) -> Optional[str]:
    """The local image folder a run reads (`train_data_dir`, or a `dataset_name` that is a folder),
    or None (the digits, a Hub dataset)."""
    folder = train_data_dir or dataset_name
    return folder if folder is not None and os.path.isdir(folder) else None


def uses_embedded_digits(dataset_name: Optional[str], train_data_dir: Optional[str], latent_cache: Optional[str]) -> bool:
    return latent_cache is None and is_embedded_digits(dataset_name, train_data_dir)


def count_training_images(dataset_name: Optional[str], train_data_dir: Optional[str], latent_cache: Optional[str],
                          max_train_samples: Optional[int]) -> Optional[int]:
    """The number of images a run will train on: counted in a local folder or read from the latent
    cache, capped by `max_train_samples`; None for a Hub dataset."""
    check_setting(max_train_samples is None or max_train_samples >= 1, "max_train_samples", max_train_samples,
                  "an integer >= 1")
    count, folder = None, local_data_folder(dataset_name, train_data_dir)
    if latent_cache is not None:
        info = read_cache_info(latent_cache)
        count = info["num_images"] if info is not None else None
    elif folder is not None:
        count = count_local_images(folder)[0]
    if max_train_samples is not None:
        count = max_train_samples if count is None else min(count, max_train_samples)
    return count


def choose_defaults(defaults: str, dataset_name: Optional[str], train_data_dir: Optional[str],
                    latent_cache: Optional[str], max_train_samples: Optional[int], small_data_max_images: int) -> str:
    """`--defaults`: which defaults fill the flags a user leaves unset. `"auto"` becomes `"digits"`
    for the embedded digits, `"small"` for at most `small_data_max_images` counted images, else
    `"paper"` (a Hub dataset is not counted)."""
    check_setting(defaults in DEFAULTS_CHOICES, "defaults", defaults, ", ".join(DEFAULTS_CHOICES))
    if defaults != "auto":
        return defaults
    if uses_embedded_digits(dataset_name, train_data_dir, latent_cache):
        return "digits"
    count = count_training_images(dataset_name, train_data_dir, latent_cache, max_train_samples)
    return "small" if count is not None and count <= small_data_max_images else "paper"


@dataclass
class SmallDataInput:
    """Where a small data set's run gets its input from: the resolution, the VAE, the model's input side."""

    resolution: int
    vae: str
    side: int


def small_data_input(resolution: Optional[int], vae: Optional[str], latent_cache: Optional[str],
                     default_resolution: int, pixel_max_resolution: int, default_vae: str) -> SmallDataInput:
    """The resolution (the cache's, or `default_resolution`), the VAE (the cache's; none up to
    `pixel_max_resolution` px, else `default_vae`) and the model input side a small run uses."""
    info = read_cache_info(latent_cache) if latent_cache is not None else None
    resolution = resolution or (info["resolution"] if info else default_resolution)
    vae = vae or (info["vae"] if info else "none" if resolution <= pixel_max_resolution else default_vae)
    if info is not None:
        side = info["latent_shape"][-1]
    else:
        try:
            side = resolution // vae_downsampling(vae)
        except SettingError:  # a VAE not at hand: check_model_input says so when the run starts
            side = resolution // ASSUMED_DOWNSAMPLING
    return SmallDataInput(resolution=resolution, vae=vae, side=max(side, 1))


# ----------------------------------------------------------------------------- the model's input
def planned_model_inputs(dataset_name: Optional[str], train_data_dir: Optional[str], latent_cache: Optional[str],
                         vae: str, resolution: int, num_classes: Optional[int]) -> Dict:
    """The model's `sample_size`, `in_channels` and `num_classes` as far as the flags tell before the
    data is read (what `--dry_run` builds its summary from); `assumed` lists the guesses."""
    assumed: List[str] = []
    info = read_cache_info(latent_cache) if latent_cache is not None else None
    digits = uses_embedded_digits(dataset_name, train_data_dir, latent_cache)
    if info is not None:
        channels, side = info["latent_shape"][0], info["latent_shape"][-1]
    elif vae.lower() == "none":
        channels, side = (1 if digits else 3), resolution
    else:
        try:  # a dry run plans before the VAE is downloaded, perhaps offline
            config = vae_config(vae)
        except SettingError:
            config = None
        side, channels = resolution // downsampling_factor(config), 4
        if config is None:
            assumed.append("the VAE's downsampling (8) and latent channels (4)")
        else:
            channels = config.get("latent_channels", 4)
    if num_classes is None:
        folder = local_data_folder(dataset_name, train_data_dir)
        if info is not None:
            num_classes = info["num_classes"]
        elif digits:
            num_classes = 10
        elif folder is not None:
            num_classes = count_local_images(folder)[1]
        else:
            num_classes = 1000
            assumed.append("1000 classes (a Hub dataset's labels are read when it loads)")
    return dict(sample_size=side, in_channels=channels, num_classes=num_classes, assumed=assumed)


def check_model_input(vae: str, resolution: int, latent_cache: Optional[str], patch_size: int) -> None:
    """The model's input side (the latent side with a VAE) must be a whole number of patches; checked
    from the flags and the VAE's config file alone, before any data or weights are read."""
    check_setting(isinstance(resolution, int) and resolution >= 1, "resolution", resolution, "an integer >= 1")
    if latent_cache is not None:
        vae_downsampling(vae)  # the run still loads the VAE, for its decoder: is it there?
        info = read_cache_info(latent_cache)
        if info is None:
            raise SettingError("latent_cache", latent_cache, "a folder written by examples/cache_latents.py")
        side, where = info["latent_shape"][-1], f"the latent side of --latent_cache {latent_cache}"
    else:
        factor = vae_downsampling(vae)
        check_setting(resolution % factor == 0, "resolution", resolution, f"a multiple of {factor}, the VAE's downsampling")
        side = resolution // factor
        where = "the image side (pixel space)" if factor == 1 else f"the latent side {resolution} / {factor}"
    check_setting(side % patch_size == 0, "resolution", resolution,
                  f"a size whose model input side is a multiple of the patch size {patch_size}; {where} is {side}")
