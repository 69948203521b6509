"""Image data for training: any `datasets` image dataset, and the digits that ship with scikit-learn.

Images are decoded lazily and defensively (a corrupt file is skipped with a warning that names
it), resized and cropped to a square, and scaled to [-1, 1] (docs/method.md, "Training recipe": data).
Random horizontal flips are applied later, on the batch, with the trainer's own random generator,
so that a resumed run sees exactly the flips of an uninterrupted one.
"""

import difflib
import io
import logging
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import PIL.Image
import torch

from ..utils import RunStopped

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


def is_embedded_digits(dataset_name: Optional[str] = None, train_data_dir: Optional[str] = None) -> bool:
    """Whether `load_image_dataset(dataset_name, ..., train_data_dir)` loads the embedded digits
    (grey, so they are read in mode `"L"`)."""
    return dataset_name in (None, EMBEDDED_DIGITS) and train_data_dir is None


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

    def image_folder(folder: str, flag: str):
        if not os.path.isdir(folder):
            raise ValueError(f"`--{flag}`: {folder!r} is not a folder.")
        if count_local_images(folder)[0] == 0:
            raise ValueError(f"`--{flag}`: {folder!r} has no images (files ending in one of "
                             f"{', '.join(image_extensions()[:6])}, ...), in it or in class sub-folders.")
        return datasets.load_dataset("imagefolder", data_dir=folder, cache_dir=cache_dir, split=split)

    if train_data_dir is not None:
        return image_folder(train_data_dir, "train_data_dir")
    if is_embedded_digits(dataset_name):
        return digits_dataset(split)
    if os.path.isdir(dataset_name):
        return image_folder(dataset_name, "dataset_name")
    return datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split=split)


# The label column read when none is named: used if the dataset has it, else the model is unconditional.
DEFAULT_LABEL_COLUMN = "label"


def missing_column_error(flag: str, column: str, dataset) -> ValueError:
    close = difflib.get_close_matches(column, dataset.column_names, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"`--{flag}` {column!r} is not a column; the dataset has {dataset.column_names}.{hint}")


def check_columns(dataset, image_column: str, label_column: Optional[str]) -> Optional[str]:
    """The label column to read: `label_column` itself (an error if the dataset lacks it), or, when
    None, `"label"` if the dataset has that column, else None (one class). A missing image column
    is an error too; both name the columns the dataset has and the close matches."""
    if image_column not in dataset.column_names:
        raise missing_column_error("image_column", image_column, dataset)
    if label_column is None:
        return DEFAULT_LABEL_COLUMN if DEFAULT_LABEL_COLUMN in dataset.column_names else None
    if label_column not in dataset.column_names:
        raise missing_column_error("label_column", label_column, dataset)
    return label_column


def class_names(dataset, label_column: Optional[str]) -> Optional[List[str]]:
    """Names of a `ClassLabel` column, or None when labels are plain integers (or absent)."""
    import datasets

    if label_column is None or label_column not in dataset.column_names:
        return None
    feature = dataset.features[label_column]
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def infer_num_classes(dataset, label_column: Optional[str], num_classes: Optional[int] = None) -> int:
    """The model's class count; checks every label against it before any training starts.

    `label_column=None` trains an unconditional model (one class); a named column must exist.
    """
    if label_column is None:
        return num_classes or 1
    if label_column not in dataset.column_names:
        raise missing_column_error("label_column", label_column, dataset)
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


# Modes whose samples are wider than 8 bits, with the value that is white: PIL's own conversion to
# "L" or "RGB" clips them at 255 (a 16-bit ramp would become white), so they are scaled to [0, 1] as
# 32-bit floats ("F") instead, and resized in that mode. "I" (32-bit integers) is read as 16-bit,
# the range PIL gives it for 16-bit files; "F" must already be in [0, 1]. Anything outside the
# range is refused, since its meaning cannot be guessed.
WIDE_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


class ImageModeError(ValueError):
    """An image whose mode or values cannot be mapped to the model's range."""


def to_model_mode(image: PIL.Image.Image, mode: str) -> Tuple[PIL.Image.Image, float]:
    """`(image, white)`: `image` in `mode` ("L" or "RGB", 8-bit, white = 255) or, for `WIDE_MODES`,
    in "F" scaled to [0, 1] (white = 1; one channel, repeated for "RGB" by the caller). Palette,
    alpha, CMYK and bilevel images go through PIL's conversion, which keeps their 8-bit range."""
    if image.mode in WIDE_MODES:
        white = WIDE_MODES[image.mode]
        values = np.asarray(image, dtype=np.float64)
        if values.size and (not np.isfinite(values).all() or values.min() < 0 or values.max() > white):
            raise ImageModeError(f"mode {image.mode!r} with values in [{values.min():g}, {values.max():g}], outside "
                                 f"0..{white:g}: its range is unknown")
        return PIL.Image.fromarray((values / white).astype(np.float32)), 1.0
    try:
        return image.convert(mode), 255.0
    except (ValueError, OSError) as err:  # PIL has no conversion for some modes (LAB, HSV to RGB, ...)
        raise ImageModeError(f"mode {image.mode!r} cannot be converted to {mode} ({err})") from None


