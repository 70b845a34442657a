"""Streamed WebDataset tar shards: brace patterns, local paths, `pipe:` commands and URLs (via `webdataset.gopen`).

Order. Each epoch shuffles the shard list with (seed, epoch); host h of P reads shards h, h+P, ... of it, so hosts
read disjoint shards and together every sample once per epoch. Inside a shard, samples are shuffled in windows of
`shuffle_window` consecutive samples. The position is a JSON cursor (epoch, shard position, samples consumed in the
shard, whether that sample ended the host's epoch): a resume re-reads the current shard up to the cursor without
decoding, and continues exactly. The reader looks one raw sample ahead, so the last sample of an epoch is known as
such when it is returned.

Decoding runs in `dataloader_num_workers` threads (PIL and numpy release the GIL), results kept in stream order.
"""

import collections
import concurrent.futures
import os
import tarfile
from collections.abc import Iterator, Sequence
from typing import Any

import braceexpand
import numpy as np

from jaxdiff.data.errors import DataConfigError, NoUsableDataError
from jaxdiff.data.sources import SourceSpec
from jaxdiff.data.streams import Element, LoaderSpec
from jaxdiff.data.transforms import TransformSpec, make_example, sample_rng

IMAGE_KEYS = ("jpg", "png", "jpeg", "webp")
CAPTION_KEYS = ("text", "txt", "caption")
UNREADABLE_SHARD = "unreadable_shard"


def expand_urls(pattern: str) -> list[str]:
    """Shard URLs of a brace pattern (`shards/{00000..01099}.tar`); several patterns may be joined with `::`."""
    return [url for part in pattern.split("::") for url in braceexpand.braceexpand(part)]


def read_tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """Samples of one tar shard, streamed: members grouped by key (path up to the first dot of the file name),
    each sample a dict `{"__key__": key, ext: bytes}`."""
    from webdataset.gopen import gopen

    with gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        sample: dict[str, Any] = {}
        for member in tar:
            if not member.isfile():
                continue
            directory, name = os.path.split(member.name)
            if name.startswith(".") or "." not in name:
                continue
            stem, ext = name.split(".", 1)
            key = os.path.join(directory, stem)
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            sample["__key__"] = key
            sample[ext.lower()] = tar.extractfile(member).read()
        if sample:
            yield sample


def _pick(sample: dict[str, Any], column: str | None, candidates: Sequence[str]) -> Any:
    if column is not None:
        return sample.get(column)
    return next((sample[k] for k in candidates if k in sample), None)


