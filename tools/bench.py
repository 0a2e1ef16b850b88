#!/usr/bin/env python3
"""Decode / prefill speed and peak memory of exported models, as ratios to fp32 measured in one run.

Creates a seeded synthetic RWKV-7 of a named shape (no download), exports the
variants (fp32, fp16, and quantized ones: rwkvquant-faithful, the paper's
hybrid at 3.275 bpw with its 3-bit scalar groups as packed rwkvq.SQMatMul and
its VQ weights as rwkvq.VQMatMul; rwkvquant-allvq, GPTVQ everywhere at 3.275
as an ablation; gptq4 as onnxruntime's 4-bit MatMulNBits; and each of those
with an int8 embedding and a 4-bit head: -eh4), then measures each in
its own process so peak RSS is that variant's alone. A variant named
`NAME-exact` is NAME's model run with the native ops' exact kernels (the
others run the fast ones, RwkvSession's default). --rounds repeats the sweep
over the variants (order reversed every other round) and each speed ratio is
the median of the per-round ratios to that round's fp32, so slow drifts of a
shared machine hit the numerator and the denominator alike:

- peak RSS of a process that loads the model (sequence and step graph, one
  copy of the weights when the pair shares a data file), prefills
  --rss-prefill tokens (512, as generation does: RwkvSession.prefill, 128
  tokens per run, last logits kept) and decodes --decode-tokens (64):
  measured right after that workload, before the timing runs;
- decode tokens/s: batch 1, step graph with the state bound in onnxruntime
  buffers (RwkvSession.decoder), after warm-up, median of --runs;
- prefill tokens/s at each --prefill length (sequence graph, median);
- the physical limit: bytes of weights one decoded token reads (every
  initializer of the step graph but the embedding table, plus one embedding
  row) against this machine's memory bandwidth measured in the same run (a
  single-threaded copy of a 512 MiB buffer, bytes read + written, median of
  5 per round): the decode tokens/s that bandwidth allows, and each
  variant's share of it;
- bytes on disk (graphs and data), and the weights of one graph, as a ratio
  to the fp16 export's.

Beside the table, --quality checks fast vs exact kernels on the reference
model (../shared/fixtures/ref-rwkv7-L4-D256.pth quantized with the faithful
settings; |Δbpb| and mean KL(exact || fast) on linuxdoc-val chunks; skipped
with a note when the fixture is absent).

    python tools/bench.py --shape 0.1b --rounds 3 --quality --json bench-0.1b.json

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


def measure(model: str, decode_tokens: int, prefill: list[int], runs: int, threads: int | None, seed: int,
            kernels: str = "fast", rss_prefill: int = 512) -> dict:
    """Runs inside the child process: one variant, one process."""
    from rwkvq_onnx.runtime import RwkvSession

    sess = RwkvSession(model, threads=threads, kernels=kernels)
    vocab = sess.config.vocab_size
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=max([decode_tokens, rss_prefill, *prefill]) + decode_tokens + 8)

    # the workload whose peak RSS is reported: prefill, then decode from the state it leaves
    _, state = sess.prefill(tokens[None, :rss_prefill])
    dec = sess.decoder(state)
    for t in tokens[rss_prefill:rss_prefill + decode_tokens]:
        dec.step(t)
    rss = peak_rss_mib()

    def decode_once() -> float:
        dec = sess.decoder()
        t0 = time.perf_counter()
        for t in tokens[:decode_tokens]:
            dec.step(t)
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
        "peak_rss_mib": rss,
        "peak_rss_after_timing_mib": peak_rss_mib(),
        "disk_mib": disk / 2**20,
    }


def memory_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second this process moves copying a buffer far larger than any cache (read + write counted)."""
    src = np.ones(mib * 2**20 // 8, np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in before timing
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return 2 * src.nbytes / statistics.median(times)


QUANTIZED = {  # variant -> quantize options (calibrated on the package's built-in sample text)
    # the faithful RWKVQuant mix at the paper's 3.275 (3-bit GPTQ groups of 128 as packed rwkvq.SQMatMul, about a
    # tenth of the parameters in 3.5-bpw GPTVQ); element-wise vectors folded to decoded constants (same numbers,
    # no per-call op)
    "rwkvquant-faithful": dict(method="rwkvquant", bpw=3.275, bpw_accounting="paper", sq_format="sqmatmul",
                               fold_elementwise=True),
    # the ablation: GPTVQ everywhere at 3.275 with element-wise codebooks (what rwkvquant was before issue 12)
    "rwkvquant-allvq": dict(method="gptvq", bpw=3.275, elementwise="on", fold_elementwise=True),
    # onnxruntime's own 4-bit format, the peer of ggml Q4_0
    "gptq4": dict(method="gptq", wbits=4, group_size=64, sq_format="matmulnbits"),
}
# variant -> (variant it is made from, quantize-embedding-head options): the same linear weights, plus an int8
# embedding and a 4-bit head (what `quantize --embedding-bits 8 --head-bits 4` adds), without quantizing again
DERIVED = {
    "rwkvquant-faithful-eh4": ("rwkvquant-faithful", dict(embedding_bits=8, head_bits=4)),
    "rwkvquant-allvq-eh4": ("rwkvquant-allvq", dict(embedding_bits=8, head_bits=4)),
    "gptq4-eh4": ("gptq4", dict(embedding_bits=8, head_bits=4, head_format="matmulnbits")),
}
DEFAULT_VARIANTS = ("fp32", "fp16", "rwkvquant-faithful", "rwkvquant-faithful-exact", "rwkvquant-faithful-eh4",
                    "rwkvquant-faithful-eh4-exact", "rwkvquant-allvq-eh4", "gptq4-eh4")
EXACT = "-exact"  # suffix: the same model measured with kernels="exact"


def model_variant(variant: str) -> str:
    """The variant whose model file a (possibly -exact) variant runs."""
    return variant[: -len(EXACT)] if variant.endswith(EXACT) else variant


def derive(source: Path, out: Path, options: dict) -> None:
    """Apply the embedding/head pass to a quantized model and its step sibling."""
    import onnx

    from rwkvq_onnx.export import save_pair, step_path
    from rwkvq_onnx.passes.cleanup import Cleanup
    from rwkvq_onnx.passes.quantize_embedding_head import QuantizeEmbeddingHead

    graphs = []
    for src, dst in ((source, out), (step_path(source), step_path(out))):
        model = onnx.load(src)
        QuantizeEmbeddingHead(**options)(model)
        Cleanup()(model)
        graphs.append((model, dst))
    save_pair(graphs)  # one pair, so both graphs share one data file


def initializer_bytes(model: Path) -> dict[str, int]:
    """Bytes of each initializer of one graph (inline or external data)."""
    import onnx

    m = onnx.load(model, load_external_data=False)
    out = {}
    for t in m.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        out[t.name] = int(ext["length"]) if "length" in ext else len(t.raw_data)
    return out


def weight_bytes(model: Path) -> int:
    """Initializer bytes of one graph (what one copy of the weights costs in memory)."""
    return sum(initializer_bytes(model).values())


def bytes_per_token(model: Path, vocab: int) -> int:
    """Weight bytes one decoded token reads: every initializer of the step graph but the embedding table (and
    its int8 codes and scales), plus one embedding row of those."""
    from rwkvq_onnx.export import step_path
    from rwkvq_onnx.names import EMBEDDING

    sizes = initializer_bytes(step_path(model))
    emb = sum(v for k, v in sizes.items() if k.startswith(EMBEDDING))
    return sum(sizes.values()) - emb + -(-emb // vocab)


def export_variants(shape: str, workdir: Path, seed: int, variants: list[str],
                    rwkvquant_bpw: float = 3.275) -> dict[str, Path]:
    """Model files of the variants (made once, reused from workdir); a derived variant's source is made too
    but measured only when asked for; an -exact variant shares its model's files."""
    requested = list(variants)
    from rwkvq_onnx.export import export
    from rwkvq_onnx.synthetic import synthetic_rwkv7, synthetic_rwkv7_config

    n_layer, n_embd, vocab = SHAPES[shape]
    config = synthetic_rwkv7_config(n_layer, n_embd, vocab)
    sd = None
    paths = {}
    wanted = list(dict.fromkeys(model_variant(v) for v in variants))
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
    return {v: paths[model_variant(v)] for v in requested}


def summarize(rounds: list[dict[str, dict]], weights_mib: dict[str, float], token_bytes: dict[str, int],
              bandwidth: float) -> dict[str, dict]:
    """Per variant: medians over rounds of speeds and of per-round ratios to fp32; the largest peak RSS; the
    decode speed the measured memory bandwidth allows and the variant's share of it."""
    med = statistics.median
    out = {}
    for v in rounds[0]:
        per = [r[v] for r in rounds]
        base = [r["fp32"] for r in rounds]
        lengths = list(per[0]["prefill_tokens_per_s"])
        decode = med(p["decode_tokens_per_s"] for p in per)
        limit = bandwidth / token_bytes[v]
        out[v] = {
            "decode_tokens_per_s": decode,
            "prefill_tokens_per_s": {T: med(p["prefill_tokens_per_s"][T] for p in per) for T in lengths},
            "decode_vs_fp32_per_round": [p["decode_tokens_per_s"] / b["decode_tokens_per_s"] for p, b in zip(per, base)],
            "decode_vs_fp32": med(p["decode_tokens_per_s"] / b["decode_tokens_per_s"] for p, b in zip(per, base)),
            "prefill_vs_fp32": {T: med(p["prefill_tokens_per_s"][T] / b["prefill_tokens_per_s"][T]
                                       for p, b in zip(per, base)) for T in lengths},
            "peak_rss_mib": max(p["peak_rss_mib"] for p in per),
            "disk_mib": per[0]["disk_mib"],
            "weights_mib": weights_mib[v],
            "bytes_per_token": token_bytes[v],
            "bandwidth_limit_tokens_per_s": limit,
            "share_of_limit": decode / limit,
        }
    fp32, fp16_weights = out["fp32"], weights_mib.get("fp16", weights_mib["fp32"] / 2)
    for r in out.values():
        r["rss_vs_fp32"] = r["peak_rss_mib"] / fp32["peak_rss_mib"]
        r["disk_vs_fp32"] = r["disk_mib"] / fp32["disk_mib"]
        r["weights_vs_fp16"] = r["weights_mib"] / fp16_weights
        r["rss_vs_fp16_weights"] = r["peak_rss_mib"] / fp16_weights
    return out


def quality_check(workdir: Path, threads: int | None, max_docs: int) -> dict:
    """Fast vs exact kernels on the reference model quantized with the faithful settings (see
    rwkvq_onnx.kernel_agreement); {"skipped": why} when the reference fixture or data is absent."""
    from rwkvq_onnx.kernel_agreement import faithful_reference, kernel_agreement, linuxdoc_documents
    from rwkvq_onnx.tokenizers import ByteTokenizer

    shared = Path(__file__).resolve().parents[1].parent / "shared"
    made = faithful_reference(shared, workdir, log=lambda *a: print(*a, file=sys.stderr))
    if isinstance(made, str):
        return {"skipped": made}
    docs = linuxdoc_documents(shared / "data" / "linuxdoc-val.txt", max_docs)
    return kernel_agreement(made, ByteTokenizer(), docs, threads).as_dict()


def markdown_table(results: dict[str, dict]) -> str:
    """The results as the README's table: speeds, ratios (decode with its per-round ratios), memory, bytes."""
    lengths = list(results["fp32"]["prefill_tokens_per_s"])
    head = (["variant", "decode tok/s", "x fp32 (per round)"] + [c for T in lengths for c in (f"prefill {T}", "x fp32")]
            + ["peak RSS MiB", "x fp32", "disk MiB", "weights MiB", "x fp16", "MiB/token", "limit tok/s", "of limit"])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for v, r in results.items():
        rounds = ", ".join(f"{x:.2f}" for x in r["decode_vs_fp32_per_round"])
        cells = [v, f"{r['decode_tokens_per_s']:.1f}", f"{r['decode_vs_fp32']:.2f} ({rounds})"]
        cells += [c for T in lengths for c in (f"{r['prefill_tokens_per_s'][T]:.0f}", f"{r['prefill_vs_fp32'][T]:.2f}")]
        cells += [f"{r['peak_rss_mib']:.0f}", f"{r['rss_vs_fp32']:.2f}", f"{r['disk_mib']:.0f}", f"{r['weights_mib']:.0f}",
                  f"{r['weights_vs_fp16']:.2f}", f"{r['bytes_per_token'] / 2**20:.0f}",
                  f"{r['bandwidth_limit_tokens_per_s']:.0f}", f"{r['share_of_limit']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=SHAPES, default="0.1b")
    ap.add_argument("--rwkvquant-bpw", type=float, default=3.275,
                    help="bpw target of the rwkvquant variants (default 3.275; a shape too small to land within "
                         "0.005 below it needs another, e.g. 3.34 for tiny)")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help="comma-separated: fp32, fp16, rwkvquant-faithful, rwkvquant-allvq, gptq4, the -eh4 "
                         "variants of the quantized ones (int8 embedding, 4-bit head), and NAME-exact for any of "
                         "them (the same model with the exact kernels; the others run the fast ones) (default: "
                         + ",".join(DEFAULT_VARIANTS) + ")")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--rss-prefill", type=int, default=512,
                    help="tokens prefilled before decoding --decode-tokens in the workload whose peak RSS is reported")
    ap.add_argument("--prefill", default="128,512", help="comma-separated prefill lengths")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per measurement inside one process (median)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="sweeps over all variants, each variant in a fresh process (median of per-round ratios)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quality", action="store_true",
                    help="also check fast vs exact kernels on the reference model (|Δbpb|, KL; needs ../shared)")
    ap.add_argument("--quality-docs", type=int, default=24, help="linuxdoc chunks the quality check scores")
    ap.add_argument("--workdir", type=Path, default=Path("bench-models"))
    ap.add_argument("--json", type=Path, help="write the results as JSON")
    ap.add_argument("--markdown", action="store_true",
                    help="also print the table as markdown, with each round's decode ratio (what the README shows)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--kernels", default="fast", help=argparse.SUPPRESS)
    args = ap.parse_args()
    prefill = [int(x) for x in args.prefill.split(",") if x]
    if args.child:
        print(json.dumps(measure(args.child, args.decode_tokens, prefill, args.runs, args.threads, args.seed,
                                 args.kernels, args.rss_prefill)))
        return
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")

    args.workdir.mkdir(parents=True, exist_ok=True)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if model_variant(v) not in (*QUANTIZED, *DERIVED, "fp32", "fp16")]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}")
    if "fp32" not in variants:
        variants.insert(0, "fp32")
    paths = export_variants(args.shape, args.workdir, args.seed, variants, args.rwkvquant_bpw)
    vocab = SHAPES[args.shape][2]
    rounds: list[dict[str, dict]] = []
    bandwidths = []
    order = list(paths)
    for r in range(args.rounds):
        this = {}
        bandwidths.append(memory_bandwidth())
        for v in (order if r % 2 == 0 else order[::-1]):
            cmd = [sys.executable, __file__, "--child", str(paths[v]), "--decode-tokens", str(args.decode_tokens),
                   "--prefill", args.prefill, "--runs", str(args.runs), "--seed", str(args.seed),
                   "--rss-prefill", str(args.rss_prefill), "--kernels", "exact" if v.endswith(EXACT) else "fast"]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            print(f"round {r + 1}/{args.rounds}: measuring {v} ...", file=sys.stderr)
            this[v] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        rounds.append(this)
    bandwidth = statistics.median(bandwidths)
    results = summarize(rounds, {v: weight_bytes(p) / 2**20 for v, p in paths.items()},
                        {v: bytes_per_token(p, vocab) for v, p in paths.items()}, bandwidth)
    quality = quality_check(args.workdir, args.threads, args.quality_docs) if args.quality else None
    base = results["fp32"]
    header = f"{'variant':24} {'decode tok/s':>13} {'x fp32':>7} " + " ".join(
        f"{'prefill ' + T:>13} {'x fp32':>7}" for T in base["prefill_tokens_per_s"]) + \
        f" {'peak RSS MiB':>13} {'x fp32':>7} {'disk MiB':>9} {'x fp32':>7} {'weights MiB':>12} {'x fp16':>7}" \
        f" {'MiB/token':>10} {'limit tok/s':>12} {'of limit':>9}"
    print(f"shape {args.shape} {SHAPES[args.shape]}, batch 1, median of {args.runs} runs per process, "
          f"ratios: median over {args.rounds} rounds; peak RSS of prefill {args.rss_prefill} + decode "
          f"{args.decode_tokens}; memory bandwidth {bandwidth / 1e9:.1f} GB/s (one-thread copy, read + write)")
    print(header)
    for v, r in results.items():
        pre = " ".join(f"{r['prefill_tokens_per_s'][T]:13.1f} {r['prefill_vs_fp32'][T]:7.2f}"
                       for T in base["prefill_tokens_per_s"])
        print(f"{v:24} {r['decode_tokens_per_s']:13.1f} {r['decode_vs_fp32']:7.2f} {pre} "
              f"{r['peak_rss_mib']:13.0f} {r['rss_vs_fp32']:7.2f} {r['disk_mib']:9.1f} {r['disk_vs_fp32']:7.2f} "
              f"{r['weights_mib']:12.1f} {r['weights_vs_fp16']:7.2f} {r['bytes_per_token'] / 2**20:10.1f} "
              f"{r['bandwidth_limit_tokens_per_s']:12.1f} {r['share_of_limit']:9.2f}")
    if args.markdown:
        print(markdown_table(results))
    if quality is not None:
        if "skipped" in quality:
            print(f"fast vs exact kernels: skipped ({quality['skipped']})")
        else:
            from rwkvq_onnx.kernel_agreement import KernelAgreement

            print(KernelAgreement(**{k: quality[k] for k in ("documents", "tokens", "exact_bpb", "fast_bpb",
                                                               "mean_kl", "top1")}).line())
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "config": SHAPES[args.shape], "seed": args.seed,
                                         "runs": args.runs, "rounds": args.rounds, "bandwidth_bytes_per_s": bandwidth,
                                         "bandwidth_per_round": bandwidths, "quality": quality,
                                         "results": results}, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
