"""`export_standalone`: folders that load in plain diffusers on a machine without diffusers-afm."""

import inspect
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import randomize_, tiny_generator_config
from diffusers import AutoencoderKL, DiffusionPipeline

from diffusers_afm import (
    AdversarialFlowTransformer2DModel,
    AFMPipeline,
    FlowHeunScheduler,
    FlowMatchingTransformer2DModel,
    JiTTransformer2DModel,
    export_standalone,
    save_model_card,
)
from diffusers_afm.pipelines.export import standalone_files, standalone_source

ID2LABEL = {0: "tench, Tinca tinca", 1: "golden retriever", 2: "crane"}
# Each folder, and the call whose images the two machines must agree on.
CALLS = {
    "latent_1nfe": dict(class_labels=["tench", 2, 1], num_images_per_label=2, output_type="np"),
    "pixel_2nfe_unconditional": dict(batch_size=3, output_type="np"),
    # A flow-matching model (what Continuous AFM post-trains): its folder's scheduler is Heun
    # (`FlowHeunScheduler`, ours, shipped as scheduler/scheduling_flow_heun.py), under classifier-free guidance.
    "flow_heun_guided": dict(class_labels=[0, "crane"], num_inference_steps=3, guidance_scale=2.0, output_type="np"),
    # The same folder with the `solver=` shorthand: Euler for this call.
    "flow_heun_guided_solver_euler": dict(class_labels=[0, "crane"], num_inference_steps=3, solver="euler",
                                          guidance_scale=2.0, output_type="np"),
    # JiT in pixel space: its own sampler (the default scheduler), guidance inside JiT's interval, noise of scale 2.
    "jit_guided_interval": dict(class_labels=["tench", 1], num_inference_steps=4, guidance_scale=2.0,
                                guidance_interval=(0.0, 0.6), output_type="np"),
}
CLASSES = {"flow_heun_guided": FlowMatchingTransformer2DModel, "flow_heun_guided_solver_euler": FlowMatchingTransformer2DModel,
           "jit_guided_interval": JiTTransformer2DModel}
FOLDER = {"flow_heun_guided_solver_euler": "flow_heun_guided"}  # calls that sample a folder of another call

