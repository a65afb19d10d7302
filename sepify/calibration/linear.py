"""Linear layers (MatMul / Gemm with a constant weight) as the 1×1 convs calibration works on.

Calibration reads a conv's input patches and output channels (NCHW) from onnxruntime runs, and
replaces its weight and bias per run; a linear layer keeps its features last and has no bias
input.  :func:`as_convs` rewrites a *working copy* of the model so that each linear layer of the
main graph is such a conv, computing the same function:

``MatMul(A[d0, …, K], W)``  →  ``Reshape [d0, S, K]`` → ``Transpose [d0, K, S]`` → ``Conv`` (weight
``Wᵀ`` as ``[N, K, 1]``) → ``Transpose`` → ``Reshape [d0, …, N]`` — the first axis stays the sample
axis (a token sequence's positions become the conv's positions);

``Gemm(A, W, C)``  →  ``A'`` (``transA``) as ``[M, K, 1]`` (each row a sample) → ``Conv`` →
``Reshape [M, N]`` → ``· alpha`` → ``+ beta·C``.

The conv takes the linear node's name, so plans, layer profiles and reports address the layer as
the input model names it; the calibrated factors are written back into the input model as two
MatMuls or two Gemms (:func:`sepify.pipeline.emit.emit`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..model.cost import ConvSpec
from ..model.graph import attr
from ..model.names import NameGenerator


def _const(graph: onnx.GraphProto, names: NameGenerator, base: str, value: np.ndarray) -> str:
    """A new initializer of ``graph`` holding ``value``; its (fresh) name."""
    tensor = numpy_helper.from_array(np.asarray(value), names.fresh(base))
    graph.initializer.append(tensor)
    return tensor.name


def as_convs(model: onnx.ModelProto, specs: Sequence[ConvSpec], shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """A copy of ``model`` in which every main-graph linear layer of ``specs`` is a 1×1 conv (see the
    module doc); ``shapes``: the data operand's shape per linear node (qualified name)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    names = NameGenerator(out)
    by_output = {n.output[0]: i for i, n in enumerate(graph.node) if n.output}
    replacements: dict[int, list[onnx.NodeProto]] = {}
    for spec in specs:
        if spec.ref.scope or spec.ref.qualified_name not in shapes:
            continue  # inside an If/Loop body: its activations cannot be exposed (weight-only, as convs there)
        index = by_output.get(spec.ref.node.output[0])
        if index is None:
            continue
        node = graph.node[index]
        a_shape = list(shapes[spec.ref.qualified_name])
        y = node.output[0]
        k, n = spec.conv_weight.shape[1], spec.conv_weight.shape[0]
        base = spec.ref.name
        weight = _const(graph, names, f"{spec.w_name}/as_conv", spec.conv_weight)
        nodes: list[onnx.NodeProto] = []

        def tensor(tag: str) -> str:
            return names.fresh(f"{y}/as_conv_{tag}")

        if spec.linear == "Gemm":
            a = node.input[0]
            if int(attr(node, "transA", 0)):
                nodes.append(helper.make_node("Transpose", [a], [t := tensor("at")], names.fresh(f"{base}/as_conv_at"),
                                              perm=[1, 0]))
                a = t
            # -1 / 0 for the sample axis: calibration stacks several samples per run on it
            shape_in = _const(graph, names, f"{base}/as_conv_shape_in", np.array([-1, k, 1], np.int64))
            shape_out = _const(graph, names, f"{base}/as_conv_shape_out", np.array([-1, n], np.int64))
            nodes.append(helper.make_node("Reshape", [a, shape_in], [x := tensor("x")], names.fresh(f"{base}/as_conv_in")))
            nodes.append(helper.make_node("Conv", [x, weight], [c := tensor("conv")], base, kernel_shape=[1]))
            alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
            c_input = node.input[2] if len(node.input) > 2 and node.input[2] else None
            last = c_input is None and alpha == 1.0
            nodes.append(helper.make_node("Reshape", [c, shape_out], [r := (y if last else tensor("r"))],
                                          names.fresh(f"{base}/as_conv_out")))
            dtype = spec.conv_weight.dtype
            if alpha != 1.0:
                scale = _const(graph, names, f"{base}/as_conv_alpha", np.array(alpha, dtype))
                nodes.append(helper.make_node("Mul", [r, scale], [s := (y if c_input is None else tensor("s"))],
                                              names.fresh(f"{base}/as_conv_alpha")))
                r = s
            if c_input is not None:
                cb = c_input
                if beta != 1.0:
                    scale = _const(graph, names, f"{base}/as_conv_beta", np.array(beta, dtype))
                    nodes.append(helper.make_node("Mul", [c_input, scale], [cb := tensor("c")],
                                                  names.fresh(f"{base}/as_conv_beta")))
                nodes.append(helper.make_node("Add", [r, cb], [y], names.fresh(f"{base}/as_conv_c")))
        else:
            s = int(np.prod(a_shape[1:-1])) if len(a_shape) > 2 else 1
            shape_in = _const(graph, names, f"{base}/as_conv_shape_in", np.array([0, s, k], np.int64))
            shape_out = _const(graph, names, f"{base}/as_conv_shape_out", np.array([0, *a_shape[1:-1], n], np.int64))
            nodes += [
                helper.make_node("Reshape", [node.input[0], shape_in], [r := tensor("r")], names.fresh(f"{base}/as_conv_in")),
                helper.make_node("Transpose", [r], [x := tensor("x")], names.fresh(f"{base}/as_conv_t"), perm=[0, 2, 1]),
                helper.make_node("Conv", [x, weight], [c := tensor("conv")], base, kernel_shape=[1]),
                helper.make_node("Transpose", [c], [t := tensor("t")], names.fresh(f"{base}/as_conv_tb"), perm=[0, 2, 1]),
                helper.make_node("Reshape", [t, shape_out], [y], names.fresh(f"{base}/as_conv_out")),
            ]
        replacements[index] = nodes
    if not replacements:
        return out
    kept = []
    for i, node in enumerate(graph.node):
        kept.extend(replacements.get(i, [node]))
    del graph.node[:]
    graph.node.extend(kept)
    return out


__all__ = ["as_convs"]
