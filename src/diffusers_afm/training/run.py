"""The run around the loop: its settings, its Accelerator, its trackers.

`RunConfig` holds the settings every trainer shares (batch, length, precision, outputs, checkpoints,
logging) and owns their value rules; its field names are the trainers' flags. The trainers build it
from their flags (`utils.settings_from_flags`) at parse time, so that a bad value is reported before
any work, and again when they train, to make the `Accelerator`. `ValidationConfig` does the same for
the sample grids a run writes.
"""

import logging
import os
import sys
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from ..utils import SettingError, check_setting

logger = logging.getLogger(__name__)

REPORT_TO = ("tensorboard", "wandb", "all", "none")


def importable(module: str) -> bool:
    """Whether `module` can be imported (a module set to None in `sys.modules` is blocked)."""
    import importlib.util

    if module in sys.modules:
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


@dataclass
class RunConfig:
    """What a run is, apart from its data, model and objective. Field names are the trainers' flags.

    Args:
        output_dir: checkpoints, logs and the final model.
        train_batch_size: images per process per micro-batch (>= 1).
        max_train_steps: optimizer steps (>= 1); None until `num_train_epochs` is turned into steps.
        num_train_epochs: passes over the data (>= 1), used when `max_train_steps` is None.
        gradient_accumulation_steps: micro-batches per optimizer step (>= 1).
        mixed_precision: "no", "fp16", "bf16", or None for Accelerate's configuration (the flag's
            choices; Accelerate refuses anything else).
        allow_tf32: TF32 matmuls on Ampere and newer GPUs.
        seed: the seed of the weights, the data order and the noise.
        logging_dir: tracker logs, inside `output_dir`.
        report_to: "tensorboard", "wandb", "all" or "none".
        tracker_project_name: the name given to `accelerator.init_trackers`.
        checkpointing_steps: a resumable checkpoint every this many steps, and at the end (>= 1).
        checkpoints_total_limit: keep at most this many checkpoints (>= 1; None: all).
        ddp_timeout: seconds a process waits in a collective before it gives up (>= 1).
    """

    output_dir: str
    train_batch_size: int
    max_train_steps: Optional[int] = None
    num_train_epochs: Optional[int] = None
    gradient_accumulation_steps: int = 1
    mixed_precision: Optional[str] = None
    allow_tf32: bool = False
    seed: int = 0
    logging_dir: str = "logs"
    report_to: str = "tensorboard"
    tracker_project_name: str = "train"
    checkpointing_steps: int = 500
    checkpoints_total_limit: Optional[int] = None
    ddp_timeout: int = 600

    def __post_init__(self):
        for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "ddp_timeout"):
            value = getattr(self, name)
            check_setting(isinstance(value, int) and value >= 1, name, value, "an integer >= 1")
        for name in ("max_train_steps", "num_train_epochs", "checkpoints_total_limit"):
            value = getattr(self, name)
            check_setting(value is None or (isinstance(value, int) and value >= 1), name, value, "an integer >= 1")
        if self.max_train_steps is None and self.num_train_epochs is None:
            raise SettingError("max_train_steps", None, "an integer >= 1, or give num_train_epochs")
        check_setting(self.report_to in REPORT_TO, "report_to", self.report_to, ", ".join(REPORT_TO))
        check_setting(self.report_to not in ("wandb", "all") or importable("wandb"), "report_to", self.report_to,
                      "tensorboard or none here: wandb is not installed (`pip install wandb` for wandb or all)")

    @property
    def mixed_precision_dtype(self) -> torch.dtype:
        """The dtype of frozen helpers (VAE, text encoder) under this run's mixed precision."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision, torch.float32)

    def make_accelerator(self):
        """The run's `Accelerator` (logging, seeded RNGs, the output folder); call before anything else."""
        from datetime import timedelta

        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration, set_seed

        accelerator = Accelerator(
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            mixed_precision=self.mixed_precision,
            log_with=None if self.report_to == "none" else self.report_to,
            project_config=ProjectConfiguration(project_dir=self.output_dir,
                                                logging_dir=os.path.join(self.output_dir, self.logging_dir)),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=self.seed),
            # A dead peer turns every collective of the survivors into an error after this long, not a hang.
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=self.ddp_timeout))],
        )
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
        logger.info(accelerator.state)
        set_seed(self.seed)
        if self.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        if accelerator.is_main_process:
            os.makedirs(self.output_dir, exist_ok=True)
        return accelerator


@dataclass
class ValidationConfig:
    """The sample grids (or images) a run writes while it trains. Field names are the trainers' flags.

    Args:
        validation_steps: a grid every this many steps (>= 1).
        num_validation_classes, num_validation_images: the grid's rows (evenly spaced classes) and
            images per row (each >= 1).
        validation_inference_steps: the sampler's steps of a flow model's grid (>= 1; None: the model's).
        validation_guidance_scale: classifier-free guidance of a flow model's grid (>= 0; 1 = none).
    """

    validation_steps: int
    num_validation_classes: int = 10
    num_validation_images: int = 8
    validation_inference_steps: Optional[int] = None
    validation_guidance_scale: float = 1.0

    def __post_init__(self):
        for name in ("validation_steps", "num_validation_classes", "num_validation_images"):
            value = getattr(self, name)
            check_setting(isinstance(value, int) and value >= 1, name, value, "an integer >= 1")
        steps = self.validation_inference_steps
        check_setting(steps is None or (isinstance(steps, int) and steps >= 1), "validation_inference_steps", steps,
                      "an integer >= 1")
        check_setting(self.validation_guidance_scale >= 0, "validation_guidance_scale", self.validation_guidance_scale,
                      "a number >= 0 (1 = no guidance)")



def init_trackers(accelerator, project_name: str, settings: Dict) -> None:
    """Start tensorboard / wandb with the run's resolved settings (non-scalars as strings)."""
    if accelerator.is_main_process:
        config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in settings.items()}
        accelerator.init_trackers(project_name, config=config)


def log_image(accelerator, image, step: int, name: str = "samples") -> None:
    """A PIL image (a sample grid) to the trackers (tensorboard, wandb)."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(name, np.asarray(image), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: wandb.Image(image)}, step=step)


def log_weight_sums(accelerator, step: int, **models: torch.nn.Module) -> None:
    """Each rank's weight sums at the end: under DDP they must be equal (the two-process tests compare them)."""
    sums = {name: sum(p.detach().double().sum().item() for p in accelerator.unwrap_model(model).parameters())
            for name, model in models.items()}
    logger.info(f"rank {accelerator.process_index} finished: step {step}, weight sums {sums}")
