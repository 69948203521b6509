#!/usr/bin/env python
"""Post-train a flow-matching model with Continuous AFM (Lin et al., 2026) with Accelerate.

    # the embedded digits: post-train a model from examples/train_flow_matching.py (CPU, minutes)
    python examples/train_cafm.py --pretrained_model_name_or_path fm-digits --output_dir cafm-digits

    # SiT-XL/2 on ImageNet 256 (afm-convert --format sit ... --output_dir sit-xl2), the reference recipe
    accelerate launch examples/train_cafm.py --config examples/configs/cafm/sit_xl2.json \
        --pretrained_model_name_or_path sit-xl2 --train_data_dir imagenet/train --mixed_precision bf16

The discriminator is the generator's trunk with RMSNorm blocks, a learnable token and a bias-free
head, initialised from the generator (docs/method.md, "Continuous AFM"); it is judged by its
directional derivative along `(v, 1)`. Every iteration is ONE step, a D step or a G step: the first
`--warmup_steps` are D steps, then N of every N + 1 (`--num_discriminator_steps`). `--max_train_steps`,
`--checkpointing_steps`, `--validation_steps` and the lr schedules count those iterations, as the
reference does (each draws its own batch). The run ends with an `AFMPipeline` folder (the EMA
generator) that samples with `solver=` and `guidance_scale=`, and the final `discriminator/`.
"""

import argparse
import json
import os

from accelerate.logging import get_logger

from diffusers_afm import AdversarialFlowDiscriminator, FlowMatchingTransformer2DModel
from diffusers_afm.data import DEFAULT_VAE, load_training_data
from diffusers_afm.training import ModelEMA
from diffusers_afm.training.cafm import CAFMObjective, CAFMTrainingStep
from diffusers_afm.training.checkpoint import CheckpointIO, check_resume_flag
from diffusers_afm.training.loop import noise_generator
from flow_cli import (
    add_flow_arguments,
    check_data_fits,
    check_flow_arguments,
    save_flow_pipeline,
    validation_callback,
)
from training_cli import (
    TrainingArgumentParser,
    add_cafm_arguments,
    add_data_arguments,
    add_run_arguments,
    apply_defaults,
    cafm_optimizers,
    check_cafm_arguments,
    check_hub_arguments,
    check_model_input,
    check_run_arguments,
    flag_error,
    init_trackers,
    log_weight_sums,
    planned_model_inputs,
    resolve_data_defaults,
    resolved_settings,
    start_run,
    train_loop,
    upload_output,
)
import training_cli

logger = get_logger(__name__)

FLOW_MODEL = "FlowMatchingTransformer2DModel"
# The reference's SiT-XL/2 recipe (configs/train/cafm/train_cafm_sit.yaml; docs/method.md).
PAPER_DEFAULTS = dict(resolution=256, train_batch_size=32, max_train_steps=1_000_000, learning_rate=1e-5,
                      warmup_steps=10_000, num_discriminator_steps=16, checkpointing_steps=25_000,
                      validation_steps=1000, random_flip=True, vae=DEFAULT_VAE, validation_inference_steps=125)
# The embedded digits, post-training a train_flow_matching.py model: minutes on a CPU.
DIGITS_DEFAULTS = dict(resolution=8, train_batch_size=64, max_train_steps=1500, learning_rate=1e-4, warmup_steps=200,
                       num_discriminator_steps=4, checkpointing_steps=500, validation_steps=500, random_flip=False,
                       vae="none", validation_inference_steps=8)
SMALL_SCHEDULE = dict(train_batch_size=64, max_train_steps=5000, learning_rate=1e-4, warmup_steps=500,
                      num_discriminator_steps=4, checkpointing_steps=1000, validation_steps=1000,
                      validation_inference_steps=16)


def build_parser() -> argparse.ArgumentParser:
    p = TrainingArgumentParser(description="Post-train a flow-matching model with Continuous AFM.")
    add_data_arguments(p)
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="Required. The flow model to post-train: a folder written by train_flow_matching.py, train_cafm.py or "
                        "`afm-convert --format sit` (an AFMPipeline folder, or its transformer/ folder), or the Hub id of one.")
    p.add_argument("--discriminator", default=None,
                   help="Start from this discriminator folder (a train_cafm.py run's discriminator/) instead of one "
                        "initialised from the generator.")
    # Objective and optimisation (docs/method.md, "Continuous AFM")
    add_cafm_arguments(p, warmup="10000", learning_rate_help="The generator's AdamW lr (1e-5; digits 1e-4).", weight_decay=0.0,
                       discriminator_learning_rate_help="Default: --learning_rate.", max_grad_norm=10_000.0,
                       max_grad_norm_help="Gradient clipping of both (the reference's 10000).")
    p.add_argument("--class_dropout_prob", type=float, default=None,
                   help="Probability of the null class for both networks (default: the model's, 0.1 for SiT).")
    add_run_arguments(p, output_dir="cafm-model", tracker_project_name="train_cafm")
    add_flow_arguments(p)
    return p


