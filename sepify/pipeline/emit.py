"""The one emitter: Realizations in, a valid ModelProto out (onnx-graphsurgeon).

For each :class:`~sepify.core.realization.Realization` the new chain reads the conv's input and
its last node writes the replaced node's output tensor (the conv's, or the absorbed
BatchNormalization's), so consumers and graph outputs are untouched.  Then the graph is cleaned
up once: replaced nodes and the weights nothing else reads disappear, weights shared with other
nodes stay, factors of one weight realized alike are stored once.  The IR version is clamped to
what the installed onnxruntime loads, the opset and producer fields are kept, and the history in
``metadata_props["sepify"]`` gains one entry.

Names: a single chain's nodes are ``<conv>/sep_{i}_{role}``, r summed chains ``<conv>/sep_{b}_{i}_{role}``,
a head / tail shared by all branches ``sep_h{i}`` / ``sep_t{i}``: every new node's name contains
``/sep_`` (``sepify verify --per-layer`` and ``sepify bench`` find them by it).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
from typing import Any, Sequence

import onnx

from ..core.realization import Realization
from ..core.stages import Stage
from ..model.graph import list_initializers_as_inputs
from ..model.load import ort_max_ir_version
from ..model.names import NameGenerator
from ..model.walk import iter_gs_graphs, node_subgraphs
from ..serialize import json_default
from ..version import __version__

METADATA_KEY = "sepify"


def _digest(stages: Sequence[Stage], bias) -> str:
    h = hashlib.sha1()
    for s in stages:
        w = s.weight
        h.update(repr((s.out_channels, s.in_per_group, s.group, s.kernel, s.axes, s.role, w.dtype.str, w.shape)).encode())
        h.update(w.tobytes())
    if bias is not None:
        h.update(bias.tobytes())
    return h.hexdigest()


def history_entry(policy: dict[str, Any], realizations: Sequence[Realization], **extra) -> dict[str, Any]:
    """What one rewrite adds to ``metadata_props["sepify"]``."""
    entry: dict[str, Any] = {
        "sepify_version": __version__,
        "policy": policy,
        "nodes": [{"node": r.node, "scheme": r.label, "rank": r.rank, "weight_error": r.weight_error,
                   "lowering": r.lowering} for r in realizations],
    }
    entry.update({k: v for k, v in extra.items() if v is not None})
    return entry


def emit(source: onnx.ModelProto, realizations: Sequence[Realization], entry: dict[str, Any]) -> tuple[onnx.ModelProto, dict[str, list[str]]]:
    """``source`` with every Realization's nodes replaced by its chain, and ``entry`` appended to the
    sepify history.  Returns the new model and, per realized node, the names of its new nodes."""
    import onnx_graphsurgeon as gs  # imported here: it is slow to import and only emitting needs it

    names = NameGenerator(source)
    graph = gs.import_onnx(source)
    opset = next((o.version for o in source.opset_import if o.domain in ("", "ai.onnx")), 1)
    by_output: dict[str, Any] = {}
    owner: dict[int, Any] = {}
    for g in iter_gs_graphs(graph):
        for node in g.nodes:
            owner[id(node)] = g
            if node.outputs:
                by_output[node.outputs[0].name] = node
    factor_cache: dict[tuple, dict] = {}
    new_names: dict[str, list[str]] = {}
    for rz in realizations:
        replaced = [by_output[t] for t in rz.replaces]
        conv = replaced[0]
        x, y = conv.inputs[0], replaced[-1].outputs[0]

        def install(nodes: list) -> None:
            """The chain's nodes in place of the replaced ones (detached; cleanup drops them)."""
            for node in replaced:
                node.outputs.clear()
                node.inputs.clear()
            owner[id(conv)].nodes.extend(nodes)
            new_names[rz.node] = [n.name for n in nodes]

        if rz.linear:
            install(_linear_chain(rz, conv, x, y, names))
            continue
        own_bias = conv.inputs[2] if len(conv.inputs) > 2 and conv.inputs[2].name else None
        auto_pad = rz.auto_pad if rz.auto_pad in ("SAME_UPPER", "SAME_LOWER") else None
        base = conv.name or y.name
        geo = rz.geometry
        lowered = rz.lowered
        multi = len(lowered.branches) > 1
        head_tags = [f"h{i}" for i in range(len(lowered.head))]
        branch_tags = [[f"{b}_{i}" if multi else f"{i}" for i in range(len(branch))]
                       for b, branch in enumerate(lowered.branches)]
        tail_tags = [f"t{i}" for i in range(len(lowered.tail))]
        parts = list(zip(head_tags, lowered.head)) + [
            (t, s) for tags, branch in zip(branch_tags, lowered.branches) for t, s in zip(tags, branch)
        ] + list(zip(tail_tags, lowered.tail))
        key = (rz.weight_name, lowered.kind, tuple(tag for tag, _ in parts),
               _digest([s for _, s in parts], rz.bias))
        weights = factor_cache.get(key)
        if weights is None:
            weights = {tag: gs.Constant(names.fresh(f"{rz.weight_name}/sep_{tag}_{s.role}"), s.weight) for tag, s in parts}
            if rz.bias is not None:
                weights["bias"] = gs.Constant(names.fresh(f"{rz.weight_name}/sep_bias"), rz.bias)
            factor_cache[key] = weights
        bias = weights.get("bias", own_bias)
        bias_stage = lowered.bias_stage()
        nodes: list = []

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
                nodes.append(gs.Node("Conv", names.fresh(f"{base}/sep_{tag}_{stage.role}"), attrs, inputs, [out]))
                current = out
            return current

        current = chain(lowered.head, head_tags, x, False)
        if lowered.split:
            inputs = [gs.Variable(names.fresh(f"{y.name}/sep_split_{b}")) for b in range(len(lowered.branches))]
            attrs = {"axis": 1, **({"num_outputs": len(inputs)} if opset >= 18 else {})}  # equal slices
            nodes.append(gs.Node("Split", names.fresh(f"{base}/sep_split"), attrs, [current], inputs))
        else:
            inputs = [current] * len(lowered.branches)
        outs = [chain(branch, tags, inp, not multi and not lowered.tail)
                for branch, tags, inp in zip(lowered.branches, branch_tags, inputs)]
        if multi:
            joined = gs.Variable(names.fresh(f"{y.name}/sep_{lowered.join}")) if lowered.tail else y
            if lowered.join == "concat":
                nodes.append(gs.Node("Concat", names.fresh(f"{base}/sep_concat"), {"axis": 1}, outs, [joined]))
            else:
                # A chain of two-input Adds, not one Sum: onnxruntime fuses each Add into the conv
                # producing one of its inputs (NCHWc conv with a sum input, plus the activation on
                # the last), so the join costs no extra pass over memory.
                acc = outs[0]
                for k, branch_out in enumerate(outs[1:]):
                    last = k == len(outs) - 2
                    out = joined if last else gs.Variable(names.fresh(f"{y.name}/sep_sum"))
                    nodes.append(gs.Node("Add", names.fresh(f"{base}/sep_sum"), {}, [acc, branch_out], [out]))
                    acc = out
            outs = [joined]
        chain(lowered.tail, tail_tags, outs[0], True)
        install(nodes)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    _drop_shadowing_initializers(out.graph)
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
    out.metadata_props.add(key=METADATA_KEY, value=json.dumps({"history": [*history, entry]}, sort_keys=True,
                                                              default=json_default))
    return out, new_names


