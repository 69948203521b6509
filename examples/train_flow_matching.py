#!/usr/bin/env python
"""Train a class-conditional flow-matching model (SiT's objective) with Accelerate: the starting point
of Continuous AFM for users without a pretrained model.

    # the embedded default: a pixel-space model on scikit-learn's handwritten digits (CPU, minutes)
    python examples/train_flow_matching.py --output_dir fm-digits

    # your images, or ImageNet with the SD-VAE, on every GPU
    accelerate launch examples/train_flow_matching.py --train_data_dir my_images --mixed_precision bf16

Rectified flow matching: `x_t = (1 - t) x0 + t z`, `t ~ U(0, 1)`, the model regresses `z - x0`
(`diffusers_afm.training.cafm.flow_matching_loss`); labels are replaced by the null class with
`--class_dropout_prob` (0.1), so the model samples with classifier-free guidance. The data, latent
cache, checkpoints, logging, `--config` and `--dry_run` are those of `train_afm.py`. The run ends with
an `AFMPipeline` folder (EMA weights) that samples with `solver=` and `guidance_scale=`, and that
`examples/train_cafm.py --pretrained_model_name_or_path` post-trains.
"""

import argparse
import os

import torch
from accelerate.logging import get_logger
from diffusers.optimization import get_scheduler

from diffusers_afm import AFM_PRESETS, FlowMatchingTransformer2DModel, preset_config
from diffusers_afm.data import DEFAULT_VAE, load_training_data
from diffusers_afm.training import ModelEMA, ema_warmup
from diffusers_afm.training.cafm import FlowMatchingTrainingStep
from diffusers_afm.training.checkpoint import CheckpointIO, check_resume_flag
from diffusers_afm.training.loop import adamw, noise_generator
from flow_cli import (
    add_flow_arguments,
    build_flow_model,
    check_data_fits,
    check_flow_arguments,
    save_flow_pipeline,
    validation_callback,
)
from training_cli import (
    DIGITS_MODEL,
    TrainingArgumentParser,
    add_adamw_arguments,
    add_data_arguments,
    add_run_arguments,
    apply_defaults,
    check_hub_arguments,
    check_model_input,
    check_model_spec,
    check_run_arguments,
    flag_error,
    init_trackers,
    model_summary,
    planned_model_inputs,
    resolve_data_defaults,
    resolved_settings,
    start_run,
    train_loop,
    upload_output,
)
import training_cli

logger = get_logger(__name__)

# The embedded digits: a few minutes on a CPU.
DIGITS_DEFAULTS = dict(resolution=8, train_batch_size=64, max_train_steps=1500, learning_rate=1e-3, ema_decay=0.999,
                       ema_warmup=True, checkpointing_steps=500, validation_steps=500, random_flip=False, vae="none",
                       validation_inference_steps=8)
# SiT's ImageNet recipe (AdamW lr 1e-4, no weight decay, EMA 0.9999, batch 256 in all).
PAPER_DEFAULTS = dict(resolution=256, train_batch_size=32, max_train_steps=400_000, learning_rate=1e-4,
                      ema_decay=0.9999, ema_warmup=False, checkpointing_steps=5000, validation_steps=5000,
                      random_flip=True, vae=DEFAULT_VAE, validation_inference_steps=50)
SMALL_SCHEDULE = dict(train_batch_size=64, max_train_steps=5000, learning_rate=3e-4, ema_decay=0.999, ema_warmup=True,
                      checkpointing_steps=1000, validation_steps=1000, validation_inference_steps=16)


