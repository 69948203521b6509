"""The fault suite's long trials (docs/reliability.md): processes killed at random moments.

    python benchmarks/faults.py --kill_trials 30 --sample_trials 10 --rank_trials 2 --output faults.json

- `kill`: `examples/train_afm.py` (the tiny test model, 24 steps, a checkpoint every 2, at most 2
  kept) is SIGKILLed at a random moment, a third of the trials the moment a checkpoint's temporary
  folder appears; the newest checkpoint must then verify, and `--resume_from_checkpoint latest` must
  finish the run with weights `torch.equal` to an uninterrupted run's.
- `sample`: `examples/sample_afm.py` SIGKILLed at a random moment, then rerun until it finishes;
  `samples.npz` must be byte-identical to an uninterrupted run's.
- `rank`: a 2-process CPU run (`accelerate launch`, gloo) whose rank 1 is SIGKILLed mid-run: every
  process must be gone within `--ddp_timeout` (the bound we set), and a 2-process resume must finish.

Each trial prints one line; the figures (trials / survived / anything lost) go to `--output`.
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "src"))
from diffusers_afm.training.checkpoint import CheckpointError, list_checkpoints, verify_checkpoint  # noqa: E402

TINY = os.path.join(REPO, "tests", "fixtures", "tiny_model.json")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
STEPS = 24


def train_command(out, *extra):
    return [sys.executable, os.path.join(REPO, "examples", "train_afm.py"), "--output_dir", out,
            "--model_config", TINY, "--train_batch_size", "16", "--max_train_steps", str(STEPS),
            "--checkpointing_steps", "2", "--checkpoints_total_limit", "2", "--report_to", "none",
            "--num_validation_images", "1", "--num_validation_classes", "1", "--validation_steps", "1000", *extra]


def weights(out):
    folder = os.path.join(out, f"checkpoint-{STEPS}")
    return {name: load_file(os.path.join(folder, name)) for name in ("model.safetensors", "model_1.safetensors",
                                                                      "ema.safetensors")}


def same(a, b):
    return a.keys() == b.keys() and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                        for x, y in zip(a.values(), b.values()))


def newest_step(out):
    kept = list_checkpoints(out)
    return int(os.path.basename(kept[-1]).split("-")[1]) if kept else 0


def kill_when(proc, out, delay=None, saving_step=None, after_step=0):
    """SIGKILL `proc` `delay` seconds after checkpoint `after_step` exists, or the moment the
    temporary folder of checkpoint `saving_step` appears (a kill inside that save)."""
    waited_from = None
    while proc.poll() is None:
        if saving_step is not None:
            if os.path.isdir(os.path.join(out, f".checkpoint-{saving_step}.tmp")):
                break
        else:
            if waited_from is None and (after_step == 0 or newest_step(out) >= after_step):
                waited_from = time.time()
            if waited_from is not None and time.time() - waited_from >= delay:
                break
        time.sleep(0.001)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def kill_trials(n, work, reference, rng):
    results = []
    for trial in range(n):
        out = os.path.join(work, f"kill-{trial}")
        in_save = trial % 3 == 0
        proc = subprocess.Popen(train_command(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if in_save:  # inside the save of a random checkpoint
            killed = kill_when(proc, out, saving_step=2 * rng.randint(1, STEPS // 2))
        else:  # a random moment after a random checkpoint (0: during start-up or the first steps)
            killed = kill_when(proc, out, delay=rng.uniform(0.0, 0.5), after_step=2 * rng.randint(0, STEPS // 2 - 1))
        kept = list_checkpoints(out)
        newest_ok = True
        if kept:
            try:
                verify_checkpoint(kept[-1])
            except CheckpointError:
                newest_ok = False
        resumed = subprocess.run(train_command(out, "--resume_from_checkpoint", "latest"), env=ENV,
                                 capture_output=True, text=True)
        equal = resumed.returncode == 0 and same(weights(out), reference)
        results.append(dict(trial=trial, in_save=in_save, killed=killed, checkpoints_after_kill=[os.path.basename(p) for p in kept],
                            newest_verifies=newest_ok, resumed=resumed.returncode == 0, equal=equal))
        if resumed.returncode:
            results[-1]["error"] = resumed.stderr[-2000:]
        print(json.dumps(results[-1]), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return results


def sample_command(pipeline, out):
    return [sys.executable, os.path.join(REPO, "examples", "sample_afm.py"), "--pipeline", pipeline, "--output_dir", out,
            "--num_samples", "400", "--batch_size", "16", "--format", "npz"]


def sample_trials(n, work, pipeline, rng):
    reference = os.path.join(work, "sample-ref")
    start = time.time()
    subprocess.run(sample_command(pipeline, reference), env=ENV, check=True, capture_output=True)
    duration = time.time() - start
    expected = open(os.path.join(reference, "samples.npz"), "rb").read()
    results = []
    for trial in range(n):
        out = os.path.join(work, f"sample-{trial}")
        kills = 0
        for _ in range(3):  # killed up to three times, then left to finish
            proc = subprocess.Popen(sample_command(pipeline, out), env=ENV, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            kills += kill_when(proc, out, delay=rng.uniform(0.3, 1.0) * duration)
        final = subprocess.run(sample_command(pipeline, out), env=ENV, capture_output=True, text=True)
        path = os.path.join(out, "samples.npz")
        identical = final.returncode == 0 and os.path.exists(path) and open(path, "rb").read() == expected
        results.append(dict(trial=trial, kills=kills, identical=identical))
        print(json.dumps(results[-1]), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return results


def launch_command(out, timeout, port, *extra):
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--main_process_port", str(port),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            *train_command(out, "--ddp_timeout", str(timeout), *extra)[1:]]


def rank_trials(n, work, timeout):
    import psutil

    env = dict(ENV, ACCELERATE_USE_CPU="1")
    results = []
    for trial in range(n):
        out = os.path.join(work, f"rank-{trial}")
        port = 29600 + trial  # not the default 29500 that another run on the machine may hold
        log = open(os.path.join(work, f"rank-{trial}.log"), "w")
        launcher = subprocess.Popen(launch_command(out, timeout, port), env=env, stdout=log, stderr=log)
        victim = None
        while launcher.poll() is None and victim is None:  # rank 1, once it has written a checkpoint
            if list_checkpoints(out):
                for child in psutil.Process(launcher.pid).children(recursive=True):
                    if child.environ().get("RANK") == "1":
                        victim = child
            time.sleep(0.01)
        killed_at = time.time()  # rank 1 dies right after the first checkpoint
        if victim is not None:
            victim.kill()
        try:
            launcher.wait(timeout=timeout + 60)
            exited_after = time.time() - killed_at
        except subprocess.TimeoutExpired:
            launcher.kill()
            exited_after = None
        leftovers = [p for p in psutil.process_iter(["cmdline"]) if out in " ".join(p.info["cmdline"] or [])]
        log.close()
        resumed = subprocess.run(launch_command(out, timeout, port, "--resume_from_checkpoint", "latest"), env=env,
                                 capture_output=True, text=True)
        results.append(dict(trial=trial, killed=victim is not None, exited_after_s=exited_after,
                            within_timeout=exited_after is not None and exited_after <= timeout,
                            processes_left=len(leftovers), resumed=resumed.returncode == 0))
        if victim is None:
            results[-1]["error"] = open(os.path.join(work, f"rank-{trial}.log")).read()[-2000:]
        if resumed.returncode:
            results[-1]["resume_error"] = resumed.stderr[-2000:]
        print(json.dumps(results[-1]), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kill_trials", type=int, default=30)
    p.add_argument("--sample_trials", type=int, default=10)
    p.add_argument("--rank_trials", type=int, default=2)
    p.add_argument("--ddp_timeout", type=int, default=60, help="The collective timeout the rank trials set.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="Write the figures as JSON here.")
    args = p.parse_args()
    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix="afm-faults-")
    figures = {}
    try:
        reference_dir = os.path.join(work, "reference")
        subprocess.run(train_command(reference_dir), env=ENV, check=True, capture_output=True)
        reference = weights(reference_dir)
        if args.kill_trials:
            r = kill_trials(args.kill_trials, work, reference, rng)
            figures["kill"] = dict(trials=len(r), in_save=sum(x["in_save"] for x in r),
                                   killed=sum(x["killed"] for x in r),
                                   survived=sum(x["resumed"] and x["equal"] and x["newest_verifies"] for x in r),
                                   lost=sum(not x["equal"] for x in r), results=r)
        if args.sample_trials:
            r = sample_trials(args.sample_trials, work, reference_dir, rng)
            figures["sample"] = dict(trials=len(r), kills=sum(x["kills"] for x in r),
                                     identical=sum(x["identical"] for x in r), results=r)
        if args.rank_trials:
            r = rank_trials(args.rank_trials, work, args.ddp_timeout)
            figures["rank"] = dict(trials=len(r), ddp_timeout_s=args.ddp_timeout,
                                   exited_within_timeout=sum(x["within_timeout"] for x in r),
                                   resumed=sum(x["resumed"] for x in r), results=r)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {k: {kk: vv for kk, vv in v.items() if kk != "results"} for k, v in figures.items()}
    print(json.dumps(summary, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
