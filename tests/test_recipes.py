"""The published runs' config files (examples/configs/): they load, hold docs/method.md's values, and
each one trains at toy size (the same settings, a tiny model on the embedded digits) and samples."""

import json
import logging
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from diffusers_afm import AdversarialFlowClassifier, AFMPipeline

import train_afm
import train_afm_classifier

TINY = str(REPO / "tests" / "fixtures" / "tiny_model.json")
CONFIGS = REPO / "examples" / "configs"
CONFIG_NAMES = sorted(p.stem for p in CONFIGS.glob("*.json"))
# Which published run each config is: the files a user is told to find must exist.
PUBLISHED = ["b2_1nfe", "classifier_b2", "xl2_112layers", "xl2_1nfe", "xl2_1nfe_guided", "xl2_2nfe",
             "xl2_2nfe_guided", "xl2_4nfe", "xl2_4nfe_guided", "xl2_56layers", "xl2_anynfe"]
# Toy size: the config's settings with a tiny model on the embedded digits, 2 steps.
TOY = ["--dataset_name", "digits", "--resolution", "8", "--vae", "none", "--model_config", TINY,
       "--train_batch_size", "8", "--max_train_steps", "2", "--report_to", "none"]
TOY_AFM = ["--num_validation_classes", "2", "--num_validation_images", "1"]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _script(name):
    return train_afm_classifier if name.startswith("classifier") else train_afm


def _config(name):
    return {k: v for k, v in json.loads((CONFIGS / f"{name}.json").read_text()).items() if not k.startswith("_")}


def _dry_run(capsys, script, *flags):
    assert script.main([*flags, "--dry_run"]) is None
    return json.loads(capsys.readouterr().out)


def test_every_published_run_has_a_config():
    assert CONFIG_NAMES == PUBLISHED


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_dry_run_prints_the_config_values(name, capsys, tmp_path):
    config = _config(name)
    resolved = _dry_run(capsys, _script(name), "--config", str(CONFIGS / f"{name}.json"))
    assert {k: resolved[k] for k in config} == config
    assert "config" not in resolved and "dry_run" not in resolved
    # Every value the run will use is there, not only the config's.
    assert {"seed", "output_dir", "learning_rate", "max_train_steps"} <= set(resolved)


@pytest.mark.parametrize("name", [n for n in CONFIG_NAMES if not n.startswith("classifier")])
def test_configs_hold_method_values(name, capsys):
    """docs/method.md's recipe, checked on what the trainer resolves (not only on the file)."""
    s = _dry_run(capsys, train_afm, "--config", str(CONFIGS / f"{name}.json"))
    multi, guided, deep = s["nfe"] != 1, name.endswith("guided"), s["depth_repeat"] > 1
    assert (s["learning_rate"], s["discriminator_learning_rate"]) == (1e-4, 1e-4)
    assert (s["adam_beta1"], s["adam_beta2"], s["adam_epsilon"], s["adam_weight_decay"]) == (0.0, 0.9, 1e-8, 0.01)
    assert (s["gp_scale"], s["gp_eps"], s["gp_batch_ratio"], s["cp_scale"]) == (0.25, 0.01, 0.25, 0.01)
    assert s["ema_decay"] == 0.9999 and s["grad_norm"] and s["vae_scaling_factor"] == 0.18215
    assert s["max_grad_norm"] == (5.0 if multi or deep else 50.0)
    assert s["prediction_type"] == ("velocity" if multi else "sample")
    assert (s["ot_scale_end"], s["ot_decay_steps"]) == (0.005, 1_000_000)
    if guided:
        assert s["augment_p"] == 0.4 and s["init_from"] and s["classifier"] and s["autoreload_steps"]
        assert (s["cg_scale"], s["cg_max_time"]) == ((0.02, 0.49) if multi else (0.003, 0.1))
    else:
        assert s["augment_p"] == 0.0 and s["cg_scale"] == 0.0 and s["init_from"] is None
        assert s["ot_scale"] == (0.25 if multi else 0.2)


def test_classifier_config_holds_method_values(capsys):
    s = _dry_run(capsys, train_afm_classifier, "--config", str(CONFIGS / "classifier_b2.json"))
    assert s["model_config"] == "B/2" and s["learning_rate"] == 1e-4
    assert (s["adam_beta1"], s["adam_beta2"], s["ema_decay"], s["augment_p"]) == (0.9, 0.95, 0.9995, 0.8)


