"""rwkvq.WKV7Sequence (the RWKV-7 recurrence over T tokens per node) and the RWKV-7 sequence graphs that use it.

Tolerances: the op's numpy reference runs the step reference (float64 inside each step, float32 state between
steps); the native kernel sums N float32 products per dot in its own order, so over T tokens it stays within
1e-5 of the reference relative to the largest output value (float32's 6e-8 resolution times sums of up to 64
terms per step, and the decays < 1 keep earlier rounding from growing, with margin for T = 40). The native
sequence op runs the step kernel's own per-head code token by token, so it equals T native steps bit for bit
(checked exactly). Its lowering is the export's Scan (MatMuls summed by onnxruntime), within the same 1e-5.
Fused vs standard sequence graphs run the same formula through 2 layers: logits agree to 1e-5 absolute
(logits here are O(1)); both are checked against the official fixture with FP32_ATOL.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from rwkvq_onnx.checkpoint import load_checkpoint
from rwkvq_onnx.errors import ConfigError
from rwkvq_onnx.export import build_graph
from rwkvq_onnx.names import DOMAIN, OPS_KEY, OPSET_VERSION
from rwkvq_onnx.opspec import SPECS, wkv7_sequence, wkv7_step
from rwkvq_onnx.runtime import session_options, zero_state

from .conftest import FP32_ATOL, golden_tokens, shared_file
from .test_wkv7_step import _inputs as _step_inputs
from .test_wkv7_step import _run  # the two ops take the same inputs by the same names

REL_TOL = 1e-5
NODE = "wkv_seq_under_test"


def _inputs(rng: np.random.Generator, B: int, T: int, H: int, N: int) -> list[np.ndarray]:
    """A state and r, w, k, v, a, b [B, T, C] shaped like a real layer's (each token's vectors as the step test
    draws them: decays in (0.3, 1), kk unit-norm per head, a = -kk, b = kk * iclr)."""
    state = 0.5 * rng.standard_normal((B, H, N, N)).astype(np.float32)
    per_token = [_step_inputs(rng, B, H, N)[1:] for _ in range(T)]
    vectors = [np.stack([tok[i] for tok in per_token], axis=1) if T else np.zeros((B, 0, H * N), np.float32)
               for i in range(6)]
    return [state, *(v.astype(np.float32) for v in vectors)]


def _one_node_model(op: str, head_size, **attrs) -> onnx.ModelProto:
    names = list(wkv7_sequence.INPUTS)
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in wkv7_sequence.OUTPUTS]
    node = helper.make_node(op, names, list(wkv7_sequence.OUTPUTS), name=NODE, domain=DOMAIN,
                            **({"head_size": head_size} | attrs))
    graph = helper.make_graph([node], "wkv7_sequence", ins, outs)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, OPSET_VERSION)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _close(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ref.shape
    assert np.abs(got - ref).max(initial=0.0) <= REL_TOL * max(np.abs(ref).max(initial=0.0), 1.0)


def test_reference_carries_the_state_from_token_to_token():
    """The reference after T tokens, fed its own state for T more, equals the reference over the 2T tokens."""
    rng = np.random.default_rng(0)
    state, *vectors = _inputs(rng, 2, 6, 3, 8)
    y, s = wkv7_sequence.reference(state, *vectors, head_size=8)
    y1, s1 = wkv7_sequence.reference(state, *(v[:, :3] for v in vectors), head_size=8)
    y2, s2 = wkv7_sequence.reference(s1, *(v[:, 3:] for v in vectors), head_size=8)
    np.testing.assert_array_equal(np.concatenate([y1, y2], axis=1), y)
    np.testing.assert_array_equal(s2, s)
    # the first token is one step from the input state
    y0, _ = wkv7_step.reference(state, *(v[:, 0] for v in vectors), head_size=8)
    np.testing.assert_array_equal(y[:, 0], y0)


@pytest.mark.parametrize("B,T,H,N", [(1, 40, 12, 64), (3, 7, 2, 32), (2, 5, 1, 1), (1, 9, 3, 5), (2, 0, 2, 4),
                                     (0, 3, 2, 4)])
def test_native_op_and_lowering_match_the_reference(B, T, H, N):
    from rwkvq_onnx.passes.lower_vq import LowerVQ

    rng = np.random.default_rng(B * 1000 + T * 100 + H * 10 + N)
    feeds = _inputs(rng, B, T, H, N)
    y_ref, s_ref = wkv7_sequence.reference(*feeds, head_size=N)
    model = _one_node_model(wkv7_sequence.OP_TYPE, N)
    y, s = _run(model, feeds)
    _close(y, y_ref)
    _close(s, s_ref)
    if T == 0:  # no token: the state passes through unchanged
        np.testing.assert_array_equal(s, feeds[0])
    assert LowerVQ()(model).counts == {wkv7_sequence.OP_TYPE: 1}
    assert not any(n.domain == DOMAIN for n in model.graph.node)
    assert [n.op_type for n in model.graph.node].count("Scan") == 1
    if B == 0 or T == 0:  # onnxruntime's Scan dies of SIGFPE on an empty batch or sequence (the standard export's
        return            # Scan as well): the native op takes them, the lowering is run on the others
    y, s = _run(model, feeds, native=False)  # standard ops only: plain onnxruntime
    _close(y, y_ref)
    _close(s, s_ref)


def test_native_sequence_is_the_native_step_token_by_token():
    """Bit-identical to running WKV7Step once per token (the kernels share their per-head code)."""
    rng = np.random.default_rng(3)
    B, T, H, N = 2, 12, 3, 64
    state, *vectors = _inputs(rng, B, T, H, N)
    y, s = _run(_one_node_model(wkv7_sequence.OP_TYPE, N), [state, *vectors])
    step = _one_node_model(wkv7_step.OP_TYPE, N)
    for t in range(T):
        y_t, state = _run(step, [state, *(v[:, t] for v in vectors)])
        np.testing.assert_array_equal(y[:, t], y_t)
    np.testing.assert_array_equal(s, state)


@pytest.mark.parametrize("case,expect", [
    ("head_size=0", "head_size=0 is outside"),
    ("head_size=5000", "head_size=5000 is outside"),
    ("head_size=8", "the state has shape [2, 3, 4, 4], expected [B, H, 8, 8]"),
    ("state rank 3", "the state has rank 3"),
    ("short r", "r has shape [2, 5, 11], expected [2, T, 12]"),
    ("tokens of k", "k has shape [2, 4, 12], expected [2, 5, 12]"),
    ("batch of b", "b has shape [1, 5, 12], expected [2, 5, 12]"),
    ("step-shaped v", "v has shape [2, 12], expected [2, 5, 12]"),
    ("head_size=4.0", "attribute 'head_size' is missing or not an integer"),
])
def test_native_op_refuses_bad_input_with_one_line(case, expect):
    """Every size is checked before use; the error is one line naming the node."""
    feeds = _inputs(np.random.default_rng(2), 2, 5, 3, 4)
    head_size = 4
    if case.startswith("head_size"):
        text = case.split("=")[1]
        head_size = float(text) if "." in text else int(text)
    elif case == "state rank 3":
        feeds[0] = feeds[0][:, 0]
    elif case == "short r":
        feeds[1] = feeds[1][:, :, :11]
    elif case == "tokens of k":
        feeds[3] = feeds[3][:, :4]
    elif case == "batch of b":
        feeds[6] = feeds[6][:1]
    elif case == "step-shaped v":
        feeds[4] = feeds[4][:, 0]
    model = _one_node_model(wkv7_sequence.OP_TYPE, head_size)
    with pytest.raises(Exception) as info:
        _run(model, feeds)
    message = str(info.value)
    assert f"rwkvq.WKV7Sequence node '{NODE}'" in message and expect in message, message
    line = message[message.index("rwkvq.WKV7Sequence"):].strip()
    assert "\n" not in line


def test_spec_validation_names_the_node():
    state = np.zeros((1, 2, 4, 4), np.float32)
    vec = np.zeros((1, 3, 8), np.float32)
    assert wkv7_sequence.validate({"head_size": 4}, state, *[vec] * 6, node="n").head_size == 4
    assert wkv7_sequence.validate({"head_size": 4}, *[vec] * 6, node="n").head_size == 4  # the passes' convention
    for attrs, inputs, expect in [({"head_size": 4, "eps": 1}, [], "unknown attribute(s) eps"),
                                  ({}, [], "missing attribute head_size"),
                                  ({"head_size": 4}, [state[:, :, :2], *[vec] * 6], "expected [B, H, 4, 4]"),
                                  ({"head_size": 4}, [state, *[vec[:, :, :4]] * 6], "input r has shape [1, 3, 4]"),
                                  ({"head_size": 4}, [state, vec, vec[:, :2], *[vec] * 4], "input w has shape"),
                                  ({"head_size": 4}, [state, *[vec[:, 0]] * 6], "input r has shape [1, 8]"),
                                  ({"head_size": 4}, [state, *[vec.astype(np.float64)] * 6], "input r is float64")]:
        with pytest.raises(ConfigError, match="rwkvq.WKV7Sequence node 'n': ") as info:
            wkv7_sequence.validate(attrs, *inputs, node="n")
        assert expect in str(info.value) and "\n" not in str(info.value)
    assert SPECS[wkv7_sequence.OP_TYPE] is wkv7_sequence


# ---- the sequence graphs ---------------------------------------------------------------------------------

def _forward(model: onnx.ModelProto, config, tokens: np.ndarray, native: bool = True) -> list[np.ndarray]:
    """Logits [B, T, V] and the three new state tensors of a sequence graph from the zero state."""
    import onnxruntime as ort

    opts = session_options() if native else ort.SessionOptions()
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    state = zero_state(config, tokens.shape[0])
    return sess.run(None, {"tokens": tokens, "state_att_shift": state[0], "state_ffn_shift": state[1],
                           "state_wkv": state[2]})


def test_fused_sequence_graph_replaces_the_scans(tiny_ckpt):
    config, sd = load_checkpoint(tiny_ckpt)
    fused = build_graph(config, sd, step=False, wkv_op="fused")
    standard = build_graph(config, sd, step=False, wkv_op="standard")
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops[wkv7_sequence.OP_TYPE] == config.n_layer and ops["Scan"] == 0
    assert Counter(n.op_type for n in standard.graph.node)["Scan"] == config.n_layer
    assert not any(n.domain == DOMAIN for n in standard.graph.node)
    assert {p.key: p.value for p in fused.metadata_props}[OPS_KEY] == wkv7_sequence.OP_TYPE
    onnx.checker.check_model(fused, full_check=True)
    tokens = np.array([[1, 200, 5, 7, 255], [0, 9, 9, 42, 17]])
    got, want = _forward(fused, config, tokens), _forward(standard, config, tokens, native=False)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


@pytest.mark.parametrize("wkv_op", ["fused", "standard"])
def test_sequence_graphs_reproduce_the_official_logits(wkv_op):
    config, sd = load_checkpoint(shared_file("fixtures", "tiny-rwkv7-834K.pth"))
    golden = np.load(shared_file("fixtures", "tiny-rwkv7-834K.golden-logits.npy"))
    model = build_graph(config, sd, step=False, wkv_op=wkv_op)
    logits = _forward(model, config, golden_tokens()[None], native=wkv_op == "fused")[0]
    np.testing.assert_allclose(logits[0], golden, atol=FP32_ATOL, rtol=0)


def test_tensorrt_preparation_lowers_the_fused_sequence_to_the_standard_graph(tiny_ckpt):
    """build-engine's preparation lowers WKV7Sequence to the Scan `--wkv-op standard` writes: same numbers as the
    native op (1e-5), and the Scan bodies are the standard export's node for node."""
    from rwkvq_onnx.tensorrt_build import prepare_for_tensorrt

    config, sd = load_checkpoint(tiny_ckpt)
    fused = build_graph(config, sd, step=False, wkv_op="fused")
    prepared, notes = prepare_for_tensorrt(fused)
    assert notes["wkv_sequences_lowered"] == config.n_layer and notes["wkv_steps_lowered"] == 0
    assert not any(n.domain == DOMAIN for n in prepared.graph.node)
    assert all(o.domain != DOMAIN for o in prepared.opset_import)
    onnx.checker.check_model(prepared, full_check=True)

    def bodies(model):
        return [[n.op_type for n in a.g.node] for n in model.graph.node if n.op_type == "Scan" for a in n.attribute
                if a.name == "body"]

    standard = build_graph(config, sd, step=False, wkv_op="standard")
    assert bodies(prepared) == bodies(standard) and len(bodies(prepared)) == config.n_layer
    tokens = np.array([[3, 100, 7, 250]])
    for g, w in zip(_forward(prepared, config, tokens, native=False), _forward(fused, config, tokens)):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


