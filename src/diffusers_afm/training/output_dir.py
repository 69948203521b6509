"""A run's output folder, checked and claimed before any data is read (docs/reliability.md).

Everything that can fail about the output folder is found at start-up, not at the first checkpoint
hours later: a folder that is a file, cannot be created or written (tried by creating and removing
a file, in the folder and in the trackers' log folder), or has less free space than one checkpoint
takes. One run at a time writes a folder: the first holds an advisory lock (`fcntl.flock` on
`.afm-run.lock`, which records its pid and host) until it ends; a second is refused in one line
that names the first. A new run into a folder that holds another run's checkpoints or final model
is refused too, unless it resumes (`--resume_from_checkpoint`) or starts afresh
(`--overwrite_output_dir`, which first removes what a run writes there, `remove_previous_run`).
A resume is checked against the settings its checkpoint records (`checkpoint.check_resume_settings`).

Under several processes only the main process checks the folder and holds the lock; its verdict
reaches the others through one broadcast, so none waits for a process that has stopped.
"""

import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
from typing import Dict, Iterable, Optional

from ..utils import RunStopped, remove_stale_temporaries
from .checkpoint import (PREFIX, allowed_changes, check_resume_settings, folder_bytes, list_checkpoints, read_state,
                         remove_leftovers, resolve_resume)
from .cli import flag_errors

logger = logging.getLogger(__name__)

LOCK_FILE = ".afm-run.lock"
# What a trainer writes into its output folder besides checkpoints: the pipeline (`model_index.json`
# and the components it names, found in the index), the discriminator, sample grids, the model card,
# the classifier trainer's model (`config.json` and its weights at the top level).
RUN_OUTPUTS = ("model_index.json", "discriminator", "samples", "samples.png", "README.md", "config.json",
               "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")

# The locks this process holds, by folder: a second run in the same process (a test, a notebook)
# first releases what an earlier one left held when it raised.
_HELD: Dict[str, int] = {}


class OutputDirError(RunStopped):
    """The output folder cannot be used for this run; one line that says why and what to pass."""


# ----------------------------------------------------------------------------- checks
def check_writable(folder: str, flag: str) -> None:
    """Create `folder` if needed, then create, write, sync and remove a file in it: the only test of
    writing that holds for permissions, read-only mounts, ACLs and full disks alike."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OutputDirError(f"`--{flag}` {folder} is a file; allowed: a folder (new or existing)")
    probe = os.path.join(folder, f".afm-write-check-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"afm")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise OutputDirError(f"`--{flag}` {folder} is not writable ({err.strerror or err}); allowed: a folder this "
                             "user can create files in") from None


def checkpoint_bytes_estimate(trained: Iterable, kept: Iterable = ()) -> int:
    """Bytes one checkpoint takes, before the first is written: each trained network's weights and
    its AdamW state (two moments of the same size per parameter), plus `kept` state (an EMA)."""
    def state_bytes(obj) -> int:
        return sum(t.numel() * t.element_size() for t in obj.state_dict().values() if hasattr(t, "numel"))

    return sum(3 * state_bytes(model) for model in trained) + sum(state_bytes(obj) for obj in kept)


def check_free_space(accelerator, output_dir: str, resume_path: Optional[str], trained: Iterable,
                     kept: Iterable = ()) -> None:
    """Stop before training when `output_dir` has less free space than one checkpoint: the size of
    the checkpoint resumed from, else `checkpoint_bytes_estimate(trained, kept)`."""
    def check():
        if resume_path is not None:
            need, how = folder_bytes(resume_path), f"the size of {os.path.basename(resume_path)}"
        else:
            need, how = checkpoint_bytes_estimate(trained, kept), "estimated from the models' weights and AdamW state"
        free = shutil.disk_usage(output_dir).free
        if free < need:
            raise OutputDirError(
                f"`--output_dir` {output_dir} has {free / 2**20:.1f} MiB free, but one checkpoint of this run takes "
                f"{need / 2**20:.1f} MiB ({how}); free some space or choose another --output_dir")

    _on_main_process(accelerator, check)


# ----------------------------------------------------------------------------- one run per folder
def _holder(path: str) -> str:
    try:
        with open(path) as f:
            info = json.load(f)
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process whose pid could not be read"


def lock_output_dir(output_dir: str) -> None:
    """Hold `output_dir`'s lock for as long as this process runs (or until `release_locks`).

    The lock is `flock` on `LOCK_FILE`: the kernel drops it when its holder dies, however it dies,
    so a lock left by a killed run is simply taken over. A lock held by a live run is an error naming
    that run; no flag overrides it, since two runs writing one folder destroy each other's work."""
    path = os.path.join(output_dir, LOCK_FILE)
    key = os.path.realpath(output_dir)
    if key in _HELD:  # an earlier run of this process that raised; it is over
        os.close(_HELD.pop(key))
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise OutputDirError(f"`--output_dir` {output_dir}: cannot open its lock file ({err.strerror or err})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise OutputDirError(
            f"`--output_dir` {output_dir} is in use by another run ({_holder(path)}); wait for it to end or stop "
            "it, or choose another --output_dir (no flag overrides a running run's lock)") from None
    previous = os.path.getsize(path) and _holder(path)
    if previous:
        logger.info("Taking over %s from a run that is no longer running (%s)", path, previous)
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)})
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode(), 0)
    _HELD[key] = fd


