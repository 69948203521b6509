"""Resumable training checkpoints: written so that a crash never leaves a half-written one, read so
that a damaged or hostile one is refused with a one-line error (docs/reliability.md).

A checkpoint `checkpoint-<step>/` holds what `accelerator.save_state` writes plus the AFM state
Accelerate does not know about (`CheckpointIO`), and the state file `trainer_state.json`: the step
and a manifest of every file with its size and SHA-256. It is first written as
`.checkpoint-<step>.tmp/`, the state file last, and renamed into place when complete; only complete
checkpoints are ever resumed from or counted, and the oldest are pruned (renamed away first, then
deleted) only after a new one has landed.

Before anything is loaded, `verify_checkpoint` checks the folder against its manifest (truncated,
garbled or missing files) and scans every pickle-based file Accelerate wrote (optimizer, scheduler,
sampler and RNG states) for the globals it would need: only tensors, numbers and numpy arrays are
allowed, so a crafted pickle is refused without running any of it, whatever Accelerate version
then reads the file.
"""

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import zipfile
from typing import Dict, List, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..utils import RunStopped, SettingError, apply_umask, write_failure
from .distributed import load_sharded, save_sharded
from .ema import ModelEMA
from .grad_norm import GradientNormalization

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
# `--resume_from_checkpoint latest_valid`: the newest checkpoint that passes `verify_checkpoint`.
LATEST, LATEST_VALID = "latest", "latest_valid"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
# Files Accelerate writes with torch.save (pickle inside a zip). `custom_checkpoint_*.pkl` is not
# among them: we register no custom objects, and Accelerate reads those with weights_only=False.
_PICKLED = re.compile(r"^(optimizer(_\d+)?|scheduler(_\d+)?|sampler(_\d+)?|dl_state_dict(_\d+)?|scaler)\.(bin|pt)$|"
                      r"^random_states_\d+\.pkl$")
# What a torch.load(weights_only=True) of those files may need beyond torch's own allowlist: numpy
# arrays and dtypes for the RNG states (Accelerate adds the same to its safe globals).
_ALLOWED_GLOBALS = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray",
                    "numpy.dtype", "numpy.dtypes.", "codecs.encode", "_codecs.encode")


class CheckpointError(RunStopped):
    """A checkpoint that cannot be saved or resumed from; the message is one line that names the file."""


# ----------------------------------------------------------------------------- finding checkpoints
def list_checkpoints(output_dir: str) -> List[str]:
    """Complete checkpoints in `output_dir` (those with a state file), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _NAME.match(name)
        if match and os.path.isfile(os.path.join(output_dir, name, STATE_FILE)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found)]


def resolve_resume(output_dir: str, resume_from_checkpoint: Optional[str]) -> Optional[str]:
    """The checkpoint folder to resume from, verified (`verify_checkpoint`).

    `latest` is the newest complete checkpoint (None if there is none yet); if it is damaged, that is
    an error naming the file and the previous checkpoint: it never silently falls back. `latest_valid`
    asks for the fallback: the newest checkpoint that verifies, each skipped one named in the log.
    A path must be a complete checkpoint folder.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint in (LATEST, LATEST_VALID):
        checkpoints = list_checkpoints(output_dir)
        for i, path in enumerate(reversed(checkpoints)):
            try:
                verify_checkpoint(path)
                return path
            except CheckpointError as err:
                if resume_from_checkpoint == LATEST:
                    older = checkpoints[-2 - i] if len(checkpoints) > 1 + i else None
                    hint = (f"to resume from the newest checkpoint that verifies ({os.path.basename(older)} is the "
                            f"previous one), pass `--resume_from_checkpoint {LATEST_VALID}`"
                            if older else "there is no older checkpoint; start afresh without --resume_from_checkpoint")
                    raise CheckpointError(f"{err} ({hint}).") from None
                import logging

                logging.getLogger(__name__).warning("Skipping %s: %s", path, err)
        return None
    check_resume_flag(resume_from_checkpoint)
    verify_checkpoint(resume_from_checkpoint)
    return resume_from_checkpoint


