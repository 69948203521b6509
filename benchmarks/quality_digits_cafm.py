#!/usr/bin/env python
"""Continuous AFM on the embedded digits: a flow-matching model against its CAFM post-trained version.

    python benchmarks/quality_digits_cafm.py --output docs/quality_digits_cafm.json
    python benchmarks/quality_digits_cafm.py --flow_pipeline fm-digits --cafm_pipeline cafm-digits
    python benchmarks/quality_digits_cafm.py --flow_pipeline fm-digits --cafm_pipeline none --lora_ranks 4 16 \
        --output quality_digits_cafm_lora.json     # CAFM with LoRA adapters at two ranks (docs/cafm.md)

Trains `examples/train_flow_matching.py` with its digits defaults, then post-trains it with
`examples/train_cafm.py` and its digits defaults (unless the folders are given), and measures both
with benchmarks/quality_digits.py's metrics (an independent classifier's accuracy on the samples,
the Fréchet distance in its features to the held-out split) at each Euler step count, without
guidance. With `--lora_ranks`, each rank post-trains the same flow model with `--lora_rank R`
(`--merge_lora`, so the result is measured as a full pipeline; adapter and merged sampling agree,
tests/test_lora.py) and the table adds its trained parameter count. Prints a table and writes JSON.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from quality_digits import measure  # noqa: E402


def adapter_parameters(flow_dir: str, rank: int) -> int:
    """The generator adapter's parameter count at `rank` (train_cafm.py's default targets)."""
    from diffusers_afm import AFMPipeline
    from diffusers_afm.training.lora import LoRASettings
    from diffusers_afm.training.memory import adapter_parameter_count

    model = AFMPipeline.from_pretrained(flow_dir).transformer
    return adapter_parameter_count(model, rank, LoRASettings(lora_rank=rank).target_modules(model))


def main(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flow_pipeline", default=None, help="A flow-matching folder; default: train one.")
    parser.add_argument("--cafm_pipeline", default=None,
                        help="Its CAFM post-trained folder; default: train it; 'none': no full post-training.")
    parser.add_argument("--lora_ranks", type=int, nargs="*", default=[],
                        help="Also post-train with LoRA adapters of these ranks (train_cafm.py --lora_rank).")
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
    from accelerate.state import AcceleratorState

    import train_cafm

    models = [("flow_matching", flow_dir, None)]
    if cafm_dir is None:
        AcceleratorState._reset_state(True)
        start = time.perf_counter()
        cafm_dir = train_cafm.main(["--pretrained_model_name_or_path", flow_dir,
                                    "--output_dir", os.path.join(args.work_dir, "cafm"), "--report_to", "none"])
        seconds["cafm"] = time.perf_counter() - start
    if cafm_dir != "none":
        models.append(("cafm", cafm_dir, None))
    for rank in args.lora_ranks:
        name = f"cafm_lora_r{rank}"
        AcceleratorState._reset_state(True)
        start = time.perf_counter()
        folder = train_cafm.main(["--pretrained_model_name_or_path", flow_dir, "--lora_rank", str(rank), "--merge_lora",
                                  "--output_dir", os.path.join(args.work_dir, name), "--report_to", "none"])
        seconds[name] = time.perf_counter() - start
        models.append((name, folder, adapter_parameters(flow_dir, rank)))
    results = {"training_seconds": seconds, "flow_pipeline": flow_dir, "cafm_pipeline": cafm_dir, "runs": []}
    for steps in args.steps:
        for name, folder, trained in models:
            metrics = measure(folder, args.per_class, args.seed, num_inference_steps=steps, solver="euler")
            results["runs"].append({"model": name, "steps": steps, "generator_adapter_parameters": trained, **metrics})
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)

    floor = results["runs"][0]
    print("| Euler steps | model | trained generator parameters | classifier accuracy | Fréchet distance to held-out |")
    print("|---|---|---|---|---|")
    for run in results["runs"]:
        trained = run["generator_adapter_parameters"]
        print(f"| {run['steps']} | {run['model']} | {'all' if trained is None else f'{trained:,}'} | "
              f"{run['classifier_accuracy_generated']:.3f} | {run['frechet_generated_vs_heldout']:.2f} |")
    print(f"| real floor | held-out / train | | {floor['classifier_accuracy_heldout_real']:.3f} | {floor['frechet_train_vs_heldout']:.2f} |")
    return results


if __name__ == "__main__":
    main()
