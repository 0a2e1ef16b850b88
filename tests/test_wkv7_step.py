"""rwkvq.WKV7Step (one RWKV-7 recurrence step per node) and the node count of the step graphs (issue 13).

Tolerances: the op's numpy reference computes in float64; the native kernel, its standard-op lowering and
onnxruntime's MatMuls sum N float32 products in their own orders, so each is within 1e-5 of the reference
relative to the largest output value (float32's 6e-8 resolution times sums of up to 64 terms, with margin).
Fused vs standard step graphs of a model run the same formula through 2-3 layers, so their logits agree to
1e-5 absolute (logits here are O(1)); both are checked against the official fixtures with FP32_ATOL.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from rwkvq_onnx.checkpoint import load_checkpoint
from rwkvq_onnx.errors import ConfigError
from rwkvq_onnx.export import STATE_NAMES, build_graph
from rwkvq_onnx.names import DOMAIN, OPSET_VERSION
from rwkvq_onnx.opspec import SPECS, wkv7_step
from rwkvq_onnx.runtime import session_options, zero_state

from .conftest import FP32_ATOL, golden_tokens, shared_file

REL_TOL = 1e-5
NODE = "wkv_under_test"


def _inputs(rng: np.random.Generator, B: int, H: int, N: int) -> list[np.ndarray]:
    """A state and r, w, k, v, a, b shaped like a real layer's: decays in (0, 1), kk unit-norm per head."""
    state = rng.standard_normal((B, H, N, N)).astype(np.float32)
    r, k, v = (rng.standard_normal((B, H * N)).astype(np.float32) for _ in range(3))
    w = rng.uniform(0.3, 1.0, (B, H * N)).astype(np.float32)
    kk = rng.standard_normal((B, H, N))
    kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
    iclr = rng.uniform(0, 1, (B, H, N))
    a, b = (-kk).reshape(B, H * N), (kk * iclr).reshape(B, H * N)
    return [state, r, w, k, v, a.astype(np.float32), b.astype(np.float32)]


def _one_node_model(head_size: int, feeds: list[np.ndarray] | None = None, **attrs) -> onnx.ModelProto:
    names = list(wkv7_step.INPUTS)
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None if feeds is None else list(f.shape))
           for n, f in zip(names, feeds or [None] * 7)]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in wkv7_step.OUTPUTS]
    node = helper.make_node(wkv7_step.OP_TYPE, names, list(wkv7_step.OUTPUTS), name=NODE, domain=DOMAIN,
                            **({"head_size": head_size} | attrs))
    graph = helper.make_graph([node], "wkv7_step", ins, outs)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, OPSET_VERSION)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _run(model: onnx.ModelProto, feeds: list[np.ndarray], native: bool = True) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = session_options() if native else ort.SessionOptions()
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, dict(zip(wkv7_step.INPUTS, feeds)))


