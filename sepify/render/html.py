"""A self-contained HTML report: audit table, per-layer MACs before/after, spectra, drift per
layer, trade-off curve.  Plots are inline SVG drawn here (no plotting library, no external file,
script or font): the page can be mailed or archived as one file.
"""

from __future__ import annotations

import html
import math
import time
from typing import Any, Sequence

from ..version import __version__
from .text import human

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")
SCHEME_PALETTE = ("#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#bcbd22", "#e377c2")


def scheme_color(name: str) -> str:
    """A stable colour per registered scheme (registry order), so a new scheme needs no entry here."""
    from ..core.schemes import names

    known = names()
    return SCHEME_PALETTE[known.index(name) % len(SCHEME_PALETTE)] if name in known else "#7f7f7f"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#666;font-size:12px} table{border-collapse:collapse;font-size:12px;margin:8px 0;width:100%}
th,td{border-bottom:1px solid #eee;padding:3px 6px;text-align:right;white-space:nowrap}
th{background:#f6f6f6;position:sticky;top:0} td.l,th.l{text-align:left;white-space:normal;word-break:break-all}
.kpi{display:inline-block;margin:6px 18px 6px 0;padding:8px 12px;background:#f6f8fa;border-radius:6px}
.kpi b{display:block;font-size:18px} .grid{display:flex;flex-wrap:wrap;gap:10px}
.note{color:#8a6d3b;background:#fcf8e3;padding:6px 10px;border-radius:4px;font-size:12px}
svg text{font-family:system-ui,sans-serif} .small{font-size:11px;color:#666}
"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v: float | None, spec: str = ".3g") -> str:
    if v is None:
        return ""
    if isinstance(v, float) and not math.isfinite(v):
        return "∞" if v > 0 else "−∞"
    return format(v, spec)


# ----------------------------------------------------------------------------------------------
# SVG plots
# ----------------------------------------------------------------------------------------------
def _ticks(lo: float, hi: float, log: bool, n: int = 5) -> list[float]:
    if log:
        a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        step = max(1, (b - a) // 6 + 1)
        return [10.0 ** k for k in range(a, b + 1, step)]
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    out, v = [], start
    while v <= hi + 1e-12 * abs(hi):
        out.append(round(v, 12))
        v += step
    return out


def line_chart(series: Sequence[dict], *, width: int = 520, height: int = 300, xlabel: str = "", ylabel: str = "",
               logy: bool = False, invert_x: bool = False, title: str = "") -> str:
    """An SVG line chart.  ``series``: dicts with ``x``, ``y`` (lists), ``label``, optional ``color``,
    ``dash`` (bool) and ``marker`` (bool)."""
    pts = [(x, y) for s in series for x, y in zip(s["x"], s["y"]) if y is not None and x is not None
           and math.isfinite(x) and math.isfinite(y) and (not logy or y > 0)]
    if not pts:
        return f'<svg width="{width}" height="40"><text x="4" y="20" font-size="12">{_e(title)}: no data</text></svg>'
    ml, mr, mt, mb = 62, 14, 26 if title else 12, 40
    w, h = width - ml - mr, height - mt - mb
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    if x0 == x1:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if logy:
        y0, y1 = min(ys), max(ys)
        y0, y1 = 10 ** math.floor(math.log10(y0)), 10 ** math.ceil(math.log10(y1))
        if y0 == y1:
            y1 = y0 * 10
    else:
        y0, y1 = min(0.0, min(ys)), max(ys)
        if y0 == y1:
            y1 = y0 + 1
        y1 += 0.05 * (y1 - y0)

    def px(x):
        f = (x - x0) / (x1 - x0)
        return ml + (1 - f if invert_x else f) * w

    def py(y):
        f = (math.log10(y) - math.log10(y0)) / (math.log10(y1) - math.log10(y0)) if logy else (y - y0) / (y1 - y0)
        return mt + (1 - f) * h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
           f'<rect x="{ml}" y="{mt}" width="{w}" height="{h}" fill="#fff" stroke="#bbb"/>']
    if title:
        out.append(f'<text x="{ml}" y="16" font-size="12" font-weight="600">{_e(title)}</text>')
    for t in _ticks(y0, y1, logy):
        if not (y0 <= t <= y1):
            continue
        y = py(t)
        out.append(f'<line x1="{ml}" y1="{y:.1f}" x2="{ml + w}" y2="{y:.1f}" stroke="#eee"/>')
        label = f"1e{int(round(math.log10(t)))}" if logy else f"{t:g}"
        out.append(f'<text x="{ml - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{label}</text>')
    for t in _ticks(x0, x1, False):
        x = px(t)
        out.append(f'<line x1="{x:.1f}" y1="{mt}" x2="{x:.1f}" y2="{mt + h}" stroke="#f3f3f3"/>')
        out.append(f'<text x="{x:.1f}" y="{mt + h + 14}" font-size="10" text-anchor="middle">{t:g}</text>')
    out.append(f'<text x="{ml + w / 2}" y="{height - 6}" font-size="11" text-anchor="middle">{_e(xlabel)}</text>')
    out.append(f'<text x="12" y="{mt + h / 2}" font-size="11" text-anchor="middle" '
               f'transform="rotate(-90 12 {mt + h / 2})">{_e(ylabel)}</text>')
    for i, s in enumerate(series):
        color = s.get("color") or PALETTE[i % len(PALETTE)]
        p = [(px(x), py(y)) for x, y in zip(s["x"], s["y"]) if y is not None and x is not None
             and math.isfinite(x) and math.isfinite(y) and (not logy or y > 0)]
        if not p:
            continue
        dash = ' stroke-dasharray="5,3"' if s.get("dash") else ""
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8"{dash} points="'
                   + " ".join(f"{a:.1f},{b:.1f}" for a, b in p) + '"/>')
        if s.get("marker", True):
            out.extend(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.6" fill="{color}"/>' for a, b in p)
    ly = mt + 6
    for i, s in enumerate(series):
        if not s.get("label"):
            continue
        color = s.get("color") or PALETTE[i % len(PALETTE)]
        dash = ' stroke-dasharray="5,3"' if s.get("dash") else ""
        out.append(f'<line x1="{ml + 8}" y1="{ly + 4}" x2="{ml + 28}" y2="{ly + 4}" stroke="{color}" '
                   f'stroke-width="2"{dash}/><text x="{ml + 32}" y="{ly + 8}" font-size="10">{_e(s["label"])}</text>')
        ly += 13
    out.append("</svg>")
    return "".join(out)


def bar_chart(rows: Sequence[tuple[str, float, float | None]], *, width: int = 1100, label_width: int = 300,
              title: str = "") -> str:
    """Horizontal bars per layer: before (grey) and after (blue, when rewritten)."""
    if not rows:
        return ""
    bar_h, gap, top = 9, 5, 24 if title else 6
    height = top + len(rows) * (2 * bar_h + gap) + 20
    top_value = max(max(b for _, b, _ in rows), 1)
    w = width - label_width - 90
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">']
    if title:
        out.append(f'<text x="4" y="15" font-size="12" font-weight="600">{_e(title)}</text>')
    y = top
    for name, before, after in rows:
        short = name if len(name) <= 48 else "…" + name[-47:]
        out.append(f'<text x="{label_width - 6}" y="{y + bar_h + 3}" font-size="10" text-anchor="end">{_e(short)}</text>')
        bw = w * before / top_value
        out.append(f'<rect x="{label_width}" y="{y}" width="{bw:.1f}" height="{bar_h}" fill="#c7c7c7"/>')
        out.append(f'<text x="{label_width + bw + 4:.1f}" y="{y + bar_h - 1}" font-size="9">{human(before)}</text>')
        if after is not None:
            aw = w * after / top_value
            out.append(f'<rect x="{label_width}" y="{y + bar_h}" width="{aw:.1f}" height="{bar_h}" fill="#1f77b4"/>')
            out.append(f'<text x="{label_width + aw + 4:.1f}" y="{y + 2 * bar_h - 1}" font-size="9" fill="#1f77b4">'
                       f'{human(after)} ({after / before:.2f}×)</text>')
        y += 2 * bar_h + gap
    out.append(f'<text x="{label_width}" y="{height - 4}" font-size="10" fill="#666">grey: MACs before · blue: '
               f'after the rewrite</text></svg>')
    return "".join(out)


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------
def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], left: Sequence[int] = (0,)) -> str:
    th = "".join(f'<th class="{"l" if i in left else ""}">{_e(h)}</th>' for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i in left else ""}">{_e(c)}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _audit_section(audit) -> str:
    t = audit.totals
    rows = []
    for n in sorted(audit.nodes, key=lambda n: -(n.macs or 0)):
        sep = n.separability
        best = ""
        errs = ""
        if sep is not None:
            b = sep.best_exact or sep.best_near_exact
            if b is not None:
                best = f"{b.scheme} r{b.rank} {b.macs_ratio:.2f}× (err {b.error:.1e})"
            parts = []
            for name, a in sep.schemes.items():
                if a.eligible and a.errors:
                    parts.append(f"{name} " + "/".join(f"{a.errors[r]:.2f}" for r in sorted(a.errors)[:4]))
            errs = "; ".join(parts)
        rows.append([n.qualified_name, n.op_type, "x".join(map(str, n.kernel_shape or [])) or "?", n.group,
                     "x".join(map(str, n.input_shape or [])) or "?", "x".join(map(str, n.output_shape or [])) or "?",
                     human(n.macs), _fmt(100 * n.share if n.share is not None else None, ".1f"),
                     _fmt(n.arithmetic_intensity, ".1f"), best or (n.reason or ""), errs])
    kpis = (f'<div class="kpi">conv nodes<b>{t.conv_nodes}</b></div><div class="kpi">conv MACs<b>{human(t.conv_macs)}</b></div>'
            f'<div class="kpi">eligible<b>{t.eligible_nodes}</b></div>'
            f'<div class="kpi">exact savings<b>{human(t.exact_savings_macs)}</b></div>')
    return ("<h2>Audit</h2>" + kpis + _table(
        ["node", "op", "kernel", "group", "input", "output", "MACs", "share %", "FLOP/byte", "best (near-)exact",
         "weight error at rank 1/2/3/4"], rows, left=(0, 9, 10)))


def _spectra_section(audit, profiles: Sequence[dict] | None, top: int = 12) -> str:
    """Relative weight error vs rank per scheme (solid) and, with calibration, output error (dashed)."""
    by_name = {p["name"]: p for p in (profiles or [])}
    nodes = [n for n in sorted(audit.nodes, key=lambda n: -(n.macs or 0)) if n.separability is not None][:top]
    if not nodes:
        return ""
    charts = []
    for n in nodes:
        series = []
        for name, a in n.separability.schemes.items():
            if not a.eligible or not a.curve_errors:
                continue
            ranks = list(range(len(a.curve_errors)))[1:]
            macs = [min(a.curve_macs[r - 1] / n.macs, 1.5) if r <= len(a.curve_macs) and n.macs else None for r in ranks]
            series.append({"x": macs, "y": a.curve_errors[1:], "label": f"{name} weight", "marker": False,
                           "color": scheme_color(name)})
        prof = by_name.get(n.qualified_name)
        if prof:
            for name, c in prof.get("curves", {}).items():
                series.append({"x": [m / n.macs for m in c["macs"]], "y": c["error"], "label": f"{name} output (LS)",
                               "dash": True, "color": scheme_color(name)})
        if series:
            charts.append(line_chart(series, width=360, height=230, xlabel="MACs after / before",
                                     ylabel="relative error", logy=True, title=n.qualified_name[-52:]))
    intro = ("<p class='small'>Solid: relative Frobenius weight error of the truncated SVD per scheme, against the "
             "MACs it keeps (the singular-value spectrum, integrated). Dashed (with calibration): relative error of "
             "the layer's <i>output</i> on calibration activations after least squares — what the network sees.</p>")
    return "<h2>Singular-value spectra</h2>" + intro + '<div class="grid">' + "".join(charts) + "</div>"


def _rewrite_section(rewrite, audit) -> str:
    macs_of = {n.qualified_name: n.macs for n in audit.nodes} if audit is not None else {}
    done = {r.qualified_name: r for r in rewrite.rewritten}
    names = list(macs_of) if macs_of else list(done)
    rows = []
    for name in sorted(names, key=lambda n: -(macs_of.get(n) or (done[n].macs_before if n in done else 0))):
        r = done.get(name)
        before = r.macs_before if r else macs_of.get(name)
        if before is None:
            continue
        rows.append((name, before, r.macs_after if r else None))
    chart = bar_chart(rows[:60], title="Conv MACs per layer")
    table = _table(["node", "scheme", "rank", "weight error", "MACs before", "MACs after", "ratio"],
                   [[r.qualified_name, r.scheme + ("+spatial" if r.chained else ""), r.rank, f"{r.weight_error:.3g}",
                     human(r.macs_before), human(r.macs_after), f"{r.macs_after / r.macs_before:.2f}×"]
                    for r in rewrite.rewritten])
    kpis = (f'<div class="kpi">conv MACs<b>{human(rewrite.conv_macs_before)} → {human(rewrite.conv_macs_after)}</b></div>'
            f'<div class="kpi">ratio<b>{rewrite.macs_ratio:.3f}×</b></div>'
            f'<div class="kpi">layers rewritten<b>{len(rewrite.rewritten)}</b></div>')
    return "<h2>Per-layer MACs before / after</h2>" + kpis + chart + table


def _calibration_section(cal) -> str:
    kpis = (f'<div class="kpi">drift ({_e(cal.drift_metric)})<b>{_fmt(cal.drift)}</b></div>'
            f'<div class="kpi">weight-only, same ranks<b>{_fmt(cal.drift_weight_only)}</b></div>'
            f'<div class="kpi">1 − cosine<b>{_fmt(cal.drift_cosine)}</b></div>'
            f'<div class="kpi">weight-only 1 − cosine<b>{_fmt(cal.drift_cosine_weight_only)}</b></div>'
            f'<div class="kpi">predicted<b>{_fmt(cal.predicted_drift)}</b></div>')
    rows = [[l.name, l.scheme, l.rank, _fmt(l.output_error_svd), _fmt(l.output_error), _fmt(l.weight_error_svd),
             _fmt(l.weight_error), "exact" if l.exact else _fmt(l.ridge, ".0e"), _fmt(l.sensitivity),
             _fmt(l.predicted_drift), "" if l.wave is None else l.wave, l.bn_folded or ""] for l in cal.layers]
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in cal.notes)
    folded = f"<p class='small'>BatchNormalization folded into: {len(cal.folded_batchnorms)} conv(s).</p>"
    return ("<h2>Calibration: drift per layer</h2>"
            f"<p class='small'>Data: {_e(cal.data)} ({cal.samples} samples, {cal.rows} rows per layer); allocation: "
            f"{_e(cal.allocation)}. Drift is measured on the calibration samples; output errors are relative, on "
            "held-out folds of the calibration rows.</p>" + kpis + notes + folded + _table(
                ["node", "scheme", "rank", "output err (SVD)", "output err (LS)", "weight err (SVD)", "weight err (LS)",
                 "ridge λ", "sensitivity", "predicted drift", "wave", "BN folded"], [list(map(str, r)) for r in rows]))


def _drift_section(drift) -> str:
    rows = [[o.name, "x".join(map(str, o.shape)), f"{o.max_abs:.3g}", f"{o.cosine:.6f}", f"{1 - o.cosine:.3g}",
             f"{o.snr_db:.1f}"] for o in drift.outputs]
    out = (f"<h2>Output drift (sepify verify)</h2><p class='small'>Inputs: {_e(drift.input_source)}</p>"
           + _table(["output", "shape", "max |a−b|", "cosine", "1 − cosine", "SNR dB"], rows))
    if drift.layers:
        chart = line_chart([{"x": list(range(len(drift.layers))), "y": [max(1 - l.cosine, 1e-12) for l in drift.layers],
                             "label": "1 − cosine of the rewritten layer's output"}], width=900, height=260,
                           xlabel="rewritten layer (graph order)", ylabel="1 − cosine", logy=True,
                           title="Drift per rewritten layer (accumulated through the network)")
        out += chart + _table(["layer output", "1 − cosine", "SNR dB", "max |a−b|"],
                              [[l.name, f"{1 - l.cosine:.3g}", f"{l.snr_db:.1f}", f"{l.max_abs:.3g}"] for l in drift.layers])
    return out


def _sweep_section(sweep) -> str:
    pts = sweep.points
    series = [{"x": [p.macs_ratio for p in pts], "y": [p.drift for p in pts], "label": "calibrated",
               "color": PALETTE[0]}]
    if any(p.drift_weight_only is not None for p in pts):
        series.append({"x": [p.macs_ratio_weight_only for p in pts], "y": [p.drift_weight_only for p in pts],
                       "label": "weight-only SVD", "color": PALETTE[1], "dash": True})
    cos_series = [{"x": [p.macs_ratio for p in pts], "y": [p.drift_cosine for p in pts], "label": "calibrated",
                   "color": PALETTE[0]}]
    if any(p.drift_cosine_weight_only is not None for p in pts):
        cos_series.append({"x": [p.macs_ratio_weight_only for p in pts], "y": [p.drift_cosine_weight_only for p in pts],
                           "label": "weight-only SVD", "color": PALETTE[1], "dash": True})
    charts = (line_chart(series, xlabel="conv MACs kept (fraction)", ylabel=f"drift ({sweep.drift_metric})", logy=True,
                         invert_x=True, title="Trade-off curve")
              + line_chart(cos_series, xlabel="conv MACs kept (fraction)", ylabel="1 − cosine", logy=True,
                           invert_x=True, title="Plain 1 − cosine (sepify verify)"))
    rows = [[f"{p.budget:.2f}", f"{p.macs_ratio:.3f}", _fmt(p.drift), _fmt(p.drift_cosine), _fmt(p.predicted_drift),
             _fmt(p.macs_ratio_weight_only, ".3f"), _fmt(p.drift_weight_only), _fmt(p.drift_cosine_weight_only),
             _fmt((p.latency or {}).get("speedup"), ".2f")] for p in pts]
    return (f"<h2>Trade-off curve</h2><p class='small'>Drift measured on {_e(sweep.eval_data)}.</p>"
            f'<div class="grid">{charts}</div>'
            + _table(["budget", "MACs", "drift", "1 − cos", "predicted", "weight-only MACs", "weight-only drift",
                      "weight-only 1 − cos", "speedup"], rows))


def render_html(*, title: str, audit=None, rewrite=None, calibration=None, drift=None, sweep=None,
                notes: Sequence[str] = ()) -> str:
    """The report page; every part is optional."""
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{_e(title)}</h1>"
             f"<div class='meta'>sepify {_e(__version__)} · {time.strftime('%Y-%m-%d %H:%M')}"
             + (f" · inputs {_e(audit.input_shapes)}" if audit is not None else "") + "</div>"]
    parts.extend(f'<p class="note">{_e(n)}</p>' for n in notes)
    if sweep is not None:
        parts.append(_sweep_section(sweep))
    if rewrite is not None:
        parts.append(_rewrite_section(rewrite, audit))
    if calibration is not None:
        parts.append(_calibration_section(calibration))
    if drift is not None:
        parts.append(_drift_section(drift))
    if audit is not None:
        profiles = calibration.profiles if calibration is not None and calibration.profiles else \
            (sweep.layers if sweep is not None else None)
        parts.append(_spectra_section(audit, profiles))
        parts.append(_audit_section(audit))
    parts.append("</body></html>")
    return "".join(parts)


def write_html_report(path, loaded, input_shapes=None, *, input_values=None, **parts) -> None:
    """Audit the model and write the HTML page (atomically) with whatever ``parts`` were computed
    (``rewrite``, ``calibration``, ``sweep``, ``drift``)."""
    from pathlib import Path

    from ..errors import SepifyError
    from ..model.save import write_text_atomic
    from ..pipeline.audit import audit

    shapes = input_shapes
    for part in ("calibration", "sweep"):
        if not shapes and parts.get(part) is not None and getattr(parts[part], "input_shapes", None):
            shapes = parts[part].input_shapes  # the shapes the calibration data ran at
    notes = []
    try:
        report = audit(loaded, shapes, input_values=input_values)
    except SepifyError as exc:  # the page is still useful without the audit table
        report = None
        notes.append(f"no audit table: {str(exc).strip().splitlines()[0]}")
    title = f"sepify report: {Path(loaded.label).name}"
    write_text_atomic(path, render_html(title=title, audit=report, notes=notes, **parts))
