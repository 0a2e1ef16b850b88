"""The compiled CPU kernels of `plugins/cpu_kernels.c`, through ctypes, with the numpy reference as fallback.

The same library is the onnxruntime custom-op library of the `rwkvq` ops
(`library_path`); `vq_matmul` here runs its kernels directly: a threaded
table-lookup GEMV for decode (few activation rows) and, for prefill, a
GEMM that decodes a small tile of weight rows at a time; `sq_matmul` runs the
packed scalar kernels of `plugins/sq_kernels.c`.

Every kernel takes a mode (`rwkvq_mode` in plugins/rwkvq_dispatch.h): the
numerics ("exact" float, or "fast" int8 activations: per block of 32 for the
VQMatMul decode GEMV, of gcd(group_size, 128) for SQMatMul) and the instruction set ("scalar", "avx2", ...; "auto" is the
best this CPU supports). The library is built for baseline x86-64 and picks
the AVX2 code at run time.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .opspec import sq_matmul as sq_matmul_spec
from .opspec import vq_matmul as vq_matmul_spec

GEMV_MAX_ROWS = 4  # RWKVQ_GEMV_MAX_ROWS in plugins/rwkvq_cpu.h: above it the tiled GEMM runs
ISAS = ("scalar", "avx2", "avxvnni", "avx512vnni")  # RWKVQ_ISA_* in plugins/rwkvq_dispatch.h, in that order
KERNELS = ("exact", "fast")  # RWKVQ_KERNELS_*


class Mode(ctypes.Structure):
    """rwkvq_mode of plugins/rwkvq_dispatch.h (passed by value to the kernels)."""

    _fields_ = [("kernels", ctypes.c_int), ("isa", ctypes.c_int)]


def library_path() -> Path | None:
    """The built kernel / custom-op library, or None when the package was installed without it."""
    from . import plugins

    found = sorted(Path(plugins.__file__).parent.glob("_cpu_kernels*.so"))
    return found[0] if found else None


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The kernel library loaded with ctypes, or None when the package was installed without it."""
    path = library_path()
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))
    p, i = ctypes.c_void_p, ctypes.c_int
    for fn in (lib.rwkvq_vq_gemv, lib.rwkvq_vq_gemm, lib.rwkvq_vq_matmul):
        fn.argtypes = [p, i, p, i, p, p, p, i, i, i, i, i, i, Mode]
        fn.restype = ctypes.c_int
    lib.rwkvq_isa_supported.argtypes = [i]
    lib.rwkvq_isa_supported.restype = i
    lib.rwkvq_isa_best.restype = i
    lib.rwkvq_default_mode.restype = Mode
    lib.rwkvq_quantize_act8.argtypes = [p, ctypes.c_int64, p, p, i]
    lib.rwkvq_quantize_act8.restype = i
    lib.rwkvq_ort_registered_kernels.restype = i
    lib.rwkvq_ort_registered_isa.restype = i
    lib.rwkvq_vq_decode.argtypes = [p, i, p, p, p, i, i, i, i, i, i]
    lib.rwkvq_vq_decode.restype = ctypes.c_int
    i64, dims = ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)
    lib.rwkvq_vq_check_payload.argtypes = [i64] * 6 + [i, dims] * 3 + [ctypes.c_char_p, ctypes.c_size_t]
    lib.rwkvq_vq_check_payload.restype = ctypes.c_char_p
    lib.rwkvq_vq_check_rows.argtypes = [i64, i, dims, dims, ctypes.c_char_p, ctypes.c_size_t]
    lib.rwkvq_vq_check_rows.restype = ctypes.c_char_p
    for fn in (lib.rwkvq_sq_matmul, lib.rwkvq_sq_gemv, lib.rwkvq_sq_gemm):
        fn.argtypes = [p, i, p, p, p, p, i, i, i, i, i, i]
        fn.restype = ctypes.c_int
    lib.rwkvq_sq_decode.argtypes = [p, p, p, p, i, i, i, i]
    lib.rwkvq_sq_decode.restype = ctypes.c_int
    lib.rwkvq_sq_check_payload.argtypes = [i64] * 4 + [i, dims] * 3 + [ctypes.c_char_p, ctypes.c_size_t]
    lib.rwkvq_sq_check_payload.restype = ctypes.c_char_p
    lib.rwkvq_isa_supported.argtypes = [i]
    lib.rwkvq_isa_supported.restype = ctypes.c_int
    lib.rwkvq_isa_best.restype = ctypes.c_int
    lib.rwkvq_ort_version.restype = ctypes.c_char_p
    lib.rwkvq_ort_abi_ok.restype = ctypes.c_int
    lib.rwkvq_ort_thread_pool.restype = ctypes.c_int
    return lib


