"""Random-access sources of raw (undecoded) samples: HF `datasets` (hub id, local folder, `save_to_disk` folder,
imagefolder with metadata.jsonl/csv) and TFDS (array_record, read without a TensorFlow runtime).

A source yields `{"image": ..., "caption": ...}` with the image still encoded (bytes, a path, or an array for
datasets that store pixels), so decoding happens in the loader's workers where a corrupt file can be skipped.
Streamed WebDataset shards live in `webdataset.py`.
"""

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from jaxdiff.data.errors import DataConfigError
from jaxdiff.data.fingerprint import fingerprint_files, hash_json

TFDS_PREFIX = "tfds:"
DEFAULT_IMAGE_COLUMN = "image"
DEFAULT_CAPTION_COLUMN = "text"


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """Where the training samples come from. Field names are diffusers' script flags.

    Exactly one of `dataset_name` (hub id, local dataset folder, `save_to_disk` folder, or `tfds:NAME[/CONFIG]`),
    `train_data_dir` (imagefolder with metadata.jsonl or metadata.csv) and `train_shards_path_or_url`
    (WebDataset tar shards, brace patterns, `pipe:` commands) is set. `image_column`/`caption_column` default
    to "image"/"text" when the dataset has them, else to its first/second column. `max_train_samples` keeps the
    first N samples in source order, so a subset is the same whatever the seed and caches stay shareable.
    """

    dataset_name: str | None = None
    dataset_config_name: str | None = None
    cache_dir: str | None = None
    train_data_dir: str | None = None
    train_shards_path_or_url: str | None = None
    tfds_data_dir: str | None = None
    image_column: str | None = None
    caption_column: str | None = None
    max_train_samples: int | None = None

    def __post_init__(self) -> None:
        given = [f for f in ("dataset_name", "train_data_dir", "train_shards_path_or_url") if getattr(self, f)]
        if len(given) != 1:
            raise DataConfigError(
                f"set exactly one of dataset_name, train_data_dir, train_shards_path_or_url (got {given or 'none'})"
            )
        if self.max_train_samples is not None and self.max_train_samples <= 0:
            raise DataConfigError(f"max_train_samples={self.max_train_samples} must be a positive integer")

    @property
    def is_streamed(self) -> bool:
        return self.train_shards_path_or_url is not None


class RandomAccessSource(Protocol):
    """What the loader needs from a source: a length, raw samples by index, and a fingerprint of the data."""

    fingerprint: str

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


def resolve_columns(
    columns: Sequence[str], image_column: str | None, caption_column: str | None, with_captions: bool
) -> tuple[str, str | None]:
    """Chooses the image and caption columns as diffusers does; a wrong name is one clear DataConfigError."""
    columns = list(columns)

    def pick(field: str, value: str | None, default: str, taken: set[str]) -> str:
        if value is not None:
            if value not in columns:
                raise DataConfigError(f"{field}={value!r} is not a column of the dataset; the columns are {columns}")
            return value
        if default in columns and default not in taken:
            return default
        free = [c for c in columns if c not in taken]
        if not free:
            raise DataConfigError(f"{field} is not set and the dataset has no column left for it; columns: {columns}")
        return free[0]

    image = pick("image_column", image_column, DEFAULT_IMAGE_COLUMN, set())
    caption = pick("caption_column", caption_column, DEFAULT_CAPTION_COLUMN, {image}) if with_captions else None
    return image, caption


class HFSource:
    """A Hugging Face `datasets.Dataset` with its image column left encoded."""

    def __init__(
        self, dataset: Any, image_column: str | None, caption_column: str | None, with_captions: bool, data_id: str
    ):
        import datasets

        image, caption = resolve_columns(dataset.column_names, image_column, caption_column, with_captions)
        dataset = dataset.select_columns([c for c in (image, caption) if c is not None])
        if isinstance(dataset.features[image], datasets.Image):
            dataset = dataset.cast_column(image, datasets.Image(decode=False))
        self._dataset, self._image, self._caption = dataset, image, caption
        self.fingerprint = hash_json(["hf", data_id, dataset._fingerprint, image, caption, len(dataset)])

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self._dataset[int(index)]
        return {"image": row[self._image], "caption": row[self._caption] if self._caption else None}


