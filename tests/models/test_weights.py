"""Torch state dicts <-> NNX modules, and model folders in and out."""

import dataclasses
import itertools
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxdiff.models import nn
from jaxdiff.models.clip import CLIPTextModel, CLIPTextModelWithProjection
from jaxdiff.models.modeling import ModelConfig, PretrainedModel
from jaxdiff.weights import ModelFilesNotFoundError, WeightsMismatchError, load_state_dict, module_to_state_dict


class TorchTree(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, 8)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 6), torch.nn.LayerNorm(6)])
        self.embedding = torch.nn.Embedding(5, 8)
        self.proj = torch.nn.Linear(6, 4, bias=False)
        self.register_buffer("position_ids", torch.arange(4))


class Tree(nnx.Module):
    _ignored_torch_keys = (r"position_ids",)

    def __init__(self, rngs: nnx.Rngs):
        self.conv_in = nn.conv(3, 8, 3, padding=1, rngs=rngs)
        self.norm = nn.group_norm(8, 2, rngs=rngs)
        self.blocks = nnx.List([nn.linear(8, 6, rngs=rngs), nn.layer_norm(6, rngs=rngs)])
        self.embedding = nn.embed(5, 8, rngs=rngs)
        self.proj = nn.linear(6, 4, use_bias=False, rngs=rngs)

    def __call__(self, x, ids):
        h = self.norm(self.conv_in(x)).mean((1, 2)) + self.embedding(ids)
        return self.proj(self.blocks[1](self.blocks[0](h)))


def _randomized(module: torch.nn.Module) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return {k: v.numpy() for k, v in module.state_dict().items()}


def test_round_trip_is_bit_exact_and_layouts_compute_like_torch():
    torch_tree = TorchTree()
    state_dict = _randomized(torch_tree)
    tree = Tree(nnx.Rngs(0))
    load_state_dict(tree, state_dict)

    back = module_to_state_dict(tree)
    assert back.keys() == state_dict.keys() - {"position_ids"}
    for key, value in back.items():
        assert value.dtype == state_dict[key].dtype
        np.testing.assert_array_equal(value, state_dict[key], err_msg=key)

    x = np.random.default_rng(0).normal(size=(2, 3, 5, 5)).astype(np.float32)
    ids = np.array([1, 4])
    with torch.no_grad():
        t = torch_tree
        h = t.norm(t.conv_in(torch.from_numpy(x))).mean((2, 3)) + t.embedding(torch.from_numpy(ids))
        expected = t.proj(t.blocks[1](t.blocks[0](h))).numpy()
    np.testing.assert_allclose(tree(x.transpose(0, 2, 3, 1), ids), expected, atol=1e-5, rtol=0)


def test_load_keeps_param_dtype_and_fills_abstract_modules():
    state_dict = _randomized(TorchTree())
    tree = nnx.eval_shape(lambda: Tree(nnx.Rngs(0)))
    load_state_dict(tree, state_dict)
    np.testing.assert_array_equal(module_to_state_dict(tree)["blocks.0.weight"], state_dict["blocks.0.weight"])

    half = {k: v.astype(np.float16) for k, v in state_dict.items()}
    tree = Tree(nnx.Rngs(0))
    load_state_dict(tree, half)
    assert tree.conv_in.kernel.get_value().dtype == np.float32
    np.testing.assert_array_equal(module_to_state_dict(tree)["norm.weight"], half["norm.weight"].astype(np.float32))


def test_mismatches_are_all_reported_at_once():
    state_dict = _randomized(TorchTree())
    del state_dict["norm.bias"]
    state_dict["blocks.2.weight"] = np.zeros(3, np.float32)
    state_dict["proj.weight"] = np.zeros((4, 7), np.float32)
    with pytest.raises(WeightsMismatchError) as err:
        load_state_dict(nnx.eval_shape(lambda: Tree(nnx.Rngs(0))), state_dict)
    message = str(err.value)
    assert "missing keys (1):\n    norm.bias" in message
    assert "unexpected keys (1):\n    blocks.2.weight" in message
    assert "proj.weight: checkpoint (4, 7), model (4, 6)" in message


