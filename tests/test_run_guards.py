"""What a run checks before it trains and what it refuses (docs/reliability.md; issue 27): the output
folder (writable, enough room, one run at a time, not another run's), the settings a resume keeps,
non-finite weights, samples tied to the model, real full disks, every image mode's range, leftovers of
interrupted writes and the modes of the files written.

Faults are real where this machine allows it: a tmpfs that fills up (mounting needs root), a folder the
process may not write (root runs the trainer with its capabilities dropped). Elsewhere (CI runs as a user
that cannot mount) the full disk is the error the library in question really raises there."""

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import REPO, randomize_, tiny_generator_config
from safetensors.torch import load_file, save_file

from diffusers_afm import AdversarialFlowTransformer2DModel, AFMPipeline
from diffusers_afm.data.images import ImageTransform, load_pixels
from diffusers_afm.evaluation import generate_images
from diffusers_afm.training import cli
from diffusers_afm.training import output_dir as output_dir_module
from diffusers_afm.training.checkpoint import CheckpointError, list_checkpoints, manifest, verify_checkpoint
from diffusers_afm.training.output_dir import LOCK_FILE, OutputDirError
from diffusers_afm.utils import RunStopped, WriteError, atomic_save_pretrained, remove_stale_temporaries, save_pretrained_into

import sample_afm
import train_afm
from test_faults import TINY, _train, run_dir, run_with_checkpoints  # noqa: F401 (fixtures: a 4-step run, a fresh copy)

ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
# The flags of test_faults._train, for the trainer as a process.
COMMON = ["--model_config", TINY, "--train_batch_size", "16", "--report_to", "none", "--num_validation_images", "1",
          "--num_validation_classes", "2", "--validation_steps", "1000"]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _command(script, *flags):
    return [sys.executable, str(REPO / "examples" / script), *flags]


def _one_line_error(result, start="error: "):
    """The process failed with one `error:` line on stderr (its last), no traceback."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(start), last
    return last


def _resume(out, *flags):
    return _train(out, "--max_train_steps", "6", "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest", *flags)


# ----------------------------------------------------------------------------- real faults: helpers
@contextmanager
def _tmpfs(path, size):
    """A real tmpfs of `size` at `path` when this process may mount (root); yields whether it did."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                                   capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=True)


def _without_privileges():
    """The command prefix that runs a process which file permissions apply to: root with its
    capabilities dropped (root ignores permissions otherwise), nothing for another user."""
    if os.geteuid() != 0:
        return []
    assert shutil.which("setpriv"), "setpriv (util-linux) is needed to test permissions as root"
    return ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]


def _read_only(folder):
    for root, dirs, _ in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o555)
    os.chmod(folder, 0o555)


# ----------------------------------------------------------------------------- 1. a folder that cannot be written
@pytest.mark.parametrize("case", ["new run", "resume", "tensorboard logs"])
def test_a_folder_that_cannot_be_written_stops_before_any_data_is_read(run_with_checkpoints, tmp_path, case):
    out = tmp_path / "run"
    flags = ["--max_train_steps", "6", "--checkpointing_steps", "2"]
    if case == "new run":
        out.mkdir()
        _read_only(out)
    elif case == "resume":
        shutil.copytree(run_with_checkpoints, out)
        _read_only(out)
        flags += ["--resume_from_checkpoint", "latest"]
    else:
        out.mkdir()
        (out / "logs").mkdir()
        _read_only(out / "logs")
        flags += ["--report_to", "tensorboard"]  # the last --report_to counts
    command = _without_privileges() + _command("train_afm.py", "--output_dir", str(out), *COMMON, *flags)
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    flag = "--logging_dir" if case == "tensorboard logs" else "--output_dir"
    line = _one_line_error(result, f"error: `{flag}` ")
    assert "is not writable (Permission denied)" in line
    assert "classes, batch" not in result.stderr  # stopped before the data was loaded
    assert [os.path.basename(p) for p in list_checkpoints(out)] == (["checkpoint-2", "checkpoint-4"] if case == "resume" else [])


