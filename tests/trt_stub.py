"""A stand-in for the parts of TensorRT that `build-engine` and the plugins touch, for CPU-only tests.

TensorRT cannot be installed on the development machines. Its plugin API
checks plugin definitions by inspecting their signatures when they are
registered (TensorRT OSS, `python/packaging/bindings_wheel/tensorrt/plugin/
_validate.py`); `register` and `aot_impl` here apply the same conditions, so
a definition this stub accepts passes those checks:
- every `register` parameter is annotated, without default; tensors come first
  and are annotated with a class derived from `TensorDesc` (checked with
  `issubclass`, which raises TypeError on string annotations); attributes are
  int/float/bytes/bool/str and not named outputs/stream/tactic; the return
  annotation is `TensorDesc` or a tuple of them;
- an `aot_impl` takes the tensors, a subset of the attributes in registration
  order, then `outputs, tactic`; annotated attributes match the registered
  types; the return annotation is present and is a 4-tuple of
  (str|bytes, str|bytes, KernelLaunchParams, a SymExprs subclass).
The builder side records what `build_engine` asks of it (flags, parse calls,
timing cache, profile) so tests can assert on it.
"""
from __future__ import annotations

import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import onnx


# ---- tensorrt.plugin ---------------------------------------------------------------------------------------
class ShapeExprs(list):
    def numel(self) -> int:
        n = 1
        for d in self:
            n *= d
        return n


@dataclass
class TensorDesc:
    dtype: object
    shape_expr: ShapeExprs

    @property
    def ndim(self) -> int:
        return len(self.shape_expr)

    def like(self) -> "TensorDesc":
        return TensorDesc(self.dtype, ShapeExprs(self.shape_expr))


@dataclass
class KernelLaunchParams:
    grid_x: int = 1
    grid_y: int = 1
    grid_z: int = 1
    block_x: int = 1
    block_y: int = 1
    block_z: int = 1
    shared_mem: int = 0


class SymExprs(list):
    def __init__(self, length: int) -> None:
        super().__init__([None] * length)


class SymIntExprs(SymExprs):
    pass


@dataclass
class SymInt32:
    value: int


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


SERIALIZABLE = (int, float, bytes, bool, str)
DISALLOWED_ATTRS = {"outputs", "stream", "tactic"}
REGISTRY: dict[str, dict] = {}


def register(plugin_id: str):
    def deco(fn):
        sig = inspect.signature(fn)
        tensors, attrs, seen_attr = [], {}, False
        for idx, (name, p) in enumerate(sig.parameters.items()):
            if p.annotation is inspect.Parameter.empty:
                raise ValueError(f"argument {name} has no type annotation")
            if p.default is not inspect.Parameter.empty:
                raise ValueError(f"argument {name} has a default value")
            if issubclass(p.annotation, TensorDesc):  # TypeError for string annotations, as in TensorRT
                if seen_attr:
                    raise ValueError("tensor and attribute arguments are interspersed")
                tensors.append(name)
            else:
                if idx == 0 or name in DISALLOWED_ATTRS or p.annotation not in SERIALIZABLE:
                    raise ValueError(f"attribute {name}: {p.annotation} is not allowed")
                attrs[name] = p.annotation
                seen_attr = True
        ret = sig.return_annotation
        if ret is inspect.Parameter.empty:
            raise ValueError("No return annotation found for register function")
        outs = typing.get_args(ret) if typing.get_origin(ret) is tuple else (ret,)
        if not all(inspect.isclass(o) and issubclass(o, TensorDesc) for o in outs):
            raise ValueError(f"return annotation {ret} is not TensorDesc or Tuple[TensorDesc]")
        REGISTRY[plugin_id] = {"desc": fn, "tensors": tensors, "attrs": attrs}
        return fn
    return deco


def _str_or_bytes(arg) -> bool:
    if typing.get_origin(arg) in (typing.Union, types.UnionType):
        return all(a in (str, bytes) for a in typing.get_args(arg))
    return arg in (str, bytes)


