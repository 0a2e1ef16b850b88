"""The TensorRT side checked on CPU: plugin definitions against TensorRT's registration rules (tests/trt_stub.py),
the graph handed to the parser, and build-engine's calls into the builder."""

import os
import re
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest

from rwkvq_onnx.cli import main
from rwkvq_onnx.errors import ConfigError
from rwkvq_onnx.export import step_path
from rwkvq_onnx.plugins import trt_plugins
from rwkvq_onnx.tensorrt_build import prepare_for_tensorrt

from . import trt_stub
from .conftest import GOLDEN_TEXT

ROOT = Path(__file__).resolve().parents[1]
DTYPES = trt_stub.DataType


@pytest.fixture(scope="module")
def quantized(tiny_sym_quantized):
    """A tiny RWKV-7 exported (both graphs) and quantized with RWKVQuant, symmetric (TensorRT-ready)."""
    fp, q, calib = tiny_sym_quantized
    return fp, q


@pytest.fixture()
def plugins(monkeypatch):
    """The project's plugin definitions registered through the stub's copy of TensorRT's checks."""
    trt_stub.install(monkeypatch)
    monkeypatch.setattr(trt_plugins, "compile_ptx", lambda arch: f"// ptx for {arch}")
    return trt_plugins.define_plugins(trt_stub.plugin, DTYPES, "compute_80")


def test_plugin_annotations_are_classes_at_run_time():
    # `from __future__ import annotations` binds the name `annotations` and turns every annotation into a
    # string, which TensorRT's issubclass(annotation, TensorDesc) rejects with TypeError.
    assert "annotations" not in vars(trt_plugins)
    source = (ROOT / "plugins" / "trt_plugins.py").read_text()
    assert "from __future__ import annotations" not in source


def test_plugin_definitions_pass_tensorrts_registration_checks(plugins):
    assert set(trt_stub.REGISTRY) == {"rwkvq::VQMatMul", "rwkvq::VQElementwise"}
    for plugin_id, entry in trt_stub.REGISTRY.items():
        assert "aot" in entry, plugin_id
        assert entry["tensors"][0] == "x" and len(entry["tensors"]) in (3, 4)
    for op, attrs in trt_plugins.PLUGIN_ATTRIBUTES.items():  # the op spec's attributes (+ max_rows)
        assert tuple(trt_stub.REGISTRY[f"rwkvq::{op}"]["attrs"]) == attrs


TENSORRT_PLUGIN_SRC = os.environ.get("RWKVQ_TENSORRT_PLUGIN_SRC")


@pytest.mark.skipif(not TENSORRT_PLUGIN_SRC, reason="set RWKVQ_TENSORRT_PLUGIN_SRC to TensorRT OSS "
                                                    "python/packaging/bindings_wheel/tensorrt to run its own checks")
def test_plugin_definitions_pass_tensorrts_own_plugin_sources(monkeypatch):
    """TensorRT's `tensorrt.plugin` sources, unchanged: its register/aot_impl decorators and _validate checks."""
    trtp = trt_stub.load_tensorrt_plugin_sources(TENSORRT_PLUGIN_SRC, monkeypatch)
    from tensorrt.plugin import _validate

    monkeypatch.setattr(trt_plugins, "compile_ptx", lambda arch: "ptx")
    fns = trt_plugins.define_plugins(trtp, trt_stub.DataType, "compute_90")  # TensorRT's decorators run here
    for op, (desc, aot) in fns.items():
        tensors, attrs, _, _ = _validate._parse_register_inputs(desc, False)
        assert _validate._parse_register_return(desc) == 1
        assert tuple(attrs) == trt_plugins.PLUGIN_ATTRIBUTES[op]
        used = _validate._validate_aot_impl(aot, types.SimpleNamespace(input_tensor_names=tensors, input_attrs=attrs))
        assert tuple(used) == trt_plugins.PLUGIN_ATTRIBUTES[op]


