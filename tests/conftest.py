"""Shared test fixtures: offline Hub, the official reference fixtures, tiny models."""

import json
import os
from pathlib import Path

# No test touches the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# One CPU thread count for the whole suite and the scripts it runs in subprocesses. Kernels round
# differently with the thread count, and a trainer run in this process would otherwise choose its
# count from the machine's load at that moment (`training.run.set_cpu_threads`), so a bit-for-bit
# comparison with a subprocess would depend on what else the machine was running.
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))

OFFICIAL = Path(__file__).parent / "fixtures" / "official"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate's process state reset around a test that builds an Accelerator (a trainer run)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture(scope="session")
def official_meta():
    return json.loads((OFFICIAL / "fixtures.json").read_text())["models"]


def tiny_generator_config(**overrides):
    config = dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        num_classes=10,
    )
    config.update(overrides)
    return config


def randomize_(model, std=0.05, seed=0):
    """Perturb every parameter so zero-initialised layers do not hide bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    """A tiny randomly initialised SD-style VAE (4 latent channels, 2x downsampling) saved locally."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
    )
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(path)
    return str(path)
