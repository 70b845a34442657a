"""The discrete DDPM noise schedule and the forward process, with diffusers' scheduler semantics.

A `NoiseSchedule` is built once from a diffusers `scheduler_config.json` dict on the host and then used as a pytree:
`alphas_cumprod` is data, the options are static metadata, so the schedule can be passed through `jax.jit` or closed
over. Every function here is pure and broadcasts per-sample values over the trailing axes of the sample, so it works
for any layout whose batch axis comes first (NCHW at the public boundary).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

PredictionType = Literal["epsilon", "v_prediction", "sample"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
#: DDPMScheduler's fixed posterior variances (the learned ones need a UNet that predicts them).
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")

# Keys whose only supported value is diffusers' default; any other value changes the sampler and is refused.
_FIXED_KEYS: dict[str, Any] = {
    "thresholding": False,
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "timestep_type": "discrete",
    "final_sigmas_type": "zero",
}


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """`alphas_cumprod` (float32, one entry per training timestep) plus the scheduler options the samplers read.

    Defaults are DDPMScheduler's/DDIMScheduler's (`timestep_spacing="leading"`, `clip_sample=True`); note that
    diffusers' EulerDiscreteScheduler defaults to `"linspace"` when a config omits `timestep_spacing`.
    """

    alphas_cumprod: jax.Array
    prediction_type: PredictionType = "epsilon"
    timestep_spacing: TimestepSpacing = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    rescale_betas_zero_snr: bool = False
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0
    variance_type: str = "fixed_small"

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def final_alpha_cumprod(self) -> jax.Array:
        """alpha_bar past the end of the chain (t < 0) in DDIM and LCM: 1, or alpha_bar_0 if not `set_alpha_to_one`."""
        return jnp.ones((), self.alphas_cumprod.dtype) if self.set_alpha_to_one else self.alphas_cumprod[0]

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NoiseSchedule:
        """Builds the schedule from a diffusers scheduler config dict; unknown keys are ignored.

        Raises ValueError naming the key and the allowed values for a value this package does not implement.
        """
        get = config.get
        check_choice("prediction_type", get("prediction_type", "epsilon"), PREDICTION_TYPES)
        check_choice("timestep_spacing", get("timestep_spacing", "leading"), TIMESTEP_SPACINGS)
        check_choice("variance_type", get("variance_type", "fixed_small"), VARIANCE_TYPES)
        for key, allowed in _FIXED_KEYS.items():
            # diffusers writes None for "not set" in some of these (use_karras_sigmas=None means False).
            if get(key) is not None and get(key) != allowed:
                raise ValueError(f"scheduler config: {key}={get(key)!r} is not supported; allowed: {allowed!r}")
        num_train_timesteps = int(get("num_train_timesteps", 1000))
        betas = _betas(
            num_train_timesteps,
            float(get("beta_start", 0.0001)),
            float(get("beta_end", 0.02)),
            get("beta_schedule", "linear"),
            get("trained_betas"),
        )
        rescale = bool(get("rescale_betas_zero_snr", False))
        if rescale:
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = _cumprod(1.0 - betas)
        return cls(
            alphas_cumprod=jnp.asarray(alphas_cumprod),
            prediction_type=get("prediction_type", "epsilon"),
            timestep_spacing=get("timestep_spacing", "leading"),
            steps_offset=int(get("steps_offset", 0)),
            set_alpha_to_one=bool(get("set_alpha_to_one", True)),
            clip_sample=bool(get("clip_sample", True)),
            clip_sample_range=float(get("clip_sample_range", 1.0)),
            rescale_betas_zero_snr=rescale,
            original_inference_steps=int(get("original_inference_steps", 50)),
            timestep_scaling=float(get("timestep_scaling", 10.0)),
            variance_type=get("variance_type", "fixed_small"),
        )


# alphas_cumprod is traced data; every option is static metadata, part of the jit cache key.
jax.tree_util.register_dataclass(
    NoiseSchedule,
    data_fields=["alphas_cumprod"],
    meta_fields=[f.name for f in dataclasses.fields(NoiseSchedule) if f.name != "alphas_cumprod"],
)


def check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    """Raises ValueError naming `key`, `value` and the allowed values unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not supported; allowed: {', '.join(allowed)}")


