#!/usr/bin/env python
"""Post-train a flow-matching model with Continuous AFM (Lin et al., 2026) with Accelerate.

    # the embedded digits: post-train a model from examples/train_flow_matching.py (CPU, minutes)
    python examples/train_cafm.py --pretrained_model_name_or_path fm-digits --output_dir cafm-digits

    # SiT-XL/2 on ImageNet 256 (afm-convert --format sit ... --output_dir sit-xl2), the reference recipe
    accelerate launch examples/train_cafm.py --config examples/configs/cafm/sit_xl2.json \
        --pretrained_model_name_or_path sit-xl2 --train_data_dir imagenet/train --mixed_precision bf16

    # JiT-H/16 in pixel space (afm-convert --format jit ... --output_dir jit-h16), the reference recipe
    accelerate launch examples/train_cafm.py --config examples/configs/cafm/jit_h16.json \
        --pretrained_model_name_or_path jit-h16 --train_data_dir imagenet/train --mixed_precision bf16

The discriminator is the generator's trunk with RMSNorm blocks, a learnable token and a bias-free
head (for JiT: its first in-context token and a linear head), initialised from the generator
(docs/method.md, "Continuous AFM"; docs/cafm.md, "JiT"); it is judged by its
directional derivative along `(v, 1)`. Every iteration is ONE step, a D step or a G step: the first
`--warmup_steps` are D steps, then N of every N + 1 (`--num_discriminator_steps`). `--max_train_steps`,
`--checkpointing_steps`, `--validation_steps` and the lr schedules count those iterations, as the
reference does (each draws its own batch). The run ends with an `AFMPipeline` folder (the EMA
generator) that samples with `solver=` and `guidance_scale=`, and the final `discriminator/`.
"""

import argparse
import json
import os
import warnings

import torch
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from diffusers_afm import (
    AdversarialFlowDiscriminator,
    AdversarialFlowJiTDiscriminator,
    AFMPipeline,
    FlowMatchingTransformer2DModel,
    JiTTransformer2DModel,
)
from diffusers_afm.data import DATA_FLAGS, DEFAULT_VAE, check_model_input, choose_defaults, load_training_data, planned_model_inputs
from diffusers_afm.flow import SOLVERS
from diffusers_afm.hub import (
    check_push_to_hub,
    create_hub_repo,
    default_hub_model_id,
    download_pretrained,
    lora_snippet,
    save_lora_model_card,
    save_pipeline_folder,
    upload_output,
)
from diffusers_afm.pipelines import class_grid
from diffusers_afm.training import EMAConfig, ModelEMA, OptimizerConfig, RunConfig, cli, recipe
from diffusers_afm.training.cafm import CAFMObjective, CAFMTrainingStep
from diffusers_afm.training.checkpoint import CheckpointIO, check_resume_flag
from diffusers_afm.training.distributed import gather_model, prepare_network
from diffusers_afm.training.lora import (
    AdapterEMA,
    add_adapters,
    add_lora_arguments,
    discriminator_adapter_file,
    load_discriminator_adapter,
    lora_settings,
    merge_adapter,
    register_adapter_checkpoints,
    save_discriminator_adapter,
    save_lora_weights,
    trainable_parameters,
)
from diffusers_afm.training.memory import lora_plan_summary, plan_summary
from diffusers_afm.training.output_dir import check_free_space, start_run
from diffusers_afm.training.loop import Throughput, epoch_batches, host_values, noise_generator
from diffusers_afm.training.run import (
    ValidationConfig,
    init_trackers,
    log_peak_memory,
    log_weight_sums,
    save_validation_grid,
)
from diffusers_afm.utils import SettingError, check_setting, save_image, settings_from_flags

logger = get_logger(__name__)

# The flow models CAFM post-trains, and how each one's discriminator starts from it: SiT's layout
# (trunk with RMSNorm, token head; docs/cafm.md) or JiT's (the first in-context token; "JiT").
DISCRIMINATORS = {
    "FlowMatchingTransformer2DModel": (FlowMatchingTransformer2DModel, AdversarialFlowDiscriminator, "for_flow_model"),
    "JiTTransformer2DModel": (JiTTransformer2DModel, AdversarialFlowJiTDiscriminator, "for_transformer"),
}
# What a Hub id's download holds: the configs and safetensors weights, never code or pickles.
PRETRAINED_FILES = ("*.json", "transformer/*", "vae/*", "*.safetensors", "README.md")
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


