"""Atomic output: write under a temporary name, rename on success.

An interrupted or failed run never leaves a half-written file at the target
path, and an unwritable destination is reported before any work is lost.
Failed writes (full disk, quota, read-only or forbidden folder) become one
`OutputError` naming the final file. Temporaries carry the writer's process
id, so those of a killed run (SIGKILL cannot be cleaned up after) are swept
by the next write to the same target.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
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


# errno values of a write that fails because of the destination, not the program
WRITE_ERRNOS = frozenset(getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EFBIG", "EIO")
                         if hasattr(errno, n))


@contextlib.contextmanager
def write_errors(path: Path, tmp: Path | None = None) -> Iterator[None]:
    """Turn a failed write into one `OutputError` naming the final file (not the temporary one)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        name = path
        if tmp is not None and exc.filename and Path(exc.filename).parent == tmp:
            name = path.parent / Path(exc.filename).name
        raise OutputError(f"cannot write: {exc.strerror or os.strerror(exc.errno)}", name) from None


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries of `path` left by writers that no longer run (killed with SIGKILL)."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"(\d+)\..*\.tmp")
    removed = []
    for entry in path.parent.iterdir():
        m = pattern.fullmatch(entry.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` if the block succeeds."""
    path = check_writable(path)
    sweep_stale_temporaries(path)
    with write_errors(path):
        fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with write_errors(path):
            yield tmp_path
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; files written there are moved to `path`'s folder on success.

    Used for outputs made of several files (a model and its external data, a
    sequence/step pair): every file lands under its final name only after all
    were written, so a failure or SIGINT while writing leaves the old files
    untouched and no temporary folder. The renames themselves are one per
    file: a kill between two of them (a window of microseconds, after all
    data is on disk) leaves some files new and some old; the file named like
    the target goes last and is the commit point, and the pair identity lets
    readers detect such a mix (see `export.save_pair`).
    """
    path = check_writable(path)
    sweep_stale_temporaries(path)
    with write_errors(path):
        tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        with write_errors(path, tmp):
            yield tmp
            names = sorted(p.name for p in tmp.iterdir())
            for name in sorted(names, key=lambda n: n == path.name):
                os.replace(tmp / name, path.parent / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
