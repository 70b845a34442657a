"""Per-sample transforms: resize/crop geometry, flip, normalization, captions and tokenization."""

import numpy as np
import pytest
from PIL import Image

from jaxdiff.data.errors import DataConfigError
from jaxdiff.data.transforms import (
    TransformSpec,
    choose_caption,
    sample_rng,
    tokenize,
    transform_image,
    usable_captions,
)


def _gradient(width: int, height: int) -> Image.Image:
    x = np.arange(width, dtype=np.uint8)[None, :, None] * 3
    y = np.arange(height, dtype=np.uint8)[:, None, None] * 2
    return Image.fromarray(np.broadcast_to(x + y, (height, width, 3)).copy())


def test_resize_shorter_side_center_crop_and_normalize():
    image = _gradient(50, 20)
    spec = TransformSpec(resolution=10, center_crop=True, image_interpolation_mode="nearest")
    pixels, original_size, crop = transform_image(image, spec, sample_rng(0, 0, 0))
    assert original_size == (20, 50) and crop == (0, 8)  # resized to 25x10, crop left round(15 / 2)
    expected = np.asarray(image.resize((25, 10), Image.Resampling.NEAREST), np.float32)[:, 8:18]
    np.testing.assert_array_equal(pixels, ((expected / 255.0 - 0.5) / 0.5).transpose(2, 0, 1))


@pytest.mark.parametrize(
    ("size", "resized", "crop"),
    [((10, 30), (30, 12), (1, 0)), ((16, 8), (40, 16), (0, 16)), ((20, 50), (50, 20), (0, 0))],
)
def test_a_height_by_width_resolution_resizes_to_cover_it_then_crops(size, resized, crop):
    """A 50x20 (w x h) image at (h, w) `size`: scaled by the side that needs more, the other truncated."""
    image = _gradient(50, 20)
    spec = TransformSpec(resolution=size, center_crop=True, image_interpolation_mode="nearest")
    pixels, original_size, top_left = transform_image(image, spec, sample_rng(0, 0, 0))
    assert pixels.shape == (3, *size) and original_size == (20, 50) and top_left == crop
    expected = np.asarray(image.resize(resized, Image.Resampling.NEAREST), np.float32)
    expected = expected[crop[0] : crop[0] + size[0], crop[1] : crop[1] + size[1]]
    np.testing.assert_array_equal(pixels, ((expected / 255.0 - 0.5) / 0.5).transpose(2, 0, 1))
    random = TransformSpec(resolution=size, random_flip=True, image_interpolation_mode="nearest")
    for sample in range(6):
        pixels, _, (top, left) = transform_image(image, random, sample_rng(0, 0, sample))
        assert pixels.shape == (3, *size) and 0 <= top <= resized[1] - size[0] and 0 <= left <= resized[0] - size[1]


def test_flip_mirrors_the_crop_and_reports_it_in_the_flipped_frame():
    image = _gradient(40, 20)
    spec = TransformSpec(resolution=20, center_crop=False, random_flip=True, image_interpolation_mode="nearest")

    def crop(array: np.ndarray, top: int, left: int) -> np.ndarray:
        return ((array[top : top + 20, left : left + 20] / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)

    plain, _, (top, left) = transform_image(image, spec, sample_rng(0, 0, 1), flip=False)
    flipped, _, (ftop, fleft) = transform_image(image, spec, sample_rng(0, 0, 1), flip=True)
    np.testing.assert_array_equal(plain, crop(np.asarray(image, np.float32), top, left))
    mirrored = np.asarray(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), np.float32)
    np.testing.assert_array_equal(flipped, crop(mirrored, ftop, fleft))


def test_same_sample_same_augmentation_other_epoch_other_augmentation():
    image = _gradient(64, 32)
    spec = TransformSpec(resolution=16, random_flip=True)
    a = transform_image(image, spec, sample_rng(7, 0, 3))
    assert all(np.array_equal(x, y) for x, y in zip(a, transform_image(image, spec, sample_rng(7, 0, 3)), strict=True))
    crops = {transform_image(image, spec, sample_rng(7, epoch, 3))[2] for epoch in range(8)}
    assert len(crops) > 1


def test_several_captions_and_empty_prompts():
    captions = usable_captions(["a red circle", "", b"a blue square", "  "])
    assert captions == ["a red circle", "a blue square"]
    picks = {choose_caption(captions, sample_rng(0, e, 0), 0.0) for e in range(20)}
    assert picks == {0, 1}
    assert choose_caption(captions, sample_rng(0, 0, 0), 1.0) == -1
    assert usable_captions(None) == [] and usable_captions("   ") == []


def test_tokenize_pads_and_truncates_like_the_tokenizer(tiny_tokenizer):
    ids = tokenize([tiny_tokenizer, tiny_tokenizer], ["a red circle", "photo " * 40])
    expected = tiny_tokenizer(["a red circle", "photo " * 40], padding="max_length", max_length=16, truncation=True)
    assert set(ids) == {"input_ids", "input_ids_2"} and ids["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(ids["input_ids"], expected["input_ids"])


def test_bad_settings_name_the_field():
    with pytest.raises(DataConfigError, match="image_interpolation_mode='cubic'"):
        TransformSpec(image_interpolation_mode="cubic")
    with pytest.raises(DataConfigError, match="proportion_empty_prompts"):
        TransformSpec(proportion_empty_prompts=1.5)
    with pytest.raises(DataConfigError, match=r"resolution=\(0, 8\)"):
        TransformSpec(resolution=(0, 8))
