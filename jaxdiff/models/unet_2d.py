"""diffusers' unconditional ``UNet2DModel`` (DDPM, the butterflies tutorial); its blocks are in ``unet_2d_blocks``.

Images are NCHW at the public boundary (as diffusers) and NHWC inside.
"""

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from jaxdiff.models import nn
from jaxdiff.models.layers import TimestepEmbedding, Timesteps, checkpointed
from jaxdiff.models.modeling import ModelConfig, PretrainedModel
from jaxdiff.models.unet_2d_blocks import UNetMidBlock2D, get_down_block, get_up_block

_DOWN_BLOCK_TYPES: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D")
_UP_BLOCK_TYPES: tuple[str, ...] = ("UpBlock2D", "AttnUpBlock2D")


@dataclasses.dataclass(frozen=True)
class UNet2DConfig(ModelConfig):
    """diffusers' ``UNet2DModel`` config.json keys and defaults.

    Unlike in UNet2DConditionModel, ``attention_head_dim`` here is the width of one head (None: one head per block).
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    freq_shift: int = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2D"
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1
    downsample_padding: int = 1
    downsample_type: str = "conv"
    upsample_type: str = "conv"
    dropout: float = 0.0
    act_fn: str = "silu"
    attention_head_dim: int | None = 8
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    num_train_timesteps: int | None = None

    def __post_init__(self) -> None:
        self.check_supported("time_embedding_type", "positional")  # "fourier" (score SDE) and "learned": not ported
        self.check_supported("mid_block_type", "UNetMidBlock2D", None)
        self.check_supported("downsample_type", "conv")
        self.check_supported("upsample_type", "conv")
        self.check_supported("dropout", 0.0)
        self.check_supported("resnet_time_scale_shift", "default")
        self.check_supported("class_embed_type", None)
        self.check_supported("num_class_embeds", None)
        for key, supported in (("down_block_types", _DOWN_BLOCK_TYPES), ("up_block_types", _UP_BLOCK_TYPES)):
            unsupported = [t for t in getattr(self, key) if t not in supported]
            if unsupported:
                raise ValueError(f"UNet2DConfig.{key} has {unsupported}; supported: {', '.join(supported)}")
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"UNet2DConfig needs one down and one up block per block_out_channels entry ({n}); got "
                f"{len(self.down_block_types)} down_block_types and {len(self.up_block_types)} up_block_types"
            )


@flax.struct.dataclass
class UNet2DOutput:
    sample: jax.Array


class UNet2DModel(PretrainedModel):
    """diffusers' unconditional ``UNet2DModel``: ``unet(sample_nchw, timestep).sample`` predicts noise (or v)."""

    config_class = UNet2DConfig
    torch_class_name = "UNet2DModel"

    def __init__(
        self,
        config: UNet2DConfig,
        *,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        attention_impl: nn.AttentionImpl = "xla",
        gradient_checkpointing: bool = False,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = dtype
        self.gradient_checkpointing = gradient_checkpointing
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        channels = config.block_out_channels
        time_embed_dim = config.time_embedding_dim or 4 * channels[0]
        common = {
            "temb_channels": time_embed_dim,
            "num_layers": config.layers_per_block,
            "resnet_eps": config.norm_eps,
            "resnet_act_fn": config.act_fn,
            "resnet_groups": config.norm_num_groups,
            "attention_head_dim": config.attention_head_dim,  # None: one head, as wide as the block
            "attention_impl": attention_impl,
            **kw,
        }

        self.time_proj = Timesteps(channels[0], config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = TimestepEmbedding(channels[0], time_embed_dim, **kw)
        self.conv_in = nn.conv(config.in_channels, channels[0], 3, padding=1, **kw)

        self.down_blocks = nnx.List()
        for i, block_type in enumerate(config.down_block_types):
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    in_channels=channels[max(i - 1, 0)],
                    out_channels=channels[i],
                    add_downsample=i < len(channels) - 1,
                    downsample_padding=config.downsample_padding,
                    **common,
                )
            )

        if config.mid_block_type is None:
            self.mid_block = None
        else:
            self.mid_block = UNetMidBlock2D(
                channels[-1],
                time_embed_dim,
                resnet_eps=config.norm_eps,
                resnet_act_fn=config.act_fn,
                resnet_groups=config.norm_num_groups,
                attn_groups=config.attn_norm_num_groups,
                add_attention=config.add_attention,
                attention_head_dim=config.attention_head_dim or channels[-1],
                output_scale_factor=config.mid_block_scale_factor,
                attention_impl=attention_impl,
                **kw,
            )

        reversed_channels = channels[::-1]
        self.up_blocks = nnx.List()
        for i, block_type in enumerate(config.up_block_types):
            self.up_blocks.append(
                get_up_block(
                    block_type,
                    in_channels=reversed_channels[min(i + 1, len(channels) - 1)],
                    prev_output_channel=reversed_channels[max(i - 1, 0)],
                    out_channels=reversed_channels[i],
                    add_upsample=i < len(channels) - 1,
                    **{**common, "num_layers": config.layers_per_block + 1},
                )
            )

        self.conv_norm_out = nn.group_norm(channels[0], config.norm_num_groups, eps=config.norm_eps, **kw)
        self.conv_out = nn.conv(channels[0], config.out_channels, 3, padding=1, **kw)

    def __call__(self, sample: jax.Array, timestep: jax.Array | float | int) -> UNet2DOutput:
        """``sample`` (B, C, H, W); ``timestep`` a scalar or one per sample (possibly fractional)."""
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        timesteps = jnp.broadcast_to(jnp.asarray(timestep), (sample.shape[0],))
        emb = self.time_embedding(self.time_proj(timesteps).astype(self.dtype))

        h = self.conv_in(jnp.transpose(sample, (0, 2, 3, 1)))
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = checkpointed(type(block).__call__, self.gradient_checkpointing)(block, h, emb)
            skips.extend(block_skips)
        if self.mid_block is not None:
            h = checkpointed(UNetMidBlock2D.__call__, self.gradient_checkpointing)(self.mid_block, h, emb)
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = tuple(skips[-n:]), skips[:-n]
            h = checkpointed(type(block).__call__, self.gradient_checkpointing)(block, h, block_skips, emb)
        h = self.conv_out(jax.nn.silu(self.conv_norm_out(h)))
        return UNet2DOutput(sample=jnp.transpose(h, (0, 3, 1, 2)))
