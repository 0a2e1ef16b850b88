#!/usr/bin/env python3
"""Micro-benchmark of the VQMatMul decode GEMV: exact (float table lookup) vs fast (int8 activations per block of
32, pshufb lookups of the int8 codebook), on every instruction set this CPU supports.

    OMP_NUM_THREADS=1 python tools/bench_vq_gemv.py            # one core: kernel speed, not thread scaling
    python tools/bench_vq_gemv.py --repeats 50 --rows 1

Payloads are seeded random codes and codebooks of RWKV-7 0.1B shapes (3072x768 and 768x3072, group_rows 16,
group_cols 256): dim 2 with 7-bit indices (3.5 bits per weight) and dim 1 with 3- and 4-bit indices (about 3
and 4 bits per weight). Each cell is the best of --repeats calls of rwkvq_vq_gemv (microseconds) and the rate in
codes per nanosecond; the last column is the fast path's speedup over the exact one on the same instruction set.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from rwkvq_onnx import cpu_kernels
from rwkvq_onnx.opspec.bitpack import pack_bits

# (N, K, dim, index_bits): the shapes the issue names
SHAPES = [(3072, 768, 2, 7), (768, 3072, 2, 7), (3072, 768, 1, 3), (768, 3072, 1, 3), (3072, 768, 1, 4),
          (768, 3072, 1, 4)]


def payload(rng: np.random.Generator, n: int, k: int, dim: int, bits: int, gr: int = 16, gc: int = 256):
    """Packed codes, codebooks, scales and the attributes of a random [n, k] VQ weight."""
    codes = rng.integers(0, 1 << bits, size=(n, k // dim))
    R, C = -(-n // gr), -(-k // gc)
    books = rng.integers(-128, 128, size=(R, C, 1 << bits, dim)).astype(np.int8)
    scales = (rng.random((R, C)) * 0.01 + 1e-3).astype(np.float32)
    return pack_bits(codes, bits), books, scales, dict(N=n, K=k, dim=dim, group_rows=gr, group_cols=gc,
                                                       index_bits=bits)


def best_us(fn, repeats: int) -> float:
    fn()  # warm-up (tables, page faults)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--rows", type=int, default=1, help="activation rows (decode: 1)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    isas = cpu_kernels.supported_isas()
    print(f"instruction sets: {', '.join(isas)}; rows={args.rows}; best of {args.repeats}")
    print("| N x K | dim | bits | isa | exact us | fast us | exact codes/ns | fast codes/ns | fast/exact speedup |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, k, dim, bits in SHAPES:
        packed, books, scales, attrs = payload(rng, n, k, dim, bits)
        x = rng.standard_normal((args.rows, k)).astype(np.float32)
        n_codes = n * k // dim * args.rows
        for isa in isas:
            t = {kernels: best_us(lambda kernels=kernels: cpu_kernels.vq_matmul(
                x, packed, books, scales, kernel="gemv", kernels=kernels, isa=isa, **attrs), args.repeats)
                 for kernels in ("exact", "fast")}
            print(f"| {n}x{k} | {dim} | {bits} | {isa} | {t['exact']:.0f} | {t['fast']:.0f} | "
                  f"{n_codes / t['exact'] / 1e3:.2f} | {n_codes / t['fast'] / 1e3:.2f} | {t['exact'] / t['fast']:.2f}x |")


if __name__ == "__main__":
    main()
