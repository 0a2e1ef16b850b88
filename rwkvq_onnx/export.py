"""Export an RWKV-6/7 checkpoint to ONNX: a sequence graph and a loop-free step graph.

Graph conventions (see the design doc):

- sequence: `tokens` int64 [B, T] + state -> `logits` [B, T, V] + new state
  (an optional `logits_from` int64 [1], default 0, limits the head to
  positions logits_from..T-1: -1 gives [B, 1, V], all generation's prefill needs);
  the WKV recurrence of each layer is one node over T (`rwkvq.WKV7Sequence`
  for RWKV-7 with `wkv_op="fused"`, else a `Scan`).
- step: `token` int64 [B] + state -> `logits` [B, V] + new state; no loops,
  which is what TensorRT and Triton want.
- state: `state_att_shift` [L, B, C], `state_ffn_shift` [L, B, C],
  `state_wkv` [L, B, H, N, N], float32 in every graph; outputs are the same
  names prefixed `new_`.
- the state is read with one `Reshape` + `Split` per state tensor and written
  with one `Concat` + `Reshape` (not a Gather / Unsqueeze per layer), except
  the WKV state of a step graph with fused recurrence nodes: each
  `rwkvq.WKV7Step` reads its layer in `state_wkv` (attribute `layer`) and the
  new states go through Unsqueeze into one Concat
  (passes/layer_indexed_wkv_state.py: two fewer copies of it per token); the
  WKV inputs are reshaped once straight into the row/column layout the
  recurrence's MatMuls take: fewer nodes per decoded token (issue 13).
- every linear layer is one `MatMul` whose weight initializer is named by its
  checkpoint key and stored transposed [K, N]; element-wise vectors keep
  their keys (flattened to [C]).

An RWKV-7 model runs each layer's recurrence as one native node,
`rwkvq.WKV7Step` in the step graph and `rwkvq.WKV7Sequence` in the sequence
graph (`wkv_op="fused"`, the default: what onnxruntime with the package's
native op library runs), or as standard ops (`wkv_op="standard"`: inline in
the step graph, a `Scan` over T in the sequence graph; plain onnxruntime, any
ONNX runtime; TensorRT engines are built from the lowered form of either,
which is the standard form). RWKV-6 graphs are always standard ops.

With `fp16`, weights and activations are float16 while the residual stream,
layer norms, decays and the WKV recurrence stay float32: the recurrence
multiplies the state by decays close to 1 thousands of times, where fp16's
resolution (about 5e-4 near 1) would visibly shorten the model's memory,
and a float32 residual avoids the overflow the official runtime works around
by rescaling.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from . import shared_data
from .atomic import atomic_dir, check_writable
from .checkpoint import ModelConfig
from .errors import CheckpointError, ConfigError
from .graph_io import STATE_NAMES, Dims, check_io, io_shapes, step_path  # noqa: F401 (re-exported)
from .graph_builder import FLOAT, FLOAT16, INT64, OPSET, GraphBuilder, tensor_type
from .names import (CONFIG_KEY, DOMAIN, DTYPE_KEY, EMBEDDING, FP32_SUFFIXES, GRAPH_KEY, HEAD, LOGITS_FROM, OPS_KEY,
                    OPSET_VERSION, PAIR_ID_KEY, is_linear_weight)
from .opspec import wkv7_sequence, wkv7_step
from .paths import check_distinct, require_file

EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes; protobuf's hard limit is 2 GiB
MODES = ("sequence", "step", "both")
WKV_OPS = ("fused", "standard")  # RWKV-7's recurrence: one rwkvq.WKV7Step / WKV7Sequence per layer, or standard ops

@dataclass
class _Ctx:
    g: GraphBuilder
    config: ModelConfig
    sd: Mapping[str, np.ndarray]
    act: int  # FLOAT or FLOAT16
    seq: bool  # sequence graph (leading dims B, T) or step graph (leading dim B)
    fused: bool = False  # RWKV-7: the recurrence as one rwkvq.WKV7Step (step) / WKV7Sequence (sequence) per layer
    value_info: list = field(default_factory=list)  # shapes stated for tensors shape inference cannot tie to B

    @property
    def lead(self) -> list[int]:
        return [0, 0] if self.seq else [0]

    def w(self, key: str) -> str:
        """The initializer for a checkpoint tensor, in the dtype the graph consumes it."""
        arr = np.asarray(self.sd[key], dtype=np.float32)
        if is_linear_weight(key):
            arr = arr.T
        elif arr.ndim == 3 and arr.shape[:2] == (1, 1):
            arr = arr.reshape(-1)
        fp32 = self.act == FLOAT or key.endswith(FP32_SUFFIXES)
        return self.g.initializer(key, arr.astype(np.float32 if fp32 else np.float16))

    def cast(self, x: str, to: int) -> str:
        return self.g.op("Cast", [x], to=to)

    def to_act(self, x: str) -> str:
        return x if self.act == FLOAT else self.cast(x, self.act)

    def to_f32(self, x: str) -> str:
        return x if self.act == FLOAT else self.cast(x, FLOAT)

    def heads(self, x: str) -> str:
        return self.g.op("Reshape", [x, self.g.ints(self.lead + [self.config.n_head, self.config.head_size])])

    def col(self, x: str) -> str:
        """[.., C] -> [.., H, N, 1]: a per-head column vector, as the WKV MatMuls take it."""
        return self.g.op("Reshape", [x, self.g.ints(self.lead + [self.config.n_head, self.config.head_size, 1])])

    def row(self, x: str) -> str:
        """[.., C] (or a per-head column) -> [.., H, 1, N]: a per-head row vector."""
        return self.g.op("Reshape", [x, self.g.ints(self.lead + [self.config.n_head, 1, self.config.head_size])])

    def flat(self, x: str) -> str:
        return self.g.op("Reshape", [x, self.g.ints(self.lead + [self.config.n_embd])])

    def layer_norm(self, x: str, prefix: str) -> str:
        return self.g.op("LayerNormalization", [x, self.w(prefix + ".weight"), self.w(prefix + ".bias")],
                         axis=-1, epsilon=1e-5)

    def group_norm(self, y_heads: str, prefix: str, head_shape: Sequence[int]) -> str:
        """GroupNorm with one group per head, eps 64e-5, as the official ln_x.

        `y_heads` is [.., H, *head_shape] with head_shape the WKV's output row [1, N] or column [N, 1]: the
        LayerNormalization normalizes over those two dims, so the recurrence's output needs no reshape first.
        """
        ones, zeros = self.g.const(np.ones(head_shape)), self.g.const(np.zeros(head_shape))
        y = self.g.op("LayerNormalization", [y_heads, ones, zeros], axis=-len(head_shape), epsilon=64e-5)
        y = self.flat(y)
        return self.g.op("Add", [self.g.op("Mul", [y, self.w(prefix + ".weight")]), self.w(prefix + ".bias")])

    def shift(self, x: str, prev_state: str) -> tuple[str, str]:
        """Token shift from this layer's state slice [B, C]: (previous token's x, x of the last token)."""
        g = self.g
        prev = self.to_act(prev_state)
        if not self.seq:
            return prev, x
        head = g.op("Unsqueeze", [prev, g.ints([1])])
        body = g.op("Slice", [x, g.ints([0]), g.ints([-1]), g.ints([1])])
        shifted = g.op("Concat", [head, body], axis=1)
        last = g.op("Gather", [x, g.const(-1, np.int64)], axis=1)
        return shifted, last

    def mm(self, x: str, key: str) -> str:
        return self.g.op("MatMul", [x, self.w(key)], name=key.replace(".", "_"))

    def mix(self, x: str, delta: str, key: str) -> str:
        return self.g.op("Add", [x, self.g.op("Mul", [delta, self.w(key)])])


def wkv7_body(g: GraphBuilder, s: str, r: str, w: str, k: str, v: str, kk: str, b: str) -> tuple[str, str]:
    """S <- S*w (over keys) - (S kk) b^T + v k^T ; y = S r.  S is [.., H, value, key].

    Inputs come already shaped: r, v, kk columns [.., H, N, 1]; w, k, b rows
    [.., H, 1, N] (so the body has no Unsqueeze). The official `+ (S (-kk)) b^T`
    is written as a subtraction, which is the same float result without a Neg.
    """
    s = g.op("Add", [
        g.op("Sub", [g.op("Mul", [s, w]), g.op("MatMul", [g.op("MatMul", [s, kk]), b])]),
        g.op("MatMul", [v, k]),
    ])
    return s, g.op("MatMul", [s, r])


def _wkv_body_x060(g: GraphBuilder, s: str, r: str, w: str, k: str, v: str, u_bonus: str) -> tuple[str, str]:
    """y = r (u*kv + S) ; S <- kv + w*S.  S is [.., H, key, value]; r, v rows, w, k columns; y a row."""
    kv = g.op("MatMul", [k, v])
    y = g.op("MatMul", [r, g.op("Add", [g.op("Mul", [u_bonus, kv]), s])])
    s = g.op("Add", [kv, g.op("Mul", [w, s])])
    return s, y


def _scan(name: str, body_fn, extra: list[str], shapes: list[list], y_shape: list, heads: int | str,
          head_size: int) -> tuple[onnx.GraphProto, dict]:
    """The recurrence over T as a `Scan`: its body (one token of `body_fn`, tensors named `name`_*) and its
    attributes. Scan inputs: the state [B, H, N, N], then the per-token inputs [B, T, *shape] for `shapes`;
    outputs: the final state and y [B, T, *y_shape]. `extra` are outer-scope tensors the body reads."""
    H, N = heads, head_size
    sub = GraphBuilder(prefix=f"{name}_")
    names = [f"{name}_s_in"] + [f"{name}_in{i}" for i in range(len(shapes))]
    s_out, y_out = body_fn(sub, names[0], *names[1:], *extra)
    sub.op("Identity", [s_out], outputs=[f"{name}_s_out"])
    sub.op("Identity", [y_out], outputs=[f"{name}_y"])
    body = helper.make_graph(
        sub.nodes, f"{name}_body",
        [tensor_type(names[0], FLOAT, ["batch", H, N, N])]
        + [tensor_type(n, FLOAT, ["batch", *d]) for n, d in zip(names[1:], shapes)],
        [tensor_type(f"{name}_s_out", FLOAT, ["batch", H, N, N]),
         tensor_type(f"{name}_y", FLOAT, ["batch", *y_shape])],
        initializer=sub.initializers,
    )
    n = len(shapes)
    return body, {"num_scan_inputs": n, "scan_input_axes": [1] * n, "scan_output_axes": [1]}


def wkv7_scan(name: str, heads: int | str, head_size: int) -> tuple[onnx.GraphProto, dict]:
    """RWKV-7's recurrence over T as a `Scan` (body and attributes, see `_scan`), as `export --wkv-op standard`
    writes it and rwkvq.WKV7Sequence's lowering (opspec/wkv7_sequence.py) builds it: inputs the state, then r,
    w, k, v, kk, b per token, r, v and kk as per-head columns [B, T, H, N, 1], w, k and b as rows
    [B, T, H, 1, N]; y comes out as columns [B, T, H, N, 1]. `heads` may be a dim name when unknown."""
    col, row = [heads, head_size, 1], [heads, 1, head_size]
    return _scan(name, wkv7_body, [], [col, row, row, col, col, row], col, heads, head_size)


def _wkv(c: _Ctx, layer: int, s0: str, inputs: list[str], extra: list[str], shapes: list[list[int]],
         y_shape: list[int]) -> tuple[str, str]:
    """Run the recurrence from this layer's state s0 [B, H, N, N]: inline for one token, a `Scan` over T for a
    sequence. `shapes` are the per-token shapes of `inputs` after the batch dim; `y_shape` that of y."""
    g, H, N = c.g, c.config.n_head, c.config.head_size
    x070 = c.config.version == "x070"
    body_fn = wkv7_body if x070 else _wkv_body_x060
    if not c.seq:
        return body_fn(g, s0, *inputs, *extra)
    name = f"wkv{layer}"
    body, attrs = wkv7_scan(name, H, N) if x070 else _scan(name, body_fn, extra, shapes, y_shape, H, N)
    s, y = g.op("Scan", [s0, *inputs], n_out=2, name=f"wkv_scan_{layer}", body=body, **attrs)
    return s, y


def _time_mix_x070(c: _Ctx, i: int, x: str, state_att: str, state_wkv: str, v_first: str | None):
    """RWKV-7 time mix of layer i from its state slices (att shift [B, C], wkv [B, H, N, N])."""
    g, a = c.g, f"blocks.{i}.att."
    H, N = c.config.n_head, c.config.head_size
    prev, last = c.shift(x, state_att)
    d = g.op("Sub", [prev, x])
    xr, xw, xk, xv, xa, xg = (c.mix(x, d, a + n) for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"))
    r = c.mm(xr, a + "receptance.weight")
    k = c.mm(xk, a + "key.weight")
    v = c.mm(xv, a + "value.weight")
    decay = c.to_f32(c.mm(g.op("Tanh", [c.mm(xw, a + "w1")]), a + "w2"))
    decay = g.op("Exp", [g.op("Mul", [g.op("Sigmoid", [g.op("Add", [c.w(a + "w0"), decay])]), g.const(-0.606531)])])
    iclr = g.op("Sigmoid", [g.op("Add", [c.w(a + "a0"), c.mm(c.mm(xa, a + "a1"), a + "a2")])])
    gate = c.mm(g.op("Sigmoid", [c.mm(xg, a + "g1")]), a + "g2")
    # F.normalize(kk, dim=-1): x / max(|x|, 1e-12); LpNormalization divides by |x| (0 where |x| is 0), which
    # differs only for a head whose |kk| is below 1e-12, i.e. an all-zero head (then both give 0 at b = kk*iclr)
    kk = g.op("LpNormalization", [c.row(c.to_f32(g.op("Mul", [k, c.w(a + "k_k")])))], axis=-1, p=2)
    one = g.const(1.0, np.float16 if c.act == FLOAT16 else np.float32)
    k = g.op("Mul", [k, g.op("Add", [one, g.op("Mul", [g.op("Sub", [iclr, one]), c.w(a + "k_a")])])])
    if i == 0:
        v_first = v
    else:
        mixv = g.op("Sigmoid", [g.op("Add", [c.w(a + "v0"), c.mm(c.mm(xv, a + "v1"), a + "v2")])])
        v = g.op("Add", [v, g.op("Mul", [g.op("Sub", [v_first, v]), mixv])])
    if c.fused:
        kk = c.flat(kk)
        op = wkv7_sequence if c.seq else wkv7_step
        y, s = g.op(op.OP_TYPE, [state_wkv, c.to_f32(r), decay, c.to_f32(k), c.to_f32(v), g.op("Neg", [kk]),
                                 g.op("Mul", [kk, c.to_f32(iclr)])],
                    n_out=2, name=f"blocks_{i}_att_{'wkv7_sequence' if c.seq else 'wkv7_step'}", domain=DOMAIN,
                    head_size=N)
        # a custom op has no shape inference: state its outputs' shapes, or every shape after it is unknown
        lead = ["batch", "tokens"] if c.seq else ["batch"]
        c.value_info += [tensor_type(y, FLOAT, [*lead, H * N]), tensor_type(s, FLOAT, ["batch", H, N, N])]
        y = c.to_act(c.group_norm(c.heads(y), a + "ln_x", [N]))
    else:
        wkv_in = [c.col(c.to_f32(r)), c.row(decay), c.row(c.to_f32(k)), c.col(c.to_f32(v)),
                  c.col(kk), g.op("Mul", [kk, c.row(c.to_f32(iclr))])]
        col, row = [H, N, 1], [H, 1, N]
        s, y = _wkv(c, i, state_wkv, wkv_in, [], [col, row, row, col, col, row], col)
        y = c.to_act(c.group_norm(y, a + "ln_x", col[1:]))
    rk = g.op("Mul", [c.heads(g.op("Mul", [r, k])), c.w(a + "r_k")])
    bonus = c.flat(g.op("Mul", [g.op("ReduceSum", [rk, g.ints([-1])], keepdims=1), c.heads(v)]))
    out = c.mm(g.op("Mul", [g.op("Add", [y, bonus]), gate]), a + "output.weight")
    return out, last, s, v_first


def _time_mix_x060(c: _Ctx, i: int, x: str, state_att: str, state_wkv: str):
    g, a = c.g, f"blocks.{i}.att."
    lm = c.config.lora["maa"]
    H, N = c.config.n_head, c.config.head_size
    prev, last = c.shift(x, state_att)
    d = g.op("Sub", [prev, x])
    xxx = g.op("Tanh", [c.mm(c.mix(x, d, a + "time_maa_x"), a + "time_maa_w1")])
    xxx = g.op("Reshape", [xxx, g.ints(c.lead + [5, 1, lm])])
    m = g.op("Reshape", [c.mm(xxx, a + "time_maa_w2"), g.ints(c.lead + [5, c.config.n_embd])])
    parts = g.op("Split", [m], n_out=5, axis=-2, num_outputs=5)
    mw, mk, mv, mr, mg = (g.op("Squeeze", [p, g.ints([-2])]) for p in parts)
    mixed = {}
    for n, mterm in zip("wkvrg", (mw, mk, mv, mr, mg)):
        mixed[n] = g.op("Add", [x, g.op("Mul", [d, g.op("Add", [c.w(a + "time_maa_" + n), mterm])])])
    r = c.mm(mixed["r"], a + "receptance.weight")
    k = c.mm(mixed["k"], a + "key.weight")
    v = c.mm(mixed["v"], a + "value.weight")
    gate = c.mm(mixed["g"], a + "gate.weight")
    gate = g.op("Mul", [gate, g.op("Sigmoid", [gate])])
    decay = c.to_f32(c.mm(g.op("Tanh", [c.mm(mixed["w"], a + "time_decay_w1")]), a + "time_decay_w2"))
    decay = g.op("Exp", [g.op("Neg", [g.op("Exp", [g.op("Add", [c.w(a + "time_decay"), decay])])])])
    u = g.op("Unsqueeze", [c.w(a + "time_faaaa"), g.ints([-1])])
    wkv_in = [c.row(c.to_f32(r)), c.col(decay), c.col(c.to_f32(k)), c.row(c.to_f32(v))]
    col, row = [H, N, 1], [H, 1, N]
    s, y = _wkv(c, i, state_wkv, wkv_in, [u], [row, col, col, row], row)
    y = c.to_act(c.group_norm(y, a + "ln_x", row[1:]))
    out = c.mm(g.op("Mul", [y, gate]), a + "output.weight")
    return out, last, s


def _channel_mix(c: _Ctx, i: int, x: str, state_ffn: str):
    g, f = c.g, f"blocks.{i}.ffn."
    prev, last = c.shift(x, state_ffn)
    d = g.op("Sub", [prev, x])
    if c.config.version == "x070":
        h = g.op("Relu", [c.mm(c.mix(x, d, f + "x_k"), f + "key.weight")])
        return c.mm(g.op("Mul", [h, h]), f + "value.weight"), last
    h = g.op("Relu", [c.mm(c.mix(x, d, f + "time_maa_k"), f + "key.weight")])
    rec = g.op("Sigmoid", [c.mm(c.mix(x, d, f + "time_maa_r"), f + "receptance.weight")])
    return g.op("Mul", [rec, c.mm(g.op("Mul", [h, h]), f + "value.weight")]), last


def _state_tail(config: ModelConfig, name: str) -> list[int]:
    """A state tensor's dims after [L, B]."""
    H, N = config.n_head, config.head_size
    return [H, N, N] if name == "state_wkv" else [config.n_embd]


