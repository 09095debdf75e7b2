"""Files written whole or not at all: write a temporary file beside the target, fsync, rename.

A kill, a crash or a full disk in the middle of a write leaves the previous
file as it was (or no file), never a torn one: ``os.replace`` swaps the name
in one step once the new bytes are on disk. Every file the package writes
for a user (adapters, reports, plots, tables, base models) goes through here.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["write_atomic", "atomic_path"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path`` to write to (by any library); on success, fsync and rename it over ``path``.

    The temporary name keeps ``path``'s suffix, so writers that choose a
    format from it (``matplotlib.savefig``) still do. On an error the
    temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (text is UTF-8) to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
