"""Fast vs exact native kernels keep the reference model's quality (issue 13's bounds)."""
from __future__ import annotations

import pytest

from rwkvq_onnx.kernel_agreement import (MAX_DELTA_BPB, MAX_MEAN_KL, KernelAgreement, faithful_reference,
                                         kernel_agreement, linuxdoc_documents)
from rwkvq_onnx.tokenizers import ByteTokenizer

from .conftest import SHARED


def test_bounds_are_applied_to_both_figures():
    ok = KernelAgreement(24, 9000, 1.5, 1.5 + MAX_DELTA_BPB / 2, MAX_MEAN_KL / 2, 0.99)
    assert ok.ok and "ok" in ok.line()
    assert not KernelAgreement(24, 9000, 1.5, 1.5 - 2 * MAX_DELTA_BPB, 0.0, 1.0).ok  # |Δ| counts both signs
    assert not KernelAgreement(24, 9000, 1.5, 1.5, 2 * MAX_MEAN_KL, 1.0).ok


def test_reference_absent_is_a_sentence(tmp_path):
    why = faithful_reference(tmp_path / "no-shared", tmp_path)
    assert isinstance(why, str) and "ref-rwkv7-L4-D256.pth" in why


@pytest.mark.slow
def test_fast_kernels_keep_reference_quality(tmp_path):
    """The faithful 3.275-bpw quantization of the reference model scored on the linuxdoc chunks the quality
    table uses, fast vs exact kernels: bits-per-byte within 0.002 and mean KL(exact || fast) <= 1e-3 nats per
    token (the issue's bounds; the int8-activation error is a property of the kernels, not of this test)."""
    made = faithful_reference(SHARED, tmp_path)
    if isinstance(made, str):
        pytest.skip(made)
    result = kernel_agreement(made, ByteTokenizer(), linuxdoc_documents(SHARED / "data" / "linuxdoc-val.txt"))
    assert result.documents == 24 and result.tokens > 5000  # the chunks were scored (the bounds are not vacuous)
    assert abs(result.delta_bpb) <= MAX_DELTA_BPB, result.line()
    assert result.mean_kl <= MAX_MEAN_KL, result.line()