def transformer_folder(path: str) -> str:
    """The folder holding the flow model's config.json: `path/transformer` or `path` itself."""
    nested = os.path.join(path, "transformer")
    return nested if os.path.isfile(os.path.join(nested, "config.json")) else path


def pretrained_folder(path: str) -> str:
    """A local folder as it is; a Hub id downloaded (its configs and safetensors weights only)."""
    return training_cli.pretrained_folder(path, "a local flow-model folder",
                                          ["*.json", "transformer/*", "vae/*", "*.safetensors", "README.md"])


def read_flow_config(path: str) -> dict:
    """The pretrained model's config, checked to be a flow-matching model before anything is loaded."""
    folder = transformer_folder(path)
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise flag_error("pretrained_model_name_or_path", path,
                         "a local flow-model folder (with transformer/config.json or config.json)")
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("_class_name") != FLOW_MODEL:
        raise flag_error(
            "pretrained_model_name_or_path", path,
            f"a flow-matching model ({FLOW_MODEL}); it holds a {config.get('_class_name')!r}. CAFM post-trains velocity "
            "models: train one with examples/train_flow_matching.py or convert a SiT with `afm-convert --format sit`",
        )
    return config


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.pretrained_model_name_or_path is None:
        raise ValueError("`--pretrained_model_name_or_path` is required: the flow model to post-train (a folder written by "
                         "train_flow_matching.py or `afm-convert --format sit`).")
    # The local copy; the flag keeps the name the user gave (the model card's base_model for a Hub id).
    args.pretrained_folder = pretrained_folder(args.pretrained_model_name_or_path)
    config = args.pretrained_config = read_flow_config(args.pretrained_folder)
    if args.vae is None and os.path.isfile(os.path.join(args.pretrained_folder, "vae", "config.json")):
        args.vae = args.pretrained_folder  # the VAE the model was trained with
    flow_trunk = {k: config[k] for k in ("patch_size", "num_layers", "num_attention_heads", "attention_head_dim", "mlp_ratio")}
    defaults = resolve_data_defaults(args, digits=(DIGITS_DEFAULTS, flow_trunk), paper=(PAPER_DEFAULTS, flow_trunk),
                                     small_schedule=SMALL_SCHEDULE)
    apply_defaults(args, defaults)
    if args.class_dropout_prob is None:
        args.class_dropout_prob = config.get("class_dropout_prob", 0.0)
    if args.discriminator_learning_rate is None:
        args.discriminator_learning_rate = args.learning_rate
    check_run_arguments(args)
    check_flow_arguments(args)
    if args.class_dropout_prob > 0 and config.get("class_dropout_prob", 0.0) == 0:
        raise flag_error("class_dropout_prob", args.class_dropout_prob,
                         "0 for this model: it has no null class to drop labels to")
    check_cafm_arguments(args)
    if args.discriminator is not None and not os.path.isfile(os.path.join(args.discriminator, "config.json")):
        raise flag_error("discriminator", args.discriminator, "a folder written by AdversarialFlowDiscriminator.save_pretrained")
    if not args.dry_run:
        check_model_input(args, config["patch_size"])
        planned = planned_model_inputs(args)
        for key in ("sample_size", "in_channels", "num_classes"):
            if not planned["assumed"] and planned[key] != config[key]:
                raise flag_error(
                    "pretrained_model_name_or_path", args.pretrained_model_name_or_path,
                    f"a model for this data: it has {key}={config[key]}, the data and flags give {planned[key]} "
                    "(pass the --resolution, --vae and data it was trained on)",
                )
        check_resume_flag(args.resume_from_checkpoint)
    check_hub_arguments(args)
    return args


def settings(args: argparse.Namespace) -> dict:
    config = args.pretrained_config
    summary = {"generator": {"class": FLOW_MODEL, "config": {k: v for k, v in config.items() if not k.startswith("_")}}}
    return {**resolved_settings(args, build_parser()), "_model": summary}


