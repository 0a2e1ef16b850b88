"""Perplexity / bits-per-byte on text and LAMBADA accuracy, as the RWKV project evaluates.

Language modelling: each document (a jsonl line's "text", or chunks of a
plain text file) is run from the zero state; every token after the first is
predicted (after a BOS token, when the tokenizer has one, every token is).
bits-per-byte = total negative log-likelihood in bits / UTF-8 bytes predicted.

LAMBADA: the context is the passage up to its last space, the target is
' ' + last word; perplexity of the target tokens and accuracy of greedy
prediction of all of them (RWKV's run_lambada.py convention, BOS 0 first for
tokenizers that have it).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from .errors import CalibrationError
from .paths import require_file
from .runtime import RwkvSession
from .tokenizers import Tokenizer

MAX_CHUNK = 512  # tokens per forward call; state carries across calls
# `eval --text` cuts a plain text file into back-to-back chunks of this many characters by default: one
# document per chunk keeps memory flat and the progress bar moving (a whole book as one document held
# 1.3 GB and showed 0/1 for minutes), and matches how RWKV evaluations run text from the zero state.
DEFAULT_CHUNK_CHARS = 4096


def read_documents(path: str | Path, chunk_len: int | None = None, chunk_every: int | None = None) -> list[str]:
    """Documents of a `.jsonl` ({"text": ...} per line) or plain text file.

    A plain text file is one document unless `chunk_len` is given: then it is
    cut into chunks of `chunk_len` characters starting every `chunk_every`
    characters (default: back to back).
    """
    path = require_file(path, "file", CalibrationError)
    raw = decode_text(path.read_bytes(), path)
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationError(f"line {n} is not JSON ({exc.msg})", path) from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise CalibrationError(f'line {n} has no "text" string field', path)
            docs.append(obj["text"])
    elif chunk_len:
        step = chunk_every or chunk_len
        docs = [raw[i:i + chunk_len] for i in range(0, len(raw) - chunk_len + 1, step)]
        if step == chunk_len and len(raw) % chunk_len:  # back to back: the tail is text too
            docs.append(raw[len(raw) - len(raw) % chunk_len:])
    else:
        docs = [raw]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CalibrationError("holds no text", path)
    return docs


def decode_text(data: bytes, path: str | Path) -> str:
    """UTF-8 text of a data file; a binary or otherwise non-UTF-8 file is refused before any work on it."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise CalibrationError(f"binary file (NUL byte at offset {nul}), not UTF-8 text or jsonl", path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"not UTF-8 text (invalid byte at offset {exc.start}); pass UTF-8 text or jsonl",
                               path) from None


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def sequence_logits(session: RwkvSession, tokens: list[int]) -> np.ndarray:
    """Logits [T, V] for a token list, fed in chunks with the state carried over."""
    return np.concatenate(list(_logit_pieces(session, tokens)), axis=0)


def _logit_pieces(session: RwkvSession, tokens: list[int]) -> Iterable[np.ndarray]:
    """Logits [t, V] of consecutive pieces of at most MAX_CHUNK tokens, the state carried across pieces."""
    state = None
    for i in range(0, len(tokens), MAX_CHUNK):
        logits, state = session.forward(np.asarray([tokens[i:i + MAX_CHUNK]]), state)
        yield logits[0]


def format_perplexity(value: float) -> str:
    """Perplexity for people: 3 decimals while readable, scientific notation from 100000 on."""
    return f"{value:.4e}" if value >= 1e5 else f"{value:.3f}"


@dataclass
class TextResult:
    documents: int
    tokens: int
    bytes: int
    nll_nats: float
    perplexity: float
    bits_per_byte: float


def encode_documents(tokenizer: Tokenizer, docs: Iterable[str]) -> list[tuple[list[int], int]]:
    """(tokens, bytes scored) per document, as bits-per-byte counts them: with a BOS token every byte is
    predicted; without one the first token is context only, so its bytes are not scored. Documents under two
    tokens are dropped; none left is an error."""
    encoded = []
    for doc in docs:
        toks = tokenizer.encode(doc)
        if tokenizer.bos is not None:
            toks, skip_bytes = [tokenizer.bos] + toks, 0
        else:
            skip_bytes = len(tokenizer.decode(toks[:1]).encode("utf-8"))
        if len(toks) >= 2:
            encoded.append((toks, len(doc.encode("utf-8")) - skip_bytes))
    if not encoded:
        raise CalibrationError("no document is long enough to evaluate (need 2 tokens)")
    return encoded


def evaluate_text(session: RwkvSession, tokenizer: Tokenizer, docs: Iterable[str],
                  progress: bool = True) -> TextResult:
    """Perplexity and bits-per-byte over documents, each from the zero state.

    Progress counts predicted tokens (with tqdm's rate and time left); memory holds one piece of
    MAX_CHUNK tokens' logits at a time, however long a document is.
    """
    encoded = encode_documents(tokenizer, docs)
    nll, n_tok, n_bytes = 0.0, 0, 0
    with tqdm(total=sum(len(t) - 1 for t, _ in encoded), desc=f"eval text ({len(encoded)} docs)", unit="tok",
              unit_scale=True, disable=None if progress else True) as bar:
        for toks, doc_bytes in encoded:
            start = 0
            for logits in _logit_pieces(session, toks[:-1]):
                logp = _log_softmax(logits)
                target = np.asarray(toks[start + 1:start + 1 + len(logp)])
                nll -= float(logp[np.arange(len(target)), target].sum())
                start += len(logp)
                bar.update(len(logp))
            n_tok += len(toks) - 1
            n_bytes += doc_bytes
    return TextResult(len(encoded), n_tok, n_bytes, nll, math.exp(nll / n_tok),
                      nll / math.log(2) / max(n_bytes, 1))


@dataclass
class LambadaResult:
    examples: int
    perplexity: float
    accuracy: float


def evaluate_lambada(session: RwkvSession, tokenizer: Tokenizer, docs: Iterable[str],
                     progress: bool = True) -> LambadaResult:
    """LAMBADA last-word perplexity and greedy accuracy."""
    total_logp, correct, n = 0.0, 0, 0
    for doc in tqdm(list(docs), desc="lambada", unit="ex", disable=None if progress else True):
        if " " not in doc.strip():
            continue
        context, word = doc.strip().rsplit(" ", 1)
        src = ([tokenizer.bos] if tokenizer.bos is not None else []) + tokenizer.encode(context)
        dst = tokenizer.encode(" " + word)
        if not src or not dst:
            continue
        logp = _log_softmax(sequence_logits(session, src + dst[:-1]))[len(src) - 1:]
        total_logp += float(logp[np.arange(len(dst)), dst].sum())
        correct += int(all(int(np.argmax(logp[i])) == t for i, t in enumerate(dst)))
        n += 1
    if n == 0:
        raise CalibrationError("no usable LAMBADA example (each needs a context and a last word)")
    return LambadaResult(n, math.exp(-total_logp / n), correct / n)


def results_json(model: str | Path, text: TextResult | None, lambada: LambadaResult | None, **extra) -> str:
    """The eval report as stable, diffable JSON."""
    return json.dumps({
        "model": str(model),
        **extra,
        "text": asdict(text) if text else None,
        "lambada": asdict(lambada) if lambada else None,
    }, indent=2, sort_keys=True)
