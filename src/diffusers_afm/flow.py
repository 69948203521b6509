"""The flow that every part of AFM shares (METHOD.md, "Notation" and "Generator").

Rectified-flow convention: t = 1 is pure noise, t = 0 is data. These three functions are the only
place where the interpolation, the sampling time grid and the x-/v-prediction update are written;
the pipeline, the trainer's validation, the training losses and the toy experiments all call them.
"""

from typing import Optional, Union

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
