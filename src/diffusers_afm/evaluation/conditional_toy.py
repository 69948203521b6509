"""Class-conditional low-dimensional data sets with exact densities, and per-class metrics.

They are the small problems of the Continuous-AFM evidence (docs/cafm.md, "Evidence: where CAFM
helps"): a class-conditional flow model whose classes bleed into each other samples worse without
classifier-free guidance than with it, and the per-class distances below measure by how much.

- `ConditionalMixture`: K classes, each a `GaussianMixture` (so every class density is known in
  closed form); `sample` draws points and labels, `sample_class` one class, `log_likelihoods` gives
  `log p(x | c)` for every class and `bayes_labels` the Bayes-optimal class of each point.
- `interleaved_grid`: Gaussian blobs on a square grid, the classes interleaved so that each blob's
  neighbours belong to other classes.
- `spiral_arms`: classes along interleaved spiral arms (many small Gaussians along a curve), a
  geometry unlike the grid's blobs.
- `gaussian_classes`: many anisotropic Gaussian classes in more dimensions (`ConditionalGaussians`),
  whose exact per-class means and covariances give a per-class Fréchet distance to the truth (the
  per-class analogue of FID), with no mode weights for guidance to distort.
- `class_conditional_metrics`: for samples drawn per class, the exact W2 to fresh data of the same
  class (`wasserstein2`), the Fréchet distance to the class's true statistics where known, their
  noise floors, and the share of samples whose Bayes-optimal class is the
  class they were drawn for (a classifier accuracy with a perfect classifier).
"""

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .metrics import feature_statistics, frechet_distance
from .toy import ArrayLike, GaussianMixture, _as_points, wasserstein2


