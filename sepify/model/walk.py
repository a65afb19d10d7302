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


__all__ = ["gs_subgraphs", "iter_graphs", "iter_gs_graphs", "node_subgraphs", "subgraph_reads"]
