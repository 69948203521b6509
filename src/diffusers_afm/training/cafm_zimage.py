"""Continuous AFM for text-to-image: post-training diffusers' `ZImageTransformer2DModel`
(docs/method.md, "Continuous AFM: text-to-image").

The objective, the schedule (N D steps per G step after a D-only warm-up) and the optimizer and EMA
handling are `CAFMTrainingStep`'s; this step only speaks Z-Image:

- the convention is Z-Image's, reversed from ours: t = 1 is CLEAN, `x_t = (1 - t) noise + t x0`,
  the model predicts `v = x0 - noise`, and the directional derivative is along `(v, +1)`;
- times are drawn, then shifted as Z-Image's scheduler shifts them (`shift_times`, shift 3);
- inputs are lists, one `(C, 1, H, W)` latent and one `(L_i, cap_feat_dim)` text embedding per
  sample (the text embeddings come from the trainer, with caption dropout applied there);
- the OT term averages per-sample means, as the reference does for its variable-size samples.
"""

from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from .cafm import CAFMObjective, CAFMTrainingStep, cafm_discriminator_loss, cafm_generator_loss, sample_times
from .step import without_ddp

# Z-Image's scheduler config (`FlowMatchEulerDiscreteScheduler(shift=3.0)`): the reference's
# `timestep_shift: 1/3` in its t = 1 clean convention is the same map.
ZIMAGE_TIME_SHIFT = 3.0


def shift_times(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Z-Image times (1 = clean) shifted towards noise: `t / (shift - (shift - 1) t)`. With `sigma = 1 - t`
    this is diffusers' static scheduler shift `sigma' = shift sigma / (1 + (shift - 1) sigma)`."""
    return t / (shift - (shift - 1.0) * t)


def zimage_interpolate(latents: List[torch.Tensor], noises: List[torch.Tensor], t: torch.Tensor) -> List[torch.Tensor]:
    """`x_t = (1 - t) noise + t x0` per sample (Z-Image: t = 1 is the data)."""
    return [(1 - ti) * n + ti * x for x, n, ti in zip(latents, noises, t)]


class ZImageCAFMTrainingStep(CAFMTrainingStep):
    """One CAFM iteration on a `ZImageTransformer2DModel` and an `AdversarialFlowZImageDiscriminator`.

    Called as `step(latents, text_embeds, step)` with lists (one entry per sample); the arguments
    are `CAFMTrainingStep`'s, with `time_shift` (Z-Image's 3.0) in place of the class labels' null id.
    `objective.class_dropout_prob` is unused here: captions are dropped before encoding.
    """

    def __init__(self, accelerator, generator, discriminator, optimizer_g, optimizer_d, objective: CAFMObjective,
                 ema=None, ema_decay: Union[float, Callable[[int], float]] = 0.99, max_grad_norm_g: Optional[float] = None,
                 max_grad_norm_d: Optional[float] = None, time_shift: float = ZIMAGE_TIME_SHIFT,
                 noise_generator: Optional[torch.Generator] = None):
        if time_shift <= 0:
            raise ValueError(f"`time_shift` must be > 0, got {time_shift}.")
        super().__init__(accelerator, generator, discriminator, optimizer_g, optimizer_d, objective, ema=ema,
                         ema_decay=ema_decay, max_grad_norm_g=max_grad_norm_g, max_grad_norm_d=max_grad_norm_d,
                         null_class_id=None, noise_generator=noise_generator)
        self.time_shift = time_shift

    def draw(self, latents: List[torch.Tensor], text_embeds: List[torch.Tensor]):
        """`(text_embeds, noises, t)`: per-sample noise, then shifted Z-Image times (`1 - ` our
        noise-level draw, so `time_sampling` means the same in both conventions)."""
        noises = [torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=self.rng) for x in latents]
        t = 1 - sample_times(len(latents), self.objective.time_sampling, latents[0].device, self.rng)
        return text_embeds, noises, shift_times(t, self.time_shift)

    def _velocity(self, model, x_t, t, text_embeds) -> List[torch.Tensor]:
        return [v.float() for v in model(x_t, t, text_embeds).sample]

    def discriminator_objective(self, latents, text_embeds, noises, t) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        x_t = zimage_interpolate(latents, noises, t)
        velocity_real = [x - n for x, n in zip(latents, noises)]
        with torch.no_grad(), self.accelerator.autocast():
            velocity_pred = self._velocity(without_ddp(self.generator), x_t, t, text_embeds)
        dx = [torch.stack([real, fake]) for real, fake in zip(velocity_real, velocity_pred)]
        with self.accelerator.autocast():
            logits, derivatives = self.discriminator(x_t, t, text_embeds, tangents=(dx, torch.ones(2, len(t), device=t.device)))
        return cafm_discriminator_loss(logits, derivatives[0], derivatives[1], self.objective.cp_scale)

    def generator_objective(self, latents, text_embeds, noises, t):
        x_t = zimage_interpolate(latents, noises, t)
        with self.accelerator.autocast():
            velocity_pred = self._velocity(self.generator, x_t, t, text_embeds)
            critic = without_ddp(self.discriminator)  # frozen by generator_step
            _, derivative_fake = critic(x_t, t, text_embeds, tangents=(velocity_pred, torch.ones_like(t)))
        loss, logs = cafm_generator_loss(derivative_fake, velocity_pred, self.objective.ot_scale)
        return loss, logs, velocity_pred
