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
    "convert_official_classifier",
    "convert_official_discriminator",
    "convert_official_generator",
    "convert_sit_generator",
    "infer_reference_kwargs",
    "strip_wrapper_prefixes",
]
