"""Run-time instruction-set dispatch and the per-session kernel mode of the native library (issue 13, item 2).

The library is built for baseline x86-64; its AVX2 kernels are chosen at run time by the mode a session asks for
(session config "rwkvq.kernels" = exact | fast, "rwkvq.isa" = auto | scalar | avx2 | avxvnni | avx512vnni, read
when the library is registered). These tests run VQMatMul through real onnxruntime sessions on every instruction
set this machine supports and compare each with the scalar path and the numpy reference.

Tolerances:
- exact numerics: 1e-5 of the output's largest magnitude (the project's rule for exact paths vs numpy; the float
  sums differ from numpy's only in order).
- fast numerics (int8 activations per block of 32): each activation moves by at most half its block's step,
  |x - d q| <= d / 2 with d = max|x_block| / 127, so |y_fast - y| <= sum over blocks of d_b / 2 * sum_{k in b}
  |W[n, k]| (`fast_bound`), plus the 1e-5 float allowance. The integer block sums are the same on every
  instruction set, so fast outputs of two instruction sets differ only by float summation order: 1e-5 again.
"""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from rwkvq_onnx import cpu_kernels
from rwkvq_onnx.errors import ConfigError
from rwkvq_onnx.names import DOMAIN, OPSET_VERSION
from rwkvq_onnx.opspec import vq_matmul
from rwkvq_onnx.opspec.bitpack import pack_bits

ROOT = Path(__file__).resolve().parents[1]
EXACT_TOL = 1e-5

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="the native library is not built")

# (N, K, dim, index_bits, group_rows, group_cols): layouts the fast GEMV takes (group_cols and K multiples of
# 32 * dim), with partial row blocks and 1..16-table codebooks, and one it does not take (group_cols 48, dim 1)
FAST_LAYOUTS = [(70, 256, 2, 7, 16, 128), (45, 192, 1, 3, 7, 64), (33, 128, 2, 4, 5, 64), (40, 96, 1, 6, 16, 32)]
EXACT_ONLY_LAYOUT = (40, 96, 1, 4, 16, 48)


