"""A read-only view of an ONNX model: nodes in every (sub)graph, producers,
consumers, constant values and static shapes.

Subgraph nodes (If/Loop/Scan bodies) get a qualified name
``<parent node>/<attribute>/<node>`` so a report can point at them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import onnx

from ..errors import ModelLoadError
from .load import tensor_array

CONV_OPS = ("Conv", "ConvTranspose", "ConvInteger", "QLinearConv")
MATMUL_OPS = ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul")

# Constant folding never materializes anything larger than this (memory-bomb guard).
MAX_FOLD_ELEMENTS = 1 << 28

# onnx's reference evaluator implements DequantizeLinear only from opset 19; versions 10 and 13
# (int8/uint8/int32, per-tensor or per-axis — what onnxruntime's quantizer writes) are a subset
# of 19's semantics, so such nodes are folded at 19.
_FOLD_OPSET_FLOOR = {"DequantizeLinear": 19}

_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def list_initializers_as_inputs(graph: onnx.GraphProto, original_inputs) -> None:
    """IR version 3 requires every initializer of the main graph to be a graph input as well (the
    ONNX checker enforces it).  Rebuild ``graph``'s input list after an edit that added or dropped
    initializers: the ``original_inputs`` in their order (those still inputs, or still initializers),
    then every initializer not listed yet."""
    current = {i.name: i for i in graph.input}
    inits = {t.name for t in graph.initializer}
    inputs: list[onnx.ValueInfoProto] = []
    for vi in original_inputs:
        if vi.name in current:
            inputs.append(current.pop(vi.name))
        elif vi.name in inits:
            inputs.append(vi)
    inputs.extend(current.values())
    listed = {vi.name for vi in inputs}
    inputs.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                  for t in graph.initializer if t.name not in listed)
    copies = [onnx.ValueInfoProto.FromString(vi.SerializeToString()) for vi in inputs]
    del graph.input[:]
    graph.input.extend(copies)


@dataclass(eq=False)
class NodeRef:
    node: onnx.NodeProto
    graph: onnx.GraphProto
    scope: str
    index: int
    parent: "NodeRef | None" = None

    @property
    def name(self) -> str:
        return self.node.name or f"{self.node.op_type}_{self.index}"

    @property
    def qualified_name(self) -> str:
        return f"{self.scope}/{self.name}" if self.scope else self.name

    @property
    def op_type(self) -> str:
        return self.node.op_type


@dataclass
class ConstantInfo:
    value: np.ndarray
    source: str  # "initializer" | "constant_node" | "constant_subgraph"
    via_dequantize: bool = False


@dataclass
class _Scope:
    graph: onnx.GraphProto
    parent: "_Scope | None"
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    graph_inputs: set[str] = field(default_factory=set)


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class GraphView:
    """Producers/consumers and constants over the main graph and all subgraphs."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.nodes: list[NodeRef] = []
        self.producer: dict[str, NodeRef] = {}
        self.consumers: dict[str, list[NodeRef]] = {}
        self._scope_of_graph: dict[int, _Scope] = {}
        self._node_scope: dict[int, _Scope] = {}
        self._const_cache: dict[tuple[int, str], ConstantInfo | None] = {}
        self.opset = next(
            (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), onnx.defs.onnx_opset_version()
        )
        self._walk(model.graph, scope="", parent_scope=None, parent_node=None)
        self._nx = None

    # -- construction -----------------------------------------------------------------
    def _walk(self, graph: onnx.GraphProto, scope: str, parent_scope: _Scope | None, parent_node: NodeRef | None) -> None:
        sc = _Scope(graph=graph, parent=parent_scope)
        sc.initializers = {t.name: t for t in graph.initializer}
        sc.graph_inputs = {i.name for i in graph.input if i.name not in sc.initializers}
        self._scope_of_graph[id(graph)] = sc
        for index, node in enumerate(graph.node):
            ref = NodeRef(node=node, graph=graph, scope=scope, index=index, parent=parent_node)
            self.nodes.append(ref)
            self._node_scope[id(node)] = sc
            for out in node.output:
                if out:
                    self.producer[out] = ref
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(ref)
            for a in node.attribute:
                subgraphs = [a.g] if a.HasField("g") else list(a.graphs)
                for sub in subgraphs:
                    self._walk(sub, f"{ref.qualified_name}/{a.name}", sc, ref)

    def scope_of(self, ref: NodeRef) -> _Scope:
        return self._node_scope[id(ref.node)]

    @property
    def main_inputs(self) -> list[onnx.ValueInfoProto]:
        inits = {t.name for t in self.model.graph.initializer}
        return [i for i in self.model.graph.input if i.name not in inits]

    def conv_nodes(self) -> list[NodeRef]:
        return [r for r in self.nodes if r.op_type in CONV_OPS and r.node.domain in ("", "ai.onnx")]

    def nx_graph(self):
        """Node-level dataflow graph (subgraph nodes included; outer-scope reads become edges)."""
        import networkx as nx  # only here: importing it costs more than auditing a small model

        if self._nx is None:
            g = nx.DiGraph()
            for i, ref in enumerate(self.nodes):
                g.add_node(i, ref=ref)
            index = {id(r.node): i for i, r in enumerate(self.nodes)}
            for i, ref in enumerate(self.nodes):
                for inp in ref.node.input:
                    prod = self.producer.get(inp)
                    if prod is not None:
                        g.add_edge(index[id(prod.node)], i, tensor=inp)
            self._nx = g
        return self._nx

    def topological_order(self) -> list[NodeRef]:
        import networkx as nx

        g = self.nx_graph()
        return [g.nodes[i]["ref"] for i in nx.topological_sort(g)]

    def shared_weights(self) -> dict[str, list[str]]:
        """Weight tensor name -> qualified names of the conv-like nodes reading it (only if more than one)."""
        readers: dict[str, list[str]] = {}
        for ref in self.conv_nodes():
            w_index = 3 if ref.op_type == "QLinearConv" else 1
            if len(ref.node.input) > w_index and ref.node.input[w_index]:
                readers.setdefault(ref.node.input[w_index], []).append(ref.qualified_name)
        return {k: v for k, v in readers.items() if len(v) > 1}

    # -- constants -------------------------------------------------------------------
    def _lookup_initializer(self, name: str, scope: _Scope | None) -> onnx.TensorProto | None:
        while scope is not None:
            if name in scope.initializers:
                return scope.initializers[name]
            if name in scope.graph_inputs:
                return None  # shadowed by a runtime input
            scope = scope.parent
        return None

    def is_graph_input(self, name: str, ref: NodeRef | None = None) -> bool:
        scope = self.scope_of(ref) if ref is not None else self._scope_of_graph[id(self.model.graph)]
        while scope is not None:
            if name in scope.graph_inputs:
                return True
            if name in scope.initializers:
                return False
            scope = scope.parent
        return False

    def constant(self, name: str, ref: NodeRef | None = None) -> ConstantInfo | None:
        """The constant value of a tensor as seen from ``ref``'s scope, or None if it depends on inputs."""
        scope = self.scope_of(ref) if ref is not None else self._scope_of_graph[id(self.model.graph)]
        key = (id(scope), name)
        if key not in self._const_cache:
            self._const_cache[key] = None  # breaks cycles in malformed graphs
            self._const_cache[key] = self._resolve_constant(name, scope)
        return self._const_cache[key]

    def _resolve_constant(self, name: str, scope: _Scope) -> ConstantInfo | None:
        init = self._lookup_initializer(name, scope)
        if init is not None:
            return ConstantInfo(tensor_array(init), "initializer")  # external data of a big model: mapped
        producer = self.producer.get(name)
        if producer is None:
            return None
        node = producer.node
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            return ConstantInfo(_constant_node_value(node), "constant_node")
        if node.op_type in _NONDETERMINISTIC or node.domain not in ("", "ai.onnx"):
            return None
        if any(a.HasField("g") or len(a.graphs) for a in node.attribute):
            return None
        inputs = []
        via_dq = node.op_type == "DequantizeLinear"
        node_scope = self.scope_of(producer)
        for inp in node.input:
            if not inp:
                inputs.append(None)
                continue
            info = self.constant(inp, producer)
            if info is None:
                return None
            via_dq = via_dq or info.via_dequantize
            inputs.append(info.value)
        del node_scope
        if node.op_type == "ConstantOfShape" and inputs and inputs[0] is not None:
            if int(np.prod(inputs[0])) > MAX_FOLD_ELEMENTS:
                return None
        try:
            from onnx.reference import ReferenceEvaluator

            opset = max(self.opset, _FOLD_OPSET_FLOOR.get(node.op_type, 0))
            evaluator = ReferenceEvaluator(_standalone(node, opset))
            feeds = {f"i{k}": v for k, v in enumerate(inputs) if v is not None}
            outputs = evaluator.run(None, feeds)
        except Exception:  # noqa: BLE001 - anything we cannot fold stays "not constant"
            return None
        value = outputs[list(node.output).index(name)]
        value = np.asarray(value)
        if value.size > MAX_FOLD_ELEMENTS:
            return None
        return ConstantInfo(value, "constant_subgraph", via_dequantize=via_dq)

    def weight_origin(self, name: str, ref: NodeRef) -> str:
        if self.is_graph_input(name, ref):
            return "graph_input"
        info = self.constant(name, ref)
        return info.source if info is not None else "computed"


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    for a in node.attribute:
        if a.name == "value":
            return tensor_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
        if a.name == "value_string":
            return np.array(a.s.decode())
        if a.name == "value_strings":
            return np.array([s.decode() for s in a.strings])
        if a.name == "sparse_value":
            from onnx import numpy_helper as nh

            sp = a.sparse_tensor
            if int(np.prod(list(sp.dims), dtype=np.float64)) > MAX_FOLD_ELEMENTS:
                raise ModelLoadError(f"Constant node {node.name!r}: sparse value of dims {list(sp.dims)} "
                                     "is too large to densify")
            values = nh.to_array(sp.values)
            dense = np.zeros(list(sp.dims), dtype=values.dtype).reshape(-1)
            idx = nh.to_array(sp.indices)
            if idx.ndim == 2:
                idx = np.ravel_multi_index(idx.T, list(sp.dims))
            dense[idx] = values
            return dense.reshape(list(sp.dims))
    raise ModelLoadError(f"Constant node {node.name!r} has no value")


def _standalone(node: onnx.NodeProto, opset: int) -> onnx.ModelProto:
    """One node wrapped in a model whose inputs are named i0, i1, … (for the reference evaluator)."""
    n = onnx.NodeProto()
    n.CopyFrom(node)
    del n.input[:]
    n.input.extend([f"i{k}" if name else "" for k, name in enumerate(node.input)])
    inputs = [onnx.helper.make_empty_tensor_value_info(f"i{k}") for k, name in enumerate(node.input) if name]
    outputs = [onnx.helper.make_empty_tensor_value_info(o) for o in node.output if o]
    graph = onnx.helper.make_graph([n], "fold", inputs, outputs)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    return model


def iter_subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("g"):
                yield a.g
                yield from iter_subgraphs(a.g)
            for sub in a.graphs:
                yield sub
                yield from iter_subgraphs(sub)
