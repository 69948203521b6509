"""examples/sample_afm.py and examples/evaluate_afm.py on the CPU: fixed noise per sample, output
independent of the process count, resumable, the ADM .npz layout, the metrics, clear errors."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import REPO, randomize_, tiny_generator_config

from diffusers_afm import AdversarialFlowTransformer2DModel, AFMPipeline
from diffusers_afm.evaluation import (
    ReferenceStatistics,
    compute_metrics,
    evaluate_pipeline,
    iter_npz_images,
    load_feature_extractor,
    load_reference,
    parse_class_labels,
    plan_batches,
    sample_class_labels,
    sample_seed,
    write_samples_npz,
)
from diffusers_afm.utils import DTYPES, resolve_dtype

import evaluate_afm
import sample_afm

# The tiny feature network is TorchScript, which torch 2.13 marks deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


class TinyFeatures(torch.nn.Module):
    """(8-d features, 5 logits) at any image size: the shape of an Inception extractor's output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x):
        features = torch.tanh(self.conv(x)).mean(dim=(2, 3))
        return features, self.head(features)


@pytest.fixture(scope="module")
def feature_net(tmp_path_factory):
    path = tmp_path_factory.mktemp("features") / "tiny_features.pt"
    torch.jit.script(TinyFeatures()).save(str(path))
    return str(path)


def _pipeline_dir(root, in_channels=3, num_classes=3):
    torch.manual_seed(0)
    transformer = AdversarialFlowTransformer2DModel(**tiny_generator_config(in_channels=in_channels, num_classes=num_classes))
    randomize_(transformer, std=0.3)
    path = root / f"pipe{in_channels}"
    AFMPipeline(transformer, vae=None).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return _pipeline_dir(tmp_path_factory.mktemp("pipeline"))


def _sample(pipe, out, *flags):
    return sample_afm.main(["--pipeline", pipe, "--output_dir", str(out), "--per_class", "6", "--batch_size", "4",
                            "--num_writers", "2", *flags])


def _files(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder)) if not name.startswith(".")}


def _inodes(folder):
    return {name: os.stat(folder / name).st_ino for name in os.listdir(folder) if name.endswith(".png")}


# ----------------------------------------------------------------------------- plan


def test_seeds_labels_and_batches_are_functions_of_the_index():
    assert sample_seed(0, 7) == sample_seed(0, 7) and sample_seed(0, 7) != sample_seed(1, 7)
    # Unlike seed * K + i, the hash never gives two runs the same noise.
    assert len({sample_seed(s, i) for s in range(3) for i in range(1000)}) == 3000
    assert sample_class_labels(range(7), num_classes=3) == [0, 1, 2, 0, 1, 2, 0]
    assert sample_class_labels([0, 1, 2, 3], class_labels=[5, 9]) == [5, 9, 5, 9]
    for processes in (1, 2, 3):
        plans = [plan_batches(18, 4, rank, processes) for rank in range(processes)]
        batches = sorted((b for plan in plans for b in plan), key=lambda b: b.start)
        # The same global batches whatever the process count, each computed once.
        assert [list(b) for b in batches] == [list(range(s, min(s + 4, 18))) for s in range(0, 18, 4)]


def test_class_labels_and_dtype_flags_shared_by_the_scripts():
    assert parse_class_labels("3, 1,,2") == [3, 1, 2]
    for bad in ("1,x", ","):
        with pytest.raises(ValueError, match="--class_labels"):
            parse_class_labels(bad)
    # argparse turns the error into its own usage message, naming the flag.
    with pytest.raises(SystemExit):
        evaluate_afm.build_parser().parse_args(["--npz", "s.npz", "--reference_stats", "r.npz", "--class_labels", "a"])
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == DTYPES["float16"] == torch.float16


# ----------------------------------------------------------------------------- sample_afm