# ----------------------------------------------------------------------------- 2. free space
def test_less_room_than_one_checkpoint_stops_before_the_first_step(tmp_path, monkeypatch):
    monkeypatch.setattr(train_afm.AFMTrainingStep, "__call__", lambda *a, **k: pytest.fail("a step was trained"))
    with _tmpfs(tmp_path / "disk", "512k") as mounted:
        if not mounted:  # the free space this machine cannot make real
            usage = shutil.disk_usage(tmp_path)
            monkeypatch.setattr(output_dir_module.shutil, "disk_usage", lambda p: usage._replace(free=512 * 1024))
        with pytest.raises(OutputDirError, match=r"has 0\.\d MiB free, but one checkpoint of this run takes 0\.\d MiB "
                                                 r"\(estimated from the models' weights and AdamW state\)"):
            _train(tmp_path / "disk" / "run", "--max_train_steps", "4", "--checkpointing_steps", "2")
        assert not list_checkpoints(tmp_path / "disk" / "run")


# ----------------------------------------------------------------------------- 3. a full disk while saving
def _full_disk_injection(monkeypatch, library):
    """What safetensors / torch.save raise on a full disk, for machines that cannot mount one."""
    from safetensors import SafetensorError

    import accelerate.utils.other as accelerate_other

    if library == "safetensors":
        real = accelerate_other.safe_save_file

        def save(tensors, filename, *args, **kwargs):
            if ".checkpoint-4.tmp" in str(filename):
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            return real(tensors, filename, *args, **kwargs)

        monkeypatch.setattr(accelerate_other, "safe_save_file", save)
    else:
        real = torch.save

        def save(obj, f, *args, **kwargs):
            # Accelerate passes a Path (whose `.name` is only the file's name); a file object has the path in `.name`.
            path = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", "")
            if ".checkpoint-4.tmp" in str(path):
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 268352 vs 268240")
            return real(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)


# 1100k: checkpoint-2 fits and the next one's first file (model.safetensors) does not; 1500k: the
# disk fills at the optimizer's torch.save archive.
@pytest.mark.parametrize("size, library, raised", [("1100k", "safetensors", "SafetensorError"),
                                                   ("1500k", "torch.save", "RuntimeError")])
