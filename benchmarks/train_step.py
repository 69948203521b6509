#!/usr/bin/env python
"""Speed and memory of one full AFM training iteration (`AFMTrainingStep`: a D step and a G step).

    OMP_NUM_THREADS=1 python benchmarks/train_step.py --device cpu                    # small sizes, minutes
    python benchmarks/train_step.py --device cuda --sizes B/2 XL/2 --batch_size 32 --dtypes bf16

One iteration is what the trainer runs per batch: the D step (generator forward without gradient,
ONE discriminator call on the real, fake and both perturbed sub-batches, backward, AdamW) and the
G step (generator forward, one call of the frozen discriminator on `GN(fake)` and real, backward,
AdamW), then the EMA update. For every size it runs each combination of `--dtypes` (fp32; bf16 =
autocast with fp32 master weights), `--compile` (none; `blocks` = `compile_repeated_blocks`, each
transformer block compiled once and reused; `full` = the whole forward of both networks) and
`--checkpointing` (off / on), each in its own process so that peak memory and compile caches do not
leak between them, and reports:

- images/s: the batch over the median iteration time (the first `--warmup` iterations, where
  compilation happens, are timed apart as "warmup s");
- peak memory: tensors on a GPU (`max_memory_allocated`), or on a CPU the process's peak resident
  memory above what it held before building the models; weights, gradients and AdamW states included;
- model FLOPs utilisation: the FLOPs of one iteration, counted by `torch.utils.flop_counter` on the
  eager iteration without checkpointing (so recomputation is not counted as useful work), over the
  iteration time, against the rate of a large matrix product in the same dtype measured in the same
  process;
- on CUDA, the host-device synchronisations in one iteration (`torch.cuda.set_sync_debug_mode`).

Prints the table last; `--json` writes every figure.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    DTYPES,
    environment,
    flop_counter,
    format_table,
    matmul_rate,
    median,
    peak_memory_mib,
    reset_peak_memory,
    resident_mib,
    spread,
    synchronize,
    time_alternating,
    trunk,
    write_json,
)

RESULT_PREFIX = "RESULT "
COLUMNS = ["size", "params G (M)", "batch", "dtype", "compile", "ckpt", "step ms", "spread", "img/s", "peak MiB",
           "GFLOP/step", "TFLOP/s", "matmul TFLOP/s", "MFU", "warmup s", "host syncs"]


# --------------------------------------------------------------------------- one configuration (a child process)
def compile_models(models, mode: str) -> None:
    """`blocks`: each transformer block class compiled once (`compile_repeated_blocks`); `full`: the
    whole forward. Both in place, so parameter names, `state_dict` and the EMA copy are unchanged.
    `fullgraph=True` makes any graph break an error; `dynamic=False` gives each batch size of the
    step (B for G, 2B + 2n and 2B for D) its own static graph instead of a dynamic-shape one."""
    for model in models:
        if mode == "blocks":
            model.compile_repeated_blocks(fullgraph=True, dynamic=False)
        elif mode == "full":
            model.compile(fullgraph=True, dynamic=False)
        elif mode != "none":
            raise ValueError(f"`--compile` must be none, blocks or full, got {mode!r}.")


def count_host_syncs(fn) -> int:
    """How many synchronising CUDA calls `fn` makes (each raises a warning in sync-debug mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def run_config(cfg: dict) -> dict:
    from accelerate import Accelerator

    from diffusers_afm import AdversarialFlowDiscriminator, AdversarialFlowTransformer2DModel
    from diffusers_afm.training import AFMObjective, AFMTrainingStep, GradientNormalization, ModelEMA

    device = torch.device(cfg["device"])
    baseline = resident_mib()
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if cfg["dtype"] == "bf16" else "no")
    model_config = dict(sample_size=cfg["sample_size"], in_channels=4, num_classes=cfg["num_classes"], **trunk(cfg["size"]))
    with torch.device(device):  # built in place: an XL/2 pair initialised on a CPU takes long
        generator = AdversarialFlowTransformer2DModel(**model_config)
        discriminator = AdversarialFlowDiscriminator(**model_config)
    if cfg["checkpointing"]:
        generator.enable_gradient_checkpointing()
        discriminator.enable_gradient_checkpointing()
    adamw = dict(lr=1e-4, betas=(0.0, 0.9), weight_decay=0.01)
    if device.type == "cuda":
        adamw["fused"] = True
    optimizer_g = torch.optim.AdamW(generator.parameters(), **adamw)
    optimizer_d = torch.optim.AdamW(discriminator.parameters(), **adamw)
    generator, discriminator, optimizer_g, optimizer_d = accelerator.prepare(
        generator, discriminator, optimizer_g, optimizer_d
    )
    ema = ModelEMA(generator)  # before compiling: the EMA copy stays a plain module
    step = AFMTrainingStep(
        accelerator, generator, discriminator, optimizer_g, optimizer_d, AFMObjective(),
        grad_norm=GradientNormalization().to(device), ema=ema,
        noise_generator=torch.Generator(device).manual_seed(0),
    )
    batch = cfg["batch_size"]
    data = torch.Generator(device).manual_seed(1)
    x0 = torch.randn(batch, 4, cfg["sample_size"], cfg["sample_size"], device=device, generator=data)
    class_labels = torch.randint(0, cfg["num_classes"], (batch,), device=device, generator=data)

    def iteration():
        step(x0, class_labels, 0)

    result = {"params_g": sum(p.numel() for p in generator.parameters())}
    if cfg["count_flops"]:
        with flop_counter() as counter:
            iteration()
        result["flops"] = counter.get_total_flops()
    compile_models([accelerator.unwrap_model(generator), accelerator.unwrap_model(discriminator)], cfg["compile"])

    reset_peak_memory(device)
    start = time.perf_counter()
    for _ in range(cfg["warmup"]):
        iteration()
    synchronize(device)
    result["warmup_s"] = time.perf_counter() - start
    result["times"] = time_alternating({"step": iteration}, device, cfg["steps"], warmup=0)["step"]
    result["peak_mib"] = peak_memory_mib(device, baseline)
    if device.type == "cuda":
        result["host_syncs"] = count_host_syncs(iteration)
        synchronize(device)
    result["matmul_flops_per_s"] = matmul_rate(device, DTYPES[cfg["dtype"]])
    return result


