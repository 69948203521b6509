"""Continuous AFM with LoRA (training/lora.py): one frozen base shared by both networks, adapter-only
gradients, the JVP through adapted layers, checkpoints of adapters only, and the diffusers LoRA a run
writes, loaded by plain diffusers + peft (docs/cafm.md, "One GPU: LoRA")."""

import copy
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, randomize_
from safetensors.torch import load_file

from diffusers_afm import AdversarialFlowDiscriminator, AFMPipeline, FlowMatchingTransformer2DModel
from diffusers_afm.training.cafm import CAFMObjective, CAFMTrainingStep
from diffusers_afm.training.lora import (
    AdapterEMA,
    LoRASettings,
    add_adapters,
    merge_adapter,
    trainable_parameters,
)

import make_tiny_zimage
import train_cafm
import train_cafm_t2i
import train_flow_matching

TINY = str(REPO / "tests" / "fixtures" / "tiny_model.json")


def tiny_pair(seed=0):
    """A randomised tiny flow model and its CAFM discriminator (initialised from it)."""
    torch.manual_seed(seed)
    generator = randomize_(FlowMatchingTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=16,
        num_classes=10, class_dropout_prob=0.1), seed=seed)
    return generator, AdversarialFlowDiscriminator.for_flow_model(generator)