class Attention(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.to_q = nn.linear(4, 4, rngs=rngs)
        self.to_out = nnx.List([nn.linear(4, 4, rngs=rngs)])


def test_deprecated_vae_attention_names_are_renamed():
    rng = np.random.default_rng(0)
    old = {
        "query.weight": rng.normal(size=(4, 4, 1, 1)).astype(np.float32),
        "query.bias": rng.normal(size=4).astype(np.float32),
        "proj_attn.weight": rng.normal(size=(4, 4)).astype(np.float32),
        "proj_attn.bias": rng.normal(size=4).astype(np.float32),
    }
    attention = Attention(nnx.Rngs(0))
    load_state_dict(attention, old)
    new = module_to_state_dict(attention)
    np.testing.assert_array_equal(new["to_q.weight"], old["query.weight"][:, :, 0, 0])
    np.testing.assert_array_equal(new["to_out.0.bias"], old["proj_attn.bias"])


# --- model folders ----------------------------------------------------------------------------------------------


TINY_CLIP = transformers.CLIPTextConfig(
    vocab_size=99,
    hidden_size=16,
    intermediate_size=24,
    projection_dim=8,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=8,
    bos_token_id=0,
    eos_token_id=2,
)


@pytest.fixture(scope="module")
def torch_clip() -> transformers.CLIPTextModelWithProjection:
    model = transformers.CLIPTextModelWithProjection(TINY_CLIP)
    _randomized(model)
    return model


def _assert_same_tensors(ours: dict[str, np.ndarray], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value.numpy(), err_msg=key)


@pytest.mark.parametrize("max_shard_size", [None, "4KB"])
def test_from_pretrained_reads_transformers_folders(tmp_path, torch_clip, max_shard_size):
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    torch_clip.save_pretrained(tmp_path / "proj", **kwargs)
    assert os.path.isfile(tmp_path / "proj" / "model.safetensors.index.json") == (max_shard_size is not None)
    model = CLIPTextModelWithProjection.from_pretrained(tmp_path / "proj")
    _assert_same_tensors(module_to_state_dict(model), torch_clip.state_dict())

    torch_clip.text_model.save_pretrained(tmp_path / "plain", **kwargs)  # transformers 5: keys without text_model.
    model = CLIPTextModel.from_pretrained(tmp_path, subfolder="plain")
    expected = {f"text_model.{k}": v for k, v in torch_clip.text_model.state_dict().items()}
    _assert_same_tensors(module_to_state_dict(model), expected)


def test_from_pretrained_reads_the_fp16_variant(tmp_path, torch_clip):
    half = transformers.CLIPTextModelWithProjection(TINY_CLIP).half()
    half.load_state_dict(torch_clip.state_dict())
    half.save_pretrained(tmp_path, variant="fp16")
    assert os.path.isfile(tmp_path / "model.fp16.safetensors")
    with pytest.raises(ModelFilesNotFoundError, match=r"looked for model\.safetensors, model\.safetensors\.index"):
        CLIPTextModelWithProjection.from_pretrained(tmp_path)
    model = CLIPTextModelWithProjection.from_pretrained(tmp_path, variant="fp16")
    assert model.text_projection.kernel.get_value().dtype == np.float32
    _assert_same_tensors(module_to_state_dict(model), {k: v.float() for k, v in half.state_dict().items()})


@pytest.mark.parametrize("max_shard_size", ["10GB", "4KB"])
def test_save_pretrained_is_read_by_transformers(tmp_path, torch_clip, max_shard_size):
    model = CLIPTextModelWithProjection.from_config(TINY_CLIP.to_diff_dict())
    load_state_dict(model, {k: v.numpy() for k, v in torch_clip.state_dict().items()})
    model.save_pretrained(tmp_path, max_shard_size=max_shard_size)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["CLIPTextModelWithProjection"]
    assert (config["model_type"], config["dtype"]) == ("clip_text_model", "float32")
    loaded = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path)
    assert loaded.config.eos_token_id == 2 and loaded.config.projection_dim == 8
    _assert_same_tensors({k: v.numpy() for k, v in loaded.state_dict().items()}, torch_clip.state_dict())
    plain = transformers.CLIPTextModel.from_pretrained(tmp_path)  # our text_model.* keys, old layout
    _assert_same_tensors(
        {f"text_model.{k}": v.numpy() for k, v in plain.state_dict().items()},
        {k: v for k, v in torch_clip.state_dict().items() if k.startswith("text_model.")},
    )

    model.save_pretrained(tmp_path, dtype=np.float16, variant="fp16")
    half = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path, variant="fp16", dtype=torch.float16)
    _assert_same_tensors(
        {k: v.numpy() for k, v in half.state_dict().items()}, {k: v.half() for k, v in torch_clip.state_dict().items()}
    )


