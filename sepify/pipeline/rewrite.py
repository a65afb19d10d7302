"""Rewrite: plan, realize each planned node, emit the graph once.

For each planned node the new chain reads the original input tensor and its last node
produces the original output tensor, so consumers and graph outputs are untouched.  Factor
weights are computed in float64 and cast back to the weight's dtype; the realized error
(after the cast) is what the report states (:mod:`sepify.pipeline.realize`).  The graph work is
the emitter's (:mod:`sepify.pipeline.emit`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from ..threads import parallel_map, single_blas
from ..core.lowering import LOWERINGS
from ..core.realization import Realization
from ..core.reasons import Reason
from ..errors import ParameterError, UsageError
from ..model.load import ModelSource
from ..serialize import SCHEMA_VERSION, dumps
from ..version import __version__
from .emit import emit, history_entry
from .plan import Plan, Policy, plan as make_plan, plan_specs
from .realize import realize



@dataclass
class NodeRewrite:
    name: str
    qualified_name: str
    scheme: str
    rank: int
    chained: bool
    weight_error: float  # realized, after casting the factors to the weight's dtype
    planned_error: float
    macs_before: int
    macs_after: int
    new_nodes: list[str] = field(default_factory=list)
    lowering: str = "single"  # how a rank-r dw-pw/pw-dw chain was written (LOWERINGS); "single": only one way
    latency: dict[str, Any] | None = None  # measured by --only-faster (see sepify.pipeline.latency)
    variant: str = ""  # the scheme's variant (spatial: "v" kh×1 first, "h" 1×kw first)
    source: str = "svd"  # "exact" | "svd" | "calibrated" (sepify.core.realization)

    @classmethod
    def of(cls, rz: Realization, name: str, latency: dict[str, Any] | None = None) -> "NodeRewrite":
        return cls(name, rz.node, rz.scheme, rz.rank, rz.chained, rz.weight_error, rz.planned_error, rz.macs_before,
                   rz.macs_after, lowering=rz.lowering, latency=latency, variant=rz.variant, source=rz.source)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RewriteTotals:
    conv_macs_before: int
    conv_macs_after: int
    macs_ratio: float
    rewritten_nodes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RewriteReport:
    model: str
    policy: Policy
    rewritten: list[NodeRewrite]
    kept: list[dict[str, Any]]
    conv_macs_before: int
    conv_macs_after: int
    changed: bool
    prediction: dict[str, Any] | None = None  # latency cost: the plan's prediction (sepify.pipeline.plan.Prediction)
    speedup: dict[str, Any] | None = None  # speedup policy: the rounds of planning and end-to-end checks

    @property
    def macs_ratio(self) -> float:
        return self.conv_macs_after / self.conv_macs_before if self.conv_macs_before else 1.0

    @property
    def totals(self) -> RewriteTotals:
        return RewriteTotals(self.conv_macs_before, self.conv_macs_after, self.macs_ratio, len(self.rewritten))

    def node(self, name: str) -> NodeRewrite:
        for r in self.rewritten:
            if name in (r.name, r.qualified_name):
                return r
        raise KeyError(name)

    def __repr__(self) -> str:
        return (f"RewriteReport(model={self.model!r}, policy={self.policy.mode!r}, rewritten={len(self.rewritten)}, "
                f"kept={len(self.kept)}, conv_macs={self.conv_macs_before} -> {self.conv_macs_after}, "
                f"changed={self.changed})")

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "sepify_version": __version__,
            "model": self.model,
            "policy": self.policy.to_dict(),
            "changed": self.changed,
            "totals": self.totals.to_dict(),
            "rewritten": [r.to_dict() for r in self.rewritten],
            "kept": self.kept,
            "prediction": self.prediction,
            "speedup": self.speedup,
        }

    def to_json(self) -> str:
        return dumps(self.to_dict())


@single_blas
def rewrite(model: ModelSource | Plan, policy: Policy | Plan | None = None, input_shapes=None,
            *, input_values=None, lowering: str | None = None, only_faster: bool = False, threads: int | None = None,
            latency_runs: int | None = None, providers=None, progress: bool = False):
    """Rewrite ``model`` under ``policy`` (or an edited :class:`Plan`). Returns ``(ModelProto, RewriteReport)``.

    When nothing qualifies, the original ModelProto is returned unchanged (byte for byte).
    ``input_shapes`` / ``input_values`` as for :func:`sepify.audit` (a Plan already holds them).
    ``lowering`` says how a rank-r > 1 dw-pw / pw-dw is written (same math and MACs each way):
    ``branches`` (the default: r multiplier-1 chains summed by Add, which onnxruntime runs on its
    fast depthwise path), ``grouped`` (one depthwise conv with channel multiplier r / one r-input
    grouped conv) or ``concat`` (dw-pw: r depthwise convs, Concat, one pointwise; pw-dw: one
    pointwise, Split, r depthwise convs, Adds).  A plan node's own ``lowering`` wins over it.

    ``only_faster``: time every planned rewrite against its original conv in onnxruntime (isolated
    single-node models at the real shapes, ``threads`` intra-op threads; see
    :func:`sepify.latency.measure_plan`), keep only the rewrites that are faster, and write each
    with its fastest lowering (only ``lowering`` when one is given).  The times are in the
    report (``rewritten[i].latency``, and ``kept`` entries with reason ``not_faster``).
    """
    if lowering is not None and lowering not in LOWERINGS:
        raise ParameterError("lowering", lowering, f"unknown lowering (one of {', '.join(LOWERINGS)})")
    if isinstance(model, Plan) and policy is None:
        model, policy = None, model
    if isinstance(policy, Policy) and policy.mode == "speedup":
        if only_faster:
            raise ParameterError("only_faster", True, "a speedup policy keeps only measured-faster chains already")
        return _rewrite_to_speedup(model, policy, input_shapes, input_values, lowering, progress)
    the_plan = policy if isinstance(policy, Plan) else make_plan(model, policy, input_shapes, input_values=input_values,
                                                                 progress=progress)
    if the_plan.analysis is None:
        raise UsageError("this Plan has no model analysis attached; make it with sepify.plan(model, …)")
    if only_faster:
        if the_plan.policy.linear:
            raise ParameterError("only_faster", True, "times isolated convs; linear layers (linear=True) are "
                                                      "planned on MACs only")
        from .latency import measure_plan

        the_plan = measure_plan(the_plan, threads=threads, runs=latency_runs, providers=providers,
                                lowerings=[lowering] if lowering else None)
    return rewrite_plan(the_plan, lowering)


def rewrite_plan(the_plan: Plan, lowering: str | None = None):
    """Realize and emit a plan (with its analysis attached): ``(ModelProto, RewriteReport)``."""
    an = the_plan.analysis
    specs = {s.ref.qualified_name: s for s in plan_specs(an, the_plan.policy)}
    kept = [{"name": n.qualified_name, "reason": n.reason or Reason.KEPT_BY_PLAN, **({"latency": n.latency} if n.latency else {})}
            for n in the_plan.nodes if n.action != "rewrite"]
    realized: list[tuple[Realization, Any]] = []
    memo: dict = {}
    # Factoring is numpy that releases the GIL: one thread per core.
    rzs = parallel_map(lambda np_: realize(an, specs[np_.qualified_name], np_, lowering, memo), the_plan.rewrites)
    for np_, rz in zip(the_plan.rewrites, rzs):
        if the_plan.policy.mode == "lossless" and rz.source != "exact":
            kept.append({"name": np_.qualified_name, "reason": Reason.EXACTNESS_LOST_IN_ROUNDING})
            continue
        realized.append((rz, np_))
    an.factors.clear()  # the plan's and the realizations' factors are written: hold no copies
    model, report = finish_rewrite(an.loaded, the_plan.policy.to_dict(), the_plan.conv_macs, realized, kept,
                                   the_plan.policy)
    if the_plan.prediction is not None:
        report.prediction = the_plan.prediction.to_dict()
    return model, report


def _rewrite_to_speedup(model, policy: Policy, input_shapes, input_values, lowering, progress):
    """A speedup policy: plans corrected by end-to-end measurements (:mod:`sepify.pipeline.speedup`)."""
    from .analysis import analyze_model
    from .plan import latency_costs
    from .speedup import reach
    from .verify import model_inputs

    an = analyze_model(model, input_shapes, input_values, inline=True)
    lat = latency_costs(an, policy, progress=progress)
    cache: dict = {}

    def build(scale):
        p = make_plan(None, policy, analysis=an, latency=lat, scale=scale, cache=cache)
        out, rep = rewrite_plan(p, lowering)
        return out, rep, p.prediction

    feeds, _ = model_inputs(an.loaded, None, an.input_shapes, 0, an.table.input_values or None)
    out, report, check = reach(build, an.loaded.model, feeds, policy.target_speedup, policy.threads,
                               checked=lat.local)
    report.speedup = check.to_dict()
    return out, report


def finish_rewrite(loaded, policy_record: dict[str, Any], conv_macs: int, realized: Sequence[tuple[Realization, Any]],
                   kept: list[dict[str, Any]], policy: Policy, **history):
    """Emit ``realized`` ((Realization, NodePlan) pairs) into ``loaded``'s model and report it; the
    model comes back unchanged (the same proto) when there is nothing to realize."""
    records = [NodeRewrite.of(rz, np_.name, np_.latency) for rz, np_ in realized]
    saved = sum(r.macs_before - r.macs_after for r in records)
    report = RewriteReport(loaded.label, policy, records, kept, conv_macs, conv_macs - saved, changed=bool(records))
    if not realized:
        return loaded.as_given, report
    rzs = [rz for rz, _ in realized]
    model, new_nodes = emit(loaded.model, rzs, history_entry(policy_record, rzs, **history))
    for rec in records:
        rec.new_nodes = new_nodes.get(rec.qualified_name, [])
    return model, report


__all__ = ["NodeRewrite", "RewriteReport", "RewriteTotals", "finish_rewrite", "rewrite"]
