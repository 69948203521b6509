"""Continuous AFM with LoRA adapters: one frozen base, two adapters (docs/cafm.md, "One GPU: LoRA").

CAFM's discriminator starts as a copy of the generator's trunk (`for_flow_model`, `for_transformer`).
With LoRA it need not be a copy at all: the generator is the frozen base plus adapter G, and the
discriminator is the SAME base tensors (shared storage, `tie_shared_weights`) plus adapter D and its
own token and head, which it trains in full. So a 6B model post-trains with one copy of its
weights, and only the adapters, the head and their AdamW states are trained, checkpointed and saved.

- `LoRASettings`: the `--lora_*` flags and their checks (a target that names no layer is an error
  before any work, naming `--lora_target_modules`).
- `add_adapters`: freeze the base, tie the discriminator's trunk to the generator's, inject peft
  LoRA layers (diffusers' own backend) into both, leave the adapters and the head trainable.
- `AdapterEMA`: the generator's EMA over its adapter only; its full model shares the base.
- `register_adapter_checkpoints`: Accelerate's checkpoints hold the trained tensors only.
- `save_lora_weights`: `pytorch_lora_weights.safetensors` in diffusers' layout (`transformer.` keys,
  the adapter config as `lora_adapter_metadata`), which `ZImagePipeline.load_lora_weights` and
  `PeftAdapterMixin.load_lora_adapter` read; `merge_adapter`: the fused model for `--merge_lora`.
"""

import argparse
import copy
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..utils import SettingError, atomic_file, check_setting
from .distributed import is_sharded, unwrap
from .ema import ModelEMA

ADAPTER = "default"  # peft's adapter name; diffusers' saved layout leaves it out of the keys
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' file name (`load_lora_weights` looks for it)
DISCRIMINATOR_WEIGHT_NAME = "discriminator_lora.safetensors"
PREFIX = "transformer"  # the pipeline component the adapter belongs to, as diffusers' keys say
# The attention and MLP projections of the transformer blocks, named as diffusers' LoRA trainers
# name them (`to_q`, `to_k`, `to_v`, `to_out.0`; the feed-forward's linears). Nothing else in these
# models carries these names, so the adapters land in the blocks only (the refiners are Z-Image blocks too).
DEFAULT_TARGET_MODULES = {
    "FlowMatchingTransformer2DModel": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2"),
    "JiTTransformer2DModel": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2"),
    "ZImageTransformer2DModel": ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
}