def test_pickled_weights_need_an_explicit_opt_in(tmp_path, torch_clip):
    TINY_CLIP.save_pretrained(tmp_path)
    torch.save(torch_clip.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelFilesNotFoundError, match=r"pickled pytorch_model\.bin.*allow_pickle=True"):
        CLIPTextModelWithProjection.from_pretrained(tmp_path)
    model = CLIPTextModelWithProjection.from_pretrained(tmp_path, allow_pickle=True)
    _assert_same_tensors(module_to_state_dict(model), torch_clip.state_dict())


def test_missing_files_are_one_clear_error(tmp_path):
    with pytest.raises(ModelFilesNotFoundError, match="does not exist"):
        CLIPTextModel.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "text_encoder").mkdir()
    with pytest.raises(ModelFilesNotFoundError, match=r"no subfolder 'unet' \(subfolders there: \['text_encoder'\]\)"):
        CLIPTextModel.from_pretrained(tmp_path, subfolder="unet")
    with pytest.raises(ModelFilesNotFoundError, match=r"no config\.json in .*text_encoder"):
        CLIPTextModel.from_pretrained(tmp_path, subfolder="text_encoder")
    TINY_CLIP.save_pretrained(tmp_path / "text_encoder")
    with pytest.raises(ModelFilesNotFoundError, match=r"no weights in .*text_encoder \(looked for model\.safetensors"):
        CLIPTextModel.from_pretrained(tmp_path, subfolder="text_encoder")
    with pytest.raises(ModelFilesNotFoundError, match="could not be fetched from the Hugging Face Hub"):
        CLIPTextModel.from_pretrained("nobody/no-such-model")


@dataclasses.dataclass(frozen=True)
class ToyConfig(ModelConfig):
    block_out_channels: tuple[int, ...] = (4, 8)
    dropout: float = 0.1


class ToyModel(PretrainedModel):
    config_class = ToyConfig
    torch_class_name = "ToyModel"

    def __init__(self, config: ToyConfig, *, dtype=None, param_dtype=np.float32, rngs: nnx.Rngs):
        self.config = config
        channels = config.block_out_channels
        self.blocks = nnx.List(
            [nn.linear(a, b, param_dtype=param_dtype, rngs=rngs) for a, b in itertools.pairwise(channels)]
        )
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)  # RNG state: not in checkpoints


def test_diffusers_format_round_trip(tmp_path):
    with pytest.warns(UserWarning, match="ignoring unknown config keys mystery_key"):
        config = ToyConfig.from_dict({"_class_name": "ToyModel", "block_out_channels": [4, 6], "mystery_key": 1})
    assert config.block_out_channels == (4, 6)
    model = ToyModel.from_config(config, rngs=nnx.Rngs(3))
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["_class_name"] == "ToyModel" and "_diffusers_version" in written
    assert written["block_out_channels"] == [4, 6]

    loaded = ToyModel.from_pretrained(tmp_path, param_dtype=np.float16)
    assert loaded.config == config
    assert loaded.blocks[0].kernel.get_value().dtype == np.float16
    assert isinstance(loaded.dropout.rngs.key.get_value(), jax.Array)
    expected = {k: v.astype(np.float16) for k, v in module_to_state_dict(model).items()}
    for key, value in module_to_state_dict(loaded).items():
        np.testing.assert_array_equal(value, expected[key])

    model.save_pretrained(tmp_path, max_shard_size=40)  # re-saving sharded removes the stale single file
    assert sorted(os.listdir(tmp_path)) == [
        "config.json",
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors",
        "diffusion_pytorch_model.safetensors.index.json",
    ]
