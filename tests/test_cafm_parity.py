"""Continuous AFM against the authors' reference (tests/fixtures/cafm_sit, made with their classes).

The reference SiT generator and CAFM discriminator are converted into our models
(`convert_sit_generator`, `convert_cafm_discriminator`: the time and velocity flips folded into the
weights) and must reproduce the reference's outputs, JVPs, losses and every gradient to 1e-5.
"""

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from diffusers_afm.conversion import convert_cafm_discriminator, convert_sit_generator
from diffusers_afm.training.cafm import CAFMObjective, CAFMTrainingStep, is_discriminator_step
from diffusers_afm.training.flow_matching import drop_class_labels

FIXTURES = Path(__file__).parent / "fixtures" / "cafm_sit"
ATOL = 1e-5
NUM_HEADS = 4  # not a preset size: the head count cannot be read off the weights


def _meta():
    return json.loads((FIXTURES / "fixtures.json").read_text())


def _models():
    generator = convert_sit_generator(load_file(FIXTURES / "gen_state_dict.safetensors"), num_heads=NUM_HEADS)
    discriminator = convert_cafm_discriminator(load_file(FIXTURES / "dis_state_dict.safetensors"), num_heads=NUM_HEADS)
    return generator, discriminator


def _close(ours, reference, what, atol=ATOL):
    ours, reference = ours.detach(), reference.to(ours.dtype)
    error = (ours - reference).abs().max().item()
    assert error <= atol, f"{what}: max error {error:.3g} > {atol}"


def test_converted_configs_are_the_reference_models():
    generator, discriminator = _models()
    assert generator.config.num_classes == 10 and generator.null_class_id == 10  # 11 rows: 10 classes + null
    assert generator.config.time_scale == 1.0 and generator.out_channels == 4  # learn_sigma's half dropped
    assert discriminator.config.norm_type == "rms_norm" and discriminator.config.use_null_class
    assert isinstance(discriminator.transformer_blocks[0].norm2, torch.nn.RMSNorm)


@pytest.mark.parametrize("labels", ["y", "y_null", "y_mixed"])
def test_generator_velocity_matches_reference(labels):
    generator, _ = _models()
    io = load_file(FIXTURES / "gen_io.safetensors")
    with torch.no_grad():
        velocity = generator(io["input/x_t"], io["input/t"], io[f"input/{labels}"]).sample
        _close(velocity, io[f"f32/v_{labels}"], f"v_{labels}")
        velocity64 = generator.double()(io["input/x_t"].double(), io["input/t"].double(), io[f"input/{labels}"]).sample
        _close(velocity64, io[f"f64/v_{labels}"], f"f64 v_{labels}", atol=1e-9)


def test_discriminator_outputs_and_jvps_match_reference():
    _, discriminator = _models()
    io = load_file(FIXTURES / "dis_io.safetensors")
    x, t, y = io["input/x_t"], io["input/t"], io["input/y_mixed"]
    v_real, v_pred = io["f32/v_real"], io["f32/v_pred"]
    ones, zeros = torch.ones_like(t), torch.zeros_like(t)
    with torch.no_grad():
        _close(discriminator(x, y, t), io["f32/plain"], "plain")
        out, derivative = discriminator(x, y, t, tangents=(torch.stack([v_real, v_pred]), torch.stack([ones, ones])))
        assert out.shape == (8,) and derivative.shape == (2, 8)
        _close(out, io["f32/out_vmap"][0], "out (vmap)")
        _close(derivative, io["f32/jvp_vmap"], "jvp (vmap)")
        out, derivative = discriminator(x, y, t, tangents=(v_pred, ones))
        _close(out, io["f32/out_single"], "out (single)")
        _close(derivative, io["f32/jvp_single"], "jvp (single)")
        _close(discriminator(x, y, t, tangents=(v_real, zeros))[1], io["f32/jvp_dx_only"], "jvp (dx only)")
        _close(discriminator(x, y, t, tangents=(torch.zeros_like(x), ones))[1], io["f32/jvp_dt_only"], "jvp (dt only)")


def test_jvp_agrees_with_central_finite_difference_in_float64():
    _, discriminator = _models()
    discriminator = discriminator.double()
    io = load_file(FIXTURES / "dis_io.safetensors")
    x, t, y = io["input/x_t"].double(), io["input/t"].double(), io["input/y_mixed"]
    dx = io["f64/v_pred"]
    dt = torch.ones_like(t)
    eps = 1e-5
    with torch.no_grad():
        _, derivative = discriminator(x, y, t, tangents=(dx, dt))
        finite = (discriminator(x + eps * dx, y, t + eps * dt) - discriminator(x - eps * dx, y, t - eps * dt)) / (2 * eps)
    error = (derivative - finite).abs().max().item()
    assert error < 1e-7 * max(1.0, finite.abs().max().item()), error
    assert derivative.dtype == torch.float64


