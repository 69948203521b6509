"""JiT, "Just image Transformers" (Li and He, 2025, arXiv 2511.13720), as a flow-matching velocity
model: the pixel-space network that Continuous AFM post-trains for its best ImageNet result
(docs/cafm.md, "JiT").

JiT is a plain ViT on raw pixels that predicts the clean image `x0` (x-prediction). Its trunk:

    pixels -- bottleneck patch embedding (p x p conv to a narrow width, 1 x 1 conv up) + fixed sin-cos positions
           -- blocks: adaLN-modulated RMSNorm, attention with RMSNorm'd q/k and 2-D RoPE, SwiGLU MLP
              (before block `in_context_start`, `in_context_len` copies of the class embedding, each
              with a learned position, are prepended: the "in-context class tokens")
           -- adaLN final layer -- unpatchify -- x_pred

Time runs the other way in JiT (its t = 1 is clean), so the model embeds `1 - t`. Our convention
(docs/method.md, "Notation") is `x_t = (1 - t) x0 + t z` with t = 1 noise and velocity `z - x0`, so
the velocity of an x-prediction is `(x_t - x_pred) / t`; like JiT's own sampler and the CAFM
reference's generator, `t` is clamped below at `t_eps` = 0.05 there. `forward` returns that
velocity, with the calling convention of `FlowMatchingTransformer2DModel`, so the flow sampler
(`diffusers_afm.flow`), `AFMPipeline` and the CAFM training step use a JiT model unchanged;
`predict_sample` returns JiT's own x-prediction.

`JiTTransformer2DModel.from_jit_preset("JiT-H/16")` builds a released size; `afm-convert --format
jit` converts JiT's and the CAFM authors' checkpoints (`diffusers_afm.conversion.convert_jit_generator`).
"""

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, FeedForward
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import LabelEmbedding, get_2d_sincos_pos_embed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero

from .modules import AFMAttention, AFMTimestepEmbedding, as_batch_timesteps, init_linears_, unpatchify

# JiT's released sizes (its model_jit.py): patch 16 at 256 px, patch 32 at 512 px, where JiT also
# doubles the noise (its `--noise_scale 2.0` for 512 px). 32 in-context class tokens throughout.
_JIT_WIDTHS = {
    "B": dict(num_layers=12, num_attention_heads=12, attention_head_dim=64, bottleneck_dim=128, in_context_start=4),
    "L": dict(num_layers=24, num_attention_heads=16, attention_head_dim=64, bottleneck_dim=128, in_context_start=8),
    "H": dict(num_layers=32, num_attention_heads=16, attention_head_dim=80, bottleneck_dim=256, in_context_start=10),
}
JIT_PRESETS = {
    f"JiT-{width}/{patch}": dict(**sizes, patch_size=patch, sample_size=16 * patch, noise_scale=patch / 16,
                                 in_context_len=32)
    for width, sizes in _JIT_WIDTHS.items()
    for patch in (16, 32)
}
RMS_NORM_EPS = 1e-6  # JiT's RMSNorm (blocks, q/k norm, final layer)
ROPE_THETA = 10000.0


def jit_preset_config(name: str) -> dict:
    """The config of a released JiT size (`"JiT-B/16"`, ..., `"JiT-H/32"`), ImageNet's 1000 classes."""
    if name not in JIT_PRESETS:
        raise ValueError(f"Unknown JiT size {name!r}; allowed: {', '.join(JIT_PRESETS)}.")
    return dict(JIT_PRESETS[name])


