"""Building blocks shared by the generator, the discriminator and the classifier.

All three networks are the same DiT trunk (docs/method.md, "Generator" and "Discriminator"): patch
embedding with fixed 2-D sin-cos positions, adaLN-Zero transformer blocks, and a conditioning
vector made of class and/or time embeddings. The pieces come from diffusers; this file only wires
them the way the reference checkpoints expect.
"""

import torch
import torch.nn as nn
from diffusers.models.attention import AttentionModuleMixin, FeedForward
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import PatchEmbed, TimestepEmbedding, Timesteps
from diffusers.models.normalization import AdaLayerNormZero

# docs/method.md: "Time embeddings use t * 1000 (the original DiT scale) through a 256-d sinusoid".
TIME_SCALE = 1000.0
TIME_PROJ_DIM = 256


class AFMTimestepEmbedding(nn.Module):
    """Embeds a flow time t in [0, 1] as DiT does: `MLP(sinusoid(t * 1000))`.

    The sinusoid is `[cos, sin]` with frequencies `exp(-ln(10000) * i / 128)`, i.e. diffusers'
    `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)`; released checkpoints depend on it.
    """

    def __init__(self, embedding_dim: int):
        super().__init__()
        self.time_proj = Timesteps(TIME_PROJ_DIM, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(TIME_PROJ_DIM, embedding_dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # The sinusoid is computed in fp32 (t * 1000 needs the precision), then cast for the MLP.
        proj = self.time_proj(timestep.float() * TIME_SCALE)
        return self.timestep_embedder(proj.to(dtype))


def as_batch_timesteps(timestep, batch_size: int, device: torch.device, name: str) -> torch.Tensor:
    """A float, 0-d or (batch_size,) tensor of times as a (batch_size,) float32 tensor."""
    if timestep is None:
        raise ValueError(f"`{name}` is required by this model's config but was None.")
    timestep = torch.as_tensor(timestep, device=device, dtype=torch.float32)
    if timestep.ndim == 0:
        timestep = timestep.expand(batch_size)
    if timestep.shape != (batch_size,):
        raise ValueError(f"`{name}` must be a float or a tensor of shape ({batch_size},), got {tuple(timestep.shape)}.")
    return timestep


class AFMAttnProcessor:
    """Self-attention through diffusers' attention dispatcher (SDPA / flash / ... backends)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn: "AFMAttention", hidden_states: torch.Tensor) -> torch.Tensor:
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        # (N, T, H * d) -> (N, T, H, d), the layout dispatch_attention_fn takes.
        query, key, value = (x.unflatten(-1, (attn.heads, -1)) for x in (query, key, value))
        hidden_states = dispatch_attention_fn(
            query, key, value, backend=self._attention_backend, parallel_config=self._parallel_config
        )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        return attn.to_out[0](hidden_states)


class AFMAttention(nn.Module, AttentionModuleMixin):
    """Multi-head self-attention with biased q/k/v projections (the reference's fused `qkv`, split)."""

    _default_processor_cls = AFMAttnProcessor
    _available_processors = [AFMAttnProcessor]

    def __init__(self, dim: int, heads: int, dim_head: int, processor=None):
        super().__init__()
        self.heads = heads
        self.inner_dim = heads * dim_head
        self.use_bias = True
        self.to_q = nn.Linear(dim, self.inner_dim, bias=True)
        self.to_k = nn.Linear(dim, self.inner_dim, bias=True)
        self.to_v = nn.Linear(dim, self.inner_dim, bias=True)
        self.to_out = nn.ModuleList([nn.Linear(self.inner_dim, dim, bias=True)])
        self.set_processor(processor if processor is not None else self._default_processor_cls())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.processor(self, hidden_states)


class AFMTransformerBlock(nn.Module):
    """A DiT block: adaLN-Zero modulated attention and GELU-tanh MLP, both gated residuals."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)  # SiLU -> Linear(D, 6D); LayerNorm without affine, eps 1e-6
        self.attn = AFMAttention(dim, num_attention_heads, attention_head_dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, inner_dim=int(dim * mlp_ratio), activation_fn="gelu-approximate")

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
        # addcmul(a, b, c) = a + b * c in one pass over memory (eager mode fuses nothing by itself).
        hidden_states = torch.addcmul(hidden_states, gate_msa.unsqueeze(1), self.attn(norm_hidden_states))
        norm_hidden_states = torch.addcmul(shift_mlp[:, None], self.norm2(hidden_states), 1 + scale_mlp[:, None])
        return torch.addcmul(hidden_states, gate_mlp.unsqueeze(1), self.ff(norm_hidden_states))


class AFMTrunkMixin:
    """The patch embedding and block stack that all three AFM networks share.

    A model calls `_init_trunk` in its `__init__`, `_embed_patches` and `_run_blocks` in its
    `forward`, and `_init_trunk_weights` once when it is built from scratch.
    """

    def _init_trunk(
        self,
        sample_size: int,
        patch_size: int,
        in_channels: int,
        num_layers: int,
        num_attention_heads: int,
        attention_head_dim: int,
        mlp_ratio: float,
    ) -> int:
        inner_dim = num_attention_heads * attention_head_dim
        # base_size = grid size, so positions are not rescaled: the fixed sin-cos table of DiT.
        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=inner_dim,
        )
        self.transformer_blocks = nn.ModuleList(
            [
                AFMTransformerBlock(inner_dim, num_attention_heads, attention_head_dim, mlp_ratio)
                for _ in range(num_layers)
            ]
        )
        self.gradient_checkpointing = False
        return inner_dim

    def _embed_patches(self, hidden_states: torch.Tensor) -> torch.Tensor:
        patch_size = self.config.patch_size
        if hidden_states.ndim != 4 or hidden_states.shape[1] != self.config.in_channels:
            raise ValueError(
                f"`hidden_states` must have shape (batch, {self.config.in_channels}, H, W), "
                f"got {tuple(hidden_states.shape)}."
            )
        if hidden_states.shape[-1] % patch_size or hidden_states.shape[-2] % patch_size:
            raise ValueError(f"`hidden_states` height and width must be multiples of patch_size={patch_size}.")
        # PatchEmbed returns a transposed view of its convolution's output. Made contiguous once here,
        # or every residual add would keep that layout and every LayerNorm would copy it back.
        return self.pos_embed(hidden_states).contiguous()  # (N, T, D), positions added

    def _run_blocks(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(block, hidden_states, temb)
            else:
                hidden_states = block(hidden_states, temb)
        return hidden_states

    def _init_trunk_weights(self) -> None:
        """DiT's initialisation: xavier-uniform linears, zero adaLN (blocks start as identity)."""

        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        proj = self.pos_embed.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        for module in self.modules():
            if isinstance(module, AFMTimestepEmbedding):
                nn.init.normal_(module.timestep_embedder.linear_1.weight, std=0.02)
                nn.init.normal_(module.timestep_embedder.linear_2.weight, std=0.02)
        for block in self.transformer_blocks:
            nn.init.zeros_(block.norm1.linear.weight)
            nn.init.zeros_(block.norm1.linear.bias)


def unpatchify(hidden_states: torch.Tensor, patch_size: int, channels: int, height: int, width: int) -> torch.Tensor:
    """(N, T, p * p * C) tokens back to an (N, C, H, W) image."""
    h, w = height // patch_size, width // patch_size
    hidden_states = hidden_states.reshape(-1, h, w, patch_size, patch_size, channels)
    hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
    return hidden_states.reshape(-1, channels, h * patch_size, w * patch_size)


__all__ = [
    "AFMAttention",
    "AFMAttnProcessor",
    "AFMTimestepEmbedding",
    "AFMTransformerBlock",
    "AFMTrunkMixin",
    "as_batch_timesteps",
    "unpatchify",
]
