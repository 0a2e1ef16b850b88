"""One external-data file holding the weights of a sequence graph and its step graph once.

Both graphs of a pair carry the same weights under the same names. Written as
two self-contained files, a process that opens both (prefill with one, decode
with the other) holds every weight twice. `save_pair` instead writes large
pairs as two small graph files whose initializers point (ONNX external data)
into one `MODEL.onnx.data`, where each tensor is stored once, page-aligned.

The data file starts with an index, so a reader needs neither `onnx` nor the
graphs to find the tensors:

    bytes 0..7    magic b"RWKVQW01"
    bytes 8..15   little-endian uint64: length of the JSON index that follows
    JSON          {"pair_id": the pair identity of the graphs, "op_types": [the graphs' node types],
                   "tensors": {name: {"offset", "length", "dtype", "dims"}}}

`dtype` is the ONNX TensorProto data type number. Offsets are multiples of
`ALIGN` (a page), so `np.memmap` views of the tensors are page-aligned and
the same pages serve both onnxruntime sessions (see `runtime.RwkvSession`).
Any ONNX tool still reads the graphs: the index is just bytes no external-data
reference points at.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .errors import RwkvqError

MAGIC = b"RWKVQW01"
ALIGN = 4096
MIN_BYTES = 1024  # smaller initializers (the graph builder's constants, norms of tiny models) stay inline
# pairs whose weights are smaller than this keep inline weights in each graph (two copies of a small model cost
# little, and single-file graphs are easier to move around); larger pairs share one data file
SHARED_THRESHOLD = 32 * 2**20

# ONNX TensorProto data types a numpy array can hold (4-bit types cannot: they stay onnxruntime's to load)
NUMPY_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
                9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}


def data_path(graph_path: str | Path) -> Path:
    """The shared data file of a pair whose sequence (target) graph is `graph_path`."""
    graph_path = Path(graph_path)
    return graph_path.with_name(graph_path.name + ".data")


def weight_bytes(models: Sequence) -> int:
    """Bytes of the largest model's inline initializers (what one copy of the weights costs)."""
    return max((sum(len(t.raw_data) for t in m.graph.initializer) for m in models), default=0)


def _raw(tensor) -> bytes:
    """A tensor's bytes in ONNX raw_data layout (little-endian, row-major)."""
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor).tobytes()


@contextlib.contextmanager
def shared_data(models: Sequence, folder: Path, name: str, pair_id: str) -> Iterator[None]:
    """Inside the block, the large initializers of `models` live in `folder/name` (each distinct tensor once)
    and the models refer to it as ONNX external data; after it, the models hold their weights inline again
    (the caller's models are left as they were given).

    A name that carries different bytes in two graphs is stored once per
    variant and left out of the index (never shared: a reader trusting the
    index must get the bytes each graph was written with).
    """
    refs = _write(models, folder, name, pair_id)
    try:
        yield
    finally:
        whole = np.memmap(folder / name, dtype=np.uint8, mode="r")
        for t, offset, length in refs:
            del t.external_data[:]
            t.data_location = 0  # TensorProto.DEFAULT
            t.raw_data = whole[offset:offset + length].tobytes()
        del whole


