"""DreamBooth's data, for both backends: the instance (and class) image folders as paired training examples, and
the class images a run generates from its base model before training (`complete_class_images`).

As diffusers' ``train_dreambooth.py``: every image of the instance folder goes with the instance prompt; with prior
preservation sample i pairs instance image i mod n_instance with class image i mod n_class (the first
``num_class_images`` of the class folder, here in name order), an epoch has max(n_instance, n_class) samples, and
the class half of each example has its keys prefixed with ``class_``.

Generated class images are ``class-NNNNN.png``. Image i comes from generation batch i // sample_batch_size, whose
random numbers depend only on its index, and each file is written whole (renamed into place), so an interrupted
generation resumes with exactly the images an uninterrupted one would have made.
"""

import dataclasses
import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jaxdiff.config import TrainConfig
from jaxdiff.data.errors import DataConfigError
from jaxdiff.data.transforms import TransformSpec, make_example

log = logging.getLogger("jaxdiff")

#: Batch-key prefix of the class half of a DreamBooth example.
CLASS_PREFIX = "class_"
#: A generated class image's file name holds its generation index.
GENERATED = re.compile(r"^class-(\d{5,})\.png$")


def image_files(folder: Path) -> list[Path]:
    """The image files of a folder (by extension, as PIL knows them), in name order; subfolders are not read."""
    extensions = {ext.lower() for ext in Image.registered_extensions()}
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions)


@dataclasses.dataclass(frozen=True)
class DreamBoothSpec:
    """The instance images and prompt, and with prior preservation the class images and prompt."""

    instance_data_dir: str
    instance_prompt: str
    class_data_dir: str | None = None
    class_prompt: str | None = None
    num_class_images: int = 100

    @classmethod
    def from_config(cls, config: TrainConfig) -> "DreamBoothSpec":
        prior = config.with_prior_preservation
        return cls(
            instance_data_dir=config.instance_data_dir,
            instance_prompt=config.instance_prompt,
            class_data_dir=config.class_data_dir if prior else None,
            class_prompt=config.class_prompt if prior else None,
            num_class_images=config.num_class_images,
        )

    def instance_images(self) -> list[Path]:
        images = image_files(Path(self.instance_data_dir))
        if not images:
            raise DataConfigError(f"instance_data_dir={self.instance_data_dir!r} holds no image files")
        return images

    def class_images(self) -> list[Path]:
        """The class images the prior loss uses (none without prior preservation)."""
        if self.class_data_dir is None:
            return []
        images = image_files(Path(self.class_data_dir))[: self.num_class_images]
        if not images:
            raise DataConfigError(f"class_data_dir={self.class_data_dir!r} holds no image files")
        return images


class DreamBoothExamples:
    """Example function of a DreamBooth run: sample i's instance example, and its class example under
    ``class_`` keys (see the module doc); `len()` is the epoch length."""

    def __init__(self, spec: DreamBoothSpec, transform: TransformSpec, tokenizers: Any):
        self.instances, self.classes = spec.instance_images(), spec.class_images()
        self.spec, self.transform, self.tokenizers = spec, transform, tuple(tokenizers)

    def __len__(self) -> int:
        return max(len(self.instances), len(self.classes))

    def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray] | str:
        image = self.instances[index % len(self.instances)]
        example = make_example(
            {"image": image, "caption": self.spec.instance_prompt}, self.transform, self.tokenizers, rng
        )
        if not self.classes or isinstance(example, str):
            return example
        image = self.classes[index % len(self.classes)]
        prior = make_example({"image": image, "caption": self.spec.class_prompt}, self.transform, self.tokenizers, rng)
        if isinstance(prior, str):
            return prior
        return {**example, **{CLASS_PREFIX + key: value for key, value in prior.items()}}


# ---- class-image generation ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClassImageRequest:
    """Class images a run completes before training: ``prompt`` sampled into ``folder`` until it holds
    ``count`` images, ``batch_size`` at a time."""

    folder: Path
    prompt: str
    count: int
    batch_size: int

    @classmethod
    def from_config(cls, config: TrainConfig) -> "ClassImageRequest | None":
        """The run's request, or None without prior preservation."""
        if not config.with_prior_preservation:
            return None
        return cls(Path(config.class_data_dir), config.class_prompt, config.num_class_images, config.sample_batch_size)

    def missing_batches(self) -> dict[int, list[int]]:
        """Generation batch -> the indices in it whose images are still missing (images the folder holds from
        elsewhere count towards ``count``; generated ones are found by their index)."""
        files = image_files(self.folder)
        generated = {int(m.group(1)) for m in (GENERATED.match(p.name) for p in files) if m}
        wanted = self.count - (len(files) - len(generated))
        batches: dict[int, list[int]] = {}
        for index in range(max(wanted, 0)):
            if index not in generated:
                batches.setdefault(index // self.batch_size, []).append(index)
        return batches


def complete_class_images(
    request: ClassImageRequest,
    generate: Callable[[int], np.ndarray],
    missing: dict[int, list[int]],
    batches: Sequence[int] | None = None,
) -> None:
    """Generates and saves the ``missing`` class images (`ClassImageRequest.missing_batches`, counted by the caller
    before any process writes).

    ``generate(batch)`` returns that batch's ``batch_size`` images (N, H, W, 3) in [0, 1]. ``batches``: this
    process's share of the missing batches (default all, as on a JAX mesh, where every process takes part in each
    batch and writes the same files)."""
    mine = sorted(missing) if batches is None else list(batches)
    if not mine:
        return
    log.info(
        "generating %d class images of %r into %s",
        sum(len(missing[b]) for b in mine),
        request.prompt,
        request.folder,
    )
    request.folder.mkdir(parents=True, exist_ok=True)
    for batch in mine:
        images = generate(batch)
        for index in missing[batch]:
            save_png(images[index - batch * request.batch_size], request.folder / f"class-{index:05d}.png")


def save_png(image: np.ndarray, path: Path) -> None:
    """An (H, W, 3) image in [0, 1] as a PNG at ``path``, written whole or not at all (a uniquely named partial
    file renamed into place, so processes writing the same image do not collide)."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".partial", delete=False) as file:
        Image.fromarray(np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)).save(file, format="PNG")
    os.replace(file.name, path)