def _close(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= REL_TOL * np.abs(ref).max()


def test_reference_is_the_official_update():
    """The spec's reference against the official matrix form (as rwkvq_onnx.reference writes it, in torch)."""
    rng = np.random.default_rng(0)
    B, H, N = 2, 3, 16
    feeds = _inputs(rng, B, H, N)
    y, s = wkv7_step.reference(*feeds, head_size=N)
    S, r, w, k, v, a, b = (torch.from_numpy(f).double() for f in feeds)
    r, w, k, v, a, b = (t.view(B, H, N) for t in (r, w, k, v, a, b))
    S = S * w.unsqueeze(2) + (S @ a.unsqueeze(3)) @ b.unsqueeze(2) + v.unsqueeze(3) @ k.unsqueeze(2)
    _close(s, S.float().numpy())
    _close(y, (S @ r.unsqueeze(3)).view(B, H * N).float().numpy())


@pytest.mark.parametrize("B,H,N", [(1, 12, 64), (3, 2, 32), (2, 1, 1), (1, 3, 5)])
def test_native_op_and_lowering_match_the_reference(B, H, N):
    from rwkvq_onnx.passes.lower_vq import LowerVQ

    rng = np.random.default_rng(B * 100 + H * 10 + N)
    feeds = _inputs(rng, B, H, N)
    y_ref, s_ref = wkv7_step.reference(*feeds, head_size=N)
    model = _one_node_model(N)
    y, s = _run(model, feeds)
    _close(y, y_ref)
    _close(s, s_ref)
    assert LowerVQ()(model).counts == {wkv7_step.OP_TYPE: 1}
    assert not any(n.domain == DOMAIN for n in model.graph.node)
    y, s = _run(model, feeds, native=False)  # standard ops only: plain onnxruntime
    _close(y, y_ref)
    _close(s, s_ref)


def test_native_op_takes_an_empty_batch():
    feeds = _inputs(np.random.default_rng(1), 1, 2, 4)
    feeds = [f[:0] for f in feeds]
    y, s = _run(_one_node_model(4), feeds)
    assert y.shape == (0, 8) and s.shape == (0, 2, 4, 4)


def _stacked(rng: np.random.Generator, L: int, layer: int, feeds: list[np.ndarray]) -> list[np.ndarray]:
    """`feeds` with its state as layer `layer` of L layers' states [L, B, H, N, N] (the others random)."""
    states = rng.standard_normal((L, *feeds[0].shape)).astype(np.float32)
    states[layer] = feeds[0]
    return [states, *feeds[1:]]


@pytest.mark.parametrize("L,layer", [(1, 0), (4, 0), (4, 3)])
def test_layer_attribute_reads_that_layer_of_every_layers_state(L, layer):
    """With `layer`, the op on the stacked [L, B, H, N, N] state computes what it computes on state[layer]: the
    reference and the native kernel bit for bit, the lowering (a Gather first) in plain onnxruntime within REL_TOL."""
    from rwkvq_onnx.passes.lower_vq import LowerVQ

    rng = np.random.default_rng(10 + L + layer)
    plain = _inputs(rng, 2, 3, 8)
    feeds = _stacked(rng, L, layer, plain)
    want = wkv7_step.reference(*plain, head_size=8)
    for got, ref in zip(wkv7_step.reference(*feeds, head_size=8, layer=layer), want):
        np.testing.assert_array_equal(got, ref)
    model = _one_node_model(8, feeds, layer=layer)
    for got, ref in zip(_run(model, feeds), _run(_one_node_model(8, plain), plain)):
        np.testing.assert_array_equal(got, ref)
    assert LowerVQ()(model).counts == {wkv7_step.OP_TYPE: 1}
    assert [n.op_type for n in model.graph.node][0] == "Gather"
    for got, ref in zip(_run(model, feeds, native=False), want):
        _close(got, ref)


@pytest.mark.parametrize("layer,state_shape,expect", [
    (3, (3, 2, 3, 4, 4), "attribute layer=3 is outside the state's 3 layers"),
    (0, (2, 3, 4, 4), "the state has rank 4, expected 5"),
    (-1, (3, 2, 3, 4, 4), "attribute layer=-1 is negative"),
    (1, (3, 2, 3, 8, 8), "the state has shape [2, 3, 8, 8], expected [B, H, 4, 4]"),
    (1, (3, 1, 3, 4, 4), "r has shape [2, 12], expected [1, 12]"),
])
def test_native_op_refuses_a_layer_the_state_does_not_hold_with_one_line(layer, state_shape, expect):
    """The layer and the stacked state's shape are checked before any read; one line naming the node."""
    rng = np.random.default_rng(4)
    feeds = _inputs(rng, 2, 3, 4)
    feeds[0] = rng.standard_normal(state_shape).astype(np.float32)
    with pytest.raises(Exception) as info:
        _run(_one_node_model(4, layer=layer), feeds)
    message = str(info.value)
    assert f"rwkvq.WKV7Step node '{NODE}'" in message and expect in message, message
    assert "\n" not in message[message.index("rwkvq.WKV7Step"):].strip()


@pytest.mark.parametrize("case,expect", [
    ("head_size=0", "head_size=0 is outside"),
    ("head_size=5000", "head_size=5000 is outside"),
    ("head_size=8", "the state has shape [2, 3, 4, 4], expected [B, H, 8, 8]"),
    ("state rank 3", "the state has rank 3"),
    ("short r", "r has shape [2, 11], expected [2, 12]"),
    ("batch of b", "b has shape [1, 12], expected [2, 12]"),
    ("head_size=4.0", "attribute 'head_size' is missing or not an integer"),
])
def test_native_op_refuses_bad_input_with_one_line(case, expect):
    """Every size is checked before use; the error is one line naming the node."""
    feeds = _inputs(np.random.default_rng(2), 2, 3, 4)
    head_size = 4
    if case.startswith("head_size"):
        text = case.split("=")[1]
        head_size = float(text) if "." in text else int(text)
    elif case == "state rank 3":
        feeds[0] = feeds[0][:, 0]
    elif case == "short r":
        feeds[1] = feeds[1][:, :11]
    elif case == "batch of b":
        feeds[6] = feeds[6][:1]
    model = _one_node_model(head_size)
    with pytest.raises(Exception) as info:
        _run(model, feeds)
    message = str(info.value)
    assert f"rwkvq.WKV7Step node '{NODE}'" in message and expect in message
    line = message[message.index("rwkvq.WKV7Step"):].strip()
    assert "\n" not in line


def test_spec_validation_names_the_node():
    state = np.zeros((1, 2, 4, 4), np.float32)
    vec = np.zeros((1, 8), np.float32)
    assert wkv7_step.validate({"head_size": 4}, state, *[vec] * 6, node="n").head_size == 4
    assert wkv7_step.validate({"head_size": 4}, *[vec] * 6, node="n").head_size == 4  # the passes' convention
    for attrs, inputs, expect in [({"head_size": 4, "eps": 1}, [], "unknown attribute(s) eps"),
                                  ({}, [], "missing attribute head_size"),
                                  ({"head_size": 4}, [state[:, :, :2], *[vec] * 6], "expected [B, H, 4, 4]"),
                                  ({"head_size": 4}, [state, *[vec[:, :4]] * 6], "input r has shape [1, 4]"),
                                  ({"head_size": 4}, [state, *[vec.astype(np.float64)] * 6], "input r is float64"),
                                  ({"head_size": 4, "layer": 2}, [np.stack([state] * 2), *[vec] * 6],
                                   "has shape [2, 1, 2, 4, 4], expected [L, B, H, 4, 4] with L > layer=2"),
                                  ({"head_size": 4, "layer": 0}, [state, *[vec] * 6], "expected [L, B, H, 4, 4]"),
                                  ({"head_size": 4, "layer": -1}, [], "attribute layer=-1 is outside")]:
        with pytest.raises(ConfigError, match="rwkvq.WKV7Step node 'n': ") as info:
            wkv7_step.validate(attrs, *inputs, node="n")
        assert expect in str(info.value)
    assert wkv7_step.validate({"head_size": 4, "layer": 1}, np.stack([state] * 2), *[vec] * 6, node="n").layer == 1
    with pytest.raises(ConfigError, match="rwkvq.WKV7Sequence node 'n': unknown attribute.s. layer"):
        SPECS["WKV7Sequence"].validate({"head_size": 4, "layer": 0}, node="n")
    assert SPECS[wkv7_step.OP_TYPE] is wkv7_step


# ---- the step graphs -------------------------------------------------------------------------------------

def _decode(model: onnx.ModelProto, config, tokens: np.ndarray, native: bool = True) -> tuple[np.ndarray, list]:
    """Logits [T, B, V] and the final state of decoding `tokens` [T, B] with a step graph."""
    import onnxruntime as ort

    opts = session_options() if native else ort.SessionOptions()
    # exact DequantizeLinear+MatMul numerics in plain sessions too (no int8 activations), as session_options sets
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    state = list(zero_state(config, tokens.shape[1]))
    logits = []
    for tok in tokens:
        out, *state = sess.run(None, {"token": tok, "state_att_shift": state[0], "state_ffn_shift": state[1],
                                      "state_wkv": state[2]})
        logits.append(out)
    return np.stack(logits), state


def _nodes_per_layer(config, sd, wkv_op: str) -> int:
    """Nodes one more layer adds to the step graph (from graphs of 2 and 3 layers of the same width)."""
    from rwkvq_onnx.synthetic import synthetic_rwkv7, synthetic_rwkv7_config

    counts = []
    for layers in (2, 3):
        cfg = synthetic_rwkv7_config(layers, config.n_embd, config.vocab_size, head_size=config.head_size)
        counts.append(len(build_graph(cfg, synthetic_rwkv7(cfg, seed=0), step=True, wkv_op=wkv_op).graph.node))
    return counts[1] - counts[0]


def test_fused_step_graph_has_fewer_nodes_and_the_same_logits(tiny_ckpt):
    config, sd = load_checkpoint(tiny_ckpt)
    fused = build_graph(config, sd, step=True, wkv_op="fused")
    standard = build_graph(config, sd, step=True, wkv_op="standard")
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops[wkv7_step.OP_TYPE] == config.n_layer
    assert not any(n.domain == DOMAIN for n in standard.graph.node)
    assert not any(n.domain == DOMAIN for n in build_graph(config, sd, step=False, wkv_op="standard").graph.node)
    assert len(fused.graph.node) < len(standard.graph.node)
    print(f"step graph nodes: standard {len(standard.graph.node)}, fused {len(fused.graph.node)}; per layer: "
          f"standard {_nodes_per_layer(config, sd, 'standard')}, fused {_nodes_per_layer(config, sd, 'fused')}")
    assert _nodes_per_layer(config, sd, "fused") < _nodes_per_layer(config, sd, "standard")
    tokens = np.array([[1, 200], [5, 7], [255, 0], [9, 9], [42, 17]])
    got, got_state = _decode(fused, config, tokens)
    want, want_state = _decode(standard, config, tokens, native=False)  # the standard graph in plain onnxruntime
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    for g, w in zip(got_state, want_state):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


def test_state_is_read_and_written_once_per_tensor(tiny_ckpt):
    """The state costs a fixed number of nodes, not a Gather and an Unsqueeze per layer."""
    config, sd = load_checkpoint(tiny_ckpt)
    for step in (True, False):
        model = build_graph(config, sd, step=step, wkv_op="standard")
        readers = Counter(n.op_type for n in model.graph.node for i in n.input if i in STATE_NAMES)
        assert readers == Counter({"Reshape": 3})
        unwanted = ("Unsqueeze", "Squeeze", "Neg", "ReduceL2") if step else ("Squeeze", "Neg", "ReduceL2")
        assert not any(n.op_type in unwanted for n in model.graph.node)  # (the sequence's token shift unsqueezes)
        scans = [n for n in model.graph.node if n.op_type == "Scan"]
        assert all(b.op_type not in ("Unsqueeze", "Squeeze") for n in scans for b in n.attribute[0].g.node)
        # the embedding; the sequence graph also takes each shift's last token
        assert [n.op_type for n in model.graph.node].count("Gather") == (1 if step else 1 + 2 * config.n_layer)


@pytest.mark.parametrize("wkv_op", ["fused", "standard"])
def test_step_graphs_reproduce_the_official_logits(wkv_op):
    config, sd = load_checkpoint(shared_file("fixtures", "tiny-rwkv7-834K.pth"))
    golden = np.load(shared_file("fixtures", "tiny-rwkv7-834K.golden-logits.npy"))
    model = build_graph(config, sd, step=True, wkv_op=wkv_op)
    logits, _ = _decode(model, config, golden_tokens()[:, None], native=wkv_op == "fused")
    np.testing.assert_allclose(logits[:, 0], golden, atol=FP32_ATOL, rtol=0)


def test_tensorrt_preparation_lowers_the_fused_step(tiny_ckpt):
    """TensorRT has no plugin for WKV7Step: build-engine's preparation lowers it to the standard-op form."""
    from rwkvq_onnx.tensorrt_build import prepare_for_tensorrt

    config, sd = load_checkpoint(tiny_ckpt)
    fused = build_graph(config, sd, step=True, wkv_op="fused")
    prepared, notes = prepare_for_tensorrt(fused)
    assert notes["wkv_steps_lowered"] == config.n_layer
    assert not any(n.domain == DOMAIN for n in prepared.graph.node)
    assert all(o.domain != DOMAIN for o in prepared.opset_import)
    tokens = np.array([[3], [100], [7]])
    np.testing.assert_allclose(_decode(prepared, config, tokens, native=False)[0], _decode(fused, config, tokens)[0],
                               atol=1e-5, rtol=0)


def test_python_fallback_runs_the_fused_step(tiny_ckpt):
    """Without the native library the package registers the ops as Python functions (onnxruntime-extensions)."""
    pytest.importorskip("onnxruntime_extensions")
    import onnxruntime as ort

    from rwkvq_onnx.ortops import register_python_ops

    config, sd = load_checkpoint(tiny_ckpt)
    fused = build_graph(config, sd, step=True, wkv_op="fused")
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(register_python_ops())
    sess = ort.InferenceSession(fused.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    state = zero_state(config, 2)
    token = np.array([4, 250])
    feeds = {"token": token, "state_att_shift": state[0], "state_ffn_shift": state[1], "state_wkv": state[2]}
    got = sess.run(None, feeds)
    want = _decode(fused, config, token[None])
    np.testing.assert_allclose(got[0], want[0][0], atol=1e-5, rtol=0)


# ---- the native kernel under AddressSanitizer ------------------------------------------------------------

_CHILD = r"""
import json, sys
from pathlib import Path
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper
library, folder = sys.argv[1], Path(sys.argv[2])
names = ["state", "r", "w", "k", "v", "a", "b"]
for i in range(int((folder / "count").read_text())):
    case = np.load(folder / f"case{i}.npz")
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "new_state")]
    layer = {"layer": int(case["layer"])} if int(case["layer"]) != -99 else {}
    node = helper.make_node(str(case["op"]), names, ["y", "new_state"], name="wkv_under_test", domain="rwkvq",
                            head_size=int(case["head_size"]), **layer)
    model = helper.make_model(helper.make_graph([node], "g", ins, outs), ir_version=10,
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("rwkvq", 1)])
    report = {"i": i, "error": None}
    try:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        opts.register_custom_ops_library(library)
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        y, s = sess.run(None, {n: case[n] for n in names})
        np.save(folder / f"y{i}.npy", y)
        np.save(folder / f"s{i}.npy", s)
    except Exception as e:
        report["error"] = str(e)
    print(json.dumps(report), flush=True)
"""


def _mutants(op: str, base: list[np.ndarray], rng: np.random.Generator) -> list[tuple[str, str, int, list, bool]]:
    """Every input of `base` (head size 4) one value short or long in each dim, flattened, or without its last
    value; and head sizes that do not fit."""
    cases = []
    for i, name in enumerate(wkv7_step.INPUTS):
        a = base[i]
        shapes = {(*a.shape[:d], a.shape[d] + delta, *a.shape[d + 1:]) for d in range(a.ndim) for delta in (-1, 1)}
        for shape in sorted(shapes | {(a.size,), (*a.shape[:-1], a.shape[-1] - 1)}):
            feeds = list(base)
            feeds[i] = rng.standard_normal(shape).astype(np.float32)
            cases.append((op, f"{op} {name} shape {shape}", 4, feeds, False))
    return cases + [(op, f"{op} head_size={n}", n, base, False) for n in (0, 1, 2, 3, 5, 8, 1025, 2**31, -1)]


def _sanitizer_cases() -> list[tuple[str, str, int, list[np.ndarray], bool, int | None]]:
    """(op, label, head_size, feeds, valid, layer) for WKV7Step and WKV7Sequence: real-sized and edge shapes, the
    mutants of a small valid case, and WKV7Step's `layer` cases (layer None: no attribute)."""
    from .test_wkv7_sequence import _inputs as _sequence_inputs

    rng = np.random.default_rng(5)
    step, seq = wkv7_step.OP_TYPE, "WKV7Sequence"
    cases = [(step, f"{step} B={B} H={H} N={N}", N, _inputs(rng, B, H, N), True)
             for B, H, N in [(1, 12, 64), (3, 2, 32), (1, 1, 1), (2, 3, 5), (0, 2, 4)]]
    cases += [(seq, f"{seq} B={B} T={T} H={H} N={N}", N, _sequence_inputs(rng, B, T, H, N), True)
              for B, T, H, N in [(1, 16, 12, 64), (3, 5, 2, 32), (1, 3, 1, 1), (2, 4, 3, 5), (0, 2, 2, 4),
                                 (2, 0, 2, 4)]]
    cases += _mutants(step, _inputs(rng, 2, 3, 4), rng) + _mutants(seq, _sequence_inputs(rng, 2, 3, 3, 4), rng)
    return [(*c, None) for c in cases] + _layer_cases(rng)


def _layer_cases(rng: np.random.Generator) -> list[tuple[str, str, int, list[np.ndarray], bool, int]]:
    """WKV7Step with `layer` over a stacked state: valid layers, and layers or states that do not match."""
    step = wkv7_step.OP_TYPE
    base = _inputs(rng, 2, 3, 4)
    cases = [(step, f"{step} L={L} layer={layer}", 4, _stacked(rng, L, layer, base), True, layer)
             for L, layer in [(1, 0), (3, 2), (12, 11)]]
    cases += [(step, f"{step} L=1 layer=0 B=0", 4, _stacked(rng, 1, 0, [f[:0] for f in base]), True, 0)]
    for label, layer, shape in [("layer=L", 3, (3, 2, 3, 4, 4)), ("layer=2**31", 2**31, (3, 2, 3, 4, 4)),
                                ("layer=2**62", 2**62, (3, 2, 3, 4, 4)), ("layer=-1", -1, (3, 2, 3, 4, 4)),
                                ("rank 4 state", 0, (2, 3, 4, 4)), ("rank 6 state", 0, (1, 3, 2, 3, 4, 4)),
                                ("N=5 state", 0, (3, 2, 3, 5, 5)), ("L=0 state", 0, (0, 2, 3, 4, 4)),
                                ("batch 3 state", 1, (3, 3, 3, 4, 4))]:
        feeds = list(base)
        feeds[0] = rng.standard_normal(shape).astype(np.float32)
        cases.append((step, f"{step} {label}", 4, feeds, False, layer))
    return cases


@pytest.mark.slow
def test_native_kernel_under_address_sanitizer(tmp_path):
    """WKV7Step and WKV7Sequence: valid inputs give the reference's numbers and every mismatched size is refused with
    one line naming the node, with no AddressSanitizer / UBSan report (an ASan build of the library,
    plugins/build_asan.sh)."""
    from rwkvq_onnx.opspec import SPECS
    import json
    import subprocess
    import sys

    from .test_native_fuzz import SANITIZER_MARKS, build_asan_library, sanitizer_env

    library = tmp_path / "asan.so"
    runtime = build_asan_library(library)
    cases = _sanitizer_cases()
    for i, (op, _, head_size, feeds, _, layer) in enumerate(cases):
        np.savez(tmp_path / f"case{i}.npz", op=op, head_size=head_size, layer=-99 if layer is None else layer,
                 **dict(zip(wkv7_step.INPUTS, feeds)))
    (tmp_path / "count").write_text(str(len(cases)))
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(library), str(tmp_path)], capture_output=True,
                          text=True, timeout=600, env=sanitizer_env(runtime))
    for mark in SANITIZER_MARKS:
        assert mark not in proc.stderr, proc.stderr[-4000:]
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["i"] for r in reports] == list(range(len(cases)))
    for (op, label, head_size, feeds, valid, layer), r in zip(cases, reports):
        if not valid:
            assert r["error"] is not None, f"{label}: not refused"
            text = r["error"][r["error"].find(f"rwkvq.{op} "):].strip()
            assert text.startswith(f"rwkvq.{op} node '{NODE}'") and "\n" not in text, f"{label}: {r['error']!r}"
            continue
        assert r["error"] is None, f"{label}: {r['error']}"
        y_ref, s_ref = SPECS[op].reference(*feeds, head_size=head_size, **({} if layer is None else {"layer": layer}))
        for got, ref in ((np.load(tmp_path / f"y{r['i']}.npy"), y_ref), (np.load(tmp_path / f"s{r['i']}.npy"), s_ref)):
            assert got.shape == ref.shape, label
            assert np.abs(got - ref).max(initial=0.0) <= REL_TOL * max(np.abs(ref).max(initial=0.0), 1.0), label


