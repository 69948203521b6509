"""Sampling for evaluation at scale (docs/method.md, "Evaluation protocol": FID-50K, 50 samples per class).

Sample `i` is a function of its index alone: its class label is `class_labels[i % len(class_labels)]`
and its noise comes from a CPU generator seeded with `sample_seed(seed, i)`. The work is cut into
fixed global batches of consecutive indices (batch `k` holds `k * batch_size ...`), handed out to
processes round robin, so every image is computed in the same batch whatever the number of
processes or interruptions: the output is byte-identical (for one `batch_size`, dtype and
device type; the network's float round-off can depend on what else is in the batch).

The `.npz` files are in the layout of the ADM evaluation suite: `arr_0`, uint8 (N, H, W, 3), plus
`labels`, int64 (N,). They are written as a stream, so 50,000 images at 256 px (9.8 GB) never need
to sit in memory.
"""

import itertools
import os
import zipfile
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..utils import FlagValueError, RunStopped, atomic_file

PathLike = Union[str, os.PathLike]


def sample_seed(seed: int, index: int) -> int:
    """The noise seed of sample `index`: a hash of (seed, index), so that runs with different base
    seeds never share a sample's noise (a `seed * K + index` rule would, once index reaches K)."""
    if seed < 0 or index < 0:
        raise ValueError(f"`seed` and `index` must be >= 0, got {seed} and {index}.")
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & (2**63 - 1)


def sample_class_labels(
    indices: Iterable[int], num_classes: Optional[int] = None, class_labels: Optional[Sequence[int]] = None
) -> List[int]:
    """Class of each sample: `i % num_classes`, or `class_labels[i % len(class_labels)]`.

    Cycling through the classes keeps every prefix balanced: N = 50 x 1000 gives 50 per class, and a
    smaller evaluation during training still covers the classes evenly.
    """
    if class_labels is None:
        if num_classes is None or num_classes < 1:
            raise ValueError("pass `num_classes` (>= 1) or a list of `class_labels`.")
        return [int(i) % num_classes for i in indices]
    if len(class_labels) == 0:
        raise ValueError("`class_labels` is empty.")
    return [int(class_labels[int(i) % len(class_labels)]) for i in indices]


def parse_class_labels(value: str) -> List[int]:
    """`--class_labels`: comma-separated class ids, the list that `sample_class_labels` cycles through."""
    try:
        labels = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise FlagValueError(f"--class_labels must be comma-separated integers, got {value!r}") from None
    if not labels:
        raise FlagValueError("--class_labels is empty")
    return labels


def plan_batches(num_samples: int, batch_size: int, process_index: int = 0, num_processes: int = 1) -> List[range]:
    """The global batches of indices this process computes: batch k = [k * batch_size, ...) for
    every k with k % num_processes == process_index."""
    if num_samples < 0 or batch_size < 1:
        raise ValueError(f"need `num_samples` >= 0 and `batch_size` >= 1, got {num_samples} and {batch_size}.")
    if not 0 <= process_index < num_processes:
        raise ValueError(f"`process_index` {process_index} is not in [0, {num_processes}).")
    starts = range(process_index * batch_size, num_samples, num_processes * batch_size)
    return [range(start, min(start + batch_size, num_samples)) for start in starts]


