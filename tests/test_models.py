"""The generator, discriminator and classifier as diffusers models."""

import pytest
import torch
from conftest import randomize_, tiny_generator_config

from diffusers_afm import (
    AdversarialFlowClassifier,
    AdversarialFlowDiscriminator,
    AdversarialFlowTransformer2DModel,
    preset_config,
)


def _trunk(**kw):
    config = tiny_generator_config()
    config.update(kw)
    return config


def _models():
    torch.manual_seed(0)
    gen = randomize_(AdversarialFlowTransformer2DModel(**_trunk(use_timestep_src=True, use_timestep_tgt=True,
                                                                  prediction_type="velocity", nfe=None)))
    dis = randomize_(AdversarialFlowDiscriminator(**_trunk(use_timestep=True)))
    cls = randomize_(AdversarialFlowClassifier(**_trunk()))
    return gen, dis, cls


def _call(model, x, y, t):
    if isinstance(model, AdversarialFlowTransformer2DModel):
        return model(x, y, t, t * 0.5).sample
    if isinstance(model, AdversarialFlowDiscriminator):
        return model(x, y, t)
    return model(x, t)


def test_paper_parameter_counts():
    # docs/method.md: generator parameters at 1 NFE, ImageNet 256 latents (4 x 32 x 32), 1000 classes.
    expected = {"B/2": 129.5, "M/2": 305.4, "L/2": 456.5, "XL/2": 673.2}
    for name, millions in expected.items():
        with torch.device("meta"):
            model = AdversarialFlowTransformer2DModel(**preset_config(name))
        assert round(model.num_parameters() / 1e6, 1) == millions


@pytest.mark.parametrize("index", [0, 1, 2])
def test_gradient_checkpointing_gives_the_same_gradients(index):
    x, y, t = torch.randn(3, 4, 8, 8), torch.tensor([0, 3, 9]), torch.tensor([0.9, 0.5, 0.2])
    grads = []
    for checkpointing in (False, True):
        model = _models()[index].train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        _call(model, x, y, t).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_save_load_round_trip(index, tmp_path):
    model = _models()[index].eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = type(model).from_pretrained(tmp_path).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    x, y, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0.7, 0.3])
    with torch.no_grad():
        # Not bit-for-bit: the loaded weights are memory-mapped at other alignments, and CPU matrix
        # kernels may then round their last bit differently.
        torch.testing.assert_close(_call(model, x, y, t), _call(loaded, x, y, t), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_bf16_forward(index):
    model = _models()[index].to(torch.bfloat16).eval()
    x, y, t = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16), torch.tensor([1, 2]), torch.tensor([0.7, 0.3])
    with torch.no_grad():
        reference = _call(_models()[index].eval(), x.float(), y, t)
        out = _call(model, x, y, t)
    # The discriminator and classifier read their token out in fp32 (finite-difference R1/R2 needs it).
    assert out.dtype == (torch.bfloat16 if index == 0 else torch.float32) and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), reference, atol=0.05 * reference.abs().max().item() + 1e-2, rtol=0.05)


def test_fused_qkv_projections_give_the_same_output():
    model = _models()[0].eval()
    x, y, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0.7, 0.3])
    with torch.no_grad():
        before = _call(model, x, y, t)
        model.fuse_qkv_projections()
        after = _call(model, x, y, t)
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-5)


def test_adaln_zero_initialisation_still_trains():
    # adaLN-Zero (docs/method.md, model sizes): blocks start as the identity and G's output layer at zero,
    # yet the gradient reaches every block's modulation, so both networks leave that point at once.
    gen = AdversarialFlowTransformer2DModel(**tiny_generator_config())
    out = gen(torch.randn(2, 4, 8, 8), torch.tensor([0, 1])).sample
    assert torch.equal(out, torch.zeros_like(out))
    dis = AdversarialFlowDiscriminator(**tiny_generator_config())
    logits = dis(torch.randn(4, 4, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert logits.shape == (4,)
    (logits * torch.tensor([1.0, -1.0, 2.0, 0.5])).sum().backward()
    for block in dis.transformer_blocks:
        assert block.norm1.linear.weight.grad.abs().sum() > 0


def test_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="prediction_type"):
        AdversarialFlowTransformer2DModel(**tiny_generator_config(prediction_type="epsilon"))
    with pytest.raises(ValueError, match="nfe"):
        AdversarialFlowTransformer2DModel(**tiny_generator_config(nfe=0))
    with pytest.raises(ValueError, match="use_timestep_src"):
        AdversarialFlowTransformer2DModel(**tiny_generator_config(nfe=2, prediction_type="velocity"))
    with pytest.raises(ValueError, match="depth_repeat"):
        AdversarialFlowTransformer2DModel(**tiny_generator_config(depth_repeat=0))
    with pytest.raises(ValueError, match="Unknown model size"):
        preset_config("XXL/2")


def test_forward_input_errors():
    gen = AdversarialFlowTransformer2DModel(**tiny_generator_config(use_timestep_src=True, nfe=2,
                                                                     prediction_type="velocity"))
    with pytest.raises(ValueError, match="timestep_src"):
        gen(torch.randn(2, 4, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="hidden_states"):
        gen(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), 1.0)
