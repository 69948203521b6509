"""diffusers-afm: Adversarial Flow Models (Lin et al., 2025) for Hugging Face diffusers."""

__version__ = "0.1.0"

import diffusers

# diffusers resolves a pipeline component's library among already-imported modules, so the models
# and the pipeline are imported here.
from .hub import make_model_card, save_model_card
from .models import (
    AFM_PRESETS,
    AdversarialFlowClassifier,
    AdversarialFlowDiscriminator,
    AdversarialFlowJiTDiscriminator,
    AdversarialFlowTransformer2DModel,
    AdversarialFlowZImageDiscriminator,
    FlowMatchingTransformer2DModel,
    JiTTransformer2DModel,
    preset_config,
)
from .pipelines import AFMPipeline, export_standalone
from .schedulers import FlowHeunScheduler

# `DiffusionPipeline.from_pretrained` looks the `_class_name` of model_index.json up on the diffusers
# module itself, so after `import diffusers_afm` it finds "AFMPipeline" there, and the folders we
# write load in plain diffusers.
diffusers.AFMPipeline = AFMPipeline

__all__ = [
    "AFMPipeline",
    "AFM_PRESETS",
    "AdversarialFlowClassifier",
    "AdversarialFlowDiscriminator",
    "AdversarialFlowJiTDiscriminator",
    "AdversarialFlowTransformer2DModel",
    "AdversarialFlowZImageDiscriminator",
    "FlowHeunScheduler",
    "FlowMatchingTransformer2DModel",
    "JiTTransformer2DModel",
    "export_standalone",
    "make_model_card",
    "preset_config",
    "save_model_card",
]
