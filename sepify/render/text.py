"""Rendering of typed results: tables for the terminal, JSON, CSV and Markdown.  No computation here.

Every table takes ``width`` (:func:`sepify.render.table.output_width`: the terminal's, or None for
files and pipes, which get every column unwrapped) and fits it (:func:`~sepify.render.table.fit_table`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import TYPE_CHECKING, Sequence

from ..core.drift import STD_FLOOR
from ..pipeline.audit import AuditReport, NodeAudit
from ..serialize import json_default
from .table import Column, dropped_note, fit_table, render

if TYPE_CHECKING:
    from ..calibration.sweep import SweepReport
    from ..pipeline.batch import ModelStatus


CSV_FIELDS = [
    "model", "name", "op_type", "group", "kernel_shape", "strides", "pads", "dilations", "input_shape",
    "output_shape", "weight_shape", "params", "macs", "flops", "share", "arithmetic_intensity", "shape_source",
    "eligible", "reason", "best_scheme", "best_rank", "best_macs", "best_error",
]
FORMATS = ("table", "json", "csv", "md")
FORMAT_OF_SUFFIX = {".json": "json", ".csv": "csv", ".md": "md", ".markdown": "md"}


def human(n: float | int | None) -> str:
    if n is None:
        return "?"
    n = float(n)
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _dims(d: Sequence[int] | None) -> str:
    return "x".join(str(v) for v in d) if d else "?"


def _best(n: NodeAudit):
    sep = n.separability
    if sep is None:
        return None
    return sep.best_exact or sep.best_near_exact


def _best_text(n: NodeAudit) -> str:
    sep = n.separability
    if sep is None:
        return n.reason or ""
    b = sep.best_exact
    if b is not None:
        return f"exact {b.scheme} r{b.rank} -> {b.macs_ratio:.2f}x MACs"
    b = sep.best_near_exact
    if b is not None:
        return f"near {b.scheme} r{b.rank} err {b.error:.1e}"
    parts = []
    for name, a in sep.schemes.items():
        if a.eligible and a.errors:
            parts.append(f"{name} r1 err {a.errors.get(1, float('nan')):.2f}")
        elif a.eligible and not a.spectrum_complete and a.exact_rank_above:
            parts.append(f"{name} not exact to r{a.exact_rank_above}")  # certified only (--certify: more)
    return "; ".join(parts) or (n.reason or "")


def sort_nodes(nodes: Sequence[NodeAudit], sort: str = "macs", top: int | None = None) -> list[NodeAudit]:
    if sort == "macs":
        ordered = sorted(nodes, key=lambda n: -(n.macs or 0))
    else:
        ordered = list(nodes) if sort == "graph" else sorted(nodes, key=lambda n: n.qualified_name)
    return ordered[:top] if top else ordered


# ----------------------------------------------------------------------------------------------
# audit
# ----------------------------------------------------------------------------------------------
AUDIT_COLUMNS = [Column("node", "left", 100, name=True), Column("op", "left", 20), Column("in → out", "left", 45),
                 Column("kernel", "left", 40), Column("s/d/g", "left", 15), Column("params", keep=25),
                 Column("MACs", keep=100), Column("share", keep=70), Column("FLOP/B", keep=10),
                 Column("separability", "left", 90, fold=24)]


def audit_table(report: AuditReport, sort: str = "macs", top: int | None = None, width: int | None = None):
    """(rich Table, dropped column headers)."""
    t = report.totals
    rows = []
    for n in sort_nodes(report.nodes, sort, top):
        rows.append([
            n.qualified_name, n.op_type,
            f"{_dims(n.input_shape)} → {_dims(n.output_shape)}"
            + ("" if n.shape_source in ("inferred", "input") else f" ({n.shape_source})"),
            _dims(n.kernel_shape), f"{_dims(n.strides)}/{_dims(n.dilations)}/{n.group}", human(n.params),
            human(n.macs), f"{100 * n.share:.1f}%" if n.share is not None else "?",
            f"{n.arithmetic_intensity:.1f}" if n.arithmetic_intensity is not None else "?", _best_text(n)])
    linear = (f", {human(t.linear_macs)} in linear layers `--linear` factors" if t.linear_macs else "")
    caption = (f"conv MACs {human(t.conv_macs)} of {human(t.total_macs)} total ({human(t.matmul_macs)} Gemm/MatMul{linear}) · "
               f"{t.conv_nodes} conv nodes, {t.eligible_nodes} rewritable · exact savings "
               f"{human(t.exact_savings_macs)} MACs")
    return fit_table(AUDIT_COLUMNS, rows, width, title=f"{report.model}  ({report.producer or 'unknown producer'}, "
                                                          f"opset {report.opset})", caption=caption)


def _entries(items) -> list[ModelStatus]:
    from ..pipeline.batch import AuditBatch, ModelStatus

    if isinstance(items, AuditBatch):
        return list(items.entries)
    return [i if isinstance(i, ModelStatus) else ModelStatus(i.model, i) for i in items]


def summary_table(entries: Sequence[ModelStatus], width: int | None = None):
    columns = [Column("model", "left", 100, name=True), Column("status", "left", 100, fold=16), Column("convs", keep=60),
               Column("conv MACs", keep=90), Column("total MACs", keep=40), Column("conv share", keep=30),
               Column("params", keep=20), Column("rewritable", keep=50), Column("exact savings", keep=80)]
    rows = []
    for e in entries:
        if e.report is None:
            rows.append([e.path, f"error: {e.error}", "", "", "", "", "", "", ""])
            continue
        t = e.report.totals
        rows.append([e.report.model, "ok", str(t.conv_nodes), human(t.conv_macs), human(t.total_macs),
                     f"{100 * t.conv_macs / t.total_macs:.1f}%" if t.total_macs else "?", human(t.model_params),
                     str(t.eligible_nodes), human(t.exact_savings_macs)])
    failed = sum(1 for e in entries if e.report is None)
    return fit_table(columns, rows, width, title="models",
                     caption=f"{len(entries)} model(s), {failed} failed" if failed else f"{len(entries)} model(s)")


def render_audit_text(items, sort: str = "macs", top: int | None = None, width: int | None = None) -> str:
    entries = _entries(items)
    parts: list = []
    if len(entries) > 1:
        table, dropped = summary_table(entries, width)
        parts += [table, dropped_note(dropped, width)]
    for e in entries:
        if e.report is None:
            continue
        table, dropped = audit_table(e.report, sort, top, width)
        parts += [table, dropped_note(dropped, width)]
        parts += [f"warning: {w}" for w in e.report.warnings]
    reports = [e.report for e in entries if e.report is not None]
    if reports:
        parts.append(f"Convention: {reports[0].convention}")
    return render(parts, width)


def _report_dict(r: AuditReport, sort: str, top: int | None) -> dict:
    if sort == "graph" and not top:
        return r.to_dict()
    nodes, r.nodes = r.nodes, sort_nodes(r.nodes, sort, top)  # every node serialized once
    try:
        return r.to_dict()
    finally:
        r.nodes = nodes


def render_audit_json(items, sort: str = "graph", top: int | None = None) -> str:
    entries = _entries(items)
    if len(entries) == 1 and entries[0].report is not None:
        return json.dumps(_report_dict(entries[0].report, sort, top), indent=2, default=json_default)
    from ..serialize import SCHEMA_VERSION

    models = [{"status": "ok", **_report_dict(e.report, sort, top)} if e.report is not None else e.to_dict()
              for e in entries]
    return json.dumps({"schema_version": SCHEMA_VERSION, "models": models,
                       "failed": sum(1 for e in entries if e.report is None)}, indent=2, default=json_default)


def _csv_row(r: AuditReport, n: NodeAudit) -> dict:
    b = _best(n)
    return {
        "model": r.model, "name": n.qualified_name, "op_type": n.op_type, "group": n.group,
        "kernel_shape": _dims(n.kernel_shape), "strides": _dims(n.strides), "pads": _dims(n.pads),
        "dilations": _dims(n.dilations), "input_shape": _dims(n.input_shape), "output_shape": _dims(n.output_shape),
        "weight_shape": _dims(n.weight_shape), "params": n.params, "macs": n.macs, "flops": n.flops,
        "share": f"{n.share:.6f}" if n.share is not None else "", "arithmetic_intensity":
        f"{n.arithmetic_intensity:.3f}" if n.arithmetic_intensity is not None else "", "shape_source": n.shape_source,
        "eligible": n.eligible, "reason": n.reason or "", "best_scheme": b.scheme if b else "",
        "best_rank": b.rank if b else "", "best_macs": b.macs if b else "", "best_error": f"{b.error:.3e}" if b else "",
    }


def render_audit_csv(items, sort: str = "macs", top: int | None = None) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for e in _entries(items):
        if e.report is None:
            writer.writerow({"model": e.path, "reason": f"error: {e.error}"})
            continue
        for n in sort_nodes(e.report.nodes, sort, top):
            writer.writerow(_csv_row(e.report, n))
    return buf.getvalue()


def render_audit_markdown(items, sort: str = "macs", top: int | None = None) -> str:
    lines = []
    entries = _entries(items)
    if len(entries) > 1:
        lines += ["| model | status | conv MACs | rewritable |", "|---|---|---:|---:|"]
        for e in entries:
            status = "ok" if e.report is not None else f"error: {e.error}"
            macs = human(e.report.totals.conv_macs) if e.report is not None else ""
            n = str(e.report.totals.eligible_nodes) if e.report is not None else ""
            lines.append(f"| `{e.path}` | {status} | {macs} | {n} |")
        lines.append("")
    for e in entries:
        r = e.report
        if r is None:
            continue
        t = r.totals
        lines.append(f"## {r.model}\n")
        lines.append(f"Conv MACs **{human(t.conv_macs)}** of {human(t.total_macs)} total; "
                     f"{t.conv_nodes} conv nodes, {t.eligible_nodes} rewritable; exact savings {human(t.exact_savings_macs)} MACs.\n")
        lines.append("| node | op | in → out | kernel | s/d/g | params | MACs | share | separability |")
        lines.append("|---|---|---|---|---|---:|---:|---:|---|")
        for n in sort_nodes(r.nodes, sort, top):
            lines.append(
                f"| `{n.qualified_name}` | {n.op_type} | {_dims(n.input_shape)} → {_dims(n.output_shape)} | "
                f"{_dims(n.kernel_shape)} | {_dims(n.strides)}/{_dims(n.dilations)}/{n.group} | {human(n.params)} | "
                f"{human(n.macs)} | {f'{100 * n.share:.1f}%' if n.share is not None else '?'} | {_best_text(n)} |"
            )
        lines.append("")
    reports = [e.report for e in entries if e.report is not None]
    if reports:
        lines.append(f"_Convention: {reports[0].convention}_")
    return "\n".join(lines) + "\n"


def render_audit(items, fmt: str, sort: str = "macs", top: int | None = None, width: int | None = None) -> str:
    """``items``: an AuditBatch, or AuditReports / ModelStatus entries."""
    if fmt == "json":
        return render_audit_json(items, sort, top) + "\n"
    if fmt == "csv":
        return render_audit_csv(items, sort, top)
    if fmt == "md":
        return render_audit_markdown(items, sort, top)
    return render_audit_text(items, sort, top, width)


# ----------------------------------------------------------------------------------------------
# rewrite, latency, calibration, sweep
# ----------------------------------------------------------------------------------------------
def render_rewrite(report, status: str | None = None, width: int | None = None) -> str:
    """The per-node plan, the kept reasons and the totals; ``status`` ends the totals line
    (``written to OUT``, ``dry run, nothing written``, …)."""
    columns = [Column("node", "left", 100, name=True), Column("scheme", "left", 95), Column("rank", keep=95),
               Column("lowering", "left", 85), Column("weight err", keep=80), Column("MACs", "left", 100),
               Column("ratio", keep=100)]
    rows = [[r.qualified_name, r.scheme + ("+spatial" if r.chained else ""), str(r.rank), r.lowering or "",
             f"{r.weight_error:.2e}", f"{human(r.macs_before)} → {human(r.macs_after)}",
             f"{r.macs_after / r.macs_before:.2f}x" if r.macs_before else ""] for r in report.rewritten]
    table, dropped = fit_table(columns, rows, width, title=f"{report.model}: {report.policy.mode} rewrite plan")
    reasons: dict[str, int] = {}
    for k in report.kept:
        reasons[str(k["reason"])] = reasons.get(str(k["reason"]), 0) + 1
    kept = ("kept: " + ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
            if reasons else None)
    what = "conv and linear MACs" if getattr(report.policy, "linear", False) else "conv MACs"
    totals = (f"{what} {human(report.conv_macs_before)} -> {human(report.conv_macs_after)} "
              f"({report.macs_ratio:.3f}x), {len(report.rewritten)} node(s) rewritten" + (f"; {status}" if status else ""))
    return render([table if report.rewritten else None, dropped_note(dropped, width), kept, totals], width)


def render_latency(report, width: int | None = None) -> str:
    """A table of the measured rewrites: original vs each lowering, speedup, decision."""
    from ..pipeline.latency import latency_rows

    rows = latency_rows(report)
    if not rows:
        return ""
    threads = rows[0].get("threads")
    columns = [Column("node", "left", 100, name=True), Column("original", keep=90), Column("lowerings (µs)", "left", 60, fold=16),
               Column("best", "left", 70), Column("speedup", keep=95), Column("runs", keep=20),
               Column("rewritten", "left", 100)]
    cells = []
    for d in rows:
        if "error" in d:
            cells.append([d["node"], "?", f"not measured: {d['error']}", "", "", "", "no"])
            continue
        lows = ", ".join(f"{k} {v:.0f}" for k, v in d["lowerings_us"].items())
        cells.append([d["node"] + (f" (+{d['activation']})" if d.get("activation") else ""), f"{d['original_us']:.0f} µs",
                      lows, d["chosen"], f"{d['speedup']:.2f}x", str(d["runs"]), "yes" if d["faster"] else "no"])
    table, dropped = fit_table(columns, cells, width, title="onnxruntime latency per node (isolated, "
                                                              f"{threads or 'default'} thread(s), medians)")
    return render([table, dropped_note(dropped, width)], width)


def render_prediction(report, width: int | None = None) -> str:
    """A latency-cost rewrite: the predicted conv latency and, for a speedup target, every round of
    planning and end-to-end checking."""
    pred, check = report.prediction, report.speedup
    if not pred and not check:
        return ""
    lines = []
    if pred:
        where = "this machine's latency table" if pred.get("measured_here") else f"latency table {pred.get('table')}"
        lines.append(f"latency cost ({where}, {pred.get('threads') or 'default'} thread(s)): conv latency "
                     f"{pred['conv_us']:.0f} -> {pred['conv_us_after']:.0f} µs (isolated sums, predicted)")
    if check:
        if not check["checked"]:
            lines.append(f"target {check['target']:g}x: planned with a table measured elsewhere, not timed here "
                         f"(predicted {check['rounds'][0]['predicted']:.2f}x)")
        else:
            for i, r in enumerate(check["rounds"]):
                if r.get("note"):
                    lines.append(f"  round {i + 1}: {r['note']}")
                    continue
                mark = " <- written" if i == check["chosen"] else ""
                lines.append(f"  round {i + 1}: {r['rewritten']} layers, predicted {r['predicted']:.2f}x (scale "
                             f"{r['scale']:.2f}), measured {r['measured']:.2f}x [p10 {r['p10']:.2f}, p90 "
                             f"{r['p90']:.2f}]{mark}")
            verdict = "reached" if check["met"] else "NOT reached (the fastest model found is written; exit 1)"
            lines.insert(len(lines) - len(check["rounds"]),
                         f"target {check['target']:g}x at {check['threads'] or 'default'} thread(s), end to end: "
                         f"{verdict}")
    return "\n".join(lines) + "\n"


def channel_drift_note(metric: str) -> str | None:
    """One line on what the channel drift means and which number to read (after it is printed)."""
    if metric != "channel":
        return None
    return (f"drift (channel) is 1 - cosine after scaling every output channel to unit spread (floored at "
            f"{STD_FLOOR:g} x its RMS), so small-valued channels such as class scores count as much as large ones; "
            "it is far larger than the plain 1 - cosine when those channels move. Compare rewrites of one model by "
            "it; for accuracy read 1 - cosine and top-1 agreement from `sepify verify --inputs` on held-out data.")


def render_calibration(cal, width: int | None = None) -> str:
    """The calibration report's summary lines under the rewrite table."""
    lines = [f"calibration: {cal.data}, {cal.samples} samples, allocation {cal.allocation}; "
             f"drift ({cal.drift_metric}) {_g(cal.drift)} vs weight-only {_g(cal.drift_weight_only)}; "
             f"1-cosine {_g(cal.drift_cosine)} vs {_g(cal.drift_cosine_weight_only)} (on the calibration samples)",
             channel_drift_note(cal.drift_metric)]
    if cal.folded_batchnorms:
        lines.append(f"BatchNormalization folded into {len(cal.folded_batchnorms)} rewritten conv(s)")
    lines.extend(f"note: {n}" for n in cal.notes)
    return render(lines, width)


