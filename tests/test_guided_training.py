"""The guided phase: the classifier-guidance term, --init_from, autoreload, the classifier's augmentation."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from accelerate import Accelerator
from conftest import REPO
from safetensors.torch import load_file

from diffusers_afm import AdversarialFlowClassifier, AdversarialFlowDiscriminator, AdversarialFlowTransformer2DModel
from diffusers_afm.training import (
    AFMObjective,
    AFMTrainingStep,
    GradientNormalization,
    ModelEMA,
    classifier_guidance_term,
    constant,
)
from diffusers_afm.training.augment import random_affine

import train_afm

TINY = str(REPO / "tests" / "fixtures" / "tiny_model.json")
TINY_TRUNK = dict(sample_size=8, patch_size=2, in_channels=1, num_layers=2, num_attention_heads=2, attention_head_dim=16)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


class BrightnessClassifier(nn.Module):
    """A fixed 2-class classifier: class 0 = bright on average, class 1 = dark. Records its inputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, hidden_states, timestep):
        self.calls.append((hidden_states.detach().clone(), timestep.detach().clone()))
        brightness = 4.0 * hidden_states.flatten(1).mean(1)
        return torch.stack([brightness, -brightness], dim=1)


def _training_step(classifier, nfe=1, cg_scale=1.0, seed=0):
    torch.manual_seed(seed)
    multi = nfe != 1
    prediction_type = "velocity" if multi else "sample"
    generator = AdversarialFlowTransformer2DModel(**TINY_TRUNK, num_classes=2, nfe=nfe, prediction_type=prediction_type,
                                                  use_timestep_src=multi, use_timestep_tgt=nfe is None)
    discriminator = AdversarialFlowDiscriminator(**TINY_TRUNK, num_classes=2, use_timestep=multi)
    accelerator = Accelerator(cpu=True)
    opt_g = torch.optim.AdamW(generator.parameters(), lr=1e-3, betas=(0.0, 0.9))
    opt_d = torch.optim.AdamW(discriminator.parameters(), lr=1e-3, betas=(0.0, 0.9))
    generator, discriminator, opt_g, opt_d = accelerator.prepare(generator, discriminator, opt_g, opt_d)
    objective = AFMObjective(nfe=nfe, prediction_type=prediction_type, ot_scale=constant(0.2), cg_scale=cg_scale)
    step = AFMTrainingStep(accelerator, generator, discriminator, opt_g, opt_d, objective,
                           grad_norm=GradientNormalization(), ema=ModelEMA(generator), ema_decay=0.0,
                           classifier=classifier, noise_generator=torch.Generator().manual_seed(seed))
    return step, generator


