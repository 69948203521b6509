"""The Continuous-AFM discriminator for text-to-image: a Z-Image trunk with a logit head.

`AdversarialFlowZImageDiscriminator` is diffusers' `ZImageTransformer2DModel` with its final layer
replaced by `LogitHead`, initialised from the generator's weights (docs/method.md, "Continuous AFM:
text-to-image"). It returns one logit `D(x_t, t, c)` per sample and, given tangents `(dx, dt)`, its
directional derivative `d/de D(x_t + e dx, t + e dt)`, pushed forward stage by stage:

    t ----------- t_embedder ---------------------------------- adaLN input (+ tangent)
    x -- patchify, x_embedder -- noise_refiner --+
                                                 +-- [x | caption] -- layers -- LogitHead -- D, dD
    caption -- cap_embedder -- context_refiner --+      (the caption carries no tangent)

Each stage is one `torch.func.jvp` (vmapped over stacked tangents, so the real and the fake
direction share one primal pass), and each block's JVP is its own call, so gradient checkpointing
recomputes one block at a time: the memory of a 6B discriminator under JVP stays that of one block's
activations plus the block inputs (docs/cafm.md, "Text-to-image"). Blocks run PyTorch's math
attention kernel while tangents flow (the fused kernels have no forward-mode AD; `math_attention`).

The parameter names are the reference's (`out.attn.proj_q`, `out.emb`, ...), so its discriminator
checkpoints load with `load_state_dict` as they are. The trunk is Z-Image's own code; only the
order of the stages above is written here, so this class supports `ZImageTransformer2DModel` (in
its text-to-image mode: no SigLIP/Omni inputs) and no other diffusers transformer.
"""

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel, ZImageTransformerBlock
from torch.nn.utils.rnn import pad_sequence

from .modules import math_attention, push_forward

Tangents = Tuple[List[torch.Tensor], torch.Tensor]


class ZImageTangentBlock(ZImageTransformerBlock):
    """A Z-Image block that can also push a tangent `(dx, d adaLN)` through itself.

    Its parameters are the stock block's; the JVP is taken inside `forward`, so wrappers that hook
    the block's call (FSDP's parameter gathering, gradient checkpointing) run outside the transform.
    """

    def forward(self, x, attn_mask, freqs_cis, adaln_input=None, x_tangent=None, adaln_tangent=None,
                stacked: bool = False):
        block = super().forward
        if x_tangent is None:
            return block(x, attn_mask, freqs_cis, adaln_input)
        # The math kernel for this call, set here rather than around the model: gradient
        # checkpointing re-runs this forward during the backward pass, outside any outer context.
        with math_attention(self):
            return push_forward(lambda h, c: block(h, attn_mask, freqs_cis, c), (x, adaln_input),
                                (x_tangent, adaln_tangent), stacked)


class LogitHeadAttention(nn.Module):
    """One query token attending to the image tokens: bias-free projections, RMSNorm'd q and k."""

    def __init__(self, dim: int, heads: int, eps: float = 1e-5):
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        self.proj_q = nn.Linear(dim, dim, bias=False)
        self.proj_k = nn.Linear(dim, dim, bias=False)
        self.proj_v = nn.Linear(dim, dim, bias=False)
        self.proj_o = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, eps=eps)
        self.k_norm = RMSNorm(head_dim, eps=eps)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        def heads(x):  # (B, L, H * d) -> (B, H, L, d)
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q = self.q_norm(heads(self.proj_q(query)))
        k = self.k_norm(heads(self.proj_k(tokens)))
        v = heads(self.proj_v(tokens))
        # The math kernel: it is the one with forward-mode AD on every device.
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        return self.proj_o(out.transpose(1, 2).flatten(2))


