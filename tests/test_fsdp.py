"""The generator trainers under Accelerate's FSDP2 on 2 CPU processes (gloo), against DDP.

Every run is a real `accelerate launch` of an unchanged trainer with the shipped config
(`examples/accelerate/fsdp2.yaml`); `tests/fsdp_cpu.py` only switches Accelerate's state to FSDP,
which Accelerate never selects on a CPU by itself. Same seed, same data: the FSDP2 run must end with
the DDP run's generator, discriminator and EMA (float32; bit for bit where the arithmetic is the
same), export the same pipeline, resume bit for bit, keep the R1/R2 penalty's full precision under
bf16, and leave a verifiable checkpoint when killed.
"""

import json
import os
import io
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO, randomize_
from safetensors.torch import load_file

from diffusers_afm import AFMPipeline, FlowMatchingTransformer2DModel
from diffusers_afm.training import checkpoint as checkpoint_module
from diffusers_afm.training.checkpoint import CheckpointError, list_checkpoints, verify_checkpoint

FSDP_CONFIG = REPO / "examples" / "accelerate" / "fsdp2.yaml"
SHIM = REPO / "tests" / "fsdp_cpu.py"
EXAMPLES = REPO / "examples"
TINY = str(REPO / "tests" / "fixtures" / "tiny_model.json")
AFM_FLAGS = ["--model_config", TINY, "--train_batch_size", "8", "--report_to", "none", "--checkpointing_steps", "2",
             "--validation_steps", "4", "--num_validation_images", "2"]


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch_command(script, *args, fsdp: bool, mixed_precision: str = "no", processes: int = 2, shim: bool = True):
    if fsdp:
        head = ["accelerate", "launch", "--config_file", str(FSDP_CONFIG), "--num_processes", str(processes)]
        head += [str(SHIM)] if shim else []
    else:
        head = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                "--dynamo_backend", "no"]
    return head[:2] + ["--main_process_port", _free_port(), "--mixed_precision", mixed_precision] + head[2:] + [
        str(script), *map(str, args)]


ENV = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def launch(script, *args, fsdp: bool, check: bool = True, **kwargs):
    result = subprocess.run(launch_command(script, *args, fsdp=fsdp, **kwargs), capture_output=True, text=True, env=ENV,
                            timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def sharded(folder, template):
    """The tensors of a torch.distributed.checkpoint folder, read in one process into `template`'s shapes."""
    import torch.distributed.checkpoint as dcp

    state = {k: ({n: torch.empty_like(t) for n, t in v.items()} if isinstance(v, dict) else torch.empty_like(v))
             for k, v in template.items()}
    dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    return state


def generator_of(run, step):
    """The trained (not EMA) generator in `checkpoint-<step>`: Accelerate's first model."""
    checkpoint = run / f"checkpoint-{step}"
    if (checkpoint / "model.safetensors").exists():
        return load_file(checkpoint / "model.safetensors")
    reference = AFMPipeline.from_pretrained(run).transformer.state_dict()
    return sharded(checkpoint / "pytorch_model_fsdp_0", {"model": reference})["model"]


def folder_weights(run, name):
    return AFMPipeline.from_pretrained(run).transformer.state_dict() if name == "transformer" else load_file(
        next((run / name).glob("*.safetensors")))


def assert_same(a, b, atol=0.0, what=""):
    assert a.keys() == b.keys(), what
    for k in a:
        if atol:
            torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0, atol=atol, msg=f"{what} {k}")
        else:
            assert torch.equal(a[k], b[k]), f"{what} {k}"


def same_images(run_a, run_b, **call):
    images = [AFMPipeline.from_pretrained(run)(class_labels=[1, 3], generator=torch.Generator().manual_seed(0),
                                               output_type="np", **call).images for run in (run_a, run_b)]
    np.testing.assert_array_equal(images[0], images[1])


# ----------------------------------------------------------------------------- AFM
@pytest.fixture(scope="module")
def afm_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_afm")
    for name, fsdp in (("fsdp", True), ("ddp", False)):
        launch(EXAMPLES / "train_afm.py", "--output_dir", root / name, "--max_train_steps", 4, *AFM_FLAGS, fsdp=fsdp)
    return root


