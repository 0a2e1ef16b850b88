"""Compiled CPU kernels vs the numpy reference; the HTML report; the quality-table tool on a tiny model."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rwkvq_onnx import cpu_kernels
from rwkvq_onnx.names import DOMAIN, OPSET_VERSION
from rwkvq_onnx.opspec import vq_elementwise, vq_matmul
from rwkvq_onnx.opspec.bitpack import pack_bits
from rwkvq_onnx.cli import main

from .conftest import GOLDEN_TEXT

ROOT = Path(__file__).resolve().parents[1]


def _payload(rng, n, k, dim, bpw, gr, gc):
    ib = bpw * dim
    codes = rng.integers(0, 1 << ib, size=(n, k // dim))
    R, C = -(-n // gr), -(-k // gc)
    books = rng.integers(-127, 128, size=(R, C, 1 << ib, dim)).astype(np.int8)
    scales = (rng.random((R, C)) * 0.01 + 1e-3).astype(np.float32)
    return pack_bits(codes, ib), books, scales, dict(N=n, K=k, dim=dim, group_rows=gr, group_cols=gc,
                                                         index_bits=ib)


def test_compiled_kernels_are_built_by_the_install():
    assert cpu_kernels.available(), "the package install must build plugins/cpu_kernels.c"


@pytest.mark.parametrize("shape", [(768, 768, 2, 3, 16, 256), (300, 256, 1, 3, 7, 128), (64, 128, 4, 2, 5, 64),
                                   (40, 48, 2, 4, 5, 16), (33, 48, 1, 4, 5, 16), (129, 96, 2, 3, 200, 96)])
@pytest.mark.parametrize("rows", [1, 3, 8, 40])
def test_vq_matmul_kernel_equals_reference(shape, rows):
    """Numerics of the fast kernels: within 1e-5 of the reference, relative to the output scale."""
    rng = np.random.default_rng(sum(shape) + rows)
    packed, books, scales, attrs = _payload(rng, *shape)
    x = rng.standard_normal((rows, shape[1])).astype(np.float32)
    ref = vq_matmul.reference(x, packed, books, scales, **attrs)
    for kernel in ("auto", "gemv", "gemm"):
        got = cpu_kernels.vq_matmul(x, packed, books, scales, kernel=kernel, **attrs)
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max(), kernel
    np.testing.assert_array_equal(cpu_kernels.vq_decode(packed, books, scales, **attrs),
                                  vq_matmul.decode_weight(packed, books, scales, **attrs))


def _rwkvq_model(packed, books, scales, attrs, ev_codes, ev_book, ev_shape):
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("VQMatMul", ["x", "codes", "books", "scales"], ["y"], domain=DOMAIN, **attrs),
             helper.make_node("VQElementwise", ["x", "ecodes", "ebook"], ["z"], domain=DOMAIN, index_bits=4,
                              shape=",".join(map(str, ev_shape)))]
    inits = [numpy_helper.from_array(a, n) for a, n in [(packed, "codes"), (books, "books"), (scales, "scales"),
                                                        (ev_codes, "ecodes"), (ev_book, "ebook")]]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", "k"])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "yz"], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid(DOMAIN, OPSET_VERSION)])


@pytest.mark.parametrize("native", [True, False])
def test_onnxruntime_ops_equal_reference(native):
    """The rwkvq ops in real onnxruntime sessions, native library and Python fallback, decode and prefill sizes.

    640 x 512 is large enough for the native GEMV to split into pieces on onnxruntime's two intra-op threads
    (KernelContext_ParallelFor), and the prefill GEMM into panels.
    """
    import onnxruntime as ort

    from rwkvq_onnx.ortops import register

    rng = np.random.default_rng(7)
    packed, books, scales, attrs = _payload(rng, 640, 512, 2, 3, 16, 256)
    ev = rng.integers(0, 16, size=512)
    ev_codes, ev_book = pack_bits(ev, 4), rng.standard_normal(16).astype(np.float32)
    model = _rwkvq_model(packed, books, scales, attrs, ev_codes, ev_book, (1, 1, 512))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.register_custom_ops_library(register(native=native))
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    for b, t in [(1, 1), (2, 3), (1, 40)]:
        x = rng.standard_normal((b, t, 512)).astype(np.float32)
        y, z = sess.run(None, {"x": x})
        ref = vq_matmul.reference(x, packed, books, scales, **attrs)
        assert y.shape == ref.shape
        assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
        zr = vq_elementwise.reference(x, ev_codes, ev_book, index_bits=4, shape=[1, 1, 512])
        assert z.shape == zr.shape
        np.testing.assert_array_equal(z, zr)
    if native:
        lib = cpu_kernels.library()
        assert lib.rwkvq_ort_version().decode() == ort.__version__  # the hand-declared ABI reached onnxruntime
        assert lib.rwkvq_ort_abi_ok() == 1
        # onnxruntime >= 1.17 (API 17) lends its thread pool to the ops
        assert lib.rwkvq_ort_thread_pool() == (tuple(map(int, ort.__version__.split(".")[:2])) >= (1, 17))


def test_native_ops_reject_a_bad_input_shape():
    import onnxruntime as ort

    from rwkvq_onnx.ortops import register

    rng = np.random.default_rng(8)
    packed, books, scales, attrs = _payload(rng, 32, 64, 2, 3, 16, 64)
    model = _rwkvq_model(packed, books, scales, attrs, pack_bits(np.zeros((1, 64), int), 4)[0],
                         np.ones(16, np.float32), (1, 1, 64))
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(register())
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="last dimension is 65, expected K=64|vector dimension 64 does not match the input.s 65"):
        sess.run(None, {"x": np.zeros((1, 1, 65), np.float32)})


@pytest.mark.slow
def test_report_html_shows_the_decisions(tmp_path, tiny_ckpt):
    pytest.importorskip("matplotlib")
    calib = tmp_path / "calib.txt"
    calib.write_text((GOLDEN_TEXT.decode() + " ") * 30)
    fp, q = tmp_path / "fp.onnx", tmp_path / "q.onnx"
    assert main(["export", str(tiny_ckpt), "-o", str(fp)]) == 0
    assert main(["quantize", str(fp), "-o", str(q), "--bpw", "3.3", "--sym", "sym", "--calib", str(calib), "--nsamples", "2",
                 "--seqlen", "64", "--report", str(tmp_path / "q.json")]) == 0
    out = tmp_path / "r.html"
    assert main(["report", str(tmp_path / "q.json"), "-o", str(out)]) == 0
    page = out.read_text()
    assert page.count("data:image/png;base64,") == 4  # proxies, method map, errors, histograms
    report = json.loads((tmp_path / "q.json").read_text())
    for name, row in report["tensors"].items():
        if row.get("kind") in ("sq", "vq"):
            assert name in page
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["report", str(bad), "-o", str(tmp_path / "x.html")]) == 2


@pytest.mark.slow
def test_bench_tool_reports_per_round_ratios_on_the_tiny_shape(tmp_path):
    """tools/bench.py end to end on the tiny shape: fresh processes per variant and round, ratios to fp32."""
    cmd = [sys.executable, str(ROOT / "tools" / "bench.py"), "--shape", "tiny", "--variants", "fp32,rwkvquant-faithful,rwkvquant-faithful-eh4",
           "--rounds", "2", "--runs", "1", "--decode-tokens", "4", "--prefill", "8", "--rwkvquant-bpw", "3.34", "--workdir", str(tmp_path / "m"),
           "--json", str(tmp_path / "b.json")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads((tmp_path / "b.json").read_text())
    res = out["results"]
    assert out["rounds"] == 2 and set(res) == {"fp32", "rwkvquant-faithful", "rwkvquant-faithful-eh4"}
    assert res["fp32"]["decode_vs_fp32_per_round"] == [1.0, 1.0] and res["fp32"]["prefill_vs_fp32"] == {"8": 1.0}
    for r in res.values():
        assert len(r["decode_vs_fp32_per_round"]) == 2 and r["decode_tokens_per_s"] > 0 and r["peak_rss_mib"] > 0
    # fewer bytes: the quantized linear weights, then also the int8 embedding and 4-bit head
    assert res["rwkvquant-faithful-eh4"]["weights_mib"] < res["rwkvquant-faithful"]["weights_mib"] < res["fp32"]["weights_mib"]
    assert res["rwkvquant-faithful-eh4"]["disk_vs_fp32"] < res["rwkvquant-faithful"]["disk_vs_fp32"] < 1


def test_running_a_model_does_not_import_torch():
    """Sessions with the native ops registered need onnxruntime and numpy only: torch would add about 190 MiB
    to every deployed process's RSS. (The onnxruntime-extensions fallback imports torch by itself.)"""
    code = ("import sys\nfrom rwkvq_onnx.runtime import RwkvSession, session_options\n"
            "session_options()\nassert 'torch' not in sys.modules, 'torch imported'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
