"""Model cards: Hub metadata, the folder's own settings, and a loading snippet that runs."""

import json
import os

import pytest
import torch
from conftest import randomize_, tiny_generator_config
from huggingface_hub import ModelCard

from diffusers_afm import AdversarialFlowTransformer2DModel, AFMPipeline, make_model_card, save_model_card
from diffusers_afm.pipelines import class_grid


def _folder(path, **config):
    torch.manual_seed(0)
    transformer = randomize_(AdversarialFlowTransformer2DModel(**tiny_generator_config(in_channels=3, **config)))
    pipe = AFMPipeline(transformer.eval(), id2label={i: f"digit {i}" for i in range(transformer.config.num_classes)})
    pipe.save_pretrained(path)
    return pipe


def _python_blocks(text):
    return [block.split("```")[0] for block in text.split("```python\n")[1:]]


def test_card_of_a_training_run(tmp_path, monkeypatch):
    folder = tmp_path / "afm-digits"
    pipe = _folder(folder)
    class_grid(pipe, num_rows=2, per_class=2).save(folder / "samples.png")
    settings = {"learning_rate": 1e-4, "model_config": {"num_layers": 2}, "train_data_dir": str(tmp_path / "images")}
    path = save_model_card(
        str(folder),
        repo_id=str(folder),
        base_model="someone/afm-b2",
        dataset="someone/my-digits",
        training_settings=settings,
        sample_grid="samples.png",
        metrics={"fid": 12.3456, "inception_score": 2.5},
    )
    assert path == str(folder / "README.md")
    assert [n for n in os.listdir(folder) if n.startswith(".")] == []  # written atomically: no temporary left

    card = ModelCard.load(path)
    data = card.data
    assert data.library_name == "diffusers" and data.license == "apache-2.0"
    assert data.tags == ["diffusers", "diffusers-training", "adversarial-flow-models", "class-conditional", "image-generation"]
    assert data.base_model == "someone/afm-b2" and data.datasets == ["someone/my-digits"]
    assert data.metrics == ["fid", "inception_score"] and data.pipeline_tag is None
    text = card.text
    assert "https://github.com/diffusers-afm/diffusers-afm" in text and "![samples](samples.png)" in text
    assert "| fid | 12.35 |" in text and "| inception_score | 2.5 |" in text
    assert "class-conditional (10 classes)" in text and "guidance_scale" in text
    # The settings are the model config itself and the resolved flags, as JSON.
    blocks = text.split("```json\n")
    assert json.loads(blocks[1].split("```")[0]) == {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    assert json.loads(blocks[2].split("```")[0]) == settings

    # The snippet loads this folder; with no standalone export there is only the installed one.
    (snippet,) = _python_blocks(text)
    monkeypatch.chdir(tmp_path)
    exec(snippet, {})
    assert (tmp_path / "sample.png").is_file()


def test_card_of_an_unconditional_model(tmp_path, monkeypatch):
    folder = tmp_path / "uncond"
    _folder(folder, num_classes=1, use_timestep_src=True, use_timestep_tgt=True, prediction_type="velocity", nfe=None)
    card = make_model_card(str(folder), dataset=str(tmp_path / "my_images"), license=None)
    data = card.data
    assert "unconditional" in data.tags and "class-conditional" not in data.tags and "diffusers-training" not in data.tags
    assert data.pipeline_tag == "unconditional-image-generation"
    assert data.datasets is None and data.license is None  # a local folder is named in the text only
    assert f"Trained on `{tmp_path / 'my_images'}`" in card.text and "any number of steps" in card.text
    (snippet,) = _python_blocks(card.text)
    assert 'AFMPipeline.from_pretrained("uncond")' in snippet and "batch_size=4" in snippet  # repo_id: the folder's name
    monkeypatch.chdir(tmp_path)
    exec(snippet, {})
    assert (tmp_path / "sample.png").is_file()


def test_card_refuses_a_missing_grid(tmp_path):
    _folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="sample_grid.*grid.png"):
        make_model_card(str(tmp_path), sample_grid="grid.png")


def test_card_base_model_metadata_is_a_hub_id_even_from_a_local_folder(tmp_path):
    """The Hub takes only a model repository's id as `base_model`: a Hub id, a Hub snapshot in the
    cache and a folder saved after loading from the Hub give one; a folder trained here is named in
    the text only."""
    from diffusers_afm.hub import hub_model_id

    folder = tmp_path / "cafm-digits"
    _folder(folder)
    snapshot = tmp_path / "hub" / "models--someone--fm-digits" / "snapshots" / "0123abcd"
    _folder(snapshot)
    reloaded = tmp_path / "fm-reloaded"
    _folder(reloaded)
    index = json.loads((reloaded / "model_index.json").read_text())
    (reloaded / "model_index.json").write_text(json.dumps(dict(index, _name_or_path="someone/fm-original")))
    local = tmp_path / "fm-digits"
    _folder(local)
    assert [hub_model_id(m) for m in ("someone/fm", str(snapshot), str(reloaded), str(local), None)] == [
        "someone/fm", "someone/fm-digits", "someone/fm-original", None, None]
    for base, metadata, text in [(str(snapshot), "someone/fm-digits", "from `someone/fm-digits`"),
                                 (str(local), None, "from the local model `fm-digits`")]:
        card = ModelCard.load(save_model_card(str(folder), base_model=base, cafm=True))
        assert card.data.base_model == metadata and f"Post-trained with Continuous AFM {text}." in card.text
