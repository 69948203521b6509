"""Image data for training: any `datasets` image dataset, and the digits that ship with scikit-learn.

Images are decoded lazily and defensively (a corrupt file is skipped with a warning that names
it), resized and cropped to a square, and scaled to [-1, 1] (METHOD.md, "Training recipe": data).
Random horizontal flips are applied later, on the batch, with the trainer's own random generator,
so that a resumed run sees exactly the flips of an uninterrupted one.

A latent cache (`LatentCacheDataset`, written by `examples/cache_latents.py`) holds the VAE posterior
of every image and of its mirror image, so that training skips the encoder and still draws the
same flips and latents from the same generator (`cached_latents`).
"""

import io
import json
import logging
import os
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import PIL.Image
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from .utils import atomic_file

logger = logging.getLogger(__name__)

DIGITS_NAMES = [str(i) for i in range(10)]
# `--dataset_name digits` names the embedded digits explicitly (e.g. to override a config's data set);
# a local folder of that name is `./digits`.
EMBEDDED_DIGITS = "digits"


def digits_dataset(split: Optional[str] = "train", test_fraction: float = 0.25, seed: int = 0):
    """scikit-learn's 1,797 handwritten digits (8x8, 10 classes) as a `datasets.Dataset`.

    `split` is `"train"`, `"test"` (a fixed, class-stratified 25% hold-out) or `None` for all.
    Pixels (0..16 in scikit-learn) become 8-bit grey images.
    """
    import datasets
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test", None):
        raise ValueError(f"`split` must be 'train', 'test' or None, got {split!r}.")
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    if split is not None:
        train_idx, test_idx = train_test_split(
            np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
        )
        keep = np.sort(train_idx if split == "train" else test_idx)
        images, labels = images[keep], labels[keep]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=DIGITS_NAMES)}
    )
    return datasets.Dataset.from_dict(
        {"image": [PIL.Image.fromarray(im, mode="L") for im in images], "label": labels.tolist()}, features=features
    )


def load_image_dataset(
    dataset_name: Optional[str] = None,
    dataset_config_name: Optional[str] = None,
    train_data_dir: Optional[str] = None,
    cache_dir: Optional[str] = None,
    split: str = "train",
):
    """A Hub dataset, a local folder (`imagefolder`), or the embedded digits when neither is given
    (or when `dataset_name` is `"digits"`)."""
    import datasets

    if train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise ValueError(f"`--train_data_dir`: {train_data_dir!r} is not a folder.")
        return datasets.load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir, split=split)
    if dataset_name is not None and dataset_name != EMBEDDED_DIGITS:
        if os.path.isdir(dataset_name):
            return datasets.load_dataset("imagefolder", data_dir=dataset_name, cache_dir=cache_dir, split=split)
        return datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split=split)
    return digits_dataset(split)


def class_names(dataset, label_column: Optional[str]) -> Optional[List[str]]:
    """Names of a `ClassLabel` column, or None when labels are plain integers (or absent)."""
    import datasets

    if label_column is None or label_column not in dataset.column_names:
        return None
    feature = dataset.features[label_column]
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def infer_num_classes(dataset, label_column: Optional[str], num_classes: Optional[int] = None) -> int:
    """The model's class count; checks every label against it before any training starts.

    A dataset without the label column trains an unconditional model (one class).
    """
    if label_column is None or label_column not in dataset.column_names:
        return num_classes or 1
    names = class_names(dataset, label_column)
    labels = np.asarray(dataset[label_column])
    if labels.size == 0:
        raise ValueError("The training dataset is empty.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"`--label_column` {label_column!r} must hold integer class ids, got {labels.dtype}.")
    if num_classes is None:
        num_classes = len(names) if names is not None else int(labels.max()) + 1
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise ValueError(
            f"`--label_column` {label_column!r} holds label {int(bad[0])}, outside the model's classes 0..{num_classes - 1}."
        )
    return num_classes


class ImageTransform:
    """PIL image -> float32 (C, H, W) tensor in [-1, 1]: shorter side resized, then a square crop.

    Args:
        resolution: output side.
        center_crop: center crop (the paper's setting) rather than a random crop.
        mode: `"RGB"` (3 channels) or `"L"` (1 channel).
    """

    def __init__(self, resolution: int, center_crop: bool = True, mode: str = "RGB"):
        if mode not in ("RGB", "L"):
            raise ValueError(f"`mode` must be 'RGB' or 'L', got {mode!r}.")
        self.resolution, self.center_crop, self.mode = resolution, center_crop, mode

    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        image = image.convert(self.mode)
        width, height = image.size
        scale = self.resolution / min(width, height)
        if scale != 1:
            size = (max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale)))
            image = image.resize(size, PIL.Image.BICUBIC if scale > 1 else PIL.Image.BOX)
        width, height = image.size
        if self.center_crop:
            left, top = (width - self.resolution) // 2, (height - self.resolution) // 2
        else:
            left = int(np.random.randint(0, width - self.resolution + 1))
            top = int(np.random.randint(0, height - self.resolution + 1))
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array.transpose(2, 0, 1).copy())


