"""Torch checkpoints count as finished only when whole, through the shared resolve_resume / finished_steps."""

import json

import pytest
from accelerate import Accelerator

from jaxdiff.checkpoint import TORCH_COMMIT_FILE, finished_steps, resolve_resume
from jaxdiff.config import ConfigError
from torch_backend.checkpoint import TMP_SUFFIX, TorchCheckpointer


def _step_folder(root, name, *, finished):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    if finished:
        (folder / TORCH_COMMIT_FILE).write_text(json.dumps({"step": 0, "num_processes": 1}))
    return folder


def test_only_finished_torch_checkpoints_are_listed_and_resumed(tmp_path):
    root = tmp_path / "checkpoints"
    _step_folder(root, "2", finished=True)
    _step_folder(root, "4", finished=True)
    _step_folder(root, f"6{TMP_SUFFIX}", finished=False)  # being written when the run was killed
    _step_folder(root, "8", finished=False)  # no commit marker
    assert finished_steps(root) == [2, 4]
    assert resolve_resume("latest", root) == (root / "4", 4)
    assert resolve_resume("2", root) == (root / "2", 2)
    for cut_off in ("8", str(root / f"6{TMP_SUFFIX}")):
        with pytest.raises(ConfigError, match="--resume_from_checkpoint"):
            resolve_resume(cut_off, root)


def test_leftovers_are_cleared_and_a_jax_checkpoint_is_refused(tmp_path):
    root = tmp_path / "checkpoints"
    leftover = _step_folder(root, f"6{TMP_SUFFIX}", finished=False)
    jax_checkpoint = _step_folder(root, "3", finished=False)
    checkpointer = TorchCheckpointer(Accelerator(cpu=True), root, save_interval_steps=2, max_to_keep=1)
    assert not leftover.exists()
    with pytest.raises(ConfigError, match="written by the jax backend"):
        checkpointer.restore(jax_checkpoint)
