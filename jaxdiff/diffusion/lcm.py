"""Latent Consistency Model distillation math, with the semantics of diffusers' `train_lcm_distill_*_wds.py`.

The student learns f(x_t, t, w) = c_skip(t) x_t + c_out(t) x_0(x_t, t, w) to agree with the EMA target at the
previous point of a skipping-step DDIM grid, reached from x_t by one teacher DDIM step with guidance w.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion.schedule import NoiseSchedule, append_dims, predict_x0_and_noise


def scalings_for_boundary_conditions(
    timestep: jax.Array, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[jax.Array, jax.Array]:
    """c_skip and c_out of the consistency parameterisation: c_skip(0) = 1 and c_out(0) = 0, so f(x, 0) = x."""
    scaled = timestep_scaling * jnp.asarray(timestep, jnp.float32)
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def guidance_frequencies(embedding_dim: int) -> np.ndarray:
    """The guidance embedding's frequencies exp(-ln(10000) k / (half - 1)), k < half, computed in float64 and rounded
    to float32 once: the arguments 1000 w f reach 1.5e4, where a 1-ulp difference of a float32 exp moves sin by 1e-3,
    so both backends take these same numbers."""
    half_dim = embedding_dim // 2
    return np.exp(np.arange(half_dim) * -(np.log(10000.0) / (half_dim - 1))).astype(np.float32)


def guidance_scale_embedding(w: jax.Array, embedding_dim: int = 512, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Sinusoidal embedding of guidance scales `w` (shape (B,)) for the UNet's `timestep_cond`, shape (B, dim).

    Same frequencies as the timestep embedding (`guidance_frequencies`), applied to 1000 * w, sin half first;
    zero-padded when dim is odd.
    """
    if jnp.ndim(w) != 1:
        raise ValueError(f"guidance_scale_embedding expects w of shape (B,), got {jnp.shape(w)}")
    freqs = jnp.asarray(guidance_frequencies(embedding_dim), dtype)
    args = (jnp.asarray(w) * 1000.0).astype(dtype)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
    return jnp.pad(emb, ((0, 0), (0, embedding_dim % 2)))


def get_predicted_original_sample(
    schedule: NoiseSchedule, model_output: jax.Array, timesteps: jax.Array, sample: jax.Array
) -> jax.Array:
    """x_0 predicted from `model_output` at `timesteps` (shape (B,)) for `schedule.prediction_type`."""
    alpha_bar = append_dims(schedule.alphas_cumprod[timesteps], sample.ndim)
    return predict_x0_and_noise(model_output, sample, alpha_bar, schedule.prediction_type)[0]


def get_predicted_noise(
    schedule: NoiseSchedule, model_output: jax.Array, timesteps: jax.Array, sample: jax.Array
) -> jax.Array:
    """The noise predicted from `model_output` at `timesteps` (shape (B,)) for `schedule.prediction_type`."""
    alpha_bar = append_dims(schedule.alphas_cumprod[timesteps], sample.ndim)
    return predict_x0_and_noise(model_output, sample, alpha_bar, schedule.prediction_type)[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DDIMSolver:
    """The skipping-step DDIM grid of LCM distillation: `num_ddim_timesteps` points k*step_ratio - 1, k = 1..N.

    `timesteps` is ascending (int32, shape (N,)); `alphas_cumprod_prev[i]` is alpha_bar at the grid point below
    `timesteps[i]` (alpha_bar_0 below the first point).
    """

    timesteps: jax.Array
    alphas_cumprod_prev: jax.Array
    step_ratio: int = dataclasses.field(metadata={"static": True})

    @classmethod
    def create(cls, alphas_cumprod: jax.Array | np.ndarray, num_ddim_timesteps: int) -> DDIMSolver:
        alphas_cumprod = np.asarray(alphas_cumprod, np.float32)
        timesteps = lcm_origin_timesteps(alphas_cumprod.shape[0], num_ddim_timesteps)
        step_ratio = alphas_cumprod.shape[0] // num_ddim_timesteps
        prev = np.concatenate([alphas_cumprod[:1], alphas_cumprod[timesteps[:-1]]])
        return cls(
            timesteps=jnp.asarray(timesteps, jnp.int32), alphas_cumprod_prev=jnp.asarray(prev), step_ratio=step_ratio
        )

    def sample_timesteps(self, rng: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """A uniform grid index per sample, its timestep, and the timestep one grid step earlier (clipped at 0).

        Returns (index, start_timesteps, timesteps) as the distillation script names them.
        """
        index = jax.random.randint(rng, (batch_size,), 0, self.timesteps.shape[0], jnp.int32)
        start_timesteps = self.timesteps[index]
        return index, start_timesteps, jnp.maximum(start_timesteps - self.step_ratio, 0)

    def step(self, pred_x0: jax.Array, pred_noise: jax.Array, index: jax.Array) -> jax.Array:
        """Deterministic (eta = 0) DDIM step from grid point `index` to the one below it."""
        alpha_bar_prev = append_dims(self.alphas_cumprod_prev[index], pred_x0.ndim)
        return jnp.sqrt(alpha_bar_prev) * pred_x0 + jnp.sqrt(1.0 - alpha_bar_prev) * pred_noise


def lcm_origin_timesteps(num_train_timesteps: int, num_steps: int) -> np.ndarray:
    """The skipping-step grid k * (T // num_steps) - 1 for k = 1..num_steps, ascending.

    The distillation script's DDIM grid (num_steps = num_ddim_timesteps) and the grid LCMScheduler picks its inference
    timesteps from (num_steps = original_inference_steps) are the same grid.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(
            f"number of LCM grid steps {num_steps} must be in [1, num_train_timesteps={num_train_timesteps}]"
        )
    return np.arange(1, num_steps + 1) * (num_train_timesteps // num_steps) - 1


#: diffusers' LCMScheduler options and their defaults (what an LCM export's scheduler_config.json spells out).
LCM_SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "original_inference_steps": 50,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "timestep_scaling": 10.0,
    "rescale_betas_zero_snr": False,
}


def lcm_scheduler_config(
    base: Mapping[str, Any], *, original_inference_steps: int, timestep_scaling: float
) -> dict[str, Any]:
    """The LCMScheduler config of a student distilled from a pipeline whose scheduler config is ``base``: its noise
    schedule and prediction type, the distillation's DDIM grid (``original_inference_steps`` = num_ddim_timesteps)
    and boundary scaling, every other option at LCMScheduler's default; all written out, so each backend reads the
    same values."""
    config = {key: base.get(key, default) for key, default in LCM_SCHEDULER_DEFAULTS.items()}
    return config | {"original_inference_steps": original_inference_steps, "timestep_scaling": timestep_scaling}
