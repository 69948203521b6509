#!/usr/bin/env python
"""Post-train a text-to-image Z-Image model with Continuous AFM (Lin et al., 2026) with Accelerate.

    # Z-Image on your captioned images (a folder with a metadata.jsonl of captions)
    accelerate launch examples/train_cafm_t2i.py --pretrained_model_name_or_path Tongyi-MAI/Z-Image \\
        --train_data_dir my_captioned_images --caption_column text --mixed_precision bf16 --output_dir cafm-zimage

    # toy size on a CPU: a tiny random Z-Image and captioned digits, both built locally
    python examples/make_tiny_zimage.py --pipeline_dir tiny-zimage --images_dir captioned-digits
    accelerate launch examples/train_cafm_t2i.py --pretrained_model_name_or_path tiny-zimage \\
        --train_data_dir captioned-digits --caption_column text --resolution 16 --mixed_precision bf16 \\
        --max_train_steps 20 --warmup_steps 4 --output_dir cafm-zimage

The generator is the pipeline's `ZImageTransformer2DModel`, trained as it is; the discriminator is
an `AdversarialFlowZImageDiscriminator` initialised from it, judged by its directional derivative
along `(v, 1)` (docs/cafm.md, "Text-to-image"). Captions are encoded once per batch by the
pipeline's own text encoder, 10% of them dropped to "". Every iteration is ONE step, a D or a G
step: the first `--warmup_steps` are D steps, then N of every N + 1 (`--num_discriminator_steps`);
`--max_train_steps`, `--checkpointing_steps` and `--validation_steps` count those iterations. The
run ends with a complete `ZImagePipeline` folder (the EMA generator with the base model's VAE, text
encoder, tokenizer and scheduler, copied unchanged) that diffusers' `ZImagePipeline.from_pretrained`
loads, the final `discriminator/`, validation images of fixed prompts, and a model card.
"""

import argparse
import json
import os
import shutil

import torch
from accelerate.logging import get_logger

from diffusers_afm.data.captions import DEFAULT_CAPTION_COLUMN, TextToImageBatches, captioned_dataloader, load_captioned_dataset
from diffusers_afm.hub import save_text_to_image_model_card
from diffusers_afm.models.discriminator_zimage import AdversarialFlowZImageDiscriminator
from diffusers_afm.training import ModelEMA
from diffusers_afm.training.cafm import TIME_SAMPLINGS, CAFMObjective
from diffusers_afm.training.cafm_zimage import ZIMAGE_TIME_SHIFT, ZImageCAFMTrainingStep
from diffusers_afm.training.checkpoint import CheckpointIO, check_resume_flag, resolve_resume
from diffusers_afm.training.loop import noise_generator
from diffusers_afm.utils import RunStopped, atomic_directory, replace_path
from training_cli import (
    TrainingArgumentParser,
    add_cafm_arguments,
    add_hub_arguments,
    add_run_arguments,
    cafm_optimizers,
    check_cafm_arguments,
    check_hub_arguments,
    check_run_arguments,
    create_hub_repo,
    flag_error,
    init_trackers,
    log_grid,
    log_weight_sums,
    resolve_train_steps,
    resolved_settings,
    save_grid,
    setup_accelerator,
    train_loop,
    upload_output,
)
import training_cli

logger = get_logger(__name__)

ZIMAGE_MODEL = "ZImageTransformer2DModel"
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
# The reference's recipe (configs/train/cafm/train_cafm_zimage.yaml; docs/method.md): 512 px,
# global batch 1024, G lr 5e-5, D lr 3e-5, AdamW (0, 0.95) with weight decay 0.01, no clipping.
DEFAULTS = dict(resolution=512, train_batch_size=4, max_train_steps=10_000, learning_rate=5e-5,
                discriminator_learning_rate=3e-5, warmup_steps=100, num_discriminator_steps=16,
                checkpointing_steps=500, validation_steps=500)


