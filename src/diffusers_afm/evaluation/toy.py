"""Low-dimensional data sets and optimal-transport metrics of the toy experiments (examples/toy_afm.py).

docs/method.md's claim is that the OT term `||G(z) - z||^2` makes the generator learn the W2-optimal map
from the noise to the data. In a few dimensions that is measurable exactly:

- `wasserstein2(a, b)`: the exact W2 DISTANCE between two equal-size sample sets (POT's EMD). The
  generator's `w2_to_data` is compared with `w2_noise_floor`, the W2 between two data sets of the
  same size, which is what a perfect generator would score.
- `transport_cost(z, G(z)) = E||G(z) - z||^2` is a SQUARED distance, to compare with `ot_cost`, the
  exact W2^2 between the noise and the data (`wasserstein2(z, data) ** 2`; in 1-D
  `transport_cost(z, T(z))` with the exact quantile map `T`, the unique optimal map).
- `mode_coverage`: how many modes of a mixture hold at least half their share of the samples.

Every set is an (N, D) array or tensor. POT, scipy and scikit-learn come with the `evaluation`
extra; they are imported where used so that the rest of `diffusers_afm.evaluation` works without it.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]

# The 1-D quantile map of a mixture is found by bisection on its CDF; 60 halvings of the bracket
# reach float64 resolution.
BISECTION_STEPS = 60


def _as_points(points: ArrayLike, name: str) -> np.ndarray:
    """float64 (N, D) numpy copy; a 1-D array is read as N points in one dimension."""
    if isinstance(points, torch.Tensor):
        points = points.detach().cpu().double().numpy()
    points = np.asarray(points, dtype=np.float64)
    if points.ndim == 1:
        points = points[:, None]
    if points.ndim != 2:
        raise ValueError(f"`{name}` must have shape (N, D), got {points.shape}")
    if not np.all(np.isfinite(points)):
        raise ValueError(f"`{name}` contains NaN or infinite values")
    return points


def _check_same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"the two sets must have the same shape (N, D), got {a.shape} and {b.shape}")


# ---------------------------------------------------------------------------------------- metrics
def wasserstein2(a: ArrayLike, b: ArrayLike) -> float:
    """Exact W2 distance (not squared) between two equal-size sets with uniform weights.

    EMD on the squared-Euclidean cost matrix; in 1-D POT's sorted matching gives the same value
    without the N x N matrix, so 1-D sets can be much larger.
    """
    import ot

    a, b = _as_points(a, "a"), _as_points(b, "b")
    _check_same_shape(a, b)
    if a.shape[1] == 1:
        squared = ot.emd2_1d(a[:, 0], b[:, 0], metric="sqeuclidean")
    else:
        weights = np.full(a.shape[0], 1.0 / a.shape[0])
        # The network simplex needs more than POT's default 1e5 iterations beyond ~1000 points.
        squared = ot.emd2(weights, weights, ot.dist(a, b, metric="sqeuclidean"), numItermax=10_000_000)
    return math.sqrt(max(float(squared), 0.0))


def wasserstein1_1d(a: ArrayLike, b: ArrayLike) -> float:
    """W1 between two 1-D sets (scipy), the distance of the 1-D targets."""
    from scipy.stats import wasserstein_distance

    a, b = _as_points(a, "a"), _as_points(b, "b")
    if a.shape[1] != 1 or b.shape[1] != 1:
        raise ValueError(f"W1 is computed for 1-D sets only, got dimensions {a.shape[1]} and {b.shape[1]}")
    return float(wasserstein_distance(a[:, 0], b[:, 0]))


def transport_cost(noise: ArrayLike, mapped: ArrayLike) -> float:
    """`E||G(z) - z||^2`: the mean SQUARED distance each sample moves (compare with W2^2)."""
    noise, mapped = _as_points(noise, "noise"), _as_points(mapped, "mapped")
    _check_same_shape(noise, mapped)
    return float(np.square(mapped - noise).sum(axis=1).mean())


def mean_distance(a: ArrayLike, b: ArrayLike) -> float:
    """`E||a_i - b_i||` over paired samples: the map error against an exact map, or how far two
    generators' maps of the same noise are apart."""
    a, b = _as_points(a, "a"), _as_points(b, "b")
    _check_same_shape(a, b)
    return float(np.linalg.norm(a - b, axis=1).mean())


def quantile_map(noise: ArrayLike, data: ArrayLike) -> np.ndarray:
    """The 1-D optimal map from N(0, 1) to the data, `T(z) = F_data^-1(Phi(z))`, from sorted data.

    In 1-D the monotone map is the unique W2-optimal one; here `F_data^-1` is the data set's
    empirical quantile function (linear between order statistics). Returns (N, 1).
    """
    from scipy.special import ndtr

    noise, data = _as_points(noise, "noise"), _as_points(data, "data")
    if noise.shape[1] != 1 or data.shape[1] != 1:
        raise ValueError("the quantile map is defined for 1-D sets only")
    return np.quantile(data[:, 0], ndtr(noise[:, 0]))[:, None]


def mode_coverage(
    samples: ArrayLike, means: ArrayLike, weights: Sequence[float], stds: Sequence[float], radius: float = 3.0
) -> int:
    """How many modes hold at least half their share (`weight * N / 2`) of the samples.

    A sample counts for its nearest mode, and only if it lies within `radius` of that mode's
    standard deviations of it: samples stranded between modes belong to none.
    """
    samples, means = _as_points(samples, "samples"), _as_points(means, "means")
    weights, stds = np.asarray(weights, dtype=np.float64), np.asarray(stds, dtype=np.float64)
    distances = np.linalg.norm(samples[:, None, :] - means[None, :, :], axis=2)  # (N, K)
    nearest = distances.argmin(axis=1)
    close = distances[np.arange(len(samples)), nearest] <= radius * stds[nearest]
    counts = np.bincount(nearest[close], minlength=len(means))
    return int((counts >= 0.5 * weights * len(samples)).sum())


