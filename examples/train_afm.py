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
"""

import argparse
import os

import torch
from accelerate.logging import get_logger
from diffusers.optimization import get_scheduler

from diffusers_afm import (
    AFM_PRESETS,
    AdversarialFlowClassifier,
    AdversarialFlowDiscriminator,
    AdversarialFlowTransformer2DModel,
    AFMPipeline,
    export_standalone,
    preset_config,
    save_model_card,
)
from diffusers_afm.data import DEFAULT_VAE, load_training_data
from diffusers_afm.pipelines import class_grid
from diffusers_afm.training import (
    AFMObjective,
    AFMTrainingStep,
    GradientNormalization,
    ModelEMA,
    constant,
    cosine,
    ema_warmup,
)
from diffusers_afm.training import recipe
from diffusers_afm.training.checkpoint import CheckpointIO, check_resume_flag
from diffusers_afm.training.loop import NonFiniteLossError, adamw, noise_generator
from diffusers_afm.utils import atomic_directory, parse_nfe, save_pretrained_into
from training_cli import (
    DIGITS_MODEL,
    TRUNK_KEYS,
    TrainingArgumentParser,
    add_adamw_arguments,
    add_data_arguments,
    add_hub_arguments,
    add_run_arguments,
    apply_defaults,
    check_model_spec,
    check_hub_arguments,
    check_model_input,
    check_run_arguments,
    flag_error,
    init_trackers,
    log_grid,
    resolved_settings,
    start_run,
    train_loop,
    save_grid,
    upload_output,
    model_summary,
    planned_model_inputs,
    resolve_data_defaults,
    trunk_config,
)
import training_cli

__all__ = ["NonFiniteLossError", "main", "parse_args", "settings", "train"]  # what the tests and users import

logger = get_logger(__name__)

# The embedded default: scikit-learn's digits (8x8 grey, 10 classes), a small pixel-space model.
DIGITS_DEFAULTS = dict(
    resolution=8,
    train_batch_size=64,
    max_train_steps=1500,
    learning_rate=3e-4,
    ema_decay=0.999,
    ema_warmup=True,
    ot_scale_end=0.02,
    ot_decay_steps=3000,  # D+G steps: the whole run
    checkpointing_steps=500,
    validation_steps=500,
    random_flip=False,  # a mirrored digit is another glyph
    vae="none",
)
PAPER_DEFAULTS = dict(
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


# ----------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = TrainingArgumentParser(description="Train an Adversarial Flow Model.")
    add_data_arguments(p)
    # Model
    p.add_argument("--model_config", default=None,
                   help=f"A size ({', '.join(AFM_PRESETS)}) or a JSON config file. Default: XL/2; the digits and "
                        "--defaults small: a model sized to the data (--dry_run prints it).")
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
    add_adamw_arguments(p, beta1=0.0, beta2=0.9, weight_decay=0.01, networks=" of both networks",
                        learning_rate_help="The generator's AdamW lr (1e-4; digits 3e-4).")
    p.add_argument("--discriminator_learning_rate", type=float, default=None, help="Default: --learning_rate.")
    p.add_argument("--max_grad_norm", type=float, default=None, help="Default: 50 (1 NFE), 5 (multi-step, deep).")
    p.add_argument("--ema_decay", type=float, default=None, help="The generator EMA's decay (0.9999; digits 0.999).")
    p.add_argument("--ema_warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="Decay min(ema_decay, (1+n)/(10+n)) as diffusers' EMAModel; on for the digits default.")
    # Batch, length, precision, outputs, checkpoints, --config and --dry_run
    add_run_arguments(p, output_dir="afm-model", tracker_project_name="train_afm")
    p.add_argument("--validation_steps", type=int, default=None, help="Sample grid of the EMA generator every N steps.")
    p.add_argument("--num_validation_classes", type=int, default=10, help="Rows of the sample grids (evenly spaced classes).")
    p.add_argument("--num_validation_images", type=int, default=8, help="Per class (one grid row per class).")
    p.add_argument("--eval_steps", type=int, default=None, help="FID/IS/precision/recall of the EMA generator every N steps.")
    p.add_argument("--eval_num_samples", type=int, default=10000, help="Samples per evaluation.")
    p.add_argument("--eval_batch_size", type=int, default=64, help="Images per forward pass of an evaluation.")
    p.add_argument("--eval_reference", default=None, help="Reference .npz (ADM batch or mu/sigma) or image folder.")
    p.add_argument("--eval_feature_extractor", default="inception",
                   help="'inception' (torch-fidelity, the 'fid' extra) or a TorchScript feature network file.")
    add_hub_arguments(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse (config file, then command line) and check every flag before any data or model is loaded."""
    args = build_parser().parse_args(argv)
    # The data's defaults (--defaults: the digits', sized to a small data set, or the paper's), then
    # what --nfe, --depth_repeat and --classifier imply (training/recipe.py).
    data_defaults = resolve_data_defaults(args, digits=(DIGITS_DEFAULTS, DIGITS_MODEL),
                                          paper=(PAPER_DEFAULTS, preset_config("XL/2")))
    implied = recipe.recipe_defaults(args.nfe, args.depth_repeat, guided=args.classifier is not None)
    apply_defaults(args, {**data_defaults, **implied})
    if args.discriminator_learning_rate is None:
        args.discriminator_learning_rate = args.learning_rate

    def fail(flag, allowed):
        raise flag_error(flag, getattr(args, flag), allowed)

    check_run_arguments(args)
    for flag in ("ot_scale", "ot_scale_end", "gp_scale", "cp_scale", "cg_scale", "adam_weight_decay"):
        if getattr(args, flag) < 0:
            fail(flag, "a number >= 0")
    for flag in ("learning_rate", "discriminator_learning_rate", "gp_eps", "max_grad_norm"):
        if getattr(args, flag) <= 0:
            fail(flag, "a number > 0")
    for flag in ("eval_num_samples", "eval_batch_size") + (("eval_steps",) if args.eval_steps is not None else ()):
        if getattr(args, flag) < 1:
            fail(flag, "an integer >= 1")
    for flag in ("validation_steps", "depth_repeat", "ot_decay_steps"):
        if getattr(args, flag) < 1:
            fail(flag, "an integer >= 1")
    if not 0 <= args.gp_batch_ratio <= 1:
        fail("gp_batch_ratio", "a number in [0, 1]")
    if not 0 <= args.augment_p <= 1:
        fail("augment_p", "a number in [0, 1]")
    if not 0 < args.cg_max_time <= 1:
        fail("cg_max_time", "a number in (0, 1]")
    if not 0 <= args.ema_decay < 1:
        fail("ema_decay", "a number in [0, 1)")
    recipe.check_recipe(args.nfe, args.prediction_type, args.depth_repeat, args.cg_scale,
                        guided=args.classifier is not None, prefix="--")
    if args.autoreload_steps is not None:
        if args.autoreload_steps < 1:
            fail("autoreload_steps", "an integer >= 1")
        if args.init_from is None:
            fail("autoreload_steps", "a value only with --init_from (it resets the discriminator to that run's)")
    patch_size = check_model_spec("model_config", args.model_config, args.default_trunk)
    # The discriminator mirrors the generator unless --discriminator_config says otherwise.
    discriminator_patch_size = check_model_spec("discriminator_config", args.discriminator_config,
                                                {"patch_size": patch_size})
    if not args.dry_run:
        # Inputs that an earlier phase writes, and the VAE's config (perhaps not downloaded yet):
        # a dry run plans a chain of phases before they exist.
        check_input_paths(args)
        for size in sorted({patch_size, discriminator_patch_size}):
            check_model_input(args, size)
    check_hub_arguments(args)
    return args


