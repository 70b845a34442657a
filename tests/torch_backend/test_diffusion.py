"""The torch backend's loss math and EMA schedule equal jaxdiff's, and its random draws follow the config."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.training_utils import EMAModel

from jaxdiff import cli, diffusion, optim
from torch_backend.diffusion import min_snr_loss_weights, per_sample_loss
from torch_backend.tasks.text_to_image import TextToImage


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_equal_jaxdiff_including_zero_terminal_snr(prediction_type):
    snr = np.array([0.0, 1e-6, 0.3, 1.0, 4.99, 5.0, 7.5, 1e4], np.float32)
    ours = min_snr_loss_weights(torch.from_numpy(snr), 5.0, prediction_type).numpy()
    theirs = np.asarray(diffusion.min_snr_loss_weights(jnp.asarray(snr), 5.0, prediction_type))
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


@pytest.mark.parametrize("loss_type", ["l2", "huber"])
def test_per_sample_loss_equals_jaxdiff(loss_type):
    rng = np.random.default_rng(0)
    prediction, target = rng.standard_normal((2, 3, 4, 5, 5), np.float32)
    ours = per_sample_loss(torch.from_numpy(prediction), torch.from_numpy(target), loss_type, 0.01).numpy()
    theirs = np.asarray(diffusion.per_sample_loss(jnp.asarray(prediction), jnp.asarray(target), loss_type, 0.01))
    assert ours.shape == (3,)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


@pytest.mark.parametrize("use_warmup", [False, True])
def test_ema_decay_schedule_equals_jaxdiff(use_warmup):
    ema = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=0.999, use_ema_warmup=use_warmup, power=0.75)
    for step in range(1, 50):
        expected = optim.ema_decay(step, max_decay=0.999, use_warmup=use_warmup, power=0.75)
        np.testing.assert_allclose(ema.get_decay(step), float(expected), rtol=1e-6, err_msg=str(step))


def test_draws_follow_the_config(tiny_sd_path, shapes_dataset):
    config = cli.resolve(
        cli.validate(
            {
                "backend": "torch",
                "pretrained_model_name_or_path": str(tiny_sd_path),
                "train_data_dir": str(shapes_dataset),
                "resolution": 32,
                "seed": 0,
                "noise_offset": 0.5,
                "input_perturbation": 0.1,
                "timestep_bias_strategy": "range",
                "timestep_bias_begin": 10,
                "timestep_bias_end": 20,
                "timestep_bias_multiplier": 1e6,
            }
        )
    )
    task = TextToImage(config, torch.device("cpu"))
    device = task.draw(torch.Generator().manual_seed(0), 64)
    host = task.draw_host(0, 64)
    assert device.keys() == host.keys()
    for key, value in device.items():
        assert tuple(value.shape) == host[key].shape, key
    assert ((device["timesteps"] >= 10) & (device["timesteps"] < 20)).float().mean() > 0.99
    # Input perturbation only changes the noise passed to add_noise; the offset moves whole channels.
    perturbation = (device["noise_in"] - device["noise"]).std().item()
    assert 0.08 < perturbation < 0.12
    channel_means = device["noise"].mean(dim=(2, 3))
    assert 0.4 < channel_means.std().item() < 0.6
