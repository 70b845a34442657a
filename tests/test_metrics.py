"""metrics.jsonl, TensorBoard, config.yaml, validation grids and the progress bar."""

import json
import struct
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto.event_pb2 import Event

from jaxdiff.config import ConfigError
from jaxdiff.metrics import (
    MetricsLogger,
    ProgressBar,
    image_grid,
    save_config,
    save_validation_images,
)


def _records(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _tensorboard_events(log_dir):
    """Events from TFRecord files: u64 length, u32 crc, payload, u32 crc per record."""
    for file in sorted(log_dir.glob("events.out.tfevents.*")):
        data, offset = file.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            yield Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 16 + length


def _tensorboard_scalars(log_dir):
    return [
        (value.tag, event.step, value.simple_value)
        for event in _tensorboard_events(log_dir)
        for value in event.summary.value
        if value.HasField("simple_value")
    ]


def test_log_writes_jsonl_step_first_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path, report_to="tensorboard", is_main_process=True) as logger:
        logger.log({"loss": jnp.float32(0.5), "lr": np.float64(1e-4), "skipped_images": np.int64(3)}, step=1)
        logger.log({"loss": float("nan"), "lr": 2e-4, "grad_norm": jnp.inf}, step=2)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert list(json.loads(lines[0])) == ["step", "loss", "lr", "skipped_images"]
    assert json.loads(lines[0]) == {"step": 1, "loss": 0.5, "lr": 1e-4, "skipped_images": 3}
    assert isinstance(json.loads(lines[0])["skipped_images"], int)
    # Non-finite values are null: the file stays strict JSON.
    assert json.loads(lines[1]) == {"step": 2, "loss": None, "lr": 2e-4, "grad_norm": None}
    assert "NaN" not in lines[1] and "Infinity" not in lines[1]
    scalars = _tensorboard_scalars(tmp_path / "logs")
    assert ("loss", 1, 0.5) in scalars and ("skipped_images", 1, 3.0) in scalars
    assert any(tag == "lr" and step == 2 for tag, step, _ in scalars)


def test_resume_appends_and_drops_steps_past_the_resume_step(tmp_path):
    with MetricsLogger(tmp_path, report_to="none", is_main_process=True) as logger:
        for step in (10, 20, 30):
            logger.log({"loss": step / 100}, step=step)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "lo')  # killed mid-write
    with MetricsLogger(tmp_path, report_to="none", resume_step=20, is_main_process=True) as logger:
        logger.log({"loss": 0.33}, step=30)
    assert _records(tmp_path) == [{"step": 10, "loss": 0.1}, {"step": 20, "loss": 0.2}, {"step": 30, "loss": 0.33}]
    # No resume step: appends to whatever is there.
    with MetricsLogger(tmp_path, report_to="none", is_main_process=True) as logger:
        logger.log({"loss": 0.4}, step=40)
    assert [r["step"] for r in _records(tmp_path)] == [10, 20, 30, 40]


def test_non_main_process_writes_nothing(tmp_path):
    with MetricsLogger(tmp_path / "out", report_to="tensorboard", is_main_process=False) as logger:
        logger.log({"loss": 1.0}, step=1)
        logger.log_images("samples", np.zeros((4, 4, 3), np.uint8), step=1)
    assert not (tmp_path / "out").exists()


def test_wandb_missing_is_a_config_error_at_construction(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError, match=r"report_to='all' needs wandb: pip install wandb"):
        MetricsLogger(tmp_path, report_to="all", is_main_process=True)
    assert not (tmp_path / "metrics.jsonl").exists()
    with pytest.raises(ConfigError, match=r"report_to='mlflow'.*allowed: tensorboard, wandb, all, none"):
        MetricsLogger(tmp_path, report_to="mlflow", is_main_process=True)


def test_wandb_run_is_resumed_under_a_kept_id(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    fake = types.SimpleNamespace(
        init=init, Image=lambda grid: ("image", grid.shape), util=types.SimpleNamespace(generate_id=lambda: "abc123")
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for _ in range(2):
        with MetricsLogger(tmp_path, report_to="wandb", project="p", config={"a": 1}, is_main_process=True) as logger:
            logger.log({"loss": 0.5}, step=3)
            logger.log_images("samples", np.zeros((4, 6, 3), np.uint8), step=3)
    inits = [c[1] for c in calls if c[0] == "init"]
    assert [i["id"] for i in inits] == ["abc123", "abc123"] and inits[0]["resume"] == "allow"
    assert inits[0]["project"] == "p" and inits[0]["config"] == {"a": 1}
    assert ("log", {"loss": 0.5}, 3) in calls and ("log", {"samples": ("image", (4, 6, 3))}, 3) in calls
    assert calls[-1] == ("finish",)
    assert not list(tmp_path.rglob("events.out.tfevents.*"))  # report_to=wandb: no TensorBoard
    assert [r["step"] for r in _records(tmp_path)] == [3, 3]


def test_save_config_replaces_atomically(tmp_path):
    save_config(tmp_path / "out", "learning_rate: 0.1\n")
    path = save_config(tmp_path / "out", "learning_rate: 0.2\n")
    assert path == tmp_path / "out" / "config.yaml"
    assert path.read_text() == "learning_rate: 0.2\n"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["config.yaml"]


def test_image_grid_layout_and_float_conversion():
    images = np.stack([np.full((2, 3, 3), i * 50, np.uint8) for i in range(1, 6)])
    grid = image_grid(images, rows=2)
    assert grid.shape == (4, 9, 3) and grid.dtype == np.uint8
    assert grid[0, 0, 0] == 50 and grid[0, 3, 0] == 100 and grid[0, 6, 0] == 150
    assert grid[2, 0, 0] == 200 and grid[2, 3, 0] == 250 and grid[2, 6, 0] == 0  # padded cell is black
    floats = image_grid(np.array([[[[0.0, 0.5, 1.2]]], [[[-1.0, 1.0, 0.2]]]]), rows=1)
    np.testing.assert_array_equal(floats, [[[0, 128, 255], [0, 255, 51]]])
    with pytest.raises(ValueError, match="rows must be between 1 and the number of images"):
        image_grid(images, rows=6)
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        image_grid(images[0], rows=1)


def test_save_validation_images_one_grid_per_prompt(tmp_path):
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), rng.random((2, 8, 8, 3))]
    paths = save_validation_images(tmp_path, 500, ["A photo of a Cat!", "a/b\\c"], batches)
    assert [p.name for p in paths] == ["step-0000500_00_a-photo-of-a-cat.png", "step-0000500_01_a-b-c.png"]
    assert all(p.parent == tmp_path / "samples" for p in paths)
    first = np.asarray(Image.open(paths[0]))
    np.testing.assert_array_equal(first, image_grid(batches[0], rows=2))
    assert np.asarray(Image.open(paths[1])).shape == (8, 16, 3)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == sorted(p.name for p in paths)


def test_progress_bar_shows_postfix_and_is_silent_off_main(capsys):
    with ProgressBar(total=10, initial=4, is_main_process=True) as bar:
        bar.update(2, loss=jnp.float32(0.123456), lr=1e-4, samples_per_s=np.float64(12.5))
    err = capsys.readouterr().err
    assert "6/10" in err and "loss=0.1235" in err and "lr=0.0001" in err and "samples_per_s=12.5" in err
    with ProgressBar(total=10, is_main_process=False) as bar:
        bar.update(1, loss=0.5)
    assert capsys.readouterr().err == ""
