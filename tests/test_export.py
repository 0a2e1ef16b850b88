"""The reference model and both ONNX graphs against the official implementation's logits."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from rwkvq_onnx import shared_data
from rwkvq_onnx.checkpoint import load_checkpoint
from rwkvq_onnx.export import build_graph, export, is_linear_weight, save_model, step_path
from rwkvq_onnx.reference import RwkvReference
from rwkvq_onnx.runtime import RwkvSession
from rwkvq_onnx.synthetic import synthetic_rwkv7, synthetic_rwkv7_config

from .conftest import FIXTURE_MODELS, FP32_ATOL, golden_tokens, shared_file

# fp16 export: weights are rounded to fp16 (relative error <= 2^-11 each) and
# matmuls run in fp16, while norms, decays and the recurrence stay fp32. The
# error then grows with depth and logit scale, not with sequence length; on
# the 12-layer fixtures it is 1.2e-4 (v7) and 7.3e-3 (v6, logits up to 17),
# so the bound is stated relative to the largest logit: 2e-3 x max|logit|.
FP16_REL_BOUND = 2e-3


def _fixture(name):
    config, sd = load_checkpoint(shared_file("fixtures", f"{name}.pth"))
    golden = np.load(shared_file("fixtures", f"{name}.golden-logits.npy"))
    expected = np.load(shared_file("fixtures", f"{name}.expected-logits.npy"))
    return config, sd, golden, expected


@pytest.mark.parametrize("name", FIXTURE_MODELS)
def test_reference_reproduces_official_logits(name):
    config, sd, golden, expected = _fixture(name)
    model = RwkvReference(config, sd)
    logits, _ = model.forward(np.array([[34, 105, 110]]))
    np.testing.assert_allclose(logits[0, -1].numpy(), expected, atol=FP32_ATOL, rtol=0)
    logits, _ = model.forward(golden_tokens()[None])
    assert logits.shape[1] == golden.shape[0]
    np.testing.assert_allclose(logits[0].numpy(), golden, atol=FP32_ATOL, rtol=0)
    state, steps = None, []
    for tok in golden_tokens()[:40]:
        out, state = model.step(np.array([tok]), state)
        steps.append(out[0].numpy())
    np.testing.assert_allclose(np.stack(steps), golden[:40], atol=FP32_ATOL, rtol=0)


@pytest.fixture(scope="module", params=FIXTURE_MODELS)
def exported(request, tmp_path_factory):
    config, sd, golden, expected = _fixture(request.param)
    path = tmp_path_factory.mktemp(request.param) / "model.onnx"
    export(config, sd, path, mode="both")
    return path, config, sd, golden, expected


def test_export_writes_valid_graphs_with_checkpoint_names(exported):
    path, config, sd, *_ = exported
    for p in (path, step_path(path)):
        model = onnx.load(p)
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        assert inferred.graph.output[0].name == "logits"
        inits = {t.name for t in model.graph.initializer}
        matmul_weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"} & set(sd)
        linear = {k for k in sd if is_linear_weight(k)}
        assert linear <= matmul_weights, "every linear weight must feed one MatMul under its checkpoint key"
        vectors = {k for k, v in sd.items() if v.ndim == 3 and v.shape[:2] == (1, 1)}
        assert vectors <= inits
        for key in linear:
            (init,) = [t for t in model.graph.initializer if t.name == key]
            assert list(init.dims) == list(sd[key].shape[::-1])  # stored transposed [K, N]
    seq, step = onnx.load(path), onnx.load(step_path(path))
    assert {t.name for t in seq.graph.initializer if t.name in sd} == {t.name for t in step.graph.initializer if t.name in sd}
    # RWKV-7's recurrence is one rwkvq.WKV7Sequence per layer (export's default --wkv-op fused), RWKV-6's a Scan
    recurrence = "WKV7Sequence" if config.version == "x070" else "Scan"
    assert [n.op_type for n in seq.graph.node].count(recurrence) == config.n_layer
    assert not any(n.op_type in ("Scan", "Loop") for n in step.graph.node)
    assert [i.name for i in step.graph.input] == ["token", "state_att_shift", "state_ffn_shift", "state_wkv"]


def test_onnxruntime_reproduces_golden_logits(exported):
    path, config, _, golden, expected = exported
    sess = RwkvSession(path)
    logits, _ = sess.forward(golden_tokens()[None])
    np.testing.assert_allclose(logits[0], golden, atol=FP32_ATOL, rtol=0)
    state, steps = None, []
    for tok in golden_tokens():
        out, state = sess.step(np.array([tok]), state)
        steps.append(out[0])
    np.testing.assert_allclose(np.stack(steps), golden, atol=FP32_ATOL, rtol=0)
    out, _ = sess.forward(np.array([[34, 105, 110]]))
    np.testing.assert_allclose(out[0, -1], expected, atol=FP32_ATOL, rtol=0)


@pytest.mark.slow
def test_state_carries_and_batches_are_independent(exported):
    path, config, sd, golden, _ = exported
    sess = RwkvSession(path)
    toks = golden_tokens()
    _, state = sess.forward(toks[None, :50])
    second, state2 = sess.forward(toks[None, 50:], state)
    np.testing.assert_allclose(second[0], golden[50:], atol=FP32_ATOL, rtol=0)
    batch = np.stack([toks[:60], toks[60:120]])
    out, bstate = sess.forward(batch)
    ref, _ = RwkvReference(config, sd).forward(batch)
    np.testing.assert_allclose(out, ref.numpy(), atol=FP32_ATOL, rtol=0)
    # step graph with batch 2 continues each row from its own state
    nxt, _ = sess.step(np.array([toks[60], toks[120]]), bstate)
    ref_next, _ = RwkvReference(config, sd).forward(np.stack([toks[:61], toks[60:121]]))
    np.testing.assert_allclose(nxt, ref_next[:, -1].numpy(), atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("name", FIXTURE_MODELS)
def test_fp16_export_error_is_bounded(name, tmp_path):
    config, sd, golden, _ = _fixture(name)
    path = tmp_path / "fp16.onnx"
    export(config, sd, path, mode="both", fp16=True)
    model = onnx.load(path)
    assert model.graph.initializer[0].data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT)
    assert {t.data_type for t in model.graph.initializer if t.name == "blocks.0.att.key.weight"} == {onnx.TensorProto.FLOAT16}
    assert model.graph.input[3].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # state stays fp32
    sess = RwkvSession(path)
    logits, _ = sess.forward(golden_tokens()[None])
    err = np.abs(logits[0] - golden).max()
    bound = FP16_REL_BOUND * np.abs(golden).max()
    print(f"{name}: fp16 max abs error {err:.2e} (bound {bound:.2e})")
    assert 0 < err <= bound
    state, steps = None, []
    for tok in golden_tokens()[:32]:
        out, state = sess.step(np.array([tok]), state)
        steps.append(out[0])
    assert np.abs(np.stack(steps) - golden[:32]).max() <= bound


def test_external_data_for_large_models(tmp_path, tiny_ckpt, monkeypatch):
    import rwkvq_onnx.export as ex

    config, sd = load_checkpoint(tiny_ckpt)
    monkeypatch.setattr(ex, "EXTERNAL_DATA_THRESHOLD", 1000)
    path = tmp_path / "big.onnx"
    save_model(build_graph(config, sd), path)
    data = tmp_path / "big.onnx.data"
    assert data.is_file() and data.stat().st_size > path.stat().st_size
    onnx.checker.check_model(str(path), full_check=True)
    logits, _ = RwkvSession(path).forward(np.array([[1, 2, 3]]))
    ref, _ = RwkvReference(config, sd).forward(np.array([[1, 2, 3]]))
    np.testing.assert_allclose(logits, ref.numpy(), atol=FP32_ATOL, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]


@pytest.mark.slow
def test_0_1b_shaped_model_exports_and_runs(tmp_path):
    """12 x 768, vocab 65536 (191M parameters), like RWKV-x070-World-0.1B."""
    config = synthetic_rwkv7_config(12, 768, 65536)
    sd = synthetic_rwkv7(config, seed=3)
    path = tmp_path / "w01b.onnx"
    export(config, sd, path, mode="both")
    # a pair this large keeps its weights once, in the data file both graphs refer to
    assert shared_data.data_path(path).stat().st_size > 4 * 190e6 > 100 * path.stat().st_size
    onnx.checker.check_model(str(path), full_check=True)
    sess = RwkvSession(path)
    toks = np.array([[0, 510, 33, 65535, 7]])
    logits, state = sess.forward(toks)
    ref, ref_state = RwkvReference(config, sd).forward(toks)
    np.testing.assert_allclose(logits, ref.numpy(), atol=FP32_ATOL, rtol=0)
    step_logits, _ = sess.step(np.array([42]), state)
    ref_step, _ = RwkvReference(config, sd).step(np.array([42]), ref_state)
    np.testing.assert_allclose(step_logits, ref_step.numpy(), atol=FP32_ATOL, rtol=0)
