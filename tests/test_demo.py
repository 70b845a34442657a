"""The demo's assets: a VAE fitted to the shapes (so samples show what the UNet learnt), data, progress grid."""

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from jaxdiff import demo
from jaxdiff.metrics import save_validation_images
from jaxdiff.models.autoencoder_kl import AutoencoderKL


def _pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image, np.float32) / 127.5 - 1 for image in images]).transpose(0, 3, 1, 2)


def test_prompt_images_cover_every_caption_equally():
    samples = demo.prompt_images(64)
    captions = [caption for _, caption in samples]
    expected = {f"a {c} {s}" for c in demo.PROMPT_COLOURS for s in demo.PROMPT_SHAPES}
    assert {captions.count(caption) for caption in expected} == {16} and set(captions) == expected
    assert all(image.size == demo.PROMPT_SIZE for image, _ in samples)
    assert len({image.tobytes() for image, _ in samples}) == 32  # 4 captions x 8 positions


def test_fit_vae_learns_to_reconstruct_and_scales_latents_to_unit_variance():
    images = [image for image, _ in demo.prompt_images(16)]
    pixels = _pixels(images)

    def reconstruction_error(vae: AutoencoderKL) -> float:
        return float(np.mean((np.asarray(vae(pixels).sample) - pixels) ** 2))

    vae = AutoencoderKL.from_config(demo.DEMO_VAE, rngs=nnx.Rngs(0))
    before = reconstruction_error(vae)
    scaling_factor = demo.fit_vae(vae, images, steps=60)
    after = reconstruction_error(vae)
    assert after < 0.1 * before and after < 0.05, (before, after)
    means = np.asarray(vae.encode(pixels).latent_dist.mean)
    assert scaling_factor * means.std() == pytest.approx(1.0, rel=1e-4)


def test_progress_grid_has_a_row_per_step_and_a_column_per_prompt(tmp_path):
    prompts = ["a red circle", "a blue square"]
    colours = {200: [(200, 30, 90), (20, 200, 90)], 400: [(30, 90, 200), (250, 250, 0)]}
    for step, per_prompt in colours.items():
        save_validation_images(
            tmp_path, step, prompts, [np.broadcast_to(np.uint8(c), (2, 8, 8, 3)) for c in per_prompt]
        )
    grid = np.asarray(demo.progress_grid(tmp_path / "samples", scale=1))
    # Each cell is one prompt's 2 images (16 x 8 px); rows are steps, in order, columns prompts.
    where = {c: np.argwhere((grid == c).all(axis=-1)) for cs in colours.values() for c in cs}
    assert all(len(found) == 2 * 8 * 8 for found in where.values())
    (first, second), (third, _) = colours.values()
    assert where[first][:, 0].max() < where[third][:, 0].min()  # step 200 above step 400
    assert where[first][:, 1].max() < where[second][:, 1].min()  # prompt 0 left of prompt 1
    with pytest.raises(FileNotFoundError):
        demo.progress_grid(tmp_path / "samples", since=4e9)  # only grids written after `since` count
