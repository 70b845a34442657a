"""DDPM, DDIM, Euler and LCM samplers with the semantics of diffusers' DDPMScheduler, DDIMScheduler,
EulerDiscreteScheduler and LCMScheduler.

A sampler is driven by `model_fn(x_t, t) -> model_output` with `t` of shape (B,) (int32 for DDIM and LCM, float32
for Euler, as diffusers passes them to the UNet). The timestep grid depends only on static options, so it is built on
the host; everything that depends on `alphas_cumprod` is traced. Each loop is a `jax.lax.fori_loop`: wrap a sampler in
`jax.jit` and the model is traced and compiled once, whatever the number of steps.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion.lcm import lcm_origin_timesteps, scalings_for_boundary_conditions
from jaxdiff.diffusion.schedule import (
    TIMESTEP_SPACINGS,
    NoiseSchedule,
    PredictionType,
    append_dims,
    check_choice,
    predict_x0_and_noise,
)

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def classifier_free_guidance(model_fn: ModelFn, guidance_scale: float, guidance_rescale: float = 0.0) -> ModelFn:
    """Turns `model_fn` on a doubled batch [unconditional; conditional] into a guided model on the single batch.

    `model_fn` closes over conditioning laid out as diffusers' pipelines do: the first half of its batch is the
    unconditional (negative-prompt) half. Both halves run in one call. `guidance_rescale > 0` applies the std rescale
    of "Common Diffusion Noise Schedules and Sample Steps are Flawed", section 3.4.
    """

    def guided(x: jax.Array, t: jax.Array) -> jax.Array:
        uncond, cond = jnp.split(model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t])), 2)
        out = uncond + guidance_scale * (cond - uncond)
        return rescale_noise_cfg(out, cond, guidance_rescale) if guidance_rescale > 0 else out

    return guided


def rescale_noise_cfg(guided: jax.Array, cond: jax.Array, guidance_rescale: float) -> jax.Array:
    """Blends the guided output with itself rescaled to the per-sample std of the conditional output.

    Counters the over-exposure strong guidance causes on zero-terminal-SNR models. std is unbiased, as torch's.
    """
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond, axis=axes, keepdims=True, ddof=1)
    rescaled = guided * (std_cond / jnp.std(guided, axis=axes, keepdims=True, ddof=1))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def spaced_timesteps(
    num_train_timesteps: int, num_inference_steps: int, timestep_spacing: str, steps_offset: int = 0
) -> np.ndarray:
    """Descending inference timesteps (float64) for `timestep_spacing` (Table 2 of Lin et al., 2023).

    `linspace` is left unrounded (Euler uses it as is, DDIM rounds it). `leading` adds `steps_offset`.
    """
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(f"num_inference_steps={num_inference_steps} must be in [1, {num_train_timesteps}]")
    check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    if timestep_spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_inference_steps)[::-1].copy()
    if timestep_spacing == "leading":
        step_ratio = num_train_timesteps // num_inference_steps
        return (np.arange(num_inference_steps) * step_ratio).round()[::-1] + steps_offset
    return np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_inference_steps)) - 1  # trailing


def _alpha_bar_prev(schedule: NoiseSchedule, prev_timestep: jax.Array) -> jax.Array:
    """alpha_bar at `prev_timestep`, or `final_alpha_cumprod` past the end of the chain (prev_timestep < 0)."""
    inside = schedule.alphas_cumprod[jnp.maximum(prev_timestep, 0)]
    return jnp.where(prev_timestep >= 0, inside, schedule.final_alpha_cumprod)


def _clip_x0(schedule: NoiseSchedule, x0: jax.Array) -> jax.Array:
    if schedule.clip_sample:
        return jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    return x0


def _fill_batch(t: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.broadcast_to(t, (x.shape[0],))


# DDIM ------------------------------------------------------------------------------------------------------------


def ddim_timesteps(schedule: NoiseSchedule, num_inference_steps: int) -> np.ndarray:
    """DDIMScheduler.set_timesteps: descending int32 timesteps."""
    return (
        spaced_timesteps(
            schedule.num_train_timesteps, num_inference_steps, schedule.timestep_spacing, schedule.steps_offset
        )
        .round()
        .astype(np.int32)
    )


def ddim_step(
    schedule: NoiseSchedule, model_output: jax.Array, timestep: jax.Array, sample: jax.Array, num_inference_steps: int
) -> tuple[jax.Array, jax.Array]:
    """One deterministic (eta = 0) DDIM step from `timestep` (scalar or (B,)); returns (prev_sample, pred_x0).

    Like diffusers, the previous timestep is `timestep - T // num_inference_steps` whatever the spacing.
    """
    prev_timestep = timestep - schedule.num_train_timesteps // num_inference_steps
    alpha_bar = append_dims(schedule.alphas_cumprod[timestep], sample.ndim)
    alpha_bar_prev = append_dims(_alpha_bar_prev(schedule, prev_timestep), sample.ndim)
    pred_x0, pred_noise = predict_x0_and_noise(model_output, sample, alpha_bar, schedule.prediction_type)
    pred_x0 = _clip_x0(schedule, pred_x0)
    return jnp.sqrt(alpha_bar_prev) * pred_x0 + jnp.sqrt(1.0 - alpha_bar_prev) * pred_noise, pred_x0


def ddim_sample(schedule: NoiseSchedule, model_fn: ModelFn, noise: jax.Array, num_inference_steps: int) -> jax.Array:
    """Runs the DDIM chain from `noise` (unit Gaussian; DDIM's initial noise sigma is 1) and returns x_0."""
    timesteps = jnp.asarray(ddim_timesteps(schedule, num_inference_steps))

    def body(i: jax.Array, x: jax.Array) -> jax.Array:
        t = timesteps[i]
        return ddim_step(schedule, model_fn(x, _fill_batch(t, x)), t, x, num_inference_steps)[0]

    return jax.lax.fori_loop(0, timesteps.shape[0], body, noise)


# DDPM ------------------------------------------------------------------------------------------------------------


def ddpm_step(
    schedule: NoiseSchedule,
    model_output: jax.Array,
    timestep: jax.Array,
    sample: jax.Array,
    num_inference_steps: int,
    variance_noise: jax.Array,
) -> jax.Array:
    """One ancestral DDPM step from `timestep` (a scalar): the posterior mean of x_prev given the (clipped) predicted
    x_0, plus its fixed standard deviation times `variance_noise` (none at t = 0), as DDPMScheduler.step."""
    prev_timestep = timestep - schedule.num_train_timesteps // num_inference_steps
    alpha_bar = schedule.alphas_cumprod[timestep]
    alpha_bar_prev = jnp.where(prev_timestep >= 0, schedule.alphas_cumprod[jnp.maximum(prev_timestep, 0)], 1.0)
    alpha, beta = alpha_bar / alpha_bar_prev, 1.0 - alpha_bar / alpha_bar_prev
    pred_x0, _ = predict_x0_and_noise(model_output, sample, alpha_bar, schedule.prediction_type)
    pred_x0 = _clip_x0(schedule, pred_x0)
    mean = (jnp.sqrt(alpha_bar_prev) * beta * pred_x0 + jnp.sqrt(alpha) * (1.0 - alpha_bar_prev) * sample) / (
        1.0 - alpha_bar
    )
    if schedule.variance_type == "fixed_large":
        variance = beta
    else:  # fixed_small (fixed_small_log has the same standard deviation)
        variance = jnp.maximum((1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * beta, 1e-20)
    return mean + jnp.where(timestep > 0, jnp.sqrt(variance), 0.0) * variance_noise


def ddpm_sample(
    schedule: NoiseSchedule, model_fn: ModelFn, noise: jax.Array, num_inference_steps: int, rng: jax.Array
) -> jax.Array:
    """Runs the DDPM chain from `noise` (unit Gaussian) over DDPMScheduler's `num_inference_steps` timesteps, step
    i's variance noise drawn from `fold_in(rng, i)`; returns x_0."""
    timesteps = jnp.asarray(ddim_timesteps(schedule, num_inference_steps))

    def body(i: jax.Array, x: jax.Array) -> jax.Array:
        t = timesteps[i]
        variance_noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
        return ddpm_step(schedule, model_fn(x, _fill_batch(t, x)), t, x, num_inference_steps, variance_noise)

    return jax.lax.fori_loop(0, timesteps.shape[0], body, noise)


# Euler -----------------------------------------------------------------------------------------------------------


def euler_timesteps_and_sigmas(schedule: NoiseSchedule, num_inference_steps: int) -> tuple[np.ndarray, jax.Array]:
    """EulerDiscreteScheduler.set_timesteps with linear interpolation: float32 timesteps (N,) and sigmas (N + 1,).

    sigma = sqrt((1 - alpha_bar) / alpha_bar), interpolated at the (possibly fractional) timesteps, then a final 0.
    A zero-terminal-SNR schedule has its last alpha_bar set to 2**-24, as diffusers does, so sigma stays finite.
    """
    timesteps = spaced_timesteps(
        schedule.num_train_timesteps, num_inference_steps, schedule.timestep_spacing, schedule.steps_offset
    ).astype(np.float32)
    alphas_cumprod = schedule.alphas_cumprod
    if schedule.rescale_betas_zero_snr:
        alphas_cumprod = alphas_cumprod.at[-1].set(2.0**-24)
    train_sigmas = jnp.sqrt((1 - alphas_cumprod) / alphas_cumprod)
    grid = jnp.arange(schedule.num_train_timesteps, dtype=jnp.float32)
    sigmas = jnp.interp(jnp.asarray(timesteps), grid, train_sigmas)
    return timesteps, jnp.concatenate([sigmas, jnp.zeros((1,), sigmas.dtype)])


def euler_init_noise_sigma(schedule: NoiseSchedule, sigmas: jax.Array) -> jax.Array:
    """Std of the initial latent: max sigma, or sqrt(max sigma^2 + 1) for `leading` spacing (diffusers' rule)."""
    max_sigma = jnp.max(sigmas)
    return max_sigma if schedule.timestep_spacing in ("linspace", "trailing") else jnp.sqrt(max_sigma**2 + 1)


def euler_scale_model_input(sample: jax.Array, sigma: jax.Array) -> jax.Array:
    """The model sees x / sqrt(sigma^2 + 1): the variance-preserving input it was trained on."""
    return sample / jnp.sqrt(sigma**2 + 1)


def euler_step(
    model_output: jax.Array,
    sample: jax.Array,
    sigma: jax.Array,
    sigma_next: jax.Array,
    prediction_type: PredictionType,
) -> tuple[jax.Array, jax.Array]:
    """One Euler step of the probability-flow ODE in sigma (no churn); returns (prev_sample, pred_x0)."""
    if prediction_type == "epsilon":
        pred_x0 = sample - sigma * model_output
    elif prediction_type == "v_prediction":
        pred_x0 = model_output * (-sigma / jnp.sqrt(sigma**2 + 1)) + sample / (sigma**2 + 1)
    else:
        pred_x0 = model_output
    derivative = (sample - pred_x0) / sigma
    return sample + derivative * (sigma_next - sigma), pred_x0


def euler_sample(schedule: NoiseSchedule, model_fn: ModelFn, noise: jax.Array, num_inference_steps: int) -> jax.Array:
    """Runs the Euler sampler from unit-Gaussian `noise` (scaled here by the initial sigma) and returns x_0."""
    timesteps, sigmas = euler_timesteps_and_sigmas(schedule, num_inference_steps)
    timesteps = jnp.asarray(timesteps)

    def body(i: jax.Array, x: jax.Array) -> jax.Array:
        out = model_fn(euler_scale_model_input(x, sigmas[i]), _fill_batch(timesteps[i], x))
        return euler_step(out, x, sigmas[i], sigmas[i + 1], schedule.prediction_type)[0]

    x = noise * euler_init_noise_sigma(schedule, sigmas)
    return jax.lax.fori_loop(0, timesteps.shape[0], body, x)


# LCM -------------------------------------------------------------------------------------------------------------


def lcm_timesteps(
    schedule: NoiseSchedule, num_inference_steps: int, original_inference_steps: int | None = None
) -> np.ndarray:
    """LCMScheduler.set_timesteps: `num_inference_steps` evenly spaced picks from the descending distillation grid."""
    original = schedule.original_inference_steps if original_inference_steps is None else original_inference_steps
    origin = lcm_origin_timesteps(schedule.num_train_timesteps, original)[::-1]
    if not 1 <= num_inference_steps <= original:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} must be in [1, original_inference_steps={original}]"
        )
    picks = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
    return origin[picks].astype(np.int32)