def test_stub_rejects_what_tensorrt_rejects():
    # The checks are live: a string annotation, a missing aot_impl return annotation are refused.
    trt_stub.REGISTRY.clear()

    def desc(x: "trt_stub.TensorDesc", n: int) -> trt_stub.TensorDesc:
        return x

    with pytest.raises(TypeError):
        trt_stub.register("t::A")(desc)

    @trt_stub.register("t::B")
    def desc_b(x: trt_stub.TensorDesc, n: int) -> trt_stub.TensorDesc:
        return x

    def aot(x: trt_stub.TensorDesc, n: int, outputs, tactic: int):
        return None

    with pytest.raises(ValueError, match="No return annotation"):
        trt_stub.aot_impl("t::B")(aot)


def _kernel_entries() -> set[str]:
    return set(re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(',
                          (ROOT / "plugins" / "rwkvq_kernels.cu").read_text()))


@pytest.mark.parametrize("max_rows,kernel,rpw", [(1, "rwkvq_trt_vq_gemv_decode", 2), (8, "rwkvq_trt_vq_gemv", 1)])
def test_aot_impl_launches_the_benchmarked_instance(plugins, max_rows, kernel, rpw):
    desc, aot = plugins["VQMatMul"]
    attrs = dict(N=128, K=256, dim=2, group_rows=16, group_cols=128, index_bits=6, max_rows=max_rows)
    x = trt_stub.TensorDesc(DTYPES.float16, trt_stub.ShapeExprs([max_rows, 256]))
    codes = trt_stub.TensorDesc(DTYPES.int32, trt_stub.ShapeExprs([128, 24]))  # 96 bytes per row, packed
    books = trt_stub.TensorDesc(DTYPES.int32, trt_stub.ShapeExprs([512]))
    scales = trt_stub.TensorDesc(DTYPES.float32, trt_stub.ShapeExprs([8, 2]))
    out = desc(x, codes, books, scales, **attrs)
    assert list(out.shape_expr) == [max_rows, 128] and out.dtype == DTYPES.float16
    name, ptx, params, extra = aot(x, codes, books, scales, **attrs, outputs=(out,), tactic=0)
    assert name == kernel and name in _kernel_entries() and ptx == "// ptx for compute_80"
    launch = trt_plugins.gemv_launch(128, 256, 2, 16, 128, 6, max_rows)
    assert launch["rows_per_warp"] == rpw
    assert (params.grid_x, params.grid_y, params.block_x, params.shared_mem) == (
        *launch["grid"], launch["block"], launch["shared_mem"])
    assert [e.value for e in extra] == [max_rows, 128, 256, 2, 16, 128, 6, launch["row_bytes"]]
    # the harness times the same launch (no copy of the geometry there)
    assert "trt_plugins.gemv_launch" in (ROOT / "plugins" / "harness.py").read_text()


def test_plugin_refuses_types_its_kernel_does_not_read(plugins):
    desc, _ = plugins["VQMatMul"]
    attrs = dict(N=128, K=256, dim=2, group_rows=16, group_cols=128, index_bits=6, max_rows=1)
    shapes = [[1, 256], [128, 24], [512], [8, 2]]
    ok = [DTYPES.float16, DTYPES.int32, DTYPES.int32, DTYPES.float32]
    desc(*trt_stub.desc_from_onnx_types(ok, shapes), **attrs)
    for i, bad in ((0, DTYPES.float32), (1, DTYPES.int8), (2, DTYPES.int8)):  # fp32 activations, INT8 weights
        types_ = list(ok)
        types_[i] = bad
        with pytest.raises(ValueError, match="the kernel reads"):
            desc(*trt_stub.desc_from_onnx_types(types_, shapes), **attrs)
    widened = [[1, 256], [128, 96], [512], [8, 2]]  # UINT8 codes as the parser widens them: one int32 per byte
    with pytest.raises(ValueError, match="packed words"):
        desc(*trt_stub.desc_from_onnx_types(ok, widened), **attrs)
    ew_desc, _ = plugins["VQElementwise"]
    ew_desc(*trt_stub.desc_from_onnx_types([DTYPES.float16, DTYPES.int32, DTYPES.float32], [[1, 64], [8], [16]]),
            index_bits=4, shape="64")
    with pytest.raises(ValueError, match="the kernel reads"):
        ew_desc(*trt_stub.desc_from_onnx_types([DTYPES.float32, DTYPES.int32, DTYPES.float32],
                                               [[1, 64], [8], [16]]), index_bits=4, shape="64")
    with pytest.raises(ValueError, match="packed words"):
        ew_desc(*trt_stub.desc_from_onnx_types([DTYPES.float16, DTYPES.int32, DTYPES.float32],
                                               [[1, 64], [32], [16]]), index_bits=4, shape="64")