def test_fsdp2_afm_one_step_equals_ddp(afm_runs):
    fsdp, ddp = afm_runs / "fsdp", afm_runs / "ddp"
    # FSDP2 checkpoints are sharded (torch.distributed.checkpoint), the EMA's too; DDP's are whole.
    assert (fsdp / "checkpoint-4" / "pytorch_model_fsdp_0" / ".metadata").exists()
    assert (fsdp / "checkpoint-4" / "ema" / ".metadata").exists() and not (fsdp / "checkpoint-4" / "ema.safetensors").exists()
    verify_checkpoint(str(fsdp / "checkpoint-4"))
    # Bit for bit: the same arithmetic (all-gather + reduce-scatter of fp32 sums equals DDP's all-reduce here).
    for name in ("transformer", "discriminator"):
        assert_same(folder_weights(fsdp, name), folder_weights(ddp, name), what=name)
    assert_same(generator_of(fsdp, 4), generator_of(ddp, 4), what="generator")
    ema = load_file(ddp / "checkpoint-4" / "ema.safetensors")
    assert_same(sharded(fsdp / "checkpoint-4" / "ema", ema), ema, what="EMA")
    # The exported folder is a plain pipeline folder: safetensors, no shard files, the same images.
    assert not list(fsdp.glob("transformer/*.distcp")) and list(fsdp.glob("transformer/*.safetensors"))
    same_images(fsdp, ddp)


# A clipping norm small enough to bite: the sharded gradients' global norm must be DDP's.
@pytest.mark.parametrize("flags", [("--nfe", "2", "--gradient_checkpointing", "--max_grad_norm", "0.05")],
                         ids=["multi_step_checkpointed_clipped"])
def test_fsdp2_afm_multi_step_with_checkpointing_and_clipping_equals_ddp(tmp_path, flags):
    for name, fsdp in (("fsdp", True), ("ddp", False)):
        launch(EXAMPLES / "train_afm.py", "--output_dir", tmp_path / name, "--max_train_steps", 4, *AFM_FLAGS, *flags,
               fsdp=fsdp)
    # The clipped norm is summed from the shards' squares: float32 rounding, 1.3e-7 at most here.
    for name in ("transformer", "discriminator"):
        assert_same(folder_weights(tmp_path / "fsdp", name), folder_weights(tmp_path / "ddp", name), atol=1e-6, what=name)
    assert_same(generator_of(tmp_path / "fsdp", 4), generator_of(tmp_path / "ddp", 4), atol=1e-6, what="generator")


def test_fsdp2_autoreload_and_evaluation_equal_ddp(afm_runs, tmp_path):
    """The guided phase's autoreload (the generator back to its sharded EMA, the discriminator to its
    start, shard by shard) and the evaluation of the gathered EMA, every 2 steps, as under DDP."""
    import test_sampling_eval

    reference = tmp_path / "reference"
    reference.mkdir()
    for i in range(8):
        torch.manual_seed(i)
        from PIL import Image

        Image.fromarray((torch.rand(8, 8, 3) * 255).byte().numpy()).save(reference / f"{i}.png")
    features = tmp_path / "features.pt"
    torch.jit.script(test_sampling_eval.TinyFeatures()).save(str(features))
    flags = ["--init_from", afm_runs / "ddp", "--autoreload_steps", 2, "--max_train_steps", 4, "--eval_steps", 2,
             "--eval_num_samples", 8, "--eval_batch_size", 4, "--eval_reference", reference,
             "--eval_feature_extractor", features, *AFM_FLAGS]
    logs = {name: launch(EXAMPLES / "train_afm.py", "--output_dir", tmp_path / name, *flags, fsdp=fsdp).stderr
            for name, fsdp in (("fsdp", True), ("ddp", False))}
    for name in ("transformer", "discriminator"):
        assert_same(folder_weights(tmp_path / "fsdp", name), folder_weights(tmp_path / "ddp", name), what=name)
    import re

    fid = {name: re.findall(r"step (\d+): num_samples 8, fid ([0-9.e+-]+)", log) for name, log in logs.items()}
    assert [step for step, _ in fid["fsdp"]] == ["2", "4"] and fid["fsdp"] == fid["ddp"], fid


