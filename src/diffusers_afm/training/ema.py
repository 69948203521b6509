"""Exponential moving average of the generator's weights (docs/method.md: decay 0.9999, after each G step).

The EMA weights are the ones that are evaluated and released; "autoreload" in the guided phase
copies them back into the trained generator (`copy_to`). Trainers use only the small interface
below (`update`, `state_dict` / `load_state_dict`, `full_model`, `copy_to`), never the copy's
inside, so that another way of holding the average (sharded across processes, say) can replace
this class without changing them.
"""

import copy
from typing import Any, Dict

import torch
import torch.nn as nn

from .distributed import unwrap


class ModelEMA:
    """A frozen copy of a model whose floating weights track `ema = lerp(ema, model, 1 - decay)`.

    The copy lives wherever it was created from (the model's device) until moved with
    `full_model().to(...)`; `update` moves the live weights to it, so the EMA may also sit on
    another device.
    """

    def __init__(self, model: nn.Module):
        self._model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)

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
        for name, tensor in list(self._model.named_parameters()) + list(self._model.named_buffers()):
            source = live[name].detach().to(device=tensor.device)
            if tensor.is_floating_point():
                averaged.append(tensor)
                targets.append(source.to(dtype=tensor.dtype))
            else:
                tensor.copy_(source)
        if averaged:  # the fused lerp refuses empty lists
            torch._foreach_lerp_(averaged, targets, 1.0 - decay)

    def full_model(self) -> nn.Module:
        """The averaged model as one module (eval mode, no gradients), for validation and export.

        It is the EMA's own copy, not a snapshot: sample or save it, don't train it.
        """
        return self._model

    def copy_to(self, model: nn.Module) -> None:
        """Load the EMA weights (and buffers) into `model`, e.g. to reset the generator (autoreload)."""
        unwrap(model).load_state_dict(self._model.state_dict())

    def state_dict(self) -> Dict[str, Any]:
        return self._model.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._model.load_state_dict(state_dict)


# TEMPORARY (removed before landing): scripts written against the old interface read `ema.model`
# while the refactor is in progress.
ModelEMA.model = property(lambda self: self._model)
