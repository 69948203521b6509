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
import importlib.util
import inspect
import json
import logging
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from diffusers_afm.data import DEFAULT_VAE, EMBEDDED_DIGITS, count_local_images, is_embedded_digits, read_cache_info
from diffusers_afm.models.transformer_afm import AFM_PRESETS, AdversarialFlowTransformer2DModel, preset_config
from diffusers_afm.training import recipe
from diffusers_afm.utils import HelpFormatter

logger = logging.getLogger(__name__)

# Trunk keys a model JSON (`--model_config FILE`) may set; the data and the AFM flags decide the rest.
TRUNK_KEYS = ("patch_size", "num_layers", "num_attention_heads", "attention_head_dim", "mlp_ratio")
# The trunk of the embedded digits default: small enough to train on a CPU in minutes.
DIGITS_MODEL = dict(recipe.TINY_TRUNK, patch_size=2)
DEFAULTS_CHOICES = ("auto", "digits", "small", "paper")
# Flags that steer the command rather than the run: never read from a config, never printed.
NOT_SETTINGS = ("config", "dry_run", "hub_token")


def flag_error(flag: str, value, allowed: str) -> ValueError:
    return ValueError(f"`--{flag}` got {value!r}; allowed: {allowed}.")


def did_you_mean(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=3)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


# ----------------------------------------------------------------------------- the parser and config files
def read_json_object(path: str, flag: str, what: str) -> Dict:
    """The JSON object in `path` (given with `--flag`); a clear error when it is not one."""
    with open(path) as f:
        try:
            value = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"`--{flag}`: {path!r} is not valid JSON: {err}.") from None
    if not isinstance(value, dict):
        raise ValueError(f"`--{flag}`: {path!r} must hold one JSON object of {what}.")
    return value


class TrainingArgumentParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose `parse_args` reads `--config FILE` first (command-line flags win)."""

    _config_context: Optional[str] = None

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)  # `--help` shows every default
        self.flags: Dict[str, argparse.Action] = {}  # every long flag name (aliases too) -> its action
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        # Recorded from the Action that add_argument returns, so configs need no argparse internals.
        action = super().add_argument(*args, **kwargs)
        self.flags.update({option[2:]: action for option in action.option_strings if option.startswith("--")})
        return action

    def error(self, message: str):
        # While a config value is parsed, a bad value is the config's error, not the command line's.
        if self._config_context is not None:
            raise ValueError(f"{self._config_context}: {message}")
        super().error(message)

    def defaults(self) -> Dict:
        """Every setting's default, keyed by its name without dashes (steering flags left out)."""
        values = vars(super().parse_args([]))
        return {k: v for k, v in values.items() if k not in NOT_SETTINGS}

    def config_arguments(self, path: str) -> List[str]:
        """The command-line tokens that a JSON config file stands for, each key checked on its own."""
        if not os.path.isfile(path):
            raise ValueError(f"`--config`: {path!r} is not a file.")
        config = read_json_object(path, "config", "flag values")
        defaults = self.defaults()
        # Every long flag name, aliases too (`pretrained_model_name_or_path` is `init_from`), to its setting.
        names = {name: action.dest for name, action in self.flags.items() if action.dest in defaults}
        tokens = []
        for key, value in config.items():
            if key.startswith("_"):  # a comment
                continue
            where = f"config {path!r}, key {key!r}"
            if key not in names:
                raise ValueError(f"config {path!r}: unknown key {key!r}; keys are flag names without dashes."
                                 f"{did_you_mean(key, defaults)}")
            if value is None:
                # null means "not set", which only flags without a default value can be.
                if defaults[names[key]] is not None:
                    raise ValueError(f"{where}: null is only allowed for flags that are unset by default; give a value.")
                continue
            if isinstance(value, (dict, list)):
                raise ValueError(f"{where}: expected a single value, got {value!r}.")
            if self.flags[key].nargs == 0:  # a switch (`--grad_norm`), not a flag with a value
                if not isinstance(value, bool):
                    raise ValueError(f"{where}: expected true or false, got {value!r}.")
                # `--no-KEY` exists for the switches that can be on by default (BooleanOptionalAction).
                token = [f"--{key}"] if value else ([] if defaults[names[key]] is False else [f"--no-{key}"])
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
    """A trainer's `__main__`: a bad flag or config is one line on stderr, before any work is done;
    so are the run's own stops (a damaged checkpoint, a full disk, a diverged loss, unusable data)."""
    from diffusers_afm.training import RunStopped

    try:
        args = parse_args()
    except ValueError as err:
        sys.exit(f"error: {err}")
    if args.dry_run:
        print_settings(settings(args))
        sys.exit(0)
    try:
        train(args)
    except RunStopped as err:
        sys.exit(f"error: {err}")


