"""Continuous AFM: adversarial post-training of a flow-matching model (docs/method.md, "Continuous AFM").

The discriminator `D(x_t, t, c)` is judged by its directional derivative along a velocity,
`dD[v] = d/de D(x_t + e v, t + e) |_{e=0}` (a JVP with tangent `(v, 1)`):

D step:  L_D = mean (dD[v_real] - 1)^2 + mean (dD[v_pred] + 1)^2 + cp_scale * mean D(x_t)^2
G step:  L_G = mean (dD[v_pred] - 1)^2 + ot_scale * mean v_pred^2

with `x_t = (1 - t) x0 + t z`, `v_real = z - x0`, `v_pred = v(x_t, t, c)`. The first `warmup`
iterations are D steps; after them, N out of every N + 1 iterations are D steps and one is a G step.
Each iteration draws its own batch, and counts as one training step (for checkpoints, schedules and
logs), as in the reference trainer.

`CAFMTrainingStep` is the one place where the two networks and the losses meet; the trainer
(`examples/train_cafm.py`), the toy experiments and the tests call it. Plain flow matching (the
baseline CAFM starts from, and the time draws and label dropout both share) is `training/flow_matching.py`.
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from ..flow import interpolate
from ..models.modules import output_sample
from ..utils import check_setting
from .distributed import without_ddp
from .ema import ModelEMA
from .flow_matching import FlowMatchingObjective, drop_class_labels, noise_scale, sample_times
from .optimization import optimizer_update
from .schedules import constant


# ----------------------------------------------------------------------------- pure pieces
def cafm_discriminator_loss(
    logits: torch.Tensor, derivative_real: torch.Tensor, derivative_fake: torch.Tensor, cp_scale: float
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Least squares on the directional derivatives (real -> +1, fake -> -1) plus logit centering
    `cp_scale * mean D(x_t)^2`; returns the loss and its parts (detached) for logging."""
    adversarial = (derivative_real.float() - 1).square().mean() + (derivative_fake.float() + 1).square().mean()
    centering = cp_scale * logits.float().square().mean()
    loss = adversarial + centering
    return loss, {
        "loss_d": loss.detach(),
        "loss_d_adv": adversarial.detach(),
        "loss_cp": centering.detach(),
        "derivative_real": derivative_real.detach().float().mean(),
        "derivative_fake": derivative_fake.detach().float().mean(),
        "logits": logits.detach().float().mean(),
    }