def _target_probability(generator, classifier, labels, seed=123):
    """Mean probability the classifier gives each sample's requested class, on fresh noise."""
    z = torch.randn(labels.shape[0], 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = classifier(generator(z, labels).sample, torch.zeros(labels.shape[0]))
    return logits.softmax(-1).gather(1, labels[:, None]).mean().item()


def test_guidance_moves_the_generator_toward_the_target_class():
    """Data without any class signal: only the guidance term can make class 0 bright and class 1 dark."""
    g = torch.Generator().manual_seed(1)
    x0, labels = 0.5 * torch.randn(16, 1, 8, 8, generator=g), torch.arange(16) % 2
    probability = {}
    for cg_scale in (0.0, 1.0):
        classifier = BrightnessClassifier()
        step, generator = _training_step(classifier if cg_scale else None, cg_scale=cg_scale)
        before = _target_probability(generator, classifier, labels)
        # About 20 steps pass before the class embedding reaches the output (adaLN-Zero starts closed).
        for i in range(30):
            step(x0, labels, i)
        probability[cg_scale] = (before, _target_probability(generator, classifier, labels))
    (unguided_before, unguided_after), (guided_before, guided_after) = probability[0.0], probability[1.0]
    assert guided_before == pytest.approx(0.5) and unguided_before == pytest.approx(0.5)  # adaLN-Zero: G = 0
    assert guided_after > 0.8
    assert abs(unguided_after - 0.5) < 0.1


def _cross_entropy_by_hand(logits, labels):
    """-log softmax(logits)[label], per sample, written out (an independent reference)."""
    return torch.stack([torch.logsumexp(row, 0) - row[label] for row, label in zip(logits, labels)])


def test_guidance_renoises_the_fake_at_1_nfe():
    """docs/method.md: 1 NFE scores interp(fake, z', u) with u ~ U(0, cg_max_time), not the fake itself."""
    classifier = BrightnessClassifier()
    fake = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    labels = torch.zeros(256, dtype=torch.long)
    term = classifier_guidance_term(classifier, fake, labels, torch.zeros(256), nfe=1, cg_max_time=0.1,
                                    generator=torch.Generator().manual_seed(0))
    (x_u, u), = classifier.calls
    assert (u >= 0).all() and (u < 0.1).all() and u.std() > 0.01
    noise = (x_u - (1 - u)[:, None, None, None] * fake) / u[:, None, None, None]  # z' recovered
    assert abs(noise.std().item() - 1.0) < 0.05 and abs(noise.mean().item()) < 0.05
    torch.testing.assert_close(term, _cross_entropy_by_hand(classifier(x_u, u), labels).mean())


@pytest.mark.parametrize("nfe", [2, 4, None])
def test_guidance_scores_the_fake_as_it_is_and_averages_over_the_whole_batch_when_multi_step(nfe):
    """Multi-step: x_t_fake already lies at t, so C(x_t_fake, t) on it unchanged (no re-noising), only
    where t <= cg_max_time, summed and divided by the WHOLE batch size (the reference's normalisation)."""
    classifier = BrightnessClassifier()
    fake = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 1, 0])
    t = torch.tensor([0.0, 0.5, 0.25, 0.75])  # 0.25: a 4-NFE target time that must not be re-noised
    term = classifier_guidance_term(classifier, fake, labels, t, nfe=nfe, cg_max_time=0.49)
    (x_u, u), = classifier.calls
    assert torch.equal(x_u, fake) and torch.equal(u, t)
    per_sample = _cross_entropy_by_hand(classifier(fake, t), labels)
    torch.testing.assert_close(term, (per_sample[0] + per_sample[2]) / 4)


def test_guidance_accepts_an_output_with_logits_and_counts_nothing_past_cg_max_time():
    class WithLogits(nn.Module):
        def forward(self, hidden_states, timestep):
            return SimpleNamespace(logits=torch.stack([hidden_states.flatten(1).mean(1), timestep], 1))

    fake, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 0])
    t = torch.tensor([0.2, 0.3, 0.6])
    logits = torch.stack([fake.flatten(1).mean(1), t], 1)
    expected = _cross_entropy_by_hand(logits, labels)[:2].sum() / 3
    torch.testing.assert_close(classifier_guidance_term(WithLogits(), fake, labels, t, nfe=2, cg_max_time=0.49), expected)
    late = torch.full((3,), 0.9)
    assert classifier_guidance_term(WithLogits(), fake, labels, late, nfe=2, cg_max_time=0.49).item() == 0.0


def test_the_training_step_adds_the_guidance_term_it_logs():
    """The G step's loss is the unguided loss plus cg_scale times `classifier_guidance_term`."""
    classifier = BrightnessClassifier()
    step, _ = _training_step(classifier, nfe=2, cg_scale=0.02)
    g = torch.Generator().manual_seed(1)
    x0, labels = torch.randn(8, 1, 8, 8, generator=g), torch.arange(8) % 2
    logs = step(x0, labels, 0)
    torch.testing.assert_close(logs["loss_g"], logs["adversarial"] + logs["ot_scale"] * logs["ot"] + 0.02 * logs["guidance"])
    (x_u, u), = classifier.calls  # multi-step: one classifier call on the fakes as they are
    assert set(u.tolist()) <= {0.0, 0.5}


