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


# ----------------------------------------------------------------------------- LoRA (training/lora.py)
def lora_parameter_counts(generator: nn.Module, discriminator: nn.Module, settings) -> Dict[str, int]:
    """Parameter counts of a CAFM-LoRA run from the two networks' shapes (meta models work): the
    base (held once: the discriminator's trunk is the generator's tensors), each adapter (r (in + out)
    per adapted linear layer) and the discriminator's own head and token (its parameters the
    generator lacks, by name and shape)."""
    targets = settings.target_modules(generator)  # the discriminator's trunk has the generator's names
    theirs = {name: p.shape for name, p in generator.named_parameters()}
    head = sum(p.numel() for name, p in discriminator.named_parameters() if theirs.get(name) != p.shape)
    return {"base": sum(p.numel() for p in generator.parameters()),
            "generator_adapter": adapter_parameter_count(generator, settings.lora_rank, targets),
            "discriminator_adapter": adapter_parameter_count(discriminator, settings.lora_rank, targets),
            "discriminator_head": head}


def adapter_parameter_count(model: nn.Module, rank: int, targets: Sequence[str]) -> int:
    """The parameters of a rank-`rank` adapter of `model`'s linear layers named by `targets`:
    r (in + out) per layer (A is r x in, B is out x r)."""
    from .lora import matches_target

    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and any(matches_target(name, t) for t in targets))


def lora_memory_plan(generator: nn.Module, discriminator: nn.Module, settings,
                     frozen: Optional[Mapping[str, Tuple[nn.Module, torch.dtype]]] = None,
                     base_dtype: torch.dtype = torch.float32) -> Dict:
    """The per-GPU bytes of a CAFM-LoRA run's state, without activations: one frozen base in
    `base_dtype` (the trainers keep the pretrained weights as they load them, float32), both adapters
    and the discriminator's head trained (float32 weights, gradients, AdamW moments), the EMA of the
    generator's adapter, frozen helpers in their dtype. One process holds all of it (no sharding).
    Returns `{"parameters": counts, "parts": [{part, parameters, GiB}], "GiB": total}`."""
    counts = lora_parameter_counts(generator, discriminator, settings)
    trained = sum(TRAINED_BYTES.values())
    parts = [
        {"part": f"base weights (frozen, {str(base_dtype).replace('torch.', '')}, shared by G and D)",
         "parameters": counts["base"], "GiB": counts["base"] * torch.finfo(base_dtype).bits / 8 / GIB},
        {"part": "generator adapter (trained: weights, gradients, AdamW)", "parameters": counts["generator_adapter"],
         "GiB": counts["generator_adapter"] * trained / GIB},
        {"part": "generator adapter EMA", "parameters": counts["generator_adapter"], "GiB": counts["generator_adapter"] * EMA_BYTES / GIB},
        {"part": "discriminator adapter (trained)", "parameters": counts["discriminator_adapter"],
         "GiB": counts["discriminator_adapter"] * trained / GIB},
        {"part": "discriminator head and token (trained in full)", "parameters": counts["discriminator_head"],
         "GiB": counts["discriminator_head"] * trained / GIB},
    ]
    for name, (model, dtype) in (frozen or {}).items():
        count = sum(p.numel() for p in model.parameters())
        parts.append({"part": f"{name} (frozen, {str(dtype).replace('torch.', '')})", "parameters": count,
                      "GiB": count * torch.finfo(dtype).bits / 8 / GIB})
    return {"parameters": counts, "parts": parts, "GiB": sum(p["GiB"] for p in parts)}


def lora_plan_summary(generator: nn.Module, discriminator: nn.Module, settings,
                      frozen: Optional[Mapping[str, Tuple[nn.Module, torch.dtype]]] = None,
                      activations: Optional[Dict] = None) -> Dict:
    """`lora_memory_plan` as a `--dry_run` prints it, with `activations` (`lora_activation_table`,
    when the trainer can estimate them) beside it."""
    plan = lora_memory_plan(generator, discriminator, settings, frozen)
    summary = {
        "GiB per GPU, state (one process, or each DDP process)": round(plan["GiB"], 2),
        "trained parameters": plan["parameters"]["generator_adapter"] + plan["parameters"]["discriminator_adapter"]
                              + plan["parameters"]["discriminator_head"],
        "parts": [{**part, "GiB": round(part["GiB"], 3)} for part in plan["parts"]],
    }
    if activations is not None:
        summary["with activations"] = activations
    else:
        summary["note"] = "training state only; activations come on top"
    return summary


# Z-Image at the sizes the one-GPU plan covers: image side in pixels and images per GPU.
ZIMAGE_PLAN_SIZES = ((512, 1), (512, 4), (1024, 1), (1024, 4))
GPU_MEMORY_GIB = {"80 GB": 80e9 / GIB, "141 GB": 141e9 / GIB}


