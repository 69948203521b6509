"""Metrics against closed forms, and the feature-extractor and reference-statistics plumbing."""

import sys

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from diffusers_afm.evaluation import (
    TORCH_FIDELITY_WEIGHTS,
    ModuleFeatureExtractor,
    ReferenceStatistics,
    TorchScriptFeatureExtractor,
    compute_features,
    feature_statistics,
    frechet_distance,
    images_from_folder,
    inception_score,
    load_feature_extractor,
    load_reference,
    precision_recall,
    to_unit_nchw,
    torch_fidelity_inception,
)


def tiny_extractor(images):
    """12-d features (2 x 2 average pool per channel) that work at any image size."""
    return F.adaptive_avg_pool2d(to_unit_nchw(images), 2).flatten(1)


class TinyClassifier(torch.nn.Module):
    """Returns (features, logits), the shape of an Inception extractor's output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.head = torch.nn.Linear(4, 5)

    def forward(self, x):
        features = self.conv(x).mean(dim=(2, 3))
        return features, self.head(features)


def random_rotation(rng, dim):
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


def random_images(rng, n, height, width):
    return rng.integers(0, 256, size=(n, height, width, 3), dtype=np.uint8)


def assert_weights_hint(message):
    assert TORCH_FIDELITY_WEIGHTS in message
    assert "feature_extractor_path" in message and "--inception_path" in message


# Fréchet distance


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_rotated_closed_form():
    # Rotating both covariances by one rotation keeps them commuting, so the closed form holds.
    rng = np.random.default_rng(1)
    q = random_rotation(rng, 32)
    a, b = rng.uniform(0.1, 3, 32), rng.uniform(0.1, 3, 32)
    mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    distance = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert distance == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_sqrtm_for_non_commuting_covariances():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((200, 24)), rng.standard_normal((200, 24)) @ rng.standard_normal((24, 24))
    (mu1, sigma1), (mu2, sigma2) = feature_statistics(x), feature_statistics(y)
    root = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * root)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_of_identical_statistics_is_zero():
    rng = np.random.default_rng(3)
    mu, sigma = feature_statistics(rng.standard_normal((500, 64)))
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(torch.from_numpy(mu), torch.from_numpy(sigma), mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_with_rank_deficient_covariances_is_finite():
    rng = np.random.default_rng(4)
    mu1, sigma1 = feature_statistics(rng.standard_normal((5, 64)))
    mu2, sigma2 = feature_statistics(rng.standard_normal((5, 64)) + 0.5)
    assert np.linalg.matrix_rank(sigma1) == 4
    distance = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert isinstance(distance, float) and np.isfinite(distance) and distance >= 0
    assert frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize(
    "arguments, name",
    [
        ((np.zeros((4, 1)), np.eye(4), np.zeros(4), np.eye(4)), "mu1"),
        ((np.zeros(4), np.eye(3), np.zeros(4), np.eye(4)), "sigma1"),
        ((np.zeros(4), np.eye(4), np.zeros(4), np.eye(4)[:, :3]), "sigma2"),
        ((np.zeros(4), np.eye(4), np.zeros(3), np.eye(3)), "mu2"),
    ],
)
def test_frechet_distance_rejects_bad_shapes(arguments, name):
    with pytest.raises(ValueError, match=name):
        frechet_distance(*arguments)


def test_feature_statistics_match_numpy():
    features = np.random.default_rng(5).standard_normal((50, 7))
    mu, sigma = feature_statistics(features)
    np.testing.assert_allclose(mu, features.mean(axis=0))
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False, ddof=1))
    mu_t, sigma_t = feature_statistics(torch.from_numpy(features).float())
    np.testing.assert_allclose(sigma_t, sigma, atol=1e-5)
    with pytest.raises(ValueError, match="features"):
        feature_statistics(features[0])


# Inception Score


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = inception_score(np.zeros((100, 10)), splits=10)
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)
    mean, _ = inception_score(np.full((100, 10), 0.1), splits=4, from_logits=False)
    assert mean == pytest.approx(1.0)


def test_inception_score_of_confident_evenly_spread_predictions_is_num_classes():
    classes, splits = 10, 5
    labels = np.arange(classes * splits) % classes  # every split holds every class once
    one_hot = np.eye(classes)[labels]
    mean, std = inception_score(one_hot, splits=splits, from_logits=False)
    assert mean == pytest.approx(classes) and std == pytest.approx(0.0, abs=1e-9)
    mean, _ = inception_score(torch.from_numpy(100 * one_hot), splits=splits)
    assert mean == pytest.approx(classes, rel=1e-6)


def test_inception_score_validates_inputs():
    with pytest.raises(ValueError, match="splits"):
        inception_score(np.zeros((4, 3)), splits=5)
    with pytest.raises(ValueError, match="probabilities"):
        inception_score(np.ones((4, 3)), splits=2, from_logits=False)


# Precision and recall


def test_precision_recall_of_identical_sets_is_one():
    features = np.random.default_rng(6).standard_normal((200, 8))
    assert precision_recall(features, features.copy(), batch_size=37) == (1.0, 1.0)


def test_precision_recall_of_far_apart_sets_is_zero():
    rng = np.random.default_rng(7)
    real, fake = rng.standard_normal((100, 8)), rng.standard_normal((120, 8)) + 100
    assert precision_recall(torch.from_numpy(real), torch.from_numpy(fake), batch_size=16) == (0.0, 0.0)


def test_precision_recall_when_fakes_cover_half_the_modes():
    rng = np.random.default_rng(8)
    centers = 50 * np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], dtype=float)
    real = np.concatenate([center + rng.standard_normal((60, 2)) for center in centers])
    # Slightly moved copies of the first two modes: far closer to their real source than any k-NN radius.
    fake = real[:120] + 1e-4 * rng.standard_normal((120, 2))
    precision, recall = precision_recall(real, fake, k=3, batch_size=50)
    assert precision == 1.0
    assert recall == pytest.approx(0.5)
    assert precision_recall(real, fake, k=3, batch_size=1000) == (precision, recall)


def test_precision_recall_validates_inputs():
    with pytest.raises(ValueError, match="dimension"):
        precision_recall(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(ValueError, match="fake_features"):
        precision_recall(np.zeros((10, 3)), np.zeros((3, 3)), k=3)


# Feature extractors


# torch 2.13 marks TorchScript deprecated; loading a scripted file is exactly what is tested here.
@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_extractor_round_trip(tmp_path):
    module = TinyClassifier().eval()
    path = tmp_path / "tiny.pt"
    torch.jit.script(module).save(str(path))
    images = random_images(np.random.default_rng(9), 5, 20, 24)

    extractor = TorchScriptFeatureExtractor(path, input_size=16)
    features, logits = extractor(images)
    resized = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, size=(16, 16), mode="bilinear")
    expected_features, expected_logits = module(resized)
    torch.testing.assert_close(features, expected_features.detach())
    torch.testing.assert_close(logits, expected_logits.detach())

    # The same images as float (N, 3, H, W) in [0, 1] give the same features.
    torch.testing.assert_close(extractor(torch.from_numpy(images).permute(0, 3, 1, 2) / 255.0)[0], features)

    loaded = load_feature_extractor(str(path), input_size=16)
    assert isinstance(loaded, TorchScriptFeatureExtractor)
    batched_features, batched_logits = compute_features(loaded, images, batch_size=2)
    assert batched_features.dtype == np.float64 and batched_features.shape == (5, 4) and batched_logits.shape == (5, 5)
    np.testing.assert_allclose(batched_features, features.double().numpy(), atol=1e-6)


def test_module_extractor_transform_and_missing_logits():
    seen = {}

    def record(x):
        seen["range"] = (x.min().item(), x.max().item())
        return 2 * x - 1

    extractor = ModuleFeatureExtractor(torch.nn.Flatten(), input_size=4, transform=record)
    images = np.stack([np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)])
    features, logits = compute_features(extractor, images)
    assert seen["range"] == (0.0, 1.0)
    np.testing.assert_array_equal(features, np.stack([-np.ones(48), np.ones(48)]))
    assert logits is None


def test_compute_features_batches_images_of_different_sizes():
    rng = np.random.default_rng(10)
    images = [random_images(rng, 1, 8, 8)[0] for _ in range(3)] + [random_images(rng, 1, 12, 10)[0] for _ in range(4)]
    features, logits = compute_features(tiny_extractor, iter(images), batch_size=2)
    assert logits is None
    expected = np.concatenate([tiny_extractor(image[None]).double().numpy() for image in images])
    np.testing.assert_allclose(features, expected, atol=1e-6)


def test_missing_feature_extractor_path_names_the_weights_and_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_feature_extractor(tmp_path / "missing.pth")
    assert_weights_hint(str(error.value))
    with pytest.raises(ValueError, match="inception"):
        load_feature_extractor("resnet")


def test_unavailable_torch_fidelity_names_the_weights_and_the_argument(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # makes the import fail, installed or not
    with pytest.raises(ImportError) as error:
        torch_fidelity_inception()
    assert_weights_hint(str(error.value))
    # A plain state dict (the form of torch-fidelity's weights file) is routed to torch-fidelity.
    state_dict_path = tmp_path / TORCH_FIDELITY_WEIGHTS
    torch.save({"fc.weight": torch.zeros(2, 2)}, state_dict_path)
    with pytest.raises(ImportError) as error:
        load_feature_extractor(state_dict_path)
    assert_weights_hint(str(error.value))


# Reference statistics


def test_npz_reference_statistics_prefer_stored_mu_sigma(tmp_path):
    rng = np.random.default_rng(11)
    images = random_images(rng, 10, 8, 8)
    mu, sigma = rng.standard_normal(12), np.eye(12)
    path = tmp_path / "VIRTUAL_reference.npz"
    np.savez(path, arr_0=images, mu=mu, sigma=sigma)
    stored = ReferenceStatistics.from_npz(path, tiny_extractor, with_features=False)
    np.testing.assert_array_equal(stored.mu, mu)
    np.testing.assert_array_equal(stored.sigma, sigma)
    assert stored.features is None
    recomputed = ReferenceStatistics.from_npz(path, tiny_extractor, recompute=True, batch_size=3)
    np.testing.assert_allclose(recomputed.sigma, feature_statistics(tiny_extractor(images))[1], atol=1e-6)


def test_npz_reference_statistics_computed_from_images(tmp_path):
    images = random_images(np.random.default_rng(12), 10, 8, 8)
    path = tmp_path / "images.npz"
    np.savez(path, arr_0=images)
    reference = load_reference(path, tiny_extractor, batch_size=4)
    expected_mu, expected_sigma = feature_statistics(tiny_extractor(images))
    np.testing.assert_allclose(reference.mu, expected_mu, atol=1e-6)
    np.testing.assert_allclose(reference.sigma, expected_sigma, atol=1e-6)
    with pytest.raises(ValueError, match="extractor"):
        load_reference(path)


def test_saved_reference_round_trip_leaves_no_temporary_file(tmp_path):
    rng = np.random.default_rng(13)
    mu, sigma = feature_statistics(rng.standard_normal((20, 6)))
    path = tmp_path / "stats" / "reference.npz"
    ReferenceStatistics(mu, sigma).save(path)
    ReferenceStatistics(mu + 1, sigma).save(path)  # overwrites in place
    loaded = load_reference(path)
    np.testing.assert_array_equal(loaded.mu, mu + 1)
    np.testing.assert_array_equal(loaded.sigma, sigma)
    assert [file.name for file in path.parent.iterdir()] == ["reference.npz"]
    with pytest.raises(ValueError, match="sigma"):
        ReferenceStatistics(mu, sigma[:-1]).save(path)


def test_folder_reference_statistics(tmp_path):
    rng = np.random.default_rng(14)
    images = {f"{index:02d}.png": random_images(rng, 1, 8 + 2 * (index % 2), 8)[0] for index in range(6)}
    for name, image in images.items():
        PIL.Image.fromarray(image).save(tmp_path / name)
    (tmp_path / "class_b").mkdir()
    grey = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
    PIL.Image.fromarray(grey).save(tmp_path / "class_b" / "grey.PNG")
    (tmp_path / "notes.txt").write_text("not an image")

    loaded = list(images_from_folder(tmp_path))
    expected = list(images.values()) + [np.repeat(grey[..., None], 3, axis=-1)]
    assert len(loaded) == len(expected)
    for got, want in zip(loaded, expected):
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)

    reference = load_reference(tmp_path, tiny_extractor, batch_size=4)
    expected_features = np.concatenate([tiny_extractor(image[None]).double().numpy() for image in expected])
    np.testing.assert_allclose(reference.features, expected_features, atol=1e-6)
    np.testing.assert_allclose(reference.mu, expected_features.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(reference.sigma, np.cov(expected_features, rowvar=False), atol=1e-6)
    with pytest.raises(FileNotFoundError):
        next(images_from_folder(tmp_path / "missing"))


def test_dataset_reference_statistics():
    import datasets

    images = random_images(np.random.default_rng(15), 6, 8, 8)
    dataset = datasets.Dataset.from_dict(
        {"image": [PIL.Image.fromarray(image) for image in images], "label": list(range(6))},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    reference = load_reference(dataset, tiny_extractor, batch_size=4)
    expected_mu, expected_sigma = feature_statistics(tiny_extractor(images))
    np.testing.assert_allclose(reference.mu, expected_mu, atol=1e-6)
    np.testing.assert_allclose(reference.sigma, expected_sigma, atol=1e-6)
    with pytest.raises(ValueError, match="image_column"):
        load_reference(dataset, tiny_extractor, image_column="pixels")