def test_command_line_flags_override_the_config(capsys):
    s = _dry_run(capsys, train_afm, "--config", str(CONFIGS / "xl2_2nfe.json"), "--learning_rate", "3e-4",
                 "--nfe", "any", "--output_dir", "elsewhere")
    assert (s["learning_rate"], s["nfe"], s["output_dir"]) == (3e-4, "any", "elsewhere")
    assert s["discriminator_learning_rate"] == 1e-4 and s["ot_scale"] == 0.25  # still the config's


def test_dry_run_output_is_a_config_that_resolves_the_same(capsys, tmp_path):
    first = _dry_run(capsys, train_afm, "--config", str(CONFIGS / "xl2_anynfe.json"))
    (tmp_path / "resolved.json").write_text(json.dumps(first))
    assert _dry_run(capsys, train_afm, "--config", str(tmp_path / "resolved.json")) == first


@pytest.mark.parametrize(
    "config, message",
    [
        ({"learning_rat": 1e-4}, "unknown key 'learning_rat'.*'learning_rate'"),
        ({"nfe": "three"}, "key 'nfe'"),
        ({"grad_norm": "yes"}, "key 'grad_norm'.*true or false"),
        ({"mixed_precision": "fp8"}, "key 'mixed_precision'"),
        ({"train_batch_size": 2.5}, "key 'train_batch_size'"),
        ({"config": "other.json"}, "unknown key 'config'"),
        ({"nfe": None}, "key 'nfe': null"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, config, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        train_afm.parse_args(["--config", str(path)])


def test_dry_run_from_the_command_line_loads_no_data(tmp_path):
    """One JSON object on stdout, and no data: ImageNet cannot be loaded offline, yet it succeeds."""
    out = tmp_path / "never"
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "train_afm.py"), "--config", str(CONFIGS / "xl2_1nfe_guided.json"),
         "--output_dir", str(out), "--dry_run"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    settings = json.loads(result.stdout)
    assert settings["dataset_name"] == "ILSVRC/imagenet-1k" and settings["init_from"] == "afm-xl2-1nfe"
    assert not out.exists()


# ----------------------------------------------------------------------------- every config trains
@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    """Runs a config at toy size once (its inputs first: a guided phase needs its base run and the classifier)."""
    root = tmp_path_factory.mktemp("recipes")
    done = {}

    def run(name):
        if name in done:
            return done[name]
        from accelerate.state import AcceleratorState

        out = root / name
        flags = ["--config", str(CONFIGS / f"{name}.json"), "--output_dir", str(out), *TOY]
        if name.endswith("guided"):
            base, classifier = run(name[: -len("_guided")]), run("classifier_b2")
            flags += ["--init_from", str(base), "--classifier", str(classifier)]
        if not name.startswith("classifier"):
            flags += TOY_AFM
        AcceleratorState._reset_state(True)
        _script(name).main(flags)
        AcceleratorState._reset_state(True)
        done[name] = out
        return out

    return run


def _manual_sample(transformer, noise, labels, num_steps):
    """N-step sampling written out for v-prediction: x <- x + (t - s) * G(x, c, s, t)."""
    x = noise
    times = torch.linspace(1.0, 0.0, num_steps + 1)
    for s, t in zip(times[:-1], times[1:]):
        n = x.shape[0]
        x = x + (t - s) * transformer(x, labels, s.expand(n), t.expand(n)).sample
    return x


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_trains_at_toy_size(name, toy_runs):
    config = _config(name)
    out = toy_runs(name)
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["step"] == 2
    if name.startswith("classifier"):
        classifier = AdversarialFlowClassifier.from_pretrained(out)
        assert classifier(torch.randn(3, 1, 8, 8), torch.rand(3)).shape == (3, 10)
        return

    pipe = AFMPipeline.from_pretrained(out)
    transformer = pipe.transformer
    nfe = None if config["nfe"] == "any" else config["nfe"]
    assert transformer.config.nfe == nfe and transformer.config.depth_repeat == config["depth_repeat"]
    assert transformer.config.prediction_type == config["prediction_type"]
    assert transformer.config.use_timestep_src == (nfe != 1) and transformer.config.use_timestep_tgt == (nfe is None)
    discriminator_config = json.loads((out / "discriminator" / "config.json").read_text())
    assert discriminator_config["use_timestep"] == (nfe != 1)

    labels = torch.tensor([3, 7])
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for steps in ([1, 3] if nfe is None else [nfe]):
        images = pipe(class_labels=labels, num_inference_steps=steps, latents=noise, output_type="latent").images
        assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
        if nfe != 1:
            with torch.no_grad():
                torch.testing.assert_close(images, _manual_sample(transformer, noise, labels, steps))
    if nfe not in (None, 1):
        with pytest.raises(ValueError, match=f"trained for {nfe}-step"):
            pipe(class_labels=labels, num_inference_steps=1)

    # docs/method.md, deep models: the generator's learning rate is the discriminator's divided by R.
    lr_g = torch.load(out / "checkpoint-2" / "optimizer.bin", weights_only=True)["param_groups"][0]["lr"]
    lr_d = torch.load(out / "checkpoint-2" / "optimizer_1.bin", weights_only=True)["param_groups"][0]["lr"]
    assert lr_g == pytest.approx(1e-4 / config["depth_repeat"]) and lr_d == pytest.approx(1e-4)


# ----------------------------------------------------------------------------- the classifier trainer
def _train_classifier(out, *flags):
    return train_afm_classifier.main(["--output_dir", str(out), *TOY, "--train_batch_size", "16", *flags])


def test_classifier_trainer_resumes_exactly_and_logs_accuracy_by_time(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = ("--checkpointing_steps", "2", "--logging_steps", "2")
    _train_classifier(straight, "--max_train_steps", "4", *flags)
    assert "accuracy by noise time {'t_0.00-0.20'" in caplog.text
    _train_classifier(resumed, "--max_train_steps", "2", *flags)
    _train_classifier(resumed, "--max_train_steps", "4", "--resume_from_checkpoint", "latest", *flags)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(straight / "checkpoint-4" / name), load_file(resumed / "checkpoint-4" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # The saved folder is the EMA classifier.
    loaded = AdversarialFlowClassifier.from_pretrained(resumed).state_dict()
    ema = load_file(resumed / "checkpoint-4" / "ema.safetensors")
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)


def test_classifier_trainer_bad_flags(tmp_path):
    with pytest.raises(ValueError, match="--augment_p"):
        _train_classifier(tmp_path / "run", "--augment_p", "1.5")
    with pytest.raises(ValueError, match="--model_config"):
        _train_classifier(tmp_path / "run", "--model_config", "Huge/2")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- small data sets (--defaults)
def _folder(root, classes=("cat", "dog"), per_class=6, size=40):
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            PIL.Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    (root / "cat" / "notes.txt").write_text("not an image: not counted")
    return root


def test_small_data_recipe_sizes_patches_and_tiers():
    from diffusers_afm.training import recipe

    sides = (4, 8, 12, 16, 24, 32, 64, 128)
    assert [recipe.small_data_patch_size(s) for s in sides] == [1, 2, 3, 4, 3, 4, 8, 16]
    for side in sides:  # a whole 4x4 (up to 16 a side) or 8x8 grid
        assert (side // recipe.small_data_patch_size(side)) in (4, 8)
    tiny, larger, unknown = (recipe.small_data_recipe(n, 32) for n in (1347, 50_000, None))
    assert tiny["trunk"] == dict(recipe.TINY_TRUNK, patch_size=4) and tiny["defaults"]["max_train_steps"] == 1500
    assert larger["trunk"] == dict(recipe.SMALL_TRUNK, patch_size=4) and larger["defaults"]["max_train_steps"] == 20_000
    assert unknown == larger  # a count the caller cannot give gets the larger model, not the tiny one
    assert tiny["defaults"]["ot_decay_steps"] == 2 * tiny["defaults"]["max_train_steps"]


@pytest.mark.parametrize("script", [train_afm, train_afm_classifier])
def test_a_small_folder_gets_a_model_and_schedule_sized_to_it(tmp_path, capsys, script):
    from diffusers_afm import AdversarialFlowTransformer2DModel
    from diffusers_afm.data import count_local_images

    data = _folder(tmp_path / "data")
    assert count_local_images(str(data)) == (12, 2)
    s = _dry_run(capsys, script, "--train_data_dir", str(data))
    assert (s["defaults"], s["resolution"], s["vae"], s["random_flip"], s["model_config"]) == ("small", 32, "none", True, "T/4")
    name = "generator" if script is train_afm else "classifier"
    model = s["_model"][name]
    assert model["config"]["patch_size"] == 4 and model["config"]["num_layers"] == 4  # 32 px / 4: an 8x8 grid
    assert (model["config"]["sample_size"], model["config"]["in_channels"], model["config"]["num_classes"]) == (32, 3, 2)
    if script is train_afm:
        assert s["max_train_steps"] == 1500 and s["learning_rate"] == 3e-4
        assert model["parameters"] == AdversarialFlowTransformer2DModel(**model["config"]).num_parameters()
        assert s["_model"]["discriminator"]["config"]["patch_size"] == 4
    # Flags given win over the data's defaults, and the patch follows the resolution.
    e = _dry_run(capsys, script, "--train_data_dir", str(data), "--resolution", "16", "--max_train_steps", "7")
    assert e["_model"][name]["config"]["patch_size"] == 4 and e["max_train_steps"] == 7
    # --defaults paper forces the paper's model and data settings on the same folder.
    p = _dry_run(capsys, script, "--train_data_dir", str(data), "--defaults", "paper")
    assert (p["defaults"], p["resolution"], p["vae"]) == ("paper", 256, "stabilityai/sd-vae-ft-mse")
    assert p["_model"][name]["config"]["num_layers"] == (28 if script is train_afm else 12)


def test_small_data_choice_follows_the_count_and_round_trips_as_a_config(tmp_path, capsys):
    hub = ["--dataset_name", "someone/a-hub-dataset"]  # never loaded by a dry run
    assert _dry_run(capsys, train_afm, *hub)["defaults"] == "paper"  # not counted: the paper's
    assert _dry_run(capsys, train_afm, *hub, "--max_train_samples", "500")["defaults"] == "small"
    assert _dry_run(capsys, train_afm, *hub, "--max_train_samples", "100001")["defaults"] == "paper"
    assert _dry_run(capsys, train_afm)["defaults"] == "digits"
    first = _dry_run(capsys, train_afm, "--train_data_dir", str(_folder(tmp_path / "data")))
    (tmp_path / "resolved.json").write_text(json.dumps(first))
    assert _dry_run(capsys, train_afm, "--config", str(tmp_path / "resolved.json")) == first
    with pytest.raises(SystemExit):
        train_afm.parse_args(["--defaults", "smal"])
    assert "invalid choice: 'smal'" in capsys.readouterr().err


def test_color_digits_folder_trains_with_the_small_defaults(tmp_path):
    """The documented recipe at toy length: the colour digits written as an image folder, the
    trainer's defaults for it, and a pipeline that makes 16x16 colour images."""
    import make_color_digits

    from diffusers_afm.data import count_local_images

    data = tmp_path / "color-digits"
    assert make_color_digits.main(["--output_dir", str(data), "--split", "test"]) == 0
    assert count_local_images(str(data)) == (450, 10)
    images, labels = make_color_digits.color_digits("test", size=24)
    assert images.shape == (450, 24, 24, 3) and sorted(set(labels.tolist())) == list(range(10))
    strokes = images.reshape(len(images), -1, 3).max(axis=1)  # each image's brightest colour
    assert len({tuple(c) for c in strokes.tolist()}) > 300  # a colour of its own per image (8-bit ties aside)
    out = tmp_path / "run"
    train_afm.main(["--train_data_dir", str(data), "--resolution", "16", "--no-random_flip", "--output_dir", str(out),
                    "--max_train_steps", "2", "--train_batch_size", "8", "--report_to", "none",
                    "--num_validation_classes", "2", "--num_validation_images", "1"])
    pipe = AFMPipeline.from_pretrained(out)
    config = pipe.transformer.config
    assert (config.sample_size, config.in_channels, config.patch_size, config.num_classes) == (16, 3, 4, 10)
    assert pipe.vae is None and pipe.id2label[3] == "3"
    assert pipe(class_labels=["7"], output_type="np").images.shape == (1, 16, 16, 3)
    card = (out / "README.md").read_text()
    assert '"defaults": "small"' in card  # the card records the choice and the model's size
    assert f'"parameters": {pipe.transformer.num_parameters()}' in card
