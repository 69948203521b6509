"""One AFM training iteration: a discriminator step, then a generator step (docs/method.md, "Losses").

`AFMTrainingStep` is the only place where the networks, the losses and the optimizers meet; the
example trainer, the toy experiments and the tests all call it. It is written for Accelerate
(mixed precision, gradient accumulation, DDP/FSDP), and keeps the step lean:

- the D step evaluates the real, the fake and both perturbed sub-batches in ONE discriminator call
  (under mixed precision the penalty's samples run in full precision inside it);
- the G step evaluates `D(GN(fake))` and `D(real)` in one call, with the discriminator's
  parameters frozen so no gradient is computed for them;
- no value is moved to the host: the returned logs are tensors, read only when the caller logs.
"""

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

import torch

from .. import flow
from . import recipe
from ..models.modules import output_sample
from ..utils import check_setting
from .augment import augment_pair
from .distributed import without_ddp
from .ema import ModelEMA
from .grad_norm import GradientNormalization
from .losses import classifier_guidance_term, discriminator_loss, generator_loss, perturbed_batch_size
from .optimization import optimizer_update
from .pairs import flow_weight, make_flow_pair, sample_timestep_pairs
from .schedules import constant, cosine

Schedule = Callable[[int], float]


@dataclass
class AFMObjective:
    """Every setting of the AFM objective; the defaults are the paper's for 1-NFE XL/2 (docs/method.md).

    It owns every value rule of its settings (field names are the trainer's flags; a bad value is a
    `SettingError` naming the field). Schedules are functions of the training step counted as in
    the paper: D and G steps together, so one `AFMTrainingStep` call advances them by 2.
    `ot_scale` and `augment_p` take a number or a schedule (`training.schedules`); a number
    `ot_scale` with `ot_scale_end` decays along a cosine to it over `ot_decay_steps` (the paper's
    0.2 -> 0.005 over 1M steps).
    """

    nfe: Optional[int] = 1  # 1, K, or None for any-step
    prediction_type: str = "sample"
    ot_scale: Union[float, Schedule] = 0.2
    gp_scale: float = 0.25
    gp_eps: float = 0.01
    gp_batch_ratio: float = 0.25
    cp_scale: float = 0.01
    # Under mixed precision, run the R1/R2 samples and their partners in fp32/TF32 (docs/method.md,
    # "Precision"); False gives bf16's rounding-inflated penalty, for comparison only.
    gp_full_precision: bool = True
    augment_p: Union[float, Schedule] = 0.0
    cg_scale: float = 0.0
    # 1 NFE: the fake is re-noised to u ~ U(0, cg_max_time); multi-step: scored at t where t <= cg_max_time
    # (`classifier_guidance_term`).
    cg_max_time: Optional[float] = None
    ot_scale_end: Optional[float] = None
    ot_decay_steps: Optional[int] = None

    def __post_init__(self):
        for name in ("gp_scale", "cp_scale", "cg_scale"):
            check_setting(getattr(self, name) >= 0, name, getattr(self, name), "a number >= 0")
        check_setting(self.gp_eps > 0, "gp_eps", self.gp_eps, "a number > 0")
        check_setting(0.0 <= self.gp_batch_ratio <= 1.0, "gp_batch_ratio", self.gp_batch_ratio, "a number in [0, 1]")
        check_setting(self.prediction_type in flow.PREDICTION_TYPES, "prediction_type", self.prediction_type,
                      " or ".join(repr(p) for p in flow.PREDICTION_TYPES))
        if not callable(self.augment_p):
            check_setting(0 <= self.augment_p <= 1, "augment_p", self.augment_p, "a number in [0, 1]")
        if not callable(self.ot_scale):
            check_setting(self.ot_scale >= 0, "ot_scale", self.ot_scale, "a number >= 0")
        if self.ot_scale_end is not None:
            check_setting(not callable(self.ot_scale), "ot_scale", self.ot_scale, "a number when ot_scale_end is given")
            check_setting(self.ot_scale_end >= 0, "ot_scale_end", self.ot_scale_end, "a number >= 0")
            check_setting(isinstance(self.ot_decay_steps, int) and self.ot_decay_steps >= 1, "ot_decay_steps",
                          self.ot_decay_steps, "an integer >= 1")
        if self.cg_max_time is None:
            self.cg_max_time = recipe.cg_max_time(self.nfe)
        check_setting(0 < self.cg_max_time <= 1, "cg_max_time", self.cg_max_time, "a number in (0, 1]")

    def ot_scale_at(self, step: int) -> float:
        """The OT weight at D+G step `step`."""
        if callable(self.ot_scale):
            return self.ot_scale(step)
        if self.ot_scale_end is None:
            return float(self.ot_scale)
        return cosine(self.ot_scale, self.ot_scale_end, self.ot_decay_steps)(step)

    def augment_p_at(self, step: int) -> float:
        """The discriminator augmentation's probability at D+G step `step`."""
        return self.augment_p(step) if callable(self.augment_p) else float(self.augment_p)


