"""Checks the op specs share: attribute ranges, input shapes and dtypes, each a one-line ConfigError naming the node.

All arithmetic is on Python ints, so a size is never narrowed (to the kernels'
32-bit ints, to int64) before it has been checked.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from rwkvq_onnx.errors import ConfigError

INT32_LIMIT = 2**31  # the C kernels hold sizes and offsets in int: every such size must stay below this


def fail(node: str, op: str, message: str) -> ConfigError:
    """The error for a bad node: '<op> node '<node>': <message>' on one line."""
    return ConfigError(f"{op} node '{node}': {message}".replace("\n", " "))


def int_attr(attrs: Mapping[str, Any], key: str, lo: int, hi: int, *, node: str, op: str) -> int:
    """Attribute `key` as an int in [lo, hi) (hi exclusive); refuses a missing, non-integer or out-of-range value."""
    if key not in attrs:
        raise fail(node, op, f"missing attribute {key}")
    value = attrs[key]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise fail(node, op, f"attribute {key} must be an integer, got {value!r}")
    value = int(value)
    if not lo <= value < hi:
        raise fail(node, op, f"attribute {key}={value} is outside [{lo}, {hi - 1}]")
    return value


def shape_of(value: Any, what: str, *, node: str, op: str) -> tuple[int, ...]:
    """The static shape of an array-like (numpy array, graphsurgeon Constant/Variable) as Python ints."""
    shape = getattr(value, "shape", None)
    if shape is None or any(not isinstance(d, (int, np.integer)) for d in shape):
        raise fail(node, op, f"input {what} has no static shape ({shape})")
    return tuple(int(d) for d in shape)


def expect_shape(value: Any, expected: tuple[int, ...], what: str, *, node: str, op: str) -> None:
    shape = shape_of(value, what, node=node, op=op)
    if shape != tuple(expected):
        raise fail(node, op, f"input {what} has shape {list(shape)}, expected {list(expected)}")


def expect_dtype(value: Any, expected: np.dtype, what: str, *, node: str, op: str) -> None:
    """Refuse a known dtype other than `expected` (a value without a numpy dtype is not checked)."""
    dtype = getattr(value, "dtype", None)
    try:
        dtype = None if dtype is None else np.dtype(dtype)
    except TypeError:
        return
    if dtype is not None and dtype != np.dtype(expected):
        raise fail(node, op, f"input {what} is {dtype}, expected {np.dtype(expected)}")
