"""The tiny tokenizer and pipelines load offline in transformers/diffusers and behave like the real ones."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPTokenizer, CLIPTokenizerFast

from jaxdiff.demo import TINY_VOCAB_WORDS
from tests.fixtures.pipelines import IMAGE_SIZE, LCM_TIME_COND_PROJ_DIM, MODEL_MAX_LENGTH, build_tiny_sd

CAPTIONS = ["a photo of a red circle", "the small yellow star on a black background", "an large green triangle"]
# Uppercase, repeated spaces, punctuation, digits, accents and an emoji: exercises every byte-level fallback.
ODD_TEXT = "A  Photo,   of THE señor's 3 stars! 🙂"
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5"}


def _generate(pipeline, **kwargs) -> np.ndarray:
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipeline(CAPTIONS[0], num_inference_steps=2, generator=generator, output_type="np", **kwargs).images


def _check_image(images: np.ndarray) -> None:
    assert images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0
    assert images.std() > 1e-3, "random weights should not decode to a flat image"


def test_caption_words_are_single_tokens(tiny_tokenizer_path: Path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(tiny_tokenizer_path)
    ids = tokenizer(" ".join(TINY_VOCAB_WORDS), add_special_tokens=False).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == [word + "</w>" for word in TINY_VOCAB_WORDS]
    assert len(tokenizer) < 1000


def test_tokenizer_special_tokens_and_padding(tiny_tokenizer_path: Path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(tiny_tokenizer_path)
    eos = len(tokenizer) - 1
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (eos - 1, eos, eos)
    assert tokenizer.model_max_length == MODEL_MAX_LENGTH
    ids = tokenizer(CAPTIONS[0], padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True).input_ids
    assert ids[0] == eos - 1 and ids[7:] == [eos] * (MODEL_MAX_LENGTH - 7)  # BOS, 6 words, EOS + padding
    long_ids = tokenizer(ODD_TEXT * 3, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True).input_ids
    assert len(long_ids) == MODEL_MAX_LENGTH and long_ids[-1] == eos


def test_tokenizer_variants_agree_and_round_trip(tiny_tokenizer_path: Path) -> None:
    # transformers 5 aliases CLIPTokenizerFast to CLIPTokenizer; all three entry points must still load the folder.
    classes = (CLIPTokenizer, CLIPTokenizerFast, AutoTokenizer)
    tokenizers = [cls.from_pretrained(tiny_tokenizer_path) for cls in classes]
    for text in [*CAPTIONS, ODD_TEXT]:
        encodings = [tokenizer(text).input_ids for tokenizer in tokenizers]
        assert encodings[1:] == encodings[:1] * 2
        ids = encodings[0]
        # No unknown tokens: the only end-of-text token is the closing one.
        assert ids.count(tokenizers[0].eos_token_id) == 1
    for caption in CAPTIONS:
        assert tokenizers[0].decode(tokenizers[0](caption).input_ids, skip_special_tokens=True) == caption
    assert tokenizers[0].decode(tokenizers[0]("señor 🙂").input_ids, skip_special_tokens=True) == "señor 🙂"


@pytest.mark.parametrize("fixture", ["tiny_sd_path", "tiny_sd_v_path", "tiny_lcm_sd_path"])
def test_stable_diffusion_pipeline_runs(fixture: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    pipeline = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    unet, scheduler = pipeline.unet.config, pipeline.scheduler.config
    expected = {
        "tiny_sd_path": ("epsilon", False, None),
        "tiny_sd_v_path": ("v_prediction", True, None),
        "tiny_lcm_sd_path": ("epsilon", False, LCM_TIME_COND_PROJ_DIM),
    }[fixture]
    assert (scheduler.prediction_type, unet.use_linear_projection, unet.time_cond_proj_dim) == expected
    assert scheduler.beta_schedule == "scaled_linear" and pipeline.vae.config.scaling_factor == 0.18215
    assert pipeline.safety_checker is None and pipeline.text_encoder.config.hidden_act == "quick_gelu"
    _check_image(_generate(pipeline, guidance_scale=7.5))


def test_sdxl_pipeline_runs(tiny_sdxl_path: Path) -> None:
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path, local_files_only=True, add_watermarker=False)
    unet = pipeline.unet.config
    widths = pipeline.text_encoder.config.hidden_size, pipeline.text_encoder_2.config.hidden_size
    assert unet.cross_attention_dim == sum(widths) and widths[0] != widths[1]
    assert unet.addition_embed_type == "text_time" and unet.down_block_types[0] == "DownBlock2D"
    assert pipeline.tokenizer_2.pad_token == "!" and pipeline.tokenizer.pad_token == "<|endoftext|>"
    assert pipeline.vae.config.force_upcast and pipeline.vae.config.scaling_factor == 0.13025
    _check_image(_generate(pipeline, guidance_scale=5.0))


@pytest.mark.parametrize("fixture", ["tiny_sd_path", "tiny_sdxl_path"])
def test_folders_hold_only_safetensors_weights(fixture: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    index = json.loads((path / "model_index.json").read_text())
    components = {name for name, spec in index.items() if isinstance(spec, list) and spec[0] is not None}
    for component in components:
        assert (path / component).is_dir(), component
    weights = sorted(f.relative_to(path) for f in path.rglob("*") if f.suffix in WEIGHT_SUFFIXES)
    assert all(f.suffix == ".safetensors" for f in weights), weights
    assert {f.parts[0] for f in weights} == {c for c in components if not c.startswith(("tokenizer", "scheduler"))}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a pipeline folder, keyed by component/parameter."""
    return {f"{f.parent.name}/{k}": v for f in path.rglob("*.safetensors") for k, v in load_file(f).items()}


def test_constant_initialized_parameters_are_randomized(tiny_sd_path: Path) -> None:
    constant = [name for name, tensor in _weights(tiny_sd_path).items() if tensor.numel() > 1 and tensor.std() == 0]
    assert not constant


def test_builds_are_deterministic_in_the_seed(tmp_path: Path, tiny_sd_path: Path) -> None:
    reference = _weights(tiny_sd_path)
    torch.manual_seed(123)  # The global RNG state must not matter.
    same, other = _weights(build_tiny_sd(tmp_path / "same")), _weights(build_tiny_sd(tmp_path / "other", seed=1))
    assert same.keys() == reference.keys() == other.keys()
    assert all(torch.equal(reference[k], v) for k, v in same.items())
    assert not any(torch.equal(reference[k], v) for k, v in other.items() if v.numel() > 1)
