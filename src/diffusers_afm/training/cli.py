"""The command line of the example trainers: the parser (with `--config FILE` and `--dry_run`), the
flag groups several trainers share, and how a bad value becomes a one-line error.

Each trainer in `examples/` builds its parser from these groups plus its own flags, fills the
flags it leaves unset from its recipe's defaults, and checks every value by building the library's
settings objects (`RunConfig`, `OptimizerConfig`, `EMAConfig`, `AFMObjective`, `CAFMObjective`,
...) inside `flag_errors()`: each setting has one validator, in the library, and its `SettingError`
becomes an error naming the `--flag`. A flag means the same in every trainer that takes it, and a
trainer that has no use for a flag does not define it (argparse then refuses it).

Config files are JSON objects keyed by flag names without dashes (`"learning_rate": 1e-4`); keys
that start with `_` are comments. A config supplies flag values that the command line overrides:
each key is turned into the flag it names (`--learning_rate=0.0001`, `--grad_norm` /
`--no-grad_norm`) and parsed by the trainer's own parser, so a config value means exactly what the
flag means, and a bad one is an error naming the file and the key. Abbreviated flags are refused
(`--max_train_step` is not `--max_train_steps`): a typo never falls back silently.
"""

import argparse
import difflib
import json
import os
import sys
from contextlib import contextmanager
from typing import Callable, Dict, List, Mapping, Optional

from ..data.planning import DEFAULTS_CHOICES
from ..utils import HelpFormatter, SettingError
from .flow_matching import TIME_SAMPLINGS

# Flags that steer the command rather than the run: never read from a config, never printed.
NOT_SETTINGS = ("config", "dry_run", "hub_token")


def flag_error(flag: str, value, allowed: str) -> ValueError:
    end = "" if allowed.endswith((".", "?", "!")) else "."
    return ValueError(f"`--{flag}` got {value!r}; allowed: {allowed}{end}")


def did_you_mean(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=3)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


@contextmanager
def flag_errors(**flags: str):
    """Turn the library's `SettingError`s raised inside the block into errors naming the flag:
    the setting's own name, or `flags[name]` where the flag is called otherwise (say
    `learning_rate="discriminator_learning_rate"` while the discriminator's optimiser is checked)."""
    try:
        yield
    except SettingError as err:
        raise flag_error(flags.get(err.name, err.name), err.value, err.allowed) from None


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


# ----------------------------------------------------------------------------- the parser and config files
class TrainingArgumentParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose `parse_args` reads `--config FILE` first (command-line flags win)
    and that refuses abbreviated flags."""

    _config_context: Optional[str] = None

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)  # `--help` shows every default
        kwargs.setdefault("allow_abbrev", False)
        self.flags: Dict[str, argparse.Action] = {}  # every long flag name (aliases too) -> its action
        super().__init__(*args, **kwargs)
        self.add_argument("--config", default=None,
                          help="A JSON file of flag values (keys: flag names without dashes); command-line flags override it.")
        self.add_argument("--dry_run", action="store_true",
                          help="Print the resolved settings as one JSON object and exit before loading any data.")

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

    def settings(self, values: Mapping) -> Dict:
        """Every setting's resolved value from `values` (a parsed namespace's `vars`), keyed by its
        name without dashes; itself a valid config file. `nfe` is written as `"any"` for an
        any-step model, as on the command line."""
        settings = {key: values[key] for key in self.defaults()}
        if "nfe" in settings and settings["nfe"] is None:
            settings["nfe"] = "any"
        return settings

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
        pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        pre.add_argument("--config", default=None)
        known, _ = pre.parse_known_args(argv)
        tokens = self.config_arguments(known.config) if known.config is not None else []
        return super().parse_args(tokens + argv, namespace)


def model_summary(**models) -> Dict:
    """Each model's class, config and parameter count, as `--dry_run` prints them (build the models
    on the meta device: shapes only, no memory)."""
    return {name: {"class": type(model).__name__, "parameters": model.num_parameters(),
                   "config": {k: v for k, v in model.config.items() if not k.startswith("_")}}
            for name, model in models.items()}


def print_settings(settings: Dict) -> None:
    print(json.dumps(settings, indent=2, sort_keys=True))


def main(parse_args: Callable, settings: Callable, train: Callable, argv: Optional[List[str]] = None):
    """A trainer's `main(argv)`: parse, then either print the resolved settings (`--dry_run`) or train."""
    from .output_dir import release_locks

    args = parse_args(argv)
    if args.dry_run:
        print_settings(settings(args))
        return None
    try:
        return train(args)
    finally:
        release_locks()  # the run is over, however it ended: its output folder is free again


