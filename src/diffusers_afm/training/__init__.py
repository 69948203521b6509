"""The AFM training objective as small pure pieces, and the step that drives them (docs/method.md)."""

from .augment import augment_pair, random_affine
from .ema import ModelEMA, unwrap
from .grad_norm import GradientNormalization
from .losses import (
    classifier_guidance_term,
    discriminator_loss,
    generator_loss,
    ot_loss,
    perturbed_batch_size,
    relativistic_loss,
)
from . import recipe
from .pairs import flow_weight, make_flow_pair, sample_timestep_pairs
from .schedules import constant, cosine, ema_warmup, linear, parse_schedule, sequence
from .step import AFMObjective, AFMTrainingStep
from ..utils import RunStopped

__all__ = [
    "AFMObjective",
    "AFMTrainingStep",
    "GradientNormalization",
    "ModelEMA",
    "RunStopped",
    "augment_pair",
    "classifier_guidance_term",
    "constant",
    "cosine",
    "discriminator_loss",
    "ema_warmup",
    "flow_weight",
    "generator_loss",
    "linear",
    "make_flow_pair",
    "ot_loss",
    "parse_schedule",
    "perturbed_batch_size",
    "recipe",
    "random_affine",
    "relativistic_loss",
    "sample_timestep_pairs",
    "sequence",
    "unwrap",
]
