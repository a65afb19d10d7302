"""Graph surgery: replace planned convolutions by their factorized chains (onnx-graphsurgeon).

For each planned node the new chain reads the original input tensor and its last node
produces the original output tensor, so consumers and graph outputs are untouched.  Factor
weights are computed in float64 and cast back to the weight's dtype; the realized error
(after the cast) is what the report states.  Then the graph is cleaned up once: the old
node and weights nothing else reads disappear, weights shared with other nodes stay.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from ..version import __version__
from ..errors import UsageError
from ..model.graph import list_initializers_as_inputs
from ..core.factorize import LOWERINGS, Lowered, Stage, lower, lowering_kinds, relative_error, stages_macs
from ..model.load import ModelSource, ort_max_ir_version
from .plan import Plan, Policy, plan as make_plan, realize

METADATA_KEY = "sepify"


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
    lowering: str | None = None  # how a rank-r dw-pw/pw-dw chain was written; None: only one way
    latency: dict[str, Any] | None = None  # measured by --only-faster (see sepify.latency)

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

    @property
    def macs_ratio(self) -> float:
        return self.conv_macs_after / self.conv_macs_before if self.conv_macs_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "sepify_version": __version__,
            "model": self.model,
            "policy": self.policy.to_dict(),
            "changed": self.changed,
            "totals": {
                "conv_macs_before": self.conv_macs_before,
                "conv_macs_after": self.conv_macs_after,
                "macs_ratio": self.macs_ratio,
                "rewritten_nodes": len(self.rewritten),
            },
            "rewritten": [r.to_dict() for r in self.rewritten],
            "kept": self.kept,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _walk_gs(graph):
    import onnx_graphsurgeon as gs

    for node in graph.nodes:
        yield node
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                yield from _walk_gs(value)
            elif isinstance(value, (list, tuple)):
                for v in value:
                    if isinstance(v, gs.Graph):
                        yield from _walk_gs(v)


class _Names:
    """Fresh node and tensor names derived from the original, never colliding."""

    def __init__(self, model: onnx.ModelProto):
        from ..model.load import iter_all_tensors
        from ..model.graph import GraphView

        view = GraphView(model)
        self.used = {r.node.name for r in view.nodes} | set(view.producer) | set(view.consumers)
        self.used |= {t.name for t in iter_all_tensors(model)} | {i.name for i in model.graph.input}

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name


def _cast(stages: list[Stage], dtype: np.dtype) -> list[Stage]:
    return [Stage(s.out_channels, s.in_per_group, s.group, s.kernel, s.axes,
                  np.ascontiguousarray(np.asarray(s.weight).astype(dtype)), s.role) for s in stages]


DEFAULT_LOWERING = "branches"


def rewrite(model: ModelSource | Plan, policy: Policy | Plan | None = None, input_shapes=None,
            *, input_values=None, lowering: str | None = None, only_faster: bool = False, threads: int | None = None,
            latency_runs: int | None = None, providers=None):
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
        raise UsageError(f"unknown lowering {lowering!r} (one of {', '.join(LOWERINGS)})")
    if isinstance(model, Plan) and policy is None:
        model, policy = None, model
    the_plan = policy if isinstance(policy, Plan) else make_plan(model, policy, input_shapes, input_values=input_values)
    an = the_plan.analysis
    if an is None:
        raise UsageError("this Plan has no model analysis attached; make it with sepify.plan(model, …)")
    if only_faster:
        from .latency import measure_plan

        the_plan = measure_plan(the_plan, threads=threads, runs=latency_runs, providers=providers,
                                lowerings=[lowering] if lowering else None)
    source = an.loaded.model
    view = an.view
    specs = {s.ref.qualified_name: s for s in an.specs}
    kept = [{"name": n.qualified_name, "reason": n.reason or "kept", **({"latency": n.latency} if n.latency else {})}
            for n in the_plan.nodes if n.action != "rewrite"]

    realized: list[tuple[Any, list[Stage], NodeRewrite]] = []
    for np_ in the_plan.rewrites:
        spec = specs[np_.qualified_name]
        _check_edit(np_, spec, view)
        weight = view.constant(spec.w_name, spec.ref).value
        geo = spec.geometry()
        stages = _cast(realize(weight, geo, np_, np_.exact_tolerance or 0.0), weight.dtype)
        err = relative_error(weight, stages, geo)
        if the_plan.policy.mode == "lossless" and np_.exact_tolerance is not None and err > np_.exact_tolerance:
            kept.append({"name": np_.qualified_name, "reason": "exactness_lost_in_rounding"})
            continue
        lowered = lower(stages, np_.lowering or lowering or DEFAULT_LOWERING)
        realized.append((spec, lowered, NodeRewrite(
            np_.name, np_.qualified_name, np_.scheme, np_.rank, np_.chained, err, float(np_.error or 0.0),
            geo.macs, stages_macs(geo, stages), lowering=lowered.kind if lowering_kinds(stages) else None,
            latency=np_.latency)))

    before = the_plan.conv_macs
    saved = sum(r.macs_before - r.macs_after for _, _, r in realized)
    report = RewriteReport(an.loaded.label, the_plan.policy, [r for _, _, r in realized], kept,
                           before, before - saved, changed=bool(realized))
    if not realized:
        return source, report
    return _surgery(source, realized, the_plan.policy), report


def _check_edit(np_, spec, view) -> None:
    """A hand-edited plan entry must still describe a rewrite sepify can build."""
    from .audit import check_weight, scheme_reason
    from ..core.factorize import SCHEMES

    where = f"plan for {np_.qualified_name}"
    if np_.scheme not in SCHEMES:
        raise UsageError(f"{where}: unknown scheme {np_.scheme!r} (one of {', '.join(SCHEMES)})")
    if not isinstance(np_.rank, int) or np_.rank < 1:
        raise UsageError(f"{where}: rewrite needs a rank ≥ 1, not {np_.rank!r}")
    if np_.lowering is not None and np_.lowering not in LOWERINGS:
        raise UsageError(f"{where}: unknown lowering {np_.lowering!r} (one of {', '.join(LOWERINGS)})")
    reason = check_weight(view, spec).reason
    if reason is None:
        reason = scheme_reason(spec.geometry(), np_.scheme)
    if reason is not None:
        raise UsageError(f"{where}: cannot rewrite with {np_.scheme} ({reason})")


def _surgery(source: onnx.ModelProto, realized, policy: Policy) -> onnx.ModelProto:
    """Replace each ``(spec, Lowered, NodeRewrite)`` of ``realized`` by its lowered chain."""
    import onnx_graphsurgeon as gs  # imported here: it is slow to import and only surgery needs it

    names = _Names(source)
    graph = gs.import_onnx(source)
    opset = next((o.version for o in source.opset_import if o.domain in ("", "ai.onnx")), 1)
    by_output = {}
    for node in _walk_gs(graph):
        if node.outputs:
            by_output[node.outputs[0].name] = node
    factor_cache: dict[tuple, list] = {}
    for spec, lowered, record in realized:
        node = by_output[spec.ref.node.output[0]]
        x, y = node.inputs[0], node.outputs[0]
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        auto_pad = spec.auto_pad if spec.auto_pad in ("SAME_UPPER", "SAME_LOWER") else None
        base = spec.ref.node.name or y.name
        owner = _owning_graph(graph, node)
        geo = spec.geometry()
        # Names: a single chain keeps sep_{i}, r summed chains sep_{b}_{i}; a head / tail shared by
        # all branches is sep_h{i} / sep_t{i}.  Every new node's name contains "/sep_".
        multi = len(lowered.branches) > 1
        head_tags = [f"h{i}" for i in range(len(lowered.head))]
        branch_tags = [[f"{b}_{i}" if multi else f"{i}" for i in range(len(branch))]
                       for b, branch in enumerate(lowered.branches)]
        tail_tags = [f"t{i}" for i in range(len(lowered.tail))]
        parts = list(zip(head_tags, lowered.head)) + [
            (t, s) for tags, branch in zip(branch_tags, lowered.branches) for t, s in zip(tags, branch)
        ] + list(zip(tail_tags, lowered.tail))
        key = (spec.w_name, record.scheme, record.rank, record.chained, lowered.kind,
               tuple((tag, s.kernel, s.group) for tag, s in parts))
        weights = factor_cache.get(key)
        if weights is None:
            weights = {tag: gs.Constant(names.fresh(f"{spec.w_name}/sep_{tag}_{s.role}"), s.weight) for tag, s in parts}
            factor_cache[key] = weights
        bias_stage = lowered.bias_stage()
        new_nodes = []

        def chain(stages: list[Stage], tags: list[str], current, final: bool):
            """Conv nodes for ``stages`` reading ``current``; the last writes ``y`` when ``final``."""
            for i, (stage, tag) in enumerate(zip(stages, tags)):
                out = y if final and i == len(stages) - 1 else gs.Variable(names.fresh(f"{y.name}/sep_{tag}"))
                attrs: dict[str, Any] = {"kernel_shape": list(stage.kernel), "group": stage.group}
                a = stage.attributes(geo)
                attrs["strides"] = a["strides"]
                attrs["dilations"] = a["dilations"]
                if auto_pad and stage.axes:
                    # The axes this stage leaves alone have kernel 1 and stride 1, so SAME pads 0 there
                    # and exactly the original pads on its own axes: auto_pad carries over verbatim.
                    attrs["auto_pad"] = auto_pad
                else:
                    attrs["pads"] = a["pads"]
                inputs = [current, weights[tag]] + ([bias] if stage is bias_stage and bias is not None else [])
                new_nodes.append(gs.Node("Conv", names.fresh(f"{base}/sep_{tag}_{stage.role}"), attrs, inputs, [out]))
                current = out
            return current

        current = chain(lowered.head, head_tags, x, False)
        if lowered.split:
            inputs = [gs.Variable(names.fresh(f"{y.name}/sep_split_{b}")) for b in range(len(lowered.branches))]
            attrs = {"axis": 1, **({"num_outputs": len(inputs)} if opset >= 18 else {})}  # equal slices
            new_nodes.append(gs.Node("Split", names.fresh(f"{base}/sep_split"), attrs, [current], inputs))
        else:
            inputs = [current] * len(lowered.branches)
        outs = [chain(branch, tags, inp, not multi and not lowered.tail)
                for branch, tags, inp in zip(lowered.branches, branch_tags, inputs)]
        if multi:
            joined = gs.Variable(names.fresh(f"{y.name}/sep_{lowered.join}")) if lowered.tail else y
            if lowered.join == "concat":
                new_nodes.append(gs.Node("Concat", names.fresh(f"{base}/sep_concat"), {"axis": 1}, outs, [joined]))
            else:
                # A chain of two-input Adds, not one Sum: onnxruntime fuses each Add into the conv
                # producing one of its inputs (NCHWc conv with a sum input, plus the activation on
                # the last), so the join costs no extra pass over memory.
                acc = outs[0]
                for k, branch_out in enumerate(outs[1:]):
                    last = k == len(outs) - 2
                    out = joined if last else gs.Variable(names.fresh(f"{y.name}/sep_sum"))
                    new_nodes.append(gs.Node("Add", names.fresh(f"{base}/sep_sum"), {}, [acc, branch_out], [out]))
                    acc = out
            outs = [joined]
        chain(lowered.tail, tail_tags, outs[0], True)
        node.outputs.clear()
        node.inputs.clear()
        owner.nodes.extend(new_nodes)
        record.new_nodes = [n.name for n in new_nodes]
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    _drop_shadowing_initializers(out.graph, set())
    out.ir_version = min(source.ir_version, ort_max_ir_version())
    if out.ir_version < 4:
        list_initializers_as_inputs(out.graph, source.graph.input)
    del out.opset_import[:]
    out.opset_import.extend(source.opset_import)
    for f in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(out, f, getattr(source, f))
    del out.metadata_props[:]
    history = []
    for p in source.metadata_props:
        if p.key == METADATA_KEY:
            try:
                history = json.loads(p.value).get("history", [])
            except (ValueError, AttributeError):
                history = []
            continue
        out.metadata_props.add(key=p.key, value=p.value)
    entry = {
        "sepify_version": __version__,
        "policy": policy.to_dict(),
        "nodes": [{"node": r.qualified_name, "scheme": r.scheme + ("+spatial" if r.chained else ""), "rank": r.rank,
                   "weight_error": r.weight_error, **({"lowering": r.lowering} if r.lowering else {})}
                  for _, _, r in realized],
    }
    out.metadata_props.add(key=METADATA_KEY, value=json.dumps({"history": [*history, entry]}, sort_keys=True))
    return out


def _drop_shadowing_initializers(graph: onnx.GraphProto, outer: set[str]) -> None:
    """graphsurgeon exports a constant read inside a subgraph as an initializer of that subgraph
    even when an enclosing graph already holds it; ONNX forbids such shadowing, and it would
    store the weight twice.  Keep the outermost copy only."""
    keep = [t for t in graph.initializer if t.name not in outer]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
    visible = outer | {t.name for t in graph.initializer}
    for node in graph.node:
        for a in node.attribute:
            for sub in ([a.g] if a.HasField("g") else list(a.graphs)):
                _drop_shadowing_initializers(sub, visible)


def _owning_graph(graph, target):
    import onnx_graphsurgeon as gs

    if any(n is target for n in graph.nodes):
        return graph
    for node in graph.nodes:
        for value in node.attrs.values():
            subs = [value] if isinstance(value, gs.Graph) else [v for v in value if isinstance(v, gs.Graph)] \
                if isinstance(value, (list, tuple)) else []
            for sub in subs:
                found = _owning_graph(sub, target)
                if found is not None:
                    return found
    return None  # type: ignore[return-value]


__all__ = ["NodeRewrite", "RewriteReport", "rewrite"]
