#!/usr/bin/env python3
"""Quality table: every method at 3.25 and 3.5 bpw and RWKVQuant (thresholds, 3.275), paired against fp32 on two texts.

    python tools/quality_table.py ../shared/fixtures/ref-rwkv7-L4-D256.pth --ablations --jobs 3 --out quality-ref

One command regenerates the table, deterministically given --seed: it exports
the checkpoint, runs `rwkvq-onnx quantize` for every row (in-process, through
the CLI, so the command line printed beside the table is exactly what ran),
and scores each quantized model against the fp32 model on the SAME documents
of two texts: chunks of `linuxdoc-val.txt` (the calibration text's domain) and
whole LAMBADA passages (another domain; the first --lambada-docs passages).
For each text a row gets bits-per-byte, the delta to fp32 with a
paired-bootstrap 95% interval over documents, mean KL(fp || q) per token and
top-1 agreement (rwkvq_onnx/paired_eval.py). The SQ/VQ share by tensor count
and by parameters comes from the quantize report. Chosen pairs of rows are
also compared with each other (paired over documents) and written as plain
sentences. Writes `table.md` and `table.json` in --out.

Calibration stays `linuxdoc-calib.txt`; the tool refuses a calibration text
that overlaps the evaluation text. Quantized models are evaluated through the
standard-op lowering of their rwkvq ops (`--lower-vq`, the same logits within
1e-5) unless --custom-ops.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")  # quantize's progress bars would only clutter the log

from rwkvq_onnx.agreement import paired_bootstrap  # noqa: E402
from rwkvq_onnx.checkpoint import load_checkpoint  # noqa: E402
from rwkvq_onnx.cli import main as cli_main  # noqa: E402
from rwkvq_onnx.errors import RwkvqError  # noqa: E402
from rwkvq_onnx.evaluate import read_documents  # noqa: E402
from rwkvq_onnx.export import export  # noqa: E402
from rwkvq_onnx.paired_eval import ReferenceRun, paired_scores, reference_run, score_documents  # noqa: E402
from rwkvq_onnx.runtime import RwkvSession  # noqa: E402
from rwkvq_onnx.tokenizers import get_tokenizer  # noqa: E402


@dataclass(frozen=True)
class Row:
    """One quantized model of the table: a label and the `quantize` flags that make it."""

    key: str  # file stem and the name comparisons use
    label: str
    flags: tuple[str, ...]
    ablation: bool = False


def _row(key: str, label: str, *flags: str, ablation: bool = False) -> Row:
    return Row(key, label, tuple(flags), ablation)


def _baseline(method: str, label: str, bpw: str) -> Row:
    return _row(f"{method}-{bpw}", f"{label} @ {bpw}", "--method", method, "--bpw", bpw)


# In the order they run: the rows the README's statements rest on first, so a run cut short still has them.
ROWS = [
    _row("rwkvquant-3.275", "RWKVQuant @ 3.275", "--method", "rwkvquant", "--bpw", "3.275"),
    _baseline("gptq", "GPTQ", "3.5"),
    _baseline("gptvq", "GPTVQ", "3.5"),
    _row("rwkvquant-thresholds", "RWKVQuant, paper thresholds (tau_c 1.5, tau_f 50)", "--method", "rwkvquant",
         "--tau-c", "1.5", "--tau-f", "50"),
    # The planner main shipped before issue 12 (every weight VQ, codebooks shrunk to fit 3.275, element-wise
    # codebooks on): GPTVQ everywhere sized to the target rebuilds it as an ablation.
    _row("all-vq-3.275", "ablation: all-VQ planner (GPTVQ everywhere @ 3.275 + element-wise)", "--method",
         "gptvq", "--bpw", "3.275", "--elementwise", "on"),
    _baseline("gptq", "GPTQ", "3.25"),
    _baseline("gptvq", "GPTVQ", "3.25"),
    *(_baseline(m, label, b) for m, label in (("rtn", "RTN"), ("awq", "AWQ"), ("kmeans", "k-means VQ"))
      for b in ("3.25", "3.5")),
]
_HYBRID = ("--method", "rwkvquant", "--bpw", "3.275")
ABLATIONS = [
    _row("rwkvquant-3.275-rotate-lora", "ablation: RWKVQuant @ 3.275, --rotate-lora", *_HYBRID, "--rotate-lora",
         ablation=True),
    _row("gptvq-3.5-authors", "ablation: GPTVQ @ 3.5, the authors' VQ (dim 1, 32 columns, 100 iterations, M-step)",
         "--method", "gptvq", "--bpw", "3.5", "--vq-dim", "1", "--vq-group-cols", "32", "--kmeans-iters", "100",
         "--m-step", "on", ablation=True),
    _row("rwkvquant-3.275-elementwise-unweighted", "ablation: RWKVQuant @ 3.275, element-wise codebooks unweighted",
         *_HYBRID, "--elementwise-weighting", "none", ablation=True),
    _row("rwkvquant-3.275-elementwise-off", "ablation: RWKVQuant @ 3.275, element-wise vectors in full precision",
         *_HYBRID, "--elementwise", "off", ablation=True),
    _row("rwkvquant-3.275-rank-coarse", "ablation: RWKVQuant @ 3.275, coarse proxy only", *_HYBRID,
         "--ranking", "coarse", ablation=True),
    _row("rwkvquant-3.275-rank-fine", "ablation: RWKVQuant @ 3.275, fine proxy only", *_HYBRID,
         "--ranking", "fine", ablation=True),
    _row("rwkvquant-3.275-rank-variance", "ablation: RWKVQuant @ 3.275, variance ranking", *_HYBRID,
         "--ranking", "variance", ablation=True),
    _row("rwkvquant-3.275-rank-range", "ablation: RWKVQuant @ 3.275, range ranking", *_HYBRID,
         "--ranking", "range", ablation=True),
    _row("gptq-3.25-rotate-lora", "ablation: GPTQ @ 3.25, --rotate-lora", "--method", "gptq", "--bpw", "3.25",
         "--rotate-lora", ablation=True),
    _row("rwkvquant-3.275-rank-mse", "ablation: RWKVQuant @ 3.275, MSE-based choice", *_HYBRID,
         "--ranking", "mse", ablation=True),
]
# (a, b, what the comparison asks): b - a, paired over documents, on each text.
COMPARISONS = [
    ("gptq-3.5", "rwkvquant-3.275", "RWKVQuant @ 3.275 vs GPTQ @ 3.5"),
    ("gptvq-3.5", "rwkvquant-3.275", "RWKVQuant @ 3.275 vs GPTVQ @ 3.5"),
    ("gptq-3.25", "rwkvquant-3.275", "RWKVQuant @ 3.275 vs GPTQ @ 3.25"),
    ("all-vq-3.275", "rwkvquant-3.275", "RWKVQuant @ 3.275 vs the all-VQ planner @ 3.275"),
    ("rwkvquant-3.275", "rwkvquant-3.275-rotate-lora", "--rotate-lora on vs off (RWKVQuant @ 3.275)"),
    ("gptq-3.25", "gptq-3.25-rotate-lora", "--rotate-lora on vs off (GPTQ @ 3.25)"),
    ("gptvq-3.5", "gptvq-3.5-authors", "the authors' VQ configuration vs the default (GPTVQ @ 3.5)"),
    ("rwkvquant-3.275", "rwkvquant-3.275-elementwise-unweighted", "element-wise codebooks unweighted vs weighted"),
    ("rwkvquant-3.275", "rwkvquant-3.275-elementwise-off", "element-wise vectors full precision vs quantized"),
    # does the paper's proxy ranking matter? each alternative ranking at the same target against it
    *(("rwkvquant-3.275", f"rwkvquant-3.275-rank-{r}", f"{what} vs the proxy ranking (RWKVQuant @ 3.275)")
      for r, what in (("coarse", "coarse proxy only"), ("fine", "fine proxy only"), ("variance", "variance ranking"),
                      ("range", "range ranking"), ("mse", "MSE-based choice"))),
    # the baselines against each other at equal bits
    ("gptq-3.25", "rtn-3.25", "RTN vs GPTQ @ 3.25"),
    ("gptq-3.25", "awq-3.25", "AWQ vs GPTQ @ 3.25"),
    ("gptvq-3.25", "kmeans-3.25", "k-means VQ vs GPTVQ @ 3.25"),
]
TEXTS = ("linuxdoc", "lambada")
SCALAR_ALGORITHMS = ("gptq", "rtn", "awq")


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


def quantize_argv(args: argparse.Namespace, fp: Path, row: Row) -> list[str]:
    """The exact `rwkvq-onnx quantize` arguments of a row."""
    out = args.out / f"{row.key}.onnx"
    common = ["--calib", str(args.calib), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
              "--seed", str(args.seed), "--bpw-accounting", args.bpw_accounting] + (
        [] if args.custom_ops else ["--lower-vq"])
    return ["quantize", str(fp), "-o", str(out), *row.flags, *shlex.split(args.extra_flags), *common,
            "--report", str(args.out / f"{row.key}.json")]


def eval_argvs(args: argparse.Namespace, model: str) -> dict[str, list[str]]:
    """`rwkvq-onnx eval` arguments that reproduce each text's bits-per-byte for one model."""
    return {"linuxdoc": ["eval", model, "--text", str(args.eval), "--chunk-len", str(args.chunk_len),
                         "--chunk-every", str(args.chunk_every), "--max-docs", str(args.max_docs)],
            "lambada": ["eval", model, "--text", str(args.lambada), "--max-docs", str(args.lambada_docs)]}


