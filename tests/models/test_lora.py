"""LoRA adapters: peft's layer choice and initialisation, and diffusers' ``load_lora_weights`` of our file giving
our adapted models' outputs (float32, alpha != rank), with attention-only and LCM-LoRA's (convolutions too) targets;
merging, and the adapted model run as its base (``lora_disabled``)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet2DConditionModel
from flax import nnx
from safetensors import safe_open

from jaxdiff.adapters import LCM_UNET_TARGETS, LORA_WEIGHTS_NAME, UNET_TARGETS, LoRASettings, matches
from jaxdiff.models.clip import CLIPTextModel
from jaxdiff.models.lora import add_lora, initial_adapters, lora_state_dict, merge_lora, save_lora_weights
from jaxdiff.models.nn import LoRAParam, lora_disabled, lora_dropout
from jaxdiff.models.unet_2d_condition import UNet2DConditionModel
from tests.models import max_abs_diff

MODEL_TOL = 1e-4
SETTINGS = LoRASettings(rank=4, alpha=8, dropout=0.0, unet_targets=UNET_TARGETS)  # alpha != rank: scale 2
LCM_SETTINGS = LoRASettings(rank=4, alpha=8, dropout=0.0, unet_targets=LCM_UNET_TARGETS)


def _randomize_adapters(model: nnx.Module, seed: int) -> None:
    """Non-zero ``up`` matrices too (they start at zero), so the comparison sees every adapter."""
    key = jax.random.PRNGKey(seed)
    for i, (_, variable) in enumerate(nnx.iter_graph(model)):
        if isinstance(variable, LoRAParam):
            value = variable.get_value()
            variable.set_value(0.3 * jax.random.normal(jax.random.fold_in(key, i), value.shape, value.dtype))


def _unet_inputs():
    """(sample, timestep, text states) for the tiny UNet, as torch tensors: a noise level near each end."""
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    hidden = torch.randn(2, 7, 32, generator=generator)
    return sample, torch.tensor([3, 801]), hidden


@nnx.jit
def _unet(model, sample, timestep, encoder_hidden_states):
    return model(sample, timestep, encoder_hidden_states).sample


@nnx.jit
def _base_unet(model, sample, timestep, encoder_hidden_states):
    with lora_disabled():
        return model(sample, timestep, encoder_hidden_states).sample


@nnx.jit
def _text(model, ids):
    return model(ids).last_hidden_state


def test_targets_follow_peft_matching():
    assert matches("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", UNET_TARGETS)
    assert matches("mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0", UNET_TARGETS)
    assert not matches("down_blocks.0.attentions.0.proj_in", UNET_TARGETS)
    assert not matches("x.not_to_q", ("to_q",))  # a whole name component, not a suffix of one
    assert matches("a.attn1.to_q", ("attn1.to_q",)) and not matches("a.attn2.to_q", ("attn1.to_q",))


def test_adapters_start_at_the_base_model_and_only_they_are_lora_state(tiny_sd_path):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    base_params = nnx.state(unet, nnx.Param)
    sample, t = jnp.ones((1, 4, 8, 8)), jnp.array([10])
    text = jnp.linspace(-1, 1, 7 * 32).reshape(1, 7, 32)
    before = _unet(unet, sample, t, text)

    names = add_lora(unet, SETTINGS, "unet", seed=3)
    theirs = TorchUNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    linears = [n for n, m in theirs.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(names) == sorted(n for n in linears if matches(n, UNET_TARGETS))
    assert len(names) == 4 * 2 * 4  # 4 transformer blocks (down, mid, 2 up) x (attn1, attn2) x (q, k, v, out)
    adapters = nnx.state(unet, LoRAParam)
    assert len(jax.tree.leaves(adapters)) == 2 * len(names)
    assert jax.tree.structure(nnx.state(unet, nnx.Param)) == jax.tree.structure(base_params)  # not Params
    downs = np.concatenate([np.ravel(v) for p, v in nnx.to_flat_state(adapters) if p[-1] == "down"])
    ups = [v for p, v in nnx.to_flat_state(adapters) if p[-1] == "up"]
    assert all(not np.any(np.asarray(u.get_value())) for u in ups)  # lora_B = 0
    assert abs(downs.std() - 1 / 4) < 0.02  # peft's "gaussian": lora_A ~ N(0, 1/rank^2)
    np.testing.assert_array_equal(_unet(unet, sample, t, text), before)

    # An abstract model's adapters get the same starting values (seed, module) from initial_adapters.
    abstract, _ = UNet2DConditionModel.abstract_from_pretrained(tiny_sd_path, "unet")
    add_lora(abstract, SETTINGS, "unet", abstract=True)
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(nnx.state(abstract, LoRAParam)))
    started = nnx.to_flat_state(initial_adapters(abstract, "unet", seed=3))
    assert [p for p, _ in started] == [p for p, _ in nnx.to_flat_state(adapters)]
    for (_, ours), (_, theirs) in zip(started, nnx.to_flat_state(adapters), strict=True):
        np.testing.assert_array_equal(ours.get_value(), theirs.get_value())


def test_dropout_acts_only_inside_its_context(tiny_sd_path):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    add_lora(unet, LoRASettings(rank=4, alpha=4, dropout=0.5, unet_targets=UNET_TARGETS), "unet")
    _randomize_adapters(unet, 0)
    sample, t = jnp.ones((1, 4, 8, 8)), jnp.array([10])
    text = jnp.linspace(-1, 1, 7 * 32).reshape(1, 7, 32)
    plain = _unet(unet, sample, t, text)

    @nnx.jit
    def dropped(model, key):
        with lora_dropout(key):
            return model(sample, t, text).sample

    first, again, other = (dropped(unet, jax.random.PRNGKey(k)) for k in (0, 0, 1))
    np.testing.assert_array_equal(first, again)  # the masks follow the key
    assert max_abs_diff(first, plain) > 1e-3 and max_abs_diff(first, other) > 1e-3
    np.testing.assert_array_equal(_unet(unet, sample, t, text), plain)  # outside the context: no dropout


def test_bad_targets_and_rank_are_refused(tiny_sd_path):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    with pytest.raises(
        ValueError, match=r"no Linear or Conv layer of UNet2DConditionModel \(unet\) matches .* \['q'\]"
    ):
        add_lora(unet, LoRASettings(rank=4, alpha=4, dropout=0.0, unet_targets=("q",)), "unet")
    with pytest.raises(ValueError, match="rank=0: must be >= 1"):
        add_lora(unet, LoRASettings(rank=0, alpha=4, dropout=0.0, unet_targets=UNET_TARGETS), "unet")


def test_diffusers_loads_our_lora_file_and_matches_our_adapted_models(tiny_sd_path, tmp_path):
    from diffusers import StableDiffusionPipeline

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd_path, subfolder="text_encoder")
    add_lora(unet, SETTINGS, "unet")
    add_lora(text_encoder, SETTINGS, "text_encoder")
    _randomize_adapters(unet, 0)
    _randomize_adapters(text_encoder, 1)
    path = save_lora_weights(tmp_path, {"unet": unet, "text_encoder": text_encoder}, SETTINGS)
    assert path == tmp_path / LORA_WEIGHTS_NAME

    with safe_open(path, "np") as f:
        keys = set(f.keys())
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)  # adapters only
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight"  # transformers 5 names in keys
    assert (metadata["unet.r"], metadata["unet.lora_alpha"]) == (4, 8)
    assert (metadata["text_encoder.r"], metadata["text_encoder.lora_alpha"]) == (4, 8)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    pipe.load_lora_weights(tmp_path)
    sample, timestep, hidden = _unet_inputs()
    ids = torch.tensor([[0, 5, 9, 14, 1, 1, 1], [0, 7, 3, 1, 1, 1, 1]])
    with torch.no_grad():
        expected_unet = pipe.unet(sample, timestep, hidden).sample
        expected_text = pipe.text_encoder(ids).last_hidden_state
    got_unet = _unet(unet, jnp.asarray(sample.numpy()), jnp.asarray(timestep.numpy()), jnp.asarray(hidden.numpy()))
    got_text = _text(text_encoder, jnp.asarray(ids.numpy()))
    assert max_abs_diff(got_text, expected_text) <= MODEL_TOL
    assert max_abs_diff(got_unet, expected_unet) <= MODEL_TOL
    # The adapters are what differs from the base (a file diffusers ignored would leave the base outputs).
    base = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    with torch.no_grad():
        assert max_abs_diff(base.unet(sample, timestep, hidden).sample, expected_unet) > 100 * MODEL_TOL


def test_lcm_targets_adapt_linears_and_convs_as_peft_does(tiny_sd_path):
    """LCM-LoRA's targets: peft's choice of Linear and Conv2d layers, its lora_A/lora_B shapes, one start for a
    concrete and an abstract model."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    names = add_lora(unet, LCM_SETTINGS, "unet", seed=5)
    theirs = TorchUNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    layers = {n: m for n, m in theirs.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)}
    expected = sorted(n for n in layers if matches(n, LCM_UNET_TARGETS))
    assert sorted(names) == expected
    convs = {n for n in names if isinstance(layers[n], torch.nn.Conv2d)}
    strided = {n for n in convs if layers[n].stride == (2, 2)}
    assert {n.rsplit(".", 1)[-1] for n in convs} == {"conv1", "conv2", "conv_shortcut", "proj_in", "proj_out", "conv"}
    assert strided == {"down_blocks.0.downsamplers.0.conv"}
    assert any(n.endswith("ff.net.0.proj") for n in names) and any(n.endswith("time_emb_proj") for n in names)

    ours = lora_state_dict(unet, "unet")
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=list(LCM_UNET_TARGETS)), theirs)
    peft_shapes = {f"unet.{k}": tuple(v.shape) for k, v in get_peft_model_state_dict(theirs).items()}
    assert {k: v.shape for k, v in ours.items()} == peft_shapes  # (4, in, 3, 3) / (out, 4, 1, 1) for a 3x3 conv
    conv_a = ours["unet.down_blocks.0.downsamplers.0.conv.lora_A.weight"]
    assert conv_a.shape == (4, 32, 3, 3) and abs(conv_a.std() - 1 / 4) < 0.05  # peft's "gaussian" on a conv too

    abstract, _ = UNet2DConditionModel.abstract_from_pretrained(tiny_sd_path, "unet")
    add_lora(abstract, LCM_SETTINGS, "unet", abstract=True)
    started = nnx.to_flat_state(initial_adapters(abstract, "unet", seed=5))
    concrete = nnx.to_flat_state(nnx.state(unet, LoRAParam))
    assert [p for p, _ in started] == [p for p, _ in concrete]
    for (_, a), (_, b) in zip(started, concrete, strict=True):
        np.testing.assert_array_equal(a.get_value(), b.get_value())


