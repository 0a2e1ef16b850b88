"""Crafted rwkvq models against the native op library (issue 15): refused with one line naming the node, or the
numpy reference's numbers; never a crash or a read outside a buffer.

Every attribute and every initializer shape of VQMatMul, VQElementwise and SQMatMul is mutated from small valid models
(boundary values 0, 1, odd, 2^31, 2^32, negative, mismatched; truncated codes; wrong dtypes; malformed attribute
types). All mutants run in one subprocess through onnxruntime with an AddressSanitizer + UBSan build of the
library (plugins/build_asan.sh, built here with gcc); the subprocess reports each mutant's outcome, and its
stderr must hold no sanitizer report. Each payload mutant runs twice: as initializers (checked when the kernel is
created) and fed as graph inputs (checked at compute); VQMatMul and SQMatMul payloads also go through the ctypes
wrappers of rwkvq_onnx.cpu_kernels bound to the sanitized library (GEMV, OpenMP GEMM, decode; SQMatMul's exact and
fast numerics). The same subprocess runner
checks that the normal library refuses the three models that crashed it before (heap overflow, SIGFPE, SIGSEGV).

Run as a script (`python tests/test_native_fuzz.py --child LIB DIR`) it is that subprocess.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from rwkvq_onnx import cpu_kernels
from rwkvq_onnx.names import DOMAIN, OPSET_VERSION
from rwkvq_onnx.opspec import sq_matmul as sq_matmul_spec
from rwkvq_onnx.opspec import vq_elementwise as vq_elementwise_spec
from rwkvq_onnx.opspec import vq_matmul as vq_matmul_spec
from rwkvq_onnx.opspec.bitpack import pack_bits
from rwkvq_onnx.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
NODE = "fuzz_target_node"
# boundary values every integer attribute is set to
BOUNDARY = [0, 1, 3, 2**31 - 1, 2**31, 2**32, 2**32 + 2, -1, -(2**31), 2**63 - 1]
SANITIZER_MARKS = ("AddressSanitizer", "LeakSanitizer", "runtime error:", "UndefinedBehaviorSanitizer")


@dataclass
class Mutant:
    """One model: a single rwkvq node named NODE over input x, its attributes and initializers, and the x fed.
    With as_inputs the payload is fed as graph inputs instead: only known at compute, not at kernel creation."""

    label: str
    op: str
    attrs: dict
    inits: dict[str, np.ndarray]
    xs: list[np.ndarray] = field(default_factory=list)
    as_inputs: bool = False


# ---- valid starting points -----------------------------------------------------------------------------------

VQ_BASE = dict(N=20, K=24, dim=2, group_rows=8, group_cols=8, index_bits=6)
EW_BASE = dict(index_bits=4, shape="1,1,24")
SQ_BASE = dict(K=96, N=20, bits=3, group_size=64)
SQ_ATTRS = ("K", "N", "bits", "group_size")


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _vq_payload(rng: np.random.Generator, N: int, K: int, dim: int, group_rows: int, group_cols: int,
                index_bits: int) -> dict[str, np.ndarray]:
    R, C, E = _ceil(N, group_rows), _ceil(K, group_cols), 1 << index_bits
    return {"codes": pack_bits(rng.integers(0, E, (N, K // dim)), index_bits),
            "codebooks": rng.integers(-127, 128, (R, C, E, dim)).astype(np.int8),
            "scales": (rng.random((R, C)) * 0.01 + 1e-3).astype(np.float32)}


def _vq_xs(rng: np.random.Generator, K: int) -> list[np.ndarray]:
    """decode (GEMV: one row) and prefill (GEMM: six rows) activations"""
    return [rng.standard_normal((1, K)).astype(np.float32), rng.standard_normal((2, 3, K)).astype(np.float32)]


def _small_layout(attrs: dict) -> bool:
    """attributes small and positive enough to build a payload that matches them"""
    sizes = [attrs[k] for k in ("N", "K", "dim", "group_rows", "group_cols")]
    return all(isinstance(v, int) and 1 <= v <= 64 for v in sizes) and 1 <= attrs["index_bits"] <= 12


def _ew_payload(rng: np.random.Generator, index_bits: int, n: int) -> dict[str, np.ndarray]:
    E = 1 << index_bits
    return {"codes": pack_bits(rng.integers(0, E, (1, n)), index_bits)[0],
            "codebook": rng.standard_normal(E).astype(np.float32)}


def _parse_shape(text: str) -> list[int] | None:
    try:
        dims = [int(t) for t in text.split(",")]
    except ValueError:
        return None
    return dims if dims and all(d >= 1 for d in dims) else None


def _reshaped(rng: np.random.Generator, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """random content of a's dtype in the given shape"""
    if np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        return rng.integers(info.min, int(info.max) + 1, shape).astype(a.dtype)
    return rng.standard_normal(shape).astype(a.dtype)


