#!/usr/bin/env python
"""Train the noisy-input classifier `C(x_t, t)` that guides an Adversarial Flow Model (docs/method.md,
"Classifier guidance"), with Accelerate.

    # the embedded default: scikit-learn's digits in pixel space (CPU, minutes)
    python examples/train_afm_classifier.py --output_dir afm-classifier-digits

    # the paper's B/2 classifier on ImageNet 256 SD-VAE latents
    accelerate launch examples/train_afm_classifier.py --config examples/configs/classifier_b2.json

Cross-entropy on `x_t = interp(x0, z, t)` with `t ~ U(0, 1)`, after a random affine augmentation of
`x0` with probability 0.8; AdamW (lr 1e-4, betas 0.9 / 0.95), EMA 0.9995. The data, the VAE, the
Accelerate setup, `--config` / `--dry_run` and the atomic, resumable checkpoints are the generator
trainer's (`diffusers_afm.training.cli`, `diffusers_afm.data`, `diffusers_afm.training.checkpoint`
and `.loop`). The training accuracy is logged per
noise-time bucket, since guidance only uses the classifier at small `t` (docs/method.md: t <= 0.1 at
1 NFE, t <= 0.49 multi-step). The run ends with the EMA classifier saved in `--output_dir`, which
`AdversarialFlowClassifier.from_pretrained` and `train_afm.py --classifier` load.
"""

import argparse
import json
import os

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from diffusers_afm import AdversarialFlowClassifier, flow
from diffusers_afm.data import (
    DATA_FLAGS,
    DEFAULT_VAE,
    check_model_input,
    choose_defaults,
    load_training_data,
    planned_model_inputs,
)
from diffusers_afm.training import EMAConfig, ModelEMA, OptimizerConfig, RunConfig, cli, recipe
from diffusers_afm.training.augment import random_affine
from diffusers_afm.training.checkpoint import CheckpointIO, check_resume_flag
from diffusers_afm.training.output_dir import check_free_space, start_run
from diffusers_afm.training.loop import epoch_batches, host_values, noise_generator
from diffusers_afm.training.optimization import optimizer_update
from diffusers_afm.training.run import init_trackers
from diffusers_afm.utils import RunStopped, atomic_file, check_setting, save_pretrained_into, settings_from_flags

logger = get_logger(__name__)

DIGITS_DEFAULTS = dict(
    model_config=recipe.DIGITS_MODEL,
    resolution=8,
    train_batch_size=64,
    max_train_steps=1000,
    learning_rate=1e-3,
    ema_decay=0.999,
    ema_warmup=True,
    checkpointing_steps=500,
    logging_steps=50,
    random_flip=False,  # a mirrored digit is another glyph
    vae="none",
)
PAPER_DEFAULTS = dict(
    model_config="B/2",
    resolution=256,
    train_batch_size=32,
    max_train_steps=200_000,  # not stated in docs/method.md
    learning_rate=1e-4,
    ema_decay=0.9995,
    ema_warmup=False,
    checkpointing_steps=5000,
    logging_steps=500,
    random_flip=True,
    vae=DEFAULT_VAE,
)
# A small data set keeps the digits' schedule, with a model sized to its images (--defaults small).
SMALL_SCHEDULE = {k: v for k, v in DIGITS_DEFAULTS.items() if k not in ("model_config", "resolution", "vae", "random_flip")}


# ----------------------------------------------------------------------------- 1. flags
def build_parser() -> cli.TrainingArgumentParser:
    p = cli.TrainingArgumentParser(description="Train the noisy-input classifier for AFM classifier guidance.")
    cli.add_data_arguments(p, default_vae=DEFAULT_VAE, small_data_max_images=recipe.SMALL_DATA_MAX_IMAGES,
                           pixel_max_resolution=recipe.SMALL_DATA_PIXEL_MAX_RESOLUTION)
    p.add_argument("--model_config", default=None,
                   help="A size (T/2, S/2, B/2, ...; another patch size: B/4) or a JSON config file; default B/2 "
                        "(digits and --defaults small: a small model).")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="Recompute activations in the backward pass: less memory, more time.")
    p.add_argument("--augment_p", type=float, default=0.8, help="Probability of the random affine augmentation.")
    # Weight decay and clipping: not stated in docs/method.md; 0 (none) as in DiT.
    cli.add_optimizer_arguments(p, beta1=0.9, beta2=0.95, weight_decay=0.0, max_grad_norm=0.0,
                                learning_rate_help="AdamW lr (1e-4; digits 1e-3).",
                                max_grad_norm_help="Gradient clipping; off by default (not stated in docs/method.md).")
    cli.add_ema_arguments(p, decay=None, decay_help="EMA decay (0.9995; digits 0.999).", warmup=None)
    p.add_argument("--num_time_buckets", type=int, default=5, help="Accuracy is logged per equal-width bucket of t.")
    p.add_argument("--logging_steps", type=int, default=None, help="Steps over which each accuracy log is averaged.")
    cli.add_run_arguments(p, output_dir="afm-classifier", tracker_project_name="train_afm_classifier")
    return p


