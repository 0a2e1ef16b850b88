"""rwkvq.SQMatMul: the spec (packing, reference, validation, lowering), the native exact and fast kernels through
ctypes and onnxruntime, and the `--sq-format sqmatmul` rewrite (numbers and stored bytes)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rwkvq_onnx import cpu_kernels
from rwkvq_onnx.errors import ConfigError
from rwkvq_onnx.export import build_graph
from rwkvq_onnx.graph import set_initializer
from rwkvq_onnx.names import DOMAIN, OPSET_VERSION
from rwkvq_onnx.opspec import SPECS, sq_matmul
from rwkvq_onnx.passes.lower_vq import LowerVQ
from rwkvq_onnx.passes.pipeline import LoweringOptions, lower_payloads
from rwkvq_onnx.passes.rewrite_scalar import RewriteScalar
from rwkvq_onnx.quant import GPTQConfig, gptq_quantize
from rwkvq_onnx.quant.formats import Payloads, ScalarQuantized, total_bits
from rwkvq_onnx.runtime import session_options
from rwkvq_onnx.synthetic import synthetic_rwkv7, synthetic_rwkv7_config

# exact paths vs the float64 reference: float32 accumulation over K <= 1024 terms stays far inside 1e-5 of the
# output scale (measured ~3e-7)
EXACT_TOL = 1e-5
# fast paths of different instruction sets compute the same integers; only the float summation order of the
# block partial sums differs (measured ~3e-7 of the output scale)
ISA_TOL = 1e-6
# fast kernels vs the spec's float64 fast reference ((d q) @ W^T from the same int8 activations): the integers are
# the same, the kernels round their block and group partial sums to float32 and subtract the zero-point term
# s z T at the end (terms up to 2^bits / 2 times the output's size); measured <= 2.4e-7 of the output scale
FAST_REF_TOL = 1e-6


def _payload(rng: np.random.Generator, n: int, k: int, bits: int, group_size: int,
             symmetric: bool = False) -> ScalarQuantized:
    groups = -(-k // group_size)
    codes = rng.integers(0, 1 << bits, (n, k))
    scales = (rng.random((n, groups)) * 0.05 + 0.005).astype(np.float16)
    zeros = (np.full((n, groups), 1 << (bits - 1)) if symmetric else rng.integers(0, 1 << bits, (n, groups)))
    return ScalarQuantized(codes, scales, zeros, bits, group_size, symmetric)


def _scale(ref: np.ndarray) -> float:
    return max(float(np.abs(ref).max()), 1e-30)


# ---- spec ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_pack_and_reference_equal_the_dequantized_payload(bits, symmetric):
    """K = 160 is not a multiple of group_size = 64: the last group is partial."""
    rng = np.random.default_rng(bits + 10 * symmetric)
    q = _payload(rng, 7, 160, bits, 64, symmetric)
    arrays, attrs = sq_matmul.pack(q)
    assert attrs.as_dict() == dict(K=160, N=7, bits=bits, group_size=64)
    assert arrays["codes"].shape == (7, 160 // 32 * 4 * bits) and arrays["scales"].dtype == np.float16
    assert arrays["zero_points"].shape == (7, -(-3 * bits // 8))
    np.testing.assert_array_equal(sq_matmul.unpack_codes(arrays["codes"], bits, 160), q.codes)
    np.testing.assert_array_equal(sq_matmul.decode_weight(**arrays, **attrs.as_dict()), q.dequantize())
    x = rng.standard_normal((3, 160)).astype(np.float32)
    want = x.astype(np.float64) @ q.dequantize().T.astype(np.float64)
    got = sq_matmul.reference(x, **arrays, **attrs.as_dict())
    assert got.dtype == np.float32 and np.abs(got - want).max() <= 1e-6 * _scale(want)


@pytest.mark.parametrize("bits, expected", [
    # weight 32 + 13 (block 1, j = 13) with code 0b101 / 0b01 / 0b1101
    (3, {12 + 5: 1 << 2, 12 + 8 + 1: 1 << 5}),  # crumb byte 13 % 8 = 5, quarter 1 (bits 2-3); plane bit 13
    (2, {8 + 5: 1 << 2}),
    (4, {16 + 13: 0b1101}),  # low nibble of byte 13 of block 1
])
def test_code_layout(bits, expected):
    codes = np.zeros((1, 64), np.int64)
    codes[0, 45] = {3: 0b101, 2: 0b01, 4: 0b1101}[bits]
    want = np.zeros(2 * 4 * bits, np.uint8)
    for i, v in expected.items():
        want[i] = v
    np.testing.assert_array_equal(sq_matmul.pack_codes(codes, bits)[0], want)


GOOD = dict(K=64, N=3, bits=3, group_size=32)


@pytest.mark.parametrize("attrs, needle", [
    ({**GOOD, "bits": 1}, "attribute bits=1 is outside [2, 4]"),
    ({**GOOD, "bits": 5}, "attribute bits=5 is outside [2, 4]"),
    ({**GOOD, "group_size": 48}, "group_size=48 is not a multiple of 32"),
    ({**GOOD, "group_size": 0}, "attribute group_size=0 is outside"),
    ({**GOOD, "K": 100}, "K=100 is not a multiple of 32"),
    ({**GOOD, "N": 0}, "attribute N=0 is outside"),
    ({**GOOD, "N": 2**31}, "attribute N=2147483648 is outside"),
    ({**GOOD, "extra": 1}, "unknown attribute(s) extra"),
    ({k: v for k, v in GOOD.items() if k != "bits"}, "missing attribute bits"),
    ({**GOOD, "bits": 3.0}, "attribute bits must be an integer"),
])
def test_validate_refuses_bad_attributes_with_one_line(attrs, needle):
    with pytest.raises(ConfigError) as refused:
        sq_matmul.validate(attrs, node="n7")
    message = str(refused.value)
    assert needle in message and "'n7'" in message and "\n" not in message


def test_validate_refuses_payloads_that_do_not_match():
    arrays, attrs = sq_matmul.pack(_payload(np.random.default_rng(0), 3, 64, 3, 32))
    for key, bad, needle in (("codes", arrays["codes"][:, :-1], "input codes has shape [3, 23], expected [3, 24]"),
                             ("scales", arrays["scales"].astype(np.float32), "input scales is float32"),
                             ("zero_points", arrays["zero_points"][:2], "input zero_points has shape [2, 1]")):
        with pytest.raises(ConfigError, match=__import__("re").escape(needle)) as refused:
            sq_matmul.validate(attrs.as_dict(), **{**arrays, key: bad}, node="n7")
        assert "\n" not in str(refused.value)


def test_registered_as_a_spec():
    assert SPECS["SQMatMul"] is sq_matmul and sq_matmul.QUALIFIED == f"{DOMAIN}.SQMatMul"


# ---- native exact kernels ---------------------------------------------------------------------------------------

# the last: 32 groups of 3-bit zero points, a 96-bit stream per row (read across several 64-bit words)
SHAPES = [(37, 96, 2, 64), (50, 320, 3, 128), (70, 256, 4, 32), (129, 1024, 3, 128), (33, 1024, 3, 32)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 4, 9])
def test_native_exact_kernels_equal_the_reference(shape, rows):
    n, k, bits, g = shape
    rng = np.random.default_rng(n + rows)
    arrays, attrs = sq_matmul.pack(_payload(rng, n, k, bits, g))
    x = rng.standard_normal((rows, k)).astype(np.float32)
    ref = sq_matmul.reference(x, **arrays, **attrs.as_dict())
    for kernel in ("auto", "gemv", "gemm"):
        got = cpu_kernels.sq_matmul(x, **arrays, **attrs.as_dict(), kernel=kernel)
        assert got.shape == ref.shape and np.abs(got - ref).max() <= EXACT_TOL * _scale(ref), kernel
    np.testing.assert_array_equal(cpu_kernels.sq_decode(**arrays, **attrs.as_dict()),
                                  sq_matmul.decode_weight(**arrays, **attrs.as_dict()))


def _one_node_model(arrays: dict, attrs: dict, name: str = "sq_node") -> onnx.ModelProto:
    node = helper.make_node("SQMatMul", ["x", *sq_matmul.INPUTS[1:]], ["y"], name=name, domain=DOMAIN, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(arrays[k], k) for k in sq_matmul.INPUTS[1:]])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                   helper.make_opsetid(DOMAIN, OPSET_VERSION)])


def _native_session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.register_custom_ops_library(str(cpu_kernels.library_path()))
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("shape", [*SHAPES[1:], (300, 1024, 3, 128)])
def test_onnxruntime_session_equals_the_reference(shape):
    """The registered op (exact numerics: what a session that sets nothing gets), GEMV and GEMM row counts, x of
    rank 3; 300 x 1024 splits even the one-row GEMV into pieces on onnxruntime's thread pool."""
    n, k, bits, g = shape
    rng = np.random.default_rng(n)
    arrays, attrs = sq_matmul.pack(_payload(rng, n, k, bits, g))
    sess = _native_session(_one_node_model(arrays, attrs.as_dict()))
    for x_shape in ((1, k), (2, 2, k), (40, k)):
        x = rng.standard_normal(x_shape).astype(np.float32)
        ref = sq_matmul.reference(x, **arrays, **attrs.as_dict())
        got = sess.run(None, {"x": x})[0]
        assert got.shape == ref.shape and np.abs(got - ref).max() <= EXACT_TOL * _scale(ref), x_shape


