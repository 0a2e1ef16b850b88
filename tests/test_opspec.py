"""The op specs: validation refuses every bad attribute/shape with one line naming the node; the one bit-packer."""
from __future__ import annotations

import numpy as np
import pytest

from rwkvq_onnx.errors import ConfigError
from rwkvq_onnx.opspec import vq_elementwise, vq_matmul
from rwkvq_onnx.opspec.bitpack import pack_bits, packed_bytes, unpack_bits

GOOD_MM = dict(N=40, K=64, dim=2, group_rows=16, group_cols=32, index_bits=6)


def _mm_inputs(attrs):
    a = vq_matmul.Attributes(**attrs)
    return (np.zeros(a.codes_shape, np.uint8), np.zeros(a.codebooks_shape, np.int8),
            np.zeros(a.codebooks_shape[:2], np.float32))


def _refused(fn, *args, match, **kwargs):
    with pytest.raises(ConfigError, match=match) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message and "'node7'" in message
    return message


def test_vq_matmul_accepts_consistent_attributes_and_inputs():
    a = vq_matmul.validate(GOOD_MM, *_mm_inputs(GOOD_MM), node="node7")
    # 40 rows / 16 -> 3 row blocks, 64 cols / 32 -> 2 column groups, 2**6 entries of dim 2; 32 codes * 6 bits
    assert a.codebooks_shape == (3, 2, 64, 2) and a.codes_shape == (40, 24)
    odd = dict(GOOD_MM, N=41, K=66, group_cols=34, index_bits=5)  # ragged last blocks are allowed
    vq_matmul.validate(odd, *_mm_inputs(odd), node="node7")


@pytest.mark.parametrize("change,match", [
    (dict(N=0), "N=0 is outside"),
    (dict(K=2**31), "K=2147483648 is outside"),  # would wrap in the kernels' int
    (dict(group_rows=2**31), "group_rows=2147483648 is outside"),
    (dict(group_cols=0), "group_cols=0 is outside"),
    (dict(dim=0), "dim=0 is outside"),
    (dict(index_bits=0), "index_bits=0 is outside"),
    (dict(index_bits=13), "index_bits=13 is outside"),
    (dict(K=63), "K=63 is not a multiple of dim=2"),
    (dict(group_cols=33), "group_cols=33 is not a multiple of dim=2"),
    (dict(N=True), "N must be an integer"),
    (dict(N=4.0), "N must be an integer"),
    (dict(bogus=1), "unknown attribute"),
])
def test_vq_matmul_refuses_bad_attributes(change, match):
    _refused(vq_matmul.validate, dict(GOOD_MM, **change), node="node7", match=match)


def test_vq_matmul_refuses_missing_attribute():
    attrs = dict(GOOD_MM)
    del attrs["group_rows"]
    _refused(vq_matmul.validate, attrs, node="node7", match="missing attribute group_rows")


@pytest.mark.parametrize("which,bad,match", [
    (0, np.zeros((40, 23), np.uint8), r"codes has shape \[40, 23\], expected \[40, 24\]"),
    (0, np.zeros((40, 24), np.int8), "codes is int8, expected uint8"),
    (1, np.zeros((3, 2, 32, 2), np.int8), r"codebooks has shape \[3, 2, 32, 2\], expected \[3, 2, 64, 2\]"),
    (1, np.zeros((2, 2, 64, 2), np.int8), "codebooks has shape"),
    (1, np.zeros((3, 2, 64, 2), np.float32), "codebooks is float32, expected int8"),
    (2, np.zeros((3, 3), np.float32), r"scales has shape \[3, 3\], expected \[3, 2\]"),
    (2, np.zeros((3, 2), np.float16), "scales is float16, expected float32"),
])
def test_vq_matmul_refuses_inputs_that_disagree_with_the_attributes(which, bad, match):
    inputs = list(_mm_inputs(GOOD_MM))
    inputs[which] = bad
    _refused(vq_matmul.validate, GOOD_MM, *inputs, node="node7", match=match)