def randomize_adapters_(model, seed=1):
    """Nonzero B matrices: a zero-initialised adapter would hide a wrong merge or a missing path."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def _base(model):
    return {n: p for n, p in model.named_parameters() if not p.requires_grad}


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, t, y = torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, generator=g), torch.tensor([1, 5, 10])
    tangents = (torch.randn(2, 3, 4, 8, 8, generator=g), torch.ones(2, 3))
    return x, t, y, tangents


# ----------------------------------------------------------------------------- the library
def test_zero_initialised_adapters_give_the_full_models_outputs_and_share_one_base():
    generator, discriminator = tiny_pair()
    full_g, full_d = copy.deepcopy(generator), copy.deepcopy(discriminator)
    counts = add_adapters(generator, discriminator, LoRASettings(lora_rank=4))
    x, t, y, tangents = _inputs()
    with torch.no_grad():
        assert torch.equal(generator(x, t, y).sample, full_g(x, t, y).sample)
        assert torch.equal(discriminator(x, y, t), full_d(x, y, t))  # the first logits: the full model's
        for a, b in zip(discriminator(x, y, t, tangents=tangents), full_d(x, y, t, tangents=tangents)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # Every trunk tensor of D is G's (the same storage), and frozen; D's token and head are its own.
    g_params = dict(generator.named_parameters())
    shared = [n for n, p in discriminator.named_parameters()
              if ".base_layer." in n or n.startswith(("pos_embed.", "class_embedder.", "time_embed."))
              or (n.startswith("transformer_blocks.") and ".lora_" not in n)]
    assert shared and all(discriminator.get_parameter(n).data_ptr() == g_params[n].data_ptr() for n in shared)
    assert not any(p.requires_grad for n, p in discriminator.named_parameters() if n in shared)
    assert {n for n, p in discriminator.named_parameters() if p.requires_grad and ".lora_" not in n} == {"token", "proj_out.weight"}
    assert all(".lora_" in n for n, p in generator.named_parameters() if p.requires_grad)
    # rank 4 on q, k, v, out (32 -> 32) and the MLP (32 -> 128 -> 32), two blocks: 4 * (4 * 64 + 2 * 160) * 2
    assert counts["generator_adapter"] == counts["discriminator_adapter"] == 4 * (4 * 64 + 2 * 160) * 2
    assert counts["discriminator_head"] == 32 + 32 and counts["base"] == sum(p.numel() for p in full_g.parameters())


def test_jvp_through_adapters_equals_the_jvp_of_a_merged_copy():
    generator, discriminator = tiny_pair()
    plain_g, plain_d = copy.deepcopy(generator), copy.deepcopy(discriminator)
    settings = LoRASettings(lora_rank=4, lora_alpha=8)
    add_adapters(generator, discriminator, settings)
    randomize_adapters_(generator, 1)
    randomize_adapters_(discriminator, 2)
    x, t, y, tangents = _inputs()
    with torch.no_grad():
        base_logits = plain_d(x, y, t)
    merged_g, merged_d = merge_adapter(plain_g, generator), merge_adapter(plain_d, discriminator)
    merged_d.load_state_dict({k: v for k, v in discriminator.state_dict().items() if k in ("token", "proj_out.weight")}, strict=False)
    assert not any("lora" in n for n, _ in merged_d.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(generator(x, t, y).sample, merged_g(x, t, y).sample, rtol=1e-5, atol=1e-5)
        logits, jvps = discriminator(x, y, t, tangents=tangents)
        merged_logits, merged_jvps = merged_d(x, y, t, tangents=tangents)
    torch.testing.assert_close(logits, merged_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(jvps, merged_jvps, rtol=1e-5, atol=1e-5)
    # The adapter matters: the merged weights are not the base's.
    assert (logits - base_logits).abs().max() > 1e-3


def _step(generator, discriminator, warmup=1, mixed_precision="no"):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    optimizer_g = torch.optim.AdamW(trainable_parameters(generator), lr=1e-2, betas=(0.0, 0.95))
    optimizer_d = torch.optim.AdamW(trainable_parameters(discriminator), lr=1e-2, betas=(0.0, 0.95))
    ema = AdapterEMA(generator)
    step = CAFMTrainingStep(accelerator, generator, discriminator, optimizer_g, optimizer_d,
                            CAFMObjective(warmup=warmup, num_discriminator_steps=1), ema=ema,
                            null_class_id=generator.null_class_id, noise_generator=torch.Generator().manual_seed(0))
    return step, ema


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_d_and_g_steps_change_only_the_adapters_and_the_head():
    generator, discriminator = tiny_pair()
    add_adapters(generator, discriminator, LoRASettings(lora_rank=4))
    base = {n: p.detach().clone() for n, p in _base(generator).items()}
    pointers = {n: p.data_ptr() for n, p in _base(generator).items()}
    trained_d = {n: p.detach().clone() for n, p in discriminator.named_parameters() if p.requires_grad}
    trained_g = {n: p.detach().clone() for n, p in generator.named_parameters() if p.requires_grad}
    step, ema = _step(generator, discriminator)
    x0, labels = torch.randn(4, 4, 8, 8), torch.tensor([0, 1, 2, 3])
    # warm-up 1, N = 1: steps 0, 1, 2 are D steps, 3 is a G step.
    for i in range(3):
        step(x0, labels, i)
    assert all(torch.equal(p, trained_g[n]) for n, p in generator.named_parameters() if p.requires_grad)  # D steps leave G alone
    step(x0, labels, 3)
    assert all(torch.equal(p, base[n]) and p.data_ptr() == pointers[n] and not p.requires_grad
               for n, p in _base(generator).items())  # the base: untouched by both steps, still frozen
    assert all(p.grad is None for p in _base(generator).values())
    changed_d = [n for n, p in discriminator.named_parameters() if p.requires_grad and not torch.equal(p, trained_d[n])]
    assert "token" in changed_d and "proj_out.weight" in changed_d and any(".lora_B." in n for n in changed_d)
    assert any(not torch.equal(p, trained_g[n]) for n, p in generator.named_parameters() if ".lora_B." in n)
    # The EMA holds the generator's adapter only and shares its base.
    assert set(ema.state_dict()) == {n for n, p in generator.named_parameters() if p.requires_grad}
    ema_params = dict(ema.full_model().named_parameters())
    assert all(ema_params[n].data_ptr() == p.data_ptr() for n, p in _base(generator).items())


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_bf16_and_gradient_checkpointing_work_through_the_adapters():
    grads = {}
    for checkpointing in (False, True):
        generator, discriminator = tiny_pair()
        add_adapters(generator, discriminator, LoRASettings(lora_rank=4))
        randomize_adapters_(discriminator, 2)
        if checkpointing:
            generator.enable_gradient_checkpointing()
            discriminator.enable_gradient_checkpointing()
        step, _ = _step(generator, discriminator)
        labels, noise, t = step.draw(torch.randn(4, 4, 8, 8), torch.tensor([0, 1, 2, 3]))
        x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        loss, _ = step.discriminator_objective(x0, labels, noise, t)
        loss.backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in discriminator.named_parameters() if p.requires_grad}
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-5, atol=1e-6)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    generator, discriminator = tiny_pair()
    add_adapters(generator, discriminator, LoRASettings(lora_rank=4))
    step, _ = _step(generator, discriminator, mixed_precision="bf16")
    logs = [step(torch.randn(4, 4, 8, 8), torch.tensor([0, 1, 2, 3]), i) for i in range(4)]
    assert all(torch.isfinite(v).all() for log in logs for v in log.values())


# ----------------------------------------------------------------------------- train_cafm.py --lora_rank
def _cafm(out, pretrained, *flags):
    return train_cafm.main(["--output_dir", str(out), "--pretrained_model_name_or_path", str(pretrained),
                            "--train_batch_size", "16", "--report_to", "none", "--num_validation_images", "2",
                            "--warmup_steps", "3", "--num_discriminator_steps", "2", "--validation_steps", "100",
                            "--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2", "--ema_decay", "0.5", *flags])


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    out = tmp_path_factory.mktemp("fm")
    train_flow_matching.main(["--output_dir", str(out), "--model_config", TINY, "--train_batch_size", "16",
                              "--report_to", "none", "--num_validation_images", "2", "--max_train_steps", "10",
                              "--checkpointing_steps", "10", "--validation_steps", "10"])
    AcceleratorState._reset_state(True)
    return out


@pytest.fixture(scope="module")
def lora_runs(flow_run, tmp_path_factory):
    """The same LoRA run twice: written as a diffusers LoRA, and with --merge_lora as a fused pipeline."""
    from accelerate.state import AcceleratorState

    root = tmp_path_factory.mktemp("cafm_lora")
    for name, flags in (("adapter", ()), ("merged", ("--merge_lora",))):
        AcceleratorState._reset_state(True)
        _cafm(root / name, flow_run, "--max_train_steps", "8", "--checkpointing_steps", "4", *flags)
    AcceleratorState._reset_state(True)
    return root


def test_cafm_lora_writes_a_diffusers_lora_that_samples_as_the_merged_pipeline(flow_run, lora_runs):
    out, merged_dir = lora_runs / "adapter", lora_runs / "merged"
    assert (out / "pytorch_lora_weights.safetensors").exists() and not (out / "model_index.json").exists()
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in weights)
    # Checkpoints: the adapters (G; D with its token and head) and their optimiser states, never the base.
    g, d = (load_file(out / "checkpoint-8" / name) for name in ("model.safetensors", "model_1.safetensors"))
    assert all(".lora_" in k for k in g) and set(d) - {k for k in d if ".lora_" in k} == {"token", "proj_out.weight"}
    assert set(load_file(out / "checkpoint-8" / "ema.safetensors")) == set(g)
    start = AFMPipeline.from_pretrained(flow_run).transformer.num_parameters()
    assert sum(v.numel() for v in g.values()) < start / 4
    card = (out / "README.md").read_text()
    assert "lora" in card.split("---")[1] and "load_lora_adapter" in card and "from the local model" in card
    assert "discriminator_lora.safetensors" in card and (out / "discriminator_lora.safetensors").exists()
    # diffusers' PEFT integration loads the file into the base's transformer; it samples as the fused folder.
    pipe = AFMPipeline.from_pretrained(flow_run)
    pipe.transformer.load_lora_adapter(str(out), weight_name="pytorch_lora_weights.safetensors", prefix="transformer")
    merged = AFMPipeline.from_pretrained(merged_dir)
    assert type(merged.transformer) is FlowMatchingTransformer2DModel
    kwargs = dict(class_labels=[1, 7], num_inference_steps=4, guidance_scale=1.5, output_type="np")
    a = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    b = merged(**kwargs, generator=torch.Generator().manual_seed(0)).images
    base = AFMPipeline.from_pretrained(flow_run)(**kwargs, generator=torch.Generator().manual_seed(0)).images
    # Adapter vs fused: float rounding (6e-8 measured); the adapter itself moved the samples (2e-4) from the base.
    assert np.abs(a - b).max() < 1e-5 and np.abs(a - base).max() > 5e-5, (np.abs(a - b).max(), np.abs(a - base).max())
    assert (merged_dir / "discriminator_lora.safetensors").exists()


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_cafm_lora_resume_is_bit_for_bit(flow_run, lora_runs, tmp_path):
    from accelerate.state import AcceleratorState

    resumed = tmp_path / "resumed"
    _cafm(resumed, flow_run, "--max_train_steps", "4", "--checkpointing_steps", "4")
    AcceleratorState._reset_state(True)
    _cafm(resumed, flow_run, "--max_train_steps", "8", "--checkpointing_steps", "4", "--resume_from_checkpoint", "latest")
    straight = lora_runs / "adapter"
    for name in ("model.safetensors", "model_1.safetensors", "ema.safetensors", "optimizer.bin", "optimizer_1.bin"):
        if name.endswith(".bin"):
            a, b = (torch.load(f / "checkpoint-8" / name, weights_only=True)["state"] for f in (straight, resumed))
            assert a.keys() == b.keys() and all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i]), name
        else:
            a, b = load_file(straight / "checkpoint-8" / name), load_file(resumed / "checkpoint-8" / name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert load_file(straight / "pytorch_lora_weights.safetensors").keys() == load_file(resumed / "pytorch_lora_weights.safetensors").keys()


@pytest.mark.parametrize("flags, message", [
    (("--lora_rank", "0"), r"`--lora_rank` got 0; allowed: an integer >= 1"),
    (("--lora_rank", "4", "--lora_target_modules", "attn.to_q,attn.nothing"), r"`--lora_target_modules` got 'attn.nothing'"),
    (("--lora_rank", "4", "--lora_target_modules", "pos_embed.proj"), r"`--lora_target_modules` got 'pos_embed.proj'.*linear"),
    (("--lora_rank", "4", "--lora_dropout", "1.5"), r"`--lora_dropout` got 1.5"),
    (("--lora_alpha", "8",), r"`--lora_alpha` got 8.0; allowed: unset without --lora_rank"),
    (("--lora_rank", "4", "--discriminator", "FLOW"), r"`--discriminator` got .*discriminator_lora.safetensors"),
])
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_cafm_lora_bad_input_is_one_line_before_any_work(flow_run, tmp_path, flags, message, monkeypatch, capsys):
    from diffusers_afm.training import cli

    flags = [str(flow_run) if f == "FLOW" else f for f in flags]
    monkeypatch.setattr(sys, "argv", ["train_cafm.py", "--output_dir", str(tmp_path / "out"),
                                      "--pretrained_model_name_or_path", str(flow_run), *flags])
    with pytest.raises(SystemExit) as exit_info:
        cli.run_trainer(train_cafm.parse_args, train_cafm.settings, train_cafm.train)
    code = exit_info.value.code
    output = capsys.readouterr().err + (code if isinstance(code, str) else "")
    assert code not in (0, None) and re.search(message, output), output[-2000:]
    assert "Traceback" not in output and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- train_cafm_t2i.py --lora_rank
@pytest.fixture(scope="module")
def zimage_lora(tmp_path_factory):
    """A tiny Z-Image pipeline, and the same LoRA run on it twice: adapter file and --merge_lora."""
    from accelerate.state import AcceleratorState

    root = tmp_path_factory.mktemp("zimage_lora")
    make_tiny_zimage.main(["--pipeline_dir", str(root / "pipe"), "--images_dir", str(root / "images"), "--num_images", "16"])
    for name, flags in (("adapter", ()), ("merged", ("--merge_lora",))):
        AcceleratorState._reset_state(True)
        train_cafm_t2i.main([
            "--pretrained_model_name_or_path", str(root / "pipe"), "--train_data_dir", str(root / "images"),
            "--caption_column", "text", "--resolution", "16", "--train_batch_size", "4", "--warmup_steps", "2",
            "--num_discriminator_steps", "1", "--validation_inference_steps", "2", "--validation_prompt", "a red digit seven",
            "--report_to", "none", "--output_dir", str(root / name), "--max_train_steps", "6", "--checkpointing_steps", "3",
            "--validation_steps", "100", "--lora_rank", "4", "--learning_rate", "1e-2", "--discriminator_learning_rate", "1e-2",
            "--ema_decay", "0.5", "--mixed_precision", "bf16", "--gradient_checkpointing", *flags])
    AcceleratorState._reset_state(True)
    return root


def test_zimage_lora_loads_in_plain_diffusers_and_samples_as_the_merged_pipeline(zimage_lora):
    out, merged = zimage_lora / "adapter", zimage_lora / "merged"
    assert (out / "pytorch_lora_weights.safetensors").exists() and (out / "discriminator_lora.safetensors").exists()
    assert not (out / "transformer").exists() and (merged / "transformer").exists() and (merged / "model_index.json").exists()
    card = (out / "README.md").read_text()
    assert "lora" in card.split("---")[1] and "load_lora_weights" in card and "ZImagePipeline.from_pretrained" in card
    checkpoint = load_file(out / "checkpoint-6" / "model.safetensors")
    assert checkpoint and all(".lora_" in k for k in checkpoint)  # the adapters only, never the 6B base
    # diffusers + peft alone (diffusers_afm cannot be imported): the base pipeline, then the adapter; the
    # fused pipeline of --merge_lora samples the same image; the base alone another.
    code = ("import sys; sys.modules['diffusers_afm'] = None\n"
            "import numpy as np, torch; from diffusers import ZImagePipeline\n"
            "def sample(pipe):\n"
            "    return pipe('a blue digit two', height=16, width=16, num_inference_steps=4, guidance_scale=1.0,\n"
            "                output_type='np', generator=torch.Generator().manual_seed(0)).images\n"
            f"pipe = ZImagePipeline.from_pretrained({str(zimage_lora / 'pipe')!r})\n"
            "base = sample(pipe)\n"
            f"pipe.load_lora_weights({str(out)!r})\n"
            "adapted = sample(pipe)\n"
            f"fused = sample(ZImagePipeline.from_pretrained({str(merged)!r}))\n"
            "print('adapter-vs-fused', np.abs(adapted - fused).max(), 'adapter-vs-base', np.abs(adapted - base).max())\n"
            "assert np.abs(adapted - fused).max() < 1e-4\n"
            "assert np.abs(adapted - base).max() > 1e-3\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)


def test_zimage_lora_dry_run_prints_the_one_gpu_memory_plan(zimage_lora, capsys):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    train_cafm_t2i.main(["--pretrained_model_name_or_path", str(zimage_lora / "pipe"), "--train_data_dir",
                         str(zimage_lora / "images"), "--resolution", "16", "--lora_rank", "16", "--mixed_precision", "bf16",
                         "--dry_run", "--output_dir", str(zimage_lora / "dry")])
    printed = capsys.readouterr().out
    plan = __import__("json").loads(printed[printed.index("{"):])["_model"]["memory_plan"]
    rows = plan["with activations"]["rows"]
    assert [(r["resolution"], r["batch per GPU"]) for r in rows] == [(512, 1), (512, 4), (1024, 1), (1024, 4)]
    assert all(r["total GiB"] >= r["activations GiB"] >= 0 and r["tokens per sample"] == (r["resolution"] // 16) ** 2 + 512 for r in rows)
    assert any("base weights" in p["part"] for p in plan["parts"]) and not (zimage_lora / "dry").exists()
