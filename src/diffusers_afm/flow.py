"""The flow that every part of AFM shares (docs/method.md, "Notation", "Generator" and "Continuous AFM").

Rectified-flow convention: t = 1 is pure noise, t = 0 is data. These functions are the only place
where the interpolation, the sampling time grid, the x-/v-prediction update of an AFM generator and
the ODE solvers (Euler, Heun) and classifier-free guidance of a flow-matching velocity model are
written; the pipeline, the trainers' validation, the training losses and the toy experiments all
call them.
"""

from typing import Callable, Iterable, Optional, Sequence, Union

import torch

PREDICTION_TYPES = ("sample", "velocity")
# "heun" runs its corrector at every step (the CAFM reference's sampler); "heun_final_euler" ends
# with an Euler step (JiT's, EDM's and k-diffusion's Heun), so the model is never called at t = 0,
# where an x-prediction model's velocity `(x_t - x_pred) / t` has no meaning.
SOLVERS = ("euler", "heun", "heun_final_euler")


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


# ----------------------------------------------------------------------------- flow-matching models
def check_solver(solver: str, num_steps: int) -> None:
    """A clear error for an unknown solver or a step count below 1, before any work."""
    if solver not in SOLVERS:
        raise ValueError(f"`solver` must be one of {SOLVERS}, got {solver!r}.")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_steps!r}.")


def solver_nfe(solver: str, num_steps: int) -> int:
    """Velocity evaluations of `solve_ode`: N for Euler, 2N for Heun (its corrector runs at every
    step, the last included, as in the CAFM reference's sampler), 2N - 1 for "heun_final_euler"."""
    check_solver(solver, num_steps)
    return {"euler": num_steps, "heun": 2 * num_steps, "heun_final_euler": 2 * num_steps - 1}[solver]


def check_guidance_interval(guidance_interval) -> None:
    """A clear error unless `guidance_interval` is None or a pair `(t_low, t_high)`, 0 <= t_low < t_high <= 1."""
    if guidance_interval is None:
        return
    ok = isinstance(guidance_interval, Sequence) and len(guidance_interval) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in guidance_interval)
    if not ok or not 0 <= guidance_interval[0] < guidance_interval[1] <= 1:
        raise ValueError(f"`guidance_interval` must be a pair (t_low, t_high) with 0 <= t_low < t_high <= 1 "
                         f"(flow times, 1 = noise), or None for every step; got {guidance_interval!r}.")


def in_guidance_interval(t: torch.Tensor, guidance_interval) -> torch.Tensor:
    """Where classifier-free guidance applies: `t_low < t < t_high`, with t = 1 (the start) included
    when `t_high` is 1. This is JiT's `--interval_min m --interval_max M` (its time runs the other
    way) as `(1 - M, 1 - m)`: JiT guides where `m < t_JiT < M`, and everywhere below M when m = 0."""
    low, high = guidance_interval
    return (t > low) & ((t < high) | (high >= 1))


def guided_velocity(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    class_labels: torch.Tensor,
    null_class_id: Optional[int],
    guidance_scale: float,
    guidance_interval: Optional[Sequence[float]] = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`v(x, t)` with the labels bound, under classifier-free guidance:
    `v_null + w (v_c - v_null)`, the conditional and null-class velocities in ONE batched call.

    `velocity_fn(x, t, labels)` is the model; `guidance_scale` w = 1 is the plain conditional
    velocity (one call, no null-class pass). All channels are guided (SiT's sampler guides only the
    first three, "for exact reproducibility" of its paper; the standard rule guides all).
    `guidance_interval=(t_low, t_high)` guides only the times `in_guidance_interval` (JiT's CFG
    interval); outside it the velocity is the conditional one, from one call without the null
    class (JiT evaluates both there and weights them 1 and 0).
    """
    check_guidance_interval(guidance_interval)
    if guidance_scale == 1.0:
        return lambda x, t: velocity_fn(x, t, class_labels)
    if null_class_id is None:
        raise ValueError(
            f"`guidance_scale`={guidance_scale} needs a model with a null class (trained with class dropout, "
            "`class_dropout_prob` > 0); this one has none, so only guidance_scale=1 (no guidance) is allowed."
        )
    null = torch.full_like(class_labels, null_class_id)
    labels = torch.cat([class_labels, null])

    def velocity(x, t):
        guided = None if guidance_interval is None else in_guidance_interval(t, guidance_interval)
        if guided is not None and not guided.any():
            return velocity_fn(x, t, class_labels)
        v_cond, v_null = velocity_fn(torch.cat([x, x]), torch.cat([t, t]), labels).chunk(2)
        v_guided = v_null + guidance_scale * (v_cond - v_null)
        if guided is None or guided.all():
            return v_guided
        return torch.where(guided.view(-1, *([1] * (x.ndim - 1))), v_guided, v_cond)

    return velocity


def solve_ode(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    num_steps: int,
    solver: str = "euler",
    progress: Optional[Callable[[Iterable], Iterable]] = None,
    on_step_end: Optional[Callable[[int, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]] = None,
) -> torch.Tensor:
    """Integrate `dx/dt = v(x, t)` from `x_1 = z` to `x_0` over the evenly spaced grid of
    `sampling_timesteps(num_steps)`.

    Euler: `x_{t'} = x_t - (t - t') v(x_t, t)`. Heun: the Euler point `x'`, then
    `x_{t'} = x_t - (t - t') (v(x_t, t) + v(x', t')) / 2`; "heun_final_euler" takes the last step
    (to t' = 0) with Euler. `velocity_fn(x, t)` takes one time per sample; `progress` and
    `on_step_end(i, t, x_{t'})` are as in `sample`.
    """
    check_solver(solver, num_steps)
    grid = sampling_timesteps(num_steps, device=noise.device)
    steps = range(num_steps) if progress is None else progress(range(num_steps))
    x = noise
    for i in steps:
        t = grid[i].expand(noise.shape[0])
        t_next = grid[i + 1].expand(noise.shape[0])
        dt = grid[i] - grid[i + 1]
        v = velocity_fn(x, t)
        x_next = x - dt * v  # Euler; Heun's corrector averages v with the velocity at this point
        if solver == "heun" or (solver == "heun_final_euler" and i < num_steps - 1):
            x_next = x - dt * 0.5 * (v + velocity_fn(x_next, t_next))
        x = x_next
        if on_step_end is not None:
            replaced = on_step_end(i, grid[i], x)
            x = x if replaced is None else replaced
    return x
