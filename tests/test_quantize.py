"""`quantize` end to end on the fixtures: calibration, passes, custom ops, lowering, report, errors."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from rwkvq_onnx.checkpoint import load_checkpoint
from rwkvq_onnx.cli import main
from rwkvq_onnx.evaluate import evaluate_text
from rwkvq_onnx.export import export, step_path
from rwkvq_onnx.names import DOMAIN
from rwkvq_onnx.opspec import vq_elementwise, vq_matmul
from rwkvq_onnx.quant import GPTQConfig, VQConfig, elementwise_quantize, gptq_quantize, gptvq_quantize
from rwkvq_onnx.quantize import QuantizeOptions, quantize_model
from rwkvq_onnx.runtime import RwkvSession, session_options
from rwkvq_onnx.tokenizers import ByteTokenizer

from .conftest import FIXTURE_MODELS, GOLDEN_TEXT, golden_tokens, shared_file

FAST = dict(nsamples=8, seqlen=64, progress=False)
# The fixtures are 64 wide: with the default dim-2 codebooks over 256 columns, the hybrid cannot land within 0.005
# below most targets (a few large steps); the authors' dim-1 codebooks over 32 columns give fine steps.
AUTHORS_VQ = dict(vq_dim=1, vq_group_cols=32)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean KL(p || q) of next-token distributions over positions."""
    lp, lq = _log_softmax(p_logits), _log_softmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


@pytest.fixture(scope="module", params=FIXTURE_MODELS)
def fixture_export(request, tmp_path_factory):
    config, sd = load_checkpoint(shared_file("fixtures", f"{request.param}.pth"))
    path = tmp_path_factory.mktemp(request.param) / "fp.onnx"
    export(config, sd, path, mode="both")
    return request.param, path


def _q(fp, out, **kw):
    opts = QuantizeOptions(calib=str(shared_file("data", "lambada_test.jsonl")), **{**FAST, **kw})
    return quantize_model(fp, out, opts, out.with_suffix(".json"), log=lambda *a: None)


@pytest.mark.slow
def test_rwkvquant_end_to_end_meets_bpw_and_evaluates(fixture_export, tmp_path):
    name, fp = fixture_export
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(fp), "-o", str(out), "--method", "rwkvquant", "--bpw", "3.35",
                 "--vq-dim", "1", "--vq-group-cols", "32",
                 "--calib", str(shared_file("data", "lambada_test.jsonl")), "--nsamples", "8", "--seqlen", "64",
                 "--report", str(tmp_path / "q.json")]) == 0
    report = json.loads((tmp_path / "q.json").read_text())
    totals = report["totals"]
    assert 3.35 - 0.005 <= totals["bpw"] <= 3.35 and totals["bpw"] <= totals["bpw_paper"]
    assert set(totals["methods"]) == {"gptq", "gptvq"} and sum(totals["methods"].values()) == totals["quantized_tensors"]
    shares = totals["shares"]
    assert shares["vq"]["tensors"] == totals["methods"]["gptvq"] and 0 < shares["vq"]["param_share"] < 1
    assert (tmp_path / "q.plan.json").is_file()
    rows = [r for r in report["tensors"].values() if r.get("kind") in ("sq", "vq")]
    assert rows and all({"proxy_coarse", "proxy_fine", "method", "bits", "bpw", "rel_weight_error",
                         "rel_output_error"} <= set(r) for r in rows)
    assert all(r["rel_output_error"] < 0.5 for r in rows)
    assert totals["elementwise_vectors"] > 0
    # runs in eval exactly like an fp model, with its step sibling
    assert step_path(out).is_file()
    # both graphs name the custom ops they need (for deployment tooling)
    assert onnx.load(out).metadata_props and "VQMatMul" in {p.key: p.value for p in onnx.load(
        step_path(out)).metadata_props}["rwkvq.ops"]
    assert RwkvSession(out, threads=2).step_session.get_session_options().intra_op_num_threads == 2
    res = evaluate_text(RwkvSession(out), ByteTokenizer(), [GOLDEN_TEXT.decode()], progress=False)
    ref = evaluate_text(RwkvSession(fp), ByteTokenizer(), [GOLDEN_TEXT.decode()], progress=False)
    assert ref.bits_per_byte - 0.05 < res.bits_per_byte < ref.bits_per_byte + 1.0
    assert main(["eval", str(out), "--lambada", str(shared_file("data", "lambada_test.jsonl")), "--max-docs", "3"]) == 0


