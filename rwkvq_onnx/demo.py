"""The README's first command: the whole pipeline on a built-in synthetic RWKV-7."""
from __future__ import annotations

from dataclasses import replace

from importlib import resources
from pathlib import Path

import numpy as np

from .report import methods_text
from .tokenizers import ByteTokenizer

# the demo model (4 x 128) has 54 linear weights: it lands within 0.005 below 3.3 bpw, not below 3.275
DEMO_BPW = 3.3
NEXT_COMMANDS = (
    "rwkvq-onnx export RWKV-x070-World-0.1B.pth -o fp.onnx --mode both",
    "rwkvq-onnx quantize fp.onnx -o q.onnx --bpw 3.275 --calib calib.txt --report q.json",
)


def readable_text(data: bytes) -> str:
    """Bytes as one printable line: UTF-8 where it decodes, `\\xNN` for other bytes and control characters,
    `\\\\` for a backslash (so an escape is never ambiguous).

    An untrained byte-level model emits arbitrary bytes; printed raw they garble the terminal.
    """
    def show(c: str) -> str:
        if 0xDC80 <= ord(c) <= 0xDCFF:  # an undecodable byte, smuggled through by surrogateescape
            return f"\\x{ord(c) - 0xDC00:02x}"
        if c == "\\":
            return "\\\\"
        return c if c.isprintable() else (f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}")

    return "".join(show(c) for c in data.decode("utf-8", errors="surrogateescape"))


class ReadableByteTokenizer(ByteTokenizer):
    """The byte tokenizer, decoding to `readable_text` (for printing what an untrained model generates)."""

    def decode(self, tokens: list[int]) -> str:
        return readable_text(bytes(t & 0xFF for t in tokens))


def sample_text() -> str:
    """A short built-in English text (the demo's evaluation data)."""
    return resources.files("rwkvq_onnx").joinpath("data/sample.txt").read_text(encoding="utf-8")


def run_demo(out: Path, n_layer: int = 4, n_embd: int = 128, seed: int = 0) -> dict:
    """export -> check -> eval -> generate -> quantize -> eval -> generate; prints each step, returns the numbers."""
    # Imported here: `sample_text` is also used by `validate`, which must not pay for torch.
    from .checkpoint import load_checkpoint, save_checkpoint
    from .evaluate import evaluate_text
    from .export import export
    from .generate import generate
    from .reference import RwkvReference
    from .runtime import RwkvSession
    from .synthetic import synthetic_rwkv7, synthetic_rwkv7_config

    out.mkdir(parents=True, exist_ok=True)
    config = synthetic_rwkv7_config(n_layer, n_embd, vocab_size=256)
    ckpt = out / "synthetic-rwkv7.pth"
    save_checkpoint(synthetic_rwkv7(config, seed), ckpt)
    print(f"[1/6] created {ckpt}: seeded RWKV-7, {n_layer} x {n_embd}, byte vocab, {config.n_params / 1e6:.2f}M params")

    config, sd = load_checkpoint(ckpt)
    onnx_path = out / "synthetic-rwkv7.onnx"
    paths = export(config, sd, onnx_path, mode="both")
    print(f"[2/6] exported {', '.join(str(p) for p in paths)}")

    session = RwkvSession(onnx_path)
    tokens = np.frombuffer(b"The state of a recurrent model", np.uint8).astype(np.int64)[None]
    ref_logits, _ = RwkvReference(config, sd).forward(tokens)
    onnx_logits, _ = session.forward(tokens)
    err = float(np.abs(onnx_logits - ref_logits.numpy()).max())
    print(f"[3/6] onnxruntime vs PyTorch reference: max |logit difference| {err:.2e} over {tokens.shape[1]} tokens")

    tokenizer = ByteTokenizer()
    text = evaluate_text(session, tokenizer, [sample_text()], progress=False)
    print(f"[4/6] eval on built-in text: {text.tokens} tokens, perplexity {text.perplexity:.2f}, "
          f"bits-per-byte {text.bits_per_byte:.3f} (untrained weights: about 8 is chance)")

    gen = generate(session, ReadableByteTokenizer(), "Hello", 32, greedy=True)
    print(f'[5/6] generate, greedy, 32 bytes after "Hello": "{gen.text}"')
    print("      (the weights are random, so this is noise; bytes that are not printable UTF-8 are shown as \\xNN)")
    print(f"      {gen.speed_line()}")

    from .errors import BudgetError
    from .quantize import QuantizeOptions, quantize_model

    calib = out / "calib.txt"
    calib.write_text(sample_text() * 4)
    q_path = out / "synthetic-rwkv7.q.onnx"
    opts = QuantizeOptions(bpw=DEMO_BPW, calib=str(calib), nsamples=8, seqlen=128, progress=True)
    print(f"[6/6] quantizing with RWKVQuant to {opts.bpw} bpw (calibration: {opts.nsamples} windows x "
          f"{opts.seqlen} tokens; about a minute on two busy cores)...", flush=True)
    log = lambda line: print(f"      {line}", flush=True)  # noqa: E731
    try:
        result = quantize_model(onnx_path, q_path, opts, out / "quantize-report.json", log=log)
    except BudgetError as exc:  # a model this small has too few weights to land within 0.005 of the target
        print(f"      {exc}\n      -> too few weights to land on {opts.bpw} bpw: using the paper's thresholds "
              f"(tau_c {opts.tau_c}, tau_f {opts.tau_f}) instead", flush=True)
        opts = replace(opts, bpw=None)
        result = quantize_model(onnx_path, q_path, opts, out / "quantize-report.json", log=log)
    q_session = RwkvSession(q_path)
    q_text = evaluate_text(q_session, tokenizer, [sample_text()], progress=False)
    totals = result.report["totals"]
    print(f"[6/6] quantized with RWKVQuant to {totals['bpw']:.3f} bpw ({methods_text(totals['methods'])}), "
          f"{totals['quantized_weights_ratio_to_fp16']:.3f} x the fp16 bytes: bits-per-byte "
          f"{q_text.bits_per_byte:.3f} (fp32 {text.bits_per_byte:.3f}); report {out / 'quantize-report.json'}")
    print("\nNext, on a real checkpoint (e.g. RWKV-x070-World-0.1B from https://huggingface.co/BlinkDL/rwkv-7-world)"
          " and a calibration text of your own:")
    for command in NEXT_COMMANDS:
        print(f"  {command}")
    return {"max_abs_error": err, "bits_per_byte": text.bits_per_byte, "decode_tokens_per_s": gen.decode_tokens_per_s,
            "quantized_bits_per_byte": q_text.bits_per_byte}
