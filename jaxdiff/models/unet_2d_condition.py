"""diffusers' ``UNet2DConditionModel`` in Flax NNX: the denoiser of SD 1.x, SD 2.x, SDXL and LCM students.

Configs are diffusers' ``config.json`` unchanged. The mapping of the UNet's config onto its blocks follows
diffusers, including the misnomer that ``attention_head_dim`` is the number of heads per block (with
``num_attention_heads`` None, which diffusers requires). Samples are NCHW at the boundary and NHWC inside.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike, DTypeLike

from jaxdiff.models import nn
from jaxdiff.models.layers import TimestepEmbedding, Timesteps, checkpointed, get_activation
from jaxdiff.models.modeling import ModelConfig, PretrainedModel
from jaxdiff.models.unet_2d_blocks import (
    DOWN_BLOCK_TYPES,
    UP_BLOCK_TYPES,
    DownBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
    get_down_block,
    get_up_block,
)


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig(ModelConfig):
    """Every key of diffusers' ``UNet2DConditionModel`` config.json, with diffusers' defaults.

    ``attention_head_dim`` is the number of attention heads per block (diffusers' misnomer). Keys that only
    configure block types jaxdiff does not port (``resnet_skip_time_act``, ``resnet_out_scale_factor``,
    ``cross_attention_norm``, ``mid_block_only_cross_attention``, ``addition_embed_type_num_heads``) have no effect
    on the supported blocks in diffusers either and are kept as read. Values jaxdiff does not implement are
    refused when the config is built.
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int | tuple[int, ...], ...] = 1
    reverse_transformer_layers_per_block: tuple[tuple[int, ...], ...] | None = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None
    addition_embed_type_num_heads: int = 64

    def __post_init__(self) -> None:
        # Per-layer entries arrive as JSON lists: store tuples so the config stays hashable (a static jit key).
        for key in ("transformer_layers_per_block", "reverse_transformer_layers_per_block"):
            value = getattr(self, key)
            if isinstance(value, (list, tuple)):
                nested = tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in value)
                object.__setattr__(self, key, nested)
        self.check_supported("mid_block_type", "UNetMidBlock2DCrossAttn", None)
        self.check_supported("dropout", 0, 0.0)
        self.check_supported("dual_cross_attention", False)
        self.check_supported("class_embed_type", None)  # "timestep", "projection", ...: not ported
        self.check_supported("num_class_embeds", None)
        self.check_supported("class_embeddings_concat", False)
        self.check_supported("addition_embed_type", None, "text_time")  # "text", "image", ...: not ported
        self.check_supported("encoder_hid_dim_type", None)
        self.check_supported("encoder_hid_dim", None)
        self.check_supported("time_embedding_type", "positional")
        self.check_supported("attention_type", "default")  # GLIGEN's "gated": not ported
        self.check_supported("num_attention_heads", None)  # diffusers refuses it too (its issue #2011)
        self.check_supported("resnet_time_scale_shift", "default", "scale_shift")
        if self.norm_num_groups is None:
            raise ValueError("UNet2DConditionConfig.norm_num_groups=None is not supported by jaxdiff")
        for key, supported in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            unsupported = [t for t in getattr(self, key) if t.removeprefix("UNetRes") not in supported]
            if unsupported:
                raise ValueError(f"UNet2DConditionConfig.{key} has {unsupported}; supported: {', '.join(supported)}")
        n = len(self.down_block_types)
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            raise ValueError(
                f"UNet2DConditionConfig needs as many up_block_types and block_out_channels as down_block_types "
                f"({n}); got {len(self.up_block_types)} and {len(self.block_out_channels)}"
            )
        for key in ("only_cross_attention", "layers_per_block", "cross_attention_dim", "attention_head_dim"):
            self.per_block(key)
        layers = self.per_block("transformer_layers_per_block")
        if self.reverse_transformer_layers_per_block is None and any(not isinstance(t, int) for t in layers):
            raise ValueError(
                "UNet2DConditionConfig.transformer_layers_per_block with per-layer entries needs "
                "reverse_transformer_layers_per_block (as in diffusers)"
            )
        if self.addition_embed_type == "text_time" and None in (
            self.addition_time_embed_dim,
            self.projection_class_embeddings_input_dim,
        ):
            raise ValueError(
                "UNet2DConditionConfig.addition_embed_type='text_time' needs addition_time_embed_dim and "
                "projection_class_embeddings_input_dim"
            )

    def per_block(self, key: str) -> tuple[Any, ...]:
        """The value of ``key`` for each down block: a scalar is repeated, a sequence must have one entry each."""
        value, n = getattr(self, key), len(self.down_block_types)
        if isinstance(value, (tuple, list)):
            if len(value) != n:
                raise ValueError(f"UNet2DConditionConfig.{key}={list(value)} needs one entry per down block ({n})")
            return tuple(value)
        return (value,) * n


