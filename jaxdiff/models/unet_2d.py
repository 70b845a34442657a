"""diffusers' unconditional ``UNet2DModel`` (DDPM, the butterflies tutorial) and the blocks it adds to
``unet_2d_blocks``: self-attention down/up blocks and the ``UNetMidBlock2D`` it shares with the VAE.

Images are NCHW at the public boundary (as diffusers) and NHWC inside.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from jaxdiff.models import nn
from jaxdiff.models.layers import Attention, ResnetBlock2D, TimestepEmbedding, Timesteps
from jaxdiff.models.modeling import ModelConfig, PretrainedModel
from jaxdiff.models.unet_2d_blocks import DownBlock2D, UpBlock2D

_F = TypeVar("_F", bound=Callable[..., Any])


def checkpointed(fn: _F, enabled: bool) -> _F:
    """``fn`` rematerialised in the backward pass (``nnx.remat``) when ``enabled``; ``fn`` itself otherwise.

    ``fn`` takes the module as its first argument (an unbound ``__call__``), so NNX lifts its state.
    """
    return nnx.remat(fn) if enabled else fn


def _self_attentions(
    channels: int,
    num_layers: int,
    *,
    attention_head_dim: int,
    norm_num_groups: int | None,
    eps: float,
    rescale_output_factor: float,
    attention_impl: nn.AttentionImpl,
    dtype: DTypeLike,
    param_dtype: DTypeLike,
    rngs: nnx.Rngs,
) -> nnx.List:
    """diffusers' image self-attention: group norm, ``channels // attention_head_dim`` heads, residual, biases."""
    return nnx.List(
        [
            Attention(
                channels,
                heads=channels // attention_head_dim,
                dim_head=attention_head_dim,
                bias=True,
                norm_num_groups=norm_num_groups,
                eps=eps,
                residual_connection=True,
                rescale_output_factor=rescale_output_factor,
                attention_impl=attention_impl,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
            for _ in range(num_layers)
        ]
    )


class UNetMidBlock2D(nnx.Module):
    """``resnet, (self-attention, resnet) * num_layers``; ``temb_channels`` None for the VAE.

    ``attention_head_dim`` is the width of one head (diffusers' meaning here); ``attn_groups`` defaults to
    ``resnet_groups``. Without ``add_attention`` the ``attentions`` slots are empty.
    """

    def __init__(
        self,
        in_channels: int,
        temb_channels: int | None,
        *,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "silu",
        resnet_groups: int = 32,
        attn_groups: int | None = None,
        add_attention: bool = True,
        attention_head_dim: int = 1,
        output_scale_factor: float = 1.0,
        attention_impl: nn.AttentionImpl = "xla",
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    in_channels,
                    in_channels,
                    temb_channels=temb_channels,
                    groups=resnet_groups,
                    eps=resnet_eps,
                    non_linearity=resnet_act_fn,
                    output_scale_factor=output_scale_factor,
                    **kw,
                )
                for _ in range(num_layers + 1)
            ]
        )
        if add_attention:
            self.attentions = _self_attentions(
                in_channels,
                num_layers,
                attention_head_dim=attention_head_dim,
                norm_num_groups=attn_groups or resnet_groups,
                eps=resnet_eps,
                rescale_output_factor=output_scale_factor,
                attention_impl=attention_impl,
                **kw,
            )
        else:
            self.attentions = nnx.List([None] * num_layers)

    def __call__(self, hidden_states: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        hidden_states = self.resnets[0](hidden_states, temb)
        for attention, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            if attention is not None:
                hidden_states = attention(hidden_states)
            hidden_states = resnet(hidden_states, temb)
        return hidden_states


class AttnDownBlock2D(DownBlock2D):
    """DownBlock2D with a group-normed residual self-attention after each resnet."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        *,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "silu",
        resnet_groups: int = 32,
        attention_head_dim: int = 1,
        output_scale_factor: float = 1.0,
        add_downsample: bool = True,
        downsample_padding: int = 1,
        attention_impl: nn.AttentionImpl = "xla",
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        super().__init__(
            in_channels,
            out_channels,
            temb_channels,
            num_layers=num_layers,
            resnet_eps=resnet_eps,
            resnet_act_fn=resnet_act_fn,
            resnet_groups=resnet_groups,
            output_scale_factor=output_scale_factor,
            add_downsample=add_downsample,
            downsample_padding=downsample_padding,
            **kw,
        )
        # The base class declared ``attentions`` None, a static attribute: mark the list as data.
        self.attentions = nnx.data(
            _self_attentions(
                out_channels,
                num_layers,
                attention_head_dim=attention_head_dim,
                norm_num_groups=resnet_groups,
                eps=resnet_eps,
                rescale_output_factor=output_scale_factor,
                attention_impl=attention_impl,
                **kw,
            )
        )


class AttnUpBlock2D(UpBlock2D):
    """UpBlock2D with a group-normed residual self-attention after each resnet."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int,
        *,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "silu",
        resnet_groups: int = 32,
        attention_head_dim: int = 1,
        output_scale_factor: float = 1.0,
        add_upsample: bool = True,
        attention_impl: nn.AttentionImpl = "xla",
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        super().__init__(
            in_channels,
            prev_output_channel,
            out_channels,
            temb_channels,
            num_layers=num_layers,
            resnet_eps=resnet_eps,
            resnet_act_fn=resnet_act_fn,
            resnet_groups=resnet_groups,
            output_scale_factor=output_scale_factor,
            add_upsample=add_upsample,
            **kw,
        )
        # The base class declared ``attentions`` None, a static attribute: mark the list as data.
        self.attentions = nnx.data(
            _self_attentions(
                out_channels,
                num_layers,
                attention_head_dim=attention_head_dim,
                norm_num_groups=resnet_groups,
                eps=resnet_eps,
                rescale_output_factor=output_scale_factor,
                attention_impl=attention_impl,
                **kw,
            )
        )


_DOWN_BLOCKS: dict[str, type[DownBlock2D]] = {"DownBlock2D": DownBlock2D, "AttnDownBlock2D": AttnDownBlock2D}
_UP_BLOCKS: dict[str, type[UpBlock2D]] = {"UpBlock2D": UpBlock2D, "AttnUpBlock2D": AttnUpBlock2D}


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
        for key, supported in (("down_block_types", _DOWN_BLOCKS), ("up_block_types", _UP_BLOCKS)):
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
            **kw,
        }

        def attention_args(block_type: str, width: int) -> dict[str, Any]:
            if not block_type.startswith("Attn"):
                return {}
            return {"attention_head_dim": config.attention_head_dim or width, "attention_impl": attention_impl}

        self.time_proj = Timesteps(channels[0], config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = TimestepEmbedding(channels[0], time_embed_dim, **kw)
        self.conv_in = nn.conv(config.in_channels, channels[0], 3, padding=1, **kw)

        self.down_blocks = nnx.List()
        for i, block_type in enumerate(config.down_block_types):
            self.down_blocks.append(
                _DOWN_BLOCKS[block_type](
                    channels[max(i - 1, 0)],
                    channels[i],
                    add_downsample=i < len(channels) - 1,
                    downsample_padding=config.downsample_padding,
                    **attention_args(block_type, channels[i]),
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
                _UP_BLOCKS[block_type](
                    reversed_channels[min(i + 1, len(channels) - 1)],
                    reversed_channels[max(i - 1, 0)],
                    reversed_channels[i],
                    add_upsample=i < len(channels) - 1,
                    **attention_args(block_type, reversed_channels[i]),
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
