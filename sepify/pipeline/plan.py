"""Policies pick a scheme and a rank per convolution; the result is an editable :class:`Plan`.

Policies (one per plan):

* ``lossless`` (default): only factorizations whose relative weight error is at the rounding
  level of the weight's dtype (see :func:`sepify.factorize.exact_tolerance`) and that cut MACs.
* ``tol``: the cheapest decomposition with relative weight error ≤ ``tol`` per layer.
* ``rank``: a fixed rank ``R`` (clamped to each layer's maximum; skipped if it saves nothing).
* ``budget``: keep about a fraction ``F`` of the conv MACs. Starting from the original model,
  the move (layer → cheaper scheme/rank) with the least weight error added per MAC saved is
  taken, repeatedly, until the budget is met.

``scheme`` restricts candidates (``auto`` tries all and picks the cheapest meeting the bound);
``include``/``exclude`` are regular expressions on node names (qualified or plain), and
``min_macs`` skips small layers.  A chosen dw-pw / pw-dw factorization whose full-kernel stage
is itself exactly separable is split further into kh×1 and 1×kw ("chaining").
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .audit import ModelAnalysis, analyze_model, check_weight, scheme_reason
from ..model.cost import ConvSpec
from ..errors import UsageError
from ..core.factorize import (
    SCHEMES,
    Stage,
    chained_macs,
    exact_tolerance,
    factor,
    relative_errors,
    scheme_matrices,
    scheme_stages,
    singular_values,
    spatial_orders,
    spectrum,
    split_kernel_stage,
    stages_macs,
)
from ..core.geometry import ConvGeometry
from ..model.shapes import input_values_record

POLICY_MODES = ("lossless", "tol", "rank", "budget")


@dataclass
class Policy:
    mode: str = "lossless"
    tol: float | None = None
    rank: int | None = None
    budget: float | None = None
    scheme: str = "auto"
    include: str | None = None
    exclude: str | None = None
    min_macs: int = 0
    chain: bool = True

    def __post_init__(self) -> None:
        if self.mode not in POLICY_MODES:
            raise UsageError(f"unknown policy {self.mode!r} (one of {', '.join(POLICY_MODES)})")
        if self.scheme not in ("auto", *SCHEMES):
            raise UsageError(f"unknown scheme {self.scheme!r} (auto, {', '.join(SCHEMES)})")
        if self.mode == "tol" and (self.tol is None or not self.tol >= 0):
            raise UsageError("--tol needs a non-negative relative error")
        if self.mode == "rank" and (self.rank is None or self.rank < 1):
            raise UsageError("--rank needs a positive integer")
        if self.mode == "budget" and (self.budget is None or not 0 < self.budget <= 1):
            raise UsageError("--budget needs a fraction in (0, 1]")
        for label, pattern in (("include", self.include), ("exclude", self.exclude)):
            if pattern:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise UsageError(f"--{label} {pattern!r}: bad regular expression ({exc})") from None

    @classmethod
    def from_args(cls, *, lossless=False, tol=None, rank=None, budget=None, **kw) -> "Policy":
        # "is not None": 0 is a value the user gave (and Policy refuses where it makes no sense).
        chosen = [m for m, v in (("lossless", lossless), ("tol", tol), ("rank", rank), ("budget", budget))
                  if v is not None and v is not False]
        if len(chosen) > 1:
            raise UsageError(f"choose one policy, not {' and '.join('--' + c for c in chosen)}")
        mode = chosen[0] if chosen else "lossless"
        return cls(mode=mode, tol=tol, rank=rank, budget=budget, **kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Candidate:
    scheme: str
    rank: int
    error: float  # relative Frobenius weight error (float64 factors)
    macs: int
    chained: bool = False
    vertical_first: bool | None = None  # spatial only: None = the cheaper order

    @property
    def label(self) -> str:
        return self.scheme + ("+spatial" if self.chained else "")


@dataclass
class NodePlan:
    """The decision for one Conv-like node; edit ``scheme``/``rank`` (or set ``action``) to override."""

    name: str
    qualified_name: str
    op_type: str
    macs: int | None
    action: str  # "rewrite" | "keep"
    reason: str | None = None
    scheme: str | None = None
    rank: int | None = None
    chained: bool = False
    vertical_first: bool | None = None  # spatial: kh×1 first (None: the cheaper order)
    error: float | None = None  # planned relative weight error
    macs_after: int | None = None
    exact_tolerance: float | None = None
    dtype: str | None = None
    lowering: str | None = None  # "branches" | "grouped" | "concat"; None: rewrite()'s choice
    latency: dict[str, Any] | None = None  # onnxruntime timings (sepify.latency.measure_plan)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Plan:
    policy: Policy
    nodes: list[NodePlan]
    analysis: ModelAnalysis | None = field(default=None, repr=False, compare=False)

    @property
    def conv_macs(self) -> int:
        return sum(n.macs or 0 for n in self.nodes)

    @property
    def conv_macs_after(self) -> int:
        return sum((n.macs_after if n.action == "rewrite" else n.macs) or 0 for n in self.nodes)

    @property
    def rewrites(self) -> list[NodePlan]:
        return [n for n in self.nodes if n.action == "rewrite"]

    def node(self, name: str) -> NodePlan:
        for n in self.nodes:
            if name in (n.name, n.qualified_name):
                return n
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        before, after = self.conv_macs, self.conv_macs_after
        return {
            "policy": self.policy.to_dict(),
            # the fixed feeds of the analysis (as in AuditReport.to_dict); {} without one
            "input_values": input_values_record(self.analysis.table.input_values) if self.analysis else {},
            "totals": {
                "conv_macs": before,
                "conv_macs_after": after,
                "macs_ratio": after / before if before else 1.0,
                "rewritten_nodes": len(self.rewrites),
            },
            "nodes": [n.to_dict() for n in self.nodes],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ----------------------------------------------------------------------------------------------
@dataclass
class _NodeState:
    spec: ConvSpec
    weight: np.ndarray
    geo: ConvGeometry
    tol_exact: float
    curves: dict[str, np.ndarray]  # scheme -> relative error at rank 0..max
    per_rank: dict[str, int]  # scheme -> MACs at rank 1
    # Cross-channel spatial splits have a different spectrum in the costlier order; an exact
    # split there can still beat every other scheme.  (curve, MACs per rank) of that order.
    spatial_other: tuple[np.ndarray, int] | None = None


def _selected(policy: Policy, ref) -> bool:
    names = (ref.name, ref.qualified_name)
    if policy.include and not any(re.search(policy.include, n) for n in names):
        return False
    if policy.exclude and any(re.search(policy.exclude, n) for n in names):
        return False
    return True


def _state(an: ModelAnalysis, spec: ConvSpec, exact_only: bool = False) -> tuple[_NodeState | None, str | None]:
    check = check_weight(an.view, spec)
    if check.reason is not None:
        return None, check.reason
    weight = check.weight
    geo = spec.geometry()
    tol = exact_tolerance(weight.dtype)

    def curve(scheme: str, order: bool | None = None) -> tuple[np.ndarray, int]:
        mats = scheme_matrices(weight, geo, scheme, order)
        per_rank = stages_macs(geo, scheme_stages(geo, scheme, 1, order))
        if exact_only:
            # Lossless plans only need to know whether some rank below break-even is exact;
            # large matrices certified otherwise skip their full decomposition.
            return spectrum(mats, (geo.macs - 1) // per_rank, tol).errors, per_rank
        return relative_errors(singular_values(mats)), per_rank

    curves, per_rank = {}, {}
    for scheme in SCHEMES:
        if scheme_reason(geo, scheme) is not None:
            continue
        curves[scheme], per_rank[scheme] = curve(scheme)
    if not curves:
        return None, ",".join(sorted({scheme_reason(geo, s) for s in SCHEMES}))
    other = None
    if "spatial" in curves and len(spatial_orders(geo)) == 2:
        other = curve("spatial", spatial_orders(geo)[1])
    return _NodeState(spec, weight, geo, tol, curves, per_rank, other), None


def _candidates(st: _NodeState, schemes: list[str]) -> list[Candidate]:
    """Every (scheme, rank) that saves MACs, with its weight error."""
    out = []
    for s in schemes:
        if s not in st.curves:
            continue
        options = [(st.curves[s], st.per_rank[s], None)]
        if s == "spatial" and st.spatial_other is not None:
            options.append((*st.spatial_other, spatial_orders(st.geo)[1]))
        for curve, per_rank, order in options:
            for r in range(1, len(curve)):
                macs = per_rank * r
                if macs >= st.geo.macs:
                    break
                out.append(Candidate(s, r, float(curve[r]), macs, vertical_first=order))
    return out


def _with_chain(st: _NodeState, cand: Candidate) -> Candidate:
    """Try to split the full-kernel stage of a dw-pw / pw-dw candidate exactly (costs one factorization)."""
    macs = chained_macs(st.weight, st.geo, cand.scheme, cand.rank, st.tol_exact)
    if macs is None:
        return cand
    return Candidate(cand.scheme, cand.rank, cand.error, macs, chained=True)


def _best_under(cands: list[Candidate], bound: float) -> Candidate | None:
    ok = [c for c in cands if c.error <= bound]
    return min(ok, key=lambda c: (c.macs, c.error)) if ok else None


def plan(model, policy: Policy | None = None, input_shapes=None, *, input_values=None,
         analysis: ModelAnalysis | None = None) -> Plan:
    """Choose a scheme and rank for every Conv-like node under ``policy`` (default: lossless).

    ``input_shapes`` / ``input_values`` as for :func:`sepify.audit` (ignored with ``analysis``)."""
    policy = policy or Policy()
    an = analysis or analyze_model(model, input_shapes, input_values)
    schemes = list(SCHEMES) if policy.scheme == "auto" else [policy.scheme]
    nodes: list[NodePlan] = []
    states: dict[int, _NodeState] = {}
    for spec in an.specs:
        ref = spec.ref
        np_ = NodePlan(ref.name, ref.qualified_name, ref.op_type, None, "keep")
        nodes.append(np_)
        st, reason = _state(an, spec, exact_only=policy.mode == "lossless")
        if st is not None:
            np_.macs = st.geo.macs
            np_.exact_tolerance = st.tol_exact
            np_.dtype = str(st.weight.dtype)
        else:
            from ..model.cost import conv_cost

            np_.macs = conv_cost(spec, an.table, None, 0).macs
        if reason is not None:
            np_.reason = reason
            continue
        if not _selected(policy, ref):
            np_.reason = "not_selected"
            continue
        if np_.macs is not None and np_.macs < policy.min_macs:
            np_.reason = "below_min_macs"
            continue
        if not any(s in st.curves for s in schemes):
            np_.reason = ",".join(sorted({scheme_reason(st.geo, s) or "" for s in schemes} - {""})) or "scheme_ineligible"
            continue
        states[len(nodes) - 1] = st

    if policy.mode == "budget":
        _allocate_budget(policy, nodes, states, schemes)
    else:
        for i, st in states.items():
            cands = _candidates(st, schemes)
            if policy.mode == "lossless":
                choice = _best_under(cands, st.tol_exact)
            elif policy.mode == "tol":
                choice = _best_under(cands, max(policy.tol, st.tol_exact))
            else:  # fixed rank
                fixed = [c for c in cands if c.rank == min(policy.rank, len(st.curves[c.scheme]) - 1)]
                choice = min(fixed, key=lambda c: (c.error, c.macs)) if fixed else None
            _apply(nodes[i], st, choice, policy)
    return Plan(policy, nodes, an)


def _apply(np_: NodePlan, st: _NodeState, choice: Candidate | None, policy: Policy) -> None:
    if choice is None:
        np_.reason = {"lossless": "no_exact_saving", "tol": "no_saving_within_tol",
                      "rank": "rank_saves_nothing", "budget": "not_needed_for_budget"}[policy.mode]
        return
    if policy.chain:
        choice = _with_chain(st, choice)
    np_.action = "rewrite"
    np_.scheme, np_.rank, np_.chained = choice.scheme, choice.rank, choice.chained
    np_.vertical_first = choice.vertical_first
    np_.error, np_.macs_after = choice.error, choice.macs


def _energy_loss(error: float) -> float:
    return -float(np.log(max(1.0 - error * error, 1e-12)))


def _allocate_budget(policy: Policy, nodes: list[NodePlan], states: dict[int, _NodeState], schemes: list[str]) -> None:
    """Greedy rank allocation for a global MAC budget.

    Each layer walks down its Pareto front of (MACs, error) one step at a time; the step taken
    next, across all layers, is the one that loses the least retained spectral energy per MAC
    saved, with loss measured as ``−log(1 − e²)`` (``e``: relative weight error) — the
    product-of-energies objective of Zhang et al. (2015).  It is convex where ``e²`` falls
    linearly with MACs, so cuts spread across layers instead of emptying one.  Stops once the
    conv MACs are within the budget, so it overshoots by at most one step.
    """
    total = sum(n.macs or 0 for n in nodes)
    target = policy.budget * total
    fronts: dict[int, list[Candidate]] = {}
    for i, st in states.items():
        front: list[Candidate] = []
        for c in sorted(_candidates(st, schemes), key=lambda c: (c.error, c.macs)):
            if not front or c.macs < front[-1].macs:
                front.append(c)
        fronts[i] = front  # MACs falling, error rising
    position = {i: -1 for i in states}  # -1: not rewritten
    spent = total
    while spent > target:
        best = None
        for i, front in fronts.items():
            k = position[i]
            if k + 1 >= len(front):
                continue
            cur_macs = front[k].macs if k >= 0 else nodes[i].macs
            cur_err = front[k].error if k >= 0 else 0.0
            step = front[k + 1]
            slope = (_energy_loss(step.error) - _energy_loss(cur_err)) / (cur_macs - step.macs)
            if best is None or slope < best[0]:
                best = (slope, i, cur_macs - step.macs)
        if best is None:
            break
        _, i, saved = best
        position[i] += 1
        spent -= saved
    for i, st in states.items():
        k = position[i]
        _apply(nodes[i], st, fronts[i][k] if k >= 0 else None, policy)


def realize(st_weight: np.ndarray, geo: ConvGeometry, np_: NodePlan, tol_exact: float) -> list[Stage]:
    """The stages (float64 weights) for a planned node, chained if the plan says so."""
    stages = factor(st_weight, geo, np_.scheme, np_.rank, np_.vertical_first if np_.scheme == "spatial" else None)
    if np_.chained:
        chain = split_kernel_stage(stages, geo, tol_exact)
        if chain is not None:
            stages = chain
    return stages
