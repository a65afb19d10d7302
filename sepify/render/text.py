"""Rendering of typed results: rich tables, JSON, CSV and Markdown. No computation here."""

from __future__ import annotations

from typing import TYPE_CHECKING

import csv
import io
import json
import math
from typing import Sequence


from ..pipeline.audit import AuditReport, NodeAudit
from ..serialize import json_default

if TYPE_CHECKING:
    from rich.table import Table

    from ..calibration.sweep import SweepReport


def _rich():
    """rich, imported when a table is drawn (JSON, CSV and Markdown output do not need it)."""
    from rich.console import Console
    from rich.table import Table

    return Console, Table


CSV_FIELDS = [
    "model", "name", "op_type", "group", "kernel_shape", "strides", "pads", "dilations", "input_shape",
    "output_shape", "weight_shape", "params", "macs", "flops", "share", "arithmetic_intensity", "shape_source",
    "eligible", "reason", "best_scheme", "best_rank", "best_macs", "best_error",
]


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
    return "; ".join(parts) or (n.reason or "")


def sort_nodes(nodes: Sequence[NodeAudit], sort: str = "macs", top: int | None = None) -> list[NodeAudit]:
    if sort == "macs":
        ordered = sorted(nodes, key=lambda n: -(n.macs or 0))
    else:
        ordered = list(nodes) if sort == "graph" else sorted(nodes, key=lambda n: n.qualified_name)
    return ordered[:top] if top else ordered


def audit_table(report: AuditReport, sort: str = "macs", top: int | None = None) -> Table:
    Console, Table = _rich()
    t = report.totals
    table = Table(
        title=f"{report.model}  ({report.producer or 'unknown producer'}, opset {report.opset})",
        caption=(
            f"conv MACs {human(t.conv_macs)} of {human(t.total_macs)} total ({human(t.matmul_macs)} Gemm/MatMul) · "
            f"{t.conv_nodes} conv nodes, {t.eligible_nodes} rewritable · exact savings {human(t.exact_savings_macs)} MACs"
        ),
        show_lines=False,
    )
    for col, just in (("node", "left"), ("op", "left"), ("in → out", "left"), ("kernel", "left"), ("s/d/g", "left"),
                      ("params", "right"), ("MACs", "right"), ("share", "right"), ("FLOP/B", "right"),
                      ("separability", "left")):
        table.add_column(col, justify=just, overflow="fold")
    for n in sort_nodes(report.nodes, sort, top):
        sdg = f"{_dims(n.strides)}/{_dims(n.dilations)}/{n.group}"
        table.add_row(
            n.qualified_name,
            n.op_type,
            f"{_dims(n.input_shape)} → {_dims(n.output_shape)}" + ("" if n.shape_source in ("inferred", "input") else f" ({n.shape_source})"),
            _dims(n.kernel_shape),
            sdg,
            human(n.params),
            human(n.macs),
            f"{100 * n.share:.1f}%" if n.share is not None else "?",
            f"{n.arithmetic_intensity:.1f}" if n.arithmetic_intensity is not None else "?",
            _best_text(n),
        )
    return table


def summary_table(reports: Sequence[AuditReport]) -> Table:
    Console, Table = _rich()
    table = Table(title="models")
    for col in ("model", "convs", "conv MACs", "total MACs", "conv share", "params", "rewritable", "exact savings"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in reports:
        t = r.totals
        table.add_row(
            r.model, str(t.conv_nodes), human(t.conv_macs), human(t.total_macs),
            f"{100 * t.conv_macs / t.total_macs:.1f}%" if t.total_macs else "?",
            human(t.model_params), str(t.eligible_nodes), human(t.exact_savings_macs),
        )
    return table


def render_audit_text(reports: Sequence[AuditReport], sort: str = "macs", top: int | None = None, width: int = 160) -> str:
    Console, Table = _rich()
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=False, color_system=None)
    if len(reports) > 1:
        console.print(summary_table(reports))
    for r in reports:
        console.print(audit_table(r, sort, top))
        for w in r.warnings:
            console.print(f"warning: {w}")
    console.print(f"Convention: {reports[0].convention}" if reports else "")
    return buf.getvalue()


def _report_dict(r: AuditReport, sort: str, top: int | None) -> dict:
    d = r.to_dict()
    if sort != "graph" or top:
        d["nodes"] = [n.to_dict() for n in sort_nodes(r.nodes, sort, top)]
    return d


def render_audit_json(reports: Sequence[AuditReport], sort: str = "graph", top: int | None = None) -> str:
    if len(reports) == 1:
        return json.dumps(_report_dict(reports[0], sort, top), indent=2, default=json_default)
    return json.dumps({"schema_version": reports[0].schema_version,
                       "models": [_report_dict(r, sort, top) for r in reports]}, indent=2, default=json_default)


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


