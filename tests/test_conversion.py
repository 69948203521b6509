"""The authors' released layout converts into our models and reproduces their outputs."""

import re
import subprocess
import sys

import pytest
import torch
from conftest import OFFICIAL
from diffusers import DiffusionPipeline
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from diffusers_afm import AFM_PRESETS, AFMPipeline
from diffusers_afm.conversion import (
    convert_official_classifier,
    convert_official_discriminator,
    convert_official_generator,
    infer_reference_kwargs,
)
from diffusers_afm.conversion.cli import main
from diffusers_afm.conversion.files import CheckpointError, load_reference_state_dict

CONVERTERS = {
    "gen_1nfe": convert_official_generator,
    "gen_multi": convert_official_generator,
    "gen_deep": convert_official_generator,
    "dis": convert_official_discriminator,
    "cls": convert_official_classifier,
}


def _run(stem, model, io):
    if stem.startswith("gen"):
        return model(io["x"], io["y"], io.get("t_src"), io.get("t_tgt")).sample
    if stem == "dis":
        return model(io["x"], io["y"], io["t_tgt"])
    return model(io["x"], io["t_src"])


@pytest.mark.parametrize("stem", list(CONVERTERS))
def test_official_fixture_reproduced(stem, official_meta):
    state_dict = load_file(OFFICIAL / f"{stem}.safetensors")
    io = load_file(OFFICIAL / f"{stem}_io.safetensors")
    model = CONVERTERS[stem](state_dict, **official_meta[stem]["constructor_kwargs"])
    assert not model.training

    # Every block's token sequence matches the reference's, pass by pass (deep models call each block twice).
    calls = {}
    for i, block in enumerate(model.transformer_blocks):
        block.register_forward_hook(lambda m, a, out, i=i: calls.setdefault(i, []).append(out))
    with torch.no_grad():
        output = _run(stem, model, io)

    assert output.shape == io["output"].shape
    torch.testing.assert_close(output, io["output"], atol=1e-5, rtol=0)
    for i, outs in calls.items():
        for k, out in enumerate(outs):
            torch.testing.assert_close(out, io[f"debug.blocks.{i}.call{k}"], atol=1e-5, rtol=0)


def test_converted_config_matches_reference(official_meta):
    kwargs = official_meta["gen_multi"]["constructor_kwargs"]
    model = convert_official_generator(load_file(OFFICIAL / "gen_multi.safetensors"), **kwargs)
    assert model.config.use_timestep_src and model.config.use_timestep_tgt
    assert model.config.prediction_type == "velocity" and model.config.nfe is None
    assert model.num_parameters() == official_meta["gen_multi"]["num_params"] - 16 * 64  # minus pos_embed
    deep = convert_official_generator(
        load_file(OFFICIAL / "gen_deep.safetensors"), **official_meta["gen_deep"]["constructor_kwargs"]
    )
    assert deep.config.depth_repeat == 2 and deep.config.nfe == 1


def test_wrapper_prefixes_are_stripped(official_meta):
    state_dict = {f"module.{k}": v for k, v in load_file(OFFICIAL / "dis.safetensors").items()}
    io = load_file(OFFICIAL / "dis_io.safetensors")
    model = convert_official_discriminator(state_dict, **official_meta["dis"]["constructor_kwargs"])
    with torch.no_grad():
        torch.testing.assert_close(model(io["x"], io["y"], io["t_tgt"]), io["output"], atol=1e-5, rtol=0)


def test_bad_checkpoints_name_the_key(official_meta):
    kwargs = official_meta["gen_1nfe"]["constructor_kwargs"]
    good = load_file(OFFICIAL / "gen_1nfe.safetensors")

    renamed = dict(good)
    renamed["blocks.0.attn.qkv_typo.weight"] = renamed.pop("blocks.0.attn.qkv.weight")
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv_typo\.weight"):
        convert_official_generator(renamed, **kwargs)

    reshaped = dict(good)
    reshaped["blocks.1.mlp.fc1.weight"] = torch.zeros(128, 64)
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc1\.weight.*\(128, 64\)"):
        convert_official_generator(reshaped, **kwargs)

    missing = {k: v for k, v in good.items() if k != "final_layer.linear.bias"}
    with pytest.raises(ValueError, match=r"proj_out\.bias"):
        convert_official_generator(missing, **kwargs)

    # A time-conditioned checkpoint loaded as a 1-NFE model: its time embedder has nowhere to go.
    multi = load_file(OFFICIAL / "gen_multi.safetensors")
    with pytest.raises(ValueError, match=r"t_embedder"):
        convert_official_generator(multi, **kwargs)


