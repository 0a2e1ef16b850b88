#!/usr/bin/env python3
"""Run the rwkvq CUDA kernels on a GPU through CuPy: check them against the numpy reference, time them.

    python plugins/harness.py --json out.json          # needs an NVIDIA GPU and CuPy

Correctness (random payloads of every supported layout): the VQ GEMV (batch
1..8), the decode-to-dense kernel (prefill path) and the element-wise op
against the op specs (`rwkvq_onnx.opspec`). Tolerance: outputs are fp16, so each is allowed
2^-10 of the largest |reference| value (fp16 rounding of the result plus
fp32 accumulation-order differences); decoded weights must match exactly.

Speed: VQ GEMV vs a dense fp16 GEMV (cuBLAS through torch) at batch 1 for
4096x4096 and 4096x14336 (and 14336x4096), with the bytes each reads. The
GEMV launched is the TensorRT plugin's (`rwkvq_trt_vq_gemv_decode` at batch
1, geometry from `trt_plugins.gemv_launch`), so the numbers are the engine's
kernel. Each timed call reads weights that are not in L2: calls rotate
through copies of the weights whose total is at least `L2_FACTOR` times the
L2 size (`rotation_count`), because a single 4096x4096 set stays L2-resident
and then reads faster than HBM can deliver.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rwkvq_onnx.opspec.bitpack import pack_bits  # noqa: E402
from rwkvq_onnx.opspec import vq_elementwise, vq_matmul  # noqa: E402
from rwkvq_onnx.plugins import trt_plugins  # noqa: E402

SOURCE = Path(__file__).with_name("rwkvq_kernels.cu")
TOL = 2.0 ** -10
L2_FACTOR = 3  # weight copies rotated per timing: their total is at least this many L2 sizes
MAX_ROTATION_BYTES = 8 << 30  # never allocate more than this for the copies


def rotation_count(set_bytes: int, l2_bytes: int, factor: int = L2_FACTOR,
                   max_bytes: int = MAX_ROTATION_BYTES) -> int:
    """How many copies of a working set to rotate through so that each timed call finds its data out of L2.

    The copies total at least `factor` x L2 (a set read n-1 calls ago has been evicted by the n-1 sets read
    since); at least 2, since one set re-read back to back is always cache-resident. Refuses when that needs
    more than `max_bytes`."""
    if set_bytes <= 0 or l2_bytes <= 0:
        raise ValueError(f"set_bytes and l2_bytes must be positive, got {set_bytes}, {l2_bytes}")
    n = max(2, -(-factor * l2_bytes // set_bytes))
    if n * set_bytes > max_bytes and n > 2:
        raise ValueError(f"{n} copies of {set_bytes} bytes exceed {max_bytes} bytes")
    return n


def load_module():
    import cupy as cp

    return cp.RawModule(code=SOURCE.read_text(), options=("-std=c++17",), name_expressions=None)


def random_payload(rng, n, k, dim, bits_per_weight, group_rows, group_cols):
    index_bits = bits_per_weight * dim
    codes = rng.integers(0, 1 << index_bits, size=(n, k // dim))
    R, C = -(-n // group_rows), -(-k // group_cols)
    books = rng.integers(-127, 128, size=(R, C, 1 << index_bits, dim)).astype(np.int8)
    scales = (rng.random((R, C)) * 0.01 + 0.001).astype(np.float32)
    packed = pack_bits(codes, index_bits)
    attrs = dict(N=n, K=k, dim=dim, group_rows=group_rows, group_cols=group_cols, index_bits=index_bits)
    return packed, books, scales, attrs


def fast_path_ok(attrs, rows: int = 1) -> bool:
    """Whether the TensorRT plugin's GEMV takes this layout (the same rule build-engine applies)."""
    layout = [attrs[k] for k in ("N", "K", "dim", "group_rows", "group_cols", "index_bits")]
    return trt_plugins.gemv_supported(*layout, max_rows=rows) is None


