"""Unit tests of the pure training pieces: pairs, losses, gradient normalization, schedules,
augmentation and EMA (docs/method.md, "Which (s, t) pairs are trained", "Losses", "Training recipe")."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from diffusers_afm.flow import interpolate
from diffusers_afm.training.augment import augment_pair, translate
from diffusers_afm.training.ema import ModelEMA
from diffusers_afm.training.grad_norm import GradientNormalization
from diffusers_afm.training.losses import (
    approximated_gradient_penalty,
    discriminator_loss,
    generator_loss,
    ot_loss,
    perturbed_batch_size,
    relativistic_loss,
)
from diffusers_afm.training.pairs import flow_weight, make_flow_pair, sample_timestep_pairs
from diffusers_afm.training.schedules import constant, cosine, linear, parse_schedule, sequence

FIXTURES = Path(__file__).parent / "fixtures" / "official"


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# (s, t) pairs


def test_pairs_one_nfe_maps_noise_to_data():
    s, t = sample_timestep_pairs(5, 1, generator=seeded())
    assert s.dtype == t.dtype == torch.float32 and s.shape == t.shape == (5,)
    assert torch.equal(s, torch.ones(5)) and torch.equal(t, torch.zeros(5))


@pytest.mark.parametrize("nfe", [2, 4])
def test_pairs_fixed_nfe_are_steps_of_the_sampling_grid(nfe):
    s, t = sample_timestep_pairs(2000, nfe, generator=seeded())
    grid = torch.arange(nfe + 1, dtype=torch.float32) / nfe
    assert s.dtype == t.dtype == torch.float32 and s.shape == t.shape == (2000,)
    assert torch.isin(s, grid[1:]).all() and torch.isin(t, grid[:-1]).all()
    assert torch.allclose(s - t, torch.full_like(s, 1 / nfe))
    # every source time of the grid is drawn, about equally often
    counts = torch.stack([(s == value).sum() for value in grid[1:]]).float()
    assert counts.min() > 0.8 * 2000 / nfe


def test_pairs_any_step_cover_the_triangle():
    s, t = sample_timestep_pairs(20000, None, generator=seeded())
    assert s.dtype == t.dtype == torch.float32 and s.shape == (20000,)
    assert (s >= 0).all() and (s < 1).all() and (t >= 0).all() and (t <= s).all()
    # s ~ U(0, 1) and t / s ~ U(0, 1)
    assert abs(s.mean().item() - 0.5) < 0.02 and abs((t / s).mean().item() - 0.5) < 0.02
    assert abs(t.mean().item() - 0.25) < 0.02


def test_pairs_are_reproducible_with_a_generator():
    first = sample_timestep_pairs(16, None, generator=seeded(3))
    second = sample_timestep_pairs(16, None, generator=seeded(3))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("nfe", [0, -2, "x", 1.5, True])
def test_pairs_reject_bad_nfe(nfe):
    with pytest.raises(ValueError, match="`nfe` must be a positive integer"):
        sample_timestep_pairs(4, nfe)


def test_flow_weight_is_the_clamped_step_length():
    s = torch.tensor([1.0, 0.75, 0.3, 0.5])
    t = torch.tensor([0.0, 0.5, 0.2999, 0.5])
    assert torch.allclose(flow_weight(s, t), torch.tensor([1.0, 0.25, 0.001, 0.001]))


def test_make_flow_pair_uses_two_independent_noises():
    x0 = torch.randn(3, 2, 4, 4, generator=seeded(1))
    s = torch.tensor([1.0, 0.5, 0.25])
    t = torch.tensor([0.0, 0.5, 0.0])
    x_s, x_t_real = make_flow_pair(x0, s, t, generator=seeded(7))
    generator = seeded(7)
    noise_src = torch.randn(x0.shape, generator=generator)
    noise_tgt = torch.randn(x0.shape, generator=generator)
    assert torch.equal(x_s, interpolate(x0, noise_src, s))
    assert torch.equal(x_t_real, interpolate(x0, noise_tgt, t))
    assert torch.equal(x_s[0], noise_src[0])  # s = 1: exactly the noise (1 NFE)
    assert torch.equal(x_t_real[0], x0[0])  # t = 0: exactly the data
    assert not torch.allclose(x_s[1], x_t_real[1])  # same time, independent noises


# ----------------------------------------------------------------------------------------------
# losses


def softplus(value: float) -> float:
    return math.log1p(math.exp(value))


def test_relativistic_loss_hand_value():
    loss = relativistic_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    assert loss.item() == pytest.approx((softplus(-1.0) + softplus(2.0)) / 2, rel=1e-6)


def test_discriminator_loss_hand_value():
    logits_real = torch.tensor([1.0, 2.0], requires_grad=True)
    logits_fake = torch.tensor([0.0, -1.0], requires_grad=True)
    loss, parts = discriminator_loss(
        logits_real,
        logits_fake,
        logits_real_perturbed=torch.tensor([1.02]),
        logits_fake_perturbed=torch.tensor([-0.01]),
        weight_perturbed=torch.tensor([0.5]),
        gp_scale=0.25,
        gp_eps=0.01,
        cp_scale=0.01,
    )
    relativistic = (softplus(-1.0) + softplus(-3.0)) / 2
    r1 = 0.25 * 0.5 / 0.01**2 * 0.02**2  # pairs with logits_real[0] = 1.0
    r2 = 0.25 * 0.5 / 0.01**2 * 0.01**2  # pairs with logits_fake[0] = 0.0
    centering = 0.01 * (1.0**2 + 1.0**2) / 2
    assert parts["relativistic"].item() == pytest.approx(relativistic, rel=1e-6)
    assert parts["r1"].item() == pytest.approx(r1, rel=1e-4)
    assert parts["r2"].item() == pytest.approx(r2, rel=1e-4)
    assert parts["centering"].item() == pytest.approx(centering, rel=1e-6)
    assert loss.item() == pytest.approx(relativistic + r1 + r2 + centering, rel=1e-5)
    assert parts["logits_real"].item() == 1.5 and parts["logits_fake"].item() == -0.5
    assert set(parts) == {"loss_d", "relativistic", "r1", "r2", "centering", "logits_real", "logits_fake"}
    assert loss.requires_grad and not any(value.requires_grad for value in parts.values())


def test_discriminator_loss_without_perturbed_samples():
    logits_real, logits_fake = torch.tensor([0.5, -1.0]), torch.tensor([0.25, 1.0])
    empty = torch.zeros(0)
    loss, parts = discriminator_loss(logits_real, logits_fake, empty, empty, empty, 0.25, 0.01, 0.01)
    assert parts["r1"].item() == 0.0 and parts["r2"].item() == 0.0
    expected = relativistic_loss(logits_real, logits_fake) + 0.01 * ((logits_real + logits_fake) ** 2).mean()
    assert torch.allclose(loss, expected)


@pytest.mark.parametrize(
    "batch_size, ratio, expected", [(8, 0.25, 2), (7, 0.25, 2), (30, 0.1, 3), (8, 0.0, 0), (8, 1.0, 8), (1, 0.01, 1)]
)
def test_perturbed_batch_size(batch_size, ratio, expected):
    assert perturbed_batch_size(batch_size, ratio) == expected


def test_perturbed_batch_size_rejects_bad_ratio():
    with pytest.raises(ValueError, match="gp_batch_ratio"):
        perturbed_batch_size(8, 1.5)


def test_approximated_r1_converges_to_the_exact_gradient_penalty():
    # A smooth toy discriminator D(x) = sum(tanh(A x)) and many Gaussian directions n.
    torch.manual_seed(0)
    matrix = torch.randn(6, 6, dtype=torch.float64) / 6**0.5
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)

    def discriminator(samples):
        return torch.tanh(samples @ matrix.T).sum(dim=-1)

    (grad,) = torch.autograd.grad(discriminator(x), x)
    directions = torch.randn(20000, 6, dtype=torch.float64)
    exact = ((directions @ grad) ** 2).mean()  # E_n (grad_x D . n)^2
    # E[(g . n)^2] = |g|^2 for n ~ N(0, I), up to Monte-Carlo error (~1% here).
    assert exact.item() == pytest.approx(grad.square().sum().item(), rel=0.05)

    errors = []
    ones = torch.ones(len(directions))
    x = x.detach()
    for eps in (0.2, 0.1, 0.05, 0.02):
        logits = discriminator(x).expand(len(directions))
        logits_perturbed = discriminator(x + eps * directions)
        approx = approximated_gradient_penalty(logits_perturbed, logits, ones, gp_scale=1.0, gp_eps=eps)
        errors.append(abs(approx.item() - exact.item()) / exact.item())
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 2e-3, errors


def test_ot_loss_hand_value():
    x_fake = torch.tensor([[1.0, 1.0], [0.0, 2.0]]).reshape(2, 1, 1, 2)
    x_src = torch.zeros(2, 1, 1, 2)
    # per-sample mean squared distance [1, 2], divided by w = [0.5, 2] -> [2, 1]
    assert ot_loss(x_fake, x_src, torch.tensor([0.5, 2.0])).item() == pytest.approx(1.5)


def test_generator_loss_adds_the_scaled_ot_term():
    logits_fake, logits_real = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])
    x_fake, x_src = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    weight = torch.tensor([1.0, 0.5])
    loss, parts = generator_loss(logits_fake, logits_real, x_fake, x_src, weight, ot_scale=0.2)
    adversarial = (softplus(1.0) + softplus(0.0)) / 2
    ot = (1.0 / 1.0 + 1.0 / 0.5) / 2
    assert parts["adversarial"].item() == pytest.approx(adversarial, rel=1e-6)
    assert parts["ot"].item() == pytest.approx(ot, rel=1e-6)
    assert loss.item() == pytest.approx(adversarial + 0.2 * ot, rel=1e-6)
    assert set(parts) == {"loss_g", "adversarial", "ot"}


# ----------------------------------------------------------------------------------------------
# gradient normalization


@pytest.mark.parametrize("sequence_name", ["same", "scaled"])
def test_gradient_normalization_reproduces_the_reference(sequence_name):
    fixture = load_file(FIXTURES / "grad_norm.safetensors")
    grad_norm = GradientNormalization(ema_decay=0.9, eps=1e-8)
    for call in range(3):
        hidden_states = fixture["input"].clone().requires_grad_()
        output = grad_norm(hidden_states)
        assert torch.equal(output, fixture["input"])
        output.backward(fixture[f"{sequence_name}.grad_upstream.{call}"])
        assert torch.equal(hidden_states.grad, fixture[f"{sequence_name}.grad_in.{call}"])
        assert torch.equal(grad_norm.square_avg, fixture[f"{sequence_name}.square_avg.{call}"])
    state_dict = grad_norm.state_dict()
    assert list(state_dict) == ["square_avg"]
    assert torch.equal(state_dict["square_avg"], fixture[f"{sequence_name}.state_dict.square_avg"])


def test_gradient_normalization_state_dict_resumes_the_average():
    fixture = load_file(FIXTURES / "grad_norm.safetensors")
    grad_norm = GradientNormalization()
    grad_norm.load_state_dict({"square_avg": fixture["scaled.square_avg.1"]})
    hidden_states = fixture["input"].clone().requires_grad_()
    grad_norm(hidden_states).backward(fixture["scaled.grad_upstream.2"])
    assert torch.equal(hidden_states.grad, fixture["scaled.grad_in.2"])


def test_gradient_normalization_keeps_a_float32_statistic_for_bf16():
    grad_norm = GradientNormalization()
    hidden_states = torch.randn(2, 3, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.full((2, 3), 2.0, dtype=torch.bfloat16)
    grad_norm(hidden_states).backward(grad)
    assert grad_norm.square_avg.dtype == torch.float32
    assert grad_norm.square_avg.item() == pytest.approx(0.1 * 4.0 * 6 * 6)  # (1 - 0.9) * sum(g^2) * numel
    assert hidden_states.grad.dtype == torch.bfloat16
    assert torch.allclose(hidden_states.grad.float(), torch.full((2, 3), 2.0 / math.sqrt(14.4)), rtol=1e-2)


# ----------------------------------------------------------------------------------------------
# schedules


def test_constant_linear_cosine_values():
    assert constant(0.3)(0) == 0.3 and constant(0.3)(10**9) == 0.3
    ramp = linear(1.0, 0.0, 100)
    assert [ramp(step) for step in (0, 50, 100, 1000)] == [1.0, 0.5, 0.0, 0.0]
    decay = cosine(0.2, 0.005, 1_000_000)
    assert decay(0) == pytest.approx(0.2)
    assert decay(500_000) == pytest.approx((0.2 + 0.005) / 2)
    assert decay(250_000) == pytest.approx(0.005 + 0.195 * (1 + math.cos(math.pi / 4)) / 2)
    assert decay(1_000_000) == pytest.approx(0.005) and decay(3_000_000) == pytest.approx(0.005)


def test_sequence_gives_each_piece_its_local_step():
    schedule = sequence([(constant(1.0), 10), (linear(1.0, 0.0, 10), 10), (linear(0.0, 1.0, 4), 1)])
    assert [schedule(step) for step in (0, 9, 10, 15, 19, 20, 22, 24, 100)] == [
        1.0, 1.0, 1.0, 0.5, pytest.approx(0.1), 0.0, 0.5, 1.0, 1.0,
    ]


def test_parse_schedule_builds_the_same_schedules():
    assert parse_schedule(0.25)(123) == 0.25
    spec = {"type": "cosine", "start": 0.2, "end": 0.005, "steps": 1_000_000}
    parsed, direct = parse_schedule(spec), cosine(0.2, 0.005, 1_000_000)
    assert all(parsed(step) == direct(step) for step in (0, 1, 400_000, 1_000_000, 2_000_000))
    chained = parse_schedule(
        {
            "type": "sequence",
            "parts": [
                {"type": "constant", "value": 2, "duration": 5},
                {"type": "linear", "start": 2, "end": 0, "steps": 4},  # last part: duration optional
            ],
        }
    )
    assert [chained(step) for step in (0, 4, 5, 7, 9, 50)] == [2.0, 2.0, 2.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"type": "exponential"}, "field `type` must be one of"),
        ({"start": 1.0}, "missing field `type`"),
        ({"type": "cosine", "start": 1.0, "end": 0.0}, "missing field `steps`"),
        ({"type": "linear", "start": 1.0, "end": 0.0, "steps": 0}, "field `steps` must be a positive integer"),
        ({"type": "cosine", "start": "big", "end": 0.0, "steps": 5}, "field `start` must be a number"),
        ({"type": "constant"}, "missing field `value`"),
        ({"type": "sequence", "parts": []}, "field `parts` must be a non-empty list"),
        (
            {"type": "sequence", "parts": [{"type": "constant", "value": 1}, 0.5]},
            r"parts\[0\]: missing field `duration`",
        ),
        ({"type": "sequence", "parts": [{"type": "constant", "value": 1, "duration": 2}, 0.5]}, "must be a dict"),
        ("0.2", "must be a number or a dict"),
    ],
)
def test_parse_schedule_errors_name_the_field(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_schedule(spec)


def test_schedules_reject_bad_steps():
    with pytest.raises(ValueError, match="`steps` must be a positive integer"):
        cosine(1.0, 0.0, 0)


# ----------------------------------------------------------------------------------------------
# discriminator augmentation


def positive_images(batch_size: int, seed: int = 0) -> torch.Tensor:
    """Images with no zero pixel, so that zeros in the output mark translated-out or erased pixels."""
    return 1.0 + torch.rand(batch_size, 2, 16, 16, generator=seeded(seed))


def test_augment_p0_returns_the_inputs():
    real, fake = positive_images(2), positive_images(2, seed=1)
    real_aug, fake_aug = augment_pair(real, fake, p=0.0)
    assert real_aug is real and fake_aug is fake


def test_augment_p1_changes_every_sample():
    real, fake = positive_images(6), positive_images(6, seed=1)
    real_aug, fake_aug = augment_pair(real, fake, p=1.0, generator=seeded())
    assert real_aug.shape == real.shape
    for index in range(6):
        assert not torch.equal(real_aug[index], real[index]) and not torch.equal(fake_aug[index], fake[index])


def test_augment_applies_the_same_transform_to_real_and_fake():
    real = positive_images(8)
    real_aug, fake_aug = augment_pair(real, real.clone(), p=1.0, generator=seeded())
    assert torch.equal(real_aug, fake_aug)
    # A different fake: the same pixels move and the same pixels are erased.
    fake = -3.0 * real
    real_aug, fake_aug = augment_pair(real, fake, p=1.0, generator=seeded(1))
    assert torch.equal(real_aug == 0, fake_aug == 0)
    assert torch.equal(fake_aug, -3.0 * real_aug)


def test_augment_draws_an_independent_transform_per_sample():
    real = positive_images(1).expand(8, -1, -1, -1).contiguous()
    real_aug, _ = augment_pair(real, real, p=1.0, generator=seeded())
    erased = real_aug == 0
    assert len({tuple(mask.flatten().tolist()) for mask in erased}) == 8


def changed(augmented: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    return (augmented != original).flatten(1).any(dim=1)  # (N,)


def test_augment_draws_each_operation_independently_per_sample():
    """The reference: translation and each erasing on its own p-coin; at p = 0.4 a sample is left
    untouched with probability 0.6^4 = 0.13 (one coin for the whole chain would leave 0.6)."""
    real = positive_images(4000)
    real_aug, fake_aug = augment_pair(real, real, p=0.4, generator=seeded())
    untouched = ~changed(real_aug, real)
    # A translation drawn as (0, 0) also leaves a sample as it was: 1 in 11^2 here (16 px, 30%).
    expected = 0.6**4 * (1 + 0.4 / 0.6 / 121)
    assert abs(untouched.float().mean().item() - expected) < 0.02
    assert torch.equal(real_aug, fake_aug)
    assert (real_aug[~untouched] == 0).flatten(1).any(dim=1).all()


@pytest.mark.parametrize("p", [0.25, 0.4, 0.8])
def test_augment_each_operation_applies_at_rate_p(p):
    real = positive_images(4000)
    translated, _ = augment_pair(real, real, p=p, num_erasing=0, generator=seeded(1))
    rate = changed(translated, real).float().mean().item()
    assert abs(rate - p * (1 - 1 / 121)) < 0.025  # a (0, 0) shift changes nothing
    erased, _ = augment_pair(real, real, p=p, translation=0.0, num_erasing=1, generator=seeded(2))
    assert abs(changed(erased, real).float().mean().item() - p) < 0.025
    # Three erasings with independent coins: some erased rectangle with probability 1 - (1 - p)^3.
    erased3, _ = augment_pair(real, real, p=p, translation=0.0, num_erasing=3, generator=seeded(3))
    assert abs(changed(erased3, real).float().mean().item() - (1 - (1 - p) ** 3)) < 0.025


def test_augment_erasing_covers_ten_to_fifty_percent():
    real = positive_images(200)
    real_aug, _ = augment_pair(real, real, p=1.0, translation=0.0, num_erasing=1, generator=seeded())
    erased_fraction = (real_aug[:, 0] == 0).float().mean(dim=(1, 2))
    assert (erased_fraction > 0.07).all() and (erased_fraction < 0.56).all()
    assert erased_fraction.min() < 0.2 and erased_fraction.max() > 0.4
    # the same rectangle in every channel
    assert torch.equal(real_aug[:, 0] == 0, real_aug[:, 1] == 0)


def shifted_with_zeros(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """`image` (C, H, W) moved down by dy and right by dx, vacated pixels 0 (an independent reference)."""
    out = torch.zeros_like(image)
    height, width = image.shape[-2:]
    out[:, max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = image[
        :, max(-dy, 0) : height - max(dy, 0), max(-dx, 0) : width - max(dx, 0)
    ]
    return out


def test_translate_moves_whole_pixels_with_zero_padding():
    images = positive_images(3)
    shift_y, shift_x = torch.tensor([2, -3, 0]), torch.tensor([-1, 4, 0])
    out = translate(images, shift_y, shift_x)
    for index in range(3):
        expected = shifted_with_zeros(images[index], int(shift_y[index]), int(shift_x[index]))
        assert torch.equal(out[index], expected)


def test_augment_translation_stays_within_range():
    real = positive_images(20)
    real_aug, _ = augment_pair(real, real, p=1.0, translation=0.3, num_erasing=0, generator=seeded())
    max_shift = round(0.3 * 16)
    shifts = [(dy, dx) for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)]
    found = []
    for index in range(20):
        matches = [s for s in shifts if torch.equal(real_aug[index], shifted_with_zeros(real[index], *s))]
        assert len(matches) == 1
        found.append(matches[0])
    assert len(set(found)) > 10


# ----------------------------------------------------------------------------------------------
# EMA


def toy_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model.train()(torch.randn(5, 3))  # moves the BatchNorm running statistics and counter
    return model


class Wrapper(nn.Module):
    """Stands in for DDP / accelerate: the trained model is `.module`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def test_ema_holds_a_frozen_copy():
    model = toy_model(0)
    ema = ModelEMA(Wrapper(model))
    averaged = ema.full_model()
    assert not averaged.training and not any(p.requires_grad for p in averaged.parameters())
    assert averaged[0].weight is not model[0].weight
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), model.state_dict().values()))


