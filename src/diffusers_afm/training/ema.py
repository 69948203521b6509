"""Exponential moving average of the generator's weights (docs/method.md: decay 0.9999, after each G step).

The EMA weights are the ones that are evaluated and released; "autoreload" in the guided phase
copies them back into the trained generator (`copy_to`).
"""

import copy
from typing import Any, Dict

import torch
import torch.nn as nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP / accelerate wrapper (itself otherwise)."""
    return getattr(model, "module", model)


class ModelEMA:
    """Holds `self.model`, a frozen copy of a model whose floating weights track `ema = lerp(ema, model, 1 - decay)`.

    The copy lives wherever it was created from (the model's device) until moved with `self.model.to`;
    `update` moves the live weights to it, so the EMA may also sit on another device.
    """

    def __init__(self, model: nn.Module):
        self.model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        """`ema <- decay * ema + (1 - decay) * model` for floating parameters and buffers.

        Buffers follow the same rule: fixed ones (e.g. `pos_embed`) stay unchanged, since
        `lerp(a, a, w) = a`; non-floating buffers (counters) are copied.
        """
        model = unwrap(model)
        live = dict(model.named_parameters())
        live.update(model.named_buffers())
        averaged, targets = [], []
        for name, tensor in list(self.model.named_parameters()) + list(self.model.named_buffers()):
            source = live[name].detach().to(device=tensor.device)
            if tensor.is_floating_point():
                averaged.append(tensor)
                targets.append(source.to(dtype=tensor.dtype))
            else:
                tensor.copy_(source)
        if averaged:  # the fused lerp refuses empty lists
            torch._foreach_lerp_(averaged, targets, 1.0 - decay)

    def copy_to(self, model: nn.Module) -> None:
        """Load the EMA weights (and buffers) into `model`, e.g. to evaluate or to reset the generator."""
        unwrap(model).load_state_dict(self.model.state_dict())

    def state_dict(self) -> Dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.model.load_state_dict(state_dict)
