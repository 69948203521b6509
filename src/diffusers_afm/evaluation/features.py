"""Feature networks for the metrics, and the batched pass that runs one over images (docs/method.md,
"Evaluation protocol").

FID-50K proper goes through the ADM suite's Inception; during training a torch Inception (the
2015-12-05 weights) gives a close estimate. Those weights cannot be downloaded on every machine, so
any network can be plugged in: torch-fidelity's Inception, a local TorchScript file, or any
`nn.Module`. Every extractor takes the same images: uint8 (N, H, W, 3), the layout of ADM's `.npz`
batches and of PIL, or float (N, 3, H, W) in [0, 1], the layout of a pipeline's tensors.
"""

import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, List, Optional, Protocol, Tuple, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

ImageBatch = Union[np.ndarray, torch.Tensor]
ExtractorOutput = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]
PathLike = Union[str, os.PathLike]

TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + TORCH_FIDELITY_WEIGHTS
)
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".jit")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

_LOCAL_PATH_HINT = (
    f"FID needs torch-fidelity's Inception weights, the file `{TORCH_FIDELITY_WEIGHTS}` "
    f"({TORCH_FIDELITY_WEIGHTS_URL}). Without network access, copy that file here and pass its local "
    "path as `feature_extractor_path` (command line: `--inception_path`); a TorchScript feature "
    "network (.pt, .pth, .ts, .jit) is accepted there too."
)


class FeatureExtractor(Protocol):
    """Maps a batch of images to (N, D) features, or to a (features, logits) pair when the network
    also classifies (the Inception Score needs logits).

    Images are uint8 (N, H, W, 3) arrays or tensors, or float (N, 3, H, W) tensors in [0, 1].
    """

    def __call__(self, images: ImageBatch) -> ExtractorOutput: ...


def _as_tensor(images: ImageBatch) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        # PIL hands out read-only arrays, which torch refuses to share memory with.
        return torch.from_numpy(np.require(images, requirements="W"))
    return images


def to_unit_nchw(images: ImageBatch) -> torch.Tensor:
    """Float (N, 3, H, W) in [0, 1] from either accepted image layout.

    The layout follows the dtype, never a guess from the shape: uint8 is channels-last (files,
    ADM batches), floating point is channels-first (tensors from a pipeline).
    """
    images = _as_tensor(images)
    if images.dtype == torch.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 images must have shape (N, H, W, 3), got {tuple(images.shape)}")
        return images.permute(0, 3, 1, 2).float() / 255
    if images.is_floating_point():
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"float images must have shape (N, 3, H, W), got {tuple(images.shape)}")
        return images.float()
    raise ValueError(f"images must be uint8 (N, H, W, 3) or float (N, 3, H, W) in [0, 1], got dtype {images.dtype}")