def parse_args(argv=None) -> argparse.Namespace:
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
        for settings_class in (RunConfig, OptimizerConfig, EMAConfig):
            settings_from_flags(settings_class, vars(args))
        check_setting(0 <= args.augment_p <= 1, "augment_p", args.augment_p, "a number in [0, 1]")
        for flag in ("num_time_buckets", "logging_steps"):
            check_setting(getattr(args, flag) >= 1, flag, getattr(args, flag), "an integer >= 1")
        patch_size = recipe.trunk_config(args.model_config)["patch_size"]
        if not args.dry_run:
            if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
                raise cli.flag_error("train_data_dir", args.train_data_dir, "an existing folder of images")
            check_resume_flag(args.resume_from_checkpoint)
            check_model_input(args.vae, args.resolution, args.latent_cache, patch_size)
    return args


def settings(args: argparse.Namespace) -> dict:
    """The resolved flags (what --dry_run prints), with `_model`: the classifier this run builds."""
    planned = planned_model_inputs(args.dataset_name, args.train_data_dir, args.latent_cache, args.vae, args.resolution,
                                   args.num_classes)
    with torch.device("meta"):  # shapes only
        classifier = build_classifier(args, planned["sample_size"], planned["in_channels"], planned["num_classes"])
    model = cli.model_summary(classifier=classifier)
    if planned["assumed"]:
        model["assumed"] = planned["assumed"]
    return {**build_parser().settings(vars(args)), "_model": model}


def build_classifier(args, sample_size, in_channels, num_classes):
    return AdversarialFlowClassifier(**recipe.trunk_config(args.model_config), sample_size=sample_size,
                                     in_channels=in_channels, num_classes=num_classes)


# ----------------------------------------------------------------------------- pieces
def noisy_batch(x0: torch.Tensor, augment_p: float, generator: torch.Generator):
    """`(x_t, t)`: `x0` augmented, then `x_t = interp(x0, z, t)` with `t ~ U(0, 1)` (docs/method.md)."""
    x0 = random_affine(x0, augment_p, generator=generator)
    t = torch.rand(x0.shape[0], device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, generator=generator)
    return flow.interpolate(x0, noise, t), t


def bucket_names(num_buckets: int):
    return [f"t_{i / num_buckets:.2f}-{(i + 1) / num_buckets:.2f}" for i in range(num_buckets)]


def save_classifier(args, ema: ModelEMA, step: int, accuracy: dict) -> None:
    """The EMA classifier into `--output_dir` (loadable with `from_pretrained`), and a short card."""
    save_pretrained_into(ema.full_model(), args.output_dir, last="config.json")
    card = f"""# AFM guidance classifier

An `AdversarialFlowClassifier` `C(x_t, t)` (EMA weights) trained for {step} steps with
`examples/train_afm_classifier.py`. Use it for guided AFM training:
`python examples/train_afm.py --classifier {args.output_dir} ...`.

Training accuracy by noise time over the last {args.logging_steps} steps: {json.dumps(accuracy)}

## Training settings

```json
{json.dumps(settings(args), indent=2, sort_keys=True)}
```
"""
    with atomic_file(os.path.join(args.output_dir, "README.md"), "w") as f:
        f.write(card)


# ----------------------------------------------------------------------------- training
def main(argv=None):
    return cli.main(parse_args, settings, train, argv)


