#!/usr/bin/env python3
"""Wall time of GPTQ and GPTVQ on typical RWKV weight shapes, and the projected time for a whole model.

    python tools/bench_quant.py              # 768x768, 768x3072, 2048x2048 + a 0.1B RWKV-7 projection

Weights are seeded Gaussians and the Hessian comes from seeded correlated
inputs, so runs are repeatable; times are this machine's (torch threads as
set by --threads). The projection sums the measured per-shape times over the
linear layers of an RWKV-7 of the given depth and width (head and embedding
stay fp16, as the quantize command does).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from rwkvq_onnx.quant import GPTQConfig, VQConfig, gptq_quantize, gptvq_quantize
from rwkvq_onnx.quant.hessian import output_error
from rwkvq_onnx.synthetic import synthetic_rwkv7_config


def hessian(k: int, rng: np.random.Generator, n: int = 2048) -> np.ndarray:
    x = rng.standard_normal((n, k)).astype(np.float32)
    x[:, 1:] += 0.5 * x[:, :-1]
    return (2.0 / n) * (x.T @ x).astype(np.float64)


def time_one(fn, w, h, cfg) -> tuple[float, float]:
    t0 = time.perf_counter()
    q = fn(w, h, cfg)
    return time.perf_counter() - t0, output_error(w, q.dequantize(), h)


def model_linear_shapes(n_layer: int, n_embd: int) -> list[tuple[int, int]]:
    """[N, K] of every linear layer (LoRA included) of an RWKV-7 with official LoRA ranks."""
    c = synthetic_rwkv7_config(n_layer, n_embd, 256)
    C, F = c.n_embd, c.ffn_dim
    per_layer = [(C, C)] * 4 + [(F, C), (C, F)]
    for name in ("w", "a", "v", "g"):
        r = c.lora[name]
        per_layer += [(r, C), (C, r)]
    return per_layer * n_layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="768x768,768x3072,2048x2048", help="NxK list (N out, K in)")
    ap.add_argument("--model", default="12x768", help="LAYERSxWIDTH of the RWKV-7 to project")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results as JSON")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    sq, vq = GPTQConfig(bits=3, group_size=64), VQConfig(bits=3, dim=2)
    methods = {"gptq": (gptq_quantize, sq), "gptvq": (gptvq_quantize, vq)}
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    results = {}
    print(f"torch threads {torch.get_num_threads()}; GPTQ {sq.bits}-bit g{sq.group_size}, "
          f"GPTVQ {vq.bits}-bit d{vq.dim} {vq.group_rows}x{vq.group_cols} blocks, {vq.kmeans_iters} k-means iters")
    print(f"{'shape':>11} {'gptq s':>8} {'gptvq s':>8} {'gptvq/gptq':>10}")
    hs = {}
    for n, k in shapes:
        w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
        h = hs.setdefault(k, hessian(k, rng))
        row = {name: time_one(fn, w, h, cfg)[0] for name, (fn, cfg) in methods.items()}
        results[f"{n}x{k}"] = row
        print(f"{n}x{k:<6} {row['gptq']:8.2f} {row['gptvq']:8.2f} {row['gptvq'] / row['gptq']:10.1f}")
    layers, width = (int(x) for x in args.model.split("x"))
    model_shapes = model_linear_shapes(layers, width)
    projection = {}
    for name, (fn, cfg) in methods.items():
        total = 0.0
        for n, k in sorted(set(model_shapes)):
            key = f"{n}x{k}"
            if key not in results:
                w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
                results[key] = {m: time_one(f, w, hs.setdefault(k, hessian(k, rng)), c)[0]
                                for m, (f, c) in methods.items()}
            total += results[key][name] * model_shapes.count((n, k))
        projection[name] = total
    n_weights = sum(n * k for n, k in model_shapes)
    print(f"projected RWKV-7 {args.model} ({len(model_shapes)} linear layers, {n_weights / 1e6:.1f}M weights): "
          f"all-GPTQ {projection['gptq'] / 60:.1f} min, all-GPTVQ {projection['gptvq'] / 60:.1f} min")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seconds": results, "projection_seconds": projection, "model": args.model}, f, indent=2)


if __name__ == "__main__":
    main()