# ----------------------------------------------------------------------------- settings
@dataclass
class LoRASettings:
    """The adapters of both networks: rank r, scale `lora_alpha / r` (alpha defaults to r: scale 1),
    dropout on the generator's adapter input, and the layers adapted (comma-separated names; a
    layer matches when its name is the entry or ends with `.entry`, peft's rule)."""

    lora_rank: int
    lora_alpha: Optional[float] = None
    lora_dropout: float = 0.0
    lora_target_modules: Optional[str] = None

    def __post_init__(self):
        check_setting(isinstance(self.lora_rank, int) and not isinstance(self.lora_rank, bool) and self.lora_rank >= 1,
                      "lora_rank", self.lora_rank, "an integer >= 1 (leave the flag out to train the full model)")
        check_setting(self.lora_alpha is None or self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "a number > 0")
        check_setting(0.0 <= self.lora_dropout < 1.0, "lora_dropout", self.lora_dropout, "a probability in [0, 1)")
        if self.lora_target_modules is not None:
            check_setting(bool(self.entries()), "lora_target_modules", self.lora_target_modules,
                          "comma-separated layer names, e.g. attn.to_q,attn.to_v")

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)

    def entries(self) -> List[str]:
        return [name.strip() for name in (self.lora_target_modules or "").split(",") if name.strip()]

    def target_modules(self, model: nn.Module) -> List[str]:
        """The flag's entries, or the defaults of `model`'s class (the generator's: both networks
        share its trunk names)."""
        if self.lora_target_modules is not None:
            return self.entries()
        for cls in type(model).__mro__:
            if cls.__name__ in DEFAULT_TARGET_MODULES:
                return list(DEFAULT_TARGET_MODULES[cls.__name__])
        raise SettingError("lora_target_modules", None, f"a list of layer names: {type(model).__name__} has no default")

    def check_targets(self, model: nn.Module, targets: Optional[Sequence[str]] = None) -> None:
        """Every entry (of `targets`, by default `target_modules(model)`) must name at least one linear
        layer of `model` (built on the meta device, say): peft would silently skip an entry that
        matches nothing, and the run would train less than asked."""
        linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        for entry in targets if targets is not None else self.target_modules(model):
            matched = [name for name, module in model.named_modules() if matches_target(name, entry)]
            if not matched:
                examples = ", ".join(sorted({n.split(".", 2)[-1] for n in linears})[:6])
                raise SettingError("lora_target_modules", entry,
                                   f"names of linear layers of {type(model).__name__} (it has none called {entry!r}; "
                                   f"its linear layers include {examples})")
            if not all(isinstance(model.get_submodule(name), nn.Linear) for name in matched):
                raise SettingError("lora_target_modules", entry, "names of linear layers (this one also matches another kind of layer)")

    def peft_config(self, targets: Sequence[str], dropout: Optional[float] = None):
        from peft import LoraConfig

        # `init_lora_weights=True`: A Kaiming-uniform, B zero, so the adapted network starts as the base.
        return LoraConfig(r=self.lora_rank, lora_alpha=self.alpha, target_modules=list(targets),
                          lora_dropout=self.lora_dropout if dropout is None else dropout, init_lora_weights=True)


