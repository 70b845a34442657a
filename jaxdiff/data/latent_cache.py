"""Precomputed VAE latent distributions and text embeddings on disk, memory-mapped for training.

The cache stores the latent distribution's parameters (mean, logvar), not a sample, so the trainer still draws
fresh latents every step. It is keyed by fingerprints of the model (passed in), the data (source + sample count)
and the transform and tokenizers, so a changed model, dataset or resolution never reuses a stale cache; it is
written to a temporary folder and renamed into place, so a crash never leaves a half-written cache behind.
Arrays in a dtype `.npy` cannot describe (bfloat16 text states of a bf16 run, which NumPy would read back as `|V2`)
are stored as their raw bits in an unsigned integer of the same width, their dtype recorded in `meta.json`.

Augmentation: random crop cannot be cached (one frozen crop would replace a fresh one per epoch), so it is
refused; with random flip both orientations are cached, with their own SDXL `crop_top_left`, so latents and time
ids always describe the same pixels (unlike diffusers' SDXL script, which re-draws crops for cached latents).
"""

import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jaxdiff.data.errors import DataConfigError, NoUsableDataError
from jaxdiff.data.fingerprint import hash_json
from jaxdiff.data.pipeline import iterate_in_order
from jaxdiff.data.sources import SourceSpec, open_source
from jaxdiff.data.transforms import (
    EMPTY_CAPTION,
    UNREADABLE_IMAGE,
    TransformSpec,
    choose_caption,
    decode_image,
    tokenize,
    transform_image,
    usable_captions,
)

#: Version of the folder layout, part of the cache key: a cache of another version is rebuilt, never misread.
#: 2: raw bits + recorded dtype for arrays `.npy` cannot describe (1 wrote bfloat16 that read back as `|V2`).
CACHE_FORMAT = 2
#: `encode_images(pixel_values (B, 3, H, W)) -> (mean, logvar)`, each (B, C, h, w).
EncodeImages = Callable[[np.ndarray], tuple[Any, Any]]
#: `encode_text({"input_ids": (B, L)[, "input_ids_2": (B, L)]}) -> {name: (B, ...)}`.
EncodeText = Callable[[dict[str, np.ndarray]], dict[str, Any]]


def _transform_key(transform: TransformSpec) -> dict[str, Any]:
    """The transform fields that change cached content (proportion_empty_prompts applies at load time)."""
    return {
        "resolution": transform.resolution,
        "center_crop": transform.center_crop,
        "random_flip": transform.random_flip,
        "image_interpolation_mode": transform.image_interpolation_mode,
    }


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of what decides a tokenizer's ids: its class, max length and vocabulary."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hash_json([type(tokenizer).__name__, tokenizer.model_max_length, vocab])


def _npy_describes(dtype: np.dtype) -> bool:
    """Whether an `.npy` file of this dtype reads back as the same dtype."""
    return np.lib.format.descr_to_dtype(np.lib.format.dtype_to_descr(dtype)) == dtype


class _RowWriter:
    """Appends rows of one array to a raw file; `finish` turns them into an .npy (row count unknown up front)."""

    def __init__(self, path: Path):
        self._path, self._rows, self._spec = path, 0, None

    @property
    def dtype(self) -> np.dtype:
        """The rows' dtype."""
        return self._spec[0]

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows)
        self._spec = self._spec or (rows.dtype, rows.shape[1:])
        with open(self._path.with_suffix(".raw"), "ab") as raw:
            raw.write(rows.tobytes())
        self._rows += len(rows)

    def finish(self) -> None:
        raw_path = self._path.with_suffix(".raw")
        dtype, shape = self._spec
        if not _npy_describes(dtype):
            dtype = np.dtype(f"u{dtype.itemsize}")  # the raw bits; LatentCache.array views them back
        out = np.lib.format.open_memmap(self._path, mode="w+", dtype=dtype, shape=(self._rows, *shape))
        if self._rows:
            out[:] = np.memmap(raw_path, dtype=dtype, mode="r", shape=out.shape)
        out.flush()
        del out
        raw_path.unlink()


class _Writers(dict):
    """One `_RowWriter` per array name, created on first use."""

    def __init__(self, folder: Path):
        super().__init__()
        self._folder = folder

    def __missing__(self, name: str) -> _RowWriter:
        self[name] = _RowWriter(self._folder / f"{name}.npy")
        return self[name]


