"""Parameterized primitives with logical axis names, and the one attention function every model calls.

Every parameter is created with logical axis names (``in``/``out`` for kernels, ``norm`` for norm scales,
``vocab``/``embed`` for embeddings). ``jaxdiff.parallel`` maps them to mesh axes by one rule table; models
never see a mesh. Variables are not sharded eagerly at creation, so models build the same with or without one.
"""

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import flax
import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.typing import DTypeLike

log = logging.getLogger("jaxdiff")

flax.config.update("flax_always_shard_variable", False)

AttentionImpl = Literal["xla", "cudnn", "chunked", "splash"]
ATTENTION_IMPLEMENTATIONS: tuple[str, ...] = ("xla", "cudnn", "chunked", "splash")
#: Queries per block of the "chunked" attention: its score blocks are (batch, heads, ATTENTION_CHUNK, kv_len).
ATTENTION_CHUNK = 256

_default_kernel_init = nnx.initializers.lecun_normal()


def shard_batch(x: jax.Array) -> jax.Array:
    """``x`` constrained to split its leading (batch) axis over every axis of the mesh in context, as the trainer
    splits batches; unchanged outside one. On an fsdp mesh it keeps an activation batch-sharded where GSPMD would
    otherwise reshard it by channel to meet a sharded weight (its "involuntary full rematerialization")."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(mesh.axis_names))


class LoRAParam(nnx.Variable):
    """A LoRA adapter matrix. Not an ``nnx.Param``: full fine-tuning and the model's weight files never see it;
    a LoRA run trains these alone."""


class LoRA(nnx.Module):
    """The low-rank update of one Linear or Conv, peft's ``lora_B(lora_A(dropout(x))) * alpha / rank``.

    Linear: ``x @ down @ up``, ``down`` (in, rank) and ``up`` (rank, out) being peft's ``lora_A``/``lora_B`` weights
    transposed. Conv: ``down`` (kh, kw, in, rank) is a convolution with the layer's strides and padding (``lora_A``
    (rank, in, kh, kw) as HWIO), ``up`` (rank, out) a 1x1 convolution (``lora_B`` (out, rank, 1, 1)).
    ``jaxdiff.models.lora.add_lora`` gives them peft's starting values. The inputs are dropped (at ``dropout``) only
    inside `lora_dropout`, i.e. while training; inside `lora_disabled` the layers do not call their adapters.
    """

    def __init__(self, down: Any, up: Any, *, alpha: float, dropout: float = 0.0, stream: int = 0) -> None:
        """``down`` (in, rank) or (kh, kw, in, rank) and ``up`` (rank, out): arrays, or ``jax.ShapeDtypeStruct``
        for an abstract model; ``stream`` tells this layer's dropout masks from the other layers'."""
        self.rank, self.alpha, self.dropout, self.stream = down.shape[-1], float(alpha), float(dropout), stream
        self.down = LoRAParam(down, out_sharding=(*(None,) * (len(down.shape) - 2), "in", None))
        self.up = LoRAParam(up, out_sharding=(None, "out"))

    def __call__(self, x: jax.Array, down: Callable[[jax.Array, jax.Array], jax.Array] | None = None) -> jax.Array:
        """The update for ``x``: (rows, in) for a Linear; for a Conv NHWC, with ``down(x, kernel)`` the layer's
        convolution by the down kernel. Computed in ``x``'s dtype."""
        key = _LORA_DROPOUT_KEYS[-1] if _LORA_DROPOUT_KEYS else None
        if self.dropout and key is not None:
            keep = jax.random.bernoulli(jax.random.fold_in(key, self.stream), 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        down_kernel, up = self.down.get_value().astype(x.dtype), self.up.get_value().astype(x.dtype)
        hidden = x @ down_kernel if down is None else down(x, down_kernel)
        rows = hidden.reshape(-1, self.rank)  # a 1x1 convolution as one 2-D matmul
        return (rows @ up * jnp.asarray(self.alpha / self.rank, x.dtype)).reshape(*hidden.shape[:-1], -1)


_LORA_DROPOUT_KEYS: list[jax.Array] = []
_LORA_DISABLED: list[bool] = []


@contextlib.contextmanager
def lora_dropout(key: jax.Array) -> Iterator[None]:
    """Inside, LoRA adapters with a dropout rate drop their inputs, with masks drawn from ``key`` (and the layer's
    ``stream``); outside (validation, export) they never do."""
    _LORA_DROPOUT_KEYS.append(key)
    try:
        yield
    finally:
        _LORA_DROPOUT_KEYS.pop()


@contextlib.contextmanager
def lora_disabled() -> Iterator[None]:
    """Inside, every LoRA adapter adds nothing: an adapted model computes its base model (LCM-LoRA's teacher).

    A Python flag read when the model runs or is traced: enter it inside the jitted function (a compiled function
    keeps what its trace saw).
    """
    _LORA_DISABLED.append(True)
    try:
        yield
    finally:
        _LORA_DISABLED.pop()


def _adapter(lora: LoRA | None) -> LoRA | None:
    """``lora``, or None inside `lora_disabled`."""
    return None if _LORA_DISABLED else lora


class Linear(nnx.Linear):
    """``nnx.Linear`` applied to its input's rows: leading axes are merged into one before the matmul.

    The same numbers; a 2-D matmul is all XLA sees, so the weight gradient is one plain matmul. On (batch,
    tokens, features) inputs XLA:CPU computed it 2.6x slower when it had to contract two axes (measured).
    ``lora``, when set (``jaxdiff.models.lora.add_lora``), adds its low-rank update to the output.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lora: LoRA | None = nnx.data(None)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        rows = inputs.reshape(-1, inputs.shape[-1])
        out = super().__call__(rows)
        if (lora := _adapter(self.lora)) is not None:
            out = out + lora(rows.astype(out.dtype))
        return out.reshape(*inputs.shape[:-1], -1)


def linear(
    in_features: int,
    out_features: int,
    *,
    use_bias: bool = True,
    dtype: DTypeLike | None = None,
    param_dtype: DTypeLike = jnp.float32,
    rngs: nnx.Rngs,
) -> Linear:
    """A dense layer; kernel (in, out) is torch's weight transposed."""
    return Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(_default_kernel_init, ("in", "out")),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("out",)),
        rngs=rngs,
    )