def available() -> bool:
    return library() is not None


def supported_isas() -> list[str]:
    """The instruction sets this CPU (and this build) can run the kernels with, e.g. ["scalar", "avx2"]."""
    lib = library()
    if lib is None:
        return []
    return [name for isa, name in enumerate(ISAS) if lib.rwkvq_isa_supported(isa)]


def best_isa() -> str | None:
    """The instruction set "auto" picks: the best this CPU supports (None without the library)."""
    lib = library()
    return None if lib is None else ISAS[lib.rwkvq_isa_best()]


def mode(kernels: str = "exact", isa: str = "auto") -> Mode:
    """The kernel mode for a ctypes call; ConfigError (one line) for an unknown name or an unsupported isa.
    "auto" is the RWKVQ_ISA environment variable when it names a supported set, else `best_isa()`."""
    if kernels not in KERNELS:
        raise ConfigError(f"kernels={kernels!r}: expected one of {', '.join(KERNELS)}")
    lib = library()
    if isa == "auto":  # as the sessions' "auto": RWKVQ_ISA when it names a supported set, else the best
        isa = ISAS[lib.rwkvq_default_mode().isa] if lib is not None else "scalar"
    if isa not in ISAS:
        raise ConfigError(f"isa={isa!r}: expected auto or one of {', '.join(ISAS)}")
    if isa not in supported_isas():
        raise ConfigError(f"isa={isa}: this CPU does not support it (supported: {', '.join(supported_isas())})")
    return Mode(KERNELS.index(kernels), ISAS.index(isa))


