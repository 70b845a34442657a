"""UNet2DConditionModel and its blocks against diffusers' torch classes (float32, every parameter randomized)."""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet2DConditionModel
from diffusers.models.unets import unet_2d_blocks as torch_blocks
from flax import nnx

from jaxdiff.models import unet_2d_blocks
from jaxdiff.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel
from tests.models import abstract_model, jit_call, load_from_torch, max_abs_diff, nchw_to_nhwc, randomize_

BLOCK_TOL = 1e-5
MODEL_TOL = 1e-4

SD1 = {
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 1,
    "attention_head_dim": 2,  # diffusers' misnomer: the number of heads
    "norm_num_groups": 8,
    "cross_attention_dim": 16,
}
SD2 = {
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 1,
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "upcast_attention": True,
    "norm_num_groups": 8,
    "cross_attention_dim": 16,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
}
SDXL = {
    "block_out_channels": (32, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "attention_head_dim": (1, 4),
    "transformer_layers_per_block": (1, 2),
    "use_linear_projection": True,
    "norm_num_groups": 8,
    "cross_attention_dim": 24,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 16 + 6 * 8,  # pooled text embeds + 6 time ids x 8
}
LCM = SD1 | {"time_cond_proj_dim": 8, "norm_eps": 1e-6}


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _jnp(x: torch.Tensor) -> jax.Array:
    return jnp.asarray(x.numpy())


@nnx.jit
def _unet(model, sample, timestep, encoder_hidden_states, timestep_cond, added_cond_kwargs):
    return model(sample, timestep, encoder_hidden_states, timestep_cond, added_cond_kwargs).sample


def _unet_inputs(config: dict, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    inputs = {
        "sample": _randn(2, 4, *size),
        # SD2-like: a scalar timestep, which both models broadcast over the batch.
        "timestep": torch.tensor(421) if config is SD2 else torch.tensor([3, 801]),
        "encoder_hidden_states": _randn(2, 7, config["cross_attention_dim"], seed=1),
    }
    if config.get("time_cond_proj_dim") is not None:
        inputs["timestep_cond"] = _randn(2, config["time_cond_proj_dim"], seed=2)
    if config.get("addition_embed_type") == "text_time":
        time_ids = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0], [512.0, 512.0, 8.0, 0.0, 768.0, 512.0]])
        inputs["added_cond_kwargs"] = {"text_embeds": _randn(2, 16, seed=3), "time_ids": time_ids}
    return inputs


@pytest.mark.parametrize(
    "config, size",
    [(SD1, (16, 24)), (SD1, (15, 22)), (SD2, (16, 24)), (SDXL, (16, 24)), (LCM, (16, 24))],
    ids=["sd1", "sd1-odd-size", "sd2", "sdxl", "lcm"],
)
def test_unet_matches_diffusers(config, size):
    theirs = randomize_(TorchUNet2DConditionModel(**config))
    ours = load_from_torch(lambda rngs: UNet2DConditionModel.from_config(config, rngs=rngs), theirs)
    inputs = _unet_inputs(config, size)
    with torch.no_grad():
        expected = theirs(**inputs).sample
    got = _unet(
        ours,
        _jnp(inputs["sample"]),
        _jnp(inputs["timestep"]),
        _jnp(inputs["encoder_hidden_states"]),
        _jnp(inputs["timestep_cond"]) if "timestep_cond" in inputs else None,
        {k: _jnp(v) for k, v in inputs["added_cond_kwargs"].items()} if "added_cond_kwargs" in inputs else None,
    )
    assert got.shape == (2, 4, *size)
    assert max_abs_diff(got, expected) <= MODEL_TOL


def _block_inputs(channels: int, size=(6, 10)):
    return _randn(2, channels, *size), _randn(2, 32, seed=1), _randn(2, 5, 12, seed=2)


_ATTN = {"num_attention_heads": 2, "cross_attention_dim": 12}


@pytest.mark.parametrize(
    "block_type, kwargs",
    [
        ("DownBlock2D", {"num_layers": 2, "add_downsample": True}),
        ("CrossAttnDownBlock2D", {"num_layers": 2, "transformer_layers_per_block": 2, "add_downsample": True} | _ATTN),
        ("CrossAttnDownBlock2D", {"num_layers": 1, "use_linear_projection": True, "add_downsample": False} | _ATTN),
    ],
)
def test_down_blocks(block_type, kwargs):
    common = {"in_channels": 8, "out_channels": 16, "temb_channels": 32, "resnet_groups": 4, "resnet_eps": 1e-5}
    theirs = randomize_(getattr(torch_blocks, block_type)(**common, **kwargs))
    ours = load_from_torch(
        lambda rngs: unet_2d_blocks.get_down_block(block_type, **common, **kwargs, rngs=rngs), theirs
    )
    x, temb, context = _block_inputs(8)
    with torch.no_grad():
        if block_type == "DownBlock2D":
            expected, expected_skips = theirs(x, temb)
        else:
            expected, expected_skips = theirs(x, temb, encoder_hidden_states=context)
    got, got_skips = jit_call(ours, jnp.asarray(nchw_to_nhwc(x)), _jnp(temb), _jnp(context))
    assert len(got_skips) == len(expected_skips)
    for ours_out, theirs_out in zip((got, *got_skips), (expected, *expected_skips), strict=True):
        assert max_abs_diff(np.asarray(ours_out).transpose(0, 3, 1, 2), theirs_out) <= BLOCK_TOL