# ----------------------------------------------------------------------------- flag groups
def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """The data flags both trainers take (defaults: `None` ones are resolved per trainer)."""
    p.add_argument("--dataset_name", default=None,
                   help=f"Hub dataset or local imagefolder; none (or '{EMBEDDED_DIGITS}') = the embedded digits.")
    p.add_argument("--dataset_config_name", default=None, help="The Hub dataset's configuration, if it has several.")
    p.add_argument("--train_data_dir", default=None, help="A local folder of images (imagefolder layout).")
    p.add_argument("--cache_dir", default=None, help="The `datasets` cache folder.")
    p.add_argument("--image_column", default="image", help="The dataset's image column; an error if it has none of that name.")
    p.add_argument("--label_column", default=None,
                   help="The integer class column; an error if the dataset lacks it. Unset: 'label' when the "
                        "dataset has it, else one class (an unconditional model).")
    p.add_argument("--num_classes", type=int, default=None, help="Override the class count read off the data.")
    p.add_argument("--max_train_samples", type=int, default=None,
                   help="Train on this many images, a fixed random subset (by --seed), e.g. for quick runs.")
    p.add_argument("--resolution", type=int, default=None,
                   help="Image side; with a VAE, its latent side (resolution / 8 for the SD-VAE) must be a multiple "
                        "of the patch size. Default: 8 for the digits, 32 for --defaults small, 256 otherwise.")
    p.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=True,
                   help="Center crops (the paper's); --no-center_crop for random crops.")
    p.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=None,
                   help="Random horizontal flips. Default: on, off for the digits (turn them off for any data a mirror changes).")
    p.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes (0: in the main one).")
    p.add_argument("--vae", default=None, help=f"Local folder or Hub id (default {DEFAULT_VAE}; for --defaults small 'none' up to "
                        f"{recipe.SMALL_DATA_PIXEL_MAX_RESOLUTION} px); 'none' = pixel space.")
    p.add_argument("--vae_scaling_factor", type=float, default=None, help="Default: the VAE's config (0.18215).")
    p.add_argument("--latent_cache", default=None,
                   help="A folder written by examples/cache_latents.py: train from it, without the VAE encoder.")
    p.add_argument("--defaults", choices=DEFAULTS_CHOICES, default="auto",
                   help="Which defaults fill the flags you leave unset: 'digits' (the embedded digits), 'small' "
                        "(a model and schedule sized to the data, for a few thousand images; "
                        "docs/training_recipes.md, 'Your own images'), 'paper' (ImageNet 256, the paper's). "
                        "'auto': digits for the embedded digits, small when the images counted in "
                        f"--train_data_dir / --latent_cache / --max_train_samples are at most "
                        f"{recipe.SMALL_DATA_MAX_IMAGES:,}, paper otherwise (a Hub dataset is not counted).")