class _PrepareSample:
    """Sample index -> pixels in both orientations, SDXL sizes and token ids of every caption, or a skip reason."""

    def __init__(self, source: Any, transform: TransformSpec, tokenizers: Sequence[Any]):
        self.source, self.transform, self.tokenizers = source, transform, tuple(tokenizers)

    def __call__(self, index: int, rng: np.random.Generator) -> dict[str, Any] | str:
        raw = self.source[index]
        out: dict[str, Any] = {}
        if self.tokenizers:
            captions = usable_captions(raw["caption"])
            if not captions:
                return EMPTY_CAPTION
            out["token_ids"] = tokenize(self.tokenizers, captions)
        try:
            image = decode_image(raw["image"])
        except Exception:  # any decoder failure means the same: skip the sample
            return UNREADABLE_IMAGE
        flips = (False, True) if self.transform.random_flip else (False,)
        for flip in flips:
            pixels, out["original_size"], crop = transform_image(image, self.transform, rng, flip=flip)
            out[f"pixels{'_flipped' * flip}"], out[f"crop_top_left{'_flipped' * flip}"] = pixels, crop
        return out


def _encode_in_batches(items: list[np.ndarray], batch_size: int, encode: Callable[[np.ndarray], Any]) -> Any:
    """Calls `encode` on a full, fixed-size batch (the last one padded), so a jitted encoder compiles once."""
    batch = np.stack(items + [items[-1]] * (batch_size - len(items)))
    return encode(batch)