def _shape_mutants(rng: np.random.Generator, op: str, attrs: dict, inits: dict[str, np.ndarray],
                   xs: list[np.ndarray]) -> list[Mutant]:
    """each initializer: every axis 0, 1, one less, one more; rank one lower, one higher, flattened, truncated;
    other dtypes"""
    out = []
    for name, a in inits.items():
        shapes = []
        for axis, d in enumerate(a.shape):
            for v in sorted({0, 1, d - 1, d + 1} - {d}):
                shapes.append(a.shape[:axis] + (v,) + a.shape[axis + 1:])
        shapes += [(a.size,), (1, *a.shape), a.shape[:-1], (max(a.size - 1, 0),)]
        for shape in dict.fromkeys(s for s in shapes if s != a.shape and all(v >= 0 for v in s)):
            out.append(Mutant(f"{name} shape {shape}", op, attrs, {**inits, name: _reshaped(rng, a, shape)}, xs))
        if a.ndim and a.size:
            truncated = a.reshape(-1)[:-1]
            out.append(Mutant(f"{name} truncated by one value", op, attrs, {**inits, name: truncated}, xs))
        for dtype in (np.int8, np.uint8, np.float16, np.float32, np.float64, np.int64):
            if np.dtype(dtype) != a.dtype:
                out.append(Mutant(f"{name} as {np.dtype(dtype)}", op, attrs, {**inits, name: a.astype(dtype)}, xs))
    # the same payloads fed at run time: the compute-time checks decide
    out += [Mutant(f"{m.label}, fed as inputs", m.op, m.attrs, m.inits, m.xs, as_inputs=True) for m in list(out)]
    out.append(Mutant("valid, fed as inputs", op, attrs, inits, xs, as_inputs=True))
    return out


def vq_matmul_mutants(seed: int = 0) -> list[Mutant]:
    rng = np.random.default_rng(seed)
    base = _vq_payload(rng, **VQ_BASE)
    xs = _vq_xs(rng, VQ_BASE["K"])
    out = [Mutant("valid", "VQMatMul", VQ_BASE, base, xs)]
    for name, value in VQ_BASE.items():
        for v in dict.fromkeys(BOUNDARY + [value - 1, value + 1, value * 2, value + 3]):
            attrs = {**VQ_BASE, name: v}
            out.append(Mutant(f"{name}={v}", "VQMatMul", attrs, base, xs))
            if _small_layout(attrs):  # a payload that matches the mutated attributes, so the attribute checks decide
                out.append(Mutant(f"{name}={v} with a matching payload", "VQMatMul", attrs,
                                  _vq_payload(rng, **attrs), _vq_xs(rng, attrs["K"])))
    # the three models that crashed the library before (issue 15)
    out += crash_mutants(rng)
    # mismatched pairs that keep every single value plausible
    for attrs in ({**VQ_BASE, "dim": 3, "group_cols": 6}, {**VQ_BASE, "dim": 4, "group_cols": 6},
                  {**VQ_BASE, "group_rows": 20, "group_cols": 24}, {**VQ_BASE, "group_rows": 64, "group_cols": 64},
                  {**VQ_BASE, "dim": 1, "index_bits": 3}, {**VQ_BASE, "dim": 8, "index_bits": 12, "group_cols": 24}):
        out.append(Mutant(f"layout {attrs} with a matching payload", "VQMatMul", attrs, _vq_payload(rng, **attrs),
                          _vq_xs(rng, attrs["K"])))
        out.append(Mutant(f"layout {attrs} with the base payload", "VQMatMul", attrs, base, xs))
    # valid layouts of the kernel tests' shapes (each AVX2 row kernel width, dim 1/2/4, ragged row and column
    # blocks, several GEMV pieces): the sanitizer sees the fast paths run to the ends of real-sized buffers
    for n, k, dim, bits, gr, gc in [(768, 768, 2, 6, 16, 256), (300, 256, 1, 3, 7, 128), (64, 128, 4, 8, 5, 64),
                                    (40, 48, 2, 8, 5, 16), (33, 48, 1, 4, 5, 16), (129, 96, 2, 5, 200, 96),
                                    (50, 40, 2, 7, 3, 10), (17, 64, 2, 4, 17, 64)]:
        attrs = dict(N=n, K=k, dim=dim, group_rows=gr, group_cols=gc, index_bits=bits)
        out.append(Mutant(f"valid layout {attrs}", "VQMatMul", attrs, _vq_payload(rng, **attrs), _vq_xs(rng, k)))
    out += _shape_mutants(rng, "VQMatMul", VQ_BASE, base, xs)
    K = VQ_BASE["K"]
    for shape in [(1, K + 1), (1, K - 1), (K,), (), (0, K), (2, 0, K), (3, 1), (1, 1, 1, 1, 1, 1, 1, 1, K)]:
        out.append(Mutant(f"x shape {shape}", "VQMatMul", VQ_BASE, base,
                          [rng.standard_normal(shape).astype(np.float32)]))
    attrs = dict(VQ_BASE)
    del attrs["dim"]
    out.append(Mutant("dim missing", "VQMatMul", attrs, base, xs))
    out.append(Mutant("dim a float", "VQMatMul", {**VQ_BASE, "dim": 2.0}, base, xs))
    out.append(Mutant("group_cols a string", "VQMatMul", {**VQ_BASE, "group_cols": "8"}, base, xs))
    return out