def gemv_launcher(mod, x, packed, books, scales, attrs, y, generic=False):
    """A zero-argument callable that launches the VQ GEMV: the TensorRT plugin's entry point and launch
    geometry (trt_plugins.gemv_launch) when the layout allows it, else the generic kernel."""
    B, K = x.shape
    N, d, gr, gc, bits = attrs["N"], attrs["dim"], attrs["group_rows"], attrs["group_cols"], attrs["index_bits"]
    scalars = (np.int32(B), np.int32(N), np.int32(K), np.int32(d), np.int32(gr), np.int32(gc), np.int32(bits),
               np.int32(packed.shape[1]))
    if not generic and fast_path_ok(attrs, B):
        launch = trt_plugins.gemv_launch(N, K, d, gr, gc, bits, max_rows=B)
        fn = mod.get_function(launch["kernel"])
        args = (x, packed, books, scales, *scalars, y)  # TensorRT's order: inputs, scalars, outputs
        return lambda: fn(launch["grid"], (launch["block"],), args, shared_mem=launch["shared_mem"])
    fn = mod.get_function("rwkvq_vq_gemv")
    grid = (-(-N // 4),)
    args = (x, packed, books, scales, y, *scalars)
    return lambda: fn(grid, (128,), args)


def gemv(mod, x, packed, books, scales, attrs, y=None, generic=False):
    import cupy as cp

    y = cp.empty((x.shape[0], attrs["N"]), cp.float16) if y is None else y
    gemv_launcher(mod, x, packed, books, scales, attrs, y, generic)()
    return y


def check_correctness(mod, rng) -> list[dict]:
    import cupy as cp

    results = []
    cases = [(256, 512, 2, 3, 16, 256), (300, 256, 1, 3, 7, 128), (128, 512, 4, 2, 8, 64), (64, 1024, 2, 4, 13, 512)]
    for n, k, dim, bpw, gr, gc in cases:
        packed, books, scales, attrs = random_payload(rng, n, k, dim, bpw, gr, gc)
        w = vq_matmul.decode_weight(packed, books, scales, **attrs)
        d_packed, d_books, d_scales = cp.asarray(packed), cp.asarray(books), cp.asarray(scales)
        for B in (1, 3, 8):
            x = rng.standard_normal((B, k)).astype(np.float16)
            ref = x.astype(np.float64) @ w.astype(np.float64).T
            for generic in (False, True):
                got = gemv(mod, cp.asarray(x), d_packed, d_books, d_scales, attrs, generic=generic)
                err = float(np.abs(got.get().astype(np.float64) - ref).max() / np.abs(ref).max())
                kernel = "vq_gemv" if generic or not fast_path_ok(attrs, B) else "trt_vq_gemv"
                results.append({"kernel": kernel, "shape": [n, k], "dim": dim, "group_rows": gr, "batch": B,
                                "rel_err": err, "ok": err <= TOL})
        dense = cp.empty((n, k), cp.float16)
        total = n * (k // dim)
        mod.get_function("rwkvq_vq_decode")(
            ((total + 255) // 256,), (256,),
            (d_packed, d_books, d_scales, dense, np.int32(n), np.int32(k), np.int32(dim), np.int32(gr),
             np.int32(gc), np.int32(attrs["index_bits"]), np.int32(packed.shape[1])))
        exact = bool(np.array_equal(dense.get(), w.astype(np.float16)))
        results.append({"kernel": "vq_decode", "shape": [n, k], "dim": dim, "ok": exact})
    for n, bits in ((768, 4), (64 * 12, 3), (100, 5)):
        codes = rng.integers(0, 1 << bits, size=n)
        book = rng.standard_normal(1 << bits).astype(np.float32)
        packed = pack_bits(codes, bits)
        x = rng.standard_normal((2, 5, n)).astype(np.float32)
        ref = vq_elementwise.reference(x, packed, book, index_bits=bits, shape=[n])
        for dtype, fn in ((np.float16, "rwkvq_vq_elementwise"), (np.float32, "rwkvq_vq_elementwise_f32")):
            dx = cp.asarray(x.astype(dtype))
            dy = cp.empty_like(dx)
            mod.get_function(fn)(((x.size + 255) // 256,), (256,),
                                 (dx, cp.asarray(packed), cp.asarray(book), dy, np.int64(x.size), np.int32(n),
                                  np.int32(bits), np.int32(packed.size)))
            err = float(np.abs(dy.get().astype(np.float64) - ref).max() / np.abs(ref).max())
            results.append({"kernel": fn, "n": n, "bits": bits, "rel_err": err,
                            "ok": err <= (TOL if dtype == np.float16 else 1e-6)})
    return results


def time_ms(fns, iters: int = 200) -> float:
    """GPU time per launch, captured in a CUDA graph so Python launch overhead is not counted.

    `fns`: launchers over distinct buffer copies, called in rotation (see `rotation_count`)."""
    import cupy as cp

    fns = list(fns)
    for fn in fns:
        fn()
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        for i in range(iters):
            fns[i % len(fns)]()
        graph = stream.end_capture()
        graph.launch(stream)  # warm-up
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        graph.launch(stream)
        stop.record(stream)
    stop.synchronize()
    return cp.cuda.get_elapsed_time(start, stop) / iters


def l2_bytes() -> int:
    import cupy as cp

    return int(cp.cuda.runtime.getDeviceProperties(0)["l2CacheSize"])


def dense_time_ms(k: int, n: int, iters: int = 200) -> float:
    """cuBLAS fp16 GEMV [1, K] x [K, N] through torch, timed in a CUDA graph like the VQ kernel, rotating
    through weight copies larger than L2 together."""
    import torch

    copies = rotation_count(2 * k * n, l2_bytes())
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    ws = [torch.randn(k, n, device="cuda", dtype=torch.float16) for _ in range(copies)]
    out = torch.empty(1, n, device="cuda", dtype=torch.float16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for w in ws:
            torch.matmul(x, w, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(iters):
            torch.matmul(x, ws[i % copies], out=out)
    graph.replay()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / iters


def benchmark(mod, rng, shapes, dim=2, bpw=3, group_rows=16, group_cols=256) -> list[dict]:
    import cupy as cp

    rows = []
    for n, k in shapes:
        packed, books, scales, attrs = random_payload(rng, n, k, dim, bpw, group_rows, group_cols)
        vq_bytes = packed.nbytes + books.nbytes + scales.nbytes + 2 * k + 2 * n
        dense_bytes = 2 * n * k + 2 * k + 2 * n
        copies = rotation_count(packed.nbytes + books.nbytes + scales.nbytes, l2_bytes())
        x = cp.asarray(rng.standard_normal((1, k)).astype(np.float16))
        y = cp.empty((1, n), cp.float16)
        sets = [(cp.asarray(packed), cp.asarray(books), cp.asarray(scales)) for _ in range(copies)]
        t_vq = time_ms([gemv_launcher(mod, x, *s, attrs, y) for s in sets])
        t_generic = time_ms([gemv_launcher(mod, x, *s, attrs, y, generic=True) for s in sets])
        t_dense = dense_time_ms(k, n)
        rows.append({"shape": [n, k], "batch": 1, "vq_ms": t_vq, "vq_generic_ms": t_generic, "dense_fp16_ms": t_dense,
                     "speedup": t_dense / t_vq, "bytes_ratio": dense_bytes / vq_bytes, "vq_weight_copies": copies,
                     "vq_gbps": vq_bytes / t_vq / 1e6, "dense_gbps": dense_bytes / t_dense / 1e6})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import cupy as cp

    rng = np.random.default_rng(args.seed)
    mod = load_module()
    correctness = check_correctness(mod, rng)
    bench = benchmark(mod, rng, [(4096, 4096), (4096, 14336), (14336, 4096)])
    device = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    for r in correctness:
        print(("PASS " if r["ok"] else "FAIL ") + json.dumps(r))
    print(f"device: {device}, L2 {l2_bytes() >> 20} MiB; VQ 3 bits/weight, dim 2, 16x256 codebook blocks, batch 1; "
          f"weights rotated through copies totalling >= {L2_FACTOR}x L2 (not L2-resident)")
    print(f"{'N x K':>12} {'VQ us':>8} {'fp16 us':>8} {'speedup':>8} {'bytes ratio':>11} {'VQ GB/s':>8} {'fp16 GB/s':>9}")
    for r in bench:
        print(f"{r['shape'][0]:>5}x{r['shape'][1]:<6} {1e3 * r['vq_ms']:8.1f} {1e3 * r['dense_fp16_ms']:8.1f} "
              f"{r['speedup']:8.2f} {r['bytes_ratio']:11.2f} {r['vq_gbps']:8.0f} {r['dense_gbps']:9.0f}")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "correctness": correctness, "benchmark": bench},
                                        indent=2))
    if not all(r["ok"] for r in correctness):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
