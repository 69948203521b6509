from .discriminator_afm import AdversarialFlowClassifier, AdversarialFlowDiscriminator
from .discriminator_jit import AdversarialFlowJiTDiscriminator
from .discriminator_zimage import AdversarialFlowZImageDiscriminator
from .transformer_afm import AFM_PRESETS, AdversarialFlowTransformer2DModel, preset_config
from .transformer_flow import FlowMatchingTransformer2DModel
from .transformer_jit import JIT_PRESETS, JiTTransformer2DModel, jit_preset_config

__all__ = [
    "AFM_PRESETS",
    "JIT_PRESETS",
    "AdversarialFlowClassifier",
    "AdversarialFlowDiscriminator",
    "AdversarialFlowJiTDiscriminator",
    "AdversarialFlowTransformer2DModel",
    "AdversarialFlowZImageDiscriminator",
    "FlowMatchingTransformer2DModel",
    "JiTTransformer2DModel",
    "jit_preset_config",
    "preset_config",
]
