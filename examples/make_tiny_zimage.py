#!/usr/bin/env python
"""Build a tiny, randomly initialised Z-Image pipeline and a folder of captioned images, locally.

    python examples/make_tiny_zimage.py --pipeline_dir tiny-zimage --images_dir captioned-digits

`tiny-zimage/` is a real `ZImagePipeline` folder (diffusers' `ZImageTransformer2DModel`, a 16-channel
`AutoencoderKL`, a Qwen3 text encoder and a word-level tokenizer with a chat template, the flow
scheduler with shift 3), a few hundred thousand parameters in all: what `examples/train_cafm_t2i.py`
takes in place of `Tongyi-MAI/Z-Image` to run end to end on a CPU, and what the tests build. Nothing
is downloaded. `captioned-digits/` holds the embedded digits as 16 px colour PNGs with a
`metadata.jsonl` of captions ("a red digit seven"), the `imagefolder` layout of diffusers'
text-to-image trainers.
"""

import argparse
import json
import os

import numpy as np
import PIL.Image
import torch

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "white": (240, 240, 240)}
SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
WORDS = ["user", "assistant", "a", "an", "digit", "of", "the", "photo"] + NUMBERS + list(COLOURS)
# The Qwen chat layout that `ZImagePipeline.encode_prompt` formats prompts with.
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
TRANSFORMER = dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=64, n_layers=2, n_refiner_layers=1,
                   n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=32, rope_theta=256.0,
                   t_scale=1000.0, axes_dims=[8, 12, 12], axes_lens=[640, 32, 32])


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                        additional_special_tokens=SPECIAL[2:])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_zimage_pipeline(seed: int = 0, transformer_config: dict = None):
    """A `ZImagePipeline` of tiny random components (seeded)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    transformer = ZImageTransformer2DModel(**(transformer_config or TRANSFORMER))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, scaling_factor=0.3611, shift_factor=0.1159)
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                          head_dim=16, max_position_embeddings=1024, pad_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                          transformer=transformer)


def write_captioned_digits(folder: str, count: int = 64, resolution: int = 16, seed: int = 0) -> int:
    """`count` embedded digits as colour PNGs with a metadata.jsonl of captions; returns the count."""
    from diffusers_afm.data import digits_dataset

    digits = digits_dataset("train")
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i in range(min(count, len(digits))):
        row = digits[i]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        grey = np.asarray(row["image"].resize((resolution, resolution), PIL.Image.BICUBIC), dtype=np.float32) / 255.0
        rgb = (grey[..., None] * np.array(COLOURS[colour], dtype=np.float32)).clip(0, 255).astype(np.uint8)
        name = f"{i:04d}.png"
        PIL.Image.fromarray(rgb).save(os.path.join(folder, name))
        rows.append({"file_name": name, "text": f"a {colour} digit {NUMBERS[row['label']]}"})
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return len(rows)


def main(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline_dir", default=None, help="Write the tiny ZImagePipeline folder here.")
    p.add_argument("--images_dir", default=None, help="Write the captioned digits here.")
    p.add_argument("--num_images", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.pipeline_dir is None and args.images_dir is None:
        p.error("give --pipeline_dir and/or --images_dir")
    if args.pipeline_dir:
        tiny_zimage_pipeline(args.seed).save_pretrained(args.pipeline_dir, safe_serialization=True)
        print(f"wrote {args.pipeline_dir}")
    if args.images_dir:
        n = write_captioned_digits(args.images_dir, args.num_images, seed=args.seed)
        print(f"wrote {n} captioned images to {args.images_dir}")


if __name__ == "__main__":
    main()
