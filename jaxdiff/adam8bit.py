"""8-bit AdamW: Adam's moments stored as 8-bit codes of bitsandbytes' dynamic quantization maps.

The algorithm is bitsandbytes' blockwise 8-bit Adam (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
Quantization"): each step dequantizes the moments, updates them in float32, takes the Adam direction from the
float32 moments and re-quantizes them for storage. The first moment is stored as int8 codes of the signed dynamic
map, the second as uint8 codes of the unsigned one, with one float32 absmax per block of 256 values. Parameters
with fewer than `MIN_8BIT_SIZE` elements keep float32 moments, as bitsandbytes' `min_8bit_size` does.

State layout, chosen so that every leaf shards like its parameter on any mesh: the codes have the parameter's
shape. Blocks run along one axis, `block_axis(shape)`: the second-to-last (the ``in`` axis of linear and conv
kernels, which FSDP shards only when ``out`` does not divide evenly) when it has at least 256 entries, else the
longest axis. Block j of a row covers entries [256 j, 256 j + 256) of that axis, the last block of a row is
shorter when the axis is not a multiple of 256 (padded with zeros in the computation, not in the state), and
absmax has the parameter's shape with the block axis shortened to ceil(n / 256). `state_sharding` gives absmax
the parameter's spec; the block axis keeps its mesh axis only where every shard holds whole blocks.

A positive second moment never rounds to 0 (the smallest positive map value instead): a block's second moments span
more than the map's seven decades when its gradients differ by more than three and a half, and a second moment
rounded to 0 under a first moment that is not makes the step m / eps. On a quadratic whose curvatures span four
decades (`tests/test_adam8bit.py`), plain nearest rounding ends 587 away from float32 AdamW's weights, this rule
0.47 away (bitsandbytes 0.50's CPU kernel: 0.71).

Versus bitsandbytes 0.50: the same maps, block size, absmax, quantization (the nearest map value, a tie to the lower
one, as its reference torch quantizer; its CPU kernel picks a neighbouring code for a few values and maps
values near 0 to a small non-zero code), update order (the step uses the float32 moments, then re-quantized) and
decoupled decay. It blocks the flattened tensor where we block one axis (the same blocks for 1-D tensors), and
orders the Adam arithmetic as torch's AdamW where we follow `optax.scale_by_adam` (equal up to rounding; float32
leaves equal optax exactly).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

BLOCK_SIZE = 256
MIN_8BIT_SIZE = 4096  # bitsandbytes' min_8bit_size
SIGNED_OFFSET = 128  # int8 code c stands for signed map entry c + 128


def dynamic_map(signed: bool) -> np.ndarray:
    """bitsandbytes' dynamic ("dynamic tree") map: 256 sorted float32 values, log-spaced over seven decades.

    Exponent i (0..6) contributes the midpoints of 2**i (signed, both signs) or 2**(i + 1) (unsigned) equal steps
    of [0.1, 1] times 10**(i - 6); 0 and 1 complete the 256 values. The signed map holds 1 but not -1 (its most
    negative value is about -0.993).
    """
    values = [0.0, 1.0]
    for i in range(7):
        steps = 2 ** (i + (0 if signed else 1))
        bounds = np.linspace(0.1, 1.0, steps + 1, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scaled = (10.0 ** (i - 6) * means).astype(np.float32)
        values += scaled.tolist() + ((-scaled).tolist() if signed else [])
    return np.sort(np.asarray(values, np.float32))


_SIGNED_MAP = dynamic_map(signed=True)
_UNSIGNED_MAP = dynamic_map(signed=False)


def block_axis(shape: tuple[int, ...]) -> int:
    """The axis the quantization blocks of a tensor of ``shape`` run along (see the module docstring)."""
    if len(shape) >= 2 and shape[-2] >= BLOCK_SIZE:
        return len(shape) - 2
    return max(range(len(shape)), key=lambda axis: (shape[axis], axis))


def _quantized(shape: tuple[int, ...]) -> bool:
    return int(np.prod(shape)) >= MIN_8BIT_SIZE


def _absmax_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    axis = block_axis(shape)
    return (*shape[:axis], -(-shape[axis] // BLOCK_SIZE), *shape[axis + 1 :])


def _expand(absmax: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Each block's absmax at every entry of the block: an array of ``shape``."""
    axis = block_axis(shape)
    return jax.lax.slice_in_dim(jnp.repeat(absmax, BLOCK_SIZE, axis=axis), 0, shape[axis], axis=axis)


