import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr as diffusers_compute_snr

from jaxdiff.diffusion import (
    NoiseSchedule,
    compute_snr,
    host_draws,
    min_snr_loss_weights,
    offset_noise,
    per_sample_loss,
    perturb_noise,
    sample_timesteps,
    timestep_bias_weights,
)
from tests.diffusion._oracle import SCHEDULES, randn


def _script_min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """train_text_to_image.py's Min-SNR weights, from compute_snr's output."""
    weights = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        return weights / snr
    if prediction_type == "v_prediction":
        return weights / (snr + 1)
    return weights


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_match_diffusers(prediction_type):
    ref = DDPMScheduler(**SCHEDULES["scaled_linear"])
    schedule = NoiseSchedule.from_config(SCHEDULES["scaled_linear"])
    timesteps = np.array([0, 1, 40, 250, 500, 999], np.int32)
    snr = diffusers_compute_snr(ref, torch.from_numpy(timesteps).long())
    expected = _script_min_snr_weights(snr, 5.0, prediction_type)
    weights = min_snr_loss_weights(compute_snr(schedule, jnp.asarray(timesteps)), 5.0, prediction_type)
    np.testing.assert_allclose(weights, expected.numpy(), rtol=1e-6)
    assert len(np.unique(np.asarray(weights))) > 2  # both branches of min() are exercised


def test_min_snr_weights_finite_on_zero_terminal_snr():
    schedule = NoiseSchedule.from_config(SCHEDULES["scaled_linear_zero_snr"])
    snr = compute_snr(schedule, jnp.arange(1000))
    assert float(snr[-1]) == 0.0
    eps = min_snr_loss_weights(snr, 5.0, "epsilon")
    assert np.isfinite(np.asarray(eps)).all() and float(eps[-1]) == 1.0 and float(eps[-2]) == 1.0
    for prediction_type in ("v_prediction", "sample"):
        weights = min_snr_loss_weights(snr, 5.0, prediction_type)
        assert np.isfinite(np.asarray(weights)).all() and float(weights[-1]) == 0.0
    grad = jax.grad(lambda s: min_snr_loss_weights(s, 5.0, "epsilon").sum())(snr)
    assert np.isfinite(np.asarray(grad)).all()


def _script_bias_rules(num_timesteps, strategy, multiplier, begin, end, portion):
    """The SDXL script's rules, restated per timestep."""
    count = int(portion * num_timesteps)
    biased = {
        "earlier": lambda t: t < count,
        "later": lambda t: t >= num_timesteps - count,
        "range": lambda t: begin <= t < end,
        "none": lambda t: False,
    }[strategy]
    weights = np.array([multiplier if biased(t) else 1.0 for t in range(num_timesteps)])
    return weights / weights.sum()


@pytest.mark.parametrize(
    ("strategy", "multiplier", "begin", "end", "portion"),
    [
        ("earlier", 2.0, 0, 1000, 0.25),
        ("later", 3.5, 0, 1000, 0.3),
        ("later", 0.5, 0, 1000, 0.0),
        ("range", 4.0, 200, 500, 0.25),
        ("none", 9.0, 0, 1000, 0.25),
    ],
)
def test_timestep_bias_weights_follow_sdxl_script(strategy, multiplier, begin, end, portion):
    weights = timestep_bias_weights(1000, strategy, multiplier, begin, end, portion)
    expected = _script_bias_rules(1000, strategy, multiplier, begin, end, portion)
    np.testing.assert_allclose(weights, expected, rtol=1e-12)


def test_timestep_bias_weights_small_example():
    np.testing.assert_allclose(timestep_bias_weights(10, "later", 2.0, portion=0.3), np.array([1] * 7 + [2] * 3) / 13)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategy": "later", "multiplier": 0.0}, "multiplier"),
        ({"strategy": "range", "multiplier": -1.0}, "multiplier"),
        ({"strategy": "range", "begin": -1, "end": 10}, "begin"),
        ({"strategy": "range", "begin": 0, "end": 1001}, "end"),
        ({"strategy": "sooner"}, "timestep_bias_strategy"),
    ],
)
def test_timestep_bias_weights_refuse_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timestep_bias_weights(1000, **kwargs)


