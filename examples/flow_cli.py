"""What the two flow-model trainers share: `train_flow_matching.py` (plain flow matching, the baseline)
and `train_cafm.py` (Continuous-AFM post-training).

Both train a `FlowMatchingTransformer2DModel` on the data of `training_cli`, sample their validation
grids with the pipeline's ODE solver, checkpoint with `CheckpointIO`, and end with an `AFMPipeline`
folder (EMA weights, class names, samples, a model card). Their validation and their output are
written here once; the loop is `training_cli.train_loop`, with each trainer's step.
"""

import argparse
import os
from typing import Callable, Dict, Optional

from accelerate.logging import get_logger

from diffusers_afm import AFMPipeline, FlowMatchingTransformer2DModel, export_standalone, save_model_card
from diffusers_afm.flow import SOLVERS
from diffusers_afm.pipelines import class_grid
from diffusers_afm.training.cafm import TIME_SAMPLINGS
from diffusers_afm.utils import atomic_directory, save_pretrained_into
from training_cli import TRUNK_KEYS, add_hub_arguments, flag_error, log_grid, save_grid, trunk_config

logger = get_logger(__name__)


# ----------------------------------------------------------------------------- flags
def add_flow_arguments(p: argparse.ArgumentParser) -> None:
    """Validation sampling, the time distribution, the Hub and the output code flags of both trainers."""
    p.add_argument("--time_sampling", choices=TIME_SAMPLINGS, default="uniform",
                   help="Distribution of the training times t (1 = noise): uniform (SiT's, CAFM's), logit_normal, "
                        "or logit_normal_jit (JiT's).")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="Recompute the flow model's activations in the backward pass: less memory, more time "
                        "(not the CAFM discriminator's: it does not compose with the JVP).")
    p.add_argument("--validation_steps", type=int, default=None, help="Sample grid of the EMA model every N steps.")
    p.add_argument("--num_validation_classes", type=int, default=10, help="Rows of the sample grids (evenly spaced classes).")
    p.add_argument("--num_validation_images", type=int, default=8, help="Per class (one grid row per class).")
    p.add_argument("--validation_inference_steps", type=int, default=None,
                   help="Solver steps of the validation grids (default: the trainer's).")
    p.add_argument("--validation_solver", choices=SOLVERS, default="euler", help="ODE solver of the validation grids.")
    p.add_argument("--validation_guidance_scale", type=float, default=1.0,
                   help="Classifier-free guidance of the validation grids (1 = none).")
    add_hub_arguments(p)


def check_flow_arguments(args: argparse.Namespace) -> None:
    for flag in ("validation_steps", "num_validation_classes", "num_validation_images", "validation_inference_steps"):
        if getattr(args, flag) < 1:
            raise flag_error(flag, getattr(args, flag), "an integer >= 1")
    if args.validation_guidance_scale < 0:
        raise flag_error("validation_guidance_scale", args.validation_guidance_scale, "a number >= 0 (1 = no guidance)")
    if not 0 <= args.class_dropout_prob < 1:
        raise flag_error("class_dropout_prob", args.class_dropout_prob, "a number in [0, 1)")


def build_flow_model(args, sample_size: int, in_channels: int, num_classes: int) -> FlowMatchingTransformer2DModel:
    return FlowMatchingTransformer2DModel(
        **trunk_config(args.model_config, args.default_trunk),
        sample_size=sample_size, in_channels=in_channels, num_classes=num_classes,
        class_dropout_prob=args.class_dropout_prob,
    )


def check_data_fits(model, data, what: str) -> None:
    """The loaded data must be what the (pretrained) model takes: side, channels, classes."""
    config = model.config
    for key, value in (("sample_size", data.sample_size), ("in_channels", data.in_channels), ("num_classes", data.num_classes)):
        if config[key] != value:
            raise ValueError(
                f"{what} has {key}={config[key]}, but the training data gives {value}; pass the --resolution, --vae "
                "and data it was trained on (latent side = resolution / 8 with the SD-VAE)."
            )


# ----------------------------------------------------------------------------- outputs
def validation_grid(args, model, vae, id2label):
    pipeline = AFMPipeline(transformer=model, vae=vae, id2label=id2label)
    pipeline.set_progress_bar_config(disable=True)
    guidance = args.validation_guidance_scale if model.null_class_id is not None else 1.0
    return class_grid(pipeline, args.num_validation_classes, args.num_validation_images, args.seed,
                      num_inference_steps=args.validation_inference_steps, solver=args.validation_solver,
                      guidance_scale=guidance)


def save_flow_pipeline(args, accelerator, ema_model, vae, id2label, step: int, settings: Dict,
                       discriminator=None, base_model: Optional[str] = None, cafm: bool = False, dataset: str = None):
    """The final AFMPipeline (the EMA flow model), the discriminator (CAFM), a grid and a model card, each atomic."""
    grid = validation_grid(args, ema_model, vae, id2label)
    save_grid(grid, os.path.join(args.output_dir, "samples.png"))
    pipeline = AFMPipeline(transformer=ema_model, vae=vae, id2label=id2label)
    save_pretrained_into(pipeline, args.output_dir, last="model_index.json")
    if args.standalone_hub_files:
        export_standalone(args.output_dir)
    if discriminator is not None:
        with atomic_directory(os.path.join(args.output_dir, "discriminator")) as tmp:
            accelerator.unwrap_model(discriminator).save_pretrained(tmp, safe_serialization=True)
    trunk = {key: ema_model.config[key] for key in TRUNK_KEYS}
    save_model_card(
        args.output_dir,
        repo_id=args.hub_model_id,
        base_model=base_model,
        dataset=dataset or args.dataset_name or args.train_data_dir or "scikit-learn digits",
        training_settings={**settings, "model_config": trunk},
        sample_grid="samples.png",
        description=f"These are the EMA weights after {step} iterations.",
        cafm=cafm,
    )
    return grid


def validation_callback(args, accelerator, ema, data) -> Callable[[int], None]:
    """`after_checkpoint` of `training_cli.train_loop`: the EMA model's grid every `--validation_steps`."""

    def validate(step: int) -> None:
        if step % args.validation_steps == 0 and accelerator.is_main_process:
            grid = validation_grid(args, ema.model, data.vae, data.id2label)
            save_grid(grid, os.path.join(args.output_dir, "samples", f"step_{step:07d}.png"))
            log_grid(accelerator, grid, step)

    return validate