def test_onnxruntime_refuses_a_payload_that_does_not_match_with_one_line():
    arrays, attrs = sq_matmul.pack(_payload(np.random.default_rng(0), 8, 64, 3, 32))
    model = _one_node_model({**arrays, "scales": arrays["scales"][:, :1].copy()}, attrs.as_dict(), name="bad_node")
    with pytest.raises(Exception) as refused:
        _native_session(model)
    message = str(refused.value)
    assert "rwkvq.SQMatMul node 'bad_node'" in message and "scales has shape [8, 1], expected [8, 2]" in message


# ---- fast kernels -------------------------------------------------------------------------------------------------

def test_activation_blocks_divide_the_group_and_hold_at_most_128_values():
    for group_size, block in ((32, 32), (64, 64), (96, 32), (128, 128), (160, 32), (256, 128), (384, 128)):
        assert sq_matmul.act_block(group_size) == block, group_size


def test_quantize_activations_is_round_to_nearest_per_block_with_a_shorter_last_block():
    """K = 320, group 128: blocks of 128, 128 and 64 values; each value moves by at most half its block's step, the
    block maximum maps to +-127 exactly; an inf or NaN makes its block's scale inf or NaN."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((3, 320)) * rng.choice([1e-3, 1.0, 40.0], (3, 320))).astype(np.float32)
    x[1, 130] = np.inf
    x[2, 300] = np.nan
    q, d = sq_matmul.quantize_activations(x, 128)
    assert q.shape == (3, 320) and d.shape == (3, 3)
    # inf: an inf scale, every value of its block 0; NaN: a NaN scale (y NaN), the NaN itself 0
    assert np.isinf(d[1, 1]) and np.isnan(d[2, 2]) and (q[1, 128:256] == 0).all() and q[2, 300] == 0
    finite = np.isfinite(d)
    step = np.repeat(np.where(finite, d, 0).astype(np.float64), 128, axis=1)[:, :320]
    ok = np.repeat(finite, 128, axis=1)[:, :320]
    assert (np.abs(q * step - x)[ok] <= step[ok] / 2 * (1 + 1e-6)).all()
    for m, b in zip(*np.nonzero(finite)):  # the largest magnitude of each block lands on +-127
        assert np.abs(q[m, 128 * b:128 * (b + 1)]).max() == 127


def _runnable_isas() -> list[str]:
    return [isa for isa in cpu_kernels.ISAS if cpu_kernels.isa_supported(isa)]


def test_this_build_runs_the_scalar_kernels_and_refuses_what_the_cpu_lacks():
    assert _runnable_isas()[0] == "scalar"
    lib = cpu_kernels.library()
    for code, isa in enumerate(cpu_kernels.ISAS):
        if not cpu_kernels.isa_supported(isa):  # refused with -2, never executed (NULL buffers prove it)
            assert lib.rwkvq_sq_matmul(None, 1, None, None, None, None, 8, 64, 3, 32, 1, code) == -2
            with pytest.raises(ConfigError, match=f"instruction set '{isa}' is not one this CPU runs"):
                cpu_kernels.sq_matmul(np.zeros((1, 64), np.float32), np.zeros((8, 24), np.uint8),
                                      np.zeros((8, 2), np.float16), np.zeros((8, 1), np.uint8), K=64, N=8, bits=3,
                                      group_size=32, kernels="fast", isa=isa)


# (N, K, bits, group_size) with activation blocks of 64 + a last one of 32, 32 (group 96), and 128 + 128 + 64
# 4-bit with an odd number of groups (a row's last zero-point byte half used), and 2-bit rows whose zero-point
# streams have no padding bits (the decode GEMV reads four rows' streams as one)
FAST_SHAPES = [*SHAPES, (20, 192, 4, 96), (41, 96, 4, 32), (38, 512, 2, 64)]


def _fast_case(shape: tuple[int, int, int, int], rows: int, seed: int):
    """A random payload of `shape` (N, K, bits, group size), packed, and `rows` activation rows: (q, arrays,
    attrs, x)."""
    n, k, bits, g = shape
    rng = np.random.default_rng(seed)
    q = _payload(rng, n, k, bits, g)
    arrays, attrs = sq_matmul.pack(q)
    return q, arrays, attrs, rng.standard_normal((rows, k)).astype(np.float32)


@pytest.mark.parametrize("shape", FAST_SHAPES)
@pytest.mark.parametrize("rows", [1, 4, 9])
def test_fast_kernels_stay_within_the_int8_activation_bound_and_agree_across_isas(shape, rows):
    q, arrays, attrs, x = _fast_case(shape, rows, 3 * shape[0] + rows)
    g = shape[3]
    exact = sq_matmul.reference(x, **arrays, **attrs.as_dict()).astype(np.float64)
    bound = sq_matmul.fast_error_bound(x, q.dequantize(), g)
    # float32 rounding of the fast path's own sums, on top of the quantization bound
    slack = EXACT_TOL * _scale(exact)
    for kernel in ("gemv", "gemm"):
        fast = {isa: cpu_kernels.sq_matmul(x, **arrays, **attrs.as_dict(), kernels="fast", isa=isa, kernel=kernel)
                for isa in _runnable_isas()}
        err = np.abs(fast["scalar"] - exact)
        assert err.max() > 0, "the fast path returned exact numbers: activations were not quantized"
        assert (err <= bound + slack).all(), (kernel, float((err - bound).max()))
        for isa, y in fast.items():
            assert np.abs(y - fast["scalar"]).max() <= ISA_TOL * _scale(exact), (kernel, isa)


@pytest.mark.parametrize("shape", FAST_SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_fast_kernels_compute_the_spec_fast_reference_on_every_isa(shape, rows):
    """Every instruction set, GEMV and GEMM, equals (d q) @ W^T with the spec's int8 activations per block of
    gcd(group_size, 128) (FAST_REF_TOL: float rounding only); activations quantized per block of 32 instead would
    be ~1e3 times further away, so the test tells the two blockings apart."""
    q, arrays, attrs, x = _fast_case(shape, rows, 5 * shape[0] + rows)
    g = shape[3]
    want = sq_matmul.fast_reference(x, **arrays, **attrs.as_dict()).astype(np.float64)
    scale = _scale(want)
    if sq_matmul.act_block(g) != 32:
        blocks_of_32 = sq_matmul.dequantized_activations(x, 32) @ q.dequantize().astype(np.float64).T
        assert np.abs(blocks_of_32 - want).max() > 100 * FAST_REF_TOL * scale
    for isa in _runnable_isas():
        for kernel in ("gemv", "gemm"):
            got = cpu_kernels.sq_matmul(x, **arrays, **attrs.as_dict(), kernels="fast", isa=isa, kernel=kernel)
            assert np.abs(got - want).max() <= FAST_REF_TOL * scale, (isa, kernel)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_fast_kernels_do_not_overflow_at_the_largest_codes_and_activations(sign):
    """4-bit codes all 15 and activations all +-127 (x constant): every int16 lane of the AVX2 sums reaches
    4 sub-blocks * 2 * 15 * 127 = 15240 per activation block of 128; the result is still the fast reference, which
    here is the exact product (a constant block quantizes without error)."""
    n, k = 16, 512
    q = ScalarQuantized(np.full((n, k), 15), np.full((n, k // 128), 0.01, np.float16), np.zeros((n, k // 128), int),
                        4, 128, False)
    arrays, attrs = sq_matmul.pack(q)
    x = np.full((9, k), sign * 0.75, np.float32)
    want = sq_matmul.reference(x, **arrays, **attrs.as_dict())
    np.testing.assert_allclose(sq_matmul.fast_reference(x, **arrays, **attrs.as_dict()), want, rtol=1e-6)
    for isa in _runnable_isas():
        for kernel in ("gemv", "gemm"):
            got = cpu_kernels.sq_matmul(x, **arrays, **attrs.as_dict(), kernels="fast", isa=isa, kernel=kernel)
            np.testing.assert_allclose(got, want, rtol=FAST_REF_TOL, err_msg=f"{isa} {kernel}")


def test_a_session_asking_for_fast_kernels_runs_the_fast_numerics_and_one_asking_nothing_runs_exact():
    """The per-session mode reaches SQMatMul: session config rwkvq.kernels=fast gives the ctypes fast kernel's
    numbers (same integer math; float order may differ: ISA_TOL), and a session that sets nothing the exact ones."""
    n, k, bits, g = 96, 768, 3, 128
    rng = np.random.default_rng(11)
    arrays, attrs = sq_matmul.pack(_payload(rng, n, k, bits, g))
    model = _one_node_model(arrays, attrs.as_dict()).SerializeToString()
    x = rng.standard_normal((1, k)).astype(np.float32)
    exact = sq_matmul.reference(x, **arrays, **attrs.as_dict())
    fast_ref = cpu_kernels.sq_matmul(x, **arrays, **attrs.as_dict(), kernels="fast")
    fast = ort.InferenceSession(model, session_options(kernels="fast"), providers=["CPUExecutionProvider"])
    plain = ort.InferenceSession(model, session_options(), providers=["CPUExecutionProvider"])
    got_fast, got_plain = fast.run(None, {"x": x})[0], plain.run(None, {"x": x})[0]
    assert np.abs(got_plain - exact).max() <= EXACT_TOL * _scale(exact)
    assert np.abs(got_fast - fast_ref).max() <= ISA_TOL * _scale(exact)
    assert np.abs(got_fast - exact).max() > ISA_TOL * _scale(exact)  # it really is the other path


def test_fast_kernels_carry_nan_and_inf_activations_into_the_output():
    """A NaN or inf activation makes the fast path's output NaN (where the exact one is NaN or inf), not a number."""
    arrays, attrs = sq_matmul.pack(_payload(np.random.default_rng(9), 8, 64, 3, 32))
    x = np.ones((3, 64), np.float32)
    x[0, 5], x[1, 40] = np.nan, np.inf
    for isa in _runnable_isas():
        for kernel in ("gemv", "gemm"):
            y = cpu_kernels.sq_matmul(x, **arrays, **attrs.as_dict(), kernels="fast", isa=isa, kernel=kernel)
            assert np.isnan(y[:2]).all() and np.isfinite(y[2]).all(), (isa, kernel)