def matches_target(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def add_lora_arguments(p: argparse.ArgumentParser) -> None:
    """The `--lora_*` flags and `--merge_lora`, the same in every CAFM trainer."""
    p.add_argument("--lora_rank", type=int, default=None,
                   help="Train LoRA adapters of this rank instead of the full networks: the generator and the "
                        "discriminator share one frozen base, each with its own adapter (the discriminator also "
                        "trains its head). Unset: full post-training.")
    p.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha; the adapters are scaled by alpha / rank (default: the rank).")
    p.add_argument("--lora_dropout", type=float, default=0.0,
                   help="Dropout on the generator adapter's input (the discriminator's adapter has none: its JVP is "
                        "vmapped over two tangents, which must see one network).")
    p.add_argument("--lora_target_modules", default=None,
                   help="Comma-separated names of the linear layers to adapt (default: the attention and MLP "
                        "projections of the transformer blocks).")
    p.add_argument("--merge_lora", action="store_true",
                   help="Write the full pipeline with the EMA adapter fused into the base weights, instead of "
                        f"{LORA_WEIGHT_NAME}.")


def lora_settings(flags: Dict) -> Optional[LoRASettings]:
    """The run's `LoRASettings` from its flags, or None for full post-training; a LoRA flag without
    `--lora_rank` is an error naming it."""
    from ..utils import settings_from_flags

    if flags.get("lora_rank") is None:
        for name, unset in (("lora_alpha", None), ("lora_dropout", 0.0), ("lora_target_modules", None), ("merge_lora", False)):
            check_setting(flags.get(name, unset) == unset, name, flags.get(name), "unset without --lora_rank")
        return None
    return settings_from_flags(LoRASettings, flags)


# ----------------------------------------------------------------------------- one base, two adapters
def tie_shared_weights(discriminator: nn.Module, generator: nn.Module) -> int:
    """Make every discriminator parameter that is a copy of the generator's (same name, shape and
    values: what `for_flow_model` / `for_transformer` copied) THE generator's tensor; returns how
    many. The copies are freed: both networks then hold one base."""
    theirs = dict(generator.named_parameters())
    tied = 0
    for name, param in list(discriminator.named_parameters()):
        source = theirs.get(name)
        if source is None or source.shape != param.shape or source.dtype != param.dtype or not torch.equal(source, param):
            continue
        owner_name, _, leaf = name.rpartition(".")
        discriminator.get_submodule(owner_name)._parameters[leaf] = source
        tied += 1
    return tied


def add_adapters(generator: nn.Module, discriminator: nn.Module, settings: LoRASettings) -> Dict[str, int]:
    """Freeze the generator, tie the discriminator's trunk to it, and add adapter G and adapter D.

    Trainable afterwards: the generator's adapter; the discriminator's adapter and every parameter
    of its own (token, head). The discriminator's adapter has no dropout (see `add_lora_arguments`).
    Returns the parameter counts: `base` (held once), `generator_adapter`, `discriminator_adapter`,
    `discriminator_head`, `tied`.
    """
    from peft import inject_adapter_in_model

    targets = settings.target_modules(generator)  # the discriminator's trunk has the generator's names
    settings.check_targets(generator, targets)
    settings.check_targets(discriminator, targets)
    generator.requires_grad_(False)
    tied = tie_shared_weights(discriminator, generator)
    shared = {id(p) for p in generator.parameters()}
    head = [p for p in discriminator.parameters() if id(p) not in shared]
    inject_adapter_in_model(settings.peft_config(targets), generator, adapter_name=ADAPTER)
    inject_adapter_in_model(settings.peft_config(targets, dropout=0.0), discriminator, adapter_name=ADAPTER)
    # peft leaves only adapters trainable; the discriminator's own head and token are trained in full.
    for p in head:
        p.requires_grad_(True)
    base = {id(p): p for p in generator.parameters() if not p.requires_grad}
    return {
        "base": sum(p.numel() for p in base.values()),
        "generator_adapter": sum(p.numel() for p in generator.parameters() if p.requires_grad),
        "discriminator_adapter": sum(p.numel() for n, p in discriminator.named_parameters() if p.requires_grad and ".lora_" in n),
        "discriminator_head": sum(p.numel() for p in head),
        "tied": tied,
    }


def trainable_names(model: nn.Module) -> List[str]:
    return [name for name, p in unwrap(model).named_parameters() if p.requires_grad]


def trainable_parameters(model: nn.Module) -> List[nn.Parameter]:
    """What the optimiser of a LoRA network steps: its adapter (and, for the discriminator, its head)."""
    return [p for p in unwrap(model).parameters() if p.requires_grad]


class TrainedState:
    """The trained tensors of a network by name (the adapter and the head), recorded once when
    training starts: the G step freezes the discriminator for a moment, so `requires_grad` cannot
    say later which tensors are trained."""

    def __init__(self, model: nn.Module):
        self.model = unwrap(model)
        self.names = trainable_names(self.model)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        return {name: params[name].detach() for name in self.names}

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, torch.Tensor], source: str) -> None:
        if set(state) != set(self.names):
            extra, missing = sorted(set(state) - set(self.names)), sorted(set(self.names) - set(state))
            raise ValueError(f"{source} does not hold this run's adapter: "
                             f"{f'it lacks {missing[0]!r}' if missing else f'it has {extra[0]!r}'} "
                             f"({len(missing)} missing, {len(extra)} unexpected); use the --lora_* flags it was trained with")
        params = dict(self.model.named_parameters())
        for name in self.names:
            if params[name].shape != state[name].shape:
                raise ValueError(f"{source}: `{name}` is {tuple(state[name].shape)}, this run's is {tuple(params[name].shape)} "
                                 "(another --lora_rank?)")
            params[name].copy_(state[name])


