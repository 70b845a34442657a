"""Files jaxdiff writes get the permissions the user's umask asks for, as files written with ``open`` do.

Two common writers do not: ``tempfile.mkstemp`` (behind atomic writes) creates its file with mode 0600, and so
does safetensors' ``save_file`` (numpy and torch alike, hence diffusers' and accelerate's ``save_pretrained`` and
``save_state``). A serving container running as another user could then not read an exported pipeline.
"""

import os
import tempfile
from pathlib import Path


def umask_file_mode() -> int:
    """The mode ``open`` gives a new file under the current umask (0o644 for umask 022)."""
    # The umask can only be read by setting it; the brief restrictive value can only narrow, never widen, what a
    # file created meanwhile by another thread gets.
    umask = os.umask(0o077)
    os.umask(umask)
    return 0o666 & ~umask


def honour_umask(path: str | os.PathLike) -> None:
    """Gives the file ``path``, or every file under the folder ``path``, the mode the umask asks for."""
    path = Path(path)
    mode = umask_file_mode()
    files = [path] if not path.is_dir() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    for file in files:
        os.chmod(file, mode)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``path`` through a temporary file in the same folder, so readers never see a partial file; the file
    gets the mode the umask asks for."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), umask_file_mode())
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
