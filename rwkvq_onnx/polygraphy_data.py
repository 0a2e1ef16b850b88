"""Polygraphy data loader for rwkvq-onnx models: `polygraphy run ... --data-loader-script THIS_FILE:load_data`.

Polygraphy's own random inputs do not fit an RWKV graph (token ids must lie in the vocabulary, and the
state has a fixed shape per model), so this script builds feeds from the model's `rwkvq.config` metadata:
the tokens of a prompt plus a zero or random state. Polygraphy calls `load_data()` without arguments, so
the model and the options come from environment variables:

- `RWKVQ_MODEL` (required): the .onnx, or the .plan (its .plan.json names the .onnx it was built from).
- `RWKVQ_STATE`: `zero` (default, an empty context) or `random` (normal, std 0.1, seeded; exercises the
  state paths that zeros skip).
- `RWKVQ_TOKENS`: how many tokens (default 8). A step graph gets one feed per token; a sequence graph
  one feed with all of them.
- `RWKVQ_SEED`: seed of the token ids and the random state (default 0).
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np

# Absolute imports: Polygraphy imports this file as a top-level script, not as part of the package.
from rwkvq_onnx.errors import ConfigError
from rwkvq_onnx.runtime import state_feeds, zero_state
from rwkvq_onnx.validate import model_info


def feeds(model: str, state: str = "zero", tokens: int = 8, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Input feeds for `model`: `tokens` random token ids with a zero or random state (same state each feed)."""
    if state not in ("zero", "random"):
        raise ConfigError(f"RWKVQ_STATE must be 'zero' or 'random', got {state!r}")
    if tokens < 1:
        raise ConfigError(f"RWKVQ_TOKENS must be at least 1, got {tokens}")
    info = model_info(model)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, info.config.vocab_size, size=tokens, dtype=np.int64)
    start = state_feeds(zero_state(info.config))
    if state == "random":
        start = {k: (0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in start.items()}
    if info.graph == "sequence":
        return [{"tokens": ids[None, :], **start}]
    return [{"token": ids[i:i + 1], **start} for i in range(tokens)]


def load_data() -> Iterator[dict[str, np.ndarray]]:
    """Polygraphy's entry point: the feeds for the model named by the RWKVQ_* environment variables."""
    model = os.environ.get("RWKVQ_MODEL")
    if not model:
        raise ConfigError("set RWKVQ_MODEL to the .onnx or .plan that polygraphy runs")
    try:
        tokens, seed = int(os.environ.get("RWKVQ_TOKENS", "8")), int(os.environ.get("RWKVQ_SEED", "0"))
    except ValueError as exc:
        raise ConfigError(f"RWKVQ_TOKENS and RWKVQ_SEED must be integers ({exc})") from None
    yield from feeds(model, os.environ.get("RWKVQ_STATE", "zero"), tokens, seed)
