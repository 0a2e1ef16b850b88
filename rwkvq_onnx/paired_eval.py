"""Paired evaluation: the fp model and a quantized model on the same documents, compared document by document.

The quality table needs more than two corpus-level bits-per-byte figures: a
difference of a few tenths of a percent means something only next to its
spread over documents, and the quantized model should follow the fp model's
whole next-token distribution, not only the target token's probability. So
the fp model is run once (`reference_run`, which keeps its log-probabilities
per document) and each quantized model is scored against it (`paired_scores`):
per-document bits and bytes for both models, per-document sums of
KL(fp || q) and of top-1 agreement (from `agreement.py`), and a paired
bootstrap over documents for the bits-per-byte difference.

Conventions are `evaluate.evaluate_text`'s: each document from the zero state,
every token after the first predicted (all of them after a BOS when the
tokenizer has one), bytes counted without the first token's when there is no
BOS. The reference keeps [tokens, vocab] float32 log-probabilities per
document in memory: fine for the byte-vocabulary models of the table (100
LAMBADA passages are ~35 MB), not meant for a 65536-token vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from .agreement import PairedInterval, agreement, log_softmax, paired_bootstrap
from .evaluate import encode_documents, sequence_logits
from .runtime import RwkvSession
from .tokenizers import Tokenizer


@dataclass(frozen=True)
class ScoredDocument:
    """What one document asks of a model: the input tokens, the targets, and the bytes they stand for."""

    inputs: np.ndarray  # int64 [T]
    targets: np.ndarray  # int64 [T]
    bytes: int


def score_documents(tokenizer: Tokenizer, docs: Iterable[str]) -> list[ScoredDocument]:
    """Tokenize documents the way `evaluate_text` does; documents under two tokens are dropped."""
    return [ScoredDocument(np.asarray(toks[:-1], np.int64), np.asarray(toks[1:], np.int64), n_bytes)
            for toks, n_bytes in encode_documents(tokenizer, docs)]


def _nll_bits(logp: np.ndarray, targets: np.ndarray) -> float:
    return float(-logp[np.arange(len(targets)), targets].sum() / math.log(2))


@dataclass
class ReferenceRun:
    """The fp model's log-probabilities on every document, kept to score quantized models against."""

    documents: list[ScoredDocument]
    logprobs: list[np.ndarray]  # float32 [T, V] per document
    bits: np.ndarray  # fp negative log-likelihood in bits per document

    @property
    def bytes(self) -> np.ndarray:
        return np.asarray([d.bytes for d in self.documents], np.float64)

    def save(self, path: str | Path) -> None:
        """Write the run as one .npz (for worker processes that score quantized models in parallel)."""
        lengths = np.asarray([len(d.inputs) for d in self.documents], np.int64)
        np.savez(path, lengths=lengths, bytes=np.asarray([d.bytes for d in self.documents], np.int64),
                 inputs=np.concatenate([d.inputs for d in self.documents]),
                 targets=np.concatenate([d.targets for d in self.documents]),
                 logprobs=np.concatenate(self.logprobs), bits=self.bits)

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceRun":
        z = np.load(path)
        cuts = np.cumsum(z["lengths"])[:-1]
        inputs, targets, logprobs = (np.split(z[k], cuts) for k in ("inputs", "targets", "logprobs"))
        docs = [ScoredDocument(i, t, int(b)) for i, t, b in zip(inputs, targets, z["bytes"])]
        return cls(docs, list(logprobs), z["bits"])


def reference_run(session: RwkvSession, documents: list[ScoredDocument]) -> ReferenceRun:
    """Run the fp model over the documents and keep its log-probabilities."""
    logprobs, bits = [], []
    for d in documents:
        lp = log_softmax(sequence_logits(session, d.inputs.tolist()))
        logprobs.append(lp.astype(np.float32))
        bits.append(_nll_bits(lp, d.targets))  # from float64, exactly as a scored model's bits
    return ReferenceRun(documents, logprobs, np.asarray(bits))


@dataclass
class PairedScores:
    """Per-document figures of the fp model and a quantized model on the same documents."""

    fp_bits: np.ndarray
    q_bits: np.ndarray
    bytes: np.ndarray
    tokens: np.ndarray
    kl_nats: np.ndarray  # sum over the document's positions of KL(fp || q)
    top1_hits: np.ndarray  # positions where the two models' most likely next token agree

    @property
    def fp_bits_per_byte(self) -> float:
        return float(self.fp_bits.sum() / self.bytes.sum())

    @property
    def q_bits_per_byte(self) -> float:
        return float(self.q_bits.sum() / self.bytes.sum())

    @property
    def mean_kl(self) -> float:
        """Mean KL(fp || q) per predicted token, in nats."""
        return float(self.kl_nats.sum() / self.tokens.sum())

    @property
    def top1(self) -> float:
        """Share of predicted positions where fp and q agree on the most likely token."""
        return float(self.top1_hits.sum() / self.tokens.sum())

    def delta(self, *, rounds: int = 2000, seed: int = 0) -> PairedInterval:
        """q - fp bits-per-byte with a paired-bootstrap 95% interval over documents (byte-weighted)."""
        return paired_bootstrap(self.fp_bits / self.bytes, self.q_bits / self.bytes, self.bytes,
                                rounds=rounds, seed=seed)

    def relative_delta(self, *, rounds: int = 2000, seed: int = 0) -> PairedInterval:
        """The same interval as a fraction of the fp model's bits-per-byte."""
        d, base = self.delta(rounds=rounds, seed=seed), self.fp_bits_per_byte
        return PairedInterval(d.mean / base, d.low / base, d.high / base, d.level, d.documents)

    def as_dict(self) -> dict:
        return {"documents": int(self.bytes.size), "tokens": int(self.tokens.sum()), "bytes": int(self.bytes.sum()),
                "fp_bits_per_byte": self.fp_bits_per_byte, "bits_per_byte": self.q_bits_per_byte,
                "delta": self.delta().as_dict(), "relative_delta": self.relative_delta().as_dict(),
                "mean_kl": self.mean_kl, "top1": self.top1}


def paired_scores(reference: ReferenceRun, session: RwkvSession) -> PairedScores:
    """Score a (quantized) model against the fp reference on the reference's documents."""
    q_bits, kl, hits, tokens = [], [], [], []
    for d, fp_lp in zip(reference.documents, reference.logprobs):
        q_logits = sequence_logits(session, d.inputs.tolist())
        q_bits.append(_nll_bits(log_softmax(q_logits), d.targets))
        ag = agreement(fp_lp, q_logits)
        kl.append(ag.mean_kl * ag.tokens)
        hits.append(round(ag.top1 * ag.tokens))
        tokens.append(ag.tokens)
    return PairedScores(reference.bits, np.asarray(q_bits), reference.bytes, np.asarray(tokens, np.float64),
                        np.asarray(kl), np.asarray(hits, np.float64))
