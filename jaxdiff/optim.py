"""Optimizer, learning-rate schedules, gradient accumulation and EMA for the JAX trainer.

Every function is pure and jit-friendly and takes the config fields it uses, not the config. The numbers equal
diffusers' training scripts: `diffusers.optimization.get_scheduler`, `torch.optim.AdamW` after
`clip_grad_norm_`, and `diffusers.training_utils.EMAModel`.

Step indexing: optax calls a schedule with its update count, so update k (0-based) uses `schedule(k)`. torch's
`LambdaLR` sets the lr to `lambda(0)` at construction and advances it after each `optimizer.step()`, so its
update k uses `lambda(k)` too: the same index, hence the same lr, on both backends.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxdiff import adam8bit

LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
POLYNOMIAL_LR_END = 1e-7  # diffusers' get_polynomial_decay_schedule_with_warmup default


def lr_schedule(
    name: str,
    *,
    learning_rate: float,
    warmup_steps: int,
    total_steps: int,
    num_cycles: int = 1,
    power: float = 1.0,
) -> optax.Schedule:
    """The learning rate at each optimizer update (0-based), equal to diffusers' `get_scheduler(name, ...)`.

    As in diffusers, `constant` ignores `warmup_steps`, `num_cycles` only affects `cosine_with_restarts` (`cosine`
    is one half-cosine) and `power` only `polynomial`, which decays to 1e-7. Past `total_steps`, `cosine` rises
    again as diffusers' does; the others stay at their end value.
    """
    if name not in LR_SCHEDULES:
        raise ValueError(f"Unknown lr schedule {name!r}; allowed: {', '.join(LR_SCHEDULES)}.")
    if name == "polynomial" and not learning_rate > POLYNOMIAL_LR_END:
        raise ValueError(f"polynomial lr schedule: learning_rate ({learning_rate}) must exceed {POLYNOMIAL_LR_END}.")
    if name == "constant":
        warmup_steps = 0
    decay_steps = max(1, total_steps - warmup_steps)

    def decay_factor(step: jax.Array) -> jax.Array:
        # Fractions are formed from integer step differences so that factors near zero keep full float32 accuracy;
        # 0.5 * (1 + cos(pi * x)) is written as sin(pi / 2 * (1 - x)) ** 2 for the same reason.
        elapsed = step - warmup_steps
        remaining = (decay_steps - elapsed) / decay_steps  # 1 - progress
        if name in ("constant", "constant_with_warmup"):
            return jnp.ones_like(remaining)
        if name == "linear":
            return jnp.maximum((total_steps - step) / decay_steps, 0.0)
        if name == "cosine":  # period 2 in progress: reduce exactly, in integers
            return jnp.sin(jnp.pi / 2 * (decay_steps - jnp.mod(elapsed, 2 * decay_steps)) / decay_steps) ** 2
        if name == "cosine_with_restarts":
            cycle_remaining = (decay_steps - jnp.mod(num_cycles * elapsed, decay_steps)) / decay_steps
            return jnp.where(elapsed >= decay_steps, 0.0, jnp.sin(jnp.pi / 2 * cycle_remaining) ** 2)
        lr_end = POLYNOMIAL_LR_END / learning_rate
        decay = (1.0 - lr_end) * jnp.maximum(remaining, 0.0) ** power + lr_end
        return jnp.where(step > total_steps, lr_end, decay)

    def schedule(count: jax.Array | int) -> jax.Array:
        step = jnp.asarray(count, jnp.int32)
        warmup = step / max(1, warmup_steps)
        factor = jnp.where(step < warmup_steps, warmup, decay_factor(step))
        return (learning_rate * factor).astype(jnp.float32)

    return schedule


def make_optimizer(
    *,
    learning_rate_schedule: optax.ScalarOrSchedule,
    adam_beta1: float,
    adam_beta2: float,
    adam_weight_decay: float,
    adam_epsilon: float,
    max_grad_norm: float,
    use_8bit: bool = False,
) -> optax.GradientTransformation:
    """Global-norm gradient clipping (`max_grad_norm` 0 disables it), then AdamW, as diffusers' scripts do;
    `use_8bit` stores Adam's moments in 8 bits (`jaxdiff.adam8bit`, diffusers' `--use_8bit_adam`).

    Decay is decoupled and applies to every parameter. optax adds `wd * p` (p before the update) to the Adam
    direction and scales the sum by `-lr`, which is torch.optim.AdamW's `p *= 1 - lr * wd` followed by its Adam
    step. torch's `clip_grad_norm_` divides by `norm + 1e-6` where optax divides by `norm`; Adam's invariance to
    the gradient scale makes the difference vanish up to epsilon.
    """
    adamw = (adam8bit.adamw8bit if use_8bit else optax.adamw)(
        learning_rate_schedule, b1=adam_beta1, b2=adam_beta2, eps=adam_epsilon, weight_decay=adam_weight_decay
    )
    if max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)
    return adamw


def split_micro_batches(batch: Any, num_micro_batches: int) -> Any:
    """Split every leaf `(B, ...)` into `(num_micro_batches, B // num_micro_batches, ...)` for `accumulate_gradients`.

    Micro-batch i takes rows i, i + k, i + 2k, ...: each device's block of a batch sharded on its first axis is
    divided among the micro-batches in place, so no data moves between devices (B // k must divide evenly over
    the data axis).
    """

    def split(x: jax.Array) -> jax.Array:
        if x.shape[0] % num_micro_batches:
            raise ValueError(f"Batch size {x.shape[0]} is not divisible by {num_micro_batches} micro-batches.")
        return jnp.swapaxes(x.reshape(x.shape[0] // num_micro_batches, num_micro_batches, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def accumulate_gradients(
    loss_and_grad_fn: Callable[[Any, Any], tuple[Any, Any]],
    params: Any,
    micro_batches: Any,
) -> tuple[Any, Any]:
    """Mean values (the loss, or a pytree of scalars such as the loss and its metrics) and mean gradients over
    micro-batches (leading axis of every leaf of `micro_batches`).

    Recommended over `optax.MultiSteps`: one jit call per optimizer step, so the step counter, schedule, EMA
    and logging all count optimizer steps with no `cond` on "did this call update"; no accumulator in the
    optimizer state (nor in checkpoints); activations of only one micro-batch are live. For a loss that is a
    mean over equal-size micro-batches the result equals one batch k times larger; one micro-batch is a plain
    call. Per-micro-batch randomness (noise, timesteps) travels inside `micro_batches`.
    """
    num = jax.tree.leaves(micro_batches)[0].shape[0]
    first = jax.tree.map(lambda x: x[0], micro_batches)
    if num == 1:
        return loss_and_grad_fn(params, first)
    shapes = jax.eval_shape(loss_and_grad_fn, params, first)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32 if s.ndim == 0 else s.dtype), shapes)

    def body(carry: tuple[Any, Any], micro_batch: Any) -> tuple[tuple[Any, Any], None]:
        return jax.tree.map(jnp.add, carry, loss_and_grad_fn(params, micro_batch)), None

    # XLA:CPU runs a while loop's body several times slower than the same ops outside one (8x measured on a
    # UNet step), so on CPU the loop is unrolled; accelerators keep the rolled loop (one body, less compile).
    unroll = num if jax.default_backend() == "cpu" else 1
    sums, _ = jax.lax.scan(body, zeros, micro_batches, unroll=unroll)
    return jax.tree.map(lambda total: total / num, sums)


def ema_decay(
    step: jax.Array | int,
    *,
    max_decay: float,
    min_decay: float = 0.0,
    use_warmup: bool = False,
    inv_gamma: float = 1.0,
    power: float = 2 / 3,
    update_after_step: int = 0,
) -> jax.Array:
    """diffusers' `EMAModel.get_decay(step)`.

    `step` is EMAModel's `optimization_step` after its increment: the number of optimizer updates applied so far,
    counting the one the EMA is about to follow (1 after the first update). The first `update_after_step + 1`
    updates give decay 0 (the EMA copies the weights, regardless of `min_decay`).
    """
    s = jnp.maximum(jnp.asarray(step, jnp.float32) - update_after_step - 1, 0.0)
    decay = 1.0 - (1.0 + s / inv_gamma) ** -power if use_warmup else (1.0 + s) / (10.0 + s)
    decay = jnp.maximum(jnp.minimum(decay, max_decay), min_decay)
    return jnp.where(s <= 0, 0.0, decay)


def ema_update(ema_params: Any, params: Any, decay: jax.Array | float) -> Any:
    """One EMA step, `ema - (1 - decay) * (ema - params)` on every leaf (EMAModel.step's formula)."""
    return jax.tree.map(lambda e, p: (e - (1.0 - decay) * (e - p)).astype(e.dtype), ema_params, params)


def scaled_learning_rate(
    learning_rate: float,
    *,
    scale_lr: bool,
    train_batch_size: int,
    gradient_accumulation_steps: int,
    num_devices: int,
) -> float:
    """diffusers' `--scale_lr`: lr x accumulation steps x per-device batch size x devices (unchanged when off)."""
    if not scale_lr:
        return learning_rate
    return learning_rate * gradient_accumulation_steps * train_batch_size * num_devices
