#!/usr/bin/env python
"""Train an Adversarial Flow Model (Lin et al., 2025) with Accelerate.

    # the embedded default: a pixel-space model on scikit-learn's handwritten digits (CPU, minutes)
    python examples/train_afm.py --output_dir afm-digits

    # a published run from its recipe (examples/configs/, docs/training_recipes.md), on every GPU
    accelerate launch examples/train_afm.py --config examples/configs/xl2_1nfe.json --mixed_precision bf16

    # the guided phase: from the unguided run's EMA generator and discriminator, with a classifier
    accelerate launch examples/train_afm.py --config examples/configs/xl2_1nfe_guided.json \
        --init_from afm-xl2-1nfe --classifier afm-classifier-b2

Every default is the paper's (docs/method.md) except where the embedded digits default says otherwise
(`DIGITS_DEFAULTS`). `--config FILE` reads flag values from a JSON file (flags on the command line
win); `--dry_run` prints the resolved settings as JSON and exits. The run ends with an
`AFMPipeline` folder in `--output_dir` (EMA weights, class names, a model card) that
`AFMPipeline.from_pretrained` loads, and the final `discriminator/`.

The file reads in the order the run happens: flags -> Accelerator -> data -> models -> optimisers
-> resume -> the loop (step, logs, checkpoint, validation) -> the pipeline folder.
"""

import argparse
import os

import torch
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from diffusers_afm import (
    AdversarialFlowClassifier,
    AdversarialFlowDiscriminator,
    AdversarialFlowTransformer2DModel,
    AFMPipeline,
)
from diffusers_afm.data import (
    DATA_FLAGS,
    DEFAULT_VAE,
    check_model_input,
    choose_defaults,
    load_training_data,
    planned_model_inputs,
)
from diffusers_afm.hub import check_push_to_hub, create_hub_repo, default_hub_model_id, save_pipeline_folder, upload_output
from diffusers_afm.pipelines import class_grid
from diffusers_afm.training import (
    AFMObjective,
    AFMTrainingStep,
    EMAConfig,
    GradientNormalization,
    ModelEMA,
    OptimizerConfig,
    RunConfig,
    recipe,
)
from diffusers_afm.training import cli
from diffusers_afm.training.checkpoint import CheckpointIO, check_resume_flag
from diffusers_afm.training.output_dir import check_free_space, start_run
from diffusers_afm.training.distributed import gather_model, prepare_network, restore, snapshot
from diffusers_afm.training.memory import plan_summary
from diffusers_afm.training.loop import NonFiniteLossError, Throughput, epoch_batches, host_values, noise_generator
from diffusers_afm.training.run import ValidationConfig, init_trackers, log_image, log_peak_memory, save_validation_grid
from diffusers_afm.utils import check_setting, parse_nfe, settings_from_flags

__all__ = ["NonFiniteLossError", "main", "parse_args", "settings", "train"]  # what the tests and users import

logger = get_logger(__name__)

# The embedded default: scikit-learn's digits (8x8 grey, 10 classes), a small pixel-space model.
# 1,000 steps: the quickstart's budget of 5 minutes on 2 CPU cores; the independent classifier still
# recognises over 95% of the samples (README, "Sample quality on real digits").
DIGITS_DEFAULTS = dict(
    model_config=recipe.DIGITS_MODEL,
    resolution=8,
    train_batch_size=64,
    max_train_steps=1000,
    learning_rate=3e-4,
    ema_decay=0.999,
    ema_warmup=True,
    ot_scale_end=0.02,
    ot_decay_steps=2000,  # D+G steps: the whole run
    checkpointing_steps=500,
    validation_steps=500,
    random_flip=False,  # a mirrored digit is another glyph
    vae="none",
)
PAPER_DEFAULTS = dict(
    model_config="XL/2",
    resolution=256,
    train_batch_size=32,
    max_train_steps=500_000,
    learning_rate=recipe.PAPER_OPTIMIZER["learning_rate"],
    ema_decay=recipe.PAPER_OPTIMIZER["ema_decay"],
    ema_warmup=False,
    ot_scale_end=recipe.PAPER_OBJECTIVE["ot_scale_end"],
    ot_decay_steps=recipe.PAPER_OBJECTIVE["ot_decay_steps"],
    checkpointing_steps=5000,
    validation_steps=5000,
    random_flip=True,
    vae=DEFAULT_VAE,
)


