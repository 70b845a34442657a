"""Training metrics, the resolved config and validation images, as written to ``output_dir``.

``metrics.jsonl`` is always written (one JSON object per ``log`` call, ``step`` first); TensorBoard and W&B
are optional extra writers chosen by ``report_to``. Only the main process writes anything.

Non-finite values (a NaN or infinite loss) are written as JSON ``null``: the file stays strict JSON that any
reader parses, and a null loss is as visible as a NaN one.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import jax
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from jaxdiff.config import ConfigError
from jaxdiff.files import atomic_write_bytes

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
SAMPLES_DIR = "samples"
_WANDB_ID_FILE = "wandb_run_id"

ReportTo = Literal["tensorboard", "wandb", "all", "none"]
_REPORT_TO = ("tensorboard", "wandb", "all", "none")


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN/inf loss; the last good checkpoint is kept."""


def check_finite_loss(loss: float, step: int, checkpoints_dir: str | os.PathLike) -> None:
    """Raises NonFiniteLossError naming the step when ``loss`` is NaN or infinite (check before checkpointing)."""
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"loss is {loss} at step {step}; training stopped, the last good checkpoint in {checkpoints_dir} is kept"
        )


def _json_value(value: Any) -> int | float | None:
    """A numpy/jax/python scalar as a JSON number; ints stay ints, non-finite floats become ``None``."""
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"metric values must be scalars, got shape {array.shape}")
    if array.dtype.kind in "biu":
        return int(array.item())
    number = float(array.item())
    return number if math.isfinite(number) else None


def _main_process(is_main_process: bool | None) -> bool:
    return jax.process_index() == 0 if is_main_process is None else is_main_process


def truncate_metrics(path: str | os.PathLike, step: int) -> None:
    """Drops the lines of a metrics.jsonl with ``step`` > ``step`` (and unreadable, e.g. half-written, lines)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    atomic_write_bytes(path, "".join(kept).encode())


class MetricsLogger:
    """Writes scalars to ``output_dir/metrics.jsonl`` and, per ``report_to``, TensorBoard and/or W&B.

    ``resume_step`` is the step training (re)starts from: lines logged past it by an interrupted run are dropped
    and TensorBoard events past it are purged, so a resumed run's logs read like an uninterrupted run's. Pass 0
    for a fresh run in a used output_dir; ``None`` appends to whatever is there. W&B runs resume under the id
    kept in ``output_dir/<logging_dir>/wandb_run_id``; ``WANDB_MODE=offline`` works as usual.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        report_to: ReportTo,
        logging_dir: str = "logs",
        project: str = "jaxdiff",
        config: dict[str, Any] | None = None,
        resume_step: int | None = None,
        is_main_process: bool | None = None,
    ) -> None:
        if report_to not in _REPORT_TO:
            raise ConfigError(f"report_to={report_to!r} is not supported; allowed: {', '.join(_REPORT_TO)}")
        self.output_dir = Path(output_dir)
        self.is_main_process = _main_process(is_main_process)
        self._file = None
        self._tensorboard = None
        self._wandb = None
        wants_wandb = report_to in ("wandb", "all")
        if wants_wandb:
            try:
                import wandb
            except ImportError as err:
                raise ConfigError(f"report_to={report_to!r} needs wandb: pip install wandb") from err
        if not self.is_main_process:
            return
        log_dir = self.output_dir / logging_dir
        if resume_step is not None:
            self.truncate_after(resume_step)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.output_dir / METRICS_FILE, "a")  # noqa: SIM115 (closed in close())
        if report_to in ("tensorboard", "all"):
            from tensorboardX import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tensorboard = SummaryWriter(logdir=str(log_dir), purge_step=purge)
        if wants_wandb:
            log_dir.mkdir(parents=True, exist_ok=True)
            id_file = log_dir / _WANDB_ID_FILE
            if not id_file.is_file():
                atomic_write_bytes(id_file, wandb.util.generate_id().encode())
            self._wandb = wandb.init(
                project=project, config=config, dir=str(log_dir), id=id_file.read_text().strip(), resume="allow"
            )

    def truncate_after(self, step: int) -> None:
        """Drops metrics.jsonl lines with a step past ``step`` (main process only; before logging resumes)."""
        if self.is_main_process:
            if self._file is not None:
                self._file.flush()
            truncate_metrics(self.output_dir / METRICS_FILE, step)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Appends ``{"step": step, **metrics}`` to metrics.jsonl and sends the scalars to the trackers."""
        if not self.is_main_process:
            return
        values = {name: _json_value(value) for name, value in metrics.items() if name != "step"}
        record = {"step": int(step), **values}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for name, value in values.items():
                self._tensorboard.add_scalar(name, math.nan if value is None else value, int(step))
        if self._wandb is not None:
            self._wandb.log(values, step=int(step))

    def log_images(self, tag: str, grid: np.ndarray, step: int) -> None:
        """Sends one uint8 HWC image (e.g. an ``image_grid``) to the trackers; metrics.jsonl holds no images."""
        if not self.is_main_process:
            return
        grid = _to_uint8(grid)
        if self._tensorboard is not None:
            self._tensorboard.add_image(tag, grid, int(step), dataformats="HWC")
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(grid)}, step=int(step))

    def close(self) -> None:
        """Flushes and closes every writer; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def save_config(output_dir: str | os.PathLike, config_yaml: str) -> Path:
    """Writes the resolved config to ``output_dir/config.yaml`` atomically; returns its path."""
    path = Path(output_dir) / CONFIG_FILE
    atomic_write_bytes(path, config_yaml.encode())
    return path


