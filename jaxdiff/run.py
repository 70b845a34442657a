"""The run-level rules both trainers follow (JAX and torch alike); framework-free.

Where output goes and what it may overwrite, how long a run is, when it validates, where the latent cache
lives, which host-drawn randoms belong to which process, what a metrics row holds, and what is kept off the Hub.
"""

import logging
import math
import re
import time
from pathlib import Path

import numpy as np

from jaxdiff.config import ConfigError, TrainConfig
from jaxdiff.data import LatentCache, SourceSpec, TransformSpec, build_latent_cache
from jaxdiff.metrics import MetricsLogger, ProgressBar, check_finite_loss
from jaxdiff.tasks.base import LatentCacheTask

log = logging.getLogger("jaxdiff")

EMA_DEFAULT_DECAY = 0.9999
LATENT_CACHE_DIR = "latent_cache"  # default folder under output_dir


def check_output_dir(config: TrainConfig) -> None:
    """Never clobber a previous run: a non-empty output_dir needs resuming or --overwrite_output_dir."""
    if re.match(r"^[a-z][a-z0-9+.-]*://", config.output_dir):
        raise ConfigError(
            f"--output_dir={config.output_dir!r}: a URL; output_dir must be a local path (for a bucket, mount it, "
            "e.g. with gcsfuse, and pass the mount point)"
        )
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir={config.output_dir!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (config.resume_from_checkpoint or config.overwrite_output_dir):
        raise ConfigError(
            f"--output_dir={config.output_dir!r} is not empty; pass --resume_from_checkpoint latest to continue "
            "that run, --overwrite_output_dir to write into it anyway, or choose another folder"
        )


def max_train_steps(config: TrainConfig, samples_per_epoch: int | None, step_batch_size: int) -> int:
    """Optimizer steps of the run: --max_train_steps, else epochs x ceil(epoch / samples per step)."""
    if config.max_train_steps:
        return config.max_train_steps
    if samples_per_epoch is None:
        raise ConfigError(
            "--max_train_steps is needed with a streamed source (--train_shards_path_or_url): "
            "its epoch length is unknown"
        )
    return config.num_train_epochs * math.ceil(samples_per_epoch / step_batch_size)


def validation_prompts(config: TrainConfig) -> list[str]:
    """The prompt of each grid a validation samples: --validation_prompts, or for an unconditional model one grid
    (prompt "")."""
    return [""] if config.task == "unconditional" else list(config.validation_prompts or [])


def _epochs_crossed(every: int | None, epochs_before: int, epochs_after: int) -> bool:
    """Whether a multiple of ``every`` epochs was completed between the two counts (a step may complete several
    epochs of a tiny dataset)."""
    return bool(every) and epochs_after // every > epochs_before // every


def should_validate(config: TrainConfig, step: int, epochs_before: int, epochs_after: int) -> bool:
    """Whether to sample the validation prompts after ``step``, given the data's completed epochs before and
    after its batch."""
    if config.validation_steps:
        return step % config.validation_steps == 0
    return _epochs_crossed(config.validation_epochs, epochs_before, epochs_after)


def should_export(config: TrainConfig, epochs_before: int, epochs_after: int) -> bool:
    """Whether to export the pipeline after a step that took the data's completed epochs from ``epochs_before`` to
    ``epochs_after`` (--save_model_epochs; the final export happens anyway)."""
    return _epochs_crossed(config.save_model_epochs, epochs_before, epochs_after)


def should_validate_final(config: TrainConfig, step: int, last_validated: int | None) -> bool:
    """Whether to sample the final weights after the last ``step``: always when there is something to sample (as
    diffusers' scripts do), unless the loop has just validated that step."""
    return bool(validation_prompts(config)) and last_validated != step


def open_latent_cache(
    config: TrainConfig, task: LatentCacheTask, source: SourceSpec, transform: TransformSpec, batch_size: int
) -> LatentCache | None:
    """With --cache_latents, the task's cache of VAE latents and text states (encoded now unless on disk)."""
    if not config.cache_latents:
        return None
    if config.train_text_encoder:
        raise ConfigError(
            "--cache_latents caches the text encoder's outputs, which --train_text_encoder changes; use one"
        )
    folder = Path(config.latent_cache_dir) if config.latent_cache_dir else Path(config.output_dir) / LATENT_CACHE_DIR
    log.info("latent cache in %s (encoding the dataset once if it is not there yet)", folder)
    return build_latent_cache(
        source,
        transform,
        task.tokenizers,
        task.encode_images,
        task.encode_text,
        model_fingerprint=task.cache_fingerprint(),
        latent_cache_dir=folder,
        batch_size=batch_size,
    )


def process_rows(draws: dict[str, np.ndarray], process_index: int, process_count: int) -> dict[str, np.ndarray]:
    """This process's rows of a step's host draws: the data pipeline deals samples to processes round-robin,
    so row r of the global draws goes with the sample at global position r whatever the process count."""
    return {k: v[process_index::process_count] for k, v in draws.items()}


def host_major_positions(rows: int, process_count: int) -> np.ndarray:
    """The global position of each row of a batch assembled from the hosts' rows (host-major: host h's local row
    i, the sample at global position i * process_count + h, is row h * rows_per_host + i)."""
    per_host = rows // process_count
    row = np.arange(rows)
    return (row % per_host) * process_count + row // per_host


def hub_ignore(config: TrainConfig) -> tuple[str, ...]:
    """Folders of output_dir that stay off the Hub."""
    return ("checkpoints", LATENT_CACHE_DIR, config.logging_dir)


def log_steps(
    rows: list[tuple[int, dict[str, float]]],
    tick: float,
    *,
    samples_per_step: int,
    skipped: dict[str, int],
    logger: MetricsLogger,
    progress: ProgressBar,
    checkpoints_dir: Path,
) -> float:
    """Writes the fetched (step, {loss, lr, grad_norm}) rows since ``tick`` with throughput and skip counts,
    stopping on a non-finite loss; returns the new tick. Call it right after fetching the rows."""
    now = time.perf_counter()
    step_time = (now - tick) / len(rows)
    samples_per_s = samples_per_step / step_time
    skipped_counts = {f"skipped_{k}": v for k, v in skipped.items()}
    for step, row in rows:
        check_finite_loss(row["loss"], step, checkpoints_dir)
        logger.log({**row, "step_time_s": step_time, "samples_per_s": samples_per_s, **skipped_counts}, step)
    progress.update(len(rows), loss=row["loss"], lr=row["lr"], samples_per_s=samples_per_s)
    return now
