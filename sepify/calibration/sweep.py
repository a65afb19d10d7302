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

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

from ..threads import releasing_scratch, single_blas
from .lstsq import LSTSQ_BLAS
from ..core.drift import drift_definition
from ..core.schemes import get as get_scheme
from ..errors import ParameterError
from ..pipeline.plan import Policy
from ..serialize import SCHEMA_VERSION, dumps
from .calibrate import Calibrator, options_of
from .data import CalibrationSet, load_calibration
from .options import CalibrationOptions

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

    def __repr__(self) -> str:
        return (f"SweepReport(model={self.model!r}, eval_data={self.eval_data!r}, drift_metric={self.drift_metric!r}, "
                f"points={len(self.points)})")

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model, "data": self.data, "eval_data": self.eval_data, "drift_metric": self.drift_metric,
            "drift_definition": drift_definition(self.drift_metric),
            "conv_macs": self.conv_macs, "input_shapes": self.input_shapes, "points": [p.to_dict() for p in self.points],
            "layers": self.layers, "seconds": self.seconds,
        }

    def to_json(self) -> str:
        return dumps(self.to_dict())


def parse_budgets(text: str | None) -> list[float]:
    if not text:
        return list(DEFAULT_BUDGETS)
    try:
        values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise ParameterError("budgets", text, "give fractions like 0.9,0.7,0.5") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise ParameterError("budgets", text, "every budget must be a fraction in (0, 1]")
    return sorted(set(values), reverse=True)


@single_blas(preload=LSTSQ_BLAS)
@releasing_scratch
def sweep(model, data: Any = "random", budgets: Sequence[float] = DEFAULT_BUDGETS, input_shapes=None, *,
          policy=None, eval_data: Any = None, weight_only: bool = True, latency: bool = False,
          latency_runs: int = 30, calibrator: Calibrator | None = None, options: CalibrationOptions | None = None,
          input_values=None, **kw) -> SweepReport:
    """Calibrated (and weight-only) conv MACs vs drift at each budget; see the module docstring.

    ``options`` (or their fields as keywords) as for :func:`sepify.calibration.calibrate.calibrate`
    — every option reaches the calibration the curve is made of; ``input_values`` likewise (a given
    ``calibrator`` holds its own)."""
    policy = policy or Policy()
    opts = replace(options_of(options, kw), allocation="sensitivity")
    cal = calibrator or Calibrator(model, policy, data, input_shapes, options=opts, input_values=input_values)
    if not cal.profiles:
        cal.profile()
    evaluation: CalibrationSet = cal.calib
    if eval_data is not None:
        evaluation = eval_data if isinstance(eval_data, CalibrationSet) else load_calibration(
            eval_data, cal.loaded, cal.shapes, seed=cal.seed + 1, input_values=cal.input_values)
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
    saved = 0
    for name, (scheme, r, variant) in choices.items():
        layer = cal.by_name.get(name)
        if layer is not None:
            saved += layer.geo.macs - get_scheme(scheme).macs(layer.geo, r, variant)
    return saved


def _latency(cal: Calibrator, results, solved, runs: int) -> dict[str, Any]:
    from ..pipeline.bench import benchmark
    from ..pipeline.rewrite import finish_rewrite

    realized, kept, _ = cal.realizations(results, solved)
    rewritten, _ = finish_rewrite(cal.loaded, cal.policy.to_dict(), cal.conv_macs, realized, kept, cal.policy)
    rep = benchmark(cal.loaded.model, rewritten, runs=runs, warmup=3, input_shapes=cal.shapes,
                    input_values=cal.input_values, profile_runs=0)
    return {"runs": runs, "original_ms": rep.latency_a.median_ms,
            "rewritten_ms": rep.latency_b.median_ms if rep.latency_b else None, "speedup": rep.speedup}


__all__ = ["DEFAULT_BUDGETS", "SweepPoint", "SweepReport", "parse_budgets", "sweep"]
