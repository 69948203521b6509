"""The AFM training objective as small pure pieces, the steps that drive them (docs/method.md), and
the machinery every trainer shares: settings objects, the loop's helpers, checkpoints, the command line."""

from .augment import augment_pair, random_affine
from .distributed import unwrap, without_ddp
from .ema import ModelEMA
from .flow_matching import FlowMatchingObjective, FlowMatchingTrainingStep
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
from .optimization import EMAConfig, OptimizerConfig, optimizer_update
from .pairs import flow_weight, make_flow_pair, sample_timestep_pairs
from .run import RunConfig
from .schedules import constant, cosine, ema_warmup, linear, parse_schedule, sequence
from .step import AFMObjective, AFMTrainingStep
from ..utils import RunStopped, SettingError

__all__ = [
    "AFMObjective",
    "AFMTrainingStep",
    "EMAConfig",
    "FlowMatchingObjective",
    "FlowMatchingTrainingStep",
    "GradientNormalization",
    "ModelEMA",
    "OptimizerConfig",
    "RunConfig",
    "RunStopped",
    "SettingError",
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
    "optimizer_update",
    "ot_loss",
    "parse_schedule",
    "perturbed_batch_size",
    "recipe",
    "random_affine",
    "relativistic_loss",
    "sample_timestep_pairs",
    "sequence",
    "unwrap",
    "without_ddp",
]