# ----------------------------------------------------------------------------- 1. flags
def build_parser() -> cli.TrainingArgumentParser:
    p = cli.TrainingArgumentParser(description="Post-train a flow-matching model with Continuous AFM.")
    cli.add_data_arguments(p, default_vae=DEFAULT_VAE, small_data_max_images=recipe.SMALL_DATA_MAX_IMAGES,
                           pixel_max_resolution=recipe.SMALL_DATA_PIXEL_MAX_RESOLUTION)
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="Required. The flow model to post-train: a folder written by train_flow_matching.py, train_cafm.py or "
                        "`afm-convert --format sit` (an AFMPipeline folder, or its transformer/ folder), or the Hub id of one.")
    p.add_argument("--discriminator", default=None,
                   help="Start from this discriminator folder (a train_cafm.py run's discriminator/) instead of one "
                        "initialised from the generator.")
    # Objective and optimisation (docs/method.md, "Continuous AFM")
    cli.add_cafm_arguments(p, warmup="10000")
    p.add_argument("--class_dropout_prob", type=float, default=None,
                   help="Probability of the null class for both networks (default: the model's, 0.1 for SiT).")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="Recompute both networks' activations block by block in the backward pass (the "
                        "discriminator's JVP included): less memory, more time.")
    cli.add_optimizer_arguments(p, beta1=0.0, beta2=0.95, weight_decay=0.0, max_grad_norm=10_000.0,
                                networks=" of both networks", learning_rate_help="The generator's AdamW lr (1e-5; digits 1e-4).",
                                max_grad_norm_help="Gradient clipping of both (the reference's 10000).")
    cli.add_ema_arguments(p, decay=0.99, decay_help="EMA decay of the generator, after each G update.", warmup=False)
    add_lora_arguments(p)  # one frozen base, two adapters (docs/cafm.md, "One GPU: LoRA")
    cli.add_run_arguments(p, output_dir="cafm-model", tracker_project_name="train_cafm")
    cli.add_validation_arguments(p, SOLVERS)
    cli.add_hub_arguments(p)
    return p


def transformer_folder(path: str) -> str:
    """The folder holding the flow model's config.json: `path/transformer` or `path` itself."""
    nested = os.path.join(path, "transformer")
    return nested if os.path.isfile(os.path.join(nested, "config.json")) else path


def pretrained_folder(name_or_path: str) -> str:
    """`--pretrained_model_name_or_path` on disk: a local folder, or a Hub id's download (done once per process)."""
    return download_pretrained(name_or_path, "a local flow-model folder", PRETRAINED_FILES)