class ModuleFeatureExtractor:
    """A `FeatureExtractor` around any `nn.Module`.

    Args:
        module (`nn.Module`): maps a float (N, 3, H, W) batch to features, or to (features, logits).
        input_size (`int`, *optional*, defaults to `None`): side to which images are resized
            (bilinear) before the module; `None` leaves their size alone.
        transform (`Callable`, *optional*, defaults to `None`): applied to the resized [0, 1] batch,
            to give the module the range it was trained on (e.g. `lambda x: 2 * x - 1`).
        device (`str` or `torch.device`, defaults to `"cpu"`): where the module runs.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        input_size: Optional[int] = None,
        transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        device: Union[str, torch.device] = "cpu",
    ):
        self.module = module.eval()
        self.input_size = input_size
        self.transform = transform
        self.to(device)

    def to(self, device: Union[str, torch.device]) -> "ModuleFeatureExtractor":
        self.device = torch.device(device)
        self.module.to(self.device)
        return self

    @torch.no_grad()
    def __call__(self, images: ImageBatch) -> ExtractorOutput:
        # Moved before the conversion so that uint8, not float, crosses to the device.
        pixel_values = to_unit_nchw(_as_tensor(images).to(self.device))  # (N, 3, H, W)
        size = (self.input_size, self.input_size)
        if self.input_size is not None and tuple(pixel_values.shape[-2:]) != size:
            pixel_values = F.interpolate(pixel_values, size=size, mode="bilinear", align_corners=False)
        if self.transform is not None:
            pixel_values = self.transform(pixel_values)
        return self.module(pixel_values)


class TorchScriptFeatureExtractor(ModuleFeatureExtractor):
    """A `FeatureExtractor` from a local TorchScript file (`torch.jit.load`), so that a feature
    network runs without its source code or a download. Inception networks take 299 x 299 inputs.
    """

    def __init__(
        self,
        path: PathLike,
        input_size: Optional[int] = 299,
        transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        device: Union[str, torch.device] = "cpu",
    ):
        module = torch.jit.load(str(_existing_file(path)), map_location=device)
        super().__init__(module, input_size=input_size, transform=transform, device=device)


def _existing_file(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature extractor file not found: {path}. {_LOCAL_PATH_HINT}")
    return path


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """torch-fidelity's Inception takes uint8 (N, 3, H, W) and resizes to 299 itself."""
    return (images * 255).round().clamp(0, 255).to(torch.uint8)


def torch_fidelity_inception(
    feature_extractor_path: Optional[PathLike] = None, device: Union[str, torch.device] = "cpu"
) -> ModuleFeatureExtractor:
    """torch-fidelity's Inception-v3 (TensorFlow's 2015-12-05 weights, as in the standard FID code),
    giving (2048-d pool features, 1008 unbiased logits) for FID and the Inception Score.

    Args:
        feature_extractor_path (`str`, *optional*): a local copy of `weights-inception-2015-12-05-6726825d.pth`;
            `None` downloads it (torch-fidelity caches it in the torch hub folder).
        device (`str` or `torch.device`, defaults to `"cpu"`): where the network runs.
    """
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except (ImportError, RuntimeError) as error:
        # RuntimeError: torch-fidelity imports torchvision, and a torchvision built for another torch
        # fails at import with "operator torchvision::nms does not exist".
        raise ImportError(
            f"torch-fidelity cannot be imported ({error}); install it with `pip install diffusers-afm[fid]`, "
            f"or pass a TorchScript feature network instead. {_LOCAL_PATH_HINT}"
        ) from error
    weights_path = None if feature_extractor_path is None else str(_existing_file(feature_extractor_path))
    try:
        network = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights_path
        )
    except (OSError, RuntimeError) as error:
        raise RuntimeError(f"the Inception weights could not be loaded ({error}). {_LOCAL_PATH_HINT}") from error
    return ModuleFeatureExtractor(network, input_size=None, transform=_to_uint8, device=device)


