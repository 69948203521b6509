"""The latent cache: every image VAE-encoded once, so that training skips the encoder.

The invariant, stated here once: training from a cache is on-the-fly encoding. The cache keeps the
VAE posterior N(mean, std^2) of each image and of its horizontal flip, not one draw from it, so a
trainer reading it draws the flips and the posterior noise from the run's own generator, in the
same order and with the same values as `TrainingData.encode` draws them: `random_flip` before
`vae.encode`, then `latent_dist.sample(generator=...)`. `select_flip` makes the uniform draws of
`random_flip` and `sample_posterior` the computation of `DiagonalGaussianDistribution.sample`;
`cached_latents` does both. The posteriors themselves match on-the-fly encoding up to the encoder's
batch-dependent round-off, provided the cache has the dtype the trainer's VAE runs in
(`LatentCacheDataset.check_compatible` warns otherwise).

The format, in `cache_dir`:

- `shard-XXXXX.safetensors`, `shard_size` images each: `latent_mean` and `latent_std`
  (n, 2, C, h, w; index 0 of the second axis the image, 1 its flip, in the VAE's dtype),
  `class_labels`, and `valid` (0 for an image that could not be read: its row is kept, so that
  row i of the cache is row i of the dataset).
- `cache_info.json`: the settings (`latent_cache_info`), and `"complete": true` once every shard
  is there.

`write_latent_cache` writes it resumably: shard k is written by process k % num_processes, under a
temporary name then renamed; a rerun with the same settings skips the shards that exist, and one
with other settings is an error. `LatentCacheDataset` reads it back.
"""

import json
import logging
import os
from typing import Callable, Dict, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from ..utils import atomic_file

logger = logging.getLogger(__name__)

LATENT_CACHE_INFO = "cache_info.json"
LATENT_CACHE_FORMAT = "diffusers-afm latent cache"


def latent_cache_shard_name(shard_index: int) -> str:
    return f"shard-{shard_index:05d}.safetensors"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def read_cache_info(cache_dir: str) -> Optional[Dict]:
    """The `cache_info.json` of a latent cache, or None when `cache_dir` has none."""
    path = os.path.join(cache_dir, LATENT_CACHE_INFO)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