def render_audit_csv(reports: Sequence[AuditReport], sort: str = "macs", top: int | None = None) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in reports:
        for n in sort_nodes(r.nodes, sort, top):
            writer.writerow(_csv_row(r, n))
    return buf.getvalue()


def render_audit_markdown(reports: Sequence[AuditReport], sort: str = "macs", top: int | None = None) -> str:
    lines = []
    for r in reports:
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
    if reports:
        lines.append(f"_Convention: {reports[0].convention}_")
    return "\n".join(lines) + "\n"


def render_audit(reports: Sequence[AuditReport], fmt: str, sort: str = "macs", top: int | None = None) -> str:
    if fmt == "json":
        return render_audit_json(reports, sort, top)
    if fmt == "csv":
        return render_audit_csv(reports, sort, top)
    if fmt == "md":
        return render_audit_markdown(reports, sort, top)
    return render_audit_text(reports, sort, top)


def render_rewrite(report, written_to: str | None = None, width: int = 160) -> str:
    Console, Table = _rich()
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=False, color_system=None)
    table = Table(title=f"{report.model}: {report.policy.mode} rewrite plan")
    for col in ("node", "scheme", "rank", "weight error", "MACs before", "MACs after", "ratio"):
        table.add_column(col, justify="left" if col in ("node", "scheme") else "right", overflow="fold")
    for r in report.rewritten:
        table.add_row(r.qualified_name, r.scheme + ("+spatial" if r.chained else ""), str(r.rank),
                      f"{r.weight_error:.2e}", human(r.macs_before), human(r.macs_after),
                      f"{r.macs_after / r.macs_before:.2f}x" if r.macs_before else "")
    console.print(table)
    reasons: dict[str, int] = {}
    for k in report.kept:
        reasons[k["reason"]] = reasons.get(k["reason"], 0) + 1
    if reasons:
        console.print("kept: " + ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])))
    console.print(
        f"conv MACs {human(report.conv_macs_before)} -> {human(report.conv_macs_after)} "
        f"({report.macs_ratio:.3f}x), {len(report.rewritten)} node(s) rewritten"
        + (f"; written to {written_to}" if written_to else ("; dry run, nothing written" if written_to is None else ""))
    )
    return buf.getvalue()


def _console(buf, width=160):
    Console, Table = _rich()
    return Console(file=buf, width=width, force_terminal=False, color_system=None)


def render_drift(report) -> str:
    Console, Table = _rich()
    buf = io.StringIO()
    console = _console(buf)
    for title, rows in (("outputs", report.outputs), ("rewritten layers", report.layers)):
        if not rows:
            continue
        table = Table(title=f"{report.model_a} vs {report.model_b}: {title}")
        for col in ("tensor", "shape", "max abs", "mean abs", "p99 abs", "max rel", "cosine", "SNR dB", "top-1", "mismatched", "pass"):
            table.add_column(col, justify="left" if col == "tensor" else "right", overflow="fold")
        for d in rows:
            table.add_row(d.name, _dims(d.shape), f"{d.max_abs:.2e}", f"{d.mean_abs:.2e}", f"{d.p99_abs:.2e}",
                          f"{d.max_rel:.2e}", f"{d.cosine:.6f}", f"{d.snr_db:.1f}",
                          f"{d.top1_agreement:.3f}" if d.top1_agreement is not None else "",
                          str(d.mismatched) + (f" (+{d.nonfinite_b} non-finite)" if d.nonfinite_b != d.nonfinite_a else ""),
                          "yes" if d.passed else "NO")
        console.print(table)
    tensors = [*report.outputs, *report.layers]
    # float16 tensors get their own default tolerances (a few ulps of their largest value)
    own = [d for d in tensors if d.atol is not None and (d.atol, d.rtol) != (report.atol, report.rtol)]
    if not own:
        rule = f"|a-b| <= {report.atol:g} + {report.rtol:g}*|a|"
    else:
        parts = [f"{d.name}: {d.atol:.3g} + {d.rtol:.3g}*|a|" for d in own]
        if len(own) < len(tensors):
            parts.append(f"others: {report.atol:g} + {report.rtol:g}*|a|")
        rule = "|a-b| <= atol + rtol*|a| (" + "; ".join(parts) + "; float16: a few ulps of the largest value)"
    console.print(f"{'PASSED' if report.passed else 'FAILED'}: {rule} on every output element; "
                  f"inputs: {report.input_source}")
    for w in getattr(report, "warnings", []):
        console.print(f"warning: {w}")
    return buf.getvalue()


