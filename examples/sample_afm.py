#!/usr/bin/env python
"""Sample many images from an AFMPipeline for evaluation (FID-50K: 50 per class for every class).

    # 50 x 1000 ImageNet samples on every GPU of the machine: PNGs and one ADM-layout .npz
    accelerate launch examples/sample_afm.py --pipeline afm-xl2-1nfe --output_dir samples-xl2

    # two CPU processes
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no examples/sample_afm.py --pipeline afm-digits --output_dir s

Sample i has class `i % num_classes` (or `--class_labels[i % len]`) and the noise of seed
`sample_seed(--seed, i)`; it is computed in global batch `i // --batch_size`, whatever the number of
processes, so the output does not depend on it. The run is resumable: an interrupted run continues
where it stopped when started again with the same flags; every file is written under a temporary
name and renamed, so none is written twice or left half-written.

Writes to --output_dir: `{i:06d}.png` (`--format png|both`), `samples.npz` with `arr_0` (uint8
N x H x W x 3) and `labels` (`--format npz|both`; assembled at the end from per-batch files in
`batches/`, which are then removed), and `sampling.json` (the settings and the SHA-256 of the
pipeline's weights and configs, checked on resume: samples of two models are never mixed).
"""

import argparse
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image

from diffusers_afm import AFMPipeline
from diffusers_afm.evaluation import (
    generate_images,
    parse_class_labels,
    pipeline_fingerprint,
    plan_batches,
    sample_class_labels,
    write_samples_npz,
)
from diffusers_afm.utils import (DTYPES, HelpFormatter, RunStopped, atomic_file, distributed_state, remove_stale_temporaries,
                                 resolve_dtype)

# Settings that change the images: a resumed run must use the same ones. The pipeline is compared by
# its content (`pipeline_sha256`), not by its path: a folder can move, or be overwritten by another model.
MANIFEST_KEYS = ("pipeline_sha256", "num_samples", "class_labels", "seed", "batch_size", "num_inference_steps", "dtype",
                 "format")
NPZ_NAME = "samples.npz"


def build_parser():
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--pipeline", required=True, help="AFMPipeline folder or Hub id.")
    p.add_argument("--output_dir", required=True, help="Where the images, samples.npz and sampling.json go.")
    p.add_argument("--per_class", type=int, default=50,
                   help="Samples per class (of --class_labels, or of every class) when --num_samples is not given.")
    p.add_argument("--num_samples", type=int, default=None, help="Default: --per_class x the number of classes.")
    p.add_argument("--class_labels", type=parse_class_labels, default=None,
                   help="Comma-separated class ids to cycle through (default: every class).")
    p.add_argument("--seed", type=int, default=0, help="Base seed; sample i uses sample_seed(seed, i).")
    p.add_argument("--batch_size", type=int, default=64, help="Images per forward pass (per process).")
    p.add_argument("--num_inference_steps", type=int, default=None, help="Default: the model's trained step count.")
    p.add_argument("--format", choices=("png", "npz", "both"), default="both",
                   help="One PNG per sample, one ADM-layout samples.npz, or both.")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="auto: bfloat16 on GPU, float32 on CPU.")
    p.add_argument("--num_writers", type=int, default=4, help="Threads per process that encode and write files.")
    p.add_argument("--max_images", type=int, default=None,
                   help="Stop after this process has generated this many new images (for time-limited jobs); rerun to continue.")
    return p


def png_path(output_dir, index, width):
    return os.path.join(output_dir, f"{index:0{width}d}.png")


def batch_path(output_dir, batch_index):
    return os.path.join(output_dir, "batches", f"{batch_index:06d}.npz")


