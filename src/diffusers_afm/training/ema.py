"""Exponential moving average of the generator's weights (docs/method.md: decay 0.9999, after each G step).

The EMA weights are the ones that are evaluated and released; "autoreload" in the guided phase
copies them back into the trained generator (`copy_to`). Trainers use only the small interface
below (`update`, `state_dict` / `load_state_dict`, `full_model`, `copy_to`), never the average's
inside, so the same trainer code runs whichever way the average is held:

- **a full copy** of the model (one process, DDP): `full_model()` is that copy;
- **sharded** (the model's parameters are FSDP2 `DTensor`s): each process keeps the average of its
  own shards only, the same shape as its parameter shards, so no process ever holds a full copy
  while training. `state_dict()` is then a dict of `DTensor`s, which the checkpoint saves with
  torch's distributed checkpoint (each process its shards; resharded on load), and `full_model()`
  gathers the full average, one tensor at a time, onto the main process's CPU: a collective that
  every process calls.
"""

import copy
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn

from .distributed import is_sharded, local_tensor, unwrap


class ModelEMA:
    """`ema = lerp(ema, model, 1 - decay)` over a model's floating parameters and buffers.

    Built from the prepared model (after `accelerator.prepare`): a full frozen copy when the model is
    whole, the shards' averages when FSDP sharded it.
    """

    def __init__(self, model: nn.Module):
        model = unwrap(model)
        self.sharded = is_sharded(model)
        if not self.sharded:
            self._model = copy.deepcopy(model).eval().requires_grad_(False)
            return
        # A model on the meta device (no memory) to gather the average into, and each parameter's
        # and buffer's average: a DTensor clone of a shard holds this process's shard only.
        self._template = meta_copy(model)
        with torch.no_grad():
            self._state = {name: tensor.detach().clone() for name, tensor in named_tensors(model).items()}

    def _tensors(self) -> Dict[str, torch.Tensor]:
        return self._state if self.sharded else named_tensors(self._model)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        """`ema <- decay * ema + (1 - decay) * model` for floating parameters and buffers.

        Buffers follow the same rule: fixed ones (e.g. `pos_embed`) stay unchanged, since
        `lerp(a, a, w) = a`; non-floating buffers (counters) are copied. Sharded, every process
        updates its own shards (no communication).
        """
        live = named_tensors(unwrap(model))
        averaged, targets = [], []
        for name, tensor in self._tensors().items():
            average, source = local_tensor(tensor), local_tensor(live[name].detach()).to(device=tensor.device)
            if tensor.is_floating_point():
                averaged.append(average)
                targets.append(source.to(dtype=average.dtype))
            else:
                average.copy_(source)
        if averaged:  # the fused lerp refuses empty lists
            torch._foreach_lerp_(averaged, targets, 1.0 - decay)

    def full_model(self, device: Optional[Union[str, torch.device]] = None,
                   on_every_process: bool = False) -> Optional[nn.Module]:
        """The averaged model as one module (eval mode, no gradients), for validation and export.

        Whole: the EMA's own copy (sample or save it, don't train it), moved to `device` if given.
        Sharded: a collective that EVERY process must call; the main process gets a new module
        gathered onto its CPU (then moved to `device`), the others None, or every process its own
        copy with `on_every_process` (an evaluation that shards its samples over the processes).
        """
        if not self.sharded:
            return self._model if device is None else self._model.to(device)
        import torch.distributed as dist

        main = on_every_process or not dist.is_initialized() or dist.get_rank() == 0
        gathered = {}
        for name, tensor in self._state.items():
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # all-gather, one tensor at a time
            if main:
                gathered[name] = full.detach().to("cpu", copy=True)
            del full
        if not main:
            return None
        model = copy.deepcopy(self._template)
        assign_tensors(model, gathered)
        model = model.eval().requires_grad_(False)
        return model if device is None else model.to(device)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the EMA weights (and buffers) into `model`, e.g. to reset the generator (autoreload).
        Sharded, each process copies its own shards."""
        live = named_tensors(unwrap(model))
        for name, tensor in self._tensors().items():
            local_tensor(live[name]).copy_(local_tensor(tensor))

    def state_dict(self) -> Dict[str, Any]:
        """Whole: the copy's state dict. Sharded: every parameter's and buffer's average by name, as
        `DTensor`s for the sharded ones (torch.distributed.checkpoint saves and reshards them)."""
        return dict(self._state) if self.sharded else self._model.state_dict()

    @torch.no_grad()
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if not self.sharded:
            self._model.load_state_dict(state_dict)
            return
        missing = sorted(set(self._state) - set(state_dict))
        if missing:
            raise KeyError(f"the EMA state lacks {missing[:3]}")
        for name, tensor in self._state.items():
            local_tensor(tensor).copy_(local_tensor(state_dict[name]))


def named_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    """A model's parameters and buffers (persistent or not) by name."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    return tensors


def meta_copy(model: nn.Module) -> nn.Module:
    """An empty model of the same class and config on the meta device: a sharded module cannot be
    deep-copied. A diffusers model is rebuilt from its config, each `__init__` argument by name
    (`from_config` loses arguments a subclass passes on to its parent, such as the Z-Image
    discriminator's `n_refiner_layers`), as its class before FSDP2 renamed it."""
    import inspect

    cls = type(model)
    if cls.__name__.startswith("FSDP"):  # fully_shard swaps in a subclass `FSDP<name>(FSDPModule, cls)`
        cls = next(c for c in cls.__mro__[1:] if c.__name__ == cls.__name__[len("FSDP"):])
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"A sharded {cls.__name__} cannot be rebuilt whole: it needs a diffusers config.")
    arguments = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
    with torch.device("meta"):
        return cls(**{name: config[name] for name in arguments if name in config})


def assign_tensors(model: nn.Module, tensors: Dict[str, torch.Tensor]) -> None:
    """Put `tensors` into `model` by name (parameters, persistent and non-persistent buffers), replacing
    what is there (meta tensors, say) without copying."""
    for name, tensor in tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[leaf] = tensor

