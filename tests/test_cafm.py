"""Continuous AFM and flow-matching models as a user meets them: solvers, guidance, the pipeline,
the discriminator's JVP, the training step, both trainers end to end (and under DDP), bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, randomize_, tiny_generator_config
from safetensors.torch import load_file

import diffusers
from diffusers_afm import (
    AdversarialFlowDiscriminator,
    AdversarialFlowTransformer2DModel,
    AFMPipeline,
    FlowMatchingTransformer2DModel,
)
from diffusers_afm import flow
from diffusers_afm.models.modules import math_attention

import train_cafm
import train_flow_matching

TINY = str(REPO / "tests" / "fixtures" / "tiny_model.json")


def tiny_flow_model(**overrides):
    config = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=16,
                  num_classes=10, class_dropout_prob=0.1)
    config.update(overrides)
    torch.manual_seed(0)
    return randomize_(FlowMatchingTransformer2DModel(**config)).eval()


# ----------------------------------------------------------------------------- flow.py
@pytest.mark.parametrize("num_steps", [1, 3, 8])
def test_euler_and_heun_integrate_a_linear_ode_exactly_as_their_rules_say(num_steps):
    # dx/dt = a x from t = 1 to 0 with h = 1/N: Euler multiplies by (1 - a h), Heun by 1 - a h + (a h)^2 / 2.
    a, x1 = 1.5, torch.tensor([[2.0, -1.0]], dtype=torch.float64)
    h = 1.0 / num_steps
    euler = flow.solve_ode(lambda x, t: a * x, x1, num_steps, "euler")
    heun = flow.solve_ode(lambda x, t: a * x, x1, num_steps, "heun")
    torch.testing.assert_close(euler, x1 * (1 - a * h) ** num_steps, rtol=1e-12, atol=0)
    torch.testing.assert_close(heun, x1 * (1 - a * h + (a * h) ** 2 / 2) ** num_steps, rtol=1e-12, atol=0)
    assert flow.solver_nfe("heun", num_steps) == 2 * num_steps and flow.solver_nfe("euler", num_steps) == num_steps


def test_a_straight_flow_is_solved_exactly_in_one_step():
    # The velocity field of a single data point x0: v(x, t) = (x - x0) / t; one Euler step lands on x0.
    x0, z = torch.tensor([[0.5, 2.0]]), torch.tensor([[-1.0, 1.0]])
    assert torch.allclose(flow.solve_ode(lambda x, t: (x - x0) / t[:, None], z, 1, "euler"), x0)


@pytest.mark.parametrize("solver, steps", [("rk4", 4), ("euler", 0), ("heun", -1), ("euler", 2.5), ("euler", True)])
def test_bad_solver_or_step_count_is_an_error(solver, steps):
    with pytest.raises(ValueError, match="solver|num_inference_steps"):
        flow.solve_ode(lambda x, t: x, torch.zeros(1, 2), steps, solver)


def test_guided_velocity_is_one_batched_call_of_the_cfg_rule():
    calls = []

    def velocity_fn(x, t, labels):
        calls.append(labels.clone())
        return x * (labels[:, None].float() + 1)

    labels = torch.tensor([0, 3])
    x, t = torch.ones(2, 2), torch.full((2,), 0.5)
    assert torch.equal(flow.guided_velocity(velocity_fn, labels, 10, 1.0)(x, t), x * torch.tensor([[1.0], [4.0]]))
    assert len(calls) == 1  # w = 1: no null-class pass
    calls.clear()
    guided = flow.guided_velocity(velocity_fn, labels, 10, 2.0)(x, t)
    assert len(calls) == 1 and calls[0].tolist() == [0, 3, 10, 10]
    v_cond, v_null = x * torch.tensor([[1.0], [4.0]]), x * 11
    assert torch.allclose(guided, v_null + 2.0 * (v_cond - v_null))
    with pytest.raises(ValueError, match="null class"):
        flow.guided_velocity(velocity_fn, labels, None, 2.0)


# ----------------------------------------------------------------------------- models
def test_flow_model_conditions_on_time_and_class_with_a_null_row(tmp_path):
    model = tiny_flow_model()
    assert model.class_embedder.embedding_table.num_embeddings == 11 and model.null_class_id == 10
    assert tiny_flow_model(class_dropout_prob=0.0).null_class_id is None
    x = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        v = model(x, torch.tensor([0.1, 0.5, 0.9]), torch.tensor([1, 2, 10])).sample
        assert v.shape == x.shape
        assert not torch.allclose(v, model(x, torch.tensor([0.2, 0.5, 0.9]), torch.tensor([1, 2, 10])).sample)
        model.train()  # the model never drops labels itself (the training step does)
        assert torch.equal(v, model(x, torch.tensor([0.1, 0.5, 0.9]), torch.tensor([1, 2, 10])).sample)
    model.save_pretrained(tmp_path)
    loaded = FlowMatchingTransformer2DModel.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_discriminator_is_initialised_from_the_flow_model():
    generator = tiny_flow_model()
    discriminator = AdversarialFlowDiscriminator.for_flow_model(generator)
    assert discriminator.config.norm_type == "rms_norm" and discriminator.config.use_null_class
    ours, theirs = discriminator.state_dict(), generator.state_dict()
    shared = [k for k in ours if k.startswith(("transformer_blocks.", "class_embedder.", "time_embed.", "pos_embed."))]
    assert shared and all(torch.equal(ours[k], theirs[k]) for k in shared)
    assert ours["proj_out.weight"].shape == (1, 32) and "proj_out.bias" not in ours
    with pytest.raises(ValueError, match="cannot be initialised from the flow model.*num_layers|cannot be initialised"):
        AdversarialFlowDiscriminator.for_flow_model(generator, num_layers=3)
    with pytest.raises(ValueError, match="cannot be initialised from the flow model"):
        AdversarialFlowDiscriminator.for_flow_model(generator, attention_head_dim=8)


def test_jvp_needs_a_time_input_and_well_shaped_tangents():
    afm = AdversarialFlowDiscriminator(sample_size=8, patch_size=2, in_channels=4, num_layers=1, num_attention_heads=2,
                                       attention_head_dim=8, num_classes=3)
    x, y, t = torch.randn(2, 4, 8, 8), torch.tensor([0, 1]), torch.rand(2)
    with pytest.raises(ValueError, match="use_timestep"):
        afm(x, y, t, tangents=(x, torch.ones(2)))
    cafm = AdversarialFlowDiscriminator.for_flow_model(tiny_flow_model())
    with pytest.raises(ValueError, match="dx"):
        cafm(x, y, t, tangents=(x[:1], torch.ones(1)))
    with pytest.raises(ValueError, match="dt"):
        cafm(x, y, t, tangents=(torch.stack([x, x]), torch.ones(2)))


def test_jvp_is_taken_block_by_block_so_checkpointing_changes_no_gradient():
    """The tangents go through the blocks one by one (the JVP inside each block's forward), so a
    checkpointed discriminator gives the JVP, its gradients and the generator's gradient unchanged."""
    cafm = randomize_(AdversarialFlowDiscriminator.for_flow_model(tiny_flow_model()))
    x, y, t = torch.randn(2, 4, 8, 8), torch.tensor([0, 10]), torch.rand(2)
    velocity = torch.randn(2, 2, 4, 8, 8, requires_grad=True)  # two stacked tangents, as in the D step

    def gradients():
        cafm.zero_grad()
        velocity.grad = None
        logits, derivative = cafm(x, y, t, tangents=(velocity, torch.ones(2, 2)))
        (derivative.square().sum() + logits.sum()).backward()
        return logits.detach(), derivative.detach(), {n: p.grad.clone() for n, p in cafm.named_parameters()}, velocity.grad.clone()

    plain = gradients()
    cafm.enable_gradient_checkpointing()
    checkpointed = gradients()
    torch.testing.assert_close(checkpointed[0], plain[0])
    torch.testing.assert_close(checkpointed[1], plain[1])
    for name, grad in plain[2].items():
        torch.testing.assert_close(checkpointed[2][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(checkpointed[3], plain[3], rtol=1e-5, atol=1e-6)


@pytest.fixture
def keep_global_attention_backend():
    """diffusers' `set_attention_backend` also sets the process-wide backend: put it back afterwards."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    saved = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry._active_backend = saved


@pytest.mark.usefixtures("keep_global_attention_backend")
def test_jvp_overrides_a_backend_without_forward_ad_and_restores_it():
    cafm = AdversarialFlowDiscriminator.for_flow_model(tiny_flow_model())
    cafm.set_attention_backend("_native_flash")  # the CPU flash kernel: no forward-mode AD formula
    x, y, t = torch.randn(2, 4, 8, 8), torch.tensor([0, 10]), torch.rand(2)
    with torch.no_grad():
        _, derivative = cafm(x, y, t, tangents=(torch.randn_like(x), torch.ones(2)))
    assert torch.isfinite(derivative).all()
    processor = cafm.transformer_blocks[0].attn.processor
    assert str(processor._attention_backend) in ("_native_flash", "AttentionBackendName._NATIVE_FLASH")
    with math_attention(cafm):
        assert "math" in str(processor._attention_backend).lower()


def test_jvp_under_bf16_autocast_stays_close_to_fp32():
    cafm = AdversarialFlowDiscriminator.for_flow_model(tiny_flow_model())
    torch.manual_seed(1)
    x, y, t = torch.randn(16, 4, 8, 8), torch.randint(0, 11, (16,)), torch.rand(16)
    tangents = (torch.randn(2, 16, 4, 8, 8), torch.ones(2, 16))
    with torch.no_grad():
        _, exact = cafm(x, y, t, tangents=tangents)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, low = cafm(x, y, t, tangents=tangents)
    relative = ((low.float() - exact).norm() / exact.norm()).item()
    assert relative < 0.05, relative


# ----------------------------------------------------------------------------- pipeline
def test_pipeline_samples_flow_models_with_solver_and_guidance(tmp_path):
    pipe = AFMPipeline(tiny_flow_model())
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(class_labels=[1, 2], output_type="latent", generator=torch.Generator().manual_seed(0))
    heun = pipe(num_inference_steps=4, solver="heun", guidance_scale=1.5, **kwargs).images
    # The same as the CAFM reference's Heun loop, written out.
    noise = pipe.prepare_latents(2, torch.Generator().manual_seed(0), torch.device("cpu"))
    labels = torch.tensor([1, 2])

    def v(x, t):
        both = pipe.transformer(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, 10)])).sample
        cond, null = both.chunk(2)
        return null + 1.5 * (cond - null)

    x, grid = noise, torch.linspace(1, 0, 5)
    with torch.no_grad():
        for s, e in zip(grid[:-1], grid[1:]):
            t_s, t_e = s.repeat(2), e.repeat(2)
            v1 = v(x, t_s)
            v2 = v(x - (s - e) * v1, t_e)
            x = x - (s - e) * 0.5 * (v1 + v2)
    torch.testing.assert_close(heun, x, rtol=1e-5, atol=1e-5)
    euler = pipe(num_inference_steps=4, **kwargs).images
    assert not torch.allclose(euler, heun)
    seen = []
    pipe(num_inference_steps=3, callback_on_step_end=lambda p, i, t, kw: seen.append((i, float(t))) or kw, **kwargs)
    assert seen == [(0, 1.0), (1, pytest.approx(2 / 3)), (2, pytest.approx(1 / 3))]
    pipe.save_pretrained(tmp_path)
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is AFMPipeline and type(loaded.transformer) is FlowMatchingTransformer2DModel


@pytest.mark.parametrize("kwargs, message", [
    (dict(solver="rk4"), "solver"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
])
def test_pipeline_rejects_bad_flow_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AFMPipeline(tiny_flow_model())(class_labels=[1], **kwargs)


def test_guidance_needs_a_null_class_and_afm_models_refuse_it():
    with pytest.raises(ValueError, match="null class"):
        AFMPipeline(tiny_flow_model(class_dropout_prob=0.0))(class_labels=[1], guidance_scale=2.0)
    afm = AFMPipeline(AdversarialFlowTransformer2DModel(**tiny_generator_config()))
    with pytest.raises(ValueError, match="guidance_scale.*AFM"):
        afm(class_labels=[1], guidance_scale=1.5)
    with pytest.raises(ValueError, match="solver.*AFM"):
        afm(class_labels=[1], solver="heun")


# ----------------------------------------------------------------------------- trainers


def _flow_matching(out, *flags):
    return train_flow_matching.main(["--output_dir", str(out), "--model_config", TINY, "--train_batch_size", "16",
                                     "--report_to", "none", "--num_validation_images", "2", *flags])


def _cafm(out, pretrained, *flags):
    return train_cafm.main(["--output_dir", str(out), "--pretrained_model_name_or_path", str(pretrained),
                            "--train_batch_size", "16", "--report_to", "none", "--num_validation_images", "2",
                            "--warmup_steps", "3", "--num_discriminator_steps", "2", *flags])


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    out = tmp_path_factory.mktemp("fm")
    _flow_matching(out, "--max_train_steps", "10", "--checkpointing_steps", "10", "--validation_steps", "5")
    AcceleratorState._reset_state(True)
    return out


def test_flow_matching_trainer_writes_a_flow_pipeline(flow_run):
    pipe = AFMPipeline.from_pretrained(flow_run)
    assert type(pipe.transformer) is FlowMatchingTransformer2DModel and pipe.transformer.null_class_id == 10
    images = pipe(class_labels=[3, "7"], num_inference_steps=4, solver="heun", guidance_scale=2.0, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    assert (flow_run / "samples.png").exists() and (flow_run / "samples" / "step_0000005.png").exists()
    assert "flow-matching" in (flow_run / "README.md").read_text()


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_cafm_trainer_post_trains_and_its_steps_touch_one_network_each(flow_run, tmp_path):
    out = tmp_path / "cafm"
    # Steps 0..3 are D steps (step <= warm-up 3), then with N = 2: 4 D, 5 G, 6 D, 7 D, 8 G.
    _cafm(out, flow_run, "--max_train_steps", "4", "--checkpointing_steps", "2", "--validation_steps", "4")
    start = AFMPipeline.from_pretrained(flow_run).transformer.state_dict()
    after_warmup = load_file(out / "checkpoint-4" / "model.safetensors")  # the generator: untouched by D steps
    assert all(torch.equal(after_warmup[k], start[k]) for k in after_warmup)
    d2, d4 = (load_file(out / f"checkpoint-{s}" / "model_1.safetensors") for s in (2, 4))
    assert any(not torch.equal(d2[k], d4[k]) for k in d2)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    _cafm(out, flow_run, "--max_train_steps", "6", "--checkpointing_steps", "2", "--validation_steps", "4",
          "--resume_from_checkpoint", "latest")
    d6 = load_file(out / "checkpoint-6" / "model_1.safetensors")
    g6 = load_file(out / "checkpoint-6" / "model.safetensors")
    assert any(not torch.equal(g6[k], start[k]) for k in g6)  # step 5 was a G step
    pipe = AFMPipeline.from_pretrained(out)
    assert type(pipe.transformer) is FlowMatchingTransformer2DModel
    assert pipe(class_labels=[1], num_inference_steps=2, guidance_scale=1.5, output_type="np").images.shape == (1, 8, 8, 1)
    discriminator = AdversarialFlowDiscriminator.from_pretrained(out / "discriminator")
    assert discriminator.config.norm_type == "rms_norm"
    assert all(torch.equal(discriminator.state_dict()[k], d6[k]) for k in d6)
    card = (out / "README.md").read_text()
    assert "continuous-adversarial-flow-models" in card and "2604.11521" in card


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_cafm_resume_is_bit_for_bit(flow_run, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = ("--checkpointing_steps", "3", "--validation_steps", "100")
    _cafm(straight, flow_run, "--max_train_steps", "7", *flags)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    _cafm(resumed, flow_run, "--max_train_steps", "3", *flags)
    AcceleratorState._reset_state(True)
    _cafm(resumed, flow_run, "--max_train_steps", "7", "--resume_from_checkpoint", "latest", *flags)
    for name in ("model.safetensors", "model_1.safetensors", "ema.safetensors"):
        a, b = load_file(straight / "checkpoint-7" / name), load_file(resumed / "checkpoint-7" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("flags, message", [
    ((), "--pretrained_model_name_or_path` is required"),
    (("--pretrained_model_name_or_path", "AFM"), "a flow-matching model.*AdversarialFlowTransformer2DModel"),
    (("--pretrained_model_name_or_path", "nobody/not-a-cached-model"), "Hub repository id that can be downloaded"),
    (("--pretrained_model_name_or_path", "FLOW", "--resolution", "16"), "sample_size=8"),
    (("--pretrained_model_name_or_path", "FLOW", "--num_discriminator_steps", "0"), "num_discriminator_steps"),
    (("--pretrained_model_name_or_path", "FLOW", "--validation_solver", "rk4"), "validation_solver"),
    (("--pretrained_model_name_or_path", "FLOW", "--validation_inference_steps", "0"), "validation_inference_steps"),
    (("--pretrained_model_name_or_path", "NONULL", "--class_dropout_prob", "0.1"), "no null class"),
])
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_cafm_bad_input_fails_before_any_work(flow_run, tmp_path, flags, message, monkeypatch, capsys):
    afm = tmp_path / "afm"
    AFMPipeline(AdversarialFlowTransformer2DModel(**tiny_generator_config(in_channels=1))).save_pretrained(afm)
    no_null = tmp_path / "nonull"
    AFMPipeline(tiny_flow_model(in_channels=1, class_dropout_prob=0.0)).save_pretrained(no_null)
    paths = {"AFM": str(afm), "FLOW": str(flow_run), "NONULL": str(no_null)}
    flags = [paths.get(f, f) for f in flags]
    # The command line's own entry point (`__main__`: `cli.run_trainer`), in this process: a one-line
    # error and a non-zero exit; any other exception (a traceback) fails the test.
    from diffusers_afm.training import cli

    monkeypatch.setattr(sys, "argv", ["train_cafm.py", "--output_dir", str(tmp_path / "out"), *flags])
    with pytest.raises(SystemExit) as exit_info:
        cli.run_trainer(train_cafm.parse_args, train_cafm.settings, train_cafm.train)
    code = exit_info.value.code
    output = capsys.readouterr().err + (code if isinstance(code, str) else "")
    assert code not in (0, None)
    import re

    assert re.search(message, output), output[-2000:]
    assert not (tmp_path / "out").exists()


def test_every_flow_trainer_flag_has_help_and_shows_its_default():
    import toy_cafm

    for module in (train_flow_matching, train_cafm, toy_cafm):
        parser = module.build_parser()
        assert [a.dest for a in parser._actions if not (a.help or "").strip()] == [], module.__name__
        assert "(default:" in parser.format_help(), module.__name__


@pytest.mark.parametrize("extra", [[], ["--lora_rank", "4", "--merge_lora"]], ids=["full", "lora"])
def test_cafm_two_processes(flow_run, tmp_path, extra):
    """DDP with 2 CPU processes: D steps (the JVP inside DDP's forward) and G steps keep both ranks' weights
    equal; with LoRA, the adapters over the shared frozen base too."""
    out = tmp_path / "run"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29531 + bool(extra)),
           str(REPO / "examples" / "train_cafm.py"), "--output_dir", str(out), "--pretrained_model_name_or_path",
           str(flow_run), "--train_batch_size", "8", "--max_train_steps", "5", "--warmup_steps", "2",
           "--num_discriminator_steps", "1", "--report_to", "none", "--num_validation_images", "1", *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split("weight sums ")[1] for line in result.stderr.splitlines() if "finished: step 5" in line]
    assert len(lines) == 2 and lines[0] == lines[1], lines  # steps 0-2 D, 3 G, 4 D: both networks synced
    assert (out / "checkpoint-5" / "noise_rng_1.safetensors").exists()
    assert AFMPipeline.from_pretrained(out)(class_labels=[1], num_inference_steps=2, output_type="np").images.shape == (1, 8, 8, 1)


def test_the_reference_recipe_config_reads_as_flags(flow_run, capsys):
    train_cafm.main(["--config", str(REPO / "examples" / "configs" / "cafm" / "sit_xl2.json"),
                     "--pretrained_model_name_or_path", str(flow_run), "--dry_run"])

    settings = json.loads(capsys.readouterr().out)
    assert settings["num_discriminator_steps"] == 16 and settings["warmup_steps"] == 10_000
    assert settings["learning_rate"] == 1e-5 and (settings["adam_beta1"], settings["adam_beta2"]) == (0.0, 0.95)
    assert settings["ema_decay"] == 0.99 and settings["cp_scale"] == 0.001 and settings["max_grad_norm"] == 10_000
    assert settings["_model"]["generator"]["class"] == "FlowMatchingTransformer2DModel"


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_the_reference_recipe_trains_at_toy_size(flow_run, tmp_path):
    """The config's values train as they are (its data, size and length replaced by toy ones)."""
    out = tmp_path / "recipe"
    train_cafm.main(["--config", str(REPO / "examples" / "configs" / "cafm" / "sit_xl2.json"),
                     "--pretrained_model_name_or_path", str(flow_run), "--output_dir", str(out),
                     "--dataset_name", "digits", "--resolution", "8", "--vae", "none", "--no-random_flip",
                     "--train_batch_size", "8", "--max_train_steps", "2", "--warmup_steps", "0",
                     "--num_discriminator_steps", "1", "--validation_inference_steps", "2", "--report_to", "none",
                     "--num_validation_classes", "2", "--num_validation_images", "1"])
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["step"] == 2
    assert type(AFMPipeline.from_pretrained(out).transformer) is FlowMatchingTransformer2DModel


def test_afm_convert_sit_writes_the_reference_velocity(tmp_path, capsys):
    from safetensors.torch import load_file as load

    from diffusers_afm.conversion.cli import main as afm_convert

    fixtures = REPO / "tests" / "fixtures" / "cafm_sit"
    out = tmp_path / "sit"
    result = subprocess.run(["afm-convert", "--checkpoint", str(fixtures / "gen_state_dict.safetensors"), "--format", "sit",
                             "--num_heads", "4", "--vae", "none", "--class_names", "none", "--output_dir", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    model = AFMPipeline.from_pretrained(out).transformer
    io = load(fixtures / "gen_io.safetensors")
    with torch.no_grad():
        velocity = model(io["input/x_t"], io["input/t"], io["input/y_mixed"]).sample
    assert (velocity - io["f32/v_y_mixed"]).abs().max() < 1e-5
    # A bad flag: the same command's `main` (the console script is `sys.exit(main())`), in this process.
    with pytest.raises(SystemExit) as bad:
        afm_convert(["--checkpoint", str(fixtures / "gen_state_dict.safetensors"), "--format", "sit", "--nfe", "2",
                     "--output_dir", str(tmp_path / "x")])
    assert bad.value.code == 2 and "--nfe" in capsys.readouterr().err and not (tmp_path / "x").exists()
