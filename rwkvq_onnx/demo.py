"""The README's first command: the whole pipeline on a built-in synthetic RWKV-7."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np


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
    from .tokenizers import ByteTokenizer

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

    gen = generate(session, tokenizer, "Hello", 32, greedy=True)
    print(f"[5/6] generate: {gen.text!r}")
    print(f"      {gen.speed_line()}")

    from .quantize import QuantizeOptions, quantize_model

    calib = out / "calib.txt"
    calib.write_text(sample_text() * 4)
    q_path = out / "synthetic-rwkv7.q.onnx"
    result = quantize_model(onnx_path, q_path, QuantizeOptions(bpw=3.275, calib=str(calib), nsamples=8, seqlen=128,
                                                               progress=False), out / "quantize-report.json",
                            log=lambda *a: None)
    q_session = RwkvSession(q_path)
    q_text = evaluate_text(q_session, tokenizer, [sample_text()], progress=False)
    totals = result.report["totals"]
    print(f"[6/6] quantized with RWKVQuant to {totals['bpw']:.3f} bpw ({totals['methods']}), "
          f"{totals['quantized_weights_ratio_to_fp16']:.3f} x the fp16 bytes: bits-per-byte "
          f"{q_text.bits_per_byte:.3f} (fp32 {text.bits_per_byte:.3f}); report {out / 'quantize-report.json'}")
    return {"max_abs_error": err, "bits_per_byte": text.bits_per_byte, "decode_tokens_per_s": gen.decode_tokens_per_s,
            "quantized_bits_per_byte": q_text.bits_per_byte}
