"""JiT (`JiTTransformer2DModel`, `AdversarialFlowJiTDiscriminator`) against the CAFM authors' reference.

tests/fixtures/cafm_jit holds a subset of the fixtures made with the authors' JiT generator and
discriminator (on JiT's model_jit.py), their JVP wrapper and their `training_step` (a tiny JiT:
width 64, depth 4, 32x32 pixels, patch 8, 4 in-context tokens from block 2, 10 classes + null).
Their weights are converted with `convert_jit_generator` / `convert_jit_discriminator` and must
reproduce every output, JVP, loss and parameter gradient to 1e-5 relative; the float64 runs show
that float32 rounding is all that separates the two.
"""

import argparse
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from diffusers import DiffusionPipeline
from diffusers.models.attention_dispatch import AttentionBackendName
from safetensors.torch import load_file

from diffusers_afm import AdversarialFlowJiTDiscriminator, AFMPipeline, JiTTransformer2DModel
from diffusers_afm.conversion import convert_jit_discriminator, convert_jit_generator, infer_jit_config
from diffusers_afm.conversion.cli import main
from diffusers_afm.flow import in_guidance_interval, solver_nfe
from diffusers_afm.models import JIT_PRESETS
from diffusers_afm.models.modules import math_attention
from diffusers_afm.models.transformer_jit import jit_rotary_embedding
from diffusers_afm.training.cafm import (
    CAFMObjective,
    CAFMTrainingStep,
    drop_class_labels,
    is_discriminator_step,
    sample_times,
)

FIXTURES = Path(__file__).parent / "fixtures" / "cafm_jit"
SISTER = Path(__file__).parent / "fixtures" / "cafm_sit"
RTOL = 1e-5  # relative to the tensor's largest entry; float32 vs float64 in the fixtures is <= 2e-6
IN_CONTEXT_START = 2  # not a JiT preset: where the in-context tokens join is not in the weights


def _meta():
    return json.loads((FIXTURES / "fixtures.json").read_text())


def _models():
    generator = convert_jit_generator(load_file(FIXTURES / "gen_state_dict.safetensors"), in_context_start=IN_CONTEXT_START)
    discriminator = convert_jit_discriminator(load_file(FIXTURES / "dis_state_dict.safetensors"),
                                              in_context_start=IN_CONTEXT_START)
    return generator, discriminator


def _close(ours, reference, what, rtol=RTOL):
    ours, reference = ours.detach(), reference.to(ours.dtype)
    assert ours.shape == reference.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(reference.shape)}"
    error = (ours - reference).abs().max().item()
    scale = max(reference.abs().max().item(), 1e-30)
    assert error <= rtol * scale, f"{what}: max error {error:.3g} > {rtol} x {scale:.3g}"


def _x_t_float64(io):
    """`(1 - t) x0 + t z` in float64, as the reference's float64 runs form it."""
    t = io["input/t"].double().view(-1, 1, 1, 1)
    return (1 - t) * io["input/x0"].double() + t * io["input/z"].double()


# ----------------------------------------------------------------------------- the models
def test_converted_configs_are_the_reference_models():
    generator, discriminator = _models()
    kwargs = _meta()["constructor_kwargs"]["generator"]
    config = generator.config
    assert (config.sample_size, config.patch_size, config.num_layers, config.bottleneck_dim) == (
        kwargs["input_size"], kwargs["patch_size"], kwargs["depth"], kwargs["bottleneck_dim"])
    assert config.num_attention_heads == kwargs["num_heads"]  # read off the q/k norm's width
    assert (config.in_context_len, config.in_context_start) == (kwargs["in_context_len"], kwargs["in_context_start"])
    assert config.num_classes == 10 and generator.null_class_id == 10  # 11 rows: null = num_classes
    assert generator.class_embedder.embedding_table.weight.shape[0] == 11
    assert discriminator.config.use_null_class and discriminator.norm_out.eps == torch.finfo(torch.float32).eps


def test_rotary_tables_are_jits():
    io = load_file(FIXTURES / "gen_io.safetensors")
    for prefix, name in ((0, "feat_rope"), (4, "feat_rope_incontext")):
        cos, sin = jit_rotary_embedding(4, 16, prefix)
        assert torch.equal(cos, io[f"const/{name}.freqs_cos"]) and torch.equal(sin, io[f"const/{name}.freqs_sin"])


