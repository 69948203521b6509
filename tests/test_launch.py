"""The launches users type: a CPU launch that Accelerate turns into one process says so, no flag is
taken by its prefix, and a process chooses its CPU threads so that two processes do not fight."""

import ast
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO

from diffusers_afm.conversion import cli as convert_cli
from diffusers_afm.training.run import cpu_thread_count, requested_launch_processes

import sample_grid
import train_afm

TINY = str(REPO / "tests" / "fixtures" / "tiny_model.json")
WORKING_FORM = "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no"


def _launch(tmp_path, script, *launcher_flags):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "ACCELERATE_USE_CPU")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher_flags, *script]
    result = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, OMP_NUM_THREADS="1"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if "runs ONE process" in line]


def test_a_cpu_launch_that_accelerate_runs_as_one_process_says_so_and_gives_the_form_that_works(tmp_path):
    trainer = [str(REPO / "examples" / "train_afm.py"), "--output_dir", str(tmp_path / "run"), "--model_config", TINY,
               "--train_batch_size", "8", "--max_train_steps", "1", "--report_to", "none", "--num_validation_classes", "1",
               "--num_validation_images", "1"]
    (line,) = _launch(tmp_path, trainer, "--num_processes", "2", "--cpu")
    assert "trains on 1 process, not 2" in line and WORKING_FORM in line and "train_afm.py" in line


def test_a_one_process_cpu_launch_has_no_warning(tmp_path):
    # What every trainer does first (`RunConfig.make_accelerator`), without the training.
    script = tmp_path / "start.py"
    script.write_text("from diffusers_afm.training.run import RunConfig\n"
                      f"RunConfig(output_dir={str(tmp_path / 'run')!r}, train_batch_size=1, max_train_steps=1).make_accelerator()\n")
    assert _launch(tmp_path, [str(script)], "--num_processes", "1", "--cpu") == []


@pytest.mark.parametrize("argv, expected", [
    (["/usr/bin/accelerate", "launch", "--num_processes", "2", "--cpu", "train.py", "--num_processes", "5"], 2),
    (["python", "-m", "accelerate.commands.launch", "--num-processes=3", "--cpu", "train.py"], 3),
    (["accelerate", "launch", "--cpu", "train.py"], None),
    (["python", "train.py", "--num_processes", "2"], None),  # not a launcher: a script's own flag
])
def test_the_launchers_process_count_is_read_from_its_own_flags(argv, expected):
    assert requested_launch_processes(argv) == expected


def test_the_launchers_process_count_comes_from_its_config_file(tmp_path):
    config = tmp_path / "cpu.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_processes: 4\nuse_cpu: true\n")
    assert requested_launch_processes(["accelerate", "launch", "--config_file", str(config), "--cpu", "t.py"]) == 4
    assert requested_launch_processes(["accelerate", "launch", "--cpu", "t.py"], default_config_file=str(config)) == 4