@flax.struct.dataclass
class UNet2DConditionOutput:
    sample: jax.Array


class UNet2DConditionModel(PretrainedModel):
    """Text-conditioned UNet: ``unet(sample, timestep, encoder_hidden_states).sample`` is the noise (or v) prediction.

    SDXL (``addition_embed_type="text_time"``) also needs ``added_cond_kwargs={"text_embeds", "time_ids"}``; LCM
    students (``time_cond_proj_dim``) take the guidance-scale embedding as ``timestep_cond``.
    ``gradient_checkpointing`` rematerialises each down, mid and up block in the backward pass.
    """

    config_class = UNet2DConditionConfig
    torch_class_name = "UNet2DConditionModel"

    def __init__(
        self,
        config: UNet2DConditionConfig,
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
        n_blocks = len(channels)

        self.conv_in = nn.conv(
            config.in_channels, channels[0], config.conv_in_kernel, padding=(config.conv_in_kernel - 1) // 2, **kw
        )
        time_embed_dim = config.time_embedding_dim or 4 * channels[0]
        self.time_proj = Timesteps(channels[0], config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = TimestepEmbedding(
            channels[0],
            time_embed_dim,
            act_fn=config.act_fn,
            post_act_fn=config.timestep_post_act,
            cond_proj_dim=config.time_cond_proj_dim,
            **kw,
        )
        if config.addition_embed_type == "text_time":
            self.add_time_proj = Timesteps(config.addition_time_embed_dim, config.flip_sin_to_cos, config.freq_shift)
            self.add_embedding = TimestepEmbedding(
                config.projection_class_embeddings_input_dim, time_embed_dim, act_fn=config.act_fn, **kw
            )
        else:
            self.add_time_proj = self.add_embedding = None
        act = config.time_embedding_act_fn
        self.time_embed_act = get_activation(act) if act is not None else None

        heads = config.per_block("attention_head_dim")
        only_cross = config.per_block("only_cross_attention")
        cross_dims = config.per_block("cross_attention_dim")
        layers = config.per_block("layers_per_block")
        transformer_layers = config.per_block("transformer_layers_per_block")
        common = {
            "temb_channels": time_embed_dim,
            "resnet_eps": config.norm_eps,
            "resnet_act_fn": config.act_fn,
            "resnet_groups": config.norm_num_groups,
            "resnet_time_scale_shift": config.resnet_time_scale_shift,
            "use_linear_projection": config.use_linear_projection,
            "upcast_attention": config.upcast_attention,
            "attention_impl": attention_impl,
            **kw,
        }
        self.down_blocks = nnx.List(
            [
                get_down_block(
                    block_type,
                    num_layers=layers[i],
                    in_channels=channels[max(i - 1, 0)],
                    out_channels=channels[i],
                    add_downsample=i < n_blocks - 1,
                    transformer_layers_per_block=transformer_layers[i],
                    num_attention_heads=heads[i],
                    cross_attention_dim=cross_dims[i],
                    only_cross_attention=only_cross[i],
                    downsample_padding=config.downsample_padding,
                    **common,
                )
                for i, block_type in enumerate(config.down_block_types)
            ]
        )
        if config.mid_block_type is None:
            self.mid_block = None
        else:
            self.mid_block = UNetMidBlock2DCrossAttn(
                channels[-1],
                transformer_layers_per_block=transformer_layers[-1],
                num_attention_heads=heads[-1],
                cross_attention_dim=cross_dims[-1],
                output_scale_factor=config.mid_block_scale_factor,
                **common,
            )
        reversed_channels = channels[::-1]
        up_transformer_layers = config.reverse_transformer_layers_per_block or transformer_layers[::-1]
        self.up_blocks = nnx.List(
            [
                get_up_block(
                    block_type,
                    num_layers=layers[::-1][i] + 1,
                    in_channels=reversed_channels[min(i + 1, n_blocks - 1)],
                    out_channels=reversed_channels[i],
                    prev_output_channel=reversed_channels[max(i - 1, 0)],
                    add_upsample=i < n_blocks - 1,
                    transformer_layers_per_block=up_transformer_layers[i],
                    num_attention_heads=heads[::-1][i],
                    cross_attention_dim=cross_dims[::-1][i],
                    only_cross_attention=only_cross[::-1][i],
                    **common,
                )
                for i, block_type in enumerate(config.up_block_types)
            ]
        )
        self.conv_norm_out = nn.group_norm(channels[0], config.norm_num_groups, eps=config.norm_eps, **kw)
        self.conv_act = get_activation(config.act_fn)
        self.conv_out = nn.conv(
            channels[0], config.out_channels, config.conv_out_kernel, padding=(config.conv_out_kernel - 1) // 2, **kw
        )

    def __call__(
        self,
        sample: jax.Array,
        timestep: ArrayLike,
        encoder_hidden_states: jax.Array,
        timestep_cond: jax.Array | None = None,
        added_cond_kwargs: Mapping[str, jax.Array] | None = None,
    ) -> UNet2DConditionOutput:
        """Denoises an NCHW ``sample`` at ``timestep`` (a scalar or one per sample) given text states (B, L, D).

        The output has the sample's dtype; inside, the model computes in its ``dtype``.
        """
        batch = sample.shape[0]
        aug_emb = self._text_time_embedding(added_cond_kwargs, batch) if self.add_embedding is not None else None
        timesteps = jnp.broadcast_to(jnp.ravel(jnp.asarray(timestep)), (batch,))
        emb = self.time_embedding(self.time_proj(timesteps).astype(self.dtype), timestep_cond)
        if aug_emb is not None:
            emb = emb + aug_emb
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)

        x = jnp.transpose(sample, (0, 2, 3, 1)).astype(self.dtype)
        if self.config.center_input_sample:
            x = 2 * x - 1.0
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = self._block(block, x, emb, encoder_hidden_states)
            skips.extend(block_skips)
        if self.mid_block is not None:
            x = self._block(self.mid_block, x, emb, encoder_hidden_states)
        for block in self.up_blocks:
            n_skips = len(block.resnets)
            block_skips, skips = tuple(skips[-n_skips:]), skips[:-n_skips]
            # Odd latent sizes: upsample to the next skip's size rather than 2x (diffusers' ``upsample_size``).
            upsample_size = skips[-1].shape[1:3] if skips else None
            x = self._block(block, x, block_skips, emb, encoder_hidden_states, upsample_size=upsample_size)
        x = self.conv_out(self.conv_act(self.conv_norm_out(x)))
        return UNet2DConditionOutput(sample=jnp.transpose(x, (0, 3, 1, 2)).astype(sample.dtype))

    def _text_time_embedding(self, added_cond_kwargs: Mapping[str, jax.Array] | None, batch: int) -> jax.Array:
        """SDXL's extra embedding of the pooled text embedding and the six size/crop conditions (``time_ids``)."""
        missing = {"text_embeds", "time_ids"} - set(added_cond_kwargs or {})
        if missing:
            raise ValueError(f"addition_embed_type='text_time' needs added_cond_kwargs with {sorted(missing)}")
        time_embeds = self.add_time_proj(jnp.ravel(added_cond_kwargs["time_ids"])).reshape(batch, -1)
        add_embeds = jnp.concatenate([added_cond_kwargs["text_embeds"], time_embeds], axis=-1)
        return self.add_embedding(add_embeds.astype(self.dtype))

    def _block(self, block: DownBlock2D | UNetMidBlock2DCrossAttn | UpBlock2D, *args: Any, **static: Any) -> Any:
        """Calls a block, under ``nnx.remat`` with gradient checkpointing; ``static`` kwargs are not traced."""

        def call(module: nnx.Module, *xs: Any) -> Any:
            return module(*xs, **static)

        return checkpointed(call, self.gradient_checkpointing)(block, *args)
