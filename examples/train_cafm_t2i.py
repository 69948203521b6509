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
import warnings

import torch
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from diffusers_afm.data.captions import DEFAULT_CAPTION_COLUMN, TextToImageBatches, captioned_dataloader, load_captioned_dataset
from diffusers_afm.hub import (
    check_push_to_hub,
    create_hub_repo,
    default_hub_model_id,
    download_pretrained,
    lora_snippet,
    save_lora_model_card,
    save_text_to_image_model_card,
    upload_output,
)
from diffusers_afm.models.discriminator_zimage import AdversarialFlowZImageDiscriminator
from diffusers_afm.training import EMAConfig, ModelEMA, OptimizerConfig, RunConfig, cli
from diffusers_afm.training.cafm import CAFMObjective
from diffusers_afm.training.cafm_zimage import ZIMAGE_TIME_SHIFT, ZImageCAFMTrainingStep
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
from diffusers_afm.training.memory import lora_plan_summary, plan_summary, zimage_lora_activations
from diffusers_afm.training.output_dir import check_free_space, start_run
from diffusers_afm.training.loop import Throughput, epoch_batches, host_values, noise_generator
from diffusers_afm.training.run import (
    ValidationConfig,
    init_trackers,
    log_peak_memory,
    log_weight_sums,
    save_validation_grid,
)
from diffusers_afm.utils import (
    SettingError,
    atomic_directory,
    atomic_file,
    check_setting,
    save_image,
    settings_from_flags,
)

logger = get_logger(__name__)

ZIMAGE_MODEL = "ZImageTransformer2DModel"
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
# What a Hub id's download holds: configs, tokenizer files and safetensors weights, never code or pickles.
PRETRAINED_FILES = ("*.json", "*.txt", "*.jinja", "*.model", "*.safetensors", "README.md")
# The reference's recipe (configs/train/cafm/train_cafm_zimage.yaml; docs/method.md): 512 px,
# global batch 1024, G lr 5e-5, D lr 3e-5, AdamW (0, 0.95) with weight decay 0.01, no clipping.
DEFAULTS = dict(resolution=512, train_batch_size=4, max_train_steps=10_000, learning_rate=5e-5,
                discriminator_learning_rate=3e-5, warmup_steps=100, num_discriminator_steps=16,
                checkpointing_steps=500, validation_steps=500, random_flip=False)
# Validation prompts when none are given: the training data's first captions, as many as this.
NUM_DEFAULT_PROMPTS = 2


