#!/usr/bin/env python3
"""Quality table: every method at 3.25 and 3.5 bpw, RWKVQuant at 3.275, and 2-bit rows, on one checkpoint.

    python tools/quality_table.py ../shared/fixtures/ref-rwkv7-L4-D256.pth \\
        --calib ../shared/data/linuxdoc-calib.txt --eval ../shared/data/linuxdoc-val.txt --out quality-ref

Exports the checkpoint, quantizes it with each method, evaluates bits-per-byte
(and LAMBADA with --lambada) and writes `table.md` and `table.json` in --out.
Calibration and evaluation texts must not overlap: the tool checks and refuses.
Quantized models are evaluated through their standard-op lowering (`--lower-vq`,
identical logits to the custom-op graph within 1e-5) because it runs natively
in onnxruntime; pass --custom-ops to evaluate the rwkvq-op graphs instead.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from rwkvq_onnx.checkpoint import load_checkpoint
from rwkvq_onnx.errors import RwkvqError
from rwkvq_onnx.evaluate import evaluate_lambada, evaluate_text, read_documents
from rwkvq_onnx.export import export
from rwkvq_onnx.quantize import QuantizeOptions, quantize_model
from rwkvq_onnx.runtime import RwkvSession
from rwkvq_onnx.tokenizers import get_tokenizer

ROWS = [  # (label, method, bpw, wbits, extra options)
    ("RTN", "rtn", 3.25, 3, {}), ("GPTQ", "gptq", 3.25, 3, {}), ("AWQ", "awq", 3.25, 3, {}),
    ("k-means VQ", "kmeans", 3.25, 3, {}), ("GPTVQ", "gptvq", 3.25, 3, {}),
    ("RTN", "rtn", 3.5, 3, {}), ("GPTQ", "gptq", 3.5, 3, {}), ("AWQ", "awq", 3.5, 3, {}),
    ("k-means VQ", "kmeans", 3.5, 3, {}), ("GPTVQ", "gptvq", 3.5, 3, {}),
    ("RWKVQuant", "rwkvquant", 3.275, 3, {}),
    ("GPTQ", "gptq", 2.25, 2, {}), ("GPTVQ", "gptvq", 2.25, 2, {}), ("RWKVQuant", "rwkvquant", 2.275, 2, {}),
]
ABLATIONS = [
    ("RWKVQuant, no element-wise codebooks", "rwkvquant", 3.275, 3, {"elementwise": False}),
    ("RWKVQuant, coarse proxy only", "rwkvquant", 3.275, 3, {"tau_f": 1e300}),
    ("RWKVQuant, fine proxy only", "rwkvquant", 3.275, 3, {"tau_c": 1e300}),
    ("RWKVQuant, variance ranking", "rwkvquant", 3.275, 3, {"ranking": "variance"}),
    ("RWKVQuant, range ranking", "rwkvquant", 3.275, 3, {"ranking": "range"}),
    ("RWKVQuant, MSE-based choice", "rwkvquant", 3.275, 3, {"ranking": "mse"}),
]


def check_no_overlap(calib: Path, evaluation: Path, window: int = 64, probes: int = 400) -> None:
    """Refuse when the evaluation text shares long passages with the calibration text."""
    if calib.resolve() == evaluation.resolve():
        raise SystemExit(f"refusing: calibration and evaluation are the same file ({calib})")
    a = calib.read_text(encoding="utf-8", errors="replace")
    b = evaluation.read_text(encoding="utf-8", errors="replace")
    rng = random.Random(0)
    hits = sum(b[i:i + window] in a for i in (rng.randrange(0, max(len(b) - window, 1)) for _ in range(probes)))
    if hits > probes // 100:
        raise SystemExit(f"refusing: {hits}/{probes} sampled {window}-character passages of {evaluation} "
                         f"also occur in {calib}; calibration and evaluation must not overlap")


def evaluate(model: Path, tokenizer, docs, lambada_docs) -> dict:
    session = RwkvSession(model)
    text = evaluate_text(session, tokenizer, docs, progress=False)
    out = {"bits_per_byte": text.bits_per_byte, "perplexity": text.perplexity}
    if lambada_docs:
        lam = evaluate_lambada(session, tokenizer, lambada_docs, progress=False)
        out.update(lambada_ppl=lam.perplexity, lambada_acc=lam.accuracy)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--calib", type=Path, required=True)
    ap.add_argument("--eval", type=Path, required=True, help="held-out text (plain text or jsonl)")
    ap.add_argument("--lambada", type=Path)
    ap.add_argument("--lambada-max", type=int, default=500)
    ap.add_argument("--chunk-len", type=int, default=384)
    ap.add_argument("--chunk-every", type=int, default=8000)
    ap.add_argument("--max-docs", type=int, default=24)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--ablations", action="store_true", help="add the proxy / element-wise ablation rows")
    ap.add_argument("--only", default=None, help="comma-separated methods to run (default: all rows)")
    ap.add_argument("--custom-ops", action="store_true", help="evaluate rwkvq-op graphs, not their lowering")
    ap.add_argument("--out", type=Path, default=Path("quality"))
    args = ap.parse_args()
    check_no_overlap(args.calib, args.eval)
    args.out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    try:
        config, sd = load_checkpoint(args.checkpoint)
        tokenizer = get_tokenizer(None, config.vocab_size)
        docs = read_documents(args.eval, args.chunk_len, args.chunk_every)[: args.max_docs]
        lambada_docs = read_documents(args.lambada)[: args.lambada_max] if args.lambada else None
        fp = args.out / "fp32.onnx"
        export(config, sd, fp)
        base = evaluate(fp, tokenizer, docs, lambada_docs)
        rows = [{"label": "fp32", "method": "fp32", "bpw_target": 32, "bpw": 32.0, **base,
                 "quantized_bytes": 4 * sum(v.size for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2
                                            and k not in ("emb.weight", "head.weight")),
                 "seconds": 0.0}]
        print(f"fp32: bits-per-byte {base['bits_per_byte']:.4f}", flush=True)
        todo = ROWS + (ABLATIONS if args.ablations else [])
        if args.only:
            keep = set(args.only.split(","))
            todo = [r for r in todo if r[1] in keep]
        for label, method, bpw, wbits, extra in todo:
            name = f"{method}-{bpw}" + "".join(f"-{k}-{v}" for k, v in extra.items())
            out = args.out / f"{name}.onnx"
            opts = QuantizeOptions(method=method, bpw=bpw, wbits=wbits, calib=str(args.calib),
                                   nsamples=args.nsamples, seqlen=args.seqlen, lower_vq=not args.custom_ops,
                                   progress=False, **extra)
            t0 = time.perf_counter()
            res = quantize_model(fp, out, opts, args.out / f"{name}.json", log=lambda *a: None)
            seconds = time.perf_counter() - t0
            scores = evaluate(out, tokenizer, docs, lambada_docs)
            t = res.report["totals"]
            rows.append({"label": label, "method": method, "bpw_target": bpw, "bpw": t["bpw"],
                         "quantized_bytes": round(t["bpw"] * t["quantized_weights"] / 8),
                         "stored_bytes": t["quantized_weights_stored_bytes"], "methods": t["methods"],
                         "seconds": seconds, **extra, **scores})
            print(f"{label} @ {bpw}: bpw {t['bpw']:.3f}, bits-per-byte {scores['bits_per_byte']:.4f} "
                  f"({scores['bits_per_byte'] - base['bits_per_byte']:+.4f}), quantize {seconds:.1f} s", flush=True)
    except RwkvqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    lam = lambada_docs is not None
    lines = [f"Model `{args.checkpoint.name}`; calibration `{args.calib.name}` ({args.nsamples} x {args.seqlen} "
             f"tokens); evaluation `{args.eval.name}` ({len(docs)} chunks of {args.chunk_len} every "
             f"{args.chunk_every})" + (f"; LAMBADA first {len(lambada_docs)}" if lam else "") + ".", "",
             "| method | bpw target | bpw | weight bytes | bits-per-byte | Δ vs fp | ppl |"
             + (" LAMBADA acc |" if lam else ""),
             "| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if lam else "")]
    for r in rows:
        lines.append(f"| {r['label']} | {r['bpw_target']} | {r['bpw']:.3f} | {r['quantized_bytes']:,} | "
                     f"{r['bits_per_byte']:.4f} | {r['bits_per_byte'] - base['bits_per_byte']:+.4f} | "
                     f"{r['perplexity']:.3f} |" + (f" {r['lambada_acc']:.4f} |" if lam else ""))
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    (args.out / "table.json").write_text(json.dumps({"checkpoint": str(args.checkpoint), "rows": rows,
                                                     "seconds": time.perf_counter() - t_all}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