def test_a_real_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, size, library, raised):
    disk = tmp_path / "disk"
    out = disk / "run"
    with _tmpfs(disk, size) as mounted:
        if not mounted:
            _full_disk_injection(monkeypatch, library)
        with pytest.raises(CheckpointError) as info:
            _train(out, "--max_train_steps", "4", "--checkpointing_steps", "2")
        text = str(info.value)
        assert "\n" not in text and type(info.value.__cause__).__name__ == raised
        # torch.save's words ("unexpected pos") name no cause: it is a full disk when the disk is really
        # full; injected on a disk with room, it is a failed write (the same line, the same clean-up).
        cause = "the disk is full" if mounted or library == "safetensors" else "writing failed"
        assert text.startswith(f"Saving checkpoint-4 in {out} failed, {cause} ({raised}")
        assert "a checkpoint of this run takes" in text and text.endswith(f"{out / 'checkpoint-2'} and is untouched")
        assert not (out / ".checkpoint-4.tmp").exists()  # the partial save is removed
        assert [os.path.basename(p) for p in list_checkpoints(out)] == ["checkpoint-2"]
        verify_checkpoint(str(out / "checkpoint-2"))
        if mounted:  # space freed: the run goes on from checkpoint-2
            subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        monkeypatch.undo()
        _train(out, "--max_train_steps", "4", "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest")
        assert [os.path.basename(p) for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
        assert (out / "model_index.json").exists()


def test_exports_on_a_real_full_disk_are_one_line_and_leave_the_old_model(tmp_path, monkeypatch):
    small = AdversarialFlowTransformer2DModel(**tiny_generator_config())
    big = AdversarialFlowTransformer2DModel(**tiny_generator_config(num_layers=8))  # 600 KiB of weights, the small one 160
    disk = tmp_path / "disk"
    with _tmpfs(disk, "400k") as mounted:  # room for two small models
        atomic_save_pretrained(small, disk / "discriminator")
        save_pretrained_into(small, str(disk / "folder"), last="config.json")
        before = (disk / "discriminator" / "diffusion_pytorch_model.safetensors").read_bytes()
        if not mounted:
            from safetensors import SafetensorError

            def full(*args, **kwargs):
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

            monkeypatch.setattr("safetensors.torch.save_file", full)
        for write in (lambda: atomic_save_pretrained(big, disk / "discriminator"),
                      lambda: save_pretrained_into(big, str(disk / "folder"), last="config.json")):
            with pytest.raises(WriteError, match=r"^Writing .* failed, the disk is full \(SafetensorError: .*"
                                                 r"MiB are free in .*; .* is as it was before$"):
                write()
        assert (disk / "discriminator" / "diffusion_pytorch_model.safetensors").read_bytes() == before
        assert sorted(p.name for p in disk.iterdir()) == ["discriminator", "folder"]  # no temporaries left
        assert not any(p.name.startswith(".") for p in (disk / "folder").iterdir())


# ----------------------------------------------------------------------------- 4. one run per folder
def _hold_lock(folder):
    """Another process holding `folder`'s lock, as a running trainer does."""
    os.makedirs(folder, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom diffusers_afm.training.output_dir import lock_output_dir\n"
                               "lock_output_dir(sys.argv[1]); print('held', flush=True); time.sleep(600)", str(folder)],
        stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_folder_in_use_by_a_live_run_is_refused_and_a_dead_runs_lock_is_taken_over(run_dir, caplog):
    caplog.set_level(logging.INFO, logger=output_dir_module.__name__)
    holder = _hold_lock(run_dir)
    try:
        expected = rf"is in use by another run \(pid {holder.pid} on host {socket.gethostname()}, started .*\); .*--output_dir"
        with pytest.raises(OutputDirError, match=expected):
            _resume(run_dir)
        with pytest.raises(OutputDirError, match=expected):  # no flag overrides a live run's lock
            _train(run_dir, "--max_train_steps", "2", "--overwrite_output_dir")
        assert [os.path.basename(p) for p in list_checkpoints(run_dir)] == ["checkpoint-2", "checkpoint-4"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # Its holder killed, the lock is free: the resume takes it over and finishes.
    _resume(run_dir)
    assert f"from a run that is no longer running (pid {holder.pid}" in caplog.text
    assert [os.path.basename(p) for p in list_checkpoints(run_dir)][-1] == "checkpoint-6"
    record = json.loads((run_dir / LOCK_FILE).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()


def test_a_two_process_run_into_a_locked_folder_stops_on_every_rank(tmp_path):
    """Only rank 0 locks; the others learn its verdict and stop too instead of waiting at a barrier
    (a hang would last --ddp_timeout, 600 s, past this test's limit)."""
    out = tmp_path / "run"
    holder = _hold_lock(out)
    try:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                   "29731", str(REPO / "examples" / "train_afm.py"), "--output_dir", str(out), *COMMON,
                   "--max_train_steps", "2"]
        result = subprocess.run(command, capture_output=True, text=True, env=dict(ENV, ACCELERATE_USE_CPU="1"),
                                timeout=240)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert result.returncode != 0
    assert result.stderr.count(f"is in use by another run (pid {holder.pid}") == 2  # one line from each rank
    assert not list_checkpoints(out)


# ----------------------------------------------------------------------------- 5. another run's outputs
def test_a_new_run_into_another_runs_folder_is_refused_unless_resumed_or_overwritten(run_dir):
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match=r"holds another run's outputs \(checkpoint-2, checkpoint-4, model_index.json\); "
                                             r"pass `--resume_from_checkpoint latest` .* `--overwrite_output_dir`"):
        _train(run_dir, "--max_train_steps", "2", "--checkpointing_steps", "2")
    assert [os.path.basename(p) for p in list_checkpoints(run_dir)] == ["checkpoint-2", "checkpoint-4"]
    # Overwritten: the old run's checkpoint-4 is gone, so `latest` can only ever resume this run.
    _train(run_dir, "--max_train_steps", "2", "--checkpointing_steps", "2", "--overwrite_output_dir", "--seed", "3")
    assert [os.path.basename(p) for p in list_checkpoints(run_dir)] == ["checkpoint-2"]
    assert json.loads((run_dir / "checkpoint-2" / "trainer_state.json").read_text())["settings"]["seed"] == 3
    assert (run_dir / "notes.txt").read_text() == "mine"  # what a run does not write is kept
    with pytest.raises(ValueError, match="`--overwrite_output_dir` got True; allowed: only without --resume_from_checkpoint"):
        _resume(run_dir, "--overwrite_output_dir")


# ----------------------------------------------------------------------------- 6. the settings a resume keeps
def test_a_resume_with_other_settings_names_each_and_the_flag_that_accepts_them(run_dir):
    with pytest.raises(CheckpointError) as info:
        _resume(run_dir, "--train_batch_size", "8", "--gp_scale", "0.5")
    text = str(info.value)
    assert text.startswith(f"{run_dir / 'checkpoint-4'} was written with other settings: `--gp_scale` 0.25 -> 0.5, "
                           "`--train_batch_size` 16 -> 8;")
    assert text.endswith("pass `--allow_changed_settings gp_scale,train_batch_size` to continue with the new values")
    assert [os.path.basename(p) for p in list_checkpoints(run_dir)] == ["checkpoint-2", "checkpoint-4"]
    with pytest.raises(ValueError, match=r"`--allow_changed_settings` got 'train_bach_size'; .*Did you mean 'train_batch_size'"):
        _resume(run_dir, "--train_batch_size", "8", "--allow_changed_settings", "train_bach_size")
    # Accepted by name; the longer run (--max_train_steps 6) needs no flag.
    _resume(run_dir, "--train_batch_size", "8", "--gp_scale", "0.5", "--allow_changed_settings", "train_batch_size,gp_scale")
    assert json.loads((run_dir / "checkpoint-6" / "trainer_state.json").read_text())["settings"]["train_batch_size"] == 8


def test_a_state_file_of_another_step_or_checkpoint_is_blamed(run_dir, tmp_path):
    state_file = run_dir / "checkpoint-4" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps(dict(state, step=6)))  # the manifest still matches the files
    with pytest.raises(CheckpointError, match=r"checkpoint-4/trainer_state.json says step 6, but its folder is checkpoint-4"):
        _resume(run_dir)
    shutil.copy(run_dir / "checkpoint-2" / "trainer_state.json", state_file)
    with pytest.raises(CheckpointError, match=r"checkpoint-4/trainer_state.json says step 2"):
        _resume(run_dir)
    # Another run's state file of the same step: its checksums describe other files.
    other = tmp_path / "other"
    _train(other, "--max_train_steps", "4", "--checkpointing_steps", "4", "--seed", "1")
    shutil.copy(other / "checkpoint-4" / "trainer_state.json", state_file)
    with pytest.raises(CheckpointError) as info:
        _resume(run_dir)
    assert str(info.value).startswith(f"{state_file} does not describe the files beside it (")
    assert "copied from another checkpoint" in str(info.value) and "grad_norm" not in str(info.value)


