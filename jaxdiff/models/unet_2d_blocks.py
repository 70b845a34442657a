"""The down, mid and up blocks of diffusers' UNet2DConditionModel, UNet2DModel and AutoencoderKL, and factories by
diffusers' block type names.

Every block takes and returns NHWC. The UNets' down blocks share one call signature, and so do their up blocks, so a
UNet loops over them without asking which kind each is: ``down(h, temb, encoder_hidden_states) -> (h, skips)``,
``up(h, skips, temb, encoder_hidden_states, upsample_size) -> h``. The VAE's blocks take and return ``h`` alone.
"""

from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from jaxdiff.models import nn
from jaxdiff.models.layers import Attention, Downsample2D, ResnetBlock2D, Transformer2DModel, Upsample2D


def _per_layer(value: int | Sequence[int], num_layers: int, name: str) -> tuple[int, ...]:
    """An int repeated ``num_layers`` times, or a sequence checked to have ``num_layers`` entries."""
    if isinstance(value, int):
        return (value,) * num_layers
    if len(value) != num_layers:
        raise ValueError(f"{name}={list(value)} must have one entry per layer ({num_layers})")
    return tuple(value)


def _resnets(
    in_widths: Iterable[int],
    out_channels: int,
    *,
    temb_channels: int | None,
    resnet_eps: float,
    resnet_act_fn: str,
    resnet_groups: int,
    resnet_time_scale_shift: str = "default",
    output_scale_factor: float = 1.0,
    dtype: DTypeLike,
    param_dtype: DTypeLike,
    rngs: nnx.Rngs,
) -> nnx.List:
    """The ``resnets`` of a block: one ResnetBlock2D per input width, each ``out_channels`` wide."""
    return nnx.List(
        [
            ResnetBlock2D(
                width,
                out_channels,
                temb_channels=temb_channels,
                groups=resnet_groups,
                eps=resnet_eps,
                non_linearity=resnet_act_fn,
                time_embedding_norm=resnet_time_scale_shift,
                output_scale_factor=output_scale_factor,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
            for width in in_widths
        ]
    )


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


def _transformers(
    channels: int,
    transformer_layers: tuple[int, ...],
    *,
    num_attention_heads: int,
    cross_attention_dim: int,
    norm_num_groups: int,
    use_linear_projection: bool,
    only_cross_attention: bool,
    upcast_attention: bool,
    attention_impl: nn.AttentionImpl,
    dtype: DTypeLike,
    param_dtype: DTypeLike,
    rngs: nnx.Rngs,
) -> nnx.List:
    """The ``attentions`` of a cross-attention block: one Transformer2DModel per resnet, ``channels`` wide."""
    if channels % num_attention_heads:
        raise ValueError(f"{num_attention_heads} attention heads do not divide {channels} channels")
    return nnx.List(
        [
            Transformer2DModel(
                num_attention_heads,
                channels // num_attention_heads,
                channels,
                num_layers=layers,
                norm_num_groups=norm_num_groups,
                cross_attention_dim=cross_attention_dim,
                use_linear_projection=use_linear_projection,
                only_cross_attention=only_cross_attention,
                upcast_attention=upcast_attention,
                attention_impl=attention_impl,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
            for layers in transformer_layers
        ]
    )


class DownBlock2D(nnx.Module):
    """``num_layers`` ResnetBlock2Ds, then an optional stride-2 conv; returns every intermediate as a skip."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        *,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "silu",
        resnet_groups: int = 32,
        output_scale_factor: float = 1.0,
        add_downsample: bool = True,
        downsample_padding: int = 1,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.resnets = _resnets(
            [in_channels if i == 0 else out_channels for i in range(num_layers)],
            out_channels,
            temb_channels=temb_channels,
            resnet_eps=resnet_eps,
            resnet_act_fn=resnet_act_fn,
            resnet_groups=resnet_groups,
            resnet_time_scale_shift=resnet_time_scale_shift,
            output_scale_factor=output_scale_factor,
            **kw,
        )
        self.attentions = nnx.data(None)  # data, so that attention subclasses can fill it
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, use_conv=True, padding=downsample_padding, **kw)])
            if add_downsample
            else None
        )

    def __call__(
        self, hidden_states: jax.Array, temb: jax.Array, encoder_hidden_states: jax.Array | None = None
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            hidden_states = resnet(hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states, encoder_hidden_states)
            skips.append(hidden_states)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
            skips.append(hidden_states)
        return hidden_states, tuple(skips)


class CrossAttnDownBlock2D(DownBlock2D):
    """DownBlock2D with a Transformer2DModel after each resnet (``transformer_layers_per_block`` blocks deep)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        *,
        num_layers: int = 1,
        transformer_layers_per_block: int | Sequence[int] = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "silu",
        resnet_groups: int = 32,
        num_attention_heads: int = 1,
        cross_attention_dim: int = 1280,
        output_scale_factor: float = 1.0,
        downsample_padding: int = 1,
        add_downsample: bool = True,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
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
            resnet_time_scale_shift=resnet_time_scale_shift,
            resnet_act_fn=resnet_act_fn,
            resnet_groups=resnet_groups,
            output_scale_factor=output_scale_factor,
            add_downsample=add_downsample,
            downsample_padding=downsample_padding,
            **kw,
        )
        self.attentions = _transformers(
            out_channels,
            _per_layer(transformer_layers_per_block, num_layers, "transformer_layers_per_block"),
            num_attention_heads=num_attention_heads,
            cross_attention_dim=cross_attention_dim,
            norm_num_groups=resnet_groups,
            use_linear_projection=use_linear_projection,
            only_cross_attention=only_cross_attention,
            upcast_attention=upcast_attention,
            attention_impl=attention_impl,
            **kw,
        )


class UNetMidBlock2DCrossAttn(nnx.Module):
    """``resnet, (attention, resnet) * num_layers`` at the lowest resolution."""

    def __init__(
        self,
        in_channels: int,
        temb_channels: int,
        *,
        num_layers: int = 1,
        transformer_layers_per_block: int | Sequence[int] = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "silu",
        resnet_groups: int = 32,
        num_attention_heads: int = 1,
        output_scale_factor: float = 1.0,
        cross_attention_dim: int = 1280,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        attention_impl: nn.AttentionImpl = "xla",
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.attentions = _transformers(
            in_channels,
            _per_layer(transformer_layers_per_block, num_layers, "transformer_layers_per_block"),
            num_attention_heads=num_attention_heads,
            cross_attention_dim=cross_attention_dim,
            norm_num_groups=resnet_groups,
            use_linear_projection=use_linear_projection,
            only_cross_attention=False,
            upcast_attention=upcast_attention,
            attention_impl=attention_impl,
            **kw,
        )
        self.resnets = _resnets(
            [in_channels] * (num_layers + 1),
            in_channels,
            temb_channels=temb_channels,
            resnet_eps=resnet_eps,
            resnet_act_fn=resnet_act_fn,
            resnet_groups=resnet_groups,
            resnet_time_scale_shift=resnet_time_scale_shift,
            output_scale_factor=output_scale_factor,
            **kw,
        )

    def __call__(self, hidden_states: jax.Array, temb: jax.Array, encoder_hidden_states: jax.Array) -> jax.Array:
        hidden_states = self.resnets[0](hidden_states, temb)
        for attention, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            hidden_states = resnet(attention(hidden_states, encoder_hidden_states), temb)
        return hidden_states


class UpBlock2D(nnx.Module):
    """``num_layers`` ResnetBlock2Ds, each fed the previous output concatenated with one skip, then an upsampler.

    ``prev_output_channel`` is the width coming from below, ``in_channels`` the width of the deepest skip (the
    last resnet's) and ``out_channels`` the width of the other skips and of the output.
    """

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int,
        *,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "silu",
        resnet_groups: int = 32,
        output_scale_factor: float = 1.0,
        add_upsample: bool = True,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.resnets = _resnets(
            [
                (prev_output_channel if i == 0 else out_channels)
                + (in_channels if i == num_layers - 1 else out_channels)
                for i in range(num_layers)
            ],
            out_channels,
            temb_channels=temb_channels,
            resnet_eps=resnet_eps,
            resnet_act_fn=resnet_act_fn,
            resnet_groups=resnet_groups,
            resnet_time_scale_shift=resnet_time_scale_shift,
            output_scale_factor=output_scale_factor,
            **kw,
        )
        self.attentions = nnx.data(None)  # data, so that attention subclasses can fill it
        self.upsamplers = nnx.List([Upsample2D(out_channels, use_conv=True, **kw)]) if add_upsample else None

    def __call__(
        self,
        hidden_states: jax.Array,
        res_hidden_states_tuple: tuple[jax.Array, ...],
        temb: jax.Array,
        encoder_hidden_states: jax.Array | None = None,
        upsample_size: tuple[int, int] | None = None,
    ) -> jax.Array:
        """Consumes the skips last-first; ``upsample_size`` overrides the 2x size for odd latent sizes."""
        for i, resnet in enumerate(self.resnets):
            skip = res_hidden_states_tuple[-1 - i]
            hidden_states = resnet(jnp.concatenate([hidden_states, skip], axis=-1), temb)
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states, encoder_hidden_states)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, upsample_size)
        return hidden_states


