#!/usr/bin/env python
"""Continuous AFM on the embedded digits: a flow-matching model against its CAFM post-trained version.

    python benchmarks/quality_digits_cafm.py --output docs/quality_digits_cafm.json
    python benchmarks/quality_digits_cafm.py --flow_pipeline fm-digits --cafm_pipeline cafm-digits

Trains `examples/train_flow_matching.py` with its digits defaults, then post-trains it with
`examples/train_cafm.py` and its digits defaults (unless the folders are given), and measures both
with benchmarks/quality_digits.py's metrics (an independent classifier's accuracy on the samples,
the Fréchet distance in its features to the held-out split) at each Euler step count, without
guidance. Prints a table and writes JSON.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from quality_digits import measure  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flow_pipeline", default=None, help="A flow-matching folder; default: train one.")
    parser.add_argument("--cafm_pipeline", default=None, help="Its CAFM post-trained folder; default: train it.")
    parser.add_argument("--work_dir", default="cafm-digits-quality", help="Where the default models are trained.")
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8], help="Euler step counts.")
    parser.add_argument("--per_class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="quality_digits_cafm.json")
    args = parser.parse_args(argv)

    seconds = {}
    flow_dir, cafm_dir = args.flow_pipeline, args.cafm_pipeline
    if flow_dir is None:
        import train_flow_matching

        start = time.perf_counter()
        flow_dir = train_flow_matching.main(["--output_dir", os.path.join(args.work_dir, "fm"), "--report_to", "none"])
        seconds["flow_matching"] = time.perf_counter() - start
    if cafm_dir is None:
        from accelerate.state import AcceleratorState

        import train_cafm

        AcceleratorState._reset_state(True)
        start = time.perf_counter()
        cafm_dir = train_cafm.main(["--pretrained_model_name_or_path", flow_dir,
                                    "--output_dir", os.path.join(args.work_dir, "cafm"), "--report_to", "none"])
        seconds["cafm"] = time.perf_counter() - start
    results = {"training_seconds": seconds, "flow_pipeline": flow_dir, "cafm_pipeline": cafm_dir, "runs": []}
    for steps in args.steps:
        for name, folder in (("flow_matching", flow_dir), ("cafm", cafm_dir)):
            metrics = measure(folder, args.per_class, args.seed, num_inference_steps=steps, solver="euler")
            results["runs"].append({"model": name, "steps": steps, **metrics})
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)

    floor = results["runs"][0]
    print("| Euler steps | model | classifier accuracy | Fréchet distance to held-out |")
    print("|---|---|---|---|")
    for run in results["runs"]:
        print(f"| {run['steps']} | {run['model']} | {run['classifier_accuracy_generated']:.3f} | "
              f"{run['frechet_generated_vs_heldout']:.2f} |")
    print(f"| real floor | held-out / train | {floor['classifier_accuracy_heldout_real']:.3f} | {floor['frechet_train_vs_heldout']:.2f} |")
    return results


if __name__ == "__main__":
    main()
