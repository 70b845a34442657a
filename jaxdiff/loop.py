"""The training loop both backends run, written once: step, log, checkpoint, validate, preempt, export.

A backend's trainer subclasses `TrainLoop` and supplies what is framework-specific: its step, fetching the
step metrics from the devices, its checkpoints, validation and export. `train()` is the schedule around them.
"""

import abc
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jaxdiff import cli, run
from jaxdiff.checkpoint import PreemptionGuard
from jaxdiff.config import TrainConfig
from jaxdiff.data import DataIterator
from jaxdiff.metrics import MetricsLogger, ProgressBar, save_config, save_validation_images

log = logging.getLogger("jaxdiff")

#: (step, metrics as the step returned them, still on the device).
Pending = list[tuple[int, dict[str, Any]]]


class TrainLoop(abc.ABC):
    """Runs to ``max_steps`` from ``start_step``, or until preempted, then exports.

    Subclasses set these attributes before `train()` and implement the abstract hooks."""

    config: TrainConfig
    out: Path
    is_main: bool
    data: DataIterator
    max_steps: int
    start_step: int
    #: Rows of data one optimizer step consumes, over all processes (for samples/s).
    samples_per_step: int
    #: Whether the SIGTERM check is coordinated through JAX's distributed service (the JAX backend).
    jax_preemption_sync: bool = True

    # ---- hooks ---------------------------------------------------------------------------------------------

    def checkpoints(self) -> contextlib.AbstractContextManager:
        """Entered around the loop; leaving it waits for checkpoints still being written."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def run_step(self, step: int) -> dict[str, Any]:
        """Optimizer step ``step + 1`` on the next batch; its metrics (loss, grad_norm, lr), unfetched."""

    @abc.abstractmethod
    def fetch_metrics(self, pending: Pending) -> list[tuple[int, dict[str, float]]]:
        """The pending steps' metrics as floats (one device sync), the loss averaged over processes."""

    @abc.abstractmethod
    def save_checkpoint(self, step: int, *, force: bool = False) -> None:
        """A checkpoint of ``step`` when the interval says so (always with ``force``)."""

    @abc.abstractmethod
    def validate(self, step: int, metrics_logger: MetricsLogger) -> None:
        """Validation samples of the current (EMA) weights, written and logged by the main process."""

    @abc.abstractmethod
    def export(self) -> None:
        """The final pipeline at ``out`` (and its upload); every process calls it."""

    def write_validation(self, step: int, grids: list[np.ndarray], metrics_logger: MetricsLogger) -> None:
        """The main process's part of `validate`: one PNG grid per validation prompt, also sent to the trackers."""
        for path in save_validation_images(self.out, step, run.validation_prompts(self.config), grids):
            metrics_logger.log_images(f"validation/{path.stem}", np.asarray(Image.open(path).convert("RGB")), step)

    def should_validate(self, step: int, epochs_before: int) -> bool:
        """Whether to validate after ``step`` (the config's step or epoch schedule)."""
        return run.should_validate(self.config, step, epochs_before, self.data.completed_epochs)

    def should_export(self, step: int, epochs_before: int) -> bool:
        """Whether to export before the end, after ``step`` (--save_model_epochs)."""
        return step < self.max_steps and run.should_export(self.config, epochs_before, self.data.completed_epochs)

    def should_stop(self, preemption: PreemptionGuard, step: int) -> bool:
        """Whether SIGTERM was received (every process must agree, so that all save the same step)."""
        return preemption.should_stop(step)

    # ---- the loop ------------------------------------------------------------------------------------------

    def train(self) -> None:
        """Run to max_steps (or until preempted), checkpointing, logging and validating on the way."""
        cfg = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            save_config(self.out, cli.to_yaml(cfg))
        start = self.start_step
        with (
            self.checkpoints(),
            self.data,
            MetricsLogger(
                self.out,
                report_to=cfg.report_to,
                logging_dir=cfg.logging_dir,
                project=cfg.tracker_project_name,
                config=cfg.model_dump(mode="json"),
                resume_step=start,
                is_main_process=self.is_main,
            ) as metrics_logger,
            PreemptionGuard(jax_multiprocess=None if self.jax_preemption_sync else False) as preemption,
            ProgressBar(total=self.max_steps, initial=start, is_main_process=self.is_main) as progress,
        ):
            pending: Pending = []
            tick = time.perf_counter()
            step, validated = start, None
            while step < self.max_steps:
                epochs = self.data.completed_epochs
                metrics = self.run_step(step)
                step += 1
                pending.append((step, metrics))
                # Metrics are checked for a non-finite loss before any checkpoint that would contain it.
                if step % cfg.logging_steps == 0 or step % cfg.checkpointing_steps == 0 or step == self.max_steps:
                    tick = self._flush_metrics(pending, tick, metrics_logger, progress)
                    pending = []
                self.save_checkpoint(step)
                if self.should_validate(step, epochs):
                    self.validate(step, metrics_logger)
                    validated = step
                if self.should_export(step, epochs):
                    self.export()
                if self.should_stop(preemption, step):
                    if pending:
                        self._flush_metrics(pending, tick, metrics_logger, progress)
                    self.save_checkpoint(step, force=True)
                    log.warning("SIGTERM received: checkpoint saved at step %d, exiting", step)
                    return
            self.save_checkpoint(step, force=True)
            if run.should_validate_final(cfg, step, validated):
                self.validate(step, metrics_logger)
        self.export()

    def _flush_metrics(self, pending: Pending, tick: float, logger: MetricsLogger, progress: ProgressBar) -> float:
        return run.log_steps(
            self.fetch_metrics(pending),
            tick,
            samples_per_step=self.samples_per_step,
            skipped=self.data.skipped,
            logger=logger,
            progress=progress,
            checkpoints_dir=self.out / "checkpoints",
        )
