"""Model cards for `AFMPipeline` folders: the README.md whose metadata the Hub reads.

The card describes the folder it is written into: the model's settings come from its
`transformer/config.json`, the loading snippets from its `model_index.json` (a folder exported with
`export_standalone` also gets the snippet that needs no diffusers-afm). What the folder cannot know
(where it came from, the data, the training flags, the metrics) the caller passes.
"""

import functools
import glob
import json
import os
from typing import Any, Dict, Optional, Tuple

from diffusers.utils.hub_utils import populate_model_card
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .data.planning import downsampling_factor, hub_offline
from .pipelines.export import is_standalone
from .utils import SettingError, atomic_file

PROJECT_URL = "https://github.com/diffusers-afm/diffusers-afm"
PAPER_URL = "https://arxiv.org/abs/2511.22475"
CAFM_PAPER_URL = "https://arxiv.org/abs/2604.11521"
FLOW_MODEL_CLASS = "FlowMatchingTransformer2DModel"
JIT_MODEL_CLASS = "JiTTransformer2DModel"  # a flow model too, with JiT's own sampler (docs/cafm.md, "JiT")

# Jinja templates (huggingface_hub renders them); `card_data` is the YAML metadata block. Every card
# opens the same way: metadata, name, summary, the sample grid, then "Use".
CARD_HEADER = """---
{{ card_data }}
---

# {{ model_name }}

{{ summary }}
{% if sample_grid %}
![samples]({{ sample_grid }})
{% endif %}
## Use
"""