def register_adapter_checkpoints(accelerator, *models: nn.Module) -> List[TrainedState]:
    """Make `accelerator.save_state` write only the trained tensors of `models` (the adapters and the
    discriminator's head), as `model.safetensors`, `model_1.safetensors` in Accelerate's numbering,
    and `load_state` read them back: the frozen base comes from the pretrained folder every time,
    so it never goes into a checkpoint. Every network Accelerate prepared must be among `models`."""
    states = {id(unwrap(m)): TrainedState(m) for m in models}

    def save(prepared, weights, output_dir):
        for i, model in enumerate(prepared):
            weights[i] = {k: v.contiguous() for k, v in _state_of(states, model).state_dict().items()}

    def load(prepared, input_dir):
        from safetensors.torch import load_file

        for i, model in enumerate(prepared):
            file = os.path.join(input_dir, f"model{'' if i == 0 else f'_{i}'}.safetensors")
            state = _state_of(states, model)
            device = next(iter(state.state_dict().values())).device
            state.load_state_dict({k: v.to(device) for k, v in load_file(file).items()}, file)
        prepared.clear()  # loaded here; Accelerate would load them strictly as whole models

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)
    return list(states.values())


def _state_of(states: Dict[int, TrainedState], model: nn.Module) -> TrainedState:
    state = states.get(id(unwrap(model)))
    if state is None:
        raise ValueError(f"A {type(unwrap(model)).__name__} was prepared without adapters: a LoRA run checkpoints adapters only.")
    return state


class AdapterEMA(ModelEMA):
    """`ModelEMA` of a LoRA generator: the average of its adapter only.

    Its full model is a copy of the generator whose frozen base tensors ARE the generator's (shared,
    not copied) and whose adapter holds the average: validation samples it, the export reads its
    adapter. `state_dict` (the checkpoint's `ema.safetensors`) holds the adapter alone. FSDP is not
    supported (the base would be sharded under the copy)."""

    def __init__(self, model: nn.Module):
        model = unwrap(model)
        if is_sharded(model):
            raise ValueError("LoRA training runs on one process or under DDP; FSDP sharding is not supported.")
        self.sharded = False
        self._names = trainable_names(model)
        # deepcopy's memo maps each frozen tensor to itself: the copy shares the base.
        memo = {id(p): p for p in model.parameters() if not p.requires_grad}
        self._model = copy.deepcopy(model, memo).eval()
        for name, param in self._model.named_parameters():
            if name in self._names:
                param.requires_grad_(False)

    def _tensors(self) -> Dict[str, torch.Tensor]:
        params = dict(self._model.named_parameters())
        return {name: params[name] for name in self._names}

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {name: tensor.detach() for name, tensor in self._tensors().items()}

    @torch.no_grad()
    def load_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> None:
        if set(state_dict) != set(self._names):
            raise KeyError(f"the EMA state is not this run's adapter (it has {len(state_dict)} tensors, the adapter {len(self._names)})")
        for name, tensor in self._tensors().items():
            tensor.copy_(state_dict[name])


# ----------------------------------------------------------------------------- what a run writes
def lora_layers(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter in diffusers' saved layout without its prefix: `...to_q.lora_A.weight` (peft's
    state dict, the adapter name left out), on the CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(unwrap(model), adapter_name=ADAPTER).items()}


def adapter_config(model: nn.Module):
    """The `LoraConfig` peft injected `model`'s adapter with."""
    return unwrap(model).peft_config[ADAPTER]


def adapter_metadata(model: nn.Module) -> Dict:
    """The adapter's `LoraConfig` as JSON, under diffusers' `lora_adapter_metadata` key: without
    it a loader assumes alpha = rank, and a run with another alpha would load at the wrong scale."""
    config = adapter_config(model).to_dict()
    return json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))


def save_lora_weights(folder: str, model: nn.Module, prefix: str = PREFIX) -> str:
    """`folder/pytorch_lora_weights.safetensors` (atomically): the adapter of `model` (the EMA
    generator) with `prefix.` keys and the adapter config in the metadata, the file diffusers'
    `save_lora_weights` writes and `load_lora_weights` / `load_lora_adapter` read. Returns its path."""
    layers = {f"{prefix}.{k}": v for k, v in lora_layers(model).items()}
    config = {f"{prefix}.{k}": v for k, v in adapter_metadata(model).items()}
    return _write_adapter_file(os.path.join(folder, LORA_WEIGHT_NAME), layers, json.dumps(config, indent=2, sort_keys=True))


