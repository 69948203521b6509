"""The fault suite's long trials (docs/reliability.md): processes killed at random moments, and the
faults users meet around a run (a full disk, a folder in use, a changed resume, damaged weights ...).

    python benchmarks/faults.py --kill_trials 30 --sample_trials 10 --rank_trials 2 --output faults.json
    python benchmarks/faults.py --code /tmp/old-tree ...   # the same trials against another tree (before a fix)

- `kill` / `term` / `int`: `examples/train_afm.py` (the tiny test model, 24 steps, a checkpoint every
  2, at most 2 kept) gets SIGKILL / SIGTERM / SIGINT at a random moment, a third of the trials the
  moment a checkpoint's temporary folder appears, a third during the final export; the newest
  checkpoint must then verify, `--resume_from_checkpoint latest` must finish the run with weights
  `torch.equal` to an uninterrupted run's, and no temporary may be left behind.
- `sample`: `examples/sample_afm.py` SIGKILLed at a random moment, then rerun until it finishes;
  `samples.npz` must be byte-identical to an uninterrupted run's.
- `rank`: a 2-process CPU run (`accelerate launch`, gloo) whose rank 1 is SIGKILLed mid-run: every
  process must be gone within `--ddp_timeout` (the bound we set), and a 2-process resume must finish.
- `readonly`: a folder the user cannot write (a new run, a resume, the tensorboard logs; root runs
  with its capabilities dropped): one line before any step, nothing written.
- `full_disk`: a real tmpfs of a random size (root only): one line, no temporary left, the newest
  checkpoint verifies, and the resume on a larger disk ends equal to the reference.
- `concurrent`: the same job started twice on one folder: one is refused in one line, the other
  ends equal to the reference.
- `reuse`: a new run into another run's folder is refused; `--overwrite_output_dir` leaves only the
  new run's checkpoints.
- `changed`: a resume that changes the batch size, the prediction type, the head split, a loss
  weight, the seed, or the state file's step, is refused in one line naming it (and accepted with
  `--allow_changed_settings`).
- `nonfinite`: NaN / Inf weights in a pipeline (sample_afm.py) and in a checkpoint (a resume) are refused.
- `sample_mix`: sample_afm.py resumed after its pipeline folder was replaced by another model is refused.
- `modes`: a ramp in every image mode (16-bit, 32-bit, float, palette, alpha, CMYK, bilevel) maps
  linearly to [-1, 1] or is refused.
- `state_copy`: a state file copied from another checkpoint is refused, the state file blamed.
- `bad_input`: labels outside the classes, an output_dir that is a file: one line, exit status 1.
- `umask`: every file a run writes is readable by group and others under umask 022.

Each trial prints one line; the figures (trials / held, and what each class counts) go to `--output`.
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
from safetensors.torch import load_file, save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "src"))
from diffusers_afm.training.checkpoint import CheckpointError, list_checkpoints, verify_checkpoint  # noqa: E402

TINY = os.path.join(REPO, "tests", "fixtures", "tiny_model.json")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
# The tree whose scripts and library the trials run (`--code`: e.g. `git archive` of an older commit,
# for the figures before a fix); this file's own tree by default.
CODE = REPO
STEPS = 24


def train_command(out, *extra):
    return [sys.executable, os.path.join(CODE, "examples", "train_afm.py"), "--output_dir", out,
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


def exporting(out):
    """Whether the final export is under way: a temporary of the pipeline or discriminator exists."""
    try:
        return any(name.startswith(".save-") or ".tmp-" in name for name in os.listdir(out))
    except OSError:
        return False


def kill_when(proc, out, delay=None, saving_step=None, after_step=0, export=False, sig=signal.SIGKILL):
    """Send `sig` to `proc` `delay` seconds after checkpoint `after_step` exists, the moment the
    temporary folder of checkpoint `saving_step` appears (inside that save), or (`export`) the
    moment the final export's first temporary appears."""
    waited_from = None
    while proc.poll() is None:
        if export:
            if exporting(out):
                break
        elif saving_step is not None:
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
    proc.send_signal(sig)
    proc.wait()
    return True


