"""The torch SDXL task: diffusers' SDXL conditioning, end to end through the CLI, resume, and parity with JAX."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from jaxdiff import cli
from jaxdiff.data.transforms import tokenize
from jaxdiff.train import main
from jaxdiff.trainer import Trainer
from tests.test_trainer import VALIDATE, metrics, sample_steps, straight_and_resumed, train, unet_weights
from tests.torch_backend.test_parity import config
from tests.torch_backend.test_trainer import TORCH, _argv, _one_error_line
from torch_backend.tasks import TASKS
from torch_backend.trainer import Trainer as TorchTrainer

PROMPTS = ["a red circle on blue background", "a green square", ""]
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def test_conditioning_equals_the_diffusers_pipeline_and_script(tmp_path, tiny_sdxl_path, shapes_dataset):
    from diffusers import StableDiffusionXLPipeline

    values = {"backend": "torch", "pretrained_model_name_or_path": str(tiny_sdxl_path), "resolution": 32}
    values |= {"train_data_dir": str(shapes_dataset), "output_dir": str(tmp_path / "unused"), "report_to": "none"}
    task = TASKS["sdxl"](cli.resolve(cli.validate(values)), torch.device("cpu"))
    assert task.name == "sdxl" and [type(t).__name__ for t in task.tokenizers] == ["CLIPTokenizer"] * 2
    ids = {k: torch.from_numpy(v) for k, v in tokenize(task.tokenizers, PROMPTS).items()}
    with torch.no_grad():
        text = task.encode_prompt(task.frozen, ids)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
        )
    assert text["encoder_hidden_states"].shape == (3, 16, 32 + 64)  # both encoders' widths, concatenated
    np.testing.assert_allclose(text["encoder_hidden_states"].numpy(), embeds.numpy(), atol=1e-5)
    np.testing.assert_allclose(text["text_embeds"].numpy(), pooled.numpy(), atol=1e-5)

    # Time ids as the script's compute_time_ids (original size + crop top-left + target size), in float32.
    batch = {"original_size": torch.tensor([[40, 48], [512, 300]]), "crop_top_left": torch.tensor([[0, 3], [7, 0]])}
    time_ids = task.unet_conditioning(text, batch)["added_cond_kwargs"]["time_ids"]
    assert time_ids.dtype == torch.float32
    np.testing.assert_array_equal(time_ids.numpy(), [[40, 48, 0, 3, 32, 32], [512, 300, 7, 0, 32, 32]])


def test_end_to_end_resume_validation_and_export(tmp_path, tiny_sdxl_path, shapes_dataset):
    flags = (
        *TORCH, "--train_batch_size", "2", "--gradient_accumulation_steps", "2", "--use_ema", "--snr_gamma", "5.0",
        "--random_flip", "--checkpointing_steps", "2", *VALIDATE, "--validation_steps", "2",
        "--resolution", "24x32",
    )  # fmt: skip
    straight, resumed = straight_and_resumed(tmp_path, tiny_sdxl_path, shapes_dataset, *flags)
    rows = metrics(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in rows]  # 2N steps == N + resume N
    a, b = unet_weights(straight), unet_weights(resumed)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert sample_steps(straight) == [2, 4] and sample_steps(resumed) == [2, 4]
    assert Image.open(next((straight / "samples").glob("step-0000004_*.png"))).size == (32, 24)  # (w, h) of 24x32

    base = unet_weights(tiny_sdxl_path)
    assert any(not np.array_equal(a[k], base[k]) for k in base)
    raw = load_file(straight / "checkpoints" / "4" / "model.safetensors")
    assert any(not np.array_equal(raw[k], a[k]) for k in a)  # the export holds the EMA weights, not the raw ones

    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(straight)
    image = pipe("a red circle", num_inference_steps=2, height=24, width=32, output_type="np").images[0]
    assert image.shape == (24, 32, 3) and np.isfinite(image).all()


def test_latent_cache_trains_like_encoding_on_the_fly(tmp_path, tiny_sdxl_path, shapes_dataset):
    """Cached latents, both encoders' states, pooled embeds and the crops they were encoded with give the run that
    encodes every step, flips and caption dropout included."""
    flags = (*TORCH, "--max_train_steps", "3", "--train_batch_size", "4", "--random_flip")
    flags += ("--proportion_empty_prompts", "0.5")
    on_the_fly = train(tmp_path, "pixels", tiny_sdxl_path, shapes_dataset, *flags)
    cache_dir = tmp_path / "cache"
    cache = ("--cache_latents", "--latent_cache_dir", str(cache_dir))
    cached = train(tmp_path, "cached", tiny_sdxl_path, shapes_dataset, *flags, *cache)
    np.testing.assert_allclose(
        [r["loss"] for r in metrics(cached)], [r["loss"] for r in metrics(on_the_fly)], rtol=1e-5
    )
    (entry,) = cache_dir.iterdir()
    stored = {p.stem for p in entry.glob("*.npy")}
    assert {"encoder_hidden_states", "text_embeds", "empty_text_embeds", "crop_top_left_flipped"} <= stored


def text_encoder_weights(root, name):
    """A text encoder's weights, keys without ``text_model.`` (transformers 5 writes CLIPTextModel's without it,
    jaxdiff SD's layout with it; both load)."""
    return {k.removeprefix("text_model."): v for k, v in load_file(root / name / "model.safetensors").items()}


@pytest.mark.parametrize(
    "case, extra",
    [("plain", {}), ("snr_gamma", {"snr_gamma": 5.0}), ("train_text_encoder", {"train_text_encoder": True})],
)
def test_losses_match_across_backends(case, extra, tmp_path, tiny_sdxl_path, shapes_dataset):
    outs = {"jax": tmp_path / "jax", "torch": tmp_path / "torch"}
    Trainer(config(tiny_sdxl_path, shapes_dataset, outs["jax"], "jax", **extra)).train()
    TorchTrainer(config(tiny_sdxl_path, shapes_dataset, outs["torch"], "torch", **extra)).train()
    jax_rows, torch_rows = metrics(outs["jax"]), metrics(outs["torch"])
    assert len(torch_rows) == len(jax_rows) == 5
    np.testing.assert_allclose([r["loss"] for r in torch_rows], [r["loss"] for r in jax_rows], rtol=1e-4)
    if case == "train_text_encoder":
        for name in TEXT_ENCODERS:
            base = text_encoder_weights(tiny_sdxl_path, name)
            for backend, out in outs.items():
                trained = text_encoder_weights(out, name)
                assert trained.keys() == base.keys(), (backend, name)
                assert any(not np.array_equal(trained[k], base[k]) for k in base), (backend, name)


def test_training_the_text_encoders_refuses_a_text_cache(tmp_path, tiny_sdxl_path, shapes_dataset, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(_argv(tiny_sdxl_path, shapes_dataset, out, "--max_train_steps", "1", "--train_text_encoder",
                   "--cache_latents"))  # fmt: skip
    assert exc.value.code == 2
    assert "--cache_latents caches the text encoder's outputs" in _one_error_line(capsys.readouterr().err)
    assert not (out / "latent_cache").exists()
