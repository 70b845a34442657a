"""Training-side diffusion math: timestep sampling and bias, noise offset and perturbation, losses, Min-SNR weights.

Semantics follow diffusers' `train_text_to_image.py`, `train_text_to_image_sdxl.py` and the LCM distillation
scripts, so a run configured with their flags optimises the same objective.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion.schedule import PREDICTION_TYPES, PredictionType, check_choice

TimestepBiasStrategy = Literal["none", "earlier", "later", "range"]
LossType = Literal["l2", "huber"]

TIMESTEP_BIAS_STRATEGIES = ("none", "earlier", "later", "range")
LOSS_TYPES = ("l2", "huber")


def timestep_bias_weights(
    num_train_timesteps: int,
    strategy: TimestepBiasStrategy = "none",
    multiplier: float = 1.0,
    begin: int = 0,
    end: int = 1000,
    portion: float = 0.25,
) -> np.ndarray:
    """Normalised sampling probabilities over training timesteps, as the SDXL script's `generate_timestep_weights`.

    `earlier`/`later` multiply the weight of the first/last `int(portion * num_train_timesteps)` timesteps by
    `multiplier`; `range` multiplies timesteps `begin <= t < end`; `none` is uniform. Unlike the script (which returns
    the exception instead of raising it), `multiplier <= 0` raises: it would silently stop training those timesteps.
    """
    check_choice("timestep_bias_strategy", strategy, TIMESTEP_BIAS_STRATEGIES)
    weights = np.ones(num_train_timesteps, np.float64)
    if strategy == "none":
        return weights / weights.sum()
    if multiplier <= 0:
        raise ValueError(
            f"timestep_bias_multiplier={multiplier} must be > 0; to disable the bias use timestep_bias_strategy='none'"
        )
    if not 0.0 <= portion <= 1.0:
        raise ValueError(f"timestep_bias_portion={portion} must be in [0, 1]")
    num_to_bias = int(portion * num_train_timesteps)
    if strategy == "earlier":
        biased = slice(0, num_to_bias)
    elif strategy == "later":
        biased = slice(num_train_timesteps - num_to_bias, None)
    else:
        if begin < 0:
            raise ValueError(f"timestep_bias_begin={begin} must be >= 0")
        if end > num_train_timesteps:
            raise ValueError(f"timestep_bias_end={end} must be <= num_train_timesteps={num_train_timesteps}")
        biased = slice(begin, end)
    weights[biased] *= multiplier
    return weights / weights.sum()


def sample_timesteps(
    rng: jax.Array, batch_size: int, num_train_timesteps: int, weights: jax.Array | np.ndarray | None = None
) -> jax.Array:
    """int32 timesteps of shape (batch_size,): uniform, or drawn from `weights` (see `timestep_bias_weights`)."""
    if weights is None:
        return jax.random.randint(rng, (batch_size,), 0, num_train_timesteps, jnp.int32)
    logits = jnp.log(jnp.asarray(weights, jnp.float32))
    return jax.random.categorical(rng, logits, shape=(batch_size,)).astype(jnp.int32)


def offset_noise(rng: jax.Array, noise: jax.Array, noise_offset: float) -> jax.Array:
    """Adds `noise_offset * N(0, 1)` drawn once per (sample, channel) of NCHW `noise` (diffusers' `--noise_offset`).

    Lets the model learn to shift the mean brightness of a channel, which zero-mean i.i.d. noise hides.
    """
    shape = noise.shape[:2] + (1,) * (noise.ndim - 2)
    return noise + noise_offset * jax.random.normal(rng, shape, noise.dtype)


def perturb_noise(rng: jax.Array, noise: jax.Array, input_perturbation: float) -> jax.Array:
    """`noise + input_perturbation * N(0, 1)`: the noise to pass to `add_noise` (diffusers' `--input_perturbation`).

    The training target keeps the unperturbed noise, which reduces exposure bias (Ning et al., 2023).
    """
    return noise + input_perturbation * jax.random.normal(rng, noise.shape, noise.dtype)


def denoising_draws(
    rng: jax.Array,
    shape: tuple[int, ...],
    num_train_timesteps: int,
    timestep_weights: np.ndarray | None = None,
    noise_offset: float = 0.0,
    input_perturbation: float = 0.0,
) -> dict[str, jax.Array]:
    """The on-device draws of one denoising step for a batch of `shape` (B, C, h, w), the keys of `host_draws`:
    `noise`, `noise_in`, `timesteps` and `latent_eps` (unused draws cost nothing under jit)."""
    keys = jax.random.split(rng, 5)
    noise = jax.random.normal(keys[0], shape)
    if noise_offset:
        noise = offset_noise(keys[1], noise, noise_offset)
    noise_in = perturb_noise(keys[2], noise, input_perturbation) if input_perturbation else noise
    return {
        "noise": noise,
        "noise_in": noise_in,
        "timesteps": sample_timesteps(keys[3], shape[0], num_train_timesteps, timestep_weights),
        "latent_eps": jax.random.normal(keys[4], shape),
    }


def per_sample_loss(
    prediction: jax.Array, target: jax.Array, loss_type: LossType = "l2", huber_c: float = 0.001
) -> jax.Array:
    """Elementwise loss averaged over all but the batch axis, shape (B,), so per-sample weights can apply.

    `l2` is the squared error; `huber` is the pseudo-Huber loss of the LCM scripts, sqrt(d^2 + c^2) - c.
    Computed in float32 whatever the input dtype.
    """
    check_choice("loss_type", loss_type, LOSS_TYPES)
    diff = prediction.astype(jnp.float32) - target.astype(jnp.float32)
    loss = diff**2 if loss_type == "l2" else jnp.sqrt(diff**2 + huber_c**2) - huber_c
    return jnp.mean(loss, axis=tuple(range(1, loss.ndim)))


def min_snr_loss_weights(snr: jax.Array, snr_gamma: float, prediction_type: PredictionType) -> jax.Array:
    """Min-SNR-gamma loss weights (Hang et al., 2023) as diffusers' `train_text_to_image.py` computes them.

    epsilon: min(snr, gamma) / snr; v_prediction: min(snr, gamma) / (snr + 1); sample: min(snr, gamma).
    On zero-terminal-SNR schedules snr = 0 at the last timestep, where the epsilon formula is 0/0: we use its limit,
    1 (for 0 < snr < gamma the weight is exactly 1), so the weight is finite and continuous. The other two are finite.
    """
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    clipped = jnp.minimum(snr, snr_gamma)
    if prediction_type == "epsilon":
        return jnp.where(snr > 0, clipped / jnp.where(snr > 0, snr, 1.0), 1.0)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped


def host_draws(
    seed: int,
    step: int,
    batch_size: int,
    latent_shape: tuple[int, ...],
    num_train_timesteps: int,
    timestep_weights: np.ndarray | None = None,
    noise_offset: float = 0.0,
    input_perturbation: float = 0.0,
) -> dict[str, np.ndarray]:
    """The random numbers of one optimizer step, drawn on the host with NumPy from (seed, step) alone.

    The same draws as a task's on-device `draw` (same keys, same distributions, same noise offset and
    perturbation semantics), but reproducible by any framework: `--random_source host` feeds them to both
    backends, so the JAX and torch trainers see identical inputs. Keys: `noise` (the target's noise),
    `noise_in` (passed to add_noise), `timesteps` (int32), `latent_eps` (the VAE posterior sample's noise).
    """
    rng = np.random.default_rng([seed, step])
    shape = (batch_size, *latent_shape)
    noise = rng.standard_normal(shape, np.float32)
    if noise_offset:
        noise = noise + np.float32(noise_offset) * rng.standard_normal(shape[:2] + (1,) * len(shape[2:]), np.float32)
    noise_in = noise
    if input_perturbation:
        noise_in = noise + np.float32(input_perturbation) * rng.standard_normal(shape, np.float32)
    if timestep_weights is None:
        timesteps = rng.integers(0, num_train_timesteps, batch_size)
    else:
        timesteps = rng.choice(num_train_timesteps, batch_size, p=np.asarray(timestep_weights, np.float64))
    return {
        "noise": noise,
        "noise_in": noise_in,
        "timesteps": timesteps.astype(np.int32),
        "latent_eps": rng.standard_normal(shape, np.float32),
    }
