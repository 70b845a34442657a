"""Checkpoints of the torch backend in jaxdiff's layout: ``output_dir/checkpoints/<step>/``.

A step folder holds accelerate's ``save_state`` (trained models, optimizer, LR scheduler, RNG states, and the
objects registered for checkpointing such as the EMA; with ``trained_only``, as for LoRA, only the models'
parameters that train) plus ``data_state_<process_index>.json`` (each process's
data-iterator position). It is written as ``<step>.torch-tmp``, gets ``TORCH_COMMIT_FILE`` last and is then
renamed into place, so ``jaxdiff.checkpoint.finished_steps`` / ``resolve_resume`` never list or load a
half-written one.
"""

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from jaxdiff.checkpoint import TORCH_COMMIT_FILE, finished_steps
from jaxdiff.config import ConfigError
from jaxdiff.files import honour_umask

TMP_SUFFIX = ".torch-tmp"


def data_state_file(process_index: int) -> str:
    return f"data_state_{process_index}.json"


def keep_trained_weights(models: list[torch.nn.Module], weights: list[dict[str, Any]], output_dir: str) -> None:
    """accelerate's save-state hook that keeps, of each model's state dict, only the parameters that train (LoRA
    adapters: a checkpoint of megabytes, not of the whole base model); such a checkpoint loads with strict=False."""
    for i, model in enumerate(models):
        trained = {name for name, param in model.named_parameters() if param.requires_grad}
        weights[i] = {key: value for key, value in weights[i].items() if key in trained}


class TorchCheckpointer:
    """Saves every ``save_interval_steps`` (or when forced) and keeps the newest ``max_to_keep``; all processes
    call every method."""

    def __init__(
        self,
        accelerator: Accelerator,
        directory: Path,
        *,
        save_interval_steps: int,
        max_to_keep: int | None,
        trained_only: bool = False,
    ):
        self.accelerator = accelerator
        self.trained_only = trained_only
        if trained_only:
            accelerator.register_save_state_pre_hook(keep_trained_weights)
        self.directory = Path(directory)
        self.save_interval_steps = save_interval_steps
        self.max_to_keep = max_to_keep
        if accelerator.is_main_process and self.directory.is_dir():
            for leftover in self.directory.glob(f"*{TMP_SUFFIX}"):  # cut off by a killed run
                shutil.rmtree(leftover, ignore_errors=True)
        accelerator.wait_for_everyone()

    def save(self, step: int, data_state: dict[str, Any], *, force: bool = False) -> bool:
        """Saves ``step`` when it is on the interval or ``force``; a step already saved is not saved again."""
        final = self.directory / str(step)
        if (step % self.save_interval_steps and not force) or final.exists():
            return False
        acc = self.accelerator
        tmp = self.directory / f"{step}{TMP_SUFFIX}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        (tmp / data_state_file(acc.process_index)).write_text(json.dumps(data_state))
        acc.wait_for_everyone()
        if acc.is_main_process:
            honour_umask(tmp)  # accelerate's save_state writes its safetensors with mode 0600
            (tmp / TORCH_COMMIT_FILE).write_text(json.dumps({"step": step, "num_processes": acc.num_processes}))
            tmp.rename(final)
            self._prune()
        acc.wait_for_everyone()
        return True

    def _prune(self) -> None:
        if self.max_to_keep is None:
            return
        for step in finished_steps(self.directory)[: -self.max_to_keep]:
            shutil.rmtree(self.directory / str(step))

    def restore(self, path: Path) -> dict[str, Any]:
        """Loads the accelerate state saved in the step folder ``path``; returns this process's data state."""
        marker = path / TORCH_COMMIT_FILE
        if not marker.is_file():
            raise ConfigError(
                f"--resume_from_checkpoint: {path} was written by the jax backend; resume it with --backend jax"
            )
        saved_processes = json.loads(marker.read_text())["num_processes"]
        if saved_processes != self.accelerator.num_processes:
            raise ConfigError(
                f"--resume_from_checkpoint: {path} was saved by {saved_processes} processes; resume it with the "
                f"same number (this run has {self.accelerator.num_processes})"
            )
        self.accelerator.load_state(str(path), strict=not self.trained_only)
        return json.loads((path / data_state_file(self.accelerator.process_index)).read_text())
