"""The latent cache: written once (sharded, resumable), read back exactly, and training batches from
it equal on-the-fly encoding: the same flips and the same posterior draws from the same generator."""

import os

import numpy as np
import PIL.Image
import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import REPO
from safetensors.torch import load_file

from diffusers_afm import AFMPipeline

from diffusers_afm.data import (
    ImageTransform,
    LatentCacheDataset,
    cache_shards,
    cached_latents,
    collate,
    collate_latents,
    encode_cache_batch,
    load_image_dataset,
    prepare_dataset,
    random_flip,
    sample_posterior,
    select_flip,
)

import cache_latents


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture(scope="module")
def vae(tiny_vae_dir):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_vae_dir).eval()


def make_image_folder(root):
    """11 images of two classes (sizes that need resizing and cropping) and one corrupt file."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for label, count in (("cat", 6), ("dog", 5)):
        (root / label).mkdir()
        for i in range(count):
            PIL.Image.fromarray(rng.integers(0, 256, (20, 26, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    (root / "dog" / "broken.png").write_bytes(b"not a png at all")
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


def _cache(folder, vae_dir, out, *flags):
    return cache_latents.main(["--train_data_dir", str(folder), "--resolution", "16", "--vae", vae_dir,
                               "--output_dir", str(out), "--shard_size", "4", "--batch_size", "3",
                               "--dataloader_num_workers", "0", *flags])


def _read_all(dataset):
    return [dataset[i] for i in range(len(dataset))]


def test_posterior_draw_matches_latent_dist_sample_bit_for_bit(vae, tiny_vae_dir):
    from diffusers import AutoencoderKL

    pixels = torch.rand(3, 3, 16, 16) * 2 - 1
    # bf16: what the trainer encodes in under --mixed_precision bf16.
    for model in (vae, AutoencoderKL.from_pretrained(tiny_vae_dir, dtype=torch.bfloat16)):
        latent_dist = model.encode(pixels.to(model.dtype)).latent_dist
        on_the_fly = latent_dist.sample(generator=torch.Generator().manual_seed(0))
        cached = sample_posterior(latent_dist.mean, latent_dist.std, torch.Generator().manual_seed(0))
        assert cached.dtype == model.dtype and torch.equal(cached, on_the_fly)


def test_select_flip_draws_what_random_flip_draws():
    batch = {"latent_mean": torch.randn(16, 2, 4, 2, 2), "latent_std": torch.rand(16, 2, 4, 2, 2),
             "class_labels": torch.arange(16)}
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    # One-row images [0, 1]: a flipped one reads [1, 0].
    pixels = torch.tensor([0.0, 1.0]).expand(16, 1, 1, 2)
    was_flipped = random_flip(pixels, generator=g1)[:, 0, 0, 0] == 1.0
    picked = select_flip(batch, generator=g2)
    assert torch.equal(g1.get_state(), g2.get_state())  # the same draws were consumed
    assert 0 < was_flipped.sum() < 16
    expected = torch.where(was_flipped[:, None, None, None], batch["latent_mean"][:, 1], batch["latent_mean"][:, 0])
    assert torch.equal(picked["latent_mean"], expected)
    assert picked["latent_std"].shape == (16, 4, 2, 2) and torch.equal(picked["class_labels"], batch["class_labels"])


def test_cache_round_trip_and_training_batches_equal_on_the_fly(tmp_path, image_folder, tiny_vae_dir, vae, caplog):
    out = tmp_path / "cache"
    _cache(image_folder, tiny_vae_dir, out)
    assert "broken.png" in caplog.text
    cache = LatentCacheDataset(str(out))
    assert len(cache) == 12 and cache.num_classes == 2 and cache.id2label == {0: "cat", 1: "dog"}
    assert cache.latent_shape == (4, 8, 8) and cache.scaling_factor == vae.config.scaling_factor
    assert sorted(os.listdir(out)) == ["cache_info.json"] + [f"shard-{k:05d}.safetensors" for k in range(3)]

    # Round trip: each row is the encoding of the dataset row (the broken image is a gap).
    images = prepare_dataset(load_image_dataset(train_data_dir=str(image_folder)), "image", "label",
                             ImageTransform(16, True, "RGB"))
    rows = _read_all(cache)
    assert [row is None for row in rows] == [images[i]["pixel_values"] is None for i in range(12)]
    for i in (0, 7, 11):
        if rows[i] is None:
            continue
        expected = encode_cache_batch(vae, images[i]["pixel_values"][None])
        assert torch.allclose(rows[i]["latent_mean"], expected["latent_mean"][0], atol=1e-6)
        assert torch.allclose(rows[i]["latent_std"], expected["latent_std"][0], atol=1e-6)
        assert rows[i]["class_labels"] == images[i]["class_labels"]

    # The trainer's loop both ways, with the same loader seed and the same noise generator.
    def loader(dataset, collate_fn):
        return torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True, drop_last=True, collate_fn=collate_fn,
                                           generator=torch.Generator().manual_seed(0))

    g_fly, g_cache = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    batches = 0
    for fly, cached in zip(loader(images, collate), loader(cache, collate_latents)):
        assert torch.equal(fly["class_labels"], cached["class_labels"])
        pixels = random_flip(fly["pixel_values"], generator=g_fly)
        x0_fly = vae.encode(pixels).latent_dist.sample(generator=g_fly)
        x0_cache = cached_latents(cached, g_cache)
        # The draws are identical; the encodings differ at most by the VAE's batch-dependent round-off.
        assert torch.allclose(x0_fly, x0_cache, atol=1e-5, rtol=0)
        assert torch.equal(g_fly.get_state(), g_cache.get_state())
        batches += 1
    assert batches == 3


def test_without_random_flip_the_unflipped_posterior_is_used():
    batch = {"latent_mean": torch.randn(4, 2, 4, 2, 2), "latent_std": torch.zeros(4, 2, 4, 2, 2)}
    assert torch.equal(cached_latents(batch, torch.Generator().manual_seed(0), random_flip=False),
                       batch["latent_mean"][:, 0])


def test_interrupted_cache_resumes_without_rewriting(tmp_path, image_folder, tiny_vae_dir):
    assert cache_shards(12, 4, 0, 2) == [0, 2] and cache_shards(12, 4, 1, 2) == [1]
    whole = tmp_path / "whole"
    _cache(image_folder, tiny_vae_dir, whole)
    out = tmp_path / "cache"
    _cache(image_folder, tiny_vae_dir, out, "--max_shards", "1")
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.safetensors"]
    with pytest.raises(ValueError, match="incomplete"):
        LatentCacheDataset(str(out))
    first = os.stat(out / "shard-00000.safetensors").st_ino
    (out / ".shard-00001.safetensors.tmp-xyz").write_bytes(b"half")  # a killed writer's leftover
    _cache(image_folder, tiny_vae_dir, out)
    assert os.stat(out / "shard-00000.safetensors").st_ino == first
    for a, b in zip(_read_all(LatentCacheDataset(str(out))), _read_all(LatentCacheDataset(str(whole)))):
        assert (a is None and b is None) or all(torch.equal(a[k], b[k]) for k in ("latent_mean", "latent_std"))
    with pytest.raises(ValueError, match=r"resolution: 16 -> 8"):
        cache_latents.main(["--train_data_dir", str(image_folder), "--resolution", "8", "--vae", tiny_vae_dir,
                            "--output_dir", str(out), "--shard_size", "4", "--dataloader_num_workers", "0"])


def test_not_a_cache_or_another_vae_is_a_clear_error(tmp_path, image_folder, tiny_vae_dir, vae, caplog):
    with pytest.raises(FileNotFoundError, match="cache_info.json"):
        LatentCacheDataset(str(tmp_path))
    _cache(image_folder, tiny_vae_dir, tmp_path / "cache")
    cache = LatentCacheDataset(str(tmp_path / "cache"))
    cache.check_compatible(vae, resolution=16, num_classes=2)
    with pytest.raises(ValueError, match="holds 16 px images; `--resolution` is 32"):
        cache.check_compatible(vae, resolution=32)
    with pytest.raises(ValueError, match="outside the model's classes 0..0"):
        cache.check_compatible(vae, num_classes=1)
    with pytest.raises(ValueError, match="needs the VAE"):
        cache.check_compatible(None)
    from diffusers import AutoencoderKL

    cache.check_compatible(AutoencoderKL.from_pretrained(tiny_vae_dir, dtype=torch.bfloat16))
    assert "not bit for bit" in caplog.text


def test_training_from_the_cache_matches_on_the_fly_encoding(tmp_path, image_folder, tiny_vae_dir):
    """The trainer's --latent_cache path trains the same model as encoding every batch with the VAE."""
    import train_afm

    _cache(image_folder, tiny_vae_dir, tmp_path / "cache")
    common = ["--model_config", str(REPO / "tests" / "fixtures" / "tiny_model.json"), "--train_batch_size", "4",
              "--max_train_steps", "4", "--checkpointing_steps", "4", "--report_to", "none", "--random_flip",
              "--num_validation_images", "1", "--vae", tiny_vae_dir, "--resolution", "16"]
    train_afm.main(["--train_data_dir", str(image_folder), "--output_dir", str(tmp_path / "fly"), *common])
    AcceleratorState._reset_state(True)
    train_afm.main(["--latent_cache", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "cached"), *common])
    for name in ("model.safetensors", "model_1.safetensors"):
        a = load_file(tmp_path / "fly" / "checkpoint-4" / name)
        b = load_file(tmp_path / "cached" / "checkpoint-4" / name)
        for key in a:  # equal up to the VAE encoder's batch-dependent round-off
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=f"{name}: {key}")
    pipe = AFMPipeline.from_pretrained(tmp_path / "cached")
    assert pipe.vae is not None and pipe.id2label == {0: "cat", 1: "dog"}