def _is_torchscript_archive(path: Path) -> bool:
    """TorchScript archives hold the module's code under `<archive>/code/`; `torch.save` state
    dicts (such as torch-fidelity's weights, which share the .pth suffix) hold none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())


def load_feature_extractor(
    spec: Union[str, PathLike],
    device: Union[str, torch.device] = "cpu",
    input_size: Optional[int] = 299,
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> FeatureExtractor:
    """Resolve a command-line feature extractor spec.

    - `"inception"`: torch-fidelity's Inception, downloading its weights.
    - a path ending in .pt/.pth/.ts/.jit: a TorchScript network (`input_size` and `transform`
      apply to it), or, if the file is a plain state dict, torch-fidelity's Inception with those
      weights.
    """
    if str(spec) == "inception":
        return torch_fidelity_inception(device=device)
    path = Path(spec)
    if path.suffix.lower() not in TORCHSCRIPT_SUFFIXES:
        raise ValueError(f"unknown feature extractor {str(spec)!r}: use 'inception' or a path ending in {TORCHSCRIPT_SUFFIXES}")
    if _is_torchscript_archive(_existing_file(path)):
        return TorchScriptFeatureExtractor(path, input_size=input_size, transform=transform, device=device)
    return torch_fidelity_inception(feature_extractor_path=path, device=device)


def _split_output(output: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(output, torch.Tensor):
        return output, None
    if isinstance(output, (tuple, list)) and len(output) == 2:
        return output[0], output[1]
    raise TypeError(f"a feature extractor must return features or (features, logits), got {type(output).__name__}")


def _stack(images: List[Any]) -> ImageBatch:
    return torch.stack(images) if isinstance(images[0], torch.Tensor) else np.stack(images)


def _batches(images: Union[ImageBatch, Iterable[Any]], batch_size: int) -> Iterator[ImageBatch]:
    """Batches from an (N, ...) array, or from an iterable of single images.

    Images of a folder may differ in size; consecutive images of one shape are stacked together
    and a new batch starts where the shape changes, so each batch can be resized as one tensor.
    """
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim != 4:
            raise ValueError(f"an image array must be 4-D (N, ...), got shape {tuple(images.shape)}")
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size]
        return
    pending: List[Any] = []
    for image in images:
        if pending and (len(pending) == batch_size or image.shape != pending[0].shape):
            yield _stack(pending)
            pending = []
        pending.append(image)
    if pending:
        yield _stack(pending)


def compute_features(
    extractor: FeatureExtractor,
    images: Union[ImageBatch, Iterable[Any]],
    batch_size: int = 64,
    device: Optional[Union[str, torch.device]] = None,
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Run `extractor` over `images` in batches: float64 (N, D) features, and (N, C) logits when the
    extractor gives them (the Inception Score needs them), else None, in one pass.

    Args:
        images: an array or tensor of images, or an iterable of single images (uint8 (H, W, 3) or
            float (3, H, W)), such as `images_from_folder`.
        device (*optional*): where to run; the extractor is moved there if it has a `.to` method
            and each batch is sent there before the extractor sees it.
    """
    if device is not None and hasattr(extractor, "to"):
        extractor.to(device)
    features, logits = [], []
    for batch in _batches(images, batch_size):
        if device is not None:
            batch = _as_tensor(batch).to(device)
        batch_features, batch_logits = _split_output(extractor(batch))
        # Pooling layers often keep (N, D, 1, 1); the metrics want (N, D).
        features.append(batch_features.flatten(1).double().cpu().numpy())
        if batch_logits is not None:
            logits.append(batch_logits.flatten(1).double().cpu().numpy())
    if not features:
        raise ValueError("`images` holds no images")
    return np.concatenate(features), np.concatenate(logits) if len(logits) == len(features) else None


def _rgb_array(image: Any) -> Any:
    """PIL images (a folder, a `datasets.Image` column) become uint8 (H, W, 3), grey or RGBA alike."""
    return np.asarray(image.convert("RGB")) if isinstance(image, PIL.Image.Image) else image


def images_from_folder(path: PathLike) -> Iterator[np.ndarray]:
    """uint8 (H, W, 3) arrays of the .png/.jpg/.jpeg/.webp files under `path` (subfolders too, such
    as the class folders of an ImageFolder), in sorted path order so runs are reproducible."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = sorted(file for file in root.rglob("*") if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file())
    if not files:
        raise ValueError(f"no {'/'.join(IMAGE_SUFFIXES)} images under {root}")
    for file in files:
        with PIL.Image.open(file) as image:
            yield _rgb_array(image)


def images_from_dataset(dataset: Any, image_column: str = "image") -> Iterator[Any]:
    """The images of a `datasets.Dataset` (or `IterableDataset`) column: PIL images, as a
    `datasets.Image` feature decodes them, become uint8 (H, W, 3); uint8 arrays pass through."""
    if dataset.column_names is not None and image_column not in dataset.column_names:
        raise ValueError(f"`image_column` {image_column!r} is not a column of the dataset ({dataset.column_names})")
    # Selecting the column first spares decoding the other columns of every row.
    for row in dataset.select_columns([image_column]):
        yield _rgb_array(row[image_column])