class CrossAttnUpBlock2D(UpBlock2D):
    """UpBlock2D with a Transformer2DModel after each resnet."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int,
        *,
        num_layers: int = 1,
        transformer_layers_per_block: int | Sequence[int] = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "silu",
        resnet_groups: int = 32,
        num_attention_heads: int = 1,
        cross_attention_dim: int = 1280,
        output_scale_factor: float = 1.0,
        add_upsample: bool = True,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
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
            resnet_time_scale_shift=resnet_time_scale_shift,
            resnet_act_fn=resnet_act_fn,
            resnet_groups=resnet_groups,
            output_scale_factor=output_scale_factor,
            add_upsample=add_upsample,
            **kw,
        )
        self.attentions = _transformers(
            out_channels,
            _per_layer(transformer_layers_per_block, num_layers, "transformer_layers_per_block"),
            num_attention_heads=num_attention_heads,
            cross_attention_dim=cross_attention_dim,
            norm_num_groups=resnet_groups,
            use_linear_projection=use_linear_projection,
            only_cross_attention=only_cross_attention,
            upcast_attention=upcast_attention,
            attention_impl=attention_impl,
            **kw,
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
        self.resnets = _resnets(
            [in_channels] * (num_layers + 1),
            in_channels,
            temb_channels=temb_channels,
            resnet_eps=resnet_eps,
            resnet_act_fn=resnet_act_fn,
            resnet_groups=resnet_groups,
            output_scale_factor=output_scale_factor,
            **kw,
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


class DownEncoderBlock2D(DownBlock2D):
    """The encoder's down block: DownBlock2D without a time embedding, returning only the hidden states."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "silu",
        resnet_groups: int = 32,
        add_downsample: bool = True,
        downsample_padding: int = 1,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            in_channels,
            out_channels,
            None,
            num_layers=num_layers,
            resnet_eps=resnet_eps,
            resnet_act_fn=resnet_act_fn,
            resnet_groups=resnet_groups,
            add_downsample=add_downsample,
            downsample_padding=downsample_padding,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        return super().__call__(hidden_states, None)[0]