class AFMTrainingStep:
    """Drives one D step and one G step per call.

    Args:
        accelerator: the `accelerate.Accelerator` that prepared the networks and optimizers.
        generator, discriminator: `G(x_s, c, s, t)` and `D(x, c, t)`, as prepared by the accelerator.
            Under mixed precision with `objective.gp_full_precision`, D is also given
            `full_precision_samples=k` (as `AdversarialFlowDiscriminator` takes it).
        optimizer_g, optimizer_d: their optimizers (prepared).
        objective: the loss settings.
        grad_norm: the `GradientNormalization` module, or None to train without it.
        ema: the generator's `ModelEMA`, updated after every G optimizer step with `ema_decay`
            (a number, or a schedule of the iteration, e.g. `ema_warmup(0.999)`).
        max_grad_norm_g, max_grad_norm_d: gradient clipping (docs/method.md: 50 for 1 NFE, 5 multi-step/deep).
        classifier: the frozen noisy-latent classifier for guidance (used when `cg_scale > 0`).
        noise_generator: the `torch.Generator` (on the accelerator's device) for every random draw,
            so a resumed run continues exactly; the caller checkpoints its state.
    """

    def __init__(
        self,
        accelerator,
        generator: torch.nn.Module,
        discriminator: torch.nn.Module,
        optimizer_g: torch.optim.Optimizer,
        optimizer_d: torch.optim.Optimizer,
        objective: AFMObjective,
        grad_norm: Optional[GradientNormalization] = None,
        ema: Optional[ModelEMA] = None,
        ema_decay: Union[float, Schedule] = 0.9999,
        max_grad_norm_g: Optional[float] = 50.0,
        max_grad_norm_d: Optional[float] = 50.0,
        classifier: Optional[torch.nn.Module] = None,
        noise_generator: Optional[torch.Generator] = None,
    ):
        if objective.cg_scale > 0 and classifier is None:
            raise ValueError("`cg_scale` > 0 needs a `classifier`.")
        self.accelerator = accelerator
        self.generator, self.discriminator = generator, discriminator
        self.optimizer_g, self.optimizer_d = optimizer_g, optimizer_d
        self.objective = objective
        self.grad_norm = grad_norm
        self.ema = ema
        self.ema_decay = ema_decay if callable(ema_decay) else constant(ema_decay)
        self.max_grad_norm_g, self.max_grad_norm_d = max_grad_norm_g, max_grad_norm_d
        self.classifier = classifier.eval().requires_grad_(False) if classifier is not None else None
        self.rng = noise_generator

    def __call__(self, x0: torch.Tensor, class_labels: torch.LongTensor, step: int) -> Dict[str, torch.Tensor]:
        """One iteration at iteration index `step` (0-based); returns the loss parts for logging."""
        paper_step = 2 * step
        with self.accelerator.accumulate(self.generator, self.discriminator):
            logs = self.discriminator_step(x0, class_labels, paper_step)
            logs.update(self.generator_step(x0, class_labels, paper_step + 1))
            if self.ema is not None and self.accelerator.sync_gradients:
                self.ema.update(self.generator, self.ema_decay(step))
        return logs

    # ---------------------------------------------------------------- pieces
    def _draw_pair(self, x0: torch.Tensor):
        s, t = sample_timestep_pairs(x0.shape[0], self.objective.nfe, device=x0.device, generator=self.rng)
        x_s, x_t_real = make_flow_pair(x0, s, t, generator=self.rng)
        return s, t, x_s, x_t_real

    def _generate(self, model, x_s, class_labels, s, t) -> torch.Tensor:
        with self.accelerator.autocast():
            output = output_sample(model(x_s, class_labels, s, t))
        return flow.generator_step(output.float(), x_s, s, t, self.objective.prediction_type)

    # ---------------------------------------------------------------- D step
    def discriminator_logits(self, real, fake, class_labels, t, num_perturbed: int):
        """`D(real)`, `D(fake)` (B,) and `D(real + eps n1)`, `D(fake + eps n2)` for the first
        `num_perturbed` samples (n,), in ONE discriminator call; draws the perturbations.

        The approximated R1/R2 take `D(x + eps n) - D(x)` in place of `|grad_x D|`. Under mixed
        precision (and `gp_full_precision`), the 4n samples of that difference run in full precision
        inside the call, so that bf16 rounding does not swamp it (docs/method.md, "Precision").
        """
        obj, n, batch_size = self.objective, num_perturbed, real.shape[0]
        perturbation = obj.gp_eps * torch.randn((2 * n,) + real.shape[1:], device=real.device, generator=self.rng)
        # The penalty's samples first: the discriminator runs its first `full_precision_samples` rows in fp32.
        inputs = torch.cat([real[:n], fake[:n], real[:n] + perturbation[:n], fake[:n] + perturbation[n:], real[n:], fake[n:]])
        labels = torch.cat([class_labels[:n]] * 4 + [class_labels[n:]] * 2)
        times = torch.cat([t[:n]] * 4 + [t[n:]] * 2)
        # Only asked of a discriminator that needs it; any `D(x, c, t)` (the toys') works otherwise.
        split = {"full_precision_samples": 4 * n} if obj.gp_full_precision and self.accelerator.mixed_precision != "no" else {}
        with self.accelerator.autocast():
            logits = self.discriminator(inputs, labels, times, **split).float()
        head_real, head_fake, real_perturbed, fake_perturbed, tail_real, tail_fake = logits.split(
            [n, n, n, n, batch_size - n, batch_size - n]
        )
        return torch.cat([head_real, tail_real]), torch.cat([head_fake, tail_fake]), real_perturbed, fake_perturbed

    def discriminator_step(self, x0: torch.Tensor, class_labels: torch.LongTensor, step: int) -> Dict[str, torch.Tensor]:
        obj = self.objective
        batch_size = x0.shape[0]
        with torch.no_grad():
            s, t, x_s, real = self._draw_pair(x0)
            # The generator's forward skips DDP's wrapper here: nothing flows back to it.
            fake = self._generate(without_ddp(self.generator), x_s, class_labels, s, t)
        real, fake = augment_pair(real, fake, obj.augment_p_at(step), generator=self.rng)

        n = perturbed_batch_size(batch_size, obj.gp_batch_ratio)
        logits_real, logits_fake, logits_real_perturbed, logits_fake_perturbed = self.discriminator_logits(
            real, fake, class_labels, t, n
        )
        weight = flow_weight(s, t)
        loss, logs = discriminator_loss(
            logits_real, logits_fake, logits_real_perturbed, logits_fake_perturbed, weight[:n],
            obj.gp_scale, obj.gp_eps, obj.cp_scale,
        )
        self.accelerator.backward(loss)
        optimizer_update(self.accelerator, self.discriminator, self.optimizer_d, self.max_grad_norm_d, logs, "grad_norm_d")
        return logs

    # ---------------------------------------------------------------- G step
    def generator_step(self, x0: torch.Tensor, class_labels: torch.LongTensor, step: int) -> Dict[str, torch.Tensor]:
        obj = self.objective
        batch_size = x0.shape[0]
        with torch.no_grad():
            s, t, x_s, real = self._draw_pair(x0)
        fake = self._generate(self.generator, x_s, class_labels, s, t)

        # The discriminator is only a critic here: frozen, and called without a DDP wrapper (its
        # parameters take no gradient, so there is nothing to synchronise).
        critic = without_ddp(self.discriminator).requires_grad_(False)
        try:
            fake_for_critic = self.grad_norm(fake) if self.grad_norm is not None else fake
            real, fake_for_critic = augment_pair(real, fake_for_critic, obj.augment_p_at(step), generator=self.rng)
            with self.accelerator.autocast():
                logits = critic(
                    torch.cat([fake_for_critic, real]), torch.cat([class_labels, class_labels]), torch.cat([t, t])
                ).float()
            logits_fake, logits_real = logits.split([batch_size, batch_size])
            ot_scale = obj.ot_scale_at(step)
            loss, logs = generator_loss(logits_fake, logits_real, fake, x_s, flow_weight(s, t), ot_scale)
            if obj.cg_scale > 0:
                with self.accelerator.autocast():
                    guidance = classifier_guidance_term(
                        self.classifier, fake, class_labels, t, obj.nfe, obj.cg_max_time, generator=self.rng
                    )
                loss = loss + obj.cg_scale * guidance
                logs["loss_g"] = loss.detach()
                logs["guidance"] = guidance.detach()
            self.accelerator.backward(loss)
        finally:
            critic.requires_grad_(True)
        optimizer_update(self.accelerator, self.generator, self.optimizer_g, self.max_grad_norm_g, logs, "grad_norm_g")
        logs["ot_scale"] = torch.full((), ot_scale, device=fake.device)  # a fill, not a host-to-device copy
        return logs