def jit_rotary_embedding(grid_size: int, head_dim: int, num_prefix_tokens: int = 0,
                         device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """JiT's 2-D RoPE tables `(cos, sin)`, float32, shape `(num_prefix_tokens + grid_size**2, head_dim)`.

    Each axis gets half the head dims; rotations act on interleaved pairs `(x[2i], x[2i+1])` with
    frequencies `theta^(-4i / head_dim)`, `i < head_dim / 4`. The first half follows the patch row, the
    second the column; tokens are row-major. Prefix tokens (the in-context class tokens) are not
    rotated (cos 1, sin 0). Always float32, as JiT computes them, whatever the model's dtype.
    """
    half = head_dim // 2
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, half, 2, device=device).float() / half))  # (head_dim / 4,)
    # JiT writes the positions as arange(S) / S * S; the same expression keeps the angles' rounding.
    positions = torch.arange(grid_size, device=device) / grid_size * grid_size
    angles = torch.outer(positions, inv_freq).repeat_interleave(2, dim=-1)  # (S, head_dim / 2), pairs
    rows = angles[:, None, :].expand(grid_size, grid_size, half)
    cols = angles[None, :, :].expand(grid_size, grid_size, half)
    angles = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim)  # (S * S, head_dim)
    cos, sin = angles.cos(), angles.sin()
    if num_prefix_tokens:
        cos = torch.cat([cos.new_ones(num_prefix_tokens, head_dim), cos])
        sin = torch.cat([sin.new_zeros(num_prefix_tokens, head_dim), sin])
    return cos, sin


def apply_jit_rotary_embedding(x: torch.Tensor, rotary_emb: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate `x` of shape `(B, S, H, d)` by the tables of `jit_rotary_embedding`: `x cos + rot(x) sin`
    with `rot(x)[2i] = -x[2i+1]`, `rot(x)[2i+1] = x[2i]` (diffusers' `apply_rotary_emb(use_real=True)`
    rule). Computed in float32, or float64 for a float64 model (diffusers' helper would round that
    to float32), then cast back."""
    cos, sin = rotary_emb
    dtype = torch.promote_types(x.dtype, torch.float32)
    real, imag = x.to(dtype).unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    cos, sin = cos[:, None, :].to(dtype), sin[:, None, :].to(dtype)  # (S, 1, d): broadcast over heads
    return (x.to(dtype) * cos + rotated * sin).to(x.dtype)


class JiTRMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` with a learned scale, computed in float32 at least and returned in the input's
    dtype, as JiT's RMSNorm: under bf16 autocast the statistics keep float32 precision (and torch's
    fused kernel sees one dtype); float64 stays float64."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(hidden_states.dtype, torch.float32)
        weight = None if self.weight is None else self.weight.to(dtype)
        return F.rms_norm(hidden_states.to(dtype), self.normalized_shape, weight, self.eps).to(hidden_states.dtype)


class JiTAttnProcessor:
    """JiT's self-attention: q/k RMSNorm per head, 2-D RoPE, then diffusers' attention dispatcher.

    JiT itself forms the logits as `q.float() @ k.float()^T`; in float32 the dispatcher's kernels do
    the same arithmetic (the parity tests hold at 1e-5), and under bf16 autocast they accumulate in
    float32 but take bf16 q/k (docs/cafm.md, "JiT").
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn: "JiTAttention", hidden_states: torch.Tensor,
                 rotary_emb: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        # (B, S, H * d) -> (B, S, H, d), the layout dispatch_attention_fn takes.
        query, key, value = (x.unflatten(-1, (attn.heads, -1)) for x in (query, key, value))
        query = apply_jit_rotary_embedding(attn.norm_q(query), rotary_emb)
        key = apply_jit_rotary_embedding(attn.norm_k(key), rotary_emb)
        hidden_states = dispatch_attention_fn(
            query, key, value, dropout_p=attn.attention_dropout if attn.training else 0.0,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](hidden_states))