def _layer_slices(c: _Ctx, name: str) -> list[str]:
    """State input `name` [L, B, ...] as L per-layer tensors [B, ...]: one Reshape to [L*B, ...] and one Split
    (instead of a Gather per layer)."""
    g, L = c.g, c.config.n_layer
    flat = g.op("Reshape", [name, g.ints([-1] + _state_tail(c.config, name))])
    slices = [flat] if L == 1 else g.op("Split", [flat], n_out=L, name=f"{name}_layers", axis=0, num_outputs=L)
    # each slice is [B, ...]: stated, so that shape inference (and onnxruntime's fusions, e.g. MatMul + Add into
    # Gemm, which need the dims proven equal) sees the graph's one batch dimension, not a new one per slice
    c.value_info += [tensor_type(s, FLOAT, ["batch", *_state_tail(c.config, name)]) for s in slices]
    return slices


def _stack_layers(c: _Ctx, name: str, parts: list[str]) -> None:
    """Per-layer tensors [B, ...] as the output `new_<name>` [L, B, ...]: one Concat along B and one Reshape
    (instead of an Unsqueeze per layer)."""
    g = c.g
    cat = g.op("Concat", parts, axis=0) if len(parts) > 1 else parts[0]
    g.op("Reshape", [cat, g.ints([c.config.n_layer, -1] + _state_tail(c.config, name))], outputs=["new_" + name])