# ----------------------------------------------------------------------------- 1. flags
def build_parser() -> cli.TrainingArgumentParser:
    p = cli.TrainingArgumentParser(description="Post-train a text-to-image Z-Image model with Continuous AFM.")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="Required. A ZImagePipeline folder or Hub id (Tongyi-MAI/Z-Image): its transformer is post-trained, "
                        "its VAE and text encoder prepare the data.")
    p.add_argument("--discriminator", default=None,
                   help="Start from this discriminator folder (a run's discriminator/) instead of one initialised from the generator.")
    # Data (diffusers' text-to-image flags)
    cli.add_image_arguments(
        p, dataset_help="A Hub dataset with image and caption columns, or a local imagefolder.",
        train_data_dir_help="A local folder of images with a metadata.jsonl giving each file_name its caption.",
        resolution_help="Image side (shorter side resized, square crop); a multiple of 16 for Z-Image's VAE and patches. Default 512.",
        random_flip_default="off (a caption may name the sides)",
    )
    p.add_argument("--caption_column", default=DEFAULT_CAPTION_COLUMN, help="The dataset's caption column.")
    p.add_argument("--caption_dropout", type=float, default=0.1, help="Probability of training a caption as \"\" (the reference's 0.1).")
    p.add_argument("--max_sequence_length", type=int, default=512, help="Tokens per caption (Z-Image's 512).")
    # Objective and optimisation (docs/method.md, "Continuous AFM: text-to-image")
    cli.add_cafm_arguments(p, warmup="100")
    p.add_argument("--timestep_shift", type=float, default=None,
                   help=f"The times' shift (default: the pipeline scheduler's `shift`, {ZIMAGE_TIME_SHIFT} for Z-Image).")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="Recompute activations block by block in the backward pass, both networks (the JVP included).")
    cli.add_optimizer_arguments(p, beta1=0.0, beta2=0.95, weight_decay=0.01, max_grad_norm=0.0, networks=" of both networks",
                                learning_rate_help="The generator's AdamW lr (5e-5).",
                                max_grad_norm_help="Gradient clipping of both (off by default, as in the reference).")
    cli.add_ema_arguments(p, decay=0.99, decay_help="EMA decay of the generator, after each G update.", warmup=False)
    add_lora_arguments(p)  # one frozen base, two adapters: Z-Image on one GPU (docs/cafm.md, "One GPU: LoRA")
    # Validation
    p.add_argument("--validation_prompt", action="append", default=None,
                   help="A prompt to sample at every --validation_steps and at the end (repeat the flag for more). "
                        f"Default: the training data's first {NUM_DEFAULT_PROMPTS} captions.")
    p.add_argument("--validation_steps", type=int, default=None, help="Sample the validation prompts every N steps (500).")
    p.add_argument("--validation_inference_steps", type=int, default=50, help="ZImagePipeline steps for validation images.")
    p.add_argument("--validation_guidance_scale", type=float, default=4.0, help="ZImagePipeline guidance for validation images.")
    cli.add_run_arguments(p, output_dir="cafm-zimage", tracker_project_name="train_cafm_t2i")
    # The output is a stock ZImagePipeline, which diffusers loads without remote code: no standalone export.
    cli.add_hub_arguments(p, standalone=False)
    p.set_defaults(**DEFAULTS)
    return p


def pretrained_folder(name_or_path: str) -> str:
    """`--pretrained_model_name_or_path` on disk: a local folder, or a Hub id's download (done once per process)."""
    return download_pretrained(name_or_path, "a ZImagePipeline folder", PRETRAINED_FILES)


