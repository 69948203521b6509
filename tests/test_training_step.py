"""The AFM training step: what it calls, what it updates, and what it leaves alone."""

import pytest
import torch
from accelerate import Accelerator
from conftest import randomize_, tiny_generator_config

from diffusers_afm import AdversarialFlowDiscriminator, AdversarialFlowTransformer2DModel
from diffusers_afm.training import AFMObjective, AFMTrainingStep, GradientNormalization, ModelEMA, constant


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _setup(nfe=1, mixed_precision="no", **objective):
    torch.manual_seed(0)
    multi = nfe != 1
    gen = AdversarialFlowTransformer2DModel(**tiny_generator_config(
        use_timestep_src=multi, use_timestep_tgt=nfe is None, nfe=nfe,
        prediction_type="velocity" if multi else "sample"))
    dis = randomize_(AdversarialFlowDiscriminator(**tiny_generator_config(use_timestep=multi)))
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    opt_g = torch.optim.AdamW(gen.parameters(), lr=1e-3, betas=(0.0, 0.9))
    opt_d = torch.optim.AdamW(dis.parameters(), lr=1e-3, betas=(0.0, 0.9))
    gen, dis, opt_g, opt_d = accelerator.prepare(gen, dis, opt_g, opt_d)
    ema = ModelEMA(gen)
    step = AFMTrainingStep(
        accelerator, gen, dis, opt_g, opt_d,
        AFMObjective(nfe=nfe, prediction_type="velocity" if multi else "sample", **objective),
        grad_norm=GradientNormalization(), ema=ema, ema_decay=0.5,
        noise_generator=torch.Generator().manual_seed(0),
    )
    return step, gen, dis, ema


def _batch(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("nfe", [1, 2, None])
def test_one_discriminator_call_per_step_and_no_unused_forward(nfe):
    step, gen, dis, _ = _setup(nfe)
    d_batches, g_batches = [], []
    dis.register_forward_hook(lambda m, args, out: d_batches.append(args[0].shape[0]))
    gen.register_forward_hook(lambda m, args, out: g_batches.append(args[0].shape[0]))
    x0, labels = _batch(8)
    logs = step(x0, labels, 0)
    # D step: real, fake, and ceil(0.25 * 8) = 2 perturbed real and 2 perturbed fake in ONE call;
    # G step: fake and real in one call. The generator runs once per step.
    assert d_batches == [8 + 8 + 2 + 2, 8 + 8]
    assert g_batches == [8, 8]
    for key in ("loss_d", "relativistic", "r1", "r2", "centering", "loss_g", "adversarial", "ot",
                "grad_norm_d", "grad_norm_g", "logits_real", "logits_fake", "ot_scale"):
        assert key in logs and torch.isfinite(logs[key]).all(), key


def test_each_step_updates_only_its_network():
    step, gen, dis, ema = _setup()
    x0, labels = _batch()
    g0 = {k: v.clone() for k, v in gen.state_dict().items()}
    d0 = {k: v.clone() for k, v in dis.state_dict().items()}
    step.discriminator_step(x0, labels, 0)
    assert all(torch.equal(v, gen.state_dict()[k]) for k, v in g0.items())
    assert any(not torch.equal(v, dis.state_dict()[k]) for k, v in d0.items())

    d1 = {k: v.clone() for k, v in dis.state_dict().items()}
    assert float(step.grad_norm.square_avg) == 0.0
    step.generator_step(x0, labels, 1)
    assert all(torch.equal(v, dis.state_dict()[k]) for k, v in d1.items())
    assert all(p.grad is None for p in dis.parameters())  # the critic took no gradient
    assert all(p.requires_grad for p in dis.parameters())  # and is trainable again
    assert any(not torch.equal(v, gen.state_dict()[k]) for k, v in g0.items())
    assert float(step.grad_norm.square_avg) > 0.0  # gradient normalization saw the adversarial gradient


def test_ema_follows_each_iteration():
    step, gen, _, ema = _setup()
    g0 = {k: v.clone() for k, v in gen.state_dict().items()}
    step(*_batch(), 0)
    # EMA with decay 0.5 is halfway between the initial and the new weights.
    name = "proj_out.weight"
    torch.testing.assert_close(ema.full_model().state_dict()[name], 0.5 * (g0[name] + gen.state_dict()[name]))


def test_ot_term_pulls_the_generator_to_the_identity():
    """With a huge OT weight the generator learns G(z) ~ z (the transport cost falls)."""
    step, gen, _, _ = _setup(ot_scale=constant(1000.0))
    x0, labels = _batch(16)
    z = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    before = (gen(z, labels).sample - z).square().mean().item()
    for i in range(30):
        step(x0, labels, i)
    after = (gen(z, labels).sample - z).square().mean().item()
    assert after < 0.9 * before


def test_objective_rejects_bad_settings():
    with pytest.raises(ValueError, match="gp_scale"):
        AFMObjective(gp_scale=-1.0)
    with pytest.raises(ValueError, match="gp_eps"):
        AFMObjective(gp_eps=0.0)
    with pytest.raises(ValueError, match="gp_batch_ratio"):
        AFMObjective(gp_batch_ratio=2.0)
    with pytest.raises(ValueError, match="prediction_type"):
        AFMObjective(prediction_type="epsilon")


# ----------------------------------------------------------------------------- precision of R1/R2
def test_discriminator_runs_its_first_samples_in_full_precision_under_autocast():
    dis = randomize_(AdversarialFlowDiscriminator(**tiny_generator_config(use_timestep=True)))
    x, labels = _batch(6)
    t = torch.rand(6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = dis(x, labels, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = dis(x, labels, t)
            split = dis(x, labels, t, full_precision_samples=4)
    torch.testing.assert_close(split[:4], reference[:4], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split[4:], rounded[4:], rtol=1e-5, atol=1e-6)  # the rest stays in bf16
    assert not torch.allclose(rounded[:4], reference[:4], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="full_precision_samples"):
        dis(x, labels, t, full_precision_samples=7)


def _penalties(mixed_precision, gp_full_precision, steps=4):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # each call its own precision
    step, _, dis, _ = _setup(mixed_precision=mixed_precision, gp_full_precision=gp_full_precision, gp_batch_ratio=0.5)
    x0, labels = _batch(16)
    with torch.no_grad():
        for p in dis.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    step.optimizer_d.param_groups[0]["lr"] = 0.0  # the same discriminator at every step
    logs = [step.discriminator_step(x0, labels, i) for i in range(steps)]
    return torch.stack([l["r1"] for l in logs]).mean().item(), torch.stack([l["r2"] for l in logs]).mean().item()


def test_bf16_gives_the_fp32_penalty_with_the_full_precision_split():
    """The approximated R1/R2 under bf16 autocast: within 10% of fp32 with the split (the default),
    inflated by rounding without it."""
    fp32 = _penalties("no", True)
    fixed = _penalties("bf16", True)
    rounded = _penalties("bf16", False)
    for reference, value in zip(fp32, fixed):
        assert abs(value / reference - 1) < 0.1
    assert max(value / reference for reference, value in zip(fp32, rounded)) > 1.5