def build_parser() -> argparse.ArgumentParser:
    p = TrainingArgumentParser(description="Post-train a text-to-image Z-Image model with Continuous AFM.")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="Required. A ZImagePipeline folder or Hub id (Tongyi-MAI/Z-Image): its transformer is post-trained, "
                        "its VAE and text encoder prepare the data.")
    p.add_argument("--discriminator", default=None,
                   help="Start from this discriminator folder (a run's discriminator/) instead of one initialised from the generator.")
    # Data (diffusers' text-to-image flags)
    p.add_argument("--dataset_name", default=None, help="A Hub dataset with image and caption columns, or a local imagefolder.")
    p.add_argument("--dataset_config_name", default=None, help="The Hub dataset's configuration, if it has several.")
    p.add_argument("--train_data_dir", default=None,
                   help="A local folder of images with a metadata.jsonl giving each file_name its caption.")
    p.add_argument("--cache_dir", default=None, help="The `datasets` cache folder.")
    p.add_argument("--image_column", default="image", help="The dataset's image column.")
    p.add_argument("--caption_column", default=DEFAULT_CAPTION_COLUMN, help="The dataset's caption column.")
    p.add_argument("--max_train_samples", type=int, default=None, help="Train on this many images (a fixed random subset).")
    p.add_argument("--resolution", type=int, default=None,
                   help="Image side (shorter side resized, square crop); a multiple of 16 for Z-Image's VAE and patches. Default 512.")
    p.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=True, help="Center (else random) crops.")
    p.add_argument("--random_flip", action="store_true", help="Random horizontal flips (off: text may name sides).")
    p.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")
    p.add_argument("--caption_dropout", type=float, default=0.1, help="Probability of training a caption as \"\" (the reference's 0.1).")
    p.add_argument("--max_sequence_length", type=int, default=512, help="Tokens per caption (Z-Image's 512).")
    # Objective and optimisation (docs/method.md, "Continuous AFM: text-to-image")
    add_cafm_arguments(p, warmup="100", learning_rate_help="The generator's AdamW lr (5e-5).", weight_decay=0.01,
                       discriminator_learning_rate_help="The discriminator's AdamW lr (3e-5).", max_grad_norm=None,
                       max_grad_norm_help="Gradient clipping of both (default: none, as the reference).")
    p.add_argument("--time_sampling", choices=TIME_SAMPLINGS, default="uniform", help="How training times are drawn (before the shift).")
    p.add_argument("--timestep_shift", type=float, default=None,
                   help=f"The times' shift (default: the pipeline scheduler's `shift`, {ZIMAGE_TIME_SHIFT} for Z-Image).")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="Recompute activations block by block in the backward pass, both networks (the JVP included).")
    # Validation
    p.add_argument("--validation_prompt", action="append", default=None,
                   help="A prompt to sample at every --validation_steps and at the end (repeat the flag for more).")
    p.add_argument("--validation_steps", type=int, default=None, help="Sample the validation prompts every N steps (500).")
    p.add_argument("--validation_inference_steps", type=int, default=50, help="ZImagePipeline steps for validation images.")
    p.add_argument("--validation_guidance_scale", type=float, default=4.0, help="ZImagePipeline guidance for validation images.")
    add_run_arguments(p, output_dir="cafm-zimage", tracker_project_name="train_cafm_t2i")
    add_hub_arguments(p)
    return p


