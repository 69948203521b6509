"""AFMPipeline: sampling, labels, outputs, saving and loading, and its input errors."""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import randomize_, tiny_generator_config

from diffusers_afm import AdversarialFlowTransformer2DModel, AFMPipeline, flow

ID2LABEL = {0: "tench, Tinca tinca", 1: "golden retriever", 2: "crane", 3: "crane", 4: "great white shark, white shark"}


def _pipe(vae=None, **config):
    torch.manual_seed(0)
    transformer = randomize_(AdversarialFlowTransformer2DModel(**tiny_generator_config(num_classes=5, **config)))
    return AFMPipeline(transformer=transformer.eval(), vae=vae, id2label=ID2LABEL)


def _seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def test_one_step_is_one_forward_pass():
    pipe = _pipe(in_channels=3)
    calls = []
    pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    z = torch.randn(2, 3, 8, 8)
    images = pipe(class_labels=[0, 1], latents=z, output_type="pt").images
    assert len(calls) == 1
    expected = pipe.transformer(z, torch.tensor([0, 1])).sample
    torch.testing.assert_close(images, (expected / 2 + 0.5).clamp(0, 1))


def test_labels_by_id_and_whole_name():
    pipe = _pipe()
    assert pipe.get_label_ids(["Golden Retriever", "tench", "white shark"]) == [1, 0, 4]
    latents = torch.randn(3, 4, 8, 8)
    by_name = pipe(class_labels=["golden retriever", "tench", 4], latents=latents, output_type="latent").images
    by_id = pipe(class_labels=[1, 0, 4], latents=latents, output_type="latent").images
    assert torch.equal(by_name, by_id)


def test_unknown_and_ambiguous_names_are_clear_errors():
    pipe = _pipe()
    with pytest.raises(ValueError, match=r"class_labels.*'retriever'.*'golden retriever'"):
        pipe(class_labels=["retriever"])
    with pytest.raises(ValueError, match=r"class_labels.*'golden retreiver'.*golden retriever"):
        pipe(class_labels=["golden retreiver"])
    with pytest.raises(ValueError, match=r"ambiguous.*2.*3"):
        pipe(class_labels=["crane"])
    with pytest.raises(ValueError, match=r"class_labels.*out of range.*0\.\.4"):
        pipe(class_labels=[5])
    with pytest.raises(ValueError, match=r"class_labels.*out of range"):
        pipe(class_labels=[-1])


def test_deterministic_and_same_alone_or_in_a_batch():
    pipe = _pipe()
    a = pipe(class_labels=[2, 1, 0], generator=_seeded(7), output_type="latent").images
    b = pipe(class_labels=[2, 1, 0], generator=_seeded(7), output_type="latent").images
    assert torch.equal(a, b)
    alone = pipe(class_labels=[2], generator=_seeded(7), output_type="latent").images
    torch.testing.assert_close(alone[0], a[0], atol=1e-5, rtol=0)
    per_sample = pipe(class_labels=[1, 0], generator=[_seeded(1), _seeded(2)], output_type="latent").images
    second_alone = pipe(class_labels=[0], generator=[_seeded(2)], output_type="latent").images
    torch.testing.assert_close(per_sample[1], second_alone[0], atol=1e-5, rtol=0)
    assert not torch.allclose(a, pipe(class_labels=[2, 1, 0], generator=_seeded(8), output_type="latent").images)


