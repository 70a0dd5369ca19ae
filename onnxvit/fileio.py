"""Atomic writes and content hashes: nothing half-written, caches keyed by content."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write_via(path: Path, write: Callable[[Path], None], suffix: str = ".tmp") -> None:
    """Let ``write`` fill a temporary file beside ``path``, then rename it into place.

    For writers that take a path (torch's Lite exporter, ONNX Runtime's optimized-model output).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, then rename it into place."""
    atomic_write_via(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """``obj`` as JSON; a numpy scalar that reached it (``numpy.bool_`` is no ``bool``) is written as the
    Python value it holds, so a long run's report is never lost at its last step for a scalar's type."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=numpy_scalar) + "\n")


def numpy_scalar(value: Any) -> Any:
    """``json.dumps``'s ``default`` for what onnxvit writes: a numpy scalar as the Python value it holds."""
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able object, independent of key order."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode("utf-8"))


def path_from(folder: Path, path: Path) -> str:
    """``path`` as a report in ``folder`` names it: relative where the two share a folder below the
    filesystem's root (the report moved with what it names keeps its meaning), else absolute."""
    folder, path = Path(os.path.abspath(folder)), Path(os.path.abspath(path))
    if Path(os.path.commonpath([folder, path])) == Path(path.anchor):
        return str(path)
    return os.path.relpath(path, folder)
