"""--rotate-lora: the Hadamard rotation of the linear-only LoRA pairs leaves the fp model's function unchanged."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from rwkvq_onnx.checkpoint import load_checkpoint
from rwkvq_onnx.errors import ConfigError
from rwkvq_onnx.export import export, save_model, step_path
from rwkvq_onnx.graph import get_initializer
from rwkvq_onnx.quant.rotate import hadamard, lora_pairs, random_hadamard, rotate_lora, rotate_pair
from rwkvq_onnx.quantize import QuantizeOptions, quantize_model, rotate_model_lora
from rwkvq_onnx.runtime import RwkvSession

from .conftest import golden_tokens


def test_hadamard_is_orthogonal_and_refuses_other_sizes():
    for n in (1, 2, 8, 32):
        q = random_hadamard(n, seed=3)
        np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)
        assert np.allclose(np.abs(hadamard(n)), 1 / np.sqrt(n))
    with pytest.raises(ConfigError, match="power-of-two"):
        hadamard(24)


def test_rotate_pair_keeps_the_product_and_spreads_an_outlier():
    rng = np.random.default_rng(0)
    first, second = rng.standard_normal((16, 8)).astype(np.float32), rng.standard_normal((8, 16)).astype(np.float32)
    second[3] *= 50  # one rank direction with huge weights
    a, b = rotate_pair(first, second, random_hadamard(8, seed=1))
    assert a.dtype == np.float32 and b.dtype == np.float32
    np.testing.assert_allclose(a @ b, first @ second, rtol=1e-4, atol=1e-4)
    row_norms = lambda m: np.linalg.norm(m, axis=1)  # noqa: E731
    assert row_norms(b).max() / row_norms(b).min() < row_norms(second).max() / row_norms(second).min()


def test_only_linear_pairs_are_rotated_and_bad_ranks_are_refused():
    rng = np.random.default_rng(0)
    w = {f"blocks.1.att.{n}": rng.standard_normal((16, 8) if n.endswith("1") else (8, 16))
         for n in ("a1", "a2", "v1", "v2", "w1", "w2", "g1", "g2")}
    w["blocks.0.att.a1"] = rng.standard_normal((16, 8))  # no partner: left alone
    assert lora_pairs(w) == [("blocks.1.att.a1", "blocks.1.att.a2"), ("blocks.1.att.v1", "blocks.1.att.v2")]
    rotated = rotate_lora(w, seed=0)
    assert set(rotated) == {"blocks.1.att.a1", "blocks.1.att.a2", "blocks.1.att.v1", "blocks.1.att.v2"}
    assert not np.allclose(rotated["blocks.1.att.a1"], w["blocks.1.att.a1"])
    for k in rotated:  # deterministic in the seed, different across seeds
        np.testing.assert_array_equal(rotated[k], rotate_lora(w, seed=0)[k])
    assert not np.allclose(rotate_lora(w, seed=1)["blocks.1.att.a1"], rotated["blocks.1.att.a1"])
    bad = {"blocks.1.att.a1": np.zeros((16, 12)), "blocks.1.att.a2": np.zeros((12, 16))}
    with pytest.raises(ConfigError, match="rank 12"):
        rotate_lora(bad)


@pytest.fixture(scope="module")
def fp_export(tiny_ckpt, tmp_path_factory):
    config, sd = load_checkpoint(tiny_ckpt)
    path = tmp_path_factory.mktemp("rot") / "fp.onnx"
    export(config, sd, path, mode="both")
    return path


def test_rotated_fp32_graph_logits_match_within_1e5(fp_export, tmp_path):
    rotated_path = tmp_path / "rot.onnx"
    for src, dst in ((fp_export, rotated_path), (step_path(fp_export), step_path(rotated_path))):
        model = onnx.load(src)
        names = rotate_model_lora(model, seed=0)
        assert len(names) == 2 * (2 + 1)  # a1/a2 in both blocks, v1/v2 in block 1 only (block 0 has no v LoRA)
        save_model(model, dst)
    tokens = golden_tokens()[None, :64]
    plain, rotated = RwkvSession(fp_export), RwkvSession(rotated_path)
    a, _ = plain.forward(tokens)
    b, _ = rotated.forward(tokens)
    assert np.abs(a).max() > 0.1  # the logits are not trivially zero
    assert np.abs(a - b).max() < 1e-5
    a_step, _ = plain.step(tokens[:, 0])
    b_step, _ = rotated.step(tokens[:, 0])
    assert np.abs(a_step - b_step).max() < 1e-5
    w = onnx.load(rotated_path)
    assert not np.allclose(get_initializer(w, "blocks.1.att.a1"), get_initializer(onnx.load(fp_export),
                                                                                    "blocks.1.att.a1"))


def test_quantize_with_rotate_lora_keeps_sequence_and_step_graphs_consistent(fp_export, tmp_path):
    out = tmp_path / "q.onnx"
    opts = QuantizeOptions(method="rtn", bpw=3.25, rotate_lora=True, progress=False)
    res = quantize_model(fp_export, out, opts, log=lambda *a: None)
    assert res.report["options"]["rotate_lora"] is True
    tokens = golden_tokens()[:16]
    seq = RwkvSession(out, use_step_graph=False, kernels="exact")
    step = RwkvSession(out, kernels="exact")
    seq_logits, _ = seq.forward(tokens[None, :])
    state = None
    for t, tok in enumerate(tokens):
        logits, state = step.step(np.asarray([tok]), state)
        assert np.abs(logits[0] - seq_logits[0, t]).max() < 1e-3
