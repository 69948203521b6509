"""The optimiser side of every trainer: AdamW, its learning-rate schedule, the update after a
backward pass, and the EMA settings.

`OptimizerConfig` and `EMAConfig` own every value rule of their settings (a learning rate > 0,
betas in [0, 1), ...); the example trainers build them from their flags, so that each setting is
checked in one place and means the same in every trainer. Their field names are the trainers' flag
names, and a bad value raises `SettingError(name, ...)`, which the trainers report as `--name`.

`max_grad_norm = 0` means no clipping, in every trainer (as in transformers' `Trainer`): the
reference's CAFM clipping of 10,000 and no clipping at all are both expressible, and no value is
an error but a negative one.
"""

from dataclasses import dataclass
from typing import Dict, Iterable, Optional

import torch

from ..utils import check_setting
from .schedules import Schedule, constant, ema_warmup


def lr_scheduler_names():
    """The learning-rate schedules `diffusers.optimization.get_scheduler` knows."""
    from diffusers.optimization import SchedulerType

    return tuple(kind.value for kind in SchedulerType)


@dataclass
class OptimizerConfig:
    """AdamW and its schedule for one network. Field names are the trainers' flags.

    Args:
        learning_rate: the peak learning rate (> 0).
        adam_beta1, adam_beta2: AdamW's betas, each in [0, 1) (the AFM and CAFM recipes use beta1 = 0).
        adam_epsilon: AdamW's epsilon (> 0).
        adam_weight_decay: decoupled weight decay (>= 0).
        max_grad_norm: clip the gradient norm to this; 0 turns clipping off.
        lr_scheduler: a `diffusers.optimization` schedule name.
        lr_warmup_steps: its linear warm-up, in optimizer steps (>= 0).
    """

    learning_rate: float
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    adam_weight_decay: float = 0.0
    max_grad_norm: float = 0.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0

    def __post_init__(self):
        check_setting(self.learning_rate > 0, "learning_rate", self.learning_rate, "a number > 0")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            check_setting(0 <= value < 1, name, value, "a number in [0, 1)")
        check_setting(self.adam_epsilon > 0, "adam_epsilon", self.adam_epsilon, "a number > 0")
        check_setting(self.adam_weight_decay >= 0, "adam_weight_decay", self.adam_weight_decay, "a number >= 0")
        check_setting(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, "a number >= 0 (0: no clipping)")
        names = lr_scheduler_names()
        check_setting(self.lr_scheduler in names, "lr_scheduler", self.lr_scheduler, ", ".join(names))
        check_setting(isinstance(self.lr_warmup_steps, int) and self.lr_warmup_steps >= 0, "lr_warmup_steps",
                      self.lr_warmup_steps, "an integer >= 0")

    def adamw(self, parameters: Iterable[torch.nn.Parameter]) -> torch.optim.AdamW:
        """AdamW over `parameters`, fused (one kernel for all of them) on CUDA."""
        fused = {"fused": True} if torch.cuda.is_available() else {}
        return torch.optim.AdamW(parameters, lr=self.learning_rate, betas=(self.adam_beta1, self.adam_beta2),
                                 eps=self.adam_epsilon, weight_decay=self.adam_weight_decay, **fused)

    def scheduler(self, optimizer: torch.optim.Optimizer, max_train_steps: int, num_processes: int = 1):
        """The `lr_scheduler` of `optimizer` over `max_train_steps` optimizer steps.

        Accelerate steps a prepared scheduler once per process for each optimizer step, so its
        lengths are counted in process-steps, as diffusers' trainers do.
        """
        from diffusers.optimization import get_scheduler

        return get_scheduler(self.lr_scheduler, optimizer=optimizer, num_warmup_steps=self.lr_warmup_steps * num_processes,
                             num_training_steps=max_train_steps * num_processes)


@dataclass
class EMAConfig:
    """The generator's exponential moving average. Field names are the trainers' flags.

    Args:
        ema_decay: the decay in [0, 1) (0.9999 in the AFM paper, 0.99 after each G update in CAFM).
        ema_warmup: decay `min(ema_decay, (1 + n) / (10 + n))` after n updates (diffusers'
            `EMAModel` rule), for short runs.
    """

    ema_decay: float
    ema_warmup: bool = False

    def __post_init__(self):
        check_setting(0 <= self.ema_decay < 1, "ema_decay", self.ema_decay, "a number in [0, 1)")

    def schedule(self) -> Schedule:
        """The decay as a function of the update count."""
        return ema_warmup(self.ema_decay) if self.ema_warmup else constant(self.ema_decay)


def optimizer_update(accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: Optional[float],
                     logs: Dict[str, torch.Tensor], name: str) -> None:
    """After the backward pass: clip `model`'s gradients (when they are synchronised and
    `max_grad_norm` is > 0; the norm goes into `logs[name]`), step the optimizer and free the
    gradients. Every network update of the AFM, CAFM and flow-matching steps goes through here."""
    if accelerator.sync_gradients and max_grad_norm:
        logs[name] = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


__all__ = ["EMAConfig", "OptimizerConfig", "lr_scheduler_names", "optimizer_update"]
