"""Numerical comparison of two models in onnxruntime (the only stage that runs models).

Pass rule, per output element (as numpy.allclose, ``a`` = the original's value)::

    |a − b| ≤ atol + rtol · |a|

plus: an output passes only if NaN/Inf appear in exactly the same places in both.

Default tolerances (when none is given) depend on the output's dtype: float32/float64 outputs
use ``DEFAULT_ATOL`` / ``DEFAULT_RTOL``.  A lower-precision output (float16) comes out of a
network that rounds every intermediate to that precision, and a rewritten chain rounds one more
intermediate per stage, so two correct models differ by a few units in the last place of the
output's *largest* values, not of each element: atol = ``LOW_PRECISION_ULPS`` · ε · max|a| and
rtol = 2ε (never below the float32 defaults).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from ..errors import UsageError
from ..serialize import SCHEMA_VERSION, dumps
from ..model.graph import GraphView
from ..model.load import LoadedModel, ModelSource, load_model
from ..model.session import ort_message, ort_session
from ..model.shapes import (cast_input_values, check_values_agree, describe_input_values, normalize_input_shapes,
                            random_inputs, resolve_input_shapes, resolve_input_values)

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
LOW_PRECISION_ULPS = 8  # float16 outputs: atol = 8·ε·max|a| by default (see the module doc)
LAYER_CHUNK = 16  # rewritten tensors exposed per run in --per-layer mode (bounds memory)


@dataclass
class TensorDrift:
    name: str
    shape: list[int]
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

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "passed": self.passed,
            "rule": "|a-b| <= atol + rtol*|a| elementwise (a = original); NaN/Inf must match; "
                    "each output's atol/rtol are the ones it was checked with (float16 outputs default to "
                    f"{LOW_PRECISION_ULPS}*eps*max|a| and 2*eps)",
            "model_a": self.model_a,
            "model_b": self.model_b,
            "atol": self.atol,
            "rtol": self.rtol,
            "seed": self.seed,
            "input_source": self.input_source,
            "outputs": [o.to_dict() for o in self.outputs],
            "layers": [o.to_dict() for o in self.layers],
            "insensitive_outputs": self.insensitive,
            "warnings": self.warnings,
        }

    def to_json(self) -> str:
        return dumps(self.to_dict())


def compare_tensors(name: str, a: np.ndarray, b: np.ndarray, atol: float | None = None,
                    rtol: float | None = None) -> TensorDrift:
    """Drift of ``b`` against the original ``a``; ``None`` tolerances take :func:`default_tolerance`."""
    a = np.asarray(a)
    b = np.asarray(b)
    if atol is None or rtol is None:
        d_atol, d_rtol = default_tolerance(a)
        atol = d_atol if atol is None else atol
        rtol = d_rtol if rtol is None else rtol
    drift = _compare(name, a, b, atol, rtol)
    drift.atol, drift.rtol = float(atol), float(rtol)
    return drift


def _compare(name: str, a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> TensorDrift:
    if a.shape != b.shape:
        return TensorDrift(name, list(a.shape), float("inf"), float("inf"), float("inf"), float("inf"), 0.0,
                           float("-inf"), 0, 0, int(max(a.size, b.size)), False)
    if a.dtype.kind not in "fc":
        equal = a == b
        bad = int(equal.size - np.count_nonzero(equal))
        return TensorDrift(name, list(a.shape), float(bad > 0), float(bad) / max(a.size, 1), float(bad > 0),
                           float(bad > 0), 1.0 if bad == 0 else 0.0, float("inf") if bad == 0 else 0.0, 0, 0, bad, bad == 0)
    a64 = a.astype(np.float64)
    b64 = b.astype(np.float64)
    fin_a, fin_b = np.isfinite(a64), np.isfinite(b64)
    same_nonfinite = bool(np.array_equal(fin_a, fin_b) and np.array_equal(a64[~fin_a], b64[~fin_b]))
    both = fin_a & fin_b
    diff = np.abs(a64[both] - b64[both])
    ref = np.abs(a64[both])
    if diff.size:
        max_abs, mean_abs = float(diff.max()), float(diff.mean())
        p99 = float(np.percentile(diff, 99))
        denom = np.maximum(ref, np.finfo(np.float32).tiny)
        max_rel = float((diff / denom).max())
        av, bv = a64[both], b64[both]
        na, nb = np.linalg.norm(av), np.linalg.norm(bv)
        cosine = float(av @ bv / (na * nb)) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
        noise = float((diff ** 2).sum())
        snr = float("inf") if noise == 0 else 10 * float(np.log10(max(na ** 2, 1e-300) / noise))
        mismatched = int(np.count_nonzero(diff > atol + rtol * ref))
    else:
        max_abs = mean_abs = p99 = max_rel = 0.0
        cosine, snr, mismatched = 1.0, float("inf"), 0
    drift = TensorDrift(name, list(a.shape), max_abs, mean_abs, p99, max_rel, cosine, snr,
                        int((~fin_a).sum()), int((~fin_b).sum()), mismatched, mismatched == 0 and same_nonfinite)
    if a.ndim == 2 and a.shape[1] >= 2 and a.dtype.kind == "f":
        # Looks like class scores [batch, classes]: report top-k agreement.
        top1_a, top1_b = a64.argmax(1), b64.argmax(1)
        drift.top1_agreement = float((top1_a == top1_b).mean())
        k = min(5, a.shape[1])
        ta = np.argsort(-a64, axis=1)[:, :k]
        tb = np.argsort(-b64, axis=1)[:, :k]
        drift.top5_agreement = float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ta, tb)]))
    return drift


def make_session(model: onnx.ModelProto, extra_outputs: Sequence[str] = (), providers=None, threads: int | None = None):
    """An onnxruntime session for comparing outputs (and calibration runs): threads never spin, so
    an idle session steals no CPU from another (:func:`sepify.model.session.ort_session`)."""
    return ort_session(model, extra_outputs, providers=providers, threads=threads, spinning="off")


def load_inputs(path: str | Path, input_names: Sequence[str]) -> dict[str, np.ndarray]:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            feeds = {k: data[k] for k in data.files}
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"{path}: cannot read inputs ({str(exc).strip().splitlines()[0]})") from None
    missing = [n for n in input_names if n not in feeds]
    if missing:
        raise UsageError(f"{path}: no array for input(s) {', '.join(missing)} (has {', '.join(feeds) or 'none'})")
    return {n: feeds[n] for n in input_names}


def model_inputs(loaded: LoadedModel, inputs=None, input_shapes=None, seed: int = 0,
                 input_values=None) -> tuple[dict[str, np.ndarray], str]:
    """The feeds and how they were made: ``inputs`` (an .npz path or a mapping) as given, else seeded
    random arrays at the resolved ``input_shapes`` with the fixed ``input_values`` for those inputs.

    Given inputs win: an ``input_values`` entry for an input they hold must agree with it (else a
    UsageError), so a value is never silently dropped."""
    view = GraphView(loaded.model)
    names = [i.name for i in view.main_inputs]
    if isinstance(inputs, (str, Path, Mapping)):
        if isinstance(inputs, Mapping):
            feeds, source = {k: np.asarray(v) for k, v in inputs.items()}, "given"
        else:
            feeds, source = load_inputs(inputs, names), str(inputs)
        check_values_agree(feeds, cast_input_values(view, input_values), source)
        return feeds, source
    shapes, dtypes = resolve_input_shapes(view, normalize_input_shapes(input_shapes, names))
    values = resolve_input_values(view, input_values, shapes)
    source = f"random (seed {seed})" + (f", fixed {describe_input_values(values)}" if values else "")
    return random_inputs(shapes, dtypes, seed, values), source


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
) -> DriftReport:
    """Run both models on the same inputs and compare every graph output (and, with
    ``per_layer``, the output of every rewritten node, which keeps its name in both).

    Without ``inputs`` both run on seeded random inputs, except that inputs named in
    ``input_values`` (see :func:`sepify.audit`) get those values.  ``atol`` / ``rtol`` left
    ``None`` take each output's dtype default (:func:`default_tolerance`)."""
    la = model_a if isinstance(model_a, LoadedModel) else load_model(model_a)
    lb = model_b if isinstance(model_b, LoadedModel) else load_model(model_b)
    feeds, source = model_inputs(la, inputs, input_shapes, seed, input_values)
    names_a = [o.name for o in la.model.graph.output]
    names_b = {o.name for o in lb.model.graph.output}
    missing = [n for n in names_a if n not in names_b]
    if missing:
        raise UsageError(f"{lb.label}: lacks output(s) {', '.join(missing)} of {la.label}")
    sa = make_session(la.model, providers=providers)
    sb = make_session(lb.model, providers=providers)
    try:
        out_a = sa.run(names_a, feeds)
        out_b = sb.run(names_a, feeds)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"onnxruntime failed to run: {ort_message(exc)}") from None
    report = DriftReport(la.label, lb.label, DEFAULT_ATOL if atol is None else atol,
                         DEFAULT_RTOL if rtol is None else rtol, seed if source.startswith("random") else None, source,
                         [compare_tensors(n, x, y, atol, rtol) for n, x, y in zip(names_a, out_a, out_b)])
    report.insensitive = insensitive_outputs(sa, feeds, names_a, out_a, seed)
    if report.insensitive:
        report.warnings.append(
            f"output(s) {', '.join(report.insensitive)} do not change when the inputs do (saturated on these "
            f"{'random ' if source.startswith('random') else ''}inputs): their agreement proves little; "
            "verify on real inputs (--inputs)")
    if per_layer:
        layer_names = rewritten_tensors(la.model, lb.model)
        for start in range(0, len(layer_names), LAYER_CHUNK):
            chunk = layer_names[start:start + LAYER_CHUNK]
            va = make_session(la.model, chunk, providers).run(chunk, feeds)
            vb = make_session(lb.model, chunk, providers).run(chunk, feeds)
            report.layers.extend(compare_tensors(n, x, y, atol, rtol) for n, x, y in zip(chunk, va, vb))
    return report