def add_run_arguments(p: argparse.ArgumentParser, output_dir: str, tracker_project_name: str) -> None:
    """Batch, length, precision, outputs, checkpoints and the config file: the same in both trainers."""
    p.add_argument("--train_batch_size", type=int, default=None, help="Per device. Default: 64 (digits, small data), 32 otherwise.")
    p.add_argument("--max_train_steps", type=int, default=None,
                   help="Optimizer steps; wins over --num_train_epochs. Default: the trainer's (digits or paper).")
    p.add_argument("--num_train_epochs", type=int, default=None,
                   help="Passes over the data; sets --max_train_steps from the epoch length when that is not given.")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Batches per optimizer step.")
    p.add_argument("--lr_scheduler", default="constant", help="A diffusers.optimization scheduler name.")
    p.add_argument("--lr_warmup_steps", type=int, default=0, help="Linear warm-up steps of --lr_scheduler.")
    p.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                   help="Autocast precision. Default: Accelerate's configuration.")
    p.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere and newer GPUs.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the weights, the data order and the noise.")
    p.add_argument("--output_dir", default=output_dir, help="Checkpoints, logs and the final model.")
    p.add_argument("--logging_dir", default="logs", help="Tracker logs, inside --output_dir.")
    p.add_argument("--report_to", default="tensorboard",
                   help="tensorboard, wandb, all, or none; wandb and all need wandb installed.")
    p.add_argument("--tracker_project_name", default=tracker_project_name,
                   help="The project name given to the trackers (accelerator.init_trackers).")
    p.add_argument("--checkpointing_steps", type=int, default=None,
                   help="Save a resumable checkpoint every N steps (and at the end).")
    p.add_argument("--checkpoints_total_limit", type=int, default=None,
                   help="Keep at most this many checkpoints (default: all).")
    p.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest' (the newest checkpoint; an error if it is damaged), 'latest_valid' (the newest "
                        "one that verifies, skipping damaged ones) or a checkpoint folder.")
    p.add_argument("--ddp_timeout", type=int, default=600,
                   help="Seconds a process waits in a collective (all-reduce, barrier) before it gives up, so a "
                        "run whose peer died exits instead of hanging (torch.distributed's timeout).")
    p.add_argument("--config", default=None,
                   help="A JSON file of flag values (keys: flag names without dashes); command-line flags override it.")
    p.add_argument("--dry_run", action="store_true",
                   help="Print the resolved settings as one JSON object and exit before loading any data.")


def add_adamw_arguments(p: argparse.ArgumentParser, beta1: float, beta2: float, weight_decay: float,
                        learning_rate_help: str, networks: str = "") -> None:
    """The AdamW flags; the trainers differ only in their defaults (the paper's for each network)."""
    p.add_argument("--learning_rate", type=float, default=None, help=learning_rate_help)
    p.add_argument("--adam_beta1", type=float, default=beta1, help=f"AdamW beta1{networks}.")
    p.add_argument("--adam_beta2", type=float, default=beta2, help=f"AdamW beta2{networks}.")
    p.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    p.add_argument("--adam_weight_decay", type=float, default=weight_decay, help="AdamW weight decay.")


