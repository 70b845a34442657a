"""Models by Hub id, offline: a pre-populated Hub cache serves pipelines, a separate VAE, variants and revisions to
both backends; only the files a task reads are asked for; what cannot be had is one message, exit code 2."""

import filecmp
import json
import os
import shutil
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import safetensors.numpy
from huggingface_hub import constants
from huggingface_hub.utils import filter_repo_objects

from jaxdiff import cli, train
from jaxdiff.config import ConfigError
from jaxdiff.data import DataConfigError
from jaxdiff.data.sources import SourceSpec, open_source
from jaxdiff.hub import HubOptions, ModelFilesNotFoundError, resolve_model, resolve_pipeline
from jaxdiff.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
from jaxdiff.publish import export_pipeline
from jaxdiff.weights import module_to_state_dict

MAIN_SHA = "a" * 40
OTHER_SHA = "b" * 40
MODELS = ("unet", "vae", "text_encoder")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _cache_repo(cache: Path, repo: str, source: Path, *, sha: str = MAIN_SHA, ref: str = "main") -> Path:
    """Lays `source` out as huggingface_hub caches `repo` at commit `sha`: models--org--name/snapshots/<sha>/...
    and refs/<ref> holding the sha. Returns the snapshot folder."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / sha
    shutil.copytree(source, snapshot)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / ref).write_text(sha)
    return snapshot


def _add_fp16_variant(folder: Path, weights_name: str, scale: float = 2.0) -> dict[str, np.ndarray]:
    """Writes ``folder``'s weights times ``scale`` in float16 under the fp16 variant name; returns them."""
    tensors = safetensors.numpy.load_file(folder / weights_name)
    half = {k: (v * scale).astype(np.float16) if v.dtype.kind == "f" else v for k, v in tensors.items()}
    stem, ext = weights_name.rsplit(".", 1)
    safetensors.numpy.save_file(half, folder / f"{stem}.fp16.{ext}", metadata={"format": "pt"})
    return half


def _assert_loaded(model, state_dict) -> None:
    ours = module_to_state_dict(model)
    assert ours.keys() == state_dict.keys()
    for key, value in state_dict.items():
        np.testing.assert_array_equal(ours[key], np.asarray(value, np.float32), err_msg=key)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache that huggingface_hub uses by default (``HF_HUB_CACHE`` is read at import)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_pipeline_by_id_loads_from_the_cache_in_jax(tiny_sd_path, hub_cache):
    from transformers import CLIPTokenizer

    assert constants.HF_HUB_OFFLINE
    snapshot = _cache_repo(hub_cache, "org/tiny-sd", tiny_sd_path)
    root = resolve_pipeline("org/tiny-sd", MODELS, HubOptions())
    assert root == snapshot
    unet = UNet2DConditionModel.from_pretrained(root, "unet")
    _assert_loaded(unet, safetensors.numpy.load_file(tiny_sd_path / "unet" / DIFFUSERS_WEIGHTS))
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    assert tokenizer("a cat").input_ids == CLIPTokenizer.from_pretrained(tiny_sd_path / "tokenizer")("a cat").input_ids
    # from_pretrained takes a Hub id too, through the same resolver.
    text_encoder = CLIPTextModel.from_pretrained("org/tiny-sd", "text_encoder")
    _assert_loaded(text_encoder, module_to_state_dict(CLIPTextModel.from_pretrained(tiny_sd_path, "text_encoder")))


def test_separate_vae_by_id(tiny_sd_path, tmp_path):
    cache = tmp_path / "hub"
    snapshot = _cache_repo(cache, "org/tiny-vae", tiny_sd_path / "vae")
    folder = resolve_model("org/tiny-vae", None, AutoencoderKL.weights_name, HubOptions(cache_dir=str(cache)))
    assert folder == snapshot
    vae = AutoencoderKL.from_pretrained(folder)
    _assert_loaded(vae, safetensors.numpy.load_file(tiny_sd_path / "vae" / DIFFUSERS_WEIGHTS))
    # A subfolder of a repo, and one it lacks.
    _cache_repo(cache, "org/tiny-sd", tiny_sd_path)
    options = HubOptions(cache_dir=str(cache))
    assert resolve_model("org/tiny-sd", "vae", DIFFUSERS_WEIGHTS, options) == cache / (
        f"models--org--tiny-sd/snapshots/{MAIN_SHA}/vae"
    )
    with pytest.raises(ModelFilesNotFoundError, match=r"'org/tiny-sd' has no vae_2/config\.json; HF_HUB_OFFLINE"):
        resolve_model("org/tiny-sd", "vae_2", DIFFUSERS_WEIGHTS, options)


