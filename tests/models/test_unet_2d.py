"""UNet2DModel against diffusers' torch UNet2DModel: float32, every parameter randomized, NCHW at the boundary."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DModel as TorchUNet2DModel
from flax import nnx

from jaxdiff.models.unet_2d import UNet2DConfig, UNet2DModel
from jaxdiff.weights import module_to_state_dict
from tests.models import copy_torch_weights, max_abs_diff, randomize_

MODEL_TOL = 1e-4
TINY = {
    "sample_size": 16,
    "block_out_channels": (16, 32),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": 8,
    "attn_norm_num_groups": 4,
    "mid_block_scale_factor": 2.0,
    "center_input_sample": True,
}


@pytest.fixture(scope="module")
def unets() -> tuple[UNet2DModel, TorchUNet2DModel]:
    theirs = randomize_(TorchUNet2DModel(**TINY))
    ours = nnx.eval_shape(lambda: UNet2DModel.from_config(TINY))  # abstract: every parameter comes from torch
    copy_torch_weights(ours, theirs)
    return ours, theirs


def test_unet_matches_diffusers(unets):
    ours, theirs = unets
    x = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([10.0, 731.5])
    with torch.no_grad():
        expected = theirs(x, timesteps).sample
    forward = nnx.jit(lambda m, x, t: m(x, t).sample)
    got = forward(ours, jnp.asarray(x.numpy()), jnp.asarray(timesteps.numpy()))
    assert max_abs_diff(got, expected) <= MODEL_TOL
    # A scalar timestep applies to the whole batch.
    np.testing.assert_allclose(
        forward(ours, jnp.asarray(x.numpy()), jnp.float32(10.0)),
        forward(ours, jnp.asarray(x.numpy()), jnp.full((2,), 10.0)),
        rtol=0,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "flags",
    [
        {"mid_block_type": None, "attention_head_dim": None},
        {"add_attention": False, "layers_per_block": 2, "time_embedding_dim": 24},
    ],
)
def test_variants_load_diffusers_weights(flags):
    config = {**TINY, **flags}
    # Loading checks key sets both ways and every shape, and raises WeightsMismatchError listing differences.
    copy_torch_weights(nnx.eval_shape(lambda: UNet2DModel.from_config(config)), TorchUNet2DModel(**config))


@pytest.mark.parametrize(
    "key, value",
    [
        ("time_embedding_type", "fourier"),
        ("class_embed_type", "timestep"),
        ("resnet_time_scale_shift", "scale_shift"),
        ("down_block_types", ("SkipDownBlock2D", "AttnDownBlock2D")),
    ],
)
def test_unsupported_options_are_refused(key, value):
    with pytest.raises(ValueError, match=key):
        UNet2DConfig(**{**TINY, key: value})


def test_save_and_load_with_diffusers_are_exact(unets, tmp_path):
    ours, theirs = unets
    expected = theirs.state_dict()

    ours.save_pretrained(tmp_path / "ours")
    loaded_by_diffusers = TorchUNet2DModel.from_pretrained(tmp_path / "ours").state_dict()
    assert loaded_by_diffusers.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded_by_diffusers[key], value), key

    theirs.save_pretrained(tmp_path / "theirs")
    loaded = UNet2DModel.from_pretrained(tmp_path / "theirs")
    assert loaded.config == ours.config
    state_dict = module_to_state_dict(loaded)
    assert state_dict.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(state_dict[key], value.numpy(), err_msg=key)


def remat_calls(fn: Callable[..., Any], *args: Any) -> int:
    """How many ``jax.checkpoint`` regions the top level of ``fn``'s jaxpr has."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    return sum(eqn.primitive.name in ("checkpoint", "remat2") for eqn in jaxpr.eqns)  # the name varies by jax version


@pytest.mark.parametrize("enabled", [False, True])
def test_gradient_checkpointing_rematerialises_every_block(enabled):
    model = nnx.eval_shape(lambda: UNet2DModel.from_config(TINY, gradient_checkpointing=enabled))
    graphdef, state = nnx.split(model)
    calls = remat_calls(lambda state: nnx.merge(graphdef, state)(jnp.ones((1, 3, 8, 8)), 3).sample, state)
    assert calls == (len(model.down_blocks) + 1 + len(model.up_blocks) if enabled else 0)