def check_run_arguments(args: argparse.Namespace) -> None:
    """Value checks of the flags `add_data_arguments` and `add_run_arguments` define."""
    for flag in ("resolution", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "ddp_timeout"):
        if getattr(args, flag) < 1:
            raise flag_error(flag, getattr(args, flag), "an integer >= 1")
    for flag in ("checkpoints_total_limit", "max_train_steps", "num_train_epochs", "max_train_samples"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise flag_error(flag, getattr(args, flag), "an integer >= 1")
    if args.report_to not in ("tensorboard", "wandb", "all", "none"):
        raise flag_error("report_to", args.report_to, "tensorboard, wandb, all or none")
    if args.report_to in ("wandb", "all") and not importable("wandb"):
        raise flag_error("report_to", args.report_to,
                         "tensorboard or none here: wandb is not installed (`pip install wandb` for wandb or all)")


def hub_offline() -> bool:
    """Whether `HF_HUB_OFFLINE` is set (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def importable(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None  # None: import blocked
    return importlib.util.find_spec(module) is not None


def check_model_input(args: argparse.Namespace, patch_size: int) -> None:
    """The model's input side (latent side with a VAE) must be a whole number of patches; checked from
    the flags and the VAE's config file alone, before any data or weights are read."""
    if args.latent_cache is not None:
        vae_downsampling(args.vae)  # the run still loads the VAE, for its decoder: is it there?
        info = read_cache_info(args.latent_cache)
        if info is None:
            return  # check_input_paths names the missing cache
        side, where = info["latent_shape"][-1], f"the latent side of --latent_cache {args.latent_cache}"
    else:
        factor = vae_downsampling(args.vae)
        if args.resolution % factor:
            raise flag_error("resolution", args.resolution, f"a multiple of {factor}, the VAE's downsampling")
        side = args.resolution // factor
        where = "the image side (pixel space)" if factor == 1 else f"the latent side {args.resolution} / {factor}"
    if side % patch_size:
        raise flag_error("resolution", args.resolution,
                         f"a size whose model input side is a multiple of the patch size {patch_size}; "
                         f"{where} is {side}")


def vae_config(vae: str) -> Optional[Dict]:
    """`--vae`'s config.json (a folder, a pipeline folder's vae/, or the Hub cache); None when it is
    not downloaded yet. A Hub VAE that is not cached while offline is an error."""
    path = None
    for folder in (os.path.join(vae, "vae"), vae):
        if os.path.isfile(os.path.join(folder, "config.json")):
            path = os.path.join(folder, "config.json")
            break
    if path is None and not os.path.isdir(vae):
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(vae, "config.json")
        except ValueError:  # not a valid repository id
            cached = None
        if isinstance(cached, str):
            path = cached
        elif hub_offline():
            raise flag_error("vae", vae, "a local VAE folder, one in the Hub cache, or 'none' for pixel space "
                             "(HF_HUB_OFFLINE is set and this VAE is not in the local cache)")
    if path is None:
        if os.path.isdir(vae):
            raise flag_error("vae", vae, "a folder with a VAE config.json (or a pipeline folder with vae/), or 'none'")
        return None
    with open(path) as f:
        return json.load(f)


def vae_downsampling(vae: str) -> int:
    """`--vae`'s spatial downsampling, read from its config: 2 per encoder block but the last (8 for
    the SD-VAE; also assumed for a Hub VAE not downloaded yet, which the data loader checks)."""
    if vae.lower() == "none":
        return 1
    return config_downsampling(vae_config(vae))


def config_downsampling(config: Optional[Dict]) -> int:
    """2 per encoder block but the last; 8 (the SD-VAE family's) for a config not at hand."""
    return 8 if config is None else 2 ** (len(config.get("block_out_channels", [0] * 4)) - 1)


def resolve_train_steps(args: argparse.Namespace, dataloader, num_processes: int) -> None:
    """`--num_train_epochs` -> `--max_train_steps` (as diffusers' trainers: a given max_train_steps wins)."""
    if args.max_train_steps is None:
        batches = math.ceil(len(dataloader) / num_processes)
        args.max_train_steps = args.num_train_epochs * math.ceil(batches / args.gradient_accumulation_steps)
        logger.info(f"--num_train_epochs {args.num_train_epochs}: {args.max_train_steps} steps")


def uses_embedded_digits(args: argparse.Namespace) -> bool:
    return args.latent_cache is None and is_embedded_digits(args.dataset_name, args.train_data_dir)


def local_data_folder(args: argparse.Namespace) -> Optional[str]:
    """The local image folder the run reads (`--train_data_dir`, or a `--dataset_name` that is a
    folder), or None (the digits, a Hub dataset)."""
    folder = args.train_data_dir or args.dataset_name
    return folder if folder is not None and os.path.isdir(folder) else None


def count_training_images(args: argparse.Namespace) -> Optional[int]:
    """The number of images the run will train on, known before loading anything: counted in a local
    folder or read from the latent cache, capped by `--max_train_samples`; None for a Hub dataset."""
    count, folder = None, local_data_folder(args)
    if args.latent_cache is not None:
        info = read_cache_info(args.latent_cache)
        count = info["num_images"] if info is not None else None
    elif folder is not None:
        count = count_local_images(folder)[0]
    if args.max_train_samples is not None:
        count = args.max_train_samples if count is None else min(count, args.max_train_samples)
    return count


def resolve_data_defaults(args: argparse.Namespace, digits, paper, small_schedule: Optional[Dict] = None) -> Dict:
    """Resolve `--defaults` (`auto` becomes the choice it makes, so `--dry_run` shows it) and return
    the flag defaults of that choice; `args.default_trunk` is set to its model trunk.

    `digits` and `paper` are `(flag defaults, trunk)` pairs of the trainer. `small` sizes the run to
    the data (`recipe.small_data_recipe`): the resolution (32), pixel space up to 64 px, the patch size
    from the model's input side, the trunk and schedule from the image count. `small_schedule`
    replaces the recipe's schedule (the classifier trainer has its own).
    """
    count = count_training_images(args)
    if args.defaults == "auto":
        if uses_embedded_digits(args):
            args.defaults = "digits"
        elif count is not None and count <= recipe.SMALL_DATA_MAX_IMAGES:
            args.defaults = "small"
        else:
            args.defaults = "paper"
    if args.defaults in ("digits", "paper"):
        defaults, args.default_trunk = digits if args.defaults == "digits" else paper
        return dict(defaults)
    info = read_cache_info(args.latent_cache) if args.latent_cache is not None else None
    resolution = args.resolution or (info["resolution"] if info else recipe.SMALL_DATA_RESOLUTION)
    vae = args.vae or (info["vae"] if info else
                       "none" if resolution <= recipe.SMALL_DATA_PIXEL_MAX_RESOLUTION else DEFAULT_VAE)
    if info is not None:
        side = info["latent_shape"][-1]
    else:
        try:
            side = resolution // vae_downsampling(vae)
        except ValueError:  # a VAE not at hand: check_model_input says so when the run starts
            side = resolution // 8
    small = recipe.small_data_recipe(count, max(side, 1))
    args.default_trunk = small["trunk"]
    schedule = small["defaults"] if small_schedule is None else small_schedule
    return {**schedule, "resolution": resolution, "vae": vae, "random_flip": True}


def planned_model_inputs(args: argparse.Namespace) -> Dict:
    """The model's `sample_size`, `in_channels` and `num_classes` as far as the flags tell before the
    data is read (what `--dry_run` builds its summary from); `assumed` lists the guesses."""
    assumed = []
    info = read_cache_info(args.latent_cache) if args.latent_cache is not None else None
    if info is not None:
        channels, side = info["latent_shape"][0], info["latent_shape"][-1]
    elif args.vae.lower() == "none":
        channels, side = (1 if uses_embedded_digits(args) else 3), args.resolution
    else:
        try:  # a dry run plans before the VAE is downloaded, perhaps offline
            config = vae_config(args.vae)
        except ValueError:
            config = None
        side, channels = args.resolution // config_downsampling(config), 4
        if config is None:
            assumed.append("the VAE's downsampling (8) and latent channels (4)")
        else:
            channels = config.get("latent_channels", 4)
    num_classes = args.num_classes
    if num_classes is None:
        folder = local_data_folder(args)
        if info is not None:
            num_classes = info["num_classes"]
        elif uses_embedded_digits(args):
            num_classes = 10
        elif folder is not None:
            num_classes = count_local_images(folder)[1]
        else:
            num_classes = 1000
            assumed.append("1000 classes (a Hub dataset's labels are read when it loads)")
    return dict(sample_size=side, in_channels=channels, num_classes=num_classes, assumed=assumed)


def model_summary(**models: torch.nn.Module) -> Dict:
    """Each model's class, config and parameter count, as `--dry_run` prints them."""
    summary = {}
    for name, model in models.items():
        config = {k: v for k, v in model.config.items() if not k.startswith("_")}
        summary[name] = {"class": type(model).__name__, "parameters": model.num_parameters(), "config": config}
    return summary


def apply_defaults(args: argparse.Namespace, defaults: Dict) -> None:
    """Fill every flag still `None`: `--vae` and `--resolution` from the latent cache (when training
    from one), then the rest from `defaults` (the digits' or the paper's)."""
    info = read_cache_info(args.latent_cache) if args.latent_cache is not None else None
    if info is not None:
        args.vae = info["vae"] if args.vae is None else args.vae
        args.resolution = info["resolution"] if args.resolution is None else args.resolution
    for key, value in defaults.items():
        if key == "max_train_steps" and args.num_train_epochs is not None:
            continue  # set from the epoch length once the data is loaded (resolve_train_steps)
        if getattr(args, key) is None:
            setattr(args, key, value)


def training_data_kwargs(args: argparse.Namespace, accelerator) -> Dict:
    """The data flags (`add_data_arguments`) as `diffusers_afm.data.load_training_data` keyword
    arguments, with the VAE on the accelerator's device in the dtype of its mixed precision."""
    return dict(
        dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name,
        train_data_dir=args.train_data_dir, cache_dir=args.cache_dir, image_column=args.image_column,
        label_column=args.label_column, num_classes=args.num_classes, max_train_samples=args.max_train_samples,
        resolution=args.resolution,
        center_crop=args.center_crop, random_flip=args.random_flip, vae=args.vae,
        vae_scaling_factor=args.vae_scaling_factor, latent_cache=args.latent_cache,
        train_batch_size=args.train_batch_size, dataloader_num_workers=args.dataloader_num_workers, seed=args.seed,
        device=accelerator.device,
        dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32),
    )


