"""The training input pipeline: per-epoch shuffled order, per-host share, background decoding, batches of numpy
arrays, and a checkpointable position.

Order. Global position p (an infinite stream, epoch = p // N) maps to sample `perm(seed + epoch)[p % N]` (grain's
index shuffle, O(1) memory). Host h of P takes positions h, h+P, h+2P, ...: global batch k is positions
[k*B*P, (k+1)*B*P), each sample exactly once per epoch over all hosts; batches may straddle an epoch boundary.

Workers. Decoding and augmentation run in `dataloader_num_workers` processes (grain `mp_prefetch`, each with a
few threads; 0 = threads in this process). Skips (corrupt images, empty captions) are only marked there and
dropped here, after the workers' outputs are interleaved back into order, so batches are identical whatever the
worker count.
"""

import collections
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

from jaxdiff.data.dreambooth import DreamBoothExamples, DreamBoothSpec
from jaxdiff.data.errors import DataConfigError, NoUsableDataError
from jaxdiff.data.sources import RandomAccessSource, SourceSpec, open_source
from jaxdiff.data.streams import Element, LoaderSpec
from jaxdiff.data.transforms import TransformSpec, make_example, sample_rng
from jaxdiff.data.webdataset import WebDatasetStream

#: Produces the example of sample `index` with the given generator, or a skip reason.
ExampleFn = Callable[[int, np.random.Generator], dict[str, np.ndarray] | str]

_THREADS_PER_WORKER = 2


def host_batch_size(global_batch_size: int, process_count: int) -> int:
    """This host's share of the global batch."""
    if global_batch_size % process_count:
        raise DataConfigError(
            f"the global batch size {global_batch_size} is not divisible by the number of hosts {process_count}"
        )
    return global_batch_size // process_count


def default_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(process_index, process_count), from jax when not given."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise DataConfigError(f"process_index={process_index} is not in [0, process_count={process_count})")
    return process_index, process_count


class DataIterator(grain.DatasetIterator):
    """Batches of one host: dicts of numpy arrays stacked from a stream of elements.

    Skipped samples are dropped and counted in `skipped` (reason -> count) for the trainer to log; an epoch
    without a single usable sample raises `NoUsableDataError`. `completed_epochs` says, as soon as a batch is
    returned, how many epochs have been read to their end, so an epoch that ends with a run's last batch counts.
    `get_state()` is a JSON-able dict and `set_state()` restores it in a freshly built pipeline, so a resumed run
    sees exactly the batches an uninterrupted one would. As a `grain.DatasetIterator` it saves with Orbax through
    `grain.checkpoint`.
    """

    def __init__(self, stream: Any, batch_size: int, samples_per_epoch: int | None, process_count: int = 1):
        super().__init__()
        self._stream = stream
        self.batch_size = batch_size
        #: Samples in one epoch over all hosts (None for streamed sources, whose length is unknown).
        self.samples_per_epoch = samples_per_epoch
        self._process_count = process_count
        self._skipped: collections.Counter[str] = collections.Counter()
        self._epoch = 0
        self._usable_in_epoch = 0
        self._consumed = 0  # stream elements read, skipped ones included

    @property
    def skipped(self) -> dict[str, int]:
        """Samples skipped so far (this run and the runs it resumes), by reason."""
        return dict(self._skipped)

    @property
    def completed_epochs(self) -> int:
        """Epochs read to their end by the batches returned so far.

        Random-access sources: epochs all of whose positions every host has read (hosts read in step, so they
        agree unless their skip counts differ). Streamed sources: epochs this host has read all its shards of.
        """
        if self.samples_per_epoch is None:
            return self._stream.completed_epochs
        return self._consumed * self._process_count // self.samples_per_epoch

    def __next__(self) -> dict[str, np.ndarray]:
        examples: list[dict[str, np.ndarray]] = []
        while len(examples) < self.batch_size:
            epoch, payload = next(self._stream)
            self._consumed += 1
            if epoch != self._epoch:
                if self._usable_in_epoch == 0:
                    raise NoUsableDataError(
                        f"no usable sample in epoch {self._epoch}: skipped so far {self.skipped} "
                        "(unreadable images, empty captions); check the dataset and image_column/caption_column"
                    )
                self._epoch, self._usable_in_epoch = epoch, 0
            if isinstance(payload, str):
                self._skipped[payload] += 1
                continue
            self._usable_in_epoch += 1
            examples.append(payload)
        return {key: np.stack([e[key] for e in examples]) for key in examples[0]}

    def get_state(self) -> dict[str, Any]:
        return {
            "stream": self._stream.get_state(),
            "skipped": dict(self._skipped),
            "epoch": self._epoch,
            "usable_in_epoch": self._usable_in_epoch,
            "consumed": self._consumed,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._stream.set_state(state["stream"])
        self._skipped = collections.Counter(state["skipped"])
        self._epoch, self._usable_in_epoch = state["epoch"], state["usable_in_epoch"]
        self._consumed = state["consumed"]

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> "DataIterator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _EpochAndIndex:
    """(position, shuffled index) -> (epoch, index); a class, not a lambda, so workers can unpickle it."""

    def __init__(self, num_samples: int):
        self.num_samples = num_samples

    def __call__(self, position: int, index: int) -> tuple[int, int]:
        return position // self.num_samples, index


class _Examples:
    """(epoch, index) -> (epoch, example or skip reason), with the sample's own generator."""

    def __init__(self, example_fn: ExampleFn, seed: int):
        self.example_fn, self.seed = example_fn, seed

    def __call__(self, epoch_and_index: tuple[int, int]) -> Element:
        epoch, index = epoch_and_index
        return epoch, self.example_fn(index, sample_rng(self.seed, epoch, index))


class RawExamples:
    """Example function of a raw source: decode and transform sample `index` (see `transforms.make_example`)."""

    def __init__(self, source: RandomAccessSource, transform: TransformSpec, tokenizers: Sequence[Any]):
        self.source, self.transform, self.tokenizers = source, transform, tuple(tokenizers)

    def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray] | str:
        return make_example(self.source[index], self.transform, self.tokenizers, rng)


