"""What the example trainers share: flags, config files, Accelerate, data, the loop, host-side logs.

`examples/train_afm.py` (the generator and discriminator) and `examples/train_afm_classifier.py`
(the guidance classifier) read the same data the same way (decode, crop, flip with the run's own
random generator, VAE-encode), run under the same Accelerate setup, count steps and resume the
same way (`checkpoint.py`), and take the same `--config FILE` / `--dry_run` flags. Each of those
lives here once.

Config files are JSON objects keyed by flag names without dashes (`"learning_rate": 1e-4`); keys
that start with `_` are comments. A flag given on the command line overrides the file.
"""

import argparse
import difflib
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch

from ..data import (
    EMBEDDED_DIGITS,
    ImageTransform,
    LatentCacheDataset,
    cached_latents,
    collate_latents,
    class_names,
    collate,
    infer_num_classes,
    load_image_dataset,
    prepare_dataset,
    random_flip,
)
from ..models.transformer_afm import AFM_PRESETS, preset_config
from .checkpoint import list_checkpoints

logger = logging.getLogger(__name__)

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
# Trunk keys a model JSON (`--model_config FILE`) may set; the data and the AFM flags decide the rest.
TRUNK_KEYS = ("patch_size", "num_layers", "num_attention_heads", "attention_head_dim", "mlp_ratio")
# The trunk of the embedded digits default: small enough to train on a CPU in minutes.
DIGITS_MODEL = dict(patch_size=2, num_layers=4, num_attention_heads=4, attention_head_dim=32, mlp_ratio=4.0)
# Flags that steer the command rather than the run: never read from a config, never printed.
NOT_SETTINGS = ("config", "dry_run", "hub_token")


class NonFiniteLossError(RuntimeError):
    pass


def flag_error(flag: str, value, allowed: str) -> ValueError:
    return ValueError(f"`--{flag}` got {value!r}; allowed: {allowed}.")


# ----------------------------------------------------------------------------- flags
def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """The data flags both trainers take (defaults: `None` ones are resolved per trainer)."""
    p.add_argument("--dataset_name", default=None,
                   help=f"Hub dataset or local imagefolder; none (or '{EMBEDDED_DIGITS}') = the embedded digits.")
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
    p.add_argument("--latent_cache", default=None,
                   help="A folder written by examples/cache_latents.py: train from it, without the VAE encoder.")


def add_run_arguments(p: argparse.ArgumentParser, output_dir: str) -> None:
    """Batch, length, precision, outputs, checkpoints and the config file: the same in both trainers."""
    p.add_argument("--train_batch_size", type=int, default=None, help="Per device.")
    p.add_argument("--max_train_steps", type=int, default=None)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--lr_scheduler", default="constant")
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None)
    p.add_argument("--allow_tf32", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default=output_dir)
    p.add_argument("--logging_dir", default="logs")
    p.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all, or none.")
    p.add_argument("--checkpointing_steps", type=int, default=None)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder.")
    p.add_argument("--config", default=None,
                   help="A JSON file of flag values (keys: flag names without dashes); command-line flags override it.")
    p.add_argument("--dry_run", action="store_true",
                   help="Print the resolved settings as one JSON object and exit before loading any data.")


def check_run_arguments(args: argparse.Namespace) -> None:
    """Value checks of the flags `add_data_arguments` and `add_run_arguments` define."""
    for flag in ("resolution", "train_batch_size", "max_train_steps", "gradient_accumulation_steps",
                 "checkpointing_steps"):
        if getattr(args, flag) < 1:
            raise flag_error(flag, getattr(args, flag), "an integer >= 1")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise flag_error("checkpoints_total_limit", args.checkpoints_total_limit, "an integer >= 1")
    if args.report_to not in ("tensorboard", "wandb", "all", "none"):
        raise flag_error("report_to", args.report_to, "tensorboard, wandb, all or none")


def uses_embedded_digits(args: argparse.Namespace) -> bool:
    return args.dataset_name in (None, EMBEDDED_DIGITS) and args.train_data_dir is None and args.latent_cache is None


def apply_cache_defaults(args: argparse.Namespace) -> None:
    """With `--latent_cache`, `--vae` and `--resolution` default to what the cache was written with."""
    info_path = os.path.join(args.latent_cache or "", "cache_info.json")
    if args.latent_cache is None or not os.path.isfile(info_path):
        return
    with open(info_path) as f:
        info = json.load(f)
    if args.vae is None:
        args.vae = info["vae"]
    if args.resolution is None:
        args.resolution = info["resolution"]


def apply_defaults(args: argparse.Namespace, defaults: Dict) -> None:
    """Fill every flag still `None` from the latent cache, then from `defaults` (the digits' or the paper's)."""
    apply_cache_defaults(args)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


