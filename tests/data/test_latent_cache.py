"""The latent/text-embedding cache: reuse, invalidation, refused random crop, flips that agree with time ids."""

import shutil

import ml_dtypes
import numpy as np
import pytest

from jaxdiff.data import latent_cache
from jaxdiff.data.errors import DataConfigError
from jaxdiff.data.latent_cache import LatentCache, build_latent_cache
from jaxdiff.data.pipeline import make_train_iterator
from jaxdiff.data.sources import SourceSpec
from jaxdiff.data.streams import LoaderSpec
from jaxdiff.data.transforms import TransformSpec
from jaxdiff.demo import NUM_SAMPLES

FLIP = TransformSpec(resolution=32, center_crop=True, random_flip=True)


class FakeEncoders:
    """Deterministic stand-ins for the VAE and text encoder that count their calls.

    The image "encoder" is a 4x4 average pool, which commutes with a horizontal flip."""

    def __init__(self):
        self.image_calls = self.text_calls = 0

    def encode_images(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.image_calls += 1
        b, c, h, w = pixels.shape
        mean = pixels.reshape(b, c, h // 4, 4, w // 4, 4).mean(axis=(3, 5))
        return mean, np.full_like(mean, -2.0)

    def encode_text(self, ids: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.text_calls += 1
        return {"prompt_embeds": ids["input_ids"][..., None].astype(np.float32) * np.ones(3, np.float32)}


def _build(source, tokenizer, encoders, cache_dir, transform=FLIP, model="vae-v1"):
    return build_latent_cache(
        source,
        transform,
        [tokenizer],
        encoders.encode_images,
        encoders.encode_text,
        model_fingerprint=model,
        latent_cache_dir=cache_dir,
        batch_size=4,
    )


def test_cache_is_reused_and_invalidated(tmp_path, imagefolder_jsonl, tiny_tokenizer):
    data = tmp_path / "data"
    shutil.copytree(imagefolder_jsonl, data)
    source = SourceSpec(train_data_dir=str(data))
    first = FakeEncoders()
    cache = _build(source, tiny_tokenizer, first, tmp_path / "cache")
    assert len(cache) == NUM_SAMPLES and first.image_calls == 2 * NUM_SAMPLES // 4  # both orientations
    again = FakeEncoders()
    assert _build(source, tiny_tokenizer, again, tmp_path / "cache").path == cache.path
    assert again.image_calls == again.text_calls == 0
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temp folder left

    other_model = _build(source, tiny_tokenizer, FakeEncoders(), tmp_path / "cache", model="vae-v2")
    assert other_model.path != cache.path
    lines = (data / "metadata.jsonl").read_text().replace("a red circle", "a blue circle")
    (data / "metadata.jsonl").write_text(lines)
    changed_data = FakeEncoders()
    assert _build(source, tiny_tokenizer, changed_data, tmp_path / "cache").path not in (cache.path, other_model.path)
    assert changed_data.image_calls > 0


def test_random_crop_and_streamed_sources_are_refused(tmp_path, imagefolder_jsonl, webdataset_shards, tiny_tokenizer):
    random_crop = TransformSpec(resolution=32, center_crop=False)
    with pytest.raises(DataConfigError, match="center_crop=False"):
        _build(
            SourceSpec(train_data_dir=str(imagefolder_jsonl)), tiny_tokenizer, FakeEncoders(), tmp_path, random_crop
        )
    with pytest.raises(DataConfigError, match="train_shards_path_or_url"):
        _build(SourceSpec(train_shards_path_or_url=webdataset_shards), tiny_tokenizer, FakeEncoders(), tmp_path)


def test_cached_batches_match_the_pixels_they_describe(tmp_path, imagefolder_jsonl, tiny_tokenizer):
    source = SourceSpec(train_data_dir=str(imagefolder_jsonl))
    encoders = FakeEncoders()
    cache = _build(source, tiny_tokenizer, encoders, tmp_path)
    # The pool sums in a different order on mirrored pixels: equal up to float32 rounding.
    np.testing.assert_allclose(cache.array("latent_mean_flipped"), cache.array("latent_mean")[..., ::-1], atol=1e-6)

    loader = LoaderSpec(global_batch_size=4, seed=1)
    cached = make_train_iterator(
        source, FLIP, loader, [tiny_tokenizer], latent_cache=cache, process_index=0, process_count=1
    )
    pixels = make_train_iterator(source, FLIP, loader, [tiny_tokenizer], process_index=0, process_count=1)
    for _ in range(3):
        c, p = next(cached), next(pixels)
        assert c["latent_mean"].shape == (4, 3, 8, 8) and c["latent_logvar"].shape == (4, 3, 8, 8)
        # Same order; each cached latent is the encoding of one of its image's two orientations, and the text
        # embedding is that of the sample's caption.
        mean = encoders.encode_images(p["pixel_values"])[0]
        for i in range(4):
            assert np.allclose(c["latent_mean"][i], mean[i], atol=1e-6) or np.allclose(
                c["latent_mean"][i], mean[i][..., ::-1], atol=1e-6
            )
        np.testing.assert_array_equal(c["prompt_embeds"][..., 0], p["input_ids"])
        np.testing.assert_array_equal(c["original_size"], p["original_size"])
        np.testing.assert_array_equal(c["crop_top_left"], p["crop_top_left"])
    with pytest.raises(DataConfigError, match="was built for"):
        make_train_iterator(
            source,
            TransformSpec(resolution=64, center_crop=True, random_flip=True),
            loader,
            [tiny_tokenizer],
            latent_cache=cache,
            process_index=0,
            process_count=1,
        )


class Bf16TextEncoders(FakeEncoders):
    """Text states in bfloat16, as a bf16 run's text encoder gives them."""

    def encode_text(self, ids: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        states = super().encode_text(ids)["prompt_embeds"] % 7 + 0.5  # x.5: exact in bfloat16, lost as integers
        return {"prompt_embeds": states.astype(ml_dtypes.bfloat16)}


def test_bfloat16_states_read_back_as_bfloat16(tmp_path, imagefolder_jsonl, tiny_tokenizer, monkeypatch):
    source = SourceSpec(train_data_dir=str(imagefolder_jsonl))
    cache = _build(source, tiny_tokenizer, Bf16TextEncoders(), tmp_path)
    assert cache.meta["raw_dtypes"] == {"prompt_embeds": "bfloat16", "empty_prompt_embeds": "bfloat16"}
    assert np.load(cache.path / "prompt_embeds.npy").dtype == np.uint16  # a dtype .npy describes
    reopened = LatentCache(cache.path)
    states = reopened.array("prompt_embeds")
    assert states.dtype == ml_dtypes.bfloat16
    assert (states.astype(np.float32) % 1 == 0.5).all()
    loader = LoaderSpec(global_batch_size=4)
    with make_train_iterator(
        source, FLIP, loader, [tiny_tokenizer], latent_cache=reopened, process_index=0, process_count=1
    ) as it:
        batch = next(it)
    assert batch["prompt_embeds"].dtype == ml_dtypes.bfloat16 and batch["latent_mean"].dtype == np.float32

    # A cache of the previous format (bfloat16 written as `|V2`) lives under another key: rebuilt, never read.
    monkeypatch.setattr(latent_cache, "CACHE_FORMAT", 1)
    old = _build(source, tiny_tokenizer, FakeEncoders(), tmp_path)
    monkeypatch.undo()
    assert old.path != cache.path and _build(source, tiny_tokenizer, FakeEncoders(), tmp_path).path == cache.path