# ----------------------------------------------------------------------------- no abbreviated flags
def test_a_prefix_of_a_flag_is_refused_by_the_trainer(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_afm.parse_args(["--output_dir", "x", "--max_train_step", "5"])
    assert exit_info.value.code == 2 and "--max_train_step" in capsys.readouterr().err


def test_a_prefix_of_a_flag_is_refused_by_the_other_commands(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        convert_cli.main(["--checkpoint", str(tmp_path / "x.pth"), "--output_dir", str(tmp_path / "o"), "--model_siz", "XL/2"])
    assert exit_info.value.code == 2 and "--model_siz" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        sample_grid.main(["--pipe", "afm-digits"])
    assert exit_info.value.code == 2 and "--pipeline" in capsys.readouterr().err


def _parser_calls():
    """Every `...ArgumentParser(...)` (or argparse subclass) construction in the project's Python files."""
    for folder in ("examples", "benchmarks", "scripts", "src"):
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text())
            subclasses = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
                          and any(ast.unparse(base).endswith("ArgumentParser") for base in node.bases)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    name = ast.unparse(node.func).rsplit(".", 1)[-1]
                    if name == "ArgumentParser" or name in subclasses:
                        yield path.relative_to(REPO), node


def test_every_parser_of_the_project_refuses_abbreviations():
    calls = list(_parser_calls())
    assert len(calls) > 20
    allowing = [f"{path}:{node.lineno}" for path, node in calls
                if not any(k.arg == "allow_abbrev" and ast.literal_eval(k.value) is False for k in node.keywords)]
    # The trainers' parser sets it in its constructor (training/cli.py), and is tested above.
    assert allowing == [], allowing


# ----------------------------------------------------------------------------- CPU threads
@pytest.mark.parametrize("allowed, machine, busy, local, expected", [
    (2, 2, 0, 1, 2),    # a quiet 2-core machine: both cores
    (2, 2, 1, 1, 1),    # another job on it: one thread, which never waits for the other
    (2, 2, 3, 1, 1),    # overloaded: still one
    (2, 16, 10, 1, 2),  # pinned to 2 of 16 cores, 6 free
    (2, 2, 0, 2, 1),    # two processes of one launch share the 2 cores
])
def test_cpu_thread_count(allowed, machine, busy, local, expected):
    assert cpu_thread_count(allowed, machine, busy, local) == expected


def test_a_process_takes_the_threads_of_its_cores_and_omp_num_threads_wins(monkeypatch):
    import torch

    from diffusers_afm.training import run

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # pinned to one core
    try:
        for omp, expected in [(None, (1, 1)), ("2", (2, 2))]:
            monkeypatch.setattr(run, "_CPU_THREADS", None)  # a fresh process
            torch.set_num_threads(2)  # what torch starts with on 2 cores, or with OMP_NUM_THREADS=2
            if omp is None:
                monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
            else:
                monkeypatch.setenv("OMP_NUM_THREADS", omp)  # the launcher's or the user's choice is kept
            threads, reason = run.set_cpu_threads()
            assert (threads, torch.get_num_threads()) == expected, reason
            assert run.set_cpu_threads() == (threads, reason)  # decided once per process
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="the busy-core measure reads Linux's /proc/stat")
def test_a_job_running_now_counts_as_a_busy_core():
    """Measured over the present moment (the load average lags by minutes in both directions)."""
    from diffusers_afm.training.run import other_cpu_load

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # running, not starting
        assert other_cpu_load() >= 1
    finally:
        busy.kill()
        busy.wait()


# ----------------------------------------------------------------------------- the log of a run
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_checkpoint_save_logs_one_line(tmp_path, caplog):
    caplog.set_level("INFO")
    train_afm.main(["--output_dir", str(tmp_path / "run"), "--model_config", TINY, "--train_batch_size", "8",
                    "--max_train_steps", "2", "--checkpointing_steps", "1", "--report_to", "none",
                    "--num_validation_classes", "1", "--num_validation_images", "1"])
    saves = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Saved ") and "checkpoint-" in r.getMessage()]
    assert saves == [f"Saved {tmp_path / 'run' / 'checkpoint-1'}", f"Saved {tmp_path / 'run' / 'checkpoint-2'}"]
    assert not [r for r in caplog.records if r.name == "accelerate.checkpointing" and r.levelname == "INFO"]


# ----------------------------------------------------------------------------- a clone stays clean
def _documented_outputs():
    """The relative output paths that the README, the docs and the examples' defaults name."""
    import re

    texts = [(REPO / "README.md").read_text()] + [p.read_text() for p in sorted((REPO / "docs").glob("*.md"))]
    texts += [p.read_text() for p in sorted((REPO / "examples").glob("*.py")) + sorted((REPO / "benchmarks").glob("*.py"))]
    flags = r"--(?:output_dir|output|pipeline_dir|images_dir|plot|work_dir)"
    found = set()
    for text in texts:
        found.update(re.findall(flags + r"[ =]([A-Za-z0-9_][A-Za-z0-9_./-]*)", text))
        found.update(re.findall(flags + r'", default="([A-Za-z0-9_][A-Za-z0-9_./-]*)"', text))
        found.update(re.findall(r'add_run_arguments\(p, output_dir="([^"]+)"', text))
    # Committed results (docs/...) and absolute paths are not outputs of a newcomer's run.
    return sorted(path for path in found if not path.startswith(("docs/", "/")) and path not in ("s", "and/or"))


def test_every_documented_output_is_ignored_by_git():
    outputs = _documented_outputs()
    assert {"afm-digits", "afm-model", "fm-digits", "cafm-zimage", "grid.png", "quality_digits.json"} <= set(outputs)
    # A folder is ignored when a file in it is (git matches `dir/` patterns against what exists).
    probes = {path: path if os.path.splitext(path)[1] else f"{path}/file" for path in outputs}
    # safe.directory: a checkout owned by another user than the one running the tests is still read.
    result = subprocess.run(["git", "-c", "safe.directory=*", "check-ignore", "--no-index", "--", *probes.values()],
                            cwd=REPO, capture_output=True, text=True)
    ignored = set(result.stdout.splitlines())
    assert [path for path, probe in probes.items() if probe not in ignored] == []
