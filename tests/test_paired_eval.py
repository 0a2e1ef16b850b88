"""Paired evaluation: per-document bits for fp and quantized models, KL, top-1 and the bootstrap interval."""
from __future__ import annotations

import numpy as np
import pytest

from rwkvq_onnx.checkpoint import load_checkpoint
from rwkvq_onnx.evaluate import evaluate_text
from rwkvq_onnx.export import export
from rwkvq_onnx.paired_eval import ReferenceRun, paired_scores, reference_run, score_documents
from rwkvq_onnx.quantize import QuantizeOptions, quantize_model
from rwkvq_onnx.runtime import RwkvSession
from rwkvq_onnx.tokenizers import ByteTokenizer

from .conftest import GOLDEN_TEXT

DOCS = [GOLDEN_TEXT.decode()[i:i + 40] for i in range(0, 120, 20)] + ["x"]  # the last is too short: dropped


@pytest.fixture(scope="module")
def models(tiny_ckpt, tmp_path_factory):
    config, sd = load_checkpoint(tiny_ckpt)
    d = tmp_path_factory.mktemp("paired")
    export(config, sd, d / "fp.onnx")
    quantize_model(d / "fp.onnx", d / "q.onnx", QuantizeOptions(method="rtn", bpw=2.25, wbits=2, progress=False),
                   log=lambda *a: None)
    return RwkvSession(d / "fp.onnx"), RwkvSession(d / "q.onnx")


def test_scores_match_evaluate_text_and_the_interval_is_paired(models, tmp_path):
    fp, q = models
    tok = ByteTokenizer()
    docs = score_documents(tok, DOCS)
    assert len(docs) == len(DOCS) - 1
    ref = reference_run(fp, docs)
    scores = paired_scores(ref, q)
    assert scores.fp_bits_per_byte == pytest.approx(evaluate_text(fp, tok, DOCS, progress=False).bits_per_byte)
    assert scores.q_bits_per_byte == pytest.approx(evaluate_text(q, tok, DOCS, progress=False).bits_per_byte)
    d = scores.delta()
    assert d.mean == pytest.approx(scores.q_bits_per_byte - scores.fp_bits_per_byte)
    assert d.low <= d.mean <= d.high and d.documents == len(docs)
    assert scores.mean_kl > 0 and 0 <= scores.top1 <= 1
    assert scores.relative_delta().mean == pytest.approx(d.mean / scores.fp_bits_per_byte)

    same = paired_scores(ref, fp)  # the fp model against itself: no difference, no divergence
    assert same.delta().mean == pytest.approx(0, abs=1e-9) and same.delta().high == pytest.approx(0, abs=1e-9)
    assert same.mean_kl < 1e-6 and same.top1 == 1.0

    ref.save(tmp_path / "ref.npz")
    loaded = ReferenceRun.load(tmp_path / "ref.npz")
    again = paired_scores(loaded, q)
    np.testing.assert_allclose(again.q_bits, scores.q_bits)
    np.testing.assert_allclose(again.kl_nats, scores.kl_nats)
    assert again.as_dict() == scores.as_dict()
