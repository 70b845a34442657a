"""Parameterized primitives with logical axis names, and the one attention function every model calls.

Every parameter is created with logical axis names (``in``/``out`` for kernels, ``norm`` for norm scales,
``vocab``/``embed`` for embeddings). ``jaxdiff.parallel`` maps them to mesh axes by one rule table; models
never see a mesh. Variables are not sharded eagerly at creation, so models build the same with or without one.
"""

from collections.abc import Sequence
from typing import Literal

import flax
import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

flax.config.update("flax_always_shard_variable", False)

AttentionImpl = Literal["xla", "cudnn"]
ATTENTION_IMPLEMENTATIONS: tuple[str, ...] = ("xla", "cudnn")

_default_kernel_init = nnx.initializers.lecun_normal()


def linear(
    in_features: int,
    out_features: int,
    *,
    use_bias: bool = True,
    dtype: DTypeLike | None = None,
    param_dtype: DTypeLike = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """A dense layer; kernel (in, out) is torch's weight transposed."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(_default_kernel_init, ("in", "out")),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("out",)),
        rngs=rngs,
    )


def conv(
    in_features: int,
    out_features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int | str | Sequence[tuple[int, int]] = 0,
    use_bias: bool = True,
    dtype: DTypeLike | None = None,
    param_dtype: DTypeLike = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """A 2-D convolution on NHWC inputs; kernel is HWIO (torch's OIHW weight, permuted).

    ``padding`` is torch's: an int pads both sides of both spatial dims.
    """
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nnx.Conv(
        in_features,
        out_features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=padding,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(_default_kernel_init, (None, None, "in", "out")),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("out",)),
        rngs=rngs,
    )


def group_norm(
    num_channels: int,
    num_groups: int,
    *,
    eps: float = 1e-5,
    dtype: DTypeLike | None = None,
    param_dtype: DTypeLike = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.GroupNorm:
    """GroupNorm over the channel (last) axis, statistics in float32 as torch computes them."""
    if num_channels % num_groups:
        raise ValueError(f"norm_num_groups={num_groups} must divide the channel count {num_channels}")
    return nnx.GroupNorm(
        num_channels,
        num_groups=num_groups,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)),
        rngs=rngs,
    )


def layer_norm(
    num_features: int,
    *,
    eps: float = 1e-5,
    use_bias: bool = True,
    dtype: DTypeLike | None = None,
    param_dtype: DTypeLike = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.LayerNorm:
    """LayerNorm over the last axis."""
    return nnx.LayerNorm(
        num_features,
        epsilon=eps,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)),
        rngs=rngs,
    )


def embed(
    num_embeddings: int,
    features: int,
    *,
    dtype: DTypeLike | None = None,
    param_dtype: DTypeLike = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Embed:
    """A lookup table (vocab, embed)."""
    return nnx.Embed(
        num_embeddings,
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed")),
        rngs=rngs,
    )


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    upcast: bool = False,
    implementation: AttentionImpl = "xla",
) -> jax.Array:
    """Scaled dot-product attention on (batch, seq, heads, head_dim) arrays.

    The single place where attention is computed, so fused kernels plug in here. ``upcast`` computes
    scores and softmax in float32 (diffusers' ``upcast_attention``). ``mask`` is boolean, True = attend,
    broadcastable to (batch, heads, q_len, kv_len).
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
    out_dtype = query.dtype
    if upcast:
        query, key, value = (x.astype(jnp.float32) for x in (query, key, value))
    out = jax.nn.dot_product_attention(
        query, key, value, mask=mask, is_causal=is_causal, implementation=implementation
    )
    return out.astype(out_dtype)
