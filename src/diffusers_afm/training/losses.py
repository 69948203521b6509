"""The AFM loss terms (docs/method.md, "Losses" and "Classifier guidance").

Relativistic pairing: the i-th real sample is paired with the i-th fake sample of the batch, so all
logits are (B,) tensors in the same sample order. The terms are computed in float32 whatever the
networks' precision: the finite-difference penalties subtract nearby logits.

D step:
    L_D = mean softplus(-(D(real) - D(fake)))
        + mean_{i < n} gp_scale * w_i / eps^2 * (D(real_i + eps * n1_i) - D(real_i))^2    (R1)
        + mean_{i < n} gp_scale * w_i / eps^2 * (D(fake_i + eps * n2_i) - D(fake_i))^2    (R2)
        + mean cp_scale * (D(real) + D(fake))^2                                          (centering)
G step:
    L_G = mean softplus(-(D(GN(fake)) - D(real)))
        + ot_scale * mean_i( mean_over_elements((x_t_fake_i - x_s_i)^2) / w_i )
"""

import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..flow import interpolate


def relativistic_loss(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """`mean softplus(-(a - b))`: small when each `a_i` scores above its paired `b_i`.

    D uses `(real, fake)`, G uses `(fake, real)`.
    """
    return F.softplus(-(logits_a.float() - logits_b.float())).mean()


def perturbed_batch_size(batch_size: int, gp_batch_ratio: float) -> int:
    """`n = ceil(r * B)`: how many samples (the first n of the batch) get the R1/R2 penalties."""
    if not 0.0 <= gp_batch_ratio <= 1.0:
        raise ValueError(f"`gp_batch_ratio` must be in [0, 1], got {gp_batch_ratio!r}.")
    # Rounded first so that float error (0.1 * 30 = 3.0000000000000004) does not add a sample.
    return math.ceil(round(gp_batch_ratio * batch_size, 6))


def approximated_gradient_penalty(
    logits_perturbed: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor, gp_scale: float, gp_eps: float
) -> torch.Tensor:
    """`mean gp_scale * w / eps^2 * (D(x + eps * n) - D(x))^2` over the perturbed samples.

    For `n ~ N(0, I)`, `(D(x + eps n) - D(x)) / eps -> grad_x D . n`, whose square has mean
    `|grad_x D|^2`: a finite-difference R1 without double backward. 0 when no sample is perturbed.
    """
    num_perturbed = logits_perturbed.shape[0]
    if num_perturbed == 0:
        return logits.new_zeros((), dtype=torch.float32)
    difference = logits_perturbed.float() - logits[:num_perturbed].float()
    return (gp_scale * weight.float() / gp_eps**2 * difference.square()).mean()


def discriminator_loss(
    logits_real: torch.Tensor,
    logits_fake: torch.Tensor,
    logits_real_perturbed: torch.Tensor,
    logits_fake_perturbed: torch.Tensor,
    weight_perturbed: torch.Tensor,
    gp_scale: float,
    gp_eps: float,
    cp_scale: float,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """`L_D` (see the module docstring); returns the loss and its detached parts for logging.

    Args:
        logits_real, logits_fake: `D(real)`, `D(fake)`, shape (B,).
        logits_real_perturbed, logits_fake_perturbed: `D(real + eps n1)`, `D(fake + eps n2)` for the
            FIRST n samples of the batch, shape (n,); n may be 0.
        weight_perturbed: `w` of those n samples, shape (n,).
        gp_scale, gp_eps, cp_scale: docs/method.md defaults 0.25, 0.01, 0.01.
    """
    relativistic = relativistic_loss(logits_real, logits_fake)
    r1 = approximated_gradient_penalty(logits_real_perturbed, logits_real, weight_perturbed, gp_scale, gp_eps)
    r2 = approximated_gradient_penalty(logits_fake_perturbed, logits_fake, weight_perturbed, gp_scale, gp_eps)
    # Logit centering keeps D(real) + D(fake) near 0; the relativistic loss only sees differences.
    centering = cp_scale * (logits_real.float() + logits_fake.float()).square().mean()
    loss = relativistic + r1 + r2 + centering
    parts = {
        "loss_d": loss,
        "relativistic": relativistic,
        "r1": r1,
        "r2": r2,
        "centering": centering,
        "logits_real": logits_real.float().mean(),
        "logits_fake": logits_fake.float().mean(),
    }
    return loss, {name: value.detach() for name, value in parts.items()}


def ot_loss(x_fake: torch.Tensor, x_src: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`mean_i( mean_over_elements((x_fake_i - x_src_i)^2) / w_i )`: the optimal-transport term.

    Favours, among the maps that match the data distribution, the one that moves samples least (the
    W2-optimal map, i.e. flow matching's straight coupling). `w = max(|s - t|, 0.001)` is the step's
    length (`flow_weight`).
    """
    squared_distance = (x_fake.float() - x_src.float()).square().flatten(1).mean(dim=1)
    return (squared_distance / weight.float()).mean()


def generator_loss(
    logits_fake: torch.Tensor,
    logits_real: torch.Tensor,
    x_fake: torch.Tensor,
    x_src: torch.Tensor,
    weight: torch.Tensor,
    ot_scale: float,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """`L_G` without guidance; returns the loss and its detached parts for logging.

    `logits_fake` should be `D(GN(x_fake))` while `x_fake` itself (not passed through GN) enters the
    OT term, so that gradient normalization rescales only the adversarial gradient. The logged `ot`
    is the unscaled term.
    """
    adversarial = relativistic_loss(logits_fake, logits_real)
    ot = ot_loss(x_fake, x_src, weight)
    loss = adversarial + ot_scale * ot
    parts = {"loss_g": loss, "adversarial": adversarial, "ot": ot}
    return loss, {name: value.detach() for name, value in parts.items()}


def classifier_guidance_term(
    classifier: Callable,
    x_fake: torch.Tensor,
    class_labels: torch.Tensor,
    timestep_tgt: torch.Tensor,
    nfe: Optional[int],
    cg_max_time: float,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """The (unscaled) classifier-guidance term of the generator loss (docs/method.md, "Classifier guidance").

    `classifier(x, t)` returns class logits (or an output with `.logits`); `x_fake` is the
    generator's output `x_t_fake`, at time `timestep_tgt` (B,).

    - 1 NFE (`nfe == 1`): the fake is data-like (t = 0), so it is re-noised to `u ~ U(0, cg_max_time)`
      with fresh noise z' and scored there: `mean_i CE(C(interp(x_fake_i, z'_i, u_i), u_i), c_i)`.
    - multi-step and any-step: `x_fake` already lies at its time `t`, so it is scored as it is,
      `CE(C(x_fake_i, t_i), c_i)`, counted only where `t_i <= cg_max_time` and averaged over the WHOLE
      batch: `sum_i mask_i * CE_i / B`. This is the reference trainer's normalisation, the one that
      `cg_scale = 0.02` was tuned with (dividing by the kept count instead would double the term at 2 NFE).
      The mask keeps the shapes fixed (no data-dependent indexing, no host sync).
    """
    batch_size = x_fake.shape[0]
    if nfe == 1:
        u = cg_max_time * torch.rand(batch_size, device=x_fake.device, generator=generator)
        noise = torch.randn(x_fake.shape, device=x_fake.device, dtype=x_fake.dtype, generator=generator)
        x_u, mask = interpolate(x_fake, noise, u), None
    else:
        u, x_u = timestep_tgt, x_fake
        mask = (timestep_tgt <= cg_max_time).float()
    output = classifier(x_u, u)
    logits = output.logits if hasattr(output, "logits") else output
    per_sample = F.cross_entropy(logits.float(), class_labels, reduction="none")  # (B,)
    if mask is None:
        return per_sample.mean()
    return (per_sample * mask).sum() / batch_size
