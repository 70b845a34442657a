"""Shared layers against diffusers' torch modules: float32, every parameter randomized, NHWC vs NCHW."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock as TorchBasicTransformerBlock
from diffusers.models.attention import FeedForward as TorchFeedForward
from diffusers.models.attention_processor import Attention as TorchAttention
from diffusers.models.downsampling import Downsample2D as TorchDownsample2D
from diffusers.models.embeddings import TimestepEmbedding as TorchTimestepEmbedding
from diffusers.models.embeddings import get_timestep_embedding as torch_get_timestep_embedding
from diffusers.models.resnet import ResnetBlock2D as TorchResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel as TorchTransformer2DModel
from diffusers.models.upsampling import Upsample2D as TorchUpsample2D
from flax import nnx

from jaxdiff.models import layers, nn
from tests.models import jit_call, load_from_torch, max_abs_diff, nchw_to_nhwc, randomize_

TOL = 1e-5


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _nhwc_to_nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.mark.parametrize(
    "dim, flip, shift, scale, max_period",
    [(32, True, 0.0, 1.0, 10000), (32, False, 1.0, 1.0, 10000), (33, True, 1.0, 3.0, 100)],
)
def test_get_timestep_embedding(dim, flip, shift, scale, max_period):
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    theirs = torch_get_timestep_embedding(t, dim, flip, shift, scale, max_period)
    ours = layers.get_timestep_embedding(jnp.asarray(t.numpy()), dim, flip, shift, scale, max_period)
    assert max_abs_diff(ours, theirs) <= TOL


@pytest.mark.parametrize("cond_proj_dim, post_act", [(None, None), (8, "silu")])
def test_timestep_embedding(cond_proj_dim, post_act):
    theirs = randomize_(TorchTimestepEmbedding(16, 32, post_act_fn=post_act, cond_proj_dim=cond_proj_dim))
    ours = load_from_torch(
        lambda rngs: layers.TimestepEmbedding(16, 32, post_act_fn=post_act, cond_proj_dim=cond_proj_dim, rngs=rngs),
        theirs,
    )
    x = _randn(3, 16)
    cond = _randn(3, 8, seed=1) if cond_proj_dim else None
    with torch.no_grad():
        expected = theirs(x, cond)
    got = jit_call(ours, jnp.asarray(x.numpy()), None if cond is None else jnp.asarray(cond.numpy()))
    assert max_abs_diff(got, expected) <= TOL


@pytest.mark.parametrize(
    "in_ch, out_ch, temb, groups, kwargs",
    [
        (16, 16, 12, 4, {}),  # identity shortcut
        (16, 24, 12, 8, {"output_scale_factor": 2.0, "eps": 1e-5}),  # 1x1 conv_shortcut
        (16, 8, None, 4, {}),  # VAE style: no time embedding
        (8, 8, 12, 4, {"time_embedding_norm": "scale_shift"}),
    ],
)
def test_resnet_block_2d(in_ch, out_ch, temb, groups, kwargs):
    theirs = randomize_(
        TorchResnetBlock2D(in_channels=in_ch, out_channels=out_ch, temb_channels=temb, groups=groups, **kwargs)
    )
    ours = load_from_torch(
        lambda rngs: layers.ResnetBlock2D(in_ch, out_ch, temb_channels=temb, groups=groups, rngs=rngs, **kwargs),
        theirs,
    )
    x = _randn(2, in_ch, 6, 10)
    t = _randn(2, temb, seed=1) if temb else None
    with torch.no_grad():
        expected = theirs(x, t)
    got = jit_call(ours, jnp.asarray(nchw_to_nhwc(x)), None if t is None else jnp.asarray(t.numpy()))
    assert max_abs_diff(_nhwc_to_nchw(got), expected) <= TOL


def test_resnet_block_refuses_temb_without_projection():
    block = layers.ResnetBlock2D(8, 8, temb_channels=None, groups=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="temb_channels=None"):
        block(jnp.zeros((1, 4, 4, 8)), jnp.zeros((1, 4)))


@pytest.mark.parametrize("use_conv, padding, size", [(True, 1, (6, 10)), (True, 0, (7, 10)), (False, 1, (7, 9))])
def test_downsample_2d(use_conv, padding, size):
    theirs = randomize_(TorchDownsample2D(8, use_conv=use_conv, padding=padding, name="op"))
    ours = load_from_torch(lambda rngs: layers.Downsample2D(8, use_conv=use_conv, padding=padding, rngs=rngs), theirs)
    x = _randn(2, 8, *size)
    with torch.no_grad():
        expected = theirs(x)
    assert max_abs_diff(_nhwc_to_nchw(jit_call(ours, jnp.asarray(nchw_to_nhwc(x)))), expected) <= TOL


@pytest.mark.parametrize("use_conv, output_size", [(True, None), (True, (7, 9)), (False, (11, 10))])
def test_upsample_2d(use_conv, output_size):
    theirs = randomize_(TorchUpsample2D(8, use_conv=use_conv, out_channels=8))
    ours = load_from_torch(lambda rngs: layers.Upsample2D(8, use_conv=use_conv, rngs=rngs), theirs)
    x = _randn(2, 8, 4, 5)
    with torch.no_grad():
        expected = theirs(x, output_size)
    got = jit_call(ours, jnp.asarray(nchw_to_nhwc(x)), output_size=output_size)
    assert max_abs_diff(_nhwc_to_nchw(got), expected) <= TOL


@pytest.mark.parametrize("impl", ["xla", "chunked"])
@pytest.mark.parametrize("cross_dim, bias", [(None, False), (12, False), (12, True)])
def test_attention_tokens(cross_dim, bias, impl, monkeypatch):
    monkeypatch.setattr(nn, "ATTENTION_CHUNK", 4)  # 10 queries: blocks of 4, 4 and 2
    theirs = randomize_(TorchAttention(16, cross_attention_dim=cross_dim, heads=2, dim_head=8, bias=bias))
    kwargs = {"cross_attention_dim": cross_dim, "heads": 2, "dim_head": 8, "bias": bias, "attention_impl": impl}
    ours = load_from_torch(lambda rngs: layers.Attention(16, rngs=rngs, **kwargs), theirs)
    x = _randn(2, 10, 16)
    context = _randn(2, 7, cross_dim, seed=1) if cross_dim else None
    with torch.no_grad():
        expected = theirs(x, context)
    got = jit_call(ours, jnp.asarray(x.numpy()), None if context is None else jnp.asarray(context.numpy()))
    assert max_abs_diff(got, expected) <= TOL


@pytest.mark.parametrize("q_len, kv_len", [(200, 200), (200, 77)])
def test_chunked_attention_gradients_match_torch(q_len, kv_len, monkeypatch):
    """Values and all three gradients of the memory-efficient attention equal torch SDPA's (3 query blocks)."""
    monkeypatch.setattr(nn, "ATTENTION_CHUNK", 64)
    q, k, v = (_randn(2, n, 4, 16, seed=i) for i, n in enumerate((q_len, kv_len, kv_len)))
    weight = _randn(2, q_len, 4, 16, seed=3)
    tq, tk, tv = (x.transpose(1, 2).clone().requires_grad_() for x in (q, k, v))
    expected = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv).transpose(1, 2)
    (expected * weight).sum().backward()

    def loss(q, k, v):
        return jnp.sum(nn.chunked_attention(q, k, v) * jnp.asarray(weight.numpy()))

    grads = jax.grad(loss, argnums=(0, 1, 2))(*(jnp.asarray(x.numpy()) for x in (q, k, v)))
    assert max_abs_diff(nn.chunked_attention(*(jnp.asarray(x.numpy()) for x in (q, k, v))), expected.detach()) <= TOL
    for got, want in zip(grads, (tq, tk, tv), strict=True):
        assert max_abs_diff(got, want.grad.transpose(1, 2)) <= TOL


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pointwise_conv_gradients_match_torch(dtype):
    """A 1x1 conv (its own weight-gradient rule): values, input and kernel gradients equal torch's conv2d."""
    conv = nn.conv(6, 5, 1, dtype=dtype, rngs=nnx.Rngs(0))
    assert conv.conv_general_dilated is not jax.lax.conv_general_dilated
    x, weight = _randn(2, 6, 7, 9), _randn(2, 5, 7, 9, seed=1)
    tx = x.clone().requires_grad_()
    tw = torch.from_numpy(np.asarray(conv.kernel[...]).transpose(3, 2, 0, 1).copy()).requires_grad_()
    tb = torch.from_numpy(np.asarray(conv.bias[...]).copy())
    expected = torch.nn.functional.conv2d(tx, tw, tb)
    (expected * weight).sum().backward()

    graphdef, params = nnx.split(conv)

    def loss(x, params):
        return jnp.sum(nnx.merge(graphdef, params)(x).astype(jnp.float32) * nchw_to_nhwc(weight))

    got_x, got_params = jax.grad(loss, argnums=(0, 1))(jnp.asarray(nchw_to_nhwc(x)), params)
    got_kernel = got_params["kernel"][...]
    pairs = [
        (_nhwc_to_nchw(conv(jnp.asarray(nchw_to_nhwc(x)))), expected.detach()),
        (_nhwc_to_nchw(got_x), tx.grad),
        (got_kernel, tw.grad.permute(2, 3, 1, 0)),
    ]
    for got, want in pairs:
        # bf16 inputs: a 2% sanity bound relative to the values' scale, not a parity test
        tol = TOL if dtype == jnp.float32 else 2e-2 * float(want.abs().max())
        assert max_abs_diff(got, want) <= tol
    assert got_kernel.dtype == jnp.float32