# ----------------------------------------------------------------------------- config files
def _config_value(action: argparse.Action, key: str, value, path: str):
    """A config value as the flag would have parsed it; a clear error names the file and key."""
    where = f"config {path!r}, key {key!r}"
    if value is None:
        # null means "not set", which only flags without a default value can be.
        if action.default is not None:
            raise ValueError(f"{where}: null is only allowed for flags that are unset by default; give a value.")
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}.")
        return value
    if isinstance(value, (bool, dict, list)):
        raise ValueError(f"{where}: expected a single value, got {value!r}.")
    if action.type is not None:
        try:
            # The flag's own parser, on the value as it would be typed (so "any" and 2 both work for --nfe).
            value = action.type(value if isinstance(value, str) else str(value))
        except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
            raise ValueError(f"{where}: {value!r} is not valid ({err}).") from None
    elif not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {value!r}.")
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{where}: {value!r} is not one of {list(action.choices)}.")
    return value


def load_config(parser: argparse.ArgumentParser, path: str) -> Dict:
    """Read a JSON config file into `{dest: value}` for `parser.set_defaults`."""
    if not os.path.isfile(path):
        raise ValueError(f"`--config`: {path!r} is not a file.")
    with open(path) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"`--config`: {path!r} is not valid JSON: {err}.") from None
    if not isinstance(config, dict):
        raise ValueError(f"`--config`: {path!r} must hold one JSON object of flag values.")
    actions = {a.dest: a for a in parser._actions if a.dest not in NOT_SETTINGS + ("help",)}
    values = {}
    for key, value in config.items():
        if key.startswith("_"):  # a comment
            continue
        if key not in actions:
            close = difflib.get_close_matches(key, list(actions), n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"config {path!r}: unknown key {key!r}; keys are flag names without dashes.{hint}")
        values[key] = _config_value(actions[key], key, value, path)
    return values


def parse_with_config(parser: argparse.ArgumentParser, argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse `argv`; a `--config FILE` in it supplies defaults that the other flags override."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config is not None:
        parser.set_defaults(**load_config(parser, known.config))
    return parser.parse_args(argv)


def resolved_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Dict:
    """Every flag's resolved value, keyed by its name without dashes; itself a valid config file.

    `nfe` is written as `"any"` for an any-step model, as on the command line.
    """
    settings = {}
    for action in parser._actions:
        if action.dest in NOT_SETTINGS + ("help",):
            continue
        value = getattr(args, action.dest)
        if action.dest == "nfe" and value is None:
            value = "any"
        settings[action.dest] = value
    return settings


def print_settings(settings: Dict) -> None:
    print(json.dumps(settings, indent=2, sort_keys=True))


# ----------------------------------------------------------------------------- models
def trunk_config(spec: Optional[str], fallback: Dict) -> Dict:
    """A size name (`"B/2"`), a JSON file of trunk keys, or `fallback` when `spec` is None."""
    if spec is None:
        return dict(fallback)
    if spec in AFM_PRESETS:
        return preset_config(spec)
    with open(spec) as f:
        config = json.load(f)
    return {k: v for k, v in config.items() if k in TRUNK_KEYS}


def check_model_spec(flag: str, spec: Optional[str]) -> None:
    if spec is not None and spec not in AFM_PRESETS and not os.path.isfile(spec):
        raise flag_error(flag, spec, f"one of {', '.join(AFM_PRESETS)} or a JSON file")


# ----------------------------------------------------------------------------- accelerate
def setup_accelerator(args: argparse.Namespace):
    """The Accelerator of a run (logging, seeded RNGs, output folder); call first."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.info(accelerator.state)
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    return accelerator


def init_trackers(accelerator, name: str, settings: Dict) -> None:
    if accelerator.is_main_process:
        config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in settings.items()}
        accelerator.init_trackers(name, config=config)


def load_vae(spec: str, accelerator):
    """The frozen VAE named by `--vae` (a folder, a pipeline folder, or a Hub id); None for 'none'."""
    if spec.lower() == "none":
        return None
    from diffusers import AutoencoderKL

    subfolder = "vae" if os.path.isdir(os.path.join(spec, "vae")) else None
    vae = AutoencoderKL.from_pretrained(spec, subfolder=subfolder)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    return vae.requires_grad_(False).eval().to(accelerator.device, dtype=dtype)


# ----------------------------------------------------------------------------- data
@dataclass
class TrainingData:
    """The data side of a run: the loader, the classes, and how a batch becomes `x0`."""

    dataset: object
    dataloader: torch.utils.data.DataLoader
    num_classes: int
    id2label: Optional[Dict[int, str]]
    vae: Optional[torch.nn.Module]
    scaling_factor: float
    sample_size: int  # the model's input side (latent side with a VAE)
    in_channels: int
    random_flip: bool
    latent_cache: bool = False

    @torch.no_grad()
    def latents(self, batch: Dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """A batch of the loader -> `x0`. From a latent cache, the flips and the posterior samples are
        drawn from `generator` exactly as `encode` draws them, so both paths train the same way."""
        if self.latent_cache:
            return cached_latents(batch, generator, random_flip=self.random_flip).float() * self.scaling_factor
        return self.encode(batch["pixel_values"], generator)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A batch of images in [-1, 1] -> `x0`: flipped (with the run's generator), VAE-encoded, scaled."""
        if self.random_flip:
            pixels = random_flip(pixels, generator=generator)
        if self.vae is None:
            return pixels
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.sample(generator=generator)
        return latents.float() * self.scaling_factor


def load_cached_training_data(args: argparse.Namespace, accelerator) -> TrainingData:
    """Batches of a latent cache (`examples/cache_latents.py`); the VAE is loaded for its decoder only."""
    cache = LatentCacheDataset(args.latent_cache)
    vae = load_vae(args.vae, accelerator)
    num_classes = args.num_classes or cache.num_classes
    cache.check_compatible(vae, args.resolution, num_classes)
    dataloader = torch.utils.data.DataLoader(
        cache, batch_size=args.train_batch_size, shuffle=True, drop_last=True, collate_fn=collate_latents,
        num_workers=args.dataloader_num_workers, generator=torch.Generator().manual_seed(args.seed),
    )
    if len(dataloader) == 0:
        raise ValueError(f"`--train_batch_size` {args.train_batch_size} is larger than the cache ({len(cache)} images).")
    return TrainingData(
        dataset=cache,
        dataloader=dataloader,
        num_classes=num_classes,
        id2label=cache.id2label,
        vae=vae,
        scaling_factor=args.vae_scaling_factor or vae.config.scaling_factor,
        sample_size=cache.latent_shape[1],
        in_channels=cache.latent_shape[0],
        random_flip=args.random_flip,
        latent_cache=True,
    )


def load_training_data(args: argparse.Namespace, accelerator) -> TrainingData:
    """Load, check and batch the training images; load the VAE. Every label is checked up front."""
    if args.latent_cache is not None:
        return load_cached_training_data(args, accelerator)
    dataset = load_image_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir)
    num_classes = infer_num_classes(dataset, args.label_column, args.num_classes)
    names = class_names(dataset, args.label_column)
    mode = "L" if uses_embedded_digits(args) else "RGB"
    train_dataset = prepare_dataset(dataset, args.image_column, args.label_column,
                                    ImageTransform(args.resolution, args.center_crop, mode))
    dataloader = torch.utils.data.DataLoader(
        train_dataset, batch_size=args.train_batch_size, shuffle=True, drop_last=True, collate_fn=collate,
        num_workers=args.dataloader_num_workers,
        # Its own generator, so that making an iterator never draws from the global RNG.
        generator=torch.Generator().manual_seed(args.seed),
    )
    if len(dataloader) == 0:
        raise ValueError(f"`--train_batch_size` {args.train_batch_size} is larger than the dataset ({len(dataset)} images).")
    vae = load_vae(args.vae, accelerator)
    if vae is not None:
        down = 2 ** (len(vae.config.block_out_channels) - 1)
        sample_size, in_channels = args.resolution // down, vae.config.latent_channels
    else:
        sample_size, in_channels = args.resolution, 1 if mode == "L" else 3
    return TrainingData(
        dataset=dataset,
        dataloader=dataloader,
        num_classes=num_classes,
        id2label={i: n for i, n in enumerate(names)} if names else None,
        vae=vae,
        scaling_factor=args.vae_scaling_factor or (vae.config.scaling_factor if vae is not None else 1.0),
        sample_size=sample_size,
        in_channels=in_channels,
        random_flip=args.random_flip,
    )


