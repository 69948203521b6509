"""Pipelines sample through a `scheduler` component, in diffusers' convention, and compute the
reference's rule (`diffusers_afm.flow`: `solve_ode` for flow models, `sample` for AFM generators) to
the bit; folders written before schedulers load and sample the same images."""

import json
import shutil

import pytest
import torch
from conftest import REPO, randomize_, tiny_generator_config
from diffusers import (
    DiffusionPipeline,
    FlowMapEulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
)

from diffusers_afm import (
    AdversarialFlowTransformer2DModel,
    AFMPipeline,
    FlowHeunScheduler,
    FlowMatchingTransformer2DModel,
    JiTTransformer2DModel,
    flow,
)

LEGACY = REPO / "tests" / "fixtures" / "legacy_folders"


def _flow_model(**overrides):
    config = dict(tiny_generator_config(in_channels=3, num_classes=3), class_dropout_prob=0.1)
    for key in ("use_timestep_src", "use_timestep_tgt", "depth_repeat", "prediction_type", "nfe"):
        config.pop(key, None)
    config.update(overrides)
    torch.manual_seed(0)
    return randomize_(FlowMatchingTransformer2DModel(**config)).eval()


def _jit_model():
    torch.manual_seed(0)
    return randomize_(JiTTransformer2DModel(sample_size=16, patch_size=4, in_channels=3, num_layers=2, num_attention_heads=2,
                                            attention_head_dim=8, bottleneck_dim=8, in_context_len=2, in_context_start=1,
                                            num_classes=3, noise_scale=2.0, class_dropout_prob=0.1)).eval()


def _afm_model(**overrides):
    torch.manual_seed(0)
    return randomize_(AdversarialFlowTransformer2DModel(**tiny_generator_config(in_channels=3, num_classes=3, **overrides))).eval()


def _latents(pipe, call, seed=7):
    pipe.set_progress_bar_config(disable=True)
    return pipe(**call, generator=torch.Generator().manual_seed(seed), output_type="latent").images


def _reference(pipe, call, solver=None, seed=7):
    """Today's sampling written with the reference functions: the same noise, `flow.solve_ode` (flow
    models, with classifier-free guidance) or `flow.sample` (AFM generators)."""
    labels = torch.tensor(call["class_labels"])
    noise = pipe.prepare_latents(len(labels), torch.Generator().manual_seed(seed), torch.device("cpu"))
    model = pipe.transformer
    with torch.no_grad():
        if type(model).__name__ in ("FlowMatchingTransformer2DModel", "JiTTransformer2DModel"):
            velocity = flow.guided_velocity(lambda x, t, c: model(x, t, c).sample.float(), labels, model.null_class_id,
                                            call.get("guidance_scale", 1.0), call.get("guidance_interval"))
            return flow.solve_ode(velocity, noise, call["num_inference_steps"], solver)
        steps = call.get("num_inference_steps") or model.config.nfe or 1
        return flow.sample(lambda x, s, t: model(x, labels, s, t).sample.float(), noise, steps, model.config.prediction_type)