def test_converters_read_the_shapes_off_the_weights(official_meta):
    """Without constructor arguments the converters read them off the weights; only the head count,
    which changes no shape, is given (or comes from a preset, below)."""
    for stem, extra in [("gen_1nfe", {}), ("gen_multi", {}), ("gen_deep", {"repeat": 2}), ("dis", {}), ("cls", {})]:
        io = load_file(OFFICIAL / f"{stem}_io.safetensors")
        model = CONVERTERS[stem](load_file(OFFICIAL / f"{stem}.safetensors"), num_heads=4, **extra)
        with torch.no_grad():
            torch.testing.assert_close(_run(stem, model, io), io["output"], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"2 layers of width 64.*not a preset.*num_heads"):
        convert_official_generator(load_file(OFFICIAL / "gen_1nfe.safetensors"))
    # A deep checkpoint's pass-time embedder looks like a source-time embedder: it needs `repeat` (or `nfe`).
    with pytest.raises(ValueError, match=r"t_embedder.*nfe.*repeat"):
        convert_official_generator(load_file(OFFICIAL / "gen_deep.safetensors"), num_heads=4)


@pytest.mark.parametrize("size,heads", [("S/2", 6), ("XL/2", 16)])
def test_preset_sizes_give_the_head_count(size, heads):
    """A checkpoint of a paper size (all released ones are) needs no arguments at all."""
    preset = AFM_PRESETS[size]
    width = preset["num_attention_heads"] * preset["attention_head_dim"]
    shapes = {"x_embedder.proj.weight": (width, 4, 2, 2), "pos_embed": (1, 256, width), "y_embedder.embedding_table.weight": (1000, width)}
    shapes.update({f"blocks.{i}.attn.qkv.weight": (3 * width, width) for i in range(preset["num_layers"])})
    state_dict = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    kwargs = infer_reference_kwargs(state_dict)
    assert kwargs == dict(input_size=32, patch_size=2, in_channels=4, hidden_size=width, depth=preset["num_layers"], num_heads=heads, num_classes=1000)
    assert infer_reference_kwargs(state_dict, num_heads=3)["num_heads"] == 3


def _convert_args(tmp_path, checkpoint, *extra):
    return ["--checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "pipe"), "--vae", "none", "--class_names", "none", *extra]


def _exit_code(argv):
    """What the `afm-convert` console script does: `sys.exit(main())`."""
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main(argv))
    return exit_info.value.code or 0