# ----------------------------------------------------------------------------- the loop
def epoch_batches(accelerator, dataloader, global_step: int, max_train_steps: int,
                  gradient_accumulation_steps: int) -> Iterator:
    """Every batch from optimizer step `global_step` on, epoch after epoch; the caller stops at the end.

    On resume, the batches of the current epoch already seen are skipped, so a resumed run reads
    exactly the batches an uninterrupted one would.
    """
    updates_per_epoch = len(dataloader) // gradient_accumulation_steps
    first_epoch = global_step // updates_per_epoch
    skip_batches = (global_step % updates_per_epoch) * gradient_accumulation_steps
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)
    for epoch in range(first_epoch, num_epochs):
        dataloader.set_epoch(epoch)
        batches = dataloader
        if epoch == first_epoch and skip_batches:
            batches = accelerator.skip_first_batches(dataloader, skip_batches)
        yield from batches


def host_values(logs: Dict[str, torch.Tensor], step: int, output_dir: str) -> Dict[str, float]:
    """The step's logged tensors as floats (one host sync); stops on a non-finite value, naming it."""
    # Stacked on the device first, so the copy to the host (and the wait for the step) happens once.
    tensors = [v.detach().float() for v in logs.values()]
    device = tensors[0].device
    values = dict(zip(logs, torch.stack([t.to(device) for t in tensors]).cpu().tolist()))
    # Name the first broken part rather than the total it spoils.
    bad = sorted((k for k, v in values.items() if not math.isfinite(v)), key=lambda k: k.startswith("loss_"))
    if bad:
        kept = list_checkpoints(output_dir)
        raise NonFiniteLossError(
            f"Training stopped at step {step}: loss part `{bad[0]}` is {values[bad[0]]}. "
            f"Nothing was saved for this step; the last checkpoint is {kept[-1] if kept else 'none'}."
        )
    return values