def read_pipeline(path: str) -> dict:
    """The pipeline's model_index.json and transformer config, checked to be a Z-Image flow-matching
    pipeline before anything loads."""
    index_file = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_file):
        raise SettingError("pretrained_model_name_or_path", path, "a ZImagePipeline folder (with model_index.json) or its Hub id")
    with open(index_file, encoding="utf-8") as f:
        index = json.load(f)
    with open(os.path.join(path, "transformer", "config.json"), encoding="utf-8") as f:
        transformer = json.load(f)
    if transformer.get("_class_name") != ZIMAGE_MODEL:
        raise SettingError("pretrained_model_name_or_path", path,
                           f"a Z-Image flow-matching pipeline (transformer {ZIMAGE_MODEL}); its transformer is a "
                           f"{transformer.get('_class_name')!r}")
    scheduler = index.get("scheduler", [None, None])[1]
    if scheduler != "FlowMatchEulerDiscreteScheduler":
        raise SettingError("pretrained_model_name_or_path", path,
                           f"a flow-matching pipeline (FlowMatchEulerDiscreteScheduler); it has {scheduler!r}")
    missing = [c for c in COMPONENTS if c not in index]
    if missing:
        raise SettingError("pretrained_model_name_or_path", path, f"a complete ZImagePipeline; it lacks {missing}")
    return {"index": index, "transformer": transformer}


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.pretrained_model_name_or_path is None:
        raise ValueError("`--pretrained_model_name_or_path` is required: the ZImagePipeline to post-train (Tongyi-MAI/Z-Image, "
                         "or a folder; examples/make_tiny_zimage.py builds a tiny one).")
    if args.dataset_name is None and args.train_data_dir is None:
        raise ValueError("Give `--train_data_dir` (images with a metadata.jsonl of captions) or `--dataset_name`.")
    with cli.flag_errors():
        if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
            raise SettingError("train_data_dir", args.train_data_dir, "a folder of images with a metadata.jsonl of captions")
        read_pipeline(pretrained_folder(args.pretrained_model_name_or_path))
        if args.push_to_hub and not args.hub_model_id:
            args.hub_model_id = default_hub_model_id(args.output_dir)
        # Every value rule lives in the library's settings objects; built here, they check the flags.
        for settings_class in (RunConfig, ValidationConfig, OptimizerConfig, EMAConfig):
            settings_from_flags(settings_class, vars(args))
        settings_from_flags(OptimizerConfig, vars(args), {"learning_rate": "discriminator_learning_rate"})
        cafm_objective(args)
        TextToImageBatches(pipeline=None, caption_dropout=args.caption_dropout, max_sequence_length=args.max_sequence_length)
        check_setting(args.resolution % 16 == 0, "resolution", args.resolution,
                      "a multiple of 16 (Z-Image's VAE downsamples 8x, then 2x2 patches)")
        check_setting(args.timestep_shift is None or args.timestep_shift > 0, "timestep_shift", args.timestep_shift,
                      "a number > 0")
        lora = lora_settings(vars(args))
        if lora is not None:  # every target must name layers of this transformer: checked on its shapes alone
            from diffusers import ZImageTransformer2DModel

            transformer = ZImageTransformer2DModel.load_config(os.path.join(pretrained_folder(args.pretrained_model_name_or_path), "transformer"))
            with torch.device("meta"):
                lora.check_targets(ZImageTransformer2DModel.from_config(transformer))
            if args.discriminator is not None:
                discriminator_adapter_file(args.discriminator)
        elif args.discriminator is not None and not os.path.isfile(os.path.join(args.discriminator, "config.json")):
            raise SettingError("discriminator", args.discriminator,
                               "a folder written by AdversarialFlowZImageDiscriminator.save_pretrained")
        check_resume_flag(args.resume_from_checkpoint)
        check_push_to_hub(args.push_to_hub and not args.dry_run)
        if not args.dry_run:
            # The columns and every caption are checked now, before the Accelerator or any model exists
            # (`train` reads the data again: `datasets` caches it).
            load_captioned_dataset(args.dataset_name, args.train_data_dir, args.image_column, args.caption_column,
                                   args.dataset_config_name, args.cache_dir)
    return args


def cafm_objective(args: argparse.Namespace) -> CAFMObjective:
    # No class dropout: the caption dropout of `TextToImageBatches` plays its part.
    return settings_from_flags(CAFMObjective, {**vars(args), "class_dropout_prob": 0.0}, {"warmup": "warmup_steps"})


def settings(args: argparse.Namespace) -> dict:
    folder = pretrained_folder(args.pretrained_model_name_or_path)
    transformer = read_pipeline(folder)["transformer"]
    config = {k: v for k, v in transformer.items() if not k.startswith("_")}
    model = {"generator": {"class": ZIMAGE_MODEL, "config": config}}
    if args.dry_run:  # what the run's state takes per GPU, under DDP and FSDP2 (the networks' shapes only)
        model["memory_plan"] = memory_plan_of(folder, args.mixed_precision, lora_settings(vars(args)))
    return {**build_parser().settings(vars(args)), "_model": model}


def memory_plan_of(folder: str, mixed_precision, lora=None) -> dict:
    """The plan of post-training the pipeline in `folder`: both networks and the EMA trained or kept in
    float32, the text encoder frozen in the mixed-precision dtype on every GPU; built on the meta device.
    With LoRA: one frozen base, the adapters and D's head trained, the VAE too, and the activations
    of 512 and 1024 px at batch 1 and 4 (measured on one block at toy lengths, extrapolated)."""
    from diffusers import ZImageTransformer2DModel
    from transformers import AutoConfig, AutoModel

    with torch.device("meta"):
        generator = ZImageTransformer2DModel.from_config(ZImageTransformer2DModel.load_config(os.path.join(folder, "transformer")))
        discriminator = AdversarialFlowZImageDiscriminator.for_transformer(generator)
        text_encoder = AutoModel.from_config(AutoConfig.from_pretrained(os.path.join(folder, "text_encoder")))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    if lora is not None:
        from diffusers import AutoencoderKL

        with torch.device("meta"):
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(folder, "vae")))
        frozen = {"text encoder": (text_encoder, dtype), "VAE": (vae, dtype)}
        state = lora_plan_summary(generator, discriminator, lora, frozen=frozen)
        activations = zimage_lora_activations(generator.config, lora, state["GiB per GPU, state (one process, or each DDP process)"],
                                              compute_dtype=dtype)
        return {**state, "with activations": activations}
    return plan_summary({"generator": generator, "discriminator": discriminator}, ema=["generator"],
                        frozen={"text encoder": (text_encoder, dtype)})