def read_pipeline(path: str) -> dict:
    """The pipeline's model_index.json, checked to be a Z-Image flow-matching pipeline before anything loads."""
    index_file = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_file):
        raise flag_error("pretrained_model_name_or_path", path, "a ZImagePipeline folder (with model_index.json) or its Hub id")
    with open(index_file, encoding="utf-8") as f:
        index = json.load(f)
    with open(os.path.join(path, "transformer", "config.json"), encoding="utf-8") as f:
        transformer = json.load(f)
    if transformer.get("_class_name") != ZIMAGE_MODEL:
        raise flag_error("pretrained_model_name_or_path", path,
                         f"a Z-Image flow-matching pipeline (transformer {ZIMAGE_MODEL}); its transformer is a "
                         f"{transformer.get('_class_name')!r}")
    scheduler = index.get("scheduler", [None, None])[1]
    if scheduler != "FlowMatchEulerDiscreteScheduler":
        raise flag_error("pretrained_model_name_or_path", path,
                         f"a flow-matching pipeline (FlowMatchEulerDiscreteScheduler); it has {scheduler!r}")
    missing = [c for c in COMPONENTS if c not in index]
    if missing:
        raise flag_error("pretrained_model_name_or_path", path, f"a complete ZImagePipeline; it lacks {missing}")
    return {"index": index, "transformer": transformer}


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.pretrained_model_name_or_path is None:
        raise ValueError("`--pretrained_model_name_or_path` is required: the ZImagePipeline to post-train (Tongyi-MAI/Z-Image, "
                         "or a folder; examples/make_tiny_zimage.py builds a tiny one).")
    for key, value in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dataset_name is None and args.train_data_dir is None:
        raise ValueError("Give `--train_data_dir` (images with a metadata.jsonl of captions) or `--dataset_name`.")
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        raise flag_error("train_data_dir", args.train_data_dir, "a folder of images with a metadata.jsonl of captions")
    args.pretrained_folder = training_cli.pretrained_folder(
        args.pretrained_model_name_or_path, "a ZImagePipeline folder",
        ["*.json", "*.txt", "*.jinja", "*.model", "*.safetensors", "README.md"])
    args.pretrained = read_pipeline(args.pretrained_folder)
    check_run_arguments(args)
    if args.resolution % 16:
        raise flag_error("resolution", args.resolution, "a multiple of 16 (Z-Image's VAE downsamples 8x, then 2x2 patches)")
    check_cafm_arguments(args)
    for flag in ("validation_steps", "validation_inference_steps", "max_sequence_length"):
        if getattr(args, flag) <= 0:
            raise flag_error(flag, getattr(args, flag), "a number > 0")
    if not 0 <= args.caption_dropout < 1:
        raise flag_error("caption_dropout", args.caption_dropout, "a number in [0, 1)")
    if args.timestep_shift is not None and args.timestep_shift <= 0:
        raise flag_error("timestep_shift", args.timestep_shift, "a number > 0")
    if args.discriminator is not None and not os.path.isfile(os.path.join(args.discriminator, "config.json")):
        raise flag_error("discriminator", args.discriminator, "a folder written by AdversarialFlowZImageDiscriminator.save_pretrained")
    if args.standalone_hub_files:
        raise flag_error("standalone_hub_files", True, "not with this trainer: its output is a stock ZImagePipeline, "
                         "which diffusers loads without any remote code")
    if args.validation_prompt is None:
        args.validation_prompt = ["a photo of a cat"]
    check_resume_flag(args.resume_from_checkpoint)
    check_hub_arguments(args)
    if not args.dry_run:
        # The columns and every caption are checked now, before the Accelerator or any model exists.
        args.train_dataset = load_captioned_dataset(args.dataset_name, args.train_data_dir, args.image_column,
                                                    args.caption_column, args.dataset_config_name, args.cache_dir)
    return args


def settings(args: argparse.Namespace) -> dict:
    config = {k: v for k, v in args.pretrained["transformer"].items() if not k.startswith("_")}
    return {**resolved_settings(args, build_parser()), "_model": {"generator": {"class": ZIMAGE_MODEL, "config": config}}}


