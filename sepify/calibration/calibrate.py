r"""Data-aware factorization: calibration samples, activations, least squares, sensitivities.

A weight-only factorization keeps the top singular directions of a weight; a trained network
does not weigh all directions of its weights equally, because its activations are far from
isotropic.  Calibration runs the model on sample inputs and chooses factors that reconstruct
each rewritten convolution's *output* on those inputs:

* **Factors** (:mod:`sepify.calibration.lstsq`, :mod:`sepify.calibration.solve`): the first stages
  of each chain stay as the SVD gives them and the last stage and the bias are solved by ridge least
  squares against the original conv's outputs, with inputs from the model whose earlier layers are
  already rewritten (asymmetric reconstruction), in waves.  Layers with fewer sampled rows than
  unknowns solve in the dual form (:mod:`sepify.calibration.dual`).
* **Ranks** (:mod:`sepify.calibration.profiling`): with a budget or a drift bound, per-layer output
  error curves and sensitivities feed the shared allocator (:func:`sepify.core.allocate.greedy`).
* **BatchNorm** (:mod:`sepify.calibration.bnfold`): a conv feeding only a BatchNormalization is
  calibrated with the BN folded in, and its chain replaces both.

The solved factors are written as they are (:func:`calibrated_rewrite`): each rewritten conv
becomes a :class:`~sepify.core.realization.Realization` with ``source="calibrated"`` and goes
through the same emitter as every other rewrite.

Drift (what ``--max-drift`` bounds and the sweep plots) is ``1 − cosine`` between the original
and the rewritten model's output tensors over all samples (:class:`~sepify.core.drift.DriftMeter`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

import numpy as np
import onnx

from ..threads import releasing_scratch, single_blas
from .lstsq import LSTSQ_BLAS
from ..core.allocate import Option, greedy
from ..core.chain import split_kernel_stage
from ..core.drift import DriftMeter, drift_definition
from ..core.linalg import exact_tolerance
from ..core.reasons import Reason
from ..core.schemes import get as get_scheme, names as scheme_names
from ..core.stages import Stage, balance, cast_stages, compose
from ..errors import ParameterError, UsageError
from ..model.graph import GraphView
from ..model.load import LoadedModel, ModelSource, load_model
from ..pipeline.lut import grid_candidates
from ..pipeline.plan import (Policy, Prediction, latency_costs, plan as make_plan, prior_scale, unreachable_budget,
                             unreachable_speedup)
from ..pipeline.realize import realization, realize
from ..pipeline.rewrite import finish_rewrite
from ..progress import progress as progress_bar
from ..serialize import SCHEMA_VERSION, dumps
from ..pipeline.analysis import analyze_model
from .bnfold import fold_batchnorms
from .linear import as_convs
from .capture import (StackedRunError, Targets, WorkingModel, calibration_session, float_outputs,
                      run_outputs)
from .data import CalibrationSet, load_calibration, plan_input_shapes
from .layers import ELIGIBLE_REASONS, layers_from_plan
from .options import ALLOCATIONS, DEFAULT_ROWS, CalibrationOptions
from .profiling import LayerProfile, measure_sensitivities, reference_pass
from .solve import LayerResult, Pick, calibrate_layers, weight_units

MAX_DRIFT_TRIES = 3
# Candidates whose layer output error exceeds this are used only when a target cannot be reached
# without them: the drift model (1 − cos ≈ s·e², with s measured on a probe at e ≈ 0.3) is quadratic
# in a small perturbation and mispredicts a layer that loses half its output (YOLOv8n at
# --target-speedup 1.4: three box-branch convs at e = 0.72–0.87 made the held-out 1 − cos 8.8e-3;
# without them 1.4e-3, at the same speed).
MAX_OUTPUT_ERROR = 0.5
BUDGET_TOLERANCE = 0.02  # a budget is met from below within this fraction of the conv MACs, or a note says why


@dataclass
class CalibrationReport:
    model: str
    data: str
    samples: int
    rows: int
    seed: int
    allocation: str  # "sensitivity" (per-layer drift on calibration data) | "plan" (the policy's weight-based plan)
    budget: float | None
    max_drift: float | None
    conv_macs_before: int
    conv_macs_after: int
    predicted_drift: float | None
    drift_metric: str  # "channel" | "cosine" (see DriftMeter): what allocation and --max-drift use
    drift: float | None  # measured on the calibration samples, calibrated factors
    drift_weight_only: float | None  # the same layers and ranks with weight-only SVD factors
    drift_cosine: float | None  # plain 1 − cosine (sepify verify's), calibrated
    drift_cosine_weight_only: float | None
    layers: list[LayerResult]
    folded_batchnorms: list[dict[str, str]]
    profiles: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    input_shapes: dict[str, list[int]] = field(default_factory=dict)  # what the plan was made at
    prediction: dict[str, Any] | None = None  # latency cost: what the allocation expects (plan.Prediction)

    @property
    def macs_ratio(self) -> float:
        return self.conv_macs_after / self.conv_macs_before if self.conv_macs_before else 1.0

    def __repr__(self) -> str:
        return (f"CalibrationReport(model={self.model!r}, data={self.data!r}, samples={self.samples}, "
                f"allocation={self.allocation!r}, layers={len(self.layers)}, drift={self.drift}, "
                f"drift_metric={self.drift_metric!r})")

    def to_dict(self) -> dict[str, Any]:
        d = {"schema_version": SCHEMA_VERSION}
        d.update({k: v for k, v in asdict(self).items() if k not in ("layers", "profiles")})
        d["macs_ratio"] = self.macs_ratio
        d["drift_definition"] = drift_definition(self.drift_metric)
        d["layers"] = [l.to_dict() for l in self.layers]
        d["profiles"] = self.profiles
        return d

    def to_json(self) -> str:
        return dumps(self.to_dict())


@dataclass
class CalibrationResult:
    """What :func:`calibrate` found: per layer the chosen (scheme, rank, variant) and the solved
    float64 factors and bias (``stages``), and the report.  :func:`calibrated_rewrite` writes them."""

    report: CalibrationReport
    choices: dict[str, Pick]
    stages: dict[str, tuple[list[Stage], np.ndarray]] = field(default_factory=dict, repr=False)
    results: dict[str, LayerResult] = field(default_factory=dict, repr=False)
    calibrator: "Calibrator | None" = field(default=None, repr=False)


class Calibrator:
    """The state calibration shares between one rewrite and a sweep of budgets: the model (with
    BatchNorms folded), the samples, the candidate layers, the reference targets and profiles.

    ``allocation``: ``"sensitivity"`` profiles every eligible layer (output-error curves per scheme
    and rank, and its measured sensitivity) and chooses scheme and rank with the shared allocator;
    ``"plan"`` calibrates the layers the policy's weight-based plan rewrites.
    """

    def __init__(self, model: ModelSource | LoadedModel, policy: Policy | None = None, data: Any = "random",
                 input_shapes=None, *, options: CalibrationOptions | None = None, input_values=None, **kw):
        opts = options_of(options, kw)
        if opts.allocation == "auto":
            opts = replace(opts, allocation="sensitivity")
        allocation, rows, seed = opts.allocation, opts.rows, opts.seed
        self.options = opts
        self.timings: dict[str, float] = {}
        t0 = time.perf_counter()
        self.policy = policy or Policy()
        self.allocation = allocation
        self.rows, self.seed, self.drift_metric, self.fold_bn = rows, seed, opts.drift_metric, opts.fold_bn
        self.progress = opts.progress
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model)
        self.calib = data if isinstance(data, CalibrationSet) else load_calibration(
            data, self.loaded, input_shapes, samples=opts.samples, seed=seed, value_range=opts.value_range,
            batch=opts.batch, input_values=input_values)
        self.shapes = plan_input_shapes(self.loaded.model, self.calib, input_shapes)
        self.input_values = input_values  # for the plans' shape fallback (and benchmarks) at self.shapes
        self.folded_model, self.folded = fold_batchnorms(self.loaded.model) if opts.fold_bn else (self.loaded.model, [])
        base_policy = self.policy
        # Linear layers (policy.linear): calibrated as the 1×1 convs they compute, in a working copy
        # (calibration/linear.py); the realizations are written back as MatMuls / Gemms.
        self.linear: dict[str, Any] = {}
        self._linear_analysis = None  # the model with its linear layers as such: what latency cost times
        if self.policy.linear and opts.only_faster:
            raise ParameterError("linear", True, "only_faster times isolated convs; linear layers are planned on "
                                                 "MACs or latency cost (leave out only_faster)")
        if self.policy.linear:
            seen = analyze_model(self._derived(self.folded_model), self.shapes, input_values)
            self._linear_analysis = seen
            specs = [s for s in seen.linear_specs() if not s.ref.scope]
            self.folded_model = as_convs(self.folded_model, specs,
                                         {s.ref.qualified_name: seen.table.get(s.x_name) for s in specs})
            self.linear = {s.ref.qualified_name: s for s in specs}
            base_policy = replace(base_policy, linear=False)  # they are convs now
        if allocation == "sensitivity" and (self.policy.cost == "latency" or self.policy.mode == "speedup"):
            # The base plan only says which layers are eligible; the latency allocation is calibration's.
            base_policy = replace(self.policy, mode="budget", budget=1.0, target_speedup=None, cost="macs",
                                  latency_table=None)
        self.base = make_plan(self._derived(self.folded_model), base_policy, self.shapes, input_values=input_values)
        if allocation == "sensitivity":
            self.layers = layers_from_plan(self.base)
        else:
            self.layers = layers_from_plan(self.base, [n.qualified_name for n in self.base.rewrites])
        self.by_name = {l.name: l for l in self.layers}
        self.unit_of = weight_units(self.layers)  # one decision per weight (hashes every weight: once)
        self.latency = None  # LatencyCosts under latency cost or only_faster
        self._lat: dict[str, tuple[float, dict[tuple[str, int], float]]] = {}
        self.prediction: Prediction | None = None
        if allocation == "sensitivity" and (self.policy.cost == "latency" or opts.only_faster):
            self._measure_latencies()
        self.work = WorkingModel(self.folded_model, self.layers)
        self.outputs = float_outputs(self.folded_model)
        self.targets = Targets()
        self.profiles: dict[str, LayerProfile] = {}
        self._meters: dict[int, tuple[DriftMeter, DriftMeter]] = {}
        self.notes: list[str] = []
        self._feeds_of: dict[int, CalibrationSet] = {}  # stacked runs a model refused, one sample per run
        self.timings["setup"] = time.perf_counter() - t0

    @property
    def conv_macs(self) -> int:
        return self.base.conv_macs

    def _schemes(self) -> list[str]:
        return list(scheme_names()) if self.policy.scheme == "auto" else [self.policy.scheme]

    def _measure_latencies(self) -> None:
        """Time every layer and its candidates on the latency grid (variant "": calibration's); the
        candidates faster than their conv are the ranks the profiles evaluate."""
        t = time.perf_counter()
        # Linear layers are convs in the working copy, but run as MatMul / Gemm in the model written:
        # they are timed as such (the analysis before the conversion; names are the same).
        timed = self._linear_analysis if self._linear_analysis is not None else self.base.analysis
        self.latency = latency_costs(timed, self.policy, progress=self.progress)
        specs = {s.ref.qualified_name: s for s in self.base.analysis.specs}
        wanted = {n.qualified_name: [] for n in self.base.nodes if self.latency.covers(specs[n.qualified_name])}
        for layer in self.layers:
            wanted[layer.name] = [c for c in grid_candidates(layer.geo, self._schemes()) if c[1] == ""]
        self.latency.require(wanted)
        for layer in self.layers:
            orig = self.latency.original(layer.spec)
            if orig is None:
                continue
            found = {(c[0], c[2]): self.latency.candidate(layer.spec, *c) for c in wanted[layer.name]}
            self._lat[layer.name] = (orig, {k: us for k, us in found.items() if us is not None and us < orig})
        self._conv_us = {n.qualified_name: self.latency.original(specs[n.qualified_name]) for n in self.base.nodes
                         if n.qualified_name in wanted}
        self.timings["latency"] = time.perf_counter() - t

    def _rank_grid(self, layer, scheme: str) -> list[int]:
        """The measured-faster ranks of ``scheme`` for ``layer`` (latency cost / only_faster)."""
        return sorted(r for (s, r) in self._lat.get(layer.name, (0.0, {}))[1] if s == scheme)

    def profile(self) -> None:
        """The reference pass (targets; curves and probes under sensitivity allocation) and the sensitivities.

        A model that refuses several samples stacked on its batch axis (it reshapes to batch 1
        inside) is calibrated one sample per run instead, and the report says so."""
        try:
            self._profile()
        except StackedRunError as exc:
            stacked = max(self.calib.per_run)
            self.calib = self.calib.unstacked()
            self.notes.append(f"the model refused {stacked} samples per run on its batch axis ({str(exc)[:160]}); "
                              "calibrated one sample per run")
            self.targets = Targets()
            self._profile()

    def _profile(self) -> None:
        schemes = list(scheme_names()) if self.policy.scheme == "auto" else [self.policy.scheme]
        with progress_bar(self.progress) as bar:
            t = time.perf_counter()
            self.profiles = reference_pass(self.work, self.layers, self.calib, rows=self.rows, seed=self.seed,
                                           schemes=schemes if self.allocation == "sensitivity" else None,
                                           targets=self.targets, progress=bar,
                                           rank_grid=self._rank_grid if self.latency is not None else None,
                                           unit_of=self.unit_of)
            self.timings["reference_pass"] = time.perf_counter() - t
            if self.allocation == "sensitivity":
                t = time.perf_counter()
                measure_sensitivities(self.work, self.layers, self.profiles, self.calib, metric=self.drift_metric,
                                      progress=bar)
                self.timings["sensitivities"] = time.perf_counter() - t

    def choose(self, budget: float | None = None, max_drift: float | None = None, *, speedup: float | None = None,
               scale: float | None = None) -> tuple[dict[str, Pick], float | None]:
        """Scheme, rank and variant per layer, and the predicted drift (None under plan allocation).

        Cost: MACs, or measured latency under latency cost (:attr:`latency`): a budget is then a
        fraction of the convs' summed latency, and ``speedup`` ``S`` asks for ``(1 − 1/S)·T / scale``
        µs saved of the model's measured latency ``T`` (:attr:`prediction` holds what is expected)."""
        if self.allocation == "plan":
            return {n.qualified_name: (n.scheme, n.rank, n.variant) for n in self.base.rewrites
                    if n.qualified_name in self.by_name}, None
        if budget is None and max_drift is None and speedup is None:
            raise UsageError("allocation by sensitivity needs a budget or a max_drift (or a speedup target)")
        lat = self.latency if self.policy.cost == "latency" else None
        # One decision per weight: convs sharing one are one layer of the walk (costs and drifts added,
        # over the choices every member has).
        unit_of = self.unit_of
        units: dict[str, list[LayerProfile]] = {}
        for n, p in self.profiles.items():
            if lat is not None and n not in self._lat:
                continue  # no latency for it: not a candidate of a latency plan
            units.setdefault(unit_of.get(n, n), []).append(p)
        def options_of(max_error):
            layers = {}
            for u, profs in units.items():
                if lat is not None:
                    per = [{o.payload: o for o in p.options(lambda sch, r, t=self._lat[p.name][1]: t.get((sch, r)),
                                                            max_error=max_error)} for p in profs]
                    cost0 = sum(self._lat[p.name][0] for p in profs)
                else:
                    per = [{o.payload: o for o in p.options(max_error=max_error)} for p in profs]
                    if self.latency is not None:  # only_faster: the candidates measured faster, on MACs
                        per = [{k: o for k, o in q.items() if k in self._lat.get(p.name, (0, {}))[1]}
                               for q, p in zip(per, profs)]
                    cost0 = sum(p.macs for p in profs)
                common = [k for k in per[0] if all(k in q for q in per[1:])]
                layers[u] = (cost0, [Option(sum(q[k].cost for q in per), sum(q[k].loss for q in per), k)
                                     for k in common])
            return layers

        layers = options_of(MAX_OUTPUT_ERROR)
        inside = sum(c0 for c0, _ in layers.values())
        model_us = None
        if lat is None:
            total = self.conv_macs
            target = budget * total if budget is not None else None
            fixed = total - inside
        else:
            total = sum(v for v in self._conv_us.values() if v is not None)
            if speedup is not None:
                model_us = self.model_us()
                scale = prior_scale(model_us, total) if scale is None else scale
                target = model_us - (1 - 1 / speedup) * model_us / scale
                fixed = model_us - inside
            else:
                target = budget * total if budget is not None else None
                fixed = total - inside
        result = greedy(layers, target=target, max_loss=max_drift, convex=True, fixed=fixed)
        if result.exhausted and target is not None:
            # Out of options the drift model predicts well: allow larger layer errors, and say so.
            layers = options_of(None)
            result = greedy(layers, target=target, max_loss=max_drift, convex=True, fixed=fixed)
            if not result.exhausted:
                self.notes.append(f"the target needs layers with an output error above {MAX_OUTPUT_ERROR:g}, where "
                                  f"the drift estimate s·e² is unreliable: check the drift on held-out data")
        if result.exhausted:
            if speedup is not None:
                raise unreachable_speedup(speedup, model_us / max(model_us - scale * (model_us - result.cost), 1e-9))
            raise unreachable_budget(budget, result.cost / total if total else 1.0)
        picks = {u: o.payload for u, o in result.chosen.items()}
        loss = result.loss
        if budget is not None and lat is None and self.latency is None:
            picks, loss = self._fill(units, layers, picks, loss, budget * self.conv_macs - result.cost)
        if lat is not None:
            after = sum(self._lat[p.name][1][picks[u]] if u in picks else self._lat[p.name][0]
                        for u, profs in units.items() for p in profs)
            before = sum(self._lat[p.name][0] for profs in units.values() for p in profs)
            self.prediction = Prediction(self.policy.threads, total, total - (before - after), loss, model_us,
                                         1.0 if scale is None else scale,
                                         str(lat.table.path) if lat.table.path is not None else None, lat.local)
        return {n: (*picks[u], "") for n, u in unit_of.items() if u in picks and n in self.profiles}, loss

    def model_us(self) -> float:
        """The input model's measured latency (µs) at the policy's threads, once per calibrator."""
        if getattr(self, "_model_us", None) is None:
            from ..pipeline.verify import model_inputs

            feeds, _ = model_inputs(self.loaded, None, self.shapes, 0, self.input_values)
            self._model_us = self.latency.model_us(self.loaded.model, feeds, self.loaded.label)
        return self._model_us

    def _fill(self, units, layers, picks, loss, slack):
        """Spend what the last greedy step left under the budget: the rank curves are sampled on a
        grid (every rank up to 16, geometric beyond), so one step can be a large part of a model with
        one dominant layer.  Units are raised to the largest rank between their grid points that still
        fits, the steepest (most drift per MAC saved) first; drift between grid ranks is interpolated."""
        order = sorted(picks, key=lambda u: -next(o.loss for o in layers[u][1] if o.payload == picks[u])
                       / max(layers[u][0] - next(o.cost for o in layers[u][1] if o.payload == picks[u]), 1))
        for u in order:
            scheme, r = picks[u]
            profs = units[u]
            sch = get_scheme(scheme)
            higher = [q for q in profs[0].curves[scheme].ranks if q > r]
            top = (higher[0] - 1) if higher else r

            def cost(rank):
                return sum(sch.macs(self.by_name[p.name].geo, rank) for p in profs)

            base, new = cost(r), r
            while new < top and cost(new + 1) - base <= slack:
                new += 1
            if new == r:
                continue
            before = sum((p.sensitivity or 0.0) * p.interpolated_error(scheme, r) ** 2 for p in profs)
            after = sum((p.sensitivity or 0.0) * p.interpolated_error(scheme, new) ** 2 for p in profs)
            picks[u] = (scheme, new)
            loss += after - before
            slack -= cost(new) - base
        return picks, loss

    def _derived(self, model: onnx.ModelProto) -> LoadedModel:
        """A model derived from the input (BatchNorms folded), loaded and checked like any, but
        labelled as the input so that plans and reports name the user's model."""
        if model is self.loaded.model:
            return self.loaded
        return replace(load_model(model), label=self.loaded.label)

    def weight_only_choices(self, budget: float) -> dict[str, Pick]:
        """The weight-only planner's choices at ``budget`` (its spectral-energy greedy), main-graph layers."""
        p = make_plan(self._derived(self.folded_model), replace(self.policy, mode="budget", budget=budget, tol=None, rank=None),
                      self.shapes, input_values=self.input_values)
        return {n.qualified_name: (n.scheme, n.rank, n.variant) for n in p.rewrites}

    def solve(self, choices: Mapping[str, Pick]):
        """Calibrate ``choices`` from the original model on (the working model is reset first)."""
        for name in list(self.work.slots):
            self.work.reset(name)
        missing = [n for n in choices if n not in self.targets.rows]
        if missing:
            raise UsageError(f"no calibration targets for {', '.join(missing[:3])}: run profile() first")
        with progress_bar(self.progress) as bar:
            t = time.perf_counter()
            out = calibrate_layers(self.work, self.layers, choices, self.calib, self.targets, rows=self.rows,
                                   seed=self.seed, progress=bar)
            self.timings["calibration"] = self.timings.get("calibration", 0.0) + time.perf_counter() - t
        return out

    def set_weight_only(self, choices: Mapping[str, Pick]) -> None:
        """The working model with the weight-only SVD factors of ``choices`` (everything else original)."""
        for name in list(self.work.slots):
            self.work.reset(name)
        for name, (scheme, r, variant) in choices.items():
            layer = self.by_name.get(name)
            if layer is not None:
                stages = get_scheme(scheme).factor(layer.w64, layer.geo, r, variant)
                self.work.set(name, compose(stages, layer.geo), layer.bias)

    def drift(self, feeds: CalibrationSet | None = None) -> tuple[float, float]:
        """(drift in the chosen metric, plain 1 − cosine) of the working model against the original, on
        ``feeds`` (default: the calibration samples)."""
        feeds = feeds or self.calib
        key = id(feeds)
        if key not in self._meters:
            try:
                ref = run_outputs(calibration_session(self.folded_model), feeds.feeds, self.outputs, feeds)
            except StackedRunError:
                self._feeds_of[key] = feeds.unstacked()
                ref = run_outputs(calibration_session(self.folded_model), self._feeds_of[key].feeds, self.outputs)
            runs = self._feeds_of.get(key, feeds)
            meter = DriftMeter(ref, self.drift_metric, runs.per_run)
            for i in meter.plain:
                note = f"output {self.outputs[i]!r}: axis 1 is no channel axis (the samples sit there, or it " \
                       "changes from run to run); its drift is the plain cosine"
                if note not in self.notes:
                    self.notes.append(note)
            self._meters[key] = (meter, DriftMeter(ref, "cosine") if self.drift_metric != "cosine" else meter)
        feeds = self._feeds_of.get(key, feeds)
        meter, cos = self._meters[key]
        got = run_outputs(self.work.session(), feeds.feeds, self.outputs, feeds)
        return meter.drift(got), cos.drift(got)

    # -- writing the result ----------------------------------------------------------------------
    def realizations(self, results: Mapping[str, LayerResult], solved: Mapping[str, tuple[list[Stage], np.ndarray]],
                     lowering: str | None = None, by_drift: bool = False,
                     ) -> tuple[list, list[dict[str, Any]], list[dict[str, str]]]:
        """The calibrated factors as Realizations on the *input* model (a conv with a folded BN absorbs
        it), the kept nodes, and the BatchNormalizations folded; with plan allocation, layers left
        uncalibrated (convs inside If/Loop bodies) keep their weight-only factors."""
        bn_of = {f["conv"]: f["bn"] for f in self.folded}
        view = GraphView(self.loaded.model)
        refs = {r.qualified_name: r for r in view.nodes}
        specs = {s.ref.qualified_name: s for s in self.base.analysis.specs}
        realized, kept, folded = [], [], []
        for node in self.base.nodes:
            name = node.qualified_name
            res = results.get(name)
            if res is not None:
                layer = self.by_name[name]
                stages, bias = solved[name]
                chain = None
                if self.policy.chain and get_scheme(res.scheme).chainable:
                    # Split the kernel stage further only where the calibrated chain still splits exactly.
                    chain = split_kernel_stage(stages, layer.geo, exact_tolerance(layer.weight.dtype))
                np_ = replace(node, action="rewrite", reason=None, scheme=res.scheme, rank=res.rank, variant=res.variant,
                              chained=chain is not None, error=res.weight_error)
                bn = bn_of.get(name)
                # The spec of the conv as the input model has it (a folded conv reads another weight there
                # and writes the BN's input); the geometry is the same.
                if name in self.linear:  # a linear layer calibrated as a conv: written back as itself
                    spec = self.linear[name]
                else:
                    ref = refs[name]
                    spec = replace(specs[name], ref=ref, w_name=ref.node.input[1])
                dtype = layer.weight.dtype
                rz = realization(spec, np_, cast_stages(balance(chain or stages), dtype), layer.weight, lowering=lowering,
                                 source="exact" if res.exact else "calibrated", bias=np.asarray(bias).astype(dtype),
                                 absorbs=(bn, refs[bn].node.output[0]) if bn else None, reference=layer.weight,
                                 planned_error=res.output_error if res.output_error is not None else 0.0)
                np_.macs_after = rz.macs_after
                realized.append((rz, np_))
                if bn:
                    folded.append({"conv": name, "bn": bn})
                    res.bn_folded = bn
            elif self.allocation == "plan" and node.action == "rewrite":
                # Not calibrated (a conv inside an If/Loop body): the weight-only choice stands.  The
                # folded model holds the same weight there (only main-graph convs are folded).
                realized.append((realize(self.base.analysis, specs[name], node, lowering), node))
            else:
                reason = node.reason
                if node.action == "rewrite" or node.reason in ELIGIBLE_REASONS:
                    prof = self.profiles.get(name)
                    if self.allocation != "sensitivity":
                        reason = node.reason or Reason.KEPT_BY_PLAN
                    elif prof is not None and not any(c.ranks for c in prof.curves.values()):
                        reason = Reason.NOT_FASTER if self.latency is not None else Reason.NO_MAC_SAVING
                    else:
                        reason = Reason.DRIFT_BOUND_REACHED if by_drift else Reason.NOT_NEEDED_FOR_BUDGET
                kept.append({"name": name, "reason": reason or Reason.KEPT_BY_PLAN})
        for name, res in results.items():
            prof = self.profiles.get(name)
            if prof is not None and prof.sensitivity is not None:
                res.sensitivity = prof.sensitivity
                if res.output_error is not None:
                    res.predicted_drift = prof.sensitivity * res.output_error ** 2
        return realized, kept, folded


def options_of(options: CalibrationOptions | None, kw: Mapping[str, Any]) -> CalibrationOptions:
    """``options`` with the keyword overrides of the Python API applied (unknown keywords refused)."""
    known = set(CalibrationOptions.__dataclass_fields__)
    bad = sorted(set(kw) - known)
    if bad:
        raise TypeError(f"unknown calibration option(s) {', '.join(bad)} (known: {', '.join(sorted(known))})")
    return replace(options or CalibrationOptions(), **{k: v for k, v in kw.items() if v is not None or k in
                                                       ("samples", "value_range", "max_drift")})


@single_blas(preload=LSTSQ_BLAS)
@releasing_scratch
def calibrate(model: ModelSource | LoadedModel, policy: Policy | None = None, data: Any = "random", input_shapes=None,
              *, options: CalibrationOptions | None = None, measure: bool = True, input_values=None,
              calibrator: Calibrator | None = None, scale: float | None = None, **kw) -> CalibrationResult:
    """Plan and calibrate the factors of ``model`` on sample inputs (see the module docstring).

    ``options`` (:class:`~sepify.calibration.options.CalibrationOptions`, or its fields as keywords):
    ``allocation`` ``"sensitivity"`` chooses scheme and rank per layer from drift measured on the
    calibration data (Lagrangian greedy under ``policy.budget`` and/or ``max_drift``); ``"plan"``
    keeps the policy's weight-based choices and only calibrates the factors; ``"auto"``:
    sensitivity for a budget or ``max_drift``, the plan otherwise.  ``max_drift`` bounds the
    drift measured on the calibration samples: when the first allocation overshoots, the bound is
    tightened and the layers calibrated again (at most 3 tries; the report notes a miss).
    ``input_values`` (see :func:`sepify.audit`) fix those inputs in random data and in the plans'
    shape fallback; calibration data that holds them must agree.

    A speedup policy (``target_speedup``) allocates on measured latency the least predicted drift
    that reaches the target (``scale`` corrects the isolated savings; :func:`calibrated_rewrite`
    checks the result end to end).  ``calibrator``: a profiled :class:`Calibrator` to reuse (its
    policy and options stand).
    """
    policy = policy or (calibrator.policy if calibrator is not None else Policy())
    opts = calibrator.options if calibrator is not None else options_of(options, kw)
    max_drift, allocation = opts.max_drift, opts.allocation
    if max_drift is not None and policy.mode in ("tol", "rank"):
        raise ParameterError("max_drift", max_drift, f"chooses ranks itself; a {policy.mode} policy cannot go with it")
    if max_drift is not None and policy.mode == "speedup":
        raise ParameterError("max_drift", max_drift, "a speedup target already asks for the least drift: give one "
                                                     "of the two (--max-drift with --cost latency: the fastest model "
                                                     "within the drift)")
    if allocation == "auto":
        allocation = "sensitivity" if (policy.mode in ("budget", "speedup") or max_drift is not None) else "plan"
    if allocation == "plan" and (policy.mode == "speedup" or opts.only_faster):
        raise ParameterError("allocation", "plan", "a speedup target and only_faster are allocated on calibration "
                                                   "sensitivities (allocation sensitivity)")
    if allocation == "plan" and policy.cost == "latency":
        raise ParameterError("allocation", "plan", "latency cost with calibration is allocated on sensitivities")
    rows, seed = opts.rows, opts.seed
    t0 = time.perf_counter()
    if calibrator is None:
        cal = Calibrator(model, policy, data, input_shapes, options=replace(opts, allocation=allocation),
                         input_values=input_values)
        cal.profile()
    else:
        cal = calibrator
    budget = policy.budget if policy.mode == "budget" else None
    speedup = policy.target_speedup if policy.mode == "speedup" else None
    notes: list[str] = cal.notes
    bound = max_drift
    drift = drift_cos = drift_w = drift_w_cos = None
    for attempt in range(MAX_DRIFT_TRIES if max_drift is not None else 1):
        choices, predicted = cal.choose(budget, bound, speedup=speedup, scale=scale)
        results, solved = cal.solve(choices)
        if measure or max_drift is not None:
            drift, drift_cos = cal.drift()
        if max_drift is None or drift is None or drift <= max_drift or not choices:
            break
        notes.append(f"attempt {attempt + 1}: predicted drift {predicted:.3g}, measured {drift:.3g} > "
                     f"{max_drift:g}; tightening")
        bound = (bound if bound else max_drift) * max_drift / drift * 0.9
    if max_drift is not None and drift is not None and drift > max_drift:
        notes.append(f"measured drift {drift:.3g} stays above --max-drift {max_drift:g} after {MAX_DRIFT_TRIES} tries")
    if measure and choices:
        cal.set_weight_only(choices)
        drift_w, drift_w_cos = cal.drift()
    cal.timings["total"] = time.perf_counter() - t0
    after = cal.conv_macs - sum(r.macs_before - r.macs_after for r in results.values())
    if budget is not None and policy.cost == "macs" and cal.conv_macs and \
            after / cal.conv_macs < budget - BUDGET_TOLERANCE:
        notes.append(f"{'conv and linear' if cal.policy.linear else 'conv'} MACs {after / cal.conv_macs:.3f} for a budget of {budget:g}: no candidate that fits "
                     f"the rest of the budget has a lower predicted drift (the layers' MACs per rank are too coarse, "
                     f"or their larger ranks are no more accurate on the samples)")
    report = CalibrationReport(
        cal.loaded.label, cal.calib.source, cal.calib.samples, rows, seed, allocation, budget, max_drift,
        cal.conv_macs, after, predicted, opts.drift_metric, drift, drift_w, drift_cos, drift_w_cos,
        [results[l.name] for l in cal.layers if l.name in results], [],
        [p.to_dict() for p in cal.profiles.values()] if allocation == "sensitivity" else [], dict(cal.timings), notes,
        {k: list(v) for k, v in cal.shapes.items()},
        cal.prediction.to_dict() if cal.prediction is not None and policy.cost == "latency" else None)
    return CalibrationResult(report, dict(choices), dict(solved), dict(results), cal)


@single_blas(preload=LSTSQ_BLAS)
def calibrated_rewrite(model: ModelSource | LoadedModel, policy: Policy | None = None, data: Any = "random",
                       input_shapes=None, *, lowering: str | None = None, **kw):
    """:func:`calibrate`, then the calibrated factors written as solved (one emitter, as every rewrite).

    Returns ``(ModelProto, RewriteReport, CalibrationReport)``.  The rewrite report's
    ``weight_error`` is against the original (BatchNorm-folded) weight and ``planned_error`` is the
    layer's relative output error on the calibration data.  A speedup policy is checked end to end
    and corrected (:mod:`sepify.pipeline.speedup`): every round calibrates its choices again.
    """
    policy = policy or Policy()
    if policy.mode != "speedup":
        return _write(calibrate(model, policy, data, input_shapes, **kw), lowering)
    from ..pipeline.speedup import reach
    from ..pipeline.verify import model_inputs

    input_values = kw.pop("input_values", None)
    kw.pop("measure", None)
    opts = options_of(kw.pop("options", None), kw)
    if opts.allocation == "plan":
        raise ParameterError("allocation", "plan", "a speedup target is allocated on calibration sensitivities")
    cal = Calibrator(model, policy, data, input_shapes, options=replace(opts, allocation="sensitivity"),
                     input_values=input_values)
    cal.profile()
    results: dict[int, CalibrationResult] = {}

    def build(scale):
        res = calibrate(cal.loaded, calibrator=cal, scale=scale)
        out, report, creport = _write(res, lowering)
        results[id(report)] = res
        report.prediction = creport.prediction
        return out, report, cal.prediction

    feeds, _ = model_inputs(cal.loaded, None, cal.shapes, 0, cal.input_values)
    out, report, check = reach(build, cal.loaded.model, feeds, policy.target_speedup, policy.threads,
                               checked=cal.latency.local)
    report.speedup = check.to_dict()
    creport = results[id(report)].report
    creport.notes.extend(r.note for r in check.rounds if r.note)
    return out, report, creport


def _write(result: CalibrationResult, lowering: str | None):
    cal = result.calibrator
    rep = result.report
    # Layers left out because the drift bound stopped the walk (not because the budget was met): with
    # a budget too, the walk stopped short of it.
    by_drift = rep.max_drift is not None and (rep.budget is None or not rep.conv_macs_before or
                                              rep.conv_macs_after / rep.conv_macs_before > rep.budget + BUDGET_TOLERANCE)
    realized, kept, folded = cal.realizations(result.results, result.stages, lowering, by_drift=by_drift)
    result.report.folded_batchnorms = folded
    report_ = result.report
    calibration = {"data": report_.data, "samples": report_.samples, "allocation": report_.allocation,
                   "drift": report_.drift, "folded_batchnorms": folded}
    out, report = finish_rewrite(cal.loaded, cal.policy.to_dict(), cal.conv_macs, realized, kept, cal.policy,
                                 calibration=calibration)
    result.report.conv_macs_after = report.conv_macs_after  # chained splits included
    return out, report, result.report


__all__ = ["ALLOCATIONS", "CalibrationReport", "CalibrationResult", "Calibrator", "DEFAULT_ROWS", "calibrate",
           "calibrated_rewrite"]