def build_models(args):
    generator = FlowMatchingTransformer2DModel.from_pretrained(transformer_folder(args.pretrained_folder))
    if args.discriminator is not None:
        discriminator = AdversarialFlowDiscriminator.from_pretrained(args.discriminator)
        for key in ("sample_size", "in_channels", "num_classes", "patch_size"):
            if discriminator.config[key] != generator.config[key]:
                raise ValueError(f"`--discriminator` {args.discriminator} has {key}={discriminator.config[key]}, the "
                                 f"generator {key}={generator.config[key]}.")
        if not discriminator.config.use_timestep:
            raise ValueError(f"`--discriminator` {args.discriminator} has no time input (use_timestep=False): it is an AFM "
                             "discriminator, not a Continuous-AFM one.")
    else:
        discriminator = AdversarialFlowDiscriminator.for_flow_model(generator)
    return generator, discriminator


def main(argv=None):
    return training_cli.main(parse_args, settings, train, argv)


def train(args: argparse.Namespace) -> str:
    accelerator, hub_repo_id, resume_path, data = start_run(args, load_training_data)
    generator, discriminator = build_models(args)
    check_data_fits(generator, data, f"`--pretrained_model_name_or_path` {args.pretrained_model_name_or_path}")
    if args.gradient_checkpointing:
        # The generator only: checkpointing does not compose with the discriminator's JVP (docs/cafm.md).
        generator.enable_gradient_checkpointing()
        logger.info("--gradient_checkpointing: on for the generator; the discriminator's JVP runs without it")
    logger.info(f"generator {generator.num_parameters() / 1e6:.2f}M, discriminator {discriminator.num_parameters() / 1e6:.2f}M parameters")

    optimizer_g, optimizer_d, schedulers = cafm_optimizers(args, accelerator, generator, discriminator)
    generator, discriminator, optimizer_g, optimizer_d, dataloader, *schedulers = accelerator.prepare(
        generator, discriminator, optimizer_g, optimizer_d, data.dataloader, *schedulers
    )
    ema = ModelEMA(generator)
    rng = noise_generator(accelerator, args.seed)
    objective = CAFMObjective(cp_scale=args.cp_scale, ot_scale=args.ot_scale, num_discriminator_steps=args.num_discriminator_steps,
                              warmup=args.warmup_steps, time_sampling=args.time_sampling,
                              class_dropout_prob=args.class_dropout_prob)
    step = CAFMTrainingStep(accelerator, generator, discriminator, optimizer_g, optimizer_d, objective, ema=ema,
                            ema_decay=args.ema_decay, max_grad_norm_g=args.max_grad_norm, max_grad_norm_d=args.max_grad_norm,
                            null_class_id=accelerator.unwrap_model(generator).null_class_id, noise_generator=rng)
    checkpoints = CheckpointIO(accelerator, ema=ema, noise_generator=rng)
    global_step = 0
    if resume_path is not None:
        global_step = checkpoints.load(resume_path, verify=False)
        logger.info(f"Resumed from {resume_path} at step {global_step}")
    init_trackers(accelerator, args.tracker_project_name, settings(args))

    def postfix(values):
        return {"loss_d": f"{values['loss_d']:.3f}"} if "loss_d" in values else {"loss_g": f"{values['loss_g']:.3f}"}

    global_step = train_loop(args, accelerator, data, dataloader, step, checkpoints, global_step, schedulers, postfix,
                             after_checkpoint=validation_callback(args, accelerator, ema, data))
    # Under DDP every rank must hold the same weights: the log shows each rank's sums (the tests compare them).
    log_weight_sums(accelerator, global_step, generator=generator, discriminator=discriminator)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        pretrained = args.pretrained_model_name_or_path
        save_flow_pipeline(args, accelerator, ema.model, data.vae, data.id2label, global_step, settings(args),
                           discriminator=discriminator, base_model=None if os.path.isdir(pretrained) else pretrained, cafm=True)
        logger.info(f"Saved the CAFM post-trained AFMPipeline to {args.output_dir}")
        if args.push_to_hub:
            upload_output(args, hub_repo_id, f"Continuous AFM post-training, step {global_step}")
    accelerator.end_training()
    return args.output_dir


if __name__ == "__main__":
    training_cli.run(parse_args, settings, train)