class WebDatasetStream:
    """This host's infinite stream of (epoch, example or skip reason) from WebDataset shards, with a JSON state."""

    def __init__(
        self,
        source: SourceSpec,
        transform: TransformSpec,
        tokenizers: Sequence[Any],
        loader: LoaderSpec,
        process_index: int,
        process_count: int,
        shuffle_window: int = 1000,
    ):
        self._urls = expand_urls(source.train_shards_path_or_url)
        if len(self._urls) < process_count:
            raise DataConfigError(
                f"train_shards_path_or_url={source.train_shards_path_or_url!r} names {len(self._urls)} shards, "
                f"fewer than the {process_count} hosts that each need their own"
            )
        self._source, self._transform, self._tokenizers = source, transform, tuple(tokenizers)
        self._seed, self._workers = loader.seed, loader.dataloader_num_workers
        self._process_index, self._process_count = process_index, process_count
        self._shuffle_window = shuffle_window
        # max_train_samples counts all hosts; each host stops its epoch after its share.
        self._epoch_limit = None if source.max_train_samples is None else -(-source.max_train_samples // process_count)
        self._check_columns()
        self._pool = concurrent.futures.ThreadPoolExecutor(self._workers) if self._workers else None
        self.set_state({"epoch": 0, "shard": 0, "sample": 0, "in_epoch": 0, "epoch_done": 0})

    def _check_columns(self) -> None:
        """Validates explicitly named columns against the first sample, so a typo fails before training."""
        wanted = {"image_column": self._source.image_column}
        if self._tokenizers:
            wanted["caption_column"] = self._source.caption_column
        if all(v is None for v in wanted.values()):
            return
        first = next(read_tar_samples(self._urls[0]), None)
        keys = sorted(k for k in first or {} if k != "__key__")
        for field, column in wanted.items():
            if column is not None and column not in keys:
                raise DataConfigError(
                    f"{field}={column!r} is not a key of the WebDataset samples in {self._urls[0]}; keys: {keys}"
                )

    def _host_shards(self, epoch: int) -> list[int]:
        order = np.random.default_rng([self._seed, epoch]).permutation(len(self._urls))
        return order[self._process_index :: self._process_count].tolist()

    def _shard_samples(self, shard_id: int, epoch: int, start: int) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """(index in shard, raw sample) in shuffled-window order from position `start`; (−1, None) if the shard
        cannot be read."""
        window: list[dict[str, Any]] = []
        position, first_index = 0, 0

        def flush() -> Iterator[tuple[int, dict[str, Any]]]:
            nonlocal position
            order = np.random.default_rng([self._seed, epoch, shard_id, first_index]).permutation(len(window))
            for i in order:
                if position >= start:
                    yield first_index + int(i), window[i]
                position += 1

        try:
            for index, sample in enumerate(read_tar_samples(self._urls[shard_id])):
                if not window:
                    first_index = index
                # Windows wholly before the cursor are only read, not kept.
                window.append(sample if index // self._shuffle_window >= start // self._shuffle_window else {})
                if len(window) == self._shuffle_window:
                    yield from flush()
                    window = []
            yield from flush()
        except (OSError, tarfile.TarError, EOFError):
            yield -1, None

    def _raw(self, cursor: dict[str, int]) -> Iterator[tuple[dict[str, int], int, tuple[int, int], Any]]:
        """(cursor after the sample, epoch, sample id, raw sample or None) from `cursor` on, forever."""
        epoch, shard, sample, in_epoch = cursor["epoch"], cursor["shard"], cursor["sample"], cursor["in_epoch"]
        while True:
            shards = self._host_shards(epoch)
            while shard < len(shards) and (self._epoch_limit is None or in_epoch < self._epoch_limit):
                for index, raw in self._shard_samples(shards[shard], epoch, sample):
                    sample += 1
                    in_epoch += 1
                    next_cursor = {"epoch": epoch, "shard": shard, "sample": sample, "in_epoch": in_epoch}
                    yield next_cursor, epoch, (shards[shard], index), raw
                    if self._epoch_limit is not None and in_epoch >= self._epoch_limit:
                        break
                shard, sample = shard + 1, 0
            if in_epoch == 0:
                raise NoUsableDataError(f"the shards of host {self._process_index} hold no samples: {self._urls}")
            epoch, shard, sample, in_epoch = epoch + 1, 0, 0, 0

    def _raw_marked(self, cursor: dict[str, int]) -> Iterator[tuple[dict[str, int], int, tuple[int, int], Any]]:
        """`_raw`, each cursor saying whether its sample is the last of its epoch (`epoch_done`)."""
        samples = self._raw(cursor)
        current = next(samples)
        for upcoming in samples:
            after, epoch, sample_id, raw = current
            yield {**after, "epoch_done": int(upcoming[1] != epoch)}, epoch, sample_id, raw
            current = upcoming

    def _example(
        self, epoch: int, sample_id: tuple[int, int], raw: dict[str, Any] | None
    ) -> dict[str, np.ndarray] | str:
        if raw is None:
            return UNREADABLE_SHARD
        sample = {
            "image": _pick(raw, self._source.image_column, IMAGE_KEYS),
            "caption": _pick(raw, self._source.caption_column, CAPTION_KEYS),
        }
        if isinstance(sample["caption"], bytes):
            sample["caption"] = sample["caption"].decode("utf-8", errors="replace")
        return make_example(sample, self._transform, self._tokenizers, sample_rng(self._seed, epoch, *sample_id))

    def __iter__(self) -> "WebDatasetStream":
        return self

    def __next__(self) -> Element:
        if self._pool is None:
            cursor, epoch, sample_id, raw = next(self._reader)
            self._cursor = cursor
            return epoch, self._example(epoch, sample_id, raw)
        while len(self._pending) < 4 * self._workers:
            cursor, epoch, sample_id, raw = next(self._reader)
            self._pending.append((cursor, epoch, self._pool.submit(self._example, epoch, sample_id, raw)))
        self._cursor, epoch, future = self._pending.popleft()
        return epoch, future.result()

    @property
    def completed_epochs(self) -> int:
        """Epochs of which this host has returned every sample."""
        return self._cursor["epoch"] + self._cursor["epoch_done"]

    def get_state(self) -> dict[str, int]:
        return dict(self._cursor)

    def set_state(self, state: dict[str, int]) -> None:
        self._cursor = {k: int(state[k]) for k in ("epoch", "shard", "sample", "in_epoch", "epoch_done")}
        self._reader = self._raw_marked(self._cursor)
        self._pending: collections.deque = collections.deque()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
