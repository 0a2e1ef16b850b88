#!/usr/bin/env python3
"""Decode / prefill speed and peak memory of exported models, as ratios to fp32 measured in one run.

Creates a seeded synthetic RWKV-7 of a named shape (no download), exports the
variants (fp32, fp16, and quantized ones: rwkvquant at 3.275 bpw with the
rwkvq ops, gptq4 as 4-bit MatMulNBits, and each of those with an int8
embedding and a 4-bit head: -eh4), then measures each in its own process so
peak RSS is that variant's alone. --rounds repeats the sweep over the
variants (order reversed every other round) and each speed ratio is the
median of the per-round ratios to that round's fp32, so slow drifts of a
shared machine hit the numerator and the denominator alike:

- decode tokens/s: batch 1, step graph, after warm-up, median of --runs;
- prefill tokens/s at each --prefill length (sequence graph, median);
- peak RSS of the process after loading and running (both the sequence and
  the step graph are loaded, each with its own copy of the weights);
- bytes on disk (both graphs), and the weights of one graph in memory, as a
  ratio to the fp16 export's.

    python tools/bench.py --shape 0.1b --json bench-0.1b.json

Deterministic given --seed (same weights, same tokens); timings are of this
machine at this moment, so only ratios within one run are comparable.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHAPES = {  # name: (n_layer, n_embd, vocab)
    "tiny": (2, 128, 256),
    "0.1b": (12, 768, 65536),
    "0.4b": (24, 1024, 65536),
}


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it is not inherited across fork/exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(model: str, decode_tokens: int, prefill: list[int], runs: int, threads: int | None, seed: int) -> dict:
    """Runs inside the child process: one variant, one process."""
    from rwkvq_onnx.runtime import RwkvSession

    sess = RwkvSession(model, threads=threads)
    vocab = sess.config.vocab_size
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=max([decode_tokens, *prefill]) + 8)

    def decode_once() -> float:
        state = sess.zero_state(1)
        t0 = time.perf_counter()
        for t in tokens[:decode_tokens]:
            _, state = sess.step(np.array([t]), state)
        return decode_tokens / (time.perf_counter() - t0)

    decode_once()  # warm-up
    decode = statistics.median(decode_once() for _ in range(runs))
    prefill_speed = {}
    for T in prefill:
        batch = tokens[None, :T]
        sess.forward(batch)  # warm-up
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sess.forward(batch)
            times.append(time.perf_counter() - t0)
        prefill_speed[str(T)] = T / statistics.median(times)
    stem = str(model)[: -len(".onnx")]
    disk = sum(Path(f).stat().st_size for f in (f"{stem}.onnx", f"{stem}.onnx.data", f"{stem}.step.onnx",
                                                 f"{stem}.step.onnx.data") if Path(f).is_file())
    return {
        "decode_tokens_per_s": decode,
        "prefill_tokens_per_s": prefill_speed,
        "peak_rss_mib": peak_rss_mib(),
        "disk_mib": disk / 2**20,
    }


QUANTIZED = {  # variant -> quantize options (calibrated on the package's built-in sample text)
    # element-wise vectors folded to decoded constants: same numbers, no per-call custom-op overhead
    "rwkvquant": dict(method="rwkvquant", bpw=3.275, sq_format="matmulnbits", fold_elementwise=True),
    "gptq4": dict(method="gptq", wbits=4, group_size=64, sq_format="matmulnbits"),
}
# variant -> (variant it is made from, quantize-embedding-head options): the same linear weights, plus an int8
# embedding and a 4-bit head (what `quantize --embedding-bits 8 --head-bits 4` adds), without quantizing again
DERIVED = {
    "rwkvquant-eh4": ("rwkvquant", dict(embedding_bits=8, head_bits=4)),
    "gptq4-eh4": ("gptq4", dict(embedding_bits=8, head_bits=4)),
}


def derive(source: Path, out: Path, options: dict) -> None:
    """Apply the embedding/head pass to a quantized model and its step sibling."""
    import onnx

    from rwkvq_onnx.export import save_model, step_path
    from rwkvq_onnx.passes.cleanup import Cleanup
    from rwkvq_onnx.passes.quantize_embedding_head import QuantizeEmbeddingHead

    for src, dst in ((source, out), (step_path(source), step_path(out))):
        model = onnx.load(src)
        QuantizeEmbeddingHead(**options)(model)
        Cleanup()(model)
        save_model(model, dst)


def weight_bytes(model: Path) -> int:
    """Initializer bytes of one graph (what one copy of the weights costs in memory)."""
    import onnx

    m = onnx.load(model, load_external_data=False)
    total = 0
    for t in m.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        total += int(ext["length"]) if "length" in ext else len(t.raw_data)
    return total


def export_variants(shape: str, workdir: Path, seed: int, variants: list[str],
                    rwkvquant_bpw: float = 3.275) -> dict[str, Path]:
    """Model files of the variants (made once, reused from workdir); a derived variant's source is made too
    but measured only when asked for."""
    from rwkvq_onnx.export import export
    from rwkvq_onnx.synthetic import synthetic_rwkv7, synthetic_rwkv7_config

    n_layer, n_embd, vocab = SHAPES[shape]
    config = synthetic_rwkv7_config(n_layer, n_embd, vocab)
    sd = None
    paths = {}
    wanted = list(variants)
    variants = wanted + [DERIVED[v][0] for v in wanted if v in DERIVED and DERIVED[v][0] not in wanted]
    variants.sort(key=lambda v: v in DERIVED)  # sources first
    for v in [v for v in variants if v not in QUANTIZED and v not in DERIVED]:
        path = workdir / f"{shape}-{v}.onnx"
        if not path.exists():
            sd = sd if sd is not None else synthetic_rwkv7(config, seed)
            print(f"exporting {path} ...", file=sys.stderr)
            export(config, sd, path, mode="both", fp16=(v == "fp16"))
        paths[v] = path
    for v in [v for v in variants if v in QUANTIZED or v in DERIVED]:
        path = workdir / f"{shape}-{v}.onnx"
        if v in DERIVED:
            if not path.exists():
                print(f"deriving {path} ...", file=sys.stderr)
                derive(paths[DERIVED[v][0]], path, DERIVED[v][1])
            paths[v] = path
            continue
        if not path.exists():
            from rwkvq_onnx.demo import sample_text
            from rwkvq_onnx.quantize import QuantizeOptions, quantize_model

            calib = workdir / "calib.txt"
            calib.write_text(sample_text() * 20)
            options = {**QUANTIZED[v], **({"bpw": rwkvquant_bpw} if QUANTIZED[v]["method"] == "rwkvquant" else {})}
            opts = QuantizeOptions(calib=str(calib), nsamples=8, seqlen=128, seed=seed, **options)
            print(f"quantizing {path} ...", file=sys.stderr)
            t0 = time.perf_counter()
            quantize_model(paths["fp32"], path, opts, workdir / f"{shape}-{v}.json",
                           log=lambda *a: print(*a, file=sys.stderr))
            print(f"  quantize took {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        paths[v] = path
    return {v: paths[v] for v in wanted}


def summarize(rounds: list[dict[str, dict]], weights_mib: dict[str, float]) -> dict[str, dict]:
    """Per variant: medians over rounds of speeds and of per-round ratios to fp32; the largest peak RSS."""
    med = statistics.median
    out = {}
    for v in rounds[0]:
        per = [r[v] for r in rounds]
        base = [r["fp32"] for r in rounds]
        lengths = list(per[0]["prefill_tokens_per_s"])
        out[v] = {
            "decode_tokens_per_s": med(p["decode_tokens_per_s"] for p in per),
            "prefill_tokens_per_s": {T: med(p["prefill_tokens_per_s"][T] for p in per) for T in lengths},
            "decode_vs_fp32_per_round": [p["decode_tokens_per_s"] / b["decode_tokens_per_s"] for p, b in zip(per, base)],
            "decode_vs_fp32": med(p["decode_tokens_per_s"] / b["decode_tokens_per_s"] for p, b in zip(per, base)),
            "prefill_vs_fp32": {T: med(p["prefill_tokens_per_s"][T] / b["prefill_tokens_per_s"][T]
                                       for p, b in zip(per, base)) for T in lengths},
            "peak_rss_mib": max(p["peak_rss_mib"] for p in per),
            "disk_mib": per[0]["disk_mib"],
            "weights_mib": weights_mib[v],
        }
    fp32, fp16_weights = out["fp32"], weights_mib.get("fp16", weights_mib["fp32"] / 2)
    for r in out.values():
        r["rss_vs_fp32"] = r["peak_rss_mib"] / fp32["peak_rss_mib"]
        r["disk_vs_fp32"] = r["disk_mib"] / fp32["disk_mib"]
        r["weights_vs_fp16"] = r["weights_mib"] / fp16_weights
        r["rss_vs_fp16_weights"] = r["peak_rss_mib"] / fp16_weights
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=SHAPES, default="0.1b")
    ap.add_argument("--rwkvquant-bpw", type=float, default=3.275,
                    help="bpw target of the rwkvquant variants (default 3.275; a shape too small to land within "
                         "0.005 below it needs another, e.g. 3.281 for tiny)")
    ap.add_argument("--variants", default="fp32,fp16,rwkvquant,rwkvquant-eh4,gptq4,gptq4-eh4",
                    help="comma-separated: fp32, fp16, rwkvquant, gptq4, and the -eh4 variants of the quantized "
                         "ones (int8 embedding, 4-bit head)")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--prefill", default="128,512", help="comma-separated prefill lengths")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per measurement inside one process (median)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="sweeps over all variants, each variant in a fresh process (median of per-round ratios)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("bench-models"))
    ap.add_argument("--json", type=Path, help="write the results as JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    prefill = [int(x) for x in args.prefill.split(",") if x]
    if args.child:
        print(json.dumps(measure(args.child, args.decode_tokens, prefill, args.runs, args.threads, args.seed)))
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    variants = args.variants.split(",")
    if "fp32" not in variants:
        variants.insert(0, "fp32")
    paths = export_variants(args.shape, args.workdir, args.seed, variants, args.rwkvquant_bpw)
    rounds: list[dict[str, dict]] = []
    order = list(paths)
    for r in range(args.rounds):
        this = {}
        for v in (order if r % 2 == 0 else order[::-1]):
            cmd = [sys.executable, __file__, "--child", str(paths[v]), "--decode-tokens", str(args.decode_tokens),
                   "--prefill", args.prefill, "--runs", str(args.runs), "--seed", str(args.seed)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            print(f"round {r + 1}/{args.rounds}: measuring {v} ...", file=sys.stderr)
            this[v] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        rounds.append(this)
    results = summarize(rounds, {v: weight_bytes(p) / 2**20 for v, p in paths.items()})
    base = results["fp32"]
    header = f"{'variant':14} {'decode tok/s':>13} {'x fp32':>7} " + " ".join(
        f"{'prefill ' + T:>13} {'x fp32':>7}" for T in base["prefill_tokens_per_s"]) + \
        f" {'peak RSS MiB':>13} {'x fp32':>7} {'disk MiB':>9} {'x fp32':>7} {'weights MiB':>12} {'x fp16':>7}"
    print(f"shape {args.shape} {SHAPES[args.shape]}, batch 1, median of {args.runs} runs per process, "
          f"ratios: median over {args.rounds} rounds")
    print(header)
    for v, r in results.items():
        pre = " ".join(f"{r['prefill_tokens_per_s'][T]:13.1f} {r['prefill_vs_fp32'][T]:7.2f}"
                       for T in base["prefill_tokens_per_s"])
        print(f"{v:14} {r['decode_tokens_per_s']:13.1f} {r['decode_vs_fp32']:7.2f} {pre} "
              f"{r['peak_rss_mib']:13.0f} {r['rss_vs_fp32']:7.2f} {r['disk_mib']:9.1f} {r['disk_vs_fp32']:7.2f} "
              f"{r['weights_mib']:12.1f} {r['weights_vs_fp16']:7.2f}")
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "config": SHAPES[args.shape], "seed": args.seed,
                                         "runs": args.runs, "rounds": args.rounds,
                                         "results": results}, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
