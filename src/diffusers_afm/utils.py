"""Small helpers shared by the library and the example scripts: writing outputs atomically, and
parsing the flags that several scripts share."""

import argparse
import itertools
import json
import os
import shutil
import tempfile
from contextlib import contextmanager

from typing import Optional

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: str) -> None:
    """Give `path` (a file, or a folder and everything in it) the modes the user's umask asks for.

    Writers we do not control create private files (safetensors writes weights 0600, `mkdtemp`
    folders are 0700); a pipeline or checkpoint must be readable by whoever the umask admits (a
    shared cluster, a served folder), like the configs written beside them with `open`."""
    mask = _umask()
    if not os.path.isdir(path):
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o666 & ~mask)


# ----------------------------------------------------------------------------- write errors
# How libraries word a failed write when they raise something other than an `OSError`: safetensors'
# `SafetensorError` ("I/O error: No space left on device (os error 28)"), torch.save's `RuntimeError`
# ("PytorchStreamWriter failed writing file", "basic_ios::clear: iostream error", "[enforce fail at
# inline_container.cc] unexpected pos" on a real full disk).
_WRITE_WORDS = ("No space left", "Disk quota", "os error 28", "os error 122", "StorageFull", "Read-only file system",
                "Permission denied", "PytorchStreamWriter", "file write failed", "iostream error", "inline_container")


def write_failure(err: BaseException, folder: str, size: Optional[int] = None) -> Optional[str]:
    """What went wrong, as "the disk is full (<the library's words>); N MiB are free in <folder>" or
    "writing failed (...)", when `err` is a failed write, whichever library raised it; None otherwise
    (a bug keeps its traceback).

    `size`, when known, is what the write needed: an error in which less than that is free in
    `folder` is taken for a full disk whatever its wording."""
    import errno

    text = str(err).strip()
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    short = size is not None and free is not None and free < size
    if not (isinstance(err, OSError) or any(word in text for word in _WRITE_WORDS) or short):
        return None
    full = (getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or short
            or any(word in text for word in ("No space left", "Disk quota", "os error 28", "os error 122", "StorageFull")))
    detail = getattr(err, "strerror", None) or (text.splitlines()[-1][:200] if text else "no message")
    room = f"; {free / 2**20:.1f} MiB are free in {folder}" if free is not None else ""
    return f"{'the disk is full' if full else 'writing failed'} ({type(err).__name__}: {detail}){room}"


def _existing_parent(path: str) -> str:
    while path and not os.path.isdir(path):
        path = os.path.dirname(path)
    return path or "."


@contextmanager
def write_errors(path: str):
    """Turn a failed write inside the block into one `WriteError` line naming `path`, the cause
    and the free space; any other error passes through unchanged."""
    try:
        yield
    except Exception as err:
        cause = None if isinstance(err, RunStopped) else write_failure(
            err, _existing_parent(os.path.dirname(os.path.abspath(path))))
        if cause is None:
            raise
        raise WriteError(f"Writing {path} failed, {cause}; {path} is as it was before") from err


# ----------------------------------------------------------------------------- atomic writers
# Names of the temporaries the writers below leave beside their target if the process dies
# (`remove_stale_temporaries` removes them): `.<name>.tmp-XXXX`, `.<name>.old-XXXX`, `.save-XXXX`.
_TMP, _OLD, _SAVE = ".tmp-", ".old-", ".save-"


@contextmanager
def atomic_directory(path: str):
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename.

    A crash while writing leaves `path` as it was (the temporary folder is removed), so a reader
    never sees a half-written pipeline or checkpoint. A failed write (a full disk, whichever library
    raised it) is one `WriteError` line; the files get the user's umask.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    tmp = None
    with write_errors(path):
        try:
            os.makedirs(parent, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}{_TMP}", dir=parent)
            yield tmp
            apply_umask(tmp)  # mkdtemp makes it private, safetensors its files; the result should not be
        except BaseException:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_path(tmp, path)


def replace_path(src: str, dst: str) -> None:
    """Move `src` (a file or folder) to `dst`, replacing whatever is there.

    An existing folder is first renamed aside and removed only once `src` is in place.
    """
    if os.path.isdir(dst) and not os.path.islink(dst):
        parent = os.path.dirname(os.path.abspath(dst))
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}{_OLD}", dir=parent)
        os.rmdir(old)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def atomic_save_pretrained(obj, path: str, **kwargs) -> None:
    """`obj.save_pretrained(path)` (safetensors), written to a temporary folder and renamed into place."""
    with atomic_directory(path) as tmp:
        obj.save_pretrained(tmp, safe_serialization=True, **kwargs)


