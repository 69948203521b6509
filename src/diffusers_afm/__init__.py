"""diffusers-afm: Adversarial Flow Models (Lin et al., 2025) for Hugging Face diffusers."""

__version__ = "0.1.0"

# diffusers resolves a pipeline component's library among already-imported modules, so the models
# and the pipeline are imported here.
from .models import (
    AFM_PRESETS,
    AdversarialFlowClassifier,
    AdversarialFlowDiscriminator,
    AdversarialFlowTransformer2DModel,
    preset_config,
)
from .pipelines import AFMPipeline

__all__ = [
    "AFMPipeline",
    "AFM_PRESETS",
    "AdversarialFlowClassifier",
    "AdversarialFlowDiscriminator",
    "AdversarialFlowTransformer2DModel",
    "preset_config",
]