def command_line(argv: list[str]) -> str:
    return "rwkvq-onnx " + " ".join(shlex.quote(a) for a in argv)


def shares(report: dict) -> dict:
    """SQ/VQ share of the linear weights by tensor count and by parameters, from a quantize report."""
    totals = report["totals"]
    if "shares" in totals:
        return totals["shares"]
    counts = {"sq": [0, 0], "vq": [0, 0]}
    for row in report["tensors"].values():
        if row.get("kind") in counts:
            counts[row["kind"]][0] += 1
            counts[row["kind"]][1] += int(np.prod(row["shape"]))
    n_t, n_p = sum(c[0] for c in counts.values()) or 1, sum(c[1] for c in counts.values()) or 1
    return {k: {"tensors": t, "params": p, "tensor_share": t / n_t, "param_share": p / n_p}
            for k, (t, p) in counts.items()}


def score_row(task: tuple) -> dict:
    """Quantize one row through the CLI and score it against the saved fp references (runs in a worker)."""
    args, fp, row, refs = task
    argv = quantize_argv(args, fp, row)
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            code = cli_main(argv)
        except Exception as exc:  # one failed row must not lose the others' results
            print(f"{type(exc).__name__}: {exc}", file=log)
            code = 1
    seconds = time.perf_counter() - t0
    if code != 0:
        return {"key": row.key, "label": row.label, "error": log.getvalue().strip().splitlines()[-1]}
    report = json.loads((args.out / f"{row.key}.json").read_text())
    session = RwkvSession(args.out / f"{row.key}.onnx", threads=1)
    texts = {}
    for text, ref_path in refs.items():
        scores = paired_scores(ReferenceRun.load(ref_path), session)
        texts[text] = {**scores.as_dict(), "q_bits": scores.q_bits.tolist()}
    totals = report["totals"]
    return {"key": row.key, "label": row.label, "ablation": row.ablation, "flags": list(row.flags),
            "bpw": totals["bpw"], "bpw_paper": totals.get("bpw_paper"), "bpw_target": totals.get("bpw_target"),
            "methods": totals["methods"], "shares": shares(report), "quantize_seconds": seconds,
            "quantize_command": command_line(argv),
            "eval_commands": {k: command_line(v) for k, v in eval_argvs(args, argv[3]).items()}, "texts": texts}


