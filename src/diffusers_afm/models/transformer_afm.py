"""The AFM generator: a class-conditional DiT that maps a point of the flow to another in one pass.

docs/method.md, "Generator": `G(x_s, c, s, t)` predicts the point at time `t` (x-prediction) or the
velocity between `x_s` and it (v-prediction). A 1-NFE model sees the class only; a multi-step model
also sees the source time `s`, an any-step model also the target time `t`. A depth-repeated ("deep")
model runs its block stack R times in one forward pass, pass r conditioned on the time `1 - r/R`.
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

from ..flow import PREDICTION_TYPES
from .modules import AFMTimestepEmbedding, AFMTrunkMixin, as_batch_timesteps, unpatchify

# The paper's model sizes (docs/method.md, "Model sizes"): patch size 2, MLP ratio 4. S/2 is DiT's
# smallest size, handy for experiments.
AFM_PRESETS = {
    "S/2": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64),
    "B/2": dict(num_layers=12, num_attention_heads=12, attention_head_dim=64),
    "M/2": dict(num_layers=16, num_attention_heads=16, attention_head_dim=64),
    "L/2": dict(num_layers=24, num_attention_heads=16, attention_head_dim=64),
    "XL/2": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72),
}


def preset_config(name: str) -> dict:
    """The trunk settings of a named size (`"B/2"`, `"XL/2"`, ...), patch size 2."""
    if name not in AFM_PRESETS:
        raise ValueError(f"Unknown model size {name!r}; allowed: {', '.join(AFM_PRESETS)}.")
    return dict(patch_size=2, **AFM_PRESETS[name])


class AdversarialFlowTransformer2DModel(ModelMixin, ConfigMixin, AttentionMixin, PeftAdapterMixin, AFMTrunkMixin):
    r"""
    The generator of an Adversarial Flow Model (a DiT with adaLN-Zero conditioning).

    Args:
        sample_size (`int`, defaults to 32): Height and width of the input (latent) image.
        patch_size (`int`, defaults to 2): Side of the square patches turned into tokens.
        in_channels (`int`, defaults to 4): Channels of the input (4 for SD-VAE latents, 3 for pixels).
        out_channels (`int`, *optional*): Channels of the output; defaults to `in_channels`.
        num_layers (`int`, defaults to 28): Number of transformer blocks.
        num_attention_heads (`int`, defaults to 16): Attention heads per block.
        attention_head_dim (`int`, defaults to 72): Channels per head; the width is heads x head dim.
        mlp_ratio (`float`, defaults to 4.0): Feed-forward width over the model width.
        num_classes (`int`, defaults to 1000): Number of class labels (no extra "null" class: AFM
            uses no classifier-free guidance).
        use_timestep_src (`bool`, defaults to `False`): Condition on the source time `s` (multi-step).
        use_timestep_tgt (`bool`, defaults to `False`): Condition on the target time `t` (any-step).
        depth_repeat (`int`, defaults to 1): Times the block stack runs in one forward pass (deep
            models: 2 gives 56 layers from 28, 4 gives 112). Shares the weights.
        prediction_type (`str`, defaults to `"sample"`): `"sample"` (x-prediction, 1 NFE) or
            `"velocity"` (v-prediction, multi-step).
        nfe (`int`, *optional*, defaults to 1): The number of sampling steps the model was trained
            for (1, 2, 4, ...); `None` for an any-step model.
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
        out_channels: Optional[int] = None,
        num_layers: int = 28,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        use_timestep_src: bool = False,
        use_timestep_tgt: bool = False,
        depth_repeat: int = 1,
        prediction_type: str = "sample",
        nfe: Optional[int] = 1,
    ):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")
        if nfe is not None and (not isinstance(nfe, int) or nfe < 1):
            raise ValueError(f"`nfe` must be a positive integer or None (any-step), got {nfe!r}.")
        if not isinstance(depth_repeat, int) or depth_repeat < 1:
            raise ValueError(f"`depth_repeat` must be a positive integer, got {depth_repeat!r}.")
        if depth_repeat > 1 and (nfe != 1 or use_timestep_src or use_timestep_tgt):
            raise ValueError("`depth_repeat` > 1 is a 1-NFE model: it needs nfe=1 and no source/target time input.")
        if nfe != 1 and not use_timestep_src:
            raise ValueError(f"A multi-step or any-step model (nfe={nfe}) needs `use_timestep_src=True`.")
        if nfe is None and not use_timestep_tgt:
            raise ValueError("An any-step model (nfe=None) needs `use_timestep_tgt=True`.")
        self.out_channels = out_channels or in_channels

        # 1. Input: patches with fixed sin-cos positions, shared with the discriminator/classifier.
        inner_dim = self._init_trunk(
            sample_size, patch_size, in_channels, num_layers, num_attention_heads, attention_head_dim, mlp_ratio
        )

        # 2. Conditioning: class, plus the source time (multi-step, or each pass of a deep model)
        #    and the target time (any-step).
        self.class_embedder = LabelEmbedding(num_classes, inner_dim, dropout_prob=0.0)
        self.time_src_embed = AFMTimestepEmbedding(inner_dim) if use_timestep_src or depth_repeat > 1 else None
        self.time_tgt_embed = AFMTimestepEmbedding(inner_dim) if use_timestep_tgt else None

        # 3. Output: adaLN (scale, shift) then a linear map back to patches.
        self.norm_out = AdaLayerNormContinuous(inner_dim, inner_dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(inner_dim, patch_size * patch_size * self.out_channels, bias=True)

        self._initialize_weights()

    def _initialize_weights(self) -> None:
        self._init_trunk_weights()
        nn.init.normal_(self.class_embedder.embedding_table.weight, std=0.02)
        # adaLN-Zero: the output layer starts at zero, so G starts as the constant 0.
        for layer in (self.norm_out.linear, self.proj_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        class_labels: torch.LongTensor,
        timestep_src: Union[float, torch.Tensor, None] = None,
        timestep_tgt: Union[float, torch.Tensor, None] = None,
        return_dict: bool = True,
    ) -> Union[Transformer2DModelOutput, tuple]:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(batch, in_channels, H, W)`): the point `x_s`.
            class_labels (`torch.LongTensor` of shape `(batch,)`): class ids in `[0, num_classes)`.
            timestep_src, timestep_tgt (`float` or `torch.Tensor` of shape `(batch,)`, *optional*):
                the source and target times in [0, 1]; required when the config uses them.
            return_dict (`bool`): return a `Transformer2DModelOutput` instead of a tuple.
        """
        batch_size, _, height, width = hidden_states.shape
        device = hidden_states.device

        # 1. Input
        hidden_states = self._embed_patches(hidden_states)  # (N, T, D)
        dtype = hidden_states.dtype
        class_emb = self.class_embedder(class_labels).to(dtype)  # (N, D)
        temb = class_emb
        if self.config.use_timestep_src:
            s = as_batch_timesteps(timestep_src, batch_size, device, "timestep_src")
            temb = temb + self.time_src_embed(s, dtype)
        if self.config.use_timestep_tgt:
            t = as_batch_timesteps(timestep_tgt, batch_size, device, "timestep_tgt")
            temb = temb + self.time_tgt_embed(t, dtype)

        # 2. Blocks (R passes for a deep model; pass r sees the time 1 - r/R, the output layer the class only)
        repeat = self.config.depth_repeat
        if repeat == 1:
            hidden_states = self._run_blocks(hidden_states, temb)
        else:
            for r in range(repeat):
                pass_time = torch.full((batch_size,), 1.0 - r / repeat, device=device)
                hidden_states = self._run_blocks(hidden_states, class_emb + self.time_src_embed(pass_time, dtype))
            temb = class_emb

        # 3. Output
        hidden_states = self.norm_out(hidden_states, temb)
        hidden_states = self.proj_out(hidden_states)  # (N, T, p * p * C)
        output = unpatchify(hidden_states, self.config.patch_size, self.out_channels, height, width)

        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
