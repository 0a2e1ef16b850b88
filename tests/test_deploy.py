"""GPU deployment pieces testable here: kernel compilation, TensorRT preparation, Triton configs, Polygraphy."""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import onnx
import pytest

from rwkvq_onnx.names import DOMAIN
from rwkvq_onnx.cli import main
from rwkvq_onnx.errors import ConfigError
from rwkvq_onnx.export import step_path
from rwkvq_onnx.plugins import trt_plugins
from rwkvq_onnx.runtime import RwkvSession
from rwkvq_onnx.tensorrt_build import cuda_device_count, optimization_profile, prepare_for_tensorrt
from rwkvq_onnx.triton import parse_model_config
from rwkvq_onnx.validate import validate

from .conftest import GOLDEN_TEXT

KERNELS = ["rwkvq_vq_gemv", "rwkvq_vq_gemv_smem", "rwkvq_vq_gemv_smem_batch", "rwkvq_vq_decode",
           "rwkvq_vq_elementwise", "rwkvq_vq_elementwise_f32", "rwkvq_trt_vq_gemv", "rwkvq_trt_vq_gemv_decode",
           "rwkvq_trt_vq_elementwise"]


@pytest.fixture(scope="module")
def quantized(tiny_sym_quantized):
    """A tiny RWKV-7 exported (both graphs) and quantized with RWKVQuant, symmetric SQ (TensorRT-ready)."""
    fp, q, calib = tiny_sym_quantized
    return fp, q, calib


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("sm", ["80", "90"])
def test_kernels_compile_with_nvcc(tmp_path, sm):
    build = subprocess.run(["bash", "plugins/build.sh", str(tmp_path), sm], capture_output=True, text=True,
                           cwd=str(trt_plugins.__file__).rsplit("/plugins/", 1)[0])
    assert build.returncode == 0, build.stderr
    ptx = (tmp_path / "rwkvq_kernels.ptx").read_text()
    for name in KERNELS:
        assert f".entry {name}(" in ptx
    assert (tmp_path / "rwkvq_kernels.cubin").stat().st_size > 0


@pytest.mark.gpu
def test_kernels_match_reference_on_gpu():
    cp = pytest.importorskip("cupy")
    if cuda_device_count() == 0:
        pytest.skip("no NVIDIA GPU")
    from rwkvq_onnx.plugins import harness

    results = harness.check_correctness(harness.load_module(), np.random.default_rng(0))
    assert results and all(r["ok"] for r in results), [r for r in results if not r["ok"]]
    del cp


def test_gemv_launch_geometry_matches_layout_rules():
    launch = trt_plugins.gemv_launch(N=4096, K=4096, dim=2, group_rows=16, group_cols=256, index_bits=6)
    assert launch["grid"] == (256, 2) and launch["block"] == 256
    assert launch["shared_mem"] == 4 * (16 * 64 * 2 + 8 * (32 * 6 + 1))
    assert launch["row_bytes"] == 2048 * 6 // 8
    assert trt_plugins.gemv_supported(4096, 4096, 2, 16, 256, 6) is None
    assert "4-byte" in trt_plugins.gemv_supported(10, 36, 2, 4, 36, 3)


def test_build_engine_validates_then_stops_without_tensorrt(quantized, tmp_path, capsys):
    fp, q, _ = quantized
    plan = tmp_path / "q.plan"
    rc = main(["build-engine", str(step_path(q)), "-o", str(plan), "--max-batch", "4"])
    out, err = capsys.readouterr()
    try:
        import tensorrt  # noqa: F401
        has_trt = cuda_device_count() > 0
    except ImportError:
        has_trt = False
    if has_trt:  # a real build: the plan and its sidecar exist
        assert rc == 0 and plan.is_file() and json.loads((tmp_path / "q.plan.json").read_text())["plugins"]
        return
    assert rc == 2 and not plan.exists()
    assert "validated" in out and "VQMatMul" in out
    assert len(err.strip().splitlines()) == 1 and ("TensorRT" in err or "GPU" in err)