@contextmanager
def atomic_file(path: str, mode: str = "wb"):
    """Open a temporary file beside `path`; it replaces `path` only when the block succeeds (a
    failed write is one `WriteError` line, and `path` is as it was)."""
    parent = os.path.dirname(os.path.abspath(path))
    tmp = None
    with write_errors(path):
        try:
            os.makedirs(parent, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}{_TMP}", dir=parent)
            apply_umask(tmp)  # mkstemp makes it private
            with os.fdopen(fd, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)
            raise


def save_image(image, path: str) -> None:
    """A PIL image (a sample grid, say) as a PNG, written atomically."""
    with atomic_file(path) as f:
        image.save(f, format="PNG")


def save_pretrained_into(obj, folder: str, last: str) -> None:
    """`obj.save_pretrained` into a folder that also holds other things (checkpoints, logs).

    Written to a temporary folder inside `folder`, then moved in one rename per file or subfolder;
    `last` (the file a loader reads first, e.g. `model_index.json`) moves once everything else is in place.
    """
    with write_errors(folder):
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=_SAVE) as tmp:
            obj.save_pretrained(tmp, safe_serialization=True)
            apply_umask(tmp)  # safetensors writes its files 0600
            for name in sorted(os.listdir(tmp), key=lambda n: n == last):
                replace_path(os.path.join(tmp, name), os.path.join(folder, name))


def remove_stale_temporaries(folder: str) -> None:
    """Remove what the writers above leave in `folder` when a process dies while writing (call only
    when no other process writes there: a run holds its output folder's lock).

    A folder renamed aside by `replace_path` (`.<name>.old-*`) whose replacement never arrived is
    renamed back: it is the only copy of `<name>`."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if not name.startswith("."):
            continue
        if _OLD in name:
            original = os.path.join(folder, name[1:name.index(_OLD)])
            if not os.path.exists(original):
                os.replace(path, original)
                continue
        # `.checkpoint-<step>.tmp` / `.old` (training.checkpoint) and other `.<name>.tmp` end so.
        elif not (_TMP in name or name.startswith(_SAVE) or name.endswith((".tmp", ".old"))):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


def distributed_state():
    """accelerate's `PartialState` (process index, count, device, barriers) for scripts that need no
    `Accelerator`. It honours `ACCELERATE_USE_CPU` as `Accelerator` does: `PartialState` alone ignores
    it, and then each of several CPU processes would believe it runs alone."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The example scripts' `--help`: every flag's default shown, the description's layout kept."""


class RunStopped(RuntimeError):
    """A run that stops for a reason the user can act on (a damaged checkpoint, a full disk, a diverged
    loss, unusable data); the message is one line, and the trainers print it without a traceback."""


class WriteError(RunStopped):
    """A write that failed (a full disk, a read-only folder), whichever library raised it; one line
    naming the path, the cause and the free space. The target is left as it was."""


class FlagValueError(ValueError, argparse.ArgumentTypeError):
    """A bad command-line value: a `ValueError` to Python callers, argparse's own message on the command line."""


class SettingError(ValueError):
    """A setting whose value the method or the run does not allow.

    Raised by the library's own validators (the objectives' and the optimiser's dataclasses, the data
    planning functions), each setting checked in one place. `name` is the setting's name, which is
    also the example trainers' flag: their parsers turn the error into one naming `--name`
    (`diffusers_afm.training.cli.flag_errors`).
    """

    def __init__(self, name: str, value, allowed: str):
        self.name, self.value, self.allowed = name, value, allowed
        super().__init__(f"`{name}` got {value!r}; allowed: {allowed}{_end(allowed)}")


def _end(sentence: str) -> str:
    """The full stop a message needs, unless it ends in one already."""
    return "" if sentence.endswith((".", "?", "!")) else "."


def settings_from_flags(cls, flags, names: Optional[dict] = None):
    """A settings dataclass (`AFMObjective`, `OptimizerConfig`, `RunConfig`, ...) from the flag values
    of a trainer (its `vars(args)`): each field from the flag of the same name, or of `names[field]`
    where the flag is called otherwise; the field's default where the trainer has no such flag. The
    dataclass checks the values, and a `SettingError` names the flag."""
    import dataclasses

    names = names or {}
    values = {}
    for field in dataclasses.fields(cls):
        flag = names.get(field.name, field.name)
        if flag in flags:
            values[field.name] = flags[flag]
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise KeyError(f"{cls.__name__} needs the flag {flag!r}")
    try:
        return cls(**values)
    except SettingError as err:
        raise SettingError(names.get(err.name, err.name), err.value, err.allowed) from None