def quantize_blockwise(x: jax.Array, signed: bool) -> tuple[jax.Array, jax.Array]:
    """Codes (int8 if ``signed`` else uint8, ``x``'s shape) and float32 absmax per block of ``x``: the nearest map
    value, except that a positive unsigned value (Adam's second moment) keeps at least the smallest positive one."""
    qmap = _SIGNED_MAP if signed else _UNSIGNED_MAP
    x = x.astype(jnp.float32)
    axis = block_axis(x.shape)
    blocks = -(-x.shape[axis] // BLOCK_SIZE)
    padded = jnp.pad(x, [(0, blocks * BLOCK_SIZE - x.shape[axis]) if a == axis else (0, 0) for a in range(x.ndim)])
    split = padded.reshape(*x.shape[:axis], blocks, BLOCK_SIZE, *x.shape[axis + 1 :])
    absmax = jnp.max(jnp.abs(split), axis=axis + 1)
    scale = _expand(absmax, x.shape)
    normed = jnp.clip(x * (1.0 / jnp.where(scale > 0, scale, 1.0)), -1.0, 1.0)
    index = jnp.searchsorted(jnp.asarray((qmap[:-1] + qmap[1:]) / 2), normed, side="left")  # nearest, ties down
    if not signed:  # a positive second moment never becomes 0 (see the module docstring)
        index = jnp.maximum(index, (normed > 0).astype(index.dtype))
    codes = (index - SIGNED_OFFSET).astype(jnp.int8) if signed else index.astype(jnp.uint8)
    return codes, absmax


def dequantize_blockwise(codes: jax.Array, absmax: jax.Array) -> jax.Array:
    """The float32 values that ``codes`` (int8: signed map, uint8: unsigned map) and their ``absmax`` stand for."""
    signed = codes.dtype == jnp.int8
    qmap = jnp.asarray(_SIGNED_MAP if signed else _UNSIGNED_MAP)
    index = codes.astype(jnp.int32) + (SIGNED_OFFSET if signed else 0)
    return qmap[index] * _expand(absmax, codes.shape)


class ScaleByAdam8bitState(NamedTuple):
    """Update count; per parameter the moments (8-bit codes, or float32 below `MIN_8BIT_SIZE` elements) and their
    absmax (a float32 scalar placeholder for float32 moments)."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    mu_absmax: optax.Updates
    nu_absmax: optax.Updates


def scale_by_adam8bit(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """`optax.scale_by_adam` with 8-bit blockwise-quantized moments; float32 moments for small parameters give
    exactly optax's results."""

    def init_fn(params: optax.Params) -> ScaleByAdam8bitState:
        def moment(p: jax.Array, signed: bool) -> jax.Array:
            if _quantized(p.shape):
                return jnp.zeros(p.shape, jnp.int8 if signed else jnp.uint8)
            return jnp.zeros(p.shape, jnp.float32)

        def absmax(p: jax.Array) -> jax.Array:
            return jnp.zeros(_absmax_shape(p.shape) if _quantized(p.shape) else (), jnp.float32)

        return ScaleByAdam8bitState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(lambda p: moment(p, True), params),
            nu=jax.tree.map(lambda p: moment(p, False), params),
            mu_absmax=jax.tree.map(absmax, params),
            nu_absmax=jax.tree.map(absmax, params),
        )

    def update_fn(
        updates: optax.Updates, state: ScaleByAdam8bitState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, ScaleByAdam8bitState]:
        del params

        def load(stored: jax.Array, absmax: jax.Array) -> jax.Array:
            return stored if stored.dtype == jnp.float32 else dequantize_blockwise(stored, absmax)

        mu = optax.tree.update_moment(updates, jax.tree.map(load, state.mu, state.mu_absmax), b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, jax.tree.map(load, state.nu, state.nu_absmax), b2, 2)
        count_inc = optax.safe_increment(state.count)
        mu_hat = optax.tree.bias_correction(mu, b1, count_inc)
        nu_hat = optax.tree.bias_correction(nu, b2, count_inc)
        updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)

        def store(value: jax.Array, stored: jax.Array, absmax: jax.Array) -> tuple[jax.Array, jax.Array]:
            if stored.dtype == jnp.float32:
                return value, absmax
            return quantize_blockwise(value, signed=stored.dtype == jnp.int8)

        def store_tree(values: Any, stored: Any, absmax: Any) -> tuple[Any, Any]:
            pairs = jax.tree.map(store, values, stored, absmax)
            outer = jax.tree.structure(stored)
            return jax.tree.transpose(outer, jax.tree.structure((0, 0)), pairs)

        mu, mu_absmax = store_tree(mu, state.mu, state.mu_absmax)
        nu, nu_absmax = store_tree(nu, state.nu, state.nu_absmax)
        return updates, ScaleByAdam8bitState(count_inc, mu, nu, mu_absmax, nu_absmax)

    return optax.GradientTransformation(init_fn, update_fn)


def adamw8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
) -> optax.GradientTransformation:
    """`optax.adamw` (decoupled decay on every parameter, then the learning rate) on `scale_by_adam8bit`."""
    return optax.chain(
        scale_by_adam8bit(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


def state_sharding(leaf: Any, param: Any, sharding: NamedSharding) -> NamedSharding:
    """The sharding of optimizer-state ``leaf`` that mirrors ``param`` (sharded as ``sharding``): the parameter's
    for param-shaped leaves (moments, codes); for absmax the parameter's spec with the block axis kept sharded
    only where each shard holds whole blocks; replicated for scalar placeholders."""
    if tuple(leaf.shape) == tuple(param.shape):
        return sharding
    if len(leaf.shape) != len(param.shape):
        return NamedSharding(sharding.mesh, PartitionSpec())
    axis = block_axis(tuple(param.shape))
    spec = [*sharding.spec, *(None,) * (len(param.shape) - len(sharding.spec))]
    names = spec[axis]
    if names is not None:
        size = int(np.prod([sharding.mesh.shape[n] for n in ((names,) if isinstance(names, str) else names)]))
        if param.shape[axis] % (BLOCK_SIZE * size):
            spec[axis] = None
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))