def render_bench(report) -> str:
    Console, Table = _rich()
    buf = io.StringIO()
    console = _console(buf)
    table = Table(title=f"latency (threads: {report.threads or 'default'})")
    for col in ("model", "median ms", "p10 ms", "p90 ms", "runs", "MACs"):
        table.add_column(col, justify="left" if col == "model" else "right")
    table.add_row(report.model_a, f"{report.latency_a.median_ms:.3f}", f"{report.latency_a.p10_ms:.3f}",
                  f"{report.latency_a.p90_ms:.3f}", str(report.latency_a.runs), human(report.macs_a))
    if report.latency_b:
        table.add_row(report.model_b, f"{report.latency_b.median_ms:.3f}", f"{report.latency_b.p10_ms:.3f}",
                      f"{report.latency_b.p90_ms:.3f}", str(report.latency_b.runs), human(report.macs_b))
    console.print(table)
    if report.speedup is not None:
        mr = report.mac_reduction
        console.print(f"speedup {report.speedup:.2f}x (per-round p10-p90 {report.speedup_p10:.2f}-{report.speedup_p90:.2f}) · "
                      f"MAC reduction {mr:.2f}x · efficiency {report.efficiency:.2f}" if mr else
                      f"speedup {report.speedup:.2f}x")
    if report.nodes:
        nt = Table(title="rewritten nodes (onnxruntime profiler, median kernel time)")
        for col in ("node", "original us", "rewritten us", "speedup"):
            nt.add_column(col, justify="left" if col == "node" else "right")
        for n in report.nodes:
            nt.add_row(n.name, f"{n.time_a_us:.1f}" if n.time_a_us else "?", f"{n.time_b_us:.1f}" if n.time_b_us else "?",
                       f"{n.speedup:.2f}x" if n.speedup else "?")
        console.print(nt)
    return buf.getvalue()


def render_latency(report, width: int = 160) -> str:
    """A table of the measured rewrites: original vs each lowering, speedup, decision."""
    Console, Table = _rich()
    from ..pipeline.latency import latency_rows

    rows = latency_rows(report)
    if not rows:
        return ""
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=False, color_system=None)
    threads = rows[0].get("threads")
    table = Table(title=f"onnxruntime latency per node (isolated, {threads or 'default'} thread(s), medians)")
    for col in ("node", "original", "lowerings (µs)", "best", "speedup", "runs", "rewritten"):
        table.add_column(col, justify="left" if col in ("node", "lowerings (µs)", "best") else "right", overflow="fold")
    for d in rows:
        if "error" in d:
            table.add_row(d["node"], "?", f"not measured: {d['error']}", "", "", "", "no")
            continue
        lows = ", ".join(f"{k} {v:.0f}" for k, v in d["lowerings_us"].items())
        table.add_row(d["node"] + (f" (+{d['activation']})" if d.get("activation") else ""), f"{d['original_us']:.0f} µs",
                      lows, d["chosen"], f"{d['speedup']:.2f}x", str(d["runs"]), "yes" if d["faster"] else "no")
    console.print(table)
    return buf.getvalue()




def render_sweep(report: SweepReport) -> str:
    """The sweep as a rich table."""
    Console, Table = _rich()
    t = Table(title=f"{report.model}: conv MACs vs drift ({report.drift_metric}; eval on {report.eval_data})")
    for col in ("budget", "MACs", "drift", "1-cos", "predicted", "weight-only MACs", "weight-only drift",
                "weight-only 1-cos", "ratio", "latency"):
        t.add_column(col, justify="right")
    for p in report.points:
        ratio = (p.drift_weight_only / p.drift) if p.drift_weight_only is not None and p.drift > 0 else None
        lat = ""
        if p.latency and "speedup" in p.latency and p.latency["speedup"] is not None:
            lat = f"{p.latency['speedup']:.2f}x"
        t.add_row(f"{p.budget:.2f}", f"{p.macs_ratio:.3f}", f"{p.drift:.2e}", f"{p.drift_cosine:.2e}",
                  "" if p.predicted_drift is None else f"{p.predicted_drift:.2e}",
                  "" if p.macs_ratio_weight_only is None else f"{p.macs_ratio_weight_only:.3f}",
                  "" if p.drift_weight_only is None else f"{p.drift_weight_only:.2e}",
                  "" if p.drift_cosine_weight_only is None else f"{p.drift_cosine_weight_only:.2e}",
                  "" if ratio is None or not math.isfinite(ratio) else f"{ratio:.1f}x", lat)
    buf = io.StringIO()
    Console(file=buf, width=160, force_terminal=False).print(t)
    return buf.getvalue()


def render_calibration(cal) -> str:
    """The calibration report's summary lines under the rewrite table."""
    lines = [f"calibration: {cal.data}, {cal.samples} samples, allocation {cal.allocation}; "
             f"drift ({cal.drift_metric}) {_g(cal.drift)} vs weight-only {_g(cal.drift_weight_only)}; "
             f"1-cosine {_g(cal.drift_cosine)} vs {_g(cal.drift_cosine_weight_only)} (on the calibration samples)"]
    if cal.folded_batchnorms:
        lines.append(f"BatchNormalization folded into {len(cal.folded_batchnorms)} rewritten conv(s)")
    lines.extend(f"note: {n}" for n in cal.notes)
    return "\n".join(lines) + "\n"


def _g(v) -> str:
    return "?" if v is None else f"{v:.3g}"
