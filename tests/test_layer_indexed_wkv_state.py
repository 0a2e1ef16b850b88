"""passes/layer_indexed_wkv_state.py: the fused step graph's WKV7Step nodes read `state_wkv` in place.

The pass changes where each layer's state is read and how the new states reach the output, not what is
computed: the same native kernel on the same values, so logits and states are compared bit for bit.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from rwkvq_onnx.checkpoint import load_checkpoint
from rwkvq_onnx.export import build_graph, pair_identity
from rwkvq_onnx.opspec import wkv7_step
from rwkvq_onnx.passes.base import PassResult
from rwkvq_onnx.passes.layer_indexed_wkv_state import NEW_STATE, STATE, LayerIndexedWkvState

from .test_wkv7_step import _decode  # logits and final state of decoding with a step graph (native ops)


def _exported_before_the_pass(config, sd, monkeypatch) -> onnx.ModelProto:
    """The fused step graph as export wrote it before the pass existed (Reshape + Split in, Concat + Reshape out)."""
    with monkeypatch.context() as m:
        m.setattr(LayerIndexedWkvState, "run", lambda self, graph, payloads: PassResult(self.name))
        return build_graph(config, sd, step=True, wkv_op="fused")


def test_export_reads_each_layers_state_in_the_input(tiny_ckpt):
    """Every WKV7Step reads state_wkv itself at its own layer (in layer order), and nothing else reads it;
    new_state_wkv is written by one Concat of the layers' states, with no Split or Reshape copy around them."""
    config, sd = load_checkpoint(tiny_ckpt)
    model = build_graph(config, sd, step=True, wkv_op="fused")
    nodes = list(model.graph.node)
    readers = [n for n in nodes if STATE in n.input]
    assert [n.op_type for n in readers] == [wkv7_step.OP_TYPE] * config.n_layer
    layers = [next(a.i for a in n.attribute if a.name == "layer") for n in readers]
    assert layers == list(range(config.n_layer))
    writer = next(n for n in nodes if NEW_STATE in n.output)
    assert writer.op_type == "Concat" and len(writer.input) == config.n_layer
    producers = {o: n for n in nodes for o in n.output}
    assert [producers[i].op_type for i in writer.input] == ["Unsqueeze"] * config.n_layer
    assert [producers[producers[i].input[0]].name for i in writer.input] == [n.name for n in readers]
    ops = Counter(n.op_type for n in nodes)
    assert ops["Split"] == 2  # the two shift states keep theirs
    # the standard form and the sequence graph are not this pass's
    assert any(n.op_type == "Split" and n.output[0].startswith(STATE)
               for n in build_graph(config, sd, step=True, wkv_op="standard").graph.node)


def test_the_pass_upgrades_an_earlier_export_bit_for_bit(tiny_ckpt, monkeypatch):
    """A step graph exported before the pass decodes exactly as before once the pass has run on it, and as the
    current export does; running it again finds nothing to do; the pair's weight digest does not change."""
    config, sd = load_checkpoint(tiny_ckpt)
    old = _exported_before_the_pass(config, sd, monkeypatch)
    assert sum(n.op_type == "Split" for n in old.graph.node) == 3
    tokens = np.array([[1, 200], [5, 7], [255, 0], [9, 9]])
    want_logits, want_state = _decode(old, config, tokens)
    digest = pair_identity(old)
    result = LayerIndexedWkvState()(old)
    assert result.counts == {"layers": config.n_layer}
    assert "reads state_wkv in place in" in result.line()
    got_logits, got_state = _decode(old, config, tokens)
    np.testing.assert_array_equal(got_logits, want_logits)
    for got, want in zip(got_state, want_state):
        np.testing.assert_array_equal(got, want)
    assert pair_identity(old) == digest == pair_identity(build_graph(config, sd, step=False, wkv_op="fused"))
    again = LayerIndexedWkvState()(old)
    assert again.counts == {} and again.line().endswith("nothing to do")
    np.testing.assert_array_equal(_decode(build_graph(config, sd, step=True, wkv_op="fused"), config, tokens)[0],
                                  want_logits)


@pytest.mark.parametrize("wkv_op,step", [("standard", True), ("fused", False)])
def test_graphs_without_step_nodes_are_left_alone(tiny_ckpt, wkv_op, step):
    config, sd = load_checkpoint(tiny_ckpt)
    model = build_graph(config, sd, step=step, wkv_op=wkv_op)
    before = [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node]
    assert LayerIndexedWkvState()(model).counts == {}
    assert [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node] == before


def test_a_step_whose_slice_has_another_reader_is_left_alone(tiny_ckpt, monkeypatch):
    """Only the export's own plumbing is rewritten: a state slice something else also reads stays a slice."""
    config, sd = load_checkpoint(tiny_ckpt)
    model = _exported_before_the_pass(config, sd, monkeypatch)
    step = next(n for n in model.graph.node if n.op_type == wkv7_step.OP_TYPE)
    model.graph.node.append(onnx.helper.make_node("Identity", [step.input[0]], ["extra_reader"]))
    model.graph.output.append(onnx.helper.make_tensor_value_info("extra_reader", onnx.TensorProto.FLOAT, None))
    assert LayerIndexedWkvState()(model).counts == {}
    assert all(not any(a.name == "layer" for a in n.attribute) for n in model.graph.node)


def test_quantize_upgrades_an_earlier_export(tiny_ckpt, tmp_path, monkeypatch):
    """quantize runs the pass on the step graph it is given: a model exported before the pass and one exported
    now quantize (same seed, same calibration through the same sequence graph) into step graphs with the
    layer-indexed state that decode bit for bit alike."""
    from rwkvq_onnx.export import export, step_path
    from rwkvq_onnx.quantize import QuantizeOptions, quantize_model

    from .conftest import GOLDEN_TEXT

    config, sd = load_checkpoint(tiny_ckpt)
    calib = tmp_path / "calib.txt"
    calib.write_text((GOLDEN_TEXT.decode() + " ") * 20)
    old, new = tmp_path / "old.onnx", tmp_path / "new.onnx"
    with monkeypatch.context() as m:
        m.setattr(LayerIndexedWkvState, "run", lambda self, graph, payloads: PassResult(self.name))
        export(config, sd, old, mode="both")
    export(config, sd, new, mode="both")
    assert not any(STATE in n.input for n in onnx.load(step_path(old)).graph.node if n.op_type == "WKV7Step")
    opts = QuantizeOptions(calib=str(calib), method="gptq", nsamples=4, seqlen=32, seed=0, progress=False)
    steps = []
    for fp in (old, new):
        out = tmp_path / f"q-{fp.stem}.onnx"
        quantize_model(fp, out, opts, out.with_suffix(".json"), log=lambda *a: None)
        steps.append(onnx.load(step_path(out)))
    for step in steps:
        readers = [n for n in step.graph.node if STATE in n.input]
        assert [n.op_type for n in readers] == [wkv7_step.OP_TYPE] * config.n_layer
    tokens = np.array([[3, 70], [100, 1], [7, 250]])
    (got, got_state), (want, want_state) = (_decode(s, config, tokens) for s in steps)
    np.testing.assert_array_equal(got, want)
    for g, w in zip(got_state, want_state):
        np.testing.assert_array_equal(g, w)