# Settings a run may change when it resumes: how long it runs, how often it saves, logs, samples
# and evaluates, where its outputs go, how it reaches the Hub, and how it computes the same thing
# (gradient checkpointing, compilation). Every other setting shapes what is learned (the objective,
# the model, the data, the batch, the optimiser, the precision, the seed): a resume that changes one
# is refused unless `--allow_changed_settings` names it. A setting not listed here is compared.
FREE_SETTINGS = frozenset({
    "max_train_steps", "num_train_epochs", "checkpointing_steps", "checkpoints_total_limit",
    "output_dir", "logging_dir", "report_to", "tracker_project_name", "logging_steps", "num_time_buckets",
    "resume_from_checkpoint", "overwrite_output_dir", "allow_changed_settings", "ddp_timeout",
    "dataloader_num_workers", "cache_dir", "gradient_checkpointing", "compile",
    "validation_steps", "num_validation_classes", "num_validation_images", "validation_inference_steps",
    "validation_solver", "validation_guidance_scale", "validation_prompt",
    "eval_steps", "eval_num_samples", "eval_batch_size", "eval_reference", "eval_feature_extractor",
    "push_to_hub", "hub_model_id", "hub_private_repo", "hub_token", "standalone_hub_files",
    "merge_lora",  # the form of the final output (an adapter or the fused model), not what is learned
})


def changed_settings(recorded: Dict, current: Dict) -> Dict[str, tuple]:
    """`{name: (recorded value, current value)}` of the settings that shape what is learned and differ.

    Keys starting with `_` are comments (the `_model` summary, derived from the flags); a key only one
    side has (a flag of another version of the trainer) is not compared."""
    current = json.loads(json.dumps(current, default=str))  # tuples as lists, as the state file holds them
    return {key: (recorded[key], current[key]) for key in sorted(set(recorded) & set(current))
            if not key.startswith("_") and key not in FREE_SETTINGS and recorded[key] != current[key]}


def allowed_changes(allowed: Optional[str], settings: Dict) -> List[str]:
    """The names in `--allow_changed_settings` (comma-separated); each must be one of `settings`,
    so that a typo is an error rather than a change silently refused later."""
    names = [name.strip() for name in (allowed or "").split(",") if name.strip()]
    unknown = [name for name in names if name not in settings or name.startswith("_")]
    if unknown:
        from .cli import did_you_mean  # the trainers' parser's helper

        raise SettingError("allow_changed_settings", allowed,
                           f"comma-separated names of this trainer's settings ({unknown[0]!r} is not one)."
                           f"{did_you_mean(unknown[0], [k for k in settings if not k.startswith('_')])}")
    return names


def check_resume_settings(path: str, state: Dict, settings: Dict, allowed: Optional[str] = None) -> None:
    """Refuse to resume `path` (whose state file is `state`) with settings that differ from the
    recorded ones, unless `allowed` (`--allow_changed_settings`: comma-separated names) names each.

    One line names every differing setting with both values and the flag that accepts them.
    """
    names = allowed_changes(allowed, settings)
    recorded = state.get("settings")
    if recorded is None:
        import logging

        logging.getLogger(__name__).warning("%s records no settings (written by an older version): the resume's "
                                            "settings cannot be compared with the run's.", path)
        return
    changes = {k: v for k, v in changed_settings(recorded, settings).items() if k not in names}
    if changes:
        listed = ", ".join(f"`--{k}` {old!r} -> {new!r}" for k, (old, new) in changes.items())
        raise CheckpointError(
            f"{path} was written with other settings: {listed}; resume with the run's settings, or pass "
            f"`--allow_changed_settings {','.join(changes)}` to continue with the new values"
        )


def check_resume_flag(resume_from_checkpoint: Optional[str]) -> None:
    """The cheap check of `--resume_from_checkpoint` at parse time: `latest`, `latest_valid`, or a
    folder with a state file (its files are verified when the run starts, by `resolve_resume`)."""
    if resume_from_checkpoint in (None, LATEST, LATEST_VALID):
        return
    if not os.path.isfile(os.path.join(resume_from_checkpoint, STATE_FILE)):
        raise ValueError(
            f"`--resume_from_checkpoint`: {resume_from_checkpoint!r} is not a complete checkpoint folder "
            f"(no {STATE_FILE}); pass '{LATEST}', '{LATEST_VALID}' or a {PREFIX}<step> folder."
        )