def check_input_paths(args: argparse.Namespace) -> None:
    if args.latent_cache is not None and not os.path.isfile(os.path.join(args.latent_cache, "cache_info.json")):
        raise flag_error("latent_cache", args.latent_cache, "a folder written by examples/cache_latents.py")
    if args.eval_steps is not None and not os.path.exists(args.eval_reference or ""):
        raise flag_error("eval_reference", args.eval_reference,
                         "a reference .npz (ADM batch or mu/sigma), a statistics file or an image folder")
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        raise flag_error("train_data_dir", args.train_data_dir, "an existing folder of images")
    if args.classifier is not None and not os.path.isfile(os.path.join(args.classifier, "config.json")):
        raise flag_error("classifier", args.classifier, "a folder written by AdversarialFlowClassifier.save_pretrained")
    if args.init_from is not None:
        for name in ("transformer", "discriminator"):
            if not os.path.isfile(os.path.join(args.init_from, name, "config.json")):
                raise flag_error("init_from", args.init_from,
                                 f"the output_dir of a finished train_afm.py run (it has no {name}/config.json)")
    check_resume_flag(args.resume_from_checkpoint)


def settings(args: argparse.Namespace) -> dict:
    """The resolved flags as one JSON-ready dict (what --dry_run prints and the model card records),
    with `_model`: the networks this run builds, their configs and parameter counts (a `_` key is a
    comment in a config file, so the dict stays a valid `--config`)."""
    planned = planned_model_inputs(args)
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        generator, discriminator = build_models(args, planned["sample_size"], planned["in_channels"],
                                                planned["num_classes"])
    model = model_summary(generator=generator, discriminator=discriminator)
    if planned["assumed"]:
        model["assumed"] = planned["assumed"]
    return {**resolved_settings(args, build_parser()), "_model": model}