def zimage_block_activation_bytes(config, settings, lengths: Sequence[int], heads: int = 2,
                                  compute_dtype: torch.dtype = torch.bfloat16) -> Tuple[float, float]:
    """What one Z-Image block with LoRA adapters saves for its backward pass in the discriminator's
    D step (the primal and two tangents vmapped through `torch.func.jvp`, math attention), measured
    with `saved_activation_bytes` at `heads` heads of the real head width and three `lengths`,
    under autocast in `compute_dtype` on the CPU. Returns `(per_token, per_token_pair)` bytes per
    sample for the model's full width: the fit `c + a L + b L^2` of the three measurements (b: the
    attention matrices the math kernel materialises), with `a` scaled by the width (every other
    saved tensor is a width-sized row per token) and `b` by the head count."""
    from peft import inject_adapter_in_model

    from ..models.discriminator_zimage import ZImageTangentBlock
    from .lora import DEFAULT_TARGET_MODULES

    head_dim = config["dim"] // config["n_heads"]
    dim = heads * head_dim
    torch.manual_seed(0)
    block = ZImageTangentBlock(0, dim, heads, heads, config["norm_eps"], config["qk_norm"], modulation=True)
    targets = settings.entries() or DEFAULT_TARGET_MODULES["ZImageTransformer2DModel"]
    inject_adapter_in_model(settings.peft_config(targets), block)
    adaln = min(dim, 256)
    measured = []
    for length in lengths:
        x, c = torch.randn(1, length, dim), torch.randn(1, adaln)
        freqs = torch.polar(torch.ones(1, length, head_dim // 2), torch.rand(1, length, head_dim // 2))
        mask = torch.ones(1, length, dtype=torch.bool)
        dx, dc = torch.randn(2, 1, length, dim), torch.randn(2, 1, adaln)

        def step():
            with torch.autocast("cpu", dtype=compute_dtype, enabled=compute_dtype != torch.float32):
                out, tangent = block(x, mask, freqs, c, dx, dc, True)
            (out.float().square().mean() + tangent.float().square().mean()).backward()

        measured.append(saved_activation_bytes(step, [block]))
    # m = c + a L + b L^2 through the measurements (c: what does not grow with the tokens, such as
    # the time embedding's rows; it stays at these sizes, and is left out of the extrapolation).
    c, a, b = torch.linalg.solve(torch.tensor([[1.0, n, n * n] for n in lengths], dtype=torch.float64),
                                 torch.tensor(measured, dtype=torch.float64)).tolist()
    return a * config["dim"] / dim, b * config["n_heads"] / heads


def zimage_lora_activations(config, settings, state_gib: float, compute_dtype: torch.dtype = torch.bfloat16,
                            caption_tokens: int = 512, sizes: Sequence[Tuple[int, int]] = ZIMAGE_PLAN_SIZES,
                            lengths: Sequence[int] = (256, 512, 1024)) -> Dict:
    """Per-GPU memory of Z-Image CAFM-LoRA with gradient checkpointing: the state (`state_gib`, from
    `lora_memory_plan`) plus the D step's activations, for each `(resolution, batch)` of `sizes`,
    against 80 GB and 141 GB GPUs.

    Tokens per sample: `(resolution / 16)^2` image tokens (the VAE's 8x, then 2x2 patches) and
    `caption_tokens` (the trainer's `--max_sequence_length`, 512: an upper bound; real captions are
    shorter), each padded to a multiple of 32. The D step dominates (the G step pushes one tangent,
    not two). With checkpointing it holds each block's inputs, the primal and two tangents in the
    compute dtype (every main layer over image + caption tokens, the refiners over theirs), plus one
    block's saved activations while that block is recomputed, counted twice for the gradients its
    backward computes from them (measured per token by `zimage_block_activation_bytes`, extrapolated).
    Not counted: the VAE encoding and the text encoder's forward (no gradient, freed before the
    step), the allocator's fragmentation, and the CUDA context (about 0.5 GiB)."""
    per_token, per_pair = zimage_block_activation_bytes(config, settings, lengths, compute_dtype=compute_dtype)
    width, item = config["dim"], torch.finfo(compute_dtype).bits / 8

    def padded(n):
        return -(-n // 32) * 32

    rows = []
    for resolution, batch in sizes:
        image, caption = padded((resolution // 16) ** 2), padded(caption_tokens)
        tokens = image + caption
        inputs = 3 * item * width * (config["n_layers"] * tokens + config["n_refiner_layers"] * (image + caption))
        block = per_token * tokens + per_pair * tokens ** 2
        activations = batch * (inputs + 2 * block) / GIB
        total = state_gib + activations
        rows.append({"resolution": resolution, "batch per GPU": batch, "tokens per sample": tokens,
                     "activations GiB": round(activations, 1), "total GiB": round(total, 1),
                     **{f"fits {name}": bool(total <= gib) for name, gib in GPU_MEMORY_GIB.items()}})
    return {"rows": rows, "measured per sample and block": {"bytes per token": round(per_token),
                                                             "bytes per token pair (attention)": round(per_pair, 1)},
            "assumes": f"gradient checkpointing, {str(compute_dtype).replace('torch.', '')} autocast, "
                       f"{caption_tokens} caption tokens; the D step (two tangents) is the peak"}


__all__ = ["PROCESS_COUNTS", "fits", "largest_block", "lora_memory_plan", "lora_parameter_counts", "lora_plan_summary",
           "memory_plan", "plan_summary", "saved_activation_bytes", "zimage_block_activation_bytes",
           "zimage_lora_activations"]