def aot_impl(plugin_id: str):
    def deco(fn):
        plugin = REGISTRY[plugin_id]
        sig = inspect.signature(fn)
        used = []
        for name, p in sig.parameters.items():
            if name in plugin["attrs"]:
                used.append(name)
                if p.annotation is not inspect.Parameter.empty and p.annotation != plugin["attrs"][name]:
                    raise ValueError(f"attribute {name} annotated differently from its registration")
            elif name == "outputs" and p.annotation is not inspect.Parameter.empty:
                if typing.get_origin(p.annotation) is not tuple or not all(
                        issubclass(a, TensorDesc) for a in typing.get_args(p.annotation)):
                    raise ValueError("'outputs' should be Tuple[TensorDesc]")
            elif name == "tactic" and p.annotation is not inspect.Parameter.empty:
                if not issubclass(p.annotation, int):
                    raise ValueError("'tactic' should be an int")
            elif name in plugin["tensors"] and p.annotation is not inspect.Parameter.empty:
                if not issubclass(p.annotation, TensorDesc):
                    raise ValueError(f"tensor {name} is not annotated TensorDesc")
        expected = plugin["tensors"] + [a for a in plugin["attrs"] if a in used] + ["outputs", "tactic"]
        if list(sig.parameters) != expected:
            raise ValueError(f"aot_impl signature {list(sig.parameters)} does not match {expected}")
        ret = sig.return_annotation
        if ret is inspect.Parameter.empty:
            raise ValueError("No return annotation found for aot_impl function")
        args = typing.get_args(ret)
        if typing.get_origin(ret) is not tuple or len(args) != 4:
            raise ValueError(f"aot_impl return annotation {ret} is not a 4-tuple")
        if not (_str_or_bytes(args[0]) and _str_or_bytes(args[1])):
            raise ValueError("kernel name and PTX must be annotated str or bytes")
        if not (issubclass(args[2], KernelLaunchParams) and issubclass(args[3], SymExprs)):
            raise ValueError("aot_impl must return KernelLaunchParams and SymExprs")
        plugin["aot"] = fn
        return fn
    return deco


plugin = types.SimpleNamespace(TensorDesc=TensorDesc, KernelLaunchParams=KernelLaunchParams, SymExprs=SymExprs,
                               SymIntExprs=SymIntExprs, SymInt32=SymInt32, cdiv=cdiv, register=register,
                               aot_impl=aot_impl)


# ---- tensorrt (builder side) -------------------------------------------------------------------------------
class DataType:
    float16, float32, int8, int32 = "float16", "float32", "int8", "int32"


ONNX_TO_TRT = {onnx.TensorProto.FLOAT16: DataType.float16, onnx.TensorProto.FLOAT: DataType.float32,
               onnx.TensorProto.INT8: DataType.int8, onnx.TensorProto.INT32: DataType.int32,
               onnx.TensorProto.UINT8: DataType.int32}  # the parser widens UINT8 weights, one int32 per byte


@dataclass
class Calls:
    flags: list = field(default_factory=list)
    parsed_files: list = field(default_factory=list)
    external_data: list = field(default_factory=list)  # files beside the parsed model holding its weights
    parsed_bytes: int = 0
    plugin_inputs: list = field(default_factory=list)
    plugin_shapes: list = field(default_factory=list)  # initializer dims per plugin input (None: activation)
    timing_cache_in: bytes | None = None
    profile: dict = field(default_factory=dict)
    network_flags: int = 0


CALLS = Calls()


class Logger:
    WARNING = 2

    def __init__(self, level) -> None:
        self.level = level


class NetworkDefinitionCreationFlag:
    STRONGLY_TYPED = 5


class MemoryPoolType:
    WORKSPACE = 0


class BuilderFlag:
    FP16 = 1


class _Cache:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> bytes:
        return b"timing:" + self.data


class _Config:
    def set_memory_pool_limit(self, pool, size) -> None:
        pass

    def set_flag(self, flag) -> None:
        CALLS.flags.append(flag)
        if flag == BuilderFlag.FP16 and CALLS.network_flags & (1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED):
            raise RuntimeError("API Usage Error: FP16 set on a strongly typed network")

    def create_timing_cache(self, data: bytes) -> _Cache:
        CALLS.timing_cache_in = bytes(data)
        return _Cache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch) -> bool:
        self.cache = cache
        return True

    def get_timing_cache(self) -> _Cache:
        return self.cache

    def add_optimization_profile(self, profile) -> None:
        CALLS.profile = dict(profile.shapes)


class _Profile:
    def __init__(self) -> None:
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi) -> None:
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class Builder:
    def __init__(self, logger) -> None:
        pass

    def create_network(self, flags: int):
        CALLS.network_flags = flags
        return object()

    def create_builder_config(self) -> _Config:
        return _Config()

    def create_optimization_profile(self) -> _Profile:
        return _Profile()

    def build_serialized_network(self, network, config) -> bytes:
        return b"stub engine"