def _value_dims(value: onnx.ValueInfoProto) -> Dims:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value.type.tensor_type.shape.dim]


def check_wkv_op(wkv_op: str) -> None:
    if wkv_op not in WKV_OPS:
        raise ConfigError(f"unknown --wkv-op '{wkv_op}' (choose from {', '.join(WKV_OPS)})")


def build_graph(config: ModelConfig, state_dict: Mapping[str, np.ndarray], *, step: bool = False,
                fp16: bool = False, wkv_op: str = "fused") -> onnx.ModelProto:
    """Build the sequence (default) or step graph of a model as an in-memory ONNX model.

    `wkv_op` matters for RWKV-7 only: "fused" runs each layer's recurrence as one rwkvq.WKV7Step (step graph)
    or rwkvq.WKV7Sequence (sequence graph) node (needs the package's native op library), "standard" as
    standard ONNX ops (a Scan over T in the sequence graph).
    """
    check_wkv_op(wkv_op)
    fused = wkv_op == "fused" and config.version == "x070"
    c = _Ctx(GraphBuilder(), config, state_dict, FLOAT16 if fp16 else FLOAT, seq=not step, fused=fused)
    g = c.g
    L = config.n_layer
    tok_name = "token" if step else "tokens"
    x = g.op("Gather", [c.w(EMBEDDING), tok_name], axis=0)
    x = c.layer_norm(c.to_f32(x), "blocks.0.ln0")
    att, ffn, wkv = [], [], []
    slices = {n: _layer_slices(c, n) for n in STATE_NAMES}
    v_first = None
    for i in range(L):
        b = f"blocks.{i}."
        xx = c.layer_norm(x, b + "ln1")
        s_att, s_wkv = slices["state_att_shift"][i], slices["state_wkv"][i]
        if config.version == "x070":
            out, last, s, v_first = _time_mix_x070(c, i, c.to_act(xx), s_att, s_wkv, v_first)
        else:
            out, last, s = _time_mix_x060(c, i, c.to_act(xx), s_att, s_wkv)
        att.append(c.to_f32(last))
        wkv.append(s)
        x = g.op("Add", [x, c.to_f32(out)])
        xx = c.layer_norm(x, b + "ln2")
        out, last = _channel_mix(c, i, c.to_act(xx), slices["state_ffn_shift"][i])
        ffn.append(c.to_f32(last))
        x = g.op("Add", [x, c.to_f32(out)])
    x = c.to_act(c.layer_norm(x, "ln_out"))
    if not step:  # the head runs on positions logits_from.. only (prefill asks for the last one: -1)
        x = g.op("Slice", [x, g.initializer(LOGITS_FROM, np.array([0], np.int64)), g.ints([np.iinfo(np.int64).max]),
                           g.ints([1])], name="logits_positions")
    g.op("Identity", [c.to_f32(c.mm(x, HEAD))], outputs=["logits"])
    for name, parts in zip(STATE_NAMES, (att, ffn, wkv)):
        _stack_layers(c, name, parts)

    in_shapes, out_shapes = io_shapes(config, step)
    inputs = [tensor_type(n, INT64 if n == tok_name else FLOAT, d) for n, d in in_shapes.items()]
    if not step:
        inputs.append(tensor_type(LOGITS_FROM, INT64, [1]))  # with its initializer: an input a caller may omit
    outputs = [tensor_type(n, FLOAT, d) for n, d in out_shapes.items()]
    graph = helper.make_graph(g.nodes, f"rwkv_{config.version}_{'step' if step else 'sequence'}",
                              inputs, outputs, initializer=g.initializers, value_info=c.value_info)
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(DOMAIN, OPSET_VERSION)] if fused else [])
    model = helper.make_model(graph, opset_imports=opsets, producer_name="rwkvq-onnx", ir_version=10)
    helper.set_model_props(model, {
        CONFIG_KEY: config.to_json(),
        GRAPH_KEY: "step" if step else "sequence",
        DTYPE_KEY: "float16" if fp16 else "float32",
        **({OPS_KEY: (wkv7_step if step else wkv7_sequence).OP_TYPE} if fused else {}),
    })
    if fused and step:  # the recurrence reads each layer's state in the input (no Split copying it per token)
        from .passes.layer_indexed_wkv_state import LayerIndexedWkvState

        LayerIndexedWkvState()(model)
    return model


