"""`rwkvq.WKV7Sequence(state, r, w, k, v, a, b) -> (y, new_state)`: T tokens of the RWKV-7 WKV recurrence.

    state      float32 [B, H, N, N]   per head, indexed [value i, key j] (the official layout)
    r, w, k, v, a, b   float32 [B, T, C]   C = H * N, per-token vectors, head h at [h*N, (h+1)*N)
    y          float32 [B, T, C]
    new_state  float32 [B, H, N, N]   the state after token T-1 (the input state when T = 0)

Token t is `rwkvq.WKV7Step` (opspec/wkv7_step.py) on the state after token t-1 with the vectors of token t;
the state stays float32 between tokens, as it does when the step graph decodes token by token. Attribute:
head_size (INT) = N.

One node per layer replaces the sequence graph's per-layer `Scan` (a dozen small ops per token) in the graph
export writes for onnxruntime (`export --wkv-op fused`, the default); `lower` gives that Scan back for runtimes
without the native library (TensorRT, plain onnxruntime), built by the export's own Scan builder
(`rwkvq_onnx.export.wkv7_scan`), so `--wkv-op standard` and the lowering are one graph. The kernel:
plugins/wkv7_kernels.c `rwkvq_wkv7_sequence` (the step kernel's per-head code run over T, with its 64-bit shape
checks) and its onnxruntime registration in plugins/ort_ops.c (one piece per batch row and head).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from rwkvq_onnx.names import DOMAIN, OPSET_VERSION  # noqa: F401  (part of the spec: <op>.OPSET_VERSION)

from . import wkv7_step
from .checks import fail

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

OP_TYPE = "WKV7Sequence"
QUALIFIED = f"{DOMAIN}.{OP_TYPE}"
ATTRIBUTES = ("head_size",)  # INT (not WKV7Step's `layer`: a sequence graph runs its Split once per call)
INPUTS = wkv7_step.INPUTS
OUTPUTS = wkv7_step.OUTPUTS
INPUT_DTYPES = wkv7_step.INPUT_DTYPES
OUTPUT_DTYPE = wkv7_step.OUTPUT_DTYPE
MAX_HEAD_SIZE = wkv7_step.MAX_HEAD_SIZE  # plugins/rwkvq_wkv7.h RWKVQ_WKV7_MAX_HEAD
Attributes = wkv7_step.Attributes


def validate(attrs: Mapping[str, Any], *inputs: Any, node: str, **named: Any) -> Attributes:
    """Check the attributes and whichever inputs are given (anything with .shape and .dtype, or None; shapes
    are checked where static): the state [B, H, N, N], every vector [B, T, H*N] with one B and one T.

    Inputs come positionally, either all seven or the six after the state (the passes' convention), or by
    name. Returns the checked Attributes; raises a one-line ConfigError naming `node` for the first problem.
    """
    a, shapes = wkv7_step.checked_inputs(attrs, inputs, named, node=node, op=QUALIFIED, allowed=ATTRIBUTES)
    N = a.head_size
    batch = channels = tokens = None
    for name, shape in shapes:
        if shape is None:
            continue
        if name == "state":  # its shape checked by wkv7_step.checked_inputs
            batch, channels = shape[0], shape[1] * N
            continue
        if (len(shape) != 3 or shape[2] % N or shape[2] < 1 or (channels is not None and shape[2] != channels)
                or (batch is not None and shape[0] != batch) or (tokens is not None and shape[1] != tokens)):
            raise fail(node, QUALIFIED, f"input {name} has shape {list(shape)}, expected [B, T, H*{N}] "
                                        f"with the state's B and H and one T")
        batch, tokens, channels = shape
    return a


def reference(state: np.ndarray, r: np.ndarray, w: np.ndarray, k: np.ndarray, v: np.ndarray, a: np.ndarray,
              b: np.ndarray, **attrs: Any) -> tuple[np.ndarray, np.ndarray]:
    """The numpy reference: `wkv7_step.reference` over the T tokens in order (float64 inside each step, the
    state float32 between steps as in the kernel and in step-by-step decoding): (y [B, T, C], new_state)."""
    checked = validate(attrs, state, r, w, k, v, a, b, node="reference")
    vectors = [np.asarray(t, np.float32) for t in (r, w, k, v, a, b)]
    B, T, C = vectors[0].shape
    s = np.asarray(state, np.float32)
    y = np.zeros((B, T, C), np.float32)
    for t in range(T):
        y[:, t], s = wkv7_step.reference(s, *(x[:, t] for x in vectors), head_size=checked.head_size)
    return y, s.copy()


def lower(node: gs.Node, prefix: str) -> list[gs.Node]:
    """Standard ONNX nodes computing what `node` computes (they take over its outputs), tensors named `prefix`_*:
    the vectors reshaped into the Scan's per-head columns [B, T, H, N, 1] (r, v, and kk = -a) and rows
    [B, T, H, 1, N] (w, k, b), the export's Scan of the recurrence, and y reshaped to [B, T, C]."""
    import onnx
    import onnx_graphsurgeon as gs

    from rwkvq_onnx.export import wkv7_scan

    N = validate(node.attrs, node=node.name).head_size
    state, r, w, k, v, a, b = node.inputs
    y_out, s_out = node.outputs
    nodes: list[gs.Node] = []

    def add(op: str, hint: str, inputs: list, outputs: list | None = None, **attrs: Any) -> gs.Variable:
        dtype = np.int64 if op in ("Shape", "Slice", "Concat") or hint == "channels" else np.float32
        outs = outputs if outputs is not None else [gs.Variable(f"{prefix}_{hint}", dtype=dtype)]
        nodes.append(gs.Node(op, f"{prefix}_{hint}", attrs, inputs, outs))
        return outs[0]

    # H in the reshapes (Reshape cannot infer a -1 of an empty batch or sequence): a constant when the state's shape
    # states it (exported graphs do), else read from the state at run time
    shape = getattr(state, "shape", None)
    heads = int(shape[1]) if shape is not None and len(shape) == 4 and isinstance(shape[1], (int, np.integer)) \
        else None

    def const(hint: str, values: list[int]) -> gs.Constant:
        return gs.Constant(f"{prefix}_{hint}", np.array(values, np.int64))

    if heads is not None:
        col, row = const("col_shape", [0, 0, heads, N, 1]), const("row_shape", [0, 0, heads, 1, N])
        flat = const("flat_shape", [0, 0, heads * N])
    else:
        h = add("Slice", "heads", [add("Shape", "state_shape", [state]), const("one", [1]), const("two", [2])])
        lead = const("lead", [0, 0])
        col = add("Concat", "col_shape", [lead, h, const("col_tail", [N, 1])], axis=0)
        row = add("Concat", "row_shape", [lead, h, const("row_tail", [1, N])], axis=0)
        flat = add("Concat", "flat_shape", [lead, add("Mul", "channels", [h, const("n", [N])])], axis=0)
    r_c, v_c = (add("Reshape", f"{n}_col", [t, col]) for n, t in (("r", r), ("v", v)))
    kk_c = add("Neg", "kk_col", [add("Reshape", "a_col", [a, col])])  # -(-kk) is kk exactly
    w_r, k_r, b_r = (add("Reshape", f"{n}_row", [t, row]) for n, t in (("w", w), ("k", k), ("b", b)))
    body, attrs = wkv7_scan(f"{prefix}_scan", "heads" if heads is None else heads, N)
    body_graph = gs.import_onnx(onnx.helper.make_model(body, opset_imports=[onnx.helper.make_opsetid("", 21)]))
    y_col = gs.Variable(f"{prefix}_y_col", dtype=np.float32)
    nodes.append(gs.Node("Scan", f"{prefix}_scan", {"body": body_graph, **attrs},
                         [state, r_c, w_r, k_r, v_c, kk_c, b_r], [s_out, y_col]))
    add("Reshape", "y", [y_col, flat], [y_out])
    return nodes