@dataclass(frozen=True)
class ConditionalMixture:
    """`classes[c]` is the distribution of class c; classes are equally likely."""

    classes: Tuple[GaussianMixture, ...]

    def __post_init__(self):
        if len(self.classes) < 2:
            raise ValueError(f"a class-conditional set needs at least two classes, got {len(self.classes)}")
        dims = {c.dim for c in self.classes}
        if len(dims) != 1:
            raise ValueError(f"every class must have the same dimension, got {sorted(dims)}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def dim(self) -> int:
        return self.classes[0].dim

    def sample_class(self, label: int, num_samples: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.classes[label].sample(num_samples, generator)

    @property
    def is_gaussian(self) -> bool:
        """Every class is one Gaussian (`grid_blobs`): its exact statistics and flow are known."""
        return all(len(c.means) == 1 for c in self.classes)

    def gaussian_statistics(self, label: int) -> Tuple[np.ndarray, np.ndarray]:
        """Mean and covariance of class `label` when it is one Gaussian (see `is_gaussian`)."""
        mixture = self.classes[label]
        if len(mixture.means) != 1:
            raise ValueError(f"class {label} is a mixture of {len(mixture.means)} Gaussians, not one")
        return np.asarray(mixture.means[0], dtype=np.float64), mixture.stds[0] ** 2 * np.eye(self.dim)

    def sample(self, num_samples: int, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """`num_samples` points with uniformly drawn labels: `(x (N, D), labels (N,))`."""
        labels = torch.randint(0, self.num_classes, (num_samples,), generator=generator)
        points = torch.empty(num_samples, self.dim)
        for label in range(self.num_classes):
            index = (labels == label).nonzero()[:, 0]
            if len(index):
                points[index] = self.sample_class(label, len(index), generator)
        return points, labels

    def log_likelihoods(self, points: ArrayLike) -> np.ndarray:
        """`log p(x | c)` for every point and class, (N, K), in float64."""
        x = _as_points(points, "points")
        out = np.empty((x.shape[0], self.num_classes))
        for label, mixture in enumerate(self.classes):
            means = np.asarray(mixture.means, dtype=np.float64)  # (M, D)
            stds = np.asarray(mixture.stds, dtype=np.float64)  # (M,)
            log_weights = np.log(np.asarray(mixture.weights, dtype=np.float64))
            squared = ((x[:, None, :] - means[None]) ** 2).sum(axis=2)  # (N, M)
            log_components = (log_weights - x.shape[1] * (np.log(stds) + 0.5 * math.log(2 * math.pi))
                              - 0.5 * squared / stds ** 2)
            peak = log_components.max(axis=1, keepdims=True)
            out[:, label] = peak[:, 0] + np.log(np.exp(log_components - peak).sum(axis=1))
        return out

    def bayes_labels(self, points: ArrayLike) -> np.ndarray:
        """The most likely class of each point (equal class priors)."""
        return self.log_likelihoods(points).argmax(axis=1)


def _mixture(means: Sequence[Sequence[float]], std: float) -> GaussianMixture:
    means = tuple(tuple(float(v) for v in m) for m in means)
    return GaussianMixture(weights=(1.0 / len(means),) * len(means), means=means, stds=(std,) * len(means))


def interleaved_grid(size: int = 4, num_classes: int = 4, spacing: float = 1.0, std: float = 0.18) -> ConditionalMixture:
    """`size x size` Gaussian blobs (spacing `spacing`, std `std`) centred on the origin; with 4
    classes the blob in row r, column c belongs to class `2 (r mod 2) + (c mod 2)`, so its four
    nearest neighbours are of other classes; with 2 classes, `(r + c) mod 2` (a checkerboard)."""
    if num_classes not in (2, 4):
        raise ValueError(f"`num_classes` must be 2 or 4, got {num_classes}")
    offset = (size - 1) / 2
    members = [[] for _ in range(num_classes)]
    for row in range(size):
        for column in range(size):
            label = (row + column) % 2 if num_classes == 2 else 2 * (row % 2) + column % 2
            members[label].append(((column - offset) * spacing, (row - offset) * spacing))
    return ConditionalMixture(tuple(_mixture(m, std) for m in members))


def grid_blobs(size: int = 4, spacing: float = 1.0, std: float = 0.25) -> ConditionalMixture:
    """`size x size` classes, each ONE Gaussian blob (std `std`) on a square grid of `spacing`:
    many classes whose neighbours overlap, as in a many-class image set."""
    offset = (size - 1) / 2
    return ConditionalMixture(tuple(_mixture([((column - offset) * spacing, (row - offset) * spacing)], std)
                                    for row in range(size) for column in range(size)))


def spiral_arms(num_classes: int = 3, turns: float = 1.0, radius: float = 2.2, points_per_arm: int = 48,
                std: float = 0.12) -> ConditionalMixture:
    """`num_classes` interleaved spiral arms from near the origin out to `radius`; class c is a chain
    of `points_per_arm` small Gaussians (std `std`) along arm c, rotated by `2 pi c / num_classes`."""
    arms = []
    for label in range(num_classes):
        phase = 2 * math.pi * label / num_classes
        means = []
        for i in range(points_per_arm):
            s = 0.15 + 0.85 * i / (points_per_arm - 1)  # from near the centre to the rim
            angle = phase + 2 * math.pi * turns * s
            means.append((radius * s * math.cos(angle), radius * s * math.sin(angle)))
        arms.append(_mixture(means, std))
    return ConditionalMixture(tuple(arms))


def gaussian_conditional_velocity(mean: torch.Tensor, covariance: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                                  ) -> torch.Tensor:
    """The flow-matching target `u(x_t, t) = E[z - x0 | x_t]` for `x0 ~ N(mean, covariance)`,
    `z ~ N(0, I)`, `x_t = (1 - t) x0 + t z` (t > 0): `(x_t - E[x0 | x_t]) / t` with
    `E[x0 | x_t] = mean + (1 - t) S A^-1 (x_t - (1 - t) mean)`, `A = (1 - t)^2 S + t^2 I`.
    `mean` (D,) or (N, D), `covariance` (D, D) or (N, D, D), `x_t` (N, D), `t` (N,)."""
    x_t, t = x_t.double(), t.double()
    mean = mean.double().expand_as(x_t)
    covariance = covariance.double().expand(x_t.shape[0], x_t.shape[1], x_t.shape[1])
    eye = torch.eye(x_t.shape[1], dtype=torch.float64)
    a = (1 - t)[:, None, None] ** 2 * covariance + t[:, None, None] ** 2 * eye
    shift = torch.linalg.solve(a, (x_t - (1 - t)[:, None] * mean)[..., None])[..., 0]
    posterior_mean = mean + (1 - t)[:, None] * torch.einsum("nij,nj->ni", covariance, shift)
    return (x_t - posterior_mean) / t[:, None]


def velocity_error_snr(covariance: torch.Tensor, t: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """`m = e^T Sigma^-1 e` per sample: the size of a model's velocity error `e = u - v` against the
    spread of the true velocities, `Sigma = Cov(z - x0 | x_t) = S ((1 - t)^2 S + t^2 I)^-1`, whose
    inverse is `(1 - t)^2 I + t^2 S^-1` (Gaussian `x0 ~ N(., S)`).

    It bounds what a CAFM discriminator can see: at one point, the least D loss over the derivative's
    values is `4 / (2 + m)` (2 when the model is exact), so `loss_d` near 2.0 means `m` near 0.
    """
    error, t = error.double(), t.double()
    covariance = covariance.double().expand(error.shape[0], error.shape[1], error.shape[1])
    inverse_s_error = torch.linalg.solve(covariance, error[..., None])[..., 0]
    return (1 - t) ** 2 * error.square().sum(1) + t ** 2 * (error * inverse_s_error).sum(1)


class ConditionalGaussians:
    """K classes in D dimensions, class c one Gaussian `N(means[c], factors[c] factors[c]^T)`.

    `gaussian_classes` makes them with random means and random rotations of one decaying spectrum
    of standard deviations (a few strong directions, many weak ones, as image features have), so
    a class's exact mean and covariance are known and `class_statistics` gives them: the per-class
    Fréchet distance of `class_conditional_metrics` is then measured against the truth.
    """

    def __init__(self, means: ArrayLike, factors: ArrayLike):
        self.means = torch.as_tensor(np.asarray(means), dtype=torch.float64)
        self.factors = torch.as_tensor(np.asarray(factors), dtype=torch.float64)
        if self.means.ndim != 2 or self.factors.shape != (*self.means.shape, self.means.shape[1]):
            raise ValueError(f"`means` must be (K, D) and `factors` (K, D, D), got {tuple(self.means.shape)} and "
                             f"{tuple(self.factors.shape)}")

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    is_gaussian = True

    def class_statistics(self, label: int) -> Tuple[np.ndarray, np.ndarray]:
        factor = self.factors[label].numpy()
        return self.means[label].numpy(), factor @ factor.T

    gaussian_statistics = class_statistics

    def sample_class(self, label: int, num_samples: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        eps = torch.randn(num_samples, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[label] + eps @ self.factors[label].T).float()

    def sample(self, num_samples: int, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, self.num_classes, (num_samples,), generator=generator)
        eps = torch.randn(num_samples, self.dim, generator=generator, dtype=torch.float64)
        points = self.means[labels] + torch.einsum("nij,nj->ni", self.factors[labels], eps)
        return points.float(), labels

    def log_likelihoods(self, points: ArrayLike) -> np.ndarray:
        x = torch.as_tensor(_as_points(points, "points"))
        out = np.empty((x.shape[0], self.num_classes))
        for label in range(self.num_classes):
            factor = self.factors[label]
            white = torch.linalg.solve_triangular(torch.linalg.cholesky(factor @ factor.T), (x - self.means[label]).T,
                                                  upper=False)
            log_det = 2 * torch.log(torch.diagonal(torch.linalg.cholesky(factor @ factor.T))).sum()
            out[:, label] = (-0.5 * white.square().sum(0) - 0.5 * log_det - 0.5 * self.dim * math.log(2 * math.pi)).numpy()
        return out

    def bayes_labels(self, points: ArrayLike) -> np.ndarray:
        return self.log_likelihoods(points).argmax(axis=1)


def gaussian_classes(dim: int = 8, num_classes: int = 16, mean_scale: float = 0.35, top_std: float = 0.6,
                     bottom_std: float = 0.05, seed: int = 0) -> ConditionalGaussians:
    """`num_classes` Gaussians in `dim` dimensions: means drawn from N(0, mean_scale^2 I), each
    covariance a random rotation of standard deviations decaying geometrically from `top_std` to
    `bottom_std` (fixed by `seed`, so the problem is the same on every machine)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, mean_scale, size=(num_classes, dim))
    stds = np.geomspace(top_std, bottom_std, dim)
    factors = []
    for _ in range(num_classes):
        rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
        factors.append(rotation * stds[None, :])
    return ConditionalGaussians(means, np.stack(factors))


CONDITIONAL_TOY_DATASETS = {"grid": interleaved_grid, "blobs": grid_blobs, "spirals": spiral_arms, "gaussians": gaussian_classes}


def load_conditional_toy(name: str) -> ConditionalMixture:
    if name not in CONDITIONAL_TOY_DATASETS:
        raise ValueError(f"unknown class-conditional toy {name!r}: use one of {sorted(CONDITIONAL_TOY_DATASETS)}")
    return CONDITIONAL_TOY_DATASETS[name]()


def class_conditional_metrics(dataset: ConditionalMixture, samples: Mapping[int, ArrayLike],
                              reference: Mapping[int, ArrayLike], floor_reference: Optional[Mapping[int, ArrayLike]] = None
                              ) -> Dict[str, float]:
    """Per-class quality of `samples[c]` (drawn for class c) against `reference[c]` (fresh data of
    class c, the same size).

    Returns `w2_<c>` (exact W2), `w2_mean` (their mean over classes), `accuracy` (the share of all
    samples whose Bayes-optimal class is the class they were drawn for) and `error_rate` (1 - it,
    a lower-is-better form) and, when
    `floor_reference` is given (a second independent data set per class), `w2_floor_mean` and
    `accuracy_floor`: what a perfect sampler scores.
    """
    metrics, hits, total = {}, 0, 0
    exact = hasattr(dataset, "class_statistics")
    for label in range(dataset.num_classes):
        metrics[f"w2_{label}"] = wasserstein2(samples[label], reference[label])
        if exact:
            metrics[f"frechet_{label}"] = frechet_distance(*feature_statistics(_as_points(samples[label], "samples")),
                                                           *dataset.class_statistics(label))
        predicted = dataset.bayes_labels(samples[label])
        hits += int((predicted == label).sum())
        total += len(predicted)
    metrics["w2_mean"] = float(np.mean([metrics[f"w2_{c}"] for c in range(dataset.num_classes)]))
    if exact:
        metrics["frechet_mean"] = float(np.mean([metrics[f"frechet_{c}"] for c in range(dataset.num_classes)]))
    metrics["accuracy"] = hits / total
    metrics["error_rate"] = 1.0 - metrics["accuracy"]
    if floor_reference is not None:
        floors = [wasserstein2(floor_reference[c], reference[c]) for c in range(dataset.num_classes)]
        metrics["w2_floor_mean"] = float(np.mean(floors))
        if exact:
            metrics["frechet_floor_mean"] = float(np.mean([
                frechet_distance(*feature_statistics(_as_points(floor_reference[c], "floor")), *dataset.class_statistics(c))
                for c in range(dataset.num_classes)]))
        hits = sum(int((dataset.bayes_labels(floor_reference[c]) == c).sum()) for c in range(dataset.num_classes))
        metrics["accuracy_floor"] = hits / sum(len(floor_reference[c]) for c in range(dataset.num_classes))
    return metrics


def gap_closed(unguided_before: float, guided_before: float, unguided_after: float) -> float:
    """The share of the unguided-to-guided gap (in a distance: lower is better) that a change closes:
    `(before - after) / (before - guided)`; 1 means the unguided model now scores as the guided one
    did, a negative value that it got worse. NaN when guidance did not help (no gap)."""
    gap = unguided_before - guided_before
    if gap <= 0:
        return float("nan")
    return (unguided_before - unguided_after) / gap
