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
    from .quantize import QuantizeOptions, quantize_model

    opts = QuantizeOptions(
        method=args.method, bpw=args.bpw, wbits=args.wbits, group_size=args.group_size,
        symmetric={"sym": True, "asym": False, None: None}[args.sym], vq_dim=args.vq_dim, tau_c=args.tau_c,
        tau_f=args.tau_f, calib=str(args.calib) if args.calib else None, nsamples=args.nsamples,
        seqlen=args.seqlen, seed=args.seed, sequential=args.sequential,
        elementwise={"on": True, "off": False, None: None}[args.elementwise],
        elementwise_bits=args.elementwise_bits, fold_elementwise=args.fold_elementwise, sq_format=args.sq_format,
        lower_vq=args.lower_vq, tokenizer=args.tokenizer, kmeans_iters=args.kmeans_iters, ranking=args.ranking,
        embedding_bits=args.embedding_bits, head_bits=args.head_bits,
        head_accuracy_level=args.head_accuracy_level, rotate_lora=args.rotate_lora)
    result = quantize_model(args.model, args.output, opts, args.report)
    t = result.report["totals"]
    for path in result.outputs:
        print(f"wrote {path} ({_size(path)})")
    target = "" if t["bpw_target"] is None else f" (target {t['bpw_target']})"
    print(f"{t['quantized_tensors']} tensors ({t['quantized_weights'] / 1e6:.2f}M weights): bpw {t['bpw']:.4f}"
          f"{target}, methods {t['methods']}, stored {t['quantized_weights_stored_bits_per_weight']:.3f} "
          f"bits/weight ({t['quantized_weights_ratio_to_fp16']:.3f} x fp16); embedding+head "
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
                       description="Calibrate the exported sequence graph in onnxruntime, quantize every linear "
                                   "weight (and, for rwkvquant, the element-wise vectors) and write a runnable "
                                   "quantized ONNX model. When IN.onnx has a .step.onnx sibling, OUT.step.onnx "
                                   "gets the same weights.")
    q.add_argument("model", type=Path, help="fp sequence graph from `rwkvq-onnx export`")
    q.add_argument("-o", "--output", type=Path, required=True, help="quantized .onnx")
    q.add_argument("--method", default="rwkvquant", choices=("rwkvquant", "gptq", "gptvq", "rtn", "kmeans", "awq"),
                   help="rwkvquant: proxy-chosen GPTQ or GPTVQ per weight + element-wise codebooks (default)")
    q.add_argument("--bpw", type=float, default=None,
                   help="bits-per-weight target over the linear weights (e.g. 3.275); rwkvquant meets it by "
                        "ranking weights by the proxy, baselines by their group/codebook sizes")
    q.add_argument("--wbits", type=int, default=3, help="bits per weight of codes (default 3)")
    q.add_argument("--group-size", type=int, default=64, help="scalar group size along K (0 = per channel)")
    q.add_argument("--sym", choices=("sym", "asym"), default=None,
                   help="scalar zero points (default: sym for rwkvquant, asym for baselines)")
    q.add_argument("--vq-dim", type=int, default=2, help="weights per codebook index (1, 2 or 4)")
    q.add_argument("--tau-c", type=float, default=1.5, help="coarse proxy threshold (paper: 1.5)")
    q.add_argument("--tau-f", type=float, default=50.0, help="fine proxy threshold (paper: 50)")
    q.add_argument("--calib", type=Path, help="calibration text or jsonl ({\"text\": ...} per line)")
    q.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    q.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--sequential", action="store_true",
                   help="re-calibrate each block after the blocks before it are quantized (slower, as GPTQ)")
    q.add_argument("--elementwise", choices=("on", "off"), default=None,
                   help="activation-weighted codebooks for element-wise vectors (default: on for rwkvquant)")
    q.add_argument("--elementwise-bits", type=int, default=4)
    q.add_argument("--fold-elementwise", action="store_true", help="store decoded element-wise vectors as constants")
    q.add_argument("--sq-format", choices=("qdq", "matmulnbits"), default="qdq",
                   help="scalar weights as DequantizeLinear+MatMul (default) or com.microsoft.MatMulNBits")
    q.add_argument("--lower-vq", action="store_true", help="rewrite rwkvq ops into standard ONNX ops")
    q.add_argument("--embedding-bits", type=int, choices=(8,), default=None,
                   help="store the embedding as int8 rows with one scale each (default: full precision)")
    q.add_argument("--head-bits", type=int, choices=(4, 8), default=None,
                   help="store the head as MatMulNBits, round to nearest in groups of 64 (default: full "
                        "precision); at 0.1B the embedding and head are over half the parameters")
    q.add_argument("--head-accuracy-level", type=int, choices=(0, 4), default=4,
                   help="MatMulNBits accuracy_level of the head: 4 (default) quantizes its input to int8 per "
                        "block, onnxruntime's fast CPU path; 0 computes in float (several times slower)")
    q.add_argument("--kmeans-iters", type=int, default=25)
    q.add_argument("--ranking", choices=("proxy", "variance", "range", "mse"), default="proxy",
                   help="rwkvquant ablations: order weights for VQ by another criterion (needs --bpw)")
    q.add_argument("--rotate-lora", action="store_true",
                   help="fold a seeded Hadamard rotation into RWKV-7's linear-only LoRA pairs (a1/a2, v1/v2) "
                        "before calibration; same fp function, flatter weights (default: off)")
    q.add_argument("--tokenizer", default="auto", help="as for eval")
    q.add_argument("--report", type=Path, help="write the per-tensor JSON report here")
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