def test_fsdp2_resume_is_bit_for_bit(afm_runs, tmp_path):
    """Interrupted after checkpoint-2 and resumed with `latest`, the FSDP2 run ends where the
    uninterrupted one did: generator, discriminator, EMA, optimizer shards."""
    resumed = tmp_path / "resumed"
    launch(EXAMPLES / "train_afm.py", "--output_dir", resumed, "--max_train_steps", 2, *AFM_FLAGS, fsdp=True)
    launch(EXAMPLES / "train_afm.py", "--output_dir", resumed, "--max_train_steps", 4, "--resume_from_checkpoint", "latest",
           *AFM_FLAGS, fsdp=True)
    straight = afm_runs / "fsdp"
    for name in ("transformer", "discriminator"):
        assert_same(folder_weights(resumed, name), folder_weights(straight, name), what=name)
    for shard in ("pytorch_model_fsdp_0", "pytorch_model_fsdp_1", "ema", "optimizer_0", "optimizer_1"):
        for rank in (0, 1):
            a = (straight / "checkpoint-4" / shard / f"__{rank}_0.distcp").read_bytes()
            b = (resumed / "checkpoint-4" / shard / f"__{rank}_0.distcp").read_bytes()
            assert a == b, (shard, rank)


def test_fsdp2_checkpoint_resumes_on_another_process_count(afm_runs, tmp_path):
    """torch.distributed.checkpoint reshards on load: a 2-process FSDP2 checkpoint continues on 1."""
    run = tmp_path / "one"
    shutil.copytree(afm_runs / "fsdp", run, ignore=shutil.ignore_patterns("logs", ".*lock*"))
    result = launch(EXAMPLES / "train_afm.py", "--output_dir", run, "--max_train_steps", 6, "--resume_from_checkpoint",
                    "latest", *AFM_FLAGS, fsdp=True, processes=1)
    assert "Resumed from" in result.stderr and "step 4" in result.stderr
    assert json.loads((run / "checkpoint-6" / "trainer_state.json").read_text())["num_processes"] == 1
    verify_checkpoint(str(run / "checkpoint-6"))


# ----------------------------------------------------------------------------- bf16: the penalty's full precision
def test_fsdp2_bf16_keeps_the_penalty_in_full_precision(tmp_path):
    """FSDP2's own bf16 policy casts the gathered parameters (and block inputs): the discriminator's
    full-precision rows and read-out could not run on them. `prepare_network` keeps the discriminator's
    parameters in fp32 and computes in bf16 through autocast, so R1/R2 under bf16 equal fp32's."""
    values = {}
    for precision in ("no", "bf16"):
        out = tmp_path / f"{precision}.json"
        launch(REPO / "tests" / "fsdp_penalty.py", out, fsdp=True, mixed_precision=precision)
        values[precision] = json.loads(out.read_text())
        assert values[precision]["distributed_type"] == "DistributedType.FSDP"
    for term in ("r1", "r2"):
        assert values["no"][term] > 0
        assert abs(values["bf16"][term] / values["no"][term] - 1) < 0.1, (term, values)


# ----------------------------------------------------------------------------- CAFM: SiT layout and Z-Image
def test_fsdp2_flow_matching_equals_ddp(tmp_path):
    """The flow-matching trainer: one network, its sharded EMA gathered for the grid and the export."""
    flags = ["--model_config", TINY, "--max_train_steps", 4, "--train_batch_size", 8, "--report_to", "none",
             "--checkpointing_steps", 4, "--validation_steps", 4, "--num_validation_images", 1]
    for name, fsdp in (("fsdp", True), ("ddp", False)):
        launch(EXAMPLES / "train_flow_matching.py", "--output_dir", tmp_path / name, *flags, fsdp=fsdp)
    pipes = [AFMPipeline.from_pretrained(tmp_path / name) for name in ("fsdp", "ddp")]
    assert all(type(p.transformer) is FlowMatchingTransformer2DModel for p in pipes)
    # Flow matching has no JVP: the same arithmetic in the same order.
    assert_same(pipes[0].transformer.state_dict(), pipes[1].transformer.state_dict(), atol=1e-6, what="EMA")
    assert_same(generator_of(tmp_path / "fsdp", 4), generator_of(tmp_path / "ddp", 4), atol=1e-6, what="model")
    assert not list((tmp_path / "fsdp").glob("transformer/*.distcp"))