def save_discriminator_adapter(folder: str, discriminator: nn.Module, names: Sequence[str]) -> str:
    """`folder/discriminator_lora.safetensors` (atomically): the discriminator's trained tensors
    (`names`: its adapter, token and head) by their module names, with the LoRA settings in the
    metadata; `--discriminator <that folder>` continues from it. Returns its path."""
    params = dict(unwrap(discriminator).named_parameters())
    tensors = {name: params[name].detach().to("cpu").contiguous() for name in names}
    return _write_adapter_file(os.path.join(folder, DISCRIMINATOR_WEIGHT_NAME), tensors,
                               json.dumps(adapter_metadata(discriminator), sort_keys=True))


def _write_adapter_file(path: str, tensors: Dict[str, torch.Tensor], config_json: str) -> str:
    """A safetensors file of adapter tensors with their LoRA config under diffusers' metadata key,
    written atomically; returns `path`."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors.torch import save

    with atomic_file(path) as f:
        f.write(save(tensors, metadata={"format": "pt", LORA_ADAPTER_METADATA_KEY: config_json}))
    return path


def discriminator_adapter_file(path: str) -> str:
    """`--discriminator` of a LoRA run: a folder holding `discriminator_lora.safetensors` (a LoRA
    run's output folder), or the file itself; a SettingError naming the flag otherwise."""
    file = path if os.path.isfile(path) else os.path.join(path, DISCRIMINATOR_WEIGHT_NAME)
    if not os.path.isfile(file) or not file.endswith(".safetensors"):
        raise SettingError("discriminator", path, f"with --lora_rank, a LoRA run's output folder (holding {DISCRIMINATOR_WEIGHT_NAME})")
    return file


def load_discriminator_adapter(discriminator: nn.Module, path: str) -> None:
    """Load a `save_discriminator_adapter` file into a discriminator that has its adapter."""
    from safetensors.torch import load_file

    file = discriminator_adapter_file(path)
    state = TrainedState(discriminator)
    device = next(discriminator.parameters()).device
    state.load_state_dict({k: v.to(device) for k, v in load_file(file).items()}, file)


@torch.no_grad()
def merge_adapter(base: nn.Module, adapted: nn.Module) -> nn.Module:
    """`base` (a fresh, full-precision copy of the pretrained generator, on the CPU) with the adapter
    of `adapted` (the EMA generator) fused into its weights: `W + (alpha / r) B A` per layer, the
    LoRA layers removed. Fused from the pretrained weights, not from the training copy, so the
    export never carries the training precision's rounding of the base. Returns `base`."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    inject_adapter_in_model(copy.deepcopy(adapter_config(adapted)), base, adapter_name=ADAPTER)
    layers = {k: v.to(dtype=next(base.parameters()).dtype) for k, v in lora_layers(adapted).items()}
    result = set_peft_model_state_dict(base, layers, adapter_name=ADAPTER)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"The adapter does not fit the base model: {result.unexpected_keys[:3]}")
    for name, module in list(base.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True, adapter_names=[ADAPTER])
            owner_name, _, leaf = name.rpartition(".")
            setattr(base.get_submodule(owner_name) if owner_name else base, leaf, module.get_base_layer())
    if hasattr(base, "peft_config"):
        del base.peft_config
    return base.requires_grad_(False).eval()


__all__ = [
    "DEFAULT_TARGET_MODULES",
    "DISCRIMINATOR_WEIGHT_NAME",
    "LORA_WEIGHT_NAME",
    "AdapterEMA",
    "LoRASettings",
    "TrainedState",
    "add_adapters",
    "add_lora_arguments",
    "discriminator_adapter_file",
    "load_discriminator_adapter",
    "lora_layers",
    "lora_settings",
    "merge_adapter",
    "register_adapter_checkpoints",
    "save_discriminator_adapter",
    "save_lora_weights",
    "tie_shared_weights",
    "trainable_parameters",
]
