"""FID, Inception Score, precision and recall of a pipeline or of a set of images against a reference
(docs/method.md, "Evaluation protocol").

`evaluate_pipeline` is what the trainer calls every `--eval_steps` and what `examples/evaluate_afm.py`
calls for `--pipeline`; `evaluate_images` serves folders and `.npz` files. Both give the same
numbers for the same images: a pipeline's samples are rounded to uint8 exactly as saved PNGs are.
What they compare against is a `ReferenceStatistics`, from `load_reference`.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np

from ..utils import atomic_file
from .features import FeatureExtractor, compute_features, images_from_dataset, images_from_folder
from .metrics import _check_statistics, feature_statistics, frechet_distance, inception_score, precision_recall
from .sampling import generate_images, iter_npz_images, plan_batches, sample_class_labels

PathLike = Union[str, os.PathLike]


def _npz_images(path: PathLike, batch_size: int) -> Iterator[np.ndarray]:
    """The single images of an `.npz`'s `arr_0`, read as a stream: an ADM batch of 50,000 images
    need not fit in memory."""
    for batch in iter_npz_images(path, batch_size):
        yield from batch


@dataclass
class ReferenceStatistics:
    """What the metrics compare against: feature mean and covariance (FID) and, when the reference
    images were available, their features (precision and recall need them).

    Build one with `load_reference`, or with the constructor for its source: `from_npz`,
    `from_folder`, `from_dataset`, `from_features`.
    """

    mu: np.ndarray
    sigma: np.ndarray
    features: Optional[np.ndarray] = None
    source: str = ""

    @classmethod
    def from_features(cls, features: np.ndarray, source: str = "") -> "ReferenceStatistics":
        mu, sigma = feature_statistics(features)
        return cls(mu, sigma, features, source)

    @classmethod
    def from_folder(cls, path: PathLike, extractor: FeatureExtractor, batch_size: int = 64) -> "ReferenceStatistics":
        """The `extractor` features of the images under `path` (subfolders too)."""
        features, _ = compute_features(extractor, images_from_folder(path), batch_size=batch_size)
        return cls.from_features(features, str(path))

    @classmethod
    def from_dataset(
        cls, dataset: Any, extractor: FeatureExtractor, image_column: str = "image", batch_size: int = 64
    ) -> "ReferenceStatistics":
        """The `extractor` features of a `datasets.Dataset` (or `IterableDataset`) column of images."""
        features, _ = compute_features(extractor, images_from_dataset(dataset, image_column), batch_size=batch_size)
        return cls.from_features(features, f"{type(dataset).__name__}[{image_column!r}]")

    @classmethod
    def from_npz(
        cls,
        path: PathLike,
        extractor: Optional[FeatureExtractor] = None,
        recompute: bool = False,
        with_features: bool = True,
        batch_size: int = 64,
    ) -> "ReferenceStatistics":
        """An `.npz` holding `mu`/`sigma` (ADM's reference batches, or a file written by `save`),
        stored `features`, and/or the images `arr_0` (uint8 (N, H, W, 3)).

        Stored `mu`/`sigma` are used unless `recompute`: ADM's come from its TensorFlow Inception, so
        recompute them when `extractor` is another network. With `with_features`, the images'
        features are computed (or read) so that precision and recall can be reported; that costs
        one feature pass over them (10,000 for ADM's ImageNet 256 batch).
        """
        path = Path(path)
        with np.load(path) as data:
            keys = set(data.files)
            stored = {} if recompute else {key: data[key].astype(np.float64) for key in ("mu", "sigma", "features") if key in keys}
        has_stats = {"mu", "sigma"} <= set(stored)
        features = stored.get("features")
        if features is None and (with_features or not has_stats):
            if "arr_0" in keys:
                if extractor is None:
                    raise ValueError(f"computing the features of {path}'s images needs a feature `extractor`.")
                features, _ = compute_features(extractor, _npz_images(path, batch_size), batch_size=batch_size)
            elif not has_stats:
                raise ValueError(f"{path} holds neither `mu`/`sigma` nor the images `arr_0` to compute them (keys: {sorted(keys)}).")
        if has_stats:
            # Without features (a statistics-only file), FID works; precision and recall are left out.
            return cls(stored["mu"], stored["sigma"], features, str(path))
        return cls.from_features(features, str(path))

    def save(self, path: PathLike) -> None:
        """An `.npz` with `mu`, `sigma` (and `features`), that `from_npz` reads back; written
        atomically, so an interrupted run never leaves a truncated file that later loads as garbage."""
        mu, sigma = _check_statistics(self.mu, self.sigma, "mu", "sigma")
        arrays = {"mu": mu, "sigma": sigma}
        if self.features is not None:
            arrays["features"] = self.features
        with atomic_file(str(path)) as file:
            np.savez(file, **arrays)


def load_reference(
    reference: Union[PathLike, Any],
    extractor: Optional[FeatureExtractor] = None,
    recompute: bool = False,
    with_features: bool = True,
    batch_size: int = 64,
    image_column: str = "image",
) -> ReferenceStatistics:
    """Reference statistics from a folder of images, an `.npz` (see `ReferenceStatistics.from_npz`
    for `recompute` and `with_features`) or a `datasets.Dataset` (its `image_column`)."""
    is_path = isinstance(reference, (str, os.PathLike))
    if is_path and Path(reference).is_file():
        return ReferenceStatistics.from_npz(reference, extractor, recompute, with_features, batch_size)
    if is_path and not Path(reference).is_dir():
        raise FileNotFoundError(f"reference not found: {reference} (expected a folder of images or an .npz).")
    if extractor is None:
        raise ValueError(f"a reference of images ({reference}) needs a feature `extractor`.")
    if is_path:
        return ReferenceStatistics.from_folder(reference, extractor, batch_size)
    return ReferenceStatistics.from_dataset(reference, extractor, image_column, batch_size)


def compute_metrics(
    features: np.ndarray,
    reference: ReferenceStatistics,
    logits: Optional[np.ndarray] = None,
    inception_splits: int = 10,
    k: int = 3,
) -> Dict[str, float]:
    """`fid`; `inception_score` and `inception_score_std` when `logits` are given; `precision` and
    `recall` when the reference has features; `num_samples`."""
    if features.shape[1] != reference.mu.shape[0]:
        raise ValueError(
            f"the feature extractor gives {features.shape[1]}-d features but the reference statistics "
            f"({reference.source}) are {reference.mu.shape[0]}-d: they come from another network. Recompute "
            "them with this extractor (`recompute=True`; command line: `--recompute_reference_stats`)."
        )
    mu, sigma = feature_statistics(features)
    results = {"num_samples": int(features.shape[0]), "fid": frechet_distance(mu, sigma, reference.mu, reference.sigma)}
    if logits is not None:
        score, std = inception_score(logits, splits=min(inception_splits, logits.shape[0]))
        results.update(inception_score=score, inception_score_std=std)
    if reference.features is not None:
        if reference.features.shape[0] > k and features.shape[0] > k:
            results["precision"], results["recall"] = precision_recall(reference.features, features, k=k)
    return results


def evaluate_images(
    images: Union[np.ndarray, Iterable[np.ndarray], PathLike],
    reference: ReferenceStatistics,
    extractor: FeatureExtractor,
    batch_size: int = 64,
    inception_splits: int = 10,
) -> Dict[str, float]:
    """Metrics of images: an array, an iterable of single images, a folder or an `.npz` (`arr_0`)."""
    if isinstance(images, (str, os.PathLike)):
        path = Path(images)
        if path.is_dir():
            images = images_from_folder(path)
        elif path.suffix == ".npz":
            images = _npz_images(path, batch_size)
        else:
            raise FileNotFoundError(f"no folder or .npz at {path}.")
    features, logits = compute_features(extractor, images, batch_size)
    return compute_metrics(features, reference, logits, inception_splits)


def evaluate_pipeline(
    pipeline,
    reference: Optional[ReferenceStatistics],
    extractor: FeatureExtractor,
    num_samples: int,
    batch_size: int = 64,
    seed: int = 0,
    class_labels: Optional[Sequence[int]] = None,
    num_inference_steps: Optional[int] = None,
    accelerator=None,
    inception_splits: int = 10,
    progress: bool = False,
) -> Optional[Dict[str, float]]:
    """Sample `num_samples` images (sample i: class `i % num_classes`, or from `class_labels`, and the
    fixed noise of `sample_seed(seed, i)`) and compute their metrics against `reference`.

    Under several processes pass the `accelerator` and call this on every process: each samples its
    share of the batches; features are gathered and sorted by sample index, so the numbers do not
    depend on the number of processes. Metrics are computed on the main process, which returns
    them; the others return None and may pass `reference=None`.
    """
    process_index = accelerator.process_index if accelerator is not None else 0
    num_processes = accelerator.num_processes if accelerator is not None else 1
    is_main = process_index == 0
    if is_main and reference is None:
        raise ValueError("the main process needs the `reference` statistics.")
    num_classes = pipeline.transformer.config.num_classes
    batches = plan_batches(num_samples, batch_size, process_index, num_processes)
    if progress and is_main:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="evaluating", unit="batch")
    parts: List[Any] = []
    for indices in batches:
        labels = sample_class_labels(indices, num_classes, class_labels)
        images = generate_images(pipeline, list(indices), labels, seed, num_inference_steps)
        features, logits = compute_features(extractor, images, batch_size)
        parts.append((indices.start, features, logits))
    if num_processes > 1:
        from accelerate.utils import gather_object

        parts = gather_object(parts)
    if not is_main:
        return None
    parts.sort(key=lambda part: part[0])
    features = np.concatenate([part[1] for part in parts])
    logits = None if parts[0][2] is None else np.concatenate([part[2] for part in parts])
    return compute_metrics(features, reference, logits, inception_splits)


METRIC_NAMES = {
    "fid": "FID",
    "inception_score": "Inception Score",
    "inception_score_std": "IS std",
    "precision": "Precision",
    "recall": "Recall",
    "num_samples": "Samples",
}


def format_table(results: Dict[str, Any]) -> str:
    """A markdown table of the metrics, one row each."""
    lines = ["| metric | value |", "|---|---|"]
    for key, name in METRIC_NAMES.items():
        if key in results:
            value = results[key]
            lines.append(f"| {name} | {value if isinstance(value, int) else f'{value:.4f}'} |")
    return "\n".join(lines)


def save_results(path: PathLike, results: Dict[str, Any]) -> None:
    """The results as indented JSON, written atomically."""
    with atomic_file(str(path), "w") as file:
        json.dump(results, file, indent=2, sort_keys=True)
        file.write("\n")
