"""The Continuous-AFM toy table of docs/toy_experiments.md: flow matching vs its CAFM post-training.

    python benchmarks/toy_cafm_table.py --output_dir docs/toy

runs examples/toy_cafm.py's `run` in-process for each data set and seed (default settings), then
writes `cafm_results.json` (every run), `cafm_table.md` (W2 to the data at each Euler step count,
mean and spread over the seeds, before and after) and `cafm_<dataset>.png` (seed 0: the 2-step
paths before and after). `--datasets`, `--seeds` and `--max_train_steps` shrink it for a quick look.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import toy_afm  # noqa: E402
import toy_cafm  # noqa: E402

from diffusers_afm.evaluation.toy import load_toy_dataset  # noqa: E402

DATASETS = ("gmm1d", "8gaussians", "checkerboard")


def table(records, step_counts) -> str:
    lines = [
        "| data set | NFE (Euler) | W2 flow matching | W2 after CAFM | change | seeds improved | noise floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for dataset in dict.fromkeys(r["config"]["dataset"] for r in records):
        runs = [r for r in records if r["config"]["dataset"] == dataset]
        floor = statistics.mean(r["flow_matching"]["w2_noise_floor"] for r in runs)
        for n in step_counts:
            before = [r["flow_matching"][f"w2_{n}"] for r in runs]
            after = [r["cafm"][f"w2_{n}"] for r in runs]
            spread = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
            change = statistics.mean(after) / statistics.mean(before) - 1
            improved = sum(a < b for a, b in zip(after, before))
            lines.append(
                f"| {dataset} | {n} | {statistics.mean(before):.3f} ± {spread(before):.3f} | "
                f"{statistics.mean(after):.3f} ± {spread(after):.3f} | {100 * change:+.1f}% | {improved}/{len(runs)} | {floor:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="docs/toy")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max_train_steps", type=int, default=None, help="CAFM iterations (default: toy_cafm's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(toy_afm.NUM_THREADS)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    records, started = [], time.perf_counter()
    for dataset_name in args.datasets:
        dataset = load_toy_dataset(dataset_name)
        for seed in args.seeds:
            overrides = {"max_train_steps": args.max_train_steps} if args.max_train_steps else {}
            config = toy_cafm.ToyCAFMConfig(dataset=dataset_name, seed=seed, **overrides)
            (baseline, post_trained), record = toy_cafm.run(config, dataset)
            records.append(record)
            print(f"{dataset_name} seed {seed}: " + ", ".join(
                f"{n} steps {record['flow_matching'][f'w2_{n}']:.3f} -> {record['cafm'][f'w2_{n}']:.3f}"
                for n in config.step_counts), flush=True)
            if seed == args.seeds[0]:
                noise = torch.randn((2000, dataset.dim), generator=torch.Generator().manual_seed(seed + toy_afm.EVAL_SEED_OFFSET))
                data = dataset.sample(2000, torch.Generator().manual_seed(seed))
                panels = {f"{name}, 2 Euler steps: W2 = {record[key]['w2_2']:.3f}": toy_cafm.trajectories(model, noise, 2)
                          for name, key, model in (("flow matching", "flow_matching", baseline),
                                                   ("CAFM", "cafm", post_trained))}
                toy_afm.plot_maps(panels, data, str(out / f"cafm_{dataset_name}.png"))
    step_counts = records[0]["config"]["step_counts"]
    (out / "cafm_results.json").write_text(json.dumps({"runs": records, "seconds": time.perf_counter() - started}, indent=2) + "\n")
    (out / "cafm_table.md").write_text(table(records, step_counts))
    print(table(records, step_counts))


if __name__ == "__main__":
    main()