def run_trainer(parse_args: Callable, settings: Callable, train: Callable) -> None:
    """A trainer's `__main__`: a bad flag or config is one line on stderr, before any work is done;
    so are the run's own stops (a damaged checkpoint, a full disk, a diverged loss, unusable data)
    and the input the run finds bad once it reads it (`ValueError`: labels outside the classes, a
    missing column, a model folder that does not fit)."""
    from ..utils import RunStopped

    try:
        args = parse_args()
    except ValueError as err:
        sys.exit(f"error: {err}")
    if args.dry_run:
        print_settings(settings(args))
        sys.exit(0)
    from .output_dir import release_locks

    try:
        train(args)
    except (RunStopped, ValueError) as err:
        sys.exit(f"error: {err}")
    finally:
        release_locks()


# ----------------------------------------------------------------------------- flag groups
def add_image_arguments(p: argparse.ArgumentParser, *, dataset_help: str, train_data_dir_help: str, resolution_help: str,
                        random_flip_default: str) -> None:
    """Where the images come from and how they are cut: the flags of diffusers' example trainers,
    the same in every trainer (the help names what each trainer reads)."""
    p.add_argument("--dataset_name", default=None, help=dataset_help)
    p.add_argument("--dataset_config_name", default=None, help="The Hub dataset's configuration, if it has several.")
    p.add_argument("--train_data_dir", default=None, help=train_data_dir_help)
    p.add_argument("--cache_dir", default=None, help="The `datasets` cache folder.")
    p.add_argument("--image_column", default="image", help="The dataset's image column; an error if it has none of that name.")
    p.add_argument("--max_train_samples", type=int, default=None,
                   help="Train on this many images, a fixed random subset (by --seed), e.g. for quick runs.")
    p.add_argument("--resolution", type=int, default=None, help=resolution_help)
    p.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=True,
                   help="Center crops (the paper's); --no-center_crop for random crops.")
    p.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=None,
                   help=f"Random horizontal flips (--no-random_flip: none). Default: {random_flip_default}.")
    p.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes (0: in the main one).")


def add_data_arguments(p: argparse.ArgumentParser, default_vae: str, small_data_max_images: int,
                       pixel_max_resolution: int) -> None:
    """The data flags of the class-conditional trainers: the images, their labels, the VAE or a latent
    cache, and which defaults fit the data (the digits', a small folder's or the paper's)."""
    add_image_arguments(
        p, dataset_help="Hub dataset or local imagefolder; none (or 'digits') = the embedded digits.",
        train_data_dir_help="A local folder of images (imagefolder layout).",
        resolution_help="Image side; with a VAE, its latent side (resolution / 8 for the SD-VAE) must be a multiple "
                        "of the patch size. Default: 8 for the digits, 32 for --defaults small, 256 otherwise.",
        random_flip_default="on, off for the embedded digits (a mirrored digit is another glyph)",
    )
    p.add_argument("--label_column", default=None,
                   help="The integer class column; an error if the dataset lacks it. Unset: 'label' when the "
                        "dataset has it, else one class (an unconditional model).")
    p.add_argument("--num_classes", type=int, default=None, help="Override the class count read off the data.")
    p.add_argument("--vae", default=None, help=f"Local folder or Hub id (default {default_vae}; for --defaults small 'none' up to "
                        f"{pixel_max_resolution} px); 'none' = pixel space.")
    p.add_argument("--vae_scaling_factor", type=float, default=None, help="Default: the VAE's config (0.18215).")
    p.add_argument("--latent_cache", default=None,
                   help="A folder written by examples/cache_latents.py: train from it, without the VAE encoder.")
    p.add_argument("--defaults", choices=DEFAULTS_CHOICES, default="auto",
                   help="Which defaults fill the flags you leave unset: 'digits' (the embedded digits), 'small' "
                        "(a model and schedule sized to the data, for a few thousand images; "
                        "docs/training_recipes.md, 'Your own images'), 'paper' (ImageNet 256, the paper's). "
                        "'auto': digits for the embedded digits, small when the images counted in "
                        f"--train_data_dir / --latent_cache / --max_train_samples are at most "
                        f"{small_data_max_images:,}, paper otherwise (a Hub dataset is not counted).")