# Each model kind, the call, and the reference rule its default scheduler must reproduce.
GUIDED = dict(class_labels=[0, 2, 1], num_inference_steps=5, guidance_scale=2.5, guidance_interval=(0.2, 0.7))
KINDS = {
    "flow, Euler (default)": (_flow_model, FlowMatchEulerDiscreteScheduler, GUIDED, "euler"),
    "JiT, Heun with a final Euler step (default)": (_jit_model, FlowHeunScheduler, GUIDED, "heun_final_euler"),
    "AFM, 2 steps, v-prediction": (lambda: _afm_model(use_timestep_src=True, prediction_type="velocity", nfe=2),
                                   FlowMatchEulerDiscreteScheduler, dict(class_labels=[0, 2, 1]), None),
    "AFM, any-step, v-prediction": (lambda: _afm_model(use_timestep_src=True, use_timestep_tgt=True,
                                                       prediction_type="velocity", nfe=None),
                                    FlowMatchEulerDiscreteScheduler, dict(class_labels=[0, 2, 1], num_inference_steps=3), None),
    "AFM, 1 step, x-prediction": (_afm_model, type(None), dict(class_labels=[0, 2, 1]), None),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_model_kind_samples_through_its_default_scheduler_as_the_reference_does(kind):
    make_model, scheduler_class, call, solver = KINDS[kind]
    pipe = AFMPipeline(make_model())
    assert type(pipe.scheduler) is scheduler_class
    assert torch.equal(_latents(pipe, call), _reference(pipe, call, solver))


@pytest.mark.parametrize("final_euler_step, solver", [(False, "heun"), (True, "heun_final_euler")])
def test_heun_swapped_in_with_from_config_is_the_reference_heun(final_euler_step, solver):
    pipe = AFMPipeline(_flow_model())
    pipe.scheduler = FlowHeunScheduler.from_config(pipe.scheduler.config, final_euler_step=final_euler_step)
    for call in (GUIDED, dict(GUIDED, guidance_interval=None), dict(class_labels=[1], num_inference_steps=1)):
        assert torch.equal(_latents(pipe, call), _reference(pipe, call, solver)), call
    # `solver=` names the same scheduler for one call, whatever the pipeline's scheduler is.
    pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    assert torch.equal(_latents(pipe, dict(GUIDED, solver=solver)), _reference(pipe, GUIDED, solver))
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler


def test_the_scheduler_is_saved_with_the_folder_and_a_swap_persists(tmp_path):
    pipe = AFMPipeline(_flow_model())
    pipe.scheduler = FlowHeunScheduler.from_config(pipe.scheduler.config)
    expected = _latents(pipe, GUIDED)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers_afm.schedulers.scheduling_flow_heun", "FlowHeunScheduler"]
    assert json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())["final_euler_step"] is False
    for loaded in (AFMPipeline.from_pretrained(tmp_path), DiffusionPipeline.from_pretrained(tmp_path)):
        assert type(loaded.scheduler) is FlowHeunScheduler
        assert torch.equal(_latents(loaded, GUIDED), expected)
    # A diffusers scheduler is saved under diffusers' name, and its config carries over a swap.
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=3.0)
    pipe.save_pretrained(tmp_path)
    loaded = AFMPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is FlowMatchEulerDiscreteScheduler and loaded.scheduler.config.shift == 3.0
    # The shift moves the grid: the model is called at the shifted times.
    times = []
    loaded.transformer.register_forward_pre_hook(lambda module, args: times.append(args[1][0].item()))
    _latents(loaded, dict(class_labels=[0], num_inference_steps=2))
    assert times == pytest.approx([1.0, 3 * 0.5 / (1 + 2 * 0.5)])


@pytest.mark.parametrize("name, call, solver", [
    ("flow", dict(class_labels=["two", 0], num_inference_steps=4, guidance_scale=2.0), "euler"),
    ("jit", dict(class_labels=[1, 2], num_inference_steps=3, guidance_scale=2.2, guidance_interval=(0.0, 0.9)),
     "heun_final_euler"),
    ("afm_any_step", dict(class_labels=[0, 1], num_inference_steps=3), None),
    ("afm_1nfe", dict(class_labels=[0, 1]), None),
])
def test_a_folder_written_before_schedulers_loads_and_samples_as_before(tmp_path, name, call, solver):
    folder = tmp_path / name
    shutil.copytree(LEGACY / name, folder)
    assert "scheduler" not in json.loads((folder / "model_index.json").read_text())
    pipe = AFMPipeline.from_pretrained(folder)
    ids = [pipe.get_label_ids(c)[0] if isinstance(c, str) else c for c in call["class_labels"]]
    assert torch.equal(_latents(pipe, call), _reference(pipe, dict(call, class_labels=ids), solver))
    # Saved again, it has its kind's default scheduler, and samples the same.
    pipe.save_pretrained(tmp_path / "again")
    again = AFMPipeline.from_pretrained(tmp_path / "again")
    assert type(again.scheduler) is type(pipe.scheduler)
    assert torch.equal(_latents(again, call), _latents(pipe, call))


