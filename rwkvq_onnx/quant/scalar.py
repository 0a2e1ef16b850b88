"""Scalar quantizers: RTN, GPTQ and AWQ-style scaling (pure functions on arrays).

Weights are [N, K] (`nn.Linear` layout: output rows, input columns); groups
run along K, as MatMulNBits and blocked DequantizeLinear expect.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .configs import AWQConfig, GPTQConfig, ScalarConfig
from .formats import ScalarQuantized
from .hessian import output_error, prepare


def group_params(w: torch.Tensor, cfg: ScalarConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (rounded to fp16) and integer zero point per row of a column group w [N, g]."""
    maxq = (1 << cfg.bits) - 1
    if cfg.symmetric:
        amax = w.abs().amax(dim=1).clamp(min=1e-8)
        zero = torch.full_like(amax, float(1 << (cfg.bits - 1)))
        scale = amax / (1 << (cfg.bits - 1))
    else:
        lo = w.amin(dim=1).clamp(max=0)
        hi = w.amax(dim=1).clamp(min=0)
        scale = ((hi - lo) / maxq).clamp(min=1e-8)
        zero = torch.round(-lo / scale).clamp(0, maxq)
    scale = scale.to(torch.float16).to(w.dtype).clamp(min=6.2e-5)  # stored as fp16: use exactly that
    return scale, zero


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of one column (or block of columns broadcasting over scale/zero)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, (1 << bits) - 1)


def _assemble(codes: torch.Tensor, scales: list, zeros: list, cfg: ScalarConfig, g: int) -> ScalarQuantized:
    return ScalarQuantized(codes.to(torch.int64).numpy(), torch.stack(scales, 1).numpy().astype(np.float16),
                           torch.stack(zeros, 1).to(torch.int64).numpy(), cfg.bits, g, cfg.symmetric)


def rtn_quantize(w: np.ndarray, h: np.ndarray | None = None, cfg: ScalarConfig = ScalarConfig()) -> ScalarQuantized:
    """Round to nearest with per-group min-max (or symmetric abs-max) scales. `h` is unused."""
    W = torch.as_tensor(np.asarray(w, np.float64))
    K = W.shape[1]
    g = cfg.effective_group(K)
    codes = torch.empty_like(W)
    scales, zeros = [], []
    for j in range(0, K, g):
        s, z = group_params(W[:, j:j + g], cfg)
        codes[:, j:j + g] = quantize_column(W[:, j:j + g], s[:, None], z[:, None], cfg.bits)
        scales.append(s)
        zeros.append(z)
    return _assemble(codes, scales, zeros, cfg, g)


def gptq_quantize(w: np.ndarray, h: np.ndarray, cfg: GPTQConfig = GPTQConfig()) -> ScalarQuantized:
    """GPTQ: quantize column by column, feeding each column's error forward through H^-1.

    Blocked lazy updates (cfg.block_size columns at a time); with act_order
    columns are visited by decreasing H_ii and group scales are fixed up front
    from the original weights (static groups), so groups stay contiguous in K.
    """
    w = np.asarray(w, np.float64)
    h = np.asarray(h, np.float64)
    K = w.shape[1]
    g = cfg.effective_group(K)
    n_groups = -(-K // g)
    perm = np.argsort(-np.diag(h), kind="stable") if cfg.act_order else np.arange(K)
    static = None
    if cfg.act_order:
        w0 = torch.as_tensor(w)
        static = [group_params(w0[:, j * g:(j + 1) * g], cfg) for j in range(n_groups)]
    W, U = prepare(w[:, perm], h[perm][:, perm], cfg.damp)
    scales: list = [None] * n_groups
    zeros: list = [None] * n_groups
    codes = torch.zeros_like(W)
    for b0 in range(0, K, cfg.block_size):
        b1 = min(b0 + cfg.block_size, K)
        W1 = W[:, b0:b1].clone()
        Err = torch.zeros_like(W1)
        for i in range(b1 - b0):
            col = b0 + i
            grp = int(perm[col]) // g
            if scales[grp] is None:  # first column of a group: fit its scales on the updated weights
                src = W1[:, i:i + g] if i + g <= b1 - b0 else W[:, col:col + g]
                scales[grp], zeros[grp] = static[grp] if static else group_params(src, cfg)
            s, z = scales[grp], zeros[grp]
            q = quantize_column(W1[:, i], s, z, cfg.bits)
            codes[:, col] = q
            err = (W1[:, i] - (q - z) * s) / U[col, col]
            W1[:, i:] -= err[:, None] * U[col, col:b1][None, :]
            Err[:, i] = err
        W[:, b1:] -= Err @ U[b0:b1, b1:]
    codes = codes[:, np.argsort(perm)]
    return _assemble(codes, scales, zeros, cfg, g)


@dataclass(frozen=True)
class AWQResult:
    """AWQ output: the payload quantizes W * input_scale; inputs must be divided by input_scale."""

    quantized: ScalarQuantized
    input_scale: np.ndarray
    alpha: float

    def dequantize(self) -> np.ndarray:
        """The effective weight seen by unscaled inputs."""
        return self.quantized.dequantize() / self.input_scale[None, :]


def awq_quantize(w: np.ndarray, h: np.ndarray, cfg: AWQConfig = AWQConfig()) -> AWQResult:
    """Activation-aware scaling: s_k = rms(x_k)**alpha, alpha chosen on a grid to minimise output error.

    Salient input channels (large activations) are scaled up before rounding
    so they lose less precision; the inverse scale must be folded into
    whatever produces the input (or applied at run time where nothing folds).
    """
    W = np.asarray(w, np.float64)
    act = np.sqrt(np.maximum(np.diag(np.asarray(h, np.float64)) / 2.0, 1e-12))
    best = None
    for alpha in np.linspace(0.0, 1.0, cfg.grid, endpoint=False):
        s = act ** alpha
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        q = rtn_quantize(W * s[None, :], None, cfg)
        err = output_error(W, q.dequantize() / s[None, :], h)
        if best is None or err < best[0]:
            best = (err, AWQResult(q, s, float(alpha)))
    return best[1]