@pytest.mark.parametrize(
    "block_type, kwargs, upsample_size",
    [
        ("UpBlock2D", {}, None),
        ("CrossAttnUpBlock2D", {"transformer_layers_per_block": 2} | _ATTN, None),
        ("CrossAttnUpBlock2D", {"use_linear_projection": True} | _ATTN, (11, 19)),
    ],
)
def test_up_blocks(block_type, kwargs, upsample_size):
    common = {"in_channels": 8, "prev_output_channel": 24, "out_channels": 16, "temb_channels": 32}
    common |= {"num_layers": 3, "resnet_groups": 4, "add_upsample": True}
    theirs = randomize_(getattr(torch_blocks, block_type)(**common, **kwargs))
    ours = load_from_torch(lambda rngs: unet_2d_blocks.get_up_block(block_type, **common, **kwargs, rngs=rngs), theirs)
    x, temb, context = _block_inputs(24)
    skips = (_randn(2, 8, 6, 10, seed=3), _randn(2, 16, 6, 10, seed=4), _randn(2, 16, 6, 10, seed=5))
    with torch.no_grad():
        extra = {} if block_type == "UpBlock2D" else {"encoder_hidden_states": context}
        expected = theirs(x, skips, temb, upsample_size=upsample_size, **extra)
    got = jit_call(
        ours,
        jnp.asarray(nchw_to_nhwc(x)),
        tuple(jnp.asarray(nchw_to_nhwc(s)) for s in skips),
        _jnp(temb),
        _jnp(context),
        upsample_size=upsample_size,
    )
    assert max_abs_diff(np.asarray(got).transpose(0, 3, 1, 2), expected) <= BLOCK_TOL


@pytest.mark.parametrize("use_linear_projection", [False, True])
def test_mid_block(use_linear_projection):
    kwargs = {"in_channels": 16, "temb_channels": 32, "resnet_groups": 4, "transformer_layers_per_block": 2}
    kwargs |= {"use_linear_projection": use_linear_projection, "output_scale_factor": 1.5} | _ATTN
    theirs = randomize_(torch_blocks.UNetMidBlock2DCrossAttn(**kwargs))
    ours = load_from_torch(lambda rngs: unet_2d_blocks.UNetMidBlock2DCrossAttn(**kwargs, rngs=rngs), theirs)
    x, temb, context = _block_inputs(16)
    with torch.no_grad():
        expected = theirs(x, temb, encoder_hidden_states=context)
    got = jit_call(ours, jnp.asarray(nchw_to_nhwc(x)), _jnp(temb), _jnp(context))
    assert max_abs_diff(np.asarray(got).transpose(0, 3, 1, 2), expected) <= BLOCK_TOL


