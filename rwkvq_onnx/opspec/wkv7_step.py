"""`rwkvq.WKV7Step(state, r, w, k, v, a, b) -> (y, new_state)`: one token of the RWKV-7 WKV recurrence.

    state      float32 [B, H, N, N]   per head, indexed [value i, key j] (the official layout)
    r, w, k, v, a, b   float32 [B, C]   C = H * N, per-token vectors, head h at [h*N, (h+1)*N)
    y          float32 [B, C]
    new_state  float32 [B, H, N, N]

For every batch row and head, with S = state[b, h]:

    S'[i, j] = S[i, j] * w[j] + (sum_l S[i, l] * a[l]) * b[j] + v[i] * k[j]
    y[i]     = sum_j S'[i, j] * r[j]

which is the official `S <- S diag(w) + (S a) b^T + v k^T ; y = S r` with
a = -kk and b = kk * iclr. Attribute: head_size (INT) = N.

Optional attribute `layer` (INT): the state input is then every layer's
state, float32 [L, B, H, N, N], and the op reads state[layer] (0 <= layer < L);
new_state is still that layer's [B, H, N, N]. The step graph passes its
`state_wkv` input to every layer's node this way: without it, a Split copies
each layer's state out of the input on every decoded token
(passes/layer_indexed_wkv_state.py).

One node per layer replaces the dozen standard nodes of the recurrence in the
step graph export writes for onnxruntime (`export --wkv-op fused`, the
default); `lower` gives the standard-op form for runtimes without the
native library (TensorRT, plain onnxruntime). The kernels: plugins/wkv7_kernels.c
(with its 64-bit shape checks) and its onnxruntime registration in plugins/ort_ops.c.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from rwkvq_onnx.names import DOMAIN, OPSET_VERSION  # noqa: F401  (part of the spec: <op>.OPSET_VERSION)

from .checks import expect_dtype, fail, int_attr

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

OP_TYPE = "WKV7Step"
QUALIFIED = f"{DOMAIN}.{OP_TYPE}"
ATTRIBUTES = ("head_size", "layer")  # INT; INT, optional
INPUTS = ("state", "r", "w", "k", "v", "a", "b")
OUTPUTS = ("y", "new_state")
INPUT_DTYPES = (np.dtype(np.float32),) * len(INPUTS)
OUTPUT_DTYPE = np.dtype(np.float32)
MAX_HEAD_SIZE = 1024  # plugins/rwkvq_wkv7.h RWKVQ_WKV7_MAX_HEAD (RWKV-7 models use 64)


@dataclass(frozen=True)
class Attributes:
    """A checked attribute set (build it with `validate`)."""

    head_size: int
    layer: int | None = None  # the state is [L, B, H, N, N], read at [layer]

    def as_dict(self) -> dict[str, Any]:
        return {"head_size": self.head_size, **({"layer": self.layer} if self.layer is not None else {})}


def static_shape(value: Any) -> tuple[int, ...] | None:
    """A value's shape when every dimension is a known int, else None (graph tensors with dynamic batch)."""
    shape = getattr(value, "shape", None)
    if shape is None or any(not isinstance(d, (int, np.integer)) for d in shape):
        return None
    return tuple(int(d) for d in shape)


def checked_inputs(attrs: Mapping[str, Any], inputs: tuple, named: Mapping[str, Any], *, node: str,
                   op: str, allowed: tuple[str, ...] = ATTRIBUTES
                   ) -> tuple[Attributes, list[tuple[str, tuple[int, ...] | None]]]:
    """What validation of the recurrence ops (this one and WKV7Sequence, same inputs; `allowed`: the op's
    attribute names) shares: attribute names, the input count, head_size (and layer), float32 inputs, the state
    [B, H, N, N] ([L, B, H, N, N] with layer < L when `layer` is given); the checked Attributes and each given
    input's (name, static shape or None), in INPUTS order; the state's shape is that of the layer read.

    Inputs come positionally, either all seven or the six after the state (the passes' convention: the
    inputs after the first), or by name (r=..., as the TensorRT preparation passes them)."""
    unknown = sorted(set(attrs) - set(allowed))
    if unknown:
        raise fail(node, op, f"unknown attribute(s) {', '.join(unknown)}")
    if len(inputs) > len(INPUTS) or set(named) - set(INPUTS):
        raise fail(node, op, f"{len(inputs) + len(named)} inputs given, the op has {len(INPUTS)}")
    a = Attributes(int_attr(attrs, "head_size", 1, MAX_HEAD_SIZE + 1, node=node, op=op),
                   int_attr(attrs, "layer", 0, 2**31, node=node, op=op) if "layer" in attrs else None)
    given = dict(zip(INPUTS if len(inputs) == len(INPUTS) else INPUTS[1:], inputs)) | dict(named)
    N, shapes = a.head_size, []
    for name in INPUTS:
        if given.get(name) is None:
            continue
        expect_dtype(given[name], np.float32, name, node=node, op=op)
        shape = static_shape(given[name])
        if name == "state" and shape is not None and a.layer is not None:
            if len(shape) != 5 or a.layer >= shape[0]:
                raise fail(node, op, f"input state has shape {list(shape)}, expected [L, B, H, {N}, {N}] with "
                                     f"L > layer={a.layer}")
            shape = shape[1:]
        if name == "state" and shape is not None and (len(shape) != 4 or shape[1] < 1 or shape[2:] != (N, N)):
            raise fail(node, op, f"input state has shape {list(shape)}, expected [B, H, {N}, {N}]")
        shapes.append((name, shape))
    return a, shapes


