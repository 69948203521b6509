"""What every training loop of ours does around its step: the batches, the noise, the host-side logs.

Each trainer (`examples/train_*.py`) owns its loop, and each thing that every loop does again is
one call here: the batches from a step on (exact mid-epoch resume, `epoch_batches`), the run's
per-process noise generator, the step's logs copied to the host once (stopping a diverged run,
`host_values`) and the throughput (`Throughput`).
"""

import math
import time
from typing import Dict, Iterator

import torch

from ..utils import RunStopped
from .checkpoint import list_checkpoints


class NonFiniteLossError(RunStopped):
    """A diverged run: raised before the step's checkpoint or pipeline could be written."""


def noise_generator(accelerator, seed: int) -> torch.Generator:
    """The per-process generator of every random draw of a run (pairs, noise, flips, augmentation):
    rank-distinct, and checkpointed by `CheckpointIO` so that a resumed run continues the stream."""
    return torch.Generator(accelerator.device).manual_seed(seed * 1000 + accelerator.process_index)


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


def steps_from_epochs(num_train_epochs: int, num_batches: int, num_processes: int, gradient_accumulation_steps: int) -> int:
    """`--num_train_epochs` as optimizer steps (diffusers' trainers' rule): the loader's batches are
    split over the processes, and `gradient_accumulation_steps` of them make one step."""
    batches = math.ceil(num_batches / num_processes)
    return num_train_epochs * math.ceil(batches / gradient_accumulation_steps)


class Throughput:
    """Images per second over all processes, between two logged optimizer steps."""

    def __init__(self, num_processes: int):
        self.num_processes, self.images, self.since = num_processes, 0, time.perf_counter()

    def add(self, num_images: int) -> None:
        """Count one micro-batch of this process."""
        self.images += num_images

    def rate(self) -> float:
        """The rate since the last call (or the start), and start counting again."""
        now = time.perf_counter()
        rate = self.images * self.num_processes / max(now - self.since, 1e-9)
        self.images, self.since = 0, now
        return rate
