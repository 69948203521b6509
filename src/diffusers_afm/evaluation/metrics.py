"""Sample-quality metrics computed from network features (docs/method.md, "Evaluation protocol").

Every function takes features as an (N, D) numpy array or torch tensor, so the same code serves the
Inception features of FID-50K and the tiny feature networks of the tests. Which network produced
the features is the caller's business (see `features.py`).
"""

from typing import Optional, Tuple, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]


def _to_numpy(array: ArrayLike, name: str) -> np.ndarray:
    """float64 numpy copy of `array`; float64 because FID differences of ~0.01 sit on traces of ~1e3."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().double().numpy()
    array = np.asarray(array, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` contains NaN or infinite values")
    return array


def _to_features(features: ArrayLike, name: str) -> np.ndarray:
    features = _to_numpy(features, name)
    if features.ndim != 2:
        raise ValueError(f"`{name}` must have shape (N, D), got {features.shape}")
    return features


def feature_statistics(features: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of (N, D) features.

    The covariance uses ddof=1 (`np.cov`'s default), as the standard FID code does, so our
    statistics can be compared with stored reference statistics such as ADM's.
    """
    features = _to_features(features, "features")
    if features.shape[0] < 2:
        raise ValueError(f"`features` needs at least 2 samples for a covariance, got {features.shape[0]}")
    return features.mean(axis=0), np.cov(features, rowvar=False, ddof=1)


def _check_statistics(mu: ArrayLike, sigma: ArrayLike, mu_name: str, sigma_name: str) -> Tuple[np.ndarray, np.ndarray]:
    mu, sigma = _to_numpy(mu, mu_name), _to_numpy(sigma, sigma_name)
    if mu.ndim != 1:
        raise ValueError(f"`{mu_name}` must be a vector (D,), got shape {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"`{sigma_name}` must have shape {(mu.shape[0], mu.shape[0])} to match `{mu_name}`, got {sigma.shape}")
    return mu, sigma


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance; round-off makes tiny negative eigenvalues, clipped to 0."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrt(sigma1 sigma2)).

    sigma1 sigma2 is not symmetric, so `scipy.linalg.sqrtm` of it can return complex values or fail
    when a covariance is singular (fewer samples than dimensions). It is similar to the symmetric
    PSD matrix sqrt(sigma1) sigma2 sqrt(sigma1), which has the same eigenvalues, and those a
    symmetric eigensolver finds reliably.
    """
    root1 = _psd_sqrt(sigma1)
    product = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
    return float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), the "FID" when the statistics are
    Inception features: ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2))."""
    mu1, sigma1 = _check_statistics(mu1, sigma1, "mu1", "sigma1")
    mu2, sigma2 = _check_statistics(mu2, sigma2, "mu2", "sigma2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"`mu1` and `mu2` must have the same dimension, got {mu1.shape} and {mu2.shape}")
    difference = mu1 - mu2
    distance = difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2 * _trace_sqrt_product(sigma1, sigma2)
    # A squared distance: a negative value can only be round-off between equal distributions.
    return max(float(distance), 0.0)


def inception_score(logits_or_probs: ArrayLike, splits: int = 10, from_logits: bool = True) -> Tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))), its mean and standard deviation over `splits`
    equal parts of the samples (the protocol of Salimans et al. 2016 and of the ADM suite)."""
    values = torch.from_numpy(_to_features(logits_or_probs, "logits_or_probs"))
    if not 1 <= splits <= values.shape[0]:
        raise ValueError(f"`splits` must lie in [1, {values.shape[0]}] (the number of samples), got {splits}")
    if not from_logits and ((values < 0).any() or ((values.sum(dim=1) - 1).abs() > 1e-4).any()):
        raise ValueError("`logits_or_probs` must hold probabilities (rows >= 0 summing to 1) when from_logits=False")
    probs = torch.softmax(values, dim=1) if from_logits else values
    scores = np.array([_split_score(part) for part in probs.tensor_split(splits)])
    return float(scores.mean()), float(scores.std())


def _split_score(probs: torch.Tensor) -> float:
    # xlogy makes the 0 * log 0 terms of one-hot predictions 0 instead of NaN.
    marginal = probs.mean(dim=0, keepdim=True)
    kl = (torch.special.xlogy(probs, probs) - torch.special.xlogy(probs, marginal)).sum(dim=1)
    return kl.mean().exp().item()


def _knn_radii(features: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance from each sample to its k-th nearest neighbour within the same set.

    The set contains the sample itself at distance 0, hence the (k + 1)-th smallest distance.
    Rows are processed `batch_size` at a time so that 50K x 50K distances never sit in memory.
    """
    radii = [
        torch.cdist(chunk, features).kthvalue(k + 1, dim=1).values for chunk in features.split(batch_size)
    ]
    return torch.cat(radii)


def _manifold_coverage(queries: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    """Fraction of `queries` inside at least one ball of the manifold estimate (a sample of
    `manifold` with its k-NN radius)."""
    inside = [
        (torch.cdist(chunk, manifold) <= radii[None, :]).any(dim=1) for chunk in queries.split(batch_size)
    ]
    return torch.cat(inside).double().mean().item()


def precision_recall(
    real_features: ArrayLike,
    fake_features: ArrayLike,
    k: int = 3,
    batch_size: int = 1024,
    device: Optional[Union[str, torch.device]] = None,
) -> Tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), the k-NN manifold method.

    Each set's manifold is the union of balls around its samples, each with the radius to that
    sample's k-th nearest neighbour. Precision is the fraction of fake samples inside the real
    manifold (are the samples realistic?); recall the fraction of real samples inside the fake
    manifold (is the data covered?). `k=3` is the paper's and the ADM suite's choice.

    Distances are computed in float32 on `device` (the features' device for a tensor, else the
    CPU), `batch_size` rows at a time: memory grows as batch_size x N.
    """
    real = _to_features(real_features, "real_features")
    fake = _to_features(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"`real_features` and `fake_features` differ in dimension: {real.shape[1]} vs {fake.shape[1]}")
    for name, features in (("real_features", real), ("fake_features", fake)):
        if features.shape[0] <= k:
            raise ValueError(f"`{name}` needs more than k={k} samples, got {features.shape[0]}")
    if device is None:
        device = real_features.device if isinstance(real_features, torch.Tensor) else "cpu"
    real_t = torch.as_tensor(real, dtype=torch.float32, device=device)
    fake_t = torch.as_tensor(fake, dtype=torch.float32, device=device)
    precision = _manifold_coverage(fake_t, real_t, _knn_radii(real_t, k, batch_size), batch_size)
    recall = _manifold_coverage(real_t, fake_t, _knn_radii(fake_t, k, batch_size), batch_size)
    return precision, recall