def test_variant_picks_the_variant_files_and_must_exist_for_every_model(tiny_sd_path, tmp_path):
    source = Path(shutil.copytree(tiny_sd_path, tmp_path / "source"))
    half_unet = _add_fp16_variant(source / "unet", DIFFUSERS_WEIGHTS)
    _add_fp16_variant(source / "vae", DIFFUSERS_WEIGHTS)
    cache = tmp_path / "hub"
    _cache_repo(cache, "org/tiny-sd", source)
    options = HubOptions(cache_dir=str(cache), variant="fp16")
    with pytest.raises(
        ModelFilesNotFoundError,
        match=r"'org/tiny-sd': no weights in \S+/text_encoder \(looked for model\.fp16\.safetensors, "
        r"model\.safetensors\.index\.fp16\.json.*HF_HUB_OFFLINE is set",
    ):
        resolve_pipeline("org/tiny-sd", MODELS, options)
    root = resolve_pipeline("org/tiny-sd", ("unet", "vae"), options)  # these two have it
    _assert_loaded(UNet2DConditionModel.from_pretrained(root, "unet", variant="fp16"), half_unet)


def test_revision_other_than_main(tiny_sd_path, tmp_path):
    other = Path(shutil.copytree(tiny_sd_path, tmp_path / "other"))
    scheduler = other / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": "v_prediction"}))
    cache = tmp_path / "hub"
    _cache_repo(cache, "org/tiny-sd", tiny_sd_path)
    _cache_repo(cache, "org/tiny-sd", other, sha=OTHER_SHA, ref="v-pred")
    for revision, prediction in ((None, "epsilon"), ("main", "epsilon"), ("v-pred", "v"), (OTHER_SHA, "v")):
        root = resolve_pipeline("org/tiny-sd", MODELS, HubOptions(revision=revision, cache_dir=str(cache)))
        assert root.name == (MAIN_SHA if prediction == "epsilon" else OTHER_SHA), revision
        scheduler = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        assert scheduler["prediction_type"].startswith(prediction), revision
    with pytest.raises(ModelFilesNotFoundError, match=r"'org/tiny-sd' \(revision nope\) could not be fetched"):
        resolve_pipeline("org/tiny-sd", MODELS, HubOptions(revision="nope", cache_dir=str(cache)))


# ---- which files are asked for: a stand-in for snapshot_download that serves a full repository listing ------------