class UpDecoderBlock2D(nnx.Module):
    """The decoder's up block: ``num_layers`` resnets without a time embedding, then an optional upsampler."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "silu",
        resnet_groups: int = 32,
        add_upsample: bool = True,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.resnets = _resnets(
            [in_channels if i == 0 else out_channels for i in range(num_layers)],
            out_channels,
            temb_channels=None,
            resnet_eps=resnet_eps,
            resnet_act_fn=resnet_act_fn,
            resnet_groups=resnet_groups,
            **kw,
        )
        self.upsamplers = nnx.List([Upsample2D(out_channels, use_conv=True, **kw)]) if add_upsample else None

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)
        return hidden_states


# The block types the conditional UNet accepts; the factories also build UNet2DModel's and the VAE's.
DOWN_BLOCK_TYPES: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D")
_ALL_DOWN_BLOCK_TYPES: tuple[str, ...] = (*DOWN_BLOCK_TYPES, "AttnDownBlock2D", "DownEncoderBlock2D")
_ALL_UP_BLOCK_TYPES: tuple[str, ...] = (*UP_BLOCK_TYPES, "AttnUpBlock2D", "UpDecoderBlock2D")


def _strip_unet_res(block_type: str) -> str:
    """diffusers accepts a ``UNetRes`` prefix on block type names and ignores it."""
    return block_type.removeprefix("UNetRes")


def get_down_block(
    down_block_type: str,
    *,
    num_layers: int,
    in_channels: int,
    out_channels: int,
    add_downsample: bool,
    temb_channels: int | None = None,
    transformer_layers_per_block: int | Sequence[int] = 1,
    num_attention_heads: int = 1,
    cross_attention_dim: int | None = None,
    attention_head_dim: int | None = None,
    use_linear_projection: bool = False,
    only_cross_attention: bool = False,
    upcast_attention: bool = False,
    attention_impl: nn.AttentionImpl = "xla",
    **common,
) -> DownBlock2D:
    """The down block diffusers names ``down_block_type``. ``common`` holds the arguments all blocks take
    (``resnet_eps``, ``resnet_act_fn``, ``resnet_groups``, ``resnet_time_scale_shift``, ``downsample_padding``,
    ``dtype``, ``param_dtype``, ``rngs``). ``attention_head_dim`` (AttnDownBlock2D's head width) defaults to
    ``out_channels``: one head."""
    block_type = _strip_unet_res(down_block_type)
    args = (in_channels, out_channels, temb_channels)
    layout = {"num_layers": num_layers, "add_downsample": add_downsample}
    if block_type == "DownBlock2D":
        return DownBlock2D(*args, **layout, **common)
    if block_type == "DownEncoderBlock2D":
        return DownEncoderBlock2D(in_channels, out_channels, **layout, **common)
    if block_type == "AttnDownBlock2D":
        return AttnDownBlock2D(
            *args,
            **layout,
            attention_head_dim=attention_head_dim or out_channels,
            attention_impl=attention_impl,
            **common,
        )
    if block_type == "CrossAttnDownBlock2D":
        if cross_attention_dim is None:
            raise ValueError("CrossAttnDownBlock2D needs cross_attention_dim")
        return CrossAttnDownBlock2D(
            *args,
            **layout,
            transformer_layers_per_block=transformer_layers_per_block,
            num_attention_heads=num_attention_heads,
            cross_attention_dim=cross_attention_dim,
            use_linear_projection=use_linear_projection,
            only_cross_attention=only_cross_attention,
            upcast_attention=upcast_attention,
            attention_impl=attention_impl,
            **common,
        )
    raise ValueError(f"down block type {down_block_type!r} is not supported; supported: {_ALL_DOWN_BLOCK_TYPES}")


def get_up_block(
    up_block_type: str,
    *,
    num_layers: int,
    in_channels: int,
    out_channels: int,
    add_upsample: bool,
    prev_output_channel: int | None = None,
    temb_channels: int | None = None,
    transformer_layers_per_block: int | Sequence[int] = 1,
    num_attention_heads: int = 1,
    cross_attention_dim: int | None = None,
    attention_head_dim: int | None = None,
    use_linear_projection: bool = False,
    only_cross_attention: bool = False,
    upcast_attention: bool = False,
    attention_impl: nn.AttentionImpl = "xla",
    **common,
) -> UpBlock2D | UpDecoderBlock2D:
    """The up block diffusers names ``up_block_type``; ``common`` as for ``get_down_block`` (no padding).
    ``prev_output_channel`` is needed by every type but UpDecoderBlock2D, which ignores it."""
    block_type = _strip_unet_res(up_block_type)
    layout = {"num_layers": num_layers, "add_upsample": add_upsample}
    if block_type == "UpDecoderBlock2D":
        return UpDecoderBlock2D(in_channels, out_channels, **layout, **common)
    if block_type not in _ALL_UP_BLOCK_TYPES:
        raise ValueError(f"up block type {up_block_type!r} is not supported; supported: {_ALL_UP_BLOCK_TYPES}")
    if prev_output_channel is None:
        raise ValueError(f"{block_type} needs prev_output_channel")
    args = (in_channels, prev_output_channel, out_channels, temb_channels)
    if block_type == "UpBlock2D":
        return UpBlock2D(*args, **layout, **common)
    if block_type == "AttnUpBlock2D":
        return AttnUpBlock2D(
            *args,
            **layout,
            attention_head_dim=attention_head_dim or out_channels,
            attention_impl=attention_impl,
            **common,
        )
    if cross_attention_dim is None:
        raise ValueError("CrossAttnUpBlock2D needs cross_attention_dim")
    return CrossAttnUpBlock2D(
        *args,
        **layout,
        transformer_layers_per_block=transformer_layers_per_block,
        num_attention_heads=num_attention_heads,
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=use_linear_projection,
        only_cross_attention=only_cross_attention,
        upcast_attention=upcast_attention,
        attention_impl=attention_impl,
        **common,
    )