# ----------------------------------------------------------------------------- model sizes
def trunk_config(spec: Optional[str], fallback: Dict, flag: str = "model_config") -> Dict:
    """A size name (`"B/2"`), a JSON file of trunk keys, or `fallback` when `spec` is None.

    A file's keys are checked: a typo (`"num_layer"`) is an error, not a silent default; keys a file
    leaves out take the model class's defaults.
    """
    if spec is None:
        return dict(fallback)
    if spec in AFM_PRESETS:
        return preset_config(spec)
    if not os.path.isfile(spec):
        raise flag_error(flag, spec, f"one of {', '.join(AFM_PRESETS)} or a JSON file")
    config = read_json_object(spec, flag, "model config keys")
    for key in config:
        if key not in TRUNK_KEYS and not key.startswith("_"):
            raise ValueError(f"`--{flag}` {spec!r}: unknown key {key!r}; the keys are {', '.join(TRUNK_KEYS)} "
                             f"(the data and the other flags set the rest).{did_you_mean(key, TRUNK_KEYS)}")
    return {k: v for k, v in config.items() if k in TRUNK_KEYS}


def check_model_spec(flag: str, spec: Optional[str], fallback: Dict) -> int:
    """`trunk_config` at parse time (the size or file read and checked before anything is loaded);
    returns the model's patch size."""
    trunk = trunk_config(spec, fallback, flag)
    default = inspect.signature(AdversarialFlowTransformer2DModel.__init__).parameters["patch_size"].default
    return trunk.get("patch_size", default)


