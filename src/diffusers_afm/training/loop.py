"""What every training loop of ours does around its step: the batches, the optimisers, the host-side logs.

The generator trainer and the classifier trainer (`examples/`) both resume mid-epoch, draw every
random number from one per-process noise generator, log once per optimiser step with a single
device-to-host copy, and stop on a non-finite loss before anything is saved. Each of those is
written here once.
"""

import math
from typing import Dict, Iterable, Iterator

import torch

from ..utils import RunStopped
from .checkpoint import list_checkpoints


class NonFiniteLossError(RunStopped):
    """A diverged run: raised before the step's checkpoint or pipeline could be written."""


def noise_generator(accelerator, seed: int) -> torch.Generator:
    """The per-process generator of every random draw of a run (pairs, noise, flips, augmentation):
    rank-distinct, and checkpointed by `CheckpointIO` so that a resumed run continues the stream."""
    return torch.Generator(accelerator.device).manual_seed(seed * 1000 + accelerator.process_index)


def adamw(parameters: Iterable[torch.nn.Parameter], learning_rate: float, betas, eps: float,
          weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) on CUDA."""
    fused = {"fused": True} if torch.cuda.is_available() else {}
    return torch.optim.AdamW(parameters, lr=learning_rate, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **fused)


def epoch_batches(accelerator, dataloader, global_step: int, max_train_steps: int,
                  gradient_accumulation_steps: int) -> Iterator:
    """Every batch from optimizer step `global_step` on, epoch after epoch; the caller stops at the end.

    On resume, the batches of the current epoch already seen are skipped, so a resumed run reads
    exactly the batches an uninterrupted one would.
    """
    updates_per_epoch = len(dataloader) // gradient_accumulation_steps
    first_epoch = global_step // updates_per_epoch
    skip_batches = (global_step % updates_per_epoch) * gradient_accumulation_steps
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)
    for epoch in range(first_epoch, num_epochs):
        dataloader.set_epoch(epoch)
        batches = dataloader
        if epoch == first_epoch and skip_batches:
            batches = accelerator.skip_first_batches(dataloader, skip_batches)
        yield from batches


def host_values(logs: Dict[str, torch.Tensor], step: int, output_dir: str) -> Dict[str, float]:
    """The step's logged tensors as floats (one host sync); stops on a non-finite value, naming it."""
    # Stacked on the device first, so the copy to the host (and the wait for the step) happens once.
    tensors = [v.detach().float() for v in logs.values()]
    device = tensors[0].device
    values = dict(zip(logs, torch.stack([t.to(device) for t in tensors]).cpu().tolist()))
    # Name the first broken part rather than the total it spoils.
    bad = sorted((k for k, v in values.items() if not math.isfinite(v)), key=lambda k: k.startswith("loss_"))
    if bad:
        kept = list_checkpoints(output_dir)
        raise NonFiniteLossError(
            f"Training stopped at step {step}: loss part `{bad[0]}` is {values[bad[0]]}. "
            f"Nothing was saved for this step; the last checkpoint is {kept[-1] if kept else 'none'}."
        )
    return values
