"""What a training run reads: the VAE, the loader, and how a batch becomes `x0`.

Both trainers (`examples/train_afm.py`, `examples/train_afm_classifier.py`) read their data with
`load_training_data`, from images encoded on the fly or from a latent cache; the two paths give the
same `x0` (the invariant of `diffusers_afm.data.latent_cache`).
"""

import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from .images import (
    ImageTransform,
    check_columns,
    class_names,
    collate,
    infer_num_classes,
    is_embedded_digits,
    load_image_dataset,
    prepare_dataset,
    random_flip,
)
from .latent_cache import LatentCacheDataset, cached_latents, collate_latents
from .planning import downsampling_factor

# The paper's VAE (docs/method.md, "Notation": x0 is an SD-VAE latent): 8x downsampling, 4 latent channels.
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
# The arguments of `load_training_data` that the example trainers' data flags give, by the same names.
DATA_FLAGS = ("dataset_name", "dataset_config_name", "train_data_dir", "cache_dir", "image_column", "label_column",
              "num_classes", "max_train_samples", "resolution", "center_crop", "random_flip", "vae", "vae_scaling_factor",
              "latent_cache", "train_batch_size", "dataloader_num_workers", "seed")


def load_vae(name_or_path: str, device=None, dtype: torch.dtype = torch.float32):
    """A frozen `AutoencoderKL`: a folder, a pipeline folder (its `vae/`), or a Hub id; None for `"none"`
    (pixel space)."""
    if name_or_path.lower() == "none":
        return None
    from diffusers import AutoencoderKL

    subfolder = "vae" if os.path.isdir(os.path.join(name_or_path, "vae")) else None
    # Cast while loading, as diffusers advises (the same weights as a cast afterwards, without its warning).
    vae = AutoencoderKL.from_pretrained(name_or_path, subfolder=subfolder, dtype=dtype)
    return vae.requires_grad_(False).eval().to(device)


def vae_scale_factor(vae) -> int:
    """The VAE's spatial downsampling (`planning.downsampling_factor` of its config)."""
    return downsampling_factor(dict(vae.config))