def _g(v) -> str:
    return "?" if v is None else f"{v:.3g}"


def render_sweep(report: SweepReport, width: int | None = None) -> str:
    """The sweep as a table."""
    columns = [Column("budget", keep=100), Column("MACs", keep=100), Column("drift", keep=100),
               Column("1-cos", keep=90), Column("predicted", keep=40), Column("weight-only MACs", keep=30),
               Column("weight-only drift", keep=80), Column("weight-only 1-cos", keep=50), Column("ratio", keep=60),
               Column("latency", keep=70)]
    rows = []
    for p in report.points:
        ratio = (p.drift_weight_only / p.drift) if p.drift_weight_only is not None and p.drift > 0 else None
        lat = ""
        if p.latency and "speedup" in p.latency and p.latency["speedup"] is not None:
            lat = f"{p.latency['speedup']:.2f}x"
        rows.append([f"{p.budget:.2f}", f"{p.macs_ratio:.3f}", f"{p.drift:.2e}", f"{p.drift_cosine:.2e}",
                     "" if p.predicted_drift is None else f"{p.predicted_drift:.2e}",
                     "" if p.macs_ratio_weight_only is None else f"{p.macs_ratio_weight_only:.3f}",
                     "" if p.drift_weight_only is None else f"{p.drift_weight_only:.2e}",
                     "" if p.drift_cosine_weight_only is None else f"{p.drift_cosine_weight_only:.2e}",
                     "" if ratio is None or not math.isfinite(ratio) else f"{ratio:.1f}x", lat])
    table, dropped = fit_table(columns, rows, width, title=f"{report.model}: conv MACs vs drift "
                                                              f"({report.drift_metric}; eval on {report.eval_data})")
    return render([table, dropped_note(dropped, width), channel_drift_note(report.drift_metric)], width)