# ----------------------------------------------------------------------------- verifying
def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest(folder: str) -> Dict[str, Dict]:
    """`{file: {"bytes", "sha256"}}` of every file in `folder` (recursively), except the state file."""
    return {rel: {"bytes": os.path.getsize(os.path.join(folder, rel)), "sha256": _sha256(os.path.join(folder, rel))}
            for rel in manifest_names(folder)}


def read_state(path: str) -> Dict:
    """The checkpoint's state file, or a CheckpointError naming it."""
    state_file = os.path.join(path, STATE_FILE)
    try:
        with open(state_file) as f:
            state = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{state_file} cannot be read ({type(err).__name__}: {err}); the checkpoint is damaged") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or state["step"] < 0:
        raise CheckpointError(f"{state_file} holds no step count (expected {{\"step\": <int>, ...}}); the checkpoint is damaged")
    named = _NAME.match(os.path.basename(os.path.normpath(path)))
    if named and int(named.group(1)) != state["step"]:
        # The run would continue from the wrong step: its schedules, data order and step count.
        raise CheckpointError(f"{state_file} says step {state['step']}, but its folder is {PREFIX}{named.group(1)}: the "
                              "state file was edited or copied from another checkpoint")
    return state


def _unsafe_globals(path: str, source=None) -> List[str]:
    """The globals a torch.save file needs that are neither in torch's weights_only allowlist nor ours.
    `source` reads the archive from a file object instead (an item inside another file); `path`
    then only names it in messages."""
    source = path if source is None else source
    if not zipfile.is_zipfile(source):
        raise CheckpointError(f"{path} is not a complete torch.save archive (truncated, or not written by torch.save)")
    if hasattr(source, "seek"):
        source.seek(0)
    try:
        if hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):  # torch >= 2.5: reads only the pickle
            found = torch.serialization.get_unsafe_globals_in_checkpoint(source)
        else:  # a weights_only load refuses what it does not allow, running none of it
            torch.load(source, map_location="cpu", weights_only=True)
            found = []
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path} holds objects other than tensor data; refusing to unpickle it ({str(err).splitlines()[0]})") from None
    except Exception as err:  # a damaged archive: zip or pickle errors of several kinds
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    return [g for g in found if not any(g == a or (a.endswith(".") and g.startswith(a)) for a in _ALLOWED_GLOBALS)]


def verify_checkpoint(path: str) -> Dict:
    """Check a checkpoint folder before anything in it is loaded; returns its state.

    Raises `CheckpointError` (one line, naming the file) for a damaged state file; a file of the
    manifest that is missing, of another size (truncated) or of another checksum (garbled); a
    pickle-based file that needs anything but tensors, numbers and numpy arrays to load, or that
    the manifest does not list (a file planted after the save, such as `custom_checkpoint_0.pkl`).
    Checkpoints written before the manifest existed are checked without it.
    """
    state = read_state(path)
    listed = state.get("files")
    present = set(manifest_names(path))
    if listed is not None:
        damaged = []  # (file, reason) of every listed file that does not match, to find the culprit
        for rel, expected in listed.items():
            file = os.path.join(path, rel)
            if rel not in present:
                raise CheckpointError(f"{file} is missing; the checkpoint is incomplete")
            size = os.path.getsize(file)
            if size != expected["bytes"]:
                damaged.append((file, f"is truncated or damaged: {size} bytes, {expected['bytes']} were written"))
            elif _sha256(file) != expected["sha256"]:
                damaged.append((file, "is garbled: its SHA-256 differs from the one recorded when it was written"))
        if len(damaged) >= 2 and 2 * len(damaged) > len(listed):
            # Damage hits a file, not most of them at once: the state file describes other files
            # (another checkpoint's; files such as the LR schedule's can be the same in both).
            raise CheckpointError(f"{os.path.join(path, STATE_FILE)} does not describe the files beside it ({len(damaged)} "
                                  f"of its {len(listed)} sizes and checksums differ): it was copied from another checkpoint")
        if damaged:
            raise CheckpointError(f"{damaged[0][0]} {damaged[0][1]}")
    for rel in sorted(present):
        file, name = os.path.join(path, rel), os.path.basename(rel)
        unlisted = listed is not None and rel not in listed
        if name.endswith((".pkl", ".bin", ".pt", ".pth", ".ckpt")):
            if unlisted or not _PICKLED.match(name):
                raise CheckpointError(
                    f"{file} was not written by this trainer's save; refusing to unpickle it (remove it to resume)"
                )
            unsafe = _unsafe_globals(file)
            if unsafe:
                raise CheckpointError(
                    f"{file} needs {', '.join(unsafe[:3])} to load, which is not tensor data; refusing to unpickle it"
                )
        elif name.endswith(".safetensors"):
            _check_finite(file)
        elif name == DCP_INDEX or name.endswith(".distcp"):
            if unlisted:
                raise CheckpointError(f"{file} was not written by this trainer's save; refusing to read it (remove it to resume)")
            if name == DCP_INDEX:
                verify_distributed_checkpoint(os.path.dirname(file))
    return state