CARD_TEMPLATE = CARD_HEADER + """
With [diffusers-afm]({{ project_url }}) installed (`pip install git+{{ project_url }}`):

```python
{{ installed_snippet }}
```
{% if not standalone_snippet %}
`import diffusers_afm` also makes `diffusers.DiffusionPipeline.from_pretrained` load this folder.
{% else %}
Without diffusers-afm: this folder carries generated copies of its code (`pipeline_afm.py`,
`transformer/{{ transformer_file }}`), which diffusers runs once you allow it:

```python
{{ standalone_snippet }}
```
{% endif %}
{{ sampling_note }}

## Model

`transformer/config.json`:

```json
{{ model_config }}
```
{% if training_settings %}
## Training settings

```json
{{ training_settings }}
```
{% endif %}{% if metrics %}
## Metrics

| metric | value |
|---|---|
{% for name, value in metrics %}| {{ name }} | {{ value }} |
{% endfor %}{% endif %}
## Citation

Adversarial Flow Models, Lin, Yang, Lin, Chen and Fan, 2025 ([arXiv 2511.22475]({{ paper_url }})).
{% if cafm %}
Continuous Adversarial Flow Models, Lin, Yang, Lin, Chen and Fan, 2026 ([arXiv 2604.11521]({{ cafm_paper_url }})).
{% endif %}"""


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _num_parameters(subfolder: str) -> int:
    """Parameter count read off the safetensors headers (no weights are loaded)."""
    from safetensors import safe_open

    total = 0
    for path in glob.glob(os.path.join(subfolder, "*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                numel = 1
                for dim in f.get_slice(key).get_shape():
                    numel *= dim
                total += numel
    return total


def _is_hub_dataset(dataset: str) -> bool:
    return not os.path.exists(dataset) and _is_hub_id(dataset)


def hub_model_id(model: Optional[str]) -> Optional[str]:
    """The Hub id of a model given as an id or a local folder, for a card's `base_model` metadata,
    which the Hub accepts only as the id of a model repository: an id as it is; a folder in the
    Hugging Face cache (`models--org--name/snapshots/<commit>`) as `org/name`; a folder that names
    the Hub model it was loaded from (`_name_or_path` in its `model_index.json`, as diffusers'
    `save_pretrained` writes after a `from_pretrained` from the Hub) as that id; other local
    folders (a run trained here) have none."""
    if not model:
        return None
    if not os.path.exists(model):
        return model if _is_hub_id(model) else None
    parts = os.path.abspath(model).split(os.sep)
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part[len("models--"):].replace("--", "/", 1)
    index = os.path.join(model, "model_index.json")
    source = _read_json(index).get("_name_or_path") if os.path.isfile(index) else None
    return source if isinstance(source, str) and not os.path.exists(source) and _is_hub_id(source) else None


def _is_hub_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _base_model_text(base_model: Optional[str], cafm: bool) -> str:
    """Where training started, for the card's text: the Hub id, or a local folder's name (which the
    metadata cannot carry)."""
    if not base_model:
        return ""
    hub_id = hub_model_id(base_model)
    name = f"`{hub_id}`" if hub_id else f"the local model `{os.path.basename(os.path.normpath(base_model))}`"
    return f" Post-trained with Continuous AFM from {name}." if cafm else f" Training started from {name}."


def _is_flow(index: dict) -> str:
    """The class name of a flow model's transformer, or "" for an AFM generator."""
    name = index["transformer"][1] if isinstance(index.get("transformer"), list) else ""
    return name if name in (FLOW_MODEL_CLASS, JIT_MODEL_CLASS) else ""


def _snippet(repo_id: str, config: dict, standalone: bool, flow: str = "") -> str:
    num_classes = config["num_classes"]
    if num_classes > 1:
        labels = sorted({i * num_classes // 3 for i in range(min(3, num_classes))})
        sampling = ""
        if flow:
            guidance = ", guidance_scale=1.5" if config.get("class_dropout_prob", 0) > 0 else ""
            if flow == JIT_MODEL_CLASS:  # JiT's own sampler is its scheduler; it guides inside its CFG interval
                sampling = f", num_inference_steps=50{guidance}{', guidance_interval=(0.0, 0.9)' if guidance else ''}"
            else:
                sampling = f", num_inference_steps=50{guidance}"
        call = f"pipe(class_labels={labels}{sampling}, generator=torch.Generator().manual_seed(0)).images"
    else:
        call = "pipe(batch_size=4, generator=torch.Generator().manual_seed(0)).images"
    if standalone:
        head = "from diffusers import DiffusionPipeline\n\n"
        load = f"pipe = DiffusionPipeline.from_pretrained({json.dumps(repo_id)}, trust_remote_code=True)"
    else:
        head = "from diffusers_afm import AFMPipeline\n\n"
        load = f"pipe = AFMPipeline.from_pretrained({json.dumps(repo_id)})"
    return f'import torch\n{head}{load}\nimages = {call}\nimages[0].save("sample.png")'


def _summary(config: dict, index: dict, folder: str, dataset: Optional[str], description: Optional[str],
             base_model: str = "") -> str:
    num_classes = config["num_classes"]
    kind = f"class-conditional ({num_classes} classes)" if num_classes > 1 else "unconditional"
    size = config["sample_size"]
    if index.get("vae", [None])[0] is not None:
        pixels = size * downsampling_factor(_read_json(os.path.join(folder, "vae", "config.json")))
        space = f"in the latent space of its VAE ({size}x{size} latents, {pixels}x{pixels} images)"
    else:
        space = f"in pixel space ({size}x{size} images)"
    count = _num_parameters(os.path.join(folder, "transformer"))
    count = f"{count / 1e6:.1f}M" if count >= 1e6 else f"{count / 1e3:.1f}k"
    if _is_flow(index):
        text = (
            f"A {kind} flow-matching velocity model that samples with an ODE solver, its scheduler (Euler or Heun, "
            f"any number of steps) {space}; {count} parameters, made with [diffusers-afm]({PROJECT_URL})."
        )
    else:
        nfe = config["nfe"]
        steps = "any number of steps" if nfe is None else ("1 step (one forward pass)" if nfe == 1 else f"{nfe} steps")
        prediction = {"sample": "x-prediction", "velocity": "v-prediction"}[config["prediction_type"]]
        text = (
            f"A {kind} [Adversarial Flow Model]({PAPER_URL}) that samples in {steps} with {prediction}, {space}; "
            f"a {count}-parameter generator, made with [diffusers-afm]({PROJECT_URL})."
        )
    if dataset:
        text += f" Trained on `{dataset}`."
    text += base_model
    if description:
        text += f" {description}"
    return text


def _sampling_note(config: dict, flow: str = "") -> str:
    if flow:
        guidance = ("`guidance_scale` > 1 applies classifier-free guidance through the null class (1 = none)."
                    if config.get("class_dropout_prob", 0) > 0 else "It has no null class, so no classifier-free guidance.")
        swap = "`pipe.scheduler = FlowHeunScheduler.from_config(pipe.scheduler.config{})` (`from diffusers_afm import FlowHeunScheduler`)"
        if flow == JIT_MODEL_CLASS:
            return ("The scheduler (`scheduler/`) is JiT's own sampler, `FlowHeunScheduler(final_euler_step=True)` (Heun "
                    f"steps, the last one Euler); for Heun at every step, {swap.format(', final_euler_step=False')}, and "
                    f"diffusers' `FlowMatchEulerDiscreteScheduler` for Euler. {guidance} JiT's evaluation: 50 steps, "
                    "`guidance_interval=(0.0, 0.9)` and `guidance_scale` 3.0 (B), 2.4 / 2.5 (L/16, L/32), 2.2 / 2.3 (H/16, H/32).")
        return ("The scheduler (`scheduler/`) is diffusers' `FlowMatchEulerDiscreteScheduler` (Euler); for Heun (two model "
                f"calls per step), {swap.format('')}. {guidance}")
    steps = "Pass any `num_inference_steps` (default 1). " if config["nfe"] is None else ""
    labels = "Class names work as labels too (`pipe.labels` lists them). " if config["num_classes"] > 1 else ""
    return (
        f"{steps}{labels}There is no `guidance_scale`: AFM has no classifier-free guidance; a guided "
        "model has the guidance trained into its generator."
    )


def make_model_card(
    folder: str,
    *,
    repo_id: Optional[str] = None,
    base_model: Optional[str] = None,
    dataset: Optional[str] = None,
    training_settings: Optional[Dict[str, Any]] = None,
    sample_grid: Optional[str] = None,
    metrics: Optional[Dict[str, float]] = None,
    description: Optional[str] = None,
    license: Optional[str] = "apache-2.0",
    cafm: bool = False,
) -> ModelCard:
    """The model card of the `AFMPipeline` folder `folder`.

    Args:
        repo_id: the name the snippets load (a Hub id or a path); defaults to the folder's name.
        base_model: the weights training started from: a Hub id, or a local folder (the metadata
            gets its Hub id where one can be told, `hub_model_id`; the text names it either way).
        dataset: the training data; a Hub dataset id also goes into the metadata, a local path
            only into the text.
        training_settings: the resolved training flags; a card with them is tagged
            `diffusers-training`.
        sample_grid: an image file inside `folder` (e.g. "samples.png") shown on the card.
        metrics: measured metrics, name -> value (e.g. {"fid": 3.2}).
        description: a sentence appended to the summary (e.g. where converted weights came from).
        license: the licence id for the metadata; `None` leaves it out.
        cafm: the model was post-trained with Continuous AFM (tags and citation say so).
    """
    index = _read_json(os.path.join(folder, "model_index.json"))
    config = {k: v for k, v in _read_json(os.path.join(folder, "transformer", "config.json")).items() if not k.startswith("_")}
    if sample_grid is not None and not os.path.isfile(os.path.join(folder, sample_grid)):
        raise FileNotFoundError(f"`sample_grid`: no file {sample_grid!r} in {folder!r}.")
    repo_id = repo_id or os.path.basename(os.path.abspath(folder))
    standalone = is_standalone(folder)
    conditional = config["num_classes"] > 1
    flow = _is_flow(index)

    card_data = ModelCardData(
        license=license,
        base_model=hub_model_id(base_model),
        datasets=[dataset] if dataset and _is_hub_dataset(dataset) else None,
        metrics=sorted(metrics) if metrics else None,
        pipeline_tag=None if conditional else "unconditional-image-generation",
    )
    card = ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        model_name=repo_id.rstrip("/").rsplit("/", 1)[-1],
        summary=_summary(config, index, folder, dataset, description, _base_model_text(base_model, cafm)),
        sample_grid=sample_grid,
        project_url=PROJECT_URL,
        paper_url=PAPER_URL,
        installed_snippet=_snippet(repo_id, config, standalone=False, flow=flow),
        standalone_snippet=_snippet(repo_id, config, standalone=True, flow=flow) if standalone else None,
        sampling_note=_sampling_note(config, flow),
        cafm=cafm,
        cafm_paper_url=CAFM_PAPER_URL,
        transformer_file=f"{index['transformer'][0]}.py" if standalone else None,
        model_config=json.dumps(config, indent=2, sort_keys=True),
        training_settings=json.dumps(training_settings, indent=2, sort_keys=True, default=str) if training_settings else None,
        metrics=[(name, f"{v:.4g}" if isinstance(v, float) else v) for name, v in sorted((metrics or {}).items())],
    )
    tags = ["diffusers"] + (["diffusers-training"] if training_settings else [])
    tags += ["adversarial-flow-models"] + (["flow-matching"] if flow else []) + (["continuous-adversarial-flow-models"] if cafm else [])
    tags += ["class-conditional" if conditional else "unconditional", "image-generation"]
    return populate_model_card(card, tags=tags)


def save_model_card(folder: str, **kwargs) -> str:
    """Write `make_model_card(folder, **kwargs)` to `folder/README.md` (atomically); returns the path."""
    card = make_model_card(folder, **kwargs)
    path = os.path.join(folder, "README.md")
    with atomic_file(path, "wb") as f:
        f.write(str(card).encode("utf-8"))
    return path


# The end of every CAFM card (text-to-image, LoRA): the run's settings when known, then the citation.
CAFM_CARD_FOOTER = """{% if training_settings %}
## Training settings

```json
{{ training_settings }}
```
{% endif %}
## Citation

Continuous Adversarial Flow Models, Lin, Yang, Lin, Chen and Fan, 2026 ([arXiv 2604.11521]({{ cafm_paper_url }})),
trained with [diffusers-afm]({{ project_url }}).
"""


TEXT_TO_IMAGE_TEMPLATE = CARD_HEADER + """
The generator is a stock `ZImageTransformer2DModel`: diffusers alone samples from it.

```python
import torch
from diffusers import ZImagePipeline

pipe = ZImagePipeline.from_pretrained("{{ repo_id }}", dtype=torch.bfloat16).to("cuda")
image = pipe({{ example_prompt }}, height={{ resolution }}, width={{ resolution }}, num_inference_steps=50, guidance_scale=4.0).images[0]
```
""" + CAFM_CARD_FOOTER


def save_text_to_image_model_card(folder: str, *, repo_id: Optional[str] = None, base_model: Optional[str] = None,
                                  dataset: Optional[str] = None, training_settings: Optional[Dict[str, Any]] = None,
                                  sample_grid: Optional[str] = None, description: Optional[str] = None,
                                  license: Optional[str] = "apache-2.0", example_prompt: str = "a photo of a cat",
                                  resolution: int = 1024) -> str:
    """The README.md of a Continuous-AFM post-trained `ZImagePipeline` folder (atomically); returns its path.
    The loading snippet samples `example_prompt` (a caption of the training data, say) at `resolution`."""
    if sample_grid is not None and not os.path.isfile(os.path.join(folder, sample_grid)):
        raise FileNotFoundError(f"`sample_grid`: no file {sample_grid!r} in {folder!r}.")
    repo_id = repo_id or os.path.basename(os.path.abspath(folder))
    card_data = ModelCardData(license=license, base_model=hub_model_id(base_model), pipeline_tag="text-to-image",
                              datasets=[dataset] if dataset and _is_hub_dataset(dataset) else None)
    summary = (f"A text-to-image Z-Image model post-trained with Continuous Adversarial Flow Models"
               f"{f' on {dataset}' if dataset else ''}.{_base_model_text(base_model, cafm=True)} {description or ''}").strip()
    card = ModelCard.from_template(
        card_data, template_str=TEXT_TO_IMAGE_TEMPLATE, model_name=repo_id.rstrip("/").rsplit("/", 1)[-1],
        summary=summary, sample_grid=sample_grid, repo_id=repo_id, project_url=PROJECT_URL, cafm_paper_url=CAFM_PAPER_URL,
        example_prompt=json.dumps(example_prompt), resolution=resolution,
        training_settings=json.dumps(training_settings, indent=2, sort_keys=True, default=str) if training_settings else None,
    )
    tags = ["diffusers"] + (["diffusers-training"] if training_settings else [])
    tags += ["text-to-image", "z-image", "flow-matching", "continuous-adversarial-flow-models"]
    card = populate_model_card(card, tags=tags)
    path = os.path.join(folder, "README.md")
    with atomic_file(path, "wb") as f:
        f.write(str(card).encode("utf-8"))
    return path


LORA_TEMPLATE = CARD_HEADER + """
`{{ weight_name }}` is a LoRA adapter of the transformer of `{{ base_name }}`, in diffusers' layout
(peft is diffusers' LoRA backend: `pip install peft`).

```python
{{ snippet }}
```

`discriminator_lora.safetensors` holds the discriminator's adapter and head: pass this folder as
`--discriminator` to continue the adversarial post-training.
""" + CAFM_CARD_FOOTER


def lora_snippet(base_model: str, repo_id: str, text_to_image: bool, num_classes: int = 1, resolution: int = 1024,
                 example_prompt: str = "a photo of a cat") -> str:
    """How a user samples with the adapter: diffusers' `load_lora_weights` for a `ZImagePipeline`;
    for an `AFMPipeline` (no LoRA loader of its own) the transformer's PEFT integration,
    `load_lora_adapter`, which reads the same file."""
    if text_to_image:
        return ("import torch\nfrom diffusers import ZImagePipeline\n\n"
                f"pipe = ZImagePipeline.from_pretrained({json.dumps(base_model)}, dtype=torch.bfloat16).to(\"cuda\")\n"
                f"pipe.load_lora_weights({json.dumps(repo_id)})\n"
                f"image = pipe({json.dumps(example_prompt)}, height={resolution}, width={resolution}, "
                "num_inference_steps=50, guidance_scale=4.0).images[0]")
    labels = sorted({i * num_classes // 3 for i in range(min(3, num_classes))}) if num_classes > 1 else None
    call = f"class_labels={labels}, " if labels else "batch_size=4, "
    return ("import torch\nfrom diffusers_afm import AFMPipeline\n\n"
            f"pipe = AFMPipeline.from_pretrained({json.dumps(base_model)})\n"
            f"pipe.transformer.load_lora_adapter({json.dumps(repo_id)}, weight_name=\"pytorch_lora_weights.safetensors\", "
            "prefix=\"transformer\")\n"
            f"images = pipe({call}num_inference_steps=50, generator=torch.Generator().manual_seed(0)).images")


def save_lora_model_card(folder: str, *, base_model: str, snippet: str, text_to_image: bool,
                         repo_id: Optional[str] = None, dataset: Optional[str] = None,
                         training_settings: Optional[Dict[str, Any]] = None, sample_grid: Optional[str] = None,
                         description: Optional[str] = None, license: Optional[str] = "apache-2.0",
                         weight_name: str = "pytorch_lora_weights.safetensors") -> str:
    """The README.md of a CAFM-LoRA run's folder (atomically): `base_model` in the metadata where it
    is a Hub id (and named in the text either way), the `lora` tag, and `snippet` (`lora_snippet`).
    Returns its path."""
    if sample_grid is not None and not os.path.isfile(os.path.join(folder, sample_grid)):
        raise FileNotFoundError(f"`sample_grid`: no file {sample_grid!r} in {folder!r}.")
    repo_id = repo_id or os.path.basename(os.path.abspath(folder))
    card_data = ModelCardData(license=license, base_model=hub_model_id(base_model),
                              pipeline_tag="text-to-image" if text_to_image else None,
                              datasets=[dataset] if dataset and _is_hub_dataset(dataset) else None)
    base_name = hub_model_id(base_model) or os.path.basename(os.path.normpath(base_model))
    summary = (f"A LoRA adapter post-trained with Continuous Adversarial Flow Models{f' on {dataset}' if dataset else ''}."
               f"{_base_model_text(base_model, cafm=True)} {description or ''}").strip()
    card = ModelCard.from_template(
        card_data, template_str=LORA_TEMPLATE, model_name=repo_id.rstrip("/").rsplit("/", 1)[-1], summary=summary,
        sample_grid=sample_grid, weight_name=weight_name, base_name=base_name, snippet=snippet, project_url=PROJECT_URL,
        cafm_paper_url=CAFM_PAPER_URL,
        training_settings=json.dumps(training_settings, indent=2, sort_keys=True, default=str) if training_settings else None,
    )
    tags = ["diffusers"] + (["diffusers-training"] if training_settings else []) + ["lora"]
    tags += (["text-to-image", "z-image"] if text_to_image else ["class-conditional"])
    tags += ["flow-matching", "continuous-adversarial-flow-models"]
    card = populate_model_card(card, tags=tags)
    path = os.path.join(folder, "README.md")
    with atomic_file(path, "wb") as f:
        f.write(str(card).encode("utf-8"))
    return path


# ----------------------------------------------------------------------------- a training run's output
def save_pipeline_folder(output_dir: str, pipeline, *, sample_grid=None, discriminator=None, standalone: bool = False,
                         **card) -> None:
    """A training run's final folder, each part written atomically: `samples.png` (the PIL
    `sample_grid`), the pipeline (`model_index.json` last, so that a loader never sees half a
    folder), with `standalone` the code that loads it without diffusers-afm, `discriminator/`, and
    the model card (`make_model_card`'s keyword arguments in `card`)."""
    from .pipelines.export import export_standalone
    from .utils import atomic_save_pretrained, save_image, save_pretrained_into

    if sample_grid is not None:
        save_image(sample_grid, os.path.join(output_dir, "samples.png"))
        card.setdefault("sample_grid", "samples.png")
    save_pretrained_into(pipeline, output_dir, last="model_index.json")
    if standalone:
        export_standalone(output_dir)  # before the card, which then shows the trust_remote_code snippet
    if discriminator is not None:
        atomic_save_pretrained(discriminator, os.path.join(output_dir, "discriminator"))
    save_model_card(output_dir, **card)


# ----------------------------------------------------------------------------- a training run and the Hub
def default_hub_model_id(output_dir: str) -> str:
    """`--hub_model_id` when none is given: the output folder's name, as in diffusers' trainers."""
    return os.path.basename(os.path.normpath(os.path.abspath(output_dir)))


def check_push_to_hub(push_to_hub: bool) -> None:
    """Pushing while offline is an error at parse time, rather than after training."""
    if push_to_hub and hub_offline():
        raise SettingError("push_to_hub", True, "only with Hub access: HF_HUB_OFFLINE is set")


def create_hub_repo(hub_model_id: str, private: bool = False, token: Optional[str] = None) -> str:
    """Create (or find) a run's `--push_to_hub` repository at its start, so that a bad token or id
    fails before training rather than after it. Returns the repository id."""
    from huggingface_hub import create_repo

    try:
        return create_repo(hub_model_id, exist_ok=True, private=private, token=token).repo_id
    except Exception as err:  # huggingface_hub raises HTTP, offline and validation errors
        raise ValueError(f"`--push_to_hub`: cannot create the repository {hub_model_id!r} "
                         f"(check --hub_model_id and --hub_token / `huggingface-cli login`): {err}") from None


def upload_output(output_dir: str, repo_id: str, commit_message: str, logging_dir: str = "logs",
                  token: Optional[str] = None) -> None:
    """Upload a run's output folder without its checkpoints, hidden files and tracker logs."""
    from huggingface_hub import upload_folder

    upload_folder(repo_id=repo_id, folder_path=output_dir, token=token, commit_message=commit_message,
                  ignore_patterns=["checkpoint-*", ".*", f"{logging_dir}/*"])


@functools.lru_cache(maxsize=8)
def download_pretrained(path: str, what: str, allow_patterns: Tuple[str, ...]) -> str:
    """`--pretrained_model_name_or_path`: a local folder as it is; a Hub id downloaded (or found in
    the cache) with the files `allow_patterns` match; a `SettingError` naming `what` is expected otherwise.

    Remembered per process: a trainer resolves the same id when it checks its flags and when it
    trains, and the Hub is asked once."""
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, allow_patterns=list(allow_patterns))
    except Exception as err:  # not an id, not on the Hub, offline and not cached, no access
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise SettingError("pretrained_model_name_or_path", path,
                           f"{what}, or a Hub repository id that can be downloaded ({reason})") from None


__all__ = [
    "check_push_to_hub",
    "create_hub_repo",
    "default_hub_model_id",
    "download_pretrained",
    "hub_model_id",
    "make_model_card",
    "save_model_card",
    "save_pipeline_folder",
    "save_text_to_image_model_card",
    "upload_output",
]
