"""Gradient normalization `GN` of the generator step (docs/method.md, "Losses", G step).

`GN` is the identity in the forward pass. In the backward pass it divides the adversarial gradient
arriving at the generator's output by `sqrt(m) + eps`, where `m` is an exponential moving average
of `S = sum(g^2) * numel(g)`. The adversarial gradient's scale then no longer follows the
discriminator's logit scale, so `ot_scale` alone sets the balance between the adversarial and the
optimal-transport terms. Place it on the fake only, in front of the discriminator: the OT term's
gradient must not pass through it.
"""

import torch
import torch.distributed as dist
import torch.nn as nn


def _mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The average of `value` over data-parallel ranks (itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    # SUM then divide rather than ReduceOp.AVG, which only some backends (NCCL) support.
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


class _GradientNormalizationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_states: torch.Tensor, square_avg: torch.Tensor, ema_decay: float, eps: float):
        # The buffer is kept on ctx, not saved for backward, because backward updates it in place.
        ctx.square_avg = square_avg
        ctx.ema_decay = ema_decay
        ctx.eps = eps
        return hidden_states.view_as(hidden_states)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        # The statistic is float32 even for bf16 gradients: sum(g^2) * numel overflows or rounds
        # away in half precision.
        grad = grad_output.float()
        square_sum = grad.square().sum() * grad.numel()
        square_sum = _mean_over_ranks(square_sum)
        # No bias correction, as in the reference: `m` starts at 0, so the first updates are larger.
        ctx.square_avg.lerp_(square_sum, 1.0 - ctx.ema_decay)
        scale = 1.0 / (ctx.square_avg.sqrt() + ctx.eps)
        return grad_output * scale.to(grad_output.dtype), None, None, None


class GradientNormalization(nn.Module):
    """Identity forward; backward rescales the gradient by `1 / (sqrt(m) + eps)`.

    Args:
        ema_decay (`float`, defaults to 0.9): decay of the moving average `m` of `sum(g^2) * numel(g)`.
        eps (`float`, defaults to 1e-8): added to `sqrt(m)` before dividing.

    `m` is the persistent buffer `square_avg` (a 0-d float32 tensor starting at 0), so it is saved
    and restored with the state dict; under data parallelism every rank computes the same `m`
    because `S` is averaged over ranks before the update.
    """

    def __init__(self, ema_decay: float = 0.9, eps: float = 1e-8):
        super().__init__()
        self.ema_decay = ema_decay
        self.eps = eps
        self.register_buffer("square_avg", torch.tensor(0.0, dtype=torch.float32))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return _GradientNormalizationFunction.apply(hidden_states, self.square_avg, self.ema_decay, self.eps)