_REPO_FILES = {
    "model_index.json": json.dumps(
        {
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "PNDMScheduler"],
            "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
            "feature_extractor": ["transformers", "CLIPImageProcessor"],
            "image_encoder": [None, None],
        }
    ),
    "README.md": "",
    "v1-5-pruned.ckpt": "",
    "v1-5-pruned-emaonly.safetensors": "",
    "onnx/unet/model.onnx": "",
    "unet/config.json": "{}",
    "unet/diffusion_pytorch_model.safetensors": "",
    "unet/diffusion_pytorch_model.bin": "",
    "unet/diffusion_pytorch_model.fp16.safetensors": "",
    "unet/diffusion_pytorch_model.fp16.bin": "",
    "unet/diffusion_pytorch_model.non_ema.safetensors": "",
    "unet/diffusion_pytorch_model.msgpack": "",
    "unet/model.onnx": "",
    "vae/config.json": "{}",
    "vae/diffusion_pytorch_model-00001-of-00002.safetensors": "",
    "vae/diffusion_pytorch_model-00002-of-00002.safetensors": "",
    "vae/diffusion_pytorch_model.safetensors.index.json": json.dumps(
        {"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors"}}
        | {"b": "diffusion_pytorch_model-00002-of-00002.safetensors"}
    ),
    "vae/diffusion_pytorch_model.fp16-00001-of-00001.safetensors": "",
    "vae/diffusion_pytorch_model.safetensors.index.fp16.json": json.dumps(
        {"weight_map": {"a": "diffusion_pytorch_model.fp16-00001-of-00001.safetensors"}}
    ),
    "text_encoder/config.json": "{}",
    "text_encoder/pytorch_model.bin": "",
    "text_encoder/pytorch_model.fp16.bin": "",
    "text_encoder/model.fp16.safetensors": "",
    "text_encoder/flax_model.msgpack": "",
    "tokenizer/vocab.json": "{}",
    "tokenizer/merges.txt": "",
    "tokenizer/tokenizer_config.json": "{}",
    "scheduler/scheduler_config.json": "{}",
    "safety_checker/config.json": "{}",
    "safety_checker/model.safetensors": "",
    "feature_extractor/preprocessor_config.json": "{}",
}
_SMALL = {
    "model_index.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "scheduler/scheduler_config.json",
    "feature_extractor/preprocessor_config.json",
}
_CONFIGS = {"unet/config.json", "vae/config.json", "text_encoder/config.json"}
_VAE_SHARDS = {
    "vae/diffusion_pytorch_model-00001-of-00002.safetensors",
    "vae/diffusion_pytorch_model-00002-of-00002.safetensors",
    "vae/diffusion_pytorch_model.safetensors.index.json",
}


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """snapshot_download serving `_REPO_FILES` at commit MAIN_SHA: copies the files the patterns match into the
    snapshot folder as the real one does; returns the list of calls (kwargs) and the set of files fetched."""
    snapshot = tmp_path / "fake" / "snapshots" / MAIN_SHA
    snapshot.mkdir(parents=True)
    calls: list[dict] = []
    fetched: set[str] = set()

    def snapshot_download(repo_id, **kwargs):
        calls.append({"repo_id": repo_id, **kwargs})
        for name in filter_repo_objects(_REPO_FILES, allow_patterns=kwargs["allow_patterns"]):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / name).write_text(_REPO_FILES[name])
            fetched.add(name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls, fetched


def test_only_the_needed_files_are_asked_for(fake_hub):
    calls, fetched = fake_hub
    options = HubOptions(revision="main", cache_dir="/my/cache", token="hf_secret", allow_pickle=False)
    with pytest.raises(ModelFilesNotFoundError, match=r"no weights in \S+/text_encoder \(looked for model\.safet"):
        resolve_pipeline("org/sd", MODELS, options)  # its text encoder has only pickled weights
    assert fetched == _SMALL | _CONFIGS | _VAE_SHARDS | {"unet/diffusion_pytorch_model.safetensors"}
    assert [c["revision"] for c in calls] == ["main", MAIN_SHA]  # pinned to the commit after the first call
    assert {(c["repo_id"], c["cache_dir"], c["token"]) for c in calls} == {("org/sd", "/my/cache", "hf_secret")}


def test_pickled_weights_are_asked_for_only_with_allow_pickle_and_only_without_safetensors(fake_hub):
    calls, fetched = fake_hub
    resolve_pipeline("org/sd", MODELS, HubOptions(allow_pickle=True))
    expected = _SMALL | _CONFIGS | _VAE_SHARDS
    assert fetched == expected | {"unet/diffusion_pytorch_model.safetensors", "text_encoder/pytorch_model.bin"}
    assert all(".bin" not in p for c in calls[:2] for p in c["allow_patterns"])
    assert calls[2]["allow_patterns"] == [
        "text_encoder/pytorch_model.bin",
        "text_encoder/pytorch_model.bin.index.json",
        "text_encoder/pytorch_model-?????-of-?????.bin",
    ]


def test_variant_files_are_asked_for(fake_hub):
    _, fetched = fake_hub
    resolve_pipeline("org/sd", MODELS, HubOptions(variant="fp16"))
    assert fetched == _SMALL | _CONFIGS | {
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16-00001-of-00001.safetensors",
        "vae/diffusion_pytorch_model.safetensors.index.fp16.json",
    }


def test_components_outside_the_model_index_are_refused(fake_hub):
    with pytest.raises(ModelFilesNotFoundError, match=r"model_index\.json has no component text_encoder_2, image_enc"):
        resolve_pipeline("org/sd", ("unet", "text_encoder_2", "image_encoder"), HubOptions())


def test_export_fetches_only_the_copied_components(fake_hub, tiny_sd_path, tmp_path):
    _, fetched = fake_hub
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd_path, "text_encoder")
    out = export_pipeline(tmp_path / "out", base_model="org/sd", components={"text_encoder": text_encoder})
    copied = {
        "unet/diffusion_pytorch_model.safetensors",
        "safety_checker/config.json",
        "safety_checker/model.safetensors",
    }
    assert fetched == _SMALL | copied | _VAE_SHARDS | {"unet/config.json", "vae/config.json"}
    assert (out / "safety_checker" / "model.safetensors").is_file()
    assert (out / "text_encoder" / "model.safetensors").stat().st_size > 0  # written, not copied