class JiTAttention(AFMAttention):
    """`AFMAttention` (biased q/k/v/out projections, the dispatcher) with JiT's per-head q/k RMSNorm,
    RoPE and dropouts (JiT's `attn_drop` on the attention weights, `proj_drop` after the output)."""

    _default_processor_cls = JiTAttnProcessor
    _available_processors = [JiTAttnProcessor]

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0, attention_dropout: float = 0.0):
        super().__init__(dim, heads, dim_head)
        self.norm_q = JiTRMSNorm(dim_head, eps=RMS_NORM_EPS)
        self.norm_k = JiTRMSNorm(dim_head, eps=RMS_NORM_EPS)
        self.to_out.append(nn.Dropout(dropout))
        self.attention_dropout = attention_dropout

    def forward(self, hidden_states: torch.Tensor, rotary_emb: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.processor(self, hidden_states, rotary_emb)


class JiTTransformerBlock(nn.Module):
    """A JiT block: adaLN-modulated RMSNorm (diffusers' `AdaLayerNormZero` chunk order, which is
    JiT's: shift, scale, gate for attention, then for the MLP), attention and a SwiGLU MLP, both as
    gated residuals."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, attention_dropout: float = 0.0):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)  # SiLU -> Linear(D, 6D)
        self.norm1.norm = JiTRMSNorm(dim, eps=RMS_NORM_EPS)  # JiT normalises with a learned-scale RMSNorm
        self.attn = JiTAttention(dim, num_attention_heads, attention_head_dim, dropout, attention_dropout)
        self.norm2 = JiTRMSNorm(dim, eps=RMS_NORM_EPS)
        # SwiGLU's hidden width is 2/3 of the MLP's (`mlp_ratio` D), as in JiT and LLaMA.
        self.ff = FeedForward(dim, inner_dim=int(int(dim * mlp_ratio) * 2 / 3), dropout=dropout, activation_fn="swiglu")

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor,
                rotary_emb: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
        hidden_states = hidden_states + gate_msa[:, None] * self.attn(norm_hidden_states, rotary_emb)
        norm_hidden_states = self.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return hidden_states + gate_mlp[:, None] * self.ff(norm_hidden_states)


class JiTPatchEmbed(nn.Module):
    """JiT's bottleneck patch embedding: a p x p convolution to `bottleneck_dim` channels (no bias),
    a 1 x 1 convolution up to the width, row-major tokens, plus the fixed 2-D sin-cos table."""

    def __init__(self, sample_size: int, patch_size: int, in_channels: int, bottleneck_dim: int, embed_dim: int):
        super().__init__()
        self.bottleneck = nn.Conv2d(in_channels, bottleneck_dim, kernel_size=patch_size, stride=patch_size, bias=False)
        self.proj = nn.Conv2d(bottleneck_dim, embed_dim, kernel_size=1, bias=True)
        grid_size = sample_size // patch_size
        pos_embed = get_2d_sincos_pos_embed(embed_dim, grid_size, base_size=grid_size, output_type="pt")
        # Recomputed, not stored (as diffusers' PatchEmbed): JiT keeps it frozen at these values.
        self.register_buffer("pos_embed", pos_embed.float().unsqueeze(0), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden_states = self.proj(self.bottleneck(pixels))  # (B, D, H / p, W / p)
        return hidden_states.flatten(2).transpose(1, 2) + self.pos_embed.to(hidden_states.dtype)  # (B, T, D)


class JiTTrunkMixin:
    """What the JiT generator and the CAFM JiT discriminator share: the embeddings, the blocks and the
    in-context class tokens. A model calls `_init_jit_trunk` in `__init__` and the helpers below in
    `forward`."""

    def _init_jit_trunk(self, block_cls, sample_size, patch_size, in_channels, num_layers, num_attention_heads,
                        attention_head_dim, mlp_ratio, bottleneck_dim, in_context_len, in_context_start, num_classes,
                        null_class: bool, dropout: float = 0.0, attention_dropout: float = 0.0) -> int:
        problems = [
            ("sample_size", sample_size, sample_size > 0 and sample_size % patch_size == 0,
             f"a positive multiple of patch_size={patch_size}"),
            ("attention_head_dim", attention_head_dim, attention_head_dim > 0 and attention_head_dim % 4 == 0,
             "a positive multiple of 4 (each RoPE axis rotates pairs in half the head)"),
            ("num_classes", num_classes, isinstance(num_classes, int) and num_classes >= 1, "a positive integer"),
            ("in_context_len", in_context_len, isinstance(in_context_len, int) and in_context_len >= 0, "an integer >= 0"),
            ("in_context_start", in_context_start, in_context_len == 0 or 0 <= in_context_start < num_layers,
             f"a block index in [0, {num_layers}) when in_context_len > 0"),
        ]
        for name, value, ok, allowed in problems:
            if not ok:
                raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")
        inner_dim = num_attention_heads * attention_head_dim
        self.patch_embed = JiTPatchEmbed(sample_size, patch_size, in_channels, bottleneck_dim, inner_dim)
        # num_classes + 1 rows with a null class (diffusers' LabelEmbedding adds it for dropout_prob > 0).
        self.class_embedder = LabelEmbedding(num_classes, inner_dim, dropout_prob=0.1 if null_class else 0.0)
        self.time_embed = AFMTimestepEmbedding(inner_dim, scale=1.0)  # JiT's sinusoid takes its time unscaled
        if in_context_len > 0:
            self.in_context_pos_embed = nn.Parameter(torch.zeros(1, in_context_len, inner_dim))
        # JiT's dropouts act on the middle half of the blocks only.
        middle = range(num_layers // 4, 3 * num_layers // 4)
        self.transformer_blocks = nn.ModuleList([
            block_cls(inner_dim, num_attention_heads, attention_head_dim, mlp_ratio,
                      dropout=dropout if i in middle else 0.0, attention_dropout=attention_dropout if i in middle else 0.0)
            for i in range(num_layers)
        ])
        self.gradient_checkpointing = False
        return inner_dim

    def _check_pixels(self, hidden_states: torch.Tensor) -> None:
        config = self.config
        expected = (config.in_channels, config.sample_size, config.sample_size)
        if hidden_states.ndim != 4 or tuple(hidden_states.shape[1:]) != expected:
            raise ValueError(f"`hidden_states` must have shape (batch, {', '.join(map(str, expected))}) (JiT's fixed "
                             f"image size), got {tuple(hidden_states.shape)}.")

    def _class_embedding(self, class_labels: torch.LongTensor, dtype: torch.dtype) -> torch.Tensor:
        # The table itself: LabelEmbedding.forward would drop labels in train mode (the training step does).
        return self.class_embedder.embedding_table(class_labels).to(dtype)  # (B, D)

    def _conditioning(self, timestep: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        """adaLN's input `c = time(1 - t) + class`: JiT's time runs the other way (t = 1 clean)."""
        return self.time_embed(1 - timestep, class_emb.dtype) + class_emb  # (B, D)

    def _rotary_embeddings(self, device) -> Tuple[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]:
        """The RoPE tables before and after the in-context tokens are prepended."""
        config = self.config
        grid_size = config.sample_size // config.patch_size
        image = jit_rotary_embedding(grid_size, config.attention_head_dim, 0, device)
        if config.in_context_len == 0:
            return image, image
        return image, jit_rotary_embedding(grid_size, config.attention_head_dim, config.in_context_len, device)

    def _in_context_tokens(self, class_emb: torch.Tensor) -> torch.Tensor:
        """`in_context_len` copies of the class embedding, each plus its learned position: (B, L, D)."""
        tokens = class_emb[:, None, :].expand(-1, self.config.in_context_len, -1)
        return tokens + self.in_context_pos_embed.to(class_emb.dtype)

    def _prepends_at(self, index: int) -> bool:
        return self.config.in_context_len > 0 and index == self.config.in_context_start

    def _init_jit_trunk_weights(self) -> None:
        """JiT's initialisation: xavier-uniform linears (and convolutions, as flat linears), zero biases,
        N(0, 0.02) class table, time MLP and in-context positions, zero adaLN (blocks start as identity)."""
        init_linears_(self)
        for conv in (self.patch_embed.bottleneck, self.patch_embed.proj):
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.time_embed.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_embed.timestep_embedder.linear_2.weight, std=0.02)
        if self.config.in_context_len > 0:
            nn.init.normal_(self.in_context_pos_embed, std=0.02)
        for block in self.transformer_blocks:
            nn.init.zeros_(block.norm1.linear.weight)
            nn.init.zeros_(block.norm1.linear.bias)


class JiTTransformer2DModel(ModelMixin, ConfigMixin, AttentionMixin, PeftAdapterMixin, JiTTrunkMixin):
    r"""
    JiT as a class-conditional flow-matching velocity model `v(x_t, t, c)` in pixel space.

    Args:
        sample_size (`int`, defaults to 256): Image height and width (JiT's fixed size).
        patch_size (`int`, defaults to 16): Patch size.
        in_channels (`int`, defaults to 3): Image channels.
        num_layers (`int`, defaults to 12): Number of transformer blocks.
        num_attention_heads (`int`, defaults to 12): Heads per attention layer.
        attention_head_dim (`int`, defaults to 64): Channels per head (a multiple of 4, for the 2-D RoPE).
        mlp_ratio (`float`, defaults to 4.0): The MLP width over the model width (SwiGLU uses 2/3 of it).
        bottleneck_dim (`int`, defaults to 128): Width of the patch embedding's bottleneck.
        in_context_len (`int`, defaults to 32): Number of in-context class tokens (0: none).
        in_context_start (`int`, defaults to 4): The block before which they are prepended.
        num_classes (`int`, defaults to 1000): Number of real classes.
        class_dropout_prob (`float`, defaults to 0.1): The probability with which training replaces a
            label by the null class (JiT's and CAFM's 0.1). When > 0 the class table has one more row,
            the null class `num_classes`, which classifier-free guidance uses. The training step drops
            the labels; the model's forward never does.
        noise_scale (`float`, defaults to 1.0): The standard deviation of the noise `z` of the flow the
            model was trained on (JiT's `--noise_scale`: 1 at 256 px, 2 at 512 px); the pipeline draws
            its initial noise with it.
        t_eps (`float`, defaults to 0.05): The velocity is `(x_t - x_pred) / max(t, t_eps)` (JiT's `t_eps`).
        dropout (`float`, defaults to 0.0): Dropout after the attention output and inside the MLP, in
            the middle half of the blocks (JiT's `proj_dropout`; JiT-H trains with 0.2).
        attention_dropout (`float`, defaults to 0.0): Dropout on the attention weights, same blocks.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["JiTTransformerBlock"]
    _repeated_blocks = ["JiTTransformerBlock"]
    _skip_layerwise_casting_patterns = ["patch_embed", "norm"]
    # The sampler of `AFMPipeline`'s default scheduler for this model (`default_scheduler`): JiT's own (docs/cafm.md, "JiT").
    default_solver = "heun_final_euler"

    @register_to_config
    def __init__(
        self,
        sample_size: int = 256,
        patch_size: int = 16,
        in_channels: int = 3,
        num_layers: int = 12,
        num_attention_heads: int = 12,
        attention_head_dim: int = 64,
        mlp_ratio: float = 4.0,
        bottleneck_dim: int = 128,
        in_context_len: int = 32,
        in_context_start: int = 4,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        noise_scale: float = 1.0,
        t_eps: float = 0.05,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
    ):
        super().__init__()
        for name, value, low, high in (("class_dropout_prob", class_dropout_prob, 0.0, 1.0),
                                       ("dropout", dropout, 0.0, 1.0), ("attention_dropout", attention_dropout, 0.0, 1.0)):
            if not low <= value < high:
                raise ValueError(f"`{name}` must be in [{low}, {high}), got {value!r}.")
        for name, value in (("noise_scale", noise_scale), ("t_eps", t_eps)):
            if not value > 0:
                raise ValueError(f"`{name}` must be > 0, got {value!r}.")
        inner_dim = self._init_jit_trunk(
            JiTTransformerBlock, sample_size, patch_size, in_channels, num_layers, num_attention_heads,
            attention_head_dim, mlp_ratio, bottleneck_dim, in_context_len, in_context_start, num_classes,
            null_class=class_dropout_prob > 0, dropout=dropout, attention_dropout=attention_dropout,
        )
        self.out_channels = in_channels
        # JiT's final layer: RMSNorm modulated by (shift, scale) of c, then a linear to the patch pixels.
        self.norm_out = AdaLayerNormContinuous(inner_dim, inner_dim, elementwise_affine=False, eps=RMS_NORM_EPS)
        self.norm_out.norm = JiTRMSNorm(inner_dim, eps=RMS_NORM_EPS)
        self.proj_out = nn.Linear(inner_dim, patch_size * patch_size * in_channels, bias=True)
        self._initialize_weights()

    @classmethod
    def from_jit_preset(cls, name: str, **overrides) -> "JiTTransformer2DModel":
        """A freshly initialised model of a released JiT size (`JIT_PRESETS`); `overrides` change the config."""
        return cls(**{**jit_preset_config(name), **overrides})

    def _initialize_weights(self) -> None:
        self._init_jit_trunk_weights()
        for layer in (self.norm_out.linear, self.proj_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def null_class_id(self) -> Optional[int]:
        """The label of the null class (classifier-free guidance), or None without one."""
        return self.config.num_classes if self.config.class_dropout_prob > 0 else None

    def predict_sample(self, hidden_states: torch.Tensor, timestep: Union[float, torch.Tensor],
                       class_labels: torch.LongTensor) -> torch.Tensor:
        """JiT's own output: the clean image `x0` it predicts from `x_t` at our time `t` (1 = noise)."""
        self._check_pixels(hidden_states)
        batch_size, _, height, width = hidden_states.shape
        t = as_batch_timesteps(timestep, batch_size, hidden_states.device, "timestep")

        # 1. Conditioning c = time + class, and the class embedding for the in-context tokens
        class_emb = self._class_embedding(class_labels, hidden_states.dtype)  # (B, D)
        temb = self._conditioning(t, class_emb)  # (B, D)

        # 2. Patch tokens with their fixed positions
        hidden_states = self.patch_embed(hidden_states)  # (B, T, D)

        # 3. Blocks; the in-context class tokens join before block `in_context_start` (unrotated by RoPE)
        rope_image, rope_in_context = self._rotary_embeddings(hidden_states.device)
        rotary_emb = rope_image
        for index, block in enumerate(self.transformer_blocks):
            if self._prepends_at(index):
                hidden_states = torch.cat([self._in_context_tokens(class_emb), hidden_states], dim=1)  # (B, L + T, D)
                rotary_emb = rope_in_context
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(block, hidden_states, temb, rotary_emb)
            else:
                hidden_states = block(hidden_states, temb, rotary_emb)
        if rotary_emb is rope_in_context:
            hidden_states = hidden_states[:, self.config.in_context_len:]  # (B, T, D): the image tokens

        # 4. Output: modulated RMSNorm, linear to patch pixels, unpatchify
        hidden_states = self.proj_out(self.norm_out(hidden_states, temb))  # (B, T, p * p * C)
        return unpatchify(hidden_states, self.config.patch_size, self.out_channels, height, width)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: Union[float, torch.Tensor],
        class_labels: torch.LongTensor,
        return_dict: bool = True,
    ) -> Union[Transformer2DModelOutput, tuple]:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(batch, in_channels, sample_size, sample_size)`): the
                point `x_t` (pixels: data in [-1, 1], noise of std `noise_scale`).
            timestep (`float` or `torch.Tensor` of shape `(batch,)`): the flow time `t` in [0, 1] (1 = noise).
            class_labels (`torch.LongTensor` of shape `(batch,)`): class ids in `[0, num_classes)`, or
                `null_class_id` for the unconditional velocity.
            return_dict (`bool`): return a `Transformer2DModelOutput` (`.sample` is the velocity).
        """
        sample = self.predict_sample(hidden_states, timestep, class_labels)
        t = as_batch_timesteps(timestep, hidden_states.shape[0], hidden_states.device, "timestep")
        # v = (x_t - x0) / t on the straight flow, with t clamped as JiT and the CAFM reference do.
        velocity = (hidden_states - sample) / t.clamp_min(self.config.t_eps).view(-1, 1, 1, 1).to(sample.dtype)
        if not return_dict:
            return (velocity,)
        return Transformer2DModelOutput(sample=velocity)