@pytest.mark.parametrize("kernel_size, stride, padding", [(3, 1, 1), (1, 2, 0), (1, 1, 1)])
def test_other_convs_are_plain_xla(kernel_size, stride, padding):
    conv = nn.conv(4, 4, kernel_size, stride=stride, padding=padding, rngs=nnx.Rngs(0))
    assert conv.conv_general_dilated is jax.lax.conv_general_dilated


@pytest.mark.parametrize("shape", [(2, 6, 10, 16), (2, 9, 16)])
def test_group_norm_values_and_gradients_match_torch(shape):
    """NHWC images and (batch, tokens, channels) sequences; an input far from zero mean tests the statistics."""
    theirs = randomize_(torch.nn.GroupNorm(4, 16, eps=1e-6))
    ours = load_from_torch(lambda rngs: nn.group_norm(16, 4, eps=1e-6, rngs=rngs), theirs)
    x = _randn(*shape) * 3 + 5
    weight = _randn(*shape, seed=1)
    tx = x.clone().requires_grad_()
    out = theirs(tx.movedim(-1, 1)).movedim(1, -1)
    (out * weight).sum().backward()
    graphdef, params = nnx.split(ours)

    def loss(x, params):
        return jnp.sum(nnx.merge(graphdef, params)(x) * jnp.asarray(weight.numpy()))

    got_x, got_params = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x.numpy()), params)
    assert max_abs_diff(ours(jnp.asarray(x.numpy())), out.detach()) <= TOL
    assert max_abs_diff(got_x, tx.grad) <= TOL
    for got, want in ((got_params["scale"][...], theirs.weight.grad), (got_params["bias"][...], theirs.bias.grad)):
        # sums over every pixel, of magnitude ~10: float32 summation order alone moves them by ~1e-5 (flax's
        # nnx.GroupNorm too), so these two compare relative to their scale
        assert max_abs_diff(got, want) <= TOL * float(want.abs().max())


