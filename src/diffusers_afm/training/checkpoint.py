"""Resumable training checkpoints, written so that a crash never leaves a half-written one.

A checkpoint `checkpoint-<step>/` holds what `accelerator.save_state` writes (both networks as
safetensors, both optimizers and LR schedulers, every process's RNG states, the data sampler) plus
the AFM state Accelerate does not know about, also as safetensors: the generator EMA, the
gradient-normalization statistic, each process's noise generator, and the step. It is first
written as `.checkpoint-<step>.tmp/` and renamed into place when complete; only complete
checkpoints are ever resumed from or counted, and the oldest are pruned after a new one lands.
"""

import json
import os
import re
import shutil
from typing import List, Optional

import torch
from safetensors.torch import load_file, save_file

from .ema import ModelEMA
from .grad_norm import GradientNormalization

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


def list_checkpoints(output_dir: str) -> List[str]:
    """Complete checkpoints in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _NAME.match(name)
        if match and os.path.isfile(os.path.join(output_dir, name, STATE_FILE)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found)]


def resolve_resume(output_dir: str, resume_from_checkpoint: Optional[str]) -> Optional[str]:
    """`latest` -> the newest complete checkpoint (None if there is none yet); a path must exist."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    if not os.path.isfile(os.path.join(resume_from_checkpoint, STATE_FILE)):
        raise ValueError(
            f"`--resume_from_checkpoint`: {resume_from_checkpoint!r} is not a complete checkpoint folder "
            f"(no {STATE_FILE}); pass 'latest' or a {PREFIX}<step> folder."
        )
    return resume_from_checkpoint


def save_checkpoint(
    accelerator,
    output_dir: str,
    step: int,
    ema: Optional[ModelEMA],
    grad_norm: Optional[GradientNormalization],
    noise_generator: torch.Generator,
    total_limit: Optional[int] = None,
) -> str:
    """Write `checkpoint-<step>` atomically (call on every process); returns its path."""
    final = os.path.join(output_dir, f"{PREFIX}{step}")
    tmp = os.path.join(output_dir, f".{PREFIX}{step}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crashed save
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp, safe_serialization=True)
    rank = accelerator.process_index
    save_file({"state": noise_generator.get_state()}, os.path.join(tmp, f"noise_rng_{rank}.safetensors"))
    if accelerator.is_main_process:
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, os.path.join(tmp, "ema.safetensors"))
        if grad_norm is not None:
            save_file({k: v.contiguous() for k, v in grad_norm.state_dict().items()}, os.path.join(tmp, "grad_norm.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # The state file is written last: its presence marks the checkpoint complete.
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump({"step": step, "num_processes": accelerator.num_processes}, f)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    accelerator,
    path: str,
    ema: Optional[ModelEMA],
    grad_norm: Optional[GradientNormalization],
    noise_generator: torch.Generator,
) -> int:
    """Restore everything `save_checkpoint` wrote; returns the step to continue from."""
    with open(os.path.join(path, STATE_FILE)) as f:
        state = json.load(f)
    accelerator.load_state(path)
    if ema is not None:
        ema.load_state_dict(load_file(os.path.join(path, "ema.safetensors")))
    if grad_norm is not None:
        device = grad_norm.square_avg.device
        grad_norm.load_state_dict({k: v.to(device) for k, v in load_file(os.path.join(path, "grad_norm.safetensors")).items()})
    rng_file = os.path.join(path, f"noise_rng_{accelerator.process_index}.safetensors")
    if os.path.isfile(rng_file):
        noise_generator.set_state(load_file(rng_file)["state"])
    else:  # resumed on more processes than saved: a fresh, still rank-distinct stream
        noise_generator.manual_seed(noise_generator.initial_seed() + 7919 * state["step"])
    return int(state["step"])