def _decode(value) -> Tuple[Optional[PIL.Image.Image], str]:
    """Decode an undecoded `datasets.Image` value; returns (image or None, its name for messages)."""
    if isinstance(value, PIL.Image.Image):
        return value, "<in-memory image>"
    name = value.get("path") or "<image bytes>"
    try:
        source = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
        image = PIL.Image.open(source)
        image.load()
        return image, name
    except Exception as err:  # PIL raises many types for broken files
        logger.warning("Skipping unreadable image %s: %s", name, err)
        return None, name


def make_preprocess(image_column: str, label_column: Optional[str], transform: ImageTransform):
    """A `dataset.with_transform` function: decode, transform, and mark unreadable images as None."""

    def preprocess(examples: Dict[str, list]) -> Dict[str, list]:
        pixel_values = []
        for value in examples[image_column]:
            image, _ = _decode(value)
            pixel_values.append(transform(image) if image is not None else None)
        count = len(pixel_values)
        labels = examples[label_column] if label_column in examples else [0] * count
        return {"pixel_values": pixel_values, "class_labels": labels}

    return preprocess


def prepare_dataset(dataset, image_column: str, label_column: Optional[str], transform: ImageTransform):
    """Lazily decoded, transformed dataset of `pixel_values` / `class_labels`."""
    import datasets

    if image_column not in dataset.column_names:
        raise ValueError(f"`--image_column` {image_column!r} is not a column; the dataset has {dataset.column_names}.")
    if isinstance(dataset.features[image_column], datasets.Image):
        # Decode ourselves, so that one broken file is skipped instead of stopping training.
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    if label_column is not None and label_column not in dataset.column_names:
        label_column = None
    return dataset.with_transform(make_preprocess(image_column, label_column, transform))


def collate(examples: List[Dict]) -> Dict[str, torch.Tensor]:
    """Stack a batch, leaving out images that could not be read."""
    kept = [ex for ex in examples if ex["pixel_values"] is not None]
    if not kept:
        raise RuntimeError("Every image of a batch was unreadable; see the warnings above.")
    return {
        "pixel_values": torch.stack([ex["pixel_values"] for ex in kept]),
        "class_labels": torch.tensor([int(ex["class_labels"]) for ex in kept], dtype=torch.long),
    }


def random_flip(images: torch.Tensor, generator: Optional[torch.Generator] = None, p: float = 0.5) -> torch.Tensor:
    """Flip each image horizontally with probability `p` (drawn with `generator`)."""
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < p
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


# ----------------------------------------------------------------------------- latent cache
# The VAE encoder runs once per image (and once for its mirror image) instead of every epoch. The
# cache keeps the posterior N(mean, std^2) of both orientations rather than one draw from it, so a
# trainer reading it draws the flips and the latent noise from its own generator, in the same order
# and with the same values as on-the-fly encoding: `random_flip` before `vae.encode`, then
# `latent_dist.sample(generator=...)`.
LATENT_CACHE_INFO = "cache_info.json"
LATENT_CACHE_FORMAT = "diffusers-afm latent cache"


def latent_cache_shard_name(shard_index: int) -> str:
    return f"shard-{shard_index:05d}.safetensors"


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


class LatentCacheDataset(torch.utils.data.Dataset):
    """A latent cache written by `examples/cache_latents.py`, as a map-style dataset.

    Item i is row i of the dataset that was encoded: `{"latent_mean": (2, C, h, w),
    "latent_std": (2, C, h, w), "class_labels": int}` (index 0 of the first axis is the image, 1 its
    horizontal flip, in the VAE's dtype), or None for an image that could not be read (`collate_latents`
    leaves it out, as `collate` does). Turn a batch into latents with `cached_latents`.

    Attributes: `info` (the cache's `cache_info.json`), `num_classes`, `id2label`, `latent_shape`
    (C, h, w), `scaling_factor` (of the VAE that made it).
    """

    def __init__(self, cache_dir: str):
        path = os.path.join(cache_dir, LATENT_CACHE_INFO)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{cache_dir} is not a latent cache: it has no {LATENT_CACHE_INFO}.")
        with open(path) as f:
            self.info = json.load(f)
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
        name = self.cache_dir
        if vae is None:
            raise ValueError(f"latent cache {name}: training from latents needs the VAE (for samples); got `--vae none`.")
        down = 2 ** (len(vae.config.block_out_channels) - 1)
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
        dtype = str(vae.dtype).replace("torch.", "")
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
    """Latents (B, C, h, w) of a `collate_latents` batch (moved to the device), unscaled, as on the fly:
    the flips (when `random_flip`), then one posterior draw, both from `generator`.

    Equivalent to `vae.encode(random_flip(pixels, generator)).latent_dist.sample(generator=generator)`;
    multiply by the VAE's scaling factor as the trainer does.
    """
    if random_flip:
        cache_batch = select_flip(cache_batch, generator, p)
    else:
        cache_batch = dict(cache_batch, latent_mean=cache_batch["latent_mean"][:, 0],
                           latent_std=cache_batch["latent_std"][:, 0])
    return sample_posterior(cache_batch["latent_mean"], cache_batch["latent_std"], generator)
