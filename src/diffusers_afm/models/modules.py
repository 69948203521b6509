"""Building blocks shared by the generator, the discriminator and the classifier.

All three networks are the same DiT trunk (docs/method.md, "Generator" and "Discriminator"): patch
embedding with fixed 2-D sin-cos positions, adaLN-Zero transformer blocks, and a conditioning
vector made of class and/or time embeddings. The pieces come from diffusers; this file only wires
them the way the reference checkpoints expect.
"""

import contextlib
import math
from typing import Optional

import torch
import torch.nn as nn
from diffusers.models.attention import AttentionModuleMixin, FeedForward
from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn
from diffusers.models.embeddings import PatchEmbed, TimestepEmbedding
from diffusers.models.normalization import AdaLayerNormZero

# docs/method.md: "Time embeddings use t * 1000 (the original DiT scale) through a 256-d sinusoid".
# SiT embeds t itself (scale 1); a model's `time_scale` config says which (docs/method.md, "CAFM").
TIME_SCALE = 1000.0
TIME_PROJ_DIM = 256
NORM_TYPES = ("layer_norm", "rms_norm")


def timestep_sinusoid(timestep: torch.Tensor, dim: int = TIME_PROJ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """`[cos(t f_i), sin(t f_i)]` with `f_i = exp(-ln(max_period) * i / (dim / 2))`: diffusers'
    `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)` op for op, in float32, but in
    float64 for float64 times (the float64 parity and finite-difference checks need it)."""
    dtype = torch.float64 if timestep.dtype == torch.float64 else torch.float32
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=dtype, device=timestep.device) / half
    args = timestep.to(dtype)[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class AFMTimestepEmbedding(nn.Module):
    """Embeds a flow time t in [0, 1] as DiT does: `MLP(sinusoid(t * scale))`, scale 1000 (DiT, AFM)
    or 1 (SiT).

    The sinusoid is `[cos, sin]` with frequencies `exp(-ln(10000) * i / 128)` (`timestep_sinusoid`);
    released checkpoints depend on it.
    """

    def __init__(self, embedding_dim: int, scale: float = TIME_SCALE):
        super().__init__()
        self.scale = scale
        self.timestep_embedder = TimestepEmbedding(TIME_PROJ_DIM, embedding_dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # The sinusoid is computed in fp32 (t * 1000 needs the precision; fp64 stays), then cast for the MLP.
        timestep = timestep if timestep.dtype == torch.float64 else timestep.float()
        proj = timestep_sinusoid(timestep * self.scale)
        return self.timestep_embedder(proj.to(dtype))


def as_batch_timesteps(timestep, batch_size: int, device: torch.device, name: str) -> torch.Tensor:
    """A float, 0-d or (batch_size,) tensor of times as a (batch_size,) float32 tensor (float64 stays float64)."""
    if timestep is None:
        raise ValueError(f"`{name}` is required by this model's config but was None.")
    dtype = torch.float64 if isinstance(timestep, torch.Tensor) and timestep.dtype == torch.float64 else torch.float32
    timestep = torch.as_tensor(timestep, device=device, dtype=dtype)
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


@contextlib.contextmanager
def math_attention(model: nn.Module):
    """Run `model`'s attention with PyTorch's math SDPA kernel inside the block.

    Forward-mode AD (`torch.func.jvp`, the CAFM discriminator's directional derivative) has no
    formula for the fused kernels: on the CPU the default SDPA path is the flash kernel, which
    raises "Trying to use forward AD with _scaled_dot_product_flash_attention_for_cpu"; the CUDA
    flash, memory-efficient and cuDNN kernels have only backward formulas in torch's
    derivatives.yaml (unverified on a GPU; docs/cafm.md, "Our choices"). The math kernel is plain matmuls and a
    softmax, which torch.func differentiates. A backend chosen with `set_attention_backend` is set
    aside for the block and restored after it.
    """
    # Every dispatcher-backed processor: ours (`AFMAttnProcessor`) and diffusers' (Z-Image's
    # `ZSingleStreamAttnProcessor`), which all read `_attention_backend`.
    processors = [m.processor for m in model.modules()
                  if hasattr(type(getattr(m, "processor", None)), "_attention_backend")]
    saved = [p.__dict__.get("_attention_backend", _UNSET) for p in processors]
    for processor in processors:
        processor._attention_backend = AttentionBackendName._NATIVE_MATH
    try:
        yield
    finally:
        for processor, backend in zip(processors, saved):
            if backend is _UNSET:
                del processor._attention_backend
            else:
                processor._attention_backend = backend


_UNSET = object()


def directional_derivative(fn, hidden_states: torch.Tensor, timestep: torch.Tensor, dx: torch.Tensor, dt: torch.Tensor):
    """`(fn(x, t), d/de fn(x + e dx, t + e dt) at e = 0)` by forward-mode AD (`torch.func.jvp`).

    One tangent: `dx` shaped like `x`, `dt` like `t`. A stack of K tangents (`(K, *x.shape)`,
    `(K, *t.shape)`) is vmapped over, so the primal runs once and the K derivatives come out as
    `(K, ...)`. The result stays differentiable (by reverse mode) in the parameters of `fn` and in
    the tangents, which is how the generator's velocity gets its gradient (docs/method.md,
    "Continuous AFM").
    """
    dx, dt, stacked = check_tangents(hidden_states, timestep, dx, dt)
    return push_forward(fn, (hidden_states, timestep), (dx, dt), stacked)


def check_tangents(hidden_states: torch.Tensor, timestep: torch.Tensor, dx: torch.Tensor, dt: torch.Tensor):
    """`(dx, dt, stacked)`: the tangents checked against the primals (one tangent shaped like them, or a
    stack of K: `(K, *x.shape)`, `(K, *t.shape)`) and cast to their dtypes."""
    stacked = dx.ndim == hidden_states.ndim + 1
    if dx.shape[-hidden_states.ndim:] != hidden_states.shape or dx.ndim not in (hidden_states.ndim, hidden_states.ndim + 1):
        raise ValueError(f"`dx` must have shape {tuple(hidden_states.shape)} or (K, *that), got {tuple(dx.shape)}.")
    expected = dx.shape[:1] + timestep.shape if stacked else timestep.shape
    if tuple(dt.shape) != tuple(expected):
        raise ValueError(f"`dt` must have shape {tuple(expected)}, got {tuple(dt.shape)}.")
    return dx.to(hidden_states.dtype), dt.to(timestep.dtype), stacked


def push_forward(fn, primals: tuple, tangents: tuple, stacked: bool):
    """`(fn(*primals), its JVP along tangents)`: `torch.func.jvp`, vmapped over a leading tangent
    axis when `stacked` (K directions share one primal pass; the JVP comes out as `(K, ...)`).
    Primals and tangents may be pytrees (Z-Image takes lists of differently sized latents).
    `tangents=None` is a plain call: `(fn(*primals), None)`."""
    if tangents is None:
        return fn(*primals), None
    if not stacked:
        return torch.func.jvp(fn, primals, tangents)

    def along(*tangent):
        return torch.func.jvp(fn, primals, tangent)

    # The primal output does not depend on the tangent: vmap returns it once (out_dims None).
    return torch.func.vmap(along, out_dims=(None, 0))(*tangents)


def make_norm(norm_type: str, dim: int) -> nn.Module:
    """The blocks' parameter-free normalisation: LayerNorm (DiT, AFM) or RMSNorm (the CAFM
    discriminator, the reference's `norm_type: rms`), eps 1e-6."""
    if norm_type == "layer_norm":
        return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    if norm_type == "rms_norm":
        return nn.RMSNorm(dim, eps=1e-6, elementwise_affine=False)
    raise ValueError(f"`norm_type` must be one of {NORM_TYPES}, got {norm_type!r}.")


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

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, mlp_ratio: float = 4.0,
                 norm_type: str = "layer_norm"):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)  # SiLU -> Linear(D, 6D); LayerNorm without affine, eps 1e-6
        if norm_type != "layer_norm":
            self.norm1.norm = make_norm(norm_type, dim)  # the same modulation around another norm
        self.attn = AFMAttention(dim, num_attention_heads, attention_head_dim)
        self.norm2 = make_norm(norm_type, dim)
        self.ff = FeedForward(dim, inner_dim=int(dim * mlp_ratio), activation_fn="gelu-approximate")

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, hidden_tangent: Optional[torch.Tensor] = None,
                temb_tangent: Optional[torch.Tensor] = None, stacked: bool = False):
        """The block on `(hidden_states, temb)`; with tangents `(d hidden_states, d temb)` (a stack of
        them when `stacked`), `(output, its JVP)` instead: the Continuous-AFM discriminator pushes its
        tangents block by block. The JVP is taken inside this forward, so wrappers that hook the
        block's call (FSDP2's parameter gathering, gradient checkpointing) run outside the transform."""
        if hidden_tangent is None:
            return self._block(hidden_states, temb)
        # The math kernel is chosen here, not around the model: checkpointing re-runs this call in
        # the backward pass, outside any outer context (fused kernels have no forward-mode AD).
        with math_attention(self):
            return push_forward(self._block, (hidden_states, temb), (hidden_tangent, temb_tangent), stacked)

    def _block(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
        # addcmul(a, b, c) = a + b * c in one pass over memory (eager mode fuses nothing by itself).
        hidden_states = torch.addcmul(hidden_states, gate_msa.unsqueeze(1), self.attn(norm_hidden_states))
        norm_hidden_states = torch.addcmul(shift_mlp[:, None], self.norm2(hidden_states), 1 + scale_mlp[:, None])
        return torch.addcmul(hidden_states, gate_mlp.unsqueeze(1), self.ff(norm_hidden_states))


def init_linears_(model: nn.Module) -> None:
    """DiT's (and JiT's) first initialisation pass: every Linear xavier-uniform, its bias zero."""

    def _basic_init(module):
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    model.apply(_basic_init)


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
        norm_type: str = "layer_norm",
    ) -> int:
        if norm_type not in NORM_TYPES:
            raise ValueError(f"`norm_type` must be one of {NORM_TYPES}, got {norm_type!r}.")
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
                AFMTransformerBlock(inner_dim, num_attention_heads, attention_head_dim, mlp_ratio, norm_type)
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
        init_linears_(self)
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


def output_sample(output) -> torch.Tensor:
    """The tensor a model call returns: `.sample` of our models' output objects, or the tensor a
    plain module (the toys' MLPs) returns itself."""
    return output.sample if hasattr(output, "sample") else output


def unpatchify(hidden_states: torch.Tensor, patch_size: int, channels: int, height: int, width: int) -> torch.Tensor:
    """(N, T, p * p * C) tokens back to an (N, C, H, W) image."""
    h, w = height // patch_size, width // patch_size
    hidden_states = hidden_states.reshape(-1, h, w, patch_size, patch_size, channels)
    hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
    return hidden_states.reshape(-1, channels, h * patch_size, w * patch_size)


__all__ = [
    "NORM_TYPES",
    "AFMAttention",
    "AFMAttnProcessor",
    "AFMTimestepEmbedding",
    "AFMTransformerBlock",
    "AFMTrunkMixin",
    "as_batch_timesteps",
    "directional_derivative",
    "init_linears_",
    "push_forward",
    "make_norm",
    "math_attention",
    "timestep_sinusoid",
    "unpatchify",
]
