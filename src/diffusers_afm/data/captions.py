"""Captioned images for text-to-image training (Continuous AFM on Z-Image, `examples/train_cafm_t2i.py`).

Any `datasets` source with an image and a caption column: a Hub dataset, or a local `imagefolder`
whose `metadata.jsonl` gives each `file_name` its caption (diffusers' text-to-image layout). Every
caption is checked before training starts. A batch becomes the model's inputs in
`TextToImageBatches`: captions dropped to "" with the caption-dropout probability, the images
flipped, VAE-encoded and shifted/scaled the way Z-Image's pipeline decodes them, and the captions
encoded once per batch by the pipeline's own text encoder (`ZImagePipeline.encode_prompt`). Every
random draw comes from the run's generator, so a resumed run sees the same inputs.
"""

import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ..utils import RunStopped
from .images import ImageTransform, load_image_dataset, load_pixels, missing_column_error, random_flip
from .training_data import make_dataloader, random_subset

logger = logging.getLogger(__name__)

DEFAULT_CAPTION_COLUMN = "text"


def load_captioned_dataset(dataset_name: Optional[str], train_data_dir: Optional[str], image_column: str,
                           caption_column: str, dataset_config_name: Optional[str] = None,
                           cache_dir: Optional[str] = None):
    """The dataset, its image and caption columns checked, and every caption checked to be text."""
    if dataset_name is None and train_data_dir is None:
        raise ValueError("Give `--train_data_dir` (a folder of images with a metadata.jsonl of captions) or "
                         "`--dataset_name` (a Hub dataset with a caption column).")
    dataset = load_image_dataset(dataset_name, dataset_config_name, train_data_dir, cache_dir)
    if image_column not in dataset.column_names:
        raise missing_column_error("image_column", image_column, dataset)
    if caption_column not in dataset.column_names:
        folder = train_data_dir or (dataset_name if dataset_name and os.path.isdir(dataset_name) else None)
        hint = (f" A local folder's captions come from a metadata.jsonl beside the images, one line per image: "
                f'{{"file_name": "0001.png", "{caption_column}": "a caption"}}.' if folder else "")
        raise ValueError(str(missing_column_error("caption_column", caption_column, dataset)) + hint)
    check_captions(dataset[caption_column], caption_column)
    return dataset


def check_captions(captions: List, caption_column: str) -> None:
    """Every row needs a caption string: an image without one is an error naming its rows (an empty
    string is allowed: it is what caption dropout trains on)."""
    missing = [i for i, c in enumerate(captions) if not isinstance(c, str)]
    if missing:
        raise ValueError(f"`--caption_column` {caption_column!r}: {len(missing)} of {len(captions)} images have no caption "
                         f"(rows {missing[:5]}{', ...' if len(missing) > 5 else ''}); give every image one.")
    if not captions:
        raise ValueError("The training dataset is empty.")


def prepare_captioned_dataset(dataset, image_column: str, caption_column: str, transform: ImageTransform):
    """Lazily decoded `pixel_values` / `caption` rows; unreadable images become None (skipped by `collate`)."""
    import datasets

    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))

    def preprocess(examples: Dict[str, list]) -> Dict[str, list]:
        pixels = [load_pixels(value, transform) for value in examples[image_column]]
        return {"pixel_values": pixels, "caption": examples[caption_column]}

    return dataset.with_transform(preprocess)


def collate_captioned(examples: List[Dict]) -> Dict:
    kept = [ex for ex in examples if ex["pixel_values"] is not None]
    if not kept:
        raise RunStopped("Every image of a batch was unreadable (each is named in a warning above); "
                         "remove or repair those files.")
    return {"pixel_values": torch.stack([ex["pixel_values"] for ex in kept]), "captions": [ex["caption"] for ex in kept]}


@dataclass
class TextToImageBatches:
    """A loader batch -> `(latents, text_embeds)`, each a list with one entry per sample.

    Args:
        pipeline: a `ZImagePipeline` holding the VAE, the tokenizer and the text encoder (its
            transformer is not used).
        caption_dropout: probability of replacing a caption by "" (the reference's 0.1).
        random_flip: horizontal flips, drawn from the run's generator.
        max_sequence_length: the tokenizer's length (Z-Image's 512).
    """

    pipeline: object
    caption_dropout: float = 0.1
    random_flip: bool = False
    max_sequence_length: int = 512

    def __post_init__(self):
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"`caption_dropout` must be in [0, 1), got {self.caption_dropout}.")

    @torch.no_grad()
    def __call__(self, batch: Dict, generator: torch.Generator) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        pixels, captions = batch["pixel_values"], list(batch["captions"])
        device = generator.device
        keep = torch.rand(len(captions), device=device, generator=generator) >= self.caption_dropout
        captions = [c if k else "" for c, k in zip(captions, keep.tolist())]
        return self.encode_images(pixels.to(device), generator), self.encode_text(captions)

    def encode_text(self, captions: List[str]) -> List[torch.Tensor]:
        """The text encoder's second-to-last hidden states of each caption's tokens (Z-Image's own encoding)."""
        device = next(self.pipeline.text_encoder.parameters()).device
        embeds, _ = self.pipeline.encode_prompt(list(captions), device=device, do_classifier_free_guidance=False,
                                                max_sequence_length=self.max_sequence_length)
        return [e.float() for e in embeds]

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> List[torch.Tensor]:
        """Images in [-1, 1] -> `(C, 1, h, w)` latents, `(z - shift_factor) * scaling_factor` (the inverse of
        the pipeline's decode)."""
        if self.random_flip:
            pixels = random_flip(pixels, generator=generator)
        vae = self.pipeline.vae
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator=generator).float()
        config = vae.config
        latents = (latents - (config.shift_factor or 0.0)) * config.scaling_factor
        return list(latents.unsqueeze(2).unbind(0))


def captioned_dataloader(dataset, *, resolution: int, train_batch_size: int, caption_column: str,
                         image_column: str = "image", max_train_samples: Optional[int] = None, center_crop: bool = True,
                         dataloader_num_workers: int = 0, seed: int = 0):
    """`(dataset, dataloader)` of a `load_captioned_dataset` dataset at `resolution` (shorter side
    resized, square crop)."""
    transform = ImageTransform(resolution, center_crop=center_crop, mode="RGB")
    dataset = random_subset(prepare_captioned_dataset(dataset, image_column, caption_column, transform), max_train_samples, seed)
    loader = make_dataloader(dataset, collate_captioned, train_batch_size, dataloader_num_workers, seed, "training data")
    return dataset, loader


__all__ = [
    "DEFAULT_CAPTION_COLUMN",
    "TextToImageBatches",
    "captioned_dataloader",
    "check_captions",
    "collate_captioned",
    "load_captioned_dataset",
    "captioned_dataloader",
    "prepare_captioned_dataset",
]