def test_gelu_matches_torch_exact_gelu():
    x = _randn(4096, seed=2) * 4
    tx = x.clone().requires_grad_()
    torch.nn.functional.gelu(tx).sum().backward()
    grad = jax.grad(lambda x: jnp.sum(nn.gelu(x)))(jnp.asarray(x.numpy()))
    assert max_abs_diff(nn.gelu(jnp.asarray(x.numpy())), torch.nn.functional.gelu(x)) <= TOL
    assert max_abs_diff(grad, tx.grad) <= TOL


def test_attention_image_with_group_norm_and_residual():
    """The VAE / UNet2DModel mid-block form: NHWC image in, group norm, residual, rescaled output."""
    kwargs = {"heads": 1, "dim_head": 16, "bias": True, "norm_num_groups": 4, "eps": 1e-6}
    kwargs |= {"residual_connection": True, "rescale_output_factor": 2.0}
    theirs = randomize_(TorchAttention(16, upcast_softmax=True, **kwargs))
    ours = load_from_torch(lambda rngs: layers.Attention(16, upcast_attention=True, rngs=rngs, **kwargs), theirs)
    x = _randn(2, 16, 5, 6)
    with torch.no_grad():
        expected = theirs(x)
    assert max_abs_diff(_nhwc_to_nchw(jit_call(ours, jnp.asarray(nchw_to_nhwc(x)))), expected) <= TOL