def payload(rng: np.random.Generator, n: int, k: int, dim: int, bits: int, gr: int, gc: int):
    """Random packed codes, int8 codebooks (full range, -128 included) and scales of an [n, k] VQ weight."""
    codes = rng.integers(0, 1 << bits, size=(n, k // dim))
    R, C = -(-n // gr), -(-k // gc)
    books = rng.integers(-128, 128, size=(R, C, 1 << bits, dim)).astype(np.int8)
    scales = (rng.random((R, C)) * 0.01 + 1e-3).astype(np.float32)
    attrs = dict(N=n, K=k, dim=dim, group_rows=gr, group_cols=gc, index_bits=bits)
    return pack_bits(codes, bits), books, scales, attrs


def vq_model(packed, books, scales, attrs):
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("VQMatMul", ["x", "codes", "books", "scales"], ["y"], domain=DOMAIN, name="vq", **attrs)
    inits = [numpy_helper.from_array(a, n) for a, n in [(packed, "codes"), (books, "books"), (scales, "scales")]]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", attrs["K"]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid(DOMAIN, OPSET_VERSION)])


def session(model, kernels: str | None, isa: str | None):
    """A two-thread session with the native library registered after the given config entries (None: unset)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    if kernels is not None:
        opts.add_session_config_entry("rwkvq.kernels", kernels)
    if isa is not None:
        opts.add_session_config_entry("rwkvq.isa", isa)
    opts.register_custom_ops_library(str(cpu_kernels.library_path()))
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def fast_bound(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per output [M, N]: sum over blocks of 32 activations of (max|x_block| / 127) / 2 * sum |W[n, block]|."""
    m, k = x.shape
    half_step = np.abs(x.reshape(m, k // 32, 32)).max(axis=2) / 127 / 2  # [M, blocks]
    w_abs = np.abs(w).reshape(w.shape[0], k // 32, 32).sum(axis=2)  # [N, blocks]
    return half_step @ w_abs.T


def test_the_build_has_no_march_flag():
    """pyproject's compile flags name no -march / -m<isa>: the wheel runs on any x86-64; the scalar path exists."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        flags = tomllib.load(f)["tool"]["setuptools"]["ext-modules"][0]["extra-compile-args"]
    assert not [f for f in flags if f.startswith("-march") or f.startswith("-mavx") or f == "-mfma"], flags
    assert "scalar" in cpu_kernels.supported_isas()
    assert cpu_kernels.best_isa() == cpu_kernels.supported_isas()[-1]
    assert "-march=native" not in (ROOT / "rwkvq_onnx" / "triton.py").read_text()  # its message said so


@pytest.mark.parametrize("layout", FAST_LAYOUTS + [EXACT_ONLY_LAYOUT])
def test_every_supported_isa_agrees_with_scalar_and_the_reference(layout):
    """Each instruction set this CPU supports, selected by "rwkvq.isa", runs VQMatMul in a session: exact numerics
    within 1e-5 of numpy and of the scalar session, for decode (GEMV) and prefill (GEMM) row counts."""
    lib = cpu_kernels.library()
    rng = np.random.default_rng(sum(layout))
    packed, books, scales, attrs = payload(rng, *layout)
    model = vq_model(packed, books, scales, attrs)
    xs = [rng.standard_normal((m, attrs["K"])).astype(np.float32) for m in (1, 3, 8)]
    refs = [vq_matmul.reference(x, packed, books, scales, **attrs) for x in xs]
    outs = {}
    for isa in cpu_kernels.supported_isas():
        sess = session(model, "exact", isa)
        assert cpu_kernels.ISAS[lib.rwkvq_ort_registered_isa()] == isa  # the registration took the setting
        outs[isa] = [sess.run(None, {"x": x})[0] for x in xs]
    for isa, ys in outs.items():
        for x, y, ref, y_scalar in zip(xs, ys, refs, outs["scalar"]):
            scale = np.abs(ref).max()
            assert np.abs(y - ref).max() <= EXACT_TOL * scale, (isa, x.shape)
            assert np.abs(y - y_scalar).max() <= EXACT_TOL * scale, (isa, x.shape)


@pytest.mark.parametrize("layout", FAST_LAYOUTS)
def test_fast_kernels_stay_within_the_int8_bound_on_every_isa(layout):
    """"rwkvq.kernels" = fast: decode rows quantize activations (the output moves, within fast_bound of the
    reference), equally on every instruction set up to float summation order; prefill (8 rows, GEMM) stays exact."""
    rng = np.random.default_rng(sum(layout) + 1)
    packed, books, scales, attrs = payload(rng, *layout)
    model = vq_model(packed, books, scales, attrs)
    w = vq_matmul.decode_weight(packed, books, scales, **attrs)
    xs = [rng.standard_normal((m, attrs["K"])).astype(np.float32) * 3 for m in (1, 4, 8)]
    outs = {isa: [session(model, "fast", isa).run(None, {"x": x})[0] for x in xs]
            for isa in cpu_kernels.supported_isas()}
    assert cpu_kernels.library().rwkvq_ort_registered_kernels() == 1
    for x, *ys in zip(xs, *outs.values()):
        ref = vq_matmul.reference(x, packed, books, scales, **attrs)
        scale = np.abs(ref).max()
        for isa, y in zip(outs, ys):
            if x.shape[0] <= cpu_kernels.GEMV_MAX_ROWS:
                err = np.abs(y - ref)
                assert (err <= fast_bound(x, w) + EXACT_TOL * scale).all(), (isa, x.shape, err.max())
                assert err.max() > EXACT_TOL * scale, (isa, "the fast path did not run: the output is exact")
            else:
                assert np.abs(y - ref).max() <= EXACT_TOL * scale, (isa, x.shape)
            assert np.abs(y - ys[0]).max() <= EXACT_TOL * scale, (isa, "differs from", next(iter(outs)))


def test_activation_quantization_is_the_contract_on_every_isa():
    """int8 per block of 32: d = max|x| / 127, q = x * (127 / max|x|) rounded to nearest (halves away from zero),
    as numpy computes it in float32; the same bytes on every instruction set; a zero block gives zeros."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal(32 * 40) * rng.choice([1e-3, 1, 50], 32 * 40)).astype(np.float32)
    x[64:96] = 0
    x[100] = 0.5 * np.abs(x[96:128]).max()  # scaled to about 63.5: rounding near a half
    blocks = x.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    v = np.clip(blocks * inv, -127, 127)
    q_ref = np.trunc(v + np.where(v < 0, np.float32(-0.5), np.float32(0.5))).astype(np.int8).ravel()
    for isa in cpu_kernels.supported_isas():
        q, d = cpu_kernels.quantize_act8(x, isa)
        np.testing.assert_array_equal(q, q_ref, err_msg=isa)
        np.testing.assert_array_equal(d, (amax / np.float32(127)).astype(np.float32).ravel(), err_msg=isa)
    with pytest.raises(ConfigError, match="not finite"):
        cpu_kernels.quantize_act8(np.full(32, np.inf, np.float32))


def test_fast_falls_back_to_exact_where_the_layout_does_not_nest_in_blocks():
    """group_cols 48 with dim 1 is not a multiple of 32: "fast" computes the exact result, bit for bit."""
    rng = np.random.default_rng(5)
    packed, books, scales, attrs = payload(rng, *EXACT_ONLY_LAYOUT)
    model = vq_model(packed, books, scales, attrs)
    x = rng.standard_normal((1, attrs["K"])).astype(np.float32)
    isa = cpu_kernels.best_isa()
    np.testing.assert_array_equal(session(model, "fast", isa).run(None, {"x": x})[0],
                                  session(model, "exact", isa).run(None, {"x": x})[0])


def test_two_sessions_of_one_process_keep_their_own_modes():
    """Per-session op copies: a fast session registered after an exact one does not change the exact one."""
    rng = np.random.default_rng(6)
    packed, books, scales, attrs = payload(rng, *FAST_LAYOUTS[0])
    model = vq_model(packed, books, scales, attrs)
    x = rng.standard_normal((1, attrs["K"])).astype(np.float32)
    ref = vq_matmul.reference(x, packed, books, scales, **attrs)
    exact, fast = session(model, None, None), session(model, "fast", None)
    y_fast, y_exact = fast.run(None, {"x": x})[0], exact.run(None, {"x": x})[0]
    assert np.abs(y_exact - ref).max() <= EXACT_TOL * np.abs(ref).max()  # unset = exact
    assert np.abs(y_fast - ref).max() > EXACT_TOL * np.abs(ref).max()


def test_non_finite_activations_propagate_in_fast_mode():
    """A NaN or inf activation is not quantized: the exact path runs and the output row holds non-finite values,
    as the reference's does."""
    rng = np.random.default_rng(7)
    packed, books, scales, attrs = payload(rng, *FAST_LAYOUTS[1])
    x = rng.standard_normal((2, attrs["K"])).astype(np.float32)
    x[1, 5] = np.nan
    y = session(vq_model(packed, books, scales, attrs), "fast", None).run(None, {"x": x})[0]
    assert np.isfinite(y[0]).all() and not np.isfinite(y[1]).any()


def _refusal(kernels: str | None, isa: str | None) -> str:
    rng = np.random.default_rng(8)
    model = vq_model(*payload(rng, *FAST_LAYOUTS[0]))
    with pytest.raises(Exception) as refused:  # onnxruntime's own exception type for a failed registration
        session(model, kernels, isa)
    message = str(refused.value).strip()
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("isa", [i for i in cpu_kernels.ISAS if cpu_kernels.available()
                                 and i not in cpu_kernels.supported_isas()])
def test_an_isa_this_cpu_lacks_is_refused_with_one_line(isa):
    message = _refusal(None, isa)
    assert f"rwkvq.isa={isa}: this CPU does not support it (supported: " in message, message
    assert ", ".join(cpu_kernels.supported_isas()) in message


@pytest.mark.parametrize("kernels, isa, expected", [
    (None, "sse9", "rwkvq.isa=sse9: unknown instruction set"),
    ("turbo", None, "rwkvq.kernels=turbo: unknown value (expected exact or fast)"),
])
def test_unknown_settings_are_refused_with_one_line(kernels, isa, expected):
    assert expected in _refusal(kernels, isa)


def test_runtime_session_options_set_the_mode_before_registering():
    """rwkvq_onnx.runtime.session_options passes kernels / isa to the library (it reads them at registration)."""
    from rwkvq_onnx.runtime import session_options

    lib = cpu_kernels.library()
    session_options(kernels="fast", isa="scalar")
    assert (lib.rwkvq_ort_registered_kernels(), lib.rwkvq_ort_registered_isa()) == (1, 0)
    session_options()
    assert (lib.rwkvq_ort_registered_kernels(), cpu_kernels.ISAS[lib.rwkvq_ort_registered_isa()]) == \
        (0, cpu_kernels.best_isa())
    with pytest.raises(Exception, match="unknown kernels .quick."):
        session_options(kernels="quick")


def test_auto_honours_the_rwkvq_isa_environment_variable(monkeypatch):
    """"auto" (what session_options sets by default) is RWKVQ_ISA when that names a supported set: a process can
    pin its instruction set without code changes."""
    from rwkvq_onnx.runtime import session_options

    lib = cpu_kernels.library()
    monkeypatch.setenv("RWKVQ_ISA", "scalar")
    session_options(isa="auto")
    assert lib.rwkvq_ort_registered_isa() == 0
    session_options(isa=cpu_kernels.best_isa())  # an explicit name wins over the variable
    assert cpu_kernels.ISAS[lib.rwkvq_ort_registered_isa()] == cpu_kernels.best_isa()


def test_ctypes_mode_refuses_unknown_or_unsupported_names():
    rng = np.random.default_rng(9)
    packed, books, scales, attrs = payload(rng, *FAST_LAYOUTS[0])
    x = rng.standard_normal((1, attrs["K"])).astype(np.float32)
    with pytest.raises(ConfigError, match="kernels='quick'"):
        cpu_kernels.vq_matmul(x, packed, books, scales, kernels="quick", **attrs)
    with pytest.raises(ConfigError, match="isa='sse9'"):
        cpu_kernels.vq_matmul(x, packed, books, scales, isa="sse9", **attrs)
    lacking = [i for i in cpu_kernels.ISAS if i not in cpu_kernels.supported_isas()]
    if lacking:
        with pytest.raises(ConfigError, match=f"isa={lacking[-1]}: this CPU does not support it"):
            cpu_kernels.vq_matmul(x, packed, books, scales, isa=lacking[-1], **attrs)


# ---- the fast kernels under AddressSanitizer --------------------------------------------------------------

def _asan_child(library: str) -> None:
    """Fast GEMVs over layouts whose last rows end at the buffer's end (the 64-bit index loads must stop
    before it), every index width 1..7, dims 1 and 2, 1..4 rows, on every supported instruction set."""
    from pathlib import Path as P

    cpu_kernels.library_path = lambda: P(library)
    cpu_kernels.library.cache_clear()
    rng = np.random.default_rng(10)
    for dim in (1, 2):
        for bits in range(1, 8):
            for n, gr in ((1, 1), (3, 2), (17, 16)):
                packed, books, scales, attrs = payload(rng, n, 64 * dim, dim, bits, gr, 32 * dim)
                packed = np.ascontiguousarray(packed)  # exactly the buffer's bytes: nothing after the last row
                for m in (1, 2, 4):
                    x = rng.standard_normal((m, attrs["K"])).astype(np.float32)
                    ref = vq_matmul.reference(x, packed, books, scales, **attrs)
                    w = vq_matmul.decode_weight(packed, books, scales, **attrs)
                    for isa in cpu_kernels.supported_isas():
                        y = cpu_kernels.vq_matmul(x, packed, books, scales, kernel="gemv", kernels="fast", isa=isa,
                                                  **attrs)
                        assert (np.abs(y - ref) <= fast_bound(x, w) + 1e-5 * np.abs(ref).max()).all()
    print("ok", flush=True)


@pytest.mark.slow
def test_fast_kernels_under_asan(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_native_fuzz import build_asan_library, sanitizer_env

    lib = tmp_path / "_cpu_kernels_asan.so"
    runtime = build_asan_library(lib)
    proc = subprocess.run([sys.executable, __file__, "--asan-child", str(lib)], capture_output=True, text=True,
                          timeout=600, env=sanitizer_env(runtime, OMP_NUM_THREADS="2"), cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-4000:]


if __name__ == "__main__" and sys.argv[1:2] == ["--asan-child"]:
    _asan_child(sys.argv[2])