# ---- lowering to standard ops -------------------------------------------------------------------------------------

def test_lowering_runs_in_plain_onnxruntime_and_equals_the_reference():
    rng = np.random.default_rng(5)
    arrays, attrs = sq_matmul.pack(_payload(rng, 40, 160, 3, 64))
    model = _one_node_model(arrays, attrs.as_dict())
    model.graph.node[0].input[1] = "W_codes"  # the rewrite's naming: the lowering names its tensors W_*
    model.graph.initializer[0].name = "W_codes"
    result = LowerVQ()(model)
    assert result.counts == {"SQMatMul": 1}
    assert not any(n.domain == DOMAIN for n in model.graph.node)
    assert {n.op_type for n in model.graph.node} == {"DequantizeLinear", "MatMul"}
    opts = ort.SessionOptions()  # no custom-op library; exact numerics where onnxruntime fuses the QDQ pair
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((3, 160)).astype(np.float32)
    ref = sq_matmul.reference(x, **arrays, **attrs.as_dict())
    assert np.abs(sess.run(None, {"x": x})[0] - ref).max() <= EXACT_TOL * _scale(ref)


# ---- the rewrite ------------------------------------------------------------------------------------------------

def _matmul_model(w: np.ndarray, dtype=np.float32) -> onnx.ModelProto:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", elem, [None, w.shape[1]])],
                              [helper.make_tensor_value_info("y", elem, [None, w.shape[0]])],
                              [numpy_helper.from_array(np.ascontiguousarray(w.T.astype(dtype)), "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_rewrite_to_sqmatmul_runs_like_the_dequantized_weight(dtype):
    rng = np.random.default_rng(6)
    q = _payload(rng, 48, 128, 3, 64)
    model = _matmul_model(q.dequantize(), dtype)
    result = RewriteScalar("sqmatmul")(model, Payloads(linear={"W": q}))
    assert result.counts == {"sqmatmul": 1} and not result.skipped
    ops = [n.op_type for n in model.graph.node]
    assert ops == (["SQMatMul"] if dtype == np.float32 else ["Cast", "SQMatMul", "Cast"])
    x = rng.standard_normal((5, 128)).astype(dtype)
    sess = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    want = x.astype(np.float64) @ q.dequantize().T.astype(np.float64)
    tol = EXACT_TOL if dtype == np.float32 else 1e-3  # float16 output rounding: 2^-11 relative
    assert np.abs(sess.run(None, {"x": x})[0] - want).max() <= tol * _scale(want)


@pytest.mark.parametrize("bits, k, group_size, reason", [(8, 64, 32, "8-bit codes"),
                                                         (3, 48, 48, "K=48 is not a multiple of 32"),
                                                         (3, 96, 48, "group size 48 is not a multiple of 32")])
def test_rewrite_falls_back_to_qdq_with_a_reason(bits, k, group_size, reason):
    q = _payload(np.random.default_rng(7), 16, k, bits, group_size)
    model = _matmul_model(q.dequantize())
    result = RewriteScalar("sqmatmul")(model, Payloads(linear={"W": q}))
    assert result.counts == {"qdq": 1} and reason in result.skipped["W"]
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "MatMul"]


@pytest.mark.parametrize("k, group_size, symmetric", [(768, 128, False), (3072, 128, False), (768, 128, True)])
def test_stored_bytes_of_one_weight_equal_its_reported_bits(k, group_size, symmetric):
    """The bytes the graph stores for an SQMatMul weight (codes + scales + zero points) against the bits its
    payload reports (bits_breakdown, the report's bpw): equal, except two stated differences of the layout:
    each row's zero-point stream is padded to whole bytes (G * bits bits in ceil(G * bits / 8) bytes: 6 bits a row
    at K=768, g=128, 3 bits; none at K=3072), and symmetric payloads store their fixed zero point too."""
    n, bits = 64, 3
    q = _payload(np.random.default_rng(8), n, k, bits, group_size, symmetric)
    model = _matmul_model(q.dequantize())
    RewriteScalar("sqmatmul")(model, Payloads(linear={"W": q}))
    stored = {t.name: len(t.raw_data) for t in model.graph.initializer}
    assert set(stored) == {"W_codes", "W_scales", "W_zero_points"}
    groups = -(-k // group_size)
    padding = n * (8 * -(-groups * bits // 8) - groups * bits)
    implicit_zeros = n * groups * bits if symmetric else 0
    assert 8 * sum(stored.values()) == total_bits(q) + padding + implicit_zeros
    if k == 3072 and not symmetric:
        assert padding == 0 and 8 * sum(stored.values()) == total_bits(q)


@pytest.fixture(scope="module")
def tiny():
    config = synthetic_rwkv7_config(2, 64, 256, head_size=32)
    return config, synthetic_rwkv7(config, seed=1)


def test_pipeline_with_sqmatmul_on_an_exported_graph_equals_the_dequantized_weights(tiny):
    config, sd = tiny
    names = ["blocks.0.att.key.weight", "blocks.1.ffn.value.weight"]
    payloads = Payloads(linear={n: gptq_quantize(sd[n], np.eye(sd[n].shape[1]), GPTQConfig(bits=3, group_size=32))
                                for n in names})
    model = build_graph(config, sd, step=True)
    expected = onnx.ModelProto()
    expected.CopyFrom(model)
    for name, q in payloads.linear.items():
        set_initializer(expected, name, q.dequantize().T)
    results = lower_payloads([model], payloads, LoweringOptions(sq_format="sqmatmul"))
    assert {r.name: r.counts for r in results}["rewrite-scalar"] == {"sqmatmul": 2}
    assert any(o.domain == DOMAIN for o in model.opset_import)
    rng = np.random.default_rng(1)
    L, C, H, N = config.n_layer, config.n_embd, config.n_embd // config.head_size, config.head_size
    feeds = {"state_att_shift": rng.standard_normal((L, 1, C)).astype(np.float32),
             "state_ffn_shift": rng.standard_normal((L, 1, C)).astype(np.float32),
             "state_wkv": 0.1 * rng.standard_normal((L, 1, H, N, N)).astype(np.float32), "token": np.array([70])}

    def run(m):
        sess = ort.InferenceSession(m.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
        return sess.run(["logits"], feeds)[0]

    np.testing.assert_allclose(run(model), run(expected), atol=2e-4, rtol=1e-4)
