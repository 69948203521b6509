"""JiT in the trainers: flow matching from scratch, CAFM post-training, the reference recipe's config."""

import json

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from diffusers_afm import AdversarialFlowJiTDiscriminator, AFMPipeline, JiTTransformer2DModel

import train_cafm
import train_flow_matching

JIT_RECIPE = REPO / "examples" / "configs" / "cafm" / "jit_h16.json"
# A JiT small enough for the 8x8 digits: 2x2 patches, a 4x4 grid, 2 in-context tokens from block 1.
TINY_JIT = {"_class_name": "JiTTransformer2DModel", "patch_size": 2, "num_layers": 2, "num_attention_heads": 2,
            "attention_head_dim": 16, "bottleneck_dim": 8, "in_context_len": 2, "in_context_start": 1}
COMMON = ["--train_batch_size", "16", "--report_to", "none", "--num_validation_images", "1"]


@pytest.fixture(scope="module")
def jit_flow_run(tmp_path_factory):
    from accelerate.state import AcceleratorState

    folder = tmp_path_factory.mktemp("jit")
    (folder / "tiny_jit.json").write_text(json.dumps(TINY_JIT))
    AcceleratorState._reset_state(True)
    train_flow_matching.main(["--output_dir", str(folder / "fm"), "--model_config", str(folder / "tiny_jit.json"),
                              "--time_sampling", "logit_normal_jit", "--max_train_steps", "6", "--validation_steps", "6",
                              *COMMON])
    AcceleratorState._reset_state(True)
    return folder / "fm"


def test_flow_matching_trains_a_jit_model_from_a_config(jit_flow_run):
    pipe = AFMPipeline.from_pretrained(jit_flow_run)
    model = pipe.transformer
    assert type(model) is JiTTransformer2DModel and model.null_class_id == 10
    assert (model.config.sample_size, model.config.in_channels, model.config.in_context_len) == (8, 1, 2)
    images = pipe(class_labels=[3, "7"], num_inference_steps=4, guidance_scale=2.0, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and torch.isfinite(torch.from_numpy(images)).all()
    card = (jit_flow_run / "README.md").read_text()
    assert '"bottleneck_dim": 8' in card  # the card records the JiT model itself


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_cafm_post_trains_a_jit_model_with_both_networks_checkpointed(jit_flow_run, tmp_path):
    out = tmp_path / "cafm"
    # Steps 0..2 are D steps (warm-up 2), then with N = 1: 3 G, 4 D, 5 G.
    train_cafm.main(["--output_dir", str(out), "--pretrained_model_name_or_path", str(jit_flow_run),
                     "--max_train_steps", "6", "--warmup_steps", "2", "--num_discriminator_steps", "1",
                     "--gradient_checkpointing", "--validation_steps", "6", *COMMON])
    start = AFMPipeline.from_pretrained(jit_flow_run).transformer.state_dict()
    pipe = AFMPipeline.from_pretrained(out)
    assert type(pipe.transformer) is JiTTransformer2DModel
    assert any(not torch.equal(v, start[k]) for k, v in pipe.transformer.state_dict().items())  # G steps moved it
    discriminator = AdversarialFlowJiTDiscriminator.from_pretrained(out / "discriminator")
    final = load_file(out / "checkpoint-6" / "model_1.safetensors")
    assert all(torch.equal(discriminator.state_dict()[k], final[k]) for k in final)
    assert pipe(class_labels=[1], num_inference_steps=2, output_type="np").images.shape == (1, 8, 8, 1)


def test_the_jit_recipe_config_reads_as_flags(jit_flow_run, capsys):
    train_cafm.main(["--config", str(JIT_RECIPE), "--pretrained_model_name_or_path", str(jit_flow_run), "--dry_run"])
    settings = json.loads(capsys.readouterr().out)
    assert settings["time_sampling"] == "logit_normal_jit" and settings["warmup_steps"] == 5000
    assert settings["num_discriminator_steps"] == 16 and settings["learning_rate"] == 1e-5 == settings["discriminator_learning_rate"]
    assert (settings["adam_beta1"], settings["adam_beta2"], settings["ema_decay"]) == (0.0, 0.95, 0.99)
    assert settings["vae"] == "none" and settings["train_batch_size"] == 128
    assert settings["_model"]["generator"]["class"] == "JiTTransformer2DModel"


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_the_jit_recipe_trains_at_toy_size(jit_flow_run, tmp_path):
    """The config's values train as they are (its data, size and length replaced by toy ones)."""
    out = tmp_path / "recipe"
    train_cafm.main(["--config", str(JIT_RECIPE), "--pretrained_model_name_or_path", str(jit_flow_run),
                     "--output_dir", str(out), "--dataset_name", "digits", "--resolution", "8", "--no-random_flip",
                     "--train_batch_size", "8", "--max_train_steps", "2", "--warmup_steps", "0",
                     "--num_discriminator_steps", "1", "--validation_inference_steps", "2", "--report_to", "none",
                     "--num_validation_classes", "2", "--num_validation_images", "1"])
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["step"] == 2
    assert type(AFMPipeline.from_pretrained(out).transformer) is JiTTransformer2DModel


def test_a_jit_config_with_an_unknown_key_is_refused_before_any_work(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**TINY_JIT, "in_context_lenght": 2}))
    with pytest.raises(ValueError, match=r"--model_config.*unknown key 'in_context_lenght'.*Did you mean 'in_context_len'"):
        train_flow_matching.main(["--output_dir", str(tmp_path / "out"), "--model_config", str(bad)])
    assert not (tmp_path / "out").exists()


def test_the_steps_draw_the_noise_at_the_models_scale():
    """JiT at 512 px doubles its noise (`noise_scale` 2): the training points must lie on that flow."""
    from diffusers_afm.training.cafm import CAFMObjective, CAFMTrainingStep

    model = JiTTransformer2DModel(**{k: v for k, v in TINY_JIT.items() if not k.startswith("_")}, sample_size=8,
                                  in_channels=1, num_classes=10, noise_scale=2.0)
    x0, labels = torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    step = CAFMTrainingStep(None, model, None, None, None, CAFMObjective(class_dropout_prob=0.0),
                            noise_generator=torch.Generator().manual_seed(0))
    _, noise, t = step.draw(x0, labels)
    reference = torch.Generator().manual_seed(0)
    torch.rand(4, generator=reference)  # the times are drawn first
    assert torch.equal(noise, 2.0 * torch.randn(x0.shape, generator=reference))
