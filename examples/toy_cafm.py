"""Continuous AFM on low-dimensional distributions: does adversarial post-training fix few-step sampling?

A small flow-matching MLP is trained briefly (so that its few-step Euler samples are poor), then
post-trained with the library's `CAFMTrainingStep` (the objective of the image trainer: least
squares on the discriminator's directional derivative, logit centering, N D steps per G step after
a D-only warm-up, EMA). Both are measured at 1, 2, 4 and 8 Euler steps, with the metrics of
examples/toy_afm.py (W2 to fresh data, its noise floor):

    python examples/toy_cafm.py --dataset 8gaussians --output cafm.json --plot cafm.png

benchmarks/toy_cafm_table.py runs the data sets and seeds of docs/toy_experiments.md.
"""

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from accelerate import Accelerator

from diffusers_afm import flow
from diffusers_afm.evaluation.toy import load_toy_dataset, wasserstein1_1d, wasserstein2
from diffusers_afm.models.modules import directional_derivative
from diffusers_afm.training import ModelEMA
from diffusers_afm.training.cafm import CAFMObjective, CAFMTrainingStep
from diffusers_afm.training.flow_matching import FlowMatchingTrainingStep

from toy_afm import EVAL_SEED_OFFSET, NUM_THREADS, ToyMLP, plot_maps

STEP_COUNTS = (1, 2, 4, 8, 32)


@dataclass
class ToyCAFMConfig:
    """Every setting of a toy CAFM run (the defaults are those of docs/toy_experiments.md's table)."""

    dataset: str = "8gaussians"
    seed: int = 0
    # The flow-matching baseline: deliberately brief.
    flow_train_steps: int = 300
    flow_learning_rate: float = 1e-3
    # Post-training (CAFM iterations: each one D or one G step).
    max_train_steps: int = 4000
    learning_rate: float = 1e-4
    discriminator_learning_rate: float = 1e-4
    num_discriminator_steps: int = 4
    warmup: int = 500
    cp_scale: float = 0.001
    ot_scale: float = 0.0
    ema_decay: float = 0.99
    train_batch_size: int = 256
    hidden_size: int = 128
    num_layers: int = 3
    step_counts: List[int] = field(default_factory=lambda: list(STEP_COUNTS))
    eval_samples: Optional[int] = None

    def __post_init__(self):
        for name in ("flow_train_steps", "max_train_steps", "train_batch_size", "num_discriminator_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {getattr(self, name)}.")
        if any(n < 1 for n in self.step_counts):
            raise ValueError(f"`step_counts` must be integers >= 1, got {self.step_counts}.")


# ------------------------------------------------------------------------------------------ models
class ToyVelocity(nn.Module):
    """`v(x, t, c)` for unconditional toy data: an MLP of `(x, t)`; the label is ignored."""

    def __init__(self, dim: int, hidden_size: int, num_layers: int):
        super().__init__()
        self.mlp = ToyMLP(dim + 1, dim, hidden_size, num_layers)

    def forward(self, hidden_states, timestep, class_labels=None) -> torch.Tensor:
        return self.mlp(torch.cat([hidden_states, timestep[:, None].to(hidden_states.dtype)], dim=1))


class ToyFlowDiscriminator(nn.Module):
    """`D(x, c, t)`, one value per sample; with `tangents=(dx, dt)` also its directional derivative,
    through the same `directional_derivative` as the image discriminator."""

    def __init__(self, dim: int, hidden_size: int, num_layers: int):
        super().__init__()
        self.mlp = ToyMLP(dim + 1, 1, hidden_size, num_layers)

    def _value(self, hidden_states, timestep):
        return self.mlp(torch.cat([hidden_states, timestep[:, None].to(hidden_states.dtype)], dim=1))[:, 0]

    def forward(self, hidden_states, class_labels, timestep, tangents=None):
        if tangents is None:
            return self._value(hidden_states, timestep)
        return directional_derivative(self._value, hidden_states, timestep, *tangents)