def test_vq_elementwise_validation():
    a = vq_elementwise.validate({"index_bits": 3, "shape": b"1,1,10"}, np.zeros(4, np.uint8),
                                np.zeros(8, np.float32), node="node7")
    assert a.shape == (1, 1, 10) and a.codes_bytes == 4  # 30 bits
    for attrs, match in [({"index_bits": 0, "shape": "10"}, "index_bits=0 is outside"),
                         ({"index_bits": 17, "shape": "10"}, "index_bits=17 is outside"),
                         ({"index_bits": 3}, "missing attribute shape"),
                         ({"index_bits": 3, "shape": "1,,10"}, "not 1 to 8 comma-separated"),
                         ({"index_bits": 3, "shape": "1,-1"}, "not 1 to 8 comma-separated"),
                         ({"index_bits": 3, "shape": "0,4"}, "dimension outside"),
                         ({"index_bits": 3, "shape": ",".join(["1"] * 9)}, "not 1 to 8"),
                         ({"index_bits": 3, "shape": "65536,65536"}, "2147483648 or more values"),
                         ({"index_bits": 3, "shape": 10}, "must be a string"),
                         ({"index_bits": 3, "shape": "10", "extra": 1}, "unknown attribute")]:
        _refused(vq_elementwise.validate, attrs, node="node7", match=match)
    good = {"index_bits": 3, "shape": "10"}
    _refused(vq_elementwise.validate, good, np.zeros(3, np.uint8), node="node7", match=r"codes has shape \[3\]")
    _refused(vq_elementwise.validate, good, None, np.zeros(7, np.float32), node="node7",
             match=r"codebook has shape \[7\], expected \[8\]")


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 12, 16])
def test_bit_packer_round_trips_rows_and_vectors(bits):
    rng = np.random.default_rng(bits)
    rows = rng.integers(0, 1 << bits, (7, 1001))
    packed = pack_bits(rows, bits)
    assert packed.dtype == np.uint8 and packed.shape == (7, packed_bytes(1001, bits))
    np.testing.assert_array_equal(unpack_bits(packed, bits, 1001), rows)
    np.testing.assert_array_equal(pack_bits(rows[3], bits), packed[3])  # a vector is one row
    with pytest.raises(ValueError):
        pack_bits(np.array([1 << bits]), bits)
    with pytest.raises(ValueError):
        unpack_bits(packed[:, :-1], bits, 1001)


def test_bit_packer_is_the_onnx_int4_layout():
    # ONNX INT4/UINT4 and MatMulNBits: element 2i in the low nibble of byte i
    assert pack_bits(np.array([1, 2, 15]), 4).tolist() == [0x21, 0x0F]


def test_references_decode_what_pack_encodes():
    rng = np.random.default_rng(0)
    attrs = vq_matmul.Attributes(**GOOD_MM)
    idx = rng.integers(0, attrs.entries, (attrs.N, attrs.codes_per_row))
    books = rng.integers(-127, 128, attrs.codebooks_shape).astype(np.int8)
    scales = rng.random(attrs.codebooks_shape[:2]).astype(np.float32)
    w = vq_matmul.decode_weight(pack_bits(idx, attrs.index_bits), books, scales, **GOOD_MM)
    n, j = 37, 21  # row block 2, column group 1 (columns 42..43)
    np.testing.assert_allclose(w[n, 2 * j:2 * j + 2], books[2, 1, idx[n, j]] * scales[2, 1])
    x = rng.standard_normal((3, attrs.K)).astype(np.float32)
    np.testing.assert_allclose(vq_matmul.reference(x, pack_bits(idx, 6), books, scales, **GOOD_MM), x @ w.T,
                               rtol=1e-5, atol=1e-5)
    codes = rng.integers(0, 8, 10)
    book = rng.standard_normal(8).astype(np.float32)
    v = vq_elementwise.decode_vector(pack_bits(codes, 3), book, index_bits=3, shape="1,10")
    np.testing.assert_array_equal(v, book[codes].reshape(1, 10))
