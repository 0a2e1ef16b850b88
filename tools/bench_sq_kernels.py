"""Micro-benchmark of the rwkvq.SQMatMul CPU kernels against onnxruntime's fp32 MatMul (MLAS sgemm).

    python tools/bench_sq_kernels.py [--threads 1 2] [--rows 1 128 512] [--repeats 7] [--copies 16]

For a 3072x768 and a 768x3072 weight (the 0.1B model's FFN shapes; --bits / --group-size, default 3-bit g128):
GEMV (one activation row) and GEMM (prefill rows) through the exact and the fast (int8 activations) kernels, each
instruction set this CPU runs (`--isa`, default the best), against a one-node onnxruntime MatMul session over the
dequantized fp32 weight. Each variant sweeps `--copies` distinct weights per timed call, as a decoded token sweeps a
model's weights, so neither side runs from a cache that a whole model would not fit in. The kernels are called
directly through ctypes (their arguments checked once, before timing); OpenMP runs their pieces (OMP_NUM_THREADS is
set per thread count in a child process), onnxruntime its intra-op pool. Prints medians over `--repeats` timed
calls (ms per weight) and the ratio fp32 / variant (> 1: faster than fp32).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = ((3072, 768), (768, 3072))  # (N out, K in)


def _median_ms(call, repeats: int, per: int, clock=time.perf_counter) -> float:
    call()  # warm-up: pages touched, threads started
    times = []
    for _ in range(repeats):
        t = clock()
        call()
        times.append(clock() - t)
    return 1e3 * float(np.median(times)) / per


def child(args: argparse.Namespace) -> None:
    """One thread count: every shape x rows x variant, one JSON line each."""
    import ctypes

    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from rwkvq_onnx import cpu_kernels
    from rwkvq_onnx.opspec import sq_matmul
    from rwkvq_onnx.quant.formats import ScalarQuantized

    threads = args.threads[0]
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    lib = cpu_kernels.library()
    if lib is None:
        raise SystemExit("the native kernels are not built (pip install -e .)")
    rng = np.random.default_rng(0)
    isas = [i for i in cpu_kernels.ISAS if cpu_kernels.isa_supported(i)] if args.isa == "all" else \
        [cpu_kernels.ISAS[lib.rwkvq_isa_best()] if args.isa == "auto" else args.isa]
    for n, k in SHAPES:
        groups = -(-k // args.group_size)
        weights = []
        for _ in range(args.copies):
            q = ScalarQuantized(rng.integers(0, 1 << args.bits, (n, k)),
                                (rng.random((n, groups)) * 0.01 + 1e-3).astype(np.float16),
                                rng.integers(0, 1 << args.bits, (n, groups)), args.bits, args.group_size, False)
            arrays, attrs = sq_matmul.pack(q)
            weights.append((arrays, attrs.as_dict(), q.dequantize()))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sessions = []
        for arrays, attrs, w in weights:  # fp32: one session per copy, each its own weight
            graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "fp32",
                                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                                      [numpy_helper.from_array(np.ascontiguousarray(w.T), "w")])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            sessions.append(ort.InferenceSession(model.SerializeToString(), opts,
                                                 providers=["CPUExecutionProvider"]))
        for rows in args.rows:
            x = rng.standard_normal((rows, k)).astype(np.float32)
            y = np.empty((rows, n), np.float32)
            result = {"threads": threads, "shape": f"{n}x{k}", "rows": rows}
            result["fp32"] = _median_ms(lambda: [s.run(None, {"x": x}) for s in sessions], args.repeats, args.copies,
                                        clock)
            p = ctypes.c_void_p
            for kernels in ("exact", "fast"):
                for isa in isas if kernels == "fast" else isas[-1:]:
                    arrays, attrs, _ = weights[0]  # the wrapper's checks once (shapes are the same for every copy)
                    cpu_kernels.sq_matmul(x, **arrays, **attrs, kernels=kernels, isa=isa)
                    code, mode = cpu_kernels.ISAS.index(isa), cpu_kernels.KERNELS.index(kernels)
                    calls = [(p(a["codes"].ctypes.data), p(a["scales"].ctypes.data),
                              p(a["zero_points"].ctypes.data)) for a, _, _ in weights]

                    def run():
                        for c, s, z in calls:
                            lib.rwkvq_sq_matmul(p(x.ctypes.data), rows, c, s, z, p(y.ctypes.data), n, k, args.bits,
                                                args.group_size, mode, code)

                    result[f"{kernels}/{isa}"] = _median_ms(run, args.repeats, args.copies, clock)
            print(json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 128, 512])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--copies", type=int, default=16, help="distinct weights swept per timed call (default 16)")
    ap.add_argument("--bits", type=int, choices=(2, 3, 4), default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--isa", default="auto", help="auto (the best this CPU runs), all, or one of scalar, avx2, ...")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall (default), or the process's CPU time: steadier on a shared machine, but it counts "
                         "every thread's time (spin-waits included), so compare only one-thread runs with it")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    lines = []
    for threads in args.threads:
        cmd = [sys.executable, __file__, "--child", "--threads", str(threads), "--rows", *map(str, args.rows),
               "--repeats", str(args.repeats), "--copies", str(args.copies), "--bits", str(args.bits),
               "--group-size", str(args.group_size), "--isa", args.isa, "--clock", args.clock]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(threads)}).stdout
        lines += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    print(f"{args.bits}-bit, group {args.group_size}; {args.clock} ms per weight (median of {args.repeats}); "
          "ratio = fp32 / variant")
    for r in lines:
        variants = [key for key in r if "/" in key]
        cells = "  ".join(f"{key} {r[key]:.3f} ({r['fp32'] / r[key]:.2f}x)" for key in variants)
        print(f"threads {r['threads']}  {r['shape']:>9}  M={r['rows']:<4} fp32 {r['fp32']:.3f}  {cells}")


if __name__ == "__main__":
    main()
