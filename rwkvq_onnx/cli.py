"""`rwkvq-onnx` command line: each subcommand parses flags and calls the library.

Every user error (bad checkpoint, bad data, unwritable output...) is an
`RwkvqError`: printed on one line, exit status 2, nothing half-written.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import __version__
from .errors import ConfigError, RwkvqError


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MiB"


def cmd_export(args: argparse.Namespace) -> None:
    from .atomic import check_writable
    from .checkpoint import load_checkpoint
    from .export import export

    check_writable(args.output)
    t0 = time.perf_counter()
    config, sd = load_checkpoint(args.checkpoint)
    print(f"loaded {args.checkpoint}: RWKV {config.version}, {config.n_layer} layers x {config.n_embd}, "
          f"{config.n_head} heads x {config.head_size}, vocab {config.vocab_size}, {config.n_params / 1e6:.2f}M params")
    for path in export(config, sd, args.output, mode=args.mode, fp16=args.fp16):
        print(f"wrote {path} ({_size(path)})")
    print(f"export took {time.perf_counter() - t0:.1f} s")


def cmd_eval(args: argparse.Namespace) -> None:
    from .atomic import write_text
    from .evaluate import evaluate_lambada, evaluate_text, read_documents, results_json
    from .runtime import RwkvSession
    from .tokenizers import get_tokenizer

    if not args.text and not args.lambada:
        raise ConfigError("eval needs --text FILE and/or --lambada FILE")
    if args.json:
        from .atomic import check_writable

        check_writable(args.json)
    session = RwkvSession(args.model, threads=args.threads)
    tokenizer = get_tokenizer(args.tokenizer, session.config.vocab_size)
    text = lambada = None
    if args.text:
        docs = read_documents(args.text, args.chunk_len, args.chunk_every)[: args.max_docs]
        text = evaluate_text(session, tokenizer, docs)
        print(f"text {args.text}: {text.documents} docs, {text.tokens} tokens, perplexity {text.perplexity:.4f}, "
              f"bits-per-byte {text.bits_per_byte:.4f}")
    if args.lambada:
        docs = read_documents(args.lambada)[: args.max_docs]
        lambada = evaluate_lambada(session, tokenizer, docs)
        print(f"lambada {args.lambada}: {lambada.examples} examples, perplexity {lambada.perplexity:.3f}, "
              f"accuracy {lambada.accuracy:.4f}")
    if args.json:
        write_text(args.json, results_json(args.model, text, lambada, tokenizer=tokenizer.name) + "\n")
        print(f"wrote {args.json}")


def cmd_generate(args: argparse.Namespace) -> None:
    from .generate import generate
    from .runtime import RwkvSession
    from .tokenizers import get_tokenizer

    session = RwkvSession(args.model, threads=args.threads)
    tokenizer = get_tokenizer(args.tokenizer, session.config.vocab_size)
    result = generate(session, tokenizer, args.prompt, args.max_tokens, greedy=args.greedy,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    print(args.prompt + result.text)
    print(result.speed_line())


def cmd_quantize(args: argparse.Namespace) -> None:
    from .quantize import QuantizeOptions, plan_summary, quantize_model

    opts = QuantizeOptions(
        method=args.method, bpw=args.bpw, bpw_accounting=args.bpw_accounting, wbits=args.wbits,
        group_size=args.group_size, symmetric=args.sym == "sym", act_order=args.act_order, vq_dim=args.vq_dim,
        vq_bits=args.vq_bits, vq_bpw=args.vq_bpw, vq_group_cols=args.vq_group_cols,
        vq_group_rows=args.vq_group_rows, kmeans_iters=args.kmeans_iters, m_step=args.m_step == "on",
        tau_c=args.tau_c, tau_f=args.tau_f, calib=str(args.calib) if args.calib else None, nsamples=args.nsamples,
        seqlen=args.seqlen, seed=args.seed, sequential=args.sequential,
        elementwise={"on": True, "off": False, None: None}[args.elementwise],
        elementwise_bits=args.elementwise_bits, fold_elementwise=args.fold_elementwise, sq_format=args.sq_format,
        lower_vq=args.lower_vq, tokenizer=args.tokenizer, ranking=args.ranking,
        embedding_bits=args.embedding_bits, head_bits=args.head_bits,
        head_accuracy_level=args.head_accuracy_level, recipe=str(args.recipe) if args.recipe else None,
        rotate_lora=args.rotate_lora, elementwise_weighted=args.elementwise_weighting == "activations")
    result = quantize_model(args.model, args.output, opts, args.report)
    t = result.report["totals"]
    for path in result.outputs:
        print(f"wrote {path} ({_size(path)})")
    target = "" if t["bpw_target"] is None else f", target {t['bpw_target']} ({t['bpw_accounting']} accounting)"
    methods = ", ".join(f"{n} {m}" for m, n in sorted(t["methods"].items()))
    print(f"{t['quantized_tensors']} tensors, {t['quantized_weights'] / 1e6:.2f}M weights: {methods}")
    print(plan_summary(result.plan))
    print(f"bpw {t['bpw']:.4f} stored, {t['bpw_paper']:.4f} as the paper counts{target}")
    print(f"stored {t['quantized_weights_stored_bits_per_weight']:.3f} bits/weight in the graph "
          f"({t['quantized_weights_ratio_to_fp16']:.3f} x fp16); embedding+head "
          f"{t['embedding_and_head_bytes'] / 2**20:.1f} MiB; {result.report['seconds']:.1f} s")
    if args.report:
        print(f"wrote {args.report}")


def cmd_build_engine(args: argparse.Namespace) -> None:
    from .tensorrt_build import build_engine

    sidecar = build_engine(args.model, args.output, fp16=args.fp16, max_batch=args.max_batch, max_seq=args.max_seq,
                           workspace_mib=args.workspace)
    print(f"wrote {args.output} and {args.output}.json (TensorRT {sidecar['tensorrt']}, plugins {sidecar['plugins']})")


def cmd_triton_repo(args: argparse.Namespace) -> None:
    from .triton import triton_repo

    folder = triton_repo(args.model, args.output, name=args.name, kind=args.kind, instances=args.instances)
    print(f"wrote {folder}/config.pbtxt and {folder}/1/ (serve with: tritonserver --model-repository {args.output})")


def cmd_validate(args: argparse.Namespace) -> int:
    from .tokenizers import get_tokenizer
    from .runtime import RwkvSession
    from .validate import validate

    config = RwkvSession(args.a, use_step_graph=False).config
    tokens = get_tokenizer(args.tokenizer, config.vocab_size).encode(args.prompt)[: args.tokens]
    res = validate(args.a, args.b, tokens, args.atol, args.rtol, args.stat)
    for out, err in res.max_abs.items():
        print(f"{out}: max |a-b| {err:.3e}, mean {res.mean_abs[out]:.3e}")
    print(f"{'PASSED' if res.passed else 'FAILED'}: {res.feeds} feed(s), atol {args.atol}, rtol {args.rtol}, "
          f"error statistic {args.stat}")
    return 0 if res.passed else 1


def cmd_report(args: argparse.Namespace) -> None:
    from .report import build_report_html

    print(f"wrote {build_report_html(args.report, args.output, histograms=args.histograms)}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(Path(args.out), n_layer=args.layers, n_embd=args.embd, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rwkvq-onnx",
        description="Export RWKV-6/7 checkpoints to ONNX, quantize them (RWKVQuant and baselines), evaluate and "
                    "generate with onnxruntime, build TensorRT engines and Triton repositories.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    e = sub.add_parser("export", help="checkpoint (.pth/.safetensors) -> ONNX",
                       description="Export an official RWKV-6 (x060) or RWKV-7 (x070) checkpoint to ONNX. "
                                   "The config is inferred from the checkpoint's keys and shapes.")
    e.add_argument("checkpoint", type=Path, help="BlinkDL .pth or .safetensors checkpoint (fp32/fp16/bf16)")
    e.add_argument("-o", "--output", type=Path, required=True, help="output .onnx path")
    e.add_argument("--fp16", action="store_true",
                   help="fp16 weights and matmuls (state, norms, decays and the WKV recurrence stay fp32)")
    e.add_argument("--mode", choices=("sequence", "step", "both"), default="sequence",
                   help="sequence: tokens [B,T] with a Scan over T (default; also decodes with T=1); "
                        "step: loop-free one-token graph for TensorRT; both: OUT.onnx and OUT.step.onnx")
    e.set_defaults(func=cmd_export)

    def model_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("model", type=Path, help="exported .onnx (its .step.onnx sibling is used for decoding)")
        q.add_argument("--tokenizer", default="auto",
                       help="'bytes', 'world' or a tokenizer.json path (default: by vocab size: 256 bytes, 65536 world)")
        q.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")

    v = sub.add_parser("eval", help="perplexity / bits-per-byte / LAMBADA accuracy",
                       description="Evaluate an exported model: perplexity and bits-per-byte on a text or jsonl "
                                   "file, LAMBADA last-word perplexity and greedy accuracy.")
    model_args(v)
    v.add_argument("--text", type=Path, help="plain text or jsonl ({\"text\": ...} per line)")
    v.add_argument("--lambada", type=Path, help="LAMBADA jsonl ({\"text\": ...} per line; target = last word)")
    v.add_argument("--json", type=Path, help="write the results as JSON")
    v.add_argument("--max-docs", type=int, default=None, help="evaluate only the first N documents / examples")
    v.add_argument("--chunk-len", type=int, default=None,
                   help="cut a plain text file into chunks of this many characters, each run from the zero state")
    v.add_argument("--chunk-every", type=int, default=None, help="start a chunk every N characters (default: chunk-len)")
    v.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="generate text; prints prefill and decode tokens/s",
                       description="Prefill the prompt with the sequence graph, decode with the step graph.")
    model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--greedy", action="store_true", help="always take the most likely token")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)

    q = sub.add_parser("quantize", help="quantize an exported model (RWKVQuant or a baseline method)",
                       description="Calibrate the exported sequence graph in onnxruntime, plan a method for every "
                                   "linear weight (and, for rwkvquant, codebooks for the element-wise vectors), "
                                   "apply the plan and write a runnable quantized ONNX model, plus the plan as "
                                   "OUT.plan.json. When IN.onnx has a .step.onnx sibling, OUT.step.onnx gets the "
                                   "same weights.")
    q.add_argument("model", type=Path, help="fp sequence graph from `rwkvq-onnx export`")
    q.add_argument("-o", "--output", type=Path, required=True,
                   help="quantized .onnx (the plan is written beside it as OUT.plan.json)")
    q.add_argument("--method", default="rwkvquant", choices=("rwkvquant", "gptq", "gptvq", "rtn", "kmeans", "awq"),
                   help="rwkvquant: proxy-chosen GPTQ or GPTVQ per weight + element-wise codebooks; the others "
                        "apply one algorithm everywhere (default: rwkvquant)")
    q.add_argument("--recipe", type=Path, default=None,
                   help="apply a saved plan (OUT.plan.json of an earlier run) instead of planning; the options "
                        "recorded in it replace the other quantize flags, so the model comes out byte for byte "
                        "the same (default: plan afresh)")
    q.add_argument("--bpw", type=float, default=None,
                   help="bits-per-weight target over the linear weights (e.g. 3.275): rwkvquant keeps SQ and VQ at "
                        "their own costs and gives VQ to the least uniform weights until the budget is spent, "
                        "landing within 0.005 below it; baselines pick group sizes (SQ) or block heights (VQ) "
                        "(default: none; rwkvquant then uses the --tau-c/--tau-f thresholds)")
    q.add_argument("--bpw-accounting", choices=("paper", "stored"), default="paper",
                   help="how --bpw counts: 'paper' charges 32 bits of scale+zero per scalar group (the paper's "
                        "3.25 for 3-bit groups of 128), 'stored' the bits the payload holds (a 3-bit zero point); "
                        "VQ costs the same in both (default: paper)")
    q.add_argument("--wbits", type=int, default=3, help="bits per weight of codes (default 3)")
    q.add_argument("--group-size", type=int, default=128,
                   help="scalar group size along K, 0 = per channel (default 128: 3.25 bpw as the paper counts)")
    q.add_argument("--sym", choices=("sym", "asym"), default="asym",
                   help="scalar groups: asymmetric min-max with a zero point, or symmetric abs-max (default: asym, "
                        "as the authors ran GPTQ)")
    q.add_argument("--act-order", action="store_true",
                   help="GPTQ visits columns by decreasing Hessian diagonal (default: off, as the authors ran it)")
    q.add_argument("--vq-dim", type=int, default=2, help="weights per codebook index: 1, 2 or 4 (default 2)")
    q.add_argument("--vq-bits", type=int, default=None, help="VQ index bits per weight (default: --wbits)")
    q.add_argument("--vq-bpw", type=float, default=3.5,
                   help="rwkvquant holds every VQ weight at this many bits per weight or fewer by choosing its "
                        "codebook block height (default 3.5, as the paper)")
    q.add_argument("--vq-group-cols", type=int, default=256,
                   help="input columns per VQ codebook block (default 256; the authors ran 32 with --vq-dim 1)")
    q.add_argument("--vq-group-rows", type=int, default=0,
                   help="output rows per VQ codebook block; 0 derives it from --vq-bpw (or a VQ baseline's --bpw), "
                        "otherwise 16 for a VQ baseline without --bpw (default 0)")
    q.add_argument("--kmeans-iters", type=int, default=25,
                   help="k-means (EM) iterations per VQ codebook (default 25; the authors ran 100)")
    q.add_argument("--m-step", choices=("on", "off"), default="on",
                   help="GPTVQ refits the codebooks to the layer's output error after assignment (default: on)")
    q.add_argument("--tau-c", type=float, default=1.5, help="coarse proxy threshold (default 1.5, the paper's)")
    q.add_argument("--tau-f", type=float, default=50.0, help="fine proxy threshold (default 50, the paper's)")
    q.add_argument("--ranking", choices=("proxy", "coarse", "fine", "variance", "range", "mse"), default="proxy",
                   help="rwkvquant ablations: order weights for VQ by another criterion, needs --bpw "
                        "(default: proxy, the combined coarse-to-fine score)")
    q.add_argument("--calib", type=Path,
                   help="calibration text or jsonl ({\"text\": ...} per line); needed by every method but rtn and "
                        "kmeans (default: none)")
    q.add_argument("--nsamples", type=int, default=64,
                   help="calibration windows (default 64, as the README quality tables)")
    q.add_argument("--seqlen", type=int, default=256,
                   help="tokens per calibration window (default 256, as the README quality tables)")
    q.add_argument("--seed", type=int, default=0, help="seed of the calibration windows and k-means (default 0)")
    q.add_argument("--sequential", action="store_true",
                   help="re-calibrate each block after the blocks before it are quantized (slower, as GPTQ; "
                        "default: off)")
    q.add_argument("--elementwise", choices=("on", "off"), default=None,
                   help="activation-weighted codebooks for element-wise vectors (default: on for rwkvquant, "
                        "off otherwise)")
    q.add_argument("--elementwise-bits", type=int, default=4,
                   help="index bits of the element-wise codebooks (default 4)")
    q.add_argument("--fold-elementwise", action="store_true",
                   help="store decoded element-wise vectors as constants (default: off)")
    q.add_argument("--sq-format", choices=("qdq", "matmulnbits"), default="qdq",
                   help="scalar weights as DequantizeLinear+MatMul or com.microsoft.MatMulNBits (default: qdq)")
    q.add_argument("--lower-vq", action="store_true",
                   help="rewrite rwkvq ops into standard ONNX ops (default: off)")
    q.add_argument("--embedding-bits", type=int, choices=(8,), default=None,
                   help="store the embedding as int8 rows with one scale each (default: full precision)")
    q.add_argument("--head-bits", type=int, choices=(4, 8), default=None,
                   help="store the head as MatMulNBits, round to nearest in groups of 64 (default: full "
                        "precision); at 0.1B the embedding and head are over half the parameters")
    q.add_argument("--head-accuracy-level", type=int, choices=(0, 4), default=4,
                   help="MatMulNBits accuracy_level of the head: 4 (default) quantizes its input to int8 per "
                        "block, onnxruntime's fast CPU path; 0 computes in float (several times slower)")
    q.add_argument("--elementwise-weighting", choices=("activations", "none"), default="activations",
                   help="element-wise codebooks fit weighted by the mean squared activation each entry multiplies, "
                        "or unweighted at the same bits (an ablation) (default: activations)")
    q.add_argument("--rotate-lora", action="store_true",
                   help="fold a seeded Hadamard rotation into RWKV-7's linear-only LoRA pairs (a1/a2, v1/v2) "
                        "before calibration; same fp function, flatter weights (default: off)")
    q.add_argument("--tokenizer", default="auto", help="as for eval (default: auto)")
    q.add_argument("--report", type=Path, help="write the per-tensor JSON report here (default: none)")
    q.set_defaults(func=cmd_quantize)

    b = sub.add_parser("build-engine", help="TensorRT engine (.plan) with the rwkvq plugins (needs a GPU)",
                       description="Validate and prepare the graph for TensorRT (plugins, fp16 activations for "
                                   "them), set optimization profiles for token and state shapes, build and "
                                   "serialize the engine, and write OUT.plan.json. Without TensorRT or a GPU it "
                                   "stops with one line after validating everything it can.")
    b.add_argument("model", type=Path, help="step graph (recommended) or sequence graph")
    b.add_argument("-o", "--output", type=Path, required=True, help="engine .plan")
    b.add_argument("--fp16", action="store_true", help="fp16 engine (TensorRT 11: export with --fp16 instead)")
    b.add_argument("--max-batch", type=int, default=1)
    b.add_argument("--max-seq", type=int, default=128, help="longest T for a sequence graph")
    b.add_argument("--workspace", type=int, default=4096, help="builder workspace in MiB")
    b.set_defaults(func=cmd_build_engine)

    t = sub.add_parser("triton-repo", help="Triton model repository (implicit state, sequence batcher)",
                       description="Write REPO/NAME/config.pbtxt (checked with Triton's own schema) and the model.")
    t.add_argument("model", type=Path, help="engine .plan (with its .plan.json) or .onnx")
    t.add_argument("-o", "--output", type=Path, required=True, help="model repository folder")
    t.add_argument("--name", default="rwkv")
    t.add_argument("--kind", choices=("KIND_GPU", "KIND_CPU"), default=None,
                   help="instance kind (default: GPU for .plan, CPU for .onnx)")
    t.add_argument("--instances", type=int, default=1)
    t.set_defaults(func=cmd_triton_repo)

    v2 = sub.add_parser("validate", help="compare two models' outputs with Polygraphy",
                        description="Feed both models the same tokens and states (onnxruntime with the rwkvq ops, "
                                    "or TensorRT for .plan) and compare logits and states. Exit 1 when outside "
                                    "tolerance.")
    v2.add_argument("a", type=Path, help="reference model (.onnx)")
    v2.add_argument("b", type=Path, help="model to check (.onnx or .plan)")
    v2.add_argument("--prompt", default="The quick brown fox jumps over the lazy dog.")
    v2.add_argument("--tokens", type=int, default=16, help="tokens of the prompt to feed")
    v2.add_argument("--atol", type=float, default=1e-4)
    v2.add_argument("--rtol", type=float, default=1e-4)
    v2.add_argument("--stat", choices=("max", "mean", "median"), default="max", help="error statistic checked")
    v2.add_argument("--tokenizer", default="auto")
    v2.set_defaults(func=cmd_validate)

    r = sub.add_parser("report", help="HTML page: proxies vs thresholds, SQ/VQ map, histograms, errors",
                       description="Render the JSON report of `quantize --report` as one self-contained HTML page.")
    r.add_argument("report", type=Path, help="JSON written by quantize --report")
    r.add_argument("-o", "--output", type=Path, required=True, help="report .html")
    r.add_argument("--histograms", type=int, default=2, help="weights shown per side (most / least uniform)")
    r.set_defaults(func=cmd_report)

    d = sub.add_parser("demo", help="end to end on a built-in synthetic RWKV-7 (no download)",
                       description="Create a seeded RWKV-7, export it, check it against the reference model, "
                                   "evaluate it, generate from it, then quantize it with RWKVQuant and evaluate "
                                   "the quantized model.")
    d.add_argument("--out", default="rwkvq-demo", help="folder for the demo's files (default: ./rwkvq-demo)")
    d.add_argument("--layers", type=int, default=4)
    d.add_argument("--embd", type=int, default=128)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except RwkvqError as exc:
        print(f"rwkvq-onnx {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
