"""Micro-benchmark of the rwkvq.SQMatMul CPU kernels against onnxruntime's fp32 MatMul (MLAS sgemm).

    python tools/bench_sq_kernels.py [--threads 1 2] [--rows 1 128 512] [--repeats 7] [--copies 16]
                                     [--shapes 3072x768 768x3072 65536x768]

For each N x K weight of `--shapes` (default the 0.1B model's FFN shapes 3072x768 and 768x3072; 65536x768 is the
LM head; --bits / --group-size, default 3-bit g128): GEMV (one activation row) and GEMM (prefill rows) through the
exact and the fast (int8 activations) kernels, each instruction set this CPU runs (`--isa`, default the best), and
the op in an onnxruntime session (`ort-fast`: rwkvq.kernels=fast, onnxruntime's thread pool, as in a model),
against fp32 MLAS sgemm over the dequantized weight. Each variant sweeps `--copies` distinct weights per timed call
(at most what fits in 1 GiB of fp32), as a model's forward pass sweeps its weights, so neither side runs from a
cache that a whole model would not fit in.

The fp32 baseline is what onnxruntime achieves inside a model: ONE session whose graph holds the `--copies` MatMul
nodes, each over its own constant weight initializer (so onnxruntime pre-packs it for MLAS at load), with
`--threads` intra-op threads. (This tool used one session per copy: 16 intra-op pools whose idle threads spin
after each run starved the running one on 2 cores, so fp32 measured ~18 GFLOP/s where a model gets ~95 and the
printed ratios overstated the quantized kernels ~5x.) The kernels are called directly through ctypes (their
arguments checked once, before timing); OpenMP runs their pieces (OMP_NUM_THREADS is set per thread count in a
child process). Prints medians over `--repeats` timed calls (ms per weight), fp32's GFLOP/s, and the ratio fp32 /
variant (> 1: faster than fp32).
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

SHAPES = ("3072x768", "768x3072")  # N out x K in
COPY_BYTES = 1 << 30  # at most this many bytes of fp32 weights per shape


def _shape(text: str) -> tuple[int, int]:
    """'NxK' -> (N, K)."""
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape '{text}' is not NxK (e.g. 3072x768)") from None
    if n < 1 or k < 32 or k % 32:
        raise argparse.ArgumentTypeError(f"shape '{text}': N must be positive and K a positive multiple of 32")
    return n, k


def _graph_session(ort, helper, TensorProto, nodes, initializers, k: int, n: int, threads: int, opts=None):
    """One session over `nodes` (each reading x, writing y<i>) with constant `initializers`."""
    from onnx import numpy_helper

    from rwkvq_onnx.names import DOMAIN, OPSET_VERSION

    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [None, n]) for i in range(len(nodes))]
    graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              outputs, [numpy_helper.from_array(a, name) for name, a in initializers])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(DOMAIN, OPSET_VERSION)])
    if opts is None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _median_ms(call, repeats: int, per: int, clock=time.perf_counter, stat=np.median) -> float:
    call()  # warm-up: pages touched, threads started
    times = []
    for _ in range(repeats):
        t = clock()
        call()
        times.append(clock() - t)
    return 1e3 * float(stat(times)) / per


def child(args: argparse.Namespace) -> None:
    """One thread count: every shape x rows x variant, one JSON line each."""
    import ctypes

    import onnxruntime as ort
    from onnx import TensorProto, helper

    from rwkvq_onnx import cpu_kernels
    from rwkvq_onnx.opspec import sq_matmul
    from rwkvq_onnx.quant.formats import ScalarQuantized
    from rwkvq_onnx.runtime import session_options

    threads = args.threads[0]
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    stat = np.min if args.stat == "min" else np.median
    lib = cpu_kernels.library()
    if lib is None:
        raise SystemExit("the native kernels are not built (pip install -e .)")
    rng = np.random.default_rng(0)
    isas = [i for i in cpu_kernels.ISAS if cpu_kernels.isa_supported(i)] if args.isa == "all" else \
        [cpu_kernels.ISAS[lib.rwkvq_isa_best()] if args.isa == "auto" else args.isa]
    for n, k in args.shapes:
        groups = -(-k // args.group_size)
        weights = []
        for _ in range(max(1, min(args.copies, COPY_BYTES // (4 * n * k)))):
            q = ScalarQuantized(rng.integers(0, 1 << args.bits, (n, k)),
                                (rng.random((n, groups)) * 0.01 + 1e-3).astype(np.float16),
                                rng.integers(0, 1 << args.bits, (n, groups)), args.bits, args.group_size, False)
            arrays, attrs = sq_matmul.pack(q)
            weights.append((arrays, attrs.as_dict(), q.dequantize()))
        copies = len(weights)
        fp32 = _graph_session(ort, helper, TensorProto,
                              [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(copies)],
                              [(f"w{i}", np.ascontiguousarray(w.T)) for i, (_, _, w) in enumerate(weights)],
                              k, n, threads)
        packed = [(arrays, sq_matmul.validate(attrs, node="bench")) for arrays, attrs, _ in weights]
        del weights  # the fp32 session holds its own copies
        sq_nodes = [helper.make_node("SQMatMul", ["x", *(f"{name}{i}" for name in sq_matmul.INPUTS[1:])], [f"y{i}"],
                                     domain=sq_matmul.DOMAIN, **a.as_dict()) for i, (_, a) in enumerate(packed)]
        sq_session = _graph_session(ort, helper, TensorProto, sq_nodes,
                                    [(f"{name}{i}", arr[name]) for i, (arr, _) in enumerate(packed)
                                     for name in sq_matmul.INPUTS[1:]],
                                    k, n, threads, session_options(threads, kernels="fast"))
        for rows in args.rows:
            x = rng.standard_normal((rows, k)).astype(np.float32)
            y = np.empty((rows, n), np.float32)
            result = {"threads": threads, "shape": f"{n}x{k}", "rows": rows, "copies": copies}
            result["fp32"] = _median_ms(lambda: fp32.run(None, {"x": x}), args.repeats, copies, clock, stat)
            result["ort-fast"] = _median_ms(lambda: sq_session.run(None, {"x": x}), args.repeats, copies, clock, stat)
            p = ctypes.c_void_p
            for kernels in ("exact", "fast"):
                for isa in isas if kernels == "fast" else isas[-1:]:
                    arrays, attrs = packed[0]  # the wrapper's checks once (shapes are the same for every copy)
                    cpu_kernels.sq_matmul(x, **arrays, **attrs.as_dict(), kernels=kernels, isa=isa)
                    code, mode = cpu_kernels.ISAS.index(isa), cpu_kernels.KERNELS.index(kernels)
                    calls = [(p(a["codes"].ctypes.data), p(a["scales"].ctypes.data),
                              p(a["zero_points"].ctypes.data)) for a, _ in packed]

                    def run():
                        for c, s, z in calls:
                            lib.rwkvq_sq_matmul(p(x.ctypes.data), rows, c, s, z, p(y.ctypes.data), n, k, args.bits,
                                                args.group_size, mode, code)

                    result[f"{kernels}/{isa}"] = _median_ms(run, args.repeats, copies, clock, stat)
            print(json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 128, 512])
    ap.add_argument("--shapes", type=_shape, nargs="+", default=[_shape(s) for s in SHAPES],
                    help="weights N x K (default 3072x768 768x3072; the 0.1B LM head: 65536x768)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--copies", type=int, default=16, help="distinct weights swept per timed call (default 16)")
    ap.add_argument("--bits", type=int, choices=(2, 3, 4), default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--isa", default="auto", help="auto (the best this CPU runs), all, or one of scalar, avx2, ...")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall (default), or the process's CPU time: steadier on a shared machine, but it counts "
                         "every thread's time (spin-waits included), so compare only one-thread runs with it")
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="median (default) or min of the timed calls: min filters out the time other jobs on a shared "
                         "machine take from a run")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    lines = []
    for threads in args.threads:
        cmd = [sys.executable, __file__, "--child", "--threads", str(threads), "--rows", *map(str, args.rows),
               "--repeats", str(args.repeats), "--copies", str(args.copies), "--bits", str(args.bits),
               "--group-size", str(args.group_size), "--isa", args.isa, "--clock", args.clock, "--stat", args.stat,
               "--shapes", *(f"{n}x{k}" for n, k in args.shapes)]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(threads)}).stdout
        lines += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    print(f"{args.bits}-bit, group {args.group_size}; {args.clock} ms per weight ({args.stat} of {args.repeats}); "
          "ratio = fp32 / variant")
    for r in lines:
        variants = [key for key in r if "/" in key or key == "ort-fast"]
        cells = "  ".join(f"{key} {r[key]:.3f} ({r['fp32'] / r[key]:.2f}x)" for key in variants)
        n, k = _shape(r["shape"])
        gflops = 2e-6 * r["rows"] * n * k / r["fp32"]
        print(f"threads {r['threads']}  {r['shape']:>9}  M={r['rows']:<4} x{r['copies']:<2} fp32 {r['fp32']:.3f} "
              f"({gflops:.0f} GFLOP/s)  {cells}")


if __name__ == "__main__":
    main()
