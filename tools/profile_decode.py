#!/usr/bin/env python3
"""Where decode time goes: onnxruntime's profiler over batch-1 step-graph decoding, grouped by operator.

    python tools/profile_decode.py bench-models/0.1b-fp32.onnx bench-models/0.1b-rwkvquant.onnx --tokens 16

For each model it runs the step graph (the `.step.onnx` sibling when given a
sequence graph) token by token with profiling on, then prints the share of
kernel time per operator type (MatMul, MatMulNBits, the rwkvq custom ops,
the WKV recurrence's element-wise ops, ...) and the session overhead (wall
time not spent in kernels). It also counts nodes per decoded token: the step
graph's nodes as written (by operator type) and the kernels onnxruntime ran per
token after its own graph optimizations.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def graph_node_counts(path: Path) -> dict[str, int]:
    """Nodes of a graph file by operator type (domain-qualified for custom ops), most frequent first."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        counts[f"{node.domain}.{node.op_type}" if node.domain else node.op_type] += 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def profile(model: Path, tokens: int, threads: int | None, kernels: str = "fast") -> dict:
    import onnxruntime as ort

    from rwkvq_onnx.export import step_path
    from rwkvq_onnx.runtime import RwkvSession, session_options

    path = step_path(model) if step_path(model).is_file() else model
    config = RwkvSession(path).config
    opts = session_options(threads, kernels=kernels)
    opts.enable_profiling = True
    opts.profile_file_prefix = f"/tmp/rwkvq-profile-{path.stem}"
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    state = [np.zeros((config.n_layer, 1, config.n_embd), np.float32),
             np.zeros((config.n_layer, 1, config.n_embd), np.float32),
             np.zeros((config.n_layer, 1, config.n_head, config.head_size, config.head_size), np.float32)]
    rng = np.random.default_rng(0)
    name = "token" if any(i.name == "token" for i in sess.get_inputs()) else "tokens"
    t0 = time.perf_counter()
    for tok in rng.integers(0, config.vocab_size, tokens):
        feed = np.array([tok]) if name == "token" else np.array([[tok]])
        _, *state = sess.run(None, {name: feed, "state_att_shift": state[0], "state_ffn_shift": state[1],
                                    "state_wkv": state[2]})
    wall = time.perf_counter() - t0
    trace = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    runs = 0
    for ev in trace:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            by_op[ev.get("args", {}).get("op_name", "?")] += ev["dur"] / 1e6
            runs += 1
    kernels = sum(by_op.values())
    nodes = graph_node_counts(path)
    return {"model": str(path), "tokens": tokens, "ms_per_token": 1e3 * wall / tokens,
            "graph_nodes_per_token": sum(nodes.values()), "graph_nodes_by_op": nodes,
            "kernels_run_per_token": runs / tokens,
            "kernel_share": {k: v / wall for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
            "overhead_share": max(0.0, 1 - kernels / wall)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", type=Path, nargs="+")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kernels", choices=("fast", "exact"), default="fast",
                    help="the native ops' numerics, as RwkvSession's kernels= (default fast, what generate runs)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = [profile(m, args.tokens, args.threads, args.kernels) for m in args.models]
    for r in results:
        print(f"{r['model']}: {r['ms_per_token']:.2f} ms/token; session overhead {100 * r['overhead_share']:.1f}%; "
              f"{r['graph_nodes_per_token']} graph nodes per token, {r['kernels_run_per_token']:.0f} kernels run "
              f"per token")
        print("    nodes: " + ", ".join(f"{op} {n}" for op, n in r["graph_nodes_by_op"].items()))
        for op, share in list(r["kernel_share"].items())[:8]:
            print(f"    {op:24s} {100 * share:5.1f}%")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