# ----------------------------------------------------------------------------- sharded (FSDP) state
# torch.distributed.checkpoint writes a folder per sharded state (Accelerate's `pytorch_model_fsdp_<i>/`
# and `optimizer_<i>/`, our `ema/`): `.distcp` files of the shards and a `.metadata` index. torch
# reads the index with plain `pickle.load`, and each non-tensor item (an optimizer's param groups,
# say) with `torch.load` and its weights-only guard off: a crafted checkpoint would run code on resume. So the
# index is read here with an unpickler that builds only the index's own classes, and every
# non-tensor item is scanned for the globals its pickle needs, before torch reads anything.
DCP_INDEX = ".metadata"
_DCP_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
                 "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
     ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}


class _IndexUnpickler(pickle.Unpickler):
    """Builds only the classes a torch.distributed.checkpoint index holds (and torch's dtypes)."""

    def find_class(self, module, name):
        if (module, name) in _DCP_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a distributed-checkpoint index")


def verify_distributed_checkpoint(folder: str) -> None:
    """Check a torch.distributed.checkpoint folder before torch reads it: the `.metadata` index may
    build nothing but its own classes, every non-tensor item must unpickle to plain data, and every
    item must lie inside a file of the folder. `CheckpointError` (one line, naming the file) otherwise."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    index = os.path.join(folder, DCP_INDEX)
    try:
        with open(index, "rb") as f:
            metadata = _IndexUnpickler(f).load()
    except Exception as err:
        raise CheckpointError(f"{index} is not a distributed-checkpoint index written by torch; refusing to read "
                              f"the folder ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    names = set(os.listdir(folder))
    for key, info in getattr(metadata, "storage_data", {}).items():
        shard = getattr(info, "relative_path", None)
        if shard not in names or os.path.basename(shard) != shard:
            raise CheckpointError(f"{index} points at {shard!r}, which is not a file of {folder}")
        if not isinstance(metadata.state_dict_metadata.get(key.fqn), BytesStorageMetadata):
            continue  # a tensor: torch reads it with weights_only=True
        with open(os.path.join(folder, shard), "rb") as f:
            f.seek(info.offset)
            item = f.read(info.length)
        unsafe = _unsafe_globals(f"{os.path.join(folder, shard)}: item {key.fqn!r}", io.BytesIO(item))
        if unsafe:
            raise CheckpointError(f"{os.path.join(folder, shard)}: item {key.fqn!r} needs {', '.join(unsafe[:3])} to load, "
                                  "which is not plain data; refusing to unpickle it")


def _check_finite(file: str) -> None:
    """A safetensors file of the checkpoint must be readable and hold no NaN or Inf: a run resumed
    from such weights trains on garbage, and its samples are black."""
    try:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    kind = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
                    raise CheckpointError(f"{file} holds non-finite values ({kind} in `{key}`); the run that wrote "
                                          "it had diverged or the file was altered")
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"{file} is not a readable safetensors file ({str(err).splitlines()[0]})") from None


def manifest_names(folder: str) -> List[str]:
    """Every file in `folder` (recursively, relative paths) but the state file."""
    paths = (os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder) for name in names)
    return [rel for rel in paths if rel != STATE_FILE]


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


# ----------------------------------------------------------------------------- saving and loading
class CheckpointIO:
    """The resumable state of a run, each piece named once (as edm2's `CheckpointIO` does).

    Accelerate's `save_state` / `load_state` cover what it prepared (both networks, optimizers, LR
    schedulers, RNG states, the data sampler); the pieces given here are the AFM state it does not
    know about, each written as `<name>.safetensors`:

    - `ema`: the generator's `ModelEMA` (main process);
    - `grad_norm`: the `GradientNormalization` statistic (main process; it is identical on every rank);
    - `noise_rng_<rank>`: each process's noise generator, so every rank continues its own stream.

    Pieces that are None are not saved or loaded (the classifier trainer has no grad_norm).
    `settings` (the trainer's resolved flags, JSON-ready) go into the state file, so that a resume
    with other settings is found (`check_resume_settings`).
    """

    def __init__(
        self,
        accelerator,
        ema: Optional[ModelEMA] = None,
        grad_norm: Optional[GradientNormalization] = None,
        noise_generator: Optional[torch.Generator] = None,
        settings: Optional[Dict] = None,
    ):
        self.accelerator = accelerator
        self.ema, self.grad_norm, self.noise_generator = ema, grad_norm, noise_generator
        self.settings = json.loads(json.dumps(settings, default=str)) if settings is not None else None

    def _modules(self):
        """(file stem, module) of the pieces the main process writes."""
        return [(name, module) for name, module in (("ema", self.ema), ("grad_norm", self.grad_norm)) if module is not None]

    def _rng_file(self, folder: str) -> str:
        return os.path.join(folder, f"noise_rng_{self.accelerator.process_index}.safetensors")

    def _write(self, tmp: str) -> None:
        """Everything but the state file into `tmp` (every process writes its part)."""
        self.accelerator.save_state(tmp, safe_serialization=True)
        if self.noise_generator is not None:
            save_file({"state": self.noise_generator.get_state()}, self._rng_file(tmp))
        for name, module in self._modules():
            if getattr(module, "sharded", False):  # an FSDP-sharded EMA: every process writes its shards
                save_sharded(module.state_dict(), os.path.join(tmp, name))
            elif self.accelerator.is_main_process:
                state = {k: v.contiguous() for k, v in module.state_dict().items()}
                save_file(state, os.path.join(tmp, f"{name}.safetensors"))

    def save(self, output_dir: str, step: int, total_limit: Optional[int] = None) -> str:
        """Write `checkpoint-<step>` atomically (call on every process); returns its path.

        Written as `.checkpoint-<step>.tmp/`, marked complete by the state file (with the manifest)
        written last, then renamed into place; the oldest complete checkpoints beyond `total_limit`
        are pruned after that. A failed write (a full disk, say) removes the temporary folder and
        raises a `CheckpointError` that says how much space a checkpoint takes; the checkpoints
        already there are untouched.
        """
        accelerator = self.accelerator
        final = os.path.join(output_dir, f"{PREFIX}{step}")
        tmp = os.path.join(output_dir, f".{PREFIX}{step}.tmp")
        if accelerator.is_main_process:
            try:
                remove_leftovers(output_dir)  # of crashed saves and prunes
                os.makedirs(tmp)
            except Exception as err:
                raise self._save_error(output_dir, step, tmp, err)
        accelerator.wait_for_everyone()
        try:
            self._write(tmp)
        except Exception as err:
            raise self._save_error(output_dir, step, tmp, err)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            try:
                state = {"step": step, "num_processes": accelerator.num_processes, "files": manifest(tmp)}
                if self.settings is not None:
                    state["settings"] = self.settings
                with open(os.path.join(tmp, STATE_FILE), "w") as f:
                    json.dump(state, f)
                    f.flush()
                    os.fsync(f.fileno())
                apply_umask(tmp)  # safetensors writes 0600; the checkpoint follows the user's umask
            except Exception as err:
                raise self._save_error(output_dir, step, tmp, err)
            if os.path.exists(final):  # saved again at the same step: move the old one away in one rename
                os.replace(final, os.path.join(output_dir, f".{PREFIX}{step}.old"))
            os.replace(tmp, final)
            if total_limit is not None:
                for old in list_checkpoints(output_dir)[:-total_limit]:
                    # Renamed first, so that a crash while deleting never leaves a "complete" half.
                    trash = os.path.join(output_dir, f".{os.path.basename(old)}.old")
                    os.replace(old, trash)
            remove_leftovers(output_dir, keep_tmp=True)
            import logging

            logging.getLogger(__name__).info(f"Saved {final}")
        accelerator.wait_for_everyone()
        return final

    def _save_error(self, output_dir: str, step: int, tmp: str, err: Exception) -> Exception:
        """The temporary folder removed; a write error, whichever library raised it (safetensors'
        `SafetensorError` and torch.save's `RuntimeError` are no `OSError`s), becomes one
        `CheckpointError` line; any other error is returned as it is (a bug keeps its traceback)."""
        written = folder_bytes(tmp) if os.path.isdir(tmp) else 0
        shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(output_dir)
        need = folder_bytes(kept[-1]) if kept else None
        # After the clean-up: if a whole checkpoint still does not fit, the disk was full, whatever
        # the library's words (torch.save says "unexpected pos" on a full disk).
        cause = write_failure(err, output_dir if os.path.isdir(output_dir) else os.path.dirname(output_dir) or ".", need)
        if cause is None:
            return err
        size = (f"a checkpoint of this run takes {need / 2**20:.1f} MiB" if need is not None else
                f"{written / 2**20:.1f} MiB were written before it failed")
        error = CheckpointError(
            f"Saving {PREFIX}{step} in {output_dir} failed, {cause}; {size}; the last complete checkpoint is "
            f"{kept[-1] if kept else 'none'} and is untouched"
        )
        error.__cause__ = err
        return error

    def load(self, path: str, verify: bool = True) -> int:
        """Restore everything `save` wrote into the pieces; returns the step to continue from.

        The folder is verified first (`verify_checkpoint`; `verify=False` when `resolve_resume` has
        just done it, to hash the files once); a piece that does not fit this run's models (another
        config) is a `CheckpointError` naming the file.
        """
        state = verify_checkpoint(path) if verify else read_state(path)
        try:
            self.accelerator.load_state(path)
        except CheckpointError:
            raise
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"{path} does not fit this run ({type(err).__name__}: {first}); "
                                  "resume with the flags of the run that wrote it") from None
        for name, module in self._modules():
            sharded, folder = getattr(module, "sharded", False), os.path.join(path, name)
            if sharded != os.path.isdir(folder):
                raise CheckpointError(
                    f"{path} holds the {name} {'sharded' if os.path.isdir(folder) else 'whole'}, but this run keeps it "
                    f"{'sharded (FSDP)' if sharded else 'whole (one process or DDP)'}; resume with the distributed "
                    "strategy of the run that wrote it")
            if sharded:
                try:
                    shards = module.state_dict()
                    load_sharded(shards, folder)
                    module.load_state_dict(shards)
                except Exception as err:
                    raise CheckpointError(f"{folder} does not fit this run ({str(err).strip().splitlines()[0]})") from None
                continue
            file = os.path.join(path, f"{name}.safetensors")
            # Loaded onto the device the module's tensors live on (EMA on the accelerator, say).
            device = next(iter(module.state_dict().values())).device
            try:
                module.load_state_dict({k: v.to(device) for k, v in load_file(file).items()})
            except Exception as err:
                raise CheckpointError(f"{file} does not fit this run ({str(err).strip().splitlines()[0]})") from None
        if self.noise_generator is not None:
            if os.path.isfile(self._rng_file(path)):
                self.noise_generator.set_state(load_file(self._rng_file(path))["state"])
            else:  # resumed on more processes than saved: a fresh, still rank-distinct stream
                self.noise_generator.manual_seed(self.noise_generator.initial_seed() + 7919 * state["step"])
        return int(state["step"])


def remove_leftovers(output_dir: str, keep_tmp: bool = False) -> None:
    """Delete what crashed saves (`.checkpoint-*.tmp`) and prunes (`.checkpoint-*.old`) left behind."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith(f".{PREFIX}") and (name.endswith(".old") or (name.endswith(".tmp") and not keep_tmp)):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