class LatentCache:
    """A finished cache folder, read through memory maps opened lazily in each worker process."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        self._arrays: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return self.meta["num_samples"]

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "meta": self.meta, "_arrays": {}}  # workers reopen the memory maps

    def array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            array = np.load(self.path / f"{name}.npy", mmap_mode="r")
            stored_as = self.meta["raw_dtypes"].get(name)
            self._arrays[name] = array if stored_as is None else array.view(getattr(ml_dtypes, stored_as))
        return self._arrays[name]

    def examples(self, transform: TransformSpec) -> "_CachedExamples":
        """The example function for the loader; `transform` must be the one the cache was built with."""
        if _transform_key(transform) != self.meta["transform"]:
            raise DataConfigError(
                f"the latent cache {self.path} was built for {self.meta['transform']}, not {_transform_key(transform)}"
            )
        return _CachedExamples(self, transform.random_flip, transform.proportion_empty_prompts)


class _CachedExamples:
    """Sample index -> cached latent distribution, text embeddings of a random caption (or the empty prompt)."""

    def __init__(self, cache: LatentCache, random_flip: bool, proportion_empty_prompts: float):
        self.cache, self.random_flip, self.proportion_empty_prompts = cache, random_flip, proportion_empty_prompts

    def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        cache, example = self.cache, {}
        text_keys = cache.meta["text_keys"]
        if text_keys:
            start, stop = cache.array("caption_offsets")[index : index + 2]
            choice = choose_caption(range(stop - start), rng, self.proportion_empty_prompts)
            for key in text_keys:
                example[key] = np.array(
                    cache.array(f"empty_{key}")[0] if choice < 0 else cache.array(key)[start + choice]
                )
        suffix = "_flipped" if self.random_flip and rng.random() < 0.5 else ""
        for name in ("latent_mean", "latent_logvar", "crop_top_left"):
            example[name] = np.array(cache.array(name + suffix)[index])
        example["original_size"] = np.array(cache.array("original_size")[index])
        return example


def build_latent_cache(
    source: SourceSpec,
    transform: TransformSpec,
    tokenizers: Sequence[Any],
    encode_images: EncodeImages,
    encode_text: EncodeText | None,
    *,
    model_fingerprint: str,
    latent_cache_dir: str | os.PathLike,
    batch_size: int = 8,
) -> LatentCache:
    """Returns the cache for this model, data and transform, encoding everything once if it does not exist yet.

    `model_fingerprint` identifies the VAE and text encoder weights (e.g. `fingerprint_files` of their folders).
    Unreadable images and empty captions are skipped (counted in `meta["skipped"]`). Encoders are called with
    fixed-size numpy batches of `batch_size`; their outputs are converted with `np.asarray`.
    """
    if source.is_streamed:
        raise DataConfigError(
            "cache_latents=True needs a random-access source (dataset_name or train_data_dir), "
            f"not train_shards_path_or_url={source.train_shards_path_or_url!r}"
        )
    if not transform.center_crop:
        raise DataConfigError(
            "cache_latents=True with center_crop=False (random crop) would train on one frozen crop per image; "
            "set center_crop=True or cache_latents=False"
        )
    if tokenizers and encode_text is None:
        raise DataConfigError("cache_latents=True with tokenizers needs an encode_text function")
    raw = open_source(source, with_captions=bool(tokenizers))
    fingerprint = {
        "format": CACHE_FORMAT,
        "model": model_fingerprint,
        "data": raw.fingerprint,
        "num_samples": len(raw),
        "transform": _transform_key(transform),
        "tokenizers": [tokenizer_fingerprint(t) for t in tokenizers],
    }
    key = hash_json(fingerprint)
    root = Path(latent_cache_dir)
    final = root / key
    if (final / "meta.json").is_file():
        return LatentCache(final)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        meta = _write_cache(tmp, raw, transform, tokenizers, encode_images, encode_text, batch_size)
        meta.update(key=key, fingerprint=fingerprint, transform=_transform_key(transform))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same cache first: use theirs
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return LatentCache(final)


def _write_cache(
    folder: Path,
    raw: Any,
    transform: TransformSpec,
    tokenizers: Sequence[Any],
    encode_images: EncodeImages,
    encode_text: EncodeText | None,
    batch_size: int,
) -> dict[str, Any]:
    writers = _Writers(folder)
    orientations = ("", "_flipped") if transform.random_flip else ("",)
    skipped: dict[str, int] = {}
    kept: list[dict[str, Any]] = []
    num_captions = [0]  # caption_offsets: captions of sample i are rows num_captions[i]:num_captions[i + 1]
    num_kept = [0]
    text_keys: list[str] = []

    def flush_images() -> None:
        for suffix in orientations:
            mean, logvar = _encode_in_batches([k[f"pixels{suffix}"] for k in kept], batch_size, encode_images)
            writers[f"latent_mean{suffix}"].append(np.asarray(mean, np.float32)[: len(kept)])
            writers[f"latent_logvar{suffix}"].append(np.asarray(logvar, np.float32)[: len(kept)])
            writers[f"crop_top_left{suffix}"].append(np.asarray([k[f"crop_top_left{suffix}"] for k in kept], np.int32))
        writers["original_size"].append(np.asarray([k["original_size"] for k in kept], np.int32))
        if tokenizers:
            ids = {name: np.concatenate([k["token_ids"][name] for k in kept]) for name in kept[0]["token_ids"]}
            embeddings = encode_ids(ids)
            text_keys[:] = sorted(embeddings)
            for name, value in embeddings.items():
                writers[name].append(value)
            for k in kept:
                num_captions.append(num_captions[-1] + len(k["token_ids"]["input_ids"]))
        num_kept[0] += len(kept)
        kept.clear()

    def encode_ids(ids: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for start in range(0, len(next(iter(ids.values()))), batch_size):
            chunk = {name: list(v[start : start + batch_size]) for name, v in ids.items()}
            count = len(next(iter(chunk.values())))
            encoded = encode_text(
                {name: _encode_in_batches(rows, batch_size, np.asarray) for name, rows in chunk.items()}
            )
            for name, value in encoded.items():
                out.setdefault(name, []).append(np.asarray(value)[:count])
        return {name: np.concatenate(parts) for name, parts in out.items()}

    for _, item in iterate_in_order(_PrepareSample(raw, transform, tokenizers), len(raw)):
        if isinstance(item, str):
            skipped[item] = skipped.get(item, 0) + 1
            continue
        kept.append(item)
        if len(kept) == batch_size:
            flush_images()
    if kept:
        flush_images()
    num_samples = num_kept[0]
    if num_samples == 0:
        raise NoUsableDataError(f"no usable sample to cache: skipped {skipped}")
    if tokenizers:
        writers["caption_offsets"].append(np.asarray(num_captions, np.int64))
        for name, value in encode_ids(tokenize(tokenizers, [""])).items():
            writers[f"empty_{name}"].append(value)
    for writer in writers.values():
        writer.finish()
    raw_dtypes = {name: w.dtype.name for name, w in writers.items() if not _npy_describes(w.dtype)}
    return {"num_samples": num_samples, "text_keys": text_keys, "skipped": skipped, "raw_dtypes": raw_dtypes}