def test_sample_timesteps():
    rng = jax.random.key(0)
    uniform = sample_timesteps(rng, 4096, 1000)
    assert uniform.dtype == jnp.int32 and int(uniform.min()) >= 0 and int(uniform.max()) < 1000
    assert len(np.unique(np.asarray(uniform))) > 900

    weights = np.zeros(1000)
    weights[200:300] = 1.0
    biased = np.asarray(sample_timesteps(rng, 4096, 1000, weights / weights.sum()))
    assert biased.min() >= 200 and biased.max() < 300 and len(np.unique(biased)) == 100

    later = np.asarray(sample_timesteps(rng, 20000, 1000, timestep_bias_weights(1000, "later", 3.0, portion=0.5)))
    assert abs((later >= 500).mean() - 0.75) < 0.02


def test_per_sample_loss():
    pred, target = randn(0), randn(1)
    l2 = per_sample_loss(jnp.asarray(pred), jnp.asarray(target), "l2")
    expected = F.mse_loss(torch.from_numpy(pred), torch.from_numpy(target), reduction="none").mean(dim=(1, 2, 3))
    np.testing.assert_allclose(l2, expected.numpy(), rtol=1e-6)

    huber = per_sample_loss(jnp.asarray(pred), jnp.asarray(target), "huber", huber_c=0.1)
    diff = torch.from_numpy(pred) - torch.from_numpy(target)
    expected = (torch.sqrt(diff**2 + 0.1**2) - 0.1).mean(dim=(1, 2, 3))
    assert huber.shape == (2,)
    np.testing.assert_allclose(huber, expected.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="loss_type"):
        per_sample_loss(jnp.asarray(pred), jnp.asarray(target), "l1")


def test_offset_noise_is_constant_per_sample_and_channel():
    noise = jnp.asarray(randn(0, (8, 4, 16, 16)))
    shift = offset_noise(jax.random.key(1), noise, 0.1) - noise
    assert float(jnp.abs(shift - shift[:, :, :1, :1]).max()) < 1e-6
    per_channel = np.asarray(shift[:, :, 0, 0])
    assert len(np.unique(per_channel.round(6))) == 32 and 0.03 < per_channel.std() < 0.3


def test_perturb_noise():
    noise = jnp.asarray(randn(0))
    key = jax.random.key(2)
    perturbed = perturb_noise(key, noise, 0.1)
    np.testing.assert_allclose(perturbed, noise + 0.1 * jax.random.normal(key, noise.shape), atol=1e-7)
    assert float(jnp.abs(perturbed - noise).max()) > 0


def test_host_draws_depend_on_seed_and_step_only():
    weights = timestep_bias_weights(1000, "range", 4.0, begin=200, end=300)
    kwargs = {"timestep_weights": weights, "noise_offset": 0.1, "input_perturbation": 0.2}
    a = host_draws(3, 7, 64, (4, 8, 8), 1000, **kwargs)
    b = host_draws(3, 7, 64, (4, 8, 8), 1000, **kwargs)
    c = host_draws(3, 8, 64, (4, 8, 8), 1000, **kwargs)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["noise"], c["noise"])
    assert a["noise"].shape == a["noise_in"].shape == a["latent_eps"].shape == (64, 4, 8, 8)
    assert a["noise"].dtype == np.float32 and a["timesteps"].dtype == np.int32
    # The perturbation moves only the noise passed to add_noise, by about 0.2 per element.
    np.testing.assert_allclose(np.std(a["noise_in"] - a["noise"]), 0.2, rtol=0.05)
    # The range bias (x4 on 10% of timesteps) draws 4 / (4 * 0.1 + 0.9) ~ 31% of samples there.
    inside = np.mean((a["timesteps"] >= 200) & (a["timesteps"] < 300))
    assert 0.1 < inside < 0.6 and a["timesteps"].min() >= 0 and a["timesteps"].max() < 1000
    plain = host_draws(3, 7, 2, (4, 8, 8), 1000)
    assert np.array_equal(plain["noise"], plain["noise_in"])
