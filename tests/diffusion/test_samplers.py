import diffusers.schedulers.scheduling_lcm as scheduling_lcm
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg as diffusers_rescale

from jaxdiff.diffusion import (
    NoiseSchedule,
    classifier_free_guidance,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    euler_sample,
    euler_timesteps_and_sigmas,
    lcm_sample,
    lcm_step,
    lcm_timesteps,
)
from tests.diffusion._oracle import SCHEDULES, SD_BETAS, SHAPE, jax_model, randn, torch_model

ATOL = 1e-5
V_TRAILING = {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}

DDIM_CASES = {
    "leading-offset-epsilon": {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False},
    "trailing-v": V_TRAILING,
    "linspace-sample-clip": {"timestep_spacing": "linspace", "prediction_type": "sample", "clip_sample": True},
    "trailing-v-zero-snr": {**V_TRAILING, "rescale_betas_zero_snr": True},
}


def _ddim_config(case):
    return {**SD_BETAS, "clip_sample": False, "set_alpha_to_one": True, **DDIM_CASES[case]}


@pytest.mark.parametrize("case", list(DDIM_CASES))
def test_ddim_matches_diffusers(case):
    config, steps = _ddim_config(case), 6
    ref, schedule = DDIMScheduler(**config), NoiseSchedule.from_config(config)
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(ddim_timesteps(schedule, steps), ref.timesteps.numpy())

    noise = randn(0)
    t = ref.timesteps[2]
    expected = ref.step(torch_model(torch.from_numpy(noise), t), t, torch.from_numpy(noise))
    out = jax_model(jnp.asarray(noise), jnp.full((2,), int(t)))
    prev, x0 = ddim_step(schedule, out, jnp.asarray(int(t)), jnp.asarray(noise), steps)
    np.testing.assert_allclose(prev, expected.prev_sample.numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(x0, expected.pred_original_sample.numpy(), rtol=0, atol=ATOL)

    x = torch.from_numpy(noise)
    for t in ref.timesteps:
        x = ref.step(torch_model(x, t), t, x).prev_sample
    sample = jax.jit(lambda s, n: ddim_sample(s, jax_model, n, steps))(schedule, jnp.asarray(noise))
    np.testing.assert_allclose(sample, x.numpy(), rtol=0, atol=ATOL)


EULER_CASES = {
    "leading-offset-epsilon": {"timestep_spacing": "leading", "steps_offset": 1},
    "linspace-v": {"timestep_spacing": "linspace", "prediction_type": "v_prediction"},
    "trailing-sample": {"timestep_spacing": "trailing", "prediction_type": "sample"},
    "trailing-v-zero-snr": {**V_TRAILING, "rescale_betas_zero_snr": True},
}


@pytest.mark.parametrize("case", list(EULER_CASES))
def test_euler_matches_diffusers(case):
    config, steps = {**SD_BETAS, **EULER_CASES[case]}, 5
    ref, schedule = EulerDiscreteScheduler(**config), NoiseSchedule.from_config(config)
    ref.set_timesteps(steps)
    timesteps, sigmas = euler_timesteps_and_sigmas(schedule, steps)
    np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())
    np.testing.assert_allclose(sigmas, ref.sigmas.numpy(), rtol=1e-6)

    noise = randn(0)
    x = torch.from_numpy(noise) * ref.init_noise_sigma
    for t in ref.timesteps:
        x = ref.step(torch_model(ref.scale_model_input(x, t), t), t, x).prev_sample
    sample = jax.jit(lambda s, n: euler_sample(s, jax_model, n, steps))(schedule, jnp.asarray(noise))
    # Zero terminal SNR starts the chain at sigma = 4096: float32 rounding of those latents alone is ~4096 * 6e-8
    # = 2.4e-4 per element, so this case is held to the composite tolerance (1e-4), the others to 1e-5.
    atol = 1e-4 if schedule.rescale_betas_zero_snr else ATOL
    np.testing.assert_allclose(sample, x.numpy(), rtol=0, atol=atol)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_lcm_matches_diffusers(prediction_type, monkeypatch):
    config = {**SD_BETAS, "prediction_type": prediction_type, "original_inference_steps": 50, "clip_sample": False}
    steps, rng = 4, jax.random.key(7)
    ref, schedule = LCMScheduler(**config), NoiseSchedule.from_config(config)
    ref.set_timesteps(steps)
    timesteps = lcm_timesteps(schedule, steps)
    np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())

    # diffusers draws one re-noising tensor per step but the last; feed it ours, in order.
    step_noises = [
        torch.from_numpy(np.array(jax.random.normal(jax.random.fold_in(rng, i), SHAPE))) for i in range(steps)
    ]
    calls = iter(step_noises)
    monkeypatch.setattr(scheduling_lcm, "randn_tensor", lambda *args, **kwargs: next(calls))

    noise = randn(0)
    x = torch.from_numpy(noise)
    for i, t in enumerate(ref.timesteps):
        x, denoised = ref.step(torch_model(x, t), t, x, return_dict=False)
        if i == 0:
            first = (x, denoised)
    one_step = lcm_step(
        schedule,
        jax_model(jnp.asarray(noise), jnp.full((2,), timesteps[0])),
        jnp.asarray(timesteps[0]),
        jnp.asarray(timesteps[1]),
        jnp.asarray(noise),
        jnp.asarray(step_noises[0].numpy()),
    )
    np.testing.assert_allclose(one_step[0], first[0].numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(one_step[1], first[1].numpy(), rtol=0, atol=ATOL)

    sample = jax.jit(lambda s, n, r: lcm_sample(s, jax_model, n, steps, r))(schedule, jnp.asarray(noise), rng)
    np.testing.assert_allclose(sample, denoised.numpy(), rtol=0, atol=ATOL)


def test_sampler_traces_the_model_once():
    traces = []

    def counting_model(x, t):
        traces.append(1)
        return jax_model(x, t)

    schedule = NoiseSchedule.from_config(SCHEDULES["scaled_linear"])
    jax.jit(lambda n: ddim_sample(schedule, counting_model, n, 25))(jnp.asarray(randn(0)))
    assert len(traces) == 1


@pytest.mark.parametrize("guidance_rescale", [0.0, 0.7])
def test_classifier_free_guidance(guidance_rescale):
    # Conditioning closed over by the model: [uncond; cond], as diffusers' pipelines concatenate it.
    cond = np.concatenate([randn(10, (2, 4, 1, 1)), randn(11, (2, 4, 1, 1))])

    def model(x, t):
        return jax_model(x, t) * (1.0 + jnp.asarray(cond))

    x, t = randn(0), np.array([500, 500], np.int32)
    guided = classifier_free_guidance(model, 7.5, guidance_rescale)(jnp.asarray(x), jnp.asarray(t))

    out = torch_model(torch.from_numpy(np.concatenate([x, x])), torch.tensor(500)) * (1 + torch.from_numpy(cond))
    uncond, text = out.chunk(2)
    expected = uncond + 7.5 * (text - uncond)
    if guidance_rescale > 0:
        expected = diffusers_rescale(expected, text, guidance_rescale)
    np.testing.assert_allclose(guided, expected.numpy(), rtol=0, atol=ATOL)


def test_step_counts_are_checked():
    schedule = NoiseSchedule.from_config({**SD_BETAS, "original_inference_steps": 8})
    with pytest.raises(ValueError, match="num_inference_steps"):
        ddim_timesteps(schedule, 1001)
    with pytest.raises(ValueError, match="original_inference_steps"):
        lcm_timesteps(schedule, 9)
    np.testing.assert_array_equal(lcm_timesteps(schedule, 2), [999, 499])