# ----------------------------------------------------------------------------- 7. non-finite weights
def test_non_finite_weights_in_a_checkpoint_are_refused_on_resume(run_dir):
    weights_file = run_dir / "checkpoint-4" / "model.safetensors"
    weights = load_file(weights_file)
    key = sorted(weights)[0]
    weights[key] = weights[key].clone().view(-1).index_fill_(0, torch.tensor([0]), float("nan")).view_as(weights[key])
    save_file(weights, weights_file, metadata={"format": "pt"})
    state_file = run_dir / "checkpoint-4" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps(dict(state, files=manifest(str(run_dir / "checkpoint-4")))))  # the checksums agree
    with pytest.raises(CheckpointError, match=rf"model.safetensors holds non-finite values \(NaN in `{key}`\).*latest_valid"):
        _resume(run_dir)
    _resume(run_dir, "--resume_from_checkpoint", "latest_valid")  # from checkpoint-2
    assert [os.path.basename(p) for p in list_checkpoints(run_dir)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def _poison_pipeline(folder, value):
    weights_file = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_file)
    key = sorted(weights)[-1]
    weights[key] = torch.full_like(weights[key], value)
    save_file(weights, weights_file)
    return weights_file, key


def test_a_pipeline_with_non_finite_weights_is_refused_and_sample_afm_exits_1(run_dir, tmp_path):
    weights_file, key = _poison_pipeline(run_dir, float("inf"))
    with pytest.raises(ValueError, match=rf"{weights_file} holds non-finite weights \(Inf in `{key}`\)"):
        AFMPipeline.from_pretrained(run_dir)
    with pytest.raises(SystemExit, match="^error: .*holds non-finite weights"):  # sample_afm.py's command line
        sample_afm.run(["--pipeline", str(run_dir), "--output_dir", str(tmp_path / "s"), "--num_samples", "4"])
    assert not (tmp_path / "s" / "samples.npz").exists()


