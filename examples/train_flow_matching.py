#!/usr/bin/env python
"""Train a class-conditional flow-matching model (SiT's objective) with Accelerate: the starting point
of Continuous AFM for users without a pretrained model.

    # the embedded default: a pixel-space model on scikit-learn's handwritten digits (CPU, minutes)
    python examples/train_flow_matching.py --output_dir fm-digits

    # your images, or ImageNet with the SD-VAE, on every GPU
    accelerate launch examples/train_flow_matching.py --train_data_dir my_images --mixed_precision bf16

Rectified flow matching: `x_t = (1 - t) x0 + t z`, `t ~ U(0, 1)`, the model regresses `z - x0`
(`diffusers_afm.training.flow_matching`); labels are replaced by the null class with
`--class_dropout_prob` (0.1), so the model samples with classifier-free guidance. The data, latent
cache, checkpoints, logging, `--config` and `--dry_run` are those of `train_afm.py`. The run ends with
an `AFMPipeline` folder (EMA weights) that samples with `solver=` and `guidance_scale=`, and that
`examples/train_cafm.py --pretrained_model_name_or_path` post-trains.
"""

import argparse
import json
import os

import torch
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from diffusers_afm import AFMPipeline, FlowMatchingTransformer2DModel, JiTTransformer2DModel
from diffusers_afm.data import DATA_FLAGS, DEFAULT_VAE, check_model_input, choose_defaults, load_training_data, planned_model_inputs
from diffusers_afm.flow import SOLVERS
from diffusers_afm.hub import check_push_to_hub, create_hub_repo, default_hub_model_id, save_pipeline_folder, upload_output
from diffusers_afm.pipelines import class_grid
from diffusers_afm.training import (
    EMAConfig,
    FlowMatchingObjective,
    FlowMatchingTrainingStep,
    ModelEMA,
    OptimizerConfig,
    RunConfig,
    cli,
    recipe,
)
from diffusers_afm.training.checkpoint import CheckpointIO, check_resume_flag
from diffusers_afm.training.memory import plan_summary
from diffusers_afm.training.output_dir import check_free_space, start_run
from diffusers_afm.training.loop import Throughput, epoch_batches, host_values, noise_generator
from diffusers_afm.training.run import ValidationConfig, init_trackers, log_peak_memory, save_validation_grid
from diffusers_afm.utils import SettingError, check_setting, settings_from_flags

logger = get_logger(__name__)

# The embedded digits: a few minutes on a CPU.
DIGITS_DEFAULTS = dict(model_config=recipe.DIGITS_MODEL, resolution=8, train_batch_size=64, max_train_steps=1500,
                       learning_rate=1e-3, ema_decay=0.999, ema_warmup=True, checkpointing_steps=500, validation_steps=500,
                       random_flip=False, vae="none", validation_inference_steps=8)
# SiT's ImageNet recipe (AdamW lr 1e-4, no weight decay, EMA 0.9999, batch 256 in all).
PAPER_DEFAULTS = dict(model_config="XL/2", resolution=256, train_batch_size=32, max_train_steps=400_000, learning_rate=1e-4,
                      ema_decay=0.9999, ema_warmup=False, checkpointing_steps=5000, validation_steps=5000,
                      random_flip=True, vae=DEFAULT_VAE, validation_inference_steps=50)
SMALL_SCHEDULE = dict(train_batch_size=64, max_train_steps=5000, learning_rate=3e-4, ema_decay=0.999, ema_warmup=True,
                      checkpointing_steps=1000, validation_steps=1000, validation_inference_steps=16)


