"""Reading a checkpoint file safely: what every converter does before it maps any key.

`.pth`/`.pt`/`.bin`/`.ckpt` files are read with `torch.load(weights_only=True)`, which rebuilds
tensors and containers only and runs no code (a converter may allow a named class or two, such as
the `argparse.Namespace` JiT pickles beside its weights); `.safetensors` files hold tensors only.
Every failure is a one-line `CheckpointError` that names the file.
"""

import json
import os
import pickle
import zipfile
from importlib import resources
from typing import Dict, Optional, Sequence

import torch

from ..utils import FlagValueError
from .official import strip_wrapper_prefixes

IMAGENET_DATASET = "ILSVRC/imagenet-1k"
# Keys under which training scripts commonly nest the weights; the EMA weights are what samples well.
NESTED_KEYS = ("ema", "model_ema", "state_dict", "model", "gen", "generator")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
EXPECTED_CHECKPOINT = "a state dict of tensors written by torch.save (.pth/.pt/.bin/.ckpt) or by safetensors (.safetensors)"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or holds no state dict of the expected layout."""


def imagenet_id2label() -> Dict[int, str]:
    """The 1000 ImageNet-1k class names (WordNet synonyms, comma-separated), shipped with the package."""
    text = resources.files("diffusers_afm").joinpath("data/imagenet_classes.json").read_text(encoding="utf-8")
    return {int(k): v for k, v in json.loads(text).items()}


def load_error_reason(err: Exception) -> str:
    """One line from a loader's error: torch's weights-only refusal is a page long, and its last
    line ("WeightsUnpickler error: ...") is the one that says what was refused."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    refusal = [line for line in lines if line.startswith("WeightsUnpickler error") or "unsupported GLOBAL" in line]
    line = (refusal[0] if refusal else (lines[0] if lines else "")).split(". ")[0].rstrip(".")
    return f"{type(err).__name__}: {line[:200]}"


def read_checkpoint(path: str, allowed_globals: Sequence[type] = ()):
    """The object in a `.pth`/`.pt`/`.bin`/`.ckpt` file, read safely (`torch.load(weights_only=True)`,
    which runs no code; `allowed_globals` are the only classes it may rebuild besides tensors and
    containers), or the tensors of a `.safetensors` file.

    Raises `FileNotFoundError` for a missing file, `FlagValueError` for a file name it does not
    read, and `CheckpointError` for a file it cannot read.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`--checkpoint`: no file at {path!r}.")
    if not path.endswith(CHECKPOINT_SUFFIXES):
        raise FlagValueError(f"`--checkpoint` must be a {', '.join(CHECKPOINT_SUFFIXES)} file, got {path!r}.")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch and safetensors raise many types (RuntimeError, KeyError, OSError, ...)
        if path.endswith(".safetensors"):
            detail = f"not a complete safetensors file ({load_error_reason(err)})"
        elif not zipfile.is_zipfile(path):
            detail = "not a complete torch.save archive (a zip file): truncated, or not a PyTorch checkpoint"
        elif isinstance(err, pickle.UnpicklingError):
            detail = f"it holds objects other than tensors, which torch.load(weights_only=True) refuses ({load_error_reason(err)})"
        else:
            detail = load_error_reason(err)
        raise CheckpointError(f"`--checkpoint` {path!r} cannot be read: {detail}; expected {EXPECTED_CHECKPOINT}.") from None


def select_state_dict(obj, path: str, state_dict_key: Optional[str] = None,
                      nested_keys: Sequence[str] = NESTED_KEYS) -> Dict[str, torch.Tensor]:
    """The state dict in a checkpoint's object: the object itself, its `state_dict_key` entry, or the
    first of `nested_keys` it has when its top level holds no tensors. `CheckpointError` (naming
    `path`) for anything else."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"`--checkpoint` {path!r} holds a {type(obj).__name__}, not a state dict; expected {EXPECTED_CHECKPOINT}.")
    if state_dict_key is not None:
        if state_dict_key not in obj:
            raise FlagValueError(f"`--state_dict_key`: {state_dict_key!r} is not in {path!r}; it has {sorted(map(str, obj))}.")
        obj = obj[state_dict_key]
    elif not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in nested_keys:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        else:
            raise CheckpointError(
                f"`--checkpoint` {path!r} has no tensors at its top level; pick the weights among "
                f"{sorted(map(str, obj))} with `--state_dict_key`."
            )
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"`--checkpoint` {path!r}: the selected entry is not a state dict of tensors.")
    return strip_wrapper_prefixes(obj)


def load_reference_state_dict(path: str, state_dict_key: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Read a `.pth`/`.pt`/`.bin`/`.ckpt` (safely: `weights_only=True`, which runs no code) or
    `.safetensors` state dict; the weights nested under a common key (or `state_dict_key`) are found.

    Raises `FileNotFoundError` for a missing file, `FlagValueError` for a file name it does not
    read, and `CheckpointError` for a file it cannot read or that holds no state dict.
    """
    return select_state_dict(read_checkpoint(path), path, state_dict_key)