def check_setting(ok: bool, name: str, value, allowed: str) -> None:
    """Raise `SettingError(name, value, allowed)` unless `ok`."""
    if not ok:
        raise SettingError(name, value, allowed)


def parse_nfe(value) -> "int | None":
    """`--nfe`: a positive number of steps, or `'any'` (returned as None) for an any-step model."""
    if str(value).lower() == "any":
        return None
    try:
        nfe = int(value)
    except ValueError:
        nfe = 0
    if nfe < 1:
        raise FlagValueError(f"`--nfe` must be a positive integer or 'any', got {value!r}.")
    return nfe


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`--dtype`: a name in `DTYPES`, or `'auto'`: bfloat16 on a GPU, float32 elsewhere."""
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" else "float32"
    return DTYPES[name]


def check_finite_weights(components: dict, folder: str) -> None:
    """A `ValueError` naming the component, the tensor and its file when a loaded model holds NaN or
    Inf weights (or buffers); `components` maps names to models (a pipeline's `components`)."""
    import glob

    for name, module in components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        for key, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
            if tensor.is_floating_point() and not tensor.is_meta and not bool(torch.isfinite(tensor).all()):
                kind = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
                files = sorted(glob.glob(os.path.join(folder, name, "diffusion_pytorch_model*")))
                where = files[0] if len(files) == 1 else os.path.join(folder, name)
                raise ValueError(f"{where} holds non-finite weights ({kind} in `{key}`); it would sample black "
                                 "images. Export the model again from a checkpoint that verifies.")


def explain_load_error(err: Exception, folder: str) -> Optional[Exception]:
    """A one-line error naming the file, for what diffusers raises on a damaged pipeline folder
    (None when `err` is not one of those): a weights file that cannot be read (truncated, not
    safetensors), or weights whose shapes the config does not build."""
    import glob
    import re

    from safetensors import safe_open

    message = str(err)
    unreadable = re.search(r"Unable to load weights from checkpoint file for '([^']+)'", message)
    if unreadable:
        file = unreadable.group(1)
        detail = "cannot be read"
        if file.endswith(".safetensors"):
            try:
                with safe_open(file, framework="pt") as f:
                    f.keys()
            except Exception as inner:
                detail = f"is truncated or not a safetensors file ({str(inner).splitlines()[0]})"
        elif hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
            try:  # lists what the pickle would call, running none of it
                found = torch.serialization.get_unsafe_globals_in_checkpoint(file)
            except Exception:
                found = None
            if found:
                detail = (f"holds objects other than tensors ({', '.join(found[:3])}); it was not unpickled "
                          "(torch.load with weights_only=True refuses them)")
            elif found is None:
                detail = "is truncated or not a torch.save file"
        return OSError(f"{file} {detail}; save or download it again.")
    mismatch = re.search(r"because (\S+) expected shape (torch\.Size\(\[[^\]]*\]\)), but got (torch\.Size\(\[[^\]]*\]\))",
                         message)
    if mismatch:
        key, expected, got = mismatch.groups()
        file = folder
        shape = [int(n) for n in re.findall(r"\d+", got[10:])]
        try:  # the components the pipeline loads, not other folders beside them (discriminator/)
            with open(os.path.join(folder, "model_index.json")) as f:
                components = [k for k, v in json.load(f).items() if isinstance(v, list)]
        except (OSError, ValueError):
            components = ["*"]
        candidates = [c for name in components
                      for c in sorted(glob.glob(os.path.join(folder, name, "diffusion_pytorch_model*.safetensors")))]
        for candidate in candidates:
            try:
                with safe_open(candidate, framework="pt") as f:
                    if key in f.keys() and list(f.get_slice(key).get_shape()) == shape:
                        file = candidate
                        break
            except Exception:
                continue
        config = os.path.join(os.path.dirname(file), "config.json") if file != folder else "its config.json"
        return ValueError(f"{file} holds `{key}` of shape {got[11:-1]}, but {config} builds {expected[11:-1]}: "
                          "the config and the weights come from different models.")
    return None