def add_run_arguments(p: argparse.ArgumentParser, output_dir: str, tracker_project_name: str) -> None:
    """Batch, length, precision, outputs, checkpoints and logging (`RunConfig`): the same in every trainer."""
    p.add_argument("--train_batch_size", type=int, default=None, help="Per device. Default: the trainer's recipe's.")
    p.add_argument("--max_train_steps", type=int, default=None,
                   help="Optimizer steps; wins over --num_train_epochs. Default: the trainer's recipe's.")
    p.add_argument("--num_train_epochs", type=int, default=None,
                   help="Passes over the data; sets --max_train_steps from the epoch length when that is not given.")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Batches per optimizer step.")
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
    p.add_argument("--overwrite_output_dir", action="store_true",
                   help="Start afresh in an --output_dir that holds another run's checkpoints or model: remove its "
                        "checkpoints, model, discriminator, samples, model card and logs first (other files are kept). "
                        "Without it such a folder is refused.")
    p.add_argument("--allow_changed_settings", default=None,
                   help="Comma-separated settings a resume may change from those its checkpoint records (e.g. "
                        "train_batch_size); any other difference is refused. --max_train_steps, checkpointing, "
                        "logging, validation and Hub flags may always change.")
    p.add_argument("--ddp_timeout", type=int, default=600,
                   help="Seconds a process waits in a collective (all-reduce, barrier) before it gives up, so a "
                        "run whose peer died exits instead of hanging (torch.distributed's timeout).")


def add_optimizer_arguments(p: argparse.ArgumentParser, *, beta1: float, beta2: float, weight_decay: float,
                            max_grad_norm: Optional[float], learning_rate_help: str, max_grad_norm_help: str,
                            networks: str = "") -> None:
    """The AdamW, clipping and schedule flags (`OptimizerConfig`); trainers differ only in their
    recipe's defaults. `--max_grad_norm 0` turns clipping off in every trainer."""
    p.add_argument("--learning_rate", type=float, default=None, help=learning_rate_help)
    p.add_argument("--adam_beta1", type=float, default=beta1, help=f"AdamW beta1{networks}.")
    p.add_argument("--adam_beta2", type=float, default=beta2, help=f"AdamW beta2{networks}.")
    p.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    p.add_argument("--adam_weight_decay", type=float, default=weight_decay, help="AdamW weight decay.")
    p.add_argument("--max_grad_norm", type=float, default=max_grad_norm,
                   help=f"{max_grad_norm_help} 0 turns clipping off.")
    p.add_argument("--lr_scheduler", default="constant", help="A diffusers.optimization scheduler name.")
    p.add_argument("--lr_warmup_steps", type=int, default=0, help="Linear warm-up steps of --lr_scheduler.")