# ---------------------------------------------------------------------------------------- data sets
def _seed_from(generator: Optional[torch.Generator]) -> int:
    """A numpy/scikit-learn seed drawn from the torch generator, so one seed drives every draw."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


@dataclass(frozen=True)
class GaussianMixture:
    """A mixture of isotropic Gaussians: `weights` (K,), `means` (K, D), `stds` (K,)."""

    weights: Tuple[float, ...]
    means: Tuple[Tuple[float, ...], ...]
    stds: Tuple[float, ...]

    @property
    def dim(self) -> int:
        return len(self.means[0])

    def sample(self, num_samples: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        component = torch.multinomial(torch.tensor(self.weights), num_samples, replacement=True, generator=generator)
        means = torch.tensor(self.means, dtype=torch.float32)[component]
        stds = torch.tensor(self.stds, dtype=torch.float32)[component, None]
        return means + stds * torch.randn(means.shape, generator=generator)

    def cdf(self, x: np.ndarray) -> np.ndarray:
        """The mixture's CDF (1-D mixtures)."""
        from scipy.special import ndtr

        means = np.asarray(self.means, dtype=np.float64)[:, 0]
        stds = np.asarray(self.stds, dtype=np.float64)
        return (np.asarray(self.weights) * ndtr((x[..., None] - means) / stds)).sum(axis=-1)

    def quantile_map(self, noise: ArrayLike) -> np.ndarray:
        """The exact optimal map `T(z) = F^-1(Phi(z))` of a 1-D mixture, by bisection on its CDF."""
        from scipy.special import ndtr

        if self.dim != 1:
            raise ValueError("the quantile map is defined for 1-D mixtures only")
        u = ndtr(_as_points(noise, "noise")[:, 0])
        # 15 standard deviations past the outer modes: beyond the quantile of any noise drawn in practice.
        low = np.full_like(u, min(m[0] - 15 * s for m, s in zip(self.means, self.stds)))
        high = np.full_like(u, max(m[0] + 15 * s for m, s in zip(self.means, self.stds)))
        for _ in range(BISECTION_STEPS):
            middle = 0.5 * (low + high)
            below = self.cdf(middle) < u
            low, high = np.where(below, middle, low), np.where(below, high, middle)
        return (0.5 * (low + high))[:, None]


def gmm1d() -> GaussianMixture:
    """Three unequal 1-D modes with clear gaps, so the optimal map has three steep steps."""
    return GaussianMixture(weights=(0.2, 0.5, 0.3), means=((-2.5,), (0.0,), (2.0,)), stds=(0.3, 0.5, 0.25))


def eight_gaussians(radius: float = 2.0, std: float = 0.1) -> GaussianMixture:
    """Eight equal modes evenly spaced on a circle of `radius` around the origin."""
    angles = [2 * math.pi * k / 8 for k in range(8)]
    means = tuple((radius * math.cos(a), radius * math.sin(a)) for a in angles)
    return GaussianMixture(weights=(1 / 8,) * 8, means=means, stds=(std,) * 8)


class Checkerboard:
    """Uniform on the 8 black squares of a 4 x 4 board of unit squares covering [-2, 2]^2."""

    dim = 2

    def sample(self, num_samples: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        column = torch.randint(0, 4, (num_samples,), generator=generator)
        # In column c the black squares are the rows r with r + c even: two choices per column.
        row = 2 * torch.randint(0, 2, (num_samples,), generator=generator) + column % 2
        corner = torch.stack([column, row], dim=1).float() - 2.0
        return corner + torch.rand((num_samples, 2), generator=generator)


class Moons:
    """scikit-learn's two interleaving moons (noise 0.05), centred and scaled by 1.5: ~[-2.3, 2.3] x [-1.2, 1.2]."""

    dim = 2
    noise = 0.05

    def sample(self, num_samples: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        from sklearn.datasets import make_moons

        points, _ = make_moons(num_samples, noise=self.noise, random_state=_seed_from(generator))
        return 1.5 * (torch.from_numpy(points).float() - torch.tensor([0.5, 0.25]))


class SampleSet:
    """A user distribution given by samples (an (N, D) array, e.g. a `.npy` file).

    `sample` draws rows without replacement while it can, so two halves of one draw are disjoint
    sets and their distance is a fair noise floor.
    """

    def __init__(self, points: ArrayLike):
        self.points = torch.from_numpy(_as_points(points, "points")).float()
        self.dim = self.points.shape[1]

    @classmethod
    def from_npy(cls, path: Union[str, Path]) -> "SampleSet":
        return cls(np.load(path))

    def sample(self, num_samples: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        count = self.points.shape[0]
        if num_samples <= count:
            index = torch.randperm(count, generator=generator)[:num_samples]
        else:
            index = torch.randint(0, count, (num_samples,), generator=generator)
        return self.points[index]


TOY_DATASETS = {
    "gmm1d": gmm1d,
    "8gaussians": eight_gaussians,
    "checkerboard": Checkerboard,
    "moons": Moons,
}


def load_toy_dataset(name_or_path: str):
    """One of `TOY_DATASETS` by name, or a `SampleSet` read from a `.npy` file of (N, D) samples."""
    if name_or_path in TOY_DATASETS:
        return TOY_DATASETS[name_or_path]()
    if name_or_path.endswith(".npy"):
        return SampleSet.from_npy(name_or_path)
    raise ValueError(f"unknown toy data set {name_or_path!r}: use one of {sorted(TOY_DATASETS)} or a .npy file")
