"""A self-contained HTML report: summary, per-layer MACs before/after, benchmark, calibration, drift
per layer, trade-off curve, singular-value spectra, audit table.  Plots are inline SVG drawn here
(no plotting library, no external file, script or font): the page can be mailed or archived as
one file.

Layout rules (checked in a real browser by ``tests/test_html_browser.py``): numbers never wrap,
node names break only after ``/`` or ``.``, columns that are empty in every row and sections with
nothing to say are left out, every chart scales to the page, and at a narrow width the less
important columns of the wide tables are hidden (the page never scrolls sideways; a table that
still does not fit scrolls inside its own box).
"""

from __future__ import annotations

import html
import math
import time
from typing import Any, Sequence

from ..version import __version__
from .text import channel_drift_note, human

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")
SCHEME_PALETTE = ("#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#bcbd22", "#e377c2")


def scheme_color(name: str) -> str:
    """A stable colour per registered scheme (registry order), so a new scheme needs no entry here."""
    from ..core.schemes import names

    known = names()
    return SCHEME_PALETTE[known.index(name) % len(SCHEME_PALETTE)] if name in known else "#7f7f7f"


CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1240px;color:#222;
padding:0 20px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:34px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:14px;margin:18px 0 6px}
.meta{color:#666;font-size:12px} .small{font-size:12px;color:#555;max-width:900px}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:12px;margin:8px 0}
th,td{border-bottom:1px solid #eee;padding:4px 8px;text-align:right;white-space:nowrap;vertical-align:top}
th{background:#f6f6f6;font-weight:600}
td.l,th.l{text-align:left} td.name{white-space:normal;min-width:9em;max-width:26em}
td.wrap{white-space:normal;min-width:12em;max-width:30em;text-align:left}
tr:hover td{background:#fafcff}
.kpis{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}
.kpi{padding:8px 14px;background:#f6f8fa;border-radius:6px;min-width:8em}
.kpi span{display:block;font-size:12px;color:#555} .kpi b{font-size:18px;white-space:nowrap}
.kpi.good b{color:#2a7d2a} .kpi.bad b{color:#b22}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:14px}
.wide{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:14px}
figure{margin:0;min-width:0} figcaption{font-size:12px;font-weight:600;margin-bottom:2px;overflow-wrap:break-word}
svg.chart{width:100%;height:auto;display:block}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:11px;color:#444;margin:2px 0 0 4px}
.legend i{display:inline-block;width:18px;height:0;border-top:2px solid;vertical-align:middle;margin-right:4px}
.legend i.dash{border-top-style:dashed}
.note{color:#6d5a1e;background:#fcf8e3;padding:6px 10px;border-radius:4px;font-size:12px;max-width:900px}
.bars{width:100%;min-width:12em} .bar{height:7px;margin:1px 0;border-radius:1px}
.bar.before{background:#c7c7c7} .bar.after{background:#1f77b4}
.pass{color:#2a7d2a;font-weight:600} .fail{color:#b22;font-weight:600}
@media (max-width:980px){ .opt{display:none} body{padding:0 12px} .bars{min-width:5em} td.name{max-width:15em}
  th,td{padding:4px 5px} }
"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _name(v: str) -> str:
    """A node name that may break only after '/' or '.' (never inside a word or a number)."""
    text = _e(v)
    return text.replace("/", "/<wbr>").replace(".", ".<wbr>")


def _fmt(v: float | None, spec: str = ".3g") -> str:
    if v is None:
        return ""
    if isinstance(v, float) and not math.isfinite(v):
        return "∞" if v > 0 else "−∞"
    return format(v, spec)


def _dims(d) -> str:
    return "×".join(str(v) for v in d) if d else "?"


# ----------------------------------------------------------------------------------------------
# SVG plots
# ----------------------------------------------------------------------------------------------
def _ticks(lo: float, hi: float, log: bool, n: int = 5, integer: bool = False) -> list[float]:
    if log:
        a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        step = max(1, (b - a) // 6 + 1)
        return [10.0 ** k for k in range(a, b + 1, step)]
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    if integer:
        step = max(1, math.ceil(step))
    start = math.ceil(lo / step) * step
    out, v = [], start
    while v <= hi + 1e-12 * abs(hi):
        out.append(round(v, 12))
        v += step
    return out


def _legend(series: Sequence[dict]) -> str:
    items = []
    for i, s in enumerate(series):
        if not s.get("label"):
            continue
        color = s.get("color") or PALETTE[i % len(PALETTE)]
        items.append(f'<span><i class="{"dash" if s.get("dash") else ""}" style="border-color:{color}"></i>'
                     f'{_e(s["label"])}</span>')
    return f'<div class="legend">{"".join(items)}</div>' if items else ""


def line_chart(series: Sequence[dict], *, width: int = 520, height: int = 300, xlabel: str = "", ylabel: str = "",
               logy: bool = False, invert_x: bool = False, title: str = "", integer_x: bool = False) -> str:
    """A responsive SVG line chart in a ``<figure>`` with its legend below the plot (never on the
    curves).  ``series``: dicts with ``x``, ``y`` (lists), ``label``, optional ``color``, ``dash``
    (bool), ``marker`` (bool) and ``names`` (a tooltip per point).  Points that cannot be drawn
    (None, non-finite, ≤ 0 on a log axis) are left out, never clamped."""

    def ok(x, y):
        return x is not None and y is not None and math.isfinite(x) and math.isfinite(y) and (not logy or y > 0)

    pts = [(x, y) for s in series for x, y in zip(s["x"], s["y"]) if ok(x, y)]
    head = f"<figcaption>{_name(title)}</figcaption>" if title else ""
    if not pts:
        return f'<figure>{head}<p class="small">no data to draw</p></figure>'
    ml, mr, mt, mb = 58, 12, 10, 40
    w, h = width - ml - mr, height - mt - mb
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    if x0 == x1:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if logy:
        y0, y1 = 10 ** math.floor(math.log10(min(ys))), 10 ** math.ceil(math.log10(max(ys)))
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

    out = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
           f'style="max-width:{width}px" role="img" aria-label="{_e(title)}">',
           f'<rect x="{ml}" y="{mt}" width="{w}" height="{h}" fill="#fff" stroke="#bbb"/>']
    for t in _ticks(y0, y1, logy):
        if not (y0 <= t <= y1):
            continue
        y = py(t)
        out.append(f'<line x1="{ml}" y1="{y:.1f}" x2="{ml + w}" y2="{y:.1f}" stroke="#eee"/>')
        label = f"1e{int(round(math.log10(t)))}" if logy else f"{t:g}"
        out.append(f'<text x="{ml - 4}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{label}</text>')
    for t in _ticks(x0, x1, False, integer=integer_x):
        x = px(t)
        out.append(f'<line x1="{x:.1f}" y1="{mt}" x2="{x:.1f}" y2="{mt + h}" stroke="#f3f3f3"/>')
        out.append(f'<text x="{x:.1f}" y="{mt + h + 15}" font-size="11" text-anchor="middle">{t:g}</text>')
    out.append(f'<text x="{ml + w / 2}" y="{height - 6}" font-size="12" text-anchor="middle">{_e(xlabel)}</text>')
    out.append(f'<text x="13" y="{mt + h / 2}" font-size="12" text-anchor="middle" '
               f'transform="rotate(-90 13 {mt + h / 2})">{_e(ylabel)}</text>')
    for i, s in enumerate(series):
        color = s.get("color") or PALETTE[i % len(PALETTE)]
        names = s.get("names") or [None] * len(s["x"])
        p = [(px(x), py(y), x, y, n) for x, y, n in zip(s["x"], s["y"], names) if ok(x, y)]
        if not p:
            continue
        dash = ' stroke-dasharray="5,3"' if s.get("dash") else ""
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8"{dash} points="'
                   + " ".join(f"{a:.1f},{b:.1f}" for a, b, *_ in p) + '"/>')
        if s.get("marker", True):
            for a, b, x, y, n in p:
                tip = f"{n}: {y:.3g}" if n else f"{x:g}: {y:.3g}"
                out.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.8" fill="{color}"><title>{_e(tip)}</title></circle>')
    out.append("</svg>")
    return f"<figure>{head}{''.join(out)}{_legend(series)}</figure>"


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------
def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], *, names: Sequence[int] = (0,),
           left: Sequence[int] = (), wrap: Sequence[int] = (), optional: Sequence[int] = (), raw: Sequence[int] = ()) -> str:
    """A table in its own scroll box.  Columns empty in every row are left out; ``names`` break
    only after '/' or '.', ``wrap`` columns are free text, ``optional`` ones hide on narrow
    screens, ``raw`` cells are trusted HTML."""
    rows = [["" if c is None else c for c in r] for r in rows]
    keep = [i for i in range(len(head)) if any(str(r[i]) != "" for r in rows)] if rows else list(range(len(head)))

    def cls(i):
        c = []
        if i in names:
            c.append("l name")
        elif i in wrap:
            c.append("wrap")
        elif i in left:
            c.append("l")
        if i in optional:
            c.append("opt")
        return " ".join(c)

    def cell(i, v):
        if i in raw:
            return str(v)
        return _name(v) if i in names else _e(v)

    th = "".join(f'<th class="{"l " if i in names or i in wrap or i in left or i in raw else ""}'
                 f'{"opt" if i in optional else ""}">'
                 f"{_e(head[i])}</th>" for i in keep)
    body = "".join("<tr>" + "".join(f'<td class="{cls(i)}">{cell(i, r[i])}</td>' for i in keep) + "</tr>" for r in rows)
    return f'<div class="scroll"><table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>'


def _kpis(items: Sequence[tuple[str, str] | tuple[str, str, str]]) -> str:
    out = []
    for item in items:
        label, value = item[0], item[1]
        tone = item[2] if len(item) > 2 else ""
        out.append(f'<div class="kpi {tone}"><span>{_e(label)}</span><b>{_e(value)}</b></div>')
    return f'<div class="kpis">{"".join(out)}</div>'


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------
def _summary(audit, rewrite, drift, bench, calibration) -> str:
    items: list = []
    if rewrite is not None:
        items += [("conv MACs", f"{human(rewrite.conv_macs_before)} → {human(rewrite.conv_macs_after)}"),
                  ("MACs kept", f"{rewrite.macs_ratio:.3f}×"), ("layers rewritten", str(len(rewrite.rewritten)))]
    elif audit is not None:
        t = audit.totals
        items += [("conv MACs", human(t.conv_macs)), ("conv nodes", str(t.conv_nodes)),
                  ("rewritable", str(t.eligible_nodes)), ("exact savings", human(t.exact_savings_macs))]
    if drift is not None and drift.outputs:
        worst = min(drift.outputs, key=lambda o: o.cosine)
        items.append(("verify", "passed" if drift.passed else "failed", "good" if drift.passed else "bad"))
        items.append(("worst output 1 − cosine", _fmt(1 - worst.cosine)))
    elif calibration is not None and calibration.drift_cosine is not None:
        items.append(("1 − cosine (calibration data)", _fmt(calibration.drift_cosine)))
    if bench is not None and bench.speedup is not None:
        items.append(("measured speedup", f"{bench.speedup:.2f}×"))
    return _kpis(items) if items else ""


def _audit_section(audit) -> str:
    t = audit.totals
    rows = []
    for n in sorted(audit.nodes, key=lambda n: -(n.macs or 0)):
        sep = n.separability
        best = errs = ""
        if sep is not None:
            b = sep.best_exact or sep.best_near_exact
            if b is not None:
                best = f"{b.scheme} r{b.rank}: {b.macs_ratio:.2f}× MACs (error {b.error:.1e})"
            parts = []
            for name, a in sep.schemes.items():
                if a.eligible and a.errors:
                    parts.append(f"{name} " + " / ".join(f"{a.errors[r]:.2f}" for r in sorted(a.errors)[:4]))
                elif a.eligible and not a.spectrum_complete and a.exact_rank_above:
                    parts.append(f"{name} not exact to rank {a.exact_rank_above}")
            errs = "; ".join(parts)
        rows.append([n.qualified_name, n.op_type, _dims(n.kernel_shape), n.group if n.group != 1 else "",
                     _dims(n.input_shape), _dims(n.output_shape), human(n.macs),
                     _fmt(100 * n.share if n.share is not None else None, ".1f"), _fmt(n.arithmetic_intensity, ".1f"),
                     best or (n.reason or ""), errs])
    kpis = _kpis([("conv nodes", str(t.conv_nodes)), ("conv MACs", human(t.conv_macs)),
                  ("of all MACs", human(t.total_macs)), ("rewritable", str(t.eligible_nodes)),
                  ("exact savings", human(t.exact_savings_macs))])
    return ("<h2>Audit</h2>" + kpis + _table(
        ["node", "op", "kernel", "group", "input", "output", "MACs", "share %", "FLOP/byte", "best (near-)exact split",
         "weight error at rank 1 / 2 / 3 / 4"], rows, left=(1, 2), wrap=(9, 10), optional=(1, 3, 4, 5, 8)))


def _spectra_section(audit, profiles: Sequence[dict] | None, top: int = 12) -> str:
    """Relative weight error vs rank per scheme (solid) and, with calibration, output error (dashed)."""
    by_name = {p["name"]: p for p in (profiles or [])}
    nodes = [n for n in sorted(audit.nodes, key=lambda n: -(n.macs or 0)) if n.separability is not None][:top]
    charts = []
    for n in nodes:
        series = []
        for name, a in n.separability.schemes.items():
            if not a.eligible or not a.curve_errors:
                continue
            ranks = [r for r in range(1, len(a.curve_errors))
                     if r <= len(a.curve_macs) and n.macs and a.curve_macs[r - 1] <= n.macs]  # ranks that save MACs
            series.append({"x": [a.curve_macs[r - 1] / n.macs for r in ranks], "y": [a.curve_errors[r] for r in ranks],
                           "label": f"{name} weight", "marker": False, "color": scheme_color(name)})
        prof = by_name.get(n.qualified_name)
        if prof:
            for name, c in prof.get("curves", {}).items():
                keep = [i for i, m in enumerate(c["macs"]) if m <= n.macs]
                series.append({"x": [c["macs"][i] / n.macs for i in keep], "y": [c["error"][i] for i in keep],
                               "label": f"{name} output (LS)", "dash": True, "color": scheme_color(name)})
        if series:
            charts.append(line_chart(series, width=380, height=240, xlabel="MACs after / before",
                                     ylabel="relative error", logy=True, title=n.qualified_name))
    if not charts:
        return ""
    intro = ("<p class='small'>Solid: relative Frobenius weight error of the truncated SVD per scheme, against the "
             "MACs it keeps (the singular-value spectrum, integrated). Dashed (with calibration): relative error of "
             "the layer's <i>output</i> on calibration activations after least squares — what the network sees. "
             f"The {len(charts)} layers with the most MACs.</p>")
    return "<h2>Singular-value spectra</h2>" + intro + '<div class="grid">' + "".join(charts) + "</div>"


def _bars(before: float, after: float | None, top: float) -> str:
    b = f'<div class="bar before" style="width:{100 * before / top:.1f}%"></div>'
    a = f'<div class="bar after" style="width:{100 * after / top:.1f}%"></div>' if after is not None else ""
    return f'<div class="bars">{b}{a}</div>'


def _rewrite_section(rewrite, audit) -> str:
    macs_of = {n.qualified_name: n.macs for n in audit.nodes} if audit is not None else {}
    done = {r.qualified_name: r for r in rewrite.rewritten}
    kept = {k["name"]: str(k["reason"]) for k in rewrite.kept}
    names = list(macs_of) + [n for n in done if n not in macs_of]  # rewritten linear layers (--linear) too
    layers = []
    for name in names:
        r = done.get(name)
        before = r.macs_before if r else macs_of.get(name)
        if before:
            layers.append((name, before, r))
    layers.sort(key=lambda x: -x[1])
    top = max([b for _, b, _ in layers], default=1) or 1
    rows = []
    for name, before, r in layers[:80]:
        if r is not None:
            rows.append([name, _bars(before, r.macs_after, top), human(before), human(r.macs_after),
                         f"{r.macs_after / before:.2f}×", r.scheme + ("+spatial" if r.chained else ""), r.rank,
                         r.lowering, f"{r.weight_error:.2e}"])
        else:
            rows.append([name, _bars(before, None, top), human(before), "", "", "", "", "", kept.get(name, "kept")])
    legend = ('<p class="small">Grey: MACs before; blue: after the rewrite (bars to scale, largest layer first'
              + (f"; the {len(layers) - 80} smallest layers are left out" if len(layers) > 80 else "") + ").</p>")
    table = _table(["layer", "MACs", "before", "after", "ratio", "scheme", "rank",
                    "lowering", "weight error / why kept"], rows, raw=(1,), left=(5, 7), wrap=(8,), optional=(6, 7))
    what = "Conv and linear MACs" if getattr(rewrite.policy, "linear", False) else "Conv MACs"
    return f"<h2>{what} per layer</h2>" + legend + table


def _bench_section(bench) -> str:
    rows = [[bench.model_a, f"{bench.latency_a.median_ms:.3f}", f"{bench.latency_a.p10_ms:.3f}",
             f"{bench.latency_a.p90_ms:.3f}", human(bench.macs_a)]]
    if bench.latency_b is not None:
        rows.append([bench.model_b, f"{bench.latency_b.median_ms:.3f}", f"{bench.latency_b.p10_ms:.3f}",
                     f"{bench.latency_b.p90_ms:.3f}", human(bench.macs_b)])
    items: list = []
    if bench.speedup is not None:
        items.append(("speedup", f"{bench.speedup:.2f}×"))
        items.append(("per-round p10–p90", f"{bench.speedup_p10:.2f}–{bench.speedup_p90:.2f}×"))
    if bench.mac_reduction:
        items += [("MAC reduction", f"{bench.mac_reduction:.2f}×"), ("efficiency", f"{bench.efficiency:.2f}")]
    providers = ", ".join(bench.providers or ["CPUExecutionProvider"])
    out = (f"<h2>Benchmark (onnxruntime)</h2><p class='small'>{_e(providers)}, threads: {_e(bench.threads or 'default')};"
           f" {bench.rounds_used} of {bench.rounds} interleaved rounds used; speedup = median of the per-round "
           "ratios.</p>" + _kpis(items) + _table(["model", "median ms", "p10 ms", "p90 ms", "MACs"], rows))
    if bench.nodes:
        out += ("<h3>Rewritten convs: summed kernel times</h3><p class='small'>onnxruntime profiler, same threads and "
                "spinning as the timed runs; a conv's kernel (fused activation included) against the kernels of the "
                "nodes that replaced it.</p>"
                + _table(["conv", "original µs", "rewritten µs", "speedup"],
                         [[n.name, _fmt(n.time_a_us, ".1f"), _fmt(n.time_b_us, ".1f"),
                           f"{n.speedup:.2f}×" if n.speedup else ""] for n in bench.nodes]))
    return out


def _calibration_section(cal) -> str:
    kpis = _kpis([(f"drift ({cal.drift_metric})", _fmt(cal.drift)),
                  ("weight-only, same ranks", _fmt(cal.drift_weight_only)),
                  ("1 − cosine", _fmt(cal.drift_cosine)), ("weight-only 1 − cosine", _fmt(cal.drift_cosine_weight_only)),
                  ("predicted", _fmt(cal.predicted_drift))])
    rows = [[l.name, l.scheme, l.rank, _fmt(l.output_error_svd), _fmt(l.output_error), _fmt(l.weight_error_svd),
             _fmt(l.weight_error), "exact" if l.exact else _fmt(l.ridge, ".0e"), _fmt(l.sensitivity),
             _fmt(l.predicted_drift), "" if l.wave is None else l.wave, l.bn_folded or ""] for l in cal.layers]
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in cal.notes)
    explain = channel_drift_note(cal.drift_metric)
    folded = (f"<p class='small'>BatchNormalization folded into {len(cal.folded_batchnorms)} rewritten conv(s).</p>"
              if cal.folded_batchnorms else "")
    return ("<h2>Calibration</h2>"
            f"<p class='small'>Data: {_e(cal.data)} ({cal.samples} samples, {cal.rows} rows per layer); allocation: "
            f"{_e(cal.allocation)}. Drift is measured on the calibration samples; output errors are relative, on "
            "held-out folds of the calibration rows.</p>" + kpis
            + (f"<p class='small'>{_e(explain)}</p>" if explain else "") + notes + folded + _table(
                ["layer", "scheme", "rank", "output error (SVD)", "output error (LS)", "weight error (SVD)",
                 "weight error (LS)", "ridge λ", "sensitivity", "predicted drift", "wave", "BN folded"],
                [list(map(str, r)) for r in rows], left=(1,), optional=(5, 6, 7, 10)))


def _drift_section(drift) -> str:
    rows = [[o.name, _dims(o.shape), f"{o.max_abs:.3g}", f"{o.cosine:.6f}", f"{1 - o.cosine:.3g}",
             _fmt(o.snr_db, ".1f"), _fmt(o.top1_agreement, ".3f"),
             '<span class="pass">yes</span>' if o.passed else '<span class="fail">no</span>'] for o in drift.outputs]
    rule = drift.rule if hasattr(drift, "rule") else ""
    out = (f"<h2>Output drift (sepify verify)</h2><p class='small'>Inputs: {_e(drift.input_source)}. "
           f"Pass rule: {_e(rule)}</p>"
           + _table(["output", "shape", "max |a−b|", "cosine", "1 − cosine", "SNR dB", "top-1 agreement", "pass"], rows,
                    raw=(7,)))
    if drift.layers:
        values = [1 - l.cosine for l in drift.layers]
        exact = sum(1 for v in values if not v > 0)
        series = [{"x": list(range(len(values))), "y": values, "names": [l.name for l in drift.layers],
                   "label": "1 − cosine of the rewritten layer's output (errors accumulated through the network)"}]
        chart = line_chart(series, width=760, height=240, xlabel="rewritten layer (graph order)",
                           ylabel="1 − cosine", logy=True, integer_x=True, title="Drift per rewritten layer")
        note = (f"<p class='small'>{exact} layer(s) match exactly (1 − cosine = 0) and cannot be drawn on a log "
                "axis; they are in the table.</p>" if exact else "")
        out += chart + note + _table(["#", "layer output", "1 − cosine", "SNR dB", "max |a−b|"],
                                     [[i, l.name, f"{1 - l.cosine:.3g}", _fmt(l.snr_db, ".1f"), f"{l.max_abs:.3g}"]
                                      for i, l in enumerate(drift.layers)], names=(1,))
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
                         invert_x=True, title=f"Trade-off curve: drift ({sweep.drift_metric})")
              + line_chart(cos_series, xlabel="conv MACs kept (fraction)", ylabel="1 − cosine", logy=True,
                           invert_x=True, title="Plain 1 − cosine (what sepify verify prints)"))
    rows = [[f"{p.budget:.2f}", f"{p.macs_ratio:.3f}", _fmt(p.drift), _fmt(p.drift_cosine), _fmt(p.predicted_drift),
             _fmt(p.macs_ratio_weight_only, ".3f"), _fmt(p.drift_weight_only), _fmt(p.drift_cosine_weight_only),
             _fmt((p.latency or {}).get("speedup"), ".2f")] for p in pts]
    explain = channel_drift_note(sweep.drift_metric)
    return (f"<h2>Trade-off curve</h2><p class='small'>Drift measured on {_e(sweep.eval_data)}.</p>"
            + (f"<p class='small'>{_e(explain)}</p>" if explain else "")
            + f'<div class="wide">{charts}</div>'
            + _table(["budget", "MACs", "drift", "1 − cos", "predicted", "weight-only MACs", "weight-only drift",
                      "weight-only 1 − cos", "speedup"], rows, names=()))


def _inputs_text(shapes: dict | None) -> str:
    if not shapes:
        return ""
    return ", ".join(f"{k} {_dims(v)}" for k, v in shapes.items())


def render_html(*, title: str, audit=None, rewrite=None, calibration=None, drift=None, sweep=None, bench=None,
                notes: Sequence[str] = ()) -> str:
    """The report page; every part is optional."""
    meta = [f"sepify {__version__}", time.strftime("%Y-%m-%d %H:%M")]
    if audit is not None and audit.input_shapes:
        meta.append("inputs " + _inputs_text(audit.input_shapes))
    if rewrite is not None:
        meta.append(f"policy {rewrite.policy.mode}")
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{_e(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{_e(title)}</h1>"
             f"<div class='meta'>{_e(' · '.join(meta))}</div>"]
    parts.append(_summary(audit, rewrite, drift, bench, calibration))
    parts.extend(f'<p class="note">{_e(n)}</p>' for n in notes)
    if rewrite is not None:
        parts.append(_rewrite_section(rewrite, audit))
    if bench is not None:
        parts.append(_bench_section(bench))
    if drift is not None:
        parts.append(_drift_section(drift))
    if calibration is not None:
        parts.append(_calibration_section(calibration))
    if sweep is not None:
        parts.append(_sweep_section(sweep))
    if audit is not None:
        profiles = calibration.profiles if calibration is not None and calibration.profiles else \
            (sweep.layers if sweep is not None else None)
        parts.append(_spectra_section(audit, profiles))
        parts.append(_audit_section(audit))
    parts.append(f"<p class='meta' style='margin-top:30px'>Made by sepify {_e(__version__)}: MACs are "
                 "multiply-accumulates of the weight product (bias excluded); weight error is ‖W − Ŵ‖/‖W‖.</p>")
    parts.append("</body></html>")
    return "".join(parts)


def write_html_report(path, loaded, input_shapes=None, *, input_values=None, notes: Sequence[str] = (), **parts) -> None:
    """Audit the model and write the HTML page (atomically) with whatever ``parts`` were computed
    (``rewrite``, ``calibration``, ``sweep``, ``drift``, ``bench``)."""
    from pathlib import Path

    from ..errors import SepifyError
    from ..model.save import write_text_atomic
    from ..pipeline.audit import audit

    shapes = input_shapes
    for part in ("calibration", "sweep"):
        if not shapes and parts.get(part) is not None and getattr(parts[part], "input_shapes", None):
            shapes = parts[part].input_shapes  # the shapes the calibration data ran at
    notes = list(notes)
    try:
        report = audit(loaded, shapes, input_values=input_values)
    except SepifyError as exc:  # the page is still useful without the audit table
        report = None
        notes.append(f"no audit table: {str(exc).strip().splitlines()[0]}")
    title = f"sepify report: {Path(loaded.label).name}"
    write_text_atomic(path, render_html(title=title, audit=report, notes=notes, **parts))


__all__ = ["line_chart", "render_html", "scheme_color", "write_html_report"]
