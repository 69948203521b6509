"""The AFM discriminator and the noisy-latent classifier used for guidance.

Both are the generator's DiT trunk with a learnable token prepended to the patch tokens; the
token's final state, layer-normalised without affine, is read out linearly (docs/method.md,
"Discriminator" and "Classifier guidance"). They differ only in their conditioning and head:

| model | conditioning | head |
|---|---|---|
| `AdversarialFlowDiscriminator` | class (+ time `t` when `use_timestep`) | 1 logit, no bias |
| `AdversarialFlowClassifier` | time only | `num_classes` logits |
"""

from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.embeddings import LabelEmbedding
from diffusers.models.modeling_utils import ModelMixin

from .modules import AFMTimestepEmbedding, AFMTrunkMixin, as_batch_timesteps


class AFMTokenReadoutMixin(AFMTrunkMixin):
    """Prepends a learnable token, runs the trunk and reads the token out through `norm_out` + `proj_out`."""

    def _init_readout(self, inner_dim: int, out_features: int, bias: bool) -> None:
        self.token = nn.Parameter(torch.zeros(inner_dim))
        self.norm_out = nn.LayerNorm(inner_dim, elementwise_affine=False, eps=1e-6)
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
        hidden_states = self._run_blocks(hidden_states, temb)
        # The read-out runs in fp32 even under autocast: the approximated R1/R2 takes differences of
        # nearby logits, which bf16's 8-bit mantissa would round away.
        token = hidden_states[:, 0].float()
        bias = self.proj_out.bias.float() if self.proj_out.bias is not None else None
        with torch.autocast(device_type=token.device.type, enabled=False):
            return F.linear(self.norm_out(token), self.proj_out.weight.float(), bias)  # (N, out_features)


class AdversarialFlowDiscriminator(ModelMixin, ConfigMixin, AttentionMixin, AFMTokenReadoutMixin):
    r"""
    The AFM discriminator `D(x, c, t)`: one logit per sample.

    Args:
        sample_size, patch_size, in_channels, num_layers, num_attention_heads, attention_head_dim,
        mlp_ratio, num_classes: as in `AdversarialFlowTransformer2DModel` (the paper mirrors the
            generator's size).
        use_timestep (`bool`, defaults to `False`): condition on the target time `t` (multi-step and
            any-step models).
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
    ):
        super().__init__()
        inner_dim = self._init_trunk(
            sample_size, patch_size, in_channels, num_layers, num_attention_heads, attention_head_dim, mlp_ratio
        )
        self.class_embedder = LabelEmbedding(num_classes, inner_dim, dropout_prob=0.0)
        self.time_embed = AFMTimestepEmbedding(inner_dim) if use_timestep else None
        self._init_readout(inner_dim, 1, bias=False)
        self._init_readout_weights()
        nn.init.normal_(self.class_embedder.embedding_table.weight, std=0.02)

    def forward(
        self,
        hidden_states: torch.Tensor,
        class_labels: torch.LongTensor,
        timestep: Union[float, torch.Tensor, None] = None,
        full_precision_samples: int = 0,
    ) -> torch.Tensor:
        """Returns the logits, shape `(batch,)`. `timestep` is the target time `t` (if `use_timestep`).

        `full_precision_samples = k` runs the first k samples with autocast disabled (fp32 weights
        and activations; TF32 matmuls where torch's fp32 matmul precision allows it) and the rest
        under the caller's autocast. The trainer puts the approximated R1/R2 samples and their
        unperturbed partners there: `D(x + 0.01 n) - D(x)` is a difference of nearby logits, which
        bf16 rounding would dominate (docs/method.md, "Precision"). Splitting inside `forward` keeps
        it one call, so Accelerate's autocast wrapper and DDP see a single forward.
        """
        batch_size = hidden_states.shape[0]
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

    def _logits(self, hidden_states, class_labels, timestep) -> torch.Tensor:
        hidden_states = self._embed_patches(hidden_states)
        temb = self.class_embedder(class_labels).to(hidden_states.dtype)
        if self.config.use_timestep:
            t = as_batch_timesteps(timestep, hidden_states.shape[0], hidden_states.device, "timestep")
            temb = temb + self.time_embed(t, hidden_states.dtype)
        return self._readout(hidden_states, temb).squeeze(-1)


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