@pytest.mark.parametrize("activation_fn", ["geglu", "gelu", "gelu-approximate"])
def test_feed_forward(activation_fn):
    theirs = randomize_(TorchFeedForward(16, activation_fn=activation_fn))
    ours = load_from_torch(lambda rngs: layers.FeedForward(16, activation_fn=activation_fn, rngs=rngs), theirs)
    x = _randn(2, 5, 16)
    with torch.no_grad():
        expected = theirs(x)
    assert max_abs_diff(jit_call(ours, jnp.asarray(x.numpy())), expected) <= TOL


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cross_attention_dim": 12},
        {"cross_attention_dim": 12, "only_cross_attention": True, "attention_bias": True},
        {"double_self_attention": True},
        {},  # self-attention only: no norm2/attn2
    ],
)
def test_basic_transformer_block(kwargs):
    theirs = randomize_(TorchBasicTransformerBlock(16, 2, 8, **kwargs))
    ours = load_from_torch(lambda rngs: layers.BasicTransformerBlock(16, 2, 8, rngs=rngs, **kwargs), theirs)
    x = _randn(2, 10, 16)
    context = _randn(2, 7, 12, seed=1) if "cross_attention_dim" in kwargs else None
    with torch.no_grad():
        expected = theirs(x, encoder_hidden_states=context)
    got = jit_call(ours, jnp.asarray(x.numpy()), None if context is None else jnp.asarray(context.numpy()))
    assert max_abs_diff(got, expected) <= TOL


@pytest.mark.parametrize("use_linear_projection", [False, True])
def test_transformer_2d_model(use_linear_projection):
    kwargs = {"in_channels": 16, "num_layers": 2, "norm_num_groups": 4, "cross_attention_dim": 12}
    kwargs["use_linear_projection"] = use_linear_projection
    theirs = randomize_(TorchTransformer2DModel(2, 8, **kwargs))
    ours = load_from_torch(lambda rngs: layers.Transformer2DModel(2, 8, rngs=rngs, **kwargs), theirs)
    x, context = _randn(2, 16, 4, 6), _randn(2, 7, 12, seed=1)
    with torch.no_grad():
        expected = theirs(x, encoder_hidden_states=context).sample
    got = jit_call(ours, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(context.numpy()))
    assert max_abs_diff(_nhwc_to_nchw(got), expected) <= TOL


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="'tanhh' is not one of"):
        layers.get_activation("tanhh")
    with pytest.raises(ValueError, match="activation_fn 'swiglu'"):
        layers.FeedForward(8, activation_fn="swiglu", rngs=nnx.Rngs(0))