_BUILDER_CONSTANT = re.compile(r"const_[a-z0-9]+_\d+")  # GraphBuilder.const names: differ between the two graphs


def pair_identity(model: onnx.ModelProto) -> str:
    """A digest of a graph's weights, equal for the sequence and step graphs of one model.

    Both graphs of an export or a quantization hold the same weights under the
    same names; only the small constants the graph builder adds (and the
    sequence graph's `logits_from` default) differ and are left out. A digest (not a random id) keeps identical runs byte-identical.
    """
    h = hashlib.sha256()  # hardware-accelerated on current CPUs: about twice blake2b's speed here
    for t in sorted(model.graph.initializer, key=lambda t: t.name):
        if _BUILDER_CONSTANT.fullmatch(t.name) or t.name == LOGITS_FROM:  # the sequence graph's alone
            continue
        h.update(f"{t.name}\0{t.data_type}\0{list(t.dims)}\0".encode())
        h.update(t.raw_data if t.HasField("raw_data") else t.SerializeToString())
    return h.hexdigest()[:32]


def _set_pair_id(model: onnx.ModelProto, pair_id: str) -> None:
    props = {p.key: p.value for p in model.metadata_props}
    props[PAIR_ID_KEY] = pair_id
    del model.metadata_props[:]
    helper.set_model_props(model, props)


