"""Atomic output: write under a temporary name, rename on success.

An interrupted or failed run never leaves a half-written file at the target
path, and an unwritable destination is reported before any work is lost.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import OutputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(path: str | Path) -> Path:
    """Fail early, naming the path, if its folder is missing or not writable."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"output folder '{folder}' does not exist", path)
    if not os.access(folder, os.W_OK):
        raise OutputError(f"output folder '{folder}' is not writable", path)
    if path.is_dir():
        raise OutputError("output path is a folder", path)
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` if the block succeeds."""
    path = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; files written there are moved to `path`'s folder on success.

    Used for outputs made of several files (a model and its external data):
    every file lands under its final name only after all were written.
    """
    path = check_writable(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        names = sorted(p.name for p in tmp.iterdir())
        # The file named like the target goes last: it is the commit point.
        for name in sorted(names, key=lambda n: n == path.name):
            os.replace(tmp / name, path.parent / name)
    finally:
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