def quantize_act8(x: np.ndarray, isa: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """The fast numerics' activation quantization of the native library (for tests and int8 kernels): x [n], n a
    multiple of 32, to (q int8 [n], d float32 [n / 32]) with x ~= q * d per block of 32."""
    lib = library()
    if lib is None:
        raise ConfigError("quantize_act8: the native library is not built")
    x = np.ascontiguousarray(x, np.float32).ravel()
    q, d = np.empty(x.size, np.int8), np.empty(x.size // 32, np.float32)
    status = lib.rwkvq_quantize_act8(_ptr(x), x.size, _ptr(q), _ptr(d), mode("exact", isa).isa)
    if status:
        raise ConfigError(f"quantize_act8: {'a value is not finite' if status == 1 else 'size is not a multiple of 32'}")
    return q, d


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


def _dims(shape: tuple[int, ...]):
    return (ctypes.c_int64 * max(len(shape), 1))(*shape)


def _check_sizes(lib: ctypes.CDLL, entry: str, codes: np.ndarray, codebooks: np.ndarray, scales: np.ndarray,
                 x_shape: tuple[int, ...] | None, attrs: dict) -> None:
    """Refuse (ConfigError, one line) what the C kernels would misread: the library's own 64-bit checks of the
    attributes against each other and against the payload's shapes and dtypes, and of x [..., K], before any size
    becomes a C int. The C entry points check their int arguments again; these see the buffers' real sizes."""
    where = f"rwkvq.VQMatMul ({entry})"
    for name, a, want in (("codes", codes, np.uint8), ("codebooks", codebooks, np.int8)):
        if np.asarray(a).dtype != want:
            raise ConfigError(f"{where}: {name} is {np.asarray(a).dtype}, expected {np.dtype(want)}")
    if not np.issubdtype(np.asarray(scales).dtype, np.floating):
        raise ConfigError(f"{where}: scales is {np.asarray(scales).dtype}, expected float32")
    try:
        values = [int(attrs[k]) for k in ("N", "K", "dim", "group_rows", "group_cols", "index_bits")]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: attributes must be integers ({e})") from None
    if any(not -(2**63) <= v < 2**63 for v in values):
        raise ConfigError(f"{where}: an attribute is outside the 64-bit range")
    msg = ctypes.create_string_buffer(512)
    shapes = [np.shape(a) for a in (codes, codebooks, scales)]
    args = [v for sh in shapes for v in (len(sh), _dims(sh))]
    bad = lib.rwkvq_vq_check_payload(*values, *args, msg, len(msg))
    if bad is None and x_shape is not None:
        bad = lib.rwkvq_vq_check_rows(values[1], len(x_shape), _dims(x_shape), _dims((0,)), msg, len(msg))
    if bad is not None:
        raise ConfigError(f"{where}: {bad.decode()}")


def _check_status(status: int, entry: str) -> None:
    if status == -1:
        raise MemoryError(f"{entry}: out of memory")
    if status == -3:
        raise ConfigError(f"rwkvq.VQMatMul ({entry}): the kernel mode is not runnable on this CPU")
    if status != 0:
        raise ConfigError(f"rwkvq.VQMatMul ({entry}): sizes out of range")


def vq_decode(codes: np.ndarray, codebooks: np.ndarray, scales: np.ndarray, *, N: int, K: int, dim: int,
              group_rows: int, group_cols: int, index_bits: int) -> np.ndarray:
    attrs = dict(N=N, K=K, dim=dim, group_rows=group_rows, group_cols=group_cols, index_bits=index_bits)
    lib = library()
    if lib is None:
        return vq_matmul_spec.decode_weight(codes, codebooks, scales, **attrs)
    vq_matmul_spec.validate(attrs, codes, codebooks, scales, node="vq_decode")  # the C code trusts its sizes
    _check_sizes(lib, "vq_decode", codes, codebooks, scales, None, attrs)
    codes, books = np.ascontiguousarray(codes, np.uint8), np.ascontiguousarray(codebooks, np.int8)
    scales = np.ascontiguousarray(scales, np.float32)
    w = np.empty((N, K), np.float32)
    _check_status(lib.rwkvq_vq_decode(_ptr(codes), codes.shape[1], _ptr(books), _ptr(scales), _ptr(w), N, K, dim,
                                      group_rows, group_cols, index_bits), "rwkvq_vq_decode")
    return w


def vq_matmul(x: np.ndarray, codes: np.ndarray, codebooks: np.ndarray, scales: np.ndarray, *, N: int, K: int,
              dim: int, group_rows: int, group_cols: int, index_bits: int, kernel: str = "auto",
              kernels: str = "exact", isa: str = "auto") -> np.ndarray:
    """y = x @ W^T for a vector-quantized W (same result as `opspec.vq_matmul.reference`, float32).

    kernel: "auto" (GEMV up to GEMV_MAX_ROWS activation rows, else GEMM), "gemv" or "gemm" (for tests).
    kernels / isa: the mode (see `mode`); "fast" changes the GEMV's numerics (int8 activations per block of 32),
    not the GEMM's. The Python fallback (no library) always computes the exact reference.
    """
    attrs = dict(N=N, K=K, dim=dim, group_rows=group_rows, group_cols=group_cols, index_bits=index_bits)
    lib = library()
    x = np.asarray(x, np.float32)
    if lib is None:
        return vq_matmul_spec.reference(x, codes, codebooks, scales, **attrs).astype(np.float32)
    run_mode = mode(kernels, isa)
    vq_matmul_spec.validate(attrs, codes, codebooks, scales, node="vq_matmul")  # the C code trusts its sizes
    _check_sizes(lib, "vq_matmul", codes, codebooks, scales, x.shape, attrs)
    lead = x.shape[:-1]
    x2 = np.ascontiguousarray(x.reshape(-1, K))
    fn = {"auto": lib.rwkvq_vq_matmul, "gemv": lib.rwkvq_vq_gemv, "gemm": lib.rwkvq_vq_gemm}[kernel]
    codes, books = np.ascontiguousarray(codes, np.uint8), np.ascontiguousarray(codebooks, np.int8)
    scales = np.ascontiguousarray(scales, np.float32)
    y = np.empty((x2.shape[0], N), np.float32)
    _check_status(fn(_ptr(x2), x2.shape[0], _ptr(codes), codes.shape[1], _ptr(books), _ptr(scales), _ptr(y),
                     N, K, dim, group_rows, group_cols, index_bits, run_mode), f"rwkvq_vq_{kernel}")
    return y.reshape(*lead, N)


def isa_supported(isa: str) -> bool:
    """Whether this CPU (and this build) runs the kernels of instruction set `isa` (one of ISAS)."""
    lib = library()
    return lib is not None and isa in ISAS and bool(lib.rwkvq_isa_supported(ISAS.index(isa)))


def _sq_arrays(entry: str, codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, x_shape, attrs: dict):
    """The payload as the C kernels read it, after the spec's and the library's own 64-bit checks (one-line
    ConfigError naming the entry point)."""
    lib = library()
    where = f"rwkvq.SQMatMul ({entry})"
    sq_matmul_spec.validate(attrs, codes, scales, zero_points, node=entry)
    msg = ctypes.create_string_buffer(512)
    shapes = [np.shape(a) for a in (codes, scales, zero_points)]
    args = [v for sh in shapes for v in (len(sh), _dims(sh))]
    values = [int(attrs[k]) for k in ("N", "K", "bits", "group_size")]
    bad = lib.rwkvq_sq_check_payload(*values, *args, msg, len(msg))
    if bad is None and x_shape is not None:
        bad = lib.rwkvq_vq_check_rows(values[1], len(x_shape), _dims(x_shape), _dims((0,)), msg, len(msg))
    if bad is not None:
        raise ConfigError(f"{where}: {bad.decode()}")
    return (np.ascontiguousarray(codes, np.uint8), np.ascontiguousarray(scales, np.float16),
            np.ascontiguousarray(zero_points, np.uint8))


def sq_matmul(x: np.ndarray, codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, *, K: int, N: int,
              bits: int, group_size: int, kernels: str = "exact", isa: str = "auto",
              kernel: str = "auto") -> np.ndarray:
    """y = x @ W^T for packed scalar W (`opspec.sq_matmul`), float32.

    kernels: "exact" (float, within 1e-5 of the reference) or "fast" (int8 activations per block of
    gcd(group_size, 128): `sq_matmul.fast_reference`);
    isa: "auto" (the best this CPU runs) or one of ISAS (ConfigError when this CPU does not run it);
    kernel: "auto" (GEMV up to GEMV_MAX_ROWS activation rows, else GEMM), "gemv" or "gemm" (for tests).
    Without the compiled library: the numpy reference (exact numerics only).
    """
    attrs = dict(K=K, N=N, bits=bits, group_size=group_size)
    x = np.asarray(x, np.float32)
    lib = library()
    if kernels not in KERNELS:
        raise ConfigError(f"rwkvq.SQMatMul: unknown kernels '{kernels}' (choose from {', '.join(KERNELS)})")
    if lib is None:
        if kernels != "exact":
            raise ConfigError("rwkvq.SQMatMul: the fast kernels need the compiled library")
        return sq_matmul_spec.reference(x, codes, scales, zero_points, **attrs)
    code = int(lib.rwkvq_isa_best()) if isa == "auto" else ISAS.index(isa) if isa in ISAS else -1
    if code < 0 or not lib.rwkvq_isa_supported(code):
        raise ConfigError(f"rwkvq.SQMatMul: instruction set '{isa}' is not one this CPU runs")
    codes, scales, zero_points = _sq_arrays("sq_matmul", codes, scales, zero_points, x.shape, attrs)
    lead = x.shape[:-1]
    x2 = np.ascontiguousarray(x.reshape(-1, K))
    fn = {"auto": lib.rwkvq_sq_matmul, "gemv": lib.rwkvq_sq_gemv, "gemm": lib.rwkvq_sq_gemm}[kernel]
    y = np.empty((x2.shape[0], N), np.float32)
    status = fn(_ptr(x2), x2.shape[0], _ptr(codes), _ptr(scales), _ptr(zero_points), _ptr(y), N, K, bits,
                group_size, KERNELS.index(kernels), code)
    if status == -1:
        raise MemoryError(f"rwkvq_sq_{kernel}: out of memory")
    if status != 0:
        raise ConfigError(f"rwkvq.SQMatMul (rwkvq_sq_{kernel}): sizes out of range")
    return y.reshape(*lead, N)


def sq_decode(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, *, K: int, N: int, bits: int,
              group_size: int) -> np.ndarray:
    """W [N, K] float32 from the packed payload (the native decoder; the reference without the library)."""
    attrs = dict(K=K, N=N, bits=bits, group_size=group_size)
    lib = library()
    if lib is None:
        return sq_matmul_spec.decode_weight(codes, scales, zero_points, **attrs)
    codes, scales, zero_points = _sq_arrays("sq_decode", codes, scales, zero_points, None, attrs)
    w = np.empty((N, K), np.float32)
    if lib.rwkvq_sq_decode(_ptr(codes), _ptr(scales), _ptr(zero_points), _ptr(w), N, K, bits, group_size):
        raise ConfigError("rwkvq.SQMatMul (rwkvq_sq_decode): sizes out of range")
    return w