def read_flow_config(path: str) -> dict:
    """The pretrained model's config, checked to be a flow-matching model before anything is loaded."""
    config_file = os.path.join(transformer_folder(path), "config.json")
    if not os.path.isfile(config_file):
        raise SettingError("pretrained_model_name_or_path", path,
                           "a local flow-model folder (with transformer/config.json or config.json)")
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("_class_name") not in DISCRIMINATORS:
        raise SettingError(
            "pretrained_model_name_or_path", path,
            f"a flow-matching model ({' or '.join(DISCRIMINATORS)}); it holds a {config.get('_class_name')!r}. CAFM "
            "post-trains velocity models: train one with examples/train_flow_matching.py or convert a SiT or JiT "
            "with `afm-convert --format sit` / `--format jit`",
        )
    return config


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.pretrained_model_name_or_path is None:
        raise ValueError("`--pretrained_model_name_or_path` is required: the flow model to post-train (a folder written by "
                         "train_flow_matching.py or `afm-convert --format sit`).")
    with cli.flag_errors():
        folder = pretrained_folder(args.pretrained_model_name_or_path)
        config = read_flow_config(folder)
        kind = choose_defaults(args.defaults, args.dataset_name, args.train_data_dir, args.latent_cache,
                               args.max_train_samples, recipe.SMALL_DATA_MAX_IMAGES)
        defaults = recipe.data_defaults(
            kind, DIGITS_DEFAULTS, PAPER_DEFAULTS, dataset_name=args.dataset_name, train_data_dir=args.train_data_dir,
            latent_cache=args.latent_cache, max_train_samples=args.max_train_samples, resolution=args.resolution,
            vae=args.vae, num_train_epochs=args.num_train_epochs, default_vae=DEFAULT_VAE, small_schedule=SMALL_SCHEDULE)
        defaults.pop("model_config", None)  # the model is the pretrained one
        if os.path.isfile(os.path.join(folder, "vae", "config.json")):
            defaults["vae"] = folder  # the VAE the model was trained with
        parser.set_defaults(**defaults, class_dropout_prob=config.get("class_dropout_prob", 0.0))
        args = parser.parse_args(argv)  # again: the flags left unset take the recipe's defaults
        args.defaults = kind
        if args.discriminator_learning_rate is None:
            args.discriminator_learning_rate = args.learning_rate
        if args.push_to_hub and not args.hub_model_id:
            args.hub_model_id = default_hub_model_id(args.output_dir)
        # Every value rule lives in the library's settings objects; built here, they check the flags.
        for settings_class in (RunConfig, ValidationConfig, OptimizerConfig, EMAConfig):
            settings_from_flags(settings_class, vars(args))
        settings_from_flags(OptimizerConfig, vars(args), {"learning_rate": "discriminator_learning_rate"})
        settings_from_flags(CAFMObjective, vars(args), {"warmup": "warmup_steps"})
        has_null_class = config.get("class_dropout_prob", 0.0) > 0
        check_setting(args.class_dropout_prob == 0 or has_null_class, "class_dropout_prob", args.class_dropout_prob,
                      "0 for this model: it has no null class to drop labels to")
        check_setting(has_null_class or args.validation_guidance_scale == 1, "validation_guidance_scale",
                      args.validation_guidance_scale, "1 (no guidance) for this model: it has no null class")
        lora = lora_settings(vars(args))
        if lora is not None:  # every target must name layers of this model: checked on its shapes alone
            with torch.device("meta"):
                lora.check_targets(DISCRIMINATORS[config["_class_name"]][0].from_config(config))
            if args.discriminator is not None:
                discriminator_adapter_file(args.discriminator)
        elif args.discriminator is not None and not os.path.isfile(os.path.join(args.discriminator, "config.json")):
            raise SettingError("discriminator", args.discriminator, "a folder written by AdversarialFlowDiscriminator.save_pretrained")
        check_push_to_hub(args.push_to_hub and not args.dry_run)
        if not args.dry_run:
            check_model_input(args.vae, args.resolution, args.latent_cache, config["patch_size"])
            planned = planned_model_inputs(args.dataset_name, args.train_data_dir, args.latent_cache, args.vae,
                                           args.resolution, args.num_classes)
            for key in ("sample_size", "in_channels", "num_classes"):
                if not planned["assumed"] and planned[key] != config[key]:
                    raise SettingError(
                        "pretrained_model_name_or_path", args.pretrained_model_name_or_path,
                        f"a model for this data: it has {key}={config[key]}, the data and flags give {planned[key]} "
                        "(pass the --resolution, --vae and data it was trained on)",
                    )
            check_resume_flag(args.resume_from_checkpoint)
    return args


def settings(args: argparse.Namespace) -> dict:
    config = read_flow_config(pretrained_folder(args.pretrained_model_name_or_path))
    summary = {"generator": {"class": config["_class_name"], "config": {k: v for k, v in config.items() if not k.startswith("_")}}}
    if args.dry_run:  # what the run's state takes per GPU, under DDP and FSDP2 (the networks' shapes only)
        generator_class, discriminator_class, initialise = DISCRIMINATORS[config["_class_name"]]
        with torch.device("meta"):
            generator = generator_class.from_config(config)
            discriminator = getattr(discriminator_class, initialise)(generator)
        lora = lora_settings(vars(args))
        summary["memory_plan"] = (plan_summary({"generator": generator, "discriminator": discriminator}, ema=["generator"])
                                  if lora is None else lora_plan_summary(generator, discriminator, lora))
    return {**build_parser().settings(vars(args)), "_model": summary}


def build_models(args):
    folder = transformer_folder(pretrained_folder(args.pretrained_model_name_or_path))
    generator_class, discriminator_class, initialise = DISCRIMINATORS[read_flow_config(folder)["_class_name"]]
    generator = generator_class.from_pretrained(folder)
    if args.discriminator is None or args.lora_rank is not None:  # a LoRA discriminator's adapter loads in `train`
        return generator, getattr(discriminator_class, initialise)(generator)
    discriminator = discriminator_class.from_pretrained(args.discriminator)
    for key in ("sample_size", "in_channels", "num_classes", "patch_size"):
        if discriminator.config[key] != generator.config[key]:
            raise ValueError(f"`--discriminator` {args.discriminator} has {key}={discriminator.config[key]}, the "
                             f"generator {key}={generator.config[key]}.")
    if not getattr(discriminator.config, "use_timestep", True):
        raise ValueError(f"`--discriminator` {args.discriminator} has no time input (use_timestep=False): it is an AFM "
                         "discriminator, not a Continuous-AFM one.")
    return generator, discriminator


