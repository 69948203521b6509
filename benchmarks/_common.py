"""What the speed benchmarks share: timing, FLOP counting, the matmul ceiling, the models, tables, JSON.

Every benchmark in this folder measures its candidates side by side in one process (alternating
them, taking medians), so that a loaded machine slows them alike and their ratio stays meaningful.
"""

import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from diffusers.utils import logging as diffusers_logging
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

# diffusers warns on every `model.to(dtype)`; the benchmarks cast on purpose.
diffusers_logging.set_verbosity_error()

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Small trunks for CPU runs; the paper's sizes come from `AFM_PRESETS` ("S/2" ... "XL/2").
SMALL_SIZES = {
    "tiny": dict(num_layers=2, num_attention_heads=2, attention_head_dim=32),
    "S/2-4": dict(num_layers=4, num_attention_heads=6, attention_head_dim=64),
}


def trunk(size: str) -> Dict:
    """The trunk keys of a named size: one of `SMALL_SIZES` or a paper preset ("B/2", "XL/2", ...)."""
    from diffusers_afm.models.transformer_afm import AFM_PRESETS

    if size in SMALL_SIZES:
        return dict(patch_size=2, **SMALL_SIZES[size])
    if size in AFM_PRESETS:
        return dict(patch_size=2, **AFM_PRESETS[size])
    raise ValueError(f"Unknown size {size!r}; allowed: {', '.join(list(SMALL_SIZES) + list(AFM_PRESETS))}.")


@torch.no_grad()
def randomize_(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere: adaLN-Zero's zero layers must not make a model look cheaper (GPUs
    multiply zeros faster than random numbers)."""
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    for p in model.parameters():
        p.copy_(std * torch.randn(p.shape, device=p.device, generator=generator))
    return model


# --------------------------------------------------------------------------- the SD-VAE, written inline
# The architecture of `stabilityai/sd-vae-ft-mse` (its config.json), so the GPU machine, which
# cannot download, times the real decoder with random weights.
SD_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=256,
    scaling_factor=0.18215,
)


# --------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(fns: Dict[str, Callable[[], object]], device: torch.device, repeats: int,
                     warmup: int = 1) -> Dict[str, List[float]]:
    """Seconds per call of each function, called in turn (a, b, a, b, ...) `repeats` times after
    `warmup` untimed rounds; the device is synchronised around every call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how noisy a timing was."""
    return (max(values) - min(values)) / statistics.median(values)


# --------------------------------------------------------------------------- FLOPs and the ceiling
def _cpu_flash_forward(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's counter knows the CUDA attention kernels but not the CPU flash kernel that SDPA uses on
# CPUs; without these two entries the attention scores would be missing from CPU counts.
_EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
}


def flop_counter() -> FlopCounterMode:
    """A `FlopCounterMode` (matmuls, convolutions, attention; forward and backward) that also counts
    SDPA's CPU kernel. Use `with flop_counter() as counter: ...; counter.get_total_flops()`."""
    return FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)


def count_flops(fn: Callable[[], object]) -> int:
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()


def matmul_rate(device: torch.device, dtype: torch.dtype, size: Optional[int] = None, repeats: int = 5) -> float:
    """The measured FLOP/s of a large square matrix product of random numbers in `dtype` on
    `device`: the ceiling that model FLOPs utilisation is taken against. The fastest of `repeats`
    products (after one untimed), since a ceiling is the best rate the device reaches."""
    if size is None:
        size = 8192 if device.type == "cuda" else 2048
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=generator).to(dtype)
    b = torch.randn(size, size, device=device, generator=generator).to(dtype)
    seconds = time_alternating({"mm": lambda: torch.mm(a, b)}, device, repeats, warmup=1)["mm"]
    return 2 * size**3 / min(seconds)


# --------------------------------------------------------------------------- memory
def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def resident_mib() -> float:
    """This process's resident memory now (Linux), in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_memory_mib(device: torch.device, baseline_mib: float = 0.0) -> float:
    """Peak memory: tensors allocated on a GPU since the last reset; on a CPU, the process's peak
    resident memory above `baseline_mib` (so run one measurement per process)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline_mib


# --------------------------------------------------------------------------- reporting
def environment(device: torch.device) -> Dict:
    """What a figure was measured on: date, device, threads, versions."""
    import diffusers

    info = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "device": device.type,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        info["device_name"] = cpu_model()
        info["load_average"] = os.getloadavg()
    return info


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def format_table(rows: List[Dict], columns: Sequence[str]) -> str:
    """A plain-text table (markdown pipes) of `rows`, with the given columns in order."""
    cells = [[_format(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join(lines)


def _format(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def write_json(path: Optional[str], payload: Dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
