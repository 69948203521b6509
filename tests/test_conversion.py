"""The authors' released layout converts into our models and reproduces their outputs."""

import subprocess
import sys

import pytest
import torch
from conftest import OFFICIAL, REPO
from safetensors.torch import load_file

from diffusers_afm import AFMPipeline
from diffusers_afm.conversion import (
    convert_official_classifier,
    convert_official_discriminator,
    convert_official_generator,
)

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


def test_convert_script_writes_a_loadable_pipeline(tmp_path, tiny_vae_dir):
    # A .pth state dict, as the authors release them.
    state_dict = load_file(OFFICIAL / "gen_1nfe.safetensors")
    pth = tmp_path / "gen_1nfe.pth"
    torch.save(state_dict, pth)
    out = tmp_path / "pipe"
    cmd = [sys.executable, str(REPO / "scripts" / "convert_afm_to_diffusers.py"), "--checkpoint", str(pth),
           "--num_heads", "4", "--vae", tiny_vae_dir, "--class_names", "none", "--output_dir", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

    pipe = AFMPipeline.from_pretrained(out)
    assert pipe.vae is not None and (out / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    io = load_file(OFFICIAL / "gen_1nfe_io.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(io["x"], io["y"]).sample, io["output"], atol=1e-5, rtol=0)
    images = pipe(class_labels=[1, 5], output_type="np").images
    assert images.shape == (2, 16, 16, 3)


def test_convert_refuses_pickled_code(tmp_path):
    """`.pth` files are read with weights_only=True: a checkpoint that carries arbitrary objects is refused."""
    from diffusers_afm.conversion.cli import load_checkpoint

    path = tmp_path / "evil.pth"
    torch.save({"x_embedder.proj.weight": torch.zeros(1), "payload": subprocess.Popen}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_checkpoint(str(path))


def test_convert_cli_rejects_bad_arguments(tmp_path):
    from diffusers_afm.conversion.cli import main

    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        main(["--checkpoint", str(tmp_path / "nope.pth"), "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="--nfe"):
        main(["--checkpoint", "x.pth", "--output_dir", str(tmp_path / "o"), "--nfe", "three"])
    pth = tmp_path / "g.pth"
    torch.save(load_file(OFFICIAL / "gen_1nfe.safetensors"), pth)
    with pytest.raises(ValueError, match="--model_size"):
        main(["--checkpoint", str(pth), "--output_dir", str(tmp_path / "o"), "--model_size", "XL/2", "--vae", "none"])
    assert not (tmp_path / "o").exists()
