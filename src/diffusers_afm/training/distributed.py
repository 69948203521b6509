"""How a training step reaches a network that Accelerate may have wrapped for DDP or sharded with FSDP."""

import torch.nn as nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP / accelerate wrapper (itself otherwise)."""
    return getattr(model, "module", model)


def without_ddp(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper, for calls whose parameters take no gradient (nothing to
    synchronise); any other model as it is. An FSDP module must be called as it is: its forward
    gathers the sharded parameters (FSDP2's `fully_shard` module has no wrapper at all)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
