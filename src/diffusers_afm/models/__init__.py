from .discriminator_afm import AdversarialFlowClassifier, AdversarialFlowDiscriminator
from .discriminator_zimage import AdversarialFlowZImageDiscriminator
from .transformer_afm import AFM_PRESETS, AdversarialFlowTransformer2DModel, preset_config
from .transformer_flow import FlowMatchingTransformer2DModel

__all__ = [
    "AFM_PRESETS",
    "AdversarialFlowClassifier",
    "AdversarialFlowDiscriminator",
    "AdversarialFlowTransformer2DModel",
    "AdversarialFlowZImageDiscriminator",
    "FlowMatchingTransformer2DModel",
    "preset_config",
]