def test_unknown_block_types_are_refused():
    with pytest.raises(ValueError, match="'SimpleCrossAttnDownBlock2D' is not supported"):
        unet_2d_blocks.get_down_block(
            "SimpleCrossAttnDownBlock2D",
            num_layers=1,
            in_channels=8,
            out_channels=8,
            temb_channels=8,
            add_downsample=True,
            rngs=nnx.Rngs(0),
        )
    with pytest.raises(ValueError, match="up_block_types has \\['AttnUpBlock2D'\\]"):
        UNet2DConditionConfig(up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"))


@pytest.mark.parametrize(
    "key, value",
    [
        ("class_embed_type", "timestep"),
        ("addition_embed_type", "text"),
        ("num_attention_heads", 8),
        ("dropout", 0.1),
        ("encoder_hid_dim", 32),
        ("attention_type", "gated"),
    ],
)
def test_unsupported_config_values_are_refused(key, value):
    with pytest.raises(ValueError, match=f"{key}={value!r} is not supported"):
        UNet2DConditionConfig(**{key: value})


def test_sdxl_needs_added_cond_kwargs():
    model = abstract_model(lambda rngs: UNet2DConditionModel.from_config(SDXL, rngs=rngs))  # inputs fail first
    with pytest.raises(ValueError, match="needs added_cond_kwargs with \\['time_ids'\\]"):
        model(jnp.zeros((1, 4, 8, 8)), 1, jnp.zeros((1, 3, 24)), added_cond_kwargs={"text_embeds": jnp.zeros((1, 16))})


# Published config.json of the UNets of stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0 (keys as released).
SD15_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SDXL_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.19.0.dev0",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}


@pytest.mark.parametrize(
    "config, expected", [(SD15_UNET_CONFIG, 859_520_964), (SDXL_UNET_CONFIG, 2_567_463_684)], ids=["sd15", "sdxl"]
)
def test_real_configs_have_diffusers_parameter_counts(config, expected):
    model = abstract_model(lambda rngs: UNet2DConditionModel.from_config(config, rngs=rngs))
    params = nnx.state(model, nnx.Param)
    assert sum(p.size for p in jax.tree.leaves(params)) == expected


def _loss_and_grads(model: UNet2DConditionModel, sample, timestep, context):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        out = nnx.merge(graphdef, params, rest)(sample, timestep, context).sample
        return jnp.mean(out**2)

    return jax.jit(jax.value_and_grad(loss)), params


def test_gradient_checkpointing_changes_memory_not_gradients():
    config = UNet2DConditionConfig.from_dict(SD2)
    sample, context = jnp.asarray(_randn(2, 4, 8, 8).numpy()), jnp.asarray(_randn(2, 3, 16).numpy())
    timestep = jnp.asarray([5, 500])
    theirs = randomize_(TorchUNet2DConditionModel(**SD2))
    results = {}
    for remat in (False, True):
        model = load_from_torch(
            lambda rngs: UNet2DConditionModel(config, gradient_checkpointing=remat, rngs=rngs),  # noqa: B023
            theirs,
        )
        fn, params = _loss_and_grads(model, sample, timestep, context)
        # The rematerialised blocks show up as remat regions in the traced program.
        assert ("remat" in str(jax.make_jaxpr(fn)(params))) == remat
        results[remat] = fn(params)
    (loss, grads), (loss_remat, grads_remat) = results[False], results[True]
    assert loss == loss_remat
    # Equal up to float32 reassociation: recomputation lets XLA fuse the backward pass differently.
    for g, g_remat in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat), strict=True):
        np.testing.assert_allclose(g_remat, g, rtol=1e-5, atol=1e-7)


def test_bf16_compute_stays_close_to_fp32():
    """bf16 activations with fp32 parameters: a sanity bound, not parity.

    bf16 keeps 8 mantissa bits (relative step 2^-8 ~ 0.4%); through ~30 layers errors add up to a few percent of
    the output's norm. 5% catches broken casts (wrong dtype paths give O(1) errors) without flaking.
    """
    theirs = randomize_(TorchUNet2DConditionModel(**SDXL))
    fp32 = load_from_torch(lambda rngs: UNet2DConditionModel.from_config(SDXL, rngs=rngs), theirs)
    bf16 = load_from_torch(lambda rngs: UNet2DConditionModel.from_config(SDXL, dtype=jnp.bfloat16, rngs=rngs), theirs)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    inputs = _unet_inputs(SDXL, (16, 24))
    args = (
        _jnp(inputs["sample"]),
        _jnp(inputs["timestep"]),
        _jnp(inputs["encoder_hidden_states"]),
        None,
        {k: _jnp(v) for k, v in inputs["added_cond_kwargs"].items()},
    )
    reference, low = _unet(fp32, *args), _unet(bf16, *args)
    assert low.dtype == jnp.float32  # the output has the sample's dtype
    assert bool(jnp.all(jnp.isfinite(low)))
    assert not np.array_equal(low, reference)  # the bf16 path is really taken
    assert float(jnp.linalg.norm(low - reference) / jnp.linalg.norm(reference)) < 0.05


def test_config_has_every_diffusers_key_and_default():
    parameters = inspect.signature(TorchUNet2DConditionModel.__init__).parameters
    theirs = {k: p.default for k, p in parameters.items() if k != "self"}
    ours = {f.name: f.default for f in dataclasses.fields(UNet2DConditionConfig)}
    assert ours.keys() == theirs.keys()
    assert ours == {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in theirs.items()}


def test_diffusers_folder_round_trip(tmp_path):
    """diffusers save -> jaxdiff load gives diffusers' outputs; jaxdiff save -> diffusers load is bit-exact."""
    theirs = randomize_(TorchUNet2DConditionModel(**LCM))
    theirs.save_pretrained(tmp_path / "theirs")
    ours = UNet2DConditionModel.from_pretrained(tmp_path / "theirs")
    inputs = _unet_inputs(LCM, (16, 24))  # the parity test's shapes: compiled once per session
    with torch.no_grad():
        expected = theirs(**inputs).sample
    names = ("sample", "timestep", "encoder_hidden_states", "timestep_cond")
    got = _unet(ours, *(_jnp(inputs[name]) for name in names), None)
    assert max_abs_diff(got, expected) <= MODEL_TOL

    ours.save_pretrained(tmp_path / "ours")
    reloaded = TorchUNet2DConditionModel.from_pretrained(tmp_path / "ours")
    assert reloaded.config.time_cond_proj_dim == LCM["time_cond_proj_dim"]
    reloaded_state = reloaded.state_dict()
    assert reloaded_state.keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(reloaded_state[key], value), key