def test_gemv_refuses_rows_past_max_rows_and_shared_memory_past_48k():
    assert trt_plugins.gemv_supported(4096, 4096, 2, 16, 256, 6, max_rows=8) is None
    assert "1..8 activation rows" in trt_plugins.gemv_supported(4096, 4096, 2, 16, 256, 6, max_rows=9)
    # 8-bit indices, dim 2, 56 column groups: 56 * 256 * 2 * 4 bytes of codebooks alone
    why = trt_plugins.gemv_supported(4096, 14336, 2, 16, 256, 8, max_rows=1)
    assert why and "shared memory" in why and str(trt_plugins.SHARED_MEM_LIMIT) in why
    with pytest.raises(ConfigError, match="multiple of dim"):  # the op spec's check
        trt_plugins.gemv_supported(64, 96, 2, 4, 3, 6)


def test_ptx_target_is_a_virtual_architecture_from_the_device(monkeypatch):
    with pytest.raises(Exception, match="compute_XY"):
        trt_plugins.compile_ptx("sm_90")
    monkeypatch.setattr(trt_plugins.ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError(name)))
    with pytest.raises(Exception, match="GPU"):
        trt_plugins.device_arch()


def test_prepare_gives_the_parser_int32_words_and_fp16_activations(quantized):
    _, q = quantized
    model = onnx.load(step_path(q))
    prepared, notes = prepare_for_tensorrt(model, max_rows=1)
    inits = {t.name: t for t in prepared.graph.initializer}
    producers = {o: n for n in prepared.graph.node for o in n.output}
    custom = [n for n in prepared.graph.node if n.domain == "rwkvq"]
    assert custom and notes["weights_as_int32_words"] > 0
    original = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in custom:
        cast = producers[node.input[0]]
        assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.FLOAT16
        byte_inputs = node.input[1:3] if node.op_type == "VQMatMul" else node.input[1:2]  # codes (+ codebooks)
        for name in byte_inputs:
            assert inits[name].data_type == onnx.TensorProto.INT32 and name.endswith("_int32_words")
            words = onnx.numpy_helper.to_array(inits[name]).astype("<i4").tobytes()
            source = original[name[: -len("_int32_words")]].tobytes()
            assert words[: len(source)] == source and not words[len(source):].strip(b"\0")  # same bytes
        if node.op_type == "VQMatMul":  # code rows stay rows: [N, row_bytes / 4]
            codes = original[node.input[1][: -len("_int32_words")]]
            assert list(inits[node.input[1]].dims) == [codes.shape[0], codes.shape[1] // 4]
    onnx.checker.check_model(prepared)  # one Cast per activation: no duplicate tensor names
    assert not any(t.data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8) for t in prepared.graph.initializer
                   if any(t.name in n.input for n in custom))


def test_int32_words_keep_the_bytes():
    from rwkvq_onnx.tensorrt_build import as_int32_words

    rows = np.arange(24, dtype=np.uint8).reshape(2, 12)
    assert as_int32_words(rows).shape == (2, 3) and as_int32_words(rows).tobytes() == rows.tobytes()
    odd = np.array([-1, 2, -3, 4, 5], np.int8)
    w = as_int32_words(odd)
    assert w.shape == (2,) and w.tobytes()[:5] == odd.tobytes() and w.tobytes()[5:] == b"\0\0\0"


