"""The one walk over nested graphs (If/Loop/Scan bodies), for ONNX protos and graphsurgeon graphs.

Iterative, so that neither a deep graph nor deep nesting can exhaust Python's recursion limit.
"""

from __future__ import annotations

from typing import Iterator

import onnx


def node_subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs held by a node's attributes (If branches, Loop/Scan bodies)."""
    out: list[onnx.GraphProto] = []
    for a in node.attribute:
        if a.HasField("g"):
            out.append(a.g)
        out.extend(a.graphs)
    return out


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every graph nested in it, outer before inner (pre-order)."""
    stack = [graph]
    while stack:
        g = stack.pop()
        yield g
        subs = [sub for node in g.node for sub in node_subgraphs(node)]
        stack.extend(reversed(subs))


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Every tensor name read inside the node's subgraphs (outer-scope reads among them)."""
    names: set[str] = set()
    for sub in node_subgraphs(node):
        for g in iter_graphs(sub):
            for n in g.node:
                names.update(n.input)
    names.discard("")
    return names


def gs_subgraphs(node) -> list:
    """The graphsurgeon graphs held by a graphsurgeon node's attributes."""
    import onnx_graphsurgeon as gs

    out = []
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            out.append(value)
        elif isinstance(value, (list, tuple)):
            out.extend(v for v in value if isinstance(v, gs.Graph))
    return out


def iter_gs_graphs(graph) -> Iterator:
    """A graphsurgeon graph and every graph nested in it (pre-order)."""
    stack = [graph]
    while stack:
        g = stack.pop()
        yield g
        subs = [sub for node in g.nodes for sub in gs_subgraphs(node)]
        stack.extend(reversed(subs))


def prefix_model(model: onnx.ModelProto, names: list[str] | tuple[str, ...]) -> onnx.ModelProto | None:
    """The part of ``model`` that computes the main-graph tensors ``names``, with them as its only
    outputs: the producers of ``names`` and everything they read, transitively (subgraph reads
    included), with the initializers and inputs those nodes read.

    onnxruntime runs every node of a session whatever outputs a run asks for, so a pass that needs
    only early activations (a calibration wave near the input) costs the whole model unless it runs
    on this prefix.  None when a name is not a main-graph tensor (nothing is pruned then).
    """
    graph = model.graph
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    stored = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    inputs = {i.name for i in graph.input}
    if any(n not in producer and n not in inputs and n not in stored for n in names):
        return None
    keep: set[int] = set()
    read: set[str] = set()
    stack = list(names)
    while stack:  # iterative: a deep graph must not exhaust the recursion limit
        t = stack.pop()
        if t in read:
            continue
        read.add(t)
        i = producer.get(t)
        if i is None or i in keep:
            continue
        keep.add(i)
        node = graph.node[i]
        stack.extend(x for x in (*node.input, *subgraph_reads(node)) if x and x not in read)
    out = onnx.ModelProto()
    out.ir_version = model.ir_version
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    g = out.graph
    g.name = graph.name
    g.node.extend(n for i, n in enumerate(graph.node) if i in keep)
    g.initializer.extend(t for t in graph.initializer if t.name in read)
    g.sparse_initializer.extend(t for t in graph.sparse_initializer if t.values.name in read)
    g.input.extend(i for i in graph.input if i.name in read)
    typed = {v.name: v for v in (*graph.output, *graph.value_info)}
    for n in dict.fromkeys(names):
        if n in typed:
            g.output.add().CopyFrom(typed[n])
        else:
            g.output.add().name = n
    return out


__all__ = ["gs_subgraphs", "iter_graphs", "iter_gs_graphs", "node_subgraphs", "prefix_model", "subgraph_reads"]
