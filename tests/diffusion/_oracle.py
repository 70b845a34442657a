"""Shared test helpers: scheduler configs and one deterministic model written for both jax and torch."""

import jax.numpy as jnp
import numpy as np
import torch

from jaxdiff.diffusion import append_dims

SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}

SCHEDULES = {
    "linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "scaled_linear": SD_BETAS,
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
    "scaled_linear_zero_snr": {**SD_BETAS, "rescale_betas_zero_snr": True},
}

SHAPE = (2, 4, 8, 8)


def jax_model(x: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """A fixed affine function of x and t, so each sampler step is checked on a non-trivial model output."""
    return 0.9 * x - 0.3 * append_dims(t.astype(jnp.float32) / 1000.0, x.ndim) + 0.05


def torch_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`jax_model` for the diffusers loop, which passes a scalar timestep."""
    return 0.9 * x - 0.3 * (t.to(torch.float32) / 1000.0) + 0.05


def randn(seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