def _sq_payload(rng: np.random.Generator, K: int, N: int, bits: int, group_size: int) -> dict[str, np.ndarray]:
    G = _ceil(K, group_size)
    return {"codes": sq_matmul_spec.pack_codes(rng.integers(0, 1 << bits, (N, K)), bits),
            "scales": (rng.random((N, G)) * 0.01 + 1e-3).astype(np.float16),
            "zero_points": pack_bits(rng.integers(0, 1 << bits, (N, G)), bits)}


def _sq_matching(attrs: dict) -> bool:
    """attributes valid and small enough to build a payload that matches them"""
    return (all(isinstance(attrs.get(k), int) for k in SQ_ATTRS) and 1 <= attrs["N"] <= 64
            and 32 <= attrs["K"] <= 512 and attrs["K"] % 32 == 0 and attrs["bits"] in (2, 3, 4)
            and 32 <= attrs["group_size"] <= 4096 and attrs["group_size"] % 32 == 0)


def sq_matmul_mutants(seed: int = 0) -> list[Mutant]:
    rng = np.random.default_rng(seed)
    base = _sq_payload(rng, **SQ_BASE)
    xs = _vq_xs(rng, SQ_BASE["K"])
    out = [Mutant("valid", "SQMatMul", SQ_BASE, base, xs)]
    for name, value in SQ_BASE.items():
        for v in dict.fromkeys(BOUNDARY + [value - 1, value + 1, value * 2, value + 32, 2, 4, 5, 32, 48]):
            attrs = {**SQ_BASE, name: v}
            out.append(Mutant(f"{name}={v}", "SQMatMul", attrs, base, xs))
            if _sq_matching(attrs):  # a payload that matches the mutated attributes: the attribute checks decide
                out.append(Mutant(f"{name}={v} with a matching payload", "SQMatMul", attrs, _sq_payload(rng, **attrs),
                                  _vq_xs(rng, attrs["K"])))
    # valid layouts: every bit width, partial last groups, one group wider than K, GEMV and GEMM pieces
    for k, n, bits, g in [(32, 1, 2, 32), (64, 33, 4, 96), (160, 17, 3, 64), (512, 64, 2, 128), (256, 40, 4, 4096)]:
        attrs = dict(K=k, N=n, bits=bits, group_size=g)
        out.append(Mutant(f"valid layout {attrs}", "SQMatMul", attrs, _sq_payload(rng, **attrs), _vq_xs(rng, k)))
    out += _shape_mutants(rng, "SQMatMul", SQ_BASE, base, xs)
    K = SQ_BASE["K"]
    for shape in [(1, K + 1), (1, K - 1), (K,), (), (0, K), (2, 0, K), (3, 1), (1, 1, 1, 1, 1, 1, 1, 1, K)]:
        out.append(Mutant(f"x shape {shape}", "SQMatMul", SQ_BASE, base,
                          [rng.standard_normal(shape).astype(np.float32)]))
    attrs = dict(SQ_BASE)
    del attrs["bits"]
    out.append(Mutant("bits missing", "SQMatMul", attrs, base, xs))
    out.append(Mutant("bits a float", "SQMatMul", {**SQ_BASE, "bits": 3.0}, base, xs))
    out.append(Mutant("group_size a string", "SQMatMul", {**SQ_BASE, "group_size": "64"}, base, xs))
    return out