def test_fsdp2_cafm_equals_ddp(tmp_path):
    """The JVP runs block by block inside each block's forward, where FSDP2 gathers the block."""
    pretrained = tmp_path / "flow"
    torch.manual_seed(0)
    model = randomize_(FlowMatchingTransformer2DModel(sample_size=8, patch_size=2, in_channels=1, num_layers=2,
                                                      num_attention_heads=2, attention_head_dim=16, num_classes=10))
    AFMPipeline(transformer=model).save_pretrained(pretrained)
    flags = ["--pretrained_model_name_or_path", pretrained, "--max_train_steps", 6, "--warmup_steps", 2,
             "--num_discriminator_steps", 1, "--train_batch_size", 8, "--report_to", "none", "--checkpointing_steps", 6,
             "--validation_steps", 6, "--num_validation_images", 1, "--gradient_checkpointing"]
    for name, fsdp in (("fsdp", True), ("ddp", False)):
        launch(EXAMPLES / "train_cafm.py", "--output_dir", tmp_path / name, *flags, fsdp=fsdp)
    # The JVP's reductions are ordered differently once the parameters are sharded: float32 rounding.
    for name in ("transformer", "discriminator"):
        assert_same(folder_weights(tmp_path / "fsdp", name), folder_weights(tmp_path / "ddp", name), atol=2e-5, what=name)
    assert_same(generator_of(tmp_path / "fsdp", 6), generator_of(tmp_path / "ddp", 6), atol=2e-5, what="generator")