# ----------------------------------------------------------------------------- 1. flags
def build_parser() -> cli.TrainingArgumentParser:
    p = cli.TrainingArgumentParser(description="Train a flow-matching model (the baseline of Continuous AFM).")
    cli.add_data_arguments(p, default_vae=DEFAULT_VAE, small_data_max_images=recipe.SMALL_DATA_MAX_IMAGES,
                           pixel_max_resolution=recipe.SMALL_DATA_PIXEL_MAX_RESOLUTION)
    p.add_argument("--model_config", default=None,
                   help="A size (T/2, S/2, B/2, ...; another patch size: B/4) or a JSON config file of the trunk; or a "
                        "JiT model: a JiT size (JiT-B/16, ..., JiT-H/32) or a JSON config with \"_class_name\": "
                        "\"JiTTransformer2DModel\" (pixel space, x-prediction; docs/cafm.md, 'JiT'). Default: XL/2 "
                        "(SiT-XL/2); the digits and --defaults small: a model sized to the data (--dry_run prints it).")
    p.add_argument("--init_from", "--pretrained_model_name_or_path", dest="init_from", default=None,
                   help="Continue from a flow-model folder (an AFMPipeline folder with a FlowMatchingTransformer2DModel).")
    p.add_argument("--class_dropout_prob", type=float, default=0.1,
                   help="Probability of training on the null class (classifier-free guidance); 0 = no null class.")
    cli.add_time_sampling_argument(p)
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="Recompute the model's activations in the backward pass: less memory, more time.")
    cli.add_optimizer_arguments(p, beta1=0.9, beta2=0.999, weight_decay=0.0, max_grad_norm=1.0,
                                learning_rate_help="AdamW lr (1e-4; digits 1e-3).", max_grad_norm_help="Gradient clipping.")
    cli.add_ema_arguments(p, decay=None, decay_help="EMA decay (0.9999; digits 0.999).", warmup=None)
    cli.add_run_arguments(p, output_dir="fm-model", tracker_project_name="train_flow_matching")
    cli.add_validation_arguments(p, SOLVERS)
    cli.add_hub_arguments(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse (config file, then command line) and check every flag before any data or model is loaded."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with cli.flag_errors():
        kind = choose_defaults(args.defaults, args.dataset_name, args.train_data_dir, args.latent_cache,
                               args.max_train_samples, recipe.SMALL_DATA_MAX_IMAGES)
        parser.set_defaults(**recipe.data_defaults(
            kind, DIGITS_DEFAULTS, PAPER_DEFAULTS, dataset_name=args.dataset_name, train_data_dir=args.train_data_dir,
            latent_cache=args.latent_cache, max_train_samples=args.max_train_samples, resolution=args.resolution,
            vae=args.vae, num_train_epochs=args.num_train_epochs, default_vae=DEFAULT_VAE, small_schedule=SMALL_SCHEDULE))
        args = parser.parse_args(argv)  # again: the flags left unset take the recipe's defaults
        args.defaults = kind
        if args.push_to_hub and not args.hub_model_id:
            args.hub_model_id = default_hub_model_id(args.output_dir)
        # Every value rule lives in the library's settings objects; built here, they check the flags.
        for settings_class in (RunConfig, ValidationConfig, OptimizerConfig, EMAConfig, FlowMatchingObjective):
            settings_from_flags(settings_class, vars(args))
        check_setting(args.class_dropout_prob > 0 or args.validation_guidance_scale == 1, "validation_guidance_scale",
                      args.validation_guidance_scale, "1 (no guidance) for a model without a null class (--class_dropout_prob 0)")
        patch_size = recipe.model_patch_size(args.model_config)
        check_push_to_hub(args.push_to_hub and not args.dry_run)
        if not args.dry_run:
            if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
                raise cli.flag_error("train_data_dir", args.train_data_dir, "an existing folder of images")
            if args.init_from is not None:
                flow_model_class(os.path.join(args.init_from, "transformer"), "init_from")
            check_model_input(args.vae, args.resolution, args.latent_cache, patch_size)
            check_resume_flag(args.resume_from_checkpoint)
    return args


def settings(args: argparse.Namespace) -> dict:
    planned = planned_model_inputs(args.dataset_name, args.train_data_dir, args.latent_cache, args.vae, args.resolution,
                                   args.num_classes)
    with torch.device("meta"):
        model = build_flow_model(args, planned["sample_size"], planned["in_channels"], planned["num_classes"])
    summary = cli.model_summary(transformer=model)
    if planned["assumed"]:
        summary["assumed"] = planned["assumed"]
    if args.dry_run:  # what the run's state takes per GPU, under DDP and FSDP2
        summary["memory_plan"] = plan_summary({"transformer": model}, ema=["transformer"])
    return {**build_parser().settings(vars(args)), "_model": summary}


FLOW_MODELS = {cls.__name__: cls for cls in (FlowMatchingTransformer2DModel, JiTTransformer2DModel)}


def flow_model_class(folder: str, flag: str):
    """The flow-model class of a saved model folder (its config's `_class_name`), checked before loading."""
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise SettingError(flag, os.path.dirname(folder), "a flow-model pipeline folder (it has no transformer/config.json)")
    with open(config_file, encoding="utf-8") as f:
        name = json.load(f).get("_class_name")
    if name not in FLOW_MODELS:
        raise SettingError(flag, os.path.dirname(folder), f"a flow model ({' or '.join(FLOW_MODELS)}); it holds a {name!r}")
    return FLOW_MODELS[name]


def build_flow_model(args, sample_size: int, in_channels: int, num_classes: int):
    """A `FlowMatchingTransformer2DModel` (SiT's architecture) or, for a JiT `--model_config`, a
    `JiTTransformer2DModel`; the data decides its input and classes."""
    data = dict(sample_size=sample_size, in_channels=in_channels, num_classes=num_classes,
                class_dropout_prob=args.class_dropout_prob)
    if recipe.is_jit_model(args.model_config):
        return JiTTransformer2DModel(**recipe.jit_model_config(args.model_config), **data)
    return FlowMatchingTransformer2DModel(**recipe.trunk_config(args.model_config), **data)


def sample_grid(args, model, data):
    """The model's grid: one row per class (evenly spaced), the ODE solver of the validation flags."""
    pipeline = AFMPipeline(transformer=model, vae=data.vae, id2label=data.id2label)
    pipeline.set_progress_bar_config(disable=True)
    return class_grid(pipeline, args.num_validation_classes, args.num_validation_images, args.seed,
                      num_inference_steps=args.validation_inference_steps, solver=args.validation_solver,
                      guidance_scale=args.validation_guidance_scale)


# ----------------------------------------------------------------------------- training
def main(argv=None):
    return cli.main(parse_args, settings, train, argv)


def train(args: argparse.Namespace) -> str:
    # 1. The Accelerator, the Hub repository, the checkpoint to resume (verified before any data)
    run = settings_from_flags(RunConfig, vars(args))
    accelerator = run.make_accelerator()
    hub_repo_id = (create_hub_repo(args.hub_model_id, args.hub_private_repo, args.hub_token)
                   if args.push_to_hub and accelerator.is_main_process else None)
    # The output folder writable, locked, free of another run's outputs; the resume's settings compared
    resume_path = start_run(accelerator, run, settings(args))

    # 2. The data and the VAE
    data = load_training_data(**{name: getattr(args, name) for name in DATA_FLAGS}, device=accelerator.device,
                              dtype=run.mixed_precision_dtype)
    args.max_train_steps = run.total_steps(len(data.dataloader), accelerator.num_processes)  # --num_train_epochs, if given

    # 3. The model (or the one to continue from), its optimizer, EMA and step
    model = build_flow_model(args, data.sample_size, data.in_channels, data.num_classes)
    if args.init_from is not None:
        model = flow_model_class(os.path.join(args.init_from, "transformer"), "init_from").from_pretrained(
            os.path.join(args.init_from, "transformer"))
        data.check_fits(model, f"`--init_from` {args.init_from}")
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    logger.info(f"flow model {model.num_parameters() / 1e6:.2f}M parameters")
    config = settings_from_flags(OptimizerConfig, vars(args))
    optimizer = config.adamw(model.parameters())
    scheduler = config.scheduler(optimizer, args.max_train_steps, accelerator.num_processes)
    model, optimizer, dataloader, scheduler = accelerator.prepare(model, optimizer, data.dataloader, scheduler)
    ema = ModelEMA(model)
    rng = noise_generator(accelerator, args.seed)
    train_step = FlowMatchingTrainingStep(
        accelerator, model, optimizer, ema=ema, ema_decay=settings_from_flags(EMAConfig, vars(args)).schedule(),
        max_grad_norm=config.max_grad_norm, time_sampling=args.time_sampling, class_dropout_prob=args.class_dropout_prob,
        null_class_id=accelerator.unwrap_model(model).null_class_id, noise_generator=rng,
    )

    # 4. Resume, trackers
    check_free_space(accelerator, args.output_dir, resume_path, [model], [ema])  # room for a checkpoint
    checkpoints = CheckpointIO(accelerator, ema=ema, noise_generator=rng, settings=settings(args))
    global_step = 0
    if resume_path is not None:
        global_step = checkpoints.load(resume_path, verify=False)
        logger.info(f"Resumed from {resume_path} at step {global_step}")
    init_trackers(accelerator, args.tracker_project_name, settings(args))

    # 5. The loop
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    throughput = Throughput(accelerator.num_processes)
    for batch in epoch_batches(accelerator, dataloader, global_step, args.max_train_steps, args.gradient_accumulation_steps):
        if global_step >= args.max_train_steps:
            break
        x0 = data.latents(batch, rng)
        logs = train_step(x0, batch["class_labels"], global_step)
        scheduler.step()
        throughput.add(len(x0))
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        progress.update(1)
        values = host_values(logs, global_step, args.output_dir)  # one host sync; stops a diverged run
        values.update(images_per_sec=throughput.rate(), lr=scheduler.get_last_lr()[0])
        accelerator.log(values, step=global_step)
        progress.set_postfix(loss=f"{values['loss']:.4f}")
        if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
            checkpoints.save(args.output_dir, global_step, args.checkpoints_total_limit)
        if global_step % args.validation_steps == 0:
            ema_model = ema.full_model(accelerator.device)  # every process: it gathers the shards under FSDP
            if accelerator.is_main_process:
                grid = sample_grid(args, ema_model, data)
                save_validation_grid(accelerator, grid, args.output_dir, global_step)
    progress.close()

    log_peak_memory(accelerator)
    # 6. The pipeline folder (the EMA model), samples and a model card
    accelerator.wait_for_everyone()
    ema_model = ema.full_model(accelerator.device)  # every process (FSDP gathers the shards)
    if accelerator.is_main_process:
        # The card records the model itself, not the name or JSON file it came from.
        if isinstance(ema_model, JiTTransformer2DModel):
            trunk = {k: v for k, v in ema_model.config.items() if not k.startswith("_") and k not in recipe.JIT_DATA_KEYS}
        else:
            trunk = {key: ema_model.config[key] for key in recipe.TRUNK_KEYS}
        save_pipeline_folder(
            args.output_dir, AFMPipeline(transformer=ema_model, vae=data.vae, id2label=data.id2label),
            sample_grid=sample_grid(args, ema_model, data), standalone=args.standalone_hub_files, repo_id=args.hub_model_id,
            base_model=args.init_from,
            dataset=args.dataset_name or args.train_data_dir or "scikit-learn digits",
            training_settings={**settings(args), "model_config": trunk},
            description=f"These are the EMA weights after {global_step} iterations.",
        )
        logger.info(f"Saved the flow-matching AFMPipeline to {args.output_dir}")
        if args.push_to_hub:
            upload_output(args.output_dir, hub_repo_id, f"Flow-matching training, step {global_step}", args.logging_dir,
                          args.hub_token)
    accelerator.end_training()
    return args.output_dir


if __name__ == "__main__":
    cli.run_trainer(parse_args, settings, train)
