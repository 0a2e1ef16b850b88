"""Vector quantizers: k-means VQ and GPTVQ (pure functions on arrays).

A weight matrix [N, K] is cut into blocks of group_rows x group_cols; each
block has one codebook of 2**(bits*dim) entries of `dim` values, and every
run of `dim` consecutive weights in a row is replaced by its nearest entry.

- k-means VQ: plain k-means per block, nearest-entry assignment.
- GPTVQ (van Baalen et al. 2024): the codebook of a column group is fitted
  with Hessian-weighted k-means on the already error-updated weights, entries
  are assigned with the H^-1 diagonal as metric, each quantized vector's error
  is fed forward through H^-1 as in GPTQ, and finally (m_step) the codebooks
  are refitted to minimise the layer's output error with assignments fixed.
"""
from __future__ import annotations

import numpy as np
import torch

from .configs import VQConfig
from .formats import VectorQuantized
from .hessian import prepare


def _init_centroids(x: torch.Tensor, k: int, method: str, gen: torch.Generator) -> torch.Tensor:
    """x [G, n, d] -> initial centroids [G, k, d]."""
    G, n, d = x.shape
    if method == "mahalanobis":
        # spread the entries over the points sorted by Mahalanobis distance from the mean
        xc = x - x.mean(dim=1, keepdim=True)
        sigma = xc.transpose(1, 2) @ xc / max(n, 1) + 1e-12 * torch.eye(d, dtype=x.dtype)
        dist = ((xc @ torch.linalg.pinv(sigma)) * xc).sum(-1)
        order = torch.argsort(dist, dim=1)
        idx = torch.round(torch.linspace(0, n - 1, k, dtype=torch.float64)).long()
        return torch.gather(x, 1, order[:, idx].unsqueeze(-1).expand(-1, -1, d)).clone()
    # k-means++ (seeded)
    cents = torch.empty(G, k, d, dtype=x.dtype)
    first = torch.randint(0, n, (G,), generator=gen)
    cents[:, 0] = x[torch.arange(G), first]
    best = ((x - cents[:, :1]) ** 2).sum(-1)
    for j in range(1, k):
        p = best / best.sum(dim=1, keepdim=True).clamp(min=1e-30)
        p = torch.where(p.sum(1, keepdim=True) > 0, p, torch.full_like(p, 1.0 / n))
        pick = torch.multinomial(p, 1, generator=gen).squeeze(1)
        cents[:, j] = x[torch.arange(G), pick]
        best = torch.minimum(best, ((x - cents[:, j:j + 1]) ** 2).sum(-1))
    return cents