@pytest.mark.slow
def test_quantize_keeps_or_lowers_the_fused_step(tiny_ckpt, tmp_path):
    """quantize carries WKV7Step into the quantized step graph and WKV7Sequence into the sequence graph (calibrated
    through it); with --lower-vq it lowers both with the VQ ops (each graph has its own op, which is not a rewrite
    mismatch), and both quantized step graphs decode alike."""
    from rwkvq_onnx.cli import main
    from rwkvq_onnx.export import step_path

    from .conftest import GOLDEN_TEXT

    calib = tmp_path / "calib.txt"
    calib.write_text((GOLDEN_TEXT.decode() + " ") * 20)
    fp, q, low = tmp_path / "fp.onnx", tmp_path / "q.onnx", tmp_path / "low.onnx"
    assert main(["export", str(tiny_ckpt), "-o", str(fp), "--mode", "both"]) == 0
    common = ["--bpw", "3.275", "--sym", "sym", "--calib", str(calib), "--nsamples", "4", "--seqlen", "64"]
    assert main(["quantize", str(fp), "-o", str(q), *common]) == 0
    assert main(["quantize", str(fp), "-o", str(low), "--lower-vq", *common]) == 0
    config, _ = load_checkpoint(tiny_ckpt)
    kept, lowered = onnx.load(step_path(q)), onnx.load(step_path(low))
    assert Counter(n.op_type for n in kept.graph.node)[wkv7_step.OP_TYPE] == config.n_layer
    assert Counter(n.op_type for n in onnx.load(q).graph.node)["WKV7Sequence"] == config.n_layer
    assert not any(n.domain == DOMAIN for n in lowered.graph.node)
    assert not any(n.domain == DOMAIN for n in onnx.load(low).graph.node)
    tokens = np.array([[1, 2], [30, 40], [200, 7]])
    np.testing.assert_allclose(_decode(lowered, config, tokens, native=False)[0], _decode(kept, config, tokens)[0],
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("wkv_op", ["fused", "standard"])
def test_step_graph_shapes_keep_the_batch_dim(tiny_ckpt, wkv_op):
    """Shape inference ties every weight MatMul's activation to the graph's `batch` dim (the state slices and the
    custom op's outputs are stated): what onnxruntime needs to prove shapes equal for its Gemm fusions."""
    config, sd = load_checkpoint(tiny_ckpt)
    model = onnx.shape_inference.infer_shapes(build_graph(config, sd, step=True, wkv_op=wkv_op), strict_mode=True)
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.value_info, *model.graph.input]}
    weights = {t.name for t in model.graph.initializer}
    activations = [n.input[0] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert activations and all(shapes[a][0] == "batch" and len(shapes[a]) == 2 for a in activations), \
        {a: shapes.get(a) for a in activations}
