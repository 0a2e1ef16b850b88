"""Per-tensor SQ/VQ plan that meets a bits-per-weight target while following the proxy's ranking.

Each tensor gets one score from the coarse-to-fine proxy,
`max(P_c / tau_c, log1p(P_f) / log1p(tau_f))`; with fixed thresholds a tensor
goes to VQ exactly when its score is >= 1. To meet a bpw target the planner
sends the k highest-scoring tensors to VQ (so the split always follows the
ranking, like lowering or raising both thresholds together) and tunes the VQ
codebook block height (rows per codebook), which sets the codebook overhead,
so the weight-count-weighted mean bpw lands on the target. Among the k that
can land within tolerance, the one nearest the fixed-threshold decision wins.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..errors import BudgetError
from .configs import ScalarConfig, VQConfig
from .proxy import TAU_C, TAU_F, ProxyValues


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, int]  # [N, K] (out, in)
    proxy: ProxyValues

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass(frozen=True)
class PlanEntry:
    name: str
    method: str  # "sq" | "vq"
    config: ScalarConfig | VQConfig
    bpw: float
    score: float


@dataclass(frozen=True)
class Plan:
    entries: tuple[PlanEntry, ...]
    bpw: float
    target: float | None
    vq_count: int
    threshold_vq_count: int

    def by_name(self) -> dict[str, PlanEntry]:
        return {e.name: e for e in self.entries}


def proxy_score(p: ProxyValues, tau_c: float = TAU_C, tau_f: float = TAU_F) -> float:
    """>= 1 exactly when `select_method` says VQ at these thresholds."""
    return max(p.coarse / tau_c, math.log1p(max(p.fine, 0.0)) / math.log1p(tau_f))


def vq_eligible(t: TensorInfo, vq: VQConfig) -> bool:
    k = t.shape[1]
    gc = min(vq.group_cols, k)
    return k % vq.dim == 0 and k % gc == 0 and gc % vq.dim == 0


def _bits(t: TensorInfo, method: str, sq: ScalarConfig, vq: VQConfig, rows: int | None = None) -> float:
    cfg = replace(vq, group_rows=rows) if method == "vq" else sq
    return cfg.bpw(*t.shape) * t.numel


def plan_fixed(tensors: list[TensorInfo], sq: ScalarConfig, vq: VQConfig, tau_c: float = TAU_C,
               tau_f: float = TAU_F) -> Plan:
    """The proxy's own decision at fixed thresholds (no bpw target)."""
    entries = []
    for t in tensors:
        s = proxy_score(t.proxy, tau_c, tau_f)
        use_vq = s >= 1 and vq_eligible(t, vq)
        cfg = vq if use_vq else sq
        entries.append(PlanEntry(t.name, "vq" if use_vq else "sq", cfg, cfg.bpw(*t.shape), s))
    n = sum(t.numel for t in tensors)
    total = sum(e.bpw * t.numel for e, t in zip(entries, tensors)) / n
    k = sum(e.method == "vq" for e in entries)
    return Plan(tuple(entries), total, None, k, k)


def plan_for_budget(tensors: list[TensorInfo], target: float, sq: ScalarConfig, vq: VQConfig,
                    tau_c: float = TAU_C, tau_f: float = TAU_F, tol: float = 0.002,
                    max_group_rows: int = 4096, ranking: dict[str, float] | None = None) -> Plan:
    """Choose SQ or VQ per tensor (and VQ codebook block heights) so the mean bpw meets `target`.

    `ranking` (higher = more deserving of VQ) replaces the proxy's order for ablations; how many tensors
    go to VQ still prefers the proxy's fixed-threshold count, so only *which* tensors changes.
    """
    if not tensors:
        raise BudgetError("no tensors to quantize")
    scores = {t.name: proxy_score(t.proxy, tau_c, tau_f) for t in tensors}
    k0 = sum(scores[t.name] >= 1 for t in tensors if vq_eligible(t, vq))
    order = ranking if ranking is not None else scores
    ranked = sorted((t for t in tensors if vq_eligible(t, vq)), key=lambda t: -order[t.name])
    n_total = sum(t.numel for t in tensors)
    target_bits = target * n_total
    sq_bits = {t.name: _bits(t, "sq", sq, vq) for t in tensors}
    lo_hi = []  # achievable [min, max] total bits for each k (codebook rows from max_group_rows to 1)
    base = sum(sq_bits.values())
    lo = hi = base
    lo_hi.append((lo, hi))
    for t in ranked:
        lo += _bits(t, "vq", sq, vq, min(max_group_rows, t.shape[0])) - sq_bits[t.name]
        hi += _bits(t, "vq", sq, vq, 1) - sq_bits[t.name]
        lo_hi.append((lo, hi))
    order = sorted(range(len(ranked) + 1), key=lambda k: abs(k - k0))
    for k in order:
        lo, hi = lo_hi[k]
        if not lo - tol * n_total <= target_bits <= hi + tol * n_total:
            continue
        vq_ts = ranked[:k]
        rows, total_bits = solve_codebook_rows(vq_ts, target_bits - sum(sq_bits[t.name] for t in tensors
                                                                  if t not in vq_ts), sq, vq, max_group_rows)
        total_bits += sum(sq_bits[t.name] for t in tensors if t not in vq_ts)
        if abs(total_bits - target_bits) <= tol * n_total:
            break
    else:
        achieved = [x / n_total for pair in lo_hi for x in pair]
        raise BudgetError(f"bpw target {target} cannot be met with {sq.bits}-bit SQ and {vq.bits}-bit VQ "
                          f"(achievable about {min(achieved):.3f} .. {max(achieved):.3f}); "
                          f"change --bpw or the bit widths")
    vq_names = {t.name for t in vq_ts}
    entries = []
    for t in tensors:
        m = "vq" if t.name in vq_names else "sq"
        cfg = replace(vq, group_rows=rows[t.name]) if m == "vq" else sq
        entries.append(PlanEntry(t.name, m, cfg, cfg.bpw(*t.shape), scores[t.name]))
    return Plan(tuple(entries), total_bits / n_total, target, k, k0)


def solve_codebook_rows(vq_ts: list[TensorInfo], budget_bits: float, sq, vq, max_rows) -> tuple[dict[str, int], float]:
    """Rows per codebook for the VQ tensors so their bits sum to `budget_bits`: a common height, then nudges."""
    if not vq_ts:
        return {}, 0.0
    candidates = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024,
                  1536, 2048, 3072, 4096]
    candidates = [r for r in candidates if r <= max_rows]
    best_r = min(candidates, key=lambda r: abs(sum(_bits(t, "vq", sq, vq, r) for t in vq_ts) - budget_bits))
    rows = {t.name: best_r for t in vq_ts}
    bits = {t.name: _bits(t, "vq", sq, vq, best_r) for t in vq_ts}
    total = sum(bits.values())
    for t in sorted(vq_ts, key=lambda t: -t.numel):  # fine landing: nudge single tensors
        for _ in range(256):
            r = rows[t.name]
            options = [x for x in {r - 1, r + 1, r * 2, r // 2} if 1 <= x <= min(max_rows, t.shape[0])]
            trials = [(abs(total - bits[t.name] + _bits(t, "vq", sq, vq, x) - budget_bits), x) for x in options]
            if not trials or min(trials)[0] >= abs(total - budget_bits):
                break
            x = min(trials)[1]
            new = _bits(t, "vq", sq, vq, x)
            total += new - bits[t.name]
            bits[t.name], rows[t.name] = new, x
    return rows, total