def release_locks() -> None:
    """Release the output-folder locks this process holds (a trainer's run is over)."""
    while _HELD:
        os.close(_HELD.popitem()[1])


# ----------------------------------------------------------------------------- another run's outputs
def previous_run_outputs(output_dir: str) -> list:
    """What an earlier run left in `output_dir` that a new run would mix with: its checkpoints, its
    final model (names relative to `output_dir`)."""
    found = [os.path.basename(p) for p in list_checkpoints(output_dir)]
    found += [name for name in ("model_index.json", "config.json") if os.path.isfile(os.path.join(output_dir, name))]
    return found


def remove_previous_run(output_dir: str, logging_dir: Optional[str] = None) -> None:
    """`--overwrite_output_dir`: remove what a run writes into `output_dir`: every checkpoint (and
    the leftovers of interrupted saves), the final model (`model_index.json`, the components it
    names, the standalone code it names), `RUN_OUTPUTS`, and `logging_dir` when it lies inside.
    Anything else in the folder is kept."""
    names = set(RUN_OUTPUTS)
    index = os.path.join(output_dir, "model_index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                entries = json.load(f)
        except (OSError, ValueError):
            entries = {}
        for key, value in entries.items():
            if isinstance(value, list) and value and value[0] is not None:
                names.add(key)  # a component folder
                if key == "_class_name":
                    names.add(f"{value[0]}.py")  # the standalone pipeline code
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith(PREFIX) and name[len(PREFIX):].isdigit() and os.path.isdir(path):
            # Renamed first, as pruning does, so an interrupted removal never leaves a "complete" half.
            trash = os.path.join(output_dir, f".{name}.old")
            os.replace(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
        elif name in names or (logging_dir is not None and os.path.realpath(path) == os.path.realpath(logging_dir)):
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    remove_leftovers(output_dir)


# ----------------------------------------------------------------------------- start-up
def _on_main_process(accelerator, check) -> None:
    """Run `check` on the main process only; every process stops when it fails (one broadcast, so
    no process waits at a barrier for one that stopped). The main process raises the error itself,
    the others an `OutputDirError` with its message."""
    message, failure = None, None
    if accelerator.is_main_process:
        try:
            check()
        except Exception as err:  # whatever it is, the other processes must learn of it
            message, failure = (str(err) if isinstance(err, RunStopped) else f"{type(err).__name__}: {err}"), err
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([message])[0]
    if failure is not None:
        raise failure
    if message is not None:
        raise OutputDirError(f"the main process stopped: {message}")


def start_run(accelerator, run, settings: Dict) -> Optional[str]:
    """A trainer's first step after making its Accelerator, before any data is read; returns the
    checkpoint to resume from (verified, or None).

    `run` is the trainer's `RunConfig` (output and logging folders, trackers, `overwrite_output_dir`,
    `resume_from_checkpoint`, `allow_changed_settings`); `settings` its resolved flags (what the
    checkpoints record). In order: the output folder (and, with trackers, the log folder) is
    writable; this run holds its lock; leftovers of interrupted writes are removed; another run's
    outputs are refused (or removed with `--overwrite_output_dir`); the checkpoint to resume is
    verified and its recorded settings compared with these.
    """
    logging_dir = os.path.join(run.output_dir, run.logging_dir)

    def claim():
        check_writable(run.output_dir, "output_dir")
        if run.report_to != "none":
            check_writable(logging_dir, "logging_dir")  # before the trackers start writing there
        lock_output_dir(run.output_dir)
        # Leftovers of interrupted checkpoint saves and prunes, exports and sample grids.
        for folder in [run.output_dir] + [os.path.join(run.output_dir, name) for name in os.listdir(run.output_dir)
                                          if os.path.isdir(os.path.join(run.output_dir, name)) and not name.startswith(".")
                                          and not name.startswith(PREFIX)]:
            remove_stale_temporaries(folder)
        if run.overwrite_output_dir:
            remove_previous_run(run.output_dir, logging_dir)
        elif run.resume_from_checkpoint is None:
            found = previous_run_outputs(run.output_dir)
            if found:
                raise OutputDirError(
                    f"`--output_dir` {run.output_dir} holds another run's outputs ({', '.join(found)}); pass "
                    "`--resume_from_checkpoint latest` to continue that run, `--overwrite_output_dir` to remove them "
                    "and start afresh, or choose another --output_dir")

    with flag_errors():  # a name that is no setting: "`--allow_changed_settings` got ..."
        allowed_changes(run.allow_changed_settings, settings)
    _on_main_process(accelerator, claim)
    resume_path = resolve_resume(run.output_dir, run.resume_from_checkpoint)
    if resume_path is not None:
        check_resume_settings(resume_path, read_state(resume_path), settings, run.allow_changed_settings)
    return resume_path


__all__ = [
    "LOCK_FILE",
    "OutputDirError",
    "check_free_space",
    "check_writable",
    "checkpoint_bytes_estimate",
    "lock_output_dir",
    "previous_run_outputs",
    "release_locks",
    "remove_previous_run",
    "start_run",
]