def test_export_honours_the_revision(tiny_sd_path, tmp_path):
    other = Path(shutil.copytree(tiny_sd_path, tmp_path / "other"))
    _add_fp16_variant(other / "unet", DIFFUSERS_WEIGHTS)
    os.replace(other / "unet" / "diffusion_pytorch_model.fp16.safetensors", other / "unet" / DIFFUSERS_WEIGHTS)
    cache = tmp_path / "hub"
    _cache_repo(cache, "org/tiny-sd", tiny_sd_path)
    _cache_repo(cache, "org/tiny-sd", other, sha=OTHER_SHA, ref="v2")
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd_path, "text_encoder")
    options = HubOptions(revision="v2", cache_dir=str(cache))
    out = export_pipeline(
        tmp_path / "out", base_model="org/tiny-sd", components={"text_encoder": text_encoder}, options=options
    )
    assert filecmp.cmp(out / "unet" / DIFFUSERS_WEIGHTS, other / "unet" / DIFFUSERS_WEIGHTS, shallow=False)
    with pytest.raises(ConfigError, match=r"cannot get the base pipeline .*'org/tiny-sd' \(revision v3\) could not"):
        export_pipeline(
            tmp_path / "out2",
            base_model="org/tiny-sd",
            components={},
            options=HubOptions(revision="v3", cache_dir=str(cache)),
        )


# ---- the torch backend ------------------------------------------------------------------------------------------


def test_torch_backend_loads_pipeline_and_separate_vae_by_id(tiny_sd_path, shapes_dataset, hub_cache):
    import torch

    from torch_backend.tasks.text_to_image import TextToImage

    source = Path(shutil.copytree(tiny_sd_path, hub_cache.parent / "source"))
    half_unet = _add_fp16_variant(source / "unet", DIFFUSERS_WEIGHTS)
    half_text = _add_fp16_variant(source / "text_encoder", "model.safetensors")
    _cache_repo(hub_cache, "org/tiny-sd", source)
    _cache_repo(hub_cache, "org/tiny-vae", tiny_sd_path / "vae")  # no fp16 variant: loads its primary weights
    values = {
        "backend": "torch",
        "pretrained_model_name_or_path": "org/tiny-sd",
        "pretrained_vae_model_name_or_path": "org/tiny-vae",
        "variant": "fp16",
        "train_data_dir": str(shapes_dataset),
        "resolution": 32,
        "seed": 0,
    }
    config = cli.resolve(cli.validate(values))  # infers the task from the cached model_index.json
    assert config.task == "text_to_image"
    task = TextToImage(config, torch.device("cpu"))
    for model, expected in ((task.unet, half_unet), (task.text_encoder, half_text)):
        ours = {k: v.float().numpy() for k, v in model.state_dict().items()}
        for key, value in expected.items():
            np.testing.assert_array_equal(ours[key], value.astype(np.float32), err_msg=key)
    vae = safetensors.numpy.load_file(tiny_sd_path / "vae" / DIFFUSERS_WEIGHTS)
    np.testing.assert_array_equal(task.vae.state_dict()["decoder.conv_out.bias"].numpy(), vae["decoder.conv_out.bias"])
    assert task.vae_folder == hub_cache / f"models--org--tiny-vae/snapshots/{MAIN_SHA}"