# ----------------------------------------------------------------------------- 1. flags
def build_parser() -> cli.TrainingArgumentParser:
    p = cli.TrainingArgumentParser(description="Train an Adversarial Flow Model.")
    cli.add_data_arguments(p, default_vae=DEFAULT_VAE, small_data_max_images=recipe.SMALL_DATA_MAX_IMAGES,
                           pixel_max_resolution=recipe.SMALL_DATA_PIXEL_MAX_RESOLUTION)
    # Model
    p.add_argument("--model_config", default=None,
                   help="A size (T/2, S/2, B/2, M/2, L/2, XL/2; another patch size: B/4) or a JSON config file. "
                        "Default: XL/2; the digits and --defaults small: a model sized to the data (--dry_run prints it).")
    p.add_argument("--discriminator_config", default=None, help="Same forms; default mirrors the generator.")
    p.add_argument("--nfe", type=parse_nfe, default=1, help="1, 2, 4, ... or 'any'.")
    p.add_argument("--prediction_type", choices=("sample", "velocity"), default=None,
                   help="Default: sample for 1 NFE, velocity for multi-step.")
    p.add_argument("--depth_repeat", type=int, default=1,
                   help="Deep 1-NFE models: 2 (56 layers) or 4 (112); the generator's lr is divided by it.")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="Recompute activations in the backward pass: less memory, more time.")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each network's transformer block in place (the first steps compile).")
    p.add_argument("--init_from", "--pretrained_model_name_or_path", dest="init_from", default=None,
                   help="A finished run's output_dir: start from its EMA generator (transformer/) and discriminator/.")
    # Objective (docs/method.md)
    p.add_argument("--ot_scale", type=float, default=None, help="Start value: 0.2 (1 NFE) or 0.25 (multi-step).")
    p.add_argument("--ot_scale_end", type=float, default=None, help="End value of the OT weight's decay (0.005; digits 0.02).")
    p.add_argument("--ot_decay_steps", type=int, default=None, help="Cosine decay length in D+G steps.")
    p.add_argument("--gp_scale", type=float, default=0.25, help="Weight of the approximated R1/R2 penalty.")
    p.add_argument("--gp_eps", type=float, default=0.01, help="Perturbation size of the approximated R1/R2.")
    p.add_argument("--gp_batch_ratio", type=float, default=0.25, help="Fraction of the batch the R1/R2 penalty uses.")
    p.add_argument("--cp_scale", type=float, default=0.01, help="Weight of the logit-centering penalty.")
    p.add_argument("--gp_full_precision", action=argparse.BooleanOptionalAction, default=True,
                   help="Under --mixed_precision, run the R1/R2 samples and their partners in fp32/TF32 "
                        "(bf16 rounding inflates the finite-difference penalty 3-5x; docs/method.md).")
    p.add_argument("--augment_p", type=float, default=0.0, help="Discriminator augmentation (0.4 in the guided phase).")
    p.add_argument("--grad_norm", action=argparse.BooleanOptionalAction, default=True,
                   help="Gradient normalization of the generator's adversarial gradient (docs/method.md).")
    p.add_argument("--classifier", default=None, help="An AdversarialFlowClassifier folder for guided training.")
    p.add_argument("--cg_scale", type=float, default=None, help="Guidance weight: 0.003 (1 NFE) or 0.02.")
    p.add_argument("--cg_max_time", type=float, default=None,
                   help="1 NFE: the fake is re-noised to u ~ U(0, this) (0.1); multi-step: guided where t <= this (0.49).")
    p.add_argument("--autoreload_steps", type=int, default=None,
                   help="Every K steps reset the generator to its EMA and the discriminator to the --init_from one.")
    # Optimisation
    cli.add_optimizer_arguments(p, beta1=0.0, beta2=0.9, weight_decay=0.01, max_grad_norm=None, networks=" of both networks",
                                learning_rate_help="The generator's AdamW lr (1e-4; digits 3e-4).",
                                max_grad_norm_help="Gradient clipping of both networks: 50 (1 NFE), 5 (multi-step, deep).")
    p.add_argument("--discriminator_learning_rate", type=float, default=None, help="Default: --learning_rate.")
    cli.add_ema_arguments(p, decay=None, decay_help="The generator EMA's decay (0.9999; digits 0.999).", warmup=None)
    # Batch, length, precision, outputs, checkpoints
    cli.add_run_arguments(p, output_dir="afm-model", tracker_project_name="train_afm")
    p.add_argument("--validation_steps", type=int, default=None, help="Sample grid of the EMA generator every N steps.")
    p.add_argument("--num_validation_classes", type=int, default=10, help="Rows of the sample grids (evenly spaced classes).")
    p.add_argument("--num_validation_images", type=int, default=8, help="Per class (one grid row per class).")
    p.add_argument("--eval_steps", type=int, default=None, help="FID/IS/precision/recall of the EMA generator every N steps.")
    p.add_argument("--eval_num_samples", type=int, default=10000, help="Samples per evaluation.")
    p.add_argument("--eval_batch_size", type=int, default=64, help="Images per forward pass of an evaluation.")
    p.add_argument("--eval_reference", default=None, help="Reference .npz (ADM batch or mu/sigma) or image folder.")
    p.add_argument("--eval_feature_extractor", default="inception",
                   help="'inception' (torch-fidelity, the 'fid' extra) or a TorchScript feature network file.")
    cli.add_hub_arguments(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse (config file, then command line) and check every flag before any data or model is loaded."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with cli.flag_errors():
        kind = choose_defaults(args.defaults, args.dataset_name, args.train_data_dir, args.latent_cache,
                               args.max_train_samples, recipe.SMALL_DATA_MAX_IMAGES)
        # The data's defaults (the digits', sized to a small data set, or the paper's), then what
        # --nfe, --depth_repeat and --classifier imply (training/recipe.py).
        parser.set_defaults(**recipe.data_defaults(
            kind, DIGITS_DEFAULTS, PAPER_DEFAULTS, dataset_name=args.dataset_name, train_data_dir=args.train_data_dir,
            latent_cache=args.latent_cache, max_train_samples=args.max_train_samples, resolution=args.resolution,
            vae=args.vae, num_train_epochs=args.num_train_epochs, default_vae=DEFAULT_VAE))
        parser.set_defaults(**recipe.recipe_defaults(args.nfe, args.depth_repeat, guided=args.classifier is not None))
        args = parser.parse_args(argv)  # again: the flags left unset take the recipe's defaults
        args.defaults = kind
        if args.discriminator_learning_rate is None:
            args.discriminator_learning_rate = args.learning_rate
        if args.push_to_hub and not args.hub_model_id:
            args.hub_model_id = default_hub_model_id(args.output_dir)
        # Every value rule lives in the library's settings objects; built here, they check the flags.
        for settings_class in (RunConfig, ValidationConfig, OptimizerConfig, EMAConfig, AFMObjective):
            settings_from_flags(settings_class, vars(args))
        settings_from_flags(OptimizerConfig, vars(args), {"learning_rate": "discriminator_learning_rate"})
        recipe.check_recipe(args.nfe, args.prediction_type, args.depth_repeat, args.cg_scale,
                            guided=args.classifier is not None)
        if args.eval_steps is not None:
            check_setting(args.eval_steps >= 1, "eval_steps", args.eval_steps, "an integer >= 1")
        for flag in ("eval_num_samples", "eval_batch_size"):
            check_setting(getattr(args, flag) >= 1, flag, getattr(args, flag), "an integer >= 1")
        if args.autoreload_steps is not None:
            check_setting(args.autoreload_steps >= 1, "autoreload_steps", args.autoreload_steps, "an integer >= 1")
            check_setting(args.init_from is not None, "autoreload_steps", args.autoreload_steps,
                          "a value only with --init_from (it resets the discriminator to that run's)")
        patch_size = recipe.trunk_config(args.model_config)["patch_size"]
        discriminator_patch_size = recipe.trunk_config(args.discriminator_config or args.model_config,
                                                       "discriminator_config")["patch_size"]
        check_push_to_hub(args.push_to_hub and not args.dry_run)
        if not args.dry_run:
            # Inputs that an earlier phase writes, and the VAE's config (perhaps not downloaded yet):
            # a dry run plans a chain of phases before they exist.
            check_input_paths(args)
            for size in sorted({patch_size, discriminator_patch_size}):
                check_model_input(args.vae, args.resolution, args.latent_cache, size)
    return args


def check_input_paths(args: argparse.Namespace) -> None:
    if args.eval_steps is not None and not os.path.exists(args.eval_reference or ""):
        raise cli.flag_error("eval_reference", args.eval_reference,
                             "a reference .npz (ADM batch or mu/sigma), a statistics file or an image folder")
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        raise cli.flag_error("train_data_dir", args.train_data_dir, "an existing folder of images")
    if args.classifier is not None and not os.path.isfile(os.path.join(args.classifier, "config.json")):
        raise cli.flag_error("classifier", args.classifier, "a folder written by AdversarialFlowClassifier.save_pretrained")
    if args.init_from is not None:
        for name in ("transformer", "discriminator"):
            if not os.path.isfile(os.path.join(args.init_from, name, "config.json")):
                raise cli.flag_error("init_from", args.init_from,
                                     f"the output_dir of a finished train_afm.py run (it has no {name}/config.json)")
    check_resume_flag(args.resume_from_checkpoint)


def settings(args: argparse.Namespace) -> dict:
    """The resolved flags as one JSON-ready dict (what --dry_run prints and the model card records),
    with `_model`: the networks this run builds, their configs and parameter counts (a `_` key is a
    comment in a config file, so the dict stays a valid `--config`)."""
    planned = planned_model_inputs(args.dataset_name, args.train_data_dir, args.latent_cache, args.vae, args.resolution,
                                   args.num_classes)
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        generator, discriminator = build_models(args, planned["sample_size"], planned["in_channels"], planned["num_classes"])
    model = cli.model_summary(generator=generator, discriminator=discriminator)
    if planned["assumed"]:
        model["assumed"] = planned["assumed"]
    if args.dry_run:  # what the run's state takes per GPU, under DDP and FSDP2
        model["memory_plan"] = plan_summary({"generator": generator, "discriminator": discriminator}, ema=["generator"])
    return {**build_parser().settings(vars(args)), "_model": model}


# ----------------------------------------------------------------------------- models
def build_models(args, sample_size: int, in_channels: int, num_classes: int):
    trunk = recipe.trunk_config(args.model_config)
    generator = AdversarialFlowTransformer2DModel(
        **trunk, sample_size=sample_size, in_channels=in_channels, num_classes=num_classes,
        **recipe.generator_time_inputs(args.nfe), depth_repeat=args.depth_repeat,
        prediction_type=args.prediction_type, nfe=args.nfe,
    )
    discriminator = AdversarialFlowDiscriminator(
        **recipe.trunk_config(args.discriminator_config or args.model_config, "discriminator_config"),
        sample_size=sample_size, in_channels=in_channels, num_classes=num_classes,
        use_timestep=recipe.discriminator_time_input(args.nfe),
    )
    return generator, discriminator


def check_same_config(source, model, what: str) -> None:
    """`source` (loaded from `what`) must be the model this run builds, key by key."""
    for key, value in model.config.items():
        if key.startswith("_"):  # bookkeeping such as _name_or_path
            continue
        if source.config.get(key) != value:
            raise ValueError(
                f"{what} has {key}={source.config.get(key)!r}, but this run builds {key}={value!r}; "
                "pass the model flags (--model_config, --nfe, --depth_repeat, ...) and data of the run it comes from."
            )


def load_init_from(path: str, generator, discriminator) -> None:
    """Start from a finished run (docs/method.md, guided phase): its EMA generator, its last discriminator.

    The EMA weights (the pipeline's `transformer/`) go into the trained generator; the EMA is then
    made from it, so both start equal. Optimizers, schedules and the gradient-normalization
    statistic start afresh: a pipeline folder does not hold them.
    """
    for name, model, cls in (("transformer", generator, AdversarialFlowTransformer2DModel),
                             ("discriminator", discriminator, AdversarialFlowDiscriminator)):
        source = cls.from_pretrained(os.path.join(path, name))
        check_same_config(source, model, f"`--init_from` {os.path.join(path, name)}")
        model.load_state_dict(source.state_dict())


def load_classifier(path: str, generator):
    classifier = AdversarialFlowClassifier.from_pretrained(path)
    for key in ("sample_size", "in_channels", "num_classes"):
        if classifier.config[key] != generator.config[key]:
            raise ValueError(
                f"`--classifier` {path} has {key}={classifier.config[key]!r}, but the generator has "
                f"{key}={generator.config[key]!r}; train the classifier on the same data, VAE and resolution."
            )
    return classifier


def autoreload(accelerator, generator, discriminator, ema: ModelEMA, discriminator_start) -> None:
    """docs/method.md, "autoreload": the generator back to its EMA, the discriminator to the phase's start.

    The optimizers keep their state: with beta1 = 0 there is no momentum pointing the old way, and
    the second moments are scale estimates that still hold near the reloaded weights; a fresh
    AdamW would instead take lr-sized sign steps on every weight right after each reload.
    """
    ema.copy_to(generator)
    restore(discriminator, discriminator_start)


def sample_grid(args, model, data):
    """The (EMA) generator's grid: one row per class (evenly spaced), the same noise every time."""
    pipeline = AFMPipeline(transformer=model, vae=data.vae, id2label=data.id2label)
    pipeline.set_progress_bar_config(disable=True)
    return class_grid(pipeline, args.num_validation_classes, args.num_validation_images, args.seed)


# ----------------------------------------------------------------------------- training
def main(argv=None):
    return cli.main(parse_args, settings, train, argv)


def train(args: argparse.Namespace) -> str:
    # 1. The Accelerator, the Hub repository (a bad token fails now), the checkpoint to resume
    #    (verified before any data is loaded)
    run = settings_from_flags(RunConfig, vars(args))
    accelerator = run.make_accelerator()
    hub_repo_id = (create_hub_repo(args.hub_model_id, args.hub_private_repo, args.hub_token)
                   if args.push_to_hub and accelerator.is_main_process else None)
    # The output folder writable, locked, free of another run's outputs; the resume's settings compared
    resume_path = start_run(accelerator, run, settings(args))

    # 2. The data (every label checked against the model's classes) and the VAE
    data = load_training_data(**{name: getattr(args, name) for name in DATA_FLAGS}, device=accelerator.device,
                              dtype=run.mixed_precision_dtype)
    args.max_train_steps = run.total_steps(len(data.dataloader), accelerator.num_processes)  # --num_train_epochs, if given

    # 3. The networks (from a finished run with --init_from), the guidance classifier
    generator, discriminator = build_models(args, data.sample_size, data.in_channels, data.num_classes)
    if args.init_from is not None:
        load_init_from(args.init_from, generator, discriminator)
        logger.info(f"Starting from the EMA generator and the discriminator of {args.init_from}")
    if args.gradient_checkpointing:
        generator.enable_gradient_checkpointing()
        discriminator.enable_gradient_checkpointing()
    classifier = load_classifier(args.classifier, generator).to(accelerator.device) if args.classifier else None
    logger.info(f"generator {generator.num_parameters() / 1e6:.2f}M, discriminator {discriminator.num_parameters() / 1e6:.2f}M parameters")

    # 4. Optimisers and schedules, prepared; the EMA, the gradient normalization, the noise
    config_g = settings_from_flags(OptimizerConfig, vars(args))
    config_g.learning_rate = recipe.generator_learning_rate(args.learning_rate, args.depth_repeat)
    config_d = settings_from_flags(OptimizerConfig, vars(args), {"learning_rate": "discriminator_learning_rate"})
    optimizer_g, optimizer_d = config_g.adamw(generator.parameters()), config_d.adamw(discriminator.parameters())
    schedulers = [config.scheduler(optimizer, args.max_train_steps, accelerator.num_processes)
                  for config, optimizer in ((config_g, optimizer_g), (config_d, optimizer_d))]
    # One network per call (FSDP2 takes one at a time). The discriminator's R1/R2 rows need its
    # parameters in full precision, which FSDP2's own bf16 casting would round away.
    generator, optimizer_g, schedulers[0] = prepare_network(accelerator, generator, optimizer_g, schedulers[0])
    discriminator, optimizer_d, schedulers[1] = prepare_network(accelerator, discriminator, optimizer_d, schedulers[1],
                                                                full_precision_parameters=True)
    dataloader = accelerator.prepare(data.dataloader)
    # Autoreload's starting discriminator, kept on the CPU (this process's shards under FSDP).
    discriminator_start = snapshot(discriminator) if args.autoreload_steps is not None else None
    ema = ModelEMA(generator)  # from the uncompiled model; the shards' averages under FSDP
    if args.compile:
        # The block code runs in a few shapes per step (G with and without gradient, D on two batch
        # sizes, the classifier), each one compiled graph: more than torch's default recompile limit.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        for model in (generator, discriminator) + ((classifier,) if classifier is not None else ()):
            accelerator.unwrap_model(model).compile_repeated_blocks(fullgraph=True, dynamic=False)
    grad_norm = GradientNormalization().to(accelerator.device) if args.grad_norm else None
    rng = noise_generator(accelerator, args.seed)
    train_step = AFMTrainingStep(
        accelerator, generator, discriminator, optimizer_g, optimizer_d, settings_from_flags(AFMObjective, vars(args)),
        grad_norm=grad_norm, ema=ema, ema_decay=settings_from_flags(EMAConfig, vars(args)).schedule(),
        max_grad_norm_g=config_g.max_grad_norm, max_grad_norm_d=config_d.max_grad_norm,
        classifier=classifier, noise_generator=rng,
    )

    # 5. Resume (a checkpoint of this phase overrides the --init_from weights), trackers, evaluation
    check_free_space(accelerator, args.output_dir, resume_path, [generator, discriminator], [ema])  # room for a checkpoint
    checkpoints = CheckpointIO(accelerator, ema=ema, grad_norm=grad_norm, noise_generator=rng, settings=settings(args))
    global_step = 0
    if resume_path is not None:
        global_step = checkpoints.load(resume_path, verify=False)  # start_run verified it
        logger.info(f"Resumed from {resume_path} at step {global_step}")
    elif args.resume_from_checkpoint is not None:
        logger.info("No checkpoint to resume from yet; starting a new run.")
    init_trackers(accelerator, args.tracker_project_name, settings(args))
    evaluation, metrics = None, None
    if args.eval_steps is not None:
        from diffusers_afm.evaluation import evaluate_pipeline, load_feature_extractor, load_reference

        extractor = load_feature_extractor(args.eval_feature_extractor, device=accelerator.device)
        reference = load_reference(args.eval_reference, extractor) if accelerator.is_main_process else None
        evaluation = (evaluate_pipeline, extractor, reference)
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"{len(data.dataset)} images, {data.num_classes} classes, batch {total_batch}, {args.max_train_steps} steps")

    # 6. The loop: one D and one G step per batch
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    throughput = Throughput(accelerator.num_processes)
    for batch in epoch_batches(accelerator, dataloader, global_step, args.max_train_steps, args.gradient_accumulation_steps):
        if global_step >= args.max_train_steps:
            break
        x0 = data.latents(batch, rng)  # flips and the VAE posterior drawn from the run's generator
        logs = train_step(x0, batch["class_labels"], global_step)
        for scheduler in schedulers:
            scheduler.step()  # prepared by Accelerate: it steps only when the optimizers did
        throughput.add(len(x0))
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        progress.update(1)
        values = host_values(logs, global_step, args.output_dir)  # one host sync; stops a diverged run
        values.update(images_per_sec=throughput.rate(), lr=schedulers[0].get_last_lr()[0])
        accelerator.log(values, step=global_step)
        progress.set_postfix(loss_d=f"{values['loss_d']:.3f}", loss_g=f"{values['loss_g']:.3f}")
        if args.autoreload_steps is not None and global_step % args.autoreload_steps == 0:
            # Before the checkpoint, so that a run resumed from it continues from the reloaded weights.
            autoreload(accelerator, generator, discriminator, ema, discriminator_start)
        if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
            checkpoints.save(args.output_dir, global_step, args.checkpoints_total_limit)
        if global_step % args.validation_steps == 0:
            ema_model = ema.full_model(accelerator.device)  # every process: it gathers the shards under FSDP
            if accelerator.is_main_process:
                grid = sample_grid(args, ema_model, data)
                save_validation_grid(accelerator, grid, args.output_dir, global_step)
        if evaluation is not None and global_step % args.eval_steps == 0:
            # On every process: the samples are sharded and their features gathered.
            evaluate, extractor, reference = evaluation
            ema_model = ema.full_model(accelerator.device, on_every_process=True)
            pipeline = AFMPipeline(transformer=ema_model, vae=data.vae, id2label=data.id2label)
            pipeline.set_progress_bar_config(disable=True)
            metrics = evaluate(pipeline, reference, extractor, num_samples=args.eval_num_samples,
                               batch_size=args.eval_batch_size, seed=args.seed, accelerator=accelerator)
            if accelerator.is_main_process:
                accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=global_step)
                logger.info(f"step {global_step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    progress.close()
    log_peak_memory(accelerator)
    statistic = float(grad_norm.square_avg) if grad_norm is not None else None
    logger.info(f"rank {accelerator.process_index} finished: step {global_step}, grad-norm statistic {statistic!r}",
                main_process_only=False)

    # 7. The pipeline folder: the EMA generator, the discriminator, samples and a model card
    accelerator.wait_for_everyone()
    ema_model, final_discriminator = ema.full_model(), gather_model(discriminator)  # every process (FSDP gathers)
    if accelerator.is_main_process:
        pipeline = AFMPipeline(transformer=ema_model, vae=data.vae, id2label=data.id2label)
        pipeline.set_progress_bar_config(disable=True)
        grid = sample_grid(args, ema_model.to(accelerator.device), data)
        # The card records the model itself, not the name or JSON file it came from.
        trunk = {key: ema_model.config[key] for key in recipe.TRUNK_KEYS}
        save_pipeline_folder(
            args.output_dir, pipeline, sample_grid=grid, discriminator=final_discriminator,
            standalone=args.standalone_hub_files, repo_id=args.hub_model_id,
            base_model=args.init_from,
            dataset=args.dataset_name or args.train_data_dir or "scikit-learn digits",
            training_settings={**settings(args), "model_config": trunk}, metrics=metrics,
            description=f"These are the EMA weights after {global_step} iterations.",
        )
        log_image(accelerator, grid, global_step)
        logger.info(f"Saved the AFMPipeline to {args.output_dir}")
        if args.push_to_hub:
            upload_output(args.output_dir, hub_repo_id, f"AFM training, step {global_step}", args.logging_dir, args.hub_token)
    accelerator.end_training()
    return args.output_dir


if __name__ == "__main__":
    cli.run_trainer(parse_args, settings, train)
