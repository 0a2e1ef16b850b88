"""The lowering pipeline: one explicit, ordered tuple of graph passes run over every graph of a model.

`lower_payloads(graphs, payloads, options)` is the one entry point that writes
quantized payloads (`rwkvq_onnx.quant.formats.Payloads`) into ONNX graphs:
the sequence graph and, when there is one, the step graph. Each graph is
imported into onnx-graphsurgeon once, every pass runs on it in order, and it
is exported back in place. Both graphs must receive the same rewrites; a
graph whose rewrite counts differ from the first graph's is an error (the two
graphs would then run different models).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx

from rwkvq_onnx.errors import ConfigError
from rwkvq_onnx.opspec import wkv7_sequence, wkv7_step
from rwkvq_onnx.quant.formats import Payloads

from .base import GraphPass, PassResult, export_into, import_graph, is_needed
from .cleanup import Cleanup
from .lower_vq import LowerVQ
from .quantize_embedding_head import QuantizeEmbeddingHead
from .rewrite_elementwise import RewriteElementwise
from .rewrite_scalar import RewriteScalar
from .rewrite_vector import RewriteVector


@dataclass(frozen=True)
class LoweringOptions:
    """How payloads are stored in the graph (not what they are)."""

    sq_format: str = "sqmatmul"  # sqmatmul | qdq | matmulnbits
    fold_elementwise: bool = False
    lower_vq: bool = False
    embedding_bits: int | None = None
    head_bits: int | None = None
    head_accuracy_level: int = 4
    check: bool = True  # shape inference + ONNX checker on every lowered graph


def lowering_passes(options: LoweringOptions) -> tuple[GraphPass, ...]:
    """The passes, in the order they run, configured by `options`."""
    return (RewriteScalar(options.sq_format),
            RewriteVector(),
            RewriteElementwise(fold=options.fold_elementwise),
            QuantizeEmbeddingHead(options.embedding_bits, options.head_bits, options.head_accuracy_level,
                                  head_format="sqmatmul" if options.sq_format == "sqmatmul" else "matmulnbits"),
            LowerVQ(enabled=options.lower_vq),
            Cleanup(check=options.check))


def run_passes(model: onnx.ModelProto, passes: tuple[GraphPass, ...], payloads: Payloads) -> list[PassResult]:
    """Run `passes` in order over one model (in place): one import, one export, then each pass's checks."""
    graph = import_graph(model)
    results = [p.run(graph, payloads) if is_needed(p, payloads) else PassResult(p.name) for p in passes]
    export_into(graph, model, {d: v for p in passes for d, v in p.domains.items()})
    for p in passes:
        p.after_export(model)
    return results


# rwkvq ops export puts in one graph of the pair (WKV7Sequence in the sequence graph, WKV7Step in the step graph),
# not quantize: their lowering counts differ between the graphs by design
EXPORT_OPS = (wkv7_step.OP_TYPE, wkv7_sequence.OP_TYPE)


def _model_rewrites(result: PassResult) -> dict[str, int]:
    """A pass's counts that must agree between the graphs: all but the lowering of the recurrence ops each graph
    holds of its own (rwkvq.WKV7Sequence in the sequence graph, rwkvq.WKV7Step in the step graph)."""
    return {k: v for k, v in result.counts.items() if k not in EXPORT_OPS}


def lower_payloads(graphs: list[onnx.ModelProto], payloads: Payloads, options: LoweringOptions,
                   log: Callable[[str], None] | None = None) -> list[PassResult]:
    """Run the pipeline over every graph (in place); return the first graph's results.

    Raises ConfigError when a later graph's rewrite counts differ from the first graph's (cleanup's counts
    may differ: the graphs hold different glue).
    """
    passes = lowering_passes(options)
    first: list[PassResult] = []
    for i, graph in enumerate(graphs):
        results = run_passes(graph, passes, payloads)
        if i == 0:
            first = results
            for r in results if log else ():
                log(r.line())
            continue
        for a, b in zip(first, results):
            if a.name != Cleanup.name and _model_rewrites(a) != _model_rewrites(b):
                raise ConfigError(f"graph {i} got different rewrites from the sequence graph in pass {a.name}: "
                                  f"{b.line()} vs {a.line()}")
    return first