# ------------------------------------------------------------------------------------------ training
def _data_stream(config: ToyCAFMConfig, dataset, offset: int):
    rng = torch.Generator().manual_seed(config.seed + offset)
    while True:
        yield dataset.sample(config.train_batch_size, rng)


def train_flow(config: ToyCAFMConfig, dataset) -> nn.Module:
    """The brief flow-matching baseline (returns its EMA), through the library's `FlowMatchingTrainingStep`."""
    torch.manual_seed(config.seed)
    model = ToyVelocity(dataset.dim, config.hidden_size, config.num_layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.flow_learning_rate, weight_decay=0.0)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = ModelEMA(model)
    step = FlowMatchingTrainingStep(accelerator, model, optimizer, ema=ema, ema_decay=0.99, max_grad_norm=None,
                                    class_dropout_prob=0.0, noise_generator=torch.Generator().manual_seed(config.seed + 1))
    labels = torch.zeros(config.train_batch_size, dtype=torch.long)
    for i, x0 in zip(range(config.flow_train_steps), _data_stream(config, dataset, 0)):
        step(x0, labels, i)
    return ema.full_model()


def post_train(config: ToyCAFMConfig, dataset, flow_model: nn.Module) -> nn.Module:
    """CAFM post-training of a copy of `flow_model`; returns the EMA generator."""
    torch.manual_seed(config.seed + 2)
    generator = ToyVelocity(dataset.dim, config.hidden_size, config.num_layers)
    generator.load_state_dict(flow_model.state_dict())
    discriminator = ToyFlowDiscriminator(dataset.dim, config.hidden_size, config.num_layers)
    betas = (0.0, 0.95)  # the reference's AdamW
    optimizer_g = torch.optim.AdamW(generator.parameters(), lr=config.learning_rate, betas=betas, weight_decay=0.0)
    optimizer_d = torch.optim.AdamW(discriminator.parameters(), lr=config.discriminator_learning_rate, betas=betas,
                                    weight_decay=0.0)
    accelerator = Accelerator(cpu=True)
    generator, discriminator, optimizer_g, optimizer_d = accelerator.prepare(generator, discriminator, optimizer_g, optimizer_d)
    ema = ModelEMA(generator)
    objective = CAFMObjective(cp_scale=config.cp_scale, ot_scale=config.ot_scale,
                              num_discriminator_steps=config.num_discriminator_steps, warmup=config.warmup,
                              class_dropout_prob=0.0)
    step = CAFMTrainingStep(accelerator, generator, discriminator, optimizer_g, optimizer_d, objective, ema=ema,
                            ema_decay=config.ema_decay, noise_generator=torch.Generator().manual_seed(config.seed + 3))
    labels = torch.zeros(config.train_batch_size, dtype=torch.long)
    for i, x0 in zip(range(config.max_train_steps), _data_stream(config, dataset, 10)):
        step(x0, labels, i)
    return ema.full_model()


# ------------------------------------------------------------------------------------------ metrics
@torch.no_grad()
def sample(model: nn.Module, noise: torch.Tensor, num_steps: int, visited: Optional[list] = None) -> torch.Tensor:
    """Euler sampling with `diffusers_afm.flow.solve_ode` (the pipeline's solver)."""

    def velocity(x, t):
        if visited is not None:
            visited.append(x)
        return model(x, t)

    return flow.solve_ode(velocity, noise, num_steps, "euler")


