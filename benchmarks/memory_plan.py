#!/usr/bin/env python
"""The memory plan of each published recipe under DDP and FSDP2, and the activations of a step, measured.

    OMP_NUM_THREADS=2 python benchmarks/memory_plan.py --json benchmarks/results_memory_plan.json

Part 1 builds every recipe's real networks on the meta device (no memory) and gives the bytes per
GPU of the training state (`diffusers_afm.training.memory.memory_plan`: float32 weights, gradients,
AdamW moments and EMA; frozen helpers in their dtype) under DDP and FSDP2 full shard on 1, 8, 16 and
32 GPUs, and whether it fits an 80 GB (H100) and a 141 GB (H200) GPU before activations.

Part 2 measures, at toy size on the CPU, the bytes one D step and one G step save for their backward
pass (`saved_activation_bytes`), with and without `--gradient_checkpointing`: what activations cost per
sample, and what checkpointing saves. docs/training.md ("Scaling out") extrapolates them.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, format_table, trunk, write_json  # noqa: E402

ZIMAGE = dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
              n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0,
              t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=151936, head_dim=128, tie_word_embeddings=True)


def recipes():
    """Each recipe's networks on the meta device: (name, trained networks, EMA names, frozen helpers)."""
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from diffusers_afm import (
        AdversarialFlowDiscriminator,
        AdversarialFlowJiTDiscriminator,
        AdversarialFlowTransformer2DModel,
        AdversarialFlowZImageDiscriminator,
        FlowMatchingTransformer2DModel,
        JiTTransformer2DModel,
    )

    imagenet = dict(sample_size=32, in_channels=4, num_classes=1000)
    with torch.device("meta"):
        xl2 = trunk("XL/2")
        yield "AFM XL/2, 1 NFE", {"generator": AdversarialFlowTransformer2DModel(**xl2, **imagenet),
                                  "discriminator": AdversarialFlowDiscriminator(**xl2, **imagenet)}, ["generator"], {}
        # depth_repeat runs the same 28 blocks 4 times: the weights of XL/2, four times the activations.
        yield "AFM XL/2 x4 (112 layers), 1 NFE", {"generator": AdversarialFlowTransformer2DModel(**xl2, **imagenet, depth_repeat=4),
                                                  "discriminator": AdversarialFlowDiscriminator(**xl2, **imagenet)}, ["generator"], {}
        sit = FlowMatchingTransformer2DModel(**xl2, **imagenet, time_scale=1.0)
        yield "CAFM SiT-XL/2", {"generator": sit, "discriminator": AdversarialFlowDiscriminator(
            **xl2, **imagenet, use_timestep=True, norm_type="rms_norm", use_null_class=True, time_scale=1.0)}, ["generator"], {}
        jit = JiTTransformer2DModel.from_jit_preset("JiT-H/16")
        config = {k: v for k, v in jit.config.items() if not k.startswith("_")}
        jit_d = AdversarialFlowJiTDiscriminator(**{k: config[k] for k in (
            "sample_size", "patch_size", "in_channels", "num_layers", "num_attention_heads", "attention_head_dim",
            "mlp_ratio", "bottleneck_dim", "in_context_len", "in_context_start", "num_classes")}, use_null_class=True)
        yield "CAFM JiT-H/16", {"generator": jit, "discriminator": jit_d}, ["generator"], {}
        zimage = ZImageTransformer2DModel(**ZIMAGE)
        yield "CAFM Z-Image (6B)", {"generator": zimage, "discriminator": AdversarialFlowZImageDiscriminator.for_transformer(zimage)}, \
            ["generator"], {"text encoder": (Qwen3Model(Qwen3Config(**QWEN3_4B)), torch.bfloat16)}