class ImageTransform:
    """PIL image -> float32 (C, H, W) tensor in [-1, 1]: shorter side resized, then a square crop.

    Every mode keeps its range: 8-bit modes through PIL's conversion, 16-bit and float modes
    (`WIDE_MODES`) scaled from their own range; a mode that cannot be mapped raises `ImageModeError`.

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
        image, white = to_model_mode(image, self.mode)
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
        array = np.asarray(image, dtype=np.float32) * np.float32(2.0 / white) - 1.0
        if array.ndim == 2:
            array = array[:, :, None]
        if array.shape[2] == 1 and self.mode == "RGB":  # a wide grey image for an RGB model
            array = np.repeat(array, 3, axis=2)
        return torch.from_numpy(array.transpose(2, 0, 1).copy())


def decode_image(value) -> Tuple[Optional[PIL.Image.Image], str]:
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


def load_pixels(value, transform: ImageTransform) -> Optional[torch.Tensor]:
    """An undecoded `datasets.Image` value through `transform`, or None (with a warning naming the
    file) when it cannot be read or its mode cannot be mapped to the model's range."""
    image, name = decode_image(value)
    if image is None:
        return None
    try:
        return transform(image)
    except ImageModeError as err:
        logger.warning("Skipping image %s: %s", name, err)
        return None


def make_preprocess(image_column: str, label_column: Optional[str], transform: ImageTransform):
    """A `dataset.with_transform` function: decode, transform, and mark unreadable images as None."""

    def preprocess(examples: Dict[str, list]) -> Dict[str, list]:
        pixel_values = [load_pixels(value, transform) for value in examples[image_column]]
        count = len(pixel_values)
        labels = examples[label_column] if label_column in examples else [0] * count
        return {"pixel_values": pixel_values, "class_labels": labels}

    return preprocess


def prepare_dataset(dataset, image_column: str, label_column: Optional[str], transform: ImageTransform):
    """Lazily decoded, transformed dataset of `pixel_values` / `class_labels`."""
    import datasets

    if image_column not in dataset.column_names:
        raise missing_column_error("image_column", image_column, dataset)
    if label_column is not None and label_column not in dataset.column_names:
        raise missing_column_error("label_column", label_column, dataset)
    if isinstance(dataset.features[image_column], datasets.Image):
        # Decode ourselves, so that one broken file is skipped instead of stopping training.
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset.with_transform(make_preprocess(image_column, label_column, transform))


def collate(examples: List[Dict]) -> Dict[str, torch.Tensor]:
    """Stack a batch, leaving out images that could not be read."""
    kept = [ex for ex in examples if ex["pixel_values"] is not None]
    if not kept:
        raise RunStopped("Every image of a batch was unreadable (each is named in a warning above); "
                         "remove or repair those files.")
    return {
        "pixel_values": torch.stack([ex["pixel_values"] for ex in kept]),
        "class_labels": torch.tensor([int(ex["class_labels"]) for ex in kept], dtype=torch.long),
    }


def random_flip(images: torch.Tensor, generator: Optional[torch.Generator] = None, p: float = 0.5) -> torch.Tensor:
    """Flip each image horizontally with probability `p` (drawn with `generator`)."""
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < p
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def image_extensions() -> List[str]:
    """The file extensions `datasets`' imagefolder reads as images (lower case, with the dot)."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return sorted({e.lower() for e in ImageFolder.EXTENSIONS}, key=lambda e: (e not in (".png", ".jpg", ".jpeg", ".webp"), e))


def count_local_images(folder: str) -> Tuple[int, int]:
    """`(images, class folders)` of an `imagefolder`-layout folder, counted by file extension as
    `datasets`' imagefolder selects them, without opening a file (the trainer sizes its defaults by
    it before loading anything). Class folders are the distinct folders that hold images (1 when all
    images lie in `folder` itself)."""
    extensions = set(image_extensions())
    images, parents = 0, set()
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found = sum(os.path.splitext(name)[1].lower() in extensions for name in files if not name.startswith("."))
        if found:
            images += found
            parents.add(os.path.relpath(root, folder))
    return images, len(parents)