def lcm_step(
    schedule: NoiseSchedule,
    model_output: jax.Array,
    timestep: jax.Array,
    prev_timestep: jax.Array,
    sample: jax.Array,
    noise: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """One LCM step from `timestep` (scalar or (B,)): the consistency output, re-noised to `prev_timestep`.

    Returns (prev_sample, denoised) with `noise` as the fresh noise; a chain ends on `denoised` instead.
    """
    alpha_bar = append_dims(schedule.alphas_cumprod[timestep], sample.ndim)
    alpha_bar_prev = append_dims(_alpha_bar_prev(schedule, prev_timestep), sample.ndim)
    c_skip, c_out = scalings_for_boundary_conditions(timestep, timestep_scaling=schedule.timestep_scaling)
    c_skip, c_out = append_dims(c_skip, sample.ndim), append_dims(c_out, sample.ndim)
    pred_x0 = predict_x0_and_noise(model_output, sample, alpha_bar, schedule.prediction_type)[0]
    denoised = c_out * _clip_x0(schedule, pred_x0) + c_skip * sample
    return jnp.sqrt(alpha_bar_prev) * denoised + jnp.sqrt(1 - alpha_bar_prev) * noise, denoised


def lcm_sample(
    schedule: NoiseSchedule,
    model_fn: ModelFn,
    noise: jax.Array,
    num_inference_steps: int,
    rng: jax.Array,
    original_inference_steps: int | None = None,
) -> jax.Array:
    """Runs LCM multistep sampling from unit-Gaussian `noise`; step i re-noises with N(0, 1) from fold_in(rng, i)."""
    timesteps = lcm_timesteps(schedule, num_inference_steps, original_inference_steps)
    prev_timesteps = jnp.asarray(np.concatenate([timesteps[1:], timesteps[-1:]]))
    timesteps = jnp.asarray(timesteps)
    last = timesteps.shape[0] - 1

    def body(i: jax.Array, x: jax.Array) -> jax.Array:
        t = timesteps[i]
        step_noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
        renoised, denoised = lcm_step(schedule, model_fn(x, _fill_batch(t, x)), t, prev_timesteps[i], x, step_noise)
        return jnp.where(i == last, denoised, renoised)

    return jax.lax.fori_loop(0, timesteps.shape[0], body, noise)
