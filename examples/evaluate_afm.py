#!/usr/bin/env python
"""FID, Inception Score, precision and recall of a pipeline, a folder or an `.npz` against a reference.

    # FID-50K as in the paper: samples from sample_afm.py against ADM's ImageNet 256 reference batch
    python examples/evaluate_afm.py --npz samples-xl2/samples.npz \\
        --reference_npz VIRTUAL_imagenet256_labeled.npz --inception_path weights-inception-2015-12-05-6726825d.pth

    # sample and evaluate in one go (under `accelerate launch`, the sampling is shared by the processes)
    python examples/evaluate_afm.py --pipeline afm-digits --num_samples 1000 --reference_folder real/ \\
        --feature_extractor my_features.pt

The feature network is torch-fidelity's Inception (`--feature_extractor inception`, which downloads
its weights; `--inception_path FILE` uses a local copy) or any TorchScript file. Stored `mu`/`sigma`
of a reference `.npz` (ADM's come from its TensorFlow Inception) are used unless
`--recompute_reference_stats`. Precision and recall need the reference images' features: one pass
over them, which `--save_reference FILE` keeps for the next run (`--reference_stats FILE`).
Prints a markdown table and writes `--output` (JSON).
"""

import argparse
import os
import sys

from diffusers_afm.evaluation import (
    TORCH_FIDELITY_WEIGHTS,
    evaluate_images,
    evaluate_pipeline,
    format_table,
    load_feature_extractor,
    load_reference,
    parse_class_labels,
    save_results,
)
from diffusers_afm.utils import DTYPES, HelpFormatter, distributed_state, resolve_dtype


def build_parser():
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=HelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--pipeline", help="AFMPipeline folder or Hub id: sample and evaluate.")
    source.add_argument("--folder", help="A folder of images (.png/.jpg/.webp, subfolders too).")
    source.add_argument("--npz", help="An .npz with `arr_0` (uint8 N x H x W x 3), e.g. from sample_afm.py.")
    reference = p.add_mutually_exclusive_group(required=True)
    reference.add_argument("--reference_npz", help="A reference batch (ADM layout: `arr_0`, and `mu`/`sigma`).")
    reference.add_argument("--reference_folder", help="A folder of reference images.")
    reference.add_argument("--reference_stats", help="An .npz with `mu`/`sigma` (and `features`), e.g. from --save_reference.")
    p.add_argument("--feature_extractor", default="inception",
                   help="'inception' (torch-fidelity, downloads its weights) or a TorchScript file (.pt/.pth/.ts/.jit).")
    p.add_argument("--inception_path", default=None,
                   help=f"A local copy of torch-fidelity's `{TORCH_FIDELITY_WEIGHTS}` (or a TorchScript Inception).")
    p.add_argument("--input_size", type=int, default=299, help="Side to which a TorchScript network's input is resized.")
    p.add_argument("--recompute_reference_stats", action="store_true",
                   help="Ignore a reference's stored mu/sigma (needed when they come from another network).")
    p.add_argument("--precision_recall", action=argparse.BooleanOptionalAction, default=True,
                   help="Compute precision/recall (costs one feature pass over the reference images).")
    p.add_argument("--save_reference", default=None, help="Write the reference mu/sigma/features to this .npz.")
    p.add_argument("--batch_size", type=int, default=64,
                   help="Images per forward pass: of the feature network, and of the generator with --pipeline "
                        "(the name sample_afm.py uses).")
    p.add_argument("--inception_splits", type=int, default=10, help="Splits of the Inception Score's mean and std.")
    p.add_argument("--output", default="results.json", help="The metrics as JSON.")
    # --pipeline only (the same meaning as in sample_afm.py)
    p.add_argument("--num_samples", type=int, default=None, help="Default: --per_class x the number of classes.")
    p.add_argument("--per_class", type=int, default=50,
                   help="Samples per class (of --class_labels, or of every class) when --num_samples is not given.")
    p.add_argument("--class_labels", type=parse_class_labels, default=None,
                   help="Comma-separated class ids to cycle through (default: every class).")
    p.add_argument("--seed", type=int, default=0, help="Base seed; sample i uses sample_seed(seed, i).")
    p.add_argument("--sample_batch_size", dest="batch_size", type=int, default=argparse.SUPPRESS,
                   help="Deprecated: the old name of --batch_size.")
    p.add_argument("--num_inference_steps", type=int, default=None, help="Default: the model's trained step count.")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="auto: bfloat16 on GPU, float32 on CPU.")
    return p


def parse_args(argv=None):
    """Parse and check the flags, naming the flag and the file when a file is missing."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.inception_path is not None:
        if args.feature_extractor != "inception":
            parser.error("pass either --inception_path or a --feature_extractor file, not both.")
        if not os.path.isfile(args.inception_path):
            parser.error(
                f"--inception_path: file not found: {args.inception_path}. It should be torch-fidelity's Inception "
                f"weights `{TORCH_FIDELITY_WEIGHTS}` (or a TorchScript feature network)."
            )
        args.feature_extractor = args.inception_path
    elif args.feature_extractor != "inception" and not os.path.isfile(args.feature_extractor):
        parser.error(f"--feature_extractor: file not found: {args.feature_extractor}; use 'inception' or a TorchScript file.")
    for flag in ("folder", "reference_folder"):
        value = getattr(args, flag)
        if value is not None and not os.path.isdir(value):
            parser.error(f"--{flag}: folder not found: {value}")
    for flag in ("npz", "reference_npz", "reference_stats"):
        value = getattr(args, flag)
        if value is not None and not os.path.isfile(value):
            parser.error(f"--{flag}: file not found: {value}")
    return args


def main(argv=None):
    args = parse_args(argv)
    state = distributed_state()
    extractor = load_feature_extractor(args.feature_extractor, device=state.device, input_size=args.input_size)
    reference_path = args.reference_npz or args.reference_folder or args.reference_stats
    # Only the main process computes the metrics, so only it needs the reference.
    reference = None
    if state.is_main_process:
        reference = load_reference(reference_path, extractor, recompute=args.recompute_reference_stats,
                                   with_features=args.precision_recall, batch_size=args.batch_size)
        if args.save_reference:
            reference.save(args.save_reference)
        if not args.precision_recall:
            reference.features = None

    if args.pipeline is not None:
        from diffusers_afm import AFMPipeline

        pipe = AFMPipeline.from_pretrained(args.pipeline, dtype=resolve_dtype(args.dtype, state.device)).to(state.device)
        pipe.set_progress_bar_config(disable=True)
        num_samples = args.num_samples or args.per_class * len(args.class_labels or range(pipe.transformer.config.num_classes))
        results = evaluate_pipeline(pipe, reference, extractor, num_samples, batch_size=args.batch_size, seed=args.seed,
                                    class_labels=args.class_labels, num_inference_steps=args.num_inference_steps,
                                    accelerator=state, inception_splits=args.inception_splits, progress=True)
    elif state.is_main_process:
        results = evaluate_images(args.folder or args.npz, reference, extractor, args.batch_size, args.inception_splits)
    if state.is_main_process:
        if reference.features is None:
            print("Precision and recall left out: no reference features (--no-precision_recall, or statistics only).")
        results.update(samples=args.pipeline or args.folder or args.npz, reference=reference_path,
                       feature_extractor=args.feature_extractor)
        save_results(args.output, results)
        print(format_table(results))
    state.wait_for_everyone()
    return results if state.is_main_process else None


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