def _linear_chain(rz: Realization, node, x, y, names: NameGenerator) -> list:
    """A linear layer's two stages as two nodes of its own op: ``MatMul(A, U)`` then ``MatMul(T, V)``;
    ``Gemm(A, U, transA)`` then ``Gemm(T, V, C, alpha, beta)``, where the 1×1 stages hold ``Uᵀ``
    (``[R, K, 1]``) and ``Vᵀ`` (``[N, R, 1]``) — so ``alpha·A'·U·V + beta·C = alpha·A'·B' + beta·C``."""
    import onnx_graphsurgeon as gs

    first, second = rz.stages
    base = node.name or y.name
    u = gs.Constant(names.fresh(f"{rz.weight_name}/sep_0_{first.role}"),
                    np.ascontiguousarray(first.weight[:, :, 0].T))  # [K, R]
    v = gs.Constant(names.fresh(f"{rz.weight_name}/sep_1_{second.role}"),
                    np.ascontiguousarray(second.weight[:, :, 0].T))  # [R, N]
    mid = gs.Variable(names.fresh(f"{y.name}/sep_0"))
    # A calibrated chain's fitted bias b (the second stage approximates A'·B by T·V + b) follows as an Add:
    # alpha·b for a Gemm, whose second stage scales T·V by alpha.
    out = y if rz.bias is None else gs.Variable(names.fresh(f"{y.name}/sep_1"))
    if rz.linear == "Gemm":
        trans_a = int(node.attrs.get("transA", 0))
        c = [node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2].name else []
        keep = {k: node.attrs[k] for k in ("alpha", "beta") if k in node.attrs}
        nodes = [gs.Node("Gemm", names.fresh(f"{base}/sep_0_{first.role}"), {"transA": trans_a}, [x, u], [mid]),
                 gs.Node("Gemm", names.fresh(f"{base}/sep_1_{second.role}"), keep, [mid, v, *c], [out])]
        scale = float(node.attrs.get("alpha", 1.0))
    else:
        nodes = [gs.Node("MatMul", names.fresh(f"{base}/sep_0_{first.role}"), {}, [x, u], [mid]),
                 gs.Node("MatMul", names.fresh(f"{base}/sep_1_{second.role}"), {}, [mid, v], [out])]
        scale = 1.0
    if rz.bias is not None:
        b = gs.Constant(names.fresh(f"{rz.weight_name}/sep_bias"), (scale * np.asarray(rz.bias)).astype(rz.bias.dtype))
        nodes.append(gs.Node("Add", names.fresh(f"{base}/sep_bias"), {}, [out, b], [y]))
    return nodes


def _drop_shadowing_initializers(graph: onnx.GraphProto) -> None:
    """graphsurgeon exports a constant read inside a subgraph as an initializer of that subgraph
    even when an enclosing graph already holds it; ONNX forbids such shadowing, and it would
    store the weight twice.  Keep the outermost copy only."""
    stack: list[tuple[onnx.GraphProto, frozenset[str]]] = [(graph, frozenset())]
    while stack:
        g, outer = stack.pop()
        keep = [t for t in g.initializer if t.name not in outer]
        if len(keep) != len(g.initializer):
            del g.initializer[:]
            g.initializer.extend(keep)
        visible = outer | {t.name for t in g.initializer}
        for node in g.node:
            stack.extend((sub, visible) for sub in node_subgraphs(node))


__all__ = ["METADATA_KEY", "emit", "history_entry"]
