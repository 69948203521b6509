"""Continuous AFM for text-to-image (Z-Image): the discriminator against the authors' reference
(tests/fixtures/cafm_zimage, made with their classes), its JVP against finite differences, and the
trainer end to end on a tiny Z-Image pipeline and captioned images built locally."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import REPO, randomize_
from safetensors.torch import load_file

from diffusers import ZImagePipeline, ZImageTransformer2DModel
from diffusers_afm import FlowMatchingTransformer2DModel
from diffusers_afm.data.captions import check_captions
from diffusers_afm.models.discriminator_zimage import AdversarialFlowZImageDiscriminator
from diffusers_afm.training.cafm import CAFMObjective
from diffusers_afm.training.cafm_zimage import ZImageCAFMTrainingStep, shift_times

import make_tiny_zimage
import train_cafm_t2i

FIXTURES = Path(__file__).parent / "fixtures" / "cafm_zimage"
# float32 JVPs through Z-Image (complex64 RoPE, float32 sinusoid of t * 1000) differ from float64 by
# up to ~5e-5 relative (the fixtures' README); compared relative to each tensor's largest entry.
RTOL = 1e-4


def _close(a, b, rtol=RTOL):
    scale = b.abs().max().clamp_min(1e-6)
    return ((a - b).abs().max() / scale).item() <= rtol


def _listed(tensors, key):
    return [tensors[f"{key}/{i}"] for i in range(2)]


@pytest.fixture(scope="module")
def reference():
    kwargs = json.loads((FIXTURES / "fixtures.json").read_text())["constructor_kwargs"]
    generator = ZImageTransformer2DModel(**kwargs["generator"])
    generator.load_state_dict(load_file(FIXTURES / "gen_state_dict.safetensors"))
    discriminator = AdversarialFlowZImageDiscriminator(**kwargs["discriminator"])
    # The reference's discriminator checkpoint loads as it is (strict): the same parameter names.
    discriminator.load_state_dict(load_file(FIXTURES / "dis_state_dict.safetensors"))
    return generator.eval(), discriminator.eval()


# ----------------------------------------------------------------------------- parity with the reference
def test_discriminator_and_its_jvps_match_the_reference(reference):
    _, dis = reference
    io = load_file(FIXTURES / "dis_io.safetensors")
    x, t, caps = _listed(io, "input/x_t"), io["input/t"], _listed(io, "input/cap_feats")
    v_real, v_pred = _listed(io, "v_real"), _listed(io, "v_pred")
    ones = torch.ones(2)
    with torch.no_grad():
        out, jvp = dis(x, t, caps, tangents=([torch.stack([f, r]) for f, r in zip(v_pred, v_real)], torch.ones(2, 2)))
        assert _close(out, io["two/out"], 1e-5)
        assert _close(jvp[0], io["two/jvp_fake"]) and _close(jvp[1], io["two/jvp_real"])
        out, jvp = dis(x, t, caps, tangents=(v_pred, ones))
        assert _close(out, io["one/out"], 1e-5) and _close(jvp, io["one/jvp_fake"])
        assert _close(dis(x, t, caps, tangents=([torch.zeros_like(a) for a in x], ones))[1], io["dt_only/jvp"])
        assert _close(dis(x, t, caps, tangents=(v_real, torch.zeros(2)))[1], io["dx_only/jvp"])
        assert _close(dis(x, t, caps), io["one/out"], 1e-5)  # no tangents: the logits alone


def test_training_step_losses_and_every_gradient_match_the_reference(reference):
    generator, discriminator = reference
    generator.enable_gradient_checkpointing()
    discriminator.enable_gradient_checkpointing()  # block-by-block JVP under checkpointing, as the reference trains
    ref = load_file(FIXTURES / "train_steps.safetensors")
    objective = CAFMObjective(cp_scale=0.001, ot_scale=0.05, warmup=100, num_discriminator_steps=16)
    step = ZImageCAFMTrainingStep(Accelerator(cpu=True), generator, discriminator, None, None, objective)
    inputs = (_listed(ref, "input/latents"), _listed(ref, "input/text_embeds"), _listed(ref, "input/noises"),
              ref["input/timesteps"])
    try:
        loss, logs = step.discriminator_objective(*inputs)
        assert _close(loss, ref["dstep/loss/loss/total"], 1e-5) and _close(logs["loss_cp"], ref["dstep/loss/loss/cp"])
        loss.backward()
        for name, p in discriminator.named_parameters():
            assert _close(p.grad, ref[f"dstep/grad/{name}"]), name
        discriminator.zero_grad()
        discriminator.requires_grad_(False)
        loss, logs, _ = step.generator_objective(*inputs)
        assert _close(loss, ref["gstep/loss/loss/total"], 1e-5) and _close(logs["loss_ot"], ref["gstep/loss/loss/ot"])
        loss.backward()
        for name, p in generator.named_parameters():
            assert _close(p.grad, ref[f"gstep/grad/{name}"]), name
    finally:
        discriminator.requires_grad_(True)
        generator.disable_gradient_checkpointing()
        discriminator.disable_gradient_checkpointing()
        generator.zero_grad()


def test_time_shift_and_schedule_match_the_reference():
    ref = load_file(FIXTURES / "train_steps.safetensors")
    assert torch.allclose(shift_times(ref["probe/shift_in"], 3.0), ref["probe/shift_out"], atol=1e-6)
    step = ZImageCAFMTrainingStep(None, None, None, None, None, CAFMObjective(warmup=100, num_discriminator_steps=16))
    assert [step.is_discriminator_step(int(s)) for s in ref["schedule/steps"]] == ref["schedule/is_dis_step"].bool().tolist()


# ----------------------------------------------------------------------------- the discriminator itself
def _tiny(seed=0):
    torch.manual_seed(seed)
    transformer = randomize_(ZImageTransformer2DModel(**make_tiny_zimage.TRANSFORMER), std=0.05, seed=seed)
    return transformer, randomize_(AdversarialFlowZImageDiscriminator.for_transformer(transformer), std=0.02, seed=seed + 1)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(16, 1, 8, 8, generator=g), torch.randn(16, 1, 6, 10, generator=g)]
    caps = [torch.randn(7, 32, generator=g), torch.randn(40, 32, generator=g)]
    return x, torch.tensor([0.3, 0.8]), caps, [torch.randn(a.shape, generator=g) for a in x]


@pytest.mark.parametrize("direction, eps, rtol", [("x", 1e-2, 1e-3), ("t", 1e-4, 1e-2)])
def test_jvp_agrees_with_finite_differences(direction, eps, rtol):
    """Central differences in float32 (Z-Image's RoPE is complex64: no float64 run). The time
    direction is steep (the sinusoid of t * 1000), so it takes a small step and a looser tolerance."""
    _, dis = _tiny()
    x, t, caps, dx = _inputs()
    if direction == "x":
        dt = torch.zeros(2)
    else:
        dx, dt = [torch.zeros_like(a) for a in x], torch.ones(2)
    with torch.no_grad():
        _, jvp = dis(x, t, caps, tangents=(dx, dt))
        plus = dis([a + eps * d for a, d in zip(x, dx)], t + eps * dt, caps)
        minus = dis([a - eps * d for a, d in zip(x, dx)], t - eps * dt, caps)
    difference = (plus - minus) / (2 * eps)
    assert (jvp - difference).abs().max() <= rtol * jvp.abs().max(), (jvp, difference)


def test_stacked_tangents_equal_single_calls_and_checkpointing_changes_no_gradient():
    _, dis = _tiny()
    x, t, caps, dx = _inputs()
    dx2 = [torch.randn_like(a) for a in x]
    out, both = dis(x, t, caps, tangents=([torch.stack([a, b]) for a, b in zip(dx, dx2)], torch.ones(2, 2)))
    _, first = dis(x, t, caps, tangents=(dx, torch.ones(2)))
    _, second = dis(x, t, caps, tangents=(dx2, torch.ones(2)))
    assert _close(both[0], first, 1e-5) and _close(both[1], second, 1e-5)

    def grads():
        dis.zero_grad()
        logits, d = dis(x, t, caps, tangents=(dx, torch.ones(2)))
        (d.square().sum() + logits.sum()).backward()
        return {n: p.grad.clone() for n, p in dis.named_parameters()}

    plain = grads()
    dis.enable_gradient_checkpointing()
    checkpointed = grads()
    assert all(_close(checkpointed[n], plain[n], 1e-5) for n in plain)


def test_discriminator_is_the_generator_trunk_with_a_new_head(tmp_path):
    transformer, _ = _tiny()
    dis = AdversarialFlowZImageDiscriminator.for_transformer(transformer)
    trunk = transformer.state_dict()
    own = dis.state_dict()
    assert all(torch.equal(own[k], trunk[k]) for k in own if not k.startswith("out."))
    assert {k.split(".")[0] for k in trunk if k not in own} == {"all_final_layer"}
    dis.save_pretrained(tmp_path / "dis")
    again = AdversarialFlowZImageDiscriminator.from_pretrained(tmp_path / "dis")
    assert all(torch.equal(again.state_dict()[k], own[k]) for k in own)


def test_discriminator_rejects_bad_input_clearly():
    with pytest.raises(ValueError, match="ZImageTransformer2DModel"):
        AdversarialFlowZImageDiscriminator.for_transformer(FlowMatchingTransformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=8))
    _, dis = _tiny()
    x, t, caps, dx = _inputs()
    with pytest.raises(ValueError, match=r"`x\[0\]` must have shape \(16, F, H, W\)"):
        dis([x[0][:4], x[1]], t, caps)
    with pytest.raises(ValueError, match="`cap_feats` must hold one embedding per sample"):
        dis(x, t, caps[:1])
    with pytest.raises(ValueError, match="tangent `dx` must be a list shaped like `x`"):
        dis(x, t, caps, tangents=(dx[:1], torch.ones(2)))
    with pytest.raises(ValueError, match="multiples of the patch sizes"):
        dis([torch.randn(16, 1, 7, 8), x[1]], t, caps)


def test_missing_captions_are_named():
    with pytest.raises(ValueError, match=r"2 of 3 images have no caption \(rows \[0, 2\]\)"):
        check_captions([None, "a cat", None], "text")


# ----------------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("zimage")
    make_tiny_zimage.main(["--pipeline_dir", str(root / "pipe"), "--images_dir", str(root / "images"), "--num_images", "16"])
    return root


def _train(assets, out, *flags):
    return train_cafm_t2i.main(["--pretrained_model_name_or_path", str(assets / "pipe"), "--train_data_dir",
                                str(assets / "images"), "--caption_column", "text", "--resolution", "16",
                                "--train_batch_size", "4", "--warmup_steps", "2", "--num_discriminator_steps", "1",
                                "--validation_inference_steps", "2", "--validation_prompt", "a red digit seven",
                                "--report_to", "none", "--output_dir", str(out), *flags])


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_trainer_post_trains_and_writes_a_stock_zimage_pipeline(tiny_assets, tmp_path):
    out = tmp_path / "run"
    # Steps 0-2 are D steps (step <= warm-up 2), then with N = 1: 3 G, 4 D, 5 G.
    _train(tiny_assets, out, "--max_train_steps", "6", "--checkpointing_steps", "3", "--validation_steps", "3",
           "--mixed_precision", "bf16", "--gradient_checkpointing")
    start = ZImageTransformer2DModel.from_pretrained(tiny_assets / "pipe", subfolder="transformer").state_dict()
    after_warmup = load_file(out / "checkpoint-3" / "model.safetensors")
    assert all(torch.equal(after_warmup[k], start[k]) for k in start)  # D steps leave the generator alone
    final = load_file(out / "checkpoint-6" / "model.safetensors")
    assert any(not torch.equal(final[k], start[k]) for k in start)  # G steps change it
    assert (out / "samples" / "step_0000003.png").exists() and (out / "samples.png").exists()
    card = (out / "README.md").read_text()
    assert "text-to-image" in card and "continuous-adversarial-flow-models" in card and "ZImagePipeline" in card
    # Its snippet: diffusers' current `dtype=`, a prompt of this run (its validation prompt); the base
    # model, a local folder, named in the text (the Hub's `base_model` metadata takes only a Hub id).
    assert "dtype=torch.bfloat16" in card and "torch_dtype" not in card and 'pipe("a red digit seven"' in card
    assert "from the local model `pipe`" in card and "base_model" not in card.split("---")[1]
    assert AdversarialFlowZImageDiscriminator.from_pretrained(out / "discriminator").config.dim == 64
    # diffusers alone (diffusers_afm cannot be imported) loads and samples the output folder.
    code = ("import sys; sys.modules['diffusers_afm'] = None\n"
            "import torch; from diffusers import ZImagePipeline\n"
            f"pipe = ZImagePipeline.from_pretrained({str(out)!r})\n"
            "assert type(pipe.transformer).__name__ == 'ZImageTransformer2DModel'\n"
            "im = pipe('a blue digit two', height=16, width=16, num_inference_steps=2, output_type='np').images\n"
            "assert im.shape == (1, 16, 16, 3), im.shape\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    ema = ZImagePipeline.from_pretrained(out).transformer.state_dict()
    assert any(not torch.equal(ema[k], start[k]) for k in start)  # the EMA followed the G steps


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_trainer_resume_is_bit_for_bit(tiny_assets, tmp_path):
    from accelerate.state import AcceleratorState

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = ("--checkpointing_steps", "3", "--validation_steps", "100", "--caption_dropout", "0.5")
    _train(tiny_assets, straight, "--max_train_steps", "7", *flags)
    AcceleratorState._reset_state(True)
    _train(tiny_assets, resumed, "--max_train_steps", "3", *flags)
    AcceleratorState._reset_state(True)
    _train(tiny_assets, resumed, "--max_train_steps", "7", "--resume_from_checkpoint", "latest", *flags)
    for name in ("model.safetensors", "model_1.safetensors", "ema.safetensors"):
        a, b = load_file(straight / "checkpoint-7" / name), load_file(resumed / "checkpoint-7" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def _variant(assets, tmp_path, name, edit):
    """A copy of the tiny pipeline or image folder with one file edited."""
    folder = tmp_path / name
    shutil.copytree(assets / ("images" if name.startswith("images") else "pipe"), folder)
    edit(folder)
    return folder


def _no_captions(folder):
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows[1]["text"] = None
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _not_flow(folder):
    config = json.loads((folder / "transformer" / "config.json").read_text())
    config["_class_name"] = "UNet2DConditionModel"
    (folder / "transformer" / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("case, flags, message", [
    ("caption", ("--caption_column", "caption"), r"`--caption_column` 'caption' is not a column.*metadata.jsonl"),
    ("images_uncaptioned", (), r"1 of 16 images have no caption \(rows \[1\]\)"),
    ("pipe_not_flow", (), r"a Z-Image flow-matching pipeline.*'UNet2DConditionModel'"),
    ("resolution", ("--resolution", "20"), r"`--resolution` got 20; allowed: a multiple of 16"),
    ("hub", ("--pretrained_model_name_or_path", "nobody/not-a-cached-model"), "Hub repository id that can be downloaded"),
    ("steps", ("--num_discriminator_steps", "0"), "num_discriminator_steps"),
    # Its output is a stock ZImagePipeline: the trainer has no standalone export, so argparse refuses the flag.
    ("standalone", ("--standalone_hub_files",), "unrecognized arguments: --standalone_hub_files"),
])
def test_trainer_bad_input_fails_before_any_work(tiny_assets, tmp_path, case, flags, message, monkeypatch, capsys):
    images, pipe = tiny_assets / "images", tiny_assets / "pipe"
    if case == "images_uncaptioned":
        images = _variant(tiny_assets, tmp_path, case, _no_captions)
    if case == "pipe_not_flow":
        pipe = _variant(tiny_assets, tmp_path, case, _not_flow)
    argv = ["train_cafm_t2i.py", "--pretrained_model_name_or_path", str(pipe), "--train_data_dir", str(images),
            "--resolution", "16", "--output_dir", str(tmp_path / "out"), "--report_to", "none", *flags]
    # The command line's own entry point (`__main__`: `cli.run_trainer`), in this process: a one-line
    # error and a non-zero exit; any other exception (a traceback) fails the test.
    from accelerate.state import AcceleratorState

    from diffusers_afm.training import cli

    monkeypatch.setattr(sys, "argv", argv)
    AcceleratorState._reset_state(True)
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.run_trainer(train_cafm_t2i.parse_args, train_cafm_t2i.settings, train_cafm_t2i.train)
    finally:
        AcceleratorState._reset_state(True)
    code = exit_info.value.code
    output = capsys.readouterr().err + (code if isinstance(code, str) else "")
    assert code not in (0, None)
    import re

    assert re.search(message, output, re.S), output[-2000:]
    assert not (tmp_path / "out" / "checkpoint-1").exists() and not (tmp_path / "out" / "model_index.json").exists()


def test_every_t2i_trainer_flag_has_help_and_shows_its_default():
    parser = train_cafm_t2i.build_parser()
    assert [a.dest for a in parser._actions if not (a.help or "").strip()] == []
    assert "(default:" in parser.format_help()


def test_t2i_trainer_two_processes(tiny_assets, tmp_path):
    """DDP with 2 CPU processes: D steps (block-by-block JVP inside DDP's forward) and G steps keep both ranks equal."""
    out = tmp_path / "run"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           str(REPO / "examples" / "train_cafm_t2i.py"), "--output_dir", str(out), "--pretrained_model_name_or_path",
           str(tiny_assets / "pipe"), "--train_data_dir", str(tiny_assets / "images"), "--resolution", "16",
           "--train_batch_size", "2", "--max_train_steps", "5", "--warmup_steps", "2", "--num_discriminator_steps", "1",
           "--validation_inference_steps", "2", "--report_to", "none"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split("weight sums ")[1] for line in result.stderr.splitlines() if "finished: step 5" in line]
    assert len(lines) == 2 and lines[0] == lines[1], lines
    assert ZImagePipeline.from_pretrained(out).transformer is not None