def validate(attrs: Mapping[str, Any], *inputs: Any, node: str, **named: Any) -> Attributes:
    """Check the attributes and whichever inputs are given (anything with .shape and .dtype, or None; shapes
    are checked where static): the state [B, H, N, N], every vector [B, H*N] (see `checked_inputs` for how
    inputs are given). Returns the checked Attributes; raises a one-line ConfigError naming `node` for the
    first problem.
    """
    a, shapes = checked_inputs(attrs, inputs, named, node=node, op=QUALIFIED)
    N = a.head_size
    channels = None
    for name, shape in shapes:
        if shape is None:
            continue
        if name == "state":  # its shape checked by checked_inputs
            channels = shape[1] * N
        elif len(shape) != 2 or shape[1] % N or (channels is not None and shape[1] != channels):
            raise fail(node, QUALIFIED, f"input {name} has shape {list(shape)}, expected [B, H*{N}]")
    return a


def reference(state: np.ndarray, r: np.ndarray, w: np.ndarray, k: np.ndarray, v: np.ndarray, a: np.ndarray,
              b: np.ndarray, **attrs: Any) -> tuple[np.ndarray, np.ndarray]:
    """The numpy reference of the op (float64 inside, float32 out): (y [B, C], new_state [B, H, N, N])."""
    checked = validate(attrs, state, r, w, k, v, a, b, node="reference")
    state = np.asarray(state if checked.layer is None else np.asarray(state)[checked.layer], np.float64)
    B, H, N, _ = state.shape
    r, w, k, v, a, b = (np.asarray(t, np.float64).reshape(B, H, N) for t in (r, w, k, v, a, b))
    assert N == checked.head_size
    sa = np.einsum("bhij,bhj->bhi", state, a)
    new = state * w[:, :, None, :] + sa[..., None] * b[:, :, None, :] + v[..., None] * k[:, :, None, :]
    y = np.einsum("bhij,bhj->bhi", new, r)
    return y.reshape(B, H * N).astype(np.float32), new.astype(np.float32)


def lower(node: gs.Node, prefix: str) -> list[gs.Node]:
    """Standard ONNX nodes computing what `node` computes (they take over its outputs), tensors named `prefix`_*.

    The vectors are reshaped to per-head rows [B, H, 1, N] or columns [B, H, N, 1] and the update is
    Add(Add(Mul(S, w), MatMul(MatMul(S, a), b)), MatMul(v, k)); y = Reshape(MatMul(S', r), [B, C]); with
    `layer`, S = Gather(state, layer) along the layers first.
    """
    import onnx_graphsurgeon as gs

    attrs = validate(node.attrs, node=node.name)
    N = attrs.head_size
    state, r, w, k, v, a, b = node.inputs
    y_out, s_out = node.outputs
    nodes: list[gs.Node] = []

    def var(hint: str) -> gs.Variable:
        return gs.Variable(f"{prefix}_{hint}", dtype=np.float32)

    def add(op: str, hint: str, inputs: list, outputs: list | None = None) -> gs.Variable:
        outs = outputs if outputs is not None else [var(hint)]
        nodes.append(gs.Node(op, f"{prefix}_{hint}", {}, inputs, outs))
        return outs[0]

    if attrs.layer is not None:
        index = gs.Constant(f"{prefix}_layer", np.array(attrs.layer, np.int64))
        state = add("Gather", "layer_state", [state, index])
    col = gs.Constant(f"{prefix}_col_shape", np.array([0, -1, N, 1], np.int64))
    row = gs.Constant(f"{prefix}_row_shape", np.array([0, -1, 1, N], np.int64))
    flat = gs.Constant(f"{prefix}_flat_shape", np.array([0, -1], np.int64))
    r_c, v_c, a_c = (add("Reshape", f"{n}_col", [t, col]) for n, t in (("r", r), ("v", v), ("a", a)))
    w_r, k_r, b_r = (add("Reshape", f"{n}_row", [t, row]) for n, t in (("w", w), ("k", k), ("b", b)))
    decayed = add("Mul", "decayed", [state, w_r])
    removal = add("MatMul", "removal", [add("MatMul", "sa", [state, a_c]), b_r])
    s_new = add("Add", "new_state", [add("Add", "kept", [decayed, removal]), add("MatMul", "vk", [v_c, k_r])],
                [s_out])
    add("Reshape", "y", [add("MatMul", "y_col", [s_new, r_c]), flat], [y_out])
    return nodes
