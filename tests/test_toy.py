"""The toy optimal-transport metrics on cases with known answers, and a short toy AFM run
(diffusers_afm.evaluation.toy, examples/toy_afm.py)."""

import importlib.util
import math

import numpy as np
import pytest
import torch

from conftest import REPO
from diffusers_afm.evaluation import (
    Checkerboard,
    GaussianMixture,
    SampleSet,
    eight_gaussians,
    load_toy_dataset,
    mean_distance,
    mode_coverage,
    quantile_map,
    transport_cost,
    wasserstein1_1d,
    wasserstein2,
)


def _load_toy_script():
    spec = importlib.util.spec_from_file_location("toy_afm", REPO / "examples" / "toy_afm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


toy_afm = _load_toy_script()


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


STANDARD_NORMAL_1D = GaussianMixture(weights=(1.0,), means=((0.0,),), stds=(1.0,))
STANDARD_NORMAL_2D = GaussianMixture(weights=(1.0,), means=((0.0, 0.0),), stds=(1.0,))


class IdentityGenerator(torch.nn.Module):
    """G(z) = z: the map whose transport cost is exactly 0."""

    def forward(self, hidden_states, class_labels, timestep_src, timestep_tgt):
        return hidden_states


# ----------------------------------------------------------------------------------------------
# metrics


def test_wasserstein2_of_a_set_and_its_permutation_is_zero():
    points = torch.randn(300, 2, generator=seeded())
    assert wasserstein2(points, points[torch.randperm(300, generator=seeded(1))]) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("dim", [1, 2])
def test_wasserstein2_of_a_translation_is_its_length(dim):
    points = torch.randn(200, dim, generator=seeded()).double()
    shift = torch.full((dim,), 0.3, dtype=torch.float64)
    assert wasserstein2(points, points + shift) == pytest.approx(0.3 * math.sqrt(dim), rel=1e-6)


def test_wasserstein1_1d_of_a_translation_is_its_length():
    points = np.random.default_rng(0).normal(size=500)
    assert wasserstein1_1d(points, points - 0.25) == pytest.approx(0.25, rel=1e-9)


def test_identity_map_has_zero_transport_cost():
    noise = torch.randn(100, 2, generator=seeded())
    assert transport_cost(noise, noise) == 0.0
    assert transport_cost(noise, noise + torch.tensor([3.0, 4.0])) == pytest.approx(25.0, rel=1e-6)


def test_mean_distance_is_the_mean_euclidean_norm():
    a = np.zeros((2, 2))
    b = np.array([[3.0, 4.0], [0.0, 1.0]])
    assert mean_distance(a, b) == pytest.approx(3.0)


def test_quantile_map_of_a_gaussian_to_itself_is_the_identity():
    noise = torch.randn(1000, 1, generator=seeded())
    # The exact map of the mixture formula, and the one read from sorted samples.
    np.testing.assert_allclose(STANDARD_NORMAL_1D.quantile_map(noise), noise.double().numpy(), atol=1e-9)
    data = torch.randn(200_000, 1, generator=seeded(1))
    assert mean_distance(quantile_map(noise, data), noise) < 0.01


def test_quantile_map_pushes_noise_onto_the_mixture():
    mixture = load_toy_dataset("gmm1d")
    noise = torch.randn(50_000, 1, generator=seeded())
    mapped = mixture.quantile_map(noise)
    assert np.all(np.diff(mapped[noise[:, 0].argsort().numpy(), 0]) >= 0)  # monotone
    np.testing.assert_allclose(mixture.cdf(mapped[:, 0]), torch.special.ndtr(noise[:, 0].double()).numpy(), atol=1e-9)


def test_mode_coverage_counts_modes_with_half_their_share():
    mixture = eight_gaussians()
    samples = mixture.sample(4000, seeded())
    assert mode_coverage(samples, mixture.means, mixture.weights, mixture.stds) == 8
    # Drop mode 0 and most of mode 1: six modes keep their share, mode 1 keeps under half of it.
    means = torch.tensor(mixture.means)
    nearest = torch.cdist(samples, means).argmin(dim=1)
    keep = (nearest > 1) | ((nearest == 1) & (torch.arange(4000) % 3 == 0))
    assert mode_coverage(samples[keep], mixture.means, mixture.weights, mixture.stds) == 6
    # Points stranded between modes belong to none.
    assert mode_coverage(torch.zeros(100, 2), mixture.means, mixture.weights, mixture.stds) == 0


def test_datasets_are_deterministic_by_seed_and_have_their_shapes():
    for name, dim in [("gmm1d", 1), ("8gaussians", 2), ("checkerboard", 2), ("moons", 2)]:
        dataset = load_toy_dataset(name)
        first, second = dataset.sample(64, seeded(3)), dataset.sample(64, seeded(3))
        assert first.shape == (64, dim) and dataset.dim == dim
        assert torch.equal(first, second)
    board = Checkerboard().sample(4000, seeded())
    cells = (board + 2).floor()
    assert torch.all((cells.sum(dim=1) % 2) == 0) and board.abs().max() <= 2


def test_sample_set_halves_of_one_draw_are_disjoint(tmp_path):
    path = tmp_path / "points.npy"
    np.save(path, np.arange(40, dtype=np.float32).reshape(20, 2))
    dataset = load_toy_dataset(str(path))
    assert isinstance(dataset, SampleSet) and dataset.dim == 2
    first, second = dataset.sample(20, seeded()).split(10)
    assert not set(first[:, 0].tolist()) & set(second[:, 0].tolist())


# ----------------------------------------------------------------------------------------------
# the script's evaluation and a short run


def test_identity_on_gaussian_data_reaches_the_floor_at_zero_cost():
    config = toy_afm.ToyConfig(eval_samples=800)
    metrics = toy_afm.evaluate(toy_afm.TrainedMap(IdentityGenerator(), 1, "sample"), STANDARD_NORMAL_2D, config)
    assert metrics["transport_cost"] == 0.0
    # Noise and data are both N(0, I): G's samples are as far from the data as another data set is.
    assert 0.7 < metrics["w2_to_data"] / metrics["w2_noise_floor"] < 1.4
    assert metrics["ot_cost"] == pytest.approx(metrics["w2_to_data"] ** 2)
    assert metrics["mode_coverage"] == metrics["num_modes"] == 1


def test_identity_on_1d_gaussian_is_the_optimal_map():
    config = toy_afm.ToyConfig(eval_samples=20_000)
    metrics = toy_afm.evaluate(toy_afm.TrainedMap(IdentityGenerator(), 1, "sample"), STANDARD_NORMAL_1D, config)
    assert metrics["map_error"] < 1e-6 and metrics["ot_cost"] < 1e-12
    assert metrics["w1_to_data"] < 3 * metrics["w1_noise_floor"]


@pytest.fixture
def toy_threads():
    """The thread count the toy script uses (a second thread only slows these MLPs down)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(toy_afm.NUM_THREADS)
    yield
    torch.set_num_threads(threads)


def test_short_toy_run_beats_its_starting_point(toy_threads):
    config = toy_afm.ToyConfig(
        dataset="8gaussians", max_train_steps=200, train_batch_size=64, hidden_size=64, ema_decay=0.9, eval_samples=500
    )
    dataset = load_toy_dataset(config.dataset)
    before = toy_afm.evaluate(toy_afm.initial_map(config, dataset.dim), dataset, config)
    trained, record = toy_afm.run(config, dataset)
    after = record["metrics"]
    assert after["w2_to_data"] < 0.7 * before["w2_to_data"]
    assert set(after) >= {"w2_to_data", "w2_noise_floor", "transport_cost", "ot_cost", "mode_coverage", "seconds"}


def test_multi_step_afm_samples_along_the_grid(toy_threads):
    config = toy_afm.ToyConfig(dataset="gmm1d", nfe=2, max_train_steps=20, train_batch_size=32, hidden_size=16, eval_samples=200)
    trained, record = toy_afm.run(config)
    assert trained.prediction_type == "velocity" and trained.model.use_t_src
    noise = torch.randn(50, 1, generator=seeded())
    trajectory = trained.trajectory(noise)
    assert trajectory.shape == (3, 50, 1) and torch.equal(trajectory[0], noise)
    assert torch.allclose(trajectory[-1], trained(noise))
    assert all(math.isfinite(value) for value in record["metrics"].values())


def test_gan_is_afm_without_the_ot_term():
    assert toy_afm.ot_scale_schedule(toy_afm.ToyConfig(method="gan", ot_scale=0.4))(0) == 0.0
    assert toy_afm.ot_scale_schedule(toy_afm.ToyConfig(ot_scale=0.4))(10**6) == 0.4
    decayed = toy_afm.ot_scale_schedule(toy_afm.ToyConfig(ot_scale=0.4, ot_scale_end=0.01, max_train_steps=100))
    assert decayed(0) == pytest.approx(0.4) and decayed(200) == pytest.approx(0.01)


def test_plot_writes_a_figure(tmp_path):
    trajectory = torch.randn(3, 50, 2, generator=seeded())
    data = torch.randn(100, 2, generator=seeded(1))
    toy_afm.plot_maps({"a": trajectory, "b": trajectory}, data, str(tmp_path / "map.png"))
    toy_afm.plot_maps({"a": trajectory[..., :1]}, data[:, :1], str(tmp_path / "map_1d.png"))
    assert (tmp_path / "map.png").stat().st_size > 0 and (tmp_path / "map_1d.png").stat().st_size > 0


def test_command_line_uses_the_trainers_flag_names():
    args = toy_afm.parse_args(["--learning_rate", "0.01", "--max_train_steps", "5", "--train_batch_size", "8"])
    config = toy_afm.ToyConfig(**{k: v for k, v in vars(args).items() if k not in ("output", "plot")})
    assert (config.learning_rate, config.max_train_steps, config.train_batch_size) == (0.01, 5, 8)