def test_ema_decay_zero_copies_and_decay_one_keeps():
    ema = ModelEMA(toy_model(0))
    initial = {name: value.clone() for name, value in ema.state_dict().items()}
    other = toy_model(1)
    other(torch.randn(2, 3))
    ema.update(Wrapper(other), decay=1.0)
    kept = [name for name in initial if name != "1.num_batches_tracked"]  # the counter is copied
    assert all(torch.equal(ema.state_dict()[name], initial[name]) for name in kept)
    ema.update(other, decay=0.0)
    assert all(torch.equal(ema.state_dict()[name], value) for name, value in other.state_dict().items())


def test_ema_lerps_parameters_and_floating_buffers():
    model = toy_model(0)
    ema = ModelEMA(model)
    before = {name: value.clone() for name, value in ema.state_dict().items()}
    other = toy_model(1)
    other[1].num_batches_tracked.fill_(7)
    ema.update(Wrapper(other), decay=0.75)
    after = ema.state_dict()
    for name in ("0.weight", "0.bias", "1.weight", "1.running_mean", "1.running_var"):
        expected = 0.75 * before[name] + 0.25 * other.state_dict()[name]
        assert torch.allclose(after[name], expected, atol=1e-6), name
    assert after["1.num_batches_tracked"].item() == 7  # integer buffers are copied


def test_ema_state_dict_round_trip_and_copy_to():
    ema = ModelEMA(toy_model(0))
    ema.update(toy_model(1), decay=0.5)
    restored = ModelEMA(toy_model(2))
    restored.load_state_dict(ema.state_dict())
    assert all(torch.equal(restored.state_dict()[name], value) for name, value in ema.state_dict().items())
    target = toy_model(3)
    restored.copy_to(Wrapper(target))
    assert all(torch.equal(target.state_dict()[name], value) for name, value in ema.state_dict().items())
