"""The command line the example trainers share: flag groups, `--config FILE`, `--dry_run`, the Accelerator.

`train_afm.py` (the generator and discriminator) and `train_afm_classifier.py` (the guidance
classifier) take the same data, run, config and model-size flags, and turn them into the same
Accelerate setup; each of those is written here once. Everything else they do is a library call.

Config files are JSON objects keyed by flag names without dashes (`"learning_rate": 1e-4`); keys
that start with `_` are comments. A config supplies flag values that the command line overrides:
each key is turned into the flag it names (`--learning_rate=0.0001`, `--grad_norm` /
`--no-grad_norm`) and parsed by the trainer's own parser, so a config value means exactly what the
flag means, and a bad one is an error naming the file and the key.
"""

import argparse
import difflib
import json
import logging
import os
import sys
from typing import Callable, Dict, List, Optional

import torch

from diffusers_afm.data import DEFAULT_VAE, EMBEDDED_DIGITS, is_embedded_digits, read_cache_info
from diffusers_afm.models.transformer_afm import AFM_PRESETS, preset_config

logger = logging.getLogger(__name__)

# Trunk keys a model JSON (`--model_config FILE`) may set; the data and the AFM flags decide the rest.
TRUNK_KEYS = ("patch_size", "num_layers", "num_attention_heads", "attention_head_dim", "mlp_ratio")
# The trunk of the embedded digits default: small enough to train on a CPU in minutes.
DIGITS_MODEL = dict(patch_size=2, num_layers=4, num_attention_heads=4, attention_head_dim=32, mlp_ratio=4.0)
# Flags that steer the command rather than the run: never read from a config, never printed.
NOT_SETTINGS = ("config", "dry_run", "hub_token")


def flag_error(flag: str, value, allowed: str) -> ValueError:
    return ValueError(f"`--{flag}` got {value!r}; allowed: {allowed}.")


# ----------------------------------------------------------------------------- the parser and config files
class TrainingArgumentParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose `parse_args` reads `--config FILE` first (command-line flags win)."""

    _config_context: Optional[str] = None

    def error(self, message: str):
        # While a config value is parsed, a bad value is the config's error, not the command line's.
        if self._config_context is not None:
            raise ValueError(f"{self._config_context}: {message}")
        super().error(message)

    def defaults(self) -> Dict:
        """Every setting's default, keyed by its name without dashes (steering flags left out)."""
        values = vars(super().parse_args([]))
        return {k: v for k, v in values.items() if k not in NOT_SETTINGS}

    def _takes_no_value(self, key: str) -> bool:
        """A switch (`--grad_norm`, `--gradient_checkpointing`) rather than a flag with a value."""
        self._config_context = "probe"
        try:
            super().parse_known_args([f"--{key}"])
            return True
        except ValueError:
            return False
        finally:
            self._config_context = None

    def config_arguments(self, path: str) -> List[str]:
        """The command-line tokens that a JSON config file stands for, each key checked on its own."""
        if not os.path.isfile(path):
            raise ValueError(f"`--config`: {path!r} is not a file.")
        with open(path) as f:
            try:
                config = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"`--config`: {path!r} is not valid JSON: {err}.") from None
        if not isinstance(config, dict):
            raise ValueError(f"`--config`: {path!r} must hold one JSON object of flag values.")
        defaults = self.defaults()
        tokens = []
        for key, value in config.items():
            if key.startswith("_"):  # a comment
                continue
            where = f"config {path!r}, key {key!r}"
            if key not in defaults:
                close = difflib.get_close_matches(key, list(defaults), n=3)
                hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise ValueError(f"config {path!r}: unknown key {key!r}; keys are flag names without dashes.{hint}")
            if value is None:
                # null means "not set", which only flags without a default value can be.
                if defaults[key] is not None:
                    raise ValueError(f"{where}: null is only allowed for flags that are unset by default; give a value.")
                continue
            if isinstance(value, (dict, list)):
                raise ValueError(f"{where}: expected a single value, got {value!r}.")
            if self._takes_no_value(key):
                if not isinstance(value, bool):
                    raise ValueError(f"{where}: expected true or false, got {value!r}.")
                # `--no-KEY` exists for the switches that can be on by default (BooleanOptionalAction).
                token = [f"--{key}"] if value else ([] if defaults[key] is False else [f"--no-{key}"])
            elif isinstance(value, bool):
                raise ValueError(f"{where}: expected a value for `--{key}`, got {value!r}.")
            else:
                token = [f"--{key}={value}"]
            self._config_context = where
            try:
                super().parse_known_args(token)  # the flag's own type and choices check the value
            finally:
                self._config_context = None
            tokens += token
        return tokens

    def parse_args(self, args: Optional[List[str]] = None, namespace=None):
        argv = list(sys.argv[1:] if args is None else args)
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", default=None)
        known, _ = pre.parse_known_args(argv)
        tokens = self.config_arguments(known.config) if known.config is not None else []
        return super().parse_args(tokens + argv, namespace)


def resolved_settings(args: argparse.Namespace, parser: TrainingArgumentParser) -> Dict:
    """Every flag's resolved value, keyed by its name without dashes; itself a valid config file.

    `nfe` is written as `"any"` for an any-step model, as on the command line.
    """
    settings = {key: getattr(args, key) for key in parser.defaults()}
    if "nfe" in settings and settings["nfe"] is None:
        settings["nfe"] = "any"
    return settings


def print_settings(settings: Dict) -> None:
    print(json.dumps(settings, indent=2, sort_keys=True))


def main(parse_args: Callable, settings: Callable, train: Callable, argv: Optional[List[str]] = None):
    """Parse, then either print the resolved settings (`--dry_run`) or train."""
    args = parse_args(argv)
    if args.dry_run:
        print_settings(settings(args))
        return None
    return train(args)


def run(parse_args: Callable, settings: Callable, train: Callable) -> None:
    """A trainer's `__main__`: a bad flag or config is one line on stderr, before any work is done."""
    try:
        args = parse_args()
    except ValueError as err:
        sys.exit(f"error: {err}")
    if args.dry_run:
        print_settings(settings(args))
        sys.exit(0)
    train(args)


# ----------------------------------------------------------------------------- flag groups
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
    return args.latent_cache is None and is_embedded_digits(args.dataset_name, args.train_data_dir)


def apply_defaults(args: argparse.Namespace, defaults: Dict) -> None:
    """Fill every flag still `None`: `--vae` and `--resolution` from the latent cache (when training
    from one), then the rest from `defaults` (the digits' or the paper's)."""
    info = read_cache_info(args.latent_cache) if args.latent_cache is not None else None
    if info is not None:
        args.vae = info["vae"] if args.vae is None else args.vae
        args.resolution = info["resolution"] if args.resolution is None else args.resolution
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def training_data_kwargs(args: argparse.Namespace, accelerator) -> Dict:
    """The data flags (`add_data_arguments`) as `diffusers_afm.data.load_training_data` keyword
    arguments, with the VAE on the accelerator's device in the dtype of its mixed precision."""
    return dict(
        dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name,
        train_data_dir=args.train_data_dir, cache_dir=args.cache_dir, image_column=args.image_column,
        label_column=args.label_column, num_classes=args.num_classes, resolution=args.resolution,
        center_crop=args.center_crop, random_flip=args.random_flip, vae=args.vae,
        vae_scaling_factor=args.vae_scaling_factor, latent_cache=args.latent_cache,
        train_batch_size=args.train_batch_size, dataloader_num_workers=args.dataloader_num_workers, seed=args.seed,
        device=accelerator.device,
        dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32),
    )


# ----------------------------------------------------------------------------- model sizes
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
