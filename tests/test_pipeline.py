"""AFMPipeline: sampling, labels, outputs, saving and loading, and its input errors."""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import randomize_, tiny_generator_config
from diffusers import DiffusionPipeline

from diffusers_afm import AdversarialFlowTransformer2DModel, AFMPipeline, flow
from diffusers_afm.pipelines import class_grid
from diffusers_afm.utils import save_pretrained_into

ID2LABEL = {0: "tench, Tinca tinca", 1: "golden retriever", 2: "crane", 3: "crane", 4: "great white shark, white shark"}


def _pipe(vae=None, **config):
    torch.manual_seed(0)
    transformer = randomize_(AdversarialFlowTransformer2DModel(**tiny_generator_config(**{"num_classes": 5, **config})))
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
    # The decode divides by the VAE's scaling factor (docs/method.md: latents / 0.18215).
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


def test_unconditional_model_samples_a_batch():
    pipe = _pipe(num_classes=1)
    images = pipe(batch_size=3, generator=_seeded(4), output_type="latent").images
    assert images.shape == (3, 4, 8, 8)
    # The same as class 0 three times; the batch size of `latents` is the default.
    assert torch.equal(images, pipe(class_labels=[0, 0, 0], generator=_seeded(4), output_type="latent").images)
    z = torch.randn(2, 4, 8, 8)
    assert pipe(latents=z, output_type="latent").images.shape == (2, 4, 8, 8)
    assert pipe(output_type="latent").images.shape == (1, 4, 8, 8)
    assert pipe(batch_size=2, num_images_per_label=2, output_type="latent").images.shape == (4, 4, 8, 8)
    with pytest.raises(ValueError, match="batch_size.*positive integer"):
        pipe(batch_size=0)


def test_class_conditional_model_needs_labels():
    pipe = _pipe()
    with pytest.raises(ValueError, match=r"class_labels.*required.*class-conditional \(5 classes\)"):
        pipe()
    with pytest.raises(ValueError, match=r"class_labels.*required"):
        pipe(batch_size=2)
    with pytest.raises(ValueError, match=r"`class_labels` or `batch_size`, not both"):
        pipe(class_labels=[0], batch_size=2)


def test_num_images_per_label_repeats_each_label_in_a_row():
    pipe = _pipe()
    repeated = pipe(class_labels=[1, "tench"], num_images_per_label=2, generator=_seeded(5), output_type="latent").images
    spelled_out = pipe(class_labels=[1, 1, 0, 0], generator=_seeded(5), output_type="latent").images
    assert repeated.shape == (4, 4, 8, 8) and torch.equal(repeated, spelled_out)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="num_images_per_label"):
            pipe(class_labels=[0], num_images_per_label=bad)


def test_callback_on_step_end_sees_and_replaces_the_latents():
    pipe = _pipe(use_timestep_src=True, prediction_type="velocity", nfe=2)
    z = torch.randn(2, 4, 8, 8)
    labels = torch.tensor([1, 3])
    seen = []

    def record(pipeline, step_index, timestep, callback_kwargs):
        seen.append((step_index, float(timestep), callback_kwargs["latents"].clone()))
        return {}

    out = pipe(class_labels=labels, latents=z, output_type="latent", callback_on_step_end=record).images
    g = pipe.transformer
    x1 = z + (0.5 - 1.0) * g(z, labels, 1.0).sample
    assert [(i, t) for i, t, _ in seen] == [(0, 1.0), (1, 0.5)]
    torch.testing.assert_close(seen[0][2], x1, atol=1e-5, rtol=0)
    torch.testing.assert_close(seen[1][2], out, atol=0, rtol=0)

    # Latents the callback returns are what the next step starts from.
    def restart_from_zero(pipeline, step_index, timestep, callback_kwargs):
        return {"latents": torch.zeros_like(callback_kwargs["latents"])} if step_index == 0 else {}

    out = pipe(class_labels=labels, latents=z, output_type="latent", callback_on_step_end=restart_from_zero).images
    zero = torch.zeros_like(z)
    torch.testing.assert_close(out, zero + (0.0 - 0.5) * g(zero, labels, 0.5).sample, atol=1e-5, rtol=0)

    with pytest.raises(ValueError, match=r"callback_on_step_end_tensor_inputs.*\['noise'\].*allowed: \['latents'\]"):
        pipe(class_labels=[0], callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents", "noise"])
    with pytest.raises(ValueError, match="callback_on_step_end.*callable"):
        pipe(class_labels=[0], callback_on_step_end="print")


def test_diffusers_pipeline_callbacks_name_their_tensors():
    from diffusers.callbacks import PipelineCallback

    class CountSteps(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            self.steps = getattr(self, "steps", 0) + 1
            return callback_kwargs

    pipe = _pipe(use_timestep_src=True, use_timestep_tgt=True, prediction_type="velocity", nfe=None)
    callback = CountSteps()
    pipe(class_labels=[0], num_inference_steps=3, output_type="latent", callback_on_step_end=callback)
    assert callback.steps == 3


def test_guidance_scale_is_a_clear_error():
    """Guidance is trained into AFM generators; there is no classifier-free guidance to scale."""
    with pytest.raises(ValueError, match=r"guidance_scale.*no classifier-free guidance.*guided checkpoint"):
        _pipe()(class_labels=[0], guidance_scale=4.0)


def test_plain_diffusers_loads_the_folders_we_write(tmp_path):
    """`DiffusionPipeline.from_pretrained` on a folder from `save_pretrained` and from
    `save_pretrained_into` (what the trainer writes), once diffusers_afm is imported."""
    pipe = _pipe(in_channels=3)
    pipe.save_pretrained(tmp_path / "saved")
    save_pretrained_into(pipe, str(tmp_path / "trained"), last="model_index.json")
    expected = pipe(class_labels=["tench", 4], generator=_seeded(2), output_type="np").images
    for folder in ("saved", "trained"):
        loaded = DiffusionPipeline.from_pretrained(tmp_path / folder)
        assert type(loaded) is AFMPipeline and type(loaded.transformer) is AdversarialFlowTransformer2DModel
        assert loaded.labels == pipe.labels and loaded.get_label_ids("great white shark") == [4]
        assert np.array_equal(loaded(class_labels=["tench", 4], generator=_seeded(2), output_type="np").images, expected)


def test_class_grid_labels_its_rows():
    pipe = _pipe(in_channels=3)
    plain = class_grid(pipe, num_rows=3, per_class=2)
    labelled = class_grid(pipe, num_rows=3, per_class=2, label_rows=True)
    margin = labelled.size[0] - plain.size[0]
    assert labelled.size[1] == plain.size[1] and margin > 0
    # The images are where they were, moved right by the margin, and text is drawn in the margin.
    assert np.array_equal(np.asarray(labelled)[:, margin:], np.asarray(plain))
    assert (np.asarray(labelled)[:, :margin] < 128).any()


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
