"""Export an RWKV-6/7 checkpoint to ONNX: a sequence graph and a loop-free step graph.

Graph conventions (see the design doc):

- sequence: `tokens` int64 [B, T] + state -> `logits` [B, T, V] + new state;
  the WKV recurrence of each layer is one `Scan` over T.
- step: `token` int64 [B] + state -> `logits` [B, V] + new state; no loops,
  which is what TensorRT and Triton want.
- state: `state_att_shift` [L, B, C], `state_ffn_shift` [L, B, C],
  `state_wkv` [L, B, H, N, N], float32 in every graph; outputs are the same
  names prefixed `new_`.
- every linear layer is one `MatMul` whose weight initializer is named by its
  checkpoint key and stored transposed [K, N]; element-wise vectors keep
  their keys (flattened to [C]).

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
from dataclasses import dataclass
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
from .names import CONFIG_KEY, DTYPE_KEY, EMBEDDING, FP32_SUFFIXES, GRAPH_KEY, HEAD, PAIR_ID_KEY, is_linear_weight
from .paths import check_distinct, require_file

EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes; protobuf's hard limit is 2 GiB
MODES = ("sequence", "step", "both")

@dataclass
class _Ctx:
    g: GraphBuilder
    config: ModelConfig
    sd: Mapping[str, np.ndarray]
    act: int  # FLOAT or FLOAT16
    seq: bool  # sequence graph (leading dims B, T) or step graph (leading dim B)

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

    def flat(self, x: str) -> str:
        return self.g.op("Reshape", [x, self.g.ints(self.lead + [self.config.n_embd])])

    def layer_norm(self, x: str, prefix: str) -> str:
        return self.g.op("LayerNormalization", [x, self.w(prefix + ".weight"), self.w(prefix + ".bias")],
                         axis=-1, epsilon=1e-5)

    def group_norm(self, y_heads: str, prefix: str) -> str:
        """GroupNorm with one group per head, eps 64e-5, as the official ln_x."""
        N = self.config.head_size
        ones, zeros = self.g.const(np.ones(N)), self.g.const(np.zeros(N))
        y = self.g.op("LayerNormalization", [y_heads, ones, zeros], axis=-1, epsilon=64e-5)
        y = self.flat(y)
        return self.g.op("Add", [self.g.op("Mul", [y, self.w(prefix + ".weight")]), self.w(prefix + ".bias")])

    def shift(self, x: str, prev_state: str, layer: int) -> tuple[str, str]:
        """Token shift: (previous token's x, x of the last token for the new state)."""
        g = self.g
        prev = self.to_act(g.op("Gather", [prev_state, g.const(layer, np.int64)], axis=0))
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


def _wkv_body_x070(g: GraphBuilder, s: str, r: str, w: str, k: str, v: str, a: str, b: str) -> tuple[str, str]:
    """S <- S*w (over keys) + (S a) b^T + v k^T ; y = S r.  S is [.., H, value, key]."""
    u = lambda t, ax: g.op("Unsqueeze", [t, g.ints([ax])])  # noqa: E731
    s = g.op("Add", [
        g.op("Add", [g.op("Mul", [s, u(w, -2)]), g.op("MatMul", [g.op("MatMul", [s, u(a, -1)]), u(b, -2)])]),
        g.op("MatMul", [u(v, -1), u(k, -2)]),
    ])
    y = g.op("Squeeze", [g.op("MatMul", [s, u(r, -1)]), g.ints([-1])])
    return s, y


def _wkv_body_x060(g: GraphBuilder, s: str, r: str, w: str, k: str, v: str, u_bonus: str) -> tuple[str, str]:
    """y = r (u*kv + S) ; S <- kv + w*S.  S is [.., H, key, value]."""
    u = lambda t, ax: g.op("Unsqueeze", [t, g.ints([ax])])  # noqa: E731
    kv = g.op("MatMul", [u(k, -1), u(v, -2)])
    y = g.op("MatMul", [u(r, -2), g.op("Add", [g.op("Mul", [u_bonus, kv]), s])])
    y = g.op("Squeeze", [y, g.ints([-2])])
    s = g.op("Add", [kv, g.op("Mul", [u(w, -1), s])])
    return s, y


def _wkv(c: _Ctx, layer: int, state_wkv: str, inputs: list[str], extra: list[str]) -> tuple[str, str]:
    """Run the recurrence: inline for one token, a `Scan` over T for a sequence."""
    g, H, N = c.g, c.config.n_head, c.config.head_size
    body_fn = _wkv_body_x070 if c.config.version == "x070" else _wkv_body_x060
    s0 = g.op("Gather", [state_wkv, g.const(layer, np.int64)], axis=0)
    if not c.seq:
        return body_fn(g, s0, *inputs, *extra)
    sub = GraphBuilder(prefix=f"wkv{layer}_")
    names = [f"wkv{layer}_s_in"] + [f"wkv{layer}_in{i}" for i in range(len(inputs))]
    s_out, y_out = body_fn(sub, names[0], *names[1:], *extra)
    sub.op("Identity", [s_out], outputs=[f"wkv{layer}_s_out"])
    sub.op("Identity", [y_out], outputs=[f"wkv{layer}_y"])
    body = helper.make_graph(
        sub.nodes, f"wkv_body_{layer}",
        [tensor_type(names[0], FLOAT, ["batch", H, N, N])] + [tensor_type(n, FLOAT, ["batch", H, N]) for n in names[1:]],
        [tensor_type(f"wkv{layer}_s_out", FLOAT, ["batch", H, N, N]), tensor_type(f"wkv{layer}_y", FLOAT, ["batch", H, N])],
        initializer=sub.initializers,
    )
    s, y = g.op("Scan", [s0, *inputs], n_out=2, name=f"wkv_scan_{layer}", body=body,
                num_scan_inputs=len(inputs), scan_input_axes=[1] * len(inputs), scan_output_axes=[1])
    return s, y


def _time_mix_x070(c: _Ctx, i: int, x: str, state_att: str, state_wkv: str, v_first: str | None):
    g, a = c.g, f"blocks.{i}.att."
    prev, last = c.shift(x, state_att, i)
    d = g.op("Sub", [prev, x])
    xr, xw, xk, xv, xa, xg = (c.mix(x, d, a + n) for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"))
    r = c.mm(xr, a + "receptance.weight")
    k = c.mm(xk, a + "key.weight")
    v = c.mm(xv, a + "value.weight")
    decay = c.to_f32(c.mm(g.op("Tanh", [c.mm(xw, a + "w1")]), a + "w2"))
    decay = g.op("Exp", [g.op("Mul", [g.op("Sigmoid", [g.op("Add", [c.w(a + "w0"), decay])]), g.const(-0.606531)])])
    iclr = g.op("Sigmoid", [g.op("Add", [c.w(a + "a0"), c.mm(c.mm(xa, a + "a1"), a + "a2")])])
    gate = c.mm(g.op("Sigmoid", [c.mm(xg, a + "g1")]), a + "g2")
    kk = c.heads(c.to_f32(g.op("Mul", [k, c.w(a + "k_k")])))
    kk = g.op("Div", [kk, g.op("Max", [g.op("ReduceL2", [kk, g.ints([-1])], keepdims=1), g.const(1e-12)])])
    one = g.const(1.0, np.float16 if c.act == FLOAT16 else np.float32)
    k = g.op("Mul", [k, g.op("Add", [one, g.op("Mul", [g.op("Sub", [iclr, one]), c.w(a + "k_a")])])])
    if i == 0:
        v_first = v
    else:
        mixv = g.op("Sigmoid", [g.op("Add", [c.w(a + "v0"), c.mm(c.mm(xv, a + "v1"), a + "v2")])])
        v = g.op("Add", [v, g.op("Mul", [g.op("Sub", [v_first, v]), mixv])])
    iclr_h = c.heads(c.to_f32(iclr))
    wkv_in = [c.heads(c.to_f32(r)), c.heads(decay), c.heads(c.to_f32(k)), c.heads(c.to_f32(v)),
              g.op("Neg", [kk]), g.op("Mul", [kk, iclr_h])]
    s, y = _wkv(c, i, state_wkv, wkv_in, [])
    y = c.to_act(c.group_norm(y, a + "ln_x"))
    rk = g.op("Mul", [c.heads(g.op("Mul", [r, k])), c.w(a + "r_k")])
    bonus = c.flat(g.op("Mul", [g.op("ReduceSum", [rk, g.ints([-1])], keepdims=1), c.heads(v)]))
    out = c.mm(g.op("Mul", [g.op("Add", [y, bonus]), gate]), a + "output.weight")
    return out, last, s, v_first


def _time_mix_x060(c: _Ctx, i: int, x: str, state_att: str, state_wkv: str):
    g, a = c.g, f"blocks.{i}.att."
    lm = c.config.lora["maa"]
    prev, last = c.shift(x, state_att, i)
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
    wkv_in = [c.heads(c.to_f32(r)), c.heads(decay), c.heads(c.to_f32(k)), c.heads(c.to_f32(v))]
    s, y = _wkv(c, i, state_wkv, wkv_in, [u])
    y = c.to_act(c.group_norm(y, a + "ln_x"))
    out = c.mm(g.op("Mul", [y, gate]), a + "output.weight")
    return out, last, s


def _channel_mix(c: _Ctx, i: int, x: str, state_ffn: str):
    g, f = c.g, f"blocks.{i}.ffn."
    prev, last = c.shift(x, state_ffn, i)
    d = g.op("Sub", [prev, x])
    if c.config.version == "x070":
        h = g.op("Relu", [c.mm(c.mix(x, d, f + "x_k"), f + "key.weight")])
        return c.mm(g.op("Mul", [h, h]), f + "value.weight"), last
    h = g.op("Relu", [c.mm(c.mix(x, d, f + "time_maa_k"), f + "key.weight")])
    rec = g.op("Sigmoid", [c.mm(c.mix(x, d, f + "time_maa_r"), f + "receptance.weight")])
    return g.op("Mul", [rec, c.mm(g.op("Mul", [h, h]), f + "value.weight")]), last


def _value_dims(value: onnx.ValueInfoProto) -> Dims:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value.type.tensor_type.shape.dim]


def build_graph(config: ModelConfig, state_dict: Mapping[str, np.ndarray], *, step: bool = False,
                fp16: bool = False) -> onnx.ModelProto:
    """Build the sequence (default) or step graph of a model as an in-memory ONNX model."""
    c = _Ctx(GraphBuilder(), config, state_dict, FLOAT16 if fp16 else FLOAT, seq=not step)
    g = c.g
    L = config.n_layer
    tok_name = "token" if step else "tokens"
    x = g.op("Gather", [c.w(EMBEDDING), tok_name], axis=0)
    x = c.layer_norm(c.to_f32(x), "blocks.0.ln0")
    att, ffn, wkv = [], [], []
    v_first = None
    for i in range(L):
        b = f"blocks.{i}."
        xx = c.layer_norm(x, b + "ln1")
        if config.version == "x070":
            out, last, s, v_first = _time_mix_x070(c, i, c.to_act(xx), "state_att_shift", "state_wkv", v_first)
        else:
            out, last, s = _time_mix_x060(c, i, c.to_act(xx), "state_att_shift", "state_wkv")
        att.append(c.to_f32(last))
        wkv.append(s)
        x = g.op("Add", [x, c.to_f32(out)])
        xx = c.layer_norm(x, b + "ln2")
        out, last = _channel_mix(c, i, c.to_act(xx), "state_ffn_shift")
        ffn.append(c.to_f32(last))
        x = g.op("Add", [x, c.to_f32(out)])
    x = c.to_act(c.layer_norm(x, "ln_out"))
    g.op("Identity", [c.to_f32(c.mm(x, HEAD))], outputs=["logits"])
    for name, parts in zip(STATE_NAMES, (att, ffn, wkv)):
        g.op("Concat", [g.op("Unsqueeze", [p, g.ints([0])]) for p in parts], outputs=["new_" + name], axis=0)

    in_shapes, out_shapes = io_shapes(config, step)
    inputs = [tensor_type(n, INT64 if n == tok_name else FLOAT, d) for n, d in in_shapes.items()]
    outputs = [tensor_type(n, FLOAT, d) for n, d in out_shapes.items()]
    graph = helper.make_graph(g.nodes, f"rwkv_{config.version}_{'step' if step else 'sequence'}",
                              inputs, outputs, initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="rwkvq-onnx", ir_version=10)
    helper.set_model_props(model, {
        CONFIG_KEY: config.to_json(),
        GRAPH_KEY: "step" if step else "sequence",
        DTYPE_KEY: "float16" if fp16 else "float32",
    })
    return model


_BUILDER_CONSTANT = re.compile(r"const_[a-z0-9]+_\d+")  # GraphBuilder.const names: differ between the two graphs


def pair_identity(model: onnx.ModelProto) -> str:
    """A digest of a graph's weights, equal for the sequence and step graphs of one model.

    Both graphs of an export or a quantization hold the same weights under the
    same names; only the small constants the graph builder adds differ and are
    left out. A digest (not a random id) keeps identical runs byte-identical.
    """
    h = hashlib.sha256()  # hardware-accelerated on current CPUs: about twice blake2b's speed here
    for t in sorted(model.graph.initializer, key=lambda t: t.name):
        if _BUILDER_CONSTANT.fullmatch(t.name):
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


def check_export_paths(checkpoint: str | Path, out: str | Path, mode: str = "sequence") -> None:
    """Before loading anything: the checkpoint is a file, the output folder is writable, no output is the input."""
    require_file(checkpoint, "checkpoint file", CheckpointError)
    check_writable(out)
    check_distinct([checkpoint], output_files(out, pair=mode == "both"))


def export(config: ModelConfig, state_dict: Mapping[str, np.ndarray], out: str | Path, *,
           mode: str = "sequence", fp16: bool = False) -> list[Path]:
    """Export to `out` (sequence or step graph), or both to `out` and its `.step.onnx` sibling as one pair."""
    if mode not in MODES:
        raise ConfigError(f"unknown export mode '{mode}' (choose from {', '.join(MODES)})")
    out = Path(out)
    graphs = []
    if mode in ("sequence", "both"):
        graphs.append((build_graph(config, state_dict, step=False, fp16=fp16), out))
    if mode in ("step", "both"):
        target = out if mode == "step" else step_path(out)
        graphs.append((build_graph(config, state_dict, step=True, fp16=fp16), target))
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