def _to_uint8(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
    return np.round(np.clip(images.astype(np.float32), 0.0, 1.0) * 255).astype(np.uint8)


def image_grid(images: np.ndarray, rows: int) -> np.ndarray:
    """Tiles ``(N, H, W, C)`` images (uint8, or float in [0, 1]) into ``rows`` rows, row-major, as uint8 HWC.

    Columns are ``ceil(N / rows)``; cells left over in the last row are black.
    """
    images = _to_uint8(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
    n, h, w, c = images.shape
    if not 1 <= rows <= max(n, 1) or n == 0:
        raise ValueError(f"rows must be between 1 and the number of images ({n}), got {rows}")
    cols = math.ceil(n / rows)
    cells = np.zeros((rows * cols, h, w, c), np.uint8)
    cells[:n] = images
    return cells.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def prompt_slug(prompt: str, max_length: int = 48) -> str:
    """A file-name-safe short form of a prompt: lowercase ASCII words joined by ``-`` (``"sample"`` if empty)."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return slug[:max_length].rstrip("-") or "sample"


def save_validation_images(
    output_dir: str | os.PathLike, step: int, prompts: list[str], images_per_prompt: list[np.ndarray]
) -> list[Path]:
    """Writes one PNG grid per prompt as ``output_dir/samples/step-<step>_<index>_<slug>.png``; returns the paths.

    ``images_per_prompt[i]`` is ``(N, H, W, 3)`` (uint8, or float in [0, 1]), laid out about square. Use ``""``
    prompts for unconditional models.
    """
    if len(prompts) != len(images_per_prompt):
        raise ValueError(f"got {len(prompts)} prompts but {len(images_per_prompt)} image batches")
    folder = Path(output_dir) / SAMPLES_DIR
    paths = []
    for index, (prompt, images) in enumerate(zip(prompts, images_per_prompt, strict=True)):
        rows = max(1, math.isqrt(len(images)))
        grid = image_grid(images, rows)
        path = folder / f"step-{int(step):07d}_{index:02d}_{prompt_slug(prompt)}.png"
        png = io.BytesIO()
        Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).save(png, format="PNG")
        atomic_write_bytes(path, png.getvalue())
        paths.append(path)
    return paths


def _format(value: Any) -> str:
    if isinstance(value, str):
        return value
    number = _json_value(value)
    return "nan" if number is None else f"{number:.4g}" if isinstance(number, float) else str(number)


class ProgressBar:
    """A tqdm bar over optimizer steps with e.g. loss, lr and samples/s; silent on non-main processes."""

    def __init__(self, total: int, initial: int = 0, *, desc: str = "train", is_main_process: bool | None = None):
        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit="step",
            dynamic_ncols=True,
            disable=not _main_process(is_main_process),
        )

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advances by ``n`` steps; keyword values (scalars or strings) replace the shown postfix."""
        if postfix:
            self._bar.set_postfix({k: _format(v) for k, v in postfix.items()}, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        """Ends the bar."""
        self._bar.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