_NHWC = ("NHWC", "HWIO", "NHWC")


class Conv(nnx.Conv):
    """``nnx.Conv`` (NHWC, HWIO kernel) with a ``lora`` slot like `Linear`'s: when set
    (``jaxdiff.models.lora.add_lora``) its down kernel is convolved with this layer's strides and padding (peft's conv
    ``lora_A``), then its up matrix applied per pixel (peft's 1x1 ``lora_B``), and the result added to the output."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lora: LoRA | None = nnx.data(None)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        out = super().__call__(inputs)
        if (lora := _adapter(self.lora)) is not None:
            out = out + lora(inputs.astype(out.dtype), self._convolve)
        return out

    def _convolve(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """NHWC ``x`` convolved with ``kernel`` (kh, kw, in, any) as this layer convolves (strides, padding, and its
        convolution hook: a 1x1 one keeps its one-matmul kernel gradient)."""
        strides, padding = self.strides, self.padding
        strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
        if isinstance(padding, int):
            padding = ((padding, padding), (padding, padding))
        padding = padding if isinstance(padding, str) else tuple(map(tuple, padding))
        return self.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC)


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
) -> Conv:
    """A 2-D convolution on NHWC inputs (a `Conv`, so it can hold a LoRA adapter); kernel is HWIO (torch's OIHW
    weight, permuted).

    ``padding`` is torch's: an int pads both sides of both spatial dims. A 1x1 convolution (stride 1, no padding)
    is `pointwise_conv`: the same forward, its weight gradient one matmul.
    """
    pointwise = kernel_size == 1 and stride == 1 and padding == 0
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return Conv(
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
        conv_general_dilated=_pointwise_conv_general_dilated if pointwise else jax.lax.conv_general_dilated,
        rngs=rngs,
    )


def _conv_1x1(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=_NHWC)


@jax.custom_vjp
def pointwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A 1x1 convolution of NHWC ``x`` with a (1, 1, in, out) kernel.

    The forward and the input gradient are XLA's convolution; the kernel gradient is one (pixels x in)^T @
    (pixels x out) matmul, which XLA:CPU computes much faster than the transposed convolution autodiff emits
    (the UNet's proj_in/proj_out and shortcut convolutions: measured 9% of its training step on CPU).
    """
    return _conv_1x1(x, kernel)