# ----------------------------------------------------------------------------- accelerate
def setup_accelerator(args: argparse.Namespace):
    """The Accelerator of a run (logging, seeded RNGs, output folder); call first."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration, set_seed

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        # A dead peer turns every collective of the survivors into an error after this long, not a hang.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))],
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.info(accelerator.state)
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    return accelerator


def start_run(args: argparse.Namespace, load_training_data: Callable):
    """What every trainer does first, in this order: the Accelerator, the `--push_to_hub` repository
    (created now, so that a bad token fails before training), the checkpoint to resume (a damaged
    one is an error before any data is loaded), then the data and the VAE (`load_training_data`,
    `diffusers_afm.data`'s, passed by the trainer so that it stays the trainer's name), and
    `--num_train_epochs` turned into steps. Returns `(accelerator, hub_repo_id, resume_path, data)`."""
    from diffusers_afm.training.checkpoint import resolve_resume

    accelerator = setup_accelerator(args)
    push = getattr(args, "push_to_hub", False)
    hub_repo_id = create_hub_repo(args) if push and accelerator.is_main_process else None
    resume_path = resolve_resume(args.output_dir, args.resume_from_checkpoint)
    data = load_training_data(**training_data_kwargs(args, accelerator))
    resolve_train_steps(args, data.dataloader, accelerator.num_processes)
    return accelerator, hub_repo_id, resume_path, data


def train_loop(args: argparse.Namespace, accelerator, data, dataloader, train_step: Callable, checkpoints,
               global_step: int, schedulers=(), postfix: Callable[[Dict[str, float]], Dict[str, str]] = lambda v: {},
               before_checkpoint: Optional[Callable[[int], None]] = None,
               after_checkpoint: Optional[Callable[[int], None]] = None,
               batch_inputs: Optional[Callable] = None) -> int:
    """The loop of every generator trainer: `train_step(*batch_inputs(batch, rng), step)` (by default
    `(x0, class_labels)`; the text-to-image trainer's are latents and text embeddings) from `global_step` to
    `args.max_train_steps`, resuming mid-epoch; one host sync per optimizer step (the logs, and the
    non-finite guard); a checkpoint every `--checkpointing_steps` and at the end. `before_checkpoint`
    and `after_checkpoint(step)` are the trainer's own work around the checkpoint (AFM's autoreload;
    validation grids, evaluation). Returns the final step."""
    from tqdm.auto import tqdm

    from diffusers_afm.training.loop import epoch_batches, host_values

    rng = checkpoints.noise_generator
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    last_time, images_seen = time.perf_counter(), 0
    for batch in epoch_batches(accelerator, dataloader, global_step, args.max_train_steps, args.gradient_accumulation_steps):
        if global_step >= args.max_train_steps:
            break
        inputs = batch_inputs(batch, rng) if batch_inputs is not None else (data.latents(batch, rng), batch["class_labels"])
        logs = train_step(*inputs, global_step)
        for scheduler in schedulers:
            scheduler.step()  # prepared by Accelerate: it steps only when the optimizers did
        images_seen += len(inputs[0])
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        progress.update(1)
        # One host sync per step for logging; it also guards against a diverged run.
        values = host_values(logs, global_step, args.output_dir)
        now = time.perf_counter()
        values["images_per_sec"] = images_seen * accelerator.num_processes / (now - last_time)
        if schedulers:
            values["lr"] = schedulers[0].get_last_lr()[0]
        last_time, images_seen = now, 0
        accelerator.log(values, step=global_step)
        progress.set_postfix(**postfix(values))
        if before_checkpoint is not None:
            before_checkpoint(global_step)
        if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
            checkpoints.save(args.output_dir, global_step, args.checkpoints_total_limit)
        if after_checkpoint is not None:
            after_checkpoint(global_step)
    progress.close()
    return global_step


def init_trackers(accelerator, name: str, settings: Dict) -> None:
    if accelerator.is_main_process:
        config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in settings.items()}
        accelerator.init_trackers(name, config=config)


# ----------------------------------------------------------------------------- the two CAFM networks
def add_cafm_arguments(p: argparse.ArgumentParser, *, warmup: str, learning_rate_help: str, weight_decay: float,
                       discriminator_learning_rate_help: str, max_grad_norm: Optional[float], max_grad_norm_help: str) -> None:
    """The Continuous-AFM objective and optimiser flags both CAFM trainers take; they differ only in
    the reference recipe's defaults (`warmup` names the default warm-up in the help)."""
    p.add_argument("--num_discriminator_steps", type=int, default=None, help="N: D steps per G step after the warm-up (16).")
    p.add_argument("--warmup_steps", type=int, default=None, help=f"Discriminator-only iterations at the start ({warmup}).")
    p.add_argument("--cp_scale", type=float, default=0.001, help="Weight of the logit centering cp * mean D(x_t)^2.")
    p.add_argument("--ot_scale", type=float, default=0.0, help="Weight of mean v_pred^2 in the G loss (0 in the reference).")
    add_adamw_arguments(p, beta1=0.0, beta2=0.95, weight_decay=weight_decay, networks=" of both networks",
                        learning_rate_help=learning_rate_help)
    p.add_argument("--discriminator_learning_rate", type=float, default=None, help=discriminator_learning_rate_help)
    p.add_argument("--max_grad_norm", type=float, default=max_grad_norm, help=max_grad_norm_help)
    p.add_argument("--ema_decay", type=float, default=0.99, help="EMA decay of the generator, after each G update.")