def compare(rows: dict[str, dict], refs: dict[str, ReferenceRun], seed: int) -> list[dict]:
    """Paired differences between chosen rows (b - a bits-per-byte), with intervals, on each text."""
    out = []
    for a, b, what in COMPARISONS:
        if a not in rows or b not in rows or "error" in rows[a] or "error" in rows[b]:
            continue
        item = {"a": a, "b": b, "what": what}
        for text, ref in refs.items():
            nbytes = ref.bytes
            qa, qb = (np.asarray(rows[k]["texts"][text]["q_bits"]) / nbytes for k in (a, b))
            item[text] = paired_bootstrap(qa, qb, nbytes, seed=seed).as_dict()
        out.append(item)
    return out


def _pct(x: float) -> str:
    return f"{100 * x:+.2f}%"


def _interval(d: dict) -> str:
    return f"{_pct(d['mean'])} [{_pct(d['low'])}, {_pct(d['high'])}]"


def comparison_sentence(item: dict, base: dict[str, float]) -> str:
    """One plain sentence per comparison, per text, saying whether the difference is inside its interval."""
    parts = []
    for text in TEXTS:
        d = item[text]
        rel = {k: d[k] / base[text] for k in ("mean", "low", "high")}
        if d["low"] <= 0.0 <= d["high"]:
            verdict = "no measurable difference (the interval contains 0)"
        elif d["high"] < 0:
            verdict = f"{item['b']} is better"
        else:
            verdict = f"{item['a']} is better"
        parts.append(f"{text}: {d['mean']:+.4f} bits/byte ({_interval(rel)} of fp), {verdict}")
    return f"- {item['what']} ({item['b']} minus {item['a']}): " + "; ".join(parts) + "."


