"""A read-only view of an ONNX model: nodes in every (sub)graph, producers,
consumers, constant values and static shapes.

Subgraph nodes (If/Loop/Scan bodies) get a qualified name
``<parent node>/<attribute>/<node>`` so a report can point at them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..errors import ModelLoadError
from .inline import InlineWeights
from .load import tensor_array
from .walk import subgraph_reads

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
    label: str = ""  # the node's name, made unique in its graph by GraphView (see node_labels)

    @property
    def name(self) -> str:
        return self.label or self.node.name or f"{self.node.op_type}_{self.index}"

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


def node_labels(graph: onnx.GraphProto) -> list[str]:
    """A name per node of ``graph``, unique within it: the node's own name; an unnamed node
    ``<op_type>_<index>``; a name already taken (exporters and merged models repeat node names —
    the ONNX checker allows it) gets ``_2``, ``_3``, … (never another node's name).  Reports, plans
    and calibration address nodes by these."""
    real = {n.name for n in graph.node if n.name}
    taken: set[str] = set()
    labels = []
    for index, node in enumerate(graph.node):
        base = node.name or f"{node.op_type}_{index}"
        label, k = base, 1
        while label in taken or (label != node.name and label in real):
            k += 1
            label = f"{base}_{k}"
        taken.add(label)
        labels.append(label)
    return labels


class GraphView:
    """Producers/consumers and constants over the main graph and all subgraphs."""

    def __init__(self, model: onnx.ModelProto, inline: InlineWeights | None = None):
        self.model = model
        # the main graph's initializers as views of the file's bytes (sepify.model.inline)
        self.inline = inline
        self.nodes: list[NodeRef] = []
        self.producer: dict[str, NodeRef] = {}
        self.consumers: dict[str, list[NodeRef]] = {}
        self._scope_of_graph: dict[int, _Scope] = {}
        self._node_scope: dict[int, _Scope] = {}
        self._const_cache: dict[tuple[int, str], ConstantInfo | None] = {}
        self.opset = next(
            (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), onnx.defs.onnx_opset_version()
        )
        self._ordered: list[NodeRef] = []
        self._walk(model.graph, scope="", parent_scope=None, parent_node=None)
        self._main_initializers = self._scope_of_graph[id(model.graph)].initializers
        self.nodes = _preorder(self._ordered)
        del self._ordered
        self._nx = None

    # -- construction -----------------------------------------------------------------
    def _walk(self, graph: onnx.GraphProto, scope: str, parent_scope: _Scope | None, parent_node: NodeRef | None) -> None:
        """Index every node: a subgraph's nodes follow the node holding it (depth first), iteratively."""
        pending: list[tuple] = [(graph, scope, parent_scope, parent_node)]
        while pending:
            g, sc_name, outer, parent = pending.pop()
            sc = _Scope(graph=g, parent=outer)
            sc.initializers = {t.name: t for t in g.initializer}
            sc.graph_inputs = {i.name for i in g.input if i.name not in sc.initializers}
            self._scope_of_graph[id(g)] = sc
            nested: list[tuple] = []
            for index, (node, label) in enumerate(zip(g.node, node_labels(g))):
                ref = NodeRef(node=node, graph=g, scope=sc_name, index=index, parent=parent, label=label)
                self._ordered.append(ref)
                self._node_scope[id(node)] = sc
                for out in node.output:
                    if out:
                        self.producer[out] = ref
                for inp in node.input:
                    if inp:
                        self.consumers.setdefault(inp, []).append(ref)
                for a in node.attribute:
                    for sub in ([a.g] if a.HasField("g") else list(a.graphs)):
                        nested.append((sub, f"{ref.qualified_name}/{a.name}", sc, ref))
            pending.extend(reversed(nested))

    def scope_of(self, ref: NodeRef) -> _Scope:
        return self._node_scope[id(ref.node)]

    @property
    def main_inputs(self) -> list[onnx.ValueInfoProto]:
        inits = {t.name for t in self.model.graph.initializer}
        return [i for i in self.model.graph.input if i.name not in inits]

    def conv_nodes(self) -> list[NodeRef]:
        return [r for r in self.nodes if r.op_type in CONV_OPS and r.node.domain in ("", "ai.onnx")]

    def dataflow(self):
        """The main graph's node-level dataflow (networkx DiGraph on main-graph node indices): an edge
        u → v when node v reads a tensor node u writes, directly or inside one of its subgraphs
        (an If/Loop body reading an outer tensor makes the If/Loop node depend on its producer)."""
        import networkx as nx  # only here: importing it costs more than auditing a small model

        if self._nx is None:
            nodes = list(self.model.graph.node)
            producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
            g = nx.DiGraph()
            g.add_nodes_from(range(len(nodes)))
            for i, n in enumerate(nodes):
                for t in {*n.input, *subgraph_reads(n)}:
                    u = producer.get(t)
                    if u is not None and u != i:
                        g.add_edge(u, i)
            self._nx = g
        return self._nx

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

    def stored_dims(self, name: str, ref: NodeRef) -> tuple[list[int], int] | None:
        """``(dims, element type)`` of a tensor stored in the model as seen from ``ref`` — an initializer
        or a Constant node's value — read from the proto without materializing it; else None."""
        init = self._lookup_initializer(name, self.scope_of(ref))
        if init is not None:
            return list(init.dims), init.data_type
        producer = self.producer.get(name)
        if producer is not None and producer.op_type == "Constant" and producer.node.domain in ("", "ai.onnx"):
            for a in producer.node.attribute:
                if a.name == "value" and a.HasField("t"):
                    return list(a.t.dims), a.t.data_type
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
        """The constant value of a tensor as seen from ``ref``'s scope, or None if it depends on inputs.

        Folding follows producers back to initializers and Constant nodes with an explicit stack (a
        chain of thousands of nodes needs no recursion); a cycle in a malformed graph is "not constant".
        """
        scope = self.scope_of(ref) if ref is not None else self._scope_of_graph[id(self.model.graph)]
        key = (id(scope), name)
        cache = self._const_cache
        if key in cache and cache[key] is not _PENDING:
            return cache[key]
        stack: list[tuple[str, _Scope]] = [(name, scope)]
        while stack:
            n, sc = stack[-1]
            k = (id(sc), n)
            state = cache.get(k, _MISSING)
            if state is not _MISSING and state is not _PENDING:
                stack.pop()
                continue
            step = self._fold_step(n, sc)
            if not isinstance(step, list):  # decided without other constants
                cache[k] = step
                stack.pop()
                continue
            deps = [d for d in step if d is not None]
            if state is _MISSING:
                cache[k] = _PENDING
                todo = [d for d in deps if cache.get((id(d[1]), d[0]), _MISSING) is _MISSING]
                if todo:
                    stack.extend(reversed(todo))
                    continue
            # Every input is decided now (or pending further up the stack: a cycle, not constant).
            values = [None if d is None else cache.get((id(d[1]), d[0])) for d in step]
            cache[k] = self._fold(n, sc, step, [None if v is _PENDING else v for v in values])
            stack.pop()
        return cache[key]

    def _fold_step(self, name: str, scope: _Scope):
        """A tensor's value when it needs no other constant (ConstantInfo or None), else the
        (input name, scope) of every input of its producer (None for an empty input)."""
        init = self._lookup_initializer(name, scope)
        if init is not None:
            if self.inline is not None and self._main_initializers.get(name) is init:
                value = self.inline.array(init)
                if value is not None:
                    return ConstantInfo(value, "initializer")
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
        node_scope = self.scope_of(producer)
        return [(inp, node_scope) if inp else None for inp in node.input]

    def _fold(self, name: str, scope: _Scope, deps, values) -> ConstantInfo | None:
        """Evaluate the producer of ``name`` on its constant inputs (``values``, None for empty inputs)."""
        node = self.producer[name].node
        inputs = []
        via_dq = node.op_type == "DequantizeLinear"
        for dep, info in zip(deps, values):
            if dep is None:
                inputs.append(None)
                continue
            if info is None:
                return None
            via_dq = via_dq or info.via_dequantize
            inputs.append(info.value)
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
        value = np.asarray(outputs[list(node.output).index(name)])
        if value.size > MAX_FOLD_ELEMENTS:
            return None
        return ConstantInfo(value, "constant_subgraph", via_dequantize=via_dq)

    def weight_origin(self, name: str, ref: NodeRef) -> str:
        if self.is_graph_input(name, ref):
            return "graph_input"
        info = self.constant(name, ref)
        return info.source if info is not None else "computed"


_PENDING = object()  # a constant being folded (on the stack)
_MISSING = object()


def _preorder(entries: list[NodeRef]) -> list[NodeRef]:
    """Node refs in the order a recursive walk gives: each node, then its subgraphs' nodes (``entries``
    come from the iterative walk, graph by graph, a node's subgraphs in attribute order)."""
    by_parent: dict[int, list[NodeRef]] = {}
    top: list[NodeRef] = []
    for ref in entries:
        (by_parent.setdefault(id(ref.parent), []) if ref.parent is not None else top).append(ref)
    out: list[NodeRef] = []
    stack = list(reversed(top))
    while stack:
        ref = stack.pop()
        out.append(ref)
        stack.extend(reversed(by_parent.get(id(ref), [])))
    return out


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