def check_cafm_arguments(args: argparse.Namespace) -> None:
    """Value checks of `add_cafm_arguments`' flags (after the trainer filled its defaults)."""
    for flag in ("learning_rate", "discriminator_learning_rate"):
        if getattr(args, flag) <= 0:
            raise flag_error(flag, getattr(args, flag), "a number > 0")
    if args.max_grad_norm is not None and args.max_grad_norm <= 0:
        raise flag_error("max_grad_norm", args.max_grad_norm, "a number > 0")
    for flag in ("cp_scale", "ot_scale", "adam_weight_decay", "warmup_steps"):
        if getattr(args, flag) < 0:
            raise flag_error(flag, getattr(args, flag), "a number >= 0")
    if args.num_discriminator_steps < 1:
        raise flag_error("num_discriminator_steps", args.num_discriminator_steps, "an integer >= 1")
    if not 0 <= args.ema_decay < 1:
        raise flag_error("ema_decay", args.ema_decay, "a number in [0, 1)")

def cafm_optimizers(args: argparse.Namespace, accelerator, generator, discriminator):
    """AdamW for each CAFM network (`--learning_rate`, `--discriminator_learning_rate`, shared betas,
    eps and weight decay) and one `--lr_scheduler` each. Returns `(optimizer_g, optimizer_d, schedulers)`."""
    import warnings

    from diffusers.optimization import get_scheduler

    from diffusers_afm.training.loop import adamw

    betas, eps, weight_decay = (args.adam_beta1, args.adam_beta2), args.adam_epsilon, args.adam_weight_decay
    optimizer_g = adamw(generator.parameters(), args.learning_rate, betas, eps, weight_decay)
    optimizer_d = adamw(discriminator.parameters(), args.discriminator_learning_rate, betas, eps, weight_decay)
    # Both schedules count iterations (D and G steps alike), so one network's scheduler also steps in
    # the other's iterations; torch warns once about that at the first D step.
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
    schedulers = [
        get_scheduler(args.lr_scheduler, optimizer=opt, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                      num_training_steps=args.max_train_steps * accelerator.num_processes)
        for opt in (optimizer_g, optimizer_d)
    ]
    return optimizer_g, optimizer_d, schedulers


