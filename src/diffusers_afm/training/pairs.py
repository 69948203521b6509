"""Which points of the flow a training step compares (docs/method.md, "Which (s, t) pairs are trained").

A generator step goes from a source time `s` to a target time `t < s`. The generator sees
`x_s = interp(x0, z_s, s)`; the discriminator compares its output with the real point
`x_t_real = interp(x0, z_t, t)`, drawn with an independent noise `z_t`.

Random draws use `generator` when one is given; it must live on the device of the tensors drawn.
"""

from typing import Optional, Tuple

import torch

from ..flow import interpolate

# docs/method.md, "Weight w": `w = max(|s - t|, 0.001)` keeps the OT term finite when s and t meet.
MIN_FLOW_WEIGHT = 0.001


def sample_timestep_pairs(
    batch_size: int,
    nfe: Optional[int],
    device: Optional[torch.device] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw one `(s, t)` pair per sample, as two float32 tensors of shape (batch_size,).

    - `nfe=1`: `s = 1, t = 0` (the generator maps pure noise to data).
    - `nfe=K > 1`: `s` uniform over `{1, (K-1)/K, ..., 1/K}` and `t = s - 1/K`, i.e. one step of the
      K-step sampling grid.
    - `nfe=None` (any-step): `s ~ U(0, 1)` and `t = s * U(0, 1)`.
    """
    if nfe is not None and (isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1):
        raise ValueError(f"`nfe` must be a positive integer (fixed-step) or None (any-step), got {nfe!r}.")
    if nfe is None:
        s = torch.rand(batch_size, device=device, generator=generator)
        t = s * torch.rand(batch_size, device=device, generator=generator)
        return s, t
    # nfe = 1 is the K = 1 case of the grid. `t` is computed from the grid index, not as
    # `s - 1/K`, so that it lies exactly on the sampling grid (and is exactly 0 for the last step).
    step = torch.randint(1, nfe + 1, (batch_size,), device=device, generator=generator)
    s = step.float() / nfe
    t = (step - 1).float() / nfe
    return s, t


def flow_weight(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`w = max(|s - t|, 0.001)`: the length of the step, which normalises the OT and R1/R2 terms."""
    return (s - t).abs().clamp(min=MIN_FLOW_WEIGHT)


def make_flow_pair(
    x0: torch.Tensor,
    s: torch.Tensor,
    t: torch.Tensor,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return `(x_s, x_t_real)` for data `x0` and per-sample times `s`, `t` of shape (N,).

    The two noises `z_s`, `z_t` are independent (docs/method.md): the discriminator compares
    distributions, so `x_t_real` only has to be a sample of the marginal at `t`. With `s = 1`,
    `x_s` is exactly the noise `z_s`.
    """
    noise_src = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    noise_tgt = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    return interpolate(x0, noise_src, s), interpolate(x0, noise_tgt, t)
