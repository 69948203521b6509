#!/usr/bin/env python
"""Train an Adversarial Flow Model (Lin et al., 2025) with Accelerate.

    # the embedded default: a pixel-space model on scikit-learn's handwritten digits (CPU, minutes)
    python examples/train_afm.py --output_dir afm-digits

    # ImageNet 256, XL/2, 1 NFE, the paper's settings (SD-VAE latents), on every GPU of the machine
    accelerate launch examples/train_afm.py --dataset_name ILSVRC/imagenet-1k --model_config XL/2 \
        --resolution 256 --train_batch_size 32 --mixed_precision bf16 --output_dir afm-xl2

Every default is the paper's (METHOD.md) except where the embedded digits default says otherwise
(`DIGITS_DEFAULTS`). The run ends with an `AFMPipeline` folder in `--output_dir` (EMA weights,
class names, a model card) that `AFMPipeline.from_pretrained` loads.
"""

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler

from diffusers_afm import (
    AdversarialFlowClassifier,
    AdversarialFlowDiscriminator,
    AdversarialFlowTransformer2DModel,
    AFMPipeline,
    preset_config,
)
from diffusers_afm.pipelines import class_grid
from diffusers_afm.data import (
    ImageTransform,
    class_names,
    collate,
    infer_num_classes,
    load_image_dataset,
    prepare_dataset,
    random_flip,
)
from diffusers_afm.models.transformer_afm import AFM_PRESETS
from diffusers_afm.training import (
    AFMObjective,
    AFMTrainingStep,
    GradientNormalization,
    ModelEMA,
    constant,
    cosine,
    ema_warmup,
)
from diffusers_afm.training.checkpoint import list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from diffusers_afm.utils import atomic_directory, atomic_file, replace_path

logger = get_logger(__name__)

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
# Trunk keys a --model_config JSON may set; the data and the AFM flags decide the rest.
TRUNK_KEYS = ("patch_size", "num_layers", "num_attention_heads", "attention_head_dim", "mlp_ratio")

# The embedded default: scikit-learn's digits (8x8 grey, 10 classes), a small pixel-space model.
DIGITS_MODEL = dict(patch_size=2, num_layers=4, num_attention_heads=4, attention_head_dim=32, mlp_ratio=4.0)
DIGITS_DEFAULTS = dict(
    resolution=8,
    train_batch_size=64,
    max_train_steps=3000,
    learning_rate=3e-4,
    ema_decay=0.999,
    ema_warmup=True,
    ot_scale_end=0.02,
    ot_decay_steps=6000,
    checkpointing_steps=1000,
    validation_steps=1000,
    random_flip=False,  # a mirrored digit is another glyph
    vae="none",
)
PAPER_DEFAULTS = dict(
    resolution=256,
    train_batch_size=32,
    max_train_steps=500_000,
    learning_rate=1e-4,
    ema_decay=0.9999,
    ema_warmup=False,
    ot_scale_end=0.005,
    ot_decay_steps=1_000_000,
    checkpointing_steps=5000,
    validation_steps=5000,
    random_flip=True,
    vae=DEFAULT_VAE,
)