def load_pipeline(args, accelerator):
    """The base ZImagePipeline: the transformer in fp32 (it is trained), the VAE and text encoder frozen
    in the mixed-precision dtype (diffusers' trainers do the same) on this process's device."""
    from diffusers import ZImagePipeline

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    pipeline = ZImagePipeline.from_pretrained(args.pretrained_folder)
    pipeline.transformer.to(torch.float32)
    for frozen in (pipeline.vae, pipeline.text_encoder):
        frozen.requires_grad_(False).eval().to(accelerator.device, dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def scheduler_shift(pipeline) -> float:
    return float(pipeline.scheduler.config.get("shift", ZIMAGE_TIME_SHIFT))


def validation_images(args, accelerator, pipeline, transformer, step: int):
    """The fixed prompts through diffusers' own ZImagePipeline with the EMA transformer, one seeded
    generator: the images a user of the saved folder gets. Returns the grid."""
    from diffusers import ZImagePipeline
    from diffusers.utils import make_image_grid

    sampler = ZImagePipeline(scheduler=pipeline.scheduler, vae=pipeline.vae, text_encoder=pipeline.text_encoder,
                             tokenizer=pipeline.tokenizer, transformer=transformer)
    sampler.set_progress_bar_config(disable=True)
    generator = torch.Generator(accelerator.device).manual_seed(args.seed)
    with torch.no_grad(), accelerator.autocast():
        images = sampler(prompt=list(args.validation_prompt), height=args.resolution, width=args.resolution,
                         num_inference_steps=args.validation_inference_steps, guidance_scale=args.validation_guidance_scale,
                         max_sequence_length=args.max_sequence_length, generator=generator).images
    return make_image_grid(images, rows=1, cols=len(images))


def save_zimage_pipeline(args, accelerator, ema_model, discriminator, base_folder: str, grid, step: int) -> None:
    """The output folder: the EMA transformer and the base model's other components (copied
    unchanged), model_index.json last; the discriminator; the samples and the model card. Each
    part is written to a temporary name and renamed into place."""
    for component in COMPONENTS[1:]:
        with atomic_directory(os.path.join(args.output_dir, component)) as tmp:
            shutil.copytree(os.path.join(base_folder, component), tmp, dirs_exist_ok=True)
    with atomic_directory(os.path.join(args.output_dir, "transformer")) as tmp:
        ema_model.save_pretrained(tmp, safe_serialization=True)
    with atomic_directory(os.path.join(args.output_dir, "discriminator")) as tmp:
        accelerator.unwrap_model(discriminator).save_pretrained(tmp, safe_serialization=True)
    save_grid(grid, os.path.join(args.output_dir, "samples.png"))
    tmp_index = os.path.join(args.output_dir, ".model_index.json.tmp")
    shutil.copyfile(os.path.join(base_folder, "model_index.json"), tmp_index)
    replace_path(tmp_index, os.path.join(args.output_dir, "model_index.json"))
    pretrained = args.pretrained_model_name_or_path
    save_text_to_image_model_card(
        args.output_dir, repo_id=args.hub_model_id, base_model=None if os.path.isdir(pretrained) else pretrained,
        dataset=args.dataset_name or args.train_data_dir, training_settings=settings(args), sample_grid="samples.png",
        description=f"These are the EMA weights after {step} iterations; validation prompts: {args.validation_prompt}.")


def main(argv=None):
    return training_cli.main(parse_args, settings, train, argv)


def train(args: argparse.Namespace) -> str:
    accelerator = setup_accelerator(args)
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        # Said now rather than as a confusing failure later: ModelEMA copies the unwrapped generator,
        # which under FSDP holds only this rank's shard (docs/cafm.md, "Not done").
        raise RunStopped("FSDP is not supported by this trainer yet: the generator's EMA is not sharded. "
                         "Use DDP (the memory plan in docs/cafm.md says what fits).")
    hub_repo_id = create_hub_repo(args) if args.push_to_hub and accelerator.is_main_process else None
    resume_path = resolve_resume(args.output_dir, args.resume_from_checkpoint)
    _, loader = captioned_dataloader(
        args.train_dataset, resolution=args.resolution, train_batch_size=args.train_batch_size,
        caption_column=args.caption_column, image_column=args.image_column, max_train_samples=args.max_train_samples,
        center_crop=args.center_crop, dataloader_num_workers=args.dataloader_num_workers, seed=args.seed)
    resolve_train_steps(args, loader, accelerator.num_processes)

    pipeline = load_pipeline(args, accelerator)
    generator = pipeline.transformer
    if args.discriminator is not None:
        discriminator = AdversarialFlowZImageDiscriminator.from_pretrained(args.discriminator)
    else:
        discriminator = AdversarialFlowZImageDiscriminator.for_transformer(generator)
    if args.gradient_checkpointing:
        generator.enable_gradient_checkpointing()
        discriminator.enable_gradient_checkpointing()
    logger.info(f"generator {generator.num_parameters() / 1e6:.2f}M, discriminator {discriminator.num_parameters() / 1e6:.2f}M parameters")

    optimizer_g, optimizer_d, schedulers = cafm_optimizers(args, accelerator, generator, discriminator)
    generator, discriminator, optimizer_g, optimizer_d, dataloader, *schedulers = accelerator.prepare(
        generator, discriminator, optimizer_g, optimizer_d, loader, *schedulers)
    ema = ModelEMA(generator)
    rng = noise_generator(accelerator, args.seed)
    objective = CAFMObjective(cp_scale=args.cp_scale, ot_scale=args.ot_scale, num_discriminator_steps=args.num_discriminator_steps,
                              warmup=args.warmup_steps, time_sampling=args.time_sampling, class_dropout_prob=0.0)
    shift = args.timestep_shift if args.timestep_shift is not None else scheduler_shift(pipeline)
    step = ZImageCAFMTrainingStep(accelerator, generator, discriminator, optimizer_g, optimizer_d, objective, ema=ema,
                                  ema_decay=args.ema_decay, max_grad_norm_g=args.max_grad_norm,
                                  max_grad_norm_d=args.max_grad_norm, time_shift=shift, noise_generator=rng)
    batches = TextToImageBatches(pipeline, caption_dropout=args.caption_dropout, random_flip=args.random_flip,
                                 max_sequence_length=args.max_sequence_length)
    checkpoints = CheckpointIO(accelerator, ema=ema, noise_generator=rng)
    global_step = 0
    if resume_path is not None:
        global_step = checkpoints.load(resume_path, verify=False)
        logger.info(f"Resumed from {resume_path} at step {global_step}")
    init_trackers(accelerator, args.tracker_project_name, settings(args))

    def validate(at: int) -> None:
        if at % args.validation_steps == 0 and accelerator.is_main_process:
            grid = validation_images(args, accelerator, pipeline, ema.model, at)
            save_grid(grid, os.path.join(args.output_dir, "samples", f"step_{at:07d}.png"))
            log_grid(accelerator, grid, at)

    def postfix(values):
        return {"loss_d": f"{values['loss_d']:.3f}"} if "loss_d" in values else {"loss_g": f"{values['loss_g']:.3f}"}

    global_step = train_loop(args, accelerator, None, dataloader, step, checkpoints, global_step, schedulers, postfix,
                             after_checkpoint=validate, batch_inputs=batches)
    log_weight_sums(accelerator, global_step, generator=generator, discriminator=discriminator)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        grid = validation_images(args, accelerator, pipeline, ema.model, global_step)
        save_zimage_pipeline(args, accelerator, ema.model, discriminator, args.pretrained_folder, grid, global_step)
        logger.info(f"Saved the CAFM post-trained ZImagePipeline to {args.output_dir}")
        if args.push_to_hub:
            upload_output(args, hub_repo_id, f"Continuous AFM post-training, step {global_step}")
    accelerator.end_training()
    return args.output_dir


if __name__ == "__main__":
    training_cli.run(parse_args, settings, train)
