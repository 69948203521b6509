"""A flow-matching velocity model on the AFM trunk: the network that Continuous AFM post-trains.

docs/method.md, "Continuous AFM": `v(x_t, t, c)` predicts the velocity `z - x0` of the straight
flow `x_t = (1 - t) x0 + t z` (t = 1 is noise, as everywhere in this library). It is SiT / DiT with
the time as its only time input, a class table with an extra "null" row for classifier-free
guidance, and a velocity output. SiT checkpoints (whose time runs the other way and whose sinusoid
takes t unscaled) convert into it exactly (`diffusers_afm.conversion.convert_sit_generator`).
"""

from typing import Optional, Union

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.embeddings import LabelEmbedding
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous

from .modules import TIME_SCALE, AFMTimestepEmbedding, AFMTrunkMixin, as_batch_timesteps, unpatchify


class FlowMatchingTransformer2DModel(ModelMixin, ConfigMixin, AttentionMixin, PeftAdapterMixin, AFMTrunkMixin):
    r"""
    A class-conditional flow-matching velocity model `v(x_t, t, c)` (SiT's architecture).

    Args:
        sample_size, patch_size, in_channels, out_channels, num_layers, num_attention_heads,
        attention_head_dim, mlp_ratio: the trunk, as in `AdversarialFlowTransformer2DModel`.
        num_classes (`int`, defaults to 1000): Number of real classes.
        class_dropout_prob (`float`, defaults to 0.1): The probability with which training replaces a
            label by the null class (SiT's and CAFM's 0.1). When > 0 the class table has one more row,
            the null class `num_classes`, which classifier-free guidance uses. The training step
            drops the labels (so that the discriminator sees the same labels); the model's forward
            never drops them itself.
        time_scale (`float`, defaults to 1000.0): the sinusoid embeds `t * time_scale`: 1000 as in DiT
            and AFM, 1 for a converted SiT.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["AFMTransformerBlock"]
    _repeated_blocks = ["AFMTransformerBlock"]
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        out_channels: Optional[int] = None,
        num_layers: int = 28,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        time_scale: float = TIME_SCALE,
    ):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"`num_classes` must be a positive integer, got {num_classes!r}.")
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"`class_dropout_prob` must be in [0, 1), got {class_dropout_prob!r}.")
        if time_scale <= 0:
            raise ValueError(f"`time_scale` must be > 0, got {time_scale!r}.")
        self.out_channels = out_channels or in_channels
        inner_dim = self._init_trunk(
            sample_size, patch_size, in_channels, num_layers, num_attention_heads, attention_head_dim, mlp_ratio
        )
        # num_classes + 1 rows when class_dropout_prob > 0 (diffusers' LabelEmbedding adds the null row).
        self.class_embedder = LabelEmbedding(num_classes, inner_dim, dropout_prob=class_dropout_prob)
        self.time_embed = AFMTimestepEmbedding(inner_dim, scale=time_scale)
        self.norm_out = AdaLayerNormContinuous(inner_dim, inner_dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(inner_dim, patch_size * patch_size * self.out_channels, bias=True)
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        self._init_trunk_weights()
        nn.init.normal_(self.class_embedder.embedding_table.weight, std=0.02)
        for layer in (self.norm_out.linear, self.proj_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def null_class_id(self) -> Optional[int]:
        """The label of the null class (classifier-free guidance), or None without one."""
        return self.config.num_classes if self.config.class_dropout_prob > 0 else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: Union[float, torch.Tensor],
        class_labels: torch.LongTensor,
        return_dict: bool = True,
    ) -> Union[Transformer2DModelOutput, tuple]:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(batch, in_channels, H, W)`): the point `x_t`.
            timestep (`float` or `torch.Tensor` of shape `(batch,)`): the flow time `t` in [0, 1] (1 = noise).
            class_labels (`torch.LongTensor` of shape `(batch,)`): class ids in `[0, num_classes)`, or
                `null_class_id` for the unconditional velocity.
            return_dict (`bool`): return a `Transformer2DModelOutput` (`.sample` is the velocity).
        """
        batch_size, _, height, width = hidden_states.shape
        hidden_states = self._embed_patches(hidden_states)
        dtype = hidden_states.dtype
        t = as_batch_timesteps(timestep, batch_size, hidden_states.device, "timestep")
        # The table itself, not LabelEmbedding.forward, which would drop labels again in train mode.
        temb = self.class_embedder.embedding_table(class_labels).to(dtype) + self.time_embed(t, dtype)
        hidden_states = self._run_blocks(hidden_states, temb)
        hidden_states = self.proj_out(self.norm_out(hidden_states, temb))
        output = unpatchify(hidden_states, self.config.patch_size, self.out_channels, height, width)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