class LogitHead(nn.Module):
    """CAFM's Z-Image read-out: a learnable token cross-attends to the sample's image tokens (its
    32-padded image segment of the unified stream), then an MLP (4x, SiLU) and `Linear(dim, 1)`,
    each a pre-norm residual with one parameter-free RMSNorm."""

    def __init__(self, dim: int, heads: int, eps: float = 1e-5):
        super().__init__()
        self.emb = nn.Parameter(torch.randn(dim) * 0.02)
        self.norm = RMSNorm(dim, eps=eps, elementwise_affine=False)
        self.attn = LogitHeadAttention(dim, heads, eps)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))
        self.proj = nn.Linear(dim, 1)

    def forward(self, tokens: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        token = self.emb.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        token = token + self.attn(self.norm(token), self.norm(tokens), key_mask)
        token = token + self.mlp(self.norm(token))
        return self.proj(self.norm(token)).view(-1)  # (B,)


class AdversarialFlowZImageDiscriminator(ZImageTransformer2DModel):
    r"""
    The Continuous-AFM discriminator over a Z-Image trunk: `D(x_t, t, c)` and its JVP.

    It takes the configuration of the `ZImageTransformer2DModel` it judges (the same arguments);
    `for_transformer(transformer)` builds it from the generator and copies every trunk weight.
    Inputs follow the generator: `x` a list of `(C, F, H, W)` latents, `t` `(B,)` Z-Image times
    (t = 1 is clean), `cap_feats` a list of `(L_i, cap_feat_dim)` text embeddings.
    """

    _no_split_modules = ["ZImageTangentBlock", "ZImageTransformerBlock"]
    _repeated_blocks = ["ZImageTangentBlock", "ZImageTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=3840,
        n_layers=30,
        n_refiner_layers=2,
        n_heads=30,
        n_kv_heads=30,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=2560,
        siglip_feat_dim=None,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[32, 48, 48],
        axes_lens=[1024, 512, 512],
    ):
        if siglip_feat_dim is not None:
            raise ValueError("`siglip_feat_dim`: the discriminator judges text-to-image Z-Image models; the Omni "
                             "variant (SigLIP inputs) is not supported.")
        super().__init__(all_patch_size, all_f_patch_size, in_channels, dim, n_layers, n_refiner_layers, n_heads,
                         n_kv_heads, norm_eps, qk_norm, cap_feat_dim, siglip_feat_dim, rope_theta, t_scale,
                         axes_dims, axes_lens)
        # The image-stream blocks carry tangents; the caption refiner (no tangent) stays stock.
        self.noise_refiner = nn.ModuleList(
            [ZImageTangentBlock(1000 + i, dim, n_heads, n_kv_heads, norm_eps, qk_norm, modulation=True)
             for i in range(n_refiner_layers)]
        )
        self.layers = nn.ModuleList(
            [ZImageTangentBlock(i, dim, n_heads, n_kv_heads, norm_eps, qk_norm) for i in range(n_layers)]
        )
        del self.all_final_layer  # the velocity read-out: the logit head replaces it
        self.out = LogitHead(dim, n_heads)

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_transformer(cls, transformer: ZImageTransformer2DModel) -> "AdversarialFlowZImageDiscriminator":
        """A discriminator for `transformer`, its trunk initialised from the transformer's weights (the
        head starts fresh), as the reference does. A model that is not a text-to-image
        `ZImageTransformer2DModel` is an error."""
        if not isinstance(transformer, ZImageTransformer2DModel) or isinstance(transformer, cls):
            raise ValueError(f"`transformer` must be a diffusers ZImageTransformer2DModel (a flow-matching velocity "
                             f"model), got {type(transformer).__name__}.")
        config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
        discriminator = cls(**config)
        missing, unexpected = discriminator.load_state_dict(transformer.state_dict(), strict=False)
        bad = [k for k in missing if not k.startswith("out.")] + [k for k in unexpected if not k.startswith("all_final_layer.")]
        if bad:
            raise ValueError(f"`transformer`'s weights do not fit the discriminator's trunk: {bad[:5]}")
        return discriminator if transformer.dtype == torch.float32 else discriminator.to(transformer.dtype)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: List[torch.Tensor],
        t: torch.Tensor,
        cap_feats: List[torch.Tensor],
        tangents: Optional[Tangents] = None,
        patch_size: int = 2,
        f_patch_size: int = 1,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """`D(x, t, c)` `(B,)`; with `tangents=(dx, dt)` also its JVP `(B,)`. `dx` is a list shaped like
        `x` and `dt` `(B,)`, or a stack of K directions: each `dx[i]` `(K, *x[i].shape)`, `dt` `(K, B)`;
        then the JVP is `(K, B)`, from one primal pass."""
        stacked = self._check_inputs(x, t, cap_feats, tangents, patch_size, f_patch_size)
        dx, dt = tangents if tangents is not None else (None, None)
        device = x[0].device
        checkpointing = torch.is_grad_enabled() and self.gradient_checkpointing

        def run(block, h, dh, mask, freqs, c, dc):
            if checkpointing:
                return self._gradient_checkpointing_func(block, h, mask, freqs, c, dh, dc, stacked)
            return block(h, mask, freqs, c, dh, dc, stacked)

        # Time: the adaLN input of every modulated block, and its tangent along dt.
        def time_embedding(time):
            return self.t_embedder(time * self.t_scale).type_as(x[0])

        adaln, d_adaln = push_forward(time_embedding, (t,), None if dt is None else (dt,), stacked)

        # Image tokens (each sample padded to a multiple of 32 with the pad token) and their tangents.
        (patches, cap_tokens, _, x_pos_ids, cap_pos_ids, x_pad_mask, cap_pad_mask) = self.patchify_and_embed(
            [xi.detach() for xi in x], cap_feats, patch_size, f_patch_size)
        x_lens = [len(p) for p in patches]
        embedder = self.all_x_embedder[f"{patch_size}-{f_patch_size}"]

        def image_tokens(images):
            patches = self.patchify_and_embed(images, cap_feats, patch_size, f_patch_size)[0]
            return _pad_stream(embedder(torch.cat(patches)), x_lens, x_pad_mask, self.x_pad_token)

        h, dh = push_forward(image_tokens, (list(x),), None if dx is None else (list(dx),), stacked)
        x_freqs, x_mask = self._rope_and_mask(x_pos_ids, x_lens, device)
        for block in self.noise_refiner:
            h, dh = _pair(run(block, h, dh, x_mask, x_freqs, adaln, d_adaln))

        # The caption stream: no tangent.
        cap_lens = [len(c) for c in cap_tokens]
        cap = _pad_stream(self.cap_embedder(torch.cat(cap_tokens)), cap_lens, cap_pad_mask, self.cap_pad_token)
        cap_freqs, cap_mask = self._rope_and_mask(cap_pos_ids, cap_lens, device)
        for block in self.context_refiner:
            cap = self._gradient_checkpointing_func(block, cap, cap_mask, cap_freqs) if checkpointing else block(
                cap, cap_mask, cap_freqs)

        # The unified stream [image | caption] of each sample, as the generator builds it.
        def unify(image):
            return pad_sequence([torch.cat([image[i, :n], cap[i, :m]]) for i, (n, m) in enumerate(zip(x_lens, cap_lens))],
                                batch_first=True)

        u, du = push_forward(unify, (h,), None if dh is None else (dh,), stacked)
        u_lens = [n + m for n, m in zip(x_lens, cap_lens)]
        u_freqs = pad_sequence([torch.cat([x_freqs[i, :n], cap_freqs[i, :m]]) for i, (n, m) in enumerate(zip(x_lens, cap_lens))],
                               batch_first=True)
        u_mask = _length_mask(u_lens, device)
        for block in self.layers:
            u, du = _pair(run(block, u, du, u_mask, u_freqs, adaln, d_adaln))

        # The head reads each sample's image segment (its 32-padded image tokens), as the reference does.
        image_segment = torch.arange(u.shape[1], device=device)[None] < torch.tensor(x_lens, device=device)[:, None]
        logits, derivative = push_forward(lambda tokens: self.out(tokens, image_segment), (u,),
                                          None if du is None else (du,), stacked)
        return logits if tangents is None else (logits, derivative)

    # ------------------------------------------------------------------ helpers
    def _rope_and_mask(self, pos_ids: List[torch.Tensor], lens: List[int], device):
        # Z-Image's caption position ids can run past the tokens (its padding adds ids twice); each
        # token takes the id of its own position, as in the generator.
        freqs = self.rope_embedder(torch.cat([p[:n] for p, n in zip(pos_ids, lens)])).split(list(lens))
        return pad_sequence(list(freqs), batch_first=True), _length_mask(lens, device)

    def _check_inputs(self, x, t, cap_feats, tangents, patch_size, f_patch_size) -> bool:
        """Clear errors for malformed inputs; returns whether the tangents are stacked."""
        if f"{patch_size}-{f_patch_size}" not in self.all_x_embedder:
            raise ValueError(f"`patch_size`/`f_patch_size` {patch_size}/{f_patch_size} is not one of the model's "
                             f"{list(self.all_x_embedder)}.")
        if not isinstance(x, (list, tuple)) or not x:
            raise ValueError("`x` must be a non-empty list of (C, F, H, W) latents, one per sample.")
        channels = self.config.in_channels
        for i, xi in enumerate(x):
            if xi.ndim != 4 or xi.shape[0] != channels:
                raise ValueError(f"`x[{i}]` must have shape ({channels}, F, H, W), got {tuple(xi.shape)}.")
            if xi.shape[-1] % patch_size or xi.shape[-2] % patch_size or xi.shape[1] % f_patch_size:
                raise ValueError(f"`x[{i}]` {tuple(xi.shape)}: F, H, W must be multiples of the patch sizes "
                                 f"({f_patch_size}, {patch_size}, {patch_size}).")
        batch = len(x)
        if len(cap_feats) != batch:
            raise ValueError(f"`cap_feats` must hold one embedding per sample ({batch}), got {len(cap_feats)}.")
        for i, c in enumerate(cap_feats):
            if c.ndim != 2 or c.shape[-1] != self.config.cap_feat_dim or c.shape[0] == 0:
                raise ValueError(f"`cap_feats[{i}]` must have shape (L > 0, {self.config.cap_feat_dim}), got {tuple(c.shape)}.")
        if not isinstance(t, torch.Tensor) or t.shape != (batch,):
            raise ValueError(f"`t` must be a tensor of shape ({batch},), got {getattr(t, 'shape', t)!r}.")
        if tangents is None:
            return False
        dx, dt = tangents
        stacked = isinstance(dt, torch.Tensor) and dt.ndim == 2
        lead = tuple(dt.shape[:1]) if stacked else ()
        if not isinstance(dt, torch.Tensor) or tuple(dt.shape) != lead + (batch,):
            raise ValueError(f"tangent `dt` must have shape ({batch},) or (K, {batch}), got {getattr(dt, 'shape', dt)!r}.")
        if len(dx) != batch or any(tuple(d.shape) != lead + tuple(xi.shape) for d, xi in zip(dx, x)):
            raise ValueError(f"tangent `dx` must be a list shaped like `x`{' with a leading K axis' if stacked else ''}, "
                             f"got {[tuple(d.shape) for d in dx]}.")
        return stacked


def _pad_stream(tokens: torch.Tensor, lens: Sequence[int], pad_mask: List[torch.Tensor], pad_token) -> torch.Tensor:
    """Concatenated per-sample tokens -> `(B, max_len, dim)`: in-sample padding set to the learned pad
    token, batch padding to zeros (the generator's `_prepare_sequence`)."""
    tokens = torch.where(torch.cat(pad_mask)[:, None], pad_token.to(tokens.dtype), tokens)
    return pad_sequence(list(tokens.split(list(lens))), batch_first=True)


def _length_mask(lens: Sequence[int], device) -> Optional[torch.Tensor]:
    """The key mask of a padded batch; None when every sample has the full length (as diffusers does)."""
    if len(set(lens)) == 1:
        return None
    return torch.arange(max(lens), device=device)[None] < torch.tensor(list(lens), device=device)[:, None]


def _pair(out):
    """A block returns `x` without tangents and `(x, dx)` with them."""
    return out if isinstance(out, tuple) else (out, None)