def test_samples_that_overflow_are_an_error_not_black_images(run_dir):
    pipe = AFMPipeline.from_pretrained(run_dir)
    with torch.no_grad():  # finite weights so large that the activations overflow
        next(pipe.transformer.parameters()).mul_(1e38)
    with pytest.raises(RunStopped, match=r"samples \[0, 1\] are not finite \(NaN or Inf\)"):
        generate_images(pipe, [0, 1], [0, 1])


# ----------------------------------------------------------------------------- 8. samples tied to the model
def test_sampling_resumes_only_with_the_same_model_content(run_dir, tmp_path):
    out = tmp_path / "samples"
    flags = ["--output_dir", str(out), "--num_samples", "8", "--batch_size", "2", "--format", "npz"]
    sample_afm.main(["--pipeline", str(run_dir), *flags, "--max_images", "4"])
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    # Another model exported into the same folder: refused, whatever its path.
    other = AdversarialFlowTransformer2DModel.from_pretrained(run_dir / "transformer")
    randomize_(other, std=0.1)
    other.save_pretrained(run_dir / "transformer")
    with pytest.raises(ValueError, match=r"holds samples made with other settings \(pipeline_sha256: '[0-9a-f]{64}' -> "
                                         r"'[0-9a-f]{64}'\) \(the weights or configs in .* are not those of the model"):
        sample_afm.main(["--pipeline", str(run_dir), *flags])
    # The same model from another path resumes.
    sample_afm.main(["--pipeline", str(moved), *flags])
    with np.load(out / "samples.npz") as data:
        assert data["arr_0"].shape[0] == 8


# ----------------------------------------------------------------------------- 9. image modes
RAMP16 = np.linspace(0, 65535, 64).round().reshape(8, 8)