def build_parser() -> argparse.ArgumentParser:
    p = TrainingArgumentParser(description="Train a flow-matching model (the baseline of Continuous AFM).")
    add_data_arguments(p)
    p.add_argument("--model_config", default=None,
                   help=f"A size ({', '.join(AFM_PRESETS)}) or a JSON config file. Default: XL/2 (SiT-XL/2); the digits "
                        "and --defaults small: a model sized to the data (--dry_run prints it).")
    p.add_argument("--init_from", "--pretrained_model_name_or_path", dest="init_from", default=None,
                   help="Continue from a flow-model folder (an AFMPipeline folder with a FlowMatchingTransformer2DModel).")
    p.add_argument("--class_dropout_prob", type=float, default=0.1,
                   help="Probability of training on the null class (classifier-free guidance); 0 = no null class.")
    add_adamw_arguments(p, beta1=0.9, beta2=0.999, weight_decay=0.0, learning_rate_help="AdamW lr (1e-4; digits 1e-3).")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping (0: off).")
    p.add_argument("--ema_decay", type=float, default=None, help="EMA decay (0.9999; digits 0.999).")
    p.add_argument("--ema_warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="Decay min(ema_decay, (1+n)/(10+n)) as diffusers' EMAModel; on for the digits default.")
    add_run_arguments(p, output_dir="fm-model", tracker_project_name="train_flow_matching")
    add_flow_arguments(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse (config file, then command line) and check every flag before any data or model is loaded."""
    args = build_parser().parse_args(argv)
    defaults = resolve_data_defaults(args, digits=(DIGITS_DEFAULTS, DIGITS_MODEL), paper=(PAPER_DEFAULTS, preset_config("XL/2")),
                                     small_schedule=SMALL_SCHEDULE)
    apply_defaults(args, defaults)
    check_run_arguments(args)
    check_flow_arguments(args)
    if args.learning_rate <= 0:
        raise flag_error("learning_rate", args.learning_rate, "a number > 0")
    if args.max_grad_norm < 0:
        raise flag_error("max_grad_norm", args.max_grad_norm, "a number >= 0")
    if not 0 <= args.ema_decay < 1:
        raise flag_error("ema_decay", args.ema_decay, "a number in [0, 1)")
    patch_size = check_model_spec("model_config", args.model_config, args.default_trunk)
    if not args.dry_run:
        if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
            raise flag_error("train_data_dir", args.train_data_dir, "an existing folder of images")
        if args.init_from is not None and not os.path.isfile(os.path.join(args.init_from, "transformer", "config.json")):
            raise flag_error("init_from", args.init_from, "a flow-model pipeline folder (it has no transformer/config.json)")
        check_model_input(args, patch_size)
        check_resume_flag(args.resume_from_checkpoint)
    check_hub_arguments(args)
    return args


def settings(args: argparse.Namespace) -> dict:
    planned = planned_model_inputs(args)
    with torch.device("meta"):
        model = build_flow_model(args, planned["sample_size"], planned["in_channels"], planned["num_classes"])
    summary = model_summary(transformer=model)
    if planned["assumed"]:
        summary["assumed"] = planned["assumed"]
    return {**resolved_settings(args, build_parser()), "_model": summary}


def main(argv=None):
    return training_cli.main(parse_args, settings, train, argv)


def train(args: argparse.Namespace) -> str:
    accelerator, hub_repo_id, resume_path, data = start_run(args, load_training_data)
    model = build_flow_model(args, data.sample_size, data.in_channels, data.num_classes)
    if args.init_from is not None:
        source = FlowMatchingTransformer2DModel.from_pretrained(os.path.join(args.init_from, "transformer"))
        check_data_fits(source, data, f"`--init_from` {args.init_from}")
        model = source
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    logger.info(f"flow model {model.num_parameters() / 1e6:.2f}M parameters")

    optimizer = adamw(model.parameters(), args.learning_rate, (args.adam_beta1, args.adam_beta2), args.adam_epsilon,
                      args.adam_weight_decay)
    scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                              num_training_steps=args.max_train_steps * accelerator.num_processes)
    model, optimizer, dataloader, scheduler = accelerator.prepare(model, optimizer, data.dataloader, scheduler)
    ema = ModelEMA(model)
    rng = noise_generator(accelerator, args.seed)
    step = FlowMatchingTrainingStep(
        accelerator, model, optimizer, ema=ema, ema_decay=ema_warmup(args.ema_decay) if args.ema_warmup else args.ema_decay,
        max_grad_norm=args.max_grad_norm or None, time_sampling=args.time_sampling,
        class_dropout_prob=args.class_dropout_prob, null_class_id=accelerator.unwrap_model(model).null_class_id,
        noise_generator=rng,
    )
    checkpoints = CheckpointIO(accelerator, ema=ema, noise_generator=rng)
    global_step = 0
    if resume_path is not None:
        global_step = checkpoints.load(resume_path, verify=False)
        logger.info(f"Resumed from {resume_path} at step {global_step}")
    init_trackers(accelerator, args.tracker_project_name, settings(args))
    global_step = train_loop(args, accelerator, data, dataloader, step, checkpoints, global_step, [scheduler],
                             postfix=lambda v: {"loss": f"{v['loss']:.4f}"},
                             after_checkpoint=validation_callback(args, accelerator, ema, data))

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_flow_pipeline(args, accelerator, ema.model, data.vae, data.id2label, global_step, settings(args),
                           base_model=args.init_from if args.init_from and not os.path.isdir(args.init_from) else None)
        logger.info(f"Saved the flow-matching AFMPipeline to {args.output_dir}")
        if args.push_to_hub:
            upload_output(args, hub_repo_id, f"Flow-matching training, step {global_step}")
    accelerator.end_training()
    return args.output_dir


if __name__ == "__main__":
    training_cli.run(parse_args, settings, train)
