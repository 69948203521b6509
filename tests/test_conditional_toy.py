"""The class-conditional toys and their per-class metrics (diffusers_afm.evaluation.conditional_toy)."""

import math

import numpy as np
import pytest
import torch

from diffusers_afm.evaluation.conditional_toy import (
    CONDITIONAL_TOY_DATASETS,
    ConditionalMixture,
    class_conditional_metrics,
    gap_closed,
    grid_blobs,
    interleaved_grid,
    load_conditional_toy,
    spiral_arms,
)
from diffusers_afm.evaluation.toy import GaussianMixture


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", sorted(CONDITIONAL_TOY_DATASETS))
def test_every_set_samples_points_and_labels(name):
    dataset = load_conditional_toy(name)
    points, labels = dataset.sample(64, seeded())
    assert points.shape == (64, dataset.dim) and labels.shape == (64,)
    assert labels.min() >= 0 and labels.max() < dataset.num_classes
    assert torch.isfinite(points).all()


def test_sampling_is_reproducible():
    dataset = grid_blobs()
    a, la = dataset.sample(32, seeded(3))
    b, lb = dataset.sample(32, seeded(3))
    assert torch.equal(a, b) and torch.equal(la, lb)


def test_log_likelihoods_match_a_gaussian_density():
    one = GaussianMixture(weights=(1.0,), means=((1.0, -1.0),), stds=(0.5,))
    other = GaussianMixture(weights=(0.5, 0.5), means=((0.0, 0.0), (2.0, 0.0)), stds=(1.0, 1.0))
    dataset = ConditionalMixture((one, other))
    x = np.array([[1.0, -1.0], [0.3, 0.2]])
    expected0 = -np.log(2 * math.pi * 0.25) - 0.5 * ((x - [1.0, -1.0]) ** 2).sum(1) / 0.25
    density1 = 0.5 * np.exp(-0.5 * (x ** 2).sum(1)) / (2 * math.pi) + 0.5 * np.exp(-0.5 * ((x - [2.0, 0.0]) ** 2).sum(1)) / (2 * math.pi)
    got = dataset.log_likelihoods(x)
    np.testing.assert_allclose(got[:, 0], expected0, rtol=1e-12)
    np.testing.assert_allclose(got[:, 1], np.log(density1), rtol=1e-12)
    assert list(dataset.bayes_labels(x)) == [0, 1]


def test_interleaved_grid_neighbours_are_other_classes():
    dataset = interleaved_grid(size=4, num_classes=4, spacing=1.0)
    for mixture in dataset.classes:
        means = np.asarray(mixture.means)
        nearest = min(np.linalg.norm(a - b) for i, a in enumerate(means) for b in means[i + 1:])
        assert nearest == pytest.approx(2.0)  # same-class blobs two steps apart; neighbours belong to others
    assert interleaved_grid(num_classes=2).num_classes == 2
    with pytest.raises(ValueError):
        interleaved_grid(num_classes=3)


def test_grid_blobs_and_spirals_shapes():
    assert grid_blobs(size=3).num_classes == 9
    spirals = spiral_arms(num_classes=3, points_per_arm=10)
    assert spirals.num_classes == 3 and len(spirals.classes[0].means) == 10


def test_a_perfect_sampler_scores_the_floor_and_a_swapped_one_does_not():
    dataset = grid_blobs(size=2, spacing=3.0, std=0.2)
    rng = seeded(1)
    reference = {c: dataset.sample_class(c, 200, rng) for c in range(4)}
    floor = {c: dataset.sample_class(c, 200, rng) for c in range(4)}
    perfect = class_conditional_metrics(dataset, floor, reference, floor)
    assert perfect["w2_mean"] == pytest.approx(perfect["w2_floor_mean"])
    assert perfect["accuracy"] == 1.0 == perfect["accuracy_floor"]
    swapped = class_conditional_metrics(dataset, {c: floor[(c + 1) % 4] for c in range(4)}, reference)
    assert swapped["accuracy"] == 0.0
    assert swapped["w2_mean"] > 2.5  # every class moved to a neighbour 3 away
    assert "w2_floor_mean" not in swapped


def test_gap_closed():
    assert gap_closed(0.3, 0.1, 0.2) == pytest.approx(0.5)
    assert gap_closed(0.3, 0.1, 0.1) == pytest.approx(1.0)
    assert gap_closed(0.3, 0.1, 0.4) == pytest.approx(-0.5)
    assert math.isnan(gap_closed(0.1, 0.2, 0.05))


def test_errors():
    with pytest.raises(ValueError):
        load_conditional_toy("nope")
    one = GaussianMixture(weights=(1.0,), means=((0.0,),), stds=(1.0,))
    with pytest.raises(ValueError):
        ConditionalMixture((one,))
    with pytest.raises(ValueError):
        ConditionalMixture((one, GaussianMixture(weights=(1.0,), means=((0.0, 0.0),), stds=(1.0,))))


# ----------------------------------------------------------------------------------------------
# benchmarks/cafm_evidence.py on a tiny budget: the pipeline of a table row runs end to end