@pytest.mark.parametrize("labels", ["y", "y_null", "y_mixed"])
def test_generator_velocity_matches_reference(labels):
    generator, _ = _models()
    io = load_file(FIXTURES / "gen_io.safetensors")
    with torch.no_grad():
        velocity = generator(io["input/x_t"], io["input/t"], io[f"input/{labels}"]).sample
    _close(velocity, io[f"f32/v_{labels}"], f"v_{labels}")


def test_x_prediction_and_float64_velocity_match_reference():
    generator, _ = _models()
    io = load_file(FIXTURES / "gen_io.safetensors")
    dis_io = load_file(FIXTURES / "dis_io.safetensors")
    with torch.no_grad():
        x_pred = generator.predict_sample(io["input/x_t"], io["input/t"], io["input/y_mixed"])
        _close(x_pred, io["f32/x_pred_y_mixed"], "x_pred")
        generator = generator.double()
        velocity = generator(_x_t_float64(dis_io), io["input/t"].double(), io["input/y_mixed"]).sample
    assert velocity.dtype == torch.float64
    _close(velocity, io["f64/v_y_mixed"], "f64 v_y_mixed", rtol=1e-12)


def test_discriminator_outputs_and_jvps_match_reference():
    _, discriminator = _models()
    io = load_file(FIXTURES / "dis_io.safetensors")
    x, t, y = io["input/x_t"], io["input/t"], io["input/y_mixed"]
    v_real, v_pred = io["f32/v_real"], io["f32/v_pred"]
    ones, zeros = torch.ones_like(t), torch.zeros_like(t)
    with torch.no_grad():
        _close(discriminator(x, y, t), io["f32/plain"], "plain")
        out, derivative = discriminator(x, y, t, tangents=(torch.stack([v_real, v_pred]), torch.stack([ones, ones])))
        assert out.shape == (6,) and derivative.shape == (2, 6)
        _close(out, io["f32/out_vmap"][0], "out (vmap)")
        _close(derivative, io["f32/jvp_vmap"], "jvp (two tangents, vmap)")
        out, derivative = discriminator(x, y, t, tangents=(v_pred, ones))
        _close(out, io["f32/out_single"], "out (single)")
        _close(derivative, io["f32/jvp_single"], "jvp (one tangent)")
        _close(discriminator(x, y, t, tangents=(v_real, zeros))[1], io["f32/jvp_dx_only"], "jvp (space only)")
        _close(discriminator(x, y, t, tangents=(torch.zeros_like(x), ones))[1], io["f32/jvp_dt_only"], "jvp (time only)")


def test_discriminator_float64_matches_reference_and_finite_differences():
    _, discriminator = _models()
    discriminator = discriminator.double()
    io = load_file(FIXTURES / "dis_io.safetensors")
    x, t, y = _x_t_float64(io), io["input/t"].double(), io["input/y_mixed"]
    dx = load_file(FIXTURES / "gen_io.safetensors")["f64/v_y_mixed"]  # the same call as dis_io's v_pred
    dt = torch.ones_like(t)
    eps = 1e-5
    with torch.no_grad():
        out, derivative = discriminator(x, y, t, tangents=(dx, dt))
        finite = (discriminator(x + eps * dx, y, t + eps * dt) - discriminator(x - eps * dx, y, t - eps * dt)) / (2 * eps)
    _close(out, io["f64/plain"], "f64 plain", rtol=1e-12)
    _close(derivative, io["f64/jvp_single"], "f64 jvp", rtol=1e-12)
    _close(derivative, finite, "jvp vs central difference", rtol=1e-7)


