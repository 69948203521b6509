"""Plain rectified flow matching: the baseline that Continuous AFM post-trains (docs/cafm.md).

`x_t = (1 - t) x0 + t z` with `t` drawn by `sample_times`, the model regresses `v = z - x0`, and
labels are replaced by the null class with `class_dropout_prob` so that the model also learns the
unconditional velocity of classifier-free guidance. The time draws and the label dropout are shared
with the CAFM step (`training/cafm.py`), which uses the same `x_t`.
"""

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

import torch

from ..flow import interpolate
from ..models.modules import output_sample
from ..utils import check_setting
from .distributed import unwrap
from .ema import ModelEMA
from .optimization import optimizer_update
from .schedules import constant

TIME_SAMPLINGS = ("uniform", "logit_normal", "logit_normal_jit")


def sample_times(batch_size: int, sampling: str, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Flow times `t` (1 = noise): `"uniform"` U(0, 1); `"logit_normal"` sigmoid(N(0, 1)); `"logit_normal_jit"`
    sigmoid(0.8 N(0, 1) + 0.8), JiT's (its shift is +0.8 because t = 1 is noise here)."""
    if sampling == "uniform":
        return torch.rand(batch_size, device=device, generator=generator)
    if sampling == "logit_normal":
        return torch.randn(batch_size, device=device, generator=generator).sigmoid()
    if sampling == "logit_normal_jit":
        return torch.randn(batch_size, device=device, generator=generator).mul(0.8).add(0.8).sigmoid()
    raise ValueError(f"`time_sampling` must be one of {TIME_SAMPLINGS}, got {sampling!r}.")


def drop_class_labels(class_labels: torch.LongTensor, null_class_id: Optional[int], probability: float,
                      generator: Optional[torch.Generator] = None) -> torch.LongTensor:
    """Replace each label by the null class with `probability` (classifier-free guidance training)."""
    if probability == 0 or null_class_id is None:
        return class_labels
    keep = torch.rand(class_labels.shape[0], device=class_labels.device, generator=generator) >= probability
    return torch.where(keep, class_labels, torch.full_like(class_labels, null_class_id))


def noise_scale(model: torch.nn.Module) -> float:
    """The scale of the noise `z` a model's flow ends in: its config's `noise_scale` (JiT doubles the
    noise at 512 px), else 1. The pipeline draws its starting noise the same way."""
    config = getattr(unwrap(model), "config", None)
    return float(getattr(config, "noise_scale", 1.0) or 1.0)


def flow_matching_loss(velocity_pred: torch.Tensor, velocity_real: torch.Tensor) -> torch.Tensor:
    """Rectified flow matching: `mean (v(x_t, t) - (z - x0))^2`."""
    return (velocity_pred.float() - velocity_real.float()).square().mean()


@dataclass
class FlowMatchingObjective:
    """How the training points are drawn; shared by flow matching and CAFM (`CAFMObjective` extends it).

    Args:
        time_sampling: one of `TIME_SAMPLINGS` (SiT's and CAFM's `uniform`).
        class_dropout_prob: the probability of training on the null class, in [0, 1) (SiT's 0.1).
    """

    time_sampling: str = "uniform"
    class_dropout_prob: float = 0.1

    def __post_init__(self):
        check_setting(self.time_sampling in TIME_SAMPLINGS, "time_sampling", self.time_sampling, ", ".join(TIME_SAMPLINGS))
        check_setting(0 <= self.class_dropout_prob < 1, "class_dropout_prob", self.class_dropout_prob, "a number in [0, 1)")


class FlowMatchingTrainingStep:
    """One step of plain rectified flow matching (the baseline CAFM post-trains), with class dropout.

    Args:
        accelerator: the `accelerate.Accelerator` that prepared the model and optimizer.
        model: the velocity model `v(x_t, t, c)`.
        optimizer: its optimizer (prepared).
        ema: the model's `ModelEMA`, updated after every optimizer step with `ema_decay` (a number,
            or a schedule of the step).
        max_grad_norm: gradient clipping (0 or None: none).
        time_sampling, class_dropout_prob: the `FlowMatchingObjective`.
        null_class_id: the label that class dropout substitutes (None: no dropout).
        noise_generator: the `torch.Generator` of every draw (labels, times, noise), checkpointed by the caller.
    """

    def __init__(self, accelerator, model, optimizer, ema: Optional[ModelEMA] = None,
                 ema_decay: Union[float, Callable[[int], float]] = 0.9999, max_grad_norm: Optional[float] = 1.0,
                 time_sampling: str = "uniform", class_dropout_prob: float = 0.1,
                 null_class_id: Optional[int] = None, noise_generator: Optional[torch.Generator] = None):
        self.objective = FlowMatchingObjective(time_sampling=time_sampling, class_dropout_prob=class_dropout_prob)
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.ema = ema
        self.ema_decay = ema_decay if callable(ema_decay) else constant(ema_decay)
        self.max_grad_norm = max_grad_norm
        self.null_class_id = null_class_id
        self.rng = noise_generator
        self.noise_scale = noise_scale(model)

    def __call__(self, x0: torch.Tensor, class_labels: torch.LongTensor, step: int) -> Dict[str, torch.Tensor]:
        objective = self.objective
        labels = drop_class_labels(class_labels, self.null_class_id, objective.class_dropout_prob, self.rng)
        t = sample_times(x0.shape[0], objective.time_sampling, x0.device, self.rng)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=self.rng) * self.noise_scale
        with self.accelerator.accumulate(self.model):
            with self.accelerator.autocast():
                velocity_pred = output_sample(self.model(interpolate(x0, noise, t), t, labels))
            loss = flow_matching_loss(velocity_pred, noise - x0)
            self.accelerator.backward(loss)
            logs = {"loss": loss.detach()}
            optimizer_update(self.accelerator, self.model, self.optimizer, self.max_grad_norm, logs, "grad_norm")
            if self.ema is not None and self.accelerator.sync_gradients:
                self.ema.update(self.model, self.ema_decay(step))
        return logs