def test_lcm_lora_file_loads_in_diffusers_merges_and_disables(tiny_sd_path, tmp_path):
    """Adapters on LCM-LoRA's targets (convolutions: 3x3, stride 2, 1x1 shortcut and proj_in/out): diffusers'
    ``load_lora_weights`` of our file computes our adapted UNet, `merge_lora` folds them into the same function, and
    inside ``lora_disabled`` the adapted UNet is its base model, bit for bit."""
    from diffusers import StableDiffusionPipeline

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    add_lora(unet, LCM_SETTINGS, "unet")
    _randomize_adapters(unet, 2)
    save_lora_weights(tmp_path, {"unet": unet}, LCM_SETTINGS)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    pipe.load_lora_weights(tmp_path)
    sample, timestep, hidden = _unet_inputs()
    with torch.no_grad():
        expected = pipe.unet(sample, timestep, hidden).sample
    inputs = (jnp.asarray(sample.numpy()), jnp.asarray(timestep.numpy()), jnp.asarray(hidden.numpy()))
    adapted = _unet(unet, *inputs)
    assert max_abs_diff(adapted, expected) <= MODEL_TOL

    base = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    base_out = _unet(base, *inputs)
    assert max_abs_diff(base_out, adapted) > 100 * MODEL_TOL  # the adapters, convolutions included, act
    np.testing.assert_array_equal(_base_unet(unet, *inputs), base_out)
    np.testing.assert_array_equal(_unet(unet, *inputs), adapted)  # outside the context: adapted again

    merge_lora(unet)
    assert not jax.tree.leaves(nnx.state(unet, LoRAParam))
    assert max_abs_diff(_unet(unet, *inputs), adapted) <= MODEL_TOL


def test_gradient_checkpointing_with_frozen_base_weights(tiny_sd_path):
    """Only the adapters differentiated, the base weights frozen beside them (LoRA, LCM-LoRA's convolutions too):
    the checkpointed UNet trains and gives the plain UNet's loss and adapter gradients."""
    inputs = tuple(jnp.asarray(t.numpy()) for t in _unet_inputs())
    results = {}
    for remat in (False, True):
        unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet", gradient_checkpointing=remat)
        add_lora(unet, LCM_SETTINGS, "unet")
        _randomize_adapters(unet, 3)
        graphdef, adapters, base = nnx.split(unet, LoRAParam, ...)

        def loss(adapters, base, graphdef=graphdef):
            return (nnx.merge(graphdef, adapters, base)(*inputs).sample ** 2).mean()

        fn = jax.jit(jax.value_and_grad(loss))
        assert ("remat" in str(jax.make_jaxpr(fn)(adapters, base))) == remat
        results[remat] = fn(adapters, base)
    (value, grads), (value_remat, grads_remat) = results[False], results[True]
    assert value == value_remat
    for g, g_remat in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat), strict=True):
        np.testing.assert_allclose(g_remat, g, rtol=1e-5, atol=1e-7)