def test_bf16_autocast_stays_close_to_float32():
    """Mixed precision as the trainers run it: the norms compute in float32 and the logit head runs
    in float32, so the JVP that the losses judge stays within bf16's rounding of the float32 one."""
    generator, discriminator = _models()
    io = load_file(FIXTURES / "dis_io.safetensors")
    x, t, y, v = io["input/x_t"], io["input/t"], io["input/y_mixed"], io["f32/v_pred"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        velocity = generator(x, t, y).sample
        out, derivative = discriminator(x, y, t, tangents=(v, torch.ones_like(t)))
    assert out.dtype == derivative.dtype == torch.float32
    _close(velocity.float(), v, "bf16 velocity", rtol=2e-2)
    _close(derivative, io["f32/jvp_single"], "bf16 jvp", rtol=2e-2)


def test_discriminator_starts_from_the_generator():
    generator, _ = _models()
    discriminator = AdversarialFlowJiTDiscriminator.for_transformer(generator)
    ours = discriminator.state_dict()
    for key, value in generator.state_dict().items():
        if not key.startswith(("norm_out.", "proj_out.")):
            assert torch.equal(ours[key], value), key  # the trunk, class table, time MLP, in-context tokens
    assert ours["proj_out.weight"].shape == (1, 64)  # the logit head is new
    with pytest.raises(ValueError, match="must be a JiTTransformer2DModel"):
        AdversarialFlowJiTDiscriminator.for_transformer(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------- one CAFM step
def _reference_grads(prefix, state_dict, convert):
    """The reference's gradients in our parameter layout: every conversion map is a rename, a split
    or a swap of halves, so it carries a gradient exactly as it carries the weight."""
    grads = {k[len(prefix):]: v for k, v in load_file(FIXTURES / "train_steps.safetensors").items() if k.startswith(prefix)}
    grads["pos_embed"] = state_dict["pos_embed"]  # frozen, no gradient; the converter checks it
    missing = [k for k in state_dict if k not in grads]
    assert missing == [], missing  # the reference reached every parameter
    return convert(grads, in_context_start=IN_CONTEXT_START).state_dict()


@pytest.fixture
def cafm_step(fresh_accelerate_state):
    generator, discriminator = _models()
    generator.train()
    discriminator.train()
    config = _meta()["files"]["train_steps.safetensors"]["trainer_config"]["adversarial"]
    objective = CAFMObjective(cp_scale=config["cp_scale"], ot_scale=config["ot_scale"],
                              num_discriminator_steps=config["N"], warmup=config["warmup"])
    step = CAFMTrainingStep(Accelerator(cpu=True), generator, discriminator, None, None, objective)
    ref = load_file(FIXTURES / "train_steps.safetensors")
    return step, ref, [ref[f"input/{k}"] for k in ("latents", "labels", "noises", "timesteps")]


def test_discriminator_step_losses_and_gradients_match_reference(cafm_step):
    step, ref, inputs = cafm_step
    loss, logs = step.discriminator_objective(*inputs)
    _close(loss, ref["f32/dstep/loss/loss/total"], "loss/total")
    _close(logs["loss_d_adv"], ref["f32/dstep/loss/loss/dis"], "loss/dis")
    _close(logs["loss_cp"], ref["f32/dstep/loss/loss/cp"], "loss/cp")
    _close(logs["derivative_real"], ref["f32/dstep/loss/logits/real"], "logits/real")
    _close(logs["derivative_fake"], ref["f32/dstep/loss/logits/fake"], "logits/fake")
    _close(logs["logits"], ref["f32/dstep/loss/logits/out"], "logits/out")
    loss.backward()
    assert all(p.grad is None for p in step.generator.parameters())  # the generator takes no gradient in a D step
    expected = _reference_grads("f32/dstep/grad/", load_file(FIXTURES / "dis_state_dict.safetensors"), convert_jit_discriminator)
    for name, param in step.discriminator.named_parameters():
        _close(param.grad, expected[name], f"D grad {name}")


def test_generator_step_losses_and_gradients_match_reference(cafm_step):
    step, ref, inputs = cafm_step
    assert not step.is_discriminator_step(5014)  # the reference's G step: the first after warm-up 5000
    step.discriminator.requires_grad_(False)
    loss, logs, velocity_pred = step.generator_objective(*inputs)
    _close(velocity_pred, ref["f32/gstep/velocity_pred"], "velocity_pred")
    _close(loss, ref["f32/gstep/loss/loss/total"], "loss/total")
    _close(logs["loss_g_adv"], ref["f32/gstep/loss/loss/gen"], "loss/gen")
    _close(logs["loss_ot"], ref["f32/gstep/loss/loss/ot"], "loss/ot")
    _close(logs["derivative_fake_g"], ref["f32/gstep/loss/logits/fake"], "logits/fake")
    loss.backward()
    assert all(p.grad is None for p in step.discriminator.parameters())
    expected = _reference_grads("f32/gstep/grad/", load_file(FIXTURES / "gen_state_dict.safetensors"), convert_jit_generator)
    for name, param in step.generator.named_parameters():
        _close(param.grad, expected[name], f"G grad {name}")


def test_schedule_and_time_draws_match_reference():
    ref = load_file(FIXTURES / "train_steps.safetensors")
    ours = [is_discriminator_step(int(s), warmup=5000, num_discriminator_steps=16) for s in ref["schedule/steps"]]
    assert ours == [bool(v) for v in ref["schedule/is_dis_step"].tolist()]
    # Accumulation 2: the reference counts micro-steps; ours repeats the iteration over them.
    small = [is_discriminator_step(int(s) // 2, warmup=10, num_discriminator_steps=3) for s in ref["schedule_small/steps"]]
    assert small == [bool(v) for v in ref["schedule_small/is_dis_step"].tolist()]
    # prepare_input's draws (labels with dropout, then logisticnormal_jit times), from one seeded generator.
    generator = torch.Generator().manual_seed(int(ref["prepare/manual_seed"]))
    labels = drop_class_labels(ref["prepare/in_label"], 1000, 0.1, generator)
    assert torch.equal(labels, ref["prepare/out_labels"])
    times = sample_times(labels.shape[0], "logit_normal_jit", "cpu", generator)
    _close(times, ref["prepare/out_timesteps"], "logit_normal_jit times", rtol=1e-7)


def test_gradient_checkpointing_changes_no_gradient(fresh_accelerate_state):
    """Both networks checkpointed (the discriminator block by block, its JVP inside each block)."""
    ref = load_file(FIXTURES / "train_steps.safetensors")
    inputs = [ref[f"input/{k}"] for k in ("latents", "labels", "noises", "timesteps")]
    grads = []
    for checkpointing in (False, True):
        generator, discriminator = _models()
        if checkpointing:
            generator.enable_gradient_checkpointing()
            discriminator.enable_gradient_checkpointing()
        step = CAFMTrainingStep(Accelerator(cpu=True), generator, discriminator, None, None, CAFMObjective(ot_scale=0.05))
        step.discriminator_objective(*inputs)[0].backward()
        discriminator.requires_grad_(False)
        step.generator_objective(*inputs)[0].backward()
        grads.append({n: p.grad for model in (generator, discriminator) for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        _close(grads[1][name], grad, f"checkpointed grad {name}")


def test_a_flow_matching_step_trains_a_jit_model(fresh_accelerate_state):
    from diffusers_afm.training import FlowMatchingTrainingStep

    torch.manual_seed(0)
    model = JiTTransformer2DModel(**_tiny_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = FlowMatchingTrainingStep(Accelerator(cpu=True), model, optimizer, time_sampling="logit_normal_jit",
                                    null_class_id=model.null_class_id, noise_generator=torch.Generator().manual_seed(0))
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    before = model.proj_out.weight.detach().clone()
    logs = step(x0, torch.tensor([0, 1, 2, 0]), 0)
    assert torch.isfinite(logs["loss"]) and not torch.equal(model.proj_out.weight, before)


# ----------------------------------------------------------------------------- sizes and conversion
def _jit_shapes(config: dict, num_classes: int = 1000) -> dict:
    """The shapes of a JiT checkpoint (JiT's own keys) of a given config."""
    width = config["num_attention_heads"] * config["attention_head_dim"]
    patch, bottleneck = config["patch_size"], config["bottleneck_dim"]
    shapes = {
        "x_embedder.proj1.weight": (bottleneck, 3, patch, patch), "x_embedder.proj2.weight": (width, bottleneck, 1, 1),
        "pos_embed": (1, (config["sample_size"] // patch) ** 2, width), "y_embedder.embedding_table.weight": (num_classes + 1, width),
        "in_context_posemb": (1, config["in_context_len"], width),
    }
    shapes.update({f"blocks.{i}.attn.q_norm.weight": (config["attention_head_dim"],) for i in range(config["num_layers"])})
    return shapes


@pytest.mark.parametrize("name", sorted(JIT_PRESETS))
def test_released_sizes_are_read_off_the_weights(name):
    preset = JIT_PRESETS[name]
    state_dict = {k: torch.empty(shape, device="meta") for k, shape in _jit_shapes(preset).items()}
    config = infer_jit_config(state_dict)
    assert {k: config[k] for k in config if k in preset} == {k: v for k, v in preset.items() if k in config}
    assert config["num_classes"] == 1000
    other = next(n for n in JIT_PRESETS if JIT_PRESETS[n]["num_layers"] != preset["num_layers"])
    with pytest.raises(ValueError, match=f"{other} does not fit the weights"):
        infer_jit_config(state_dict, model_size=other)
    with torch.device("meta"):
        model = JiTTransformer2DModel.from_jit_preset(name)
    assert model.config.noise_scale == preset["patch_size"] / 16  # JiT's: noise 2 at 512 px


def _tiny_config(**overrides):
    config = dict(sample_size=16, patch_size=4, in_channels=3, num_layers=2, num_attention_heads=2, attention_head_dim=8,
                  bottleneck_dim=8, in_context_len=2, in_context_start=1, num_classes=3)
    config.update(overrides)
    return config


def _jit_checkpoint(path, state_dict, args=None, extra=None):
    """A checkpoint as JiT's main_jit.py writes it: the Denoiser's weights under `net.`, three copies."""
    prefixed = {"net." + k: v for k, v in state_dict.items()}
    zeros = {k: torch.zeros_like(v) for k, v in prefixed.items()}  # `model` differs: the EMA must be taken
    checkpoint = {"model": zeros, "model_ema1": prefixed, "model_ema2": zeros, "epoch": 599, **(extra or {})}
    if args is not None:
        checkpoint["args"] = args
    torch.save(checkpoint, path)
    return path


def _convert(tmp_path, checkpoint, *flags, name="pipe"):
    argv = ["--checkpoint", str(checkpoint), "--format", "jit", "--output_dir", str(tmp_path / name), *flags]
    with pytest.raises(SystemExit) as exit_info:  # what the console script does: sys.exit(main())
        sys.exit(main(argv))
    return exit_info.value.code or 0


def test_afm_convert_jit_checkpoint_round_trip(tmp_path, capsys):
    state_dict = load_file(FIXTURES / "gen_state_dict.safetensors")
    args = argparse.Namespace(model="JiT-B/16", img_size=32, noise_scale=1.0, class_num=10, cfg=2.9,
                              interval_min=0.1, interval_max=1.0)  # JiT pickles its flags with the weights
    checkpoint = _jit_checkpoint(tmp_path / "checkpoint-last.pth", state_dict, args)
    assert _convert(tmp_path, checkpoint, "--in_context_start", "2", "--class_names", "none") == 0
    out = tmp_path / "pipe"
    assert "Wrote an AFMPipeline" in capsys.readouterr().out
    pipe = AFMPipeline.from_pretrained(out)
    assert type(pipe.transformer) is JiTTransformer2DModel and pipe.vae is None
    card = (out / "README.md").read_text()
    assert "JiT checkpoint `checkpoint-last.pth`" in card and "guidance_interval=(0.0, 0.9)" in card and "flow-matching" in card
    io = load_file(FIXTURES / "gen_io.safetensors")
    with torch.no_grad():
        velocity = pipe.transformer(io["input/x_t"], io["input/t"], io["input/y_mixed"]).sample
    _close(velocity, io["f32/v_y_mixed"], "converted velocity")
    # The CAFM authors' format: the plain state dict, no `net.`, no args.
    torch.save(state_dict, tmp_path / "jit_cafm.pth")
    assert _convert(tmp_path, tmp_path / "jit_cafm.pth", "--in_context_start", "2", name="cafm") == 0
    cafm = AFMPipeline.from_pretrained(tmp_path / "cafm").transformer
    assert torch.equal(cafm.proj_out.weight, pipe.transformer.proj_out.weight)


def test_afm_convert_jit_refuses_bad_input_in_one_line(tmp_path, capsys):
    state_dict = load_file(FIXTURES / "gen_state_dict.safetensors")
    marker = tmp_path / "pwned"

    class Payload:  # what a malicious checkpoint pickles: a call run at load time
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    cases = {
        "not_jit": (SISTER / "gen_state_dict.safetensors", (), 1, r"is not a JiT checkpoint: it has no `x_embedder.proj1.weight`"),
        "payload": (_jit_checkpoint(tmp_path / "evil.pth", state_dict, extra={"args": Payload()}), ("--in_context_start", "2"),
                    1, r"cannot be read: it holds objects other than tensors.*unsupported GLOBAL posix.system"),
        "size": (_jit_checkpoint(tmp_path / "small.pth", state_dict), ("--model_size", "JiT-B/16"), 1,
                 r"JiT-B/16 does not fit the weights: they have num_layers 4 \(not 12\)"),
        "no_start": (_jit_checkpoint(tmp_path / "custom.pth", state_dict), (), 1, r"pass `in_context_start` \(`--in_context_start`\)"),
        "shape": (_jit_checkpoint(tmp_path / "bad_shape.pth", {**state_dict, "blocks.1.mlp.w3.weight": torch.zeros(64, 100)}),
                  ("--in_context_start", "2"), 1, r"Checkpoint key `blocks.1.mlp.w3.weight` has shape \(64, 100\)"),
        "vae": (tmp_path / "small.pth", ("--vae", "stabilityai/sd-vae-ft-mse"), 2, r"`--vae` must be 'none'"),
    }
    for name, (checkpoint, flags, code, message) in cases.items():
        assert _convert(tmp_path, checkpoint, *flags, name=name) == code, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("afm-convert: error:"), (name, err)
        assert re.search(message, err), (name, err)
        if code == 1:
            assert repr(str(checkpoint)) in err, (name, err)  # the file is named
        assert not (tmp_path / name).exists()
    assert not marker.exists()  # the payload never ran


# ----------------------------------------------------------------------------- sampling
def _jit_sampler(model, noise, labels, steps, cfg, interval):
    """JiT's own sampler, restated from its denoiser.py in JiT's time (0 = noise): an evenly spaced
    grid, Heun steps with an Euler last step, guidance `v_u + w (v_c - v_u)` where
    `(t < interval_max) and (interval_min == 0 or t > interval_min)`, velocities from the
    x-prediction `(x_pred - z) / max(1 - t, 0.05)`."""
    low, high = interval
    grid = torch.linspace(0.0, 1.0, steps + 1)
    null = torch.full_like(labels, model.null_class_id)

    def velocity(z, t):
        t = t.expand(z.shape[0])
        v = [(model.predict_sample(z, 1 - t, y) - z) / (1 - t).clamp_min(0.05).view(-1, 1, 1, 1) for y in (labels, null)]
        scale = cfg if (t[0] < high and (low == 0 or t[0] > low)) else 1.0
        return v[1] + scale * (v[0] - v[1])

    z = noise
    for i in range(steps):
        v = velocity(z, grid[i])
        if i < steps - 1:
            v = 0.5 * (v + velocity(z + (grid[i + 1] - grid[i]) * v, grid[i + 1]))
        z = z + (grid[i + 1] - grid[i]) * v
    return z


@pytest.mark.parametrize("interval", [(0.1, 1.0), (0.0, 0.7)])
def test_pipeline_samples_as_jits_own_sampler(interval):
    torch.manual_seed(0)
    model = JiTTransformer2DModel(**_tiny_config())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pipe = AFMPipeline(model.eval())
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2, 1])
    # JiT's interval (m, M) in its time is (1 - M, 1 - m) in ours; 8 steps put no grid time on a bound.
    ours = pipe(class_labels=labels, latents=noise, num_inference_steps=8, guidance_scale=2.5,
                guidance_interval=(1 - interval[1], 1 - interval[0]), output_type="latent").images
    with torch.no_grad():
        theirs = _jit_sampler(model, noise, labels, 8, 2.5, interval)
    _close(ours, theirs, "pipeline vs JiT's sampler", rtol=1e-5)
    assert solver_nfe("heun_final_euler", 8) == 15


def test_guidance_interval_is_jits_rule_in_our_time():
    t = torch.tensor([1.0, 0.95, 0.9, 0.5, 0.0])
    assert in_guidance_interval(t, (0.0, 0.9)).tolist() == [False, False, False, True, False]
    assert in_guidance_interval(t, (0.3, 1.0)).tolist() == [True, True, True, True, False]
    pipe = AFMPipeline(JiTTransformer2DModel(**_tiny_config()))
    for bad in [(0.9, 0.1), (0.0, 1.5), (0.5,), "all"]:
        with pytest.raises(ValueError, match="`guidance_interval` must be a pair"):
            pipe(class_labels=[0], num_inference_steps=1, guidance_interval=bad)


def test_noise_scale_sets_the_initial_noise_and_folders_round_trip(tmp_path):
    torch.manual_seed(0)
    model = JiTTransformer2DModel(**_tiny_config(noise_scale=2.0))
    pipe = AFMPipeline(model.eval(), id2label={0: "zero", 1: "one", 2: "two"})
    pipe.set_progress_bar_config(disable=True)
    call = dict(class_labels=["two", 0], num_inference_steps=2, guidance_scale=2.0, output_type="latent")
    drawn = pipe(**call, generator=torch.Generator().manual_seed(3)).images
    noise = pipe.prepare_latents(2, torch.Generator().manual_seed(3), torch.device("cpu"))
    assert torch.equal(drawn, pipe(**call, latents=noise).images)
    unit = AFMPipeline(JiTTransformer2DModel(**_tiny_config()).eval())
    assert torch.equal(noise, 2.0 * unit.prepare_latents(2, torch.Generator().manual_seed(3), torch.device("cpu")))
    # save / load: the same config and the same samples
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = AFMPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.transformer.config) == public(model.config)
    plain = DiffusionPipeline.from_pretrained(tmp_path / "pipe")  # plain diffusers, after `import diffusers_afm`
    assert type(plain) is AFMPipeline and type(plain.transformer) is JiTTransformer2DModel
    assert torch.equal(loaded(**call, generator=torch.Generator().manual_seed(3)).images, drawn)
    discriminator = AdversarialFlowJiTDiscriminator.for_transformer(model)
    discriminator.save_pretrained(tmp_path / "dis")
    again = AdversarialFlowJiTDiscriminator.from_pretrained(tmp_path / "dis")
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 0.8]), torch.tensor([1, 3])
    with torch.no_grad():
        assert torch.equal(again(x, y, t), discriminator(x, y, t))


def test_attention_backends_and_fused_projections_change_no_output():
    torch.manual_seed(0)
    model = JiTTransformer2DModel(**_tiny_config(), dropout=0.2).eval()  # eval: dropout off
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 0.7]), torch.tensor([0, 3])
    with torch.no_grad():
        expected = model(x, t, y).sample
        model.fuse_qkv_projections()
        _close(model(x, t, y).sample, expected, "fused q/k/v")
        model.unfuse_qkv_projections()
        # The processors honour a chosen dispatcher backend (set per processor, as the JVP does;
        # `set_attention_backend` would also change diffusers' process-wide default).
        with math_attention(model):
            assert {m.processor._attention_backend for m in model.modules() if hasattr(m, "processor")} == {
                AttentionBackendName._NATIVE_MATH}
            _close(model(x, t, y).sample, expected, "math kernel")
    # JiT's dropout acts on the middle half of the blocks only (here block 0 of 2), in train mode.
    assert [block.ff.net[1].p for block in model.transformer_blocks] == [0.2, 0.0]
    model.train()
    assert not torch.equal(model(x, t, y).sample, model(x, t, y).sample)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="`in_context_start` must be a block index in \\[0, 2\\)"):
        JiTTransformer2DModel(**_tiny_config(in_context_start=2))
    with pytest.raises(ValueError, match="`attention_head_dim` must be a positive multiple of 4"):
        JiTTransformer2DModel(**_tiny_config(attention_head_dim=6))
    with pytest.raises(ValueError, match="`noise_scale` must be > 0"):
        JiTTransformer2DModel(**_tiny_config(noise_scale=0.0))
    model = JiTTransformer2DModel(**_tiny_config())
    with pytest.raises(ValueError, match=r"`hidden_states` must have shape \(batch, 3, 16, 16\)"):
        model(torch.randn(1, 3, 32, 32), 0.5, torch.tensor([0]))
    discriminator = AdversarialFlowJiTDiscriminator.for_transformer(model)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 0.8]), torch.tensor([1, 3])
    with pytest.raises(ValueError, match="tangent `dt` must have shape \\(2,\\)"):
        discriminator(x, y, t, tangents=(x, torch.ones(3)))
    with pytest.raises(ValueError, match="tangent `dx` must have shape"):
        discriminator(x, y, t, tangents=(x[:1], torch.ones(2)))
    with pytest.raises(ValueError, match="Unknown JiT size 'JiT-S/16'"):
        JiTTransformer2DModel.from_jit_preset("JiT-S/16")