def test_output_types(tiny_vae_dir):
    from diffusers import AutoencoderKL

    pipe = _pipe(vae=AutoencoderKL.from_pretrained(tiny_vae_dir))
    latents = torch.randn(2, 4, 8, 8)
    kw = dict(class_labels=[0, 1], latents=latents)
    pil = pipe(**kw).images
    assert len(pil) == 2 and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (16, 16)
    np_images = pipe(**kw, output_type="np").images
    assert np_images.shape == (2, 16, 16, 3) and np_images.min() >= 0 and np_images.max() <= 1
    assert np.allclose(np.asarray(pil[0]), np.round(np_images[0] * 255), atol=1)
    pt = pipe(**kw, output_type="pt").images
    assert pt.shape == (2, 3, 16, 16)
    latent = pipe(**kw, output_type="latent").images
    assert latent.shape == (2, 4, 8, 8)
    # The decode divides by the VAE's scaling factor (METHOD.md: latents / 0.18215).
    decoded = pipe.vae.decode(latent / pipe.vae.config.scaling_factor).sample
    torch.testing.assert_close(pt, (decoded / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=0)
    (image,) = pipe(**kw, output_type="np", return_dict=False)
    assert image.shape == (2, 16, 16, 3)


def test_save_and_load_round_trip(tmp_path, tiny_vae_dir):
    from diffusers import AutoencoderKL

    pipe = _pipe(vae=AutoencoderKL.from_pretrained(tiny_vae_dir))
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").exists()
    loaded = AFMPipeline.from_pretrained(tmp_path)
    assert loaded.id2label == ID2LABEL
    for a, b in [(pipe.transformer, loaded.transformer), (pipe.vae, loaded.vae)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    out = pipe(class_labels=["tench", 1], generator=_seeded(3), output_type="np").images
    assert np.array_equal(out, loaded(class_labels=["tench", 1], generator=_seeded(3), output_type="np").images)

    bf16 = AFMPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf16.transformer.dtype == torch.bfloat16
    images = bf16(class_labels=[0], generator=_seeded(3), output_type="np").images
    assert np.isfinite(images).all()


def test_pixel_space_pipeline_round_trip(tmp_path):
    pipe = _pipe(in_channels=3)
    pipe.save_pretrained(tmp_path)
    loaded = AFMPipeline.from_pretrained(tmp_path)
    assert loaded.vae is None
    out = loaded(class_labels=[0, 1], generator=_seeded(), output_type="np").images
    assert out.shape == (2, 8, 8, 3)


def test_multi_step_follows_the_flow_step_rule():
    pipe = _pipe(use_timestep_src=True, prediction_type="velocity", nfe=2)
    z = torch.randn(2, 4, 8, 8)
    labels = torch.tensor([1, 3])
    out = pipe(class_labels=labels, latents=z, output_type="latent").images
    # By hand: s = 1 -> 0.5 -> 0, x_t = x_s + (t - s) v.
    g = pipe.transformer
    x = z + (0.5 - 1.0) * g(z, labels, 1.0).sample
    x = x + (0.0 - 0.5) * g(x, labels, 0.5).sample
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_any_step_model_takes_any_step_count():
    pipe = _pipe(use_timestep_src=True, use_timestep_tgt=True, prediction_type="velocity", nfe=None)
    for steps in (1, 3, 5):
        out = pipe(class_labels=[0], num_inference_steps=steps, generator=_seeded(), output_type="latent").images
        assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


def test_step_count_and_input_errors_name_the_argument():
    pipe = _pipe()
    with pytest.raises(ValueError, match=r"num_inference_steps.*4.*allowed: 1"):
        pipe(class_labels=[0], num_inference_steps=4)
    multi = _pipe(use_timestep_src=True, prediction_type="velocity", nfe=2)
    with pytest.raises(ValueError, match=r"num_inference_steps.*allowed: 2"):
        multi(class_labels=[0], num_inference_steps=3)
    with pytest.raises(ValueError, match="latents.*shape"):
        pipe(class_labels=[0, 1], latents=torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="latents.*shape"):
        pipe(class_labels=[0, 1], latents=torch.randn(2, 4, 16, 16))
    with pytest.raises(ValueError, match="output_type"):
        pipe(class_labels=[0], output_type="jpg")
    with pytest.raises(ValueError, match="generator"):
        pipe(class_labels=[0, 1], generator=[_seeded()])



def test_cuda_graph_needs_a_cuda_device():
    """Capturing needs a GPU (benchmarks/sampling.py --cuda_graph runs and checks it there)."""
    with pytest.raises(RuntimeError, match="CUDA device.*pipe.to"):
        _pipe().enable_cuda_graph(batch_size=2)


def test_captured_graph_serves_only_its_batch_size(tiny_vae_dir):
    """Which calls a captured graph serves, with a stand-in for the graph (capture needs a GPU)."""
    from diffusers import AutoencoderKL

    pipe = _pipe(vae=AutoencoderKL.from_pretrained(tiny_vae_dir))
    calls = []

    class StandIn:
        batch_size = 2

        def __call__(self, latents, class_ids):
            calls.append(latents.shape[0])
            return pipe._decode(pipe._denoise(latents, class_ids, 1))

    z = torch.randn(3, 4, 8, 8)
    eager = pipe(class_labels=[0, 1], latents=z[:2], output_type="pt").images
    pipe._cuda_graph = StandIn()
    torch.testing.assert_close(pipe(class_labels=[0, 1], latents=z[:2], output_type="pt").images, eager)
    pipe(class_labels=[0, 1, 2], latents=z, output_type="pt")
    pipe(class_labels=[0, 1], latents=z[:2], output_type="latent")
    assert calls == [2]
    pipe.disable_cuda_graph()
    pipe(class_labels=[0, 1], latents=z[:2], output_type="pt")
    assert calls == [2]

def test_flow_helpers():
    assert torch.allclose(flow.sampling_timesteps(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    x0, z = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.equal(flow.interpolate(x0, z, 1.0), z) and torch.equal(flow.interpolate(x0, z, 0.0), x0)
    t = torch.tensor([0.25, 0.5])
    torch.testing.assert_close(flow.interpolate(x0, z, t), (1 - t[:, None]) * x0 + t[:, None] * z)
    with pytest.raises(ValueError, match="num_steps"):
        flow.sampling_timesteps(0)
