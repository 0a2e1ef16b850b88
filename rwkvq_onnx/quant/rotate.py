"""Hadamard rotation of RWKV-7's linear-only LoRA pairs, folded into the weights.

RWKV-7 computes two of its four LoRAs as a plain product of two matrices with
nothing between them: the in-context learning rate `(x @ a1) @ a2` and the
value residual mix `(x @ v1) @ v2` (see `reference.py` and `export.py`; a
sigmoid follows the product, not the middle). For an orthogonal Q,
`(x @ a1 @ Q) @ (Q^T @ a2)` is the same function, so the pair can be stored as
`a1 Q`, `Q^T a2`. A Hadamard Q spreads every column of `a1` (and every row of
`a2`) over the whole rank, which flattens outliers before quantization.
The decay LoRA `w1/w2` (tanh in the middle) and the gate LoRA `g1/g2`
(sigmoid in the middle) are not linear and are never rotated.

Q = H_r diag(s) / sqrt(r): the Sylvester Hadamard matrix of the rank r (a power
of two; any other rank is refused) with random signs s drawn from `seed`, as
QuaRot randomises its Hadamard rotations. Pure functions on arrays; the
arrays are in the layout the model multiplies them in (`x @ first @ second`),
which is both the checkpoint's and the ONNX graph's layout for LoRA matrices.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ..errors import ConfigError

# (first, second) name suffixes of the LoRA pairs with nothing non-linear between the two matmuls.
LINEAR_LORA_PAIRS = (("att.a1", "att.a2"), ("att.v1", "att.v2"))


def hadamard(n: int) -> np.ndarray:
    """The normalised Sylvester Hadamard matrix of order n (a power of two), float64, orthogonal and symmetric."""
    if n < 1 or n & (n - 1):
        raise ConfigError(f"a Hadamard rotation needs a power-of-two size, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def random_hadamard(n: int, seed: int = 0) -> np.ndarray:
    """Q = H_n diag(s) with random signs s from `seed`: orthogonal, deterministic in (n, seed)."""
    signs = np.random.default_rng(seed).choice((-1.0, 1.0), size=n)
    return hadamard(n) * signs[None, :]


def rotate_pair(first: np.ndarray, second: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first Q, Q^T second) for `x @ first @ second`: the same product, computed in float64, cast back."""
    first64, second64 = np.asarray(first, np.float64), np.asarray(second, np.float64)
    if first64.ndim != 2 or second64.ndim != 2 or not first64.shape[1] == second64.shape[0] == q.shape[0]:
        raise ConfigError(f"LoRA pair shapes {np.shape(first)} and {np.shape(second)} do not chain through a "
                          f"rank-{q.shape[0]} rotation")
    return (first64 @ q).astype(np.asarray(first).dtype), (q.T @ second64).astype(np.asarray(second).dtype)


def lora_pairs(names: list[str] | set[str] | Mapping[str, object]) -> list[tuple[str, str]]:
    """The (first, second) names of every linear-only LoRA pair present in `names`, in sorted order."""
    present = set(names)
    pairs = []
    for name in sorted(present):
        for first, second in LINEAR_LORA_PAIRS:
            if name.endswith(first):
                partner = name[: -len(first)] + second
                if partner in present:
                    pairs.append((name, partner))
    return pairs


def rotate_lora(weights: Mapping[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """Rotated copies of every linear-only LoRA pair in `weights` (name -> array); other names are left out.

    Each pair gets its own signs (seeded by `seed` and the pair's position), so
    the result is deterministic. Refuses a rank that is not a power of two
    rather than falling back to another rotation silently.
    """
    out: dict[str, np.ndarray] = {}
    for i, (first, second) in enumerate(lora_pairs(weights)):
        rank = np.shape(weights[first])[1]
        if rank < 1 or rank & (rank - 1):
            raise ConfigError(f"--rotate-lora needs power-of-two LoRA ranks; {first} has rank {rank}")
        q = random_hadamard(rank, seed=seed * 1009 + i)
        out[first], out[second] = rotate_pair(weights[first], weights[second], q)
    return out
