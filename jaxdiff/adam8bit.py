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

Memory: quantizing and dequantizing are float32 arithmetic on each element, with no table lookup (gather) or search
(a loop), neither of which XLA fuses; and the update reads each parameter's codes and gradient twice, computing the
new moments each time: once to reduce them to their blocks' absmax, once to re-quantize them and take the Adam
direction. So the float32 moments never exist for the whole model at once (benchmarks/optimizer_memory.py compiles
the update for TPU against AdamW's). A third pass for the direction measured worse (SD 1.5's update on a v5p-8).
Both passes compute on the blocked view of each tensor (the block axis split in two), where a block's absmax
broadcasts: computed on the tensor's own shape, the absmax's repeat along the axis kept XLA for TPU from fusing it,
and the update wrote each absmax out at every entry (SD 1.5's update on a v5p-8: 1.6x the bytes accessed).

Versus bitsandbytes 0.50: the same maps (equal to 2e-7 relative: ours are float32 arithmetic, its are float32
`linspace`), block size, absmax, quantization (the nearest map value, a tie to the lower one, as its reference torch
quantizer; its CPU kernel picks a neighbouring code for a few values and maps
values near 0 to a small non-zero code), update order (the step uses the float32 moments, then re-quantized) and
decoupled decay. It blocks the flattened tensor where we block one axis (the same blocks for 1-D tensors), and
orders the Adam arithmetic as torch's AdamW where we follow `optax.scale_by_adam` (equal up to rounding; float32
leaves do optax's arithmetic).
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

BLOCK_SIZE = 256
MIN_8BIT_SIZE = 4096  # bitsandbytes' min_8bit_size
SIGNED_OFFSET = 128  # int8 code c stands for signed map entry c + 128


def _map_value(p: jax.Array, signed: bool) -> jax.Array:
    """Value of the map entry of magnitude rank ``p`` (int32; 0 is the value 0, `_top(signed)` the value 1).

    Between them, rank p + shift (shift 0 signed, 1 unsigned) = 2**e + j with 0 <= j < 2**e is the j-th of the
    2**e midpoints of equal steps of [0.1, 1] times 10**(e - shift - 6). Plain float32 arithmetic, so it fuses
    into the update on any device: no table lookup (gather).
    """
    t = p + (0 if signed else 1)
    e = (jax.lax.bitcast_convert_type(t.astype(jnp.float32), jnp.int32) >> 23) - 127  # floor(log2 t), exact
    value = _in_decade(_decade(e - (0 if signed else 1)), _step(e), (t - (1 << e)).astype(jnp.float32))
    return jnp.where(p == 0, np.float32(0), jnp.where(p == _top(signed), np.float32(1), value))


def _step(e: jax.Array) -> jax.Array:
    """0.9 / 2**e in float32 for integer arrays ``e`` in [0, 7]: exact (the exponent bits, then one product)."""
    return jax.lax.bitcast_convert_type((127 - e) << 23, jnp.float32) * np.float32(0.9)


def _in_decade(scale: jax.Array, step: jax.Array, j: jax.Array) -> jax.Array:
    """The ``j``-th (float32) of the equal-``step`` midpoints of [0.1, 1] times the decade's ``scale``."""
    return scale * (np.float32(0.1) + (j + np.float32(0.5)) * step)


def _top(signed: bool) -> int:
    """Magnitude rank of the map's 1.0: 127 values below it on the positive side (signed), 254 (unsigned)."""
    return 128 if signed else 255


def _decade(i: jax.Array) -> jax.Array:
    """10**(i - 6) in float32 for integer arrays ``i`` in [0, 6] (clamped), by selects: exact, and fusible."""
    return _by_decade(i, 10.0 ** np.arange(-6, 1))


def _by_decade(i: jax.Array, table: np.ndarray) -> jax.Array:
    """``table[i]`` (float32) for integer arrays ``i`` in [0, 6] (clamped): selects, not a gather, so it fuses."""
    table = table.astype(np.float32)
    value = jnp.full(i.shape, table[0])
    for k in range(1, 7):
        value = jnp.where(i >= k, table[k], value)
    return value


@functools.cache
def _decade_edges(signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per decade, the float32 midpoints between its first map value and the one below, and between its last and the
    one above: the two that `_encode` cannot take within the decade."""
    values = dynamic_map(signed)
    by_rank = values[SIGNED_OFFSET - 1 :] if signed else values  # 0 ... 1
    shift = 0 if signed else 1
    first = (1 << np.arange(7) + shift) - shift
    last = (1 << np.arange(7) + shift + 1) - shift - 1
    return (by_rank[first - 1] + by_rank[first]) / 2, (by_rank[last] + by_rank[last + 1]) / 2


def _encode(normed: jax.Array, signed: bool) -> jax.Array:
    """Codes of the map values nearest to ``normed`` (in [-1, 1]; a tie goes to the lower value), elementwise.

    The decade and the equal step within it give a rank at most one off the nearest; comparing with the midpoints
    to the neighbouring values settles it. Within the decade the neighbours are the equal steps beside it (the
    arithmetic of `_map_value`); across its edges, `_decade_edges`.
    """
    a = jnp.abs(normed)
    shift = 0 if signed else 1
    i = jnp.clip(jnp.floor(jnp.log10(a)) + 7, 0, 6).astype(jnp.int32)
    e = i + shift
    steps = (1 << e).astype(jnp.float32)
    scale = _decade(i)
    j = jnp.clip(jnp.floor((a * (1 / scale) - np.float32(0.1)) * steps * np.float32(1 / 0.9)), 0, steps - 1)
    step = _step(e)
    here = _in_decade(scale, step, j)
    below, above = _decade_edges(signed)
    lower = jnp.where(j > 0, (_in_decade(scale, step, j - 1) + here) / 2, _by_decade(i, below))
    upper = jnp.where(j < steps - 1, (here + _in_decade(scale, step, j + 1)) / 2, _by_decade(i, above))
    p = (1 << e) - shift + j.astype(jnp.int32)
    negative = normed < 0  # ties go to the lower value: the larger magnitude when negative
    p = p - jnp.where(negative, a < lower, a <= lower) + jnp.where(negative, a >= upper, a > upper)
    if not signed:  # a positive second moment never becomes 0 (see the module docstring)
        return jnp.maximum(p, (a > 0).astype(p.dtype)).astype(jnp.uint8)
    p = jnp.minimum(p, jnp.where(negative, _top(signed) - 1, _top(signed)))  # the map has 1 but not -1
    return jnp.where(negative, -p - 1, p - 1).astype(jnp.int8)


def _decode(codes: jax.Array) -> jax.Array:
    """The map values (float32) that ``codes`` stand for: int8 codes of the signed map, uint8 of the unsigned."""
    if codes.dtype == jnp.uint8:
        return _map_value(codes.astype(jnp.int32), signed=False)
    rank = codes.astype(jnp.int32) + 1
    value = _map_value(jnp.abs(rank), signed=True)
    return jnp.where(rank < 0, -value, value)


def dynamic_map(signed: bool) -> np.ndarray:
    """bitsandbytes' dynamic ("dynamic tree") map: 256 sorted float32 values, log-spaced over seven decades.

    Decade i (0..6) contributes the midpoints of 2**i (signed, both signs) or 2**(i + 1) (unsigned) equal steps
    of [0.1, 1] times 10**(i - 6); 0 and 1 complete the 256 values. The signed map holds 1 but not -1 (its most
    negative value is about -0.993). Entry c + `SIGNED_OFFSET` (signed) or c (unsigned) is what code c stands for.
    """
    codes = np.arange(-128, 128, dtype=np.int8) if signed else np.arange(256, dtype=np.uint8)
    with jax.ensure_compile_time_eval():  # values, also when first called inside a trace (`_decade_edges`)
        return np.asarray(jax.jit(_decode)(jnp.asarray(codes)))


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


def _blocked(x: jax.Array) -> jax.Array:
    """``x`` viewed as its blocks: the block axis split into (blocks, `BLOCK_SIZE`), a short last block padded with
    the zero value (0; the code of 0 for int8 codes); an axis of one block is (1, its length). A reshape unless
    padded."""
    axis = block_axis(x.shape)
    size = min(x.shape[axis], BLOCK_SIZE)
    pad = -x.shape[axis] % size
    if pad:
        zero = -1 if x.dtype == jnp.int8 else 0  # int8 code -1 is the signed map's 0
        x = jnp.pad(x, [(0, pad) if a == axis else (0, 0) for a in range(x.ndim)], constant_values=zero)
    return x.reshape(*x.shape[:axis], -1, size, *x.shape[axis + 1 :])


def _unblocked(y: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The inverse of `_blocked`: blocks of ``y`` back to a tensor of ``shape``."""
    axis = block_axis(shape)
    y = y.reshape(*shape[:axis], -1, *shape[axis + 1 :])
    return jax.lax.slice_in_dim(y, 0, shape[axis], axis=axis)


def _block_absmax(blocks: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The largest magnitude in each block of float32 ``blocks`` (`_blocked` of a tensor of ``shape``)."""
    return jnp.max(jnp.abs(blocks), axis=block_axis(shape) + 1)


def _scale(absmax: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``absmax`` broadcastable against the blocks of a tensor of ``shape``."""
    return jnp.expand_dims(absmax, block_axis(shape) + 1)


def _codes(blocks: jax.Array, absmax: jax.Array, shape: tuple[int, ...], signed: bool) -> jax.Array:
    """The codes (a tensor of ``shape``) of float32 ``blocks`` scaled by their ``absmax``."""
    scale = _scale(absmax, shape)
    normed = jnp.clip(blocks * (1.0 / jnp.where(scale > 0, scale, 1.0)), -1.0, 1.0)
    return _unblocked(_encode(normed, signed), shape)


def quantize_blockwise(x: jax.Array, signed: bool) -> tuple[jax.Array, jax.Array]:
    """Codes (int8 if ``signed`` else uint8, ``x``'s shape) and float32 absmax per block of ``x``: the nearest map
    value, except that a positive unsigned value (Adam's second moment) keeps at least the smallest positive one."""
    blocks = _blocked(x.astype(jnp.float32))
    absmax = _block_absmax(blocks, x.shape)
    return _codes(blocks, absmax, x.shape, signed), absmax


def _values(blocks: jax.Array, absmax: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The float32 values of code ``blocks`` (`_blocked` codes of a tensor of ``shape``) and their ``absmax``."""
    return _decode(blocks) * _scale(absmax, shape)


def dequantize_blockwise(codes: jax.Array, absmax: jax.Array) -> jax.Array:
    """The float32 values that ``codes`` (int8: signed map, uint8: unsigned map) and their ``absmax`` stand for."""
    return _unblocked(_values(_blocked(codes), absmax, codes.shape), codes.shape)


class ScaleByAdam8bitState(NamedTuple):
    """Update count; per parameter the moments (8-bit codes, or float32 below `MIN_8BIT_SIZE` elements) and their
    absmax (a float32 scalar placeholder for float32 moments)."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    mu_absmax: optax.Updates
    nu_absmax: optax.Updates


def scale_by_adam8bit(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """`optax.scale_by_adam` with 8-bit blockwise-quantized moments; small parameters keep float32 moments and
    optax's arithmetic."""

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
        count_inc = optax.safe_increment(state.count)

        def direction(m: jax.Array, v: jax.Array) -> jax.Array:
            m_hat = optax.tree.bias_correction(m, b1, count_inc)
            v_hat = optax.tree.bias_correction(v, b2, count_inc)
            return m_hat / (jnp.sqrt(v_hat) + eps)

        def moments(g: jax.Array, mu: jax.Array, nu: jax.Array) -> tuple[jax.Array, jax.Array]:
            """Adam's new float32 moments from the gradient and the previous ones."""
            return optax.tree.update_moment(g, mu, b1, 1), optax.tree.update_moment_per_elem_norm(g, nu, b2, 2)

        def leaf(g: jax.Array, *stored: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
            if stored[0].dtype == jnp.float32:
                m, v = moments(g, *stored[:2])
                return direction(m, v), (m, v, *stored[2:])
            shape = g.shape

            def block_moments(g: jax.Array, mu: jax.Array, nu: jax.Array, mu_absmax: jax.Array, nu_absmax: jax.Array):
                """The new moments, as blocks, from the blocks (`_blocked`) of the gradient and codes."""
                return moments(g, _values(mu, mu_absmax, shape), _values(nu, nu_absmax, shape))

            # Two passes over the 8-bit moments and the gradient, each computing the new float32 moments: the first
            # reduces them to their blocks' absmax, the second (behind a barrier, so that XLA cannot keep the first
            # pass's) re-quantizes them and takes the Adam direction. No parameter's float32 moments outlive its
            # update, whatever order XLA runs the parameters in. Both work on the blocks, which the barrier holds:
            # behind it a reshape of the codes would keep XLA from fusing the absmax's broadcast into the passes.
            blocks = (_blocked(g), _blocked(stored[0]), _blocked(stored[1]), *stored[2:])
            m, v = block_moments(*blocks)
            absmax = (_block_absmax(m, shape), _block_absmax(v, shape))
            m, v = block_moments(*jax.lax.optimization_barrier(blocks))
            new = (_codes(m, absmax[0], shape, signed=True), _codes(v, absmax[1], shape, signed=False), *absmax)
            return _unblocked(direction(m, v), shape), new

        stored = (state.mu, state.nu, state.mu_absmax, state.nu_absmax)
        pairs = jax.tree.map(leaf, updates, *stored)
        inner = jax.tree.structure((0, (0,) * 4))
        updates, (mu, nu, mu_absmax, nu_absmax) = jax.tree.transpose(jax.tree.structure(updates), inner, pairs)
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
