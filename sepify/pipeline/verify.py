"""Numerical comparison of two models in onnxruntime, on every sample given.

Inputs: a sample file or folder (:mod:`sepify.model.samples`: each array's first axis is the
sample axis, as for ``--calibrate``) run sample by sample (or several at once on a symbolic batch
axis), a mapping (one onnxruntime feed, as given), or seeded random inputs.  The statistics of
each output are over every element of every sample.

Default pass rule, per output element (as numpy.allclose, ``a`` = the original's value)::

    |a − b| ≤ atol + rtol · |a|

plus: an output passes only if NaN/Inf appear in exactly the same places in both.  A lossy
rewrite never passes that; :class:`Gates` replace it by criteria a pipeline can hold a lossy
rewrite to: ``max_drift`` (1 − cosine of each float output, plain or channel-standardized:
:class:`sepify.core.drift.DriftMeter`), ``min_cosine`` and ``min_top1`` (top-1 agreement of
outputs that look like class scores, ``[batch, classes]``).

Default tolerances (when none is given) depend on the output's dtype: float32/float64 outputs
use ``DEFAULT_ATOL`` / ``DEFAULT_RTOL``.  A lower-precision output (float16) comes out of a
network that rounds every intermediate to that precision, and a rewritten chain rounds one more
intermediate per stage, so two correct models differ by a few units in the last place of the
output's *largest* values, not of each element: atol = ``LOW_PRECISION_ULPS`` · ε · max|a| and
rtol = 2ε (never below the float32 defaults).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from ..core.drift import DRIFT_METRICS, DriftMeter, TensorStats, drift_definition
from ..errors import ParameterError, UsageError
from ..serialize import SCHEMA_VERSION, dumps
from ..model.graph import GraphView
from ..model.load import LoadedModel, ModelSource, load_model
from ..model.samples import SampleSet, load_samples, require_tensor_inputs
from ..model.session import ort_message, ort_session
from ..model.shapes import (cast_input_values, check_values_agree, describe_input_values, normalize_input_shapes,
                            random_inputs, resolve_input_shapes, resolve_input_values)

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
LOW_PRECISION_ULPS = 8  # float16 outputs: atol = 8·ε·max|a| by default (see the module doc)
LAYER_CHUNK = 16  # rewritten tensors exposed per run in --per-layer mode (bounds memory)
DEFAULT_DRIFT_METRIC = "cosine"  # verify's gates: the plain 1 - cosine it prints


@dataclass(frozen=True)
class Gates:
    """Pass criteria for lossy rewrites; any one given replaces the elementwise ``atol``/``rtol`` rule.

    ``max_drift``: every float output's ``1 − cosine`` (over all samples) in ``drift_metric``
    (``cosine``: plain, the default; ``channel``: each output channel standardized first, see
    :func:`sepify.core.drift.drift_definition`) is at most this.  ``min_cosine``: every float
    output's cosine is at least this.  ``min_top1``: every output that looks like class scores
    (``[batch, classes]`` floats) picks the original's top class on at least this fraction of its
    rows (integer outputs — label ids — count their fraction of equal elements); at least one
    output must qualify.  NaN/Inf must still sit in the same places."""

    max_drift: float | None = None
    drift_metric: str = DEFAULT_DRIFT_METRIC
    min_cosine: float | None = None
    min_top1: float | None = None

    def __post_init__(self) -> None:
        if self.drift_metric not in DRIFT_METRICS:
            raise ParameterError("drift_metric", self.drift_metric, f"unknown drift metric ({', '.join(DRIFT_METRICS)})")
        if self.max_drift is not None and not 0 <= self.max_drift <= 2:
            raise ParameterError("max_drift", self.max_drift, "needs a drift (1 - cosine) in [0, 2]")
        if self.min_cosine is not None and not -1 <= self.min_cosine <= 1:
            raise ParameterError("min_cosine", self.min_cosine, "needs a cosine in [-1, 1]")
        if self.min_top1 is not None and not 0 <= self.min_top1 <= 1:
            raise ParameterError("min_top1", self.min_top1, "needs an agreement fraction in [0, 1]")

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.max_drift, self.min_cosine, self.min_top1))

    def describe(self) -> str:
        parts = []
        if self.max_drift is not None:
            parts.append(f"drift ({self.drift_metric}) <= {self.max_drift:g}")
        if self.min_cosine is not None:
            parts.append(f"cosine >= {self.min_cosine:g}")
        if self.min_top1 is not None:
            parts.append(f"top-1 agreement >= {self.min_top1:g}")
        return " and ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TensorDrift:
    name: str
    shape: list[int]  # of one run's tensor
    max_abs: float
    mean_abs: float
    p99_abs: float
    max_rel: float
    cosine: float
    snr_db: float
    nonfinite_a: int
    nonfinite_b: int
    mismatched: int  # elements beyond atol + rtol·|a|
    passed: bool
    top1_agreement: float | None = None
    top5_agreement: float | None = None
    atol: float | None = None  # the tolerances this tensor was checked with
    rtol: float | None = None
    drift: float | None = None  # 1 − cosine in the gates' drift metric (with --max-drift)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_tolerance(a: np.ndarray) -> tuple[float, float]:
    """(atol, rtol) for an original output ``a`` when the caller gives none (see the module doc)."""
    a = np.asarray(a)
    if a.dtype.kind != "f":
        return DEFAULT_ATOL, DEFAULT_RTOL
    try:
        eps = float(np.finfo(a.dtype).eps)
    except (TypeError, ValueError):  # a float type numpy has no finfo for
        return DEFAULT_ATOL, DEFAULT_RTOL
    if eps <= float(np.finfo(np.float32).eps):
        return DEFAULT_ATOL, DEFAULT_RTOL
    finite = np.abs(a.astype(np.float64)[np.isfinite(a)])
    scale = float(finite.max()) if finite.size else 0.0
    return max(DEFAULT_ATOL, LOW_PRECISION_ULPS * eps * scale), max(DEFAULT_RTOL, 2 * eps)


@dataclass
class DriftReport:
    model_a: str
    model_b: str
    atol: float
    rtol: float
    seed: int | None
    input_source: str
    outputs: list[TensorDrift]
    layers: list[TensorDrift] = field(default_factory=list)
    # Outputs that do not respond to their inputs here (saturated): agreeing on them proves little.
    insensitive: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    gates: Gates | None = None  # the criteria that replaced atol/rtol (None: the elementwise rule)
    samples: int = 1  # samples compared
    runs: int = 1  # onnxruntime runs per model

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def __repr__(self) -> str:
        return (f"DriftReport(model_a={self.model_a!r}, model_b={self.model_b!r}, passed={self.passed}, "
                f"outputs={len(self.outputs)}, layers={len(self.layers)}, samples={self.samples})")

    @property
    def rule(self) -> str:
        if self.gates is not None and self.gates.active:
            return (f"{self.gates.describe()} on every output it applies to (over all samples); NaN/Inf must match; "
                    "the elementwise atol/rtol rule is not applied")
        return ("|a-b| <= atol + rtol*|a| elementwise (a = original); NaN/Inf must match; each output's atol/rtol "
                f"are the ones it was checked with (float16 outputs default to {LOW_PRECISION_ULPS}*eps*max|a| and 2*eps)")

    def to_dict(self) -> dict[str, Any]:
        gates = self.gates if self.gates is not None and self.gates.active else None
        return {
            "schema_version": SCHEMA_VERSION,
            "passed": self.passed,
            "rule": self.rule,
            "gates": gates.to_dict() if gates else None,
            "drift_definition": drift_definition(gates.drift_metric) if gates and gates.max_drift is not None else None,
            "model_a": self.model_a,
            "model_b": self.model_b,
            "atol": self.atol,
            "rtol": self.rtol,
            "seed": self.seed,
            "input_source": self.input_source,
            "samples": self.samples,
            "runs": self.runs,
            "outputs": [o.to_dict() for o in self.outputs],
            "layers": [o.to_dict() for o in self.layers],
            "insensitive_outputs": self.insensitive,
            "warnings": self.warnings,
        }

    def to_json(self) -> str:
        return dumps(self.to_dict())


def _tolerances(a: np.ndarray, atol: float | None, rtol: float | None) -> tuple[float, float]:
    if atol is None or rtol is None:
        d_atol, d_rtol = default_tolerance(a)
        atol = d_atol if atol is None else atol
        rtol = d_rtol if rtol is None else rtol
    return float(atol), float(rtol)


def tensor_drift(name: str, st: TensorStats, gates: Gates | None = None, drift: float | None = None) -> TensorDrift:
    """The :class:`TensorDrift` of accumulated statistics, passed or not under ``gates`` (None or
    inactive: the elementwise rule)."""
    shape = st.shape or []
    if st.shape_mismatch:
        return TensorDrift(name, shape, float("inf"), float("inf"), float("inf"), float("inf"), 0.0, float("-inf"),
                           0, 0, int(st.size or 1), False, atol=st.atol, rtol=st.rtol)
    active = gates is not None and gates.active
    if not st.float:
        bad = st.size - st.equal
        agree = st.equal / st.size if st.size else 1.0
        passed = agree >= gates.min_top1 if active and gates.min_top1 is not None else bad == 0
        return TensorDrift(name, shape, float(bad > 0), bad / max(st.size, 1), float(bad > 0), float(bad > 0),
                           1.0 if bad == 0 else 0.0, float("inf") if bad == 0 else 0.0, 0, 0, bad, passed,
                           atol=st.atol, rtol=st.rtol)
    cosine = st.cosine
    if active:
        passed = st.same_nonfinite
        if gates.max_drift is not None:
            value = (1.0 - cosine) if drift is None else drift
            drift = value
            passed = passed and value <= gates.max_drift
        if gates.min_cosine is not None:
            passed = passed and cosine >= gates.min_cosine
        if gates.min_top1 is not None and st.top1_agreement is not None:
            passed = passed and st.top1_agreement >= gates.min_top1
    else:
        passed = st.mismatched == 0 and st.same_nonfinite
    return TensorDrift(name, shape, st.max_abs, st.mean_abs, st.p99_abs, st.max_rel, cosine, st.snr_db,
                       st.nonfinite_a, st.nonfinite_b, st.mismatched, passed, st.top1_agreement, st.top5_agreement,
                       st.atol, st.rtol, drift)


def compare_tensors(name: str, a: np.ndarray, b: np.ndarray, atol: float | None = None,
                    rtol: float | None = None) -> TensorDrift:
    """Drift of ``b`` against the original ``a``; ``None`` tolerances take :func:`default_tolerance`."""
    a = np.asarray(a)
    st = TensorStats(*_tolerances(a, atol, rtol))
    st.add(a, b)
    return tensor_drift(name, st)


def make_session(model: onnx.ModelProto, extra_outputs: Sequence[str] = (), providers=None, threads: int | None = None):
    """An onnxruntime session for comparing outputs (and calibration runs): threads never spin, so
    an idle session steals no CPU from another (:func:`sepify.model.session.ort_session`)."""
    return ort_session(model, extra_outputs, providers=providers, threads=threads, spinning="off")


def sample_runs(loaded: LoadedModel, inputs=None, input_shapes=None, seed: int = 0,
                input_values=None) -> SampleSet:
    """The runs to compare on: ``inputs`` a sample file or folder (every sample,
    :func:`sepify.model.samples.load_samples`), a mapping (one feed, as given), else one seeded
    random feed at the resolved ``input_shapes`` with the fixed ``input_values`` for those inputs.

    Given inputs win: an ``input_values`` entry for an input they hold must agree with it (else a
    UsageError), so a value is never silently dropped."""
    view = GraphView(loaded.model)
    names = [i.name for i in view.main_inputs]
    require_tensor_inputs(view, given=inputs.keys() if isinstance(inputs, Mapping) else ())
    if isinstance(inputs, Mapping):
        feeds = {k: np.asarray(v) for k, v in inputs.items()}
        check_values_agree(feeds, cast_input_values(view, input_values), "given")
        return SampleSet([feeds], "given", 1)
    if isinstance(inputs, (str, Path)):
        return load_samples(inputs, loaded, input_values=input_values)
    shapes, dtypes = resolve_input_shapes(view, normalize_input_shapes(input_shapes, names))
    values = resolve_input_values(view, input_values, shapes)
    source = f"random (seed {seed})" + (f", fixed {describe_input_values(values)}" if values else "")
    return SampleSet([random_inputs(shapes, dtypes, seed, values)], source, 1)


def check_same_inputs(la: LoadedModel, lb: LoadedModel) -> None:
    """Both models are run on the first one's feeds: a UsageError when the second needs an input the
    first does not have (two unrelated models, not a model and its rewrite)."""
    have = [i.name for i in GraphView(la.model).main_inputs]
    need = [i.name for i in GraphView(lb.model).main_inputs if i.name not in have]
    if need:
        raise UsageError(f"{lb.label}: needs input(s) {', '.join(map(repr, need))} that {la.label} does not have "
                         f"(its inputs: {', '.join(map(repr, have)) or 'none'}); compare a model with its rewrite")


def model_inputs(loaded: LoadedModel, inputs=None, input_shapes=None, seed: int = 0,
                 input_values=None) -> tuple[dict[str, np.ndarray], str]:
    """One feed and how it was made (:func:`sample_runs`' first run; a sample file gives its first
    run's samples)."""
    runs = sample_runs(loaded, inputs, input_shapes, seed, input_values)
    return runs.feeds[0], runs.source


SENSITIVITY_NUDGE = 0.05  # relative size of the input perturbation that tests whether outputs respond


def insensitive_outputs(session, feeds: Mapping[str, np.ndarray], names: Sequence[str], outputs, seed: int = 0) -> list[str]:
    """The outputs that stay exactly as they are when every float input is nudged by noise of 5 % of its
    RMS: a saturated softmax, argmax ids, a clipped activation.  Two models that agree there may still
    differ everywhere else — the comparison proves little for them.  (One more run of ``session``.)"""
    rng = np.random.default_rng(seed + 1)
    nudged = {}
    for k, v in feeds.items():
        v = np.asarray(v)
        if v.dtype.kind == "f" and v.size:
            scale = float(np.sqrt(np.mean(np.square(v.astype(np.float64))))) or 1.0
            nudged[k] = (v + SENSITIVITY_NUDGE * scale * rng.standard_normal(v.shape)).astype(v.dtype)
        else:
            nudged[k] = v
    if all(nudged[k] is feeds[k] or np.asarray(feeds[k]).dtype.kind != "f" for k in feeds):
        return []  # no float input to nudge
    try:
        again = session.run(list(names), nudged)
    except Exception:  # noqa: BLE001 - a model that refuses nudged values: no claim either way
        return []
    return [n for n, a, b in zip(names, outputs, again) if a.size and np.array_equal(a, b)]


def rewritten_tensors(a: onnx.ModelProto, b: onnx.ModelProto) -> list[str]:
    """Output tensors of rewritten nodes: produced in ``b`` by a ``…/sep_k_*`` node, and present in ``a``."""
    produced_a = {o for n in a.graph.node for o in n.output}
    names = []
    for n in b.graph.node:
        if "/sep_" in n.name:
            names.extend(o for o in n.output if o in produced_a)
    return list(dict.fromkeys(names))


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


class _StackedRefused(Exception):
    pass


def run_checked(session, label: str, feed: Mapping[str, np.ndarray], names: Sequence[str] | None = None,
                stacked: bool = False):
    """``session.run`` on the feeds it takes; a run onnxruntime refuses is bad input (a UsageError naming
    ``label``), or with ``stacked`` (several samples on the batch axis) a :class:`_StackedRefused`."""
    inputs = {i.name for i in session.get_inputs()}
    try:
        return session.run(None if names is None else list(names), {k: v for k, v in feed.items() if k in inputs})
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types
        if stacked:
            raise _StackedRefused(ort_message(exc)) from None
        raise UsageError(f"onnxruntime failed to run {label}: {ort_message(exc)}") from None


def _compare_runs(sa, sb, la: LoadedModel, lb: LoadedModel, names: Sequence[str], runs: SampleSet, atol, rtol,
                  keep: bool) -> tuple[list[TensorStats], list[list[np.ndarray]], list[list[np.ndarray]], list]:
    """Run both sessions on every run of ``runs``: per-output statistics, and (``keep``) the outputs."""
    stats: list[TensorStats] | None = None
    kept_a: list[list[np.ndarray]] = []
    kept_b: list[list[np.ndarray]] = []
    first = None
    for feed in runs.feeds:
        out_a = run_checked(sa, la.label, feed, names, runs.stack_axis)
        out_b = run_checked(sb, lb.label, feed, names, runs.stack_axis)
        if stats is None:
            first = out_a
            stats = [TensorStats(*_tolerances(x, atol, rtol), expected_runs=len(runs.feeds)) for x in out_a]
        for st, x, y in zip(stats, out_a, out_b):
            st.add(x, y)
        if keep:
            kept_a.append(out_a)
            kept_b.append(out_b)
    return stats or [], kept_a, kept_b, first


def verify(
    model_a: ModelSource | LoadedModel,
    model_b: ModelSource | LoadedModel,
    inputs: Mapping[str, np.ndarray] | str | Path | None = None,
    input_shapes=None,
    *,
    input_values=None,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    per_layer: bool = False,
    providers=None,
    max_drift: float | None = None,
    drift_metric: str = DEFAULT_DRIFT_METRIC,
    min_cosine: float | None = None,
    min_top1: float | None = None,
) -> DriftReport:
    """Run both models on the same inputs and compare every graph output (and, with
    ``per_layer``, the output of every rewritten node, which keeps its name in both).

    ``inputs``: a sample file or folder — every sample is run (see the module doc) —, a mapping
    (one feed), or None: seeded random inputs, except that inputs named in ``input_values`` (see
    :func:`sepify.audit`) get those values.  ``atol`` / ``rtol`` left ``None`` take each output's
    dtype default (:func:`default_tolerance`).  ``max_drift`` / ``min_cosine`` / ``min_top1``
    (:class:`Gates`) replace that rule for lossy rewrites."""
    gates = Gates(max_drift, drift_metric, min_cosine, min_top1)
    if gates.active and (atol is not None or rtol is not None):
        raise ParameterError("atol" if atol is not None else "rtol", atol if atol is not None else rtol,
                             "sets the elementwise rule, which max_drift / min_cosine / min_top1 replace; give one or "
                             "the other")
    la = model_a if isinstance(model_a, LoadedModel) else load_model(model_a)
    lb = model_b if isinstance(model_b, LoadedModel) else load_model(model_b)
    runs = sample_runs(la, inputs, input_shapes, seed, input_values)
    names_a = [o.name for o in la.model.graph.output]
    names_b = {o.name for o in lb.model.graph.output}
    missing = [n for n in names_a if n not in names_b]
    if missing:
        raise UsageError(f"{lb.label}: lacks output(s) {', '.join(missing)} of {la.label}")
    check_same_inputs(la, lb)
    sa = make_session(la.model, providers=providers)
    sb = make_session(lb.model, providers=providers)
    channel = gates.max_drift is not None and gates.drift_metric == "channel"
    warnings: list[str] = []
    try:
        stats, kept_a, kept_b, first = _compare_runs(sa, sb, la, lb, names_a, runs, atol, rtol, channel)
    except _StackedRefused as exc:
        stacked = max(runs.per_run)
        runs = runs.unstacked()
        warnings.append(f"the models refused {stacked} samples per run on their batch axis ({str(exc)[:160]}); "
                        "compared one sample per run")
        stats, kept_a, kept_b, first = _compare_runs(sa, sb, la, lb, names_a, runs, atol, rtol, channel)
    drifts: list[float | None] = [None] * len(stats)
    if channel:
        floats = [i for i, st in enumerate(stats) if st.float and not st.shape_mismatch]
        meter = DriftMeter([[r[i] for i in floats] for r in kept_a], "channel", runs.per_run)
        for i, d in zip(floats, meter.per_output([[r[i] for i in floats] for r in kept_b])):
            drifts[i] = d
        for j in meter.plain:
            warnings.append(f"output {names_a[floats[j]]!r}: axis 1 is no channel axis (the samples sit there, or "
                            "it changes from run to run); its drift is the plain cosine")
    outputs = [tensor_drift(n, st, gates, d) for n, st, d in zip(names_a, stats, drifts)]
    if gates.min_top1 is not None and not any(o.top1_agreement is not None or not st.float
                                               for o, st in zip(outputs, stats)):
        raise ParameterError("min_top1", gates.min_top1, "no output looks like class scores ([batch, classes]) or "
                                                          "label ids")
    source = runs.source if runs.source == "given" or runs.source.startswith("random") else \
        f"{runs.source} ({_count(runs.samples, 'sample')} in {_count(len(runs.feeds), 'run')})"
    report = DriftReport(la.label, lb.label, DEFAULT_ATOL if atol is None else atol,
                         DEFAULT_RTOL if rtol is None else rtol, seed if source.startswith("random") else None, source,
                         outputs, gates=gates if gates.active else None, samples=runs.samples, runs=len(runs.feeds),
                         warnings=warnings)
    report.insensitive = insensitive_outputs(sa, runs.feeds[0], names_a, first, seed)
    if report.insensitive:
        report.warnings.append(
            f"output(s) {', '.join(report.insensitive)} do not change when the inputs do (saturated on these "
            f"{'random ' if source.startswith('random') else ''}inputs): their agreement proves little; "
            "verify on real inputs (--inputs)")
    if per_layer:
        layer_gates = replace(gates, drift_metric="cosine", min_top1=None)
        layer_names = rewritten_tensors(la.model, lb.model)
        for start in range(0, len(layer_names), LAYER_CHUNK):
            chunk = layer_names[start:start + LAYER_CHUNK]
            va = make_session(la.model, chunk, providers)
            vb = make_session(lb.model, chunk, providers)
            layer_stats, _, _, _ = _compare_runs(va, vb, la, lb, chunk, runs, atol, rtol, False)
            report.layers.extend(tensor_drift(n, st, layer_gates) for n, st in zip(chunk, layer_stats))
    return report