def test_jax_backend_trains_and_exports_a_pipeline_and_separate_vae_by_id(
    tiny_sd_path, shapes_dataset, hub_cache, tmp_path
):
    from jaxdiff.train import main

    source = Path(shutil.copytree(tiny_sd_path, hub_cache.parent / "source"))
    half_text = _add_fp16_variant(source / "text_encoder", "model.safetensors")
    _add_fp16_variant(source / "unet", DIFFUSERS_WEIGHTS)
    _cache_repo(hub_cache, "org/tiny-sd", source)
    other_vae = Path(shutil.copytree(tiny_sd_path / "vae", hub_cache.parent / "other-vae"))
    vae_weights = {k: v * 0.5 for k, v in safetensors.numpy.load_file(other_vae / DIFFUSERS_WEIGHTS).items()}
    safetensors.numpy.save_file(vae_weights, other_vae / DIFFUSERS_WEIGHTS)
    _cache_repo(hub_cache, "org/tiny-vae", other_vae)
    out = tmp_path / "out"
    argv = [
        "--pretrained_model_name_or_path", "org/tiny-sd",
        "--pretrained_vae_model_name_or_path", "org/tiny-vae",
        "--variant", "fp16",
        "--train_data_dir", str(shapes_dataset),
        "--resolution", "32", "--train_batch_size", "1", "--max_train_steps", "1", "--seed", "0",
        "--report_to", "none", "--output_dir", str(out),
    ]  # fmt: skip
    main(argv)
    # The frozen text encoder was the fp16 variant's: the export holds it under the primary name, as diffusers'
    # save_pretrained does; the VAE is the separate one.
    exported = safetensors.numpy.load_file(out / "text_encoder" / "model.safetensors")
    assert not list((out / "text_encoder").glob("*fp16*"))
    for key, value in half_text.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    exported_vae = safetensors.numpy.load_file(out / "vae" / DIFFUSERS_WEIGHTS)
    for key, value in vae_weights.items():
        np.testing.assert_array_equal(exported_vae[key], value, err_msg=key)
    assert (out / "unet" / DIFFUSERS_WEIGHTS).is_file() and (out / "model_index.json").is_file()


# ---- what cannot be had ---------------------------------------------------------------------------------------


def test_model_missing_from_the_offline_cache_is_one_message(tmp_path):
    options = HubOptions(cache_dir=str(tmp_path))
    with pytest.raises(ModelFilesNotFoundError) as err:
        resolve_pipeline("org/missing", MODELS, options)
    assert str(err.value) == (
        f"'org/missing' could not be fetched from the Hugging Face Hub (model_index.json): HF_HUB_OFFLINE is set and "
        f"it is not in the Hub cache at {tmp_path}"
    )
    with pytest.raises(ModelFilesNotFoundError, match=r"'org/vae' could not be fetched .*\(the model\)"):
        resolve_model("org/vae", None, DIFFUSERS_WEIGHTS, options)
    with pytest.raises(ModelFilesNotFoundError, match=r"model folder 'no/such/folder' does not exist"):
        resolve_pipeline("no/such/folder", MODELS, options)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_missing_model_exits_with_code_2_and_one_line(tmp_path, capsys, backend):
    argv = ["--pretrained_model_name_or_path", "org/missing", "--dataset_name", "org/data"]
    argv += ["--cache_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--backend", backend]
    if backend == "torch":
        argv += ["--task", "text_to_image"]  # the error comes from the task's loading, not from inferring the task
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("jaxdiff: error:")]
    assert len(lines) == 1, err
    assert "'org/missing' could not be fetched from the Hugging Face Hub" in lines[0]
    assert "HF_HUB_OFFLINE is set" in lines[0]
    assert "Traceback" not in err


def test_dataset_missing_offline_is_one_message(tmp_path):
    spec = SourceSpec(dataset_name="jaxdiff-tests/no-such-dataset", cache_dir=str(tmp_path))
    with pytest.raises(DataConfigError) as err:
        open_source(spec)
    assert str(err.value) == (
        "dataset_name='jaxdiff-tests/no-such-dataset': cannot load this Hub dataset: HF_HUB_OFFLINE or "
        f"HF_DATASETS_OFFLINE is set and it is not in the datasets cache at {tmp_path}"
    )


def test_options_from_config():
    config = cli.validate(
        {"revision": "fp16", "cache_dir": "/c", "hub_token": "hf_x", "variant": "fp16", "allow_pickled_weights": True}
    )
    options = HubOptions.from_config(config)
    assert options == HubOptions(revision="fp16", cache_dir="/c", token="hf_x", variant="fp16", allow_pickle=True)
    assert options.for_other_repo() == HubOptions(cache_dir="/c", token="hf_x", allow_pickle=True)
