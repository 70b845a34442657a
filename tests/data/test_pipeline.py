"""Sources, bad data, order, resume, hosts and workers of the training input pipeline."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from jaxdiff.data.errors import DataConfigError, NoUsableDataError
from jaxdiff.data.pipeline import RawExamples, iterate_in_order, make_train_iterator
from jaxdiff.data.sources import SourceSpec, open_source
from jaxdiff.data.streams import LoaderSpec
from jaxdiff.data.transforms import EMPTY_CAPTION, UNREADABLE_IMAGE, TransformSpec
from jaxdiff.demo import NUM_SAMPLES, shape_samples, write_imagefolder

CENTER = TransformSpec(resolution=32, center_crop=True)
AUGMENT = TransformSpec(resolution=32, center_crop=False, random_flip=True, proportion_empty_prompts=0.3)


def _batches(source, transform, tokenizer, n, *, batch=4, seed=0, workers=0, host=(0, 1), state=None):
    loader = LoaderSpec(global_batch_size=batch, seed=seed, dataloader_num_workers=workers)
    with make_train_iterator(
        source, transform, loader, [tokenizer], process_index=host[0], process_count=host[1]
    ) as it:
        if state is not None:
            it.set_state(json.loads(json.dumps(state)))
        return [next(it) for _ in range(n)], it.get_state(), it.skipped


def _sample_keys(batches) -> list[str]:
    """One hash per sample of its pixels and token ids, to compare sets of samples across sources."""
    return [
        hashlib.sha256(b["pixel_values"][i].tobytes() + b["input_ids"][i].tobytes()).hexdigest()
        for b in batches
        for i in range(len(b["pixel_values"]))
    ]


def _assert_same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.fixture(scope="module")
def all_sources(imagefolder_jsonl, imagefolder_csv, hf_dataset_dir, tfds_data_dir, webdataset_shards):
    return {
        "imagefolder_jsonl": SourceSpec(train_data_dir=str(imagefolder_jsonl)),
        "imagefolder_csv": SourceSpec(train_data_dir=str(imagefolder_csv)),
        "hf_saved": SourceSpec(dataset_name=str(hf_dataset_dir), image_column="picture", caption_column="description"),
        "tfds": SourceSpec(dataset_name="tfds:tiny_shapes", tfds_data_dir=str(tfds_data_dir)),
        "webdataset": SourceSpec(train_shards_path_or_url=webdataset_shards),
    }


def test_every_source_gives_the_same_samples(all_sources, tiny_tokenizer):
    epochs = {}
    for name, source in all_sources.items():
        batches, _, skipped = _batches(source, CENTER, tiny_tokenizer, NUM_SAMPLES // 4)
        assert skipped == {}, name
        batch = batches[0]
        assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["pixel_values"].dtype == np.float32
        assert batch["input_ids"].shape == (4, 16) and batch["input_ids"].dtype == np.int32
        assert batch["original_size"].tolist() == [[40, 48]] * 4
        assert batch["crop_top_left"].tolist() == [[0, 3]] * 4  # 48x40 -> 38x32, centre crop 32
        assert batch["pixel_values"].min() >= -1.0 and batch["pixel_values"].max() <= 1.0
        epochs[name] = sorted(_sample_keys(batches))
    reference = epochs.pop("imagefolder_jsonl")
    assert len(set(reference)) == NUM_SAMPLES  # one epoch is every sample once
    for name, keys in epochs.items():
        assert keys == reference, name


def test_corrupt_images_and_empty_captions_are_skipped_and_counted(corrupt_imagefolder, tiny_tokenizer):
    folder, unreadable, empty = corrupt_imagefolder
    raw = open_source(SourceSpec(train_data_dir=str(folder)))
    payloads = [p for _, p in iterate_in_order(RawExamples(raw, CENTER, [tiny_tokenizer]), len(raw))]
    assert payloads.count(UNREADABLE_IMAGE) == unreadable and payloads.count(EMPTY_CAPTION) == empty

    good = NUM_SAMPLES - unreadable - empty
    batches, _, skipped = _batches(SourceSpec(train_data_dir=str(folder)), CENTER, tiny_tokenizer, 2, batch=good)
    assert len(set(_sample_keys(batches[:1]))) == good  # the first batch is exactly epoch 0's usable samples
    # Two epochs of usable samples went by: every bad sample of epoch 0 and at most those of epoch 1 were counted.
    assert unreadable <= skipped[UNREADABLE_IMAGE] <= 2 * unreadable
    assert empty <= skipped[EMPTY_CAPTION] <= 2 * empty


def test_nothing_usable_is_one_clear_error(tmp_path, tiny_tokenizer):
    folder = write_imagefolder(tmp_path / "bad", [(b"garbage", "a red circle")] * 3)
    with pytest.raises(NoUsableDataError, match="no usable sample"):
        _batches(SourceSpec(train_data_dir=str(folder)), CENTER, tiny_tokenizer, 1, batch=2)


def test_missing_column_names_field_value_and_columns(hf_dataset_dir, webdataset_shards):
    with pytest.raises(DataConfigError) as error:
        open_source(SourceSpec(dataset_name=str(hf_dataset_dir), image_column="picture", caption_column="text"))
    assert "caption_column='text'" in str(error.value) and "['picture', 'description']" in str(error.value)
    loader = LoaderSpec(global_batch_size=2)
    wds = SourceSpec(train_shards_path_or_url=webdataset_shards, image_column="jpg")
    with pytest.raises(DataConfigError, match=r"image_column='jpg'.*keys: \['png', 'txt'\]"):
        make_train_iterator(wds, CENTER, loader, [object()], process_index=0, process_count=1)


def test_default_columns_follow_diffusers(hf_dataset_dir):
    source = open_source(SourceSpec(dataset_name=str(hf_dataset_dir)))  # no image/text: first and second column
    sample = source[0]
    assert isinstance(sample["caption"], str) and sample["caption"].startswith("a ")
    assert isinstance(sample["image"]["bytes"], bytes)


@pytest.mark.parametrize("name", ["imagefolder_jsonl", "webdataset"])
def test_resumed_iterator_continues_exactly(all_sources, tiny_tokenizer, name):
    source = all_sources[name]
    uninterrupted, _, _ = _batches(source, AUGMENT, tiny_tokenizer, 5, batch=4, seed=3)
    first, state, _ = _batches(source, AUGMENT, tiny_tokenizer, 2, batch=4, seed=3)
    resumed, _, _ = _batches(source, AUGMENT, tiny_tokenizer, 3, batch=4, seed=3, state=state)
    _assert_same(uninterrupted, first + resumed)
    # The order reshuffles each epoch and augmentation differs between epochs.
    assert _sample_keys(uninterrupted[:3]) != _sample_keys(uninterrupted[3:5] + uninterrupted[:1])


@pytest.mark.parametrize("name", ["imagefolder_jsonl", "webdataset"])
def test_two_hosts_see_every_sample_once_per_epoch(all_sources, tiny_tokenizer, name):
    source = all_sources[name]
    keys = []
    for host in range(2):
        batches, _, _ = _batches(source, CENTER, tiny_tokenizer, NUM_SAMPLES // 4, batch=4, host=(host, 2))
        assert batches[0]["pixel_values"].shape[0] == 2  # each host yields its half of the global batch
        keys += _sample_keys(batches)
    assert len(keys) == 2 * NUM_SAMPLES // 2 and len(set(keys)) == NUM_SAMPLES


def test_batches_do_not_depend_on_worker_count(all_sources, tiny_tokenizer):
    source = all_sources["imagefolder_jsonl"]
    serial, _, _ = _batches(source, AUGMENT, tiny_tokenizer, 4, batch=4, seed=5, workers=0)
    parallel, _, _ = _batches(source, AUGMENT, tiny_tokenizer, 4, batch=4, seed=5, workers=2)
    _assert_same(serial, parallel)
    wds = all_sources["webdataset"]
    _assert_same(
        _batches(wds, AUGMENT, tiny_tokenizer, 4, workers=0)[0],
        _batches(wds, AUGMENT, tiny_tokenizer, 4, workers=2)[0],
    )


def test_max_train_samples_keeps_the_first_samples(imagefolder_jsonl):
    source = open_source(SourceSpec(train_data_dir=str(imagefolder_jsonl), max_train_samples=5))
    assert len(source) == 5
    assert [source[i]["caption"] for i in range(5)] == [c for _, c in shape_samples()[:5]]


def test_webdataset_pipe_urls(webdataset_shards, tiny_tokenizer, all_sources):
    first_shard = webdataset_shards.replace("{00000..00003}", "00000")
    assert Path(first_shard).is_file()
    piped = SourceSpec(train_shards_path_or_url=f"pipe:cat {first_shard}")
    plain = SourceSpec(train_shards_path_or_url=first_shard)
    _assert_same(_batches(piped, CENTER, tiny_tokenizer, 2)[0], _batches(plain, CENTER, tiny_tokenizer, 2)[0])


@pytest.mark.parametrize("name", ["imagefolder_jsonl", "webdataset"])
@pytest.mark.parametrize("hosts", [1, 2])
def test_an_epoch_counts_as_completed_with_its_last_batch(all_sources, tiny_tokenizer, name, hosts):
    loader = LoaderSpec(global_batch_size=4)
    per_epoch = NUM_SAMPLES // 4
    for host in range(hosts):
        with make_train_iterator(
            all_sources[name], CENTER, loader, [tiny_tokenizer], process_index=host, process_count=hosts
        ) as it:
            counts = [it.completed_epochs]
            for _ in range(2 * per_epoch):
                next(it)
                counts.append(it.completed_epochs)
            state = json.loads(json.dumps(it.get_state()))
        # Known when the epoch's last batch is returned, not when the next epoch's first one is fetched.
        assert counts == [0] * per_epoch + [1] * per_epoch + [2], (name, host)
        with make_train_iterator(
            all_sources[name], CENTER, loader, [tiny_tokenizer], process_index=host, process_count=hosts
        ) as resumed:
            resumed.set_state(state)
            assert resumed.completed_epochs == 2
            next(resumed)
            assert resumed.completed_epochs == 2


def test_a_batch_straddling_epochs_completes_the_first(all_sources, tiny_tokenizer):
    loader = LoaderSpec(global_batch_size=5)
    source = all_sources["imagefolder_jsonl"]
    with make_train_iterator(source, CENTER, loader, [tiny_tokenizer], process_index=0, process_count=1) as it:
        counts = [(next(it), it.completed_epochs)[1] for _ in range(3)]
    # Samples 1-5 and 6-10 of epoch 0, then its samples 11, 12 with 3 of epoch 1.
    assert counts == [0, 0, 1]
