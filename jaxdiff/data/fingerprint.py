"""Fingerprints: short stable hashes that tell whether a model, a dataset or a setting changed."""

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def hash_json(obj: Any) -> str:
    """SHA-256 (hex, 32 chars) of `obj` serialized as canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def fingerprint_files(path: str | os.PathLike) -> str:
    """Hash of every file's relative name, size and mtime under `path` (a file or a folder).

    Cheap (no file is read) and changes whenever a file is added, removed, rewritten or touched, which is what
    a cache key needs: a weight file replaced in place or an image edited invalidates the cache.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(root)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    entries = []
    for file in files:
        stat = file.stat()
        entries.append(
            [file.relative_to(root).as_posix() if file != root else file.name, stat.st_size, stat.st_mtime_ns]
        )
    return hash_json(entries)
