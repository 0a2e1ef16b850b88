"""`rwkvq-onnx` command line: each subcommand parses flags and calls the library.

Every user error (bad checkpoint, bad data, unwritable output, an output that
is an input...) is an `RwkvqError`: printed on one line, exit status 2, nothing
half-written. Any other exception is a bug: one line and exit status 1, the
traceback with the global `--debug` flag.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import __version__
from .errors import ConfigError, RwkvqError
from .evaluate import DEFAULT_CHUNK_CHARS
from .validate import MAX_MEAN_KL, MIN_TOP1, SAME_ATOL, SAME_RTOL


TOKENIZER_HELP = ("'bytes', 'world', a tokenizer.json path, or auto (default): by vocab size, 256 -> bytes, "
                  "65536 -> world")


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MiB"


def cmd_export(args: argparse.Namespace) -> None:
    from .checkpoint import load_checkpoint
    from .export import check_export_paths, export

    check_export_paths(args.checkpoint, args.output, args.mode, args.wkv_op)
    t0 = time.perf_counter()
    config, sd = load_checkpoint(args.checkpoint)
    print(f"loaded {args.checkpoint}: RWKV {config.version}, {config.n_layer} layers x {config.n_embd}, "
          f"{config.n_head} heads x {config.head_size}, vocab {config.vocab_size}, {config.n_params / 1e6:.2f}M params")
    for path in export(config, sd, args.output, mode=args.mode, fp16=args.fp16, wkv_op=args.wkv_op):
        print(f"wrote {path} ({_size(path)})")
    print(f"export took {time.perf_counter() - t0:.1f} s")


def cmd_eval(args: argparse.Namespace) -> None:
    from .atomic import write_text
    from .evaluate import evaluate_lambada, evaluate_text, format_perplexity, read_documents, results_json
    from .export import step_path
    from .paths import check_distinct, model_files
    from .runtime import RwkvSession
    from .tokenizers import get_tokenizer

    if not args.text and not args.lambada:
        raise ConfigError("eval needs --text FILE and/or --lambada FILE")
    if args.chunk_len < 0 or (args.chunk_every is not None and args.chunk_every < 1):
        raise ConfigError("--chunk-len must be >= 0 and --chunk-every >= 1")
    if args.json:
        from .atomic import check_writable

        check_writable(args.json)
        check_distinct([*model_files(args.model), *model_files(step_path(args.model)), args.text, args.lambada],
                       [args.json])
    # read the data first: a bad file is reported before the model is loaded and run
    text_docs = (read_documents(args.text, args.chunk_len or None, args.chunk_every)[: args.max_docs]
                 if args.text else None)
    lambada_docs = read_documents(args.lambada)[: args.max_docs] if args.lambada else None
    session = RwkvSession(args.model, threads=args.threads, kernels=args.kernels)
    tokenizer = get_tokenizer(args.tokenizer, session.config.vocab_size)
    text = lambada = None
    chunking = {"chunk_len": args.chunk_len or None, "chunk_every": args.chunk_every}
    if text_docs is not None:
        if args.text.suffix != ".jsonl" and args.chunk_len:
            every = f" every {args.chunk_every}" if args.chunk_every else ""
            print(f"text {args.text}: {len(text_docs)} chunk(s) of {args.chunk_len} characters{every}, each from "
                  f"the zero state (--chunk-len 0: the whole file as one document)")
        text = evaluate_text(session, tokenizer, text_docs)
        print(f"text {args.text}: {text.documents} docs, {text.tokens} tokens, perplexity "
              f"{format_perplexity(text.perplexity)}, bits-per-byte {text.bits_per_byte:.4f}")
    if lambada_docs is not None:
        lambada = evaluate_lambada(session, tokenizer, lambada_docs)
        print(f"lambada {args.lambada}: {lambada.examples} examples, perplexity "
              f"{format_perplexity(lambada.perplexity)}, accuracy {lambada.accuracy:.4f}")
    if args.json:
        write_text(args.json, results_json(args.model, text, lambada, tokenizer=tokenizer.name,
                                           text_chunking=chunking if args.text else None) + "\n")
        print(f"wrote {args.json}")


def cmd_generate(args: argparse.Namespace) -> None:
    from .generate import generate
    from .runtime import RwkvSession
    from .tokenizers import get_tokenizer

    session = RwkvSession(args.model, threads=args.threads, kernels=args.kernels)
    tokenizer = get_tokenizer(args.tokenizer, session.config.vocab_size)
    result = generate(session, tokenizer, args.prompt, args.max_tokens, greedy=args.greedy,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    print(args.prompt + result.text)
    print(result.speed_line())


def cmd_quantize(args: argparse.Namespace) -> None:
    from .quantize import QuantizeOptions, quantize_model

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
    print(f"bpw {t['bpw']:.4f} stored, {t['bpw_paper']:.4f} as the paper counts{target}")
    print(f"stored {t['quantized_weights_stored_bits_per_weight']:.3f} bits/weight in the graph "
          f"({t['quantized_weights_ratio_to_fp16']:.3f} x fp16); embedding+head "
          f"{t['embedding_and_head_bytes'] / 2**20:.1f} MiB; {result.report['seconds']:.1f} s")
    if args.report:
        print(f"wrote {args.report}")


def cmd_build_engine(args: argparse.Namespace) -> None:
    from .paths import check_distinct, model_files
    from .tensorrt_build import build_engine

    check_distinct(model_files(args.model), [args.output, Path(f"{args.output}.json")])
    sidecar = build_engine(args.model, args.output, fp16=args.fp16, max_batch=args.max_batch, max_seq=args.max_seq,
                           workspace_mib=args.workspace, timing_cache=args.timing_cache, serving=args.serving)
    plugins = ", ".join(f"{n} {op}" for op, n in sidecar["plugins"].items()) or "none"
    print(f"wrote {args.output} and {args.output}.json (TensorRT {sidecar['tensorrt']}; plugins: {plugins}; "
          f"timing cache {sidecar['timing_cache']})")


def cmd_triton_repo(args: argparse.Namespace) -> None:
    from .triton import triton_repo

    folder = triton_repo(args.model, args.output, name=args.name, kind=args.kind, instances=args.instances,
                         max_batch=args.max_batch, log=print)
    print(f"wrote {folder}/config.pbtxt and {folder}/1/ (serve with: tritonserver --model-repository {args.output})")


def cmd_validate(args: argparse.Namespace) -> int:
    from .demo import sample_text
    from .runtime import RwkvSession
    from .tokenizers import get_tokenizer
    from .validate import (AGREEMENT, AUTO, agreement_lines, choose_mode, compare_agreement, model_info,
                           same_weights_lines, validate)

    info_a, info_b = model_info(args.a), model_info(args.b)
    for path in (args.a, args.b):  # a graph that is not what its metadata says is refused here
        if path.suffix != ".plan":
            RwkvSession(path, use_step_graph=False, kernels="exact")
    mode = choose_mode(info_a, info_b) if args.mode == AUTO else args.mode
    why = "forced by --mode" if args.mode != AUTO else (
        "the models are quantized differently (rwkvq.quantization metadata)" if mode == AGREEMENT
        else "both models carry the same weights (same rwkvq.quantization metadata)")
    prompt = sample_text() if args.prompt is None else args.prompt
    tokens = get_tokenizer(args.tokenizer, info_a.config.vocab_size).encode(prompt)[: args.tokens]
    print(f"validate {args.a} (a) vs {args.b} (b): mode {mode}, {why}; {len(tokens)} prompt tokens")
    if mode == AGREEMENT:
        res = compare_agreement(args.a, args.b, tokens, max_mean_kl=args.max_kl, min_top1=args.min_top1)
        lines = agreement_lines(res)
    else:
        res = validate(args.a, args.b, tokens, args.atol, args.rtol, args.stat, args.state_atol, args.state_rtol)
        lines = same_weights_lines(res, args.stat)
    print("\n".join(lines))
    return 0 if res.passed else 1


def cmd_report(args: argparse.Namespace) -> None:
    from .paths import check_distinct
    from .report import build_report_html

    check_distinct([args.report], [args.output])
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
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of an unexpected error instead of its one-line summary "
                        "(default: off; put it before the command)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    e = sub.add_parser("export", help="checkpoint (.pth/.safetensors) -> ONNX",
                       description="Export an official RWKV-6 (x060) or RWKV-7 (x070) checkpoint to ONNX. "
                                   "The config is inferred from the checkpoint's keys and shapes.")
    e.add_argument("checkpoint", type=Path, help="BlinkDL .pth or .safetensors checkpoint (fp32/fp16/bf16)")
    e.add_argument("-o", "--output", type=Path, required=True, help="output .onnx path")
    e.add_argument("--fp16", action="store_true",
                   help="fp16 weights and matmuls (state, norms, decays and the WKV recurrence stay fp32); "
                        "default: fp32")
    e.add_argument("--mode", choices=("sequence", "step", "both"), default="sequence",
                   help="sequence: tokens [B,T], the recurrence run over T (default; also decodes with T=1); "
                        "step: loop-free one-token graph for TensorRT; both: OUT.onnx and OUT.step.onnx")
    e.add_argument("--wkv-op", choices=("fused", "standard"), default="fused",
                   help="RWKV-7's recurrence: fused (default) = one rwkvq.WKV7Step node per layer in the step "
                        "graph and one rwkvq.WKV7Sequence node per layer in the sequence graph, run by this "
                        "package's native onnxruntime op library (build-engine and --lower-vq lower them); "
                        "standard = standard ONNX ops only (a Scan over T in the sequence graph), for plain "
                        "onnxruntime or other runtimes. RWKV-6 always uses standard ops")
    e.set_defaults(func=cmd_export)

    def model_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("model", type=Path, help="exported .onnx (its .step.onnx sibling is used for decoding)")
        q.add_argument("--tokenizer", default="auto",
                       help=TOKENIZER_HELP)
        q.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
        q.add_argument("--kernels", choices=("fast", "exact"), default="fast",
                       help="numerics of the native rwkvq ops: fast (int8 activations per block of 32, or of "
                            "gcd(group size, 128) for SQMatMul; float accumulation; the default) or exact (float "
                            "activations, as the reference)")

    v = sub.add_parser("eval", help="perplexity / bits-per-byte / LAMBADA accuracy",
                       description="Evaluate an exported model: perplexity and bits-per-byte on a text or jsonl "
                                   "file, LAMBADA last-word perplexity and greedy accuracy.")
    model_args(v)
    v.add_argument("--text", type=Path,
                   help="plain text (cut into chunks, see --chunk-len) or jsonl ({\"text\": ...} per line, one "
                        "document each); default: none")
    v.add_argument("--lambada", type=Path,
                   help="LAMBADA jsonl ({\"text\": ...} per line; target = last word); default: none")
    v.add_argument("--json", type=Path, help="also write the results to this JSON file (default: print only)")
    v.add_argument("--max-docs", type=int, default=None,
                   help="evaluate only the first N documents / chunks / examples (default: all)")
    v.add_argument("--chunk-len", type=int, default=DEFAULT_CHUNK_CHARS,
                   help=f"cut a plain text file into chunks of this many characters, each run from the zero "
                        f"state (default {DEFAULT_CHUNK_CHARS}; 0: the whole file as one document); jsonl "
                        f"documents are never cut")
    v.add_argument("--chunk-every", type=int, default=None,
                   help="start a chunk every N characters, skipping the text between chunks (default: back to "
                        "back, the last shorter chunk included)")
    v.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="generate text; prints prefill and decode tokens/s",
                       description="Prefill the prompt with the sequence graph, decode with the step graph.")
    model_args(g)
    g.add_argument("--prompt", required=True, help="text to continue (required; no default)")
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate after the prompt (default 64)")
    g.add_argument("--greedy", action="store_true",
                   help="always take the most likely token (default: sample with --temperature and --top-p)")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="divide logits by this before sampling; lower is more conservative (default 1.0)")
    g.add_argument("--top-p", type=float, default=0.9,
                   help="sample only from the most likely tokens whose probabilities sum to this (default 0.9)")
    g.add_argument("--seed", type=int, default=0, help="random seed of the sampler (default 0)")
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
    q.add_argument("--bpw-accounting", choices=("stored", "paper"), default="stored",
                   help="how --bpw counts: 'stored' the bits the payload holds (fp16 scale + 3-bit zero point per "
                        "scalar group), 'paper' 32 bits of scale+zero per scalar group (the paper's 3.25 for 3-bit "
                        "groups of 128); VQ costs the same in both (default: stored)")
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
    q.add_argument("--sq-format", choices=("sqmatmul", "qdq", "matmulnbits"), default="sqmatmul",
                   help="scalar weights as rwkvq.SQMatMul (2/3/4-bit codes packed at their width, so the bytes "
                        "stored are the bpw reported; native CPU kernels; build-engine and --lower-vq turn it into "
                        "the qdq form), DequantizeLinear+MatMul on int4 containers, or com.microsoft.MatMulNBits "
                        "(4-bit containers); weights it cannot take (K or the group size not a multiple of 32, "
                        "8 bits) fall back to qdq (default: sqmatmul)")
    q.add_argument("--lower-vq", action="store_true",
                   help="rewrite rwkvq ops into standard ONNX ops (default: off)")
    q.add_argument("--embedding-bits", type=int, choices=(8,), default=None,
                   help="store the embedding as int8 rows with one scale each (default: full precision)")
    q.add_argument("--head-bits", type=int, choices=(4, 8), default=None,
                   help="store the head round to nearest in groups of 64 (default: full precision): 4 bits as "
                        "rwkvq.SQMatMul with --sq-format sqmatmul (one copy shared by the sequence and step "
                        "sessions), else and for 8 bits as MatMulNBits; at 0.1B the embedding and head are over "
                        "half the parameters")
    q.add_argument("--head-accuracy-level", type=int, choices=(0, 4), default=4,
                   help="MatMulNBits accuracy_level of a MatMulNBits head: 4 (default) quantizes its input to int8 per "
                        "block, onnxruntime's fast CPU path; 0 computes in float (several times slower)")
    q.add_argument("--elementwise-weighting", choices=("activations", "none"), default="activations",
                   help="element-wise codebooks fit weighted by the mean squared activation each entry multiplies, "
                        "or unweighted at the same bits (an ablation) (default: activations)")
    q.add_argument("--rotate-lora", action="store_true",
                   help="fold a seeded Hadamard rotation into RWKV-7's linear-only LoRA pairs (a1/a2, v1/v2) "
                        "before calibration; same fp function, flatter weights (default: off)")
    q.add_argument("--tokenizer", default="auto",
                   help=TOKENIZER_HELP)
    q.add_argument("--report", type=Path, help="write the per-tensor JSON report here (default: none)")
    q.set_defaults(func=cmd_quantize)

    b = sub.add_parser("build-engine", help="TensorRT engine (.plan) with the rwkvq plugins (needs a GPU)",
                       description="Validate and prepare the graph for TensorRT (plugins, explicit fp16/int8 types "
                                   "at their boundary), print the optimization profile, build and serialize the "
                                   "engine, and write OUT.plan.json. The network is strongly typed: precision is "
                                   "the graph's. Without TensorRT or a GPU it stops with one line after "
                                   "validating everything it can.")
    b.add_argument("model", type=Path, help="step graph (recommended) or sequence graph")
    b.add_argument("-o", "--output", type=Path, required=True, help="engine .plan")
    b.add_argument("--fp16", action="store_true",
                   help="insist on an fp16 engine: accepted only for graphs exported with --fp16, since a "
                        "strongly typed network takes its precision from the graph (default: off)")
    b.add_argument("--max-batch", type=int, default=1,
                   help="largest batch in the optimization profile; the VQ plugin serves at most 8 rows "
                        "(batch, or batch x tokens for a sequence graph) (default: 1)")
    b.add_argument("--max-seq", type=int, default=128, help="longest T for a sequence graph (default: 128)")
    b.add_argument("--workspace", type=int, default=4096, help="builder workspace in MiB (default: 4096)")
    b.add_argument("--timing-cache", type=Path, default=None,
                   help="TensorRT timing cache, read if present and updated after the build "
                        "(default: OUT.timing-cache beside the engine)")
    b.add_argument("--serving", action="store_true",
                   help="make the state batch-first ([B, L, ...]) for Triton's sequence batcher, so triton-repo "
                        "can batch concurrent sequences; step graphs only (default: off, the export's layout)")
    b.set_defaults(func=cmd_build_engine)

    t = sub.add_parser("triton-repo", help="Triton model repository (implicit state, sequence batcher)",
                       description="Write REPO/NAME/config.pbtxt (checked with Triton's own schema) and the model, "
                                   "atomically. ONNX models: the step graph with batch-first state, served by the "
                                   "onnxruntime backend with the native rwkvq op library copied beside it.")
    t.add_argument("model", type=Path, help="engine .plan (with its .plan.json) or .onnx")
    t.add_argument("-o", "--output", type=Path, required=True, help="model repository folder")
    t.add_argument("--name", default="rwkv",
                   help="model name: one path component of letters, digits, '_', '-', '.' (default: rwkv)")
    t.add_argument("--kind", choices=("KIND_GPU", "KIND_CPU"), default=None,
                   help="instance kind (default: GPU for .plan, CPU for .onnx)")
    t.add_argument("--instances", type=int, default=1, help="model instances Triton runs (default: 1)")
    t.add_argument("--max-batch", type=int, default=8,
                   help="max_batch_size: sequences batched together by the sequence batcher (oldest strategy) "
                        "for ONNX models; engines use the max batch they were built with (default: 8)")
    t.set_defaults(func=cmd_triton_repo)

    v2 = sub.add_parser(
        "validate", help="check model b against model a (same weights: tolerances; fp vs quantized: agreement)",
        description="Run both models on a prompt and check b against a; exit 0 when it passes, 1 when it fails, "
                    "2 on bad input. Two questions, chosen from the models' rwkvq.quantization metadata: SAME "
                    "weights (a graph and its lowering, an ONNX model and its TensorRT .plan): every output within "
                    "tolerance on the same inputs, through Polygraphy's Comparator; AGREEMENT (fp vs quantized, "
                    "or two different quantizations): each model runs the prompt on its own state, and b passes "
                    "when mean KL(a||b) per token and top-1 agreement are within limits; the table also shows "
                    "max KL, the logit error relative to the logit range and the state's relative error.")
    v2.add_argument("a", type=Path, help="reference model (.onnx)")
    v2.add_argument("b", type=Path, help="model to check (.onnx, or a TensorRT .plan with its .plan.json)")
    v2.add_argument("--mode", choices=("auto", "same", "agreement"), default="auto",
                    help="auto (default): agreement when exactly one model is quantized or the two are quantized "
                         "differently, same otherwise; same / agreement force the question")
    v2.add_argument("--prompt", default=None,
                    help="text fed to both models (default: the built-in English sample text)")
    v2.add_argument("--tokens", type=int, default=128,
                    help="feed at most this many tokens of the prompt (default 128)")
    v2.add_argument("--atol", type=float, default=SAME_ATOL,
                    help=f"same weights: absolute tolerance on logits (default {SAME_ATOL:g}, the README's fp32 "
                         "numerics bound)")
    v2.add_argument("--rtol", type=float, default=SAME_RTOL,
                    help=f"same weights: relative tolerance on logits (default {SAME_RTOL:g}); an output passes "
                         "within atol or within rtol")
    v2.add_argument("--state-atol", type=float, default=None,
                    help="same weights: absolute tolerance on the new_state_* outputs (default: --atol)")
    v2.add_argument("--state-rtol", type=float, default=None,
                    help="same weights: relative tolerance on the new_state_* outputs (default: --rtol)")
    v2.add_argument("--stat", choices=("max", "mean", "median"), default="max",
                    help="same weights: error statistic checked against the tolerances (default max)")
    v2.add_argument("--max-kl", type=float, default=MAX_MEAN_KL,
                    help=f"agreement: largest mean KL(a||b) per token, in nats, that passes (default {MAX_MEAN_KL:g})")
    v2.add_argument("--min-top1", type=float, default=MIN_TOP1,
                    help=f"agreement: smallest share of tokens whose most likely next token agrees that passes "
                         f"(default {MIN_TOP1:g})")
    v2.add_argument("--tokenizer", default="auto",
                    help=TOKENIZER_HELP)
    v2.set_defaults(func=cmd_validate)

    r = sub.add_parser("report", help="HTML page: proxies vs thresholds, SQ/VQ map, histograms, errors",
                       description="Render the JSON report of `quantize --report` as one self-contained HTML page.")
    r.add_argument("report", type=Path, help="JSON written by quantize --report")
    r.add_argument("-o", "--output", type=Path, required=True, help="report .html")
    r.add_argument("--histograms", type=int, default=2,
                   help="weight histograms shown per side: the N most and the N least uniform weights by the "
                        "coarse proxy (default 2)")
    r.set_defaults(func=cmd_report)

    d = sub.add_parser("demo", help="end to end on a built-in synthetic RWKV-7 (no download)",
                       description="Create a seeded RWKV-7, export it, check it against the reference model, "
                                   "evaluate it, generate from it, then quantize it with RWKVQuant and evaluate "
                                   "the quantized model.")
    d.add_argument("--out", default="rwkvq-demo", help="folder for the demo's files (default: ./rwkvq-demo)")
    d.add_argument("--layers", type=int, default=4, help="layers of the synthetic model (default 4)")
    d.add_argument("--embd", type=int, default=128,
                   help="embedding width of the synthetic model, a multiple of 64 (default 128)")
    d.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights (default 0)")
    d.set_defaults(func=cmd_demo)
    return p


def _summary(exc: BaseException) -> str:
    """`Type: first line of the message` of an exception."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


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
    except Exception as exc:  # a bug, not the user's input: one line here, the traceback with --debug
        if args.debug:
            raise
        print(f"rwkvq-onnx {args.command}: internal error: {_summary(exc)} (run again with --debug for the "
              f"traceback and report it)", file=sys.stderr)
        return 1
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
