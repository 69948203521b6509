"""examples/train_afm.py end to end on the CPU: runs, checkpoints, resumes, fails clearly."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from diffusers_afm import AFMPipeline

import train_afm

TINY = str(REPO / "tests" / "fixtures" / "tiny_model.json")


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _train(out, *flags):
    args = ["--output_dir", str(out), "--model_config", TINY, "--train_batch_size", "16", "--report_to", "none",
            "--num_validation_images", "2", *flags]
    return train_afm.main(args)


def test_twenty_step_run_writes_a_pipeline_that_samples(tmp_path):
    out = tmp_path / "run"
    _train(out, "--max_train_steps", "20", "--checkpointing_steps", "10", "--validation_steps", "10",
           "--report_to", "tensorboard")
    pipe = AFMPipeline.from_pretrained(out)
    assert pipe.vae is None and pipe.transformer.config.in_channels == 1  # grey digits, pixel space
    assert pipe.id2label == {i: str(i) for i in range(10)}
    images = pipe(class_labels=["7", 3], generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    # EMA weights, not the raw generator: they differ after 20 steps.
    raw = load_file(out / "checkpoint-20" / "model.safetensors")
    ema = pipe.transformer.state_dict()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw if k in ema)
    assert (out / "samples.png").exists() and (out / "samples" / "step_0000010.png").exists()
    assert (out / "discriminator" / "diffusion_pytorch_model.safetensors").exists()
    card = (out / "README.md").read_text()
    assert "AFMPipeline.from_pretrained" in card and "\"max_train_steps\": 20" in card
    assert any(name.startswith("events.out.tfevents") for _, _, files in os.walk(out / "logs") for name in files)
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-10", "checkpoint-20"]


def test_resume_continues_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = ("--checkpointing_steps", "3", "--random_flip")  # flips too must be replayed exactly
    _train(straight, "--max_train_steps", "6", *flags)
    _train(resumed, "--max_train_steps", "3", *flags)
    _train(resumed, "--max_train_steps", "6", "--resume_from_checkpoint", "latest", *flags)
    for name in ("model.safetensors", "model_1.safetensors", "ema.safetensors", "grad_norm.safetensors"):
        a = load_file(straight / "checkpoint-6" / name)
        b = load_file(resumed / "checkpoint-6" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_checkpoint_limit_and_interrupted_saves(tmp_path):
    out = tmp_path / "run"
    # A crashed save and an incomplete folder are never resumed from nor counted.
    (out / ".checkpoint-99.tmp").mkdir(parents=True)
    (out / "checkpoint-98").mkdir()
    _train(out, "--max_train_steps", "8", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2",
           "--resume_from_checkpoint", "latest")
    from diffusers_afm.training.checkpoint import list_checkpoints

    assert [os.path.basename(p) for p in list_checkpoints(out)] == ["checkpoint-6", "checkpoint-8"]
    assert json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())["step"] == 8


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--gp_scale", "-1"], "--gp_scale"),
        (["--ot_scale", "-0.1"], "--ot_scale"),
        (["--train_data_dir", "/no/such/folder"], "--train_data_dir"),
        (["--model_config", "Huge/2"], "--model_config"),
        (["--nfe", "2", "--prediction_type", "sample"], "--prediction_type"),
        (["--resume_from_checkpoint", "/no/such/checkpoint"], "--resume_from_checkpoint"),
    ],
)
def test_bad_flags_fail_before_training(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        _train(tmp_path / "run", *flags)
    assert not (tmp_path / "run").exists()


def test_unknown_nfe_is_rejected_by_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "examples" / "train_afm.py"), "--nfe", "three",
                             "--output_dir", str(tmp_path / "o")], capture_output=True, text=True)
    assert result.returncode != 0 and "--nfe" in result.stderr
    assert not (tmp_path / "o").exists()


def _image_folder(root, labels=("cat", "dog"), per_class=8, size=12):
    rng = np.random.default_rng(0)
    for label in labels:
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            array = rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)
            PIL.Image.fromarray(array).save(root / label / f"{i}.png")
    return root


def test_image_folder_with_a_vae_and_a_corrupt_file(tmp_path, tiny_vae_dir, caplog):
    data = _image_folder(tmp_path / "data")
    (data / "dog" / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "run"
    _train(out, "--train_data_dir", str(data), "--vae", tiny_vae_dir, "--resolution", "8",
           "--max_train_steps", "3", "--train_batch_size", "8", "--validation_steps", "100")
    assert "broken.png" in caplog.text
    pipe = AFMPipeline.from_pretrained(out)
    assert pipe.vae is not None and pipe.transformer.config.sample_size == 4  # 8 px / 2 (tiny VAE)
    assert pipe.id2label == {0: "cat", 1: "dog"}
    assert pipe(class_labels=["dog"], output_type="np").images.shape == (1, 8, 8, 3)


def test_labels_outside_the_model_are_an_error_before_training(tmp_path):
    data = _image_folder(tmp_path / "data", labels=("a", "b", "c"))
    with pytest.raises(ValueError, match="label 2, outside the model's classes 0..1"):
        _train(tmp_path / "run", "--train_data_dir", str(data), "--vae", "none", "--num_classes", "2")
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_non_finite_loss_stops_with_the_step_and_part(tmp_path):
    # gp_eps so small that 1/eps^2 overflows float32: the R1 term is not finite at the first step.
    with pytest.raises(train_afm.NonFiniteLossError, match=r"step 1: loss part `(loss_d|r1|r2)`"):
        _train(tmp_path / "run", "--max_train_steps", "5", "--gp_eps", "1e-30")
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_two_processes(tmp_path):
    """`accelerate launch` with 2 CPU processes: both ranks step, agree, and the result loads."""
    out = tmp_path / "run"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "examples" / "train_afm.py"), "--output_dir", str(out), "--model_config", TINY,
           "--train_batch_size", "8", "--max_train_steps", "4", "--report_to", "none",
           "--num_validation_images", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "finished: step" in line]
    ranks = {line.split("rank ")[1].split(" ")[0]: line.split("grad-norm statistic ")[1] for line in lines}
    assert set(ranks) == {"0", "1"} and all("step 4" in line for line in lines)
    assert ranks["0"] == ranks["1"]  # gradient-normalization statistics are averaged over ranks
    assert (out / "checkpoint-4" / "noise_rng_1.safetensors").exists()
    pipe = AFMPipeline.from_pretrained(out)
    assert pipe(class_labels=[1], output_type="np").images.shape == (1, 8, 8, 1)


def test_compile_flag_trains_and_saves(tmp_path):
    """--compile compiles each transformer block in place: same parameter names, a loadable pipeline."""
    out = tmp_path / "run"
    _train(out, "--max_train_steps", "2", "--compile", "--num_validation_classes", "2")
    pipe = AFMPipeline.from_pretrained(out)
    assert all("_orig_mod" not in k for k in pipe.transformer.state_dict())
    assert pipe(class_labels=[0], output_type="np").images.shape == (1, 8, 8, 1)