def _mark_absl_flags_parsed() -> None:
    """grain's worker launch reads absl flags, which only absl apps parse; use their defaults otherwise."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def random_access_stream(
    example_fn: ExampleFn,
    num_samples: int,
    loader: LoaderSpec,
    host_batch: int,
    process_index: int,
    process_count: int,
) -> grain.DatasetIterator:
    """This host's infinite, shuffled stream of elements over samples 0..num_samples-1."""
    dataset = (
        grain.MapDataset.range(num_samples)
        .shuffle(seed=loader.seed)
        .repeat(None)
        .map_with_index(_EpochAndIndex(num_samples))[process_index::process_count]
        .map(_Examples(example_fn, loader.seed))
    )
    read_options = grain.ReadOptions(num_threads=_THREADS_PER_WORKER, prefetch_buffer_size=max(8, 2 * host_batch))
    stream = dataset.to_iter_dataset(read_options)
    if loader.dataloader_num_workers > 0:
        _mark_absl_flags_parsed()
        stream = stream.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=loader.dataloader_num_workers, per_worker_buffer_size=2)
        )
    return iter(stream)


def make_train_iterator(
    source: SourceSpec | DreamBoothSpec,
    transform: TransformSpec,
    loader: LoaderSpec,
    tokenizers: Sequence[Any] = (),
    *,
    latent_cache: Any = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> DataIterator:
    """This host's training batches, for every task and both backends.

    `tokenizers`: the model's CLIP tokenizer(s), one or two (SDXL); none for unconditional training. With a
    `latent_cache` (from `build_latent_cache`) batches carry the cached latent distribution and text embeddings
    instead of pixels and token ids.

    Batch keys (B = global batch / hosts): pixel_values (B, 3, H, W) float32 in [-1, 1], original_size and
    crop_top_left (B, 2) int32 (SDXL time ids), input_ids [input_ids_2] (B, L) int32; with a latent cache
    latent_mean and latent_logvar (B, C, h, w) float32, the `encode_text` outputs, original_size, crop_top_left.
    DreamBooth (a `DreamBoothSpec` source): the instance images' keys, and with prior preservation the paired class
    images' under ``class_`` keys.
    """
    process_index, process_count = default_process(process_index, process_count)
    batch = host_batch_size(loader.global_batch_size, process_count)
    if isinstance(source, DreamBoothSpec):
        example_fn: ExampleFn = DreamBoothExamples(source, transform, tokenizers)
        num_samples = len(example_fn)
    elif source.is_streamed:
        if latent_cache is not None:
            raise DataConfigError(
                "cache_latents=True needs a random-access source (dataset_name or train_data_dir), "
                f"not train_shards_path_or_url={source.train_shards_path_or_url!r}"
            )
        stream = WebDatasetStream(source, transform, tokenizers, loader, process_index, process_count)
        return DataIterator(stream, batch, samples_per_epoch=None)
    elif latent_cache is not None:
        example_fn = latent_cache.examples(transform)
        num_samples = len(latent_cache)
    else:
        raw = open_source(source, with_captions=bool(tokenizers))
        example_fn, num_samples = RawExamples(raw, transform, tokenizers), len(raw)
    stream = random_access_stream(example_fn, num_samples, loader, batch, process_index, process_count)
    return DataIterator(stream, batch, samples_per_epoch=num_samples, process_count=process_count)


def iterate_in_order(example_fn: ExampleFn, num_samples: int, seed: int = 0) -> Iterator[tuple[int, Any]]:
    """(index, example or skip reason) for every sample in source order, decoded by background threads.

    Used to fill the latent cache; epoch 0's generator per sample, which deterministic transforms ignore.
    """
    dataset = (
        grain.MapDataset.range(num_samples)
        .map_with_index(_EpochAndIndex(num_samples))
        .map(_Examples(example_fn, seed))
    )
    read_options = grain.ReadOptions(num_threads=2 * _THREADS_PER_WORKER, prefetch_buffer_size=16)
    for index, (_, payload) in enumerate(dataset.to_iter_dataset(read_options)):
        yield index, payload