# ----------------------------------------------------------------------------------------------
# verify, bench
# ----------------------------------------------------------------------------------------------
def _drift_rule(report) -> str:
    if report.gates is not None:
        return report.gates.describe() + " on every output it applies to (over all samples)"
    tensors = [*report.outputs, *report.layers]
    # float16 tensors get their own default tolerances (a few ulps of their largest value)
    own = [d for d in tensors if d.atol is not None and (d.atol, d.rtol) != (report.atol, report.rtol)]
    if not own:
        return f"|a-b| <= {report.atol:g} + {report.rtol:g}*|a| on every output element"
    parts = [f"{d.name}: {d.atol:.3g} + {d.rtol:.3g}*|a|" for d in own]
    if len(own) < len(tensors):
        parts.append(f"others: {report.atol:g} + {report.rtol:g}*|a|")
    return ("|a-b| <= atol + rtol*|a| (" + "; ".join(parts) + "; float16: a few ulps of the largest value) "
            "on every output element")


def render_drift(report, width: int | None = None) -> str:
    gated = report.gates is not None
    metric = report.gates.drift_metric if gated else "cosine"
    columns = [Column("tensor", "left", 100, name=True), Column("shape", "left", 30), Column("max abs", keep=80),
               Column("mean abs", keep=20), Column("p99 abs", keep=25), Column("max rel", keep=15),
               Column("cosine", keep=95), Column(f"drift ({metric})", keep=96), Column("SNR dB", keep=35),
               Column("top-1", keep=90), Column("mismatched", keep=85 if not gated else 10), Column("pass", keep=100)]
    parts: list = []
    for title, rows in (("outputs", report.outputs), ("rewritten layers", report.layers)):
        if not rows:
            continue
        cells = [[d.name, _dims(d.shape), f"{d.max_abs:.2e}", f"{d.mean_abs:.2e}", f"{d.p99_abs:.2e}",
                  f"{d.max_rel:.2e}", f"{d.cosine:.6f}", "" if d.drift is None else f"{d.drift:.2e}",
                  f"{d.snr_db:.1f}", f"{d.top1_agreement:.3f}" if d.top1_agreement is not None else "",
                  str(d.mismatched) + (f" (+{d.nonfinite_b} non-finite)" if d.nonfinite_b != d.nonfinite_a else ""),
                  "yes" if d.passed else "NO"] for d in rows]
        table, dropped = fit_table(columns, cells, width, title=f"{report.model_a} vs {report.model_b}: {title}")
        parts += [table, dropped_note(dropped, width)]
    samples = f" ({report.samples} samples in {report.runs} runs)" if report.samples > 1 else ""
    parts.append(f"{'PASSED' if report.passed else 'FAILED'}: {_drift_rule(report)}; inputs: "
                 f"{report.input_source}{samples if 'sample' not in report.input_source else ''}")
    if report.layers:
        parts.append("(rewritten layers are diagnostics: only the outputs decide PASSED/FAILED)")
    parts += [f"warning: {w}" for w in getattr(report, "warnings", [])]
    return render(parts, width)


