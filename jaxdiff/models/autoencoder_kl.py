"""diffusers' ``AutoencoderKL``: the SD 1.x/2.x/SDXL VAE that maps images to a diagonal-Gaussian latent and back.

Images and latents are NCHW at the public boundary (as diffusers) and NHWC inside. ``scaling_factor`` and
``shift_factor`` are config values the caller applies to latents, as in diffusers; the model never applies them.
"""

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from jaxdiff.models import nn
from jaxdiff.models.layers import checkpointed
from jaxdiff.models.modeling import ModelConfig, PretrainedModel
from jaxdiff.models.unet_2d_blocks import (
    DownEncoderBlock2D,
    UNetMidBlock2D,
    UpDecoderBlock2D,
    get_down_block,
    get_up_block,
)


def _to_nhwc(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 2, 3, 1))


def _to_nchw(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 3, 1, 2))


@flax.struct.dataclass
class DiagonalGaussian:
    """The posterior ``N(mean, exp(logvar))`` per latent element (diffusers' ``DiagonalGaussianDistribution``).

    Build it with ``from_moments``, which clips ``logvar`` to [-30, 20] as diffusers does.
    """

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """Splits NCHW ``moments`` (B, 2 * latent_channels, h, w) into mean and log-variance along channels."""
        mean, logvar = jnp.split(moments, 2, axis=1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        """A reparameterised draw ``mean + std * eps``, differentiable in mean and logvar."""
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean


@flax.struct.dataclass
class AutoencoderKLOutput:
    latent_dist: DiagonalGaussian


@flax.struct.dataclass
class DecoderOutput:
    sample: jax.Array


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig(ModelConfig):
    """diffusers' ``AutoencoderKL`` config.json keys and defaults."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        for key, supported in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = getattr(self, key)
            if any(t != supported for t in types):
                raise ValueError(
                    f"AutoencoderKLConfig.{key}={list(types)} is not supported; only {supported!r} blocks"
                )
            if len(types) != len(self.block_out_channels):
                raise ValueError(
                    f"AutoencoderKLConfig.{key} has {len(types)} entries, block_out_channels "
                    f"{len(self.block_out_channels)}: one block per entry is needed"
                )


def _mid_block(config: AutoencoderKLConfig, attention_impl: nn.AttentionImpl, **kw) -> UNetMidBlock2D:
    """The VAE's mid block: single-head attention over the deepest width, no time embedding."""
    return UNetMidBlock2D(
        config.block_out_channels[-1],
        None,
        resnet_eps=1e-6,
        resnet_act_fn=config.act_fn,
        resnet_groups=config.norm_num_groups,
        add_attention=config.mid_block_add_attention,
        attention_head_dim=config.block_out_channels[-1],
        attention_impl=attention_impl,
        **kw,
    )


class Encoder(nnx.Module):
    """Image (NHWC) -> ``2 * latent_channels`` moments at 1/2^(len(block_out_channels) - 1) resolution."""

    def __init__(
        self,
        config: AutoencoderKLConfig,
        *,
        attention_impl: nn.AttentionImpl,
        gradient_checkpointing: bool,
        dtype: DTypeLike,
        param_dtype: DTypeLike,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        channels = config.block_out_channels
        self.gradient_checkpointing = gradient_checkpointing
        self.conv_in = nn.conv(config.in_channels, channels[0], 3, padding=1, **kw)
        self.down_blocks = nnx.List(
            [
                get_down_block(
                    block_type,
                    in_channels=channels[max(i - 1, 0)],
                    out_channels=channels[i],
                    num_layers=config.layers_per_block,
                    resnet_act_fn=config.act_fn,
                    resnet_groups=config.norm_num_groups,
                    add_downsample=i < len(channels) - 1,
                    downsample_padding=0,
                    **kw,
                )
                for i, block_type in enumerate(config.down_block_types)
            ]
        )
        self.mid_block = _mid_block(config, attention_impl, **kw)
        self.conv_norm_out = nn.group_norm(channels[-1], config.norm_num_groups, eps=1e-6, **kw)
        self.conv_out = nn.conv(channels[-1], 2 * config.latent_channels, 3, padding=1, **kw)

    def __call__(self, sample: jax.Array) -> jax.Array:
        h = self.conv_in(sample)
        for block in self.down_blocks:
            h = checkpointed(DownEncoderBlock2D.__call__, self.gradient_checkpointing)(block, h)
        h = checkpointed(UNetMidBlock2D.__call__, self.gradient_checkpointing)(self.mid_block, h)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class Decoder(nnx.Module):
    """Latent (NHWC) -> image, mirroring the encoder with ``layers_per_block + 1`` resnets per up block."""

    def __init__(
        self,
        config: AutoencoderKLConfig,
        *,
        attention_impl: nn.AttentionImpl,
        gradient_checkpointing: bool,
        dtype: DTypeLike,
        param_dtype: DTypeLike,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        channels = config.block_out_channels[::-1]
        self.gradient_checkpointing = gradient_checkpointing
        self.conv_in = nn.conv(config.latent_channels, channels[0], 3, padding=1, **kw)
        self.mid_block = _mid_block(config, attention_impl, **kw)
        self.up_blocks = nnx.List(
            [
                get_up_block(
                    block_type,
                    in_channels=channels[max(i - 1, 0)],
                    out_channels=channels[i],
                    num_layers=config.layers_per_block + 1,
                    resnet_act_fn=config.act_fn,
                    resnet_groups=config.norm_num_groups,
                    add_upsample=i < len(channels) - 1,
                    **kw,
                )
                for i, block_type in enumerate(config.up_block_types)
            ]
        )
        self.conv_norm_out = nn.group_norm(channels[-1], config.norm_num_groups, eps=1e-6, **kw)
        self.conv_out = nn.conv(channels[-1], config.out_channels, 3, padding=1, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = self.conv_in(z)
        h = checkpointed(UNetMidBlock2D.__call__, self.gradient_checkpointing)(self.mid_block, h)
        for block in self.up_blocks:
            h = checkpointed(UpDecoderBlock2D.__call__, self.gradient_checkpointing)(block, h)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class AutoencoderKL(PretrainedModel):
    """The KL-regularised VAE: ``encode(x).latent_dist``, ``decode(z).sample``, ``vae(x).sample``."""

    config_class = AutoencoderKLConfig
    torch_class_name = "AutoencoderKL"

    def __init__(
        self,
        config: AutoencoderKLConfig,
        *,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        attention_impl: nn.AttentionImpl = "xla",
        gradient_checkpointing: bool = False,
        rngs: nnx.Rngs,
    ):
        self.config = config
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        parts = {"attention_impl": attention_impl, "gradient_checkpointing": gradient_checkpointing, **kw}
        latent = config.latent_channels
        self.encoder = Encoder(config, **parts)
        self.decoder = Decoder(config, **parts)
        self.quant_conv = nn.conv(2 * latent, 2 * latent, 1, **kw) if config.use_quant_conv else None
        self.post_quant_conv = nn.conv(latent, latent, 1, **kw) if config.use_post_quant_conv else None

    def encode(self, sample: jax.Array) -> AutoencoderKLOutput:
        """Images (B, in_channels, H, W) -> the posterior over latents (B, latent_channels, H/f, W/f)."""
        moments = self.encoder(_to_nhwc(sample))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return AutoencoderKLOutput(latent_dist=DiagonalGaussian.from_moments(_to_nchw(moments)))

    def decode(self, z: jax.Array) -> DecoderOutput:
        """Unscaled latents (B, latent_channels, h, w) -> images (B, out_channels, h*f, w*f)."""
        z = _to_nhwc(z)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return DecoderOutput(sample=_to_nchw(self.decoder(z)))

    def __call__(
        self, sample: jax.Array, sample_posterior: bool = False, rng: jax.Array | None = None
    ) -> DecoderOutput:
        """Reconstruction through the posterior's mode, or through a draw from it with ``sample_posterior``."""
        if sample_posterior and rng is None:
            raise ValueError("sample_posterior=True needs an rng to draw the latent with")
        posterior = self.encode(sample).latent_dist
        return self.decode(posterior.sample(rng) if sample_posterior else posterior.mode())
