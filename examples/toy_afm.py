"""Adversarial flow models on low-dimensional distributions: does the OT term find the optimal map?

Small MLP generators and discriminators are trained with the library's AFM training step (the same
losses, (s, t) pairs, gradient normalization and EMA as the ImageNet trainer), then measured on
fresh noise against exact optimal transport (diffusers_afm.evaluation.toy):

    python examples/toy_afm.py --dataset 8gaussians --method afm --output results.json --plot map.png
    python examples/toy_afm.py --dataset samples.npy --method afm --nfe 2
    python examples/toy_afm.py --dataset checkerboard --method flow --flow_steps 100

Methods: `afm` (docs/method.md's objective), `gan` (the same objective with `ot_scale` 0: any map that
matches the data is as good as another) and `flow` (rectified flow matching with the same MLP,
sampled with `--flow_steps` Euler steps), the baseline whose straight coupling AFM should reproduce
in one step. benchmarks/toy_table.py runs all data sets, methods and seeds for docs/toy_experiments.md.
"""

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from matplotlib import pyplot as plt

from diffusers_afm import flow
from diffusers_afm.evaluation.toy import (
    GaussianMixture,
    SampleSet,
    load_toy_dataset,
    mean_distance,
    mode_coverage,
    quantile_map,
    transport_cost,
    wasserstein1_1d,
    wasserstein2,
)
from diffusers_afm.training import AFMObjective, AFMTrainingStep, GradientNormalization, ModelEMA, constant, cosine, recipe

METHODS = ("afm", "gan", "flow")
# Evaluation noise and data come from their own stream, never the training one ("fresh noise").
EVAL_SEED_OFFSET = 1_000_003
# These MLPs are too small to gain from a second thread, and on a busy 2-core machine a second
# thread that waits for a core slows every step down several times.
NUM_THREADS = 1


@dataclass
class ToyConfig:
    """Every setting of a toy run; the defaults are the ones of the table in docs/toy_experiments.md."""

    dataset: str = "8gaussians"
    method: str = "afm"
    nfe: int = 1
    max_train_steps: int = 8000
    seed: int = 0
    train_batch_size: int = 256
    learning_rate: float = 1e-3
    ema_decay: float = 0.999
    # Twice docs/method.md's 0.2: of 0.2, 0.4 and 0.8 (constant), 0.4 met the most targets of
    # docs/toy_experiments.md; 0.8 visibly shrinks the samples towards the noise.
    ot_scale: float = 0.4
    # When set, `ot_scale` decays along a cosine to this value over the run, as in docs/method.md's recipe.
    ot_scale_end: Optional[float] = None
    hidden_size: int = 128
    num_layers: int = 3
    flow_steps: int = 100
    # None: 2000 points in 2-D and up (exact EMD is O(N^3)), 100000 in 1-D (sorting): the 1-D W1
    # of two gmm1d sets of 2000 points is itself several hundredths, as large as the 0.03 target.
    eval_samples: Optional[int] = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {self.method!r}.")
        if self.nfe < 1:
            raise ValueError(f"`nfe` must be a positive integer, got {self.nfe}.")


# ------------------------------------------------------------------------------------------ models
class ToyMLP(nn.Module):
    """`num_layers` hidden LeakyReLU(0.2) layers of `hidden_size` units.

    LeakyReLU rather than SiLU: the piecewise-linear networks resolve the steep steps of the 1-D
    optimal map better (gmm1d: map error ~0.04 against ~0.08 with SiLU at the same budget).
    """

    def __init__(self, in_features: int, out_features: int, hidden_size: int, num_layers: int):
        super().__init__()
        layers, width = [], in_features
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_size), nn.LeakyReLU(0.2)]
            width = hidden_size
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class ToyGenerator(nn.Module):
    """`G(x_s, c, s, t)` for unconditional toy data: the class label is ignored.

    As in the transformer, a 1-NFE model sees no time and a multi-step one sees `s` (`use_t_src`),
    here as an extra input feature; so does the flow baseline's velocity field.
    """

    def __init__(self, dim: int, hidden_size: int, num_layers: int, use_t_src: bool = False):
        super().__init__()
        self.use_t_src = use_t_src
        self.mlp = ToyMLP(dim + use_t_src, dim, hidden_size, num_layers)

    def forward(self, hidden_states, class_labels, timestep_src, timestep_tgt) -> torch.Tensor:
        features = [hidden_states]  # (N, D)
        if self.use_t_src:
            features.append(timestep_src[:, None].to(hidden_states.dtype))
        return self.mlp(torch.cat(features, dim=1))  # (N, D)