def test_fsdp2_zimage_cafm_equals_ddp(tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    import make_tiny_zimage

    make_tiny_zimage.main(["--pipeline_dir", str(tmp_path / "pipe"), "--images_dir", str(tmp_path / "images"),
                           "--num_images", "8"])
    flags = ["--pretrained_model_name_or_path", tmp_path / "pipe", "--train_data_dir", tmp_path / "images",
             "--resolution", 16, "--max_train_steps", 5, "--warmup_steps", 2, "--num_discriminator_steps", 1,
             "--train_batch_size", 2, "--report_to", "none", "--checkpointing_steps", 5, "--validation_steps", 5,
             "--validation_inference_steps", 2, "--gradient_checkpointing"]
    for name, fsdp in (("fsdp", True), ("ddp", False)):
        launch(EXAMPLES / "train_cafm_t2i.py", "--output_dir", tmp_path / name, *flags, fsdp=fsdp)
    for name in ("transformer", "discriminator"):
        a = load_file(next((tmp_path / "fsdp" / name).glob("*.safetensors")))
        b = load_file(next((tmp_path / "ddp" / name).glob("*.safetensors")))
        assert_same(a, b, atol=2e-5, what=name)
    from diffusers import ZImagePipeline  # the output stays a stock pipeline

    assert type(ZImagePipeline.from_pretrained(tmp_path / "fsdp").transformer).__name__ == "ZImageTransformer2DModel"


# ----------------------------------------------------------------------------- faults and refusals
def test_a_killed_fsdp2_run_leaves_its_last_checkpoint_verifiable(tmp_path):
    run = tmp_path / "killed"
    process = subprocess.Popen(launch_command(EXAMPLES / "train_afm.py", "--output_dir", run, "--max_train_steps", 100_000,
                                              *AFM_FLAGS, fsdp=True),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    try:
        deadline = time.time() + 300
        while len(list_checkpoints(str(run))) < 2 and time.time() < deadline and process.poll() is None:
            time.sleep(0.2)
    finally:
        # The whole job at once, as a crash of the machine would: the launcher and every rank (torch's
        # launcher starts the ranks in process groups of their own, so killing its group is not enough).
        for pid in [process.pid] + _descendants(process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()
    kept = list_checkpoints(str(run))
    assert len(kept) >= 2, "the run wrote no checkpoints before the deadline"
    for path in kept:
        verify_checkpoint(path)
    last = int(os.path.basename(kept[-1]).split("-")[1])
    result = launch(EXAMPLES / "train_afm.py", "--output_dir", run, "--max_train_steps", last + 1,
                    "--resume_from_checkpoint", "latest", *AFM_FLAGS, fsdp=True)
    assert f"step {last}" in result.stderr


def _descendants(pid: int):
    """Every process below `pid`, read off /proc."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _remanifest(checkpoint):
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["files"] = checkpoint_module.manifest(str(checkpoint))
    state_file.write_text(json.dumps(state))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_distributed_checkpoint_index_runs_no_code(afm_runs, tmp_path):
    """torch reads a distributed checkpoint's `.metadata` with plain pickle: a crafted one (its
    manifest updated too) is refused by the verification before torch sees it, and runs nothing."""
    checkpoint = tmp_path / "checkpoint-4"
    shutil.copytree(afm_runs / "fsdp" / "checkpoint-4", checkpoint)
    marker = tmp_path / "pwned"
    with open(checkpoint / "ema" / ".metadata", "wb") as f:
        pickle.dump(_Payload(marker), f)
    _remanifest(checkpoint)
    with pytest.raises(CheckpointError, match=r"ema/\.metadata is not a distributed-checkpoint index.*posix\.system|system"):
        verify_checkpoint(str(checkpoint))
    assert not marker.exists()


def test_a_crafted_non_tensor_item_of_a_sharded_optimizer_runs_no_code(afm_runs, tmp_path):
    """torch reads a sharded optimizer's non-tensor items (param groups) with `torch.load(weights_only=False)`:
    an item that would run code is refused by the verification first."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    checkpoint = tmp_path / "checkpoint-4"
    shutil.copytree(afm_runs / "fsdp" / "checkpoint-4", checkpoint)
    folder, marker = checkpoint / "optimizer_0", tmp_path / "pwned"
    with open(folder / ".metadata", "rb") as f:
        metadata = checkpoint_module._IndexUnpickler(f).load()
    index = next(i for i in metadata.storage_data if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata))
    shard = folder / metadata.storage_data[index].relative_path
    offset = shard.stat().st_size
    payload = io.BytesIO()
    torch.save({"lr": _Payload(marker)}, payload)
    with open(shard, "ab") as f:
        f.write(payload.getvalue())
    metadata.storage_data[index] = _StorageInfo(shard.name, offset, len(payload.getvalue()))
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    _remanifest(checkpoint)
    with pytest.raises(CheckpointError, match=rf"{index.fqn}.*needs .*system.*refusing to unpickle it"):
        verify_checkpoint(str(checkpoint))
    assert not marker.exists()


def test_the_classifier_trainer_refuses_fsdp_and_a_cpu_fsdp_launch_says_it_runs_ddp(tmp_path):
    flags = ["--model_config", TINY, "--train_batch_size", "8", "--report_to", "none", "--max_train_steps", "1"]
    refused = launch(EXAMPLES / "train_afm_classifier.py", "--output_dir", tmp_path / "c", *flags, fsdp=True, check=False)
    # One line from the trainer (the launcher then reports the failed ranks in its own words).
    assert refused.returncode != 0 and "[rank0]: Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "error: train_afm_classifier.py does not run under FSDP" in refused.stderr
    # Without the test's switch, Accelerate runs an FSDP launch on CPUs as DDP: the trainer says so.
    fallback = launch(EXAMPLES / "train_afm_classifier.py", "--output_dir", tmp_path / "d", *flags, fsdp=True, shim=False)
    assert "FSDP was asked for (ACCELERATE_USE_FSDP), but Accelerate runs this launch as MULTI_CPU" in fallback.stderr
