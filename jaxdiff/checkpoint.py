"""Checkpoints (Orbax, async) of the train state and data position, resume resolution, and SIGTERM handling.

Layout: ``output_dir/checkpoints/<step>/`` holding ``train_state`` (the pytree of possibly sharded arrays, each
host writing its shards) and ``data_state/process_<i>-of-<n>.json`` (each host's JSON data-iterator state, written
by that host). A checkpoint counts only once Orbax has finished it: its step folder carries its final name (not
``<step>.orbax-checkpoint-tmp-*``), its commit marker and the items this process needs. The torch backend writes
the same ``checkpoints/<step>/`` folders (accelerate state, EMA, data positions) in a temporary folder, puts
``TORCH_COMMIT_FILE`` in last and renames it into place; such a folder counts as finished, so ``finished_steps``
and ``resolve_resume`` serve both backends.

Preemption: on one process, ``PreemptionGuard`` turns SIGTERM into a flag the trainer polls once per step. With
several processes the hosts must agree on the step they save at, so the guard leaves SIGTERM to JAX's preemption
service (``jax.distributed.initialize``) and ``should_stop(step)`` asks ``reached_preemption_sync_point``; the
``Checkpointer`` also saves at that step on its own (Orbax's preemption save policy).
"""

import dataclasses
import json
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from jaxdiff.config import ConfigError

TRAIN_STATE_ITEM = "train_state"
DATA_STATE_ITEM = "data_state"
#: Written last into a torch-backend checkpoint, before its folder is renamed to the step: its commit marker.
TORCH_COMMIT_FILE = "torch_checkpoint.json"


def data_state_file() -> str:
    """This host's file in the data_state item (each host has its own position in its share of the data)."""
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class DataStateHandler(ocp.CheckpointHandler):
    """Each host's JSON data-iterator state, written by that host (Orbax's JSON handler writes on process 0 only)."""

    def save(self, directory: Any, args: "DataStateSave") -> None:
        (directory / data_state_file()).write_text(json.dumps(args.item))

    def restore(self, directory: Any, args: "DataStateRestore | None" = None) -> dict[str, Any]:
        return json.loads((directory / data_state_file()).read_text())


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    item: dict[str, Any]


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


def _incomplete_reason(path: Path) -> str | None:
    """Why ``path`` is not a finished checkpoint step folder of this process, or None when it is one."""
    if not path.is_dir():
        return "no such folder"
    if not path.name.isdigit():
        return "not a step folder (its name must be the step number)"
    if (path / TORCH_COMMIT_FILE).is_file():
        return None  # a torch-backend checkpoint, only ever renamed into place whole
    if not ocp.path.step.is_path_finalized(path) or not (path / ocp.path.atomicity.COMMIT_SUCCESS_FILE).exists():
        return "unfinished (cut off while being written)"
    if not (path / TRAIN_STATE_ITEM).is_dir():
        return f"incomplete (missing {TRAIN_STATE_ITEM})"
    if not (path / DATA_STATE_ITEM / data_state_file()).is_file():
        found = sorted(p.name for p in (path / DATA_STATE_ITEM).glob("process_*.json"))
        return (
            f"missing {DATA_STATE_ITEM}/{data_state_file()}, this process's data position (the checkpoint holds "
            f"{found or 'none'}; resume with as many processes as wrote it)"
        )
    return None


