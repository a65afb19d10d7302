"""Fresh node and tensor names derived from existing ones, never colliding with any name in a model."""

from __future__ import annotations

import onnx

from .walk import iter_graphs


def used_names(model: onnx.ModelProto) -> set[str]:
    """Every node, tensor, initializer and input/output name in every (sub)graph."""
    used: set[str] = set()
    for g in iter_graphs(model.graph):
        for node in g.node:
            used.add(node.name)
            used.update(node.input)
            used.update(node.output)
            for a in node.attribute:
                if a.HasField("t"):
                    used.add(a.t.name)
        used.update(t.name for t in g.initializer)
        used.update(t.values.name for t in g.sparse_initializer)
        used.update(v.name for v in (*g.input, *g.output, *g.value_info))
    used.discard("")
    return used


class NameGenerator:
    """``fresh(base)``: ``base`` if unused, else ``base_2``, ``base_3``, …; every name handed out is taken."""

    def __init__(self, model: onnx.ModelProto | None = None, used: set[str] | None = None):
        self.used = set(used or ()) | (used_names(model) if model is not None else set())

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name


__all__ = ["NameGenerator", "used_names"]
