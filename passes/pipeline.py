"""The lowering pipeline: one explicit, ordered tuple of graph passes run over every graph of a model.

`lower_payloads(graphs, payloads, options)` is the one entry point that writes
quantized payloads (`rwkvq_onnx.quant.formats.Payloads`) into ONNX graphs:
the sequence graph and, when there is one, the step graph. Both must receive
the same rewrites; a graph whose pass counts differ from the first graph's is
an error (the two graphs would then run different models).
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from rwkvq_onnx.errors import ConfigError
from rwkvq_onnx.quant.formats import Payloads

from .base import PassResult
from .cleanup import Cleanup
from .lower_vq import LowerVQ
from .quantize_embedding_head import QuantizeEmbeddingHead
from .rewrite_elementwise import RewriteElementwise
from .rewrite_scalar import RewriteScalar
from .rewrite_vector import RewriteVector


@dataclass(frozen=True)
class LoweringOptions:
    """How payloads are stored in the graph (not what they are)."""

    sq_format: str = "qdq"  # qdq | matmulnbits
    fold_elementwise: bool = False
    lower_vq: bool = False
    embedding_bits: int | None = None
    head_bits: int | None = None
    head_accuracy_level: int = 4


def lowering_passes(options: LoweringOptions) -> tuple:
    """The ordered passes for `options` (each `pass(model, payloads) -> PassResult`)."""
    passes = [RewriteScalar(options.sq_format), RewriteVector(), RewriteElementwise(fold=options.fold_elementwise)]
    if options.embedding_bits or options.head_bits:
        passes.append(QuantizeEmbeddingHead(options.embedding_bits, options.head_bits, options.head_accuracy_level))
    if options.lower_vq:
        passes.append(LowerVQ())
    passes.append(Cleanup())
    return tuple(passes)


def lower_payloads(graphs: list[onnx.ModelProto], payloads: Payloads, options: LoweringOptions,
                   log=None) -> list[PassResult]:
    """Run the pipeline over every graph (in place); return the first graph's results.

    Raises ConfigError when a later graph's rewrite counts differ from the first graph's.
    """
    first: list[PassResult] = []
    for i, graph in enumerate(graphs):
        results = [p(graph, payloads) for p in lowering_passes(options)]
        if i == 0:
            first = results
            if log:
                for r in results:
                    log(r.line())
            continue
        for a, b in zip(first, results):
            if a.name != "cleanup" and a.counts != b.counts:
                raise ConfigError(f"graph {i} got different rewrites from the sequence graph in pass {a.name}: "
                                  f"{b.counts} vs {a.counts}")
    return first