def assign(x: torch.Tensor, cents: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Nearest entry under a per-coordinate weighted squared distance. x [G,n,d], cents [G,k,d] -> [G,n].

    """
    # sum_d w (x - c)^2 = sum_d w x^2 + [w, w x] . [c^2, -2 c]: one batched matmul with inner size 2d,
    # the first term being the same for every entry.
    ww = torch.ones_like(x) if w is None else w
    lhs = torch.cat([ww, ww * x], dim=-1)  # G, n, 2d
    rhs = torch.cat([cents * cents, -2.0 * cents], dim=-1).transpose(1, 2)  # G, 2d, k
    dist = torch.bmm(lhs, rhs)
    return dist.argmin(-1)


def weighted_kmeans(x: torch.Tensor, w: torch.Tensor | None, k: int, iters: int, init: str,
                    gen: torch.Generator) -> torch.Tensor:
    """EM k-means with per-coordinate weights; x and w [G, n, d] -> centroids [G, k, d] (float64)."""
    x32 = x.to(torch.float32)
    w32 = None if w is None else w.to(torch.float32)
    cents = _init_centroids(x32, k, init, gen)
    G, n, d = x32.shape
    ww = torch.ones_like(x32) if w32 is None else w32
    wx = (ww * x32).reshape(G * n, d)
    offset = (torch.arange(G) * k)[:, None]
    for _ in range(iters):
        a = (assign(x32, cents, w32) + offset).reshape(-1)
        num = torch.zeros(G * k, d).index_add_(0, a, wx).reshape(G, k, d)
        den = torch.zeros(G * k, d).index_add_(0, a, ww.reshape(G * n, d)).reshape(G, k, d)
        cents = torch.where(den > 0, num / den.clamp(min=1e-30), cents)  # empty clusters keep their entry
    return cents.to(torch.float64)


def quantize_codebooks(cents: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric `bits`-bit integer entries with one fp16 scale per codebook ([..., k, d])."""
    qmax = (1 << (bits - 1)) - 1
    scale = (cents.abs().amax(dim=(-1, -2)) / qmax).clamp(min=1e-8).to(torch.float16).to(cents.dtype)
    ints = torch.clamp(torch.round(cents / scale[..., None, None]), -qmax - 1, qmax)
    return ints, scale


def _blocks(n: int, size: int) -> list[tuple[int, int]]:
    return [(r, min(r + size, n)) for r in range(0, n, size)]


def _fit_column_group(W: torch.Tensor, c0: int, c1: int, cfg: VQConfig, col_w: torch.Tensor | None,
                      gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebooks (ints, scales) for every row block of columns [c0, c1)."""
    d, N = cfg.dim, W.shape[0]
    ints, scales = [], []
    full = N // cfg.group_rows * cfg.group_rows
    parts = [(0, full)] if full else []
    if full < N:
        parts.append((full, N))
    for r0, r1 in parts:
        rows = min(cfg.group_rows, r1 - r0)
        G = (r1 - r0) // rows
        x = W[r0:r1, c0:c1].reshape(G, rows, (c1 - c0) // d, d).reshape(G, -1, d)
        w = None
        if col_w is not None:
            w = col_w[c0:c1].reshape(1, 1, -1, d).expand(G, rows, -1, -1).reshape(G, -1, d)
        cents = weighted_kmeans(x, w, cfg.entries, cfg.kmeans_iters, cfg.init, gen)
        i, s = quantize_codebooks(cents, cfg.codebook_bits)
        ints.append(i)
        scales.append(s)
    return torch.cat(ints), torch.cat(scales)


def _decode(ints: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return ints * scales[..., None, None]


def _row_block_index(N: int, group_rows: int) -> torch.Tensor:
    return torch.arange(N) // group_rows


def _payload(codes, ints, scales, shape, cfg: VQConfig) -> VectorQuantized:
    dtype = np.int8 if cfg.codebook_bits <= 8 else np.int16
    return VectorQuantized(codes.to(torch.int64).numpy(), ints.to(torch.int64).numpy().astype(dtype),
                           scales.numpy().astype(np.float16), tuple(shape), cfg.dim, cfg.group_rows,
                           min(cfg.group_cols, shape[1]), cfg.bits * cfg.dim, cfg.codebook_bits)


def _check_shape(w: np.ndarray, cfg: VQConfig) -> None:
    from ..errors import ConfigError

    if w.ndim != 2 or w.shape[1] % cfg.dim:
        raise ConfigError(f"VQ needs a 2-D weight whose input size is a multiple of dim={cfg.dim}, got {w.shape}")
    gc = min(cfg.group_cols, w.shape[1])
    if w.shape[1] % gc or gc % cfg.dim:
        raise ConfigError(f"group_cols {cfg.group_cols} must divide the input size {w.shape[1]}")


def kmeans_vq_quantize(w: np.ndarray, h: np.ndarray | None = None, cfg: VQConfig = VQConfig()) -> VectorQuantized:
    """Plain k-means VQ: codebooks fitted on the weights, nearest-entry codes; `h` is unused."""
    w = np.asarray(w, np.float32)
    _check_shape(w, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    W = torch.as_tensor(w, dtype=torch.float64)
    N, K = W.shape
    gc, d = min(cfg.group_cols, K), cfg.dim
    rb = _row_block_index(N, cfg.group_rows)
    codes = torch.empty(N, K // d, dtype=torch.int64)
    all_ints, all_scales = [], []
    for c0, c1 in _blocks(K, gc):
        ints, scales = _fit_column_group(W, c0, c1, cfg, None, gen)
        cents = _decode(ints, scales)[rb]  # N, E, d
        x = W[:, c0:c1].reshape(N, -1, d)
        codes[:, c0 // d:c1 // d] = ((x.unsqueeze(2) - cents.unsqueeze(1)) ** 2).sum(-1).argmin(-1)
        all_ints.append(ints)
        all_scales.append(scales)
    return _payload(codes, torch.stack(all_ints, 1), torch.stack(all_scales, 1), (N, K), cfg)


def gptvq_quantize(w: np.ndarray, h: np.ndarray, cfg: VQConfig = VQConfig()) -> VectorQuantized:
    """GPTVQ: Hessian-weighted codebooks with GPTQ error feedback across columns."""
    w = np.asarray(w, np.float32)
    _check_shape(w, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    W, U = prepare(w, h, cfg.damp)
    N, K = W.shape
    gc, d = min(cfg.group_cols, K), cfg.dim
    bs = max(d, cfg.block_size // d * d)
    diag = torch.diag(U)
    col_w = 1.0 / diag ** 2 if cfg.hessian_weighted else None
    rb = _row_block_index(N, cfg.group_rows)
    rows = torch.arange(N)
    codes = torch.empty(N, K // d, dtype=torch.int64)
    all_ints, all_scales = [], []
    for c0, c1 in _blocks(K, gc):
        ints, scales = _fit_column_group(W, c0, c1, cfg, col_w, gen)
        cents = _decode(ints, scales)[rb]  # N, E, d
        all_ints.append(ints)
        all_scales.append(scales)
        for b0 in range(c0, c1, bs):
            b1 = min(b0 + bs, c1)
            W1 = W[:, b0:b1].clone()
            Err = torch.zeros_like(W1)
            for j in range(0, b1 - b0, d):
                v = W1[:, j:j + d]
                metric = (1.0 / diag[b0 + j:b0 + j + d] ** 2) if cfg.hessian_weighted else torch.ones(d, dtype=W.dtype)
                idx = (((v.unsqueeze(1) - cents) ** 2) * metric).sum(-1).argmin(-1)
                q = cents[rows, idx]
                codes[:, (b0 + j) // d] = idx
                for t in range(d):
                    col = b0 + j + t
                    err = (W1[:, j + t] - q[:, t]) / U[col, col]
                    W1[:, j + t:] -= err[:, None] * U[col, col:b1][None, :]
                    Err[:, j + t] = err
            W[:, b1:] -= Err @ U[b0:b1, b1:]
    payload = _payload(codes, torch.stack(all_ints, 1), torch.stack(all_scales, 1), (N, K), cfg)
    if cfg.m_step:
        payload = update_codebooks(payload, w, h)
    return payload


def update_codebooks(q: VectorQuantized, w: np.ndarray, h: np.ndarray, iters: int = 10) -> VectorQuantized:
    """Refit codebook entries (assignments fixed) to minimise tr(dW H dW^T), by conjugate gradients.

    The output error is quadratic in the entries, so CG with exact line
    search converges in few steps. Entries are then re-quantized to their
    bit width; the refit is kept only if it lowers the error.
    """
    from .hessian import output_error

    N, K = q.shape
    d = q.dim
    rb = torch.as_tensor(np.arange(N) // q.group_rows)[:, None].expand(N, K)
    cb = torch.as_tensor((np.arange(K) // q.group_cols))[None, :].expand(N, K)
    e = torch.as_tensor(q.codes).repeat_interleave(d, dim=1)
    t = torch.as_tensor(np.arange(K) % d)[None, :].expand(N, K)
    R, C, E, _ = q.codebooks.shape
    flat = ((rb * C + cb) * E + e) * d + t  # index of each weight's entry in the flattened codebooks
    H = torch.as_tensor(np.asarray(h, np.float64))
    H = H + torch.eye(K, dtype=H.dtype) * 1e-8 * torch.mean(torch.diag(H)).clamp(min=1e-30)
    W = torch.as_tensor(np.asarray(w, np.float64))

    def D(c):  # codebooks -> weight
        return c[flat]

    def Dt(m):  # weight-shaped -> codebook gradient (adjoint of D)
        return torch.zeros(R * C * E * d, dtype=m.dtype).index_add_(0, flat.reshape(-1), m.reshape(-1))

    c = torch.as_tensor(q.decoded_codebooks(), dtype=torch.float64).reshape(-1)
    r = Dt((W - D(c)) @ H)  # negative half-gradient
    p = r.clone()
    rs = float(r @ r)
    for _ in range(iters):
        if rs < 1e-30:
            break
        Ap = Dt(D(p) @ H)
        pAp = float(p @ Ap)
        if pAp <= 0:
            break
        alpha = rs / pAp
        c = c + alpha * p
        r = r - alpha * Ap
        rs_new = float(r @ r)
        p = r + (rs_new / rs) * p
        rs = rs_new
    ints, scales = quantize_codebooks(c.reshape(R, C, E, d), q.codebook_bits)
    dtype = q.codebooks.dtype
    refit = VectorQuantized(q.codes, ints.numpy().astype(dtype), scales.numpy().astype(np.float16), q.shape, d,
                            q.group_rows, q.group_cols, q.index_bits, q.codebook_bits)
    return refit if output_error(w, refit.dequantize(), h) < output_error(w, q.dequantize(), h) else q
