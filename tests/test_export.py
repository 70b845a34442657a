"""The exported pipeline loads in diffusers with our weights; training files stay; the Hub is checked at start."""

import json
import shutil

import numpy as np
import pytest
from huggingface_hub import HfApi, constants

from jaxdiff import weights
from jaxdiff.config import ConfigError
from jaxdiff.models.clip import CLIPTextModel
from jaxdiff.publish import check_hub_access, export_pipeline, push_to_hub


@pytest.fixture(scope="module")
def text_encoder(tiny_sd_path):
    model = CLIPTextModel.from_pretrained(tiny_sd_path, "text_encoder")
    # Stand-in for training: change the weights so a copy-through of the base would be noticed.
    params = weights.module_to_state_dict(model)
    weights.load_state_dict(model, {k: v + 0.01 if v.dtype.kind == "f" else v for k, v in params.items()})
    return model


@pytest.fixture
def base(tiny_sd_path, tmp_path):
    """The tiny pipeline plus what a real repo or a used output_dir also holds, none of which is exported."""
    base = tmp_path / "base"
    shutil.copytree(tiny_sd_path, base)
    (base / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickled")
    (base / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"variant")
    (base / "vae" / "diffusion_flax_model.msgpack").write_bytes(b"flax")
    (base / "checkpoints" / "100").mkdir(parents=True)
    (base / "v1-5-pruned.ckpt").write_bytes(b"ckpt")
    return base


def test_export_loads_in_diffusers_with_our_weights(base, text_encoder, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    (out / "checkpoints" / "7").mkdir(parents=True)
    (out / "checkpoints" / "7" / "state").write_text("orbax")
    (out / "metrics.jsonl").write_text('{"step": 7}\n')
    (out / "text_encoder").mkdir()
    (out / "text_encoder" / "stale.safetensors").write_text("from an earlier export")

    export_pipeline(out, base_model=base, components={"text_encoder": text_encoder})

    pipe = StableDiffusionPipeline.from_pretrained(out)
    ours = {k.removeprefix("text_model."): v for k, v in weights.module_to_state_dict(text_encoder).items()}
    theirs = {k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()}
    assert set(ours) <= set(theirs) and len(ours) > 10
    for name, value in ours.items():
        np.testing.assert_array_equal(theirs[name].numpy(), value, err_msg=name)
    base_unet = StableDiffusionPipeline.from_pretrained(base).unet.state_dict()
    for name, value in pipe.unet.state_dict().items():
        assert torch.equal(value, base_unet[name]), name
    # Training files untouched; only primary pipeline files copied; no temporary folders left.
    assert (out / "checkpoints" / "7" / "state").read_text() == "orbax"
    assert (out / "metrics.jsonl").read_text() == '{"step": 7}\n'
    assert not (out / "text_encoder" / "stale.safetensors").exists()
    assert sorted(p.name for p in (out / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert not (out / "vae" / "diffusion_flax_model.msgpack").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["checkpoints", "metrics.jsonl", "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    )
    assert json.loads((out / "model_index.json").read_text()) == json.loads((base / "model_index.json").read_text())


def test_export_fp16(base, text_encoder, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = export_pipeline(tmp_path / "out", base_model=base, components={"text_encoder": text_encoder}, dtype="fp16")
    stored = weights.read_state_dict(out / "text_encoder", "model.safetensors")
    assert {v.dtype for v in stored.values() if v.dtype.kind == "f"} == {np.dtype(np.float16)}
    expected = weights.module_to_state_dict(text_encoder)
    for name, value in stored.items():
        np.testing.assert_array_equal(value, expected[name].astype(np.float16))
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.text_encoder.dtype.is_floating_point


def test_export_refuses_bad_dtype_and_missing_pipeline(base, text_encoder, tmp_path):
    with pytest.raises(ConfigError, match="export_dtype='int8' is not supported; allowed: fp32, fp16, bf16"):
        export_pipeline(tmp_path / "out", base_model=base, components={"text_encoder": text_encoder}, dtype="int8")
    (base / "model_index.json").unlink()
    with pytest.raises(ConfigError, match=r"has no model_index.json: not a pipeline"):
        export_pipeline(tmp_path / "out", base_model=base, components={"text_encoder": text_encoder})
    assert not (tmp_path / "out").exists()


def test_push_to_hub_offline_is_refused_at_start(monkeypatch):
    check_hub_access(False, None)  # nothing to check
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"push_to_hub=True .* needs network access to the Hugging Face Hub"):
        check_hub_access(True, "me/model")


def test_push_to_hub_unreachable_is_refused_at_start(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(self, *args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(HfApi, "whoami", unreachable)
    with pytest.raises(ConfigError, match=r"needs network access to the Hugging Face Hub.*Name or service not known"):
        check_hub_access(True, "me/model")


def test_push_to_hub_leaves_out_training_folders(monkeypatch, tmp_path):
    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("repo", repo_id))

    def upload_folder(self, **kwargs):
        calls["upload"] = kwargs
        return type("Commit", (), {"commit_url": "https://hf.co/me/model/commit/1"})()

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    url = push_to_hub(tmp_path, "me/model", ignore=("checkpoints", "tb"))
    assert url == "https://hf.co/me/model/commit/1" and calls["repo"] == "me/model"
    assert calls["upload"]["repo_id"] == "me/model" and calls["upload"]["folder_path"] == str(tmp_path)
    assert {"checkpoints/*", "tb/*"} <= set(calls["upload"]["ignore_patterns"])
