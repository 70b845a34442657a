"""CLIP text encoders against transformers' torch classes, every parameter randomized, float32."""

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxdiff.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from jaxdiff.weights import load_state_dict, module_to_state_dict

TINY = {
    "vocab_size": 99,
    "hidden_size": 32,
    "intermediate_size": 37,
    "projection_dim": 12,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 16,
    "pad_token_id": 1,
    "bos_token_id": 0,
}


def _torch_model(**overrides) -> transformers.CLIPTextModelWithProjection:
    config = transformers.CLIPTextConfig(**TINY, **overrides)
    torch.manual_seed(0)
    model = transformers.CLIPTextModelWithProjection(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 and p.shape[0] == TINY["hidden_size"] else 0.0))
    return model


def _input_ids(eos_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Two sequences of 10 tokens: bos, text, eos, then padding with eos (as SD 2.x tokenizers pad)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 90, size=(2, 10))
    ids[:, 0] = 0
    lengths = [4, 8]
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, length - 1 :] = 98 if eos_token_id == 2 else eos_token_id
        mask[row, :length] = 1
    if eos_token_id == 2:  # legacy pooling takes the highest id: keep the first end-of-text token the only 98
        ids[0, 4:] = 1
        ids[1, 8:] = 1
    else:  # a token id above eos_token_id, so pooling at the highest id would pick the wrong position
        ids[:, 1] = 98
    return ids, mask


@pytest.mark.parametrize(("eos_token_id", "hidden_act"), [(2, "quick_gelu"), (97, "gelu")])
@pytest.mark.parametrize("use_mask", [False, True])
def test_matches_transformers(eos_token_id: int, hidden_act: str, use_mask: bool):
    torch_model = _torch_model(eos_token_id=eos_token_id, hidden_act=hidden_act)
    config = CLIPTextConfig(**TINY, eos_token_id=eos_token_id, hidden_act=hidden_act)
    ours = CLIPTextModelWithProjection(config, rngs=nnx.Rngs(0))
    load_state_dict(ours, {k: v.numpy() for k, v in torch_model.state_dict().items()})
    # transformers 5's CLIPTextModel has no `text_model.` prefix in its state dict: the rename rule handles it.
    ours_plain = CLIPTextModel(config, rngs=nnx.Rngs(1))
    load_state_dict(ours_plain, {k: v.numpy() for k, v in torch_model.text_model.state_dict().items()})

    ids, mask = _input_ids(eos_token_id)
    attention_mask = mask if use_mask else None
    with torch.no_grad():
        t_mask = None if attention_mask is None else torch.from_numpy(attention_mask)
        expected = torch_model(torch.from_numpy(ids), attention_mask=t_mask, output_hidden_states=True)
        expected_plain = torch_model.text_model(
            torch.from_numpy(ids), attention_mask=t_mask, output_hidden_states=True
        )

    got = ours(ids, attention_mask, output_hidden_states=True)
    got_plain = ours_plain(ids, attention_mask, output_hidden_states=True)
    tol = {"atol": 1e-4, "rtol": 0}
    np.testing.assert_allclose(got.text_embeds, expected.text_embeds.numpy(), **tol)
    np.testing.assert_allclose(got.last_hidden_state, expected.last_hidden_state.numpy(), **tol)
    assert len(got.hidden_states) == len(expected.hidden_states) == TINY["num_hidden_layers"] + 1
    for ours_h, theirs_h in zip(got.hidden_states, expected.hidden_states, strict=True):
        np.testing.assert_allclose(ours_h, theirs_h.numpy(), **tol)
    np.testing.assert_allclose(got_plain.pooler_output, expected_plain.pooler_output.numpy(), **tol)
    np.testing.assert_allclose(got_plain.hidden_states[-2], expected_plain.hidden_states[-2].numpy(), **tol)
    np.testing.assert_allclose(got_plain.last_hidden_state, got.last_hidden_state, **tol)


def test_state_dict_round_trip_is_exact_and_old_buffers_are_ignored():
    torch_model = _torch_model()
    state_dict = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    ours = CLIPTextModelWithProjection(CLIPTextConfig(**TINY), rngs=nnx.Rngs(0))
    old_checkpoint = state_dict | {"text_model.embeddings.position_ids": np.arange(16)[None]}
    load_state_dict(ours, old_checkpoint)
    back = module_to_state_dict(ours)
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_unsupported_config_values_are_refused():
    with pytest.raises(ValueError, match=r"hidden_act='relu'"):
        CLIPTextModel(CLIPTextConfig(**TINY, hidden_act="relu"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"attention_dropout=0.1"):
        CLIPTextModel(CLIPTextConfig(**TINY, attention_dropout=0.1), rngs=nnx.Rngs(0))
