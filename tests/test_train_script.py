"""examples/train_afm.py end to end on the CPU: runs, checkpoints, resumes, fails clearly."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from diffusers_afm import AFMPipeline

import train_afm

TINY = str(REPO / "tests" / "fixtures" / "tiny_model.json")


# Each test builds its own Accelerator (conftest.py).
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _train(out, *flags):
    args = ["--output_dir", str(out), "--model_config", TINY, "--train_batch_size", "16", "--report_to", "none",
            "--num_validation_images", "2", *flags]
    return train_afm.main(args)


def test_twenty_step_run_writes_a_pipeline_that_samples(tmp_path):
    out = tmp_path / "run"
    _train(out, "--max_train_steps", "20", "--checkpointing_steps", "10", "--validation_steps", "10",
           "--report_to", "tensorboard")
    pipe = AFMPipeline.from_pretrained(out)
    assert pipe.vae is None and pipe.transformer.config.in_channels == 1  # grey digits, pixel space
    assert pipe.id2label == {i: str(i) for i in range(10)}
    images = pipe(class_labels=["7", 3], generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    # EMA weights, not the raw generator: they differ after 20 steps.
    raw = load_file(out / "checkpoint-20" / "model.safetensors")
    ema = pipe.transformer.state_dict()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw if k in ema)
    assert (out / "samples.png").exists() and (out / "samples" / "step_0000010.png").exists()
    assert (out / "discriminator" / "diffusion_pytorch_model.safetensors").exists()
    card = (out / "README.md").read_text()
    assert "AFMPipeline.from_pretrained" in card and "\"max_train_steps\": 20" in card
    assert any(name.startswith("events.out.tfevents") for _, _, files in os.walk(out / "logs") for name in files)
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-10", "checkpoint-20"]


def test_resume_continues_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = ("--checkpointing_steps", "3", "--random_flip")  # flips too must be replayed exactly
    _train(straight, "--max_train_steps", "6", *flags)
    _train(resumed, "--max_train_steps", "3", *flags)
    _train(resumed, "--max_train_steps", "6", "--resume_from_checkpoint", "latest", *flags)
    for name in ("model.safetensors", "model_1.safetensors", "ema.safetensors", "grad_norm.safetensors"):
        a = load_file(straight / "checkpoint-6" / name)
        b = load_file(resumed / "checkpoint-6" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_checkpoint_limit_and_interrupted_saves(tmp_path):
    out = tmp_path / "run"
    # A crashed save and an incomplete folder are never resumed from nor counted.
    (out / ".checkpoint-99.tmp").mkdir(parents=True)
    (out / "checkpoint-98").mkdir()
    _train(out, "--max_train_steps", "8", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2",
           "--resume_from_checkpoint", "latest")
    from diffusers_afm.training.checkpoint import list_checkpoints

    assert [os.path.basename(p) for p in list_checkpoints(out)] == ["checkpoint-6", "checkpoint-8"]
    assert json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())["step"] == 8


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--gp_scale", "-1"], "--gp_scale"),
        (["--ot_scale", "-0.1"], "--ot_scale"),
        (["--train_data_dir", "/no/such/folder"], "--train_data_dir"),
        (["--model_config", "Huge/2"], "--model_config"),
        (["--nfe", "2", "--prediction_type", "sample"], "--prediction_type"),
        (["--resume_from_checkpoint", "/no/such/checkpoint"], "--resume_from_checkpoint"),
    ],
)
def test_bad_flags_fail_before_training(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        _train(tmp_path / "run", *flags)
    assert not (tmp_path / "run").exists()


def test_unknown_nfe_is_rejected_by_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "examples" / "train_afm.py"), "--nfe", "three",
                             "--output_dir", str(tmp_path / "o")], capture_output=True, text=True)
    assert result.returncode != 0 and "--nfe" in result.stderr
    assert not (tmp_path / "o").exists()


def _image_folder(root, labels=("cat", "dog"), per_class=8, size=12):
    rng = np.random.default_rng(0)
    for label in labels:
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            array = rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)
            PIL.Image.fromarray(array).save(root / label / f"{i}.png")
    return root


def test_image_folder_with_a_vae_and_a_corrupt_file(tmp_path, tiny_vae_dir, caplog):
    data = _image_folder(tmp_path / "data")
    (data / "dog" / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "run"
    _train(out, "--train_data_dir", str(data), "--vae", tiny_vae_dir, "--resolution", "8",
           "--max_train_steps", "3", "--train_batch_size", "8", "--validation_steps", "100")
    assert "broken.png" in caplog.text
    pipe = AFMPipeline.from_pretrained(out)
    assert pipe.vae is not None and pipe.transformer.config.sample_size == 4  # 8 px / 2 (tiny VAE)
    assert pipe.id2label == {0: "cat", 1: "dog"}
    assert pipe(class_labels=["dog"], output_type="np").images.shape == (1, 8, 8, 3)


def test_labels_outside_the_model_are_an_error_before_training(tmp_path):
    data = _image_folder(tmp_path / "data", labels=("a", "b", "c"))
    with pytest.raises(ValueError, match="label 2, outside the model's classes 0..1"):
        _train(tmp_path / "run", "--train_data_dir", str(data), "--vae", "none", "--num_classes", "2")
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_non_finite_loss_stops_with_the_step_and_part(tmp_path):
    # gp_eps so small that 1/eps^2 overflows float32: the R1 term is not finite at the first step.
    with pytest.raises(train_afm.NonFiniteLossError, match=r"step 1: loss part `(loss_d|r1|r2)`"):
        _train(tmp_path / "run", "--max_train_steps", "5", "--gp_eps", "1e-30")
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_two_processes(tmp_path):
    """`accelerate launch` with 2 CPU processes: both ranks step, agree, and the result loads."""
    out = tmp_path / "run"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "examples" / "train_afm.py"), "--output_dir", str(out), "--model_config", TINY,
           "--train_batch_size", "8", "--max_train_steps", "4", "--report_to", "none",
           "--num_validation_images", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "finished: step" in line]
    ranks = {line.split("rank ")[1].split(" ")[0]: line.split("grad-norm statistic ")[1] for line in lines}
    assert set(ranks) == {"0", "1"} and all("step 4" in line for line in lines)
    assert ranks["0"] == ranks["1"]  # gradient-normalization statistics are averaged over ranks
    assert (out / "checkpoint-4" / "noise_rng_1.safetensors").exists()
    pipe = AFMPipeline.from_pretrained(out)
    assert pipe(class_labels=[1], output_type="np").images.shape == (1, 8, 8, 1)


def test_compile_flag_trains_and_saves(tmp_path):
    """--compile compiles each transformer block in place: same parameter names, a loadable pipeline."""
    out = tmp_path / "run"
    _train(out, "--max_train_steps", "2", "--compile", "--num_validation_classes", "2")
    pipe = AFMPipeline.from_pretrained(out)
    assert all("_orig_mod" not in k for k in pipe.transformer.state_dict())
    assert pipe(class_labels=[0], output_type="np").images.shape == (1, 8, 8, 1)


# ----------------------------------------------------------------------------- strict flags (issue 12, part 2)
@pytest.fixture
def no_data(monkeypatch):
    """Any data or model loading fails the test: the errors below must come before it."""
    def fail(*args, **kwargs):
        raise AssertionError("data was loaded")

    monkeypatch.setattr(train_afm, "load_training_data", fail)
    import train_afm_classifier

    monkeypatch.setattr(train_afm_classifier, "load_training_data", fail)


def _json(path, value):
    path.write_text(json.dumps(value))
    return str(path)


@pytest.mark.parametrize("script", ["train_afm", "train_afm_classifier"])
def test_a_typo_in_a_model_config_names_the_key(tmp_path, no_data, script):
    bad = _json(tmp_path / "model.json", {"patch_size": 2, "num_layer": 2, "num_attention_heads": 2})
    module = __import__(script)
    with pytest.raises(ValueError, match=r"--model_config.*'num_layer'.*Did you mean 'num_layers'"):
        module.main(["--output_dir", str(tmp_path / "run"), "--model_config", bad])
    assert not (tmp_path / "run").exists()


def test_a_typo_in_a_discriminator_config_names_the_key(tmp_path, no_data):
    bad = _json(tmp_path / "disc.json", {"num_attention_head": 2})
    with pytest.raises(ValueError, match=r"--discriminator_config.*'num_attention_head'.*'num_attention_heads'"):
        _train(tmp_path / "run", "--discriminator_config", bad)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--resolution", "9"], r"--resolution.* patch size 2; the image side \(pixel space\) is 9"),
        (["--vae", "VAE", "--resolution", "10"], r"--resolution.*patch size 2; the latent side 10 / 2 is 5"),
        (["--vae", "VAE", "--resolution", "9"], r"--resolution.*a multiple of 2, the VAE's downsampling"),
        (["--vae", "no-such-user/no-such-vae"], r"--vae.*'none' for pixel space.*HF_HUB_OFFLINE"),
        (["--push_to_hub"], r"--push_to_hub.*HF_HUB_OFFLINE"),
        (["--report_to", "wandb"], r"--report_to.*wandb is not installed"),
        (["--report_to", "all"], r"--report_to.*wandb is not installed"),
        (["--max_train_samples", "0"], "--max_train_samples"),
        (["--num_train_epochs", "0"], "--num_train_epochs"),
    ],
)
def test_flag_errors_come_before_any_data_is_loaded(tmp_path, monkeypatch, no_data, tiny_vae_dir, flags, message):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed, whether or not it is
    data = _image_folder(tmp_path / "data")
    flags = [tiny_vae_dir if f == "VAE" else f for f in flags]
    with pytest.raises(ValueError, match=message):
        _train(tmp_path / "run", "--train_data_dir", str(data), "--vae", "none", *flags)
    assert not (tmp_path / "run").exists()


def test_push_to_hub_defaults_the_repo_and_creates_it_before_the_data(tmp_path, monkeypatch, no_data):
    import huggingface_hub

    import diffusers_afm.hub

    monkeypatch.setattr(diffusers_afm.hub, "hub_offline", lambda: False)
    calls = []

    def create_repo(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        raise RuntimeError("401 Unauthorized")

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    with pytest.raises(ValueError, match=r"--push_to_hub.*'my-run'.*--hub_token.*401 Unauthorized"):
        _train(tmp_path / "my-run", "--push_to_hub", "--hub_private_repo", "--hub_token", "hf_x")
    assert calls == [("my-run", {"exist_ok": True, "private": True, "token": "hf_x"})]
    dry = train_afm.parse_args(["--output_dir", str(tmp_path / "other-run"), "--push_to_hub", "--dry_run"])
    assert dry.hub_model_id == "other-run"


def test_columns_the_dataset_lacks_are_errors(tmp_path):
    from diffusers_afm.data import load_training_data

    labelled = _image_folder(tmp_path / "labelled")
    flat = _image_folder(tmp_path / "flat", labels=("all",))  # one folder: imagefolder gives no label column
    common = dict(resolution=8, train_batch_size=4, vae="none")
    with pytest.raises(ValueError, match=r"--label_column.*'lable'.*Did you mean 'label'"):
        load_training_data(train_data_dir=str(labelled), label_column="lable", **common)
    with pytest.raises(ValueError, match=r"--image_column.*'img'.*Did you mean 'image'"):
        load_training_data(train_data_dir=str(labelled), image_column="img", **common)
    # Unset: "label" when the dataset has it, else one class; named, it must exist.
    assert load_training_data(train_data_dir=str(labelled), **common).num_classes == 2
    assert load_training_data(train_data_dir=str(flat), **common).num_classes == 1
    with pytest.raises(ValueError, match=r"--label_column.*'label' is not a column"):
        load_training_data(train_data_dir=str(flat), label_column="label", **common)


def test_max_train_samples_is_a_fixed_subset():
    from diffusers_afm.data import load_training_data

    def labels(seed):
        data = load_training_data(resolution=8, train_batch_size=4, vae="none", max_train_samples=50, seed=seed)
        return len(data.dataset), list(data.dataset["label"])

    assert labels(0) == labels(0) and labels(0)[0] == 50 and labels(0) != labels(1)


def test_diffusers_flag_names(tmp_path, capsys):

    args = train_afm.parse_args(["--pretrained_model_name_or_path", "some-run", "--dry_run"])
    assert args.init_from == "some-run"
    config = _json(tmp_path / "c.json", {"pretrained_model_name_or_path": "other-run", "num_train_epochs": 2})
    args = train_afm.parse_args(["--config", config, "--dry_run"])
    assert args.init_from == "other-run" and args.num_train_epochs == 2 and args.max_train_steps is None
    # As in diffusers' trainers, a given --max_train_steps wins over --num_train_epochs.
    assert train_afm.parse_args(["--config", config, "--max_train_steps", "3", "--dry_run"]).max_train_steps == 3
    # --dry_run's output stays a config that resolves the same.
    train_afm.main(["--config", config, "--dry_run"])
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["max_train_steps"] is None and resolved["tracker_project_name"] == "train_afm"
    again = train_afm.settings(train_afm.parse_args(["--config", _json(tmp_path / "r.json", resolved), "--dry_run"]))
    assert again == resolved


def test_epochs_set_the_steps_and_the_tracker_is_named(tmp_path):
    out = tmp_path / "run"
    # 64 images / batch 16 = 4 steps an epoch.
    _train(out, "--max_train_samples", "64", "--num_train_epochs", "2", "--validation_steps", "100",
           "--report_to", "tensorboard", "--tracker_project_name", "my-project")
    assert json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())["step"] == 8
    assert "\"max_train_steps\": 8" in (out / "README.md").read_text()
    assert (out / "logs" / "my-project").is_dir()


def test_every_flag_has_help_and_shows_its_default():
    import cache_latents
    import evaluate_afm
    import sample_afm
    import toy_afm
    import train_afm_classifier

    for module in (train_afm, train_afm_classifier, toy_afm, sample_afm, evaluate_afm, cache_latents):
        parser = module.build_parser()
        assert [a.dest for a in parser._actions if not (a.help or "").strip()] == [], module.__name__
        assert "(default:" in parser.format_help(), module.__name__


def test_sampling_and_evaluation_share_the_batch_size_name():
    import evaluate_afm
    import sample_afm

    source = ["--pipeline", "p", "--reference_stats", "r.npz"]
    assert evaluate_afm.build_parser().parse_args(source + ["--batch_size", "4"]).batch_size == 4
    assert evaluate_afm.build_parser().parse_args(source + ["--sample_batch_size", "4"]).batch_size == 4  # deprecated
    assert sample_afm.build_parser().parse_args(["--pipeline", "p", "--output_dir", "o", "--batch_size", "4"]).batch_size == 4