# ----------------------------------------------------------------------------- models
def build_models(args, sample_size, in_channels, num_classes):
    trunk = trunk_config(args.model_config, args.default_trunk)
    generator = AdversarialFlowTransformer2DModel(
        **trunk,
        sample_size=sample_size,
        in_channels=in_channels,
        num_classes=num_classes,
        **recipe.generator_time_inputs(args.nfe),
        depth_repeat=args.depth_repeat,
        prediction_type=args.prediction_type,
        nfe=args.nfe,
    )
    discriminator = AdversarialFlowDiscriminator(
        **trunk_config(args.discriminator_config, trunk, "discriminator_config"),
        sample_size=sample_size,
        in_channels=in_channels,
        num_classes=num_classes,
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


def autoreload(accelerator, generator, discriminator, ema, discriminator_start) -> None:
    """docs/method.md, "autoreload": the generator back to its EMA, the discriminator to the phase's start.

    The optimizers keep their state: with beta1 = 0 there is no momentum pointing the old way, and
    the second moments are scale estimates that still hold near the reloaded weights; a fresh
    AdamW would instead take lr-sized sign steps on every weight right after each reload.
    """
    accelerator.unwrap_model(generator).load_state_dict(ema.state_dict())
    accelerator.unwrap_model(discriminator).load_state_dict(discriminator_start)


# ----------------------------------------------------------------------------- outputs
def save_pipeline(args, accelerator, ema, discriminator, vae, id2label, step, metrics=None):
    """The final AFMPipeline (EMA generator), the discriminator, a grid and a model card, each atomic."""
    pipeline = AFMPipeline(transformer=ema.model, vae=vae, id2label=id2label)
    pipeline.set_progress_bar_config(disable=True)
    grid = class_grid(pipeline, args.num_validation_classes, args.num_validation_images, args.seed)
    save_grid(grid, os.path.join(args.output_dir, "samples.png"))
    save_pretrained_into(pipeline, args.output_dir, last="model_index.json")
    if args.standalone_hub_files:
        export_standalone(args.output_dir)  # before the card, which then shows the trust_remote_code snippet
    with atomic_directory(os.path.join(args.output_dir, "discriminator")) as tmp:
        accelerator.unwrap_model(discriminator).save_pretrained(tmp, safe_serialization=True)
    # The card records the model itself, not the path of the JSON file it may have come from.
    trunk = {key: ema.model.config[key] for key in TRUNK_KEYS}
    save_model_card(
        args.output_dir,
        repo_id=args.hub_model_id,
        base_model=args.init_from if args.init_from and not os.path.isdir(args.init_from) else None,
        dataset=args.dataset_name or args.train_data_dir or "scikit-learn digits",
        training_settings={**settings(args), "model_config": trunk},
        sample_grid="samples.png",
        metrics=metrics,
        description=f"These are the EMA weights after {step} iterations.",
    )
    return grid


# ----------------------------------------------------------------------------- training
def main(argv=None):
    return training_cli.main(parse_args, settings, train, argv)


def train(args: argparse.Namespace) -> str:
    # 1. The Accelerator, the Hub repository, the checkpoint to resume (verified before any data is
    #    loaded), the data (every label checked against the model's classes) and the VAE
    accelerator, hub_repo_id, resume_path, data = start_run(args, load_training_data)

    # 2. Models (from a finished run with --init_from), EMA, gradient normalization
    generator, discriminator = build_models(args, data.sample_size, data.in_channels, data.num_classes)
    discriminator_start = None
    if args.init_from is not None:
        load_init_from(args.init_from, generator, discriminator)
        logger.info(f"Starting from the EMA generator and the discriminator of {args.init_from}")
    if args.autoreload_steps is not None:
        # Kept on the CPU: a second copy of the discriminator need not take accelerator memory.
        discriminator_start = {k: v.detach().to("cpu", copy=True) for k, v in discriminator.state_dict().items()}
    if args.gradient_checkpointing:
        generator.enable_gradient_checkpointing()
        discriminator.enable_gradient_checkpointing()
    classifier = None
    if args.classifier is not None:
        classifier = load_classifier(args.classifier, generator).to(accelerator.device)
    logger.info(f"generator {generator.num_parameters() / 1e6:.2f}M, discriminator {discriminator.num_parameters() / 1e6:.2f}M parameters")

    betas, eps, weight_decay = (args.adam_beta1, args.adam_beta2), args.adam_epsilon, args.adam_weight_decay
    optimizer_g = adamw(generator.parameters(), recipe.generator_learning_rate(args.learning_rate, args.depth_repeat),
                        betas, eps, weight_decay)
    optimizer_d = adamw(discriminator.parameters(), args.discriminator_learning_rate, betas, eps, weight_decay)
    schedulers = [
        get_scheduler(args.lr_scheduler, optimizer=opt, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                      num_training_steps=args.max_train_steps * accelerator.num_processes)
        for opt in (optimizer_g, optimizer_d)
    ]
    generator, discriminator, optimizer_g, optimizer_d, train_dataloader, *schedulers = accelerator.prepare(
        generator, discriminator, optimizer_g, optimizer_d, data.dataloader, *schedulers
    )
    ema = ModelEMA(generator)  # from the uncompiled model
    if args.compile:
        # The block code runs in a few shapes per step (G with and without gradient, D on two batch
        # sizes, the classifier), each one compiled graph: more than torch's default recompile limit.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        for model in (generator, discriminator) + ((classifier,) if classifier is not None else ()):
            accelerator.unwrap_model(model).compile_repeated_blocks(fullgraph=True, dynamic=False)
    grad_norm = GradientNormalization().to(accelerator.device) if args.grad_norm else None
    rng = noise_generator(accelerator, args.seed)
    objective = AFMObjective(
        nfe=args.nfe,
        prediction_type=args.prediction_type,
        ot_scale=cosine(args.ot_scale, args.ot_scale_end, args.ot_decay_steps),
        gp_scale=args.gp_scale,
        gp_eps=args.gp_eps,
        gp_batch_ratio=args.gp_batch_ratio,
        cp_scale=args.cp_scale,
        gp_full_precision=args.gp_full_precision,
        augment_p=constant(args.augment_p),
        cg_scale=args.cg_scale,
        cg_max_time=args.cg_max_time,
    )
    train_step = AFMTrainingStep(
        accelerator, generator, discriminator, optimizer_g, optimizer_d, objective,
        grad_norm=grad_norm, ema=ema, ema_decay=ema_warmup(args.ema_decay) if args.ema_warmup else args.ema_decay,
        max_grad_norm_g=args.max_grad_norm, max_grad_norm_d=args.max_grad_norm,
        classifier=classifier, noise_generator=rng,
    )

    # 3. Resume (a checkpoint of this phase overrides the --init_from weights)
    checkpoints = CheckpointIO(accelerator, ema=ema, grad_norm=grad_norm, noise_generator=rng)
    global_step = 0
    if resume_path is not None:
        global_step = checkpoints.load(resume_path, verify=False)  # resolve_resume verified it
        logger.info(f"Resumed from {resume_path} at step {global_step}")
    elif args.resume_from_checkpoint in ("latest", "latest_valid"):
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

    # 4. Train
    def before_checkpoint(step):
        # Before the checkpoint, so that a run resumed from it continues from the reloaded weights.
        if args.autoreload_steps is not None and step % args.autoreload_steps == 0:
            autoreload(accelerator, generator, discriminator, ema, discriminator_start)

    def after_checkpoint(step):
        nonlocal metrics
        if step % args.validation_steps == 0 and accelerator.is_main_process:
            pipeline = AFMPipeline(transformer=ema.model, vae=data.vae, id2label=data.id2label)
            pipeline.set_progress_bar_config(disable=True)
            grid = class_grid(pipeline, args.num_validation_classes, args.num_validation_images, args.seed)
            save_grid(grid, os.path.join(args.output_dir, "samples", f"step_{step:07d}.png"))
            log_grid(accelerator, grid, step)
        if evaluation is not None and step % args.eval_steps == 0:
            # On every process: the samples are sharded and their features gathered.
            evaluate, extractor, reference = evaluation
            pipeline = AFMPipeline(transformer=ema.model, vae=data.vae, id2label=data.id2label)
            pipeline.set_progress_bar_config(disable=True)
            metrics = evaluate(pipeline, reference, extractor, num_samples=args.eval_num_samples,
                               batch_size=args.eval_batch_size, seed=args.seed, accelerator=accelerator)
            if accelerator.is_main_process:
                accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
                logger.info(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))

    global_step = train_loop(
        args, accelerator, data, train_dataloader, train_step, checkpoints, global_step, schedulers,
        postfix=lambda v: {"loss_d": f"{v['loss_d']:.3f}", "loss_g": f"{v['loss_g']:.3f}"},
        before_checkpoint=before_checkpoint, after_checkpoint=after_checkpoint,
    )
    statistic = float(grad_norm.square_avg) if grad_norm is not None else None
    logger.info(f"rank {accelerator.process_index} finished: step {global_step}, grad-norm statistic {statistic!r}",
                main_process_only=False)

    # 5. The pipeline folder
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        grid = save_pipeline(args, accelerator, ema, discriminator, data.vae, data.id2label, global_step, metrics)
        log_grid(accelerator, grid, global_step)
        logger.info(f"Saved the AFMPipeline to {args.output_dir}")
        if args.push_to_hub:
            upload_output(args, hub_repo_id, f"AFM training, step {global_step}")
    accelerator.end_training()
    return args.output_dir


if __name__ == "__main__":
    training_cli.run(parse_args, settings, train)