def add_ema_arguments(p: argparse.ArgumentParser, decay: Optional[float], decay_help: str, warmup: Optional[bool]) -> None:
    """The EMA flags (`EMAConfig`)."""
    p.add_argument("--ema_decay", type=float, default=decay, help=decay_help)
    p.add_argument("--ema_warmup", action=argparse.BooleanOptionalAction, default=warmup,
                   help="Decay min(ema_decay, (1+n)/(10+n)) as diffusers' EMAModel (for short runs).")


def add_cafm_arguments(p: argparse.ArgumentParser, *, warmup: str) -> None:
    """The Continuous-AFM objective flags (`CAFMObjective`; `warmup` names the recipe's warm-up in the help)."""
    p.add_argument("--num_discriminator_steps", type=int, default=None, help="N: D steps per G step after the warm-up (16).")
    p.add_argument("--warmup_steps", type=int, default=None, help=f"Discriminator-only iterations at the start ({warmup}).")
    p.add_argument("--cp_scale", type=float, default=0.001, help="Weight of the logit centering cp * mean D(x_t)^2.")
    p.add_argument("--ot_scale", type=float, default=0.0, help="Weight of mean v_pred^2 in the G loss (0 in the reference).")
    p.add_argument("--discriminator_learning_rate", type=float, default=None, help="The discriminator's AdamW lr.")
    add_time_sampling_argument(p)


def add_time_sampling_argument(p: argparse.ArgumentParser) -> None:
    """How flow matching and CAFM draw their training times (`FlowMatchingObjective.time_sampling`)."""
    p.add_argument("--time_sampling", choices=TIME_SAMPLINGS, default="uniform",
                   help="Distribution of the training times t (1 = noise): uniform (SiT's, CAFM's), logit_normal, "
                        "or logit_normal_jit (JiT's).")


def add_hub_arguments(p: argparse.ArgumentParser, standalone: bool = True) -> None:
    """The Hub flags of diffusers' example trainers, and (`standalone`) the standalone code export."""
    p.add_argument("--push_to_hub", action="store_true",
                   help="Upload the final folder to the Hub; the repository is created (and the token checked) at the start.")
    p.add_argument("--hub_model_id", default=None, help="The Hub repository. Default: the --output_dir folder's name.")
    p.add_argument("--hub_private_repo", action="store_true", help="Create the --push_to_hub repository as private.")
    p.add_argument("--hub_token", default=None, help="A Hub token. Default: the one `huggingface-cli login` stored.")
    if standalone:
        p.add_argument("--standalone_hub_files", action="store_true",
                       help="Also write self-contained model and pipeline code into the output folder, so that "
                            "DiffusionPipeline.from_pretrained(..., trust_remote_code=True) loads it without diffusers-afm.")


def add_validation_arguments(p: argparse.ArgumentParser, solvers: tuple) -> None:
    """The sample grids of the flow-model trainers: the pipeline's ODE solver, steps and guidance."""
    p.add_argument("--validation_steps", type=int, default=None, help="Sample grid of the EMA model every N steps.")
    p.add_argument("--num_validation_classes", type=int, default=10, help="Rows of the sample grids (evenly spaced classes).")
    p.add_argument("--num_validation_images", type=int, default=8, help="Per class (one grid row per class).")
    p.add_argument("--validation_inference_steps", type=int, default=None,
                   help="Solver steps of the validation grids (default: the trainer's).")
    p.add_argument("--validation_solver", choices=solvers, default="euler", help="ODE solver of the validation grids.")
    p.add_argument("--validation_guidance_scale", type=float, default=1.0,
                   help="Classifier-free guidance of the validation grids (1 = none).")


__all__ = [
    "TrainingArgumentParser",
    "add_cafm_arguments",
    "add_data_arguments",
    "add_ema_arguments",
    "add_hub_arguments",
    "add_optimizer_arguments",
    "add_image_arguments",
    "add_run_arguments",
    "add_time_sampling_argument",
    "add_validation_arguments",
    "did_you_mean",
    "flag_error",
    "flag_errors",
    "main",
    "model_summary",
    "read_json_object",
    "run_trainer",
]