@pytest.fixture
def one_thread():
    """CPU kernels round differently with another thread count; the launched processes run one
    thread each, so the in-process runs they are compared with do too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sampling_one_vs_two_processes_and_resume(tmp_path, pipeline_dir, feature_net, tiny_vae_dir, one_thread):
    """One process straight through == one interrupted process finished by two processes, byte for
    byte; no image is written twice. The same launch (one start-up paid for three scripts) checks
    evaluate_afm --pipeline and cache_latents on 2 processes."""
    from test_latent_cache import make_image_folder

    images = make_image_folder(tmp_path / "images")
    cache_flags = ["--train_data_dir", str(images), "--resolution", "16", "--vae", tiny_vae_dir, "--shard_size", "4",
                   "--batch_size", "3", "--dataloader_num_workers", "0"]
    reference = tmp_path / "one"
    _sample(pipeline_dir, reference)  # 18 images in 5 batches of 4
    _sample(pipeline_dir, tmp_path / "split", "--max_images", "8")  # stops after 2 batches
    assert sorted(_inodes(tmp_path / "split")) == [f"{i:06d}.png" for i in range(8)]
    assert not (tmp_path / "split" / "samples.npz").exists()
    before = _inodes(tmp_path / "split")

    driver = tmp_path / "driver.py"
    driver.write_text(
        "import evaluate_afm, sample_afm\n"
        f"sample_afm.main(['--pipeline', {pipeline_dir!r}, '--output_dir', {str(tmp_path / 'split')!r},"
        " '--per_class', '6', '--batch_size', '4', '--num_writers', '2'])\n"
        f"evaluate_afm.main(['--pipeline', {pipeline_dir!r}, '--num_samples', '18', '--batch_size', '4',"
        f" '--reference_folder', {str(reference)!r}, '--feature_extractor', {feature_net!r}, '--input_size', '16',"
        f" '--inception_splits', '2', '--output', {str(tmp_path / 'two.json')!r}])\n"
        "import cache_latents\n"
        f"cache_latents.main({cache_flags + ['--output_dir', str(tmp_path / 'cache2')]!r})\n"
    )
    # The driver imports the example scripts, as a script placed in examples/ would.
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "examples"), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(driver)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    assert _files(tmp_path / "split") == _files(reference)  # PNGs, samples.npz, sampling.json
    after = _inodes(tmp_path / "split")
    assert all(after[name] == inode for name, inode in before.items())  # not rewritten
    assert not (tmp_path / "split" / "batches").exists()

    # The 2-process evaluation of the pipeline equals a 1-process evaluation of its saved images.
    two = json.loads((tmp_path / "two.json").read_text())
    one = evaluate_afm.main(["--folder", str(reference), "--reference_folder", str(reference), "--feature_extractor",
                             feature_net, "--input_size", "16", "--inception_splits", "2",
                             "--output", str(tmp_path / "one.json")])
    for key in ("fid", "inception_score", "precision", "recall", "num_samples"):
        assert two[key] == pytest.approx(one[key], abs=1e-9), key
    assert two["fid"] < 1e-6

    # The cache written by 2 processes equals the one written by 1.
    import cache_latents
    from diffusers_afm.data import LatentCacheDataset

    cache_latents.main(cache_flags + ["--output_dir", str(tmp_path / "cache1")])
    one_cache, two_cache = LatentCacheDataset(str(tmp_path / "cache1")), LatentCacheDataset(str(tmp_path / "cache2"))
    assert len(one_cache) == len(two_cache) == 12 and one_cache.info == two_cache.info
    for i in range(12):
        a, b = one_cache[i], two_cache[i]
        assert (a is None and b is None) or all(torch.equal(a[k], b[k]) for k in ("latent_mean", "latent_std"))


def test_resume_rewrites_only_missing_images(tmp_path, pipeline_dir):
    out = tmp_path / "s"
    _sample(pipeline_dir, out, "--format", "png")
    original = _files(out)
    os.remove(out / "000005.png")
    (out / ".000006.png.tmp-abc123").write_bytes(b"half an image")  # left by a killed run
    before = _inodes(out)
    _sample(pipeline_dir, out, "--format", "png")
    after = _inodes(out)
    assert [name for name in after if before.get(name) != after[name]] == ["000005.png"]
    assert _files(out) == original
    assert not (out / ".000006.png.tmp-abc123").exists()


def test_resume_with_other_settings_is_an_error(tmp_path, pipeline_dir):
    out = tmp_path / "s"
    _sample(pipeline_dir, out, "--max_images", "4")
    with pytest.raises(ValueError, match=r"seed: 0 -> 1"):
        _sample(pipeline_dir, out, "--seed", "1")


def test_npz_layout_and_grey_images(tmp_path):
    pipe = _pipeline_dir(tmp_path, in_channels=1, num_classes=2)
    out = tmp_path / "s"
    sample_afm.main(["--pipeline", pipe, "--output_dir", str(out), "--num_samples", "5", "--batch_size", "2",
                     "--format", "npz", "--class_labels", "1,0,1"])
    with np.load(out / "samples.npz") as data:
        assert sorted(data.files) == ["arr_0", "labels"]
        images, labels = data["arr_0"], data["labels"]
    assert images.dtype == np.uint8 and images.shape == (5, 8, 8, 3)
    assert (images[..., 0] == images[..., 1]).all() and (images[..., 0] == images[..., 2]).all()  # grey -> RGB
    assert labels.dtype == np.int64 and labels.tolist() == [1, 0, 1, 1, 0]
    # Each image is the pipeline's own sample for that noise and label.
    alone = AFMPipeline.from_pretrained(pipe)(class_labels=[0], output_type="np",
                                              generator=[torch.Generator().manual_seed(sample_seed(0, 4))]).images
    assert np.array_equal(images[4, ..., 0], (alone[0, ..., 0] * 255).round().astype(np.uint8))
    assert not list(out.glob("*.png")) and not (out / "batches").exists()


def test_streamed_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
    write_samples_npz(tmp_path / "x.npz", (images[i : i + 3] for i in range(0, 7, 3)), np.arange(7))
    with np.load(tmp_path / "x.npz") as data:
        assert np.array_equal(data["arr_0"], images) and data["labels"].tolist() == list(range(7))
    assert np.array_equal(np.concatenate(list(iter_npz_images(tmp_path / "x.npz", batch_size=2))), images)
    with pytest.raises(ValueError, match="wrote 7 images for 8 labels"):
        write_samples_npz(tmp_path / "y.npz", [images], np.arange(8))
    assert not (tmp_path / "y.npz").exists()


# ----------------------------------------------------------------------------- evaluation


def test_evaluate_npz_and_folder_agree_and_write_json(tmp_path, pipeline_dir, feature_net, capsys):
    out = tmp_path / "s"
    _sample(pipeline_dir, out)
    real = tmp_path / "real"
    real.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(real / f"{i}.png")
    common = ["--reference_folder", str(real), "--feature_extractor", feature_net, "--input_size", "16",
              "--inception_splits", "2", "--save_reference", str(tmp_path / "ref.npz")]
    from_npz = evaluate_afm.main(["--npz", str(out / "samples.npz"), "--output", str(tmp_path / "a.json"), *common])
    table = capsys.readouterr().out
    assert "| FID |" in table and "| Precision |" in table
    from_folder = evaluate_afm.main(["--folder", str(out), "--output", str(tmp_path / "b.json"), *common])
    written = json.loads((tmp_path / "a.json").read_text())
    assert written["fid"] == from_npz["fid"] > 0 and written["samples"] == str(out / "samples.npz")
    for key in ("fid", "inception_score", "precision", "recall"):
        assert from_folder[key] == pytest.approx(from_npz[key], abs=1e-9)
    # A saved reference (mu, sigma, features) gives the same numbers without the reference images.
    again = evaluate_afm.main(["--npz", str(out / "samples.npz"), "--reference_stats", str(tmp_path / "ref.npz"),
                               "--feature_extractor", feature_net, "--input_size", "16", "--inception_splits", "2",
                               "--output", str(tmp_path / "c.json")])
    assert again["fid"] == pytest.approx(from_npz["fid"]) and again["precision"] == from_npz["precision"]


def test_evaluate_pipeline_in_process_matches_its_samples(tmp_path, pipeline_dir, feature_net):
    extractor = load_feature_extractor(feature_net, input_size=16)
    pipe = AFMPipeline.from_pretrained(pipeline_dir)
    out = tmp_path / "s"
    _sample(pipeline_dir, out, "--format", "npz")
    reference = load_reference(out / "samples.npz", extractor)
    metrics = evaluate_pipeline(pipe, reference, extractor, num_samples=18, batch_size=4, inception_splits=2)
    assert metrics["num_samples"] == 18 and metrics["fid"] < 1e-6
    assert metrics["precision"] == metrics["recall"] == 1.0
    # Another seed gives other samples.
    other = evaluate_pipeline(pipe, reference, extractor, num_samples=18, batch_size=4, seed=1, inception_splits=2)
    assert other["fid"] > 1e-4


def test_stored_statistics_of_another_network_are_a_clear_error(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "adm.npz", mu=np.zeros(2048), sigma=np.eye(2048),
             arr_0=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    stored = load_reference(tmp_path / "adm.npz", with_features=False)
    assert stored.mu.shape == (2048,) and stored.features is None
    with pytest.raises(ValueError, match="recompute_reference_stats"):
        compute_metrics(rng.standard_normal((10, 12)), stored)

    def extractor(images):
        return torch.as_tensor(np.asarray(images), dtype=torch.float32).mean(dim=(1, 2))

    recomputed = load_reference(tmp_path / "adm.npz", extractor, recompute=True)
    assert recomputed.mu.shape == (3,) and recomputed.features.shape == (6, 3)
    assert isinstance(recomputed, ReferenceStatistics)


def test_missing_inception_weights_name_the_file_and_the_flag(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "weights-inception-2015-12-05-6726825d.pth"
    (tmp_path / "s.npz").write_bytes(b"")
    with pytest.raises(SystemExit):
        evaluate_afm.parse_args(["--npz", str(tmp_path / "s.npz"), "--reference_stats", str(tmp_path / "s.npz"),
                                 "--inception_path", str(missing)])
    error = capsys.readouterr().err
    assert "--inception_path" in error and str(missing) in error and "file not found" in error


def test_trainer_evaluates_every_eval_steps(tmp_path, feature_net, caplog):
    """--eval_steps runs the same evaluation as evaluate_afm.py on the EMA generator and logs it."""
    import logging

    import train_afm
    from diffusers_afm.data import digits_dataset

    reference = tmp_path / "reference"
    reference.mkdir()
    for i, image in enumerate(digits_dataset("test")["image"][:24]):
        image.convert("RGB").save(reference / f"{i}.png")
    caplog.set_level(logging.INFO)
    train_afm.main(["--output_dir", str(tmp_path / "run"), "--model_config", str(REPO / "tests" / "fixtures" / "tiny_model.json"),
                    "--train_batch_size", "16", "--max_train_steps", "4", "--report_to", "none",
                    "--num_validation_images", "1", "--eval_steps", "2", "--eval_num_samples", "20",
                    "--eval_batch_size", "10", "--eval_reference", str(reference),
                    "--eval_feature_extractor", feature_net])
    import re

    steps = [re.search(r"step (\d+): num_samples 20, fid [0-9.e+-]+", r.getMessage()) for r in caplog.records]
    assert [int(m.group(1)) for m in steps if m] == [2, 4]


def test_trainer_rejects_a_missing_eval_reference(tmp_path):
    import train_afm

    with pytest.raises(ValueError, match="--eval_reference"):
        train_afm.main(["--output_dir", str(tmp_path / "run"), "--eval_steps", "2"])
