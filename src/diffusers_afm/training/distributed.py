"""How the training code reaches a network that Accelerate wrapped for DDP or sharded with FSDP2.

Under DDP a prepared network is a wrapper (`.module`) around a whole model; under FSDP2
(`torch.distributed.fsdp.fully_shard`) it is the model itself, its parameters `DTensor`s of which
each process holds a shard. The steps, the EMA, the checkpoints and autoreload use the helpers here
so that one code path serves both (docs/training.md, "Scaling out").
"""

import logging
import os
from typing import Dict

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP / accelerate wrapper (itself otherwise, an FSDP2 module included)."""
    return getattr(model, "module", model)


def without_ddp(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper, for calls whose parameters take no gradient (nothing to
    synchronise); any other model as it is. An FSDP module must be called as it is: its forward
    gathers the sharded parameters (FSDP2's `fully_shard` module has no wrapper at all)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    """Whether any of `model`'s parameters is a `DTensor` (FSDP2 sharded it)."""
    return any(is_dtensor(p) for p in model.parameters())


def is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(tensor, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A `DTensor`'s local shard (the same storage, so in-place updates reach the DTensor); any
    other tensor as it is."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A `DTensor` gathered whole (a collective: every process calls it); any other tensor as it is."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


@torch.no_grad()
def snapshot(model: nn.Module) -> Dict[str, torch.Tensor]:
    """A copy of `model`'s parameters and buffers on the CPU, as this process holds them (its shards
    under FSDP2): what `restore` puts back (AFM's autoreload of the discriminator)."""
    tensors = dict(unwrap(model).named_parameters())
    tensors.update(unwrap(model).named_buffers())
    return {name: local_tensor(t).detach().to("cpu", copy=True) for name, t in tensors.items()}


@torch.no_grad()
def restore(model: nn.Module, saved: Dict[str, torch.Tensor]) -> None:
    """Copy a `snapshot` back into `model`, shard by shard."""
    tensors = dict(unwrap(model).named_parameters())
    tensors.update(unwrap(model).named_buffers())
    for name, tensor in tensors.items():
        local_tensor(tensor).copy_(saved[name])


def prepare_network(accelerator, model: nn.Module, optimizer, scheduler, full_precision_parameters: bool = False):
    """`accelerator.prepare` of one network with its optimizer and schedule: FSDP2 in Accelerate
    prepares one model per call (DDP takes it the same way).

    Under FSDP2 with mixed precision, the gradients are reduced in float32 (as under DDP, and as the
    CAFM reference's Z-Image trainer does), and the parameters are gathered in the launch's dtype
    (bf16) for a generator, or, with `full_precision_parameters`, kept in float32 with the inputs
    uncast, computing in bf16 through autocast only, exactly as under DDP. The discriminators need
    that: they read their logit out in full precision outside autocast, and the AFM discriminator
    also runs its R1/R2 rows in full precision inside one call (docs/method.md, "Precision");
    FSDP2's own bf16 casting of parameters and block inputs would not even run those parts
    ("expected m1 and m2 to have the same dtype"; docs/training.md, "Scaling out").
    """
    from accelerate.utils import DistributedType

    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if accelerator.distributed_type != DistributedType.FSDP or plugin is None or accelerator.mixed_precision == "no":
        return accelerator.prepare(model, optimizer, scheduler)
    from torch.distributed.fsdp import MixedPrecisionPolicy

    compute = getattr(plugin.mixed_precision_policy, "param_dtype", None) or torch.bfloat16
    policy = (MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
              if full_precision_parameters else MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32))
    saved, plugin.mixed_precision_policy = plugin.mixed_precision_policy, policy
    try:
        return accelerator.prepare(model, optimizer, scheduler)
    finally:
        plugin.mixed_precision_policy = saved


def fsdp_fallback_note(accelerator) -> None:
    """Say in one line when an FSDP launch does not run FSDP: Accelerate never selects FSDP on the
    CPU (`use_cpu`), and silently trains as DDP there; every process then holds the whole model."""
    from accelerate.utils import DistributedType

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and accelerator.distributed_type != DistributedType.FSDP and accelerator.is_main_process:
        logger.warning(f"FSDP was asked for (ACCELERATE_USE_FSDP), but Accelerate runs this launch as "
                       f"{accelerator.distributed_type.value} on {accelerator.device.type}: it selects FSDP on GPUs only, "
                       "so every process holds the whole model and optimizer state.")


def save_sharded(state: Dict[str, torch.Tensor], folder: str) -> None:
    """Every process writes its shards of `state` (`DTensor`s; plain tensors are replicated and written
    once) into `folder` with torch's distributed checkpoint: `__<rank>_0.distcp` files and a
    `.metadata` index. Called by every process."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=folder)


@torch.no_grad()
def load_sharded(state: Dict[str, torch.Tensor], folder: str) -> None:
    """Load a `save_sharded` folder into `state`'s tensors in place, resharded to this run's
    processes (a checkpoint written by 2 processes loads on 4). Called by every process; the folder
    must have been verified (`checkpoint.verify_checkpoint`): torch unpickles its index."""
    import torch.distributed.checkpoint as dcp

    dcp.load(state, checkpoint_id=folder)


def gather_model(model: nn.Module) -> "nn.Module | None":
    """A prepared network whole, to save it (the discriminator at the end of a run, say): the module
    itself when it is whole (one process, DDP); under FSDP2 a collective that EVERY process calls,
    the main process getting a new module with the full weights on its CPU, the others None."""
    model = unwrap(model)
    if not is_sharded(model):
        return model
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from .ema import assign_tensors, meta_copy

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    whole = meta_copy(model)
    buffers = {name: buffer.detach().to("cpu", copy=True) for name, buffer in model.named_buffers()}
    assign_tensors(whole, {**buffers, **state})
    return whole.eval()