class TFDSSource:
    """A TFDS dataset read through `tfds.data_source` (array_record files), so no TensorFlow runtime is needed."""

    def __init__(
        self,
        name: str,
        data_dir: str | None,
        image_column: str | None,
        caption_column: str | None,
        with_captions: bool,
    ):
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:  # pragma: no cover - depends on the install
            raise DataConfigError(
                f"dataset_name={TFDS_PREFIX}{name!r} needs tensorflow-datasets: pip install 'jaxdiff[tfds]'"
            ) from e
        builder = tfds.builder(name, data_dir=data_dir)
        features = builder.info.features
        image, caption = resolve_columns(list(features.keys()), image_column, caption_column, with_captions)
        decoders = {image: tfds.decode.SkipDecoding()} if isinstance(features[image], tfds.features.Image) else None
        try:
            self._source = builder.as_data_source(split="train", decoders=decoders)
        except Exception as e:
            raise DataConfigError(
                f"dataset_name={TFDS_PREFIX}{name!r}: cannot read the 'train' split as array_record from "
                f"tfds_data_dir={data_dir!r} ({e}); prepare it with file_format='array_record'"
            ) from e
        self._image, self._caption = image, caption
        self.fingerprint = hash_json(
            ["tfds", name, str(builder.version), fingerprint_files(builder.data_dir), image, caption]
        )

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self._source[int(index)]
        return {"image": row[self._image], "caption": row[self._caption] if self._caption else None}


class _Head:
    """The first `length` samples of a source (`max_train_samples`)."""

    def __init__(self, source: RandomAccessSource, length: int):
        self._source, self._length = source, length
        self.fingerprint = hash_json([source.fingerprint, "head", length])

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self._length:
            raise IndexError(index)
        return self._source[index]


def _is_saved_to_disk(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _load_hf(spec: SourceSpec) -> tuple[Any, str]:
    """Loads the 'train' split through `datasets`; returns it with an id that changes when local files change."""
    import datasets

    if spec.train_data_dir:
        if not Path(spec.train_data_dir).is_dir():
            raise DataConfigError(f"train_data_dir={spec.train_data_dir!r} is not a folder")
        dataset = datasets.load_dataset(
            "imagefolder", data_dir=spec.train_data_dir, cache_dir=spec.cache_dir, split="train"
        )
        return dataset, fingerprint_files(spec.train_data_dir)
    path = Path(spec.dataset_name)
    if path.is_dir() and _is_saved_to_disk(path):
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if "train" not in dataset:
                raise DataConfigError(
                    f"dataset_name={spec.dataset_name!r} has no 'train' split; splits: {list(dataset)}"
                )
            dataset = dataset["train"]
        return dataset, fingerprint_files(path)
    try:
        dataset = datasets.load_dataset(
            spec.dataset_name, spec.dataset_config_name, cache_dir=spec.cache_dir, split="train"
        )
    except FileNotFoundError as e:
        raise DataConfigError(f"dataset_name={spec.dataset_name!r}: no such dataset or folder ({e})") from e
    except ConnectionError as e:  # datasets' "Couldn't reach ... on the Hub": offline or no network, not cached
        cache = spec.cache_dir or datasets.config.HF_DATASETS_CACHE
        reason = (
            "HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set"
            if datasets.config.HF_HUB_OFFLINE
            else f"the Hugging Face Hub cannot be reached ({e})"
        )
        raise DataConfigError(
            f"dataset_name={spec.dataset_name!r}: cannot load this Hub dataset: {reason} and it is not in the "
            f"datasets cache at {cache}"
        ) from None
    data_id = fingerprint_files(path) if path.is_dir() else f"{spec.dataset_name}/{spec.dataset_config_name}"
    return dataset, data_id


def open_source(spec: SourceSpec, with_captions: bool = True) -> RandomAccessSource:
    """Opens the random-access source that `spec` names (not WebDataset shards: see `webdataset.py`).

    `with_captions=False` (unconditional training) needs no caption column.
    """
    if spec.is_streamed:
        raise DataConfigError("train_shards_path_or_url is a streamed source; open it with open_webdataset")
    if spec.dataset_name and spec.dataset_name.startswith(TFDS_PREFIX):
        data_dir = spec.tfds_data_dir or os.environ.get("TFDS_DATA_DIR")
        source: RandomAccessSource = TFDSSource(
            spec.dataset_name[len(TFDS_PREFIX) :], data_dir, spec.image_column, spec.caption_column, with_captions
        )
    else:
        dataset, data_id = _load_hf(spec)
        source = HFSource(dataset, spec.image_column, spec.caption_column, with_captions, data_id)
    if spec.max_train_samples is not None and spec.max_train_samples < len(source):
        source = _Head(source, spec.max_train_samples)
    if len(source) == 0:
        raise DataConfigError(f"the dataset of {spec} has no samples")
    return source