def test_build_engine_refuses_what_tensorrt_cannot_run(quantized, tmp_path, capsys):
    fp, q, calib = quantized
    for fmt_args, needle in ((["--sq-format", "matmulnbits", "--sym", "sym"], "--sq-format qdq"),
                             (["--sym", "asym"], "--sym sym")):
        out = tmp_path / f"x{len(fmt_args)}{fmt_args[-1]}.onnx"
        assert main(["quantize", str(fp), "-o", str(out), "--method", "gptq", "--calib", str(calib),
                     "--nsamples", "2", "--seqlen", "32", *fmt_args]) == 0
        capsys.readouterr()
        assert main(["build-engine", str(out), "-o", str(tmp_path / "x.plan")]) == 2
        assert needle in capsys.readouterr().err


def test_prepare_for_tensorrt_sets_plugin_attributes_and_fp16_casts(quantized):
    _, q, _ = quantized
    model = onnx.load(step_path(q))
    model.functions.append(onnx.helper.make_function("rwkvq", "VQMatMul", ["x"], ["y"], [], []))
    prepared, notes = prepare_for_tensorrt(model)
    assert len(prepared.functions) == 0 and notes["functions_stripped"] == 1
    custom = [n for n in prepared.graph.node if n.domain == DOMAIN]
    assert custom and notes["plugins"]["VQMatMul"] == sum(n.op_type == "VQMatMul" for n in custom)
    for n in custom:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["plugin_namespace"] == b"rwkvq" and attrs["plugin_version"] == b"1"
    producers = {o: n for n in prepared.graph.node for o in n.output}
    assert all(producers[n.input[0]].op_type == "Cast" for n in custom)
    # one Cast back per plugin output, one Cast to fp16 per distinct activation (shared by its plugins)
    distinct_inputs = len({producers[n.input[0]].input[0] for n in custom})
    assert notes["casts_added"] == len(custom) + distinct_inputs


def test_quantized_sequence_graph_keeps_logits_from_and_tensorrt_fixes_it(quantized):
    from rwkvq_onnx.names import LOGITS_FROM

    _, q, _ = quantized
    model = onnx.load(q)
    assert LOGITS_FROM in {i.name for i in model.graph.input}  # the passes keep an overridable input
    assert LOGITS_FROM in {t.name for t in model.graph.initializer}
    prepared, notes = prepare_for_tensorrt(model)
    assert notes["logits_from_fixed"] and LOGITS_FROM not in {i.name for i in prepared.graph.input}
    assert LOGITS_FROM in {t.name for t in prepared.graph.initializer}  # a constant 0: every position


def test_optimization_profiles_cover_batch_and_sequence(quantized):
    fp, q, _ = quantized
    c = RwkvSession(fp).config
    step = optimization_profile(onnx.load(step_path(q)), max_batch=4, max_seq=64).shapes
    assert step["token"] == ((1,), (1,), (4,))
    assert step["state_wkv"][2] == (c.n_layer, 4, c.n_head, c.head_size, c.head_size)
    seq = optimization_profile(onnx.load(q), max_batch=2, max_seq=64).shapes
    assert seq["tokens"] == ((1, 1), (1, 64), (2, 64))
    with pytest.raises(ConfigError):
        optimization_profile(onnx.load(q), max_batch=0, max_seq=1)


def test_misspelled_config_field_is_rejected_by_tritons_schema():
    with pytest.raises(ConfigError, match="invalid Triton model config"):
        parse_model_config('name: "x"\nplatfrom: "onnxruntime_onnx"\n')


def test_polygraphy_compares_fp_with_quantized_on_cpu(quantized, tmp_path, capsys):
    fp, q, _ = quantized
    tokens = list(GOLDEN_TEXT[:16])
    loose = validate(fp, q, tokens, atol=1.0, rtol=0.0)
    assert loose.passed and loose.max_abs["logits"] > 0
    strict = validate(fp, q, tokens, atol=1e-7, rtol=0.0)
    assert not strict.passed
    lowered = tmp_path / "lowered.onnx"
    from rwkvq_onnx.passes.lower_vq import LowerVQ

    m = onnx.load(q)
    LowerVQ()(m)
    onnx.save(m, lowered)
    same = validate(q, lowered, tokens, atol=1e-5, rtol=0.0)
    assert same.passed
    step = validate(step_path(fp), step_path(q), tokens[:6], atol=1.0, rtol=0.0)
    assert step.passed and step.feeds == 6
    assert main(["validate", str(fp), str(q), "--mode", "same", "--atol", "1e-7", "--rtol", "0"]) == 1
    assert main(["validate", str(fp), str(q), "--mode", "same", "--atol", "1.0", "--state-atol", "1.0"]) == 0