class ToyDiscriminator(nn.Module):
    """`D(x, c, t)` returning one logit per sample; `t` is a feature only for multi-step models."""

    def __init__(self, dim: int, hidden_size: int, num_layers: int, use_t: bool = False):
        super().__init__()
        self.use_t = use_t
        self.mlp = ToyMLP(dim + use_t, 1, hidden_size, num_layers)

    def forward(self, hidden_states, class_labels, timestep) -> torch.Tensor:
        features = [hidden_states]
        if self.use_t:
            features.append(timestep[:, None].to(hidden_states.dtype))
        return self.mlp(torch.cat(features, dim=1))[:, 0]  # (N,)


# ------------------------------------------------------------------------------------------ maps
@dataclass
class TrainedMap:
    """A trained generator (its EMA weights) seen as the map from noise to data it defines."""

    model: nn.Module
    num_steps: int
    prediction_type: str

    def _sample(self, noise: torch.Tensor, visited: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        class_labels = torch.zeros(noise.shape[0], dtype=torch.long)

        def model_fn(x_s, s, t):
            if visited is not None:
                visited.append(x_s)
            return self.model(x_s, class_labels, s, t)

        return flow.sample(model_fn, noise, self.num_steps, self.prediction_type)

    @torch.no_grad()
    def __call__(self, noise: torch.Tensor) -> torch.Tensor:
        return self._sample(noise)

    @torch.no_grad()
    def trajectory(self, noise: torch.Tensor) -> torch.Tensor:
        """The points `z = x_1, x_{s1}, ..., x_0` the sampler visits, shape (num_steps + 1, N, D)."""
        visited = []
        sample = self._sample(noise, visited)
        return torch.stack(visited + [sample])


def initial_map(config: ToyConfig, dim: int) -> TrainedMap:
    """The untrained generator of a run (the same initial weights `train` starts from)."""
    torch.manual_seed(config.seed)
    multi_step = config.method == "flow" or recipe.is_multi_step(config.nfe)
    generator = ToyGenerator(dim, config.hidden_size, config.num_layers, use_t_src=multi_step)
    if config.method == "flow":
        return TrainedMap(generator, config.flow_steps, "velocity")
    return TrainedMap(generator, config.nfe, recipe.prediction_type(config.nfe))


# ------------------------------------------------------------------------------------------ training
def _optimizer(model: nn.Module, config: ToyConfig) -> torch.optim.Optimizer:
    # docs/method.md's AdamW (betas (0, 0.9), weight decay 0.01) at a toy learning rate.
    return torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(0.0, 0.9), weight_decay=0.01)


def ot_scale_schedule(config: ToyConfig):
    """The GAN baseline is the same objective without the OT term."""
    if config.method == "gan":
        return constant(0.0)
    if config.ot_scale_end is None:
        return constant(config.ot_scale)
    # Schedules count D and G steps together: two per training iteration.
    return cosine(config.ot_scale, config.ot_scale_end, 2 * config.max_train_steps)


def train_adversarial(config: ToyConfig, dataset) -> TrainedMap:
    """AFM (or, with `ot_scale` 0, the plain GAN) through the library's `AFMTrainingStep`."""
    start = initial_map(config, dataset.dim)
    generator = start.model
    discriminator = ToyDiscriminator(dataset.dim, config.hidden_size, config.num_layers, use_t=recipe.discriminator_time_input(config.nfe))
    optimizer_g, optimizer_d = _optimizer(generator, config), _optimizer(discriminator, config)
    accelerator = Accelerator(cpu=True)
    generator, discriminator, optimizer_g, optimizer_d = accelerator.prepare(
        generator, discriminator, optimizer_g, optimizer_d
    )
    ema = ModelEMA(generator)
    objective = AFMObjective(
        nfe=config.nfe, prediction_type=start.prediction_type, ot_scale=ot_scale_schedule(config)
    )
    step_fn = AFMTrainingStep(
        accelerator, generator, discriminator, optimizer_g, optimizer_d, objective,
        grad_norm=GradientNormalization(), ema=ema, ema_decay=config.ema_decay,
        noise_generator=torch.Generator().manual_seed(config.seed + 1),
    )
    data_rng = torch.Generator().manual_seed(config.seed)
    class_labels = torch.zeros(config.train_batch_size, dtype=torch.long)
    for step in range(config.max_train_steps):
        step_fn(dataset.sample(config.train_batch_size, data_rng), class_labels, step)
    return TrainedMap(ema.full_model(), start.num_steps, start.prediction_type)