# ----------------------------------------------------------------------------- --init_from, --autoreload_steps
def _train(out, *flags):
    return train_afm.main(["--output_dir", str(out), "--model_config", TINY, "--train_batch_size", "8",
                           "--report_to", "none", "--num_validation_classes", "2", "--num_validation_images", "1",
                           *flags])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from accelerate.state import AcceleratorState

    out = tmp_path_factory.mktemp("base") / "run"
    AcceleratorState._reset_state(True)
    _train(out, "--max_train_steps", "2")
    AcceleratorState._reset_state(True)
    return out


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_then_autoreload(tmp_path, finished_run):
    out = tmp_path / "guided"
    # A different seed: a freshly built model would be far from the finished run's weights.
    _train(out, "--init_from", str(finished_run), "--autoreload_steps", "2", "--checkpointing_steps", "1",
           "--max_train_steps", "2", "--seed", "1", "--lr_scheduler", "linear")
    start_g = load_file(finished_run / "transformer" / "diffusion_pytorch_model.safetensors")
    start_d = load_file(finished_run / "discriminator" / "diffusion_pytorch_model.safetensors")

    # Step 1: both networks trained one step away from the finished run's EMA generator and discriminator.
    g1 = load_file(out / "checkpoint-1" / "model.safetensors")
    d1 = load_file(out / "checkpoint-1" / "model_1.safetensors")
    assert not _equal(g1, start_g) and not _equal(d1, start_d)
    assert max((g1[k] - start_g[k]).abs().max().item() for k in g1) < 5e-3
    assert max((d1[k] - start_d[k]).abs().max().item() for k in d1) < 5e-3

    # Step 2 autoreloads: the generator is its EMA, the discriminator the phase's starting one.
    g2 = load_file(out / "checkpoint-2" / "model.safetensors")
    assert _equal(g2, load_file(out / "checkpoint-2" / "ema.safetensors"))
    assert _equal(load_file(out / "checkpoint-2" / "model_1.safetensors"), start_d)
    assert _equal(load_file(out / "discriminator" / "diffusion_pytorch_model.safetensors"), start_d)

    # The LR schedulers step with the optimizers: halfway down the linear decay from 3e-4 (the digits default).
    lr_g = torch.load(out / "checkpoint-1" / "optimizer.bin", weights_only=True)["param_groups"][0]["lr"]
    assert lr_g == pytest.approx(3e-4 / 2)


def test_init_from_rejects_another_architecture(tmp_path, finished_run):
    with pytest.raises(ValueError, match=r"`--init_from` .*transformer has use_timestep_src=False, but this run builds"):
        _train(tmp_path / "run", "--init_from", str(finished_run), "--nfe", "2", "--max_train_steps", "1")
    with pytest.raises(ValueError, match="--init_from"):
        _train(tmp_path / "run", "--init_from", str(tmp_path / "nothing"), "--max_train_steps", "1")


def test_classifier_must_fit_the_generator(tmp_path):
    folder = tmp_path / "classifier"
    AdversarialFlowClassifier(**TINY_TRUNK, num_classes=3).save_pretrained(folder)
    with pytest.raises(ValueError, match="`--classifier` .* num_classes=3, but the generator has num_classes=10"):
        _train(tmp_path / "run", "--classifier", str(folder), "--max_train_steps", "1")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--autoreload_steps", "5"], "--autoreload_steps"),
        (["--cg_scale", "0.1"], "--cg_scale"),
        (["--cg_max_time", "0"], "--cg_max_time"),
        (["--classifier", "/no/such/folder"], "--classifier"),
    ],
)
def test_guided_flags_fail_before_training(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        _train(tmp_path / "run", *flags)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the classifier's augmentation
def test_random_affine():
    images = torch.randn(64, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    assert random_affine(images, 0.0) is images
    identity = random_affine(images, 1.0, max_rotation=0.0, scale=(1.0, 1.0), translation=0.0)
    torch.testing.assert_close(identity, images)
    a = random_affine(images, 0.5, generator=torch.Generator().manual_seed(1))
    b = random_affine(images, 0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    changed = (a != images).flatten(1).any(1)
    assert 16 < changed.sum() < 48  # about half, and the others untouched bit for bit
    # Both channels of a sample get the same transform.
    torch.testing.assert_close(random_affine(images[:, :1].repeat(1, 2, 1, 1), 1.0, generator=torch.Generator().manual_seed(2))
                               .diff(dim=1).abs().max(), torch.tensor(0.0))