# Runs in a fresh interpreter in which `import diffusers_afm` fails, as on a machine without it.
STANDALONE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, os, sys

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "diffusers_afm":
                raise ImportError("diffusers_afm is not installed on this machine")

    sys.meta_path.insert(0, Blocker())
    try:
        import diffusers_afm  # noqa: F401
        raise SystemExit("diffusers_afm was importable")
    except ImportError:
        pass

    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    root, calls = sys.argv[1], json.loads(sys.argv[2])
    FOLDER = {"flow_heun_guided_solver_euler": "flow_heun_guided"}
    for name, call in calls.items():
        pipe = DiffusionPipeline.from_pretrained(os.path.join(root, FOLDER.get(name, name)), trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(**call, generator=torch.Generator().manual_seed(7)).images
        np.save(os.path.join(root, name + ".npy"), images)
        scheduler = pipe.scheduler and type(pipe.scheduler).__module__ + "." + type(pipe.scheduler).__name__
        print(name, type(pipe).__module__, type(pipe.transformer).__module__, scheduler)
    # The model card's snippet, as a user would paste it.
    os.chdir(root)
    exec(open(os.path.join(root, "snippet.py")).read())
    assert os.path.isfile(os.path.join(root, "sample.png"))
    assert not any(m.split(".")[0] == "diffusers_afm" for m in sys.modules)
    """
)


def _folders(root, vae_dir):
    torch.manual_seed(0)
    latent = randomize_(AdversarialFlowTransformer2DModel(**tiny_generator_config(num_classes=3)))
    AFMPipeline(latent.eval(), vae=AutoencoderKL.from_pretrained(vae_dir), id2label=ID2LABEL).save_pretrained(root / "latent_1nfe")
    pixel = randomize_(
        AdversarialFlowTransformer2DModel(
            **tiny_generator_config(in_channels=3, num_classes=1, use_timestep_src=True, prediction_type="velocity", nfe=2)
        )
    )
    AFMPipeline(pixel.eval()).save_pretrained(root / "pixel_2nfe_unconditional")
    flow = dict(tiny_generator_config(in_channels=3, num_classes=3))
    for key in ("use_timestep_src", "use_timestep_tgt", "depth_repeat", "prediction_type", "nfe"):
        flow.pop(key, None)
    velocity_model = randomize_(FlowMatchingTransformer2DModel(**flow, class_dropout_prob=0.1))
    heun = FlowHeunScheduler()
    AFMPipeline(velocity_model.eval(), scheduler=heun, id2label=ID2LABEL).save_pretrained(root / "flow_heun_guided")
    jit = randomize_(JiTTransformer2DModel(sample_size=16, patch_size=4, num_layers=2, num_attention_heads=2, attention_head_dim=8,
                                           bottleneck_dim=8, in_context_len=2, in_context_start=1, num_classes=3, noise_scale=2.0))
    AFMPipeline(jit.eval(), id2label=ID2LABEL).save_pretrained(root / "jit_guided_interval")
    for name in CALLS:
        if name not in FOLDER:
            export_standalone(str(root / name))


def test_exported_folder_loads_without_diffusers_afm_bit_for_bit(tmp_path, tiny_vae_dir):
    _folders(tmp_path, tiny_vae_dir)
    card = save_model_card(str(tmp_path / "latent_1nfe"), repo_id=str(tmp_path / "latent_1nfe"))
    snippet = open(card).read().split("```python\n")[2].split("```")[0]
    assert "trust_remote_code=True" in snippet
    (tmp_path / "snippet.py").write_text(snippet)

    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", STANDALONE_SCRIPT, str(tmp_path), json.dumps(CALLS)],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Expected types" not in result.stderr  # diffusers' type check accepted the generated classes

    # The schedulers: ours from the folder's scheduler/ file, diffusers' from diffusers, none for x-prediction.
    heun = "diffusers_modules.local.scheduling_flow_heun.FlowHeunScheduler"
    euler = "diffusers.schedulers.scheduling_flow_match_euler_discrete.FlowMatchEulerDiscreteScheduler"
    assert f"flow_heun_guided diffusers_modules.local.pipeline_afm diffusers_modules.local.transformer_flow {heun}" in result.stdout
    assert f"jit_guided_interval diffusers_modules.local.pipeline_afm diffusers_modules.local.transformer_jit {heun}" in result.stdout
    assert f"pixel_2nfe_unconditional diffusers_modules.local.pipeline_afm diffusers_modules.local.transformer_afm {euler}" in result.stdout
    assert "latent_1nfe diffusers_modules.local.pipeline_afm diffusers_modules.local.transformer_afm None" in result.stdout
    for name, call in CALLS.items():
        ours = AFMPipeline.from_pretrained(tmp_path / FOLDER.get(name, name))
        expected_class = CLASSES.get(name, AdversarialFlowTransformer2DModel)
        assert type(ours) is AFMPipeline and type(ours.transformer) is expected_class
        if expected_class is not AdversarialFlowTransformer2DModel:  # the exported scheduler file read onto ours
            assert type(ours.scheduler) is FlowHeunScheduler
        ours.set_progress_bar_config(disable=True)
        expected = ours(**call, generator=torch.Generator().manual_seed(7)).images
        assert np.array_equal(np.load(tmp_path / f"{name}.npy"), expected), name


def test_exported_folder_with_diffusers_afm_installed(tmp_path):
    torch.manual_seed(0)
    transformer = randomize_(AdversarialFlowTransformer2DModel(**tiny_generator_config(in_channels=3)))
    AFMPipeline(transformer.eval()).save_pretrained(tmp_path)
    written = export_standalone(str(tmp_path))
    assert sorted(os.path.relpath(p, tmp_path) for p in written) == ["model_index.json", "pipeline_afm.py", "transformer/transformer_afm.py"]
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_afm", "AFMPipeline"]
    assert index["transformer"] == ["transformer_afm", "AdversarialFlowTransformer2DModel"]
    # Our class reads the folder with the installed code and runs none of the copies ...
    assert type(AFMPipeline.from_pretrained(tmp_path).transformer) is AdversarialFlowTransformer2DModel
    # ... while diffusers asks before it runs a folder's code, as for any such folder.
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(tmp_path)
    assert export_standalone(str(tmp_path)) == written  # exporting again regenerates the same files
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        export_standalone(str(tmp_path / "transformer"))


def test_generated_files_are_our_sources():
    """The copies are made from the modules, not kept by hand: each class is there as written."""
    from diffusers_afm import flow
    from diffusers_afm.models import modules, transformer_afm
    from diffusers_afm.pipelines import pipeline_afm

    files = standalone_files()
    for module in (flow, modules, transformer_afm):
        for _, obj in inspect.getmembers(module, lambda o: inspect.isclass(o) or inspect.isfunction(o)):
            if obj.__module__ == module.__name__:
                assert inspect.getsource(obj) in files["transformer/transformer_afm.py"], obj
    pipeline_file = files["pipeline_afm.py"]
    assert inspect.getsource(pipeline_afm.AFMPipeline.__call__) in pipeline_file
    assert inspect.getsource(FlowHeunScheduler) in pipeline_file  # the pipeline makes a kind's default itself
    scheduler_file = standalone_files("JiTTransformer2DModel", "FlowHeunScheduler")["scheduler/scheduling_flow_heun.py"]
    assert inspect.getsource(FlowHeunScheduler) in scheduler_file
    assert inspect.getsource(pipeline_afm.class_grid) in pipeline_file
    # What only the installed class does (read an exported folder onto the installed code) is left out.
    assert "_dict_from_json_file" not in pipeline_file


def test_a_new_dependency_between_our_modules_is_caught(tmp_path, monkeypatch):
    package = tmp_path / "afm_export_probe"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text("def helper():\n    return 1\n")
    (package / "user.py").write_text('"""Uses a helper."""\n\nfrom .helpers import helper\n\n\ndef use():\n    return helper()\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    import afm_export_probe.helpers
    import afm_export_probe.user

    with pytest.raises(ValueError, match=r"afm_export_probe\.user imports 'helper' from afm_export_probe\.helpers.*add its module"):
        standalone_source([afm_export_probe.user])
    text = standalone_source([afm_export_probe.helpers, afm_export_probe.user])
    namespace = {}
    exec(compile(text, "standalone", "exec"), namespace)
    assert namespace["use"]() == 1 and '"""Uses a helper."""' in text