def crash_mutants(rng: np.random.Generator | None = None) -> list[Mutant]:
    """The models that crashed the native library before issue 15: group_cols not a multiple of dim (heap overflow
    in row_dot_dim2), group_rows / group_cols of 2^32 (SIGFPE), group_rows of 2^31 with empty codebooks and scales
    (SIGSEGV in decode_table)."""
    rng = rng or np.random.default_rng(1)
    out = []
    for bits in (6, 8):
        attrs = {**VQ_BASE, "group_cols": 3, "index_bits": bits}
        out.append(Mutant(f"crash 1: group_cols=3, dim=2, index_bits={bits}", "VQMatMul", attrs,
                          _vq_payload(rng, **attrs), _vq_xs(rng, VQ_BASE["K"])))
    base = _vq_payload(rng, **VQ_BASE)
    for name in ("group_rows", "group_cols"):
        out.append(Mutant(f"crash 2: {name}=2^32", "VQMatMul", {**VQ_BASE, name: 2**32}, base,
                          _vq_xs(rng, VQ_BASE["K"])))
    C = _ceil(VQ_BASE["K"], VQ_BASE["group_cols"])
    empty = {"codes": base["codes"], "codebooks": np.zeros((0, C, 1 << VQ_BASE["index_bits"], VQ_BASE["dim"]), np.int8),
             "scales": np.zeros((0, C), np.float32)}
    out.append(Mutant("crash 3: group_rows=2^31, empty codebooks and scales", "VQMatMul",
                      {**VQ_BASE, "group_rows": 2**31}, empty, _vq_xs(rng, VQ_BASE["K"])))
    return out


def vq_elementwise_mutants(seed: int = 0) -> list[Mutant]:
    rng = np.random.default_rng(seed)
    base = _ew_payload(rng, EW_BASE["index_bits"], 24)
    xs = [rng.standard_normal((2, 3, 24)).astype(np.float32), rng.standard_normal(24).astype(np.float32)]
    out = [Mutant("valid", "VQElementwise", EW_BASE, base, xs)]
    for v in dict.fromkeys(BOUNDARY + [2, 5, 8, 12, 16, 17, 32]):
        attrs = {**EW_BASE, "index_bits": v}
        out.append(Mutant(f"index_bits={v}", "VQElementwise", attrs, base, xs))
        if 1 <= v <= 16:
            out.append(Mutant(f"index_bits={v} with a matching payload", "VQElementwise", attrs,
                              _ew_payload(rng, v, 24), xs))
    shapes = ["", "0", "1,1,0", "-24", "24", "1,24", "2,12", "1,1,25", "1,1,23", "24,1", "1,1,24,", ",24", "1,,24",
              "a", "1 ,24", "+24", "1,1,24x", "2147483648", "4294967296", "1,1,1,1,1,1,1,1,24", "1,1,1,1,1,1,1,24",
              "99999999999999999999999", "4,1,6", "1,1,\n24", "3037000500,3037000500", "65536,65536,65536"]
    for text in shapes:
        attrs = {**EW_BASE, "shape": text}
        out.append(Mutant(f"shape={text!r}", "VQElementwise", attrs, base, xs))
        dims = _parse_shape(text)
        if dims and math.prod(dims) <= 4096:
            n = math.prod(dims)
            matching_xs = [rng.standard_normal((2, *dims)).astype(np.float32),
                           rng.standard_normal(dims).astype(np.float32)]
            out.append(Mutant(f"shape={text!r} with a matching payload", "VQElementwise", attrs,
                              _ew_payload(rng, EW_BASE["index_bits"], n), matching_xs))
    out += _shape_mutants(rng, "VQElementwise", EW_BASE, base, xs)
    for shape in [(25,), (23,), (), (24, 1), (0, 24), (1, 1, 1, 24), (2, 0, 24), (1, 1, 1, 1, 1, 1, 1, 1, 24)]:
        out.append(Mutant(f"x shape {shape}", "VQElementwise", EW_BASE, base,
                          [rng.standard_normal(shape).astype(np.float32)]))
    out.append(Mutant("shape missing", "VQElementwise", {"index_bits": 4}, base, xs))
    out.append(Mutant("index_bits missing", "VQElementwise", {"shape": "1,1,24"}, base, xs))
    out.append(Mutant("shape an int", "VQElementwise", {**EW_BASE, "shape": 24}, base, xs))
    out.append(Mutant("index_bits a float", "VQElementwise", {**EW_BASE, "index_bits": 4.0}, base, xs))
    return out


