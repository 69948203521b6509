#!/usr/bin/env python
"""Our CAFM step side by side with the authors' trainer on one toy setting (docs/cafm.md, "Evidence:
where CAFM helps"): same data stream, same flow-matching baseline, same discriminator init, same
label-dropout/time/noise draws.

    python benchmarks/cafm_side_by_side.py --authors_repo /tmp/authors --dataset blobs --seed 0 \
        --flow_train_steps 3000 --settings heun:125 euler:8 --trace_every 50 --output /tmp/sbs.json

`--authors_repo` is a checkout of ByteDance-Seed/Adversarial-Flow-Models (519601d); nothing of it
is copied here. Its `ContinuousAdversarialFlowTrainer` is imported from there and driven as its
`training_loop` drives it (`prepare_input`, `training_step`, backward, `optimizer_step`,
`ema_step`), on our toy networks through two adapters (its `(x, y, t)` call with x as (B, D, 1, 1)
and its hard-coded null class 1000). Its imports that the loop never uses (torchvision,
torchmetrics, einops, wandb, omegaconf, deepdiff) are replaced by empty stand-ins, after our
library is imported. Its global RNG is seeded as our step's noise generator, and both draw in the
same order (dropout mask, times, noise), so the two runs see identical inputs.
"""
import argparse
import copy
import importlib.abc
import importlib.machinery
import json
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cafm_evidence as ce  # noqa: E402  (ours first: the stand-ins below would confuse transformers' torchvision probe)
from diffusers_afm.evaluation.conditional_toy import load_conditional_toy  # noqa: E402

AUTHORS_NULL = 1000  # their trainer hard-codes it
STUBBED = ("deepdiff", "torchvision", "torchmetrics", "einops", "wandb", "omegaconf")


class _Meta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Dummy()


class _Dummy(metaclass=_Meta):
    def __init__(self, *a, **k):
        pass

    def __call__(self, *a, **k):
        return self

    def __getattr__(self, name):
        return _Dummy()


class _StubModule(types.ModuleType):
    __path__ = []

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (_Dummy,), {})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        pass


def import_authors(repo: str):
    sys.meta_path.insert(0, _Finder())
    sys.path.insert(0, repo)
    import train_continuous_adversarial_flow_imagenet as trainer_module
    from models.cafm.jvp.discriminator import DiscriminatorJVP

    trainer_module.get_device = lambda: torch.device("cpu")
    return trainer_module, DiscriminatorJVP


class Cfg(dict):
    """The slice of their OmegaConf config that the loop reads (`.get` and attribute access)."""

    def __getattr__(self, k):
        return self[k]


def to_cfg(d):
    return Cfg({k: to_cfg(v) if isinstance(v, dict) else v for k, v in d.items()})


class GenAdapter(torch.nn.Module):
    """Their call `gen(x (B, D, 1, 1), y, t)` onto our toy velocity model; null 1000 -> our null K."""
    def __init__(self, model, K):
        super().__init__()
        self.model, self.K = model, K

    def forward(self, x, y, t):
        y = torch.where(y == AUTHORS_NULL, torch.full_like(y, self.K), y)
        return self.model(x.flatten(1), t, y).view_as(x)


class DisAdapter(torch.nn.Module):
    """Their call `dis(x, y, t) -> (B,)` onto our toy discriminator's plain value."""
    def __init__(self, model, K):
        super().__init__()
        self.model, self.K = model, K

    def forward(self, x, y, t):
        y = torch.where(y == AUTHORS_NULL, torch.full_like(y, self.K), y)
        return self.model(x.flatten(1), y, t)


