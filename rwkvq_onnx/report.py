"""`report`: one self-contained HTML page that shows what `quantize` decided and why.

From the JSON report of `quantize` (and the fp model it names, for weight
histograms): the decision rule in words, the proxies of every weight against
the thresholds, the method map over layers (every colour in a legend), the
histograms of the most and least uniform weights, and the output error per
tensor. Plots are matplotlib PNGs embedded in the page.

The report's keys are read defensively: only `tensors` and `totals` are
required; a tensor without `proxy_coarse`/`proxy_fine` (a baseline method)
is left out of the proxy plot, not an error.
"""
from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path

import numpy as np

from .errors import ConfigError, MissingDependencyError


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _layer_and_kind(name: str) -> tuple[int, str]:
    m = re.match(r"blocks\.(\d+)\.(.+?)(\.weight)?$", name)
    return (int(m.group(1)), m.group(2)) if m else (-1, name)


def load_report(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("no such report", path)
    try:
        report = json.loads(path.read_text())
        report["tensors"], report["totals"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ConfigError("not a `rwkvq-onnx quantize --report` JSON file", path) from None
    return report


# One colour per (kind, algorithm): scalar methods in blues, vector methods in reds.
KIND_PALETTES = {"sq": ["#1f77b4", "#6baed6", "#08306b", "#9ecae1"], "vq": ["#d62728", "#fc9272", "#67000d", "#fb6a4a"]}
KIND_WORDS = {"sq": "scalar (SQ)", "vq": "vector (VQ)"}
MISSING_COLOUR = "#d9d9d9"  # a weight that this layer does not have


def methods_text(methods: dict[str, int]) -> str:
    """{'gptvq': 54, 'gptq': 4} -> 'GPTVQ 54 tensors, GPTQ 4 tensors' (for people, not Python)."""
    return ", ".join(f"{name.upper()} {count} tensor{'s' if count != 1 else ''}"
                     for name, count in sorted(methods.items(), key=lambda kv: -kv[1])) or "none"


def _number(row: dict, key: str) -> float | None:
    value = row.get(key)
    return float(value) if isinstance(value, (int, float)) and value == value else None


def categories(rows: dict[str, dict]) -> dict[tuple[str, str], str]:
    """(kind, algorithm) -> colour, for the categories present: the colours the page may show."""
    out: dict[tuple[str, str], str] = {}
    for kind in ("sq", "vq"):
        algos = sorted({str(r.get("method", kind)) for r in rows.values() if r.get("kind") == kind})
        for i, algo in enumerate(algos):
            out[(kind, algo)] = KIND_PALETTES[kind][i % len(KIND_PALETTES[kind])]
    return out


def category_label(kind: str, algo: str) -> str:
    return f"{KIND_WORDS[kind]}, {algo.upper()}"


def fixed_threshold_method(row: dict, tau_c: float, tau_f: float) -> str | None:
    """What the proxy alone decides: 'sq' iff P_c < tau_c and P_f < tau_f, else 'vq'; None without proxies."""
    pc, pf = _number(row, "proxy_coarse"), _number(row, "proxy_fine")
    if pc is None or pf is None:
        return None
    return "sq" if pc < tau_c and pf < tau_f else "vq"


def decision_prose(report: dict, rows: dict[str, dict], tau_c: float, tau_f: float) -> list[str]:
    """Paragraphs (plain text) that explain the decision rule and what it did on this model."""
    opts = report.get("options", {}) or {}
    totals = report.get("totals", {}) or {}
    method = str(opts.get("method", "rwkvquant"))
    target = totals.get("bpw_target", opts.get("bpw"))
    n = len(rows)
    n_sq = sum(r.get("kind") == "sq" for r in rows.values())
    if method != "rwkvquant":
        return [f"Method {method.upper()} quantizes every linear weight the same way ({n} weights: "
                f"{n_sq} scalar, {n - n_sq} vector); the proxies below are shown for comparison only, they "
                f"decided nothing."]
    fixed = {name: fixed_threshold_method(r, tau_c, tau_f) for name, r in rows.items()}
    fixed_sq = sum(m == "sq" for m in fixed.values())
    coarse_low = sum((_number(r, "proxy_coarse") or float("inf")) < tau_c for r in rows.values())
    fine_low = sum((_number(r, "proxy_fine") or float("inf")) < tau_f for r in rows.values())
    out = [
        "RWKVQuant measures how uniform each weight's values are with two proxies. The coarse proxy P_c is "
        "low for weights whose values spread evenly (few outliers); the fine proxy P_f is low when, in "
        "addition, no fine-grained clusters stand out. Uniform weights lose little to scalar quantization "
        "(GPTQ, SQ); clustered or outlier-heavy weights are better served by a vector codebook (GPTVQ, VQ).",
        f"Rule at fixed thresholds: SQ if and only if P_c < tau_c = {tau_c:g} and P_f < tau_f = {tau_f:g}; "
        f"otherwise VQ. On this model {coarse_low} of {n} weights have P_c below tau_c, {fine_low} have P_f "
        f"below tau_f, and {fixed_sq} have both, so the thresholds alone would give {fixed_sq} SQ and "
        f"{n - fixed_sq} VQ.",
    ]
    if target is not None:
        moved = sum(1 for name, r in rows.items() if fixed[name] is not None and fixed[name] != r.get("kind"))
        out.append(
            f"With a bits-per-weight target ({float(target):g}) the thresholds only rank: every weight gets the "
            f"score max(P_c / tau_c, log(1 + P_f) / log(1 + tau_f)), which is 1 or more exactly when the rule "
            f"above says VQ; weights go to VQ in order of decreasing score, and the number of VQ weights is the "
            f"one closest to the thresholds' own count that meets the target (VQ codebook sizes fine-tune the "
            f"bits). Here that gives {n_sq} SQ and {n - n_sq} VQ; {moved} weight(s) differ from the "
            f"fixed-threshold decision (outlined in black in the plot).")
    else:
        out.append(f"No bits-per-weight target was given, so the rule decided alone: {n_sq} SQ, {n - n_sq} VQ.")
    return out


def build_report_html(report_path: str | Path, out_path: str | Path, histograms: int = 2) -> Path:
    """Write the HTML report; returns its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch, Rectangle
    except ImportError:
        raise MissingDependencyError("matplotlib", "pip install matplotlib (or rwkvq-onnx[report])") from None
    from .atomic import write_text

    report = load_report(report_path)
    opts = report.get("options", {}) or {}
    tau_c, tau_f = float(opts.get("tau_c") or 1.5), float(opts.get("tau_f") or 50.0)
    rows = {n: r for n, r in report["tensors"].items() if isinstance(r, dict) and r.get("kind") in ("sq", "vq")}
    if not rows:
        raise ConfigError("the report lists no quantized linear weights", report_path)
    names = sorted(rows, key=lambda n: _layer_and_kind(n))
    palette = categories(rows)

    def colour(name: str) -> str:
        r = rows[name]
        return palette[(r["kind"], str(r.get("method", r["kind"])))]

    figs = []
    with_proxies = [n for n in names if fixed_threshold_method(rows[n], tau_c, tau_f) is not None]
    if with_proxies:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        pcs = [_number(rows[n], "proxy_coarse") for n in with_proxies]
        pfs = [max(_number(rows[n], "proxy_fine"), 1e-3) for n in with_proxies]
        x_hi = max(max(pcs), tau_c) * 1.1
        y_lo, y_hi = min(min(pfs), tau_f) / 2, max(max(pfs), tau_f) * 2
        ax.add_patch(Rectangle((0, y_lo), tau_c, tau_f - y_lo, color="#deebf7", zorder=0))
        for (kind, algo), col in palette.items():
            pts = [(pc, pf) for n, pc, pf in zip(with_proxies, pcs, pfs)
                   if rows[n]["kind"] == kind and str(rows[n].get("method", kind)) == algo]
            if pts:
                ax.scatter(*zip(*pts), s=22, c=col, alpha=0.85, zorder=2)
        moved = [(pc, pf) for n, pc, pf in zip(with_proxies, pcs, pfs)
                 if fixed_threshold_method(rows[n], tau_c, tau_f) != rows[n]["kind"]]
        if moved:
            ax.scatter(*zip(*moved), s=60, facecolors="none", edgecolors="k", linewidths=1.0, zorder=3)
        ax.axvline(tau_c, color="k", ls="--", lw=1)
        ax.axhline(tau_f, color="k", ls=":", lw=1)
        ax.set_xlim(0, x_hi)
        ax.set_ylim(y_lo, y_hi)
        ax.set_yscale("log")
        ax.set_xlabel(f"coarse proxy P_c (threshold tau_c = {tau_c:g}, dashed line)")
        ax.set_ylabel(f"fine proxy P_f (threshold tau_f = {tau_f:g}, dotted line)")
        ax.set_title("Each weight's proxies against the thresholds")
        counts = {cat: sum(1 for n in names if (rows[n]["kind"], str(rows[n].get("method", rows[n]["kind"]))) == cat)
                  for cat in palette}
        handles = [Patch(color=col, label=f"{category_label(*cat)} ({counts[cat]})") for cat, col in palette.items()]
        handles.append(Patch(color="#deebf7", label="SQ region at fixed thresholds (P_c < tau_c and P_f < tau_f)"))
        if moved:
            handles.append(plt.Line2D([], [], marker="o", ls="", markerfacecolor="none", markeredgecolor="k",
                                      label=f"chosen against the fixed thresholds, for the bpw target ({len(moved)})"))
        ax.legend(handles=handles, fontsize=7, loc="best")
        figs.append(("Proxies against the thresholds", _png(fig)))

    layers = sorted({_layer_and_kind(n)[0] for n in names})
    kinds = sorted({_layer_and_kind(n)[1] for n in names})
    cats = list(palette)
    grid = np.full((len(kinds), len(layers)), np.nan)
    for n in names:
        layer, kind = _layer_and_kind(n)
        grid[kinds.index(kind), layers.index(layer)] = cats.index((rows[n]["kind"],
                                                                   str(rows[n].get("method", rows[n]["kind"]))))
    cmap = matplotlib.colors.ListedColormap([palette[c] for c in cats]).with_extremes(bad=MISSING_COLOUR)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(layers) + 4.5), 0.32 * len(kinds) + 1.8))
    ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-0.5, vmax=len(cats) - 0.5, aspect="auto",
              interpolation="nearest")
    ax.set_xticks(range(len(layers)), [str(x) for x in layers])
    ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
    ax.set_xlabel("layer")
    legend = [Patch(color=palette[c], label=category_label(*c)) for c in cats]
    if np.isnan(grid).any():
        legend.append(Patch(color=MISSING_COLOUR, label="no such weight in this layer"))
    ax.legend(handles=legend, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(map_title(palette, bool(np.isnan(grid).any())), fontsize=9)
    figs.append(("Method map", _png(fig)))

    fig, ax = plt.subplots(figsize=(max(6, 0.08 * len(names) + 3), 3.5))
    errs = [_number(rows[n], "rel_output_error") for n in names]
    ax.bar(range(len(names)), [np.nan if e is None else e for e in errs], color=[colour(n) for n in names])
    ax.set_yscale("log")
    ax.set_xlabel("tensor (layer order)")
    ax.set_ylabel("relative output error on calibration data")
    ax.legend(handles=[Patch(color=palette[c], label=category_label(*c)) for c in cats], fontsize=7)
    figs.append(("Error per tensor", _png(fig)))

    model_path = Path(str(report.get("input", "")))
    coarse_known = [n for n in names if _number(rows[n], "proxy_coarse") is not None]
    if histograms and model_path.is_file() and coarse_known:
        import onnx
        from onnx import numpy_helper

        weights = {t.name: t for t in onnx.load(model_path).graph.initializer}
        by_coarse = sorted(coarse_known, key=lambda n: rows[n]["proxy_coarse"])
        picks = list(dict.fromkeys(by_coarse[:histograms] + by_coarse[-histograms:]))
        fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks), 2.8))
        for ax, n in zip(np.atleast_1d(axes), picks):
            if n in weights:
                ax.hist(numpy_helper.to_array(weights[n]).reshape(-1), bins=120, color=colour(n))
            ax.set_title(f"{n}\nP_c={rows[n]['proxy_coarse']:.2f} -> {rows[n]['kind'].upper()}", fontsize=8)
            ax.tick_params(labelsize=7)
        figs.append(("Most uniform (left) vs least uniform (right) weights, by P_c", _png(fig)))

    t = report["totals"]

    def cell(name: str, key: str, fmt: str) -> str:
        value = _number(rows[name], key)
        return "&ndash;" if value is None else format(value, fmt)

    table = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{html.escape(str(rows[n].get('method', rows[n]['kind'])))}</td>"
        f"<td>{cell(n, 'proxy_coarse', '.3f')}</td><td>{cell(n, 'proxy_fine', '.3g')}</td>"
        f"<td>{cell(n, 'bpw', '.3f')}</td><td>{cell(n, 'rel_output_error', '.2e')}</td></tr>" for n in names)
    prose = "".join(f"<p>{html.escape(p)}</p>" for p in decision_prose(report, rows, tau_c, tau_f))
    body = "".join(f"<h2>{html.escape(title)}</h2><img src='data:image/png;base64,{png}'>" for title, png in figs)
    bpw = _number(t, "bpw")
    stored = _number(t, "quantized_weights_stored_bits_per_weight")
    target = t.get("bpw_target")
    summary = (f"method <b>{html.escape(str(opts.get('method', '?')))}</b>"
               + (f", bpw {bpw:.4f}" if bpw is not None else "")
               + (f" (target {html.escape(str(target))})" if target is not None else " (no target)")
               + (f"; {html.escape(methods_text(t['methods']))}" if isinstance(t.get("methods"), dict) else "")
               + (f"; stored {stored:.3f} bits/weight" if stored is not None else ""))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>rwkvq-onnx report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}td,th{{padding:2px 8px;font-size:12px}}
img{{max-width:100%}}</style></head><body>
<h1>rwkvq-onnx quantization report</h1>
<p>{html.escape(str(report.get('input')))} &rarr; {html.escape(str(report.get('output')))}; {summary}.</p>
<h2>What the proxy decided, and why</h2>
{prose}
{body}
<h2>Per tensor</h2><table><tr><th>tensor</th><th>method</th><th>P_c</th><th>P_f</th><th>bpw</th>
<th>rel. output error</th></tr>{table}</table></body></html>
"""
    write_text(out_path, page)
    return Path(out_path)


def map_title(palette: dict[tuple[str, str], str], has_missing: bool) -> str:
    """The method map's title, naming exactly the colours it shows."""
    parts = [f"{category_label(*c)} = {colour_word(col)}" for c, col in palette.items()]
    if has_missing:
        parts.append(f"no such weight = {colour_word(MISSING_COLOUR)}")
    return "Method per weight: " + "; ".join(parts)


def colour_word(hex_colour: str) -> str:
    """A name a reader can match against the plot: the palette's colours in words."""
    words = {"#1f77b4": "blue", "#6baed6": "light blue", "#08306b": "dark blue", "#9ecae1": "pale blue",
             "#d62728": "red", "#fc9272": "salmon", "#67000d": "dark red", "#fb6a4a": "light red",
             MISSING_COLOUR: "grey"}
    return words.get(hex_colour, hex_colour)