def _write_model(model: onnx.ModelProto, path: Path) -> None:
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if size > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, path)


def save_pair(graphs: Sequence[tuple[onnx.ModelProto, str | Path]]) -> list[Path]:
    """Write a sequence graph and its step graph (or one graph) as one unit, stamped with one pair identity.

    The first graph's path is the target. Every file (graphs and external
    data `NAME.data`) is written into one temporary folder beside it, then
    renamed into place with the target last (see `atomic.atomic_dir` for the
    one remaining window); a failure or SIGINT before that leaves the old files
    and no temporary folder. Both graphs get the identity of the first graph's
    weights, which `RwkvSession` compares.

    A pair of at least `shared_data.SHARED_THRESHOLD` bytes of weights stores
    them once, in `TARGET.data` (see `shared_data`), so a process running both
    graphs can hold one copy; smaller pairs keep self-contained graph files.
    """
    paths = [Path(p) for _, p in graphs]
    if len({p.parent.resolve() for p in paths}) != 1:
        raise ConfigError("the graphs of a pair must be written to one folder", paths[-1])
    pair_id = pair_identity(graphs[0][0])
    models = [m for m, _ in graphs]
    share = len(models) > 1 and shared_data.weight_bytes(models) >= shared_data.SHARED_THRESHOLD
    with atomic_dir(paths[0]) as tmp:
        for model in models:
            _set_pair_id(model, pair_id)
        if share:  # the weights once, in NAME.onnx.data, referred to by both graphs
            with shared_data.shared_data(models, tmp, shared_data.data_path(paths[0]).name, pair_id):
                for model, path in zip(models, paths):
                    onnx.save_model(model, tmp / path.name)
        else:
            for model, path in zip(models, paths):
                _write_model(model, tmp / path.name)
    return paths