def test_callbacks_see_each_completed_step_once_heun_included():
    pipe = AFMPipeline(_flow_model())
    pipe.scheduler = FlowHeunScheduler.from_config(pipe.scheduler.config)
    seen = []

    def callback(p, i, t, kwargs):
        seen.append((i, float(t)))
        return {"latents": kwargs["latents"] * 0}  # replacing the latents after the last step is what comes out

    out = _latents(pipe, dict(class_labels=[0], num_inference_steps=3, callback_on_step_end=callback))
    assert seen == [(0, 1.0), (1, pytest.approx(2 / 3)), (2, pytest.approx(1 / 3))]
    assert torch.equal(out, torch.zeros_like(out))


def test_other_diffusers_schedulers_can_be_swapped_in():
    # diffusers' Heun (its own grid, ending at 1/1000 before 0, and a final Euler step) samples a
    # flow model, close to but not the reference's Heun; FlowMapEuler (float64 steps) an AFM generator.
    pipe = AFMPipeline(_flow_model())
    call = dict(class_labels=[0, 1], num_inference_steps=8)
    pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)
    theirs, ours = _latents(pipe, call), _reference(pipe, call, "heun_final_euler")
    assert not torch.equal(theirs, ours) and torch.allclose(theirs, ours, atol=0.05)
    afm = AFMPipeline(_afm_model(use_timestep_src=True, use_timestep_tgt=True, prediction_type="velocity", nfe=None))
    afm.scheduler = FlowMapEulerDiscreteScheduler.from_config(afm.scheduler.config)
    call = dict(class_labels=[0, 1], num_inference_steps=3)
    torch.testing.assert_close(_latents(afm, call), _reference(afm, call), rtol=0, atol=1e-5)


def test_afm_generators_refuse_schedulers_that_do_not_fit():
    any_step = AFMPipeline(_afm_model(use_timestep_src=True, use_timestep_tgt=True, prediction_type="velocity", nfe=None))
    any_step.scheduler = FlowHeunScheduler()
    with pytest.raises(ValueError, match="`scheduler`: an AFM generator steps from s to t in one call.*FlowHeunScheduler"):
        any_step(class_labels=[0], num_inference_steps=2)
    one_step = AFMPipeline(_afm_model())
    assert one_step.scheduler is None
    one_step.scheduler = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="prediction_type='sample'.*without a scheduler"):
        one_step(class_labels=[0])


# ----------------------------------------------------------------------------- FlowHeunScheduler itself
@pytest.mark.parametrize("final_euler_step, calls", [(False, [1.0, 0.5, 0.5, 0.0]), (True, [1.0, 0.5, 0.5])])
def test_heun_schedule_lists_each_model_call(final_euler_step, calls):
    scheduler = FlowHeunScheduler(final_euler_step=final_euler_step)
    scheduler.set_timesteps(2)
    assert scheduler.timesteps.tolist() == [1000 * c for c in calls]
    assert scheduler.sigmas.tolist() == calls + [0.0]
    assert flow.solver_nfe("heun_final_euler" if final_euler_step else "heun", 2) == len(calls)


def test_heun_scheduler_steps_a_linear_ode_as_heun_does():
    # dx/dt = a x from 1 to 0 in one step h = 1: Euler point x (1 - a), Heun x (1 - a + a^2 / 2).
    a, x = 0.5, torch.tensor([2.0, -4.0])
    scheduler = FlowHeunScheduler()
    scheduler.set_timesteps(1)
    euler_point = scheduler.step(a * x, scheduler.timesteps[0], x).prev_sample
    assert torch.allclose(euler_point, x * (1 - a)) and not scheduler.state_in_first_order
    heun = scheduler.step(a * euler_point, scheduler.timesteps[1], euler_point).prev_sample
    assert torch.allclose(heun, x * (1 - a + a * a / 2)) and scheduler.state_in_first_order
    with pytest.raises(ValueError, match="called 3 times for a schedule of 2 model calls"):
        scheduler.step(a * heun, scheduler.timesteps[1], heun)