def cafm_generator_loss(
    derivative_fake: torch.Tensor, velocity_pred: Union[torch.Tensor, List[torch.Tensor]], ot_scale: float
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """`mean (dD[v_pred] - 1)^2 + ot_scale * mean v_pred^2`, and its parts for logging. A list of
    per-sample velocities (Z-Image's variable sizes) takes the mean of the per-sample means."""
    adversarial = (derivative_fake.float() - 1).square().mean()
    if isinstance(velocity_pred, (list, tuple)):
        ot = ot_scale * torch.stack([v.float().square().mean() for v in velocity_pred]).mean()
    else:
        ot = ot_scale * velocity_pred.float().square().mean()
    loss = adversarial + ot
    return loss, {
        "loss_g": loss.detach(),
        "loss_g_adv": adversarial.detach(),
        "loss_ot": ot.detach(),
        "derivative_fake_g": derivative_fake.detach().float().mean(),
    }


def is_discriminator_step(step: int, warmup: int, num_discriminator_steps: int) -> bool:
    """The reference's schedule: every iteration `step <= warmup` is a D step; then `step % (N + 1) < N`."""
    return step <= warmup or step % (num_discriminator_steps + 1) < num_discriminator_steps


# ----------------------------------------------------------------------------- the step
@dataclass
class CAFMObjective(FlowMatchingObjective):
    """The CAFM settings; the defaults are the reference's SiT-XL/2 recipe (docs/method.md).

    The time sampling and the class dropout are flow matching's (`FlowMatchingObjective`): the
    post-training draws its points as the pretraining did.
    """

    cp_scale: float = 0.001
    ot_scale: float = 0.0
    num_discriminator_steps: int = 16  # N
    warmup: int = 10_000  # discriminator-only iterations at the start (the trainers' --warmup_steps)

    def __post_init__(self):
        super().__post_init__()
        for name in ("cp_scale", "ot_scale"):
            check_setting(getattr(self, name) >= 0, name, getattr(self, name), "a number >= 0")
        check_setting(isinstance(self.warmup, int) and self.warmup >= 0, "warmup", self.warmup, "an integer >= 0")
        check_setting(isinstance(self.num_discriminator_steps, int) and self.num_discriminator_steps >= 1,
                      "num_discriminator_steps", self.num_discriminator_steps, "an integer >= 1")


class CAFMTrainingStep:
    """One CAFM iteration: a D step or a G step, as `is_discriminator_step` says.

    Args:
        accelerator: the `accelerate.Accelerator` that prepared the networks and optimizers.
        generator: the flow model `v(x_t, t, c)` (a `FlowMatchingTransformer2DModel` or a toy MLP).
        discriminator: `D(x, c, t, tangents=(dx, dt)) -> (D, dD)` (an `AdversarialFlowDiscriminator`
            with `use_timestep=True`, or a toy).
        optimizer_g, optimizer_d: their optimizers (prepared).
        objective: the `CAFMObjective`.
        ema: the generator's `ModelEMA`, updated with `ema_decay` (a number, or a schedule of the
            iteration) after every G update.
        max_grad_norm_g, max_grad_norm_d: clipping (the reference's 10,000: effectively off).
        null_class_id: the label that class dropout substitutes (None: no dropout).
        noise_generator: the `torch.Generator` of every draw (labels, times, noise), checkpointed by the caller.
    """

    def __init__(
        self,
        accelerator,
        generator: torch.nn.Module,
        discriminator: torch.nn.Module,
        optimizer_g: torch.optim.Optimizer,
        optimizer_d: torch.optim.Optimizer,
        objective: CAFMObjective,
        ema: Optional[ModelEMA] = None,
        ema_decay: Union[float, Callable[[int], float]] = 0.99,
        max_grad_norm_g: Optional[float] = 10_000.0,
        max_grad_norm_d: Optional[float] = 10_000.0,
        null_class_id: Optional[int] = None,
        noise_generator: Optional[torch.Generator] = None,
    ):
        self.accelerator = accelerator
        self.generator, self.discriminator = generator, discriminator
        self.optimizer_g, self.optimizer_d = optimizer_g, optimizer_d
        self.objective = objective
        self.ema = ema
        self.ema_decay = ema_decay if callable(ema_decay) else constant(ema_decay)
        self.max_grad_norm_g, self.max_grad_norm_d = max_grad_norm_g, max_grad_norm_d
        self.null_class_id = null_class_id
        self.rng = noise_generator
        self.noise_scale = noise_scale(generator)

    def is_discriminator_step(self, step: int) -> bool:
        return is_discriminator_step(step, self.objective.warmup, self.objective.num_discriminator_steps)

    def draw(self, x0: torch.Tensor, class_labels: torch.LongTensor):
        """The iteration's random inputs `(labels, noise, t)` (the steps' argument order), drawn in the
        reference's order: dropped labels, times, noise."""
        labels = drop_class_labels(class_labels, self.null_class_id, self.objective.class_dropout_prob, self.rng)
        t = sample_times(x0.shape[0], self.objective.time_sampling, x0.device, self.rng)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=self.rng) * self.noise_scale
        return labels, noise, t

    def __call__(self, x0: torch.Tensor, class_labels: torch.LongTensor, step: int) -> Dict[str, torch.Tensor]:
        """Iteration `step` (0-based) on the batch `(x0, class_labels)`; returns its logs (tensors)."""
        labels, noise, t = self.draw(x0, class_labels)
        if self.is_discriminator_step(step):
            with self.accelerator.accumulate(self.discriminator):
                return self.discriminator_step(x0, labels, noise, t)
        with self.accelerator.accumulate(self.generator):
            logs = self.generator_step(x0, labels, noise, t)
            if self.ema is not None and self.accelerator.sync_gradients:
                self.ema.update(self.generator, self.ema_decay(step))
        return logs

    # ---------------------------------------------------------------- objectives (no optimizer)
    def discriminator_objective(self, x0, labels, noise, t) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The D loss: one primal pass of D, the real and fake tangents vmapped through it."""
        x_t = interpolate(x0, noise, t)
        velocity_real = noise - x0
        with torch.no_grad(), self.accelerator.autocast():
            # The generator's forward skips DDP's wrapper: nothing flows back to it.
            velocity_pred = output_sample(without_ddp(self.generator)(x_t, t, labels)).float()
        tangents = (torch.stack([velocity_real, velocity_pred]), torch.ones(2, x0.shape[0], device=x0.device, dtype=t.dtype))
        with self.accelerator.autocast():
            logits, derivatives = self.discriminator(x_t, labels, t, tangents=tangents)
        return cafm_discriminator_loss(logits, derivatives[0], derivatives[1], self.objective.cp_scale)

    def generator_objective(self, x0, labels, noise, t) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor]:
        """The G loss through the frozen D's directional derivative along `(v_pred, 1)`; the caller
        freezes D (`generator_step` does)."""
        x_t = interpolate(x0, noise, t)
        with self.accelerator.autocast():
            velocity_pred = output_sample(self.generator(x_t, t, labels)).float()
            critic = without_ddp(self.discriminator)  # frozen: nothing to synchronise
            _, derivative_fake = critic(x_t, labels, t, tangents=(velocity_pred, torch.ones_like(t)))
        loss, logs = cafm_generator_loss(derivative_fake, velocity_pred, self.objective.ot_scale)
        return loss, logs, velocity_pred

    # ---------------------------------------------------------------- steps
    def discriminator_step(self, x0, labels, noise, t) -> Dict[str, torch.Tensor]:
        loss, logs = self.discriminator_objective(x0, labels, noise, t)
        self.accelerator.backward(loss)
        optimizer_update(self.accelerator, self.discriminator, self.optimizer_d, self.max_grad_norm_d, logs, "grad_norm_d")
        return logs

    def generator_step(self, x0, labels, noise, t) -> Dict[str, torch.Tensor]:
        critic = without_ddp(self.discriminator)
        # Only what D trains is unfrozen afterwards: under LoRA its trunk is the generator's frozen
        # base (training/lora.py), which must stay frozen for both networks.
        trained = [p for p in critic.parameters() if p.requires_grad]
        critic.requires_grad_(False)
        try:
            loss, logs, _ = self.generator_objective(x0, labels, noise, t)
            self.accelerator.backward(loss)
        finally:
            for p in trained:
                p.requires_grad_(True)
        optimizer_update(self.accelerator, self.generator, self.optimizer_g, self.max_grad_norm_g, logs, "grad_norm_g")
        return logs