def save_model(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write one graph atomically; models too large for one protobuf get external data `NAME.data`."""
    return save_pair([(model, path)])[0]


def output_files(path: str | Path, pair: bool = True) -> list[Path]:
    """Every file writing a model to `path` can create or replace: the graph(s) and their external data."""
    graphs = [Path(path), step_path(path)] if pair else [Path(path)]
    return [f for g in graphs for f in (g, g.with_name(g.name + ".data"))]


def check_export_paths(checkpoint: str | Path, out: str | Path, mode: str = "sequence", wkv_op: str = "fused") -> None:
    """Before loading anything: the checkpoint is a file, the output folder is writable, no output is the input,
    the options are known."""
    check_wkv_op(wkv_op)
    require_file(checkpoint, "checkpoint file", CheckpointError)
    check_writable(out)
    check_distinct([checkpoint], output_files(out, pair=mode == "both"))


def export(config: ModelConfig, state_dict: Mapping[str, np.ndarray], out: str | Path, *,
           mode: str = "sequence", fp16: bool = False, wkv_op: str = "fused") -> list[Path]:
    """Export to `out` (sequence or step graph), or both to `out` and its `.step.onnx` sibling as one pair.

    `wkv_op` is RWKV-7's recurrence in both graphs (see `build_graph`)."""
    if mode not in MODES:
        raise ConfigError(f"unknown export mode '{mode}' (choose from {', '.join(MODES)})")
    check_wkv_op(wkv_op)
    out = Path(out)
    graphs = []
    if mode in ("sequence", "both"):
        graphs.append((build_graph(config, state_dict, step=False, fp16=fp16, wkv_op=wkv_op), out))
    if mode in ("step", "both"):
        target = out if mode == "step" else step_path(out)
        graphs.append((build_graph(config, state_dict, step=True, fp16=fp16, wkv_op=wkv_op), target))
    return save_pair(graphs)


def read_config(model: onnx.ModelProto, path: str | Path | None = None) -> ModelConfig:
    """The model config an exported graph carries in its metadata, checked against the graph itself.

    The graph's inputs and outputs must be those the config implies, and its
    weights must be those of `n_layer` blocks (weights keep their checkpoint
    keys, also when quantized).
    """
    props = {p.key: p.value for p in model.metadata_props}
    if CONFIG_KEY not in props:
        raise ConfigError(f"not an rwkvq-onnx export (no '{CONFIG_KEY}' metadata)", path)
    try:
        config = ModelConfig.from_json(props[CONFIG_KEY])
    except Exception as exc:
        raise ConfigError(f"unreadable '{CONFIG_KEY}' metadata ({type(exc).__name__}: {exc})", path) from None
    kind = props.get(GRAPH_KEY, "sequence")
    check_io(config, kind, {v.name: _value_dims(v) for v in model.graph.input},
             {v.name: _value_dims(v) for v in model.graph.output}, path)
    names = [t.name for t in model.graph.initializer]
    last, beyond = f"blocks.{config.n_layer - 1}.", f"blocks.{config.n_layer}."
    if not any(n.startswith(EMBEDDING) for n in names) or not any(n.startswith(last) for n in names) or any(
            n.startswith(beyond) for n in names):
        raise ConfigError(f"not an rwkvq-onnx export: its weights are not those of the {config.n_layer}-layer "
                          f"model its 'rwkvq.config' metadata describes", path)
    return config