def _reference_grads(prefix, state_dict, convert):
    """The reference's gradients in our parameter layout: the converter's maps are linear (key
    renames, row selections, sign flips and the orthogonal, symmetric time-flip matrix), so they
    carry a gradient over exactly as they carry the weight."""
    grads = {k[len(prefix):]: v.float() for k, v in load_file(FIXTURES / "train_steps.safetensors").items() if k.startswith(prefix)}
    grads["pos_embed"] = state_dict["pos_embed"]  # frozen, no gradient; the converter checks it
    for key, value in state_dict.items():
        grads.setdefault(key, torch.zeros_like(value))  # parameters the step does not reach
    return convert(grads, num_heads=NUM_HEADS).state_dict()


@pytest.fixture
def cafm_step(fresh_accelerate_state):
    generator, discriminator = _models()
    generator.train()
    discriminator.train()
    accelerator = Accelerator(cpu=True)
    config = _meta()["files"]["train_steps.safetensors"]["trainer_config"]
    objective = CAFMObjective(cp_scale=config["adversarial"]["cp_scale"], ot_scale=config["adversarial"]["ot_scale"],
                              num_discriminator_steps=config["adversarial"]["N"], warmup=config["adversarial"]["warmup"])
    step = CAFMTrainingStep(accelerator, generator, discriminator, None, None, objective)
    return step, load_file(FIXTURES / "train_steps.safetensors")


def test_discriminator_step_losses_and_gradients_match_reference(cafm_step):
    step, ref = cafm_step
    inputs = [ref[f"input/{k}"] for k in ("latents", "labels", "noises", "timesteps")]
    loss, logs = step.discriminator_objective(*inputs)
    _close(loss, ref["f32/dstep/loss/loss/total"], "loss/total")
    _close(logs["loss_d_adv"], ref["f32/dstep/loss/loss/dis"], "loss/dis")
    _close(logs["loss_cp"], ref["f32/dstep/loss/loss/cp"], "loss/cp")
    _close(logs["derivative_real"], ref["f32/dstep/loss/logits/real"], "logits/real")
    _close(logs["derivative_fake"], ref["f32/dstep/loss/logits/fake"], "logits/fake")
    _close(logs["logits"], ref["f32/dstep/loss/logits/out"], "logits/out")
    loss.backward()
    assert all(p.grad is None for p in step.generator.parameters())  # the generator takes no gradient in a D step
    expected = _reference_grads("f32/dstep/grad/", load_file(FIXTURES / "dis_state_dict.safetensors"), convert_cafm_discriminator)
    for name, param in step.discriminator.named_parameters():
        _close(param.grad, expected[name], f"D grad {name}")


def test_generator_step_losses_and_gradients_match_reference(cafm_step):
    step, ref = cafm_step
    inputs = [ref[f"input/{k}"] for k in ("latents", "labels", "noises", "timesteps")]
    step.discriminator.requires_grad_(False)
    loss, logs, velocity_pred = step.generator_objective(*inputs)
    _close(velocity_pred, ref["f32/gstep/velocity_pred"], "velocity_pred")
    _close(loss, ref["f32/gstep/loss/loss/total"], "loss/total")
    _close(logs["loss_g_adv"], ref["f32/gstep/loss/loss/gen"], "loss/gen")
    _close(logs["loss_ot"], ref["f32/gstep/loss/loss/ot"], "loss/ot")
    _close(logs["derivative_fake_g"], ref["f32/gstep/loss/logits/fake"], "logits/fake")
    loss.backward()
    assert all(p.grad is None for p in step.discriminator.parameters())
    expected = _reference_grads("f32/gstep/grad/", load_file(FIXTURES / "gen_state_dict.safetensors"), convert_sit_generator)
    for name, param in step.generator.named_parameters():
        _close(param.grad, expected[name], f"G grad {name}")


def test_schedule_matches_reference():
    ref = load_file(FIXTURES / "train_steps.safetensors")
    ours = [is_discriminator_step(int(s), warmup=10_000, num_discriminator_steps=16) for s in ref["schedule/steps"]]
    assert ours == [bool(v) for v in ref["schedule/is_dis_step"].tolist()]
    # The first G step after the warm-up is the first step with step % 17 == 16 (the fixture's G step is 10029).
    assert [s for s in range(10_000, 10_030) if not is_discriminator_step(s, 10_000, 16)] == [10_012, 10_029]


def test_class_dropout_matches_reference_rate_and_null_id():
    ref = load_file(FIXTURES / "train_steps.safetensors")
    labels = ref["prepare/in_label"]
    # The reference draws with torch.rand after manual_seed; the same draw from a seeded generator.
    generator = torch.Generator().manual_seed(int(ref["prepare/manual_seed"]))
    ours = drop_class_labels(labels, 1000, 0.1, generator)
    assert torch.equal(ours, ref["prepare/out_labels"])