def plans():
    from diffusers_afm.training.memory import GPU_MEMORY_GIB, PROCESS_COUNTS, fits, memory_plan

    rows, parts = [], {}
    for name, trained, ema, frozen in recipes():
        plan = memory_plan(trained, ema, frozen)
        parts[name] = plan
        for strategy in ("ddp", "fsdp2"):
            for n in PROCESS_COUNTS:
                gib = plan["per_gpu_gib"][strategy][n]
                rows.append({"recipe": name, "strategy": strategy, "GPUs": n, "GiB per GPU": gib,
                             **{f"fits {gpu}": "yes" if fits(gib, memory) else "no" for gpu, memory in GPU_MEMORY_GIB.items()}})
    return rows, parts


def activations(batch_size: int):
    """Saved-for-backward bytes of one AFM D and G step and one CAFM D and G step, at toy size, with and
    without gradient checkpointing (the trainer's own steps, fp32, one process)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from diffusers_afm import AdversarialFlowDiscriminator, AdversarialFlowTransformer2DModel, FlowMatchingTransformer2DModel
    from diffusers_afm.training import AFMObjective, AFMTrainingStep
    from diffusers_afm.training.cafm import CAFMObjective, CAFMTrainingStep
    from diffusers_afm.training.memory import saved_activation_bytes

    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True)
    shape = dict(sample_size=16, in_channels=4, num_classes=10, **trunk("S/2-4"))
    torch.manual_seed(0)
    x0, labels = torch.randn(batch_size, 4, 16, 16), torch.randint(0, 10, (batch_size,))
    rows = []

    def measure(kind, networks, d_step, g_step):
        for checkpointing in (False, True):
            for net in networks:
                (net.enable_gradient_checkpointing if checkpointing else net.disable_gradient_checkpointing)()
            for name, step in (("D step", d_step), ("G step", g_step)):
                saved = saved_activation_bytes(step, networks)
                rows.append({"step": f"{kind} {name}", "checkpointing": checkpointing, "batch": batch_size,
                             "tokens": 64, "width": 384, "blocks": 4, "saved MiB": saved / 2**20,
                             "MiB per sample": saved / 2**20 / batch_size})

    g, d = AdversarialFlowTransformer2DModel(**shape), AdversarialFlowDiscriminator(**shape)
    opt = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-5)  # noqa: E731
    afm = AFMTrainingStep(accelerator, g, d, opt(g), opt(d), AFMObjective(), noise_generator=torch.Generator().manual_seed(0))
    measure("AFM", (g, d), lambda: afm.discriminator_step(x0, labels, 0), lambda: afm.generator_step(x0, labels, 1))
    flow = FlowMatchingTransformer2DModel(**shape)
    cafm_d = AdversarialFlowDiscriminator.for_flow_model(flow)
    cafm = CAFMTrainingStep(accelerator, flow, cafm_d, opt(flow), opt(cafm_d), CAFMObjective(), null_class_id=10,
                            noise_generator=torch.Generator().manual_seed(0))
    measure("CAFM", (flow, cafm_d), lambda: cafm.discriminator_step(x0, *cafm.draw(x0, labels)),
            lambda: cafm.generator_step(x0, *cafm.draw(x0, labels)))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--batch_size", type=int, default=4, help="Part 2's batch.")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows, parts = plans()
    print(format_table(rows, ["recipe", "strategy", "GPUs", "GiB per GPU", "fits 80 GB", "fits 141 GB"]))
    for name, plan in parts.items():
        print(f"\n{name}: " + ", ".join(f"{p['part']} {p['parameters'] / 1e9:.2f}B {p['GiB']:.1f} GiB" for p in plan["parts"]))
    measured = activations(args.batch_size)
    print()
    print(format_table(measured, ["step", "checkpointing", "batch", "tokens", "width", "blocks", "saved MiB", "MiB per sample"]))
    write_json(args.json, {"environment": environment(torch.device("cpu")), "plans": rows,
                           "parts": {k: v["parts"] for k, v in parts.items()}, "activations": measured})


if __name__ == "__main__":
    main()
