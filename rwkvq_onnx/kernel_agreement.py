"""Fast vs exact kernels on one model: how much the int8-activation decode path moves the model's predictions.

The native ops' "fast" numerics (activations quantized to int8 per block of
32) must keep the model's quality: on the reference model, bits-per-byte on
`linuxdoc-val` within `MAX_DELTA_BPB` of the exact path and mean
KL(exact || fast) per token at most `MAX_MEAN_KL` nats (issue 13). Both
sessions run the same file on the same documents; the exact one plays the
reference of `paired_eval`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .evaluate import read_documents
from .paired_eval import paired_scores, reference_run, score_documents
from .runtime import RwkvSession
from .tokenizers import Tokenizer

MAX_DELTA_BPB = 0.002
MAX_MEAN_KL = 1e-3  # nats per token
# the linuxdoc chunks the quality table scores (tools/quality_table.py's defaults)
CHUNK_LEN, CHUNK_EVERY, MAX_DOCS = 384, 8000, 24


@dataclass(frozen=True)
class KernelAgreement:
    """bits-per-byte of both paths and the per-token KL(exact || fast) over the same documents."""

    documents: int
    tokens: int
    exact_bpb: float
    fast_bpb: float
    mean_kl: float
    top1: float

    @property
    def delta_bpb(self) -> float:
        return self.fast_bpb - self.exact_bpb

    @property
    def ok(self) -> bool:
        return abs(self.delta_bpb) <= MAX_DELTA_BPB and self.mean_kl <= MAX_MEAN_KL

    def as_dict(self) -> dict:
        return {**asdict(self), "delta_bpb": self.delta_bpb, "ok": self.ok}

    def line(self) -> str:
        """One line for a report: the two figures and their bounds."""
        return (f"fast vs exact kernels: |Δbpb| {abs(self.delta_bpb):.5f} (<= {MAX_DELTA_BPB}), mean KL(exact || "
                f"fast) {self.mean_kl:.2e} nats/token (<= {MAX_MEAN_KL:g}), top-1 agreement {self.top1:.4f}; "
                f"{self.documents} docs, {self.tokens} tokens: {'ok' if self.ok else 'OUT OF BOUNDS'}")


def linuxdoc_documents(path: str | Path, max_docs: int = MAX_DOCS) -> list[str]:
    """The linuxdoc chunks the quality table scores."""
    return read_documents(path, CHUNK_LEN, CHUNK_EVERY)[:max_docs]


def kernel_agreement(model: str | Path, tokenizer: Tokenizer, docs: list[str],
                     threads: int | None = None) -> KernelAgreement:
    """Score `model` with kernels="fast" against itself with kernels="exact" on `docs`, token by token through
    the step graph (what decoding runs: the fast VQ GEMV only runs there; the sequence graph's prefill GEMMs are
    fast for SQMatMul only)."""
    from .graph_io import step_path

    documents = score_documents(tokenizer, docs)
    step = step_path(model) if step_path(model).is_file() else Path(model)
    exact = reference_run(RwkvSession(step, threads=threads, kernels="exact"), documents)
    scores = paired_scores(exact, RwkvSession(step, threads=threads, kernels="fast"))
    return KernelAgreement(int(scores.bytes.size), int(scores.tokens.sum()), scores.fp_bits_per_byte,
                           scores.q_bits_per_byte, scores.mean_kl, scores.top1)


REFERENCE = ("fixtures", "ref-rwkv7-L4-D256.pth")
CALIB = ("data", "linuxdoc-calib.txt")
VALIDATION = ("data", "linuxdoc-val.txt")


def faithful_options(calib: str | Path, nsamples: int = 16):
    """Quantize options of the faithful RWKVQuant mix at 3.275 bpw: scalar groups packed as rwkvq.SQMatMul, the
    paper's bit accounting, element-wise vectors folded, as tools/bench.py's rwkvquant-faithful."""
    from .quantize import QuantizeOptions

    return QuantizeOptions(method="rwkvquant", bpw=3.275, bpw_accounting="paper", sq_format="sqmatmul",
                           fold_elementwise=True, calib=str(calib), nsamples=nsamples, seqlen=256, seed=0,
                           progress=False)


def faithful_reference(shared: str | Path, workdir: str | Path, log=print) -> Path | str:
    """The reference model exported and quantized with `faithful_options` into `workdir` (made once); a
    sentence saying why not when `shared` lacks the fixture or the data."""
    from .checkpoint import load_checkpoint
    from .export import export
    from .quantize import quantize_model

    shared, workdir = Path(shared), Path(workdir)
    needed = [shared.joinpath(*p) for p in (REFERENCE, CALIB, VALIDATION)]
    absent = [str(p) for p in needed if not p.is_file()]
    if absent:
        return f"absent: {', '.join(absent)}"
    opts = faithful_options(needed[1])
    out = workdir / f"ref-faithful-{opts.sq_format}-{opts.bpw_accounting}.onnx"
    if not out.is_file():
        fp = workdir / "ref-fp32.onnx"
        if not fp.is_file():
            config, sd = load_checkpoint(needed[0])
            export(config, sd, fp, mode="both")
        log(f"quantizing {out} ...")
        quantize_model(fp, out, opts, out.with_suffix(".json"), log=lambda *a: None)
    return out
