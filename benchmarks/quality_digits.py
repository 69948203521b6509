#!/usr/bin/env python
"""Sample quality of the README's default model on scikit-learn's handwritten digits.

    python benchmarks/quality_digits.py                       # train the default, then measure
    python benchmarks/quality_digits.py --pipeline afm-digits # measure an already trained folder
    python benchmarks/quality_digits.py --pipeline afm-color-digits --output quality_color_digits.json
                                                              # the colour digits (docs/training_recipes.md)

Trains `examples/train_afm.py` with its defaults (the digits' train split), samples class-
conditionally with the EMA generator, and measures against the held-out split, with an
independent classifier (an MLP on the real train split):

- accuracy of that classifier on the samples (their conditioning class as the truth), next to its
  accuracy on the held-out real digits;
- the Fréchet distance in the classifier's hidden features between the samples and the held-out
  split, with train-vs-held-out as the floor;
- the distance from each sample to its nearest training image, against the same for held-out
  images (a memorisation check: samples much closer than held-out digits would be copies).

Prints a table last and writes JSON.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))


def digits_arrays(split):
    from diffusers_afm.data import digits_dataset

    ds = digits_dataset(split)
    images = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in ds["image"]])
    return images.reshape(len(images), -1), np.asarray(ds["label"])


def train_classifier(x, y, seed):
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=2000, random_state=seed)
    return clf.fit(x, y)


def hidden_features(clf, x):
    """The classifier's hidden layer (ReLU), the feature space of the Fréchet distance."""
    return np.maximum(x @ clf.coefs_[0] + clf.intercepts_[0], 0.0)


def nearest_distance(queries, references):
    d = torch.cdist(torch.as_tensor(queries, dtype=torch.float64), torch.as_tensor(references, dtype=torch.float64))
    return d.min(dim=1).values.numpy()


def sample(pipeline_dir, per_class, seed, batch_size=500, **sample_kwargs):
    from diffusers_afm import AFMPipeline

    pipe = AFMPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    labels = np.repeat(np.arange(pipe.transformer.config.num_classes), per_class)
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(labels), batch_size):
        chunk = labels[start : start + batch_size].tolist()
        out.append(pipe(class_labels=chunk, generator=generator, output_type="np", **sample_kwargs).images)
    images = np.concatenate(out)  # (N, H, W, C) in [0, 1]
    return digit_pixels(images), labels


def digit_pixels(images):
    """(N, H, W, C) images in [0, 1] -> the digits' (N, 64) grey pixels. Grey digits: the channel
    mean. The colour digits (`examples/make_color_digits.py`, a saturated stroke on black): the
    brightest channel, which is the stroke's intensity whatever its hue. Larger images are averaged
    down to 8x8 in blocks."""
    grey = images.max(axis=-1) if images.shape[-1] == 3 and not np.allclose(images[..., 0], images[..., 1]) \
        else images.mean(axis=-1)
    n, h, w = grey.shape
    if h != 8 or w != 8:
        if h % 8 or w % 8:
            raise ValueError(f"The pipeline makes {h}x{w} images; a multiple of the digits' 8x8 is needed.")
        grey = grey.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4))
    return grey.reshape(n, -1).astype(np.float32)


def measure(pipeline_dir, per_class=100, seed=0, **sample_kwargs):
    """The metrics of one pipeline folder; `sample_kwargs` go to the pipeline call (a flow model's
    `num_inference_steps`, `solver`, `guidance_scale`)."""
    from diffusers_afm.evaluation import feature_statistics, frechet_distance

    x_train, y_train = digits_arrays("train")
    x_test, y_test = digits_arrays("test")
    clf = train_classifier(x_train, y_train, seed)
    x_gen, y_gen = sample(pipeline_dir, per_class, seed, **sample_kwargs)
    if x_gen.shape[1] != x_train.shape[1]:
        raise ValueError(f"The pipeline makes {x_gen.shape[1]}-pixel images; the digits have {x_train.shape[1]}.")

    def fd(a, b):
        return frechet_distance(*feature_statistics(hidden_features(clf, a)), *feature_statistics(hidden_features(clf, b)))

    nn_gen = nearest_distance(x_gen, x_train)
    nn_test = nearest_distance(x_test, x_train)
    return {
        "classifier_accuracy_heldout_real": float(clf.score(x_test, y_test)),
        "classifier_accuracy_generated": float(clf.score(x_gen, y_gen)),
        "frechet_generated_vs_heldout": fd(x_gen, x_test),
        "frechet_train_vs_heldout": fd(x_train, x_test),
        "nn_distance_generated_to_train": float(nn_gen.mean()),
        "nn_distance_heldout_to_train": float(nn_test.mean()),
        "num_generated": int(len(x_gen)),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default=None, help="A trained pipeline folder; default: train one first.")
    parser.add_argument("--output_dir", default="afm-digits-quality", help="Where the default model is trained.")
    parser.add_argument("--per_class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="quality_digits.json")
    parser.add_argument("--train_args", nargs=argparse.REMAINDER, default=[], help="Extra flags for train_afm.py.")
    args = parser.parse_args(argv)

    seconds = None
    pipeline_dir = args.pipeline
    if pipeline_dir is None:
        import train_afm

        start = time.perf_counter()
        pipeline_dir = train_afm.main(["--output_dir", args.output_dir, "--report_to", "none", *args.train_args])
        seconds = time.perf_counter() - start
    results = measure(pipeline_dir, args.per_class, args.seed)
    results["training_seconds"] = seconds
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)

    print("| metric | generated | real floor |")
    print("|---|---|---|")
    print(f"| classifier accuracy | {results['classifier_accuracy_generated']:.3f} | {results['classifier_accuracy_heldout_real']:.3f} (held-out) |")
    print(f"| Fréchet distance to held-out (classifier features) | {results['frechet_generated_vs_heldout']:.2f} | {results['frechet_train_vs_heldout']:.2f} (train) |")
    print(f"| mean nearest-train distance | {results['nn_distance_generated_to_train']:.3f} | {results['nn_distance_heldout_to_train']:.3f} (held-out) |")
    return results


if __name__ == "__main__":
    main()