def test_python_fallback_runs_the_fused_sequence(tiny_ckpt):
    """Without the native library the package registers the ops as Python functions (onnxruntime-extensions)."""
    pytest.importorskip("onnxruntime_extensions")
    import onnxruntime as ort

    from rwkvq_onnx.ortops import register_python_ops

    config, sd = load_checkpoint(tiny_ckpt)
    fused = build_graph(config, sd, step=False, wkv_op="fused")
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(register_python_ops())
    sess = ort.InferenceSession(fused.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    tokens = np.array([[4, 250, 17]])
    state = zero_state(config, 1)
    got = sess.run(None, {"tokens": tokens, "state_att_shift": state[0], "state_ffn_shift": state[1],
                          "state_wkv": state[2]})
    for g, w in zip(got, _forward(fused, config, tokens)):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


def test_sequence_graph_shapes_keep_the_batch_dim(tiny_ckpt):
    """The fused op's outputs are stated ([batch, tokens, C] and [batch, H, N, N]): shape inference ties every
    weight MatMul's activation after it to the graph's batch dim, as onnxruntime's fusions need (the token dim is
    lost at each token shift's Concat, in the standard graph as well)."""
    config, sd = load_checkpoint(tiny_ckpt)
    model = onnx.shape_inference.infer_shapes(build_graph(config, sd, step=False, wkv_op="fused"), strict_mode=True)
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.value_info, *model.graph.input]}
    weights = {t.name for t in model.graph.initializer}
    activations = [n.input[0] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert activations and all(shapes[a][0] == "batch" and len(shapes[a]) == 3 for a in activations), \
        {a: shapes.get(a) for a in activations}
