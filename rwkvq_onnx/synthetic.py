"""A seeded, properly initialised RWKV-7 checkpoint the library can create without a download.

Follows the official RWKV-7 training initialisation (layer-dependent token
shift mixes, decay speeds spread over channels, orthogonal LoRA outputs)
but gives every matrix small random values, so that no weight is trivially
zero and the model's numerics are those of a real network. Used by the
README's demo, the tests and the benchmarks (e.g. a 0.1B shape: 12 x 768,
vocab 65536).
"""
from __future__ import annotations

import numpy as np

from .checkpoint import ModelConfig


def _orthogonal(rng: np.random.Generator, rows: int, cols: int, gain: float) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((max(rows, cols), min(rows, cols))))
    q = q * np.sign(np.diag(r))
    return (gain * (q if rows >= cols else q.T)).astype(np.float32)


def _lora_rank(C: int, factor: float, exponent: float) -> int:
    return max(32, int(round(factor * C ** exponent / 32)) * 32)


def synthetic_rwkv7_config(n_layer: int = 4, n_embd: int = 128, vocab_size: int = 256,
                           head_size: int = 64) -> ModelConfig:
    """The config of an official-shaped RWKV-7 (LoRA ranks by the official formulas)."""
    C = n_embd
    lora = {"w": _lora_rank(C, 1.8, 0.5), "a": _lora_rank(C, 1.8, 0.5),
            "v": _lora_rank(C, 1.3, 0.5), "g": _lora_rank(C, 0.6, 0.8)}
    return ModelConfig("x070", n_layer, C, C // head_size, head_size, vocab_size, 4 * C, lora)


def synthetic_rwkv7(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """A state dict in the official `.pth` layout for `config`, deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    L, C, H, N, F, V = (config.n_layer, config.n_embd, config.n_head, config.head_size,
                        config.ffn_dim, config.vocab_size)
    f32 = np.float32
    vec = lambda a: np.asarray(a, f32).reshape(1, 1, C)  # noqa: E731
    normal = lambda *shape, std: (rng.standard_normal(shape) * std).astype(f32)  # noqa: E731
    sd: dict[str, np.ndarray] = {
        "emb.weight": normal(V, C, std=1.0),
        "blocks.0.ln0.weight": np.ones(C, f32),
        "blocks.0.ln0.bias": np.zeros(C, f32),
        "ln_out.weight": np.ones(C, f32),
        "ln_out.bias": np.zeros(C, f32),
        "head.weight": normal(V, C, std=0.5 / np.sqrt(C)),
    }
    ddd = np.arange(C) / C
    for i in range(L):
        r01 = i / max(L - 1, 1)
        r10 = 1.0 - i / L
        b, a = f"blocks.{i}.", f"blocks.{i}.att."
        for n in ("ln1", "ln2"):
            sd[b + n + ".weight"] = (1 + normal(C, std=0.05)).astype(f32)
            sd[b + n + ".bias"] = normal(C, std=0.02)
        for n, p in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            sd[a + n] = vec(1.0 - ddd ** (p * r10))
        decay_speed = -7 + 5 * (np.arange(C) / (C - 1)) ** (0.85 + 1.0 * r01 ** 0.5)
        sd[a + "w0"] = vec(decay_speed + 0.5)
        for n in ("w", "a", "v", "g"):
            if n == "v" and i == 0:
                continue
            d = config.lora[n]
            sd[a + n + "1"] = normal(C, d, std=0.5 / np.sqrt(C))
            sd[a + n + "2"] = _orthogonal(rng, d, C, 0.1)
        sd[a + "a0"] = vec(np.zeros(C))
        if i > 0:
            sd[a + "v0"] = vec(np.ones(C))
        sd[a + "k_k"] = vec(np.full(C, 0.85))
        sd[a + "k_a"] = vec(np.ones(C))
        sd[a + "r_k"] = normal(H, N, std=0.1)
        sd[a + "receptance.weight"] = normal(C, C, std=1 / np.sqrt(C))
        sd[a + "key.weight"] = normal(C, C, std=0.3 / np.sqrt(C))
        sd[a + "value.weight"] = normal(C, C, std=1 / np.sqrt(C))
        sd[a + "output.weight"] = normal(C, C, std=0.5 / np.sqrt(C))
        sd[a + "ln_x.weight"] = np.full(C, ((1 + i) / L) ** 0.7, f32)
        sd[a + "ln_x.bias"] = np.zeros(C, f32)
        sd[b + "ffn.x_k"] = vec(1.0 - ddd ** (r10 ** 4))
        sd[b + "ffn.key.weight"] = normal(F, C, std=1 / np.sqrt(C))
        sd[b + "ffn.value.weight"] = normal(C, F, std=0.5 / np.sqrt(F))
    return sd
