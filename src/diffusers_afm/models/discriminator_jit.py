"""The Continuous-AFM discriminator on JiT's trunk (docs/cafm.md, "JiT").

The CAFM reference judges a JiT generator with the same JiT trunk: the blocks, embeddings and
in-context class tokens of the generator, initialised from its weights, with JiT's velocity head
replaced by a logit head. The head reads the FIRST token after the last block, which is the first
in-context class token (the first patch token for a model without them), normalises it with a
parameter-free RMSNorm whose eps is the machine epsilon of float32 (the reference's
`nn.RMSNorm(eps=None)` on float32 activations; our head always runs in float32, see
`AdversarialFlowDiscriminator`), and maps it to one logit with a biased `Linear(D, 1)`.

Given tangents `(dx, dt)` the forward also returns the directional derivative
`dD = d/de D(x + e dx, t + e dt)` (docs/method.md, "Continuous AFM"), pushed forward stage by stage
as in the Z-Image discriminator: the conditioning (along dt), the patch tokens (along dx), each
block (its own `torch.func.jvp`, vmapped over stacked tangents), the head. The in-context tokens
depend on the label only, so their tangent is zero. Because each block's JVP is taken inside that
block's forward, gradient checkpointing works here (block by block), unlike in the SiT-style
discriminator.
"""

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.modeling_utils import ModelMixin

from .modules import as_batch_timesteps, math_attention, push_forward
from .transformer_jit import JiTTransformer2DModel, JiTTransformerBlock, JiTTrunkMixin

Tangents = Tuple[torch.Tensor, torch.Tensor]


class JiTTangentBlock(JiTTransformerBlock):
    """A JiT block that can also push a tangent `(d hidden_states, d temb)` through itself.

    Its parameters are the stock block's. The JVP is taken inside `forward`, so gradient
    checkpointing (which re-runs this forward in the backward pass) sees it whole.
    """

    def forward(self, hidden_states, temb, rotary_emb, hidden_tangent=None, temb_tangent=None, stacked: bool = False):
        block = super().forward
        if hidden_tangent is None:
            return block(hidden_states, temb, rotary_emb)
        # The math kernel is chosen here, not around the model: checkpointing re-runs this call
        # during the backward pass, outside any outer context (fused kernels have no forward-mode AD).
        with math_attention(self):
            return push_forward(lambda h, c: block(h, c, rotary_emb), (hidden_states, temb),
                                (hidden_tangent, temb_tangent), stacked)