def evaluate(model: nn.Module, dataset, config: ToyCAFMConfig) -> Dict[str, float]:
    """W2 to fresh data at each step count (and W1 in 1-D), with the floor of a perfect sampler."""
    count = config.eval_samples or (20_000 if dataset.dim == 1 else 2000)
    noise = torch.randn((count, dataset.dim), generator=torch.Generator().manual_seed(config.seed + EVAL_SEED_OFFSET))
    data, reference = dataset.sample(2 * count, torch.Generator().manual_seed(config.seed + EVAL_SEED_OFFSET + 1)).split(count)
    metrics = {"w2_noise_floor": wasserstein2(reference, data)}
    if dataset.dim == 1:
        metrics["w1_noise_floor"] = wasserstein1_1d(reference, data)
    for n in config.step_counts:
        fake = sample(model, noise, n)
        metrics[f"w2_{n}"] = wasserstein2(fake, data)
        if dataset.dim == 1:
            metrics[f"w1_{n}"] = wasserstein1_1d(fake, data)
    return metrics


def run(config: ToyCAFMConfig, dataset=None):
    """The baseline and its post-trained version, both evaluated; returns (models, record)."""
    dataset = load_toy_dataset(config.dataset) if dataset is None else dataset
    started = time.perf_counter()
    baseline = train_flow(config, dataset)
    flow_seconds = time.perf_counter() - started
    post_trained = post_train(config, dataset, baseline)
    cafm_seconds = time.perf_counter() - started - flow_seconds
    record = {
        "config": asdict(config),
        "flow_matching": evaluate(baseline, dataset, config),
        "cafm": evaluate(post_trained, dataset, config),
        "flow_seconds": flow_seconds,
        "cafm_seconds": cafm_seconds,
    }
    return (baseline, post_trained), record


def trajectories(model, noise, num_steps) -> torch.Tensor:
    visited = []
    final = sample(model, noise, num_steps, visited)
    return torch.stack(visited + [final])


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    defaults = ToyCAFMConfig()
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", default=defaults.dataset, help="gmm1d, 8gaussians, checkerboard, moons or PATH.npy")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the weights, data and noise")
    parser.add_argument("--flow_train_steps", type=int, default=defaults.flow_train_steps, help="flow-matching steps (the baseline)")
    parser.add_argument("--max_train_steps", type=int, default=defaults.max_train_steps, help="CAFM iterations (D or G steps)")
    parser.add_argument("--learning_rate", type=float, default=defaults.learning_rate, help="the generator's lr in post-training")
    parser.add_argument("--discriminator_learning_rate", type=float, default=defaults.discriminator_learning_rate,
                        help="the discriminator's lr")
    parser.add_argument("--num_discriminator_steps", type=int, default=defaults.num_discriminator_steps,
                        help="N: D steps per G step after the warm-up")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="D-only iterations at the start")
    parser.add_argument("--cp_scale", type=float, default=defaults.cp_scale, help="logit-centering weight")
    parser.add_argument("--ot_scale", type=float, default=defaults.ot_scale, help="weight of mean v^2")
    parser.add_argument("--train_batch_size", type=int, default=defaults.train_batch_size, help="points per step")
    parser.add_argument("--output", default=None, help="write the config and metrics to this JSON file")
    parser.add_argument("--plot", default=None, help="save the figure (2-step paths before and after) here")
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(NUM_THREADS)
    config = ToyCAFMConfig(**{k: v for k, v in vars(args).items() if k not in ("output", "plot")})
    dataset = load_toy_dataset(config.dataset)
    (baseline, post_trained), record = run(config, dataset)
    print(json.dumps({k: record[k] for k in ("flow_matching", "cafm")}, indent=2))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    if args.plot:
        noise = torch.randn((2000, dataset.dim), generator=torch.Generator().manual_seed(config.seed + EVAL_SEED_OFFSET))
        data = dataset.sample(2000, torch.Generator().manual_seed(config.seed))
        panels = {f"{name}, 2 steps: W2 = {record[key]['w2_2']:.3f}": trajectories(model, noise, 2)
                  for name, key, model in (("flow matching", "flow_matching", baseline), ("CAFM", "cafm", post_trained))}
        plot_maps(panels, data, args.plot)


if __name__ == "__main__":
    main()
