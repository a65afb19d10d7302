"""Conv → BatchNormalization folding (paddle2onnx exports are full of such pairs).

A conv whose output feeds only a ``BatchNormalization`` gets the BN folded into its weight before
factorizing, so errors are measured after the BN; the rewritten chain then replaces Conv + BN.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from ..model.graph import GraphView, attr, list_initializers_as_inputs
from ..model.names import NameGenerator
from ..model.walk import subgraph_reads


def fold_batchnorms(model: onnx.ModelProto, only: Iterable[str] | None = None) -> tuple[onnx.ModelProto, list[dict[str, str]]]:
    """Fold every ``Conv → BatchNormalization`` pair of the main graph whose BN is the conv output's
    only reader (and the conv output no graph output) into the conv: ``W' = W·s``,
    ``b' = (b − mean)·s + β`` with ``s = γ/√(var + ε)``, computed in float64.  The conv then writes
    the BN's output tensor and the BN node is gone.  ``only``: names of the convs to consider.

    Returns a new model (the input is not modified) and the folded ``{"conv", "bn"}`` pairs.
    """
    view = GraphView(model)
    graph_outputs = {o.name for o in model.graph.output}
    wanted = set(only) if only is not None else None
    pairs = []
    for ref in view.nodes:
        node = ref.node
        if ref.scope or node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        if wanted is not None and ref.qualified_name not in wanted:
            continue
        y = node.output[0]
        readers = view.consumers.get(y, [])
        if y in graph_outputs or len(readers) != 1:
            continue
        bn_ref = readers[0]
        bn = bn_ref.node
        if bn_ref.scope or bn.op_type != "BatchNormalization" or bn.input[0] != y or len(bn.input) != 5:
            continue
        if attr(bn, "training_mode", 0) or any(o for o in bn.output[1:]):
            continue
        consts = [view.constant(n, bn_ref) for n in bn.input[1:]]
        w = view.constant(node.input[1], ref)
        b = view.constant(node.input[2], ref) if len(node.input) > 2 and node.input[2] else None
        if any(c is None for c in consts) or w is None or (len(node.input) > 2 and node.input[2] and b is None):
            continue
        if w.value.dtype not in (np.float32, np.float16, np.float64) or w.value.ndim < 3:
            continue
        pairs.append((ref, bn_ref, w.value, None if b is None else b.value, [c.value for c in consts]))
    if not pairs:
        return model, []
    out = onnx.ModelProto()
    out.CopyFrom(model)
    names = NameGenerator(model)
    nodes = list(out.graph.node)
    drop = set()
    folded = []
    for ref, bn_ref, w, b, (gamma, beta, mean, var) in pairs:
        eps = float(attr(bn_ref.node, "epsilon", 1e-5))
        s = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
        w2 = w.astype(np.float64) * s.reshape(-1, *([1] * (w.ndim - 1)))
        b0 = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
        b2 = (b0 - mean.astype(np.float64)) * s + beta.astype(np.float64)
        conv = nodes[ref.index]
        wn = names.fresh(f"{conv.input[1]}/bnfold")
        bname = names.fresh(f"{conv.input[1]}/bnfold_bias")
        out.graph.initializer.extend([numpy_helper.from_array(w2.astype(w.dtype), wn),
                                      numpy_helper.from_array(b2.astype(w.dtype), bname)])
        while len(conv.input) < 3:
            conv.input.append("")
        conv.input[1], conv.input[2] = wn, bname
        conv.output[0] = bn_ref.node.output[0]
        drop.add(bn_ref.index)
        folded.append({"conv": ref.qualified_name, "bn": bn_ref.qualified_name})
    replaced = {name for ref, bn_ref, *_ in pairs for name in list(ref.node.input[1:3]) + list(bn_ref.node.input[1:])}
    del out.graph.node[:]
    out.graph.node.extend(n for i, n in enumerate(nodes) if i not in drop)
    # Initializers and Constant nodes nothing reads any more (the BN's parameters, replaced conv
    # weights) go.
    read = {i for n in out.graph.node for i in n.input} | {o.name for o in out.graph.output}
    for n in out.graph.node:
        read |= subgraph_reads(n)
    dead = [n for n in out.graph.node if n.op_type == "Constant" and n.output[0] in replaced and n.output[0] not in read]
    for n in dead:
        out.graph.node.remove(n)
    keep = [t for t in out.graph.initializer if t.name in read]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    vis = [v for v in out.graph.value_info if v.name != "" and v.name not in {p[0].node.output[0] for p in pairs}]
    del out.graph.value_info[:]
    out.graph.value_info.extend(vis)
    # Inputs that only listed a dropped initializer (IR 3 lists every initializer as an input) go;
    # real inputs stay even when unread, so the model's interface does not change.
    was_init = {t.name for t in model.graph.initializer}
    graph_inputs = [i for i in out.graph.input if i.name in read or i.name not in was_init]
    del out.graph.input[:]
    out.graph.input.extend(graph_inputs)
    if out.ir_version < 4:
        list_initializers_as_inputs(out.graph, model.graph.input)
    return out, folded


__all__ = ["fold_batchnorms"]