def test_afm_convert_writes_a_loadable_pipeline_and_exits_0(tmp_path, tiny_vae_dir):
    # A .pth state dict, as the authors release them.
    pth = tmp_path / "gen_1nfe.pth"
    torch.save(load_file(OFFICIAL / "gen_1nfe.safetensors"), pth)
    out = tmp_path / "pipe"
    argv = ["--checkpoint", str(pth), "--num_heads", "4", "--vae", tiny_vae_dir, "--class_names", "none", "--output_dir", str(out)]
    assert _exit_code(argv) == 0

    pipe = AFMPipeline.from_pretrained(out)
    assert pipe.vae is not None and (out / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    io = load_file(OFFICIAL / "gen_1nfe_io.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(io["x"], io["y"]).sample, io["output"], atol=1e-5, rtol=0)
    images = pipe(class_labels=[1, 5], output_type="np").images
    assert images.shape == (2, 16, 16, 3)
    assert type(DiffusionPipeline.from_pretrained(out)) is AFMPipeline

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and "class-conditional" in card.data.tags
    assert "diffusers-training" not in card.data.tags and card.data.license is None
    assert "reference checkpoint `gen_1nfe.pth`" in card.text and 'AFMPipeline.from_pretrained("pipe")' in card.text
    assert not (out / "pipeline_afm.py").exists() and "trust_remote_code" not in card.text


def test_afm_convert_standalone_and_card_flags(tmp_path):
    pth = tmp_path / "gen_multi.pth"
    torch.save(load_file(OFFICIAL / "gen_multi.safetensors"), pth)
    argv = _convert_args(tmp_path, pth, "--num_heads", "4", "--standalone", "--dataset", "user/my-data", "--license", "mit")
    assert _exit_code(argv) == 0
    out = tmp_path / "pipe"
    assert (out / "pipeline_afm.py").is_file() and (out / "transformer" / "transformer_afm.py").is_file()
    card = ModelCard.load(out / "README.md")
    assert card.data.datasets == ["user/my-data"] and card.data.license == "mit"
    assert 'DiffusionPipeline.from_pretrained("pipe", trust_remote_code=True)' in card.text
    pipe = AFMPipeline.from_pretrained(out)  # the installed code, no remote code asked for
    assert pipe.transformer.config.nfe is None and type(pipe) is AFMPipeline


def test_convert_refuses_pickled_code(tmp_path):
    """`.pth` files are read with weights_only=True: a checkpoint that carries arbitrary objects is refused."""
    path = tmp_path / "evil.pth"
    torch.save({"x_embedder.proj.weight": torch.zeros(1), "payload": subprocess.Popen}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pth.*objects other than tensors.*weights_only=True.*Unsupported global.*Popen"):
        load_reference_state_dict(str(path))


def _bad_files(tmp_path):
    state_dict = load_file(OFFICIAL / "gen_1nfe.safetensors")
    good_pth, good_st = tmp_path / "good.pth", tmp_path / "good.safetensors"
    torch.save(state_dict, good_pth)
    save_file(state_dict, good_st)
    files = {
        "junk.pth": bytes(range(256)) * 4,
        "text.pth": b"hello",
        "truncated.pth": good_pth.read_bytes()[:5000],
        "truncated.safetensors": good_st.read_bytes()[:5000],
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    torch.save({"optimizer": {"step": torch.zeros(())}, "epoch": 3}, tmp_path / "nested.pth")
    torch.save({"pos_embed": torch.zeros(1, 16, 64)}, tmp_path / "not_afm.pth")
    return {
        "junk.pth": r"junk\.pth.*cannot be read: not a complete torch\.save archive",
        "text.pth": r"text\.pth.*cannot be read: not a complete torch\.save archive",
        "truncated.pth": r"truncated\.pth.*cannot be read: not a complete torch\.save archive.*truncated",
        "truncated.safetensors": r"truncated\.safetensors.*cannot be read: not a complete safetensors file",
        "tensor.pth": r"tensor\.pth.*holds a Tensor, not a state dict",
        "nested.pth": r"nested\.pth.*no tensors at its top level.*\['epoch', 'optimizer'\].*--state_dict_key",
        "not_afm.pth": r"not_afm\.pth.*not an AFM checkpoint.*x_embedder",
    }


def test_afm_convert_bad_files_are_one_line_errors(tmp_path, capsys):
    """Each unreadable or foreign file: exit status 1, one line that names the file and what was
    expected, no traceback, no output folder."""
    for name, pattern in _bad_files(tmp_path).items():
        assert _exit_code(_convert_args(tmp_path, tmp_path / name)) == 1, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("afm-convert: error: `--checkpoint`"), err
        assert re.search(pattern, err, flags=re.IGNORECASE), (name, err)
        assert "Traceback" not in err
    assert not (tmp_path / "pipe").exists()


def test_afm_convert_flag_errors_exit_2(tmp_path, capsys):
    pth = tmp_path / "g.pth"
    torch.save(load_file(OFFICIAL / "gen_1nfe.safetensors"), pth)
    (tmp_path / "g.txt").write_text("weights")
    cases = [
        (["--checkpoint", str(tmp_path / "nope.pth")], r"--checkpoint`: no file at .*nope\.pth"),
        (["--checkpoint", str(tmp_path / "g.txt")], r"--checkpoint` must be a \.pth, .* file, got .*g\.txt"),
        (["--nfe", "three"], r"--nfe.*positive integer or 'any'.*three"),
        (["--model_size", "XXL/2"], r"--model_size.*invalid choice"),
        (["--depth_repeat", "2", "--nfe", "2"], r"--depth_repeat.*1-NFE"),
        (["--class_names", "missing.json"], r"--class_names.*JSON file"),
        (["--state_dict_key", "ema"], r"--state_dict_key.*'ema' is not in"),
        # The VAE is loaded once the checkpoint has converted (a readable checkpoint, its head count given).
        (["--num_heads", "4", "--vae", str(tmp_path / "no_vae")], r"--vae.*cannot be loaded.*'none'"),
    ]
    for extra, pattern in cases:
        argv = _convert_args(tmp_path, pth) + extra
        assert _exit_code(argv) == 2, extra
        err = capsys.readouterr().err
        assert re.search(pattern, err) and err.count("\n") == 1, (extra, err)
    # A checkpoint that disagrees with --model_size is a checkpoint error (status 1).
    assert _exit_code(_convert_args(tmp_path, pth, "--model_size", "XL/2")) == 1
    assert re.search(r"g\.pth.*XL/2 has 28 layers of width 1152.*2 layers of width 64", capsys.readouterr().err)
    assert not (tmp_path / "pipe").exists()


def test_afm_convert_reads_the_checkpoint_before_the_vae(tmp_path, capsys, monkeypatch):
    """Offline, with the default Hub VAE not in the cache: a missing or malicious checkpoint is
    reported as the checkpoint's error, not as the VAE's; a good one reaches the VAE."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # the SD-VAE is surely not cached here
    evil = tmp_path / "evil.pth"
    torch.save({"x_embedder.proj.weight": torch.zeros(1), "payload": subprocess.Popen}, evil)
    good = tmp_path / "good.pth"
    torch.save(load_file(OFFICIAL / "gen_1nfe.safetensors"), good)
    base = ["--output_dir", str(tmp_path / "pipe"), "--class_names", "none", "--num_heads", "4"]
    for checkpoint, code, pattern in [
        (tmp_path / "missing.pth", 2, r"`--checkpoint`: no file at .*missing\.pth"),
        (evil, 1, r"`--checkpoint`.*evil\.pth.*objects other than tensors"),
        (good, 2, r"`--vae` 'stabilityai/sd-vae-ft-mse' cannot be loaded"),
    ]:
        assert _exit_code(["--checkpoint", str(checkpoint), *base]) == code, checkpoint
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search(pattern, err), err
    assert not (tmp_path / "pipe").exists()


def test_afm_convert_saves_in_the_dtype_asked_for(tmp_path):
    pth = tmp_path / "g.pth"
    torch.save(load_file(OFFICIAL / "gen_1nfe.safetensors"), pth)
    assert _exit_code(_convert_args(tmp_path, pth, "--num_heads", "4", "--dtype", "bfloat16")) == 0
    weights = load_file(tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
