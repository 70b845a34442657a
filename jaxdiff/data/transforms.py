"""Per-sample transforms shared by every source and both backends: decode, resize, crop, flip, normalize, caption
choice and tokenization, in numpy/PIL.

Randomness comes only from the generator passed in, which the loader derives from (seed, epoch, sample id): the
same sample in the same epoch is augmented the same way whatever the worker count or a resume.
"""

import dataclasses
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from jaxdiff.data.errors import DataConfigError

#: diffusers' `--image_interpolation_mode` names -> PIL filters (torchvision maps them the same way for PIL images).
INTERPOLATION_MODES: dict[str, Image.Resampling] = {
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

#: Why a sample was skipped; the keys of `DataIterator.skipped`.
UNREADABLE_IMAGE = "unreadable_image"
EMPTY_CAPTION = "empty_caption"

#: Batch keys of the token ids, one per tokenizer (SDXL has two).
INPUT_IDS_KEYS = ("input_ids", "input_ids_2")


@dataclasses.dataclass(frozen=True)
class TransformSpec:
    """How a raw sample becomes training tensors. Field names are diffusers' script flags."""

    resolution: int | tuple[int, int] = 512  # N, or (height, width)
    center_crop: bool = False
    random_flip: bool = False
    image_interpolation_mode: str = "lanczos"
    proportion_empty_prompts: float = 0.0

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the output pixels."""
        res = self.resolution
        return (res, res) if isinstance(res, int) else tuple(res)

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) <= 0:
            raise DataConfigError(f"resolution={self.resolution} must be a positive integer or (height, width)")
        if self.image_interpolation_mode not in INTERPOLATION_MODES:
            raise DataConfigError(
                f"image_interpolation_mode={self.image_interpolation_mode!r} is not one of "
                f"{sorted(INTERPOLATION_MODES)}"
            )
        if not 0.0 <= self.proportion_empty_prompts <= 1.0:
            raise DataConfigError(f"proportion_empty_prompts={self.proportion_empty_prompts} must be in [0, 1]")


def sample_rng(seed: int, epoch: int, *sample_id: int) -> np.random.Generator:
    """The generator for one sample's augmentation, a pure function of (seed, epoch, sample id)."""
    return np.random.default_rng([seed, epoch, *sample_id])


def decode_image(value: Any) -> Image.Image:
    """Decodes an image as sources store it (bytes, a path, an HF `{"bytes", "path"}` dict, an array, a PIL image)
    into an RGB PIL image with EXIF orientation applied. Raises on unreadable data."""
    if isinstance(value, dict):
        value = value["bytes"] if value.get("bytes") is not None else value["path"]
    if isinstance(value, bytes | bytearray):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, str | os.PathLike):
        image = Image.open(value)
    elif isinstance(value, np.ndarray):
        image = Image.fromarray(value)
    elif isinstance(value, Image.Image):
        image = value
    else:
        raise TypeError(f"cannot decode an image from {type(value).__name__}")
    image.load()  # decode now, so a truncated file fails here and not later
    return ImageOps.exif_transpose(image).convert("RGB")


def transform_image(
    image: Image.Image, spec: TransformSpec, rng: np.random.Generator, flip: bool | None = None
) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """Resize (to cover `resolution`: the shorter side to N for a square, as diffusers' scripts do), flip, crop and
    normalize to [-1, 1].

    Returns the CHW float32 pixels, `original_size` (h, w) before resizing and `crop_top_left` (top, left) of
    the crop in the resized image after flipping, as diffusers' SDXL script computes them, so SDXL time ids
    describe exactly these pixels. `flip` forces the flip decision (the latent cache stores both orientations).
    """
    crop_h, crop_w = spec.size
    original_size = (image.height, image.width)
    width, height = image.size
    # Scale by the side that needs more, and truncate the other as torchvision's Resize(int) does.
    if crop_h * width >= crop_w * height:
        size = (max(crop_w, int(crop_h * width / height)), crop_h)
    else:
        size = (crop_w, max(crop_h, int(crop_w * height / width)))
    if size != image.size:
        image = image.resize(size, INTERPOLATION_MODES[spec.image_interpolation_mode])
    width, height = image.size
    if flip is None:
        flip = spec.random_flip and bool(rng.random() < 0.5)
    if spec.center_crop:
        top, left = round((height - crop_h) / 2.0), round((width - crop_w) / 2.0)
    else:
        top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
    # `left` is in the flipped image; crop the same pixels from the unflipped one and flip only the crop.
    pixel_left = width - left - crop_w if flip else left
    pixels = np.asarray(image.crop((pixel_left, top, pixel_left + crop_w, top + crop_h)), dtype=np.float32)
    if flip:
        pixels = pixels[:, ::-1]
    pixels = (pixels / 255.0 - 0.5) / 0.5
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)), original_size, (top, left)


def usable_captions(caption: Any) -> list[str]:
    """The non-empty captions of a sample (a string, bytes, or a list of them, as datasets store several)."""
    captions = list(caption) if isinstance(caption, list | tuple | np.ndarray) else [caption]
    texts = [c.decode() if isinstance(c, bytes) else c for c in captions]
    return [t for t in texts if isinstance(t, str) and t.strip()]


def choose_caption(captions: Sequence[str], rng: np.random.Generator, proportion_empty_prompts: float) -> int:
    """Index of the caption to train on (a random one of several), or -1 for the empty prompt."""
    if proportion_empty_prompts > 0 and rng.random() < proportion_empty_prompts:
        return -1
    return int(rng.integers(len(captions))) if len(captions) > 1 else 0


def tokenize(tokenizers: Sequence[Any], texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Token ids (N, model_max_length) int32 per tokenizer, padded to max length and truncated, as diffusers does."""
    return {
        key: np.asarray(
            tok(list(texts), max_length=tok.model_max_length, padding="max_length", truncation=True)["input_ids"],
            dtype=np.int32,
        )
        for key, tok in zip(INPUT_IDS_KEYS, tokenizers, strict=False)
    }


def make_example(
    raw: dict[str, Any], spec: TransformSpec, tokenizers: Sequence[Any], rng: np.random.Generator
) -> dict[str, np.ndarray] | str:
    """One training example from a raw sample, or the reason it is skipped (`UNREADABLE_IMAGE`, `EMPTY_CAPTION`).

    Keys: pixel_values (3, H, W) float32, original_size (2,) and crop_top_left (2,) int32, and with tokenizers
    input_ids (L,) [and input_ids_2 (L,)] int32.
    """
    example: dict[str, np.ndarray] = {}
    if tokenizers:
        captions = usable_captions(raw["caption"])
        if not captions:
            return EMPTY_CAPTION
        choice = choose_caption(captions, rng, spec.proportion_empty_prompts)
        ids = tokenize(tokenizers, ["" if choice < 0 else captions[choice]])
        example.update({key: value[0] for key, value in ids.items()})
    try:
        image = decode_image(raw["image"])
    except Exception:  # any decoder failure (truncated, not an image, bomb) means the same: skip the sample
        return UNREADABLE_IMAGE
    pixels, original_size, crop_top_left = transform_image(image, spec, rng)
    example["pixel_values"] = pixels
    example["original_size"] = np.asarray(original_size, np.int32)
    example["crop_top_left"] = np.asarray(crop_top_left, np.int32)
    return example