def load_pipeline(folder: str, accelerator, dtype: torch.dtype):
    """The base ZImagePipeline: the transformer in fp32 (it is trained), the VAE and text encoder frozen
    in the mixed-precision `dtype` (diffusers' trainers do the same) on this process's device."""
    from diffusers import ZImagePipeline

    pipeline = ZImagePipeline.from_pretrained(folder)
    pipeline.transformer.to(torch.float32)
    for frozen in (pipeline.vae, pipeline.text_encoder):
        frozen.requires_grad_(False).eval().to(accelerator.device, dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def validation_images(args, accelerator, pipeline, transformer, prompts):
    """The prompts through diffusers' own ZImagePipeline with `transformer` (the EMA), one seeded
    generator: the images a user of the saved folder gets. Returns them side by side."""
    from diffusers import ZImagePipeline
    from diffusers.utils import make_image_grid

    sampler = ZImagePipeline(scheduler=pipeline.scheduler, vae=pipeline.vae, text_encoder=pipeline.text_encoder,
                             tokenizer=pipeline.tokenizer, transformer=transformer)
    sampler.set_progress_bar_config(disable=True)
    generator = torch.Generator(accelerator.device).manual_seed(args.seed)
    with torch.no_grad(), accelerator.autocast():
        images = sampler(prompt=list(prompts), height=args.resolution, width=args.resolution,
                         num_inference_steps=args.validation_inference_steps, guidance_scale=args.validation_guidance_scale,
                         max_sequence_length=args.max_sequence_length, generator=generator).images
    return make_image_grid(images, rows=1, cols=len(images))


def save_zimage_pipeline(output_dir: str, ema_model, discriminator, base_folder: str) -> None:
    """The output folder: the EMA transformer and the base model's other components (copied
    unchanged), model_index.json last; the discriminator. Each part is written to a temporary name
    and renamed into place."""
    for component in COMPONENTS[1:]:
        with atomic_directory(os.path.join(output_dir, component)) as tmp:
            shutil.copytree(os.path.join(base_folder, component), tmp, dirs_exist_ok=True)
    with atomic_directory(os.path.join(output_dir, "transformer")) as tmp:
        ema_model.save_pretrained(tmp, safe_serialization=True)
    if discriminator is not None:  # a LoRA run writes its discriminator's adapter instead
        with atomic_directory(os.path.join(output_dir, "discriminator")) as tmp:
            discriminator.save_pretrained(tmp, safe_serialization=True)
    with open(os.path.join(base_folder, "model_index.json"), "rb") as source, \
            atomic_file(os.path.join(output_dir, "model_index.json")) as target:
        shutil.copyfileobj(source, target)


def save_lora_output(args, accelerator, pipeline, ema_model, discriminator, discriminator_names, base_folder, prompts,
                     global_step) -> None:
    """A LoRA run's folder: `pytorch_lora_weights.safetensors` (the EMA adapter, which
    `ZImagePipeline.load_lora_weights` loads), `samples.png` and a LoRA model card, or with
    `--merge_lora` a complete ZImagePipeline whose transformer has the adapter fused into the
    pretrained weights; either way `discriminator_lora.safetensors` (D's adapter and head) beside."""
    from diffusers import ZImageTransformer2DModel

    lora = lora_settings(vars(args))
    pretrained = args.pretrained_model_name_or_path
    description = (f"These are the EMA weights of a rank-{lora.lora_rank} LoRA adapter (alpha {lora.alpha:g}) after "
                   f"{global_step} iterations; validation prompts: {prompts}.")
    if args.merge_lora:
        base = ZImageTransformer2DModel.from_pretrained(base_folder, subfolder="transformer", dtype=torch.float32)
        merged = merge_adapter(base, ema_model).to(accelerator.device)
        grid = validation_images(args, accelerator, pipeline, merged, prompts)
        save_zimage_pipeline(args.output_dir, merged, None, base_folder)
        save_image(grid, os.path.join(args.output_dir, "samples.png"))
        save_text_to_image_model_card(
            args.output_dir, repo_id=args.hub_model_id, base_model=pretrained, dataset=args.dataset_name or args.train_data_dir,
            training_settings=settings(args), sample_grid="samples.png", example_prompt=prompts[0], resolution=args.resolution,
            description=description.replace("weights of", "weights, fused, of"))
    else:
        save_image(validation_images(args, accelerator, pipeline, ema_model, prompts), os.path.join(args.output_dir, "samples.png"))
        save_lora_weights(args.output_dir, ema_model)
        save_lora_model_card(
            args.output_dir, base_model=pretrained, text_to_image=True, repo_id=args.hub_model_id,
            dataset=args.dataset_name or args.train_data_dir, training_settings=settings(args), sample_grid="samples.png",
            snippet=lora_snippet(pretrained, args.hub_model_id or args.output_dir, text_to_image=True,
                                 resolution=args.resolution, example_prompt=prompts[0]),
            description=description)
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

    # 2. The captioned data; the validation prompts (by default the data's first captions)
    dataset = load_captioned_dataset(args.dataset_name, args.train_data_dir, args.image_column, args.caption_column,
                                     args.dataset_config_name, args.cache_dir)
    prompts = args.validation_prompt or [c for c in dataset[args.caption_column] if c][:NUM_DEFAULT_PROMPTS]
    _, loader = captioned_dataloader(
        dataset, resolution=args.resolution, train_batch_size=args.train_batch_size, caption_column=args.caption_column,
        image_column=args.image_column, max_train_samples=args.max_train_samples, center_crop=args.center_crop,
        dataloader_num_workers=args.dataloader_num_workers, seed=args.seed)
    args.max_train_steps = run.total_steps(len(loader), accelerator.num_processes)  # --num_train_epochs, if given

    # 3. The base pipeline: its transformer is the generator, the discriminator starts from it
    folder = pretrained_folder(args.pretrained_model_name_or_path)
    pipeline = load_pipeline(folder, accelerator, run.mixed_precision_dtype)
    generator = pipeline.transformer
    if args.discriminator is not None and args.lora_rank is None:
        discriminator = AdversarialFlowZImageDiscriminator.from_pretrained(args.discriminator)
    else:
        discriminator = AdversarialFlowZImageDiscriminator.for_transformer(generator)
    if args.gradient_checkpointing:
        generator.enable_gradient_checkpointing()
        discriminator.enable_gradient_checkpointing()
    logger.info(f"generator {generator.num_parameters() / 1e6:.2f}M, discriminator {discriminator.num_parameters() / 1e6:.2f}M parameters")
    lora = lora_settings(vars(args))
    if lora is not None:  # one frozen base (the generator's), adapter G, adapter D + D's own head
        counts = add_adapters(generator, discriminator, lora)
        if args.discriminator is not None:
            load_discriminator_adapter(discriminator, args.discriminator)
        logger.info(f"LoRA rank {lora.lora_rank}: trained parameters {counts}")

    # 4. Optimisers and schedules (both count iterations), prepared; the EMA; the step
    # AdamW of each network: the reference's own learning rates, the same betas and decay.
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
    dataloader = accelerator.prepare(loader)
    # Both schedules count iterations, so each network's scheduler also steps in the other's
    # iterations; torch warns about that at the first D step.
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
    ema = ModelEMA(generator) if lora is None else AdapterEMA(generator)  # LoRA: the generator's adapter only
    # LoRA: checkpoints hold the adapters, D's head and their AdamW states, never the base.
    trained = register_adapter_checkpoints(accelerator, generator, discriminator) if lora is not None else None
    rng = noise_generator(accelerator, args.seed)
    shift = args.timestep_shift if args.timestep_shift is not None else float(pipeline.scheduler.config.get("shift", ZIMAGE_TIME_SHIFT))
    train_step = ZImageCAFMTrainingStep(
        accelerator, generator, discriminator, optimizer_g, optimizer_d, cafm_objective(args), ema=ema,
        ema_decay=settings_from_flags(EMAConfig, vars(args)).schedule(), max_grad_norm_g=config_g.max_grad_norm, max_grad_norm_d=config_d.max_grad_norm,
        time_shift=shift, noise_generator=rng,
    )
    text_to_image = TextToImageBatches(pipeline, caption_dropout=args.caption_dropout, random_flip=args.random_flip,
                                       max_sequence_length=args.max_sequence_length)

    # 5. Resume, trackers
    check_free_space(accelerator, args.output_dir, resume_path, trained or [generator, discriminator], [ema])  # room for a checkpoint
    checkpoints = CheckpointIO(accelerator, ema=ema, noise_generator=rng, settings=settings(args))
    global_step = 0
    if resume_path is not None:
        global_step = checkpoints.load(resume_path, verify=False)
        logger.info(f"Resumed from {resume_path} at step {global_step}")
    init_trackers(accelerator, args.tracker_project_name, settings(args))

    # 6. The loop: each iteration is ONE step, a D step or a G step
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    throughput = Throughput(accelerator.num_processes)
    for batch in epoch_batches(accelerator, dataloader, global_step, args.max_train_steps, args.gradient_accumulation_steps):
        if global_step >= args.max_train_steps:
            break
        # Caption dropout, flips and the VAE posterior drawn from the run's generator; captions encoded once.
        latents, text_embeds = text_to_image(batch, rng)
        logs = train_step(latents, text_embeds, global_step)
        for scheduler in schedulers:
            scheduler.step()
        throughput.add(len(latents))
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
                grid = validation_images(args, accelerator, pipeline, ema_model, prompts)
                save_validation_grid(accelerator, grid, args.output_dir, global_step)
    progress.close()
    log_peak_memory(accelerator)
    log_weight_sums(accelerator, global_step, generator=generator, discriminator=discriminator)

    # 7. A stock ZImagePipeline folder (the EMA generator), the discriminator, samples and a model card
    accelerator.wait_for_everyone()
    ema_model, final_discriminator = ema.full_model(accelerator.device), gather_model(discriminator)  # every process
    if accelerator.is_main_process and lora is not None:
        save_lora_output(args, accelerator, pipeline, ema_model, discriminator, trained[1].names, folder, prompts, global_step)
    elif accelerator.is_main_process:
        grid = validation_images(args, accelerator, pipeline, ema_model, prompts)
        save_zimage_pipeline(args.output_dir, ema_model, final_discriminator, folder)
        save_image(grid, os.path.join(args.output_dir, "samples.png"))
        pretrained = args.pretrained_model_name_or_path
        save_text_to_image_model_card(
            args.output_dir, repo_id=args.hub_model_id, base_model=pretrained,
            dataset=args.dataset_name or args.train_data_dir, training_settings=settings(args), sample_grid="samples.png",
            example_prompt=prompts[0], resolution=args.resolution,
            description=f"These are the EMA weights after {global_step} iterations; validation prompts: {prompts}.")
        logger.info(f"Saved the CAFM post-trained ZImagePipeline to {args.output_dir}")
        if args.push_to_hub:
            upload_output(args.output_dir, hub_repo_id, f"Continuous AFM post-training, step {global_step}",
                          args.logging_dir, args.hub_token)
    accelerator.end_training()
    return args.output_dir


if __name__ == "__main__":
    cli.run_trainer(parse_args, settings, train)
