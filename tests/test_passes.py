"""The lowering pipeline on graphsurgeon: real exported graphs (Scan bodies included), count checks, summaries."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rwkvq_onnx.errors import ConfigError
from rwkvq_onnx.export import build_graph
from rwkvq_onnx.graph import set_initializer
from rwkvq_onnx.names import DOMAIN
from rwkvq_onnx.passes.base import PassResult
from rwkvq_onnx.passes.cleanup import Cleanup
from rwkvq_onnx.passes.pipeline import LoweringOptions, lower_payloads
from rwkvq_onnx.quant import GPTQConfig, VQConfig, elementwise_quantize, gptq_quantize, gptvq_quantize
from rwkvq_onnx.quant.formats import Payloads
from rwkvq_onnx.runtime import session_options
from rwkvq_onnx.synthetic import synthetic_rwkv7, synthetic_rwkv7_config

SQ, VQ, EW = "blocks.0.att.key.weight", "blocks.1.ffn.value.weight", "blocks.0.att.x_r"


@pytest.fixture(scope="module")
def tiny():
    config = synthetic_rwkv7_config(2, 64, 256, head_size=32)
    return config, synthetic_rwkv7(config, seed=1)


def _payloads(sd) -> Payloads:
    rng = np.random.default_rng(0)
    sq = gptq_quantize(sd[SQ], np.eye(sd[SQ].shape[1]), GPTQConfig(bits=3, group_size=32))
    vq = gptvq_quantize(sd[VQ], np.eye(sd[VQ].shape[1]), VQConfig(bits=3, dim=2, group_rows=32, group_cols=64,
                                                                  kmeans_iters=3))
    ew = elementwise_quantize(sd[EW].reshape(-1), rng.random(sd[EW].size) + 0.1)
    return Payloads(linear={SQ: sq, VQ: vq}, elementwise={EW: ew})


def _feeds(config, model):
    names = {i.name for i in model.graph.input}
    L, C, H, N = config.n_layer, config.n_embd, config.n_embd // config.head_size, config.head_size
    rng = np.random.default_rng(1)
    feeds = {"state_att_shift": rng.standard_normal((L, 1, C)).astype(np.float32),
             "state_ffn_shift": rng.standard_normal((L, 1, C)).astype(np.float32),
             "state_wkv": 0.1 * rng.standard_normal((L, 1, H, N, N)).astype(np.float32)}
    feeds["tokens" if "tokens" in names else "token"] = (np.array([[5, 70, 200, 3]]) if "tokens" in names
                                                        else np.array([70]))
    return feeds


def _run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], feeds)[0]


def _subgraphs(graph):
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield attr.g


@pytest.mark.parametrize("step,wkv_op", [(False, "standard"), (False, "fused"), (True, "fused")])
def test_pipeline_on_an_exported_graph_equals_the_dequantized_weights(tiny, step, wkv_op):
    """The sequence graph with its Scans (standard) or rwkvq.WKV7Sequence nodes (fused), and the step graph."""
    config, sd = tiny
    model = build_graph(config, sd, step=step, wkv_op=wkv_op)
    payloads = _payloads(sd)
    expected_model = onnx.ModelProto()
    expected_model.CopyFrom(model)
    for name, q in payloads.linear.items():
        set_initializer(expected_model, name, q.dequantize().T)
    # the graph stores element-wise vectors flat [C]
    set_initializer(expected_model, EW, payloads.elementwise[EW].dequantize().reshape(-1))
    bodies = [(b.name, len(b.node), sorted(t.name for t in b.initializer)) for b in _subgraphs(model.graph)]

    lines = []
    results = lower_payloads([model], payloads, LoweringOptions(), log=lines.append)

    by_pass = {r.name: r.counts for r in results}
    assert by_pass["rewrite-scalar"] == {"sqmatmul": 1} and by_pass["rewrite-vector"] == {"vq_matmul": 1}
    assert by_pass["rewrite-elementwise"] == {"vq_elementwise": 1}
    assert "rewrite-vector: rewrote 1 MatMuls to rwkvq.VQMatMul" in lines
    # the Scan bodies come back as they were, and nothing is stored twice
    assert [(b.name, len(b.node), sorted(t.name for t in b.initializer)) for b in _subgraphs(model.graph)] == bodies
    names = [t.name for t in model.graph.initializer]
    assert len(names) == len(set(names)) and SQ not in names and VQ not in names
    assert any(n.domain == DOMAIN for n in model.graph.node) and any(o.domain == DOMAIN for o in model.opset_import)
    feeds = _feeds(config, model)
    np.testing.assert_allclose(_run(model, feeds), _run(expected_model, feeds), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("step", [False, True])
def test_lowered_vq_graph_keeps_no_rwkvq_domain(tiny, step):
    config, sd = tiny
    model = build_graph(config, sd, step=step)
    plain = onnx.ModelProto()
    plain.CopyFrom(model)
    payloads = _payloads(sd)
    lower_payloads([model], payloads, LoweringOptions())
    results = lower_payloads([plain], payloads, LoweringOptions(lower_vq=True))
    # and the graph's fused recurrence (export's default), one per layer
    assert {r.name: r.counts for r in results}["lower-vq"] == {"VQMatMul": 1, "VQElementwise": 1, "SQMatMul": 1,
                                                                "WKV7Step" if step else "WKV7Sequence": config.n_layer}
    assert not any(n.domain == DOMAIN for n in plain.graph.node)
    assert not any(o.domain == DOMAIN for o in plain.opset_import)
    feeds = _feeds(config, model)
    np.testing.assert_allclose(_run(plain, feeds), _run(model, feeds), atol=1e-5, rtol=1e-5)


def test_lower_payloads_refuses_a_step_graph_with_different_rewrites(tiny):
    config, sd = tiny
    seq, step = build_graph(config, sd, step=False), build_graph(config, sd, step=True)
    # the step graph lacks one of the weights the sequence graph has: its rewrite counts differ
    for node in step.graph.node:
        if node.op_type == "MatMul" and node.input[1] == VQ:
            node.input[1] = VQ + "_renamed"
    set_initializer(step, VQ + "_renamed", sd[VQ].T)
    with pytest.raises(ConfigError, match="graph 1 got different rewrites from the sequence graph in pass "
                                          "rewrite-vector") as err:
        lower_payloads([seq, step], _payloads(sd), LoweringOptions())
    assert "\n" not in str(err.value)


def test_cleanup_keeps_initializers_a_scan_body_reads_from_the_outer_scope():
    def body(i):
        return helper.make_graph(
            [helper.make_node("Mul", [f"x{i}", "w"], [f"xw{i}"]),
             helper.make_node("Add", [f"s{i}", f"xw{i}"], [f"t{i}"]),
             helper.make_node("Identity", [f"t{i}"], [f"o{i}"])], f"body{i}",
            [helper.make_tensor_value_info(f"s{i}", TensorProto.FLOAT, [4]),
             helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [4])],
            [helper.make_tensor_value_info(f"t{i}", TensorProto.FLOAT, [4]),
             helper.make_tensor_value_info(f"o{i}", TensorProto.FLOAT, [4])])

    nodes = [helper.make_node("Scan", ["s0", "xs"], ["s1", "ys1"], num_scan_inputs=1, body=body(0)),
             helper.make_node("Scan", ["s1", "xs"], ["s2", "ys2"], num_scan_inputs=1, body=body(1)),
             helper.make_node("Add", ["s2", "w"], ["out"]),
             helper.make_node("Neg", ["unused_in"], ["dead"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("s0", TensorProto.FLOAT, [4]),
                                           helper.make_tensor_value_info("xs", TensorProto.FLOAT, [3, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4])],
                              initializer=[numpy_helper.from_array(np.arange(4, dtype=np.float32), "w"),
                                           numpy_helper.from_array(np.ones(2, np.float32), "unused_in")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    result = Cleanup()(model)
    assert result.counts == {"nodes": 1, "initializers": 1}
    assert result.line() == "cleanup: removed 1 unused nodes; removed 1 unused initializers"
    assert [t.name for t in model.graph.initializer] == ["w"]  # once, in the outer graph
    assert all(not b.initializer for b in _subgraphs(model.graph))
    feeds = {"s0": np.zeros(4, np.float32), "xs": np.ones((3, 4), np.float32)}
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(out, 7 * np.arange(4))  # 3 + 3 scan steps of x * w, then + w


def test_pass_result_lines_read_as_sentences():
    r = PassResult("cleanup", {"nodes": 0, "initializers": 94}, phrases=Cleanup.phrases)
    assert r.line() == "cleanup: removed 94 unused initializers"
    assert PassResult("lower-vq").line() == "lower-vq: nothing to do"
    r = PassResult("rewrite-scalar", {"qdq": 2}, {"a": "group size 48 is not a power of two",
                                                 "b": "group size 48 is not a power of two"},
                   phrases={"qdq": "rewrote {n} MatMuls to QDQ"})
    assert r.line() == "rewrite-scalar: rewrote 2 MatMuls to QDQ; 2 weights: group size 48 is not a power of two"


def test_cleanup_refuses_an_rwkvq_node_whose_attributes_disagree_with_its_inputs(tiny):
    config, sd = tiny
    model = build_graph(config, sd, step=True)
    lower_payloads([model], _payloads(sd), LoweringOptions())
    node = next(n for n in model.graph.node if n.op_type == "VQMatMul")
    next(a for a in node.attribute if a.name == "group_rows").i = 16  # codebooks were built for 32 rows
    with pytest.raises(ConfigError, match=f"rwkvq.VQMatMul node '{node.name}': input codebooks has shape"):
        Cleanup()(model)


def test_cleanup_counts_the_weights_the_rewrites_replaced(tiny):
    config, sd = tiny
    model = build_graph(config, sd, step=True)
    results = {r.name: r for r in lower_payloads([model], _payloads(sd), LoweringOptions())}
    # the two linear weights and the element-wise vector are no longer initializers
    assert results["cleanup"].counts["initializers"] == 3
    assert results["cleanup"].line() == "cleanup: removed 3 unused initializers"


def test_pipeline_on_a_float16_graph_casts_around_the_op_and_folds_vectors(tiny):
    config, sd = tiny
    model = build_graph(config, sd, step=True, fp16=True)
    payloads = _payloads(sd)
    expected_model = onnx.ModelProto()
    expected_model.CopyFrom(model)
    for name, q in payloads.linear.items():
        set_initializer(expected_model, name, q.dequantize().T.astype(np.float16))
    set_initializer(expected_model, EW, payloads.elementwise[EW].dequantize().reshape(-1).astype(np.float16))
    results = {r.name: r.counts for r in lower_payloads([model], payloads, LoweringOptions())}
    assert results["rewrite-vector"] == {"vq_matmul": 1} and results["rewrite-elementwise"] == {"folded": 1}
    vq = next(n for n in model.graph.node if n.op_type == "VQMatMul")
    producers = {o: n for n in model.graph.node for o in n.output}
    assert producers[vq.input[0]].op_type == "Cast"
    feeds = _feeds(config, model)
    np.testing.assert_allclose(_run(model, feeds), _run(expected_model, feeds), atol=2e-2, rtol=1e-2)