def flow_matching_loss(model: nn.Module, x0: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Rectified flow: regress `d/ds interp(x0, z, s) = z - x0` at `x_s`, `s ~ U(0, 1)` (the baseline)."""
    noise = torch.randn(x0.shape, generator=rng)
    s = torch.rand(x0.shape[0], generator=rng)
    x_s = flow.interpolate(x0, noise, s)
    class_labels = torch.zeros(x0.shape[0], dtype=torch.long)
    return F.mse_loss(model(x_s, class_labels, s, s), noise - x0)


def train_flow(config: ToyConfig, dataset) -> TrainedMap:
    """Flow matching with the same MLP, optimizer, batch, steps and EMA as the adversarial runs."""
    start = initial_map(config, dataset.dim)
    model = start.model
    optimizer = _optimizer(model, config)
    ema = ModelEMA(model)
    data_rng = torch.Generator().manual_seed(config.seed)
    noise_rng = torch.Generator().manual_seed(config.seed + 1)
    for _ in range(config.max_train_steps):
        loss = flow_matching_loss(model, dataset.sample(config.train_batch_size, data_rng), noise_rng)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model, config.ema_decay)
    return TrainedMap(ema.full_model(), start.num_steps, start.prediction_type)


def train(config: ToyConfig, dataset) -> TrainedMap:
    return train_flow(config, dataset) if config.method == "flow" else train_adversarial(config, dataset)


# ------------------------------------------------------------------------------------------ metrics
def eval_samples(config: ToyConfig, dataset) -> int:
    if config.eval_samples is not None:
        return config.eval_samples
    count = 100_000 if dataset.dim == 1 else 2000
    # A user's sample set must still split into two disjoint halves (see `evaluate`).
    return min(count, dataset.points.shape[0] // 2) if isinstance(dataset, SampleSet) else count


def evaluation_noise(config: ToyConfig, dataset) -> torch.Tensor:
    rng = torch.Generator().manual_seed(config.seed + EVAL_SEED_OFFSET)
    return torch.randn((eval_samples(config, dataset), dataset.dim), generator=rng)


def evaluate(trained: TrainedMap, dataset, config: ToyConfig) -> Dict[str, float]:
    """The metrics of the JSON (see diffusers_afm.evaluation.toy for which are W2 and which W2^2)."""
    noise = evaluation_noise(config, dataset)
    num_samples = noise.shape[0]
    fake = trained(noise)
    # One draw split in two: `data` to score the generator, `reference` for the floor a perfect
    # generator would reach at this sample size.
    rng = torch.Generator().manual_seed(config.seed + EVAL_SEED_OFFSET + 1)
    data, reference = dataset.sample(2 * num_samples, rng).split(num_samples)
    metrics = {
        "w2_to_data": wasserstein2(fake, data),
        "w2_noise_floor": wasserstein2(reference, data),
        "transport_cost": transport_cost(noise, fake),
    }
    if dataset.dim == 1:
        # The unique optimal map in 1-D: exact for a known mixture, from sorted data otherwise.
        optimal = dataset.quantile_map(noise) if isinstance(dataset, GaussianMixture) else quantile_map(noise, data)
        metrics["ot_cost"] = transport_cost(noise, optimal)
        metrics["map_error"] = mean_distance(fake, optimal)
        metrics["w1_to_data"] = wasserstein1_1d(fake, data)
        metrics["w1_noise_floor"] = wasserstein1_1d(reference, data)
    else:
        metrics["ot_cost"] = wasserstein2(noise, data) ** 2
    if isinstance(dataset, GaussianMixture):
        metrics["mode_coverage"] = mode_coverage(fake, dataset.means, dataset.weights, dataset.stds)
        metrics["num_modes"] = len(dataset.weights)
    return metrics


def run(config: ToyConfig, dataset=None):
    """Train and evaluate one configuration; returns the trained map and the JSON record."""
    dataset = load_toy_dataset(config.dataset) if dataset is None else dataset
    started = time.perf_counter()
    trained = train(config, dataset)
    train_seconds = time.perf_counter() - started
    metrics = evaluate(trained, dataset, config)
    metrics["train_seconds"] = train_seconds
    metrics["seconds"] = time.perf_counter() - started
    return trained, {"config": asdict(config), "metrics": metrics}


# ------------------------------------------------------------------------------------------ figure
def plot_maps(panels: Dict[str, torch.Tensor], data: torch.Tensor, path: str, num_points: int = 300) -> None:
    """Where each noise point goes: one panel per title, from trajectories (num_steps + 1, N, D).

    1-D: the paths over time (noise at t = 1 on the left, data at t = 0 on the right) next to the
    data's histogram. 2-D: an arrow from each z to G(z) over the data; colours follow z's angle, so a
    map that permutes or rotates the modes shows as mixed colours.
    """
    dim = data.shape[1]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (title, trajectory) in zip(axes[0], panels.items()):
        trajectory = trajectory[:, :num_points].numpy()
        if dim == 1:
            _plot_paths_1d(ax, trajectory[..., 0], data[:, 0].numpy())
        else:
            _plot_arrows_2d(ax, trajectory[0], trajectory[-1], data.numpy())
        ax.set_title(title, fontsize=10)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _plot_paths_1d(ax, paths, data) -> None:
    times = np.linspace(1.0, 0.0, paths.shape[0])
    order = paths[0].argsort()
    colours = plt.get_cmap("viridis")(np.linspace(0, 1, len(order)))
    for colour, index in zip(colours, order):
        ax.plot(times, paths[:, index], color=colour, linewidth=0.6, alpha=0.7)
    density, edges = np.histogram(data, bins=120, density=True)
    centres = 0.5 * (edges[1:] + edges[:-1])
    # The data's density drawn sideways past t = 0, 0.25 wide at its peak.
    ax.fill_betweenx(centres, 0.0, -0.25 * density / density.max(), color="0.6")
    ax.set_xlim(1.02, -0.27)
    ax.set_xlabel("t (1 = noise, 0 = data)")


def _plot_arrows_2d(ax, noise, mapped, data) -> None:
    ax.scatter(data[:, 0], data[:, 1], s=2, color="0.75", linewidths=0)
    angle = np.arctan2(noise[:, 1], noise[:, 0])
    ax.quiver(
        noise[:, 0], noise[:, 1], mapped[:, 0] - noise[:, 0], mapped[:, 1] - noise[:, 1], angle,
        cmap="hsv", norm=plt.Normalize(-math.pi, math.pi), angles="xy", scale_units="xy", scale=1,
        width=0.004, alpha=0.8,
    )
    # Wide enough for N(0, I) noise and for the data, whatever its scale.
    limit = max(3.2, 1.05 * float(np.abs(data).max()))
    ax.set_aspect("equal")
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)


def panel_title(method: str, metrics: Dict[str, float]) -> str:
    ratio = metrics["transport_cost"] / metrics["ot_cost"]
    return f"{method}: cost / OT = {ratio:.2f}, W2 = {metrics['w2_to_data']:.3f}"


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    defaults = ToyConfig()
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--dataset", default=defaults.dataset, help="gmm1d, 8gaussians, checkerboard, moons or PATH.npy (N x D)"
    )
    parser.add_argument("--method", default=defaults.method, choices=METHODS,
                        help="afm (adversarial flow), gan (no OT term) or flow (flow matching)")
    parser.add_argument("--nfe", type=int, default=defaults.nfe, help="AFM sampling steps (1: x-prediction)")
    # The names of the image trainers (train_afm.py), which follow diffusers' example trainers.
    parser.add_argument("--max_train_steps", type=int, default=defaults.max_train_steps,
                        help="iterations (one D and one G step each)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the weights, data and noise")
    parser.add_argument("--train_batch_size", type=int, default=defaults.train_batch_size, help="points per step")
    parser.add_argument("--learning_rate", type=float, default=defaults.learning_rate, help="AdamW learning rate")
    parser.add_argument("--ema_decay", type=float, default=defaults.ema_decay, help="EMA decay of the generator")
    parser.add_argument("--ot_scale", type=float, default=defaults.ot_scale, help="weight of the OT term (afm only)")
    parser.add_argument("--ot_scale_end", type=float, default=None, help="cosine-decay ot_scale to this")
    parser.add_argument("--hidden_size", type=int, default=defaults.hidden_size, help="MLP width")
    parser.add_argument("--num_layers", type=int, default=defaults.num_layers, help="MLP hidden layers")
    parser.add_argument("--flow_steps", type=int, default=defaults.flow_steps, help="Euler steps of the flow")
    parser.add_argument("--eval_samples", type=int, default=None, help="default: 2000 (100000 in 1-D)")
    parser.add_argument("--output", default=None, help="write the config and metrics to this JSON file")
    parser.add_argument("--plot", default=None, help="save the figure of the learned map here")
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(NUM_THREADS)
    config = ToyConfig(**{name: value for name, value in vars(args).items() if name not in ("output", "plot")})
    dataset = load_toy_dataset(config.dataset)
    trained, record = run(config, dataset)
    print(json.dumps(record["metrics"], indent=2))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    if args.plot:
        noise = evaluation_noise(config, dataset)
        data = dataset.sample(2000, torch.Generator().manual_seed(config.seed))
        plot_maps({panel_title(config.method, record["metrics"]): trained.trajectory(noise)}, data, args.plot)


if __name__ == "__main__":
    main()