def sample_grid(args, model, data):
    """The model's grid: one row per class (evenly spaced), the ODE solver of the validation flags."""
    pipeline = AFMPipeline(transformer=model, vae=data.vae, id2label=data.id2label)
    pipeline.set_progress_bar_config(disable=True)
    return class_grid(pipeline, args.num_validation_classes, args.num_validation_images, args.seed,
                      num_inference_steps=args.validation_inference_steps, solver=args.validation_solver,
                      guidance_scale=args.validation_guidance_scale)


def save_lora_output(args, ema_model, discriminator, discriminator_names, lora, data, global_step) -> None:
    """A LoRA run's folder: `pytorch_lora_weights.safetensors` (the EMA adapter), `samples.png` and a
    LoRA model card, or with `--merge_lora` the full AFMPipeline with the adapter fused into the
    pretrained weights; either way `discriminator_lora.safetensors` (D's adapter and head) beside."""
    pretrained = args.pretrained_model_name_or_path
    settings_ = settings(args)
    dataset = args.dataset_name or args.train_data_dir or "scikit-learn digits"
    description = (f"These are the EMA weights of a rank-{lora.lora_rank} LoRA adapter (alpha {lora.alpha:g}) after "
                   f"{global_step} iterations.")
    if args.merge_lora:
        folder = transformer_folder(pretrained_folder(pretrained))
        base = DISCRIMINATORS[read_flow_config(folder)["_class_name"]][0].from_pretrained(folder)
        merged = merge_adapter(base, ema_model).to(ema_model.device)
        save_pipeline_folder(
            args.output_dir, AFMPipeline(transformer=merged, vae=data.vae, id2label=data.id2label),
            sample_grid=sample_grid(args, merged, data), standalone=args.standalone_hub_files, repo_id=args.hub_model_id,
            base_model=pretrained, dataset=dataset, training_settings=settings_, cafm=True,
            description=description.replace("weights of", "weights, fused, of"))
    else:
        save_image(sample_grid(args, ema_model, data), os.path.join(args.output_dir, "samples.png"))
        save_lora_weights(args.output_dir, ema_model)
        repo_id = args.hub_model_id or args.output_dir
        save_lora_model_card(
            args.output_dir, base_model=pretrained, text_to_image=False, repo_id=args.hub_model_id, dataset=dataset,
            snippet=lora_snippet(pretrained, repo_id, text_to_image=False, num_classes=ema_model.config.num_classes),
            training_settings=settings_, sample_grid="samples.png", description=description)
    save_discriminator_adapter(args.output_dir, discriminator, discriminator_names)


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

    # 3. The pretrained generator and its discriminator (initialised from it)
    generator, discriminator = build_models(args)
    data.check_fits(generator, f"`--pretrained_model_name_or_path` {args.pretrained_model_name_or_path}")
    if args.gradient_checkpointing:
        # Both: the discriminators take their JVP block by block, inside each block's forward.
        generator.enable_gradient_checkpointing()
        discriminator.enable_gradient_checkpointing()
    logger.info(f"generator {generator.num_parameters() / 1e6:.2f}M, discriminator {discriminator.num_parameters() / 1e6:.2f}M parameters")
    lora = lora_settings(vars(args))
    if lora is not None:  # one frozen base (the generator's), adapter G, adapter D + D's own head
        counts = add_adapters(generator, discriminator, lora)
        if args.discriminator is not None:
            load_discriminator_adapter(discriminator, args.discriminator)
        logger.info(f"LoRA rank {lora.lora_rank}: trained parameters {counts}")

    # 4. Optimisers and schedules (both count iterations, D and G steps alike), prepared; EMA; the step
    # AdamW of each network: the same betas, epsilon, decay and clipping, their own learning rates.
    config_g = settings_from_flags(OptimizerConfig, vars(args))
    config_d = settings_from_flags(OptimizerConfig, vars(args), {"learning_rate": "discriminator_learning_rate"})
    params_g, params_d = ((generator.parameters(), discriminator.parameters()) if lora is None
                          else (trainable_parameters(generator), trainable_parameters(discriminator)))
    optimizer_g, optimizer_d = config_g.adamw(params_g), config_d.adamw(params_d)
    schedulers = [config.scheduler(optimizer, args.max_train_steps, accelerator.num_processes)
                  for config, optimizer in ((config_g, optimizer_g), (config_d, optimizer_d))]
    # One network per call (FSDP2 takes one at a time). The discriminator reads its logit out in
    # full precision, outside autocast, which needs its parameters kept in full precision.
    generator, optimizer_g, schedulers[0] = prepare_network(accelerator, generator, optimizer_g, schedulers[0])
    discriminator, optimizer_d, schedulers[1] = prepare_network(accelerator, discriminator, optimizer_d, schedulers[1],
                                                                full_precision_parameters=True)
    dataloader = accelerator.prepare(data.dataloader)
    # Both schedules count iterations, so each network's scheduler also steps in the other's
    # iterations; torch warns about that at the first D step.
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
    ema = ModelEMA(generator) if lora is None else AdapterEMA(generator)  # LoRA: the generator's adapter only
    # LoRA: checkpoints hold the adapters, D's head and their AdamW states, never the base.
    trained = register_adapter_checkpoints(accelerator, generator, discriminator) if lora is not None else None
    rng = noise_generator(accelerator, args.seed)
    train_step = CAFMTrainingStep(
        accelerator, generator, discriminator, optimizer_g, optimizer_d,
        settings_from_flags(CAFMObjective, vars(args), {"warmup": "warmup_steps"}), ema=ema,
        ema_decay=settings_from_flags(EMAConfig, vars(args)).schedule(), max_grad_norm_g=config_g.max_grad_norm, max_grad_norm_d=config_d.max_grad_norm,
        null_class_id=accelerator.unwrap_model(generator).null_class_id, noise_generator=rng,
    )

    # 5. Resume, trackers
    check_free_space(accelerator, args.output_dir, resume_path, trained or [generator, discriminator], [ema])  # room for a checkpoint
    checkpoints = CheckpointIO(accelerator, ema=ema, noise_generator=rng, settings=settings(args))
    global_step = 0
    if resume_path is not None:
        global_step = checkpoints.load(resume_path, verify=False)
        logger.info(f"Resumed from {resume_path} at step {global_step}")
    init_trackers(accelerator, args.tracker_project_name, settings(args))

    # 6. The loop: each iteration is ONE step, a D step or a G step (`CAFMTrainingStep.is_discriminator_step`)
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    throughput = Throughput(accelerator.num_processes)
    for batch in epoch_batches(accelerator, dataloader, global_step, args.max_train_steps, args.gradient_accumulation_steps):
        if global_step >= args.max_train_steps:
            break
        x0 = data.latents(batch, rng)
        logs = train_step(x0, batch["class_labels"], global_step)
        for scheduler in schedulers:
            scheduler.step()
        throughput.add(len(x0))
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        progress.update(1)
        values = host_values(logs, global_step, args.output_dir)  # one host sync; stops a diverged run
        values.update(images_per_sec=throughput.rate(), lr=schedulers[0].get_last_lr()[0])
        accelerator.log(values, step=global_step)
        progress.set_postfix({name: f"{values[name]:.3f}" for name in ("loss_d", "loss_g") if name in values})
        if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
            checkpoints.save(args.output_dir, global_step, args.checkpoints_total_limit)
        if global_step % args.validation_steps == 0:
            ema_model = ema.full_model(accelerator.device)  # every process: it gathers the shards under FSDP
            if accelerator.is_main_process:
                grid = sample_grid(args, ema_model, data)
                save_validation_grid(accelerator, grid, args.output_dir, global_step)
    progress.close()
    log_peak_memory(accelerator)
    # Under DDP every rank must hold the same weights: the log shows each rank's sums (the tests compare them).
    log_weight_sums(accelerator, global_step, generator=generator, discriminator=discriminator)

    # 7. The pipeline folder (the EMA generator), the discriminator, samples and a model card
    accelerator.wait_for_everyone()
    ema_model, final_discriminator = ema.full_model(accelerator.device), gather_model(discriminator)  # every process
    if accelerator.is_main_process and lora is not None:
        save_lora_output(args, ema_model, discriminator, trained[1].names, lora, data, global_step)
    elif accelerator.is_main_process:
        pretrained = args.pretrained_model_name_or_path
        save_pipeline_folder(
            args.output_dir, AFMPipeline(transformer=ema_model, vae=data.vae, id2label=data.id2label),
            sample_grid=sample_grid(args, ema_model, data), discriminator=final_discriminator,
            standalone=args.standalone_hub_files, repo_id=args.hub_model_id,
            base_model=pretrained,  # a local folder too: the card resolves what the Hub metadata can carry
            dataset=args.dataset_name or args.train_data_dir or "scikit-learn digits",
            training_settings=settings(args), cafm=True,
            description=f"These are the EMA weights after {global_step} iterations.",
        )
        logger.info(f"Saved the CAFM post-trained AFMPipeline to {args.output_dir}")
        if args.push_to_hub:
            upload_output(args.output_dir, hub_repo_id, f"Continuous AFM post-training, step {global_step}",
                          args.logging_dir, args.hub_token)
    accelerator.end_training()
    return args.output_dir


if __name__ == "__main__":
    cli.run_trainer(parse_args, settings, train)
