"""Latency-aware rewriting: time each planned rewrite against its original conv in onnxruntime.

For every node a plan rewrites, small models are built at the node's real input shape and dtype
with its real weights: the original conv alone, and its factorized chain written in each
lowering that gives a distinct graph (:func:`sepify.factorize.lowering_kinds`; a rank-1 or
chained rewrite has one).  The rewritten models come from the same graph surgery
:func:`sepify.rewrite.rewrite` uses, so what is timed is what would be written.  When the conv's
only consumer is an activation onnxruntime fuses into convolutions (Relu, Clip, …), it is part of
every model: a fusion the rewrite keeps or loses is part of the measurement.

The models are timed the way :func:`sepify.bench.benchmark` times two models — interleaved rounds
(every model once per round after an untimed re-warm run, the order rotating), outputs in
onnxruntime's arena, threads spinning only within a run — with ``threads`` intra-op threads.
Isolated models pay a session call per node that a whole graph does not, so small layers look a
little less sped up than they are: the selection errs towards keeping the original.  A lowering's speedup is the
median over rounds of ``t_original / t_lowering`` measured in the same round; rounds in which
other processes made the timed threads wait for a CPU are left out when enough clean ones remain
(:class:`sepify.bench.Rounds`).  The rewrite is kept when the best lowering's speedup
exceeds ``min_speedup`` (default 1: faster at all), and written in that lowering.

Rounds: ``runs`` if given, else as many as fit in ``budget_s`` seconds (after the warm-up),
between :data:`sepify.pipeline.bench.MIN_RUNS` and :data:`~sepify.pipeline.bench.MAX_RUNS` — fewer for big layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..core.lowering import LOWERINGS, SINGLE, Lowered, lower, lowering_kinds
from ..core.realization import Realization
from ..core.reasons import Reason
from ..errors import ParameterError, UsageError
from ..model.load import ort_max_ir_version
from .bench import DEFAULT_BUDGET_S, DEFAULT_WARMUP, time_models
from .emit import emit
from .lut import FUSED_ACTIVATIONS, fused_activation  # noqa: F401 - FUSED_ACTIVATIONS re-exported
from .plan import Plan
from .realize import realize

MIN_CLEAN_ROUNDS = 5


@dataclass
class NodeLatency:
    """Onnxruntime timings of one planned rewrite (isolated models, medians in µs)."""

    node: str
    threads: int | None
    runs: int
    original_us: float
    lowerings_us: dict[str, float]  # per lowering ("single" when there is one way to write it)
    speedups: dict[str, float]  # per lowering: median over rounds of t_original / t_lowering
    chosen: str  # the lowering with the best speedup
    speedup: float
    min_speedup: float
    activation: str | None = None  # fused consumer included in every model
    rounds_used: int | None = None  # rounds without interference from other processes, or all (sepify.bench)
    contention: float | None = None  # worst median fraction of a run spent waiting for a CPU

    @property
    def faster(self) -> bool:
        return self.speedup > self.min_speedup

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["faster"] = self.faster
        return d


# ----------------------------------------------------------------------------------------------
# Isolated models
# ----------------------------------------------------------------------------------------------
def isolated_model(an, spec, *, activation: bool = True) -> onnx.ModelProto:
    """The conv of ``spec`` alone (plus its fused activation) at its real input shape and dtype,
    with its real weight; the bias (if any) from the model, or zeros when it is not constant."""
    view = an.view
    ref = spec.ref
    node = onnx.NodeProto()
    node.CopyFrom(ref.node)
    elem = spec.dtype or onnx.TensorProto.FLOAT
    np_dtype = helper.tensor_dtype_to_np_dtype(elem)
    weight = view.constant(spec.w_name, ref).value
    inits = [numpy_helper.from_array(np.asarray(weight), spec.w_name)]
    if spec.b_name:
        const = view.constant(spec.b_name, ref)
        bias = const.value if const is not None else np.zeros(spec.output_shape[1], np_dtype)
        inits.append(numpy_helper.from_array(np.asarray(bias), spec.b_name))
    nodes = [node]
    out_name = node.output[0]
    act = fused_activation(an, spec) if activation else None
    if act is not None:
        copy = onnx.NodeProto()
        copy.CopyFrom(act.node)
        nodes.append(copy)
        for name in act.node.input[1:]:
            if name and name not in {t.name for t in inits}:
                inits.append(numpy_helper.from_array(np.asarray(view.constant(name, act).value), name))
        out_name = act.node.output[0]
    graph = helper.make_graph(
        nodes, f"isolated:{ref.qualified_name}",
        [helper.make_tensor_value_info(spec.x_name, elem, list(spec.input_shape))],
        [helper.make_tensor_value_info(out_name, elem, list(spec.output_shape))], inits)
    opset = an.view.opset
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="sepify-latency")
    model.ir_version = min(an.loaded.model.ir_version, ort_max_ir_version())
    return model


def lowered_model(original: onnx.ModelProto, rz: Realization, lowered: Lowered | None = None) -> onnx.ModelProto:
    """``original`` (from :func:`isolated_model`) with its conv replaced by ``rz``'s chain (written
    as ``lowered`` when given), through the emitter the rewrite uses."""
    if lowered is not None:
        rz = replace(rz, lowered=lowered)
    return emit(original, [rz], {})[0]


def candidate_lowerings(stages, lowerings: Sequence[str] | None = None) -> dict[str, Lowered]:
    """The distinct lowered graphs of ``stages``, by the lowering actually used (``lowerings``
    restricts the choice; a chain written only one way gives ``{"single": …}``)."""
    kinds = lowering_kinds(stages)
    if not kinds:
        return {SINGLE: lower(stages, "grouped")}
    out: dict[str, Lowered] = {}
    for k in lowerings or LOWERINGS:
        lw = lower(stages, k)
        out.setdefault(lw.kind, lw)
    return out


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def measure_node(an, spec, rz: Realization, *, lowerings: Sequence[str] | None = None, threads: int | None = None,
                 runs: int | None = None, warmup: int = DEFAULT_WARMUP, budget_s: float = DEFAULT_BUDGET_S,
                 min_speedup: float = 1.0, providers=None, seed: int = 0) -> NodeLatency:
    """Time the conv of ``spec`` against its realization ``rz`` in each candidate lowering."""
    original = isolated_model(an, spec)
    cands = candidate_lowerings(rz.stages, lowerings)
    models = [original] + [lowered_model(original, rz, lw) for lw in cands.values()]
    np_dtype = helper.tensor_dtype_to_np_dtype(spec.dtype or onnx.TensorProto.FLOAT)
    feeds = {spec.x_name: np.random.default_rng(seed).standard_normal(spec.input_shape).astype(np_dtype)}
    rounds = time_models(models, feeds, threads=threads, runs=runs, warmup=warmup, budget_s=budget_s,
                         providers=providers)
    idx = rounds.used(MIN_CLEAN_ROUNDS)  # the rounds no other process interfered with, when enough
    times = [rounds.of(j, idx) for j in range(len(models))]
    t0 = times[0]
    medians = {k: float(np.median(t) * 1e6) for k, t in zip(cands, times[1:])}
    speedups = {k: float(np.median(t0 / t)) for k, t in zip(cands, times[1:])}
    chosen = max(speedups, key=lambda k: speedups[k])
    act = fused_activation(an, spec)
    contention = [c for c in (rounds.contention(j) for j in range(len(models))) if c is not None]
    return NodeLatency(spec.ref.qualified_name, threads, len(rounds.times[0]), float(np.median(t0) * 1e6), medians,
                       speedups, chosen, speedups[chosen], min_speedup, act.op_type if act is not None else None,
                       rounds_used=len(idx), contention=max(contention) if contention else None)


def measure_plan(plan: Plan, *, threads: int | None = None, runs: int | None = None,
                 lowerings: Sequence[str] | None = None, min_speedup: float = 1.0,
                 warmup: int = DEFAULT_WARMUP, budget_s: float = DEFAULT_BUDGET_S, providers=None,
                 seed: int = 0) -> Plan:
    """A copy of ``plan`` in which every rewrite is timed (:func:`measure_node`): its ``latency``
    holds the figures, its ``lowering`` the fastest measured lowering, and a rewrite no lowering
    makes faster than ``min_speedup`` becomes ``action="keep"`` with reason ``not_faster`` (or
    ``latency_not_measured``, with the error in ``latency``, when onnxruntime cannot run it)."""
    an = plan.analysis
    if an is None:
        raise UsageError("this Plan has no model analysis attached; make it with sepify.plan(model, …)")
    if threads is not None and threads < 1:
        raise ParameterError("threads", threads, "must be ≥ 1")
    if runs is not None and runs < 1:
        raise ParameterError("runs", runs, "must be ≥ 1")
    for k in lowerings or ():
        if k not in LOWERINGS:
            raise ParameterError("lowering", k, f"unknown lowering (one of {', '.join(LOWERINGS)})")
    specs = {s.ref.qualified_name: s for s in an.specs}
    nodes = []
    for np_ in plan.nodes:
        np_ = replace(np_)
        nodes.append(np_)
        if np_.action != "rewrite":
            continue
        spec = specs[np_.qualified_name]
        rz = realize(an, spec, np_)
        wanted = [np_.lowering] if np_.lowering else lowerings
        try:
            lat = measure_node(an, spec, rz, lowerings=wanted, threads=threads, runs=runs, warmup=warmup,
                               budget_s=budget_s, min_speedup=min_speedup, providers=providers, seed=seed)
        except Exception as exc:  # noqa: BLE001 - onnxruntime refused a model: not shown faster, so kept
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            np_.latency = {"node": np_.qualified_name, "threads": threads, "error": msg}
            np_.action, np_.reason = "keep", Reason.LATENCY_NOT_MEASURED
            continue
        np_.latency = lat.to_dict()
        if lat.faster:
            if lat.chosen != SINGLE:
                np_.lowering = lat.chosen
        else:
            np_.action, np_.reason = "keep", Reason.NOT_FASTER
    return Plan(plan.policy, nodes, plan.analysis)


def latency_rows(report) -> list[dict[str, Any]]:
    """Timed nodes of a RewriteReport: rewritten ones and those kept as not faster."""
    rows = [r.latency for r in report.rewritten if r.latency]
    rows += [k["latency"] for k in report.kept if k.get("latency")]
    return rows


__all__ = ["NodeLatency", "isolated_model", "latency_rows", "lowered_model", "measure_node", "measure_plan",
           "time_models"]