def test_heun_scheduler_noise_shift_and_bad_input():
    scheduler = FlowHeunScheduler(shift=3.0)
    scheduler.set_timesteps(2)
    assert scheduler.sigmas[:2].tolist() == pytest.approx([1.0, 0.75])
    x0, noise = torch.ones(2, 3), torch.zeros(2, 3)
    torch.testing.assert_close(scheduler.scale_noise(x0, scheduler.timesteps[1], noise), flow.interpolate(x0, noise, 0.75))
    for kwargs, message in [(dict(num_inference_steps=0), "num_inference_steps"),
                            (dict(sigmas=[0.5, 0.9]), "decreasing flow times"),
                            (dict(num_inference_steps=3, sigmas=[1.0, 0.5]), "one start time per step")]:
        with pytest.raises(ValueError, match=message):
            scheduler.set_timesteps(**kwargs)
    with pytest.raises(ValueError, match="shift"):
        FlowHeunScheduler(shift=0)
    with pytest.raises(ValueError, match="set_timesteps"):
        FlowHeunScheduler().step(torch.zeros(1), 1000.0, torch.zeros(1))


# ----------------------------------------------------------------------------- examples/sample_grid.py
def test_sample_grid_sets_steps_scheduler_and_guidance_of_a_flow_model(tmp_path, capsys):
    import numpy as np
    import PIL.Image
    import sample_grid

    from diffusers_afm.pipelines import class_grid

    pipe = AFMPipeline(_flow_model())
    pipe.save_pretrained(tmp_path / "flow")
    sample_grid.main(["--pipeline", str(tmp_path / "flow"), "--output", str(tmp_path / "grid.png"), "--num_classes", "3",
                      "--per_class", "2", "--num_inference_steps", "3", "--solver", "heun", "--guidance_scale", "2",
                      "--guidance_interval", "0.1", "0.9"])
    pipe.set_progress_bar_config(disable=True)
    expected = class_grid(pipe, 3, 2, 0, num_inference_steps=3, solver="heun", guidance_scale=2.0, guidance_interval=(0.1, 0.9))
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "grid.png").convert("RGB")), np.asarray(expected))
    AFMPipeline(_afm_model()).save_pretrained(tmp_path / "afm")
    for flags, message in [(["--guidance_scale", "2"], "`guidance_scale` is not an argument for AFM models"),
                           (["--num_inference_steps", "0"], "--num_inference_steps: must be an integer >= 1")]:
        with pytest.raises(SystemExit) as exit_info:
            sample_grid.main(["--pipeline", str(tmp_path / "afm"), "--output", str(tmp_path / "afm.png"), *flags])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_info.value.code == 2 and message in err, err
    assert not (tmp_path / "afm.png").exists()


def test_sample_i_starts_from_the_same_noise_alone_or_in_a_batch():
    pipe = AFMPipeline(_flow_model())
    batch = pipe.prepare_latents(5, torch.Generator().manual_seed(3), torch.device("cpu"))
    seeds = torch.Generator().manual_seed(3)
    seeds = [int(torch.randint(0, 2**62, (1,), generator=seeds)) for _ in range(5)]
    alone = pipe.prepare_latents(1, [torch.Generator().manual_seed(seeds[3])], torch.device("cpu"))
    assert torch.equal(alone[0], batch[3])
    call = dict(class_labels=[0, 1, 2, 0, 1], num_inference_steps=4)
    images = _latents(pipe, call, seed=3)
    pipe.set_progress_bar_config(disable=True)
    one = pipe(class_labels=[0], num_inference_steps=4, generator=[torch.Generator().manual_seed(seeds[3])],
               output_type="latent").images
    torch.testing.assert_close(one[0], images[3], rtol=0, atol=1e-5)  # the same up to the kernels' rounding