@pytest.mark.parametrize("mode, make, white", [
    ("I;16", lambda: PIL.Image.fromarray(RAMP16.astype(np.uint16)), 65535),  # 16-bit PNG greyscale
    ("I", lambda: PIL.Image.fromarray(RAMP16.astype(np.int32)), 65535),
    ("F", lambda: PIL.Image.fromarray((RAMP16 / 65535).astype(np.float32)), 1),
    ("L", lambda: PIL.Image.fromarray((RAMP16 / 257).round().astype(np.uint8)), 255),
    ("P", lambda: PIL.Image.fromarray((RAMP16 / 257).round().astype(np.uint8)).convert("P"), 255),
    ("LA", lambda: PIL.Image.fromarray((RAMP16 / 257).round().astype(np.uint8)).convert("LA"), 255),
    ("RGBA", lambda: PIL.Image.fromarray((RAMP16 / 257).round().astype(np.uint8)).convert("RGBA"), 255),
])
@pytest.mark.parametrize("channels", ["L", "RGB"])
def test_every_image_mode_keeps_its_range(tmp_path, mode, make, white, channels):
    image = make()
    assert image.mode == mode
    path = tmp_path / ("ramp.tiff" if mode in ("I", "F") else "ramp.png")
    image.save(path)
    pixels = load_pixels({"path": str(path), "bytes": None}, ImageTransform(8, mode=channels))
    expected = np.asarray(image.convert("L") if mode in ("P", "LA", "RGBA") else image, dtype=np.float64) / white * 2 - 1
    assert pixels.shape == (1 if channels == "L" else 3, 8, 8)
    assert float(pixels.min()) == -1.0 and float(pixels.max()) == 1.0
    for channel in pixels:
        np.testing.assert_allclose(channel.numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("values, message", [(RAMP16.astype(np.float32), r"mode 'F' with values in \[0, 65535\], outside 0..1"),
                                             (RAMP16.astype(np.int32) - 5, r"mode 'I' with values in \[-5, 65530\]")])
def test_an_image_whose_range_is_unknown_is_skipped_naming_the_file(tmp_path, caplog, values, message):
    path = tmp_path / "odd.tiff"
    PIL.Image.fromarray(values).save(path)
    assert load_pixels({"path": str(path), "bytes": None}, ImageTransform(8, mode="L")) is None
    assert "odd.tiff" in caplog.text
    assert len([r for r in caplog.records if "odd.tiff" in r.getMessage()]) == 1
    assert re.search(message, caplog.text)


# ----------------------------------------------------------------------------- 10. leftovers, bad input, file modes
def test_leftovers_of_interrupted_writes_are_removed_when_a_run_starts(run_dir):
    for name in (".discriminator.tmp-abc123", ".transformer.tmp-def456", ".save-x1y2", ".checkpoint-6.tmp",
                 "samples/.step_0000002.png.tmp-q"):
        (run_dir / name).mkdir(parents=True)
        (run_dir / name / "part").write_bytes(b"half")
    (run_dir / ".model_index.json.tmp").write_text("{")
    _resume(run_dir)
    left = [p.name for p in run_dir.rglob(".*") if p.name != LOCK_FILE]
    assert left == []


def test_a_folder_renamed_aside_whose_replacement_never_came_is_restored(tmp_path):
    (tmp_path / ".discriminator.old-k3j2").mkdir()
    (tmp_path / ".discriminator.old-k3j2" / "config.json").write_text("{}")
    (tmp_path / ".discriminator.tmp-zz").mkdir()  # the replacement, never renamed into place
    (tmp_path / ".transformer.old-ab").mkdir()  # beside a complete transformer/: the old copy
    (tmp_path / "transformer").mkdir()
    remove_stale_temporaries(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["discriminator", "transformer"]
    assert (tmp_path / "discriminator" / "config.json").exists()


@pytest.mark.parametrize("script, flags, message", [
    ("train_afm.py", ["--max_train_steps", "2", "--num_classes", "5"], "holds label 5, outside the model's classes 0..4"),
    ("train_afm.py", ["--max_train_steps", "2", "--output_dir", "{file}"], "`--output_dir` got '{file}'; allowed: a folder"),
    ("sample_afm.py", ["--pipeline", "{run}", "--output_dir", "{file}"], "`--output_dir` {file} is a file"),
    ("sample_afm.py", ["--pipeline", "{run}", "--output_dir", "{out}", "--class_labels", "3,12"], "12 is outside the model's classes"),
])
def test_bad_input_found_by_a_script_is_one_line(run_with_checkpoints, tmp_path, monkeypatch, script, flags, message):
    """The scripts' command lines (`cli.run_trainer`, `sample_afm.run`), in process: the exit status
    is the one-line message (Python prints it and exits with 1), not a traceback."""
    file = tmp_path / "a_file"
    file.write_text("not a folder")
    values = dict(file=str(file), run=str(run_with_checkpoints), out=str(tmp_path / "out"))
    flags = [f.format(**values) for f in flags]
    if script == "train_afm.py":
        monkeypatch.setattr(sys, "argv", ["train_afm.py", "--output_dir", str(tmp_path / "out"), *COMMON, *flags])
        run = lambda: cli.run_trainer(train_afm.parse_args, train_afm.settings, train_afm.train)  # noqa: E731
    else:
        run = lambda: sample_afm.run(flags)  # noqa: E731
    with pytest.raises(SystemExit) as info:
        run()
    assert isinstance(info.value.code, str) and info.value.code.startswith("error: ") and "\n" not in info.value.code
    assert message.format(**values) in info.value.code


def test_written_files_follow_the_umask(run_dir, tmp_path):
    for folder in ("transformer", "discriminator", "checkpoint-4"):  # the finished run wrote them with umask 022
        modes = {p.name: p.stat().st_mode & 0o777 for p in (run_dir / folder).iterdir()}
        assert set(modes.values()) == {0o644}, modes
    model = AdversarialFlowTransformer2DModel(**tiny_generator_config())
    previous = os.umask(0o077)  # a user who shares nothing gets private files
    try:
        atomic_save_pretrained(model, tmp_path / "private")
    finally:
        os.umask(previous)
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o700
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "private").iterdir()} == {0o600}