# Mean KL(fp || quantized) over the 131 golden positions at 4 bits. The RWKV-7 fixture
# is benign (observed <= 1.5e-5 for every method); the RWKV-6 fixture's logits reach
# 17 and its 8-wide heads are sensitive (observed 0.002-0.018), so its bound is looser,
# with a tighter one for the Hessian-aware methods.
KL_BOUND = {"tiny-rwkv7-834K": {"*": 1e-4},
            "tiny-rwkv6-1m": {"*": 0.05, "gptq": 0.01, "gptvq": 0.01, "rwkvquant": 0.01}}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "kmeans", "gptvq", "rwkvquant"])
def test_every_method_tracks_fp_logits_at_4_bits(fixture_export, tmp_path, method):
    name, fp = fixture_export
    out = tmp_path / f"{method}.onnx"
    _q(fp, out, method=method, wbits=4)
    toks = golden_tokens()[None]
    ref, _ = RwkvSession(fp).forward(toks)
    got, _ = RwkvSession(out).forward(toks)
    bound = KL_BOUND[name].get(method, KL_BOUND[name]["*"])
    kl = mean_kl(ref[0], got[0])
    assert 0 < kl <= bound, (method, kl)


@pytest.mark.slow
def test_report_bpw_matches_stored_bytes(fixture_export, tmp_path):
    name, fp = fixture_export
    for method, fmt in (("gptvq", "qdq"), ("gptq", "qdq"), ("gptq", "matmulnbits"), ("gptq", "sqmatmul")):
        out = tmp_path / f"{method}-{fmt}.onnx"
        res = _q(fp, out, method=method, bpw=3.5 if method == "gptvq" else None, sq_format=fmt)
        model = onnx.load(out)
        inits = {t.name: t for t in model.graph.initializer}
        if fmt == "sqmatmul":  # the fixtures' K (32, 64, 160, 224, 256) are multiples of 32: the op is used
            assert any(n.op_type == "SQMatMul" for n in model.graph.node)
        report = res.report
        expected_stored = 0
        algorithmic = 0
        for wname, row in report["tensors"].items():
            if row.get("kind") not in ("sq", "vq"):
                continue
            n, k = row["shape"]
            cfg = json.loads(row["config"])
            if row["kind"] == "vq":
                ib = cfg["bits"] * cfg["dim"]
                R, C = -(-n // cfg["group_rows"]), -(-k // min(cfg["group_cols"], k))
                E = 1 << ib
                expected = n * -(-(k // cfg["dim"]) * ib // 8) + R * C * E * cfg["dim"] + 4 * R * C
                algorithmic_bits = n * k * cfg["bits"] + R * C * (E * cfg["dim"] * 8 + 16)
            else:
                g = k if cfg["group_size"] == 0 else min(cfg["group_size"], k)
                groups = n * -(-k // g)
                sq_ok = k % 32 == 0 and g % 32 == 0 and cfg["bits"] in (2, 3, 4)
                if fmt == "sqmatmul" and sq_ok:  # codes at their width, fp16 scales, zero points packed per row
                    kb = -(-k // g)
                    expected = n * k * cfg["bits"] // 8 + 2 * groups + n * -(-kb * cfg["bits"] // 8)
                elif fmt in ("qdq", "sqmatmul"):
                    expected = -(-n * k // 2) + 4 * groups + (0 if cfg["symmetric"] else -(-groups // 2))
                else:
                    kb = -(-k // g)
                    expected = n * kb * g // 2 + 4 * groups + n * -(-kb // 2)
                algorithmic_bits = n * k * cfg["bits"] + groups * (16 + (0 if cfg["symmetric"] else cfg["bits"]))
            stored = sum(len(t.raw_data) for nm, t in inits.items() if nm.startswith(wname + "_"))
            assert stored == expected, (wname, stored, expected)
            assert row["bpw"] == pytest.approx(algorithmic_bits / (n * k))
            expected_stored += expected
            algorithmic += algorithmic_bits
        totals = report["totals"]
        assert totals["quantized_weights_stored_bytes"] == expected_stored
        assert totals["bpw"] == pytest.approx(algorithmic / totals["quantized_weights"])
        # smaller than fp16 by the factor the bits imply (3-bit SQ codes travel in a 4-bit container)
        assert totals["quantized_weights_ratio_to_fp16"] <= (totals["bpw"] + 1.5) / 16
        if method == "gptvq":
            assert totals["quantized_weights_ratio_to_fp16"] <= (totals["bpw"] + 0.6) / 16


@pytest.mark.slow
def test_lowered_graph_runs_without_custom_ops_and_matches(fixture_export, tmp_path):
    name, fp = fixture_export
    custom, lowered = tmp_path / "c.onnx", tmp_path / "l.onnx"
    _q(fp, custom, bpw=3.35, **AUTHORS_VQ)
    _q(fp, lowered, bpw=3.35, lower_vq=True, **AUTHORS_VQ)
    model = onnx.load(lowered)
    assert not any(o.domain == DOMAIN for o in model.opset_import)
    assert not any(n.domain == DOMAIN for n in model.graph.node)
    plain = ort.InferenceSession(str(lowered), providers=["CPUExecutionProvider"])  # no custom-op library
    toks = golden_tokens()[None, :64]
    c = RwkvSession(custom).config
    state = [np.zeros((c.n_layer, 1, c.n_embd), np.float32), np.zeros((c.n_layer, 1, c.n_embd), np.float32),
             np.zeros((c.n_layer, 1, c.n_head, c.head_size, c.head_size), np.float32)]
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    plain = ort.InferenceSession(str(lowered), opts, providers=["CPUExecutionProvider"])
    got = plain.run(["logits"], {"tokens": toks, "state_att_shift": state[0], "state_ffn_shift": state[1],
                                 "state_wkv": state[2]})[0]
    ref, _ = RwkvSession(custom, kernels="exact").forward(toks)  # the reference numerics, as the lowering
    # same weights, different float32 summation orders (the native kernels vs MLAS): 1e-5 absolute, plus 2e-6
    # relative for the RWKV-6 fixture's logits, which reach 18 (8.6e-7 relative seen)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=2e-6)


class _VQMatMulRef(OpRun):
    op_domain = DOMAIN

    def _run(self, x, codes, codebooks, scales, N=None, K=None, dim=None, group_rows=None, group_cols=None,
             index_bits=None):
        return (vq_matmul.reference(x, codes, codebooks, scales, N=N, K=K, dim=dim, group_rows=group_rows,
                                    group_cols=group_cols, index_bits=index_bits),)


class _VQElementwiseRef(OpRun):
    op_domain = DOMAIN

    def _run(self, x, codes, codebook, index_bits=None, shape=None):
        shape = [int(s) for s in (shape.decode() if isinstance(shape, bytes) else shape).split(",")]
        return (vq_elementwise.reference(x, codes, codebook, index_bits=index_bits, shape=shape),)


_VQMatMulRef.__name__ = "VQMatMul"
_VQElementwiseRef.__name__ = "VQElementwise"


@pytest.mark.parametrize("dim,bits,rows", [(1, 3, 5), (2, 3, 16), (4, 2, 8)])
def test_custom_op_lowering_and_numpy_reference_agree(tmp_path, dim, bits, rows):
    from rwkvq_onnx.passes.lower_vq import LowerVQ
    from rwkvq_onnx.quant.formats import Payloads
    from rwkvq_onnx.passes.rewrite_elementwise import RewriteElementwise
    from rwkvq_onnx.passes.rewrite_vector import RewriteVector

    rng = np.random.default_rng(dim)
    n, k = 40, 64
    w = rng.standard_normal((n, k)).astype(np.float32)
    h = np.eye(k) + 0.1
    q = gptvq_quantize(w, h, VQConfig(bits=bits, dim=dim, group_rows=rows, group_cols=32, kmeans_iters=5))
    vec = rng.standard_normal(k).astype(np.float32)
    eq = elementwise_quantize(vec, rng.random(k) + 0.1)
    nodes = [helper.make_node("Mul", ["x", "blocks.0.att.x_r"], ["xm"]),
             helper.make_node("MatMul", ["xm", "blocks.0.att.key.weight"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, k])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3, n])],
                              initializer=[numpy_helper.from_array(w.T.copy(), "blocks.0.att.key.weight"),
                                           numpy_helper.from_array(vec, "blocks.0.att.x_r")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    state = Payloads(linear={"blocks.0.att.key.weight": q}, elementwise={"blocks.0.att.x_r": eq})
    assert RewriteVector()(model, state).counts == {"vq_matmul": 1}
    assert RewriteElementwise()(model, state).counts == {"vq_elementwise": 1}
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    numpy_ref = (x * eq.dequantize()) @ q.dequantize().T
    custom = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    y_custom = custom.run(None, {"x": x})[0]
    y_refeval = ReferenceEvaluator(model, new_ops=[_VQMatMulRef, _VQElementwiseRef]).run(None, {"x": x})[0]
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    LowerVQ()(lowered)
    y_lowered = ort.InferenceSession(lowered.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    for y in (y_custom, y_refeval, y_lowered):
        np.testing.assert_allclose(y, numpy_ref, atol=1e-5, rtol=1e-5)


def test_rewrite_scalar_qdq_and_matmulnbits_are_exact(tmp_path):
    from rwkvq_onnx.passes.rewrite_scalar import RewriteScalar
    from rwkvq_onnx.quant.formats import Payloads

    rng = np.random.default_rng(0)
    n, k = 48, 128
    w = rng.standard_normal((n, k)).astype(np.float32)
    for cfg in (GPTQConfig(bits=3, group_size=64), GPTQConfig(bits=3, group_size=32, symmetric=True),
                GPTQConfig(bits=4, group_size=0), GPTQConfig(bits=8, group_size=64)):
        q = gptq_quantize(w, np.eye(k), cfg)
        for fmt in ("qdq", "matmulnbits"):
            graph = helper.make_graph([helper.make_node("MatMul", ["x", "blocks.0.ffn.key.weight"], ["y"])], "g",
                                      [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, k])],
                                      [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, n])],
                                      initializer=[numpy_helper.from_array(w.T.copy(), "blocks.0.ffn.key.weight")])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
            res = RewriteScalar(fmt)(model, Payloads(linear={"blocks.0.ffn.key.weight": q}))
            assert sum(res.counts.values()) == 1
            onnx.checker.check_model(model)
            x = rng.standard_normal((1, k)).astype(np.float32)
            y = ort.InferenceSession(model.SerializeToString(), session_options(),
                                     providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            np.testing.assert_allclose(y, x @ q.dequantize().T, atol=2e-5, rtol=1e-5, err_msg=f"{cfg} {fmt}")


@pytest.mark.slow
def test_step_sibling_gets_the_same_weights(fixture_export, tmp_path):
    name, fp = fixture_export
    out = tmp_path / "q.onnx"
    _q(fp, out, bpw=3.35, **AUTHORS_VQ)
    seq, step = onnx.load(out), onnx.load(step_path(out))
    q_names = {t.name for t in seq.graph.initializer if t.name.endswith(("_codes", "_codebooks", "_q", "_codebook"))}
    step_inits = {t.name: t for t in step.graph.initializer}
    assert q_names and q_names <= set(step_inits)
    for t in seq.graph.initializer:
        if t.name in q_names:
            assert t.raw_data == step_inits[t.name].raw_data
    sess = RwkvSession(out, kernels="exact")  # same numerics in the GEMM (sequence) and the GEMV (step)
    toks = golden_tokens()[:24]
    full, _ = sess.forward(toks[None])
    state, steps = None, []
    for tok in toks:
        logits, state = sess.step(np.array([tok]), state)
        steps.append(logits[0])
    np.testing.assert_allclose(np.stack(steps), full[0], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_sequential_mode_runs(fixture_export, tmp_path):
    name, fp = fixture_export
    res = _q(fp, tmp_path / "s.onnx", method="gptq", sequential=True)
    assert res.report["totals"]["quantized_tensors"] > 0
    assert all(r["rel_output_error"] < 0.5 for r in res.report["tensors"].values() if "rel_output_error" in r)


def test_quantize_errors_are_one_line_and_write_nothing(fixture_export, tmp_path, capsys):
    name, fp = fixture_export
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    calib = str(shared_file("data", "lambada_test.jsonl"))
    out = tmp_path / "never.onnx"
    cases = [
        (["--bpw", "1.5", "--calib", calib], "bpw target 1.5 is below what 3-bit scalar quantization costs"),
        (["--bpw", "1.0", "--calib", calib], "--bpw must be greater than 1 and less than 16, got 1.0"),
        (["--calib", calib, "--recipe", str(tmp_path / "nope.plan.json")], "no such plan file"),
        (["--calib", str(empty)], "holds no text"),
        (["--calib", str(short), "--seqlen", "64"], "too short for calibration"),
        (["--method", "gptq"], "needs calibration data"),
        (["--calib", calib, "--seqlen", "1"], "--seqlen"),
    ]
    for args, needle in cases:
        capsys.readouterr()
        assert main(["quantize", str(fp), "-o", str(out), "--nsamples", "2", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, (args, err)
        assert not out.exists() and not step_path(out).exists() and not (tmp_path / "never.plan.json").exists()
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(fp), "-o", str(out), "--method", "bogus"])
    assert exc.value.code == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_embedding_and_head_pass_is_exact_to_its_payloads():
    from rwkvq_onnx.passes.quantize_embedding_head import QuantizeEmbeddingHead, int8_rows
    from rwkvq_onnx.quant import ScalarConfig
    from rwkvq_onnx.quant.scalar import rtn_quantize

    rng = np.random.default_rng(3)
    vocab, c = 96, 64
    emb = rng.standard_normal((vocab, c)).astype(np.float32)
    head = rng.standard_normal((c, vocab)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["emb.weight", "ids"], ["e"]),
             helper.make_node("MatMul", ["e", "head.weight"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, 5])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 5, vocab])],
                              initializer=[numpy_helper.from_array(emb, "emb.weight"),
                                           numpy_helper.from_array(head, "head.weight")])
    ids = rng.integers(0, vocab, (1, 5))
    # (bits, head format, the op the head becomes): a 4-bit head is rwkvq.SQMatMul unless asked otherwise; 8 bits
    # are always MatMulNBits
    for head_bits, head_format, op, count in ((4, "sqmatmul", "SQMatMul", "head_sq"),
                                               (4, "matmulnbits", "MatMulNBits", "head"),
                                               (8, "sqmatmul", "MatMulNBits", "head")):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
        res = QuantizeEmbeddingHead(embedding_bits=8, head_bits=head_bits, head_accuracy_level=0,
                                    head_format=head_format)(model)
        assert res.counts == {"embedding": 1, count: 1}
        from rwkvq_onnx.passes.cleanup import Cleanup

        Cleanup()(model)
        assert {t.name for t in model.graph.initializer}.isdisjoint({"emb.weight", "head.weight"})
        assert [n.op_type for n in model.graph.node if n.op_type in ("SQMatMul", "MatMulNBits")] == [op]
        y = ort.InferenceSession(model.SerializeToString(), session_options(),
                                 providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
        codes, scale = int8_rows(emb)
        e = (codes.astype(np.float32) * scale)[ids]
        w = rtn_quantize(head.T, cfg=ScalarConfig(bits=head_bits, group_size=64)).dequantize()
        np.testing.assert_allclose(y, e @ w.T, atol=2e-5, rtol=1e-5)
        # and close to the fp product: int8 rows within half a step, the head within its RTN error
        assert np.abs(e - emb[ids]).max() <= 0.5 * scale.max() + 1e-6
        # the fast paths (MatMulNBits accuracy level 4, SQMatMul's fast kernels: int8 activations per block):
        # within a few int8 steps of the exact product
        fast = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
        QuantizeEmbeddingHead(embedding_bits=8, head_bits=head_bits, head_format=head_format)(fast)
        y4 = ort.InferenceSession(fast.SerializeToString(), session_options(kernels="fast"),
                                  providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
        assert np.abs(y4 - y).max() <= 0.02 * np.abs(y).max()
        assert np.abs(y4 - y).max() > 0  # the int8 path did run
    with pytest.raises(Exception, match="unknown head format"):
        QuantizeEmbeddingHead(head_bits=4, head_format="qdq")
    with pytest.raises(Exception, match="--head-bits must be 4 or 8"):
        QuantizeEmbeddingHead(head_bits=3)(helper.make_model(graph))


# KL(gptq4 || gptq4 + int8 embedding + n-bit head, accuracy level 4) on the golden text; observed 8e-6 / 4e-5
# (RWKV-7 / RWKV-6) at 8 bits, 1.1e-3 / 3e-4 at 4 bits.
@pytest.mark.slow
@pytest.mark.parametrize("head_bits, bound", [(8, 5e-4), (4, 5e-3)])
def test_quantized_embedding_and_head_shrink_the_model_and_keep_its_logits(fixture_export, tmp_path, head_bits,
                                                                            bound):
    name, fp = fixture_export
    base, small = tmp_path / "q.onnx", tmp_path / "qs.onnx"
    r0 = _q(fp, base, method="gptq", wbits=4, sq_format="matmulnbits").report["totals"]
    r1 = _q(fp, small, method="gptq", wbits=4, sq_format="matmulnbits", embedding_bits=8,
            head_bits=head_bits).report
    t1 = r1["totals"]
    assert t1["embedding_and_head_bytes"] < 0.3 * r0["embedding_and_head_bytes"]  # int8 + scales vs fp32
    assert t1["file_bytes"] < r0["file_bytes"]
    assert t1["bpw"] == r0["bpw"]  # the bpw of the linear weights is not changed by this
    toks = golden_tokens()[None]
    q0, _ = RwkvSession(base, kernels="exact").forward(toks)
    q1, _ = RwkvSession(small, kernels="exact").forward(toks)
    kl = mean_kl(q0[0], q1[0])
    print(name, head_bits, "KL", kl)
    assert 0 < kl < bound, kl
    sess = RwkvSession(small, kernels="exact")
    state, steps = None, []
    for tok in golden_tokens()[:8]:
        logits, state = sess.step(np.array([tok]), state)
        steps.append(logits[0])
    np.testing.assert_allclose(np.stack(steps), q1[0, :8], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_cli_embedding_and_head_flags(fixture_export, tmp_path, capsys):
    name, fp = fixture_export
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(fp), "-o", str(out), "--method", "rtn", "--wbits", "4", "--embedding-bits", "8",
                 "--head-bits", "4", "--sq-format", "qdq", "--report", str(tmp_path / "q.json")]) == 0
    ops_used = {n.op_type for n in onnx.load(out).graph.node}
    assert {"MatMulNBits", "Cast"} <= ops_used
    heads = [n for n in onnx.load(step_path(out)).graph.node if n.op_type == "MatMulNBits"]
    assert len(heads) == 1 and {a.name: a.i for a in heads[0].attribute}["accuracy_level"] == 4
    # with the default --sq-format sqmatmul the 4-bit head is rwkvq.SQMatMul (shared by both sessions)
    out = tmp_path / "qsq.onnx"
    assert main(["quantize", str(fp), "-o", str(out), "--method", "rtn", "--wbits", "4", "--embedding-bits", "8",
                 "--head-bits", "4", "--report", str(tmp_path / "qsq.json")]) == 0
    step = onnx.load(step_path(out))
    assert not [n for n in step.graph.node if n.op_type == "MatMulNBits"]
    assert any(n.op_type == "SQMatMul" and n.input[1] == "head.weight_codes" for n in step.graph.node)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(fp), "-o", str(tmp_path / "x.onnx"), "--method", "rtn", "--head-bits", "3"])
    assert exc.value.code == 2 and not (tmp_path / "x.onnx").exists()