# ---- running mutants ------------------------------------------------------------------------------------------

def _model_bytes(m: Mutant) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    names = list(m.inits)
    node = helper.make_node(m.op, ["x", *names], ["y"], name=NODE, domain=DOMAIN, **m.attrs)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)]
    if m.as_inputs:
        inputs += [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), None)
                   for n, a in m.inits.items()]
    graph = helper.make_graph([node], "fuzz", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [] if m.as_inputs else [numpy_helper.from_array(a, n) for n, a in m.inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(DOMAIN, OPSET_VERSION)])
    return model.SerializeToString()


def run_mutants(mutants: list[Mutant], library: Path, folder: Path, env: dict | None = None,
                timeout: int = 600) -> tuple[list[dict], subprocess.CompletedProcess]:
    """Write the mutants into folder, run them all in one subprocess loading `library`; each mutant's report:
    {"session": error or None, "runs": [error or None per x]} with outputs in folder/y{i}_{j}.npy."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, m in enumerate(mutants):
        (folder / f"m{i}.onnx").write_bytes(_model_bytes(m))
        for j, x in enumerate(m.xs):
            np.save(folder / f"x{i}_{j}.npy", x)
        np.savez(folder / f"p{i}.npz", **m.inits)
        (folder / f"meta{i}.json").write_text(json.dumps({"as_inputs": m.as_inputs, "xs": len(m.xs),
                                                           "ctypes": _ctypes_attrs(m)}))
    (folder / "count").write_text(str(len(mutants)))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(library), str(folder)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=str(folder))
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return reports, proc


def _ctypes_attrs(m: Mutant) -> dict | None:
    """The attributes to call the ctypes kernels with (VQMatMul initializer mutants whose six attributes are all
    integers), else None."""
    names = {"VQMatMul": ("N", "K", "dim", "group_rows", "group_cols", "index_bits"), "SQMatMul": SQ_ATTRS}.get(m.op)
    if names is None or m.as_inputs or not all(isinstance(m.attrs.get(k), int) for k in names):
        return None
    return {k: m.attrs[k] for k in names}


def _child_ctypes(library: str, folder: Path, i: int, n_xs: int, attrs: dict) -> dict:
    """The mutant's payload through rwkvq_onnx.cpu_kernels bound to `library`: vq_matmul for each x, and vq_decode;
    outputs saved, each call's error (or None) returned."""
    if cpu_kernels.library_path() != Path(library):  # this process's kernels are the library under test
        cpu_kernels.library_path = lambda: Path(library)
        cpu_kernels.library.cache_clear()
    payload = np.load(folder / f"p{i}.npz")
    outcome: dict = {}
    if "zero_points" in payload:  # SQMatMul: exact and fast numerics (the best instruction set this CPU runs)
        arrays = [payload[k] for k in ("codes", "scales", "zero_points")]
        calls = {"decode": lambda: cpu_kernels.sq_decode(*arrays, **attrs)}
        for j in range(n_xs):
            x = np.load(folder / f"x{i}_{j}.npy")
            for kernels in ("exact", "fast"):
                calls[f"{kernels}:{j}"] = lambda x=x, kernels=kernels: cpu_kernels.sq_matmul(x, *arrays,
                                                                                             kernels=kernels, **attrs)
    else:
        arrays = [payload[k] for k in ("codes", "codebooks", "scales")]
        calls = {"decode": lambda: cpu_kernels.vq_decode(*arrays, **attrs)}
    for j in range(n_xs if "zero_points" not in payload else 0):
        # "auto": the GEMV for the one-row x, the GEMM (OpenMP pieces) for the six-row one
        x = np.load(folder / f"x{i}_{j}.npy")
        calls[f"auto:{j}"] = lambda x=x: cpu_kernels.vq_matmul(x, *arrays, kernel="auto", **attrs)
    for key, call in calls.items():
        try:
            np.save(folder / f"c{i}_{key}.npy", call())
            outcome[key] = None
        except ConfigError as e:
            outcome[key] = str(e)
    return outcome