def authors_post_train(T, DiscriminatorJVP, config, dataset, baseline, trace_every=0):
    torch.manual_seed(config.seed + 2)
    gen = copy.deepcopy(baseline).train().requires_grad_(True)
    dis = ce.build_discriminator(config, dataset, gen)
    K = dataset.num_classes
    tr = T.ContinuousAdversarialFlowTrainer.__new__(T.ContinuousAdversarialFlowTrainer)
    tr.config = to_cfg({
        "gen": {"dropout": config.class_dropout_prob},
        "adversarial": {"N": config.num_discriminator_steps, "cp_scale": config.cp_scale, "ot_scale": config.ot_scale,
                        "warmup": config.warmup},
        "training": {"timesteps": {"uniform": "uniform", "logit_normal": "logisticnormal"}[config.time_sampling],
                     "gradient_clip": 10000.0, "dis_gradient_clip": 10000.0},
        "ema": {"decay": config.ema_decay},
    })
    tr.gen = GenAdapter(gen, K)
    tr.dis = DiscriminatorJVP(DisAdapter(dis, K))
    tr.dis_trainable_params = [p for p in tr.dis.parameters() if p.requires_grad]
    betas = (config.beta1, config.beta2)
    tr.gen_optimizer = torch.optim.AdamW(params=tr.gen.parameters(), lr=config.learning_rate, weight_decay=0.0, betas=betas, fused=True)
    tr.dis_optimizer = torch.optim.AdamW(params=tr.dis.parameters(), lr=config.discriminator_learning_rate, weight_decay=0.0, betas=betas, fused=True)
    tr.ema = copy.deepcopy(tr.gen)
    torch.manual_seed(config.seed + 3)  # their draws come from the global RNG; ours from Generator(seed + 3)
    trace = []
    stream = ce.data_stream(dataset, config.batch_size, config.seed + 10)
    for step, (x0, labels) in zip(range(config.max_train_steps), stream):
        inputs = tr.prepare_input({"latent": x0.view(*x0.shape, 1, 1), "label": labels})
        losses, _ = tr.training_step(step, **inputs)
        losses["loss/total"].backward()
        tr.optimizer_step(step)
        tr.ema_step(step)
        if trace_every and (step + 1) % trace_every == 0:
            trace.append({"step": step + 1, **{k: float(v.detach()) for k, v in losses.items()},
                          "gen": torch.cat([p.detach().flatten() for p in gen.parameters()]).clone()})
    return tr.ema.model, trace


def ours_with_trace(config, dataset, baseline, trace_every):
    """ce.post_train_cafm, but keeping parameter snapshots (same code path, same seeds)."""
    snaps = []
    orig = ce.CAFMTrainingStep.__call__
    def wrapped(self, x0, labels, step):
        out = orig(self, x0, labels, step)
        if trace_every and (step + 1) % trace_every == 0:
            snaps.append({"step": step + 1, **{k: float(v) for k, v in out.items()},
                          "gen": torch.cat([p.detach().flatten() for p in self.generator.parameters()]).clone()})
        return out
    ce.CAFMTrainingStep.__call__ = wrapped
    try:
        model, _ = ce.post_train_cafm(config, dataset, baseline, 0)
    finally:
        ce.CAFMTrainingStep.__call__ = orig
    return model, snaps


def main():
    p = argparse.ArgumentParser(allow_abbrev=False)
    ce.add_config_arguments(p)
    p.add_argument("--authors_repo", required=True, help="a checkout of ByteDance-Seed/Adversarial-Flow-Models")
    p.add_argument("--trace_every", type=int, default=0)
    p.add_argument("--output", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    T, DiscriminatorJVP = import_authors(args.authors_repo)
    config = ce.config_from(args)
    dataset = load_conditional_toy(config.dataset)
    t0 = time.perf_counter(); baseline = ce.train_flow(config, dataset); t_fm = time.perf_counter() - t0
    t0 = time.perf_counter(); ours, ours_trace = ours_with_trace(config, dataset, baseline, args.trace_every); t_ours = time.perf_counter() - t0
    t0 = time.perf_counter(); theirs, their_trace = authors_post_train(T, DiscriminatorJVP, config, dataset, baseline, args.trace_every); t_theirs = time.perf_counter() - t0
    rec = {"config": vars(args), "seconds": {"flow_matching": t_fm, "ours": t_ours, "authors": t_theirs}, "trace": [], "results": {}}
    for a, b in zip(ours_trace, their_trace):
        rec["trace"].append({"step": a["step"], "max_abs_param_diff": float((a["gen"] - b["gen"]).abs().max()),
                             "ours": {k: v for k, v in a.items() if k not in ("gen", "step")},
                             "authors": {k: v for k, v in b.items() if k not in ("gen", "step")}})
    draw = ce.draws(dataset, config.samples_per_class, config.seed + ce.EVAL_SEED_OFFSET)
    for setting in config.settings:
        scale, _ = ce.pick_guidance(baseline, dataset, config, setting)
        row = {"guidance_scale": scale}
        for name, model in (("flow_matching", baseline), ("ours", ours), ("authors", theirs)):
            row[name] = {"unguided": ce.measure(model, dataset, setting, 1.0, draw)["w2_mean"],
                         "guided": ce.measure(model, dataset, setting, scale, draw)["w2_mean"]}
        rec["results"][setting] = row
        print(setting, json.dumps(row), flush=True)
    for t in rec["trace"]:
        print("step", t["step"], "max|dθ_G| ours vs authors %.2e" % t["max_abs_param_diff"])
    print(json.dumps(rec["seconds"]))
    if args.output:
        json.dump(rec, open(args.output, "w"), indent=1)


if __name__ == "__main__":
    main()
