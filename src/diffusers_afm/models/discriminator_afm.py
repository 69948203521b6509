"""The AFM discriminator and the noisy-latent classifier used for guidance.

Both are the generator's DiT trunk with a learnable token prepended to the patch tokens; the
token's final state, layer-normalised without affine, is read out linearly (docs/method.md,
"Discriminator" and "Classifier guidance"). They differ only in their conditioning and head:

| model | conditioning | head |
|---|---|---|
| `AdversarialFlowDiscriminator` | class (+ time `t` when `use_timestep`) | 1 logit, no bias |
| `AdversarialFlowClassifier` | time only | `num_classes` logits |

The Continuous-AFM discriminator (docs/method.md, "Continuous AFM") is an
`AdversarialFlowDiscriminator` with `norm_type="rms_norm"`, a null class row and the time input;
its forward also returns the directional derivative along a tangent `(dx, dt)` (`tangents=`).
"""

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.embeddings import LabelEmbedding
from diffusers.models.modeling_utils import ModelMixin

from .modules import (
    TIME_SCALE,
    AFMTimestepEmbedding,
    AFMTrunkMixin,
    as_batch_timesteps,
    check_tangents,
    make_norm,
    push_forward,
)


class AFMTokenReadoutMixin(AFMTrunkMixin):
    """Prepends a learnable token, runs the trunk and reads the token out through `norm_out` + `proj_out`."""

    def _init_readout(self, inner_dim: int, out_features: int, bias: bool, norm_type: str = "layer_norm") -> None:
        self.token = nn.Parameter(torch.zeros(inner_dim))
        self.norm_out = make_norm(norm_type, inner_dim)
        self.proj_out = nn.Linear(inner_dim, out_features, bias=bias)

    def _init_readout_weights(self) -> None:
        self._init_trunk_weights()
        nn.init.normal_(self.token, std=0.02)
        nn.init.normal_(self.proj_out.weight, std=0.02)
        if self.proj_out.bias is not None:
            nn.init.zeros_(self.proj_out.bias)

    def _readout(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        token = self.token.to(hidden_states.dtype).expand(hidden_states.shape[0], 1, -1)
        hidden_states = torch.cat([token, hidden_states], dim=1)  # (N, 1 + T, D)
        return self._read_token(self._run_blocks(hidden_states, temb))

    def _read_token(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`norm_out` + `proj_out` of the token (the first position) after the blocks: (N, out_features).

        The read-out runs in fp32 even under autocast: the approximated R1/R2 takes differences of
        nearby logits, which bf16's 8-bit mantissa would round away."""
        dtype = torch.promote_types(hidden_states.dtype, torch.float32)  # fp32, or fp64 when the model is
        token = hidden_states[:, 0].to(dtype)
        bias = self.proj_out.bias.to(dtype) if self.proj_out.bias is not None else None
        with torch.autocast(device_type=token.device.type, enabled=False):
            return F.linear(self.norm_out(token), self.proj_out.weight.to(dtype), bias)


class AdversarialFlowDiscriminator(ModelMixin, ConfigMixin, AttentionMixin, AFMTokenReadoutMixin):
    r"""
    The AFM discriminator `D(x, c, t)`: one logit per sample.

    Args:
        sample_size, patch_size, in_channels, num_layers, num_attention_heads, attention_head_dim,
        mlp_ratio, num_classes: as in `AdversarialFlowTransformer2DModel` (the paper mirrors the
            generator's size).
        use_timestep (`bool`, defaults to `False`): condition on the target time `t` (multi-step and
            any-step models).
        norm_type (`str`, defaults to `"layer_norm"`): the blocks' and the read-out's normalisation;
            `"rms_norm"` for the Continuous-AFM discriminator.
        use_null_class (`bool`, defaults to `False`): one more class row, the null class `num_classes`
            of a flow model trained with class dropout (Continuous AFM).
        time_scale (`float`, defaults to 1000.0): the time sinusoid embeds `t * time_scale` (1 for a
            discriminator initialised from SiT).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["AFMTransformerBlock"]
    _repeated_blocks = ["AFMTransformerBlock"]  # `compile_repeated_blocks()`: compile one block, not the stack
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        num_layers: int = 28,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        use_timestep: bool = False,
        norm_type: str = "layer_norm",
        use_null_class: bool = False,
        time_scale: float = TIME_SCALE,
    ):
        super().__init__()
        inner_dim = self._init_trunk(
            sample_size, patch_size, in_channels, num_layers, num_attention_heads, attention_head_dim, mlp_ratio,
            norm_type,
        )
        # Any dropout_prob > 0 makes LabelEmbedding add the null row; the labels are never dropped here.
        self.class_embedder = LabelEmbedding(num_classes, inner_dim, dropout_prob=0.1 if use_null_class else 0.0)
        self.time_embed = AFMTimestepEmbedding(inner_dim, scale=time_scale) if use_timestep else None
        self._init_readout(inner_dim, 1, bias=False, norm_type=norm_type)
        self._init_readout_weights()
        nn.init.normal_(self.class_embedder.embedding_table.weight, std=0.02)

    def forward(
        self,
        hidden_states: torch.Tensor,
        class_labels: torch.LongTensor,
        timestep: Union[float, torch.Tensor, None] = None,
        full_precision_samples: int = 0,
        tangents: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Returns the logits, shape `(batch,)`. `timestep` is the target time `t` (if `use_timestep`).

        `tangents=(dx, dt)` returns `(D(x, t), dD)` instead, where `dD = d/de D(x + e dx, t + e dt)`
        at e = 0 is the directional derivative that Continuous AFM trains on (`torch.func.jvp`).
        `dx` of shape `(batch, C, H, W)` and `dt` of shape `(batch,)` give `dD` of shape `(batch,)`;
        a stack of K tangents, `(K, batch, C, H, W)` and `(K, batch)`, gives `(K, batch)` from one
        primal pass (`torch.func.vmap` over the tangents). Attention runs on the math kernel there
        (`math_attention`: the fused kernels have no forward-mode AD). Being `forward`, it works
        under DDP: the gradients of both outputs reach the parameters through one call.

        `full_precision_samples = k` runs the first k samples with autocast disabled (fp32 weights
        and activations; TF32 matmuls where torch's fp32 matmul precision allows it) and the rest
        under the caller's autocast. The trainer puts the approximated R1/R2 samples and their
        unperturbed partners there: `D(x + 0.01 n) - D(x)` is a difference of nearby logits, which
        bf16 rounding would dominate (docs/method.md, "Precision"). Splitting inside `forward` keeps
        it one call, so Accelerate's autocast wrapper and DDP see a single forward.
        """
        batch_size = hidden_states.shape[0]
        if tangents is not None:
            if full_precision_samples:
                raise ValueError("`full_precision_samples` is for the AFM penalty; it cannot be combined with `tangents`.")
            return self._logits_jvp(hidden_states, class_labels, timestep, tangents)
        if not 0 <= full_precision_samples <= batch_size:
            raise ValueError(f"`full_precision_samples` must be in [0, {batch_size}], got {full_precision_samples}.")
        if full_precision_samples == 0:
            return self._logits(hidden_states, class_labels, timestep)
        k = full_precision_samples
        t = None if timestep is None else as_batch_timesteps(timestep, batch_size, hidden_states.device, "timestep")
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            head = self._logits(hidden_states[:k].float(), class_labels[:k], None if t is None else t[:k])
        if k == batch_size:
            return head
        tail = self._logits(hidden_states[k:], class_labels[k:], None if t is None else t[k:])
        return torch.cat([head, tail.float()])

    # ------------------------------------------------------------------ Continuous AFM
    # The keys the discriminator shares with the flow model it judges; the token and the head are its own.
    _SHARED_WITH_FLOW_MODEL = ("pos_embed.", "transformer_blocks.", "class_embedder.", "time_embed.")

    @classmethod
    def for_flow_model(cls, flow_model, **overrides) -> "AdversarialFlowDiscriminator":
        """The Continuous-AFM discriminator of a `FlowMatchingTransformer2DModel`: its trunk with
        RMSNorm blocks, its class table (null row included) and time embedding, initialised from its
        weights (`load_flow_model_weights`); the token and the bias-free head start fresh.
        `overrides` change the config; a trunk that then no longer fits the flow model's weights
        is an error (the reference always initialises its discriminator from the generator)."""
        config = flow_model.config
        kwargs = dict(
            sample_size=config.sample_size, patch_size=config.patch_size, in_channels=config.in_channels,
            num_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
            attention_head_dim=config.attention_head_dim, mlp_ratio=config.mlp_ratio,
            num_classes=config.num_classes, use_timestep=True, norm_type="rms_norm",
            use_null_class=config.class_dropout_prob > 0, time_scale=config.time_scale,
        )
        kwargs.update(overrides)
        discriminator = cls(**kwargs)
        discriminator.load_flow_model_weights(flow_model)
        return discriminator

    def load_flow_model_weights(self, flow_model) -> None:
        """Copy the trunk, class table and time embedding of a flow model (the reference loads the
        SiT checkpoint into its discriminator with `strict=False`); every shared weight must fit."""
        ours = self.state_dict()
        theirs = flow_model.state_dict()
        shared = {k: v for k, v in theirs.items() if k.startswith(self._SHARED_WITH_FLOW_MODEL)}
        missing = [k for k in ours if k.startswith(self._SHARED_WITH_FLOW_MODEL) and k not in shared]
        if missing:
            raise ValueError(
                f"The discriminator cannot be initialised from the flow model: it has `{missing[0]}` "
                f"(and {len(missing) - 1} more) that the flow model lacks; give both the same trunk "
                "(num_layers, heads, head dim, patch size) and the time input."
            )
        for key, value in shared.items():
            if key not in ours or ours[key].shape != value.shape:
                shape = tuple(ours[key].shape) if key in ours else "no such weight"
                raise ValueError(
                    f"The discriminator cannot be initialised from the flow model: its `{key}` is {shape}, the flow "
                    f"model's is {tuple(value.shape)}; give both the same trunk, classes and null class."
                )
        self.load_state_dict(shared, strict=False)

    def _logits_jvp(self, hidden_states, class_labels, timestep, tangents):
        """`(D, dD)`, the tangents pushed through the network stage by stage: the patch embedding, the
        conditioning (the class row is constant, the time embedding moves with `dt`), the token (a
        constant), each block (`AFMTransformerBlock` takes the JVP inside its forward, so gradient
        checkpointing and FSDP2's per-block hooks run outside the transform), the read-out."""
        if not self.config.use_timestep:
            raise ValueError("`tangents` need a time-conditioned discriminator (`use_timestep=True`).")
        dx, dt = tangents
        t = as_batch_timesteps(timestep, hidden_states.shape[0], hidden_states.device, "timestep")
        dx, dt, stacked = check_tangents(hidden_states, t, dx, torch.as_tensor(dt, dtype=t.dtype, device=t.device))
        # 1. patches and positions
        hidden_states, hidden_tangent = push_forward(self._embed_patches, (hidden_states,), (dx,), stacked)
        # 2. conditioning: the table itself (LabelEmbedding.forward would drop labels in train mode)
        labels = self.class_embedder.embedding_table(class_labels).to(hidden_states.dtype)
        temb, temb_tangent = push_forward(lambda time: labels + self.time_embed(time, hidden_states.dtype), (t,), (dt,),
                                          stacked)
        # 3. the token, a constant: its tangent is zero
        token = self.token.to(hidden_states.dtype).expand(hidden_states.shape[0], 1, -1)
        hidden_states = torch.cat([token, hidden_states], dim=1)  # (N, 1 + T, D)
        hidden_tangent = torch.cat([torch.zeros_like(hidden_tangent[..., :1, :]), hidden_tangent], dim=-2)
        # 4. the blocks
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states, hidden_tangent = self._gradient_checkpointing_func(
                    block, hidden_states, temb, hidden_tangent, temb_tangent, stacked)
            else:
                hidden_states, hidden_tangent = block(hidden_states, temb, hidden_tangent, temb_tangent, stacked)
        # 5. the read-out
        logits, derivative = push_forward(self._read_token, (hidden_states,), (hidden_tangent,), stacked)
        # New tensors, not views of the read-out: FSDP2 warns about a module that returns a view (an
        # in-place op on it would skip its backward hook).
        return logits[..., 0].clone(), derivative[..., 0].clone()

    def _logits(self, hidden_states, class_labels, timestep) -> torch.Tensor:
        hidden_states = self._embed_patches(hidden_states)
        # The table itself: LabelEmbedding.forward would drop labels in train mode (the trainer drops them).
        temb = self.class_embedder.embedding_table(class_labels).to(hidden_states.dtype)
        if self.config.use_timestep:
            t = as_batch_timesteps(timestep, hidden_states.shape[0], hidden_states.device, "timestep")
            temb = temb + self.time_embed(t, hidden_states.dtype)
        return self._readout(hidden_states, temb)[:, 0].clone()  # a new tensor, not a view (as `_logits_jvp`)


class AdversarialFlowClassifier(ModelMixin, ConfigMixin, AttentionMixin, AFMTokenReadoutMixin):
    r"""
    The noisy-input classifier `C(x_t, t)` for classifier guidance: class logits of `(batch, num_classes)`.

    Args:
        sample_size, patch_size, in_channels, num_layers, num_attention_heads, attention_head_dim,
        mlp_ratio: the trunk, as in `AdversarialFlowTransformer2DModel` (the paper uses B/2).
        num_classes (`int`, defaults to 1000): Number of output classes.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["AFMTransformerBlock"]
    _repeated_blocks = ["AFMTransformerBlock"]  # `compile_repeated_blocks()`: compile one block, not the stack
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        num_layers: int = 12,
        num_attention_heads: int = 12,
        attention_head_dim: int = 64,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
    ):
        super().__init__()
        inner_dim = self._init_trunk(
            sample_size, patch_size, in_channels, num_layers, num_attention_heads, attention_head_dim, mlp_ratio
        )
        self.time_embed = AFMTimestepEmbedding(inner_dim)
        self._init_readout(inner_dim, num_classes, bias=True)
        self._init_readout_weights()

    def forward(self, hidden_states: torch.Tensor, timestep: Union[float, torch.Tensor]) -> torch.Tensor:
        """Returns class logits of shape `(batch, num_classes)` for inputs at flow time `timestep`."""
        hidden_states = self._embed_patches(hidden_states)
        t = as_batch_timesteps(timestep, hidden_states.shape[0], hidden_states.device, "timestep")
        return self._readout(hidden_states, self.time_embed(t, hidden_states.dtype))