def _child(library: str, folder: Path) -> None:
    """Each mutant through onnxruntime (and VQMatMul payloads through the ctypes kernels); one JSON line per mutant
    on stdout, flushed before the next starts."""
    import onnxruntime as ort

    for i in range(int((folder / "count").read_text())):
        report: dict = {"i": i, "session": None, "runs": []}
        meta = json.loads((folder / f"meta{i}.json").read_text())
        if meta["ctypes"] is not None:
            report["ctypes"] = _child_ctypes(library, folder, i, meta["xs"], meta["ctypes"])
        try:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 2
            opts.register_custom_ops_library(library)
            sess = ort.InferenceSession(str(folder / f"m{i}.onnx"), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - the message is the outcome
            report["session"] = str(e)
        else:
            feeds = dict(np.load(folder / f"p{i}.npz")) if meta["as_inputs"] else {}
            for j in range(meta["xs"]):
                try:
                    feeds["x"] = np.load(folder / f"x{i}_{j}.npy")
                    np.save(folder / f"y{i}_{j}.npy", sess.run(None, feeds)[0])
                    report["runs"].append(None)
                except Exception as e:  # noqa: BLE001
                    report["runs"].append(str(e))
        print(json.dumps(report), flush=True)


def _assert_decodable(m: Mutant) -> None:
    sizes = [m.attrs[k] for k in ("N", "K", "dim", "group_rows", "group_cols")]
    assert all(isinstance(v, int) and 1 <= v <= 4096 for v in sizes) and 1 <= m.attrs["index_bits"] <= 12, \
        f"{m.label}: ran with attributes the reference cannot even decode"


def _reference(m: Mutant, x: np.ndarray) -> np.ndarray:
    if m.op == "SQMatMul":
        assert _sq_matching(m.attrs), f"{m.label}: ran with attributes the reference cannot decode"
        return sq_matmul_spec.reference(x, *(m.inits[k] for k in sq_matmul_spec.INPUTS[1:]), **m.attrs)
    if m.op == "VQMatMul":
        _assert_decodable(m)
        return vq_matmul_spec.reference(x, m.inits["codes"], m.inits["codebooks"], m.inits["scales"], **m.attrs)
    dims = _parse_shape(str(m.attrs["shape"]))
    assert dims is not None, f"{m.label}: ran with a shape attribute that is not a list of positive integers"
    return vq_elementwise_spec.reference(x, m.inits["codes"], m.inits["codebook"], index_bits=m.attrs["index_bits"],
                                       shape=dims)


def _assert_refusal(label: str, message: str) -> None:
    text = message.strip()
    assert "\n" not in text, f"{label}: the error is not one line: {text!r}"
    assert NODE in text, f"{label}: the error does not name the node: {text!r}"


def check_outcomes(mutants: list[Mutant], reports: list[dict], folder: Path) -> dict[str, int]:
    """Every mutant refused with one line naming the node, or equal to the reference (1e-5 of the output scale)."""
    assert [r["i"] for r in reports] == list(range(len(mutants))), "the subprocess did not report every mutant"
    counts = {"refused": 0, "ran": 0}
    for m, r in zip(mutants, reports):
        if r["session"] is not None:
            _assert_refusal(m.label, r["session"])
            counts["refused"] += 1
            continue
        for j, (x, error) in enumerate(zip(m.xs, r["runs"])):
            if error is not None:
                _assert_refusal(f"{m.label} (x {x.shape})", error)
                counts["refused"] += 1
                continue
            got = np.load(folder / f"y{r['i']}_{j}.npy")
            try:
                ref = _reference(m, x)
            except (ValueError, IndexError, TypeError) as e:
                raise AssertionError(f"{m.label} (x {x.shape}): the native op ran where the reference fails: {e}")
            assert got.shape == ref.shape, f"{m.label} (x {x.shape}): shape {got.shape}, reference {ref.shape}"
            scale = max(float(np.abs(ref).max(initial=0.0)), 1.0)
            assert np.abs(got - ref).max(initial=0.0) <= 1e-5 * scale, f"{m.label} (x {x.shape}): wrong numbers"
            counts["ran"] += 1
    for m, r in zip(mutants, reports):
        for key, error in r.get("ctypes", {}).items():
            if error is not None:  # the wrappers' one-line ConfigError
                assert "\n" not in error and error.startswith(f"rwkvq.{m.op}"), f"{m.label} ctypes {key}: {error!r}"
                counts["refused"] += 1
                continue
            got = np.load(folder / f"c{r['i']}_{key}.npy")
            if m.op == "SQMatMul":
                _check_sq_ctypes(m, key, got)
                counts["ran"] += 1
                continue
            if key == "decode":
                _assert_decodable(m)
                ref = vq_matmul_spec.decode_weight(*(m.inits[k] for k in ("codes", "codebooks", "scales")), **m.attrs)
            else:
                ref = _reference(m, m.xs[int(key.split(":")[1])])
            assert got.shape == ref.shape, f"{m.label} ctypes {key}: shape {got.shape}, reference {ref.shape}"
            scale = max(float(np.abs(ref).max(initial=0.0)), 1.0)
            assert np.abs(got - ref).max(initial=0.0) <= 1e-5 * scale, f"{m.label} ctypes {key}: wrong numbers"
            counts["ran"] += 1
    return counts


def _check_sq_ctypes(m: Mutant, key: str, got: np.ndarray) -> None:
    """An SQMatMul ctypes result: decode and exact numerics within 1e-5 of the reference (output scale); fast
    numerics within the int8 activation bound (`sq_matmul.fast_error_bound`: per activation block of
    gcd(group_size, 128) values, |x - d q| <= d/2 with d = max|x| / 127, so |y_fast - y| <= sum_b d_b / 2 *
    sum_{i in b} |w_i|) plus the same 1e-5 for float rounding."""
    inits = [m.inits[k] for k in sq_matmul_spec.INPUTS[1:]]
    if key == "decode":
        assert _sq_matching(m.attrs), f"{m.label}: decoded attributes the reference cannot decode"
        np.testing.assert_array_equal(got, sq_matmul_spec.decode_weight(*inits, **m.attrs), err_msg=m.label)
        return
    kernels, j = key.split(":")
    x = m.xs[int(j)]
    ref = _reference(m, x)
    assert got.shape == ref.shape, f"{m.label} ctypes {key}: shape {got.shape}, reference {ref.shape}"
    slack = 1e-5 * max(float(np.abs(ref).max(initial=0.0)), 1.0)
    bound = np.zeros(ref.shape)
    if kernels == "fast" and ref.size:
        w = sq_matmul_spec.decode_weight(*inits, **m.attrs)
        bound = sq_matmul_spec.fast_error_bound(x.reshape(-1, x.shape[-1]), w, m.attrs["group_size"]).reshape(ref.shape)
    assert (np.abs(got - ref) <= bound + slack).all(), f"{m.label} ctypes {key}: wrong numbers"


def _sanitizer_runtime() -> tuple[str, str] | None:
    """(compiler, what to preload), or None when gcc or its AddressSanitizer runtime is missing. The C++ runtime is
    preloaded after libasan: onnxruntime throws C++ exceptions (every refused model), and ASan's __cxa_throw
    interceptor fails its CHECK unless libstdc++ was loaded when ASan started (python itself does not link it)."""
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if cc is None:
        return None
    found = [subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
             for name in ("libasan.so", "libstdc++.so.6")]
    if not (os.path.isabs(found[0]) and Path(found[0]).exists()):
        return None
    return cc, " ".join(p for p in found if os.path.isabs(p) and Path(p).exists())


# ---- tests ----------------------------------------------------------------------------------------------------

def build_asan_library(out: Path) -> str:
    """plugins/build_asan.sh into `out`; the sanitizer runtime a process loading it must preload (the test is
    skipped when gcc or libasan is missing)."""
    found = _sanitizer_runtime()
    if found is None:
        pytest.skip("gcc or its AddressSanitizer runtime (libasan) is not installed: no sanitizer build")
    cc, runtime = found
    build = subprocess.run(["bash", str(ROOT / "plugins" / "build_asan.sh"), str(out)], capture_output=True,
                           text=True, timeout=600, env={**os.environ, "CC": cc})
    assert build.returncode == 0, build.stderr[-3000:]
    return runtime


def sanitizer_env(runtime: str, **extra: str) -> dict[str, str]:
    """The environment of a child process that loads the ASan build: the runtime preloaded, the first report fatal."""
    return {**os.environ, "LD_PRELOAD": " ".join(filter(None, [runtime, os.environ.get("LD_PRELOAD")])),
            "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1", "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
            **extra}


@pytest.fixture(scope="module")
def asan_library(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("asan") / "_cpu_kernels_asan.so"
    return out, build_asan_library(out)

@pytest.mark.parametrize("op", ["VQMatMul", "VQElementwise", "SQMatMul"])
def test_mutated_models_are_refused_or_exact_under_asan(op, asan_library, tmp_path):
    library, runtime = asan_library
    mutants = {"VQMatMul": vq_matmul_mutants, "VQElementwise": vq_elementwise_mutants,
               "SQMatMul": sq_matmul_mutants}[op]()
    reports, proc = run_mutants(mutants, library, tmp_path, sanitizer_env(runtime, OMP_NUM_THREADS="2"))
    reports_seen = f"{len(reports)} of {len(mutants)} mutants reported"
    for mark in SANITIZER_MARKS:
        assert mark not in proc.stderr, f"{reports_seen}; sanitizer report:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, f"{reports_seen}; exit {proc.returncode}:\n{proc.stderr[-4000:]}"
    counts = check_outcomes(mutants, reports, tmp_path)
    # the valid models and the payload-matching mutants of valid layouts run: the fuzz exercises the kernels
    assert counts["ran"] >= 10 and counts["refused"] >= 50, counts

def test_normal_library_refuses_the_crash_models(tmp_path):
    """Without sanitizers: the models that crashed the installed library (issue 15) are refused, one line."""
    library = cpu_kernels.library_path()
    assert library is not None, "the package install must build the native library"
    mutants = crash_mutants()
    reports, proc = run_mutants(mutants, library, tmp_path)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert [r["i"] for r in reports] == list(range(len(mutants)))
    for m, r in zip(mutants, reports):
        assert r["session"] is not None, f"{m.label}: the model was not refused"
        _assert_refusal(m.label, r["session"])

@pytest.mark.parametrize("attrs", [{**VQ_BASE, "group_cols": 3}, {**VQ_BASE, "group_rows": 2**32},
                                   {**VQ_BASE, "group_rows": 2**31}, {**VQ_BASE, "N": 21}])
def test_ctypes_wrappers_check_sizes_before_calling_c(attrs):
    """rwkvq_onnx.cpu_kernels refuses a layout or payload the C kernels would misread, with one line."""
    rng = np.random.default_rng(3)
    payload = _vq_payload(rng, **VQ_BASE)
    x = rng.standard_normal((2, VQ_BASE["K"])).astype(np.float32)
    for call in (lambda: cpu_kernels.vq_matmul(x, *payload.values(), **attrs),
                 lambda: cpu_kernels.vq_decode(*payload.values(), **attrs)):
        with pytest.raises(ConfigError) as refused:
            call()
        assert "\n" not in str(refused.value) and "rwkvq.VQMatMul" in str(refused.value)
    with pytest.raises(ConfigError, match="last dimension is 23, expected K=24"):
        cpu_kernels.vq_matmul(x[:, :-1], *payload.values(), **VQ_BASE)
    with pytest.raises(ConfigError, match="codes is int64"):
        cpu_kernels.vq_matmul(x, payload["codes"].astype(np.int64), payload["codebooks"], payload["scales"],
                              **VQ_BASE)

def test_c_entry_points_refuse_bad_sizes():
    """The exported kernels refuse int arguments out of range (-2) before touching a buffer (NULL here)."""
    lib = cpu_kernels.library()
    assert lib is not None
    bad = [dict(VQ_BASE, group_cols=3), dict(VQ_BASE, group_rows=0), dict(VQ_BASE, dim=0),
           dict(VQ_BASE, index_bits=13), dict(VQ_BASE, N=-5)]
    for attrs in bad:
        args = [attrs[k] for k in ("N", "K", "dim", "group_rows", "group_cols", "index_bits")]
        for fn in (lib.rwkvq_vq_gemv, lib.rwkvq_vq_gemm, lib.rwkvq_vq_matmul):
            assert fn(None, 2, None, 9, None, None, None, *args, cpu_kernels.mode()) == -2, attrs
        assert lib.rwkvq_vq_decode(None, 9, None, None, None, *args) == -2, attrs
    args = [VQ_BASE[k] for k in ("N", "K", "dim", "group_rows", "group_cols", "index_bits")]
    exact = cpu_kernels.mode()
    assert lib.rwkvq_vq_gemv(None, 2, None, 8, None, None, None, *args, exact) == -2  # row_bytes is 9
    assert lib.rwkvq_vq_gemv(None, -1, None, 9, None, None, None, *args, exact) == -2  # negative rows
    # a mode with unknown numerics or an instruction set that does not exist: -3 before touching a buffer
    for bad_mode in (cpu_kernels.Mode(7, 0), cpu_kernels.Mode(0, 99)):
        assert lib.rwkvq_vq_gemv(None, 2, None, 9, None, None, None, *args, bad_mode) == -3
    assert lib.rwkvq_vq_gemv_chunks(20, 24, 1, 0) == -1 and lib.rwkvq_vq_gemm_chunks(0) == -1


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    _child(sys.argv[2], Path(sys.argv[3]))