def log_weight_sums(accelerator, step: int, **models) -> None:
    """Each rank's weight sums at the end: under DDP they must be equal (the two-process tests compare them)."""
    sums = {name: sum(p.detach().double().sum().item() for p in accelerator.unwrap_model(model).parameters())
            for name, model in models.items()}
    logger.info(f"rank {accelerator.process_index} finished: step {step}, weight sums {sums}")


# ----------------------------------------------------------------------------- the Hub and outputs
def add_hub_arguments(p: argparse.ArgumentParser) -> None:
    """The Hub flags of diffusers' example trainers, and the standalone code export."""
    p.add_argument("--push_to_hub", action="store_true",
                   help="Upload the final folder to the Hub; the repository is created (and the token checked) at the start.")
    p.add_argument("--hub_model_id", default=None, help="The Hub repository. Default: the --output_dir folder's name.")
    p.add_argument("--hub_private_repo", action="store_true", help="Create the --push_to_hub repository as private.")
    p.add_argument("--hub_token", default=None, help="A Hub token. Default: the one `huggingface-cli login` stored.")
    p.add_argument("--standalone_hub_files", action="store_true",
                   help="Also write self-contained model and pipeline code into the output folder, so that "
                        "DiffusionPipeline.from_pretrained(..., trust_remote_code=True) loads it without diffusers-afm.")


def pretrained_folder(path: str, what: str, allow_patterns: List[str]) -> str:
    """`--pretrained_model_name_or_path`: a local folder as it is; a Hub id downloaded (or found in the
    cache) with the files `allow_patterns` match; a clear error naming `what` is expected otherwise."""
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, allow_patterns=allow_patterns)
    except Exception as err:  # not an id, not on the Hub, offline and not cached, no access
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise flag_error("pretrained_model_name_or_path", path,
                         f"{what}, or a Hub repository id that can be downloaded ({reason})") from None


def upload_output(args: argparse.Namespace, repo_id: str, commit_message: str) -> None:
    """`--push_to_hub`: the output folder without checkpoints, hidden files and tracker logs."""
    from huggingface_hub import upload_folder

    upload_folder(repo_id=repo_id, folder_path=args.output_dir, token=args.hub_token,
                  ignore_patterns=["checkpoint-*", ".*", f"{args.logging_dir}/*"], commit_message=commit_message)


def save_grid(grid, path: str) -> None:
    """A sample grid as a PNG, written atomically."""
    from diffusers_afm.utils import atomic_file

    with atomic_file(path) as f:
        grid.save(f, format="PNG")


def log_grid(accelerator, grid, step: int) -> None:
    """A sample grid to the trackers (tensorboard, wandb)."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"samples": wandb.Image(grid)}, step=step)


def check_hub_arguments(args: argparse.Namespace) -> None:
    """`--hub_model_id` defaults to the output folder's name, as in diffusers' trainers; pushing
    while offline is an error now rather than after training."""
    if not args.push_to_hub:
        return
    if not args.hub_model_id:
        args.hub_model_id = os.path.basename(os.path.normpath(os.path.abspath(args.output_dir)))
    if not args.dry_run and hub_offline():
        raise flag_error("push_to_hub", True, "only with Hub access: HF_HUB_OFFLINE is set")


def create_hub_repo(args: argparse.Namespace) -> str:
    """Create (or find) the `--push_to_hub` repository at the start of a run, so that a bad token or
    id fails now rather than after training. Returns the repository id."""
    from huggingface_hub import create_repo

    try:
        return create_repo(args.hub_model_id, exist_ok=True, private=args.hub_private_repo, token=args.hub_token).repo_id
    except Exception as err:  # huggingface_hub raises HTTP, offline and validation errors
        raise ValueError(f"`--push_to_hub`: cannot create the repository {args.hub_model_id!r} "
                         f"(check --hub_model_id and --hub_token / `huggingface-cli login`): {err}") from None