def render(args: argparse.Namespace, fp_row: dict, rows: list[dict], comparisons: list[dict],
           refs: dict[str, ReferenceRun]) -> str:
    base = {t: fp_row["texts"][t]["bits_per_byte"] for t in TEXTS}
    head = (f"Model `{args.checkpoint.name}`; calibration `{args.calib.name}` ({args.nsamples} x {args.seqlen} tokens, "
            f"seed {args.seed}); linuxdoc = `{args.eval.name}`, {len(refs['linuxdoc'].documents)} chunks of "
            f"{args.chunk_len} characters every {args.chunk_every}; LAMBADA = the first "
            f"{len(refs['lambada'].documents)} passages of `{args.lambada.name}`, bits-per-byte over whole "
            f"passages. Δ: quantized minus fp32 bits-per-byte as a share of fp32's, with a paired-bootstrap 95% "
            f"interval over documents (byte-weighted, 2000 resamples); KL: mean KL(fp32 || q) per token in nats; "
            f"top-1: share of positions where q's most likely next token is fp32's. bpw: stored bits per linear "
            f"weight; paper bpw: the paper's accounting (32 bits of scale and zero per scalar group); --bpw "
            f"targets count in {args.bpw_accounting} accounting. SQ/VQ: "
            f"tensors and share of linear-weight parameters.")
    lines = [head, "",
             "| row | bpw | paper bpw | SQ / VQ tensors | VQ params | linuxdoc bpb | Δ linuxdoc [95% CI] | KL | "
             "top-1 | LAMBADA bpb | Δ LAMBADA [95% CI] | KL | top-1 |",
             "| --- " * 13 + "|",
             f"| fp32 | 32 | 32 | - | - | {base['linuxdoc']:.4f} | - | - | - | {base['lambada']:.4f} | - | - | - |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error']} |" + " |" * 11)
            continue
        s = r["shares"]
        paper = "-" if r["bpw_paper"] is None else f"{r['bpw_paper']:.3f}"
        cells = [r["label"], f"{r['bpw']:.3f}", paper, f"{s['sq']['tensors']} / {s['vq']['tensors']}",
                 f"{100 * s['vq']['param_share']:.1f}%"]
        for t in TEXTS:
            x = r["texts"][t]
            cells += [f"{x['bits_per_byte']:.4f}", _interval(x["relative_delta"]), f"{x['mean_kl']:.5f}",
                      f"{100 * x['top1']:.2f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    if comparisons:
        lines += ["", "Paired comparisons between rows (same documents; b minus a, negative = b better):", ""]
        lines += [comparison_sentence(c, base) for c in comparisons]
    lines += ["", "Reproduce a row (fp32 export, quantize, evaluate each text):", "", "```",
              f"rwkvq-onnx export {shlex.quote(str(args.checkpoint))} -o {shlex.quote(str(args.out / 'fp32.onnx'))}"]
    for k, v in eval_argvs(args, str(args.out / "fp32.onnx")).items():
        lines.append(command_line(v))
    for r in rows:
        if "error" not in r:
            lines += [f"# {r['label']}", r["quantize_command"], *r["eval_commands"].values()]
    lines.append("```")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path, help="RWKV checkpoint (.pth/.safetensors) to export and quantize")
    ap.add_argument("--calib", type=Path, default=Path("../shared/data/linuxdoc-calib.txt"),
                    help="calibration text (default ../shared/data/linuxdoc-calib.txt)")
    ap.add_argument("--eval", type=Path, default=Path("../shared/data/linuxdoc-val.txt"),
                    help="in-domain held-out text, cut into chunks (default ../shared/data/linuxdoc-val.txt)")
    ap.add_argument("--lambada", type=Path, default=Path("../shared/data/lambada_test.jsonl"),
                    help="second-domain text: LAMBADA jsonl, scored over whole passages "
                         "(default ../shared/data/lambada_test.jsonl)")
    ap.add_argument("--lambada-docs", type=int, default=100,
                    help="score the first N LAMBADA passages (default 100, ~33k bytes: fits 2 busy cores)")
    ap.add_argument("--chunk-len", type=int, default=384, help="characters per linuxdoc chunk (default 384)")
    ap.add_argument("--chunk-every", type=int, default=8000, help="start a linuxdoc chunk every N characters "
                                                                  "(default 8000)")
    ap.add_argument("--max-docs", type=int, default=24, help="linuxdoc chunks scored (default 24)")
    ap.add_argument("--nsamples", type=int, default=64, help="calibration windows per row (default 64)")
    ap.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window (default 256)")
    ap.add_argument("--seed", type=int, default=0, help="quantization and bootstrap seed (default 0)")
    ap.add_argument("--ablations", action="store_true", help="add the ablation rows (default: main rows only)")
    ap.add_argument("--only", default=None,
                    help="comma-separated row keys to run, e.g. gptq-3.5,rwkvquant-3.275 (default: all rows)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="rows quantized and scored in parallel worker processes (default 1); results do not "
                         "depend on it")
    ap.add_argument("--bpw-accounting", choices=("paper", "stored"), default="paper",
                    help="how every row's --bpw counts scalar groups: the paper's 32 bits of scale and zero per "
                         "group, or the bits stored (default: paper, so 3.25 / 3.275 / 3.5 mean the paper's)")
    ap.add_argument("--extra-flags", default="",
                    help="quantize flags added to every row, e.g. \"--vq-dim 1\" for 64-wide models, whose 32x64 "
                         "LoRA matrices cannot hold a dim-2 codebook at 3.5 bpw (default: none)")
    ap.add_argument("--custom-ops", action="store_true",
                    help="evaluate the rwkvq-op graphs instead of their standard-op lowering (default: lowering)")
    ap.add_argument("--out", type=Path, default=Path("quality"), help="output folder (default ./quality)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows of an earlier run in --out whose quantize and eval commands are exactly this "
                         "run's (same flags, texts, seed), and run only the others (default: run every row)")
    return ap.parse_args(argv)