@dataclass
class TrainingData:
    """The data side of a run: the loader, the classes, and how a batch becomes `x0`."""

    dataset: object
    dataloader: torch.utils.data.DataLoader
    num_classes: int
    id2label: Optional[Dict[int, str]]
    vae: Optional[torch.nn.Module]
    scaling_factor: float
    sample_size: int  # the model's input side (latent side with a VAE)
    in_channels: int
    random_flip: bool
    latent_cache: bool = False

    def check_fits(self, model, what: str) -> None:
        """`model` (a pretrained one, loaded from `what`) must take this data: its side, channels and classes."""
        for key, value in (("sample_size", self.sample_size), ("in_channels", self.in_channels),
                           ("num_classes", self.num_classes)):
            if model.config[key] != value:
                raise ValueError(
                    f"{what} has {key}={model.config[key]}, but the training data gives {value}; pass the --resolution, "
                    "--vae and data it was trained on (latent side = resolution / 8 with the SD-VAE)."
                )

    @torch.no_grad()
    def latents(self, batch: Dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """A batch of the loader -> `x0`, from the latent cache or by `encode`; both draw the same
        flips and posterior noise from `generator` (see `diffusers_afm.data.latent_cache`)."""
        if self.latent_cache:
            return cached_latents(batch, generator, random_flip=self.random_flip).float() * self.scaling_factor
        return self.encode(batch["pixel_values"], generator)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A batch of images in [-1, 1] -> `x0`: flipped (with the run's generator), VAE-encoded, scaled."""
        if self.random_flip:
            pixels = random_flip(pixels, generator=generator)
        if self.vae is None:
            return pixels
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.sample(generator=generator)
        return latents.float() * self.scaling_factor


def make_dataloader(dataset, collate_fn, train_batch_size: int, num_workers: int, seed: int, what: str):
    """A shuffling loader that drops the last incomplete batch, with a generator of its own (`seed`);
    a batch size larger than the data (`what`, for the message) is an error."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=train_batch_size, shuffle=True, drop_last=True, collate_fn=collate_fn,
        num_workers=num_workers,
        # Its own generator, so that making an iterator never draws from the global RNG.
        generator=torch.Generator().manual_seed(seed),
    )
    if len(loader) == 0:
        raise ValueError(f"`--train_batch_size` {train_batch_size} is larger than the {what} ({len(dataset)} images).")
    return loader


def random_subset(dataset, max_train_samples: Optional[int], seed: int):
    """`max_train_samples` rows of a map-style dataset, a fixed random choice (kept in their order)."""
    if max_train_samples is None or max_train_samples >= len(dataset):
        return dataset
    rows = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:max_train_samples]
    return torch.utils.data.Subset(dataset, sorted(rows.tolist()))


def load_training_data(
    *,
    resolution: int,
    train_batch_size: int,
    dataset_name: Optional[str] = None,
    dataset_config_name: Optional[str] = None,
    train_data_dir: Optional[str] = None,
    cache_dir: Optional[str] = None,
    image_column: str = "image",
    label_column: Optional[str] = None,
    num_classes: Optional[int] = None,
    max_train_samples: Optional[int] = None,
    center_crop: bool = True,
    random_flip: bool = True,
    vae: str = DEFAULT_VAE,
    vae_scaling_factor: Optional[float] = None,
    latent_cache: Optional[str] = None,
    dataloader_num_workers: int = 0,
    seed: int = 0,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> TrainingData:
    """Load, check and batch the training data; load the VAE. Every label is checked up front.

    Args:
        resolution: the images' side (with `latent_cache`, checked against the cache's).
        train_batch_size: per process; the loader drops the last incomplete batch.
        dataset_name, dataset_config_name, train_data_dir, cache_dir: the images (`load_image_dataset`);
            neither a name nor a folder means the embedded digits, read as grey images.
        image_column, label_column: the dataset's columns, each an error if the dataset lacks it;
            `label_column=None` reads `"label"` when the dataset has it, else trains one class.
        num_classes: the model's class count (default: read off the data or the cache).
        max_train_samples: train on this many rows: a fixed random subset, drawn with `seed`.
        center_crop: center rather than random crops (`ImageTransform`).
        random_flip: flip each image horizontally with probability 0.5, drawn from the run's generator.
        vae: `load_vae`'s `name_or_path`; `"none"` trains in pixel space.
        vae_scaling_factor: the latents' scale (default: the VAE's config).
        latent_cache: a folder written by `write_latent_cache`: train from it, without the VAE's
            encoder (the images' flags are then unused); the VAE is still loaded, for its decoder.
        dataloader_num_workers: DataLoader workers.
        seed: the loader's shuffling seed.
        device, dtype: where the VAE runs and in which precision (the trainer's mixed precision).
    """
    # 1. From a latent cache
    if latent_cache is not None:
        cache = LatentCacheDataset(latent_cache)
        vae_model = load_vae(vae, device, dtype)
        num_classes = num_classes or cache.num_classes
        cache.check_compatible(vae_model, resolution, num_classes)
        rows = random_subset(cache, max_train_samples, seed)
        return TrainingData(
            dataset=rows,
            dataloader=make_dataloader(rows, collate_latents, train_batch_size, dataloader_num_workers, seed, "cache"),
            num_classes=num_classes,
            id2label=cache.id2label,
            vae=vae_model,
            scaling_factor=vae_scaling_factor or vae_model.config.scaling_factor,
            sample_size=cache.latent_shape[1],
            in_channels=cache.latent_shape[0],
            random_flip=random_flip,
            latent_cache=True,
        )

    # 2. From images, encoded on the fly
    dataset = load_image_dataset(dataset_name, dataset_config_name, train_data_dir, cache_dir)
    label_column = check_columns(dataset, image_column, label_column)
    if max_train_samples is not None and max_train_samples < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(max_train_samples)).flatten_indices()
    num_classes = infer_num_classes(dataset, label_column, num_classes)
    names = class_names(dataset, label_column)
    mode = "L" if is_embedded_digits(dataset_name, train_data_dir) else "RGB"
    train_dataset = prepare_dataset(dataset, image_column, label_column, ImageTransform(resolution, center_crop, mode))
    dataloader = make_dataloader(train_dataset, collate, train_batch_size, dataloader_num_workers, seed, "dataset")
    vae_model = load_vae(vae, device, dtype)
    if vae_model is not None:
        sample_size, in_channels = resolution // vae_scale_factor(vae_model), vae_model.config.latent_channels
    else:
        sample_size, in_channels = resolution, 1 if mode == "L" else 3
    return TrainingData(
        dataset=dataset,
        dataloader=dataloader,
        num_classes=num_classes,
        id2label={i: n for i, n in enumerate(names)} if names else None,
        vae=vae_model,
        scaling_factor=vae_scaling_factor or (vae_model.config.scaling_factor if vae_model is not None else 1.0),
        sample_size=sample_size,
        in_channels=in_channels,
        random_flip=random_flip,
    )