class OnnxParser:
    """Loads the file as the real parser would (external data beside it) and records plugin inputs' types:
    initializers with the type the real parser gives them, activations with the type their producer has."""

    num_errors = 0

    def __init__(self, network, logger) -> None:
        pass

    def parse(self, data: bytes) -> bool:
        CALLS.parsed_bytes = len(data)
        return True

    def parse_from_file(self, path: str) -> bool:
        CALLS.parsed_files.append(path)
        CALLS.external_data.extend(sorted(p.name for p in Path(path).parent.iterdir() if p.name != Path(path).name))
        model = onnx.load(path)
        inits = {t.name: t for t in model.graph.initializer}
        casts = {o: n for n in model.graph.node if n.op_type == "Cast" for o in n.output}
        for node in model.graph.node:
            if node.domain != "rwkvq":
                continue
            types_, shapes = [], []
            for name in node.input:
                shapes.append(list(inits[name].dims) if name in inits else None)
                if name in inits:
                    types_.append(ONNX_TO_TRT[inits[name].data_type])
                elif name in casts:
                    to = next(a.i for a in casts[name].attribute if a.name == "to")
                    types_.append(ONNX_TO_TRT[to])
                else:
                    types_.append(DataType.float32)  # the rwkvq ONNX ops compute in float32
            CALLS.plugin_inputs.append((node.op_type, types_, {a.name: onnx.helper.get_attribute_value(a)
                                                              for a in node.attribute}))
            CALLS.plugin_shapes.append(shapes)
        return True

    def get_error(self, i):
        return ""


def install(monkeypatch) -> Calls:
    """Make `import tensorrt` / `import tensorrt.plugin` return this stub; returns the fresh call record."""
    import sys

    global CALLS
    CALLS = Calls()
    REGISTRY.clear()
    trt = types.ModuleType("tensorrt")
    for name in ("Logger", "Builder", "OnnxParser", "NetworkDefinitionCreationFlag", "MemoryPoolType",
                 "BuilderFlag"):
        setattr(trt, name, globals()[name])
    trt.float16, trt.float32, trt.int8, trt.int32 = DataType.float16, DataType.float32, DataType.int8, DataType.int32
    trt.__version__ = "10.9-stub"
    trtp = types.ModuleType("tensorrt.plugin")
    for name, value in vars(plugin).items():
        setattr(trtp, name, value)
    trt.plugin = trtp
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    return CALLS


def desc_from_onnx_types(types_: list, shapes: list) -> list[TensorDesc]:
    return [TensorDesc(t, ShapeExprs(s)) for t, s in zip(types_, shapes)]


__all__ = ["install", "plugin", "REGISTRY", "DataType", "Path"]


# ---- TensorRT's own plugin sources, run as they are --------------------------------------------------------
class _PermissiveMeta(type):
    def __getattr__(cls, name):
        return _permissive(f"{cls.__name__}_{name}")


_PERMISSIVE: dict[str, type] = {}


def _permissive(name: str) -> type:
    """A class standing in for any compiled `tensorrt` symbol: constructible, callable, any attribute."""
    if name not in _PERMISSIVE:
        _PERMISSIVE[name] = _PermissiveMeta(name, (), {
            "__init__": lambda self, *a, **k: None,
            "__getattr__": lambda self, attr: _permissive(f"{name}_{attr}"),
            "__call__": lambda self, *a, **k: _permissive(f"{name}_call")()})
    return _PERMISSIVE[name]


class _FakeBindings(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _permissive(name)


def load_tensorrt_plugin_sources(package_dir: str, monkeypatch):
    """Import TensorRT's pure-Python `tensorrt.plugin` package from `package_dir` (a folder holding `plugin/`,
    e.g. TensorRT OSS `python/packaging/bindings_wheel/tensorrt`), unchanged, over a permissive stand-in for
    the compiled bindings (AOT enabled); returns the real `tensorrt.plugin` module."""
    import importlib
    import sys

    for name in [m for m in sys.modules if m == "tensorrt" or m.startswith("tensorrt.")]:
        monkeypatch.delitem(sys.modules, name)
    fake = _FakeBindings("tensorrt")
    fake.__path__ = [str(package_dir)]
    fake.QuickPluginCreationRequest = _permissive("QuickPluginCreationRequest")  # AOT plugins exist (10.9+)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    module = importlib.import_module("tensorrt.plugin")
    for name in [m for m in sys.modules if m.startswith("tensorrt.")]:
        monkeypatch.setitem(sys.modules, name, sys.modules[name])  # removed again after the test
    return module