def select_rows(args: argparse.Namespace) -> list[Row]:
    todo = ROWS + (ABLATIONS if args.ablations else [])
    if args.only:
        keep = set(args.only.split(","))
        unknown = keep - {r.key for r in ROWS + ABLATIONS}
        if unknown:
            raise SystemExit(f"error: unknown row(s) {', '.join(sorted(unknown))}")
        todo = [r for r in ROWS + ABLATIONS if r.key in keep]
    return todo


def resumable_rows(args: argparse.Namespace, fp: Path, todo: list[Row], fp_texts: dict) -> list[dict]:
    """Rows of an earlier table.json that this run would reproduce: same key, same quantize command, same eval
    commands, same fp32 scores (so the same texts and documents), and the quantized model still on disk.

    The rows are deterministic given these, so re-running them would only spend time."""
    path = args.out / "table.json"
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    if old.get("fp32", {}).get("texts") != json.loads(json.dumps(fp_texts)):
        return []
    want = {row.key: row for row in todo}
    kept = []
    for r in old.get("rows", []):
        row = want.get(r.get("key"))
        if row is None or "error" in r:
            continue
        argv = quantize_argv(args, fp, row)
        if (r.get("quantize_command") == command_line(argv)
                and r.get("eval_commands") == {k: command_line(v) for k, v in eval_argvs(args, argv[3]).items()}
                and (args.out / f"{row.key}.onnx").is_file()):
            kept.append(r)
    return kept


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_no_overlap(args.calib, args.eval)
    check_no_overlap(args.calib, args.lambada)
    args.out.mkdir(parents=True, exist_ok=True)
    todo = select_rows(args)
    t_all = time.perf_counter()
    try:
        config, sd = load_checkpoint(args.checkpoint)
        tokenizer = get_tokenizer(None, config.vocab_size)
        docs = {"linuxdoc": read_documents(args.eval, args.chunk_len, args.chunk_every)[: args.max_docs],
                "lambada": read_documents(args.lambada)[: args.lambada_docs]}
        fp = args.out / "fp32.onnx"
        export(config, sd, fp)  # the sequence graph: all the scoring needs, as the printed export command
        fp_session = RwkvSession(fp, threads=1)
        refs, ref_paths, fp_texts = {}, {}, {}
        for text in TEXTS:
            refs[text] = reference_run(fp_session, score_documents(tokenizer, docs[text]))
            ref_paths[text] = args.out / f"fp32-{text}.npz"
            refs[text].save(ref_paths[text])
            fp_texts[text] = {"bits_per_byte": float(refs[text].bits.sum() / refs[text].bytes.sum()),
                              "documents": len(refs[text].documents), "bytes": int(refs[text].bytes.sum())}
            print(f"fp32 {text}: {fp_texts[text]['bits_per_byte']:.4f} bits/byte over "
                  f"{fp_texts[text]['documents']} documents", flush=True)
    except RwkvqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    order = {row.key: i for i, row in enumerate(todo)}
    fp_row = {"label": "fp32", "texts": fp_texts}
    results: list[dict] = resumable_rows(args, fp, todo, fp_texts) if args.resume else []
    kept = {r["key"] for r in results}
    if kept:
        print(f"resumed {len(kept)} row(s) from {args.out / 'table.json'}: {', '.join(sorted(kept))}", flush=True)
    tasks = [(args, fp, row, ref_paths) for row in todo if row.key not in kept]

    def write() -> None:
        """Rewrite the table from the rows so far, so that an interrupted run still leaves every row it got."""
        results.sort(key=lambda x: order[x["key"]])
        comparisons = compare({x["key"]: x for x in results}, refs, args.seed)
        (args.out / "table.md").write_text(render(args, fp_row, results, comparisons, refs))
        (args.out / "table.json").write_text(json.dumps(
            {"checkpoint": str(args.checkpoint), "fp32": fp_row, "rows": results, "comparisons": comparisons,
             "complete": len(results) == len(todo), "seconds": time.perf_counter() - t_all}, indent=1) + "\n")

    def record(r: dict) -> None:
        results.append(r)
        _progress(r)
        write()

    write()
    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            for r in pool.imap_unordered(score_row, tasks):
                record(r)
    else:
        for task in tasks:
            record(score_row(task))
    print((args.out / "table.md").read_text())


def _progress(r: dict) -> None:
    if "error" in r:
        print(f"{r['label']}: FAILED {r['error']}", flush=True)
        return
    print(f"{r['label']}: bpw {r['bpw']:.3f}, " + ", ".join(
        f"{t} {r['texts'][t]['bits_per_byte']:.4f} ({_pct(r['texts'][t]['relative_delta']['mean'])})"
        for t in TEXTS) + f", quantize {r['quantize_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
