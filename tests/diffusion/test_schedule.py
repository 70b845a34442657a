import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr as diffusers_compute_snr

from jaxdiff.diffusion import NoiseSchedule, add_noise, compute_snr, get_velocity, training_target
from tests.diffusion._oracle import SCHEDULES, randn


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_forward_process_matches_ddpm_scheduler(name):
    config = SCHEDULES[name]
    ref = DDPMScheduler(**config)
    schedule = NoiseSchedule.from_config(config)
    np.testing.assert_allclose(schedule.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=0, atol=1e-6)

    x0, noise = randn(0), randn(1)
    timesteps = np.array([0, 999], np.int32) if name.endswith("zero_snr") else np.array([3, 741], np.int32)
    torch_args = (torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(timesteps).long())
    noisy = add_noise(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(timesteps))
    velocity = get_velocity(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(timesteps))
    np.testing.assert_allclose(noisy, ref.add_noise(*torch_args).numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(velocity, ref.get_velocity(*torch_args).numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        compute_snr(schedule, jnp.asarray(timesteps)),
        diffusers_compute_snr(ref, torch_args[2]).numpy(),
        rtol=1e-6,
    )


def test_zero_terminal_snr():
    schedule = NoiseSchedule.from_config(SCHEDULES["scaled_linear_zero_snr"])
    assert float(schedule.alphas_cumprod[-1]) == 0.0
    snr = compute_snr(schedule, jnp.array([0, 999]))
    assert float(snr[1]) == 0.0 and float(snr[0]) > 0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_training_target(prediction_type):
    schedule = NoiseSchedule.from_config({**SCHEDULES["scaled_linear"], "prediction_type": prediction_type})
    x0, noise, t = jnp.asarray(randn(0)), jnp.asarray(randn(1)), jnp.array([10, 600])
    expected = {"epsilon": noise, "v_prediction": get_velocity(schedule, x0, noise, t), "sample": x0}[prediction_type]
    np.testing.assert_array_equal(training_target(schedule, x0, noise, t), expected)


def test_trained_betas_and_options():
    betas = np.linspace(0.001, 0.02, 10)
    schedule = NoiseSchedule.from_config(
        {"num_train_timesteps": 10, "trained_betas": betas.tolist(), "steps_offset": 1, "some_future_key": 3}
    )
    np.testing.assert_allclose(schedule.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-6)
    assert schedule.num_train_timesteps == 10 and schedule.steps_offset == 1


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"beta_schedule": "sigmoid"}, "beta_schedule"),
        ({"prediction_type": "flow"}, "prediction_type"),
        ({"timestep_spacing": "karras"}, "timestep_spacing"),
        ({"use_karras_sigmas": True}, "use_karras_sigmas"),
        ({"thresholding": True}, "thresholding"),
        ({"num_train_timesteps": 4, "trained_betas": [0.1, 0.2]}, "trained_betas"),
    ],
)
def test_unsupported_config_values_are_refused(config, key):
    with pytest.raises(ValueError, match=key):
        NoiseSchedule.from_config(config)


def test_schedule_is_a_pytree_with_static_options():
    schedule = NoiseSchedule.from_config({**SCHEDULES["linear"], "prediction_type": "v_prediction"})
    leaves = jax.tree_util.tree_leaves(schedule)
    assert len(leaves) == 1 and leaves[0] is schedule.alphas_cumprod

    @jax.jit
    def target(schedule, x0, noise, t):
        return training_target(schedule, x0, noise, t)

    x0, noise, t = jnp.asarray(randn(0)), jnp.asarray(randn(1)), jnp.array([5, 50])
    np.testing.assert_allclose(target(schedule, x0, noise, t), get_velocity(schedule, x0, noise, t), atol=1e-7)
