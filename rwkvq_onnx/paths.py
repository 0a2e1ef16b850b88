"""Input and output paths of a command: inputs must be files, and no output may be an input.

A command that writes over its own input destroys it (`export X -o X`,
`quantize M -o M`, `eval M --json M`). The same file can hide behind another
spelling (`a/../M`), a symbolic link or a hard link, and behind a sidecar
(`M.step.onnx`, `M.onnx.data`), so paths are compared resolved and, when both
exist, by device and inode.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .errors import OutputError, RwkvqError


def require_file(path: str | Path, what: str = "file", error: type[RwkvqError] = RwkvqError) -> Path:
    """`path` as a Path if it is an existing regular file; otherwise `error` saying what it is instead."""
    path = Path(path)
    if path.is_dir():
        raise error(f"is a directory, not a {what}", path)
    if not path.is_file():
        raise error("no such file" if what == "file" else f"no such file (expected a {what})", path)
    return path


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        sa, sb = a.stat(), b.stat()
    except OSError:  # one does not exist (yet): distinct unless the resolved paths agree
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def check_distinct(inputs: Iterable[str | Path | None], outputs: Iterable[str | Path | None]) -> None:
    """Refuse, before anything is written, an output that is one of the inputs or another output.

    `None` entries (an optional file not given) are skipped; inputs that do
    not exist cannot be overwritten and are skipped too.
    """
    ins = [Path(p) for p in inputs if p is not None and Path(p).exists()]
    outs = [Path(p) for p in outputs if p is not None]
    for i, out in enumerate(outs):
        for src in ins:
            if _same_file(out, src):
                same = "" if out == src else f" {src}"
                raise OutputError(f"output would overwrite the input{same}; write to another path", out)
        for other in outs[:i]:
            if _same_file(out, other):
                raise OutputError(f"two outputs would be written to the same file (also {other})", out)


def model_files(path: str | Path) -> list[Path]:
    """An ONNX model and the external-data files it names (the files that reading it reads)."""
    import onnx

    path = Path(path)
    files = [path]
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # unreadable: the command's own loading reports it; the path itself is still guarded
        return files
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                candidate = path.parent / entry.value
                if candidate not in files:
                    files.append(candidate)
    return files