def _betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Any,
) -> np.ndarray:
    """float32 betas for each schedule diffusers' DDPM/DDIM/Euler/LCM schedulers share."""
    if trained_betas is not None:
        betas = np.asarray(trained_betas, np.float32)
        if betas.shape != (num_train_timesteps,):
            raise ValueError(
                f"trained_betas has shape {betas.shape}; expected ({num_train_timesteps},) = (num_train_timesteps,)"
            )
        return betas
    check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float32)
    if beta_schedule == "scaled_linear":
        # The latent diffusion schedule: linear in sqrt(beta).
        return np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float32) ** 2
    # squaredcos_cap_v2: the Improved-DDPM cosine alpha_bar, betas capped at 0.999.
    alpha_bar = [
        math.cos((i / num_train_timesteps + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(num_train_timesteps + 1)
    ]
    return np.array([min(1 - alpha_bar[i + 1] / alpha_bar[i], 0.999) for i in range(num_train_timesteps)], np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shifts and scales sqrt(alpha_bar) so the last timestep has SNR 0 and the first is unchanged.

    Algorithm 1 of "Common Diffusion Noise Schedules and Sample Steps are Flawed" (Lin et al., 2023), in float32.
    """
    sqrt_alpha_bar = np.sqrt(_cumprod(1.0 - betas))
    first, last = sqrt_alpha_bar[0], sqrt_alpha_bar[-1]
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
    alpha_bar = sqrt_alpha_bar**2
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return (1.0 - alphas).astype(np.float32)


def _cumprod(alphas: np.ndarray) -> np.ndarray:
    """float32 cumulative product accumulated in float64, as torch's CPU cumprod computes it for diffusers."""
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def append_dims(values: jax.Array, ndim: int) -> jax.Array:
    """Appends trailing unit axes so per-sample `values` of shape (B,) (or a scalar) broadcast against rank `ndim`."""
    values = jnp.asarray(values)
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def _alpha_sigma(schedule: NoiseSchedule, timesteps: jax.Array, ndim: int) -> tuple[jax.Array, jax.Array]:
    """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), broadcastable against a rank-`ndim` sample."""
    alpha_bar = append_dims(schedule.alphas_cumprod[timesteps], ndim)
    return jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)


def add_noise(schedule: NoiseSchedule, sample: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """The forward process q(x_t | x_0): sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise."""
    alpha, sigma = _alpha_sigma(schedule, timesteps, sample.ndim)
    return alpha * sample + sigma * noise


def get_velocity(schedule: NoiseSchedule, sample: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """The v-prediction target: sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x_0."""
    alpha, sigma = _alpha_sigma(schedule, timesteps, sample.ndim)
    return alpha * noise - sigma * sample


def training_target(schedule: NoiseSchedule, sample: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """What the model learns to output for `schedule.prediction_type`: the noise, the velocity or x_0."""
    if schedule.prediction_type == "epsilon":
        return noise
    if schedule.prediction_type == "v_prediction":
        return get_velocity(schedule, sample, noise, timesteps)
    return sample


def compute_snr(schedule: NoiseSchedule, timesteps: jax.Array) -> jax.Array:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t), as diffusers.training_utils.compute_snr computes it."""
    alpha, sigma = _alpha_sigma(schedule, timesteps, jnp.ndim(timesteps))
    return (alpha / sigma) ** 2


def predict_x0_and_noise(
    model_output: jax.Array, sample: jax.Array, alpha_bar: jax.Array, prediction_type: PredictionType
) -> tuple[jax.Array, jax.Array]:
    """Predicted x_0 and predicted noise from a model output at noise level `alpha_bar` (broadcastable to sample)."""
    alpha, sigma = jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha, model_output
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output, alpha * model_output + sigma * sample
    return model_output, (sample - alpha * model_output) / sigma