def train(args: argparse.Namespace) -> str:
    # 1. The Accelerator; the checkpoint to resume (a damaged one is an error before any data is loaded)
    run = settings_from_flags(RunConfig, vars(args))
    accelerator = run.make_accelerator()
    if accelerator.distributed_type == DistributedType.FSDP:
        # A B/2 classifier fits one GPU with room to spare: it trains on one process or under DDP.
        raise RunStopped("train_afm_classifier.py does not run under FSDP (its B/2 classifier fits one GPU); launch it "
                         "on one process or with DDP (`accelerate launch --multi_gpu ...`).")
    # The output folder writable, locked, free of another run's outputs; the resume's settings compared
    resume_path = start_run(accelerator, run, settings(args))

    # 2. Data and the VAE (as the generator trainer reads them)
    data = load_training_data(**{name: getattr(args, name) for name in DATA_FLAGS}, device=accelerator.device,
                              dtype=run.mixed_precision_dtype)
    args.max_train_steps = run.total_steps(len(data.dataloader), accelerator.num_processes)  # --num_train_epochs, if given

    # 3. The classifier, its optimizer and EMA
    classifier = build_classifier(args, data.sample_size, data.in_channels, data.num_classes)
    if args.gradient_checkpointing:
        classifier.enable_gradient_checkpointing()
    logger.info(f"classifier {classifier.num_parameters() / 1e6:.2f}M parameters, {data.num_classes} classes")
    config = settings_from_flags(OptimizerConfig, vars(args))
    optimizer = config.adamw(classifier.parameters())
    scheduler = config.scheduler(optimizer, args.max_train_steps, accelerator.num_processes)
    classifier, optimizer, dataloader, scheduler = accelerator.prepare(classifier, optimizer, data.dataloader, scheduler)
    ema = ModelEMA(classifier)
    ema_decay = settings_from_flags(EMAConfig, vars(args)).schedule()
    rng = noise_generator(accelerator, args.seed)

    # 4. Resume
    check_free_space(accelerator, args.output_dir, resume_path, [classifier], [ema])  # room for a checkpoint
    checkpoints = CheckpointIO(accelerator, ema=ema, noise_generator=rng, settings=settings(args))
    global_step = 0
    if resume_path is not None:
        global_step = checkpoints.load(resume_path, verify=False)  # start_run verified it
        logger.info(f"Resumed from {resume_path} at step {global_step}")
    init_trackers(accelerator, args.tracker_project_name, settings(args))

    # 5. The loop: cross-entropy on noisy inputs; accuracy counted per time bucket on the device
    names = bucket_names(args.num_time_buckets)
    correct = torch.zeros(args.num_time_buckets, device=accelerator.device)
    seen = torch.zeros(args.num_time_buckets, device=accelerator.device)
    accuracy = {}
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    for batch in epoch_batches(accelerator, dataloader, global_step, args.max_train_steps, args.gradient_accumulation_steps):
        if global_step >= args.max_train_steps:
            break
        labels = batch["class_labels"]
        with accelerator.accumulate(classifier):
            x_t, t = noisy_batch(data.latents(batch, rng), args.augment_p, rng)
            with accelerator.autocast():
                logits = classifier(x_t, t).float()
            loss = F.cross_entropy(logits, labels)
            accelerator.backward(loss)
            logs = {"loss": loss.detach()}
            optimizer_update(accelerator, classifier, optimizer, config.max_grad_norm, logs, "grad_norm")
            scheduler.step()
        bucket = (t * args.num_time_buckets).long().clamp(max=args.num_time_buckets - 1)
        correct += torch.bincount(bucket, weights=(logits.argmax(-1) == labels).float(), minlength=args.num_time_buckets)
        seen += torch.bincount(bucket, minlength=args.num_time_buckets)
        if not accelerator.sync_gradients:
            continue
        ema.update(classifier, ema_decay(global_step))
        global_step += 1
        progress.update(1)
        values = host_values(logs, global_step, args.output_dir)  # one host sync; stops a diverged run
        values["lr"] = scheduler.get_last_lr()[0]
        if global_step % args.logging_steps == 0 or global_step == args.max_train_steps:
            # Summed over processes, so every rank logs the same numbers.
            counts = accelerator.reduce(torch.stack([correct, seen]), reduction="sum").tolist()
            accuracy = {name: round(c / n, 4) for name, c, n in zip(names, *counts) if n > 0}
            values.update({f"accuracy/{name}": value for name, value in accuracy.items()})
            logger.info(f"step {global_step}: loss {values['loss']:.4f}, accuracy by noise time {accuracy}")
            correct.zero_()
            seen.zero_()
        accelerator.log(values, step=global_step)
        progress.set_postfix(loss=f"{values['loss']:.3f}")
        if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
            checkpoints.save(args.output_dir, global_step, args.checkpoints_total_limit)
    progress.close()

    # 6. The EMA classifier, loadable with from_pretrained
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_classifier(args, ema, global_step, accuracy)
        logger.info(f"Saved the EMA classifier to {args.output_dir}")
    accelerator.end_training()
    return args.output_dir


if __name__ == "__main__":
    cli.run_trainer(parse_args, settings, train)
