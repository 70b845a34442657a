"""Files jaxdiff writes get the umask's mode, also where tempfile and safetensors would give 0600."""

import contextlib
import os

import numpy as np
import pytest

from jaxdiff.files import atomic_write_bytes, honour_umask
from jaxdiff.metrics import save_config, save_validation_images
from jaxdiff.weights import write_state_dict


@contextlib.contextmanager
def _umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_writers_give_the_umask_mode(tmp_path, umask):
    with _umask(umask):
        atomic_write_bytes(tmp_path / "new" / "a.bin", b"data")
        config = save_config(tmp_path, "seed: 0\n")
        (png,) = save_validation_images(tmp_path, 1, ["a cat"], [np.zeros((1, 4, 4, 3), np.uint8)])
        write_state_dict({"w": np.zeros(3, np.float32)}, tmp_path / "unet", "model.safetensors")
    assert (tmp_path / "new" / "a.bin").read_bytes() == b"data"
    for path in (tmp_path / "new" / "a.bin", config, png, tmp_path / "unet" / "model.safetensors"):
        assert _mode(path) == 0o666 & ~umask, path
    assert [p.name for p in tmp_path.rglob(".*")] == []  # no temporary file left


def test_honour_umask_fixes_a_folder_but_not_what_its_links_point_to(tmp_path):
    outside = tmp_path / "blob"
    outside.write_bytes(b"x")
    os.chmod(outside, 0o600)
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "weights").write_bytes(b"w")
    os.chmod(folder / "sub" / "weights", 0o600)
    (folder / "link").symlink_to(outside)
    with _umask(0o022):
        honour_umask(folder)
    assert _mode(folder / "sub" / "weights") == 0o644
    assert _mode(outside) == 0o600
