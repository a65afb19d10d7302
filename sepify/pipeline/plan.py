"""Policies pick a scheme and a rank per convolution; the result is an editable :class:`Plan`.

Policies (one per plan):

* ``lossless`` (default): only factorizations whose relative weight error is at the rounding
  level of the weight's dtype (see :func:`sepify.core.linalg.exact_tolerance`) and that cut MACs.
* ``tol``: the cheapest decomposition with relative weight error ≤ ``tol`` per layer.
* ``rank``: a fixed rank ``R`` (clamped to each layer's maximum; skipped if it saves nothing).
* ``budget``: keep about a fraction ``F`` of the conv MACs. Starting from the original model,
  the move (layer → cheaper scheme/rank) with the least weight error added per MAC saved is
  taken, repeatedly, until the budget is met (:func:`sepify.core.allocate.greedy`).

``scheme`` restricts candidates (``auto`` tries all and picks the cheapest meeting the bound);
``include``/``exclude`` are regular expressions on node names (qualified or plain), and
``min_macs`` skips small layers.  A chosen dw-pw / pw-dw factorization whose full-kernel stage
is itself exactly separable is split further into kh×1 and 1×kw ("chaining").
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from ..threads import parallel_map, single_blas
from ..core.allocate import Option, greedy
from ..core.chain import chained_macs
from ..core.geometry import ConvGeometry
from ..core.linalg import exact_tolerance
from ..core.reasons import Reason, primary
from ..core.schemes import get as get_scheme, names as scheme_names
from ..errors import ParameterError
from ..model.cost import ConvSpec, conv_cost
from ..model.shapes import input_values_record
from ..serialize import SCHEMA_VERSION, dumps, from_dict
from .analysis import ModelAnalysis, analyze_model, check_weight, geometry_reason

POLICY_MODES = ("lossless", "tol", "rank", "budget", "speedup")
COSTS = ("macs", "latency")


@dataclass
class Policy:
    """How to choose a decomposition per layer (see the module doc).

    ``mode``: ``lossless`` | ``tol`` (with ``tol``, a relative weight error in [0, 1]) | ``rank``
    (with ``rank``) | ``budget`` (with ``budget``, the fraction of the conv cost to keep, in (0, 1])
    | ``speedup`` (with ``target_speedup``: the least error that reaches that end-to-end speedup).
    Left out, the mode is the one whose value is given (``Policy(budget=0.5)`` is a budget policy),
    else lossless; a value of another mode than the one named is refused.  ``scheme``: ``auto`` or
    one registered scheme (:func:`sepify.core.schemes.names`).  ``include`` / ``exclude``: regular
    expressions on node names; ``min_macs``: skip smaller layers; ``chain``: split an exactly
    separable kernel stage further (MAC cost only).

    ``cost``: what a rewrite saves — ``macs`` (the default for every mode but speedup: the same plan
    on every machine, nothing timed) or ``latency`` (onnxruntime latencies of each conv and each
    candidate chain at its real shapes and ``threads``, from a latency table:
    :mod:`sepify.pipeline.lut`; ``latency_table`` names one measured elsewhere, else this machine's
    cache is completed by measuring).  Under latency cost only measured ranks are candidates and
    only candidates faster than their conv.

    Every bad value raises :class:`sepify.ParameterError` naming the parameter.
    """

    mode: str = None  # type: ignore[assignment]  # None: inferred (see above); always set after __init__
    tol: float | None = None
    rank: int | None = None
    budget: float | None = None
    scheme: str = "auto"
    include: str | None = None
    exclude: str | None = None
    min_macs: int = 0
    chain: bool = True
    target_speedup: float | None = None
    cost: str = None  # type: ignore[assignment]  # None: "latency" for a speedup policy, else "macs"
    threads: int | None = None  # onnxruntime intra-op threads the latencies are measured at
    latency_table: str | None = None  # a table measured elsewhere (sepify latency-table); None: this machine's
    linear: bool = False  # also factor MatMul / Gemm layers with a constant 2-D weight (pw-lowrank), MAC cost

    def __post_init__(self) -> None:
        values = [m for m, v in (("tol", self.tol), ("rank", self.rank), ("budget", self.budget),
                                 ("speedup", self.target_speedup)) if v is not None]
        if self.mode is None:
            if len(values) > 1:
                raise ParameterError("policies", values, "choose one policy")
            self.mode = values[0] if values else "lossless"
        if self.mode not in POLICY_MODES:
            raise ParameterError("mode", self.mode, f"unknown policy (one of {', '.join(POLICY_MODES)})")
        other = [m for m in values if m != self.mode]
        if other:
            label = "target_speedup" if other[0] == "speedup" else other[0]
            raise ParameterError(label, getattr(self, label), f"is not a parameter of a {self.mode} policy")
        if self.cost is None:
            self.cost = "latency" if self.mode == "speedup" else "macs"
        if self.cost not in COSTS:
            raise ParameterError("cost", self.cost, f"unknown cost (one of {', '.join(COSTS)})")
        if self.mode == "speedup" and self.cost != "latency":
            raise ParameterError("cost", self.cost, "a speedup target is reached on measured latency (cost latency)")
        if self.mode == "speedup" and (self.target_speedup is None or not self.target_speedup > 1):
            raise ParameterError("target_speedup", self.target_speedup, "needs a speedup > 1 (e.g. 1.4)")
        if self.mode == "rank" and self.cost != "macs":
            raise ParameterError("cost", self.cost, "a rank policy fixes the rank: it has no cost to minimize")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ParameterError("threads", self.threads, "needs a number of threads ≥ 1")
        if self.latency_table is not None and self.cost != "latency":
            raise ParameterError("latency_table", self.latency_table, "is used by latency cost only (cost='latency')")
        if not isinstance(self.linear, bool):
            raise ParameterError("linear", self.linear, "needs True or False")
        if self.scheme not in ("auto", *scheme_names()):
            raise ParameterError("scheme", self.scheme, f"unknown scheme (auto, {', '.join(scheme_names())})")
        if self.mode == "tol" and (self.tol is None or not 0 <= self.tol <= 1):
            raise ParameterError("tol", self.tol, "needs a relative weight error in [0, 1] (||W - W'||/||W|| is 1 at "
                                                  "rank 0, so a tolerance above 1 would accept anything)")
        if self.mode == "rank" and (self.rank is None or isinstance(self.rank, bool) or not isinstance(self.rank, int)
                                    or self.rank < 1):
            raise ParameterError("rank", self.rank, "needs a positive integer")
        if self.mode == "budget" and (self.budget is None or not 0 < self.budget <= 1):
            raise ParameterError("budget", self.budget, "needs a fraction in (0, 1]")
        if isinstance(self.min_macs, bool) or not isinstance(self.min_macs, int) or self.min_macs < 0:
            raise ParameterError("min_macs", self.min_macs, "needs a number of MACs ≥ 0")
        for label, pattern in (("include", self.include), ("exclude", self.exclude)):
            if pattern:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ParameterError(label, pattern, f"bad regular expression ({exc})") from None

    @classmethod
    def from_args(cls, *, lossless=False, tol=None, rank=None, budget=None, **kw) -> "Policy":
        """The policy from one of ``lossless`` / ``tol`` / ``rank`` / ``budget`` (at most one given)."""
        # "is not None": 0 is a value the user gave (and Policy refuses where it makes no sense).
        chosen = [m for m, v in (("lossless", lossless), ("tol", tol), ("rank", rank), ("budget", budget))
                  if v is not None and v is not False]
        if len(chosen) > 1:
            raise ParameterError("policies", chosen, "choose one policy")
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
    variant: str = ""  # "": the scheme's cheaper variant
    latency_us: float | None = None  # measured (latency cost)

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
    variant: str = ""  # the scheme's variant (spatial: "v" kh×1 first, "h" 1×kw first; "": the cheaper)
    error: float | None = None  # planned relative weight error
    macs_after: int | None = None
    exact_tolerance: float | None = None
    dtype: str | None = None
    lowering: str | None = None  # "branches" | "grouped" | "concat"; None: rewrite()'s choice
    latency: dict[str, Any] | None = None  # onnxruntime timings (sepify.pipeline.latency.measure_plan)
    latency_us: float | None = None  # latency cost: the conv's measured latency (µs)
    latency_us_after: float | None = None  # latency cost: the planned chain's

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Prediction:
    """What a latency-cost plan expects (isolated latencies, µs): the conv latencies before and after,
    and with the measured end-to-end latency of the model (speedup policies) the predicted speedup
    ``model_us / (model_us − scale · saved)``; ``scale`` corrects the isolated savings from
    end-to-end measurements (:mod:`sepify.pipeline.speedup`)."""

    threads: int | None
    conv_us: float
    conv_us_after: float
    loss: float  # the allocator's total loss (weight-only: retained spectral energy lost)
    model_us: float | None = None
    scale: float = 1.0
    table: str | None = None
    measured_here: bool = True

    @property
    def saved_us(self) -> float:
        return self.conv_us - self.conv_us_after

    @property
    def speedup(self) -> float | None:
        if not self.model_us:
            return None
        return self.model_us / max(self.model_us - self.scale * self.saved_us, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["predicted_speedup"] = self.speedup
        return d


@dataclass
class Plan:
    policy: Policy
    nodes: list[NodePlan]
    analysis: ModelAnalysis | None = field(default=None, repr=False, compare=False)
    prediction: Prediction | None = None

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

    def __repr__(self) -> str:
        return (f"Plan(policy={self.policy.mode!r}, nodes={len(self.nodes)}, rewrites={len(self.rewrites)}, "
                f"conv_macs={self.conv_macs} -> {self.conv_macs_after})")

    def to_dict(self) -> dict[str, Any]:
        before, after = self.conv_macs, self.conv_macs_after
        return {
            "schema_version": SCHEMA_VERSION,
            "policy": self.policy.to_dict(),
            # the fixed feeds of the analysis (as in AuditReport.to_dict); {} without one
            "input_values": input_values_record(self.analysis.table.input_values) if self.analysis else {},
            "totals": {
                "conv_macs": before,
                "conv_macs_after": after,
                "macs_ratio": after / before if before else 1.0,
                "rewritten_nodes": len(self.rewrites),
            },
            "prediction": self.prediction.to_dict() if self.prediction else None,
            "nodes": [n.to_dict() for n in self.nodes],
        }

    def to_json(self) -> str:
        return dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any], analysis: ModelAnalysis | None = None) -> "Plan":
        """A plan from :meth:`to_dict` (e.g. edited as JSON); attach the ``analysis`` of the model it
        is for (``sepify.plan(model, …).analysis``) to rewrite with it."""
        policy = from_dict(Policy, data.get("policy", {}))
        nodes = [from_dict(NodePlan, n) for n in data.get("nodes", [])]
        pred = data.get("prediction")
        return cls(policy, nodes, analysis, from_dict(Prediction, pred) if pred else None)


# ----------------------------------------------------------------------------------------------
@dataclass
class _NodeState:
    spec: ConvSpec
    weight: np.ndarray
    geo: ConvGeometry
    tol_exact: float
    # (scheme, variant) -> (relative error at rank 0..max, MACs at rank 1..max), schemes and variants in
    # registry order; a scheme's first entry has variant "" (its cheaper one).  Cross-channel spatial
    # splits have a different spectrum in the costlier order, and an exact split there can still
    # beat every other scheme.
    curves: dict[tuple[str, str], tuple[np.ndarray, list[int]]]
    # latency cost: (the conv's µs, {(scheme, variant, rank): µs} of the measured candidates)
    latency: tuple[float, dict[tuple[str, str, int], float]] | None = None
    # shared by the states of one weight: see _state
    memo: dict = field(default_factory=dict, repr=False, compare=False)
    analysis: ModelAnalysis | None = field(default=None, repr=False, compare=False)

    def has(self, scheme: str) -> bool:
        return any(s == scheme for s, _ in self.curves)


def _selected(policy: Policy, ref) -> bool:
    names = (ref.name, ref.qualified_name)
    if policy.include and not any(re.search(policy.include, n) for n in names):
        return False
    if policy.exclude and any(re.search(policy.exclude, n) for n in names):
        return False
    return True


def _state(an: ModelAnalysis, spec: ConvSpec, exact_only: bool = False,
           cache: dict | None = None) -> tuple[_NodeState | None, str | None]:
    """The node's curves per (scheme, variant).  ``cache`` shares them between nodes reading one
    weight (a siamese net's towers): the matrices depend on the weight, the groups and the variant."""
    check = check_weight(an.view, spec)
    if check.reason is not None:
        return None, check.reason
    weight = check.weight
    geo = spec.geometry()
    saves = geometry_reason(geo)
    if saves is not None:  # no scheme cuts MACs at any rank: nothing to decompose
        return None, saves
    tol = exact_tolerance(weight.dtype)
    # Decompositions several schemes read (the mode Grams) and chained MACs, once per weight.
    memo = cache.setdefault(("memo", spec.w_name, id(weight)), {}) if cache is not None else {}
    curves: dict[tuple[str, str], tuple[np.ndarray, list[int]]] = {}
    reasons = []
    for name in scheme_names():
        sch = get_scheme(name)
        reason = sch.reason(geo)
        if reason is not None:
            reasons.append(reason)
            continue
        for k, variant in enumerate(sch.variants(geo)):
            useful = sch.break_even(geo, variant)
            key = (spec.w_name, id(weight), geo.group, name, variant, useful if exact_only else None)
            errors = cache.get(key) if cache is not None else None
            if errors is None:
                if exact_only:
                    # Lossless plans only need to know whether some rank below break-even is exact;
                    # large matrices certified otherwise skip their full decomposition.
                    errors = sch.spectrum(weight, geo, variant, tol, useful).errors
                else:
                    errors = sch.curve(weight, geo, variant, memo)
                if cache is not None:
                    cache[key] = errors
            curves[(name, "" if k == 0 else variant)] = (errors, sch.macs_curve(geo, len(errors) - 1, variant))
    if not curves:
        return None, primary(reasons)
    return _NodeState(spec, weight, geo, tol, curves, memo=memo, analysis=an), None


def _states(an: ModelAnalysis, specs, exact_only: bool, cache: dict) -> list[tuple[_NodeState | None, str | None]]:
    """:func:`_state` of every spec, on one thread per core (sepify's BLAS is single-threaded and
    numpy releases the GIL in its linear algebra), largest weights first; convs reading a weight
    another spec reads wait for its curves (the cache) instead of computing them again."""
    first: dict[str, int] = {}
    for i, spec in enumerate(specs):
        first.setdefault(spec.w_name, i)
    leads = sorted(set(first.values()), key=lambda i: -_weight_size(specs[i]))
    out = dict(zip(leads, parallel_map(lambda i: _state(an, specs[i], exact_only, cache), leads)))
    for i, spec in enumerate(specs):
        if i not in out:
            out[i] = _state(an, spec, exact_only, cache)
    return [out[i] for i in range(len(specs))]


def _weight_size(spec) -> int:
    geo = spec.geometry()
    return 0 if geo is None else geo.c_out * geo.cin_per_group * int(np.prod(geo.kernel))


def _curves_in_order(st: _NodeState, schemes: list[str]):
    """``(scheme, variant, errors by rank, MACs by rank)`` of the node, in the order candidates are
    listed (``schemes``' order, then each scheme's variants)."""
    for s in schemes:
        for (name, variant), (curve, macs_at) in st.curves.items():
            if name == s:
                yield s, variant, curve, macs_at


def _candidates(st: _NodeState, schemes: list[str]) -> list[Candidate]:
    """Every (scheme, variant, rank) that saves MACs, with its weight error — under latency cost
    (``st.latency`` set) the measured ranks that run faster than the conv, with their latency."""
    out = []
    lat = st.latency
    limit = st.geo.macs
    for s, variant, curve, macs_at in _curves_in_order(st, schemes):
        for r in range(1, len(curve)):
            macs = macs_at[r - 1]
            if macs >= limit:
                break
            if lat is None:
                out.append(Candidate(s, r, float(curve[r]), macs, variant=variant))
                continue
            us = lat[1].get((s, variant, r))
            if us is not None and us < lat[0]:
                out.append(Candidate(s, r, float(curve[r]), macs, variant=variant, latency_us=us))
    return out


def _front_candidates(st: _NodeState, schemes: list[str]) -> list[Candidate]:
    """The candidates of :func:`_candidates` (MAC cost) that :func:`sepify.core.allocate.front`
    keeps, found on arrays: a budget walk only ever steps along the front, and a VGG-16 offers
    22,000 (scheme, rank) candidates of which a few hundred are on it.  Same order and tie-breaks
    as ``front`` on the full list (cost, then error, then the candidates' order)."""
    parts = []
    limit = st.geo.macs
    for s, variant, curve, macs_at in _curves_in_order(st, schemes):
        macs = np.asarray(macs_at[:len(curve) - 1], dtype=np.int64)
        n = int(np.argmax(macs >= limit)) if (macs >= limit).any() else len(macs)  # _candidates stops there
        if n:
            parts.append((s, variant, np.arange(1, n + 1), macs[:n], np.asarray(curve[1:n + 1], dtype=np.float64)))
    if not parts:
        return []
    cost = np.concatenate([p[3] for p in parts])
    err = np.concatenate([p[4] for p in parts])
    at = np.lexsort((np.arange(len(cost)), err, cost))  # by cost, then error, then candidate order
    sorted_err = err[at]
    best_before = np.concatenate([[np.inf], np.minimum.accumulate(sorted_err)[:-1]])
    keep = np.sort(at[sorted_err < best_before])  # front members, in candidate order
    offsets = np.cumsum([0] + [len(p[2]) for p in parts])
    out = []
    for k in keep:
        j = int(np.searchsorted(offsets, k, side="right")) - 1
        s, variant, ranks, macs, errors = parts[j]
        i = k - offsets[j]
        out.append(Candidate(s, int(ranks[i]), float(errors[i]), int(macs[i]), variant=variant))
    return out


def _cost(c: Candidate) -> float:
    return c.macs if c.latency_us is None else c.latency_us


def _chained_macs(st: _NodeState, c: Candidate) -> int | None:
    """:func:`chained_macs` of a candidate (one factorization), once per weight, geometry and choice."""
    key = ("chained", st.geo, c.scheme, c.rank, c.variant, st.tol_exact)
    if key not in st.memo:
        # The factors go to the analysis: realizing the pick reads them instead of factoring again.
        factor = (None if st.analysis is None else
                  lambda: st.analysis.factored(st.spec.w_name, st.weight, st.geo, c.scheme, c.rank, c.variant))
        st.memo[key] = chained_macs(st.weight, st.geo, c.scheme, c.rank, st.tol_exact, c.variant, factor)
    return st.memo[key]


def _with_chain(st: _NodeState, cand: Candidate) -> Candidate:
    """Try to split the full-kernel stage of a dw-pw / pw-dw candidate exactly (costs one factorization)."""
    macs = _chained_macs(st, cand)
    if macs is None:
        return cand
    return replace(cand, macs=macs, chained=True)


def _chain_probe(states: dict[int, _NodeState], group: list[int], options: dict[tuple, list[Candidate]]):
    """``key -> the group's MACs with that choice chained`` (None when no exact split pays)."""
    def probe(key):
        total = 0
        for c, i in zip(options[key], group):
            st = states[i]
            m = _chained_macs(st, c)
            if m is None:
                return None
            total += m
        return total

    return probe


def _weight_groups(states: dict[int, _NodeState]) -> list[list[int]]:
    """The planned nodes grouped by the weight they read: one decision per weight, so convs sharing a
    trained weight (a siamese net's towers) keep computing one function, stored once."""
    by_weight: dict[tuple, list[int]] = {}
    for i, st in states.items():
        key = (st.spec.w_name, st.weight.shape, st.weight.dtype.str)
        by_weight.setdefault(key, []).append(i)
    groups = []
    for members in by_weight.values():
        first = states[members[0]].weight
        same = [i for i in members if states[i].weight is first or np.array_equal(states[i].weight, first)]
        groups.append(same)
        groups.extend([i] for i in members if i not in same)
    return sorted(groups, key=lambda g: g[0])


def _shared_candidates(states: dict[int, _NodeState], group: list[int], schemes: list[str],
                       front_only: bool = False) -> dict[tuple, list[Candidate]]:
    """(scheme, variant, rank) -> one Candidate per group member, for the choices every member has
    (a one-node group: its candidates as they are, in their order).  ``front_only`` (a budget walk
    on MACs): a one-node group's Pareto front only (:func:`_front_candidates`)."""
    if front_only and len(group) == 1 and states[group[0]].latency is None:
        return {(c.scheme, c.variant, c.rank): [c] for c in _front_candidates(states[group[0]], schemes)}
    memo: dict[tuple, str] = {}

    def resolved(i, scheme, variant):
        key = (i, scheme, variant)
        if key not in memo:
            memo[key] = get_scheme(scheme).resolve(states[i].geo, variant) if len(group) > 1 else variant
        return memo[key]

    per = [{(c.scheme, resolved(i, c.scheme, c.variant), c.rank): c for c in _candidates(states[i], schemes)}
           for i in group]
    return {k: [p[k] for p in per] for k in per[0] if all(k in p for p in per[1:])}


def _best_shared(options: dict[tuple, list[Candidate]], bounds: list[float], chained=None) -> tuple | None:
    """The choice with the fewest MACs over the group whose error is within every member's bound.

    ``chained(key)``: the group's MACs with the choice's kernel stage split exactly, or None — tried
    on the cheapest choice of each scheme, since a split can reorder them (an RGB Sobel is cheapest
    as a 1×1 luma conv whose 3×3 stage splits into 3×1 and 1×3)."""
    ok = [k for k, cs in options.items() if all(c.error <= b for c, b in zip(cs, bounds))]
    if not ok:
        return None

    def plain(k):
        return sum(_cost(c) for c in options[k]), options[k][0].error

    best = min(ok, key=plain)
    if chained is None:
        return best
    per_scheme = {}
    for k in sorted(ok, key=plain):
        per_scheme.setdefault(k[0], k)
    finals = []
    for k in per_scheme.values():
        m = chained(k)
        finals.append(((m if m is not None else plain(k)[0]), plain(k)[1], list(per_scheme.values()).index(k), k))
    return min(finals)[3]


@single_blas
def plan(model, policy: Policy | None = None, input_shapes=None, *, input_values=None,
         analysis: ModelAnalysis | None = None, latency=None, scale: float | None = None, cache: dict | None = None,
         progress: bool = False) -> Plan:
    """Choose a scheme and rank for every Conv-like node under ``policy`` (default: lossless).

    ``input_shapes`` / ``input_values`` as for :func:`sepify.audit` (ignored with ``analysis``).
    Latency cost: ``latency`` (a :class:`sepify.pipeline.lut.LatencyCosts` for this analysis; made
    from the policy when None), ``scale`` (a speedup policy's correction of the isolated savings),
    ``progress`` (a bar while latencies are measured); None: :func:`prior_scale`.  ``cache``: weight curves shared between
    plans of one analysis (a speedup policy's correction rounds)."""
    policy = policy or Policy()
    an = analysis or analyze_model(model, input_shapes, input_values, inline=True)  # plans read weights, change none
    schemes = list(scheme_names()) if policy.scheme == "auto" else [policy.scheme]
    nodes: list[NodePlan] = []
    states: dict[int, _NodeState] = {}
    curves: dict = cache if cache is not None else {}
    specs = plan_specs(an, policy)
    found = _states(an, specs, policy.mode == "lossless", curves)
    for spec, (st, reason) in zip(specs, found):
        ref = spec.ref
        np_ = NodePlan(ref.name, ref.qualified_name, ref.op_type, None, "keep")
        nodes.append(np_)
        if st is not None:
            np_.macs = st.geo.macs
            np_.exact_tolerance = st.tol_exact
            np_.dtype = str(st.weight.dtype)
        else:
            np_.macs = conv_cost(spec, an.table, None, 0).macs
        if reason is not None:
            np_.reason = reason
            continue
        if not _selected(policy, ref):
            np_.reason = Reason.NOT_SELECTED
            continue
        if np_.macs is not None and np_.macs < policy.min_macs:
            np_.reason = Reason.BELOW_MIN_MACS
            continue
        if not any(st.has(s) for s in schemes):
            np_.reason = primary(get_scheme(s).reason(st.geo) for s in schemes) or Reason.NO_MAC_SAVING
            continue
        states[len(nodes) - 1] = st

    lat = None
    if policy.cost == "latency":
        lat = latency if latency is not None else latency_costs(an, policy, progress=progress)
        _attach_latency(an, lat, nodes, states, schemes, specs)
    groups = _weight_groups(states)
    prediction = None
    if policy.mode in ("budget", "speedup"):
        prediction = _allocate(policy, an, nodes, states, schemes, groups, lat, scale)
    else:
        for group in groups:
            options = _shared_candidates(states, group, schemes)
            chained = _chain_probe(states, group, options) if policy.chain and lat is None else None
            if policy.mode == "lossless":
                pick = _best_shared(options, [states[i].tol_exact for i in group], chained)
            elif policy.mode == "tol":
                pick = _best_shared(options, [max(policy.tol, states[i].tol_exact) for i in group], chained)
            else:  # fixed rank
                st0 = states[group[0]]
                fixed = {k: cs for k, cs in options.items()
                         if k[2] == min(policy.rank, len(st0.curves[(cs[0].scheme, cs[0].variant)][0]) - 1)}
                pick = min(fixed, key=lambda k: (fixed[k][0].error, sum(c.macs for c in fixed[k]))) if fixed else None
            for j, i in enumerate(group):
                _apply(nodes[i], states[i], options[pick][j] if pick is not None else None, policy)
        if lat is not None:
            prediction = _prediction(policy, lat, nodes, 0.0)
    return Plan(policy, nodes, an, prediction)


def plan_specs(an: ModelAnalysis, policy: Policy) -> list:
    """The nodes a plan under ``policy`` decides: every conv, and with ``policy.linear`` the linear
    layers with a constant weight (:meth:`ModelAnalysis.linear_specs`)."""
    return list(an.specs) + (an.linear_specs() if policy.linear else [])


def latency_costs(an: ModelAnalysis, policy: Policy, progress: bool = False):
    """The latency costs a latency-cost plan of ``an`` uses under ``policy``."""
    from .lut import LatencyCosts

    return LatencyCosts(an, policy.threads, policy.latency_table, progress=progress, linear=policy.linear)


def _attach_latency(an: ModelAnalysis, lat, nodes: list[NodePlan], states: dict[int, _NodeState],
                    schemes: list[str], planned: list) -> None:
    """Measure (or look up) every conv (and linear layer, with ``linear``) of ``planned`` and the grid
    candidates of the planned ones; a planned node the table cannot time is kept with reason
    ``latency_not_measured``."""
    from .lut import grid_candidates

    specs = {s.ref.qualified_name: s for s in planned}
    wanted: dict[str, list] = {}
    for i, n in enumerate(nodes):
        spec = specs[n.qualified_name]
        if not lat.covers(spec):
            continue
        wanted[n.qualified_name] = []
        if i in states:
            have = set(states[i].curves)
            wanted[n.qualified_name] = [c for c in grid_candidates(states[i].geo, schemes) if (c[0], c[1]) in have]
    lat.require(wanted)
    for i, n in enumerate(nodes):
        spec = specs[n.qualified_name]
        n.latency_us = lat.original(spec)
        if i not in states:
            continue
        if n.latency_us is None:
            n.reason = Reason.LATENCY_NOT_MEASURED
            del states[i]
            continue
        found = {c: lat.candidate(spec, *c) for c in wanted.get(n.qualified_name, [])}
        states[i] = replace(states[i], latency=(n.latency_us, {c: us for c, us in found.items() if us is not None}))


def _prediction(policy: Policy, lat, nodes: list[NodePlan], loss: float, model_us: float | None = None,
                scale: float = 1.0) -> Prediction:
    before = sum(n.latency_us or 0.0 for n in nodes)
    after = sum(((n.latency_us_after if n.action == "rewrite" else n.latency_us) or 0.0) for n in nodes)
    return Prediction(policy.threads, before, after, loss, model_us, scale,
                      str(lat.table.path) if lat.table.path is not None else None, lat.local)


_NO_CHOICE = {"lossless": Reason.NO_EXACT_SAVING, "tol": Reason.NO_SAVING_WITHIN_TOL,
              "rank": Reason.RANK_SAVES_NOTHING, "budget": Reason.NOT_NEEDED_FOR_BUDGET,
              "speedup": Reason.NOT_NEEDED_FOR_BUDGET}


def _apply(np_: NodePlan, st: _NodeState, choice: Candidate | None, policy: Policy) -> None:
    if choice is None:
        np_.reason = _NO_CHOICE[policy.mode]
        return
    if policy.chain and choice.latency_us is None:  # a split is not measured: latency plans keep the chain as timed
        choice = _with_chain(st, choice)
    np_.action = "rewrite"
    np_.scheme, np_.rank, np_.chained = choice.scheme, choice.rank, choice.chained
    np_.variant = choice.variant
    np_.error, np_.macs_after = choice.error, choice.macs
    np_.latency_us_after = choice.latency_us


def unreachable_budget(budget: float, floor: float) -> ParameterError:
    """The error for a budget below what rewriting every eligible layer as cheaply as possible reaches:
    refused rather than damaging every layer for a few percent of the MACs."""
    if floor >= 1.0:
        return ParameterError("budget", budget, "unreachable: no conv can be rewritten (see each node's reason); "
                                                "the reachable floor is 1.000")
    return ParameterError("budget", budget, f"unreachable: rewriting every eligible layer at its cheapest keeps "
                                            f"{floor:.3f} of the conv MACs (the rest cannot be rewritten); "
                                            f"the reachable floor is {floor:.3f}")


def _energy_loss(error: float) -> float:
    return -float(np.log(max(1.0 - error * error, 1e-12)))


def unreachable_speedup(target: float, reachable: float) -> ParameterError:
    return ParameterError("target_speedup", target, f"unreachable: rewriting every eligible conv with its fastest "
                                                    f"measured chain predicts {reachable:.2f}× (the rest of the model "
                                                    "keeps its time)")


def prior_scale(model_us: float, conv_us: float) -> float:
    """The first guess at how much of an isolated saving the whole model keeps: isolated convs pay a
    session call each and run with cold neighbours, so when their sum exceeds the whole model's
    latency the savings are shrunk in proportion (never enlarged)."""
    return min(1.0, model_us / conv_us) if conv_us > 0 else 1.0


def _allocate(policy: Policy, an: ModelAnalysis, nodes: list[NodePlan], states: dict[int, _NodeState],
              schemes: list[str], groups: list[list[int]], lat, scale: float | None) -> Prediction | None:
    """Rank allocation for a global budget or speedup target: the greedy walk of
    :func:`sepify.core.allocate.greedy` along each layer's Pareto front of (cost, ``−log(1 − e²)``) —
    the retained spectral energy lost, the product-of-energies objective of Zhang et al. (2015), ``e``
    the relative weight error.  It is convex where ``e²`` falls linearly with the cost, so cuts spread
    across layers instead of emptying one.  Convs sharing a weight are one layer of the walk (their
    costs and losses added).  Cost: MACs, or measured latency (µs) under latency cost — a budget is
    then a fraction of the convs' summed latency, and a speedup target ``S`` asks the walk to save
    ``(1 − 1/S)·T / scale`` µs of the model's measured end-to-end latency ``T``."""
    def cost0(i):
        return nodes[i].latency_us if lat is not None else nodes[i].macs

    total = sum((n.latency_us if lat is not None else n.macs) or 0 for n in nodes)
    options = {g[0]: _shared_candidates(states, g, schemes, front_only=lat is None) for g in groups}
    layers = {g[0]: (sum(cost0(i) for i in g),
                     [Option(sum(_cost(c) for c in cs), len(g) * _energy_loss(cs[0].error), key, key=cs[0].error)
                      for key, cs in options[g[0]].items()]) for g in groups}
    inside = sum(c0 for c0, _ in layers.values())
    model_us = None
    if policy.mode == "speedup":
        from .verify import model_inputs

        feeds, _ = model_inputs(an.loaded, None, an.input_shapes, 0, an.table.input_values or None)
        model_us = lat.model_us(an.loaded.model, feeds, an.loaded.label)
        scale = prior_scale(model_us, total) if scale is None else scale
        fixed = model_us - inside
        target = model_us - (1 - 1 / policy.target_speedup) * model_us / scale
    else:
        fixed = total - inside
        target = policy.budget * total
    result = greedy(layers, target=target, fixed=fixed)
    if result.exhausted:
        if policy.mode == "speedup":
            reach = model_us / max(model_us - scale * (model_us - result.cost), 1e-9)
            raise unreachable_speedup(policy.target_speedup, reach)
        raise unreachable_budget(policy.budget, result.cost / total if total else 1.0)
    if policy.chain and lat is None:  # the exact-split checks of the picks (one factorization each), per core
        parallel_map(lambda p: _chained_macs(*p), [(states[i], options[g[0]][result.chosen[g[0]].payload][j])
                                                    for g in groups if result.chosen.get(g[0]) is not None
                                                    for j, i in enumerate(g)])
    for g in groups:
        picked = result.chosen.get(g[0])
        for j, i in enumerate(g):
            _apply(nodes[i], states[i], options[g[0]][picked.payload][j] if picked is not None else None, policy)
            if not options[g[0]]:
                # no option at all, not merely not needed
                nodes[i].reason = Reason.NOT_FASTER if lat is not None else Reason.NO_MAC_SAVING
    if lat is None:
        return None
    return _prediction(policy, lat, nodes, result.loss, model_us, 1.0 if scale is None else scale)


__all__ = ["COSTS", "Candidate", "NodePlan", "POLICY_MODES", "Plan", "Policy", "Prediction", "latency_costs", "plan",
           "prior_scale", "unreachable_budget", "unreachable_speedup"]