def _load_evidence_script():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("cafm_evidence", REPO / "benchmarks" / "cafm_evidence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gaussian_classes_statistics_and_frechet_floor():
    dataset = load_conditional_toy("gaussians")
    mean, covariance = dataset.class_statistics(0)
    points = dataset.sample_class(0, 4000, seeded(2)).double().numpy()
    np.testing.assert_allclose(points.mean(0), mean, atol=0.05)
    np.testing.assert_allclose(np.cov(points, rowvar=False), covariance, atol=0.03)
    rng = seeded(4)
    reference = {c: dataset.sample_class(c, 300, rng) for c in range(dataset.num_classes)}
    floor = {c: dataset.sample_class(c, 300, rng) for c in range(dataset.num_classes)}
    metrics = class_conditional_metrics(dataset, floor, reference, floor)
    assert metrics["frechet_mean"] == pytest.approx(metrics["frechet_floor_mean"]) and metrics["frechet_mean"] < 0.05
    shifted = class_conditional_metrics(dataset, {c: floor[c] + 0.5 for c in floor}, reference)
    assert shifted["frechet_mean"] > 0.25 * dataset.dim * 0.9  # ||0.5 * 1||^2 = 0.25 D
    assert shifted["accuracy"] < metrics["accuracy"]


def test_cafm_evidence_run_end_to_end(fresh_accelerate_state):
    evidence = _load_evidence_script()
    config = evidence.EvidenceConfig(dataset="blobs", flow_train_steps=6, max_train_steps=8, warmup=2,
                                     num_discriminator_steps=2, samples_per_class=8, settings=["euler:2"],
                                     guidance_scales=[1.0, 2.0], flow_batch_size=32, batch_size=32)
    record = evidence.run(config, log_every=4)
    row = record["results"]["euler:2"]
    assert row["guidance_scale"] in (1.0, 2.0)
    for name in ("flow_matching", "cafm", "control"):
        assert math.isfinite(row[name]["unguided"]["w2_mean"]) and math.isfinite(row[name]["guided"]["accuracy"])
    assert len(record["cafm_logs"]) == 2 and "derivative_real" in record["cafm_logs"][0]
    assert "euler:2" in evidence.summary_line(record)
    assert "| euler:2 |" in evidence.markdown_table("blobs", [record])


def test_gaussian_conditional_velocity_obeys_the_laws_of_total_expectation_and_variance():
    from diffusers_afm.evaluation.conditional_toy import gaussian_conditional_velocity

    dataset = load_conditional_toy("gaussians")
    mean, covariance = (torch.tensor(a) for a in dataset.class_statistics(3))
    rng = seeded(7)
    count = 40000
    x0 = dataset.sample_class(3, count, rng).double()
    z = torch.randn(count, dataset.dim, generator=rng, dtype=torch.float64)
    t = torch.full((count,), 0.6, dtype=torch.float64)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * z
    u = gaussian_conditional_velocity(mean, covariance, x_t, t)
    eye = torch.eye(dataset.dim, dtype=torch.float64)
    sigma = covariance @ torch.linalg.inv(0.16 * covariance + 0.36 * eye)  # S ((1 - t)^2 S + t^2 I)^-1
    np.testing.assert_allclose(u.mean(0).numpy(), -mean.numpy(), atol=0.02)  # E[u] = E[z - x0]
    second = (u.T @ u / count + sigma).numpy()  # E[u u^T] + E[Cov(v | x_t)] = E[v v^T]
    np.testing.assert_allclose(second, (covariance + eye + torch.outer(mean, mean)).numpy(), atol=0.05)
    # at t = 1 the data says nothing about x0: u = x_1 - mean
    ones = torch.ones(4, dtype=torch.float64)
    np.testing.assert_allclose(gaussian_conditional_velocity(mean, covariance, z[:4], ones).numpy(),
                               (z[:4] - mean).numpy(), atol=1e-12)


def test_the_best_discriminator_loss_is_4_over_2_plus_m():
    """At one point x_t, D's derivative along (v, 1) is g.v + h. With real velocities ~ N(u, Sigma)
    and the model's v = u - e, the least `E(g.v_real + h - 1)^2 + (g.v + h + 1)^2` over (g, h) is
    4 / (2 + m), m = e^T Sigma^-1 e (`velocity_error_snr`'s bound)."""
    from diffusers_afm.evaluation.conditional_toy import velocity_error_snr

    s = torch.tensor([[0.5, 0.1], [0.1, 0.2]], dtype=torch.float64)
    t = torch.tensor([0.3], dtype=torch.float64)
    sigma = s @ torch.linalg.inv((1 - t) ** 2 * s + t ** 2 * torch.eye(2, dtype=torch.float64))
    u = torch.tensor([0.4, -1.0], dtype=torch.float64)
    e = torch.tensor([[0.2, 0.15]], dtype=torch.float64)
    m = float(velocity_error_snr(s, t, e))
    np.testing.assert_allclose(m, float(e[0] @ torch.linalg.solve(sigma, e[0])), rtol=1e-10)
    v = u - e[0]

    def loss(params):
        g, h = params[:2], params[2]
        return (g @ u + h - 1) ** 2 + g @ sigma @ g + (g @ v + h + 1) ** 2

    params = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], max_iter=200, tolerance_grad=1e-14, tolerance_change=1e-16)

    def closure():
        optimizer.zero_grad()
        value = loss(params)
        value.backward()
        return value

    optimizer.step(closure)
    assert float(loss(params)) == pytest.approx(4 / (2 + m), rel=1e-8)