def _pointwise_fwd(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _conv_1x1(x, kernel), (x, kernel)


def _pointwise_bwd(residuals: tuple[jax.Array, jax.Array], d_out: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = residuals
    (dx,) = jax.vjp(lambda x: _conv_1x1(x, kernel), x)[1](d_out)
    rows = x.reshape(-1, x.shape[-1])
    d_kernel = jnp.matmul(rows.T, d_out.reshape(-1, d_out.shape[-1]), preferred_element_type=jnp.float32)
    return dx, d_kernel.reshape(kernel.shape).astype(kernel.dtype)


pointwise_conv.defvjp(_pointwise_fwd, _pointwise_bwd)


def _pointwise_conv_general_dilated(lhs: jax.Array, rhs: jax.Array, *args, **kwargs) -> jax.Array:
    """``nnx.Conv``'s convolution hook for the convolutions `conv` builds with kernel 1, stride 1, no padding."""
    return pointwise_conv(lhs, rhs)


class GroupNorm(nnx.GroupNorm):
    """``nnx.GroupNorm`` over the channel (last) axis of (batch, ..., channels), statistics in float32.

    The same function, computed from per-channel sums: XLA:CPU reduces over the pixel axis vectorized across
    channels, where the (pixels x channels-in-group) reduction of the parent class is strided (measured 2x faster
    forward and backward on one core).
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, channels = x.shape[0], x.shape[-1]
        per_group = channels // self.num_groups
        rows = x.reshape(batch, -1, channels).astype(jnp.float32)
        count = rows.shape[1] * per_group

        def group_mean(values: jax.Array) -> jax.Array:  # (batch, pixels, channels) -> (batch, 1, channels)
            sums = values.sum(axis=1).reshape(batch, self.num_groups, per_group).sum(axis=-1) / count
            return jnp.repeat(sums, per_group, axis=1)[:, None, :]

        centered = rows - group_mean(rows)
        factor = jax.lax.rsqrt(group_mean(centered * centered) + self.epsilon)
        if self.scale is not None:
            factor = factor * self.scale[...].astype(jnp.float32)
        y = centered * factor
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        dtype = self.dtype or jnp.result_type(x, *(p[...] for p in (self.scale, self.bias) if p is not None))
        return y.reshape(x.shape).astype(dtype)


def group_norm(
    num_channels: int,
    num_groups: int,
    *,
    eps: float = 1e-5,
    dtype: DTypeLike | None = None,
    param_dtype: DTypeLike = jnp.float32,
    rngs: nnx.Rngs,
) -> GroupNorm:
    """GroupNorm over the channel (last) axis, statistics in float32 as torch computes them."""
    if num_channels % num_groups:
        raise ValueError(f"norm_num_groups={num_groups} must divide the channel count {num_channels}")
    return GroupNorm(
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


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, torch's default: ``x * (1 + erf(x / sqrt(2))) / 2``.

    ``jax.nn.gelu(approximate=False)`` is the same function through ``erfc``, which XLA:CPU evaluates 2.6x slower.
    """
    return x * 0.5 * (1.0 + jax.lax.erf(x * 0.7071067811865476))


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


#: TPU generations without Mosaic, the compiler of Pallas kernels: splash attention runs as ``xla`` there.
NO_MOSAIC_TPUS = ("TPU v2", "TPU v3")
#: Splash attention's head dims are padded with zeros to a multiple of this (the TPU's 128 lanes); sequences too.
SPLASH_LANES = 128


def resolve_attention(
    implementation: str, devices: Sequence[Any] | None = None, *, half_precision: bool = True
) -> AttentionImpl:
    """The implementation ``--attention_implementation`` names. ``auto`` (logged) follows ``devices`` (default: jax's):
    ``splash`` on TPU v4 and later, ``xla`` on TPU v2/v3 (no Mosaic), ``cudnn`` on GPUs computing in
    ``half_precision`` (layers it cannot run use ``xla``, `cudnn_unsupported`; ``xla`` in float32), ``chunked`` on
    CPU (XLA:CPU has no fused kernel, and there chunked measured 1.8x faster forward+backward,
    `benchmarks/attention.py`)."""
    if implementation != "auto":
        return implementation  # type: ignore[return-value]
    device = (devices or jax.devices())[0]
    choice = {
        "tpu": "xla" if device.device_kind in NO_MOSAIC_TPUS else "splash",
        "gpu": "cudnn" if half_precision else "xla",
    }
    resolved = choice.get(device.platform, "chunked")
    log.info("--attention_implementation auto: %s on %s", resolved, device.device_kind)
    return resolved  # type: ignore[return-value]


def cudnn_unsupported(head_dim: int, dtype: DTypeLike, compute_capability: str) -> str | None:
    """Why jax's cuDNN fused attention cannot run an attention of ``head_dim`` with ``dtype`` inputs on a GPU of
    ``compute_capability`` (e.g. "9.0"); None when it can. jax's checks (`check_layout`, `check_is_flash_attention`
    in ``jax/_src/cudnn/fused_attention_stablehlo.py``, forward and backward alike): float16/bfloat16 inputs, and a
    head dim that is a multiple of 8, at most 128 before Hopper (9.0) and 256 from it. SD's 40, 64 and 80 run on
    every GPU, 160 (SDXL's refiner, SD 2.x at 64 heads) only from Hopper."""
    if jnp.dtype(dtype) not in (jnp.float16, jnp.bfloat16):
        return (
            f"{jnp.dtype(dtype).name} inputs: cuDNN takes float16/bfloat16 (--mixed_precision fp16 or bf16; an "
            "upcast_attention model computes its attention in float32)"
        )
    limit = 256 if tuple(int(x) for x in compute_capability.split(".")) >= (9, 0) else 128
    if head_dim % 8 or head_dim > limit:
        return (
            f"head dim {head_dim}: cuDNN takes multiples of 8 up to {limit} on compute capability {compute_capability}"
        )
    return None


@functools.cache
def _log_once(message: str) -> None:
    log.warning(message)


def _target_device() -> Any:
    """The device the traced program is compiled for: the mesh in context's (``benchmarks/tpu_compile.py`` traces for
    TPU devices on a CPU host), else jax's default device. Has ``platform`` and ``device_kind``."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device if device is not None else jax.devices()[0]


def _gpu_compute_capability() -> str:
    return jax.devices("gpu")[0].compute_capability


def _kernel_implementation(implementation: AttentionImpl, query: jax.Array, key: jax.Array) -> AttentionImpl:
    """``implementation``, or ``xla`` where it cannot run this attention (the reason logged once)."""
    device = _target_device()
    if implementation == "splash" and device.device_kind in NO_MOSAIC_TPUS:
        _log_once(f"splash attention needs Mosaic (TPU v4 or later); {device.device_kind} runs attention with xla")
        return "xla"
    if implementation == "splash" and key.shape[1] != query.shape[1]:
        return "xla"  # cross-attention: see `attention`
    if implementation == "cudnn" and device.platform == "gpu":
        reason = cudnn_unsupported(query.shape[-1], query.dtype, _gpu_compute_capability())
        if reason:
            _log_once(f"cudnn attention cannot run a layer with {reason}; such layers use xla")
            return "xla"
    return implementation


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
    broadcastable to (batch, heads, q_len, kv_len). ``implementation``: ``xla`` (jax.nn.dot_product_attention),
    ``cudnn`` (its fused GPU kernel; layers it cannot run, `cudnn_unsupported`, use ``xla``), ``chunked``
    (`chunked_attention`, memory-efficient on any backend) or ``splash`` (`splash_attention`, TPU v4+; ``xla`` on
    TPU v2/v3). Chunked and splash take self-attention without mask; splash leaves cross-attention to ``xla``:
    over 77 text tokens the scores are small, and the kernel would pad the keys to 128 and SD's head dims to 128
    (SD 1.5's first level, 4 x 4096 queries per v5e device: XLA's forward+backward compiled with no temporaries,
    the kernel's with 66 MiB). A masked or causal attention uses ``xla``.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
    out_dtype = query.dtype
    query, key, value = (shard_batch(x) for x in (query, key, value))
    if upcast:
        query, key, value = (x.astype(jnp.float32) for x in (query, key, value))
    implementation = _kernel_implementation(implementation, query, key)
    if implementation in ("chunked", "splash") and mask is None and not is_causal:
        out = (chunked_attention if implementation == "chunked" else splash_attention)(query, key, value)
    else:
        implementation = "xla" if implementation in ("chunked", "splash") else implementation
        out = jax.nn.dot_product_attention(
            query, key, value, mask=mask, is_causal=is_causal, implementation=implementation
        )
    return out.astype(out_dtype)


def splash_attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
    """Softmax attention on (batch, seq, heads, head_dim) by Pallas' TPU splash (flash) attention kernel.

    Inside a mesh (the trainer's abstract one included) a ``jax.shard_map`` over the batch split on every mesh axis,
    as the trainer splits batches (replicated when the batch does not divide); the kernel sees whole sequences and
    heads. Pallas runs in interpret mode unless the program is compiled for TPU (`_target_device`), so the same code
    runs in CPU tests.
    """
    device = _target_device()
    interpret = device.platform != "tpu"
    if interpret:
        _log_once(f"splash attention on {device.platform}: Pallas interpret mode (slow; meant for tests)")
    run = functools.partial(_splash_local, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return run(query, key, value)
    spec = jax.sharding.PartitionSpec(mesh.axis_names if query.shape[0] % mesh.size == 0 else None)
    return jax.shard_map(run, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(query, key, value)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _splash_block(length: int) -> int:
    """The kernel's block along a (padded) sequence: the largest of 512, 256, 128 that divides it."""
    return next(block for block in (512, 256, SPLASH_LANES) if length % block == 0)


def _splash_local(query: jax.Array, key: jax.Array, value: jax.Array, *, interpret: bool) -> jax.Array:
    """`splash_attention` on one device's arrays.

    Head dims are zero-padded to a multiple of 128 (zeros add nothing to q.k and give zero output columns, sliced
    off), queries scaled by the true 1/sqrt(head_dim). Sequences are padded to a multiple of 128; padded keys get
    segment id 1 and every query 0, so no query attends them, and padded queries (their rows dropped) attend the
    real keys, so no row is empty (no NaN).
    """
    _, q_len, heads, head_dim = query.shape
    kv_len = key.shape[1]
    dim = _round_up(head_dim, SPLASH_LANES)
    q_pad, kv_pad = _round_up(q_len, SPLASH_LANES), _round_up(kv_len, SPLASH_LANES)

    def to_kernel(x: jax.Array, length: int) -> jax.Array:  # (batch, heads, length, dim)
        x = jnp.swapaxes(x, 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, dim - head_dim)))

    q = to_kernel(query * jnp.asarray(head_dim**-0.5, query.dtype), q_pad)
    k, v = to_kernel(key, kv_pad), to_kernel(value, kv_pad)
    block_q, block_kv = _splash_block(q_pad), _splash_block(kv_pad)
    blocks = splash.BlockSizes(
        block_q=block_q,
        block_kv=block_kv,
        block_q_dkv=block_q,
        block_kv_dkv=block_kv,
        block_q_dq=block_q,
        block_kv_dq=block_kv,
    )
    mask = splash.MultiHeadMask([splash.FullMask((q_pad, kv_pad))] * heads)
    kernel = splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
    segments = None
    if kv_pad != kv_len:
        kv_ids = (jnp.arange(kv_pad) >= kv_len).astype(jnp.int32)
        segments = splash.SegmentIds(q=jnp.zeros(q_pad, jnp.int32), kv=kv_ids)
    out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(q, k, v, segments)
    return jnp.swapaxes(out[:, :, :q_len, :head_dim], 1, 2)


@jax.custom_vjp
def chunked_attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
    """Exact softmax attention on (batch, seq, heads, head_dim), ATTENTION_CHUNK queries at a time.

    Memory-efficient attention (Rabe & Staats, 2021; the backward of FlashAttention, Dao et al., 2022) in plain
    XLA: the backward pass recomputes each block's probabilities from the saved log-sum-exp instead of keeping
    the (q_len x kv_len) probability matrix, so training stores O(seq) per head, not O(seq^2). Scores, softmax
    and accumulation are float32 whatever the input dtype.
    """
    return _chunked_fwd(query, key, value)[0]


def _blocks(length: int) -> list[slice]:
    return [slice(i, min(i + ATTENTION_CHUNK, length)) for i in range(0, length, ATTENTION_CHUNK)]


def _scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """float32 scores (b, h, q, k) of (b, h, q, d) queries (already scaled) and (b, h, k, d) keys."""
    return jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)