def pipeline_fingerprint(folder: PathLike) -> str:
    """SHA-256 of what `from_pretrained` reads from a pipeline folder: `model_index.json` and every
    file of the components it names (weights and configs), by relative path.

    Samples are tied to this, not to the folder's name: a folder whose weights were replaced (another
    run exported into it, a new download) gives another fingerprint."""
    import hashlib
    import json

    folder = os.fspath(folder)
    index = os.path.join(folder, "model_index.json")
    with open(index) as f:
        components = sorted(k for k, v in json.load(f).items()
                            if not k.startswith("_") and isinstance(v, list) and v and v[0] is not None)
    files = ["model_index.json"] + sorted(
        os.path.relpath(os.path.join(root, name), folder)
        for component in components for root, _, names in os.walk(os.path.join(folder, component)) for name in names
        if not name.startswith("."))
    digest = hashlib.sha256()
    for rel in files:
        digest.update(rel.encode() + b"\0")
        with open(os.path.join(folder, rel), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def to_uint8_rgb(images: np.ndarray) -> np.ndarray:
    """float (N, H, W, C) in [0, 1] -> uint8 (N, H, W, 3), rounded as PIL images from a pipeline are;
    grey images (C = 1) are repeated to three channels, as the Inception network expects RGB."""
    images = (images * 255).round().astype(np.uint8)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if images.shape[-1] != 3:
        raise ValueError(f"images must have 1 or 3 channels, got shape {images.shape}.")
    return images


def generate_images(
    pipeline,
    indices: Sequence[int],
    class_labels: Sequence[int],
    seed: int = 0,
    num_inference_steps: Optional[int] = None,
) -> np.ndarray:
    """uint8 (N, H, W, 3) images of the samples `indices`, with their fixed noise and `class_labels`.

    The noise of each sample is drawn from its own CPU generator, so it is the same on every device.
    """
    if len(indices) != len(class_labels):
        raise ValueError(f"got {len(indices)} indices for {len(class_labels)} class labels.")
    generators = [torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in indices]
    images = pipeline(
        class_labels=[int(c) for c in class_labels],
        num_inference_steps=num_inference_steps,
        generator=generators,
        output_type="np",
    ).images
    if not np.isfinite(images).all():
        # NaN would become 0 in uint8: black images that an FID run would then score.
        bad = [int(indices[k]) for k in range(len(images)) if not np.isfinite(images[k]).all()]
        raise RunStopped(f"samples {bad[:5]}{' ...' if len(bad) > 5 else ''} are not finite (NaN or Inf): the model's "
                         "output overflowed (try --dtype float32) or its weights are damaged; nothing was written for them")
    return to_uint8_rgb(images)


# ----------------------------------------------------------------------------- .npz in the ADM layout
def _npy_header(shape: Tuple[int, ...], dtype: np.dtype) -> dict:
    return {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}


def write_samples_npz(path: PathLike, image_batches: Iterable[np.ndarray], labels: np.ndarray) -> None:
    """Write `arr_0` (uint8 (N, H, W, 3), streamed from `image_batches`) and `labels` to an `.npz`.

    The file appears at `path` only once complete (written beside it, then renamed).
    """
    labels = np.asarray(labels, dtype=np.int64)
    batches = iter(image_batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("no images to write")
    shape = (labels.shape[0],) + tuple(first.shape[1:])
    written = 0
    with atomic_file(str(path)) as file:
        with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, _npy_header(shape, np.uint8))
                for batch in itertools.chain([first], batches):
                    if batch.dtype != np.uint8 or tuple(batch.shape[1:]) != shape[1:]:
                        raise ValueError(f"image batches must be uint8 {shape[1:]}, got {batch.dtype} {batch.shape[1:]}")
                    member.write(np.ascontiguousarray(batch).tobytes())
                    written += batch.shape[0]
            if written != shape[0]:
                raise ValueError(f"wrote {written} images for {shape[0]} labels")
            with archive.open("labels.npy", "w") as member:
                np.lib.format.write_array(member, labels)


def iter_npz_images(path: PathLike, batch_size: int = 256, key: str = "arr_0") -> Iterator[np.ndarray]:
    """Batches of `key` from an `.npz` (an ADM sample or reference batch), read as a stream."""
    with zipfile.ZipFile(path) as archive:
        names = [name[: -len(".npy")] for name in archive.namelist()]
        if key not in names:
            raise ValueError(f"{path} has no array {key!r} (it holds {names}).")
        with archive.open(f"{key}.npy") as member:
            version = np.lib.format.read_magic(member)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(member)
            if fortran_order or len(shape) != 4:
                raise ValueError(f"{path}: `{key}` must be a C-ordered (N, H, W, C) array, got shape {shape}.")
            row = int(np.prod(shape[1:])) * dtype.itemsize
            for start in range(0, shape[0], batch_size):
                count = min(batch_size, shape[0] - start)
                data = member.read(count * row)
                yield np.frombuffer(data, dtype=dtype).reshape((count,) + tuple(shape[1:]))


def read_npz_labels(path: PathLike) -> Optional[np.ndarray]:
    """The `labels` of a samples `.npz`, or None if it has none (a reference batch)."""
    with np.load(path) as data:
        return data["labels"] if "labels" in data.files else None
