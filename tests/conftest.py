"""Shared test fixtures and the two test tiers. Tests that need ../shared skip cleanly when it is absent.

Tiers: plain `pytest` is the fast tier; it skips tests marked `slow` and says so in its summary (`-rs` is in
the default options). `pytest --full` runs everything (what `.ci/run` and the README's test command run);
an explicit `-m EXPR` selects by itself and skips nothing for being slow.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rwkvq_onnx.checkpoint import save_checkpoint
from rwkvq_onnx.synthetic import synthetic_rwkv7, synthetic_rwkv7_config

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures"
DATA = SHARED / "data"
GOLDEN_TEXT = (b"The quick brown fox jumps over the lazy dog. In a hole in the ground there lived a hobbit, "
               b"and it was not a nasty, dirty, wet hole.")
FIXTURE_MODELS = ["tiny-rwkv7-834K", "tiny-rwkv6-1m"]

# fp32 export vs the official implementation: the fixtures' README states the
# official package itself agrees with rwkv.cpp to 1.9e-6 and its sequence and
# step modes to 1e-5; float32 summation-order differences over 12 layers stay
# well inside 1e-4 absolute on logits of magnitude ~20.
FP32_ATOL = 1e-4


SLOW_REASON = "slow tier: `python -m pytest --full` runs it (as .ci/run does)"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--full", action="store_true", default=False,
                     help="run the full suite, slow tests included (default: the fast tier, slow tests skipped)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--full") or config.getoption("markexpr"):
        return
    skip_slow = pytest.mark.skip(reason=SLOW_REASON)
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


def shared_file(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available (../shared is absent)")
    return path


def golden_tokens() -> np.ndarray:
    return np.frombuffer(GOLDEN_TEXT, np.uint8).astype(np.int64)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A small synthetic RWKV-7 checkpoint (2 layers x 64, byte vocab)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny7.pth"
    save_checkpoint(synthetic_rwkv7(synthetic_rwkv7_config(2, 64, 256, head_size=32), seed=1), path)
    return path


@pytest.fixture(scope="session")
def tiny_sym_quantized(tiny_ckpt, tmp_path_factory) -> tuple[Path, Path, Path]:
    """The tiny RWKV-7 exported (both graphs) and quantized with RWKVQuant at 3.275 bpw, symmetric scalar groups
    (what TensorRT takes): (fp.onnx, q.onnx, calibration text). Shared read-only by the deployment tests."""
    from rwkvq_onnx.cli import main

    d = tmp_path_factory.mktemp("tiny-sym-quantized")
    calib = d / "calib.txt"
    calib.write_text((GOLDEN_TEXT.decode() + " ") * 40)
    fp, q = d / "fp.onnx", d / "q.onnx"
    assert main(["export", str(tiny_ckpt), "-o", str(fp), "--mode", "both"]) == 0
    assert main(["quantize", str(fp), "-o", str(q), "--bpw", "3.275", "--calib", str(calib), "--nsamples", "4",
                 "--seqlen", "64", "--sym", "sym"]) == 0
    return fp, q, calib
