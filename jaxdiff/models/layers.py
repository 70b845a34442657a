"""Building blocks shared by the UNets and the VAE, named and wired like diffusers' torch modules.

Attribute names follow diffusers' module paths (``to_q``, ``to_out.0``, ``ff.net.0.proj``, ``time_emb_proj``, ...)
so a dotted NNX path is the torch state-dict key up to the leaf. Images are NHWC inside every layer here; the
public models convert from and to diffusers' NCHW at their boundary.
"""

import math
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

from jaxdiff.models import nn

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": nn.gelu,
    "relu": jax.nn.relu,
    "mish": jax.nn.mish,
}


_F = TypeVar("_F", bound=Callable[..., Any])


def checkpointed(fn: _F, enabled: bool) -> _F:
    """``fn`` rematerialised in the backward pass (``jax.checkpoint``) when ``enabled``; ``fn`` itself otherwise.

    ``fn`` takes the module as its first argument (an unbound ``__call__``). The module's state goes into the
    checkpoint as an argument and is merged into a new module inside, rather than lifted by ``nnx.remat``: NNX's remat
    writes into the caller's variables from inside, which it refuses (TraceContextError) when only some of them are
    differentiated, e.g. LoRA's adapters beside frozen base weights. The blocks are pure (no RNG or batch
    statistics), so there is nothing to write back.
    """
    if not enabled:
        return fn

    def rematerialised(module: nnx.Module, *args: Any) -> Any:
        graphdef, state = nnx.split(module)
        return jax.checkpoint(lambda state, *args: fn(nnx.merge(graphdef, state), *args))(state, *args)

    return rematerialised  # type: ignore[return-value]


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation diffusers names ``name`` (torch's exact-erf GELU for ``"gelu"``)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def get_timestep_embedding(
    timesteps: jax.Array,
    embedding_dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: int = 10000,
) -> jax.Array:
    """Sinusoidal embeddings (N, embedding_dim) of N possibly fractional timesteps, in float32.

    Frequencies are ``exp(-log(max_period) * i / (half - downscale_freq_shift))``; the output is ``[sin, cos]``
    (``[cos, sin]`` with ``flip_sin_to_cos``), zero-padded by one column when ``embedding_dim`` is odd.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D array, got shape {timesteps.shape}")
    half_dim = embedding_dim // 2
    # The frequencies are constants: computed once on the host, rounded to float32 once, so that large timesteps
    # (which multiply any rounding error in them) see the same values as diffusers'.
    exponent = -math.log(max_period) * np.arange(half_dim, dtype=np.float32)
    exponent = exponent / np.float32(half_dim - downscale_freq_shift)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    emb = scale * (timesteps.astype(jnp.float32)[:, None] * freqs[None, :])
    sin, cos = jnp.sin(emb), jnp.cos(emb)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if embedding_dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class Timesteps(nnx.Module):
    """Parameter-free sinusoidal projection of timesteps (diffusers' ``Timesteps``)."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float = 1.0):
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale

    def __call__(self, timesteps: jax.Array) -> jax.Array:
        return get_timestep_embedding(
            timesteps,
            self.num_channels,
            flip_sin_to_cos=self.flip_sin_to_cos,
            downscale_freq_shift=self.downscale_freq_shift,
            scale=self.scale,
        )


class TimestepEmbedding(nnx.Module):
    """MLP ``linear_1 -> act -> linear_2 [-> post_act]`` on a timestep projection.

    With ``cond_proj_dim`` (LCM's guidance-scale embedding, ``time_cond_proj_dim``) a bias-free ``cond_proj`` maps
    the condition to ``in_channels`` and is added to the input first.
    """

    def __init__(
        self,
        in_channels: int,
        time_embed_dim: int,
        *,
        act_fn: str = "silu",
        out_dim: int | None = None,
        post_act_fn: str | None = None,
        cond_proj_dim: int | None = None,
        sample_proj_bias: bool = True,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        dense = partial(nn.linear, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = dense(in_channels, time_embed_dim, use_bias=sample_proj_bias)
        self.cond_proj = dense(cond_proj_dim, in_channels, use_bias=False) if cond_proj_dim is not None else None
        self.act = get_activation(act_fn)
        self.linear_2 = dense(time_embed_dim, out_dim or time_embed_dim, use_bias=sample_proj_bias)
        self.post_act = get_activation(post_act_fn) if post_act_fn is not None else None

    def __call__(self, sample: jax.Array, condition: jax.Array | None = None) -> jax.Array:
        if condition is not None:
            if self.cond_proj is None:
                raise ValueError("a condition was given but this TimestepEmbedding has no cond_proj (cond_proj_dim)")
            sample = sample + self.cond_proj(condition)
        sample = nn.shard_batch(self.linear_2(nn.shard_batch(self.act(self.linear_1(nn.shard_batch(sample))))))
        return self.post_act(sample) if self.post_act is not None else sample


class ResnetBlock2D(nnx.Module):
    """Pre-norm residual block ``GN -> act -> conv -> (+temb) -> GN -> act -> conv`` plus a shortcut.

    The shortcut is a 1x1 ``conv_shortcut`` when the channel count changes (or ``use_in_shortcut``). ``temb_channels``
    None builds no ``time_emb_proj`` (the VAE). ``time_embedding_norm="scale_shift"`` applies the embedding as
    ``norm2(h) * (1 + scale) + shift``. The sum is divided by ``output_scale_factor``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        *,
        temb_channels: int | None = 512,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        non_linearity: str = "silu",
        time_embedding_norm: str = "default",
        output_scale_factor: float = 1.0,
        use_in_shortcut: bool | None = None,
        conv_shortcut_bias: bool = True,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(f"time_embedding_norm {time_embedding_norm!r} is not one of ('default', 'scale_shift')")
        out_channels = out_channels or in_channels
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.norm1 = nn.group_norm(in_channels, groups, eps=eps, **kw)
        self.conv1 = nn.conv(in_channels, out_channels, 3, padding=1, **kw)
        if temb_channels is None:
            self.time_emb_proj = None
        else:
            proj_channels = 2 * out_channels if time_embedding_norm == "scale_shift" else out_channels
            self.time_emb_proj = nn.linear(temb_channels, proj_channels, **kw)
        self.norm2 = nn.group_norm(out_channels, groups_out or groups, eps=eps, **kw)
        self.conv2 = nn.conv(out_channels, out_channels, 3, padding=1, **kw)
        if use_in_shortcut is None:
            use_in_shortcut = in_channels != out_channels
        self.conv_shortcut = (
            nn.conv(in_channels, out_channels, 1, use_bias=conv_shortcut_bias, **kw) if use_in_shortcut else None
        )
        self.nonlinearity = get_activation(non_linearity)
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = output_scale_factor

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        """``x`` is NHWC, ``temb`` is (B, temb_channels) or None."""
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        if temb is not None:
            if self.time_emb_proj is None:
                raise ValueError("a time embedding was given to a ResnetBlock2D built with temb_channels=None")
            temb = nn.shard_batch(self.time_emb_proj(self.nonlinearity(temb)))[:, None, None, :]
        if self.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError("time_embedding_norm='scale_shift' needs a time embedding")
            scale, shift = jnp.split(temb, 2, axis=-1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h if temb is None else h + temb)
        h = self.conv2(self.nonlinearity(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nnx.Module):
    """Halve H and W: a stride-2 3x3 ``conv`` or, with ``use_conv=False``, a 2x2 average pool.

    ``padding=0`` pads only bottom and right by one, as diffusers' VAE encoder does.
    """

    def __init__(
        self,
        channels: int,
        *,
        use_conv: bool = False,
        out_channels: int | None = None,
        padding: int = 1,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        out_channels = out_channels or channels
        if use_conv:
            pad = ((0, 1), (0, 1)) if padding == 0 else padding
            self.conv = nn.conv(
                channels, out_channels, 3, stride=2, padding=pad, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )
        elif out_channels != channels:
            raise ValueError(f"average-pool downsampling keeps {channels} channels, cannot output {out_channels}")
        else:
            self.conv = None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.conv is None:
            return nnx.avg_pool(x, (2, 2), strides=(2, 2))
        return self.conv(x)


def upsample_nearest(x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
    """Nearest-neighbour resize of NHWC ``x`` to ``output_size`` (default 2x), sampling like torch's ``nearest``."""
    (h, w) = x.shape[1:3]
    if output_size is None or tuple(output_size) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    out_h, out_w = output_size
    rows = (jnp.arange(out_h) * h) // out_h
    cols = (jnp.arange(out_w) * w) // out_w
    return x[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x upsampling (or to ``output_size``), then an optional 3x3 ``conv``."""

    def __init__(
        self,
        channels: int,
        *,
        use_conv: bool = False,
        out_channels: int | None = None,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        out_channels = out_channels or channels
        if use_conv:
            self.conv = nn.conv(channels, out_channels, 3, padding=1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        elif out_channels != channels:
            raise ValueError(f"upsampling without a conv keeps {channels} channels, cannot output {out_channels}")
        else:
            self.conv = None

    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        x = upsample_nearest(x, output_size)
        return x if self.conv is None else self.conv(x)


class Attention(nnx.Module):
    """Multi-head attention with diffusers' ``Attention`` parameters and semantics.

    Self-attention when ``encoder_hidden_states`` is None, else cross-attention with keys/values of width
    ``cross_attention_dim``. Accepts (B, N, C) tokens or an NHWC image (B, H, W, C), which is attended over its
    H*W positions and returned in the same shape. Optional ``group_norm`` before the projections (VAE and
    UNet2DModel mid-blocks), ``residual_connection`` and ``rescale_output_factor`` as diffusers.
    """

    def __init__(
        self,
        query_dim: int,
        *,
        cross_attention_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        bias: bool = False,
        out_bias: bool = True,
        upcast_attention: bool = False,
        norm_num_groups: int | None = None,
        eps: float = 1e-5,
        residual_connection: bool = False,
        rescale_output_factor: float = 1.0,
        attention_impl: nn.AttentionImpl = "xla",
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        inner_dim = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        self.group_norm = (
            nn.group_norm(query_dim, norm_num_groups, eps=eps, **kw) if norm_num_groups is not None else None
        )
        self.to_q = nn.linear(query_dim, inner_dim, use_bias=bias, **kw)
        self.to_k = nn.linear(kv_dim, inner_dim, use_bias=bias, **kw)
        self.to_v = nn.linear(kv_dim, inner_dim, use_bias=bias, **kw)
        self.to_out = nnx.List([nn.linear(inner_dim, query_dim, use_bias=out_bias, **kw)])
        self.heads = heads
        self.upcast_attention = upcast_attention
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.attention_impl = attention_impl

    def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array | None = None) -> jax.Array:
        residual = hidden_states
        x = hidden_states.reshape(hidden_states.shape[0], -1, hidden_states.shape[-1])
        if self.group_norm is not None:
            x = self.group_norm(x)
        context = x if encoder_hidden_states is None else encoder_hidden_states

        def split_heads(t: jax.Array) -> jax.Array:
            return t.reshape(*t.shape[:2], self.heads, -1)

        out = nn.attention(
            split_heads(self.to_q(x)),
            split_heads(self.to_k(context)),
            split_heads(self.to_v(context)),
            upcast=self.upcast_attention,
            implementation=self.attention_impl,
        )
        out = self.to_out[0](out.reshape(*out.shape[:2], -1)).reshape(*residual.shape[:-1], -1)
        if self.residual_connection:
            out = out + residual
        return out / self.rescale_output_factor


class GELU(nnx.Module):
    """``proj`` then GELU (exact, or tanh-approximated with ``approximate="tanh"``)."""

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        *,
        approximate: str = "none",
        bias: bool = True,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.proj = nn.linear(dim_in, dim_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.approximate = approximate == "tanh"

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.proj(x)
        return jax.nn.gelu(x, approximate=True) if self.approximate else nn.gelu(x)


class GEGLU(nnx.Module):
    """Gated GELU: ``proj`` to twice the width, then ``value * gelu(gate)``."""

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        *,
        bias: bool = True,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.proj = nn.linear(dim_in, 2 * dim_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(self.proj(x), 2, axis=-1)
        return value * nn.gelu(gate)


class FeedForward(nnx.Module):
    """``net = [activation projection, dropout slot, Linear]`` as diffusers' ``FeedForward``.

    ``net.1`` is diffusers' dropout; it holds no parameters and is kept as an empty slot so that the output
    projection keeps its torch key ``ff.net.2``. Dropout itself is not implemented (rate 0, as SD checkpoints use).
    """

    def __init__(
        self,
        dim: int,
        *,
        dim_out: int | None = None,
        mult: int = 4,
        activation_fn: str = "geglu",
        inner_dim: int | None = None,
        bias: bool = True,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        inner_dim = inner_dim or int(dim * mult)
        kw = {"bias": bias, "dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        if activation_fn == "geglu":
            act = GEGLU(dim, inner_dim, **kw)
        elif activation_fn == "gelu":
            act = GELU(dim, inner_dim, **kw)
        elif activation_fn == "gelu-approximate":
            act = GELU(dim, inner_dim, approximate="tanh", **kw)
        else:
            raise ValueError(f"activation_fn {activation_fn!r} is not one of ('geglu', 'gelu', 'gelu-approximate')")
        out = nn.linear(inner_dim, dim_out or dim, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.net = nnx.List([act, None, out])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """Pre-LayerNorm transformer block: self-attention, cross-attention, feed-forward, each residual.

    ``only_cross_attention`` makes ``attn1`` attend to the encoder states too; ``double_self_attention`` makes
    ``attn2`` a second self-attention. Without ``cross_attention_dim`` (and no double self-attention) there is no
    ``norm2``/``attn2``.
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        *,
        cross_attention_dim: int | None = None,
        activation_fn: str = "geglu",
        attention_bias: bool = False,
        only_cross_attention: bool = False,
        double_self_attention: bool = False,
        upcast_attention: bool = False,
        norm_eps: float = 1e-5,
        attention_impl: nn.AttentionImpl = "xla",
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        attention = partial(
            Attention,
            dim,
            heads=num_attention_heads,
            dim_head=attention_head_dim,
            bias=attention_bias,
            upcast_attention=upcast_attention,
            attention_impl=attention_impl,
            **kw,
        )
        self.norm1 = nn.layer_norm(dim, eps=norm_eps, **kw)
        self.attn1 = attention(cross_attention_dim=cross_attention_dim if only_cross_attention else None)
        if cross_attention_dim is not None or double_self_attention:
            self.norm2 = nn.layer_norm(dim, eps=norm_eps, **kw)
            self.attn2 = attention(cross_attention_dim=None if double_self_attention else cross_attention_dim)
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = nn.layer_norm(dim, eps=norm_eps, **kw)
        self.ff = FeedForward(dim, activation_fn=activation_fn, **kw)
        self.only_cross_attention = only_cross_attention

    def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array | None = None) -> jax.Array:
        """``hidden_states`` (B, N, dim); ``encoder_hidden_states`` (B, M, cross_attention_dim) or None."""
        x = hidden_states
        x = x + self.attn1(self.norm1(x), encoder_hidden_states if self.only_cross_attention else None)
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), encoder_hidden_states)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """diffusers' continuous-input ``Transformer2DModel``: GroupNorm, ``proj_in``, transformer blocks, ``proj_out``.

    Projections are 1x1 convs (SD 1.x) or linears (``use_linear_projection``, SD 2.x and SDXL); the input is
    added back at the end. Takes and returns NHWC.
    """

    def __init__(
        self,
        num_attention_heads: int,
        attention_head_dim: int,
        in_channels: int,
        *,
        out_channels: int | None = None,
        num_layers: int = 1,
        norm_num_groups: int = 32,
        cross_attention_dim: int | None = None,
        attention_bias: bool = False,
        activation_fn: str = "geglu",
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        double_self_attention: bool = False,
        upcast_attention: bool = False,
        norm_eps: float = 1e-5,
        attention_impl: nn.AttentionImpl = "xla",
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        inner_dim = num_attention_heads * attention_head_dim
        out_channels = out_channels or in_channels
        self.norm = nn.group_norm(in_channels, norm_num_groups, eps=1e-6, **kw)
        if use_linear_projection:
            self.proj_in = nn.linear(in_channels, inner_dim, **kw)
            self.proj_out = nn.linear(inner_dim, out_channels, **kw)
        else:
            self.proj_in = nn.conv(in_channels, inner_dim, 1, **kw)
            self.proj_out = nn.conv(inner_dim, out_channels, 1, **kw)
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(
                    inner_dim,
                    num_attention_heads,
                    attention_head_dim,
                    cross_attention_dim=cross_attention_dim,
                    activation_fn=activation_fn,
                    attention_bias=attention_bias,
                    only_cross_attention=only_cross_attention,
                    double_self_attention=double_self_attention,
                    upcast_attention=upcast_attention,
                    norm_eps=norm_eps,
                    attention_impl=attention_impl,
                    **kw,
                )
                for _ in range(num_layers)
            ]
        )

    def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array | None = None) -> jax.Array:
        batch, height, width, _ = hidden_states.shape
        # 1x1 convs and linears are the same map on NHWC; only the parameter layout differs.
        x = self.proj_in(self.norm(hidden_states))
        x = x.reshape(batch, height * width, -1)
        for block in self.transformer_blocks:
            x = block(x, encoder_hidden_states)
        x = self.proj_out(x.reshape(batch, height, width, -1))
        return x + hidden_states
