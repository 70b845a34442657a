"""AutoencoderKL against diffusers' torch AutoencoderKL: float32, every parameter randomized, NCHW at the boundary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D as TorchDownEncoderBlock2D
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D as TorchUNetMidBlock2D
from flax import nnx

from jaxdiff.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian
from jaxdiff.models.unet_2d_blocks import DownEncoderBlock2D, UNetMidBlock2D
from jaxdiff.weights import module_to_state_dict
from tests.models import copy_torch_weights, max_abs_diff, nchw_to_nhwc, randomize_
from tests.models.test_unet_2d import remat_calls

BLOCK_TOL = 1e-5
MODEL_TOL = 1e-4
TINY = {
    "block_out_channels": (32, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "norm_num_groups": 8,
    "latent_channels": 4,
}


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _nhwc_to_nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def vaes() -> tuple[AutoencoderKL, TorchAutoencoderKL]:
    theirs = randomize_(TorchAutoencoderKL(**TINY))
    ours = nnx.eval_shape(lambda: AutoencoderKL.from_config(TINY))  # abstract: every parameter comes from torch
    copy_torch_weights(ours, theirs)
    return ours, theirs


def test_down_encoder_block_pads_bottom_right_like_diffusers():
    kwargs = {"num_layers": 2, "resnet_groups": 8, "downsample_padding": 0}
    theirs = randomize_(TorchDownEncoderBlock2D(in_channels=16, out_channels=32, **kwargs))
    ours = DownEncoderBlock2D(16, 32, rngs=nnx.Rngs(0), **kwargs)
    copy_torch_weights(ours, theirs)
    x = _randn(2, 16, 9, 12)  # odd height: the asymmetric pad decides the output
    with torch.no_grad():
        expected = theirs(x)
    got = ours(jnp.asarray(nchw_to_nhwc(x)))
    assert got.shape == (2, 4, 6, 32)
    assert max_abs_diff(_nhwc_to_nchw(got), expected) <= BLOCK_TOL


@pytest.mark.parametrize(
    "temb, kwargs",
    [
        (None, {"attention_head_dim": 32}),  # the VAE's: one head, no time embedding
        (16, {"attention_head_dim": 8, "attn_groups": 4, "output_scale_factor": 2.0, "resnet_eps": 1e-5}),
    ],
)
def test_mid_block(temb, kwargs):
    theirs = randomize_(TorchUNetMidBlock2D(in_channels=32, temb_channels=temb, resnet_groups=8, **kwargs))
    ours = UNetMidBlock2D(32, temb, resnet_groups=8, rngs=nnx.Rngs(0), **kwargs)
    copy_torch_weights(ours, theirs)
    x, t = _randn(2, 32, 6, 10), (_randn(2, temb, seed=1) if temb else None)
    with torch.no_grad():
        expected = theirs(x, t)
    got = ours(jnp.asarray(nchw_to_nhwc(x)), None if t is None else jnp.asarray(t.numpy()))
    assert max_abs_diff(_nhwc_to_nchw(got), expected) <= BLOCK_TOL


def test_encode_decode_match_diffusers(vaes):
    ours, theirs = vaes
    x = _randn(2, 3, 32, 48)
    z = _randn(2, 4, 16, 24, seed=1)
    with torch.no_grad():
        posterior = theirs.encode(x).latent_dist
        decoded = theirs.decode(z).sample
        reconstructed = theirs(x).sample
    encode = nnx.jit(lambda m, x: m.encode(x).latent_dist)
    got = encode(ours, jnp.asarray(x.numpy()))
    assert max_abs_diff(got.mean, posterior.mean) <= MODEL_TOL
    assert max_abs_diff(got.logvar, posterior.logvar) <= MODEL_TOL
    assert max_abs_diff(got.std, posterior.std) <= MODEL_TOL
    decode = nnx.jit(lambda m, z: m.decode(z).sample)
    assert max_abs_diff(decode(ours, jnp.asarray(z.numpy())), decoded) <= MODEL_TOL
    # The forward pass reconstructs through the posterior's mode.
    assert max_abs_diff(decode(ours, got.mode()), reconstructed) <= MODEL_TOL


def test_latent_distribution_clips_logvar_and_samples_from_it():
    mean = jnp.broadcast_to(jnp.array([-2.0, 0.0, 3.0, 1.0])[None, :, None, None], (1, 4, 64, 64))
    logvar = jnp.broadcast_to(jnp.array([0.0, -2.0, 1.0, 50.0])[None, :, None, None], (1, 4, 64, 64))
    dist = DiagonalGaussian.from_moments(jnp.concatenate([mean, logvar], axis=1))
    np.testing.assert_array_equal(dist.logvar[0, :, 0, 0], [0.0, -2.0, 1.0, 20.0])
    np.testing.assert_allclose(dist.var, jnp.exp(dist.logvar), rtol=1e-6)
    assert dist.mode() is dist.mean

    rng = jax.random.key(0)
    draw = dist.sample(rng)
    np.testing.assert_array_equal(draw, dist.sample(rng))
    assert not np.array_equal(draw, dist.sample(jax.random.key(1)))
    # Per channel: 4096 draws; the standardised draws are N(0, 1) (5 standard errors of slack).
    eps = np.asarray((draw - dist.mean) / dist.std)[0].reshape(4, -1)
    n = eps.shape[1]
    assert np.all(np.abs(eps.mean(axis=1)) < 5 / np.sqrt(n))
    assert np.all(np.abs(eps.std(axis=1) - 1) < 5 / np.sqrt(2 * n))


def test_sample_posterior_needs_rng(vaes):
    with pytest.raises(ValueError, match="rng"):
        vaes[0](jnp.zeros((1, 3, 8, 8)), sample_posterior=True)


@pytest.mark.parametrize(
    "flags",
    [
        {"use_quant_conv": False},
        {"use_post_quant_conv": False},
        {"mid_block_add_attention": False, "layers_per_block": 2},
    ],
)
def test_optional_parts_load_diffusers_weights(flags):
    config = {**TINY, **flags}
    # Loading checks key sets both ways and every shape, and raises WeightsMismatchError listing differences.
    copy_torch_weights(nnx.eval_shape(lambda: AutoencoderKL.from_config(config)), TorchAutoencoderKL(**config))


def test_unsupported_block_types_are_refused():
    with pytest.raises(ValueError, match="down_block_types"):
        AutoencoderKLConfig(down_block_types=("AttnDownEncoderBlock2D",))


def test_save_and_load_with_diffusers_are_exact(vaes, tmp_path):
    ours, theirs = vaes
    expected = theirs.state_dict()

    ours.save_pretrained(tmp_path / "ours")
    loaded_by_diffusers = TorchAutoencoderKL.from_pretrained(tmp_path / "ours").state_dict()
    assert loaded_by_diffusers.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded_by_diffusers[key], value), key

    theirs.save_pretrained(tmp_path / "theirs")
    loaded = AutoencoderKL.from_pretrained(tmp_path / "theirs")
    assert loaded.config == ours.config
    state_dict = module_to_state_dict(loaded)
    assert state_dict.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(state_dict[key], value.numpy(), err_msg=key)


def test_sd_vae_has_diffusers_parameter_count():
    """The SD 1.x/2.x VAE (SDXL's has the same shapes), built abstractly on both sides."""
    config = {
        "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 2,
        "latent_channels": 4,
        "sample_size": 512,
    }
    with torch.device("meta"):
        expected = sum(p.numel() for p in TorchAutoencoderKL(**config).parameters())
    model = nnx.eval_shape(lambda: AutoencoderKL.from_config(config))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == expected == 83_653_863


@pytest.mark.parametrize("enabled", [False, True])
def test_gradient_checkpointing_rematerialises_every_block(enabled):
    model = nnx.eval_shape(lambda: AutoencoderKL.from_config(TINY, gradient_checkpointing=enabled))
    graphdef, state = nnx.split(model)
    calls = remat_calls(lambda state: nnx.merge(graphdef, state)(jnp.ones((1, 3, 8, 8))).sample, state)
    # Encoder: down blocks and mid block; decoder: mid block and up blocks.
    assert calls == (2 * len(TINY["block_out_channels"]) + 2 if enabled else 0)