def missing_outputs(args, indices, width):
    """(PNG indices still missing, whether the batch file is still missing) for one batch."""
    pngs = []
    if args.format in ("png", "both"):
        pngs = [i for i in indices if not os.path.exists(png_path(args.output_dir, i, width))]
    need_batch = False
    if args.format in ("npz", "both") and not os.path.exists(os.path.join(args.output_dir, NPZ_NAME)):
        need_batch = not os.path.exists(batch_path(args.output_dir, indices.start // args.batch_size))
    return pngs, need_batch


def write_batch(args, indices, images, labels, pngs, need_batch, width):
    """The PNGs first, then the batch file, each atomically."""
    for i in pngs:
        with atomic_file(png_path(args.output_dir, i, width)) as f:
            # compress_level 1: lossless like the default, several times faster to encode.
            PIL.Image.fromarray(images[i - indices.start]).save(f, format="PNG", compress_level=1)
    if need_batch:
        with atomic_file(batch_path(args.output_dir, indices.start // args.batch_size)) as f:
            np.savez(f, images=images, labels=np.asarray(labels, dtype=np.int64))


def check_manifest(args, manifest):
    path = os.path.join(args.output_dir, "sampling.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        existing = json.load(f)
    different = [k for k in MANIFEST_KEYS if existing.get(k) != manifest[k]]
    if different:
        changes = ", ".join(f"{k}: {existing.get(k)!r} -> {manifest[k]!r}" for k in different)
        model = (f" (the weights or configs in {args.pipeline} are not those of the model that made them)"
                 if "pipeline_sha256" in different else "")
        raise ValueError(f"{args.output_dir} holds samples made with other settings ({changes}){model}; "
                         "use another --output_dir, or the same flags and pipeline to resume.")
    return True


def assemble_npz(args, num_batches, labels):
    """`samples.npz` from the batch files, in index order, streamed."""
    def batches():
        for k in range(num_batches):
            with np.load(batch_path(args.output_dir, k)) as data:
                yield data["images"]

    write_samples_npz(os.path.join(args.output_dir, NPZ_NAME), batches(), np.asarray(labels))


def main(argv=None):
    args = build_parser().parse_args(argv)
    if os.path.isfile(args.output_dir):
        raise ValueError(f"`--output_dir` {args.output_dir} is a file; allowed: a folder (new or existing).")
    state = distributed_state()
    device = state.device
    dtype = resolve_dtype(args.dtype, device)
    pipe = AFMPipeline.from_pretrained(args.pipeline, dtype=dtype).to(device)  # refuses NaN/Inf weights
    pipe.set_progress_bar_config(disable=True)
    num_classes = pipe.transformer.config.num_classes
    if args.class_labels is not None:
        bad = [c for c in args.class_labels if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"--class_labels: {bad[0]} is outside the model's classes 0..{num_classes - 1}.")
    num_samples = args.num_samples
    if num_samples is None:
        num_samples = args.per_class * len(args.class_labels or range(num_classes))
    if num_samples < 1 or args.batch_size < 1:
        raise ValueError("--num_samples (or --per_class) and --batch_size must be >= 1.")
    width = max(6, len(str(num_samples - 1)))
    manifest = {
        "pipeline": args.pipeline,
        "pipeline_sha256": pipeline_fingerprint(args.pipeline if os.path.isdir(args.pipeline) else
                                                AFMPipeline.download(args.pipeline)),
        "num_samples": num_samples, "class_labels": args.class_labels, "seed": args.seed,
        "batch_size": args.batch_size, "num_inference_steps": args.num_inference_steps,
        "dtype": str(dtype).replace("torch.", ""), "format": args.format,
        "label_rule": "class_labels[i % len(class_labels)]" if args.class_labels else f"i % {num_classes}",
        "noise": "torch.randn on a CPU generator seeded with diffusers_afm.evaluation.sample_seed(seed, i)",
    }

    # 1. Check (every process, before anything is written) and record the settings.
    resuming = check_manifest(args, manifest)
    state.wait_for_everyone()
    if state.is_main_process:
        os.makedirs(os.path.join(args.output_dir, "batches"), exist_ok=True)
        for folder in (args.output_dir, os.path.join(args.output_dir, "batches")):
            remove_stale_temporaries(folder)  # of an interrupted run; never read
        if not resuming:
            with atomic_file(os.path.join(args.output_dir, "sampling.json"), "w") as f:
                json.dump(manifest, f, indent=2)
    state.wait_for_everyone()

    # 2. This process's batches that are not complete yet.
    mine = plan_batches(num_samples, args.batch_size, state.process_index, state.num_processes)
    todo = []
    for indices in mine:
        pngs, need_batch = missing_outputs(args, indices, width)
        if pngs or need_batch:
            todo.append((indices, pngs, need_batch))
    from tqdm.auto import tqdm

    total = sum(len(indices) for indices in mine)
    progress = tqdm(total=total, initial=total - sum(len(t[0]) for t in todo), unit="img",
                    desc=f"sampling (rank {state.process_index})", disable=not state.is_local_main_process)

    # 3. Generate each missing batch whole (so its images equal those of an uninterrupted run) and
    # write only the files that are missing; files are written in threads while the next batch runs.
    generated = 0
    with ThreadPoolExecutor(max_workers=max(1, args.num_writers)) as writers:
        pending = []
        for indices, pngs, need_batch in todo:
            if args.max_images is not None and generated >= args.max_images:
                break
            labels = sample_class_labels(indices, num_classes, args.class_labels)
            images = generate_images(pipe, list(indices), labels, args.seed, args.num_inference_steps)
            pending.append(writers.submit(write_batch, args, indices, images, labels, pngs, need_batch, width))
            generated += len(indices)
            progress.update(len(indices))
            while len(pending) > 2 * args.num_writers:
                pending.pop(0).result()
        for future in pending:
            future.result()
    progress.close()

    # 4. Once every batch is there: the .npz, assembled by the main process.
    state.wait_for_everyone()
    if state.is_main_process:
        batches = plan_batches(num_samples, args.batch_size)
        if any(any(missing_outputs(args, indices, width)) for indices in batches):
            print(f"Stopped early (--max_images); rerun the same command to continue in {args.output_dir}.")
        else:
            if args.format != "png" and not os.path.exists(os.path.join(args.output_dir, NPZ_NAME)):
                labels = sample_class_labels(range(num_samples), num_classes, args.class_labels)
                assemble_npz(args, len(batches), labels)
            # The per-batch files only served resuming and the .npz.
            shutil.rmtree(os.path.join(args.output_dir, "batches"), ignore_errors=True)
            print(f"{num_samples} samples in {args.output_dir}" + (f" ({NPZ_NAME})" if args.format != "png" else ""))
    state.wait_for_everyone()
    return args.output_dir


def run(argv=None) -> None:
    """The command line: bad flags, a damaged pipeline or a failed write stop with one `error:` line
    and exit status 1, without a traceback."""
    try:
        main(argv)
    except (ValueError, OSError, RunStopped) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    run()
