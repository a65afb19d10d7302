"""The trade-off curve: conv MACs against output drift, calibrated and weight-only, over budgets.

``sepify plan MODEL --calibrate DATA --sweep`` profiles the model once (reference activations,
per-layer output-error curves and sensitivities, see :mod:`sepify.calibrate`), then for every MAC
budget allocates ranks, calibrates the chosen layers in waves and measures the drift of the
result — on ``--eval`` samples when given (held-out data: the honest number), else on the
calibration samples.  The weight-only planner (``--budget`` without calibration: SVD factors,
spectral-energy greedy) is measured on the same samples at every budget for comparison.
Measured latency (onnxruntime, interleaved A/B rounds; :func:`sepify.bench.benchmark`) is added
when asked, from the real rewritten graphs.

Drift is measured on the working model whose rewritten convs carry the dense weight their chain
computes — the same function as the rewritten graph, up to float rounding.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from .calibrate import CalibrationSet, Calibrator, load_calibration
from ..errors import UsageError

DEFAULT_BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4)


@dataclass
class SweepPoint:
    budget: float
    macs_ratio: float  # calibrated allocation
    drift: float  # chosen metric, calibrated
    drift_cosine: float  # plain 1 − cosine, calibrated
    predicted_drift: float | None
    macs_ratio_weight_only: float | None = None
    drift_weight_only: float | None = None
    drift_cosine_weight_only: float | None = None
    rewritten: int = 0
    latency: dict[str, Any] | None = None  # {"original_ms", "rewritten_ms", "speedup"} when measured

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SweepReport:
    model: str
    data: str
    eval_data: str
    drift_metric: str
    conv_macs: int
    points: list[SweepPoint]
    layers: list[dict[str, Any]] = field(default_factory=list)  # per-layer profiles (curves, sensitivity)
    seconds: dict[str, float] = field(default_factory=dict)
    input_shapes: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "data": self.data, "eval_data": self.eval_data, "drift_metric": self.drift_metric,
            "drift_definition": "1 - cosine of each float output over all samples (channel: each output channel "
                                "scaled to unit RMS first), mean over outputs",
            "conv_macs": self.conv_macs, "input_shapes": self.input_shapes, "points": [p.to_dict() for p in self.points],
            "layers": self.layers, "seconds": self.seconds,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_default)


def _default(o):
    try:
        return o.item()
    except AttributeError:
        raise TypeError(type(o).__name__) from None


def parse_budgets(text: str | None) -> list[float]:
    if not text:
        return list(DEFAULT_BUDGETS)
    try:
        values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--budgets {text!r}: give fractions like 0.9,0.7,0.5") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise UsageError("--budgets: every budget must be a fraction in (0, 1]")
    return sorted(set(values), reverse=True)


def sweep(model, data: Any = "random", budgets: Sequence[float] = DEFAULT_BUDGETS, input_shapes=None, *,
          policy=None, eval_data: Any = None, weight_only: bool = True, latency: bool = False,
          latency_runs: int = 30, samples: int | None = None, rows: int | None = None, seed: int = 0,
          drift_metric: str = "channel", progress: bool = False, calibrator: Calibrator | None = None,
          input_values=None) -> SweepReport:
    """Calibrated (and weight-only) conv MACs vs drift at each budget; see the module docstring.
    ``input_values``: as for :func:`sepify.calibrate.calibrate` (a given ``calibrator`` holds its own)."""
    from .calibrate import DEFAULT_ROWS
    from ..pipeline.plan import Policy

    policy = policy or Policy()
    cal = calibrator or Calibrator(model, policy, data, input_shapes, allocation="sensitivity", samples=samples,
                                   rows=rows or DEFAULT_ROWS, seed=seed, drift_metric=drift_metric, progress=progress,
                                   input_values=input_values)
    if not cal.profiles:
        cal.profile()
    evaluation: CalibrationSet = cal.calib
    if eval_data is not None:
        evaluation = eval_data if isinstance(eval_data, CalibrationSet) else load_calibration(
            eval_data, cal.loaded, cal.shapes, seed=seed + 1, input_values=cal.input_values)
    total = cal.conv_macs
    points = []
    for budget in budgets:
        choices, predicted = cal.choose(budget)
        results, solved = cal.solve(choices)
        d, dc = cal.drift(evaluation)
        after = total - sum(r.macs_before - r.macs_after for r in results.values())
        point = SweepPoint(budget, after / total if total else 1.0, d, dc, predicted, rewritten=len(results))
        if latency and results:
            point.latency = _latency(cal, results, solved, latency_runs)
        if weight_only:
            wchoices = cal.weight_only_choices(budget)
            cal.set_weight_only(wchoices)
            wd, wdc = cal.drift(evaluation)
            saved = _macs_saved(cal, wchoices)
            point.macs_ratio_weight_only = (total - saved) / total if total else 1.0
            point.drift_weight_only, point.drift_cosine_weight_only = wd, wdc
        points.append(point)
    return SweepReport(cal.loaded.label, cal.calib.source, evaluation.source if eval_data is not None else
                       f"{cal.calib.source} (the calibration samples)", cal.drift_metric, total, points,
                       [p.to_dict() for p in cal.profiles.values()], dict(cal.timings),
                       {k: list(v) for k, v in cal.shapes.items()})


def _macs_saved(cal: Calibrator, choices) -> int:
    from ..core.factorize import scheme_stages, stages_macs

    saved = 0
    for name, (scheme, r, *order) in choices.items():
        layer = cal.by_name.get(name)
        if layer is not None:
            vf = order[0] if order and scheme == "spatial" else None
            stages = scheme_stages(layer.geo, scheme, r, vf) if vf is not None else scheme_stages(layer.geo, scheme, r)
            saved += layer.geo.macs - stages_macs(layer.geo, stages)
    return saved


def _latency(cal: Calibrator, results, solved, runs: int) -> dict[str, Any]:
    from ..pipeline.bench import benchmark
    from ..pipeline.rewrite import rewrite

    final_model, final_plan, _ = cal.finish(results, solved)
    rewritten, _ = rewrite(final_plan)
    rep = benchmark(cal.loaded.model, rewritten, runs=runs, warmup=3, input_shapes=cal.shapes,
                    input_values=cal.input_values, profile_runs=0)
    return {"runs": runs, "original_ms": rep.latency_a.median_ms,
            "rewritten_ms": rep.latency_b.median_ms if rep.latency_b else None, "speedup": rep.speedup}


def render_sweep(report: SweepReport) -> str:
    """The sweep as a rich table."""
    import io

    from rich.console import Console
    from rich.table import Table

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


def plot_sweep(report: SweepReport, path, *, title: str | None = None) -> None:
    """The curve as a PNG/SVG/PDF (by ``path``'s suffix) with matplotlib (``pip install sepify[plot]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("plotting needs matplotlib: pip install 'sepify[plot]'") from None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=100)
    pts = report.points
    for ax, key, label in ((axes[0], "drift", f"drift ({report.drift_metric})"),
                           (axes[1], "drift_cosine", "1 − cosine (sepify verify)")):
        ax.plot([p.macs_ratio for p in pts], [max(getattr(p, key), 1e-12) for p in pts], "o-", color="#1f77b4",
                label="calibrated (sensitivity allocation + LS factors)")
        wo = [p for p in pts if p.drift_weight_only is not None]
        if wo:
            ax.plot([p.macs_ratio_weight_only for p in wo], [max(getattr(p, key + "_weight_only")
                    if key == "drift" else p.drift_cosine_weight_only, 1e-12) for p in wo], "s--", color="#d62728",
                    label="weight-only SVD (spectral budget)")
        ax.set_yscale("log")
        ax.set_xlabel("conv MACs kept (fraction)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.invert_xaxis()
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title or f"{report.model.rsplit('/', 1)[-1]} — eval: {report.eval_data.rsplit('/', 1)[-1]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