def newest_verifies(out):
    """Whether the newest complete checkpoint in `out` (if any) verifies."""
    kept = list_checkpoints(out)
    try:
        if kept:
            verify_checkpoint(kept[-1])
    except CheckpointError:
        return False
    return True


def leftovers(out):
    """Hidden temporaries of interrupted writes left in `out` (and its sub-folders), not the lock."""
    return sorted(os.path.relpath(os.path.join(root, name), out) for root, dirs, files in os.walk(out)
                  for name in dirs + files if name.startswith(".") and name != ".afm-run.lock")


def kill_trials(n, work, reference, rng, sig=signal.SIGKILL, name="kill"):
    """A third of the trials inside a checkpoint save, a third during the final export, a third at a
    random moment; then `--resume_from_checkpoint latest` must end equal to the reference, leaving
    no temporaries behind."""
    results = []
    for trial in range(n):
        out = os.path.join(work, f"{name}-{trial}")
        in_save, in_export = trial % 3 == 0, trial % 3 == 1
        proc = subprocess.Popen(train_command(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if in_save:  # inside the save of a random checkpoint
            killed = kill_when(proc, out, saving_step=2 * rng.randint(1, STEPS // 2), sig=sig)
        elif in_export:
            killed = kill_when(proc, out, export=True, sig=sig)
        else:  # a random moment after a random checkpoint (0: during start-up or the first steps)
            killed = kill_when(proc, out, delay=rng.uniform(0.0, 0.5), after_step=2 * rng.randint(0, STEPS // 2 - 1),
                               sig=sig)
        kept = list_checkpoints(out)
        newest_ok = newest_verifies(out)
        resumed = subprocess.run(train_command(out, "--resume_from_checkpoint", "latest"), env=ENV,
                                 capture_output=True, text=True)
        equal = resumed.returncode == 0 and same(weights(out), reference)
        results.append(dict(trial=trial, in_save=in_save, in_export=in_export, killed=killed,
                            checkpoints_after_kill=[os.path.basename(p) for p in kept], newest_verifies=newest_ok,
                            resumed=resumed.returncode == 0, equal=equal, left=leftovers(out)))
        if resumed.returncode:
            results[-1]["error"] = resumed.stderr[-2000:]
        print(json.dumps(results[-1]), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return results


def sample_command(pipeline, out):
    return [sys.executable, os.path.join(CODE, "examples", "sample_afm.py"), "--pipeline", pipeline, "--output_dir", out,
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


# ----------------------------------------------------------------------------- issue 27's fault classes
def one_line(result):
    """A refusal as users should meet it: exit status 1, one `error:` line last on stderr, no traceback."""
    lines = result.stderr.strip().splitlines()
    return result.returncode == 1 and "Traceback" not in result.stderr and bool(lines) and lines[-1].startswith("error: ")


def last_line(result):
    lines = result.stderr.strip().splitlines()
    return lines[-1][:400] if lines else ""


def run(command, **kwargs):
    return subprocess.run(command, env=kwargs.pop("env", ENV), capture_output=True, text=True, timeout=900, **kwargs)


def record(results, **fields):
    results.append(fields)
    print(json.dumps(fields), flush=True)


def unprivileged():
    """Root ignores file permissions: the trainer runs with its capabilities dropped."""
    return ["setpriv", "--bounding-set=-all", "--inh-caps=-all"] if os.geteuid() == 0 else []


def readonly_trials(work, reference_dir):
    """A folder this user cannot write: a new run, a resume, the tensorboard log folder. Held: one line
    before any step is trained, nothing written."""
    results = []
    for case in ("new run", "resume", "tensorboard logs"):
        out = os.path.join(work, f"readonly-{case.split()[0]}")
        extra = []
        if case == "resume":
            shutil.copytree(reference_dir, out)
            extra = ["--resume_from_checkpoint", "latest", "--max_train_steps", str(STEPS + 2)]
        os.makedirs(os.path.join(out, "logs") if case == "tensorboard logs" else out, exist_ok=True)
        locked = os.path.join(out, "logs") if case == "tensorboard logs" else out
        for root, dirs, _ in os.walk(locked):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o555)
        os.chmod(locked, 0o555)
        if case == "tensorboard logs":
            extra = ["--report_to", "tensorboard"]
        before = [os.path.basename(p) for p in list_checkpoints(out)]
        result = run(unprivileged() + train_command(out, *extra))
        after = [os.path.basename(p) for p in list_checkpoints(out)]
        record(results, case=case, one_line=one_line(result), unchanged=before == after,
               held=one_line(result) and before == after and "classes, batch" not in result.stderr, error=last_line(result))
        os.chmod(locked, 0o755)
        shutil.rmtree(out, ignore_errors=True)
    return results


def full_disk_trials(n, work, reference, rng):
    """A real tmpfs of a random size (0.9 to 2.6 MiB: from less than one checkpoint to about two and
    a half) under a 24-step run. Held: one line, no temporary left, the newest checkpoint verifies,
    and once the disk is larger the resume ends equal to the reference."""
    results = []
    for trial in range(n):
        disk = os.path.join(work, f"disk-{trial}")
        os.makedirs(disk)
        size = rng.randint(900, 2600)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}k", "tmpfs", disk]).returncode:
            print("cannot mount a tmpfs here (root needed); no full-disk trials", flush=True)
            return results
        try:
            out = os.path.join(disk, "run")
            first = run(train_command(out))
            newest_ok = newest_verifies(out)
            left = leftovers(out) if os.path.isdir(out) else []
            subprocess.run(["mount", "-o", "remount,size=64m", disk], check=True)
            resumed = run(train_command(out, "--resume_from_checkpoint", "latest"))
            equal = resumed.returncode == 0 and same(weights(out), reference)
            stopped = first.returncode != 0
            record(results, trial=trial, size_kib=size, stopped=stopped, one_line=one_line(first) if stopped else None,
                   left=left, newest_verifies=newest_ok, equal_after_resume=equal,
                   held=(not stopped or one_line(first)) and not left and newest_ok and equal, error=last_line(first))
        finally:
            subprocess.run(["umount", "-l", disk])
    return results


def concurrent_trials(n, work, reference):
    """The same job launched twice on one folder at the same moment. Held: one of them is refused in
    one line, the other ends equal to the reference."""
    results = []
    for trial in range(n):
        out = os.path.join(work, f"twice-{trial}")
        procs = [subprocess.Popen(train_command(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        outcomes = [(p.wait(), p.stderr.read()) for p in procs]
        codes = sorted(code for code, _ in outcomes)
        refused = [err for code, err in outcomes if code == 1 and "Traceback" not in err
                   and err.strip().splitlines()[-1].startswith("error: ")]
        equal = codes[0] == 0 and same(weights(out), reference)
        record(results, trial=trial, exit_codes=codes, refused_in_one_line=len(refused), equal=equal,
               held=codes == [0, 1] and len(refused) == 1 and equal,
               error=(refused[0].strip().splitlines()[-1][:300] if refused else
                      [err.strip().splitlines()[-1][:200] for _, err in outcomes if err.strip()]))
        shutil.rmtree(out, ignore_errors=True)
    return results


def reuse_trials(work, reference):
    """A new run into a folder holding another run's checkpoints (a 26-step run, seed 1) and model.
    Held: refused in one line with nothing touched; with --overwrite_output_dir, only the new run's
    checkpoints remain and they equal the reference (`latest` cannot resume the old run)."""
    foreign = os.path.join(work, "foreign")
    run(train_command(foreign, "--seed", "1", "--max_train_steps", str(STEPS + 2)))
    results = []
    out = os.path.join(work, "reuse")
    shutil.copytree(foreign, out)
    plain = run(train_command(out))
    kept = [os.path.basename(p) for p in list_checkpoints(out)]
    record(results, case="plain rerun", one_line=one_line(plain), checkpoints=kept,
           held=one_line(plain) and kept == [f"checkpoint-{STEPS}", f"checkpoint-{STEPS + 2}"], error=last_line(plain))
    shutil.rmtree(out)
    shutil.copytree(foreign, out)
    overwritten = run(train_command(out, "--overwrite_output_dir"))
    kept = [os.path.basename(p) for p in list_checkpoints(out)]
    equal = overwritten.returncode == 0 and same(weights(out), reference)
    record(results, case="--overwrite_output_dir", exit_code=overwritten.returncode, checkpoints=kept, equal=equal,
           held=equal and kept == [f"checkpoint-{STEPS - 2}", f"checkpoint-{STEPS}"], error=last_line(overwritten))
    shutil.rmtree(out)
    return results


def changed_trials(work, reference_dir):
    """A resume (to 26 steps) that changes a setting while the shapes stay: held when refused in one
    line naming the flag; the batch size accepted with --allow_changed_settings must run."""
    head_split = os.path.join(work, "heads.json")
    with open(TINY) as f:
        config = json.load(f)
    with open(head_split, "w") as f:  # the same width cut into twice the heads
        json.dump(dict(config, num_attention_heads=2 * config["num_attention_heads"],
                       attention_head_dim=config["attention_head_dim"] // 2), f)
    cases = [("train_batch_size", ["--train_batch_size", "8"]), ("prediction_type", ["--prediction_type", "velocity"]),
             ("model_config", ["--model_config", head_split]), ("gp_scale", ["--gp_scale", "0.5"]),
             ("seed", ["--seed", "5"]), ("step field", None)]
    results = []
    for name, flags in cases:
        out = os.path.join(work, "changed")
        shutil.copytree(reference_dir, out)
        if flags is None:  # the state file's step edited (its manifest still matches the files)
            state_file = os.path.join(out, f"checkpoint-{STEPS}", "trainer_state.json")
            with open(state_file) as f:
                state = json.load(f)
            with open(state_file, "w") as f:
                json.dump(dict(state, step=STEPS + 10), f)
            flags, named = [], "trainer_state.json"
        else:
            named = f"--{name}"
        result = run(train_command(out, "--resume_from_checkpoint", "latest", "--max_train_steps", str(STEPS + 2), *flags))
        record(results, case=name, one_line=one_line(result), held=one_line(result) and named in last_line(result),
               error=last_line(result))
        shutil.rmtree(out)
    out = os.path.join(work, "changed")
    shutil.copytree(reference_dir, out)
    accepted = run(train_command(out, "--resume_from_checkpoint", "latest", "--max_train_steps", str(STEPS + 2),
                                 "--train_batch_size", "8", "--allow_changed_settings", "train_batch_size"))
    record(results, case="accepted: --allow_changed_settings train_batch_size", exit_code=accepted.returncode,
           held=accepted.returncode == 0, error=last_line(accepted))
    shutil.rmtree(out)
    return results


def poison(path, value):
    """Set one tensor of a safetensors file to `value` (NaN or Inf)."""
    tensors = load_file(path)
    key = sorted(tensors)[-1]
    tensors[key] = torch.full_like(tensors[key], value)
    save_file(tensors, path, metadata={"format": "pt"})


def nonfinite_trials(work, reference_dir):
    """NaN / Inf weights in the exported pipeline (sample_afm.py must not exit 0) and in the newest
    checkpoint, its manifest rewritten to match (a resume must refuse it)."""
    results = []
    for value in (float("nan"), float("inf")):
        pipe = os.path.join(work, "poisoned")
        shutil.copytree(reference_dir, pipe)
        poison(os.path.join(pipe, "transformer", "diffusion_pytorch_model.safetensors"), value)
        out = os.path.join(work, "poisoned-samples")
        sampled = run(sample_command(pipe, out))
        npz = os.path.exists(os.path.join(out, "samples.npz"))
        record(results, case=f"pipeline {value}", one_line=one_line(sampled), wrote_samples=npz,
               held=one_line(sampled) and not npz, error=last_line(sampled))
        shutil.rmtree(out, ignore_errors=True)
        folder = os.path.join(pipe, f"checkpoint-{STEPS}")
        poison(os.path.join(folder, "model.safetensors"), value)
        state_file = os.path.join(folder, "trainer_state.json")
        with open(state_file) as f:
            state = json.load(f)
        if "files" in state:
            from diffusers_afm.training.checkpoint import manifest

            with open(state_file, "w") as f:
                json.dump(dict(state, files=manifest(folder)), f)
        resumed = run(train_command(pipe, "--resume_from_checkpoint", "latest", "--max_train_steps", str(STEPS + 2)))
        record(results, case=f"checkpoint {value}", one_line=one_line(resumed),
               held=one_line(resumed) and "model.safetensors" in last_line(resumed), error=last_line(resumed))
        shutil.rmtree(pipe)
    return results


def sample_mix_trials(work, reference_dir):
    """sample_afm.py stopped half-way (--max_images), the pipeline folder then replaced by another
    run's model, the same command again. Held: refused in one line (the samples would mix models)."""
    foreign = os.path.join(work, "foreign")
    results = []
    for trial in range(2):
        pipe, out = os.path.join(work, "mix-pipe"), os.path.join(work, "mix-samples")
        shutil.copytree(reference_dir, pipe)
        run(sample_command(pipe, out) + ["--max_images", str(100 + 100 * trial)])
        shutil.rmtree(os.path.join(pipe, "transformer"))
        shutil.copytree(os.path.join(foreign, "transformer"), os.path.join(pipe, "transformer"))
        again = run(sample_command(pipe, out))
        record(results, trial=trial, one_line=one_line(again), held=one_line(again), error=last_line(again))
        shutil.rmtree(pipe)
        shutil.rmtree(out)
    return results


MODES_SCRIPT = r"""
import json, sys
import numpy as np, PIL.Image
from diffusers_afm.data.images import ImageTransform
ramp = np.linspace(0, 65535, 64).round().reshape(8, 8)
grey = (ramp / 257).round().astype(np.uint8)
images = {
    "I;16": (PIL.Image.fromarray(ramp.astype(np.uint16)), 65535.0),
    "I": (PIL.Image.fromarray(ramp.astype(np.int32)), 65535.0),
    "F": (PIL.Image.fromarray((ramp / 65535).astype(np.float32)), 1.0),
    "L": (PIL.Image.fromarray(grey), 255.0),
    "P": (PIL.Image.fromarray(grey).convert("P"), 255.0),
    "LA": (PIL.Image.fromarray(grey).convert("LA"), 255.0),
    "RGBA": (PIL.Image.fromarray(grey).convert("RGBA"), 255.0),
    "CMYK": (PIL.Image.fromarray(grey).convert("CMYK"), 255.0),
    "1": (PIL.Image.fromarray(grey).convert("1"), 255.0),
}
out = {}
for mode, (image, white) in images.items():
    path = f"{sys.argv[1]}/ramp_{mode.replace(';', '')}.tiff"
    image.save(path)
    loaded = PIL.Image.open(path)
    wide = loaded.mode in ("I;16", "I;16B", "I;16L", "I", "F")
    expected = np.asarray(loaded if wide else loaded.convert("L"), dtype=np.float64) / white * 2 - 1
    try:
        pixels = ImageTransform(8, mode="L")(loaded).numpy()[0]
        out[mode] = {"read_as": loaded.mode, "max_error": float(np.abs(pixels - expected).max())}
    except Exception as err:
        out[mode] = {"read_as": loaded.mode, "refused": str(err)[:200]}
print(json.dumps(out))
"""


def modes_trials(work):
    """A 0..white ramp in every mode, through the data loader's transform (of the code under test).
    Held: mapped to [-1, 1] linearly (within 1/255) or refused with a reason."""
    folder = os.path.join(work, "modes")
    os.makedirs(folder)
    result = run([sys.executable, "-c", MODES_SCRIPT, folder])
    found = json.loads(result.stdout.strip().splitlines()[-1])
    results = []
    for mode, outcome in found.items():
        record(results, mode=mode, **outcome, held="refused" in outcome or outcome["max_error"] <= 1 / 255)
    return results


def state_copy_trials(work, reference_dir):
    """trainer_state.json copied from another checkpoint (the run's previous one; another run's of the
    same step). Held: refused in one line that blames the state file."""
    results = []
    for case, source in (("previous checkpoint", os.path.join(reference_dir, f"checkpoint-{STEPS - 2}")),
                         ("another run, same step", os.path.join(work, "foreign", f"checkpoint-{STEPS}"))):
        out = os.path.join(work, "copied")
        shutil.copytree(reference_dir, out)
        shutil.copy(os.path.join(source, "trainer_state.json"), os.path.join(out, f"checkpoint-{STEPS}"))
        result = run(train_command(out, "--resume_from_checkpoint", "latest", "--max_train_steps", str(STEPS + 2)))
        line = last_line(result)
        blamed = line.split(" ")[1] if line.startswith("error: ") else ""
        record(results, case=case, one_line=one_line(result), blamed=os.path.basename(blamed),
               held=one_line(result) and blamed.endswith("trainer_state.json"), error=line)
        shutil.rmtree(out)
    return results


def bad_input_trials(work, reference_dir):
    """Input the scripts find bad once they run. Held: one line, exit status 1."""
    a_file = os.path.join(work, "a_file")
    with open(a_file, "w") as f:
        f.write("not a folder")
    cases = [("labels outside the classes (trainer)", train_command(os.path.join(work, "bad"), "--num_classes", "5")),
             ("labels outside the classes (sample_afm.py)",
              sample_command(reference_dir, os.path.join(work, "bad")) + ["--class_labels", "3,12"]),
             ("output_dir is a file (trainer)", train_command(a_file)),
             ("output_dir is a file (sample_afm.py)", sample_command(reference_dir, a_file))]
    results = []
    for case, command in cases:
        result = run(command)
        record(results, case=case, held=one_line(result), error=last_line(result))
        shutil.rmtree(os.path.join(work, "bad"), ignore_errors=True)
    return results


def umask_trials(reference_dir):
    """Under umask 022 every file a run writes (the pipeline, the discriminator, checkpoints) must be
    readable by the group and others, as the configs beside the weights are."""
    results = []
    for root, _, files in os.walk(reference_dir):
        for name in files:
            if not name.startswith("."):
                mode = os.stat(os.path.join(root, name)).st_mode & 0o777
                results.append(dict(file=os.path.relpath(os.path.join(root, name), reference_dir), mode=oct(mode),
                                    held=mode & 0o044 == 0o044))
    print(json.dumps({"umask": [f"{r['file']} {r['mode']}" for r in results if not r["held"]]}), flush=True)
    return results


def held(results):
    return dict(trials=len(results), held=sum(bool(r["held"]) for r in results))


CLASSES = ("kill", "term", "int", "sample", "rank", "readonly", "full_disk", "concurrent", "reuse", "changed",
           "nonfinite", "sample_mix", "modes", "state_copy", "bad_input", "umask")


def main():
    global CODE, ENV
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kill_trials", type=int, default=30, help="SIGKILL trials.")
    p.add_argument("--term_trials", type=int, default=6, help="SIGTERM trials (as the kill trials).")
    p.add_argument("--int_trials", type=int, default=4, help="SIGINT (Ctrl-C) trials (as the kill trials).")
    p.add_argument("--sample_trials", type=int, default=10)
    p.add_argument("--rank_trials", type=int, default=2)
    p.add_argument("--full_disk_trials", type=int, default=6, help="Real tmpfs trials (root only).")
    p.add_argument("--concurrent_trials", type=int, default=3)
    p.add_argument("--classes", default=",".join(CLASSES), help=f"Comma-separated subset of {', '.join(CLASSES)}.")
    p.add_argument("--code", default=REPO, help="The tree whose examples/ and src/ the trials run (default: this one).")
    p.add_argument("--ddp_timeout", type=int, default=60, help="The collective timeout the rank trials set.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="Write the figures as JSON here.")
    args = p.parse_args()
    CODE = os.path.abspath(args.code)
    ENV = dict(ENV, PYTHONPATH=os.path.join(CODE, "src"))  # before the installed package
    classes = set(args.classes.split(","))
    unknown = classes - set(CLASSES)
    if unknown:
        p.error(f"--classes: unknown {sorted(unknown)}; allowed: {', '.join(CLASSES)}")
    os.umask(0o022)  # what most users have; the umask class checks the files follow it
    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix="afm-faults-")
    figures = {}
    try:
        reference_dir = os.path.join(work, "reference")
        subprocess.run(train_command(reference_dir), env=ENV, check=True, capture_output=True)
        reference = weights(reference_dir)
        for name, sig, count in (("kill", signal.SIGKILL, args.kill_trials), ("term", signal.SIGTERM, args.term_trials),
                                 ("int", signal.SIGINT, args.int_trials)):
            if name in classes and count:
                r = kill_trials(count, work, reference, rng, sig=sig, name=name)
                figures[name] = dict(trials=len(r), in_save=sum(x["in_save"] for x in r),
                                     in_export=sum(x["in_export"] for x in r), killed=sum(x["killed"] for x in r),
                                     survived=sum(x["resumed"] and x["equal"] and x["newest_verifies"] for x in r),
                                     no_leftovers=sum(not x["left"] for x in r),
                                     held=sum(x["resumed"] and x["equal"] and x["newest_verifies"] and not x["left"]
                                              for x in r),
                                     lost=sum(not x["equal"] for x in r), results=r)
        if "sample" in classes and args.sample_trials:
            r = sample_trials(args.sample_trials, work, reference_dir, rng)
            figures["sample"] = dict(trials=len(r), kills=sum(x["kills"] for x in r),
                                     identical=sum(x["identical"] for x in r), held=sum(x["identical"] for x in r),
                                     results=r)
        if "rank" in classes and args.rank_trials:
            r = rank_trials(args.rank_trials, work, args.ddp_timeout)
            figures["rank"] = dict(trials=len(r), ddp_timeout_s=args.ddp_timeout,
                                   exited_within_timeout=sum(x["within_timeout"] for x in r),
                                   resumed=sum(x["resumed"] for x in r),
                                   held=sum(x["within_timeout"] and x["resumed"] for x in r), results=r)
        trials = [("readonly", lambda: readonly_trials(work, reference_dir)),
                  ("full_disk", lambda: full_disk_trials(args.full_disk_trials, work, reference, rng)),
                  ("concurrent", lambda: concurrent_trials(args.concurrent_trials, work, reference)),
                  ("reuse", lambda: reuse_trials(work, reference)),
                  ("changed", lambda: changed_trials(work, reference_dir)),
                  ("nonfinite", lambda: nonfinite_trials(work, reference_dir)),
                  ("sample_mix", lambda: sample_mix_trials(work, reference_dir)),
                  ("modes", lambda: modes_trials(work)),
                  ("state_copy", lambda: state_copy_trials(work, reference_dir)),
                  ("bad_input", lambda: bad_input_trials(work, reference_dir)),
                  ("umask", lambda: umask_trials(reference_dir))]
        for name, trial in trials:
            if name in classes:
                if name in ("sample_mix", "state_copy") and not os.path.isdir(os.path.join(work, "foreign")):
                    run(train_command(os.path.join(work, "foreign"), "--seed", "1", "--max_train_steps", str(STEPS + 2)))
                r = trial()
                figures[name] = dict(**held(r), results=r)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {k: {kk: vv for kk, vv in v.items() if kk != "results"} for k, v in figures.items()}
    print(json.dumps(summary, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
