"""Resumable training checkpoints, written so that a crash never leaves a half-written one.

A checkpoint `checkpoint-<step>/` holds what `accelerator.save_state` writes plus the AFM state
Accelerate does not know about (`CheckpointIO`), and the step. It is first written as
`.checkpoint-<step>.tmp/` and renamed into place when complete; only complete checkpoints are ever
resumed from or counted, and the oldest are pruned after a new one lands.
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


class CheckpointIO:
    """The resumable state of a run, each piece named once (as edm2's `CheckpointIO` does).

    Accelerate's `save_state` / `load_state` cover what it prepared (both networks, optimizers, LR
    schedulers, RNG states, the data sampler); the pieces given here are the AFM state it does not
    know about, each written as `<name>.safetensors`:

    - `ema`: the generator's `ModelEMA` (main process);
    - `grad_norm`: the `GradientNormalization` statistic (main process; it is identical on every rank);
    - `noise_rng_<rank>`: each process's noise generator, so every rank continues its own stream.

    Pieces that are None are not saved or loaded (the classifier trainer has no grad_norm).
    """

    def __init__(
        self,
        accelerator,
        ema: Optional[ModelEMA] = None,
        grad_norm: Optional[GradientNormalization] = None,
        noise_generator: Optional[torch.Generator] = None,
    ):
        self.accelerator = accelerator
        self.ema, self.grad_norm, self.noise_generator = ema, grad_norm, noise_generator

    def _modules(self):
        """(file stem, module) of the pieces the main process writes."""
        return [(name, module) for name, module in (("ema", self.ema), ("grad_norm", self.grad_norm)) if module is not None]

    def _rng_file(self, folder: str) -> str:
        return os.path.join(folder, f"noise_rng_{self.accelerator.process_index}.safetensors")

    def save(self, output_dir: str, step: int, total_limit: Optional[int] = None) -> str:
        """Write `checkpoint-<step>` atomically (call on every process); returns its path.

        Written as `.checkpoint-<step>.tmp/`, marked complete by the state file written last, then
        renamed into place; the oldest complete checkpoints beyond `total_limit` are pruned after that.
        """
        accelerator = self.accelerator
        final = os.path.join(output_dir, f"{PREFIX}{step}")
        tmp = os.path.join(output_dir, f".{PREFIX}{step}.tmp")
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crashed save
            os.makedirs(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(tmp, safe_serialization=True)
        if self.noise_generator is not None:
            save_file({"state": self.noise_generator.get_state()}, self._rng_file(tmp))
        if accelerator.is_main_process:
            for name, module in self._modules():
                state = {k: v.contiguous() for k, v in module.state_dict().items()}
                save_file(state, os.path.join(tmp, f"{name}.safetensors"))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
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

    def load(self, path: str) -> int:
        """Restore everything `save` wrote into the pieces; returns the step to continue from."""
        with open(os.path.join(path, STATE_FILE)) as f:
            state = json.load(f)
        self.accelerator.load_state(path)
        for name, module in self._modules():
            # Loaded onto the device the module's tensors live on (EMA on the accelerator, say).
            device = next(iter(module.state_dict().values())).device
            module.load_state_dict({k: v.to(device) for k, v in load_file(os.path.join(path, f"{name}.safetensors")).items()})
        if self.noise_generator is not None:
            if os.path.isfile(self._rng_file(path)):
                self.noise_generator.set_state(load_file(self._rng_file(path))["state"])
            else:  # resumed on more processes than saved: a fresh, still rank-distinct stream
                self.noise_generator.manual_seed(self.noise_generator.initial_seed() + 7919 * state["step"])
        return int(state["step"])