@pytest.fixture()
def stub_build(monkeypatch):
    calls = trt_stub.install(monkeypatch)
    monkeypatch.setattr("rwkvq_onnx.tensorrt_build.cuda_device_count", lambda: 1)
    monkeypatch.setattr(trt_plugins, "device_arch", lambda device=0: "compute_90")
    monkeypatch.setattr(trt_plugins, "compile_ptx", lambda arch: "ptx")
    trt_plugins.register_plugins.cache_clear()
    yield calls
    trt_plugins.register_plugins.cache_clear()


def test_build_engine_against_the_stub_builder(quantized, tmp_path, stub_build, capsys):
    _, q = quantized
    plan = tmp_path / "q.plan"
    assert main(["build-engine", str(step_path(q)), "-o", str(plan)]) == 0
    out = capsys.readouterr().out
    calls = trt_stub.CALLS
    assert calls.flags == []  # no BuilderFlag.FP16 on a STRONGLY_TYPED network
    assert calls.network_flags == 1 << trt_stub.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert len(calls.parsed_files) == 1 and calls.parsed_bytes == 0  # parse_from_file, not parse(bytes)
    assert calls.external_data == ["model.onnx.data"]  # weights as external data: no 2 GiB protobuf limit
    for op, types_, attrs in calls.plugin_inputs:
        assert types_[0] == DTYPES.float16 and types_[1] == DTYPES.int32, (op, types_)
        if op == "VQMatMul":
            assert attrs["max_rows"] == 1
            assert types_[2] == DTYPES.int32  # codebooks as words too
    for (op, _, attrs), shapes in zip(calls.plugin_inputs, calls.plugin_shapes):
        if op == "VQMatMul":  # packed words, not one int32 per byte
            row_bytes = trt_plugins.gemv_launch(*(attrs[k] for k in ("N", "K", "dim", "group_rows", "group_cols",
                                                                      "index_bits")))["row_bytes"]
            assert shapes[1] == [attrs["N"], row_bytes // 4]
    assert set(trt_stub.REGISTRY) == {"rwkvq::VQMatMul", "rwkvq::VQElementwise"}
    cache = Path(str(plan) + ".timing-cache")
    assert plan.read_bytes() == b"stub engine" and cache.read_bytes() == b"timing:"
    # profile as readable lines, not a dict of tuples
    assert "optimization profile:" in out and "{" not in out.split("optimization profile:")[1]
    assert re.search(r"^\s+token\s+min 1, opt 1, max 1$", out, re.M)
    assert re.search(r"^\s+state_wkv\s+min 2x1x2x32x32, opt 2x1x2x32x32, max 2x1x2x32x32$", out, re.M)
    assert main(["build-engine", str(step_path(q)), "-o", str(plan)]) == 0
    assert calls.timing_cache_in == b"timing:"  # the second build starts from the first one's cache


@pytest.mark.parametrize("args,needle", [
    (["--max-batch", "9"], "1..8 activation rows"),
    (["--fp16"], "export with --fp16"),
])
def test_build_engine_refuses_what_the_plugins_cannot_run(quantized, tmp_path, stub_build, capsys, args, needle):
    _, q = quantized
    assert main(["build-engine", str(step_path(q)), "-o", str(tmp_path / "x.plan"), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert trt_stub.CALLS.flags == [] and not (tmp_path / "x.plan").exists()


def test_build_engine_refuses_sequence_graphs_past_max_rows(quantized, tmp_path, stub_build, capsys):
    _, q = quantized
    assert main(["build-engine", str(q), "-o", str(tmp_path / "s.plan"), "--max-seq", "16"]) == 2
    err = capsys.readouterr().err
    assert "16" in err and "step graph" in err and len(err.strip().splitlines()) == 1
    assert main(["build-engine", str(q), "-o", str(tmp_path / "s.plan"), "--max-seq", "8"]) == 0
    capsys.readouterr()
    assert main(["build-engine", str(q), "-o", str(tmp_path / "t.plan"), "--max-seq", "8", "--serving"]) == 2
    assert "--serving needs the step graph" in capsys.readouterr().err


def test_build_engine_serving_variant_has_batch_first_profile(quantized, tmp_path, stub_build, capsys):
    _, q = quantized
    plan = tmp_path / "b.plan"
    assert main(["build-engine", str(step_path(q)), "-o", str(plan), "--serving", "--max-batch", "4"]) == 0
    wkv = trt_stub.CALLS.profile["state_wkv"]
    assert wkv[2] == (4, 2, 2, 32, 32)  # [B, L, H, N, N]
    import json

    assert json.loads(Path(str(plan) + ".json").read_text())["state_layout"] == "batch_first"


def test_extras_declare_tensorrt_lower_bound_and_grpc_client():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(re.fullmatch(r"tensorrt>=10\.(9|[1-9]\d)(\.\d+)*", d) for d in extras["tensorrt"])
    assert any(d.startswith("tritonclient[grpc]") for d in extras["deploy"])


def test_harness_rotates_weights_out_of_l2():
    from rwkvq_onnx.plugins import harness

    mib = 1 << 20
    # H100: 50 MiB L2. A 4096x4096 fp16 matrix (32 MiB) fits in L2 alone; a 3-bit VQ set (~6.1 MiB) easily.
    for set_bytes in (32 * mib, 6 * mib + 12345, 200 * mib):
        n = harness.rotation_count(set_bytes, 50 * mib)
        assert n >= 2 and n * set_bytes >= harness.L2_FACTOR * 50 * mib
        assert (n - 1) * set_bytes < harness.L2_FACTOR * 50 * mib or n == 2  # no more copies than needed
    with pytest.raises(ValueError):
        harness.rotation_count(1 << 20, 50 * mib, max_bytes=64 * mib)
    with pytest.raises(ValueError):
        harness.rotation_count(0, 50 * mib)
    assert harness.fast_path_ok(dict(N=4096, K=4096, dim=2, group_rows=16, group_cols=256, index_bits=6), 1)
    assert not harness.fast_path_ok(dict(N=4096, K=4096, dim=2, group_rows=16, group_cols=256, index_bits=6), 9)


@pytest.mark.slow
def test_fp16_graph_gives_the_plugins_fp16_not_the_float32_of_the_onnx_op(tiny_ckpt, tmp_path, stub_build):
    """In --fp16 exports the rwkvq ops sit between Casts to float32; the plugin must still receive fp16."""
    fp16 = tmp_path / "fp16.onnx"
    assert main(["export", str(tiny_ckpt), "-o", str(fp16), "--mode", "both", "--fp16"]) == 0
    calib = tmp_path / "calib.txt"
    calib.write_text((GOLDEN_TEXT.decode() + " ") * 20)
    q = tmp_path / "q16.onnx"
    assert main(["quantize", str(fp16), "-o", str(q), "--bpw", "3.275", "--calib", str(calib), "--nsamples", "2",
                 "--seqlen", "32", "--sym", "sym"]) == 0
    model = onnx.load(step_path(q))
    producers = {o: n for n in model.graph.node for o in n.output}
    # the ops that become TensorRT plugins (SQMatMul and WKV7Step are lowered to TensorRT's own layers)
    custom = [n for n in model.graph.node if n.domain == "rwkvq" and n.op_type in ("VQMatMul", "VQElementwise")]
    assert any(producers[n.input[0]].op_type == "Cast" for n in custom)  # the situation of the defect
    assert main(["build-engine", str(step_path(q)), "-o", str(tmp_path / "q16.plan"), "--fp16"]) == 0
    seen = trt_stub.CALLS.plugin_inputs
    assert len(seen) == len(custom)
    assert all(types_[0] == DTYPES.float16 and types_[1] == DTYPES.int32 for _, types_, _ in seen)