@torch.no_grad()
def encode_posterior(vae, pixel_values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE posterior of each image, in the VAE's dtype and on its device: the
    exact tensors from which `latent_dist.sample` draws."""
    latent_dist = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return latent_dist.mean, latent_dist.std


def encode_cache_batch(vae, pixel_values: torch.Tensor) -> Dict[str, torch.Tensor]:
    """`latent_mean` and `latent_std`, each (B, 2, C, h, w): index 0 the image, 1 its horizontal flip
    (the pixels are flipped before encoding, as `random_flip` does on the fly)."""
    batch_size = pixel_values.shape[0]
    mean, std = encode_posterior(vae, torch.cat([pixel_values, pixel_values.flip(-1)]))
    return {
        "latent_mean": torch.stack([mean[:batch_size], mean[batch_size:]], dim=1).cpu(),
        "latent_std": torch.stack([std[:batch_size], std[batch_size:]], dim=1).cpu(),
    }


def _collate_with_gaps(examples: List[Dict]) -> Dict[str, list]:
    """A batch as lists, unreadable images (None) included, so that each keeps its row."""
    return {
        "pixel_values": [ex["pixel_values"] for ex in examples],
        "class_labels": [int(ex["class_labels"]) for ex in examples],
    }


def write_latent_cache_shard(
    dataset,
    vae,
    cache_dir: str,
    shard_index: int,
    shard_size: int,
    batch_size: int = 64,
    num_workers: int = 0,
    on_batch: Optional[Callable[[int], None]] = None,
) -> str:
    """Encode rows [shard_index * shard_size, ...) of a `prepare_dataset` dataset into one
    safetensors file, written under a temporary name and renamed when complete.

    An unreadable image keeps its row (zeros, `valid` = 0), so that row i of the cache is row i of
    the dataset: a trainer's sampler then visits the same images in the same order either way.
    """
    start = shard_index * shard_size
    rows = range(start, min(start + shard_size, len(dataset)))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, rows), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate_with_gaps
    )
    labels, valid, encoded = [], [], []
    for batch in loader:
        readable = [p for p in batch["pixel_values"] if p is not None]
        encoded.append(encode_cache_batch(vae, torch.stack(readable)) if readable else None)
        labels.extend(batch["class_labels"])
        valid.extend(p is not None for p in batch["pixel_values"])
        if on_batch is not None:
            on_batch(len(batch["class_labels"]))
    known = [e for e in encoded if e is not None]
    if not known:
        raise RuntimeError(f"no image of rows {rows.start}..{rows.stop - 1} could be read.")
    valid = torch.tensor(valid, dtype=torch.bool)
    tensors = {"class_labels": torch.tensor(labels, dtype=torch.long), "valid": valid}
    for key in ("latent_mean", "latent_std"):
        full = known[0][key].new_zeros((len(valid),) + tuple(known[0][key].shape[1:]))
        full[valid] = torch.cat([e[key] for e in known])
        tensors[key] = full
    path = os.path.join(cache_dir, latent_cache_shard_name(shard_index))
    with atomic_file(path) as f:
        f.write(safetensors_bytes(tensors))
    return path


def cache_shards(num_images: int, shard_size: int, process_index: int = 0, num_processes: int = 1) -> List[int]:
    """The shards a process writes: shard k goes to process k % num_processes."""
    num_shards = -(-num_images // shard_size)
    return list(range(process_index, num_shards, num_processes))


def missing_shards(cache_dir: str, shards: List[int]) -> List[int]:
    """Those of `shards` whose file is not (yet) in `cache_dir`."""
    return [k for k in shards if not os.path.exists(os.path.join(cache_dir, latent_cache_shard_name(k)))]


def latent_cache_info(
    vae,
    vae_name: str,
    num_images: int,
    num_classes: int,
    class_names: Optional[List[str]],
    resolution: int,
    shard_size: int,
    dataset: Dict,
) -> Dict:
    """The settings a cache records in `cache_info.json`; a resumed write must match them all.

    Args:
        vae: the `AutoencoderKL` that encodes (its dtype is the cache's).
        vae_name: how the trainer loads it again (`--vae`).
        num_images: rows of the dataset, unreadable images included.
        num_classes, class_names: the dataset's classes (`infer_num_classes`, `class_names`).
        resolution: the side of the center-cropped images.
        shard_size: images per shard file.
        dataset: where the images came from (name, config, folder, split, columns), for the record.
    """
    from .training_data import vae_scale_factor  # training_data imports this module

    if vae is None:
        raise ValueError("a latent cache needs a VAE; got `--vae none`.")
    down = vae_scale_factor(vae)
    if resolution % down:
        raise ValueError(f"--resolution {resolution} is not a multiple of the VAE's downsampling factor {down}.")
    return {
        "format": LATENT_CACHE_FORMAT,
        "version": 1,
        "dataset": dataset,
        "num_images": num_images,
        "num_classes": num_classes,
        "id2label": {str(i): n for i, n in enumerate(class_names)} if class_names else None,
        "resolution": resolution,
        "center_crop": True,
        "vae": vae_name,
        "scaling_factor": vae.config.scaling_factor,
        "dtype": _dtype_name(vae.dtype),
        "latent_shape": [vae.config.latent_channels, resolution // down, resolution // down],
        "orientations": ["image", "horizontal flip"],
        "shard_size": shard_size,
        "num_shards": -(-num_images // shard_size),
    }


def write_latent_cache(
    dataset,
    vae,
    cache_dir: str,
    info: Dict,
    state,
    batch_size: int = 64,
    num_workers: int = 0,
    max_shards: Optional[int] = None,
) -> List[int]:
    """Write (or finish) a latent cache: call on every process, with the same arguments.

    Args:
        dataset: a `prepare_dataset` dataset (center-cropped, as the trainer reads it).
        vae: the `AutoencoderKL` that encodes, on this process's device.
        cache_dir: the cache folder.
        info: `latent_cache_info(...)` of this write.
        state: accelerate's `PartialState` (`diffusers_afm.utils.distributed_state()`).
        batch_size: images per VAE call (twice that with the flips).
        num_workers: DataLoader workers.
        max_shards: stop after this process has written this many shards.

    Returns the shards still missing once every process is done (none when the cache is complete).
    """
    from tqdm.auto import tqdm

    # 1. An existing cache must have been made with the same settings (checked on every process).
    existing = read_cache_info(cache_dir)
    if existing is not None:
        different = [k for k in info if existing.get(k) != info[k]]
        if different:
            changes = ", ".join(f"{k}: {existing.get(k)!r} -> {info[k]!r}" for k in different)
            raise ValueError(f"{cache_dir} holds a cache made with other settings ({changes}); "
                             "use another --output_dir or the same flags to resume.")
    info_path = os.path.join(cache_dir, LATENT_CACHE_INFO)
    state.wait_for_everyone()
    if state.is_main_process and existing is None:
        with atomic_file(info_path, "w") as f:
            json.dump(dict(info, complete=False), f, indent=2)
    state.wait_for_everyone()

    # 2. This process's missing shards
    num_images, shard_size = info["num_images"], info["shard_size"]
    todo = missing_shards(cache_dir, cache_shards(num_images, shard_size, state.process_index, state.num_processes))
    if max_shards is not None:
        todo = todo[:max_shards]
    images = sum(min(shard_size, num_images - k * shard_size) for k in todo)
    with tqdm(total=images, unit="img", desc=f"encoding (rank {state.process_index})",
              disable=not state.is_local_main_process) as progress:
        for k in todo:
            write_latent_cache_shard(dataset, vae, cache_dir, k, shard_size, batch_size, num_workers,
                                     on_batch=progress.update)

    # 3. Complete once every shard is there
    state.wait_for_everyone()
    missing = missing_shards(cache_dir, list(range(info["num_shards"])))
    if state.is_main_process and not missing:
        with atomic_file(info_path, "w") as f:
            json.dump(dict(info, complete=True), f, indent=2)
    state.wait_for_everyone()
    return missing


class LatentCacheDataset(torch.utils.data.Dataset):
    """A latent cache written by `write_latent_cache` (`examples/cache_latents.py`), as a map-style dataset.

    Item i is row i of the dataset that was encoded: `{"latent_mean": (2, C, h, w),
    "latent_std": (2, C, h, w), "class_labels": int}` (index 0 of the first axis is the image, 1 its
    horizontal flip, in the VAE's dtype), or None for an image that could not be read (`collate_latents`
    leaves it out, as `collate` does). Turn a batch into latents with `cached_latents`.

    Attributes: `info` (the cache's `cache_info.json`), `num_classes`, `id2label`, `latent_shape`
    (C, h, w), `scaling_factor` (of the VAE that made it).
    """

    def __init__(self, cache_dir: str):
        self.info = read_cache_info(cache_dir)
        if self.info is None:
            raise FileNotFoundError(f"{cache_dir} is not a latent cache: it has no {LATENT_CACHE_INFO}.")
        if not self.info.get("complete"):
            raise ValueError(
                f"the latent cache in {cache_dir} is incomplete; run cache_latents.py again with the same flags to finish it."
            )
        self.cache_dir = cache_dir
        self.shard_size = self.info["shard_size"]
        self.num_images = self.info["num_images"]
        missing = [k for k in range(self.info["num_shards"]) if not os.path.isfile(self._shard_path(k))]
        if missing:
            raise FileNotFoundError(f"latent cache {cache_dir}: shard {latent_cache_shard_name(missing[0])} is missing.")
        self.num_classes = self.info["num_classes"]
        self.id2label = {int(k): v for k, v in self.info["id2label"].items()} if self.info.get("id2label") else None
        self.latent_shape = tuple(self.info["latent_shape"])
        self.scaling_factor = self.info["scaling_factor"]
        self._shards: Dict[int, object] = {}

    def check_compatible(self, vae, resolution: Optional[int] = None, num_classes: Optional[int] = None) -> None:
        """Raise if the training run's VAE, `--resolution` or class count do not fit this cache; warn
        when the VAE's dtype differs from the cache's (the latents are then equal only up to round-off,
        not bit for bit, to on-the-fly encoding)."""
        from .training_data import vae_scale_factor  # training_data imports this module

        name = self.cache_dir
        if vae is None:
            raise ValueError(f"latent cache {name}: training from latents needs the VAE (for samples); got `--vae none`.")
        down = vae_scale_factor(vae)
        if vae.config.latent_channels != self.latent_shape[0] or vae.config.scaling_factor != self.scaling_factor:
            raise ValueError(
                f"latent cache {name} was written by another VAE ({self.info['vae']}: {self.latent_shape[0]} channels, "
                f"scaling {self.scaling_factor}); this one has {vae.config.latent_channels} and {vae.config.scaling_factor}."
            )
        if resolution is not None and resolution != self.info["resolution"]:
            raise ValueError(f"latent cache {name} holds {self.info['resolution']} px images; `--resolution` is {resolution}.")
        if self.latent_shape[1] * down != self.info["resolution"]:
            raise ValueError(
                f"latent cache {name}: latents of side {self.latent_shape[1]} do not fit this VAE's {down}x downsampling."
            )
        if num_classes is not None and num_classes < self.num_classes:
            raise ValueError(
                f"latent cache {name} holds labels up to {self.num_classes - 1}, "
                f"outside the model's classes 0..{num_classes - 1}."
            )
        dtype = _dtype_name(vae.dtype)
        if dtype != self.info["dtype"]:
            logger.warning(
                "Latent cache %s is %s but the VAE runs in %s: the cached latents match on-the-fly encoding up to "
                "round-off, not bit for bit.", name, self.info["dtype"], dtype,
            )

    def _shard_path(self, shard_index: int) -> str:
        return os.path.join(self.cache_dir, latent_cache_shard_name(shard_index))

    def _shard(self, shard_index: int):
        # Opened lazily, in the process that reads (DataLoader workers open their own).
        if shard_index not in self._shards:
            self._shards[shard_index] = safe_open(self._shard_path(shard_index), framework="pt")
        return self._shards[shard_index]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_shards"] = {}
        return state

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> Optional[Dict]:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} is out of range for a cache of {self.num_images} images.")
        shard = self._shard(index // self.shard_size)
        row = index % self.shard_size
        if not bool(shard.get_slice("valid")[row : row + 1][0]):
            return None
        return {
            "latent_mean": shard.get_slice("latent_mean")[row : row + 1][0],
            "latent_std": shard.get_slice("latent_std")[row : row + 1][0],
            "class_labels": int(shard.get_slice("class_labels")[row : row + 1][0]),
        }


def collate_latents(examples: List[Optional[Dict]]) -> Dict[str, torch.Tensor]:
    """Stack a batch of `LatentCacheDataset` items, leaving out unreadable images."""
    kept = [ex for ex in examples if ex is not None]
    if not kept:
        raise RuntimeError("Every image of a batch was unreadable when the cache was written.")
    return {
        "latent_mean": torch.stack([ex["latent_mean"] for ex in kept]),
        "latent_std": torch.stack([ex["latent_std"] for ex in kept]),
        "class_labels": torch.tensor([ex["class_labels"] for ex in kept], dtype=torch.long),
    }


def select_flip(
    cache_batch: Dict[str, torch.Tensor], generator: Optional[torch.Generator] = None, p: float = 0.5
) -> Dict[str, torch.Tensor]:
    """Pick each sample's flipped posterior with probability `p`, drawing exactly what
    `random_flip(pixels, generator, p)` draws (one uniform per sample, on the batch's device), so the
    generator is left in the same state and the same images are flipped.

    Returns the batch with `latent_mean` and `latent_std` of shape (B, C, h, w).
    """
    mean, std = cache_batch["latent_mean"], cache_batch["latent_std"]
    flip = torch.rand(mean.shape[0], device=mean.device, generator=generator) < p
    choose = flip.long()[:, None, None, None, None].expand(-1, 1, *mean.shape[2:])
    return dict(cache_batch, latent_mean=mean.gather(1, choose)[:, 0], latent_std=std.gather(1, choose)[:, 0])


def sample_posterior(mean: torch.Tensor, std: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """`mean + std * noise`: the computation of diffusers' `DiagonalGaussianDistribution.sample`
    (noise from `randn_tensor` with the posterior's shape, device and dtype), so the same generator
    gives bit-identical latents."""
    from diffusers.utils.torch_utils import randn_tensor

    noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + std * noise


def cached_latents(
    cache_batch: Dict[str, torch.Tensor],
    generator: Optional[torch.Generator] = None,
    random_flip: bool = True,
    p: float = 0.5,
) -> torch.Tensor:
    """Latents (B, C, h, w) of a `collate_latents` batch (moved to the device), unscaled: the flips
    (when `random_flip`), then one posterior draw, both from `generator`, as on-the-fly encoding
    draws them (the module's invariant). Multiply by the VAE's scaling factor as the trainer does.
    """
    if random_flip:
        cache_batch = select_flip(cache_batch, generator, p)
    else:
        cache_batch = dict(cache_batch, latent_mean=cache_batch["latent_mean"][:, 0],
                           latent_std=cache_batch["latent_std"][:, 0])
    return sample_posterior(cache_batch["latent_mean"], cache_batch["latent_std"], generator)
