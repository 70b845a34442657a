"""The JAX SDXL task: diffusers' SDXL conditioning, end to end training, resume, the latent cache, text encoders."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from jaxdiff import cli
from jaxdiff.tasks import TASKS
from tests.test_trainer import VALIDATE, metrics, sample_steps, straight_and_resumed, train, unet_weights

PROMPTS = ["a red circle on blue background", "a green square", ""]


def sdxl_task(model, data, tmp_path, **extra):
    """The JAX SDXL task of a resolved config, its models holding the pretrained weights."""
    values = {
        "pretrained_model_name_or_path": str(model),
        "train_data_dir": str(data),
        "output_dir": str(tmp_path / "unused"),
        "resolution": 32,
        "report_to": "none",
        "seed": 0,
        **extra,
    }
    task = TASKS["sdxl"](cli.resolve(cli.validate(values)))
    models = {**task.trainable, **task.frozen}
    for name, module in models.items():
        task.pretrained[name].load_into(module)
    return task, models


def test_conditioning_equals_the_diffusers_pipeline_and_script(tmp_path, tiny_sdxl_path, shapes_dataset):
    from diffusers import StableDiffusionXLPipeline

    task, models = sdxl_task(tiny_sdxl_path, shapes_dataset, tmp_path)
    assert task.name == "sdxl" and [type(t).__name__ for t in task.tokenizers] == ["CLIPTokenizer"] * 2
    ids = task.tokenize(PROMPTS)
    text = task.encode_prompt(models, ids)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
        )
    assert text["encoder_hidden_states"].shape == (3, 16, 32 + 64)  # 77 in SDXL; both widths concatenated
    np.testing.assert_allclose(np.asarray(text["encoder_hidden_states"]), embeds.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(text["text_embeds"]), pooled.numpy(), atol=1e-5)

    # Validation's unconditional half is what the pipeline uses without a negative prompt (zeros for SDXL base).
    uncond = task.unconditional_text(models, text)
    assert task.force_zeros_for_empty_prompt and not negative.any() and not negative_pooled.any()
    np.testing.assert_array_equal(np.asarray(uncond["encoder_hidden_states"]), negative.numpy())
    np.testing.assert_array_equal(np.asarray(uncond["text_embeds"]), negative_pooled.numpy())
    guided = {k: np.concatenate([uncond[k], text[k]]) for k in text}

    # Time ids as the script's compute_time_ids: original size + crop top-left + (resolution, resolution).
    batch = {"original_size": np.array([[40, 48], [512, 300]]), "crop_top_left": np.array([[0, 3], [7, 0]])}
    time_ids = task.unet_conditioning(text, batch)["added_cond_kwargs"]["time_ids"]
    np.testing.assert_array_equal(np.asarray(time_ids), [[40, 48, 0, 3, 32, 32], [512, 300, 7, 0, 32, 32]])
    sampling = task.unet_conditioning(guided, task.sampling_batch(6))["added_cond_kwargs"]["time_ids"]
    np.testing.assert_array_equal(np.asarray(sampling), [[32, 32, 0, 0, 32, 32]] * 6)


@pytest.mark.parametrize(("resolution", "crop", "target"), [("32", [0, 3], [32, 32]), ("24x32", [1, 0], [24, 32])])
def test_training_batches_carry_the_pixels_sizes(resolution, crop, target, tmp_path, tiny_sdxl_path, shapes_dataset):
    """The data's original sizes and crops of 48x40 (w x h) images, centre crop: at 32 px resized to 38x32 and
    cut at left 3; at 24x32 (h x w) resized to 32x26 and cut at top 1. The time ids end with the target size."""
    from jaxdiff.data import make_train_iterator, specs_from_config

    task, models = sdxl_task(tiny_sdxl_path, shapes_dataset, tmp_path, center_crop=True, resolution=resolution)
    source, transform, loader = specs_from_config(task.config, 4)
    with make_train_iterator(source, transform, loader, task.tokenizers, process_index=0, process_count=1) as data:
        batch = next(data)
    assert batch["original_size"].tolist() == [[40, 48]] * 4 and batch["crop_top_left"].tolist() == [crop] * 4
    assert batch["pixel_values"].shape == (4, 3, *target)
    assert set(task.abstract_batch(4)) == set(batch)
    assert all(task.abstract_batch(4)[k].shape == v.shape for k, v in batch.items())
    text = task.encode_prompt(models, {k: batch[k] for k in ("input_ids", "input_ids_2")})
    time_ids = task.unet_conditioning(text, batch)["added_cond_kwargs"]["time_ids"]
    np.testing.assert_array_equal(np.asarray(time_ids), [[40, 48, *crop, *target]] * 4)


def test_end_to_end_export_loads_in_the_sdxl_pipeline(tmp_path, tiny_sdxl_path, shapes_dataset):
    out = train(
        tmp_path, "run", tiny_sdxl_path, shapes_dataset,
        "--max_train_steps", "4", "--use_ema", "--snr_gamma", "5.0", "--gradient_accumulation_steps", "2",
        "--checkpointing_steps", "2", "--random_flip", *VALIDATE, "--validation_steps", "2", "--mesh", "2x4",
        "--resolution", "24x32",
    )  # fmt: skip
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    assert sample_steps(out) == [2, 4]
    assert Image.open(next((out / "samples").glob("step-0000004_*.png"))).size == (32, 24)  # (w, h) of 24x32
    trained, base = unet_weights(out), unet_weights(tiny_sdxl_path)
    assert any(not np.array_equal(trained[k], base[k]) for k in base)

    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    image = pipe("a red circle", num_inference_steps=2, height=24, width=32, output_type="np").images[0]
    assert image.shape == (24, 32, 3) and np.isfinite(image).all()


def test_resume_is_exact(tmp_path, tiny_sdxl_path, shapes_dataset):
    flags = ("--use_ema", "--snr_gamma", "5.0", "--random_flip", "--checkpointing_steps", "2")
    straight, resumed = straight_and_resumed(tmp_path, tiny_sdxl_path, shapes_dataset, *flags)
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in metrics(straight)]
    a, b = unet_weights(straight), unet_weights(resumed)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_latent_cache_trains_like_encoding_on_the_fly(tmp_path, tiny_sdxl_path, shapes_dataset):
    """Cached latents, both encoders' states, pooled embeds and the crops they were encoded with give the run
    that encodes every step, flips and caption dropout included (drawn per step, not frozen in the cache)."""
    flags = ("--max_train_steps", "3", "--adam_epsilon", "1e-3", "--random_flip", "--proportion_empty_prompts", "0.5")
    on_the_fly = train(tmp_path, "pixels", tiny_sdxl_path, shapes_dataset, *flags)
    cache_dir = tmp_path / "cache"
    cached = train(
        tmp_path, "cached", tiny_sdxl_path, shapes_dataset, *flags, "--cache_latents",
        "--latent_cache_dir", str(cache_dir),
    )  # fmt: skip
    np.testing.assert_allclose(
        [r["loss"] for r in metrics(cached)], [r["loss"] for r in metrics(on_the_fly)], rtol=1e-5
    )
    a, b = unet_weights(cached), unet_weights(on_the_fly)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)
    (entry,) = cache_dir.iterdir()
    stored = {p.stem for p in entry.glob("*.npy")}
    assert {"encoder_hidden_states", "text_embeds", "empty_text_embeds", "crop_top_left_flipped"} <= stored


def test_both_text_encoders_train_and_export(tmp_path, tiny_sdxl_path, shapes_dataset):
    out = train(tmp_path, "run", tiny_sdxl_path, shapes_dataset, "--max_train_steps", "2", "--train_text_encoder")
    for name in ("text_encoder", "text_encoder_2"):
        # transformers 5 saves CLIPTextModel without `text_model.`; jaxdiff writes it with (both load).
        trained = {k.removeprefix("text_model."): v for k, v in load_file(out / name / "model.safetensors").items()}
        base = {
            k.removeprefix("text_model."): v for k, v in load_file(tiny_sdxl_path / name / "model.safetensors").items()
        }
        assert trained.keys() == base.keys()
        assert any(not np.array_equal(trained[k], base[k]) for k in base), name

    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"


@pytest.mark.parametrize("flag", ["--cache_latents"])
def test_training_the_text_encoders_refuses_a_text_cache(tmp_path, tiny_sdxl_path, shapes_dataset, capsys, flag):
    with pytest.raises(AssertionError, match="exited with 2"):
        train(tmp_path, "run", tiny_sdxl_path, shapes_dataset, "--max_train_steps", "1", "--train_text_encoder", flag)
    assert "--train_text_encoder" in capsys.readouterr().err
