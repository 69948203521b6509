"""The toy optimal-transport table of docs/toy_experiments.md: every data set x method x seed.

    python benchmarks/toy_table.py --output_dir docs/toy

runs examples/toy_afm.py's `run` in-process for each configuration (default settings), then writes
`results.json` (every run's config and metrics, plus the seed agreement), `table.md` (the table and
the issue's targets, met or not) and one figure per data set (`<dataset>.png`, seed 0: AFM,
GAN and flow side by side). `--max_train_steps`, `--seeds`, `--datasets` and `--methods` shrink it for a
quick look.
"""

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import toy_afm  # noqa: E402

from diffusers_afm.evaluation.toy import load_toy_dataset, mean_distance  # noqa: E402

DATASETS = ("gmm1d", "8gaussians", "checkerboard", "moons")


class Target(NamedTuple):
    """A target of the issue: checked on every seed's metrics of one (data set, method)."""

    dataset: str
    method: str
    text: str
    check: Callable[[Dict[str, float]], bool]


# Issue 4, part 2: 1-NFE AFM at default settings, and the contrast without the OT term.
def _cost_ratio(m: Dict[str, float]) -> float:
    return m["transport_cost"] / m["ot_cost"]


def _floor_ratio(m: Dict[str, float]) -> float:
    return m["w2_to_data"] / m["w2_noise_floor"]


TARGETS = (
    Target("8gaussians", "afm", "transport_cost <= 1.08 ot_cost", lambda m: _cost_ratio(m) <= 1.08),
    Target("8gaussians", "afm", "w2_to_data <= 1.2 w2_noise_floor", lambda m: _floor_ratio(m) <= 1.2),
    Target("8gaussians", "afm", "all 8 modes covered", lambda m: m["mode_coverage"] == 8),
    Target("checkerboard", "afm", "transport_cost <= 1.05 ot_cost", lambda m: _cost_ratio(m) <= 1.05),
    Target("checkerboard", "afm", "w2_to_data <= 1.5 w2_noise_floor", lambda m: _floor_ratio(m) <= 1.5),
    Target("gmm1d", "afm", "map_error <= 0.05", lambda m: m["map_error"] <= 0.05),
    Target("gmm1d", "afm", "w1_to_data <= 0.03", lambda m: m["w1_to_data"] <= 0.03),
    Target("8gaussians", "gan", "transport_cost >= 1.5 ot_cost", lambda m: _cost_ratio(m) >= 1.5),
    Target("checkerboard", "gan", "transport_cost >= 5 ot_cost", lambda m: _cost_ratio(m) >= 5),
    Target("any", "any", "every run <= 180 s", lambda m: m["seconds"] <= 180),
)


def seed_agreement(maps: List[toy_afm.TrainedMap], noise: torch.Tensor) -> float:
    """Mean over seed pairs of `E||G_a(z) - G_b(z)||` on one shared noise: 0 if the map is unique."""
    mapped = [trained(noise) for trained in maps]
    return statistics.mean(mean_distance(a, b) for a, b in itertools.combinations(mapped, 2))


def _mean_std(values: List[float], digits: int) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def markdown_table(results: Dict) -> str:
    """One row per (data set, method): mean ± std over the seeds."""
    header = (
        "| data set | method | W2 to data | W2 floor | W2 / floor | transport cost | OT cost | cost / OT "
        "| modes | map error (1-D) | W1 (1-D) | seed disagreement | seconds |"
    )
    lines = [header, "|" + "|".join(["---"] * (header.count("|") - 1)) + "|"]
    for key, entry in results.items():
        runs = [run["metrics"] for run in entry["runs"]]

        def column(name, digits=3):
            return _mean_std([m[name] for m in runs], digits) if name in runs[0] else "–"

        w2_ratio = _mean_std([_floor_ratio(m) for m in runs], 2)
        cost_ratio = _mean_std([_cost_ratio(m) for m in runs], 2)
        modes = ", ".join(str(m["mode_coverage"]) for m in runs) if "mode_coverage" in runs[0] else "–"
        dataset, method = key.split("/")
        lines.append(
            f"| {dataset} | {method} | {column('w2_to_data')} | {column('w2_noise_floor')} | {w2_ratio} "
            f"| {column('transport_cost')} | {column('ot_cost')} | {cost_ratio} | {modes} | {column('map_error')} "
            f"| {column('w1_to_data')} | {entry['seed_disagreement']:.3f} | {column('seconds', 0)} |"
        )
    return "\n".join(lines)


def target_report(results: Dict) -> str:
    lines = ["| target | data set | method | seeds met | values |", "|---|---|---|---|---|"]
    for target in TARGETS:
        keys = [key for key in results if target.dataset == "any" or key == f"{target.dataset}/{target.method}"]
        runs = [run["metrics"] for key in keys for run in results[key]["runs"]]
        if not runs:
            continue
        met = sum(target.check(m) for m in runs)
        values = _target_values(target, runs)
        lines.append(f"| {target.text} | {target.dataset} | {target.method} | {met}/{len(runs)} | {values} |")
    return "\n".join(lines)


def _target_values(target: Target, runs: List[Dict[str, float]]) -> str:
    """The measured quantity of a target, per seed (ratios for the relative targets)."""
    if "ot_cost" in target.text:
        return ", ".join(f"{_cost_ratio(m):.3f}" for m in runs)
    if "floor" in target.text:
        return ", ".join(f"{_floor_ratio(m):.3f}" for m in runs)
    if "modes" in target.text:
        return ", ".join(str(m["mode_coverage"]) for m in runs)
    if "map_error" in target.text:
        return ", ".join(f"{m['map_error']:.4f}" for m in runs)
    if "w1_to_data" in target.text:
        return ", ".join(f"{m['w1_to_data']:.4f}" for m in runs)
    return f"max {max(m['seconds'] for m in runs):.0f} s"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="docs/toy")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--methods", nargs="+", default=list(toy_afm.METHODS), choices=toy_afm.METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max_train_steps", type=int, default=None, help="override the default training steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(toy_afm.NUM_THREADS)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    results = {}
    started = time.perf_counter()
    for dataset_name in args.datasets:
        dataset = load_toy_dataset(dataset_name)
        panels = {}
        for method in args.methods:
            maps, runs = [], []
            for seed in args.seeds:
                overrides = {} if args.max_train_steps is None else {"max_train_steps": args.max_train_steps}
                config = toy_afm.ToyConfig(dataset=dataset_name, method=method, seed=seed, **overrides)
                trained, record = toy_afm.run(config, dataset)
                print(dataset_name, method, seed, json.dumps(record["metrics"]), flush=True)
                maps.append(trained)
                runs.append(record)
            # One noise for every seed, so the maps are compared point by point.
            noise = toy_afm.evaluation_noise(toy_afm.ToyConfig(seed=args.seeds[0]), dataset)
            results[f"{dataset_name}/{method}"] = {"runs": runs, "seed_disagreement": seed_agreement(maps, noise)}
            panels[toy_afm.panel_title(method, runs[0]["metrics"])] = maps[0].trajectory(noise)
        data = dataset.sample(2000, torch.Generator().manual_seed(args.seeds[0]))
        toy_afm.plot_maps(panels, data, str(output_dir / f"{dataset_name}.png"))

    total = time.perf_counter() - started
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report = (
        f"{markdown_table(results)}\n\nTargets:\n\n{target_report(results)}\n\n"
        f"Total wall time: {total / 60:.1f} min\n"
    )
    (output_dir / "table.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
