"""`FlowHeunScheduler`: Heun's method for flow-matching velocity models, in diffusers' scheduler convention.

The rule is the reference's (`diffusers_afm.flow.solve_ode`, the CAFM authors' sampler): over the grid
`1 = s_0 > s_1 > ... > s_N = 0` (evenly spaced, `linspace(1, 0, N + 1)`, unless `sigmas` are given),
each step takes the Euler point `x' = x - (s_i - s_{i+1}) v(x, s_i)` and corrects it,
`x_{i+1} = x - (s_i - s_{i+1}) (v(x, s_i) + v(x', s_{i+1})) / 2`, the last step included (2N model
calls, the last at t = 0). With `final_euler_step=True` the last step is Euler (2N - 1 calls, none at
t = 0): JiT's sampler, as in EDM and k-diffusion, because an x-prediction model's velocity
`(x_t - x_pred) / t` has no meaning at t = 0.

diffusers' `FlowMatchHeunDiscreteScheduler` has the same layout (each interior time twice in
`timesteps`), but it always ends with an Euler step, its default grid stops at
`1 / num_train_timesteps` before 0, and it rebuilds the velocity through a denoised estimate
(`(x - (x - s v)) / s`), which rounds differently: it samples other images than the reference.
This class computes the reference's rule exactly, with diffusers' interface (`set_timesteps`,
`step`, `scale_noise`, `from_config`), so `pipe.scheduler = FlowHeunScheduler.from_config(pipe.scheduler.config)`
swaps it in for `FlowMatchEulerDiscreteScheduler`.
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput


@dataclass
class FlowHeunSchedulerOutput(BaseOutput):
    """
    Args:
        prev_sample (`torch.Tensor`): the sample at the step's target time after a completed step, or
            the Euler point `x'` after a predictor that a corrector follows; the next model input.
    """

    prev_sample: torch.Tensor


class FlowHeunScheduler(SchedulerMixin, ConfigMixin):
    """
    Heun's method for a flow-matching velocity model `v(x, t)` (t = 1 noise, t = 0 data), the reference's rule.

    `timesteps` lists one entry per model call, in diffusers' units (`sigma * num_train_timesteps`):
    `s_0, s_1, s_1, s_2, ..., s_{N-1}, s_N` (without the last `s_N` when `final_euler_step`); `sigmas`
    holds the same flow times in [0, 1], with a closing 0, so `sigmas[k]` is the time of call k. Each
    call to `step` takes the model's velocity at `sigmas[k]`.

    Args:
        num_train_timesteps (`int`, defaults to 1000): the scale of `timesteps` (diffusers' convention);
            the flow time is `timesteps / num_train_timesteps`.
        shift (`float`, defaults to 1.0): the time shift `shift * s / (1 + (shift - 1) * s)` applied to
            the grid, as in diffusers' flow-matching schedulers; 1 leaves the reference's grid as it is.
        final_euler_step (`bool`, defaults to `False`): take the last step with Euler (JiT's sampler).
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"]
    order = 2

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, final_euler_step: bool = False):
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"`num_train_timesteps` must be a positive integer, got {num_train_timesteps!r}.")
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
            raise ValueError(f"`shift` must be a number > 0 (1 = no shift), got {shift!r}.")
        self.num_inference_steps = None
        self.timesteps = None
        self.sigmas = None
        self._step_index = None
        self._begin_index = None
        self._clear_predictor()

    # ------------------------------------------------------------------ state
    @property
    def step_index(self) -> Optional[int]:
        """The model call the next `step` completes (None before the first `step` after `set_timesteps`)."""
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at call `begin_index` instead of looking the first `step`'s timestep up."""
        self._begin_index = begin_index

    @property
    def state_in_first_order(self) -> bool:
        """True when no corrector is pending: the last `step` completed a step of the grid."""
        return self._dt is None

    def _clear_predictor(self) -> None:
        self._sample = self._velocity = self._dt = None

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ------------------------------------------------------------------ the grid
    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        sigmas: Optional[List[float]] = None,
    ) -> None:
        """The N-step grid: `linspace(1, 0, N + 1)`, or `sigmas` (the N start times `s_0 > ... > s_{N-1}`
        in (0, 1]; 0 is appended), then the configured `shift`.

        Args:
            num_inference_steps (`int`, *optional*): N; may be left out when `sigmas` are given.
            device (`str` or `torch.device`, *optional*): where `timesteps` and `sigmas` live.
            sigmas (`List[float]`, *optional*): the start time of each step, decreasing.
        """
        if sigmas is None:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
                raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
            starts = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float32)[:-1]
        else:
            starts = torch.as_tensor(sigmas, dtype=torch.float32).flatten().cpu()
            if num_inference_steps is not None and num_inference_steps != len(starts):
                raise ValueError(f"`sigmas` has {len(starts)} entries but `num_inference_steps` is {num_inference_steps}; "
                                 "pass one start time per step.")
            if len(starts) == 0 or not bool(((starts > 0) & (starts <= 1)).all()) or not bool((starts[1:] < starts[:-1]).all()):
                raise ValueError(f"`sigmas` must be decreasing flow times in (0, 1] (1 = noise), got {starts.tolist()}.")
        shift = self.config.shift
        if shift != 1.0:  # left out at 1 so that the reference's grid is kept to the bit
            starts = shift * starts / (1 + (shift - 1) * starts)
        grid = torch.cat([starts, torch.zeros(1)])  # s_0 ... s_N = 0
        # Call k's time: the predictor of step i at s_i, its corrector at s_{i+1}.
        calls = torch.stack([grid[:-1], grid[1:]], dim=1).flatten()
        if self.config.final_euler_step:
            calls = calls[:-1]
        self.num_inference_steps = len(starts)
        self.sigmas = torch.cat([calls, torch.zeros(1)]).to(device)
        self.timesteps = (calls * self.config.num_train_timesteps).to(device)
        self._step_index = None
        self._begin_index = None
        self._clear_predictor()

    def index_for_timestep(self, timestep: Union[float, torch.Tensor], schedule_timesteps: Optional[torch.Tensor] = None) -> int:
        """The call index of `timestep`. An interior time appears twice (a corrector, then the next
        predictor); a sampling that starts there starts with the predictor, the second entry."""
        schedule_timesteps = self.timesteps if schedule_timesteps is None else schedule_timesteps
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(f"`timestep` {float(timestep)} is not on the schedule; pass one of `scheduler.timesteps`.")
        return indices[1 if len(indices) > 1 else 0].item()

    def _init_step_index(self, timestep: Union[float, torch.Tensor]) -> None:
        if self._begin_index is not None:
            self._step_index = self._begin_index
        else:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The model takes `x_t` as it is (diffusers' interface)."""
        return sample

    def scale_noise(self, sample: torch.Tensor, timestep: Union[float, torch.Tensor], noise: torch.Tensor) -> torch.Tensor:
        """The flow's point `(1 - t) x0 + t z` at the schedule's `timestep` (one, or one per sample):
        where image-to-image starts."""
        timesteps = torch.as_tensor(timestep, device=self.timesteps.device).flatten()
        sigma = torch.stack([self.sigmas[self.index_for_timestep(t)] for t in timesteps]).to(sample.device, sample.dtype)
        sigma = sigma.reshape(-1, *([1] * (sample.ndim - 1)))
        return (1 - sigma) * sample + sigma * noise

    # ------------------------------------------------------------------ the step
    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[float, torch.Tensor],
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> Union[FlowHeunSchedulerOutput, Tuple[torch.Tensor]]:
        """One model call's share of a Heun step.

        A predictor call (model velocity `v` at `s_i`) returns the Euler point `x - (s_i - s_{i+1}) v`;
        when a corrector follows, it keeps `x`, `v` and the step size. The corrector call (velocity
        `v'` at the Euler point, time `s_{i+1}`) returns `x - (s_i - s_{i+1}) (v + v') / 2`, written in
        that order of operations, as the reference computes it.

        Args:
            model_output (`torch.Tensor`): the model's velocity at `sample` and `timestep`.
            timestep (`float` or `torch.Tensor`): the call's entry of `timesteps`.
            sample (`torch.Tensor`): the model's input `x` of this call.
            return_dict (`bool`): return a `FlowHeunSchedulerOutput` rather than a tuple.
        """
        if self.timesteps is None:
            raise ValueError("`step` needs a schedule: call `set_timesteps` first.")
        if self._step_index is None:
            self._init_step_index(timestep)
        k = self._step_index
        if k >= len(self.timesteps):
            raise ValueError(f"`step` was called {k + 1} times for a schedule of {len(self.timesteps)} model calls; "
                             "call `set_timesteps` again to sample anew.")
        if self.state_in_first_order:
            dt = self.sigmas[k] - self.sigmas[k + 1]
            prev_sample = sample - dt * model_output
            if k + 1 < len(self.timesteps):  # a corrector follows (every step, or all but the last)
                self._sample, self._velocity, self._dt = sample, model_output, dt
        else:
            prev_sample = self._sample - self._dt * 0.5 * (self._velocity + model_output)
            self._clear_predictor()
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return FlowHeunSchedulerOutput(prev_sample=prev_sample)


__all__ = ["FlowHeunScheduler", "FlowHeunSchedulerOutput"]