# --------------------------------------------------------------------------- the sweep (the parent process)
def run_child(cfg: dict, timeout: float) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)]
    # Its own process group, so that a timeout also ends the compiler's worker processes.
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    lines = [line for line in stderr.splitlines() if line.strip()]
    reason = next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1] if lines else "")
    return {"error": reason.strip()[:160] or f"exit status {child.returncode}"}


def table_row(cfg: dict, result: dict, flops) -> dict:
    row = {"size": cfg["size"], "batch": cfg["batch_size"], "dtype": cfg["dtype"], "compile": cfg["compile"],
           "ckpt": "on" if cfg["checkpointing"] else "off"}
    if "error" in result:
        row["step ms"] = "failed: " + result["error"]
        return row
    seconds = median(result["times"])
    row.update({
        "params G (M)": result["params_g"] / 1e6,
        "step ms": seconds * 1e3,
        "spread": spread(result["times"]),
        "img/s": cfg["batch_size"] / seconds,
        "peak MiB": result["peak_mib"],
        "matmul TFLOP/s": result["matmul_flops_per_s"] / 1e12,
        "warmup s": result["warmup_s"],
        "host syncs": result.get("host_syncs"),
    })
    if flops:
        row["GFLOP/step"] = flops / 1e9
        row["TFLOP/s"] = flops / seconds / 1e12
        row["MFU"] = f"{100 * flops / seconds / result['matmul_flops_per_s']:.1f}%"
    return row


def parse_config(text: str):
    """"bf16/blocks/on" -> ("bf16", "blocks", "on")."""
    parts = tuple(text.split("/"))
    if len(parts) != 3 or parts[0] not in DTYPES or parts[1] not in ("none", "blocks", "full") or parts[2] not in ("off", "on"):
        raise ValueError(f"`--configs`: {text!r} is not DTYPE/COMPILE/CKPT (e.g. bf16/blocks/on).")
    return parts


def main(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_gpu = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if on_gpu else "cpu")
    p.add_argument("--sizes", nargs="+", default=None, help="default: tiny S/2-4 on a CPU, B/2 XL/2 on a GPU")
    p.add_argument("--batch_size", type=int, default=None, help="default: 8 on a CPU, 32 on a GPU")
    p.add_argument("--sample_size", type=int, default=None, help="latent side; default 16 on a CPU, 32 on a GPU")
    p.add_argument("--num_classes", type=int, default=1000)
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--compile", nargs="+", choices=["none", "blocks", "full"], default=["none", "blocks"])
    p.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"])
    p.add_argument("--configs", nargs="+", default=None, metavar="DTYPE/COMPILE/CKPT",
                   help="run exactly these, e.g. bf16/blocks/on fp32/none/off (instead of the product of the three flags above)")
    p.add_argument("--steps", type=int, default=5, help="timed iterations per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first (compilation happens here)")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed to one configuration")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole sweep: configurations that would start later are skipped")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker is not None:
        result = run_config(json.loads(args.worker))
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return

    device = torch.device(args.device)
    small = device.type == "cpu"
    sizes = args.sizes or (["tiny", "S/2-4"] if small else ["B/2", "XL/2"])
    batch_size = args.batch_size or (8 if small else 32)
    sample_size = args.sample_size or (16 if small else 32)
    if args.configs:
        configs = [parse_config(text) for text in args.configs]
    else:
        configs = [(d, m, c) for d in args.dtypes for m in args.compile for c in args.checkpointing]
    # The FLOPs are counted once per size, on an eager run without checkpointing (put one first).
    configs.sort(key=lambda c: c[1:] != ("none", "off"))
    rows, results = [], []
    sweep_start = time.perf_counter()
    for size in sizes:
        flops = None
        for dtype, mode, checkpointing in configs:
            timeout = args.timeout
            if args.budget is not None:
                timeout = min(timeout, args.budget - (time.perf_counter() - sweep_start))
            cfg = dict(device=args.device, size=size, batch_size=batch_size, sample_size=sample_size,
                       num_classes=args.num_classes, dtype=dtype, compile=mode, checkpointing=checkpointing == "on",
                       steps=args.steps, warmup=args.warmup,
                       count_flops=flops is None and mode == "none" and checkpointing == "off")
            started = time.perf_counter()
            result = run_child(cfg, timeout) if timeout > 10 else {"error": "skipped: over the --budget"}
            flops = flops or result.get("flops")
            row = table_row(cfg, result, flops)
            rows.append(row)
            results.append({"config": cfg, "result": result, "row": row, "wall_s": time.perf_counter() - started})
            outcome = result["error"] if "error" in result else f"{row['step ms']:.1f} ms per step"
            print(f"{size} {dtype}/{mode}/{checkpointing}: {outcome} ({time.perf_counter() - started:.0f} s)", flush=True)
    info = environment(device)
    write_json(args.json, {"benchmark": "train_step", "settings": vars(args), "environment": info, "runs": results})
    print(f"\n{info['date']}  {info['device_name']}  threads={info['threads']}  torch {info['torch']}  "
          f"{sample_size}x{sample_size}x4 latents, {args.num_classes} classes; one step = a D step + a G step + EMA")
    print(format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
