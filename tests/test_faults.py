"""The fault suite's fast part (docs/reliability.md): damaged and hostile files, a full disk, a
diverged run, bad data. The long trials (SIGKILL at random moments, a dying rank, interrupted
sampling) are `benchmarks/faults.py`."""

import errno
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from diffusers_afm import AFMPipeline
from diffusers_afm.training import checkpoint as checkpoint_module
from diffusers_afm.training.checkpoint import CheckpointError, list_checkpoints, verify_checkpoint

import train_afm

TINY = str(REPO / "tests" / "fixtures" / "tiny_model.json")


# Each test builds its own Accelerator (conftest.py).
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _train(out, *flags):
    args = ["--output_dir", str(out), "--model_config", TINY, "--train_batch_size", "16", "--report_to", "none",
            "--num_validation_images", "1", "--num_validation_classes", "2", "--validation_steps", "1000", *flags]
    return train_afm.main(args)


class Payload:
    """Unpickling this creates `marker`: the harmless stand-in for code a hostile file would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def run_with_checkpoints(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4, copied fresh for each test that damages it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    out = tmp_path_factory.mktemp("faults") / "run"
    umask = os.umask(0o022)  # the common default (test_run_guards.py reads the modes of what it wrote)
    try:
        _train(out, "--max_train_steps", "4", "--checkpointing_steps", "2")
    finally:
        os.umask(umask)
    AcceleratorState._reset_state(True)
    return out


@pytest.fixture
def run_dir(run_with_checkpoints, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run_with_checkpoints, out)
    return out


def _resume(out, *flags):
    return _train(out, "--max_train_steps", "6", "--checkpointing_steps", "2", *flags)


def _rewrite_manifest(folder):
    """What an attacker who also edits the state file does: the manifest then matches the files."""
    state_file = folder / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["files"] = checkpoint_module.manifest(str(folder))
    state_file.write_text(json.dumps(state))


# ----------------------------------------------------------------------------- hostile files
@pytest.mark.parametrize("name, with_manifest", [
    ("custom_checkpoint_0.pkl", False),  # Accelerate would read it with weights_only=False
    ("custom_checkpoint_0.pkl", True),
    ("random_states_0.pkl", True),  # replaced, with a manifest that matches
    ("optimizer.bin", True),
    ("scheduler_1.bin", False),  # replaced, the manifest left as it was
])
def test_a_crafted_pickle_in_a_checkpoint_runs_no_code_on_resume(run_dir, tmp_path, name, with_manifest):
    marker = tmp_path / "pwned"
    ckpt = run_dir / "checkpoint-4"
    target = ckpt / name
    if name.endswith(".pkl") and name.startswith("custom"):
        target.write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save({"state": Payload(marker)}, target)  # torch.save's zip layout, as Accelerate writes
    if with_manifest:
        _rewrite_manifest(ckpt)
    with pytest.raises(CheckpointError, match=rf"{name}.*(refusing to unpickle|garbled)"):
        _resume(run_dir, "--resume_from_checkpoint", "latest")
    assert not marker.exists()


def test_from_pretrained_and_afm_convert_run_no_code_from_a_pickle(run_dir, tmp_path):
    marker = tmp_path / "pwned"
    transformer = run_dir / "transformer"
    (transformer / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"weight": Payload(marker)}, transformer / "diffusion_pytorch_model.bin")
    with pytest.raises(Exception, match=r"diffusion_pytorch_model\.bin holds objects other than tensors \((io|builtins)\.open\); it was not unpickled"):
        AFMPipeline.from_pretrained(run_dir)  # diffusers reads a .bin with torch.load(weights_only=True)
    assert not marker.exists()
    checkpoint = tmp_path / "hostile.pth"
    torch.save({"model": Payload(marker)}, checkpoint)
    result = subprocess.run([sys.executable, "-m", "diffusers_afm.conversion.cli", "--checkpoint", str(checkpoint),
                             "--vae", "none", "--output_dir", str(tmp_path / "converted")], capture_output=True, text=True)
    assert result.returncode == 1 and "hostile.pth" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()


# ----------------------------------------------------------------------------- corrupt state
def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garble(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, damage, message", [
    ("model.safetensors", _truncate, "truncated"),
    ("model.safetensors", _garble, "garbled"),
    ("optimizer.bin", _truncate, "truncated"),
    ("optimizer_1.bin", _garble, "garbled"),
    ("random_states_0.pkl", _truncate, "truncated"),
    ("ema.safetensors", _garble, "garbled"),
    ("trainer_state.json", _garble, "cannot be read|no step count"),
])
def test_a_damaged_checkpoint_is_a_one_line_error_and_latest_valid_falls_back(run_dir, name, damage, message,
                                                                              monkeypatch):
    damage(run_dir / "checkpoint-4" / name)
    with monkeypatch.context() as patch:  # the error comes before any data is loaded
        patch.setattr(train_afm, "load_training_data", lambda *a, **k: pytest.fail("data was loaded"))
        with pytest.raises(CheckpointError, match=message) as info:
            _resume(run_dir, "--resume_from_checkpoint", "latest")
    text = str(info.value)
    assert name in text and "checkpoint-2" in text and "latest_valid" in text and "\n" not in text
    # Asked for, the fallback resumes from checkpoint-2 and replaces the damaged checkpoint-4.
    _resume(run_dir, "--resume_from_checkpoint", "latest_valid")
    assert [os.path.basename(p) for p in list_checkpoints(run_dir)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    verify_checkpoint(str(run_dir / "checkpoint-4"))


def test_a_checkpoint_of_another_model_names_it(run_dir, tmp_path):
    other = tmp_path / "other.json"
    config = json.loads(open(TINY).read())
    other.write_text(json.dumps(dict(config, num_layers=config["num_layers"] + 1)))
    with pytest.raises(CheckpointError, match="checkpoint-4 was written with other settings: `--model_config`"):
        _train(run_dir, "--max_train_steps", "6", "--model_config", str(other), "--resume_from_checkpoint", "latest")
    # Accepted as a change, the weights themselves still do not fit.
    with pytest.raises(CheckpointError, match="checkpoint-4 does not fit this run"):
        _train(run_dir, "--max_train_steps", "6", "--model_config", str(other), "--resume_from_checkpoint", "latest",
               "--allow_changed_settings", "model_config")


def test_damaged_pipeline_folders_name_the_file(run_dir):
    weights = run_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    original = weights.read_bytes()
    _truncate(weights)
    with pytest.raises(OSError, match=r"diffusion_pytorch_model\.safetensors is truncated"):
        AFMPipeline.from_pretrained(run_dir)
    weights.write_bytes(original)
    index = run_dir / "model_index.json"
    text = index.read_text()
    index.write_text(text[:-5] + "}}garbage")
    with pytest.raises(OSError, match=r"model_index\.json.*not a valid JSON"):
        AFMPipeline.from_pretrained(run_dir)
    index.write_text(text)
    config_file = run_dir / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(dict(config, attention_head_dim=2 * config["attention_head_dim"])))
    with pytest.raises(ValueError, match=r"transformer/diffusion_pytorch_model\.safetensors holds .* but .*transformer/config\.json builds"):
        AFMPipeline.from_pretrained(run_dir)


# ----------------------------------------------------------------------------- a full disk
def test_a_full_disk_keeps_the_last_checkpoint_and_says_how_much_space(run_dir, monkeypatch):
    real_save_file = checkpoint_module.save_file

    def full(tensors, filename, *args, **kwargs):
        if ".checkpoint-6.tmp" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", full)
    with pytest.raises(CheckpointError, match=r"checkpoint-6 .* the disk is full .* takes \d+\.\d MiB.*checkpoint-4 and is untouched"):
        _resume(run_dir, "--resume_from_checkpoint", "latest")
    assert not (run_dir / ".checkpoint-6.tmp").exists()  # the partial save is removed
    assert [os.path.basename(p) for p in list_checkpoints(run_dir)] == ["checkpoint-2", "checkpoint-4"]
    verify_checkpoint(str(run_dir / "checkpoint-4"))
    monkeypatch.undo()
    _resume(run_dir, "--resume_from_checkpoint", "latest")  # space freed: the run goes on from checkpoint-4
    assert json.loads((run_dir / "checkpoint-6" / "trainer_state.json").read_text())["step"] == 6


def test_pruning_renames_before_deleting(run_dir):
    """A crash while pruning (simulated: the renamed folder is left) never leaves a counted half."""
    (run_dir / ".checkpoint-1.old").mkdir()
    (run_dir / ".checkpoint-1.old" / "trainer_state.json").write_text('{"step": 1}')
    _resume(run_dir, "--resume_from_checkpoint", "latest", "--checkpoints_total_limit", "2")
    assert [os.path.basename(p) for p in list_checkpoints(run_dir)] == ["checkpoint-4", "checkpoint-6"]
    assert not any(p.name.endswith((".old", ".tmp")) for p in run_dir.iterdir())


# ----------------------------------------------------------------------------- non-finite values
def test_a_run_that_diverges_after_a_checkpoint_keeps_it_and_writes_no_pipeline(tmp_path, monkeypatch):
    from diffusers_afm.training import step as step_module

    real_loss, calls = step_module.generator_loss, {"n": 0}

    def diverging(*args, **kwargs):
        loss, logs = real_loss(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= 3:  # the third G step: after checkpoint-2 was written
            loss = loss * float("nan")
            logs["loss_g"] = loss.detach()
        return loss, logs

    monkeypatch.setattr(step_module, "generator_loss", diverging)
    out = tmp_path / "run"
    with pytest.raises(train_afm.NonFiniteLossError, match=r"step 3: loss part `(loss_g|grad_norm_g)` is nan.*checkpoint-2"):
        _train(out, "--max_train_steps", "6", "--checkpointing_steps", "2")
    assert [os.path.basename(p) for p in list_checkpoints(out)] == ["checkpoint-2"]
    verify_checkpoint(str(out / "checkpoint-2"))
    weights = load_file(out / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert not (out / "model_index.json").exists() and not (out / "transformer").exists()


# ----------------------------------------------------------------------------- bad data
def _png(path, mode, size, seed):
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    image = PIL.Image.fromarray(array).convert(mode)
    image.save(path, format="JPEG" if mode == "CMYK" else "PNG")


def test_mixed_modes_sizes_and_broken_files_train_with_a_warning_each(tmp_path, caplog):
    data = tmp_path / "data"
    modes = ("L", "RGBA", "P", "CMYK", "RGB", "LA", "1")
    for label in ("a", "b"):
        (data / label).mkdir(parents=True)
        for i, mode in enumerate(modes):
            suffix = "jpg" if mode == "CMYK" else "png"
            _png(data / label / f"{mode.replace(';', '')}_{i}.{suffix}", mode, (10 + 3 * i, 14 + i), seed=i)
    (data / "a" / "text.png").write_text("this is not an image")
    good = (data / "b" / "RGB_4.png").read_bytes()
    (data / "b" / "truncated.png").write_bytes(good[: len(good) // 2])
    (data / "empty_class").mkdir()  # no images: not a class
    out = tmp_path / "run"
    _train(out, "--train_data_dir", str(data), "--vae", "none", "--resolution", "8", "--max_train_steps", "2",
           "--train_batch_size", "16")
    assert "text.png" in caplog.text and "truncated.png" in caplog.text
    pipe = AFMPipeline.from_pretrained(out)
    assert pipe.id2label == {0: "a", 1: "b"} and pipe.transformer.config.in_channels == 3


def test_an_empty_folder_is_an_error_before_training(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(ValueError, match="train_data_dir.*no images"):
        _train(tmp_path / "run", "--train_data_dir", str(tmp_path / "data"), "--vae", "none")
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_a_folder_of_only_broken_images_stops_with_one_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        (data / f"{i}.png").write_text("not an image")
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "train_afm.py"), "--output_dir", str(tmp_path / "run"),
         "--train_data_dir", str(data), "--vae", "none", "--resolution", "8", "--model_config", TINY,
         "--train_batch_size", "4", "--max_train_steps", "2", "--report_to", "none"],
        capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: Every image of a batch was unreadable")
    assert "Traceback" not in result.stderr