class AdversarialFlowJiTDiscriminator(ModelMixin, ConfigMixin, AttentionMixin, JiTTrunkMixin):
    r"""
    The Continuous-AFM discriminator `D(x_t, t, c)` on a JiT trunk: one logit per sample, and its JVP.

    Args:
        sample_size, patch_size, in_channels, num_layers, num_attention_heads, attention_head_dim,
        mlp_ratio, bottleneck_dim, in_context_len, in_context_start, num_classes: the trunk, as in
            `JiTTransformer2DModel` (the reference mirrors the generator's size).
        use_null_class (`bool`, defaults to `True`): the class table has the null class `num_classes`
            (a generator trained with class dropout; the training step passes the same dropped labels
            to both networks).

    `for_transformer(generator)` builds it from a `JiTTransformer2DModel` and copies every trunk weight.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["JiTTangentBlock"]
    _repeated_blocks = ["JiTTangentBlock"]
    _skip_layerwise_casting_patterns = ["patch_embed", "norm"]

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
        use_null_class: bool = True,
    ):
        super().__init__()
        inner_dim = self._init_jit_trunk(
            JiTTangentBlock, sample_size, patch_size, in_channels, num_layers, num_attention_heads,
            attention_head_dim, mlp_ratio, bottleneck_dim, in_context_len, in_context_start, num_classes,
            null_class=use_null_class,
        )
        self.norm_out = nn.RMSNorm(inner_dim, eps=torch.finfo(torch.float32).eps, elementwise_affine=False)
        self.proj_out = nn.Linear(inner_dim, 1, bias=True)
        self._init_jit_trunk_weights()
        self.proj_out.reset_parameters()  # the reference's head keeps nn.Linear's own initialisation

    # ------------------------------------------------------------------ construction
    # Every weight but the velocity head's is shared with the generator.
    _GENERATOR_HEAD = ("norm_out.", "proj_out.")

    @classmethod
    def for_transformer(cls, transformer: JiTTransformer2DModel) -> "AdversarialFlowJiTDiscriminator":
        """The discriminator of `transformer`: its trunk, class table (null row included), time
        embedding and in-context tokens, initialised from its weights (the reference loads the JiT
        checkpoint with `strict=False`); the logit head starts fresh. Anything but a
        `JiTTransformer2DModel` is an error."""
        if not isinstance(transformer, JiTTransformer2DModel):
            raise ValueError(f"`transformer` must be a JiTTransformer2DModel, got {type(transformer).__name__}.")
        config = transformer.config
        discriminator = cls(
            sample_size=config.sample_size, patch_size=config.patch_size, in_channels=config.in_channels,
            num_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
            attention_head_dim=config.attention_head_dim, mlp_ratio=config.mlp_ratio,
            bottleneck_dim=config.bottleneck_dim, in_context_len=config.in_context_len,
            in_context_start=config.in_context_start, num_classes=config.num_classes,
            use_null_class=transformer.null_class_id is not None,
        )
        trunk = {k: v for k, v in transformer.state_dict().items() if not k.startswith(cls._GENERATOR_HEAD)}
        missing, unexpected = discriminator.load_state_dict(trunk, strict=False)
        if unexpected or [k for k in missing if not k.startswith(cls._GENERATOR_HEAD)]:
            raise ValueError(f"`transformer`'s weights do not fit the discriminator's trunk: {(unexpected + missing)[:5]}")
        return discriminator.to(transformer.dtype)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        class_labels: torch.LongTensor,
        timestep: Union[float, torch.Tensor],
        tangents: Optional[Tangents] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """The logits `D(x_t, t, c)`, shape `(batch,)`; `timestep` is our flow time (1 = noise).

        `tangents=(dx, dt)` returns `(D, dD)`: `dx` shaped like `hidden_states` and `dt` `(batch,)`
        give `dD` of shape `(batch,)`; a stack of K directions, `(K, batch, C, H, W)` and `(K, batch)`,
        gives `(K, batch)` from one primal pass (`torch.func.vmap` over the tangents).
        """
        self._check_pixels(hidden_states)
        batch_size = hidden_states.shape[0]
        t = as_batch_timesteps(timestep, batch_size, hidden_states.device, "timestep")
        dx, dt, stacked = self._check_tangents(hidden_states, t, tangents)
        checkpointing = torch.is_grad_enabled() and self.gradient_checkpointing

        # 1. Conditioning c = time(1 - t) + class, and its tangent along dt
        class_emb = self._class_embedding(class_labels, hidden_states.dtype)  # (B, D)
        temb, temb_tangent = push_forward(lambda time: self._conditioning(time, class_emb), (t,),
                                          None if dt is None else (dt,), stacked)

        # 2. Patch tokens and their tangent along dx
        hidden_states, hidden_tangent = push_forward(self.patch_embed, (hidden_states,),
                                                     None if dx is None else (dx,), stacked)  # (B, T, D)

        # 3. Blocks; the in-context class tokens (no tangent: they depend on the label only) join
        #    before block `in_context_start`
        rope_image, rope_in_context = self._rotary_embeddings(hidden_states.device)
        rotary_emb = rope_image
        for index, block in enumerate(self.transformer_blocks):
            if self._prepends_at(index):
                tokens = self._in_context_tokens(class_emb)  # (B, L, D)
                hidden_states = torch.cat([tokens, hidden_states], dim=1)  # (B, L + T, D)
                if hidden_tangent is not None:
                    zeros = tokens.new_zeros(hidden_tangent.shape[:-2] + tokens.shape[-2:])  # ([K,] B, L, D)
                    hidden_tangent = torch.cat([zeros, hidden_tangent], dim=-2)
                rotary_emb = rope_in_context
            args = (hidden_states, temb, rotary_emb, hidden_tangent, temb_tangent, stacked)
            out = self._gradient_checkpointing_func(block, *args) if checkpointing else block(*args)
            hidden_states, hidden_tangent = out if hidden_tangent is not None else (out, None)

        # 4. The logit of the first token (the first in-context class token)
        logits, derivative = push_forward(self._logit, (hidden_states,),
                                          None if hidden_tangent is None else (hidden_tangent,), stacked)
        return logits if tangents is None else (logits, derivative)

    def _logit(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # The head runs in float32 (float64 for a float64 model) even under autocast, as our other
        # discriminators' read-outs do: the CAFM losses take differences of nearby derivatives.
        dtype = torch.promote_types(hidden_states.dtype, torch.float32)
        token = hidden_states[:, 0].to(dtype)  # (B, D)
        with torch.autocast(device_type=token.device.type, enabled=False):
            logit = F.linear(self.norm_out(token), self.proj_out.weight.to(dtype), self.proj_out.bias.to(dtype))
        return logit.squeeze(-1)  # (B,)

    @staticmethod
    def _check_tangents(hidden_states: torch.Tensor, t: torch.Tensor, tangents: Optional[Tangents]):
        """`(dx, dt, stacked)`, each tangent in its primal's dtype; clear errors for bad shapes."""
        if tangents is None:
            return None, None, False
        dx, dt = tangents
        stacked = dx.ndim == hidden_states.ndim + 1
        if dx.shape[-hidden_states.ndim:] != hidden_states.shape or dx.ndim not in (hidden_states.ndim, hidden_states.ndim + 1):
            raise ValueError(f"tangent `dx` must have shape {tuple(hidden_states.shape)} or (K, *that), got {tuple(dx.shape)}.")
        dt = torch.as_tensor(dt, dtype=t.dtype, device=t.device)
        expected = tuple(dx.shape[:1] + t.shape) if stacked else tuple(t.shape)
        if tuple(dt.shape) != expected:
            raise ValueError(f"tangent `dt` must have shape {expected}, got {tuple(dt.shape)}.")
        return dx.to(hidden_states.dtype), dt, stacked


__all__ = ["AdversarialFlowJiTDiscriminator", "JiTTangentBlock"]
