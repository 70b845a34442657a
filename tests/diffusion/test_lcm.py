import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler
from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import (
    LatentConsistencyModelPipeline,
)

from jaxdiff.diffusion import (
    DDIMSolver,
    NoiseSchedule,
    add_noise,
    get_predicted_noise,
    get_predicted_original_sample,
    guidance_scale_embedding,
    scalings_for_boundary_conditions,
    training_target,
)
from tests.diffusion._oracle import SD_BETAS, jax_model, randn, torch_model


@pytest.mark.parametrize("timestep_scaling", [10.0, 1.0])
def test_boundary_scalings_match_lcm_scheduler(timestep_scaling):
    ref = LCMScheduler(**SD_BETAS, timestep_scaling=timestep_scaling)
    timesteps = np.array([0, 1, 19, 259, 999])
    c_skip, c_out = scalings_for_boundary_conditions(jnp.asarray(timesteps), timestep_scaling=timestep_scaling)
    for i, t in enumerate(timesteps):
        expected_skip, expected_out = ref.get_scalings_for_boundary_condition_discrete(int(t))
        np.testing.assert_allclose([c_skip[i], c_out[i]], [expected_skip, expected_out], rtol=1e-6, atol=1e-7)
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0


@pytest.mark.parametrize("embedding_dim", [256, 33])
def test_guidance_scale_embedding_matches_pipeline(embedding_dim):
    w = np.array([0.0, 0.002, 3.0, 7.5, 14.0], np.float32)
    expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.from_numpy(w), embedding_dim)
    emb = guidance_scale_embedding(jnp.asarray(w), embedding_dim)
    assert emb.shape == (5, embedding_dim)
    # sin/cos of 1000 * w * freq reach arguments of 1.4e4, where torch's and XLA's float32 exp (1 ulp apart on a few
    # frequencies) already move the result by ~1e-3. Allow 1e-5 plus what a 2-ulp change of each argument can cause.
    half = embedding_dim // 2
    freqs = np.exp(-np.log(10000.0) / (half - 1) * np.arange(half))
    args = np.abs(1000.0 * w[:, None] * np.concatenate([freqs, freqs, np.zeros(embedding_dim % 2)])[None])
    assert np.all(np.abs(np.asarray(emb) - expected.numpy()) <= 1e-5 + 2 * np.finfo(np.float32).eps * args)
    np.testing.assert_allclose(emb[:2], expected.numpy()[:2], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        guidance_scale_embedding(jnp.ones((2, 1)), embedding_dim)


def test_ddim_solver_step_is_a_ddim_scheduler_step():
    # The solver's grid k*r - 1 is DDIMScheduler's "leading" grid with steps_offset = r - 1, and the point below the
    # first one is t = 0, i.e. set_alpha_to_one=False.
    num_ddim, ratio = 50, 20
    schedule = NoiseSchedule.from_config(SD_BETAS)
    solver = DDIMSolver.create(schedule.alphas_cumprod, num_ddim)
    ref = DDIMScheduler(**SD_BETAS, steps_offset=ratio - 1, set_alpha_to_one=False, clip_sample=False)
    ref.set_timesteps(num_ddim)
    np.testing.assert_array_equal(solver.timesteps, ref.timesteps.numpy()[::-1])
    assert solver.step_ratio == ratio

    index = np.array([0, 37], np.int32)
    x = randn(0)
    start = solver.timesteps[index]
    out = jax_model(jnp.asarray(x), start)
    pred_x0 = get_predicted_original_sample(schedule, out, start, jnp.asarray(x))
    pred_noise = get_predicted_noise(schedule, out, start, jnp.asarray(x))
    x_prev = solver.step(pred_x0, pred_noise, jnp.asarray(index))
    for b, t in enumerate(np.asarray(start)):
        t = torch.tensor(int(t))
        expected = ref.step(torch_model(torch.from_numpy(x[b : b + 1]), t), t, torch.from_numpy(x[b : b + 1]))
        np.testing.assert_allclose(x_prev[b : b + 1], expected.prev_sample.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(pred_x0[b : b + 1], expected.pred_original_sample.numpy(), rtol=0, atol=1e-5)


def test_ddim_solver_sample_timesteps():
    solver = DDIMSolver.create(NoiseSchedule.from_config(SD_BETAS).alphas_cumprod, 50)
    index, start, timesteps = solver.sample_timesteps(jax.random.key(0), 512)
    np.testing.assert_array_equal(start, (np.asarray(index) + 1) * 20 - 1)
    np.testing.assert_array_equal(timesteps, np.maximum(np.asarray(start) - 20, 0))
    assert int(index.min()) == 0 and int(index.max()) == 49
    with pytest.raises(ValueError, match="num_train_timesteps"):
        DDIMSolver.create(np.ones(10, np.float32), 11)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predicted_x0_and_noise_invert_the_forward_process(prediction_type):
    schedule = NoiseSchedule.from_config({**SD_BETAS, "prediction_type": prediction_type})
    x0, noise, t = jnp.asarray(randn(0)), jnp.asarray(randn(1)), jnp.array([19, 879])
    x_t = add_noise(schedule, x0, noise, t)
    perfect_output = training_target(schedule, x0, noise, t)
    np.testing.assert_allclose(get_predicted_original_sample(schedule, perfect_output, t, x_t), x0, atol=1e-5)
    np.testing.assert_allclose(get_predicted_noise(schedule, perfect_output, t, x_t), noise, atol=1e-5)
