"""`report`: one self-contained HTML page that shows what `quantize` decided and why.

From the JSON report of `quantize` (and the fp model it names, for weight
histograms): the proxies of every weight against the thresholds, the SQ/VQ
map over layers, histograms of the most uniform and least uniform weights,
and the output error per tensor. Plots are matplotlib PNGs embedded in the page.
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


def build_report_html(report_path: str | Path, out_path: str | Path, histograms: int = 2) -> Path:
    """Write the HTML report; returns its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("matplotlib", "pip install matplotlib (or rwkvq-onnx[report])") from None
    from .atomic import write_text

    report = load_report(report_path)
    opts = report.get("options", {})
    tau_c, tau_f = opts.get("tau_c", 1.5), opts.get("tau_f", 50.0)
    rows = {n: r for n, r in report["tensors"].items() if r.get("kind") in ("sq", "vq")}
    if not rows:
        raise ConfigError("the report lists no quantized linear weights", report_path)
    names = sorted(rows, key=lambda n: _layer_and_kind(n))
    colors = {"sq": "#1f77b4", "vq": "#d62728"}
    figs = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in ("sq", "vq"):
        pts = [(rows[n]["proxy_coarse"], max(rows[n]["proxy_fine"], 1e-3)) for n in names if rows[n]["kind"] == kind]
        if pts:
            ax.scatter(*zip(*pts), s=18, c=colors[kind], label=f"{kind.upper()} ({len(pts)})", alpha=0.8)
    ax.axvline(tau_c, color="k", ls="--", lw=1)
    ax.axhline(tau_f, color="k", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel(f"coarse proxy P_c (tau_c = {tau_c:g}, dashed)")
    ax.set_ylabel(f"fine proxy P_f (tau_f = {tau_f:g}, dotted)")
    ax.set_title("Per-weight proxies and the method chosen")
    ax.legend()
    figs.append(("Proxies against the thresholds", _png(fig)))

    layers = sorted({_layer_and_kind(n)[0] for n in names})
    kinds = sorted({_layer_and_kind(n)[1] for n in names})
    grid = np.full((len(kinds), len(layers)), np.nan)
    for n in names:
        layer, kind = _layer_and_kind(n)
        grid[kinds.index(kind), layers.index(layer)] = 1.0 if rows[n]["kind"] == "vq" else 0.0
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(layers) + 3), 0.32 * len(kinds) + 1.5))
    ax.imshow(grid, cmap=matplotlib.colors.ListedColormap([colors["sq"], colors["vq"]]), vmin=0, vmax=1,
              aspect="auto")
    ax.set_xticks(range(len(layers)), [str(x) for x in layers])
    ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
    ax.set_xlabel("layer")
    ax.set_title("SQ (blue) / VQ (red) over the model")
    figs.append(("Method map", _png(fig)))

    fig, ax = plt.subplots(figsize=(max(6, 0.08 * len(names) + 3), 3.5))
    errs = [rows[n].get("rel_output_error", np.nan) for n in names]
    ax.bar(range(len(names)), errs, color=[colors[rows[n]["kind"]] for n in names])
    ax.set_yscale("log")
    ax.set_xlabel("tensor (layer order)")
    ax.set_ylabel("relative output error on calibration data")
    figs.append(("Error per tensor", _png(fig)))

    model_path = Path(report.get("input", ""))
    if histograms and model_path.is_file():
        import onnx
        from onnx import numpy_helper

        weights = {t.name: t for t in onnx.load(model_path).graph.initializer}
        by_coarse = sorted(names, key=lambda n: rows[n]["proxy_coarse"])
        picks = by_coarse[:histograms] + by_coarse[-histograms:]
        fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks), 2.8))
        for ax, n in zip(np.atleast_1d(axes), picks):
            if n in weights:
                ax.hist(numpy_helper.to_array(weights[n]).reshape(-1), bins=120, color=colors[rows[n]["kind"]])
            ax.set_title(f"{n}\nP_c={rows[n]['proxy_coarse']:.2f} -> {rows[n]['kind'].upper()}", fontsize=8)
            ax.tick_params(labelsize=7)
        figs.append(("Most uniform (left) vs least uniform (right) weights", _png(fig)))

    t = report["totals"]
    table = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{rows[n]['method']}</td><td>{rows[n]['proxy_coarse']:.3f}</td>"
        f"<td>{rows[n]['proxy_fine']:.3g}</td><td>{rows[n]['bpw']:.3f}</td>"
        f"<td>{rows[n].get('rel_output_error', float('nan')):.2e}</td></tr>" for n in names)
    body = "".join(f"<h2>{html.escape(title)}</h2><img src='data:image/png;base64,{png}'>" for title, png in figs)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>rwkvq-onnx report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}td,th{{padding:2px 8px;font-size:12px}}
img{{max-width:100%}}</style></head><body>
<h1>rwkvq-onnx quantization report</h1>
<p>{html.escape(str(report.get('input')))} &rarr; {html.escape(str(report.get('output')))};
method <b>{html.escape(str(opts.get('method')))}</b>, bpw {t['bpw']:.4f}
(target {t.get('bpw_target')}), methods {html.escape(json.dumps(t.get('methods')))},
stored {t['quantized_weights_stored_bits_per_weight']:.3f} bits/weight.</p>
{body}
<h2>Per tensor</h2><table><tr><th>tensor</th><th>method</th><th>P_c</th><th>P_f</th><th>bpw</th>
<th>rel. output error</th></tr>{table}</table></body></html>
"""
    write_text(out_path, page)
    return Path(out_path)