def _chunked_fwd(query: jax.Array, key: jax.Array, value: jax.Array) -> tuple[jax.Array, tuple]:
    # (b, h, n, d); the 1/sqrt(d) scale goes on the queries, not on the (n x n) scores.
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (query * query.shape[-1] ** -0.5, key, value))
    outs, lses = [], []
    for block in _blocks(q.shape[2]):
        scores = _scores(q[:, :, block], k)
        peak = jnp.max(scores, axis=-1, keepdims=True)
        p = jnp.exp(scores - peak)
        total = jnp.sum(p, axis=-1, keepdims=True)
        out = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32) / total
        outs.append(out)
        lses.append(peak + jnp.log(total))
    out = jnp.concatenate(outs, axis=2)
    return jnp.swapaxes(out, 1, 2).astype(query.dtype), (q, k, v, out, jnp.concatenate(lses, axis=2))


def _contract_queries(p: jax.Array, x: jax.Array) -> jax.Array:
    """(b, h, k, d) = p^T x over a block's queries, for (b, h, q, k) ``p`` and (b, h, q, d) ``x``.

    Written as (x^T p)^T: XLA:CPU runs that as its fast batched matmul, the plain contraction as a generic dot
    (attention forward+backward 93 -> 84 ms on one core, the same sums).
    """
    return jnp.swapaxes(jnp.einsum("bhqd,bhqk->bhdk", x, p, preferred_element_type=jnp.float32), 2, 3)


def _chunked_bwd(residuals: tuple, d_out: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    q, k, v, out, lse = residuals  # q is scaled
    scale = q.shape[-1] ** -0.5
    d_out = jnp.swapaxes(d_out, 1, 2).astype(jnp.float32)
    delta = jnp.sum(d_out * out, axis=-1, keepdims=True)  # rowsum(dO * O) = rowsum(dP * P)
    dqs, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    for block in _blocks(q.shape[2]):
        p = jnp.exp(_scores(q[:, :, block], k) - lse[:, :, block])
        dv = dv + _contract_queries(p, d_out[:, :, block])
        dp = jnp.einsum("bhqd,bhkd->bhqk", d_out[:, :, block], v, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, :, block])
        dqs.append(jnp.einsum("bhqk,bhkd->bhqd", ds, k, preferred_element_type=jnp.float32))
        dk = dk + _contract_queries(ds, q[:, :, block])
    grads = (jnp.concatenate(dqs, axis=2) * scale, dk, dv)  # dk carries the scale through the scaled q
    return tuple(jnp.swapaxes(g, 1, 2).astype(x.dtype) for g, x in zip(grads, (q, k, v), strict=True))


chunked_attention.defvjp(_chunked_fwd, _chunked_bwd)
