from .jit import convert_jit_discriminator, convert_jit_generator, infer_jit_config, load_jit_checkpoint
from .official import (
    convert_cafm_discriminator,
    convert_official_classifier,
    convert_official_discriminator,
    convert_official_generator,
    convert_sit_generator,
    infer_reference_kwargs,
    strip_wrapper_prefixes,
)

__all__ = [
    "convert_cafm_discriminator",
    "convert_jit_discriminator",
    "convert_jit_generator",
    "convert_official_classifier",
    "convert_official_discriminator",
    "convert_official_generator",
    "convert_sit_generator",
    "infer_jit_config",
    "infer_reference_kwargs",
    "load_jit_checkpoint",
    "strip_wrapper_prefixes",
]