class NonFiniteLossError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- arguments
def parse_nfe(value):
    if str(value).lower() == "any":
        return None
    try:
        nfe = int(value)
    except ValueError:
        nfe = 0
    if nfe < 1:
        raise argparse.ArgumentTypeError(f"--nfe must be a positive integer or 'any', got {value!r}")
    return nfe


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train an Adversarial Flow Model.")
    # Data
    p.add_argument("--dataset_name", default=None, help="Hub dataset or local imagefolder; none = the embedded digits.")
    p.add_argument("--dataset_config_name", default=None)
    p.add_argument("--train_data_dir", default=None, help="A local folder of images (imagefolder layout).")
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--image_column", default="image")
    p.add_argument("--label_column", default="label", help="Integer class column; if absent, one class.")
    p.add_argument("--num_classes", type=int, default=None, help="Override the class count read off the data.")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--dataloader_num_workers", type=int, default=0)
    p.add_argument("--vae", default=None, help=f"Local folder or Hub id (default {DEFAULT_VAE}); 'none' = pixel space.")
    p.add_argument("--vae_scaling_factor", type=float, default=None, help="Default: the VAE's config (0.18215).")
    # Model
    p.add_argument("--model_config", default=None, help=f"A size ({', '.join(AFM_PRESETS)}) or a JSON config file.")
    p.add_argument("--discriminator_config", default=None, help="Same forms; default mirrors the generator.")
    p.add_argument("--nfe", type=parse_nfe, default=1, help="1, 2, 4, ... or 'any'.")
    p.add_argument("--prediction_type", choices=("sample", "velocity"), default=None,
                   help="Default: sample for 1 NFE, velocity for multi-step.")
    p.add_argument("--depth_repeat", type=int, default=1, help="Deep 1-NFE models: 2 (56 layers) or 4 (112).")
    p.add_argument("--gradient_checkpointing", action="store_true")
    # Objective (METHOD.md)
    p.add_argument("--ot_scale", type=float, default=None, help="Start value: 0.2 (1 NFE) or 0.25 (multi-step).")
    p.add_argument("--ot_scale_end", type=float, default=None)
    p.add_argument("--ot_decay_steps", type=int, default=None, help="Cosine decay length in D+G steps.")
    p.add_argument("--gp_scale", type=float, default=0.25)
    p.add_argument("--gp_eps", type=float, default=0.01)
    p.add_argument("--gp_batch_ratio", type=float, default=0.25)
    p.add_argument("--cp_scale", type=float, default=0.01)
    p.add_argument("--augment_p", type=float, default=0.0)
    p.add_argument("--grad_norm", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--classifier", default=None, help="An AdversarialFlowClassifier folder for guided training.")
    p.add_argument("--cg_scale", type=float, default=None, help="Guidance weight: 0.003 (1 NFE) or 0.02.")
    # Optimisation
    p.add_argument("--train_batch_size", type=int, default=None, help="Per device.")
    p.add_argument("--max_train_steps", type=int, default=None, help="Iterations (one D and one G step each).")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=None)
    p.add_argument("--discriminator_learning_rate", type=float, default=None, help="Default: --learning_rate.")
    p.add_argument("--lr_scheduler", default="constant")
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--adam_beta1", type=float, default=0.0)
    p.add_argument("--adam_beta2", type=float, default=0.9)
    p.add_argument("--adam_epsilon", type=float, default=1e-8)
    p.add_argument("--adam_weight_decay", type=float, default=0.01)
    p.add_argument("--max_grad_norm", type=float, default=None, help="Default: 50 (1 NFE), 5 (multi-step, deep).")
    p.add_argument("--ema_decay", type=float, default=None)
    p.add_argument("--ema_warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="Decay min(ema_decay, (1+n)/(10+n)) as diffusers' EMAModel; on for the digits default.")
    p.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None)
    p.add_argument("--allow_tf32", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    # Outputs
    p.add_argument("--output_dir", default="afm-model")
    p.add_argument("--logging_dir", default="logs")
    p.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all, or none.")
    p.add_argument("--checkpointing_steps", type=int, default=None)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder.")
    p.add_argument("--validation_steps", type=int, default=None, help="Sample grid of the EMA generator every N steps.")
    p.add_argument("--num_validation_classes", type=int, default=10)
    p.add_argument("--num_validation_images", type=int, default=8, help="Per class (one grid row per class).")
    p.add_argument("--push_to_hub", action="store_true")
    p.add_argument("--hub_model_id", default=None)
    p.add_argument("--hub_token", default=None)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check every flag before any data or model is loaded."""
    args = build_parser().parse_args(argv)
    args.embedded_digits = args.dataset_name is None and args.train_data_dir is None
    defaults = DIGITS_DEFAULTS if args.embedded_digits else PAPER_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    multi_step = args.nfe != 1
    if args.prediction_type is None:
        args.prediction_type = "velocity" if multi_step else "sample"
    if args.ot_scale is None:
        args.ot_scale = 0.25 if multi_step else 0.2
    if args.max_grad_norm is None:
        args.max_grad_norm = 5.0 if (multi_step or args.depth_repeat > 1) else 50.0
    if args.cg_scale is None:
        args.cg_scale = (0.02 if multi_step else 0.003) if args.classifier else 0.0
    if args.discriminator_learning_rate is None:
        args.discriminator_learning_rate = args.learning_rate

    def fail(flag, allowed):
        raise ValueError(f"`--{flag}` got {getattr(args, flag)!r}; allowed: {allowed}.")

    for flag in ("ot_scale", "ot_scale_end", "gp_scale", "cp_scale", "cg_scale", "adam_weight_decay"):
        if getattr(args, flag) < 0:
            fail(flag, "a number >= 0")
    for flag in ("learning_rate", "discriminator_learning_rate", "gp_eps", "max_grad_norm"):
        if getattr(args, flag) <= 0:
            fail(flag, "a number > 0")
    for flag in ("resolution", "train_batch_size", "max_train_steps", "gradient_accumulation_steps",
                 "checkpointing_steps", "validation_steps", "depth_repeat", "ot_decay_steps"):
        if getattr(args, flag) < 1:
            fail(flag, "an integer >= 1")
    if not 0 <= args.gp_batch_ratio <= 1:
        fail("gp_batch_ratio", "a number in [0, 1]")
    if not 0 <= args.augment_p <= 1:
        fail("augment_p", "a number in [0, 1]")
    if not 0 <= args.ema_decay < 1:
        fail("ema_decay", "a number in [0, 1)")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        fail("checkpoints_total_limit", "an integer >= 1")
    if args.depth_repeat > 1 and multi_step:
        fail("depth_repeat", "1 unless --nfe 1 (deep models are 1-NFE)")
    if args.prediction_type == "sample" and multi_step:
        fail("prediction_type", "'velocity' for multi-step and any-step models")
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        fail("train_data_dir", "an existing folder of images")
    for flag in ("model_config", "discriminator_config"):
        value = getattr(args, flag)
        if value is not None and value not in AFM_PRESETS and not os.path.isfile(value):
            fail(flag, f"one of {', '.join(AFM_PRESETS)} or a JSON file")
    if args.classifier is not None and not os.path.isdir(args.classifier):
        fail("classifier", "a folder written by AdversarialFlowClassifier.save_pretrained")
    if args.resume_from_checkpoint not in (None, "latest"):
        resolve_resume(args.output_dir, args.resume_from_checkpoint)  # raises if it is not a checkpoint
    if args.report_to not in ("tensorboard", "wandb", "all", "none"):
        fail("report_to", "tensorboard, wandb, all or none")
    if args.push_to_hub and not args.hub_model_id:
        fail("hub_model_id", "a repository id when --push_to_hub is set")
    return args


# ----------------------------------------------------------------------------- models
def trunk_config(spec, fallback):
    if spec is None:
        return dict(fallback)
    if spec in AFM_PRESETS:
        return preset_config(spec)
    with open(spec) as f:
        config = json.load(f)
    return {k: v for k, v in config.items() if k in TRUNK_KEYS}


def build_models(args, sample_size, in_channels, num_classes):
    trunk = trunk_config(args.model_config, DIGITS_MODEL if args.embedded_digits else preset_config("XL/2"))
    multi_step = args.nfe != 1
    generator = AdversarialFlowTransformer2DModel(
        **trunk,
        sample_size=sample_size,
        in_channels=in_channels,
        num_classes=num_classes,
        use_timestep_src=multi_step,
        use_timestep_tgt=args.nfe is None,
        depth_repeat=args.depth_repeat,
        prediction_type=args.prediction_type,
        nfe=args.nfe,
    )
    discriminator = AdversarialFlowDiscriminator(
        **trunk_config(args.discriminator_config, trunk),
        sample_size=sample_size,
        in_channels=in_channels,
        num_classes=num_classes,
        use_timestep=multi_step,
    )
    return generator, discriminator


def load_vae(args, accelerator):
    if args.vae.lower() == "none":
        return None
    from diffusers import AutoencoderKL

    subfolder = "vae" if os.path.isdir(os.path.join(args.vae, "vae")) else None
    vae = AutoencoderKL.from_pretrained(args.vae, subfolder=subfolder)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    return vae.requires_grad_(False).eval().to(accelerator.device, dtype=dtype)


# ----------------------------------------------------------------------------- outputs
def save_grid(grid, path):
    with atomic_file(path) as f:
        grid.save(f, format="PNG")


def log_grid(accelerator, grid, step):
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"samples": wandb.Image(grid)}, step=step)


def write_model_card(args, path, num_classes, step, grid_name):
    card = f"""---
library_name: diffusers
license: apache-2.0
tags:
- adversarial-flow-models
- diffusers-afm
- class-conditional
- image-generation
---

# Adversarial Flow Model: {args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))}

A class-conditional Adversarial Flow Model ({num_classes} classes, {args.nfe or 'any'}-NFE,
`{args.prediction_type}` prediction) trained with
[diffusers-afm](https://github.com/) for {step} iterations on
`{args.dataset_name or args.train_data_dir or 'scikit-learn digits'}`. These are the EMA weights.

![samples]({grid_name})

## Use

```python
import torch
from diffusers_afm import AFMPipeline

pipe = AFMPipeline.from_pretrained("{args.hub_model_id or args.output_dir}")
images = pipe(class_labels=[0, 1, 2], generator=torch.Generator().manual_seed(0)).images
```

## Training settings

```json
{json.dumps({k: v for k, v in sorted(vars(args).items()) if k != "hub_token"}, indent=2, default=str)}
```
"""
    with atomic_file(os.path.join(path, "README.md"), "w") as f:
        f.write(card)


def save_pipeline(args, accelerator, ema, discriminator, vae, id2label, num_classes, step):
    """The final AFMPipeline (EMA generator), the discriminator, a grid and a model card, each atomic."""
    pipeline = AFMPipeline(transformer=ema.model, vae=vae, id2label=id2label)
    pipeline.set_progress_bar_config(disable=True)
    grid = class_grid(pipeline, args.num_validation_classes, args.num_validation_images, args.seed)
    save_grid(grid, os.path.join(args.output_dir, "samples.png"))
    with tempfile.TemporaryDirectory(dir=args.output_dir, prefix=".pipeline-") as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        # One rename per component; model_index.json goes last, once every component is in place.
        for name in sorted(os.listdir(tmp), key=lambda n: n == "model_index.json"):
            replace_path(os.path.join(tmp, name), os.path.join(args.output_dir, name))
    with atomic_directory(os.path.join(args.output_dir, "discriminator")) as tmp:
        accelerator.unwrap_model(discriminator).save_pretrained(tmp, safe_serialization=True)
    write_model_card(args, args.output_dir, num_classes, step, "samples.png")
    return grid


# ----------------------------------------------------------------------------- training
def main(argv=None):
    return train(parse_args(argv))


def train(args: argparse.Namespace) -> str:
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    # 1. Data (every label is checked against the model's classes before training starts)
    dataset = load_image_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir)
    num_classes = infer_num_classes(dataset, args.label_column, args.num_classes)
    names = class_names(dataset, args.label_column)
    id2label = {i: n for i, n in enumerate(names)} if names else None
    mode = "L" if args.embedded_digits else "RGB"
    train_dataset = prepare_dataset(dataset, args.image_column, args.label_column,
                                    ImageTransform(args.resolution, args.center_crop, mode))
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset, batch_size=args.train_batch_size, shuffle=True, drop_last=True, collate_fn=collate,
        num_workers=args.dataloader_num_workers,
        # Its own generator, so that making an iterator never draws from the global RNG.
        generator=torch.Generator().manual_seed(args.seed),
    )
    if len(train_dataloader) == 0:
        raise ValueError(f"`--train_batch_size` {args.train_batch_size} is larger than the dataset ({len(dataset)} images).")

    # 2. Models, EMA, gradient normalization
    vae = load_vae(args, accelerator)
    scaling_factor = args.vae_scaling_factor or (vae.config.scaling_factor if vae is not None else 1.0)
    if vae is not None:
        down = 2 ** (len(vae.config.block_out_channels) - 1)
        sample_size, in_channels = args.resolution // down, vae.config.latent_channels
    else:
        sample_size, in_channels = args.resolution, 1 if mode == "L" else 3
    generator, discriminator = build_models(args, sample_size, in_channels, num_classes)
    if args.gradient_checkpointing:
        generator.enable_gradient_checkpointing()
        discriminator.enable_gradient_checkpointing()
    classifier = None
    if args.classifier is not None:
        classifier = AdversarialFlowClassifier.from_pretrained(args.classifier).to(accelerator.device)
    logger.info(f"generator {generator.num_parameters() / 1e6:.2f}M, discriminator {discriminator.num_parameters() / 1e6:.2f}M parameters")

    fused = torch.cuda.is_available()
    adamw = dict(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, weight_decay=args.adam_weight_decay)
    if fused:
        adamw["fused"] = True
    # METHOD.md, deep models: the generator's lr is divided by the depth repetition.
    optimizer_g = torch.optim.AdamW(generator.parameters(), lr=args.learning_rate / args.depth_repeat, **adamw)
    optimizer_d = torch.optim.AdamW(discriminator.parameters(), lr=args.discriminator_learning_rate, **adamw)
    schedulers = [
        get_scheduler(args.lr_scheduler, optimizer=opt, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                      num_training_steps=args.max_train_steps * accelerator.num_processes)
        for opt in (optimizer_g, optimizer_d)
    ]
    generator, discriminator, optimizer_g, optimizer_d, train_dataloader, *schedulers = accelerator.prepare(
        generator, discriminator, optimizer_g, optimizer_d, train_dataloader, *schedulers
    )
    ema = ModelEMA(generator)
    grad_norm = GradientNormalization().to(accelerator.device) if args.grad_norm else None
    noise_generator = torch.Generator(accelerator.device).manual_seed(args.seed * 1000 + accelerator.process_index)
    objective = AFMObjective(
        nfe=args.nfe,
        prediction_type=args.prediction_type,
        ot_scale=cosine(args.ot_scale, args.ot_scale_end, args.ot_decay_steps),
        gp_scale=args.gp_scale,
        gp_eps=args.gp_eps,
        gp_batch_ratio=args.gp_batch_ratio,
        cp_scale=args.cp_scale,
        augment_p=constant(args.augment_p),
        cg_scale=args.cg_scale,
    )
    train_step = AFMTrainingStep(
        accelerator, generator, discriminator, optimizer_g, optimizer_d, objective,
        grad_norm=grad_norm, ema=ema, ema_decay=ema_warmup(args.ema_decay) if args.ema_warmup else args.ema_decay,
        max_grad_norm_g=args.max_grad_norm, max_grad_norm_d=args.max_grad_norm,
        classifier=classifier, noise_generator=noise_generator,
    )

    # 3. Resume
    global_step = 0
    resume_path = resolve_resume(args.output_dir, args.resume_from_checkpoint)
    if resume_path is not None:
        global_step = load_checkpoint(accelerator, resume_path, ema, grad_norm, noise_generator)
        logger.info(f"Resumed from {resume_path} at step {global_step}")
    elif args.resume_from_checkpoint == "latest":
        logger.info("No checkpoint to resume from yet; starting a new run.")

    if accelerator.is_main_process:
        config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items() if k != "hub_token"}
        accelerator.init_trackers("train_afm", config=config)

    updates_per_epoch = len(train_dataloader) // args.gradient_accumulation_steps
    first_epoch = global_step // updates_per_epoch
    skip_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps
    num_epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"{len(dataset)} images, {num_classes} classes, batch {total_batch}, {args.max_train_steps} steps")

    # 4. Train
    from tqdm.auto import tqdm

    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    last_time, images_seen = time.perf_counter(), 0
    for epoch in range(first_epoch, num_epochs):
        train_dataloader.set_epoch(epoch)
        batches = train_dataloader
        if epoch == first_epoch and skip_batches:
            batches = accelerator.skip_first_batches(train_dataloader, skip_batches)
        for batch in batches:
            if global_step >= args.max_train_steps:
                break
            pixels, labels = batch["pixel_values"], batch["class_labels"]
            if args.random_flip:
                pixels = random_flip(pixels, generator=noise_generator)
            with torch.no_grad():
                if vae is not None:
                    x0 = vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator=noise_generator)
                    x0 = x0.float() * scaling_factor
                else:
                    x0 = pixels
            logs = train_step(x0, labels, global_step)
            images_seen += x0.shape[0]
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)

            # One host sync per step for logging; it also guards against a diverged run.
            values = dict(zip(logs, torch.stack([v.float().cpu() for v in logs.values()]).tolist()))
            # Name the first broken part rather than the total it spoils.
            bad = sorted((k for k, v in values.items() if not math.isfinite(v)), key=lambda k: k.startswith("loss_"))
            if bad:
                kept = list_checkpoints(args.output_dir)
                raise NonFiniteLossError(
                    f"Training stopped at step {global_step}: loss part `{bad[0]}` is {values[bad[0]]}. "
                    f"Nothing was saved for this step; the last checkpoint is {kept[-1] if kept else 'none'}."
                )
            now = time.perf_counter()
            values["images_per_sec"] = images_seen * accelerator.num_processes / (now - last_time)
            values["lr"] = schedulers[0].get_last_lr()[0]
            last_time, images_seen = now, 0
            accelerator.log(values, step=global_step)
            progress.set_postfix(loss_d=f"{values['loss_d']:.3f}", loss_g=f"{values['loss_g']:.3f}")

            if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
                save_checkpoint(accelerator, args.output_dir, global_step, ema, grad_norm, noise_generator,
                                args.checkpoints_total_limit)
            if global_step % args.validation_steps == 0 and accelerator.is_main_process:
                pipeline = AFMPipeline(transformer=ema.model, vae=vae, id2label=id2label)
                pipeline.set_progress_bar_config(disable=True)
                grid = class_grid(pipeline, args.num_validation_classes, args.num_validation_images, args.seed)
                save_grid(grid, os.path.join(args.output_dir, "samples", f"step_{global_step:07d}.png"))
                log_grid(accelerator, grid, global_step)
    progress.close()
    statistic = float(grad_norm.square_avg) if grad_norm is not None else None
    logger.info(f"rank {accelerator.process_index} finished: step {global_step}, grad-norm statistic {statistic!r}",
                main_process_only=False)

    # 5. The pipeline folder
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        grid = save_pipeline(args, accelerator, ema, discriminator, vae, id2label, num_classes, global_step)
        log_grid(accelerator, grid, global_step)
        logger.info(f"Saved the AFMPipeline to {args.output_dir}")
        if args.push_to_hub:
            from huggingface_hub import create_repo, upload_folder

            repo_id = create_repo(args.hub_model_id, exist_ok=True, token=args.hub_token).repo_id
            upload_folder(repo_id=repo_id, folder_path=args.output_dir, token=args.hub_token,
                          ignore_patterns=["checkpoint-*", ".*", f"{args.logging_dir}/*"],
                          commit_message=f"AFM training, step {global_step}")
    accelerator.end_training()
    return args.output_dir


if __name__ == "__main__":
    try:
        arguments = parse_args()
    except ValueError as err:  # a bad flag: say which, before any work is done
        sys.exit(f"error: {err}")
    train(arguments)