def render_bench(report, width: int | None = None) -> str:
    columns = [Column("model", "left", 100, name=True), Column("median ms", keep=100), Column("p10 ms", keep=60),
               Column("p90 ms", keep=60), Column("runs", keep=30), Column("MACs", keep=80)]
    rows = [[report.model_a, f"{report.latency_a.median_ms:.3f}", f"{report.latency_a.p10_ms:.3f}",
             f"{report.latency_a.p90_ms:.3f}", str(report.latency_a.runs), human(report.macs_a)]]
    if report.latency_b:
        rows.append([report.model_b, f"{report.latency_b.median_ms:.3f}", f"{report.latency_b.p10_ms:.3f}",
                     f"{report.latency_b.p90_ms:.3f}", str(report.latency_b.runs), human(report.macs_b)])
    providers = ", ".join(getattr(report, "providers", None) or ["CPUExecutionProvider"])
    table, dropped = fit_table(columns, rows, width, title=f"latency ({providers}, threads: {report.threads or 'default'})")
    parts: list = [table, dropped_note(dropped, width)]
    if report.rounds_used is not None and report.rounds and report.rounds_used < report.rounds:
        parts.append(f"{report.rounds_used} of {report.rounds} rounds used: the others had threads waiting for a CPU "
                     "(other processes)")
    if report.speedup is not None:
        mr = report.mac_reduction
        parts.append(f"speedup {report.speedup:.2f}x (per-round p10-p90 {report.speedup_p10:.2f}-"
                     f"{report.speedup_p90:.2f}) · MAC reduction {mr:.2f}x · efficiency {report.efficiency:.2f}" if mr
                     else f"speedup {report.speedup:.2f}x")
    if report.nodes:
        cols = [Column("node", "left", 100, name=True), Column("original µs", keep=100),
                Column("rewritten µs", keep=100), Column("speedup", keep=90)]
        cells = [[n.name, f"{n.time_a_us:.1f}" if n.time_a_us else "?", f"{n.time_b_us:.1f}" if n.time_b_us else "?",
                  f"{n.speedup:.2f}x" if n.speedup else "?"] for n in report.nodes]
        nt, dropped = fit_table(cols, cells, width, title="rewritten convs: summed kernel times (onnxruntime profiler)")
        parts += [nt, dropped_note(dropped, width)]
        p = report.profile
        if p is not None:
            parts.append(f"Kernel time of each conv and of the nodes that replaced it (fused activations included), "
                         f"median of {p.runs} profiled runs at the timed runs' settings (threads: "
                         f"{p.threads or 'default'}, spinning {p.spinning}). Rows add up to {p.rewritten_a_us:.0f} -> "
                         f"{p.rewritten_b_us:.0f} µs; all kernels: {p.kernels_a_us:.0f} -> {p.kernels_b_us:.0f} µs "
                         f"({p.other_b_us:.0f} µs of the rewritten model in layout reorders and other nodes of no "
                         "conv). The medians above are wall time per run, kernels plus the gaps between them.")
    return render(parts, width)


__all__ = ["AUDIT_COLUMNS", "CSV_FIELDS", "FORMATS", "FORMAT_OF_SUFFIX", "audit_table", "channel_drift_note", "human",
           "render_audit", "render_audit_csv", "render_audit_json", "render_audit_markdown", "render_audit_text",
           "render_bench", "render_calibration", "render_drift", "render_latency", "render_rewrite", "render_sweep",
           "sort_nodes", "summary_table"]