def finished_steps(checkpoints_dir: str | Path) -> list[int]:
    """Steps of the finished checkpoints in ``checkpoints_dir``, ascending; half-written ones are left out."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and _incomplete_reason(p) is None)


def resolve_resume(
    resume_from_checkpoint: str | None, checkpoints_dir: str | Path, *, flag: str = "--resume_from_checkpoint"
) -> tuple[Path, int] | None:
    """Where training continues from: ``(step_folder, step)``, or None for a fresh start.

    ``"latest"`` is the newest finished checkpoint in ``checkpoints_dir`` (None when there is none, as diffusers
    does); anything else is a step folder, given as a path or as a step name inside ``checkpoints_dir``. ``flag``
    names the option in the error message.
    """
    if resume_from_checkpoint is None:
        return None
    root = Path(checkpoints_dir)
    if resume_from_checkpoint == "latest":
        steps = finished_steps(root)
        return (root / str(steps[-1]), steps[-1]) if steps else None
    path = Path(resume_from_checkpoint).expanduser()
    if not path.exists() and not path.is_absolute() and (root / path).exists():
        path = root / path
    reason = _incomplete_reason(path)
    if reason is not None:
        steps = finished_steps(root)
        found = f"finished checkpoints there: steps {steps}" if steps else "it holds no finished checkpoint"
        raise ConfigError(
            f"{flag}={resume_from_checkpoint!r}: {reason}. Allowed: 'latest' or a finished checkpoint step folder "
            f"such as {root / '<step>'} ({found})."
        )
    return path, int(path.name)


def _array_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Path -> (shape, dtype) of every array leaf: a train state's, or Orbax's metadata of a saved one (which stores
    named tuples as dicts and tuples as lists: paths name fields and indices alike)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path): (
            tuple(leaf.shape),
            np.dtype(leaf.dtype),
        )
        for path, leaf in leaves
        if hasattr(leaf, "shape")
    }


def _differences(saved: dict, wanted: dict, most: int = 3) -> list[str]:
    """The first ``most`` differences between two `_array_specs`."""
    found = [f"{path}: in the checkpoint, not in this run" for path in saved.keys() - wanted.keys()]
    found += [f"{path}: in this run, not in the checkpoint" for path in wanted.keys() - saved.keys()]
    found += [
        f"{path}: saved {saved[path][0]} {saved[path][1]}, this run {wanted[path][0]} {wanted[path][1]}"
        for path in saved.keys() & wanted.keys()
        if saved[path] != wanted[path]
    ]
    return sorted(found)[:most]


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class Checkpointer:
    """Saves and restores ``(train_state, data_state)`` under ``directory/<step>/`` with Orbax, asynchronously.

    All processes call every method; Orbax coordinates the hosts. Use as a context manager (or call
    ``close()``) so pending writes finish before the process exits.
    """

    def __init__(self, directory: str | Path, *, save_interval_steps: int, max_to_keep: int | None = None) -> None:
        if not _is_positive_int(save_interval_steps):
            raise ConfigError(f"--checkpointing_steps={save_interval_steps!r}: must be an integer >= 1.")
        if max_to_keep is not None and not _is_positive_int(max_to_keep):
            raise ConfigError(f"--checkpoints_total_limit={max_to_keep!r}: must be an integer >= 1 (unset: keep all).")
        self.directory = Path(directory).absolute()
        self.save_interval_steps = save_interval_steps
        options = ocp.CheckpointManagerOptions(
            # Interval saves plus the multi-host preemption sync step; no "first step" save.
            save_decision_policy=checkpoint_managers.AnySavePolicy(
                [
                    checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
                    checkpoint_managers.PreemptionCheckpointingPolicy(),
                ]
            ),
            preservation_policy=checkpoint_managers.LatestN(n=max_to_keep),
            cleanup_tmp_directories=True,
            enable_async_checkpointing=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, train_state: Any, data_state: Mapping[str, Any], *, force: bool = False) -> bool:
        """Starts an async save when ``step`` is on the interval, ``force`` or the multi-host preemption sync step.

        Returns whether a save started.

        A step already saved is not saved again (a forced save right after an interval save returns False).
        """
        step = int(step)
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(
            **{
                TRAIN_STATE_ITEM: ocp.args.StandardSave(train_state),
                DATA_STATE_ITEM: DataStateSave(dict(data_state)),
            }
        )
        return bool(self._manager.save(step, args=args, force=force))

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step (saves still in flight do not count), or None."""
        steps = finished_steps(self.directory)
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Steps of all finished checkpoints, ascending."""
        return finished_steps(self.directory)

    def restore(
        self, step: int, abstract_train_state: Any, *, directory: str | Path | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Restores ``(train_state, data_state)`` of ``step``.

        ``abstract_train_state`` is the target tree (``jax.ShapeDtypeStruct`` leaves with ``sharding``): arrays
        come back laid out as it says, whatever sharding they were saved with. ``directory`` restores from
        another checkpoints folder (e.g. the parent of a ``--resume_from_checkpoint`` path).
        """
        self._manager.wait_until_finished()  # a step saved moments ago may still be in flight
        root = self.directory if directory is None else Path(directory).absolute()
        reason = _incomplete_reason(root / str(int(step)))
        if reason is not None:
            raise ConfigError(f"checkpoint {root / str(int(step))}: {reason}; finished steps: {finished_steps(root)}.")
        args = ocp.args.Composite(
            **{
                TRAIN_STATE_ITEM: ocp.args.StandardRestore(abstract_train_state),
                DATA_STATE_ITEM: DataStateRestore(),
            }
        )
        saved = ocp.StandardCheckpointer().metadata(root / str(int(step)) / TRAIN_STATE_ITEM).item_metadata.tree
        differences = _differences(_array_specs(saved), _array_specs(abstract_train_state))
        if differences:
            raise ConfigError(
                f"checkpoint {root / str(int(step))} does not fit this run's train state (saved with another model, "
                f"--use_8bit_adam, --use_ema, --lora_rank or --train_text_encoder?): {'; '.join(differences)}"
            )
        restored = self._manager.restore(int(step), args=args, directory=root)
        return restored[TRAIN_STATE_ITEM], dict(restored[DATA_STATE_ITEM])

    def wait_until_finished(self) -> None:
        """Blocks until pending async saves are written and committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PreemptionGuard:
    """Turns SIGTERM (TPU VM preemption) into a flag the trainer polls once per step.

    The handler only sets the flag; the trainer then saves a forced checkpoint and exits cleanly. The
    previous handler is restored on exit. With several JAX processes no handler is installed (JAX's preemption
    service owns SIGTERM there) and ``should_stop`` relies on ``reached_preemption_sync_point`` instead.

    ``jax_multiprocess`` says whether that is the case (default: ``jax.process_count() > 1``). The torch backend
    passes False: every process installs the handler, and the processes agree on the stop step themselves.
    """

    def __init__(self, *, jax_multiprocess: bool | None = None) -> None:
        self._event = threading.Event()
        self._previous: Any = None
        self._installed = False
        self._jax_multiprocess = jax_multiprocess

    def _multiprocess(self) -> bool:
        if self._jax_multiprocess is None:
            self._jax_multiprocess = jax.process_count() > 1
        return self._jax_multiprocess

    @property
    def requested(self) -> bool:
        """Whether SIGTERM arrived since the guard was entered."""
        return self._event.is_set()

    def should_stop(self, step: int) -> bool:
        """Whether to save and exit after ``step``: SIGTERM seen (one process) or all hosts at the sync point."""
        if self.requested:
            return True
        if self._multiprocess():
            try:
                return bool(multihost_utils.reached_preemption_sync_point(int(step)))
            except RuntimeError:  # preemption service disabled
                return False
        return False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._event.set()

    def __enter__(self) -> "PreemptionGuard":
        self._event.clear()
        if not self._multiprocess() and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False
