"""The flow that every part of AFM shares (docs/method.md, "Notation" and "Generator").

Rectified-flow convention: t = 1 is pure noise, t = 0 is data. These three functions are the only
place where the interpolation, the sampling time grid and the x-/v-prediction update are written;
the pipeline, the trainer's validation, the training losses and the toy experiments all call them.
"""

from typing import Callable, Iterable, Optional, Union

import torch

PREDICTION_TYPES = ("sample", "velocity")


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: Union[float, torch.Tensor]) -> torch.Tensor:
    """`interp(x0, z, t) = (1 - t) * x0 + t * z`; `t` is a float or one time per sample."""
    if isinstance(t, torch.Tensor) and t.ndim == 1:
        t = t.reshape(-1, *([1] * (x0.ndim - 1)))
    return (1 - t) * x0 + t * noise


def sampling_timesteps(num_steps: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """The evenly spaced grid `1 = s0 > s1 > ... > sN = 0` (N + 1 points) of N-step sampling."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"`num_steps` must be a positive integer, got {num_steps!r}.")
    return torch.linspace(1.0, 0.0, num_steps + 1, device=device)


def generator_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    timestep_src: Union[float, torch.Tensor],
    timestep_tgt: Union[float, torch.Tensor],
    prediction_type: str,
) -> torch.Tensor:
    """Turn the generator's output at `x_s` into the point `x_t` of the flow.

    x-prediction (`"sample"`) outputs `x_t` itself; v-prediction (`"velocity"`) outputs a velocity,
    so `x_t = x_s + (t - s) * v` (a straight step along the flow).
    """
    if prediction_type == "sample":
        return model_output
    if prediction_type == "velocity":
        delta = timestep_tgt - timestep_src
        if isinstance(delta, torch.Tensor) and delta.ndim == 1:
            delta = delta.reshape(-1, *([1] * (sample.ndim - 1)))
        return sample + delta * model_output
    raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")


def sample(
    model_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    num_steps: int,
    prediction_type: str,
    progress: Optional[Callable[[Iterable], Iterable]] = None,
    on_step_end: Optional[Callable[[int, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]] = None,
) -> torch.Tensor:
    """N-step sampling from `z` (docs/method.md, "Sampling with N steps").

    `model_fn(x_s, s, t)` is the generator with its conditioning bound, `s` and `t` one time per
    sample; `progress` may wrap the step loop (e.g. a progress bar). `on_step_end(i, s, x_t)` runs
    after step i (from the grid time `s`) and may return a replacement `x_t` to continue from (the
    pipeline's `callback_on_step_end`). N = 1 is a single forward.
    """
    grid = sampling_timesteps(num_steps, device=noise.device)
    steps = range(num_steps) if progress is None else progress(range(num_steps))
    sample_ = noise
    for i in steps:
        s = grid[i].expand(noise.shape[0])
        t = grid[i + 1].expand(noise.shape[0])
        output = model_fn(sample_, s, t)
        sample_ = generator_step(output, sample_, s, t, prediction_type)
        if on_step_end is not None:
            replaced = on_step_end(i, grid[i], sample_)
            sample_ = sample_ if replaced is None else replaced
    return sample_