def _write(models: Sequence, folder: Path, name: str, pair_id: str) -> list[tuple[object, int, int]]:
    """Write the data file and point the models' large initializers at it; returns (tensor, offset, length)."""
    from onnx import TensorProto

    entries: dict[tuple[str, str], dict] = {}  # (name, digest) -> entry
    variants: dict[str, set[str]] = {}
    blobs: list[tuple[int, bytes]] = []
    offset = 0  # relative to the end of the header; fixed up below
    refs = []
    for model in models:
        for t in model.graph.initializer:
            if t.data_location == TensorProto.EXTERNAL or t.data_type == TensorProto.STRING:
                continue
            raw = _raw(t)
            if len(raw) < MIN_BYTES:
                continue
            digest = hashlib.sha256(raw).hexdigest()
            key = (t.name, digest)
            if key not in entries:
                entries[key] = {"offset": offset, "length": len(raw), "dtype": int(t.data_type),
                                "dims": [int(d) for d in t.dims]}
                blobs.append((offset, raw))
                offset += -(-len(raw) // ALIGN) * ALIGN
            variants.setdefault(t.name, set()).add(digest)
            refs.append((t, entries[key]))
    index = {n: entries[(n, next(iter(d)))] for n, d in variants.items() if len(d) == 1}
    # the header's size depends on the offsets it lists: size it with the largest offsets it could hold
    ops = sorted({n.op_type for m in models for n in m.graph.node})
    probe = json.dumps({"pair_id": pair_id, "op_types": ops, "tensors": {n: {**e, "offset": 10**15} for n, e in index.items()}}).encode()
    base = -(-(16 + len(probe)) // ALIGN) * ALIGN
    index = {n: {**e, "offset": e["offset"] + base} for n, e in index.items()}
    header = json.dumps({"pair_id": pair_id, "op_types": ops, "tensors": index}).encode()
    with open(folder / name, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(header)) + header)
        for off, raw in blobs:
            f.seek(base + off)
            f.write(raw)
        f.truncate(base + offset)
    out = []
    for t, e in refs:
        out.append((t, e["offset"] + base, e["length"]))
        t.ClearField("raw_data")
        del t.float_data[:], t.int32_data[:], t.int64_data[:], t.double_data[:], t.uint64_data[:]
        t.data_location = TensorProto.EXTERNAL
        del t.external_data[:]
        for k, v in (("location", name), ("offset", str(e["offset"] + base)), ("length", str(e["length"]))):
            entry = t.external_data.add()
            entry.key, entry.value = k, v
    return out


def read_index(path: str | Path) -> dict | None:
    """The header of a shared data file ({"pair_id", "tensors": {name: entry}}), or None when `path` is not
    one (absent, or another layout)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != MAGIC:
                return None
            (n,) = struct.unpack("<Q", head[8:])
            index = json.loads(f.read(n))
            if not isinstance(index.get("tensors"), dict):
                raise ValueError("no tensor table")
    except OSError:
        return None
    except (ValueError, TypeError, AttributeError) as exc:
        raise RwkvqError(f"corrupt weight index ({type(exc).__name__}: {exc})", path) from None
    return index


def map_tensors(path: str | Path) -> tuple[dict | None, dict[str, np.ndarray]]:
    """(header, read-only page-cache-backed views of the indexed tensors numpy can hold); (None, {}) when
    `path` is no shared data file.

    One `np.memmap` of the whole file: every view shares its pages, which
    are the file's page cache, so the weights are in memory once however many
    sessions use them.
    """
    path = Path(path)
    header = read_index(path)
    if not header:
        return None, {}
    index = header["tensors"]
    size = path.stat().st_size
    whole = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, e in index.items():
        dtype = NUMPY_DTYPES.get(e["dtype"])
        offset, length, dims = int(e["offset"]), int(e["length"]), [int(d) for d in e["dims"]]
        if dtype is None:
            continue
        if offset < 0 or offset + length > size or int(np.prod(dims, dtype=np.int64)) * np.dtype(dtype).itemsize != length:
            raise RwkvqError(f"weight index entry '{name}' does not fit the file (offset {offset}, length "
                             f"{length}, dims {dims}, file size {size})", path)
        out[name] = whole[offset:offset + length].view(dtype).reshape(dims)
    return header, out


def release_pages(arrays: dict[str, np.ndarray]) -> None:
    """Drop this process's resident pages of the mapping behind `arrays` (they stay in the page cache).

    Operators that pre-pack a weight (onnxruntime's MatMul, MatMulNBits)
    read it once while the session is created and never again; without this
    those pages would stay counted in the process's resident set. Pages an
    operator does read later come back from the page cache on first touch.
    """
    import mmap

    seen = set()
    for a in arrays.values():
        base = a
        while getattr(base, "base", None) is not None and not isinstance(base, mmap.mmap):
            base = base.base
        if isinstance(base, mmap.mmap) and id(base) not in seen and hasattr(base, "madvise"):
            seen.add(id(base))
            base.madvise(mmap.MADV_DONTNEED)
