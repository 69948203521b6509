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
import time
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


# ----------------------------------------------------------------------------- the process and its launch
_CPU_THREADS = None  # (threads, reason), chosen once per process


def set_cpu_threads():
    """Choose this process's CPU threads once, so that two processes' threads do not fight for the cores.

    `OMP_NUM_THREADS`, when set (by you, or by `accelerate launch` / `torchrun` for several processes:
    1 each), decides. Otherwise: the cores this process may run on (`os.sched_getaffinity`), shared
    with the other processes of this launch on the machine (`LOCAL_WORLD_SIZE`), and no more than the
    machine's cores that other work leaves free (`other_cpu_load`), at least 1. A second thread only
    pays while it has a core of its own: torch's threads meet at a barrier after every operation, so
    one thread that waits for a core stalls the other (on 2 shared cores, 2 threads ran the digits
    at 5.7 s/step beside other jobs, 1 thread at 1.1 s/step; docs/performance.md). Decided once,
    before the first step, so that a run's arithmetic, which depends on the thread count, does
    not change under it. Returns (threads, why).
    """
    global _CPU_THREADS
    if _CPU_THREADS is None:
        if os.environ.get("OMP_NUM_THREADS"):
            _CPU_THREADS = (torch.get_num_threads(), f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
        else:
            allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
            busy = other_cpu_load()
            threads = cpu_thread_count(allowed, os.cpu_count() or allowed, busy, local_processes)
            torch.set_num_threads(threads)
            _CPU_THREADS = (threads, f"{allowed} cores allowed, {busy} busy with other work, {local_processes} "
                                     "process(es) of this launch; OMP_NUM_THREADS sets it")
    return _CPU_THREADS


def cpu_thread_count(allowed: int, machine_cores: int, busy: int, local_processes: int = 1) -> int:
    """Threads for one process: its share of the `allowed` cores among the `local_processes` of its
    launch, and no more than the `machine_cores` that `busy` other work leaves free; at least 1."""
    return max(1, min(allowed // max(1, local_processes), machine_cores - busy))


def other_cpu_load(window: float = 0.5) -> int:
    """Cores that other work keeps busy now: the machine's busy time over `window` seconds while this
    process sleeps (Linux `/proc/stat`), rounded. The load average would count work that already
    ended (it decays over minutes: a job that stopped 30 s ago still reads as a busy core) and this
    process's own start-up; elsewhere it is the only measure there is."""
    def cpu_times():
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields[:8]), fields[3] + fields[4]  # all time (guest time is inside user), idle + iowait

    try:
        total_0, idle_0 = cpu_times()
        time.sleep(window)
        total_1, idle_1 = cpu_times()
    except (OSError, ValueError, IndexError):
        return round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    if total_1 <= total_0:
        return 0
    busy_share = 1.0 - (idle_1 - idle_0) / (total_1 - total_0)
    return max(0, round(busy_share * (os.cpu_count() or 1)))


def requested_launch_processes(launcher_argv, default_config_file: Optional[str] = None) -> Optional[int]:
    """The process count an `accelerate launch` command line asked for: its `--num_processes`, else
    the `num_processes` of its `--config_file` (or of `default_config_file`); None when it names none.
    Only the launcher's own flags count, up to the training script."""
    argv = list(launcher_argv)
    start = next((i + 1 for i, a in enumerate(argv) if a == "launch" or a.endswith("accelerate.commands.launch")), None)
    if start is None:
        return None
    flags, config_file = {}, default_config_file
    i = start

    def is_script(token):
        return token.endswith(".py") or token == "-m"

    while i < len(argv) and not is_script(argv[i]):
        name, _, value = argv[i].partition("=")
        name = name.replace("-", "_").lstrip("_")
        if not value and i + 1 < len(argv) and not argv[i + 1].startswith("-") and not is_script(argv[i + 1]):
            value = argv[i + 1]
            i += 1
        flags[name] = value
        i += 1
    if flags.get("num_processes", "").isdigit():
        return int(flags["num_processes"])
    config_file = flags.get("config_file") or config_file
    if config_file and os.path.isfile(config_file):
        from accelerate.commands.config.config_args import load_config_from_file

        requested = getattr(load_config_from_file(config_file), "num_processes", None)
        return requested if isinstance(requested, int) and requested > 0 else None
    return None


def cpu_launch_warning(num_processes: int) -> Optional[str]:
    """One line when `accelerate launch --cpu --num_processes N` (N > 1) started this single process:
    Accelerate runs `--cpu` as one process (it sets ACCELERATE_USE_CPU and no WORLD_SIZE), so the
    count asked for is only on the launcher's command line or in its config file. None otherwise."""
    from accelerate.utils import str_to_bool

    if num_processes != 1 or "WORLD_SIZE" in os.environ or not str_to_bool(os.environ.get("ACCELERATE_USE_CPU", "0")):
        return None
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            launcher_argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:  # not Linux, or the launcher is gone
        return None
    from accelerate.commands.config import default_config_file

    requested = requested_launch_processes(launcher_argv, default_config_file)
    if requested is None or requested < 2:
        return None
    script = next((a for a in launcher_argv if a.endswith(".py")), "script.py")
    return (f"`accelerate launch --cpu --num_processes {requested}` runs ONE process (Accelerate's --cpu launch), so this "
            f"run trains on 1 process, not {requested}. For {requested} CPU processes: ACCELERATE_USE_CPU=1 accelerate "
            f"launch --multi_gpu --num_processes {requested} --num_machines 1 --mixed_precision no --dynamo_backend no "
            f"{script} ...")


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
        overwrite_output_dir: remove a previous run's checkpoints and outputs from `output_dir` before
            starting (without it, a new run into such a folder is refused; `output_dir.start_run`).
        resume_from_checkpoint: `latest`, `latest_valid` or a checkpoint folder (None: a new run).
        allow_changed_settings: comma-separated settings a resume may change from those its
            checkpoint records (`checkpoint.check_resume_settings`).
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
    overwrite_output_dir: bool = False
    resume_from_checkpoint: Optional[str] = None
    allow_changed_settings: Optional[str] = None

    def __post_init__(self):
        check_setting(not os.path.isfile(self.output_dir), "output_dir", self.output_dir,
                      "a folder (new or existing); this is a file")
        check_setting(not (self.overwrite_output_dir and self.resume_from_checkpoint), "overwrite_output_dir", True,
                      "only without --resume_from_checkpoint (it removes the checkpoints a resume reads)")
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

    def total_steps(self, num_batches: int, num_processes: int) -> int:
        """`max_train_steps`, or `num_train_epochs` over a loader of `num_batches` as optimizer steps
        (diffusers' trainers' rule: a given `max_train_steps` wins)."""
        if self.max_train_steps is not None:
            return self.max_train_steps
        from .loop import steps_from_epochs

        return steps_from_epochs(self.num_train_epochs, num_batches, num_processes, self.gradient_accumulation_steps)

    @property
    def mixed_precision_dtype(self) -> torch.dtype:
        """The dtype of frozen helpers (VAE, text encoder) under this run's mixed precision."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision, torch.float32)

    def make_accelerator(self):
        """The run's `Accelerator` (logging, seeded RNGs); call before anything else, then `output_dir.start_run`."""
        from datetime import timedelta

        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration, set_seed

        from .distributed import fsdp_fallback_note

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
        # Accelerate logs every file of a checkpoint (8 lines a save); `CheckpointIO.save` logs one.
        logging.getLogger("accelerate.checkpointing").setLevel(logging.WARNING)
        logger.info(accelerator.state)
        if accelerator.device.type == "cpu":
            threads, reason = set_cpu_threads()
            logger.info(f"CPU threads: {threads} ({reason})")
        warning = cpu_launch_warning(accelerator.num_processes)
        if warning:
            logger.warning(warning)
        fsdp_fallback_note(accelerator)
        set_seed(self.seed)
        if self.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        # The output folder is made by `output_dir.start_run`, with its checks and lock.
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


def save_validation_grid(accelerator, grid, output_dir: str, step: int) -> None:
    """A validation grid of step `step`: `samples/step_<step>.png` in the output folder, and to the trackers."""
    from ..utils import save_image

    save_image(grid, os.path.join(output_dir, "samples", f"step_{step:07d}.png"))
    log_image(accelerator, grid, step)


def log_peak_memory(accelerator) -> None:
    """The accelerator's memory peak of this process, at the end of a run (GPUs only): what the
    memory plan of docs/training.md predicts."""
    if torch.cuda.is_available() and accelerator.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
        logger.info(f"rank {accelerator.process_index}: peak GPU memory {peak:.2f} GiB "
                    f"({accelerator.distributed_type.value}, {accelerator.num_processes} processes)")


def log_weight_sums(accelerator, step: int, **models: torch.nn.Module) -> None:
    """Each rank's weight sums at the end: under DDP they must be equal (the two-process tests compare
    them). Sharded weights are gathered first (a collective), so every rank logs the whole model's sums."""
    from .distributed import full_tensor

    sums = {name: sum(full_tensor(p.detach()).double().sum().item() for p in accelerator.unwrap_model(model).parameters())
            for name, model in models.items()}
    logger.info(f"rank {accelerator.process_index} finished: step {step}, weight sums {sums}")
