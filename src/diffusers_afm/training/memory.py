"""What a run's training state takes per GPU, under DDP and under FSDP2, from the real models' shapes.

A trained network holds, per parameter, its float32 weight (4 bytes), its float32 gradient (4) and
AdamW's two float32 moments (8); the generator's EMA adds a float32 copy (4); a frozen helper (the
text encoder, the VAE) its weights in its own dtype. Under DDP every process holds all of it. Under
FSDP2 (full shard over N processes) each holds 1/N of the trained networks' weights, gradients,
moments and the EMA, plus, while a block runs, that block's parameters gathered whole; frozen helpers
stay whole on every process. Activations come on top: `saved_activation_bytes` measures what one
step keeps for its backward pass, which the docs extrapolate (docs/training.md, "Scaling out").

`memory_plan` takes models built on the meta device (no memory, no initialisation), so the plan of
a 6B model costs nothing to compute; the trainers' `--dry_run` prints it for the run they would start.
"""

from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

GIB = 2**30
TRAINED_BYTES = {"weights": 4, "gradients": 4, "adamw": 8}  # per parameter, float32 master weights
EMA_BYTES = 4
PROCESS_COUNTS = (1, 8, 16, 32)


def largest_block(model: nn.Module) -> int:
    """Parameters of `model`'s largest FSDP unit below the root: its biggest `_no_split_modules` block
    (what FSDP2 gathers whole while the block runs); 0 when it names none."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    sizes = [sum(p.numel() for p in m.parameters()) for m in model.modules() if type(m).__name__ in names]
    return max(sizes, default=0)


def memory_plan(trained: Mapping[str, nn.Module], ema: Sequence[str] = (), frozen: Optional[Mapping[str, Tuple[nn.Module, torch.dtype]]] = None,
                process_counts: Iterable[int] = PROCESS_COUNTS, gathered_dtype: torch.dtype = torch.float32) -> Dict:
    """The per-GPU bytes of a run's state, without activations.

    Args:
        trained: the networks trained with AdamW, by name (build them on the meta device).
        ema: the names among `trained` that keep a float32 EMA (the generator).
        frozen: helpers that are not trained, by name, with the dtype they are kept in.
        process_counts: the GPU counts to plan for.
        gathered_dtype: the dtype of a block gathered by FSDP2 (float32: our AFM and CAFM
            discriminators keep full-precision parameters; `training.distributed.prepare_network`).

    Returns `{"parameters": {name: count}, "parts": [{part, parameters, GiB}], "per_gpu_gib":
    {"ddp": {N: GiB}, "fsdp2": {N: GiB}}}`.
    """
    frozen = dict(frozen or {})
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in trained.items()}
    parts = []
    for name, count in counts.items():
        parts.append({"part": f"{name} (trained: weights, gradients, AdamW)", "parameters": count,
                      "GiB": count * sum(TRAINED_BYTES.values()) / GIB, "sharded": True})
    for name in ema:
        parts.append({"part": f"{name} EMA", "parameters": counts[name], "GiB": counts[name] * EMA_BYTES / GIB,
                      "sharded": True})
    for name, (model, dtype) in frozen.items():
        count = sum(p.numel() for p in model.parameters())
        parts.append({"part": f"{name} (frozen, {str(dtype).replace('torch.', '')})", "parameters": count,
                      "GiB": count * torch.finfo(dtype).bits / 8 / GIB, "sharded": False})
    sharded = sum(p["GiB"] for p in parts if p["sharded"])
    whole = sum(p["GiB"] for p in parts if not p["sharded"])
    # FSDP2 gathers one block at a time (and prefetches the next): two blocks' weights, whole.
    gathered = 2 * max((largest_block(m) for m in trained.values()), default=0) * torch.finfo(gathered_dtype).bits / 8 / GIB
    plan = {"ddp": {}, "fsdp2": {}}
    for n in process_counts:
        plan["ddp"][n] = sharded + whole
        plan["fsdp2"][n] = sharded / n + whole + (gathered if n > 1 else 0.0)
    return {"parameters": counts, "parts": [{k: v for k, v in p.items() if k != "sharded"} for p in parts],
            "per_gpu_gib": plan}


def plan_summary(trained: Mapping[str, nn.Module], ema: Sequence[str] = (),
                 frozen: Optional[Mapping[str, Tuple[nn.Module, torch.dtype]]] = None) -> Dict:
    """`memory_plan` in the few numbers a `--dry_run` prints: GiB per GPU under DDP (any GPU count)
    and under FSDP2 on 8, 16 and 32 GPUs, and what each part takes."""
    plan = memory_plan(trained, ema, frozen)
    return {
        "GiB per GPU, DDP": round(plan["per_gpu_gib"]["ddp"][1], 2),
        "GiB per GPU, FSDP2": {str(n): round(gib, 2) for n, gib in plan["per_gpu_gib"]["fsdp2"].items() if n > 1},
        "parts": [{**part, "GiB": round(part["GiB"], 2)} for part in plan["parts"]],
        "note": "training state only (float32 weights, gradients, AdamW moments, EMA; frozen helpers in their "
                "dtype); activations come on top (docs/training.md, 'Scaling out')",
    }


def saved_activation_bytes(step: Callable[[], object], models: Iterable[nn.Module] = ()) -> int:
    """The bytes of the tensors one call of `step` saves for its backward pass (autograd's saved
    tensors, each storage counted once, the `models`' own parameters left out): the activation
    memory a training step holds at its peak, measured on any device. `step` runs forward and
    backward (a trainer's D or G step)."""
    seen = {p.untyped_storage().data_ptr() for model in models for p in model.parameters()}
    total = 0

    def pack(tensor):
        nonlocal total
        try:
            storage = _plain(tensor).untyped_storage()
            pointer = storage.data_ptr()
        except RuntimeError:  # a transform's tensor without a storage of its own: its logical size
            total += tensor.numel() * tensor.element_size()
            return tensor
        if pointer not in seen and pointer != 0:
            seen.add(pointer)
            total += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return total


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor under functorch's wrappers (the JVP's dual and vmap's batched tensors), whose storage is real."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(tensor):
        tensor = functorch.get_unwrapped(tensor)
    return tensor


def fits(gib: float, memory_gib: float, activations_gib: float = 0.0) -> bool:
    """Whether `gib` of state and `activations_gib` fit a GPU of `memory_gib`."""
    return gib + activations_gib <= memory_gib


__all__ = ["PROCESS_COUNTS", "fits", "largest_block", "memory_plan", "plan_summary", "saved_activation_bytes"]
