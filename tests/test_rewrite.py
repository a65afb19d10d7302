"""sepify.pipeline.rewrite: exact constructions rewritten losslessly, lossy policies, graph plumbing.

Every "exact" weight is built in float64 as an exact low-rank product for the scheme under
test and cast to float32 once.  The rewritten model must then reproduce the ORIGINAL model's
onnxruntime outputs to float32 noise, cost fewer MACs (checked against hand arithmetic and
against the shapes onnxruntime actually produces for the new Conv nodes), keep the graph's
input/output names, pass the full ONNX checker and load in onnxruntime.

The helpers at the top are shared with test_rewrite_properties.py and test_cli_rewrite.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import sepify
from sepify import Policy

OPSET = 17
IR_VERSION = 10


# ==============================================================================================
# Helpers (shared)
# ==============================================================================================
def vi(name: str, shape, elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, None if shape is None else list(shape))


def make_model(nodes, inputs, outputs, initializers=(), *, opset: int = OPSET, name: str = "g",
               extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets],
                              producer_name="sepify-rewrite-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def resolve_pads(in_spatial, kernel, strides, dilations, pads=None, auto_pad="NOTSET") -> list[int]:
    """ONNX pads [b..., e...] with auto_pad resolved (written independently of sepify)."""
    d = len(kernel)
    if auto_pad in ("NOTSET", None, ""):
        return list(pads) if pads is not None else [0] * (2 * d)
    if auto_pad == "VALID":
        return [0] * (2 * d)
    b, e = [], []
    for i in range(d):
        eff = (kernel[i] - 1) * dilations[i] + 1
        out = math.ceil(in_spatial[i] / strides[i])
        total = max(0, (out - 1) * strides[i] + eff - in_spatial[i])
        lo, hi = total // 2, total - total // 2
        b.append(lo if auto_pad == "SAME_UPPER" else hi)
        e.append(hi if auto_pad == "SAME_UPPER" else lo)
    return b + e


def conv_out_spatial(in_spatial, kernel, strides, dilations, pads) -> list[int]:
    d = len(kernel)
    return [(in_spatial[i] + pads[i] + pads[d + i] - ((kernel[i] - 1) * dilations[i] + 1)) // strides[i] + 1
            for i in range(d)]


@dataclass
class ConvGeo:
    """Plain geometry of one Conv, for hand MAC counts."""

    batch: int
    c_in: int
    c_out: int
    group: int
    kernel: tuple
    in_spatial: tuple
    strides: tuple
    dilations: tuple
    pads: tuple  # resolved

    @classmethod
    def of(cls, x_shape, w_shape, *, group=1, strides=None, dilations=None, pads=None, auto_pad="NOTSET"):
        kernel = tuple(w_shape[2:])
        d = len(kernel)
        strides = tuple(strides or [1] * d)
        dilations = tuple(dilations or [1] * d)
        in_sp = tuple(x_shape[2:])
        p = tuple(resolve_pads(in_sp, kernel, strides, dilations, pads, auto_pad))
        return cls(x_shape[0], x_shape[1], w_shape[0], group, kernel, in_sp, strides, dilations, p)

    @property
    def out_spatial(self) -> list[int]:
        return conv_out_spatial(self.in_spatial, self.kernel, self.strides, self.dilations, self.pads)

    @property
    def macs(self) -> int:
        return self.batch * math.prod(self.out_spatial) * self.c_out * (self.c_in // self.group) * math.prod(self.kernel)

    def axis_out(self, i: int) -> int:
        return self.out_spatial[i]


def spatial_order_macs(geo: ConvGeo, rank: int) -> tuple[int, int]:
    """(vertical-first, horizontal-first) MACs of a rank-``rank`` spatial split, by hand.

    The first stage keeps the other axis at input resolution (kernel 1, stride 1, no pad there).
    Per-kernel (Cg = 1): C_out·r mid channels, 1 input per group, then C_out with r inputs.
    Cross-channel: g·r mid channels with Cg inputs per group, then C_out with r inputs.
    """
    (kh, kw), (h_in, w_in) = geo.kernel, geo.in_spatial
    h_out, w_out = geo.out_spatial
    cg = geo.c_in // geo.group
    if cg == 1:
        mid, first_in = geo.c_out * rank, 1
    else:
        mid, first_in = geo.group * rank, cg
    b, n = geo.batch, geo.c_out
    v = b * (h_out * w_in * mid * first_in * kh + h_out * w_out * n * rank * kw)
    h = b * (h_in * w_out * mid * first_in * kw + h_out * w_out * n * rank * kh)
    return v, h


def lowrank_weight(kind: str, rank: int, c_in: int, c_out: int, group: int, kernel: Sequence[int],
                   seed: int = 0, vertical_first: bool = True) -> np.ndarray:
    """A float64 weight [c_out, c_in/group, *kernel] that is exactly rank ``rank`` for ``kind``.

    dw-pw: per input channel the [Ng, K] matrix; pw-dw: per output channel the [Cg, K] matrix;
    spatial-kernel (Cg == 1): every kh×kw kernel; spatial-cross: per group the cross-channel
    matrix M[(c,i),(n,j)] (vertical first) or M[(c,j),(n,i)] (horizontal first).
    """
    rng = np.random.default_rng(seed)
    cg, ng = c_in // group, c_out // group
    kernel = tuple(kernel)
    k = math.prod(kernel)
    if kind == "dw-pw":
        a = rng.standard_normal((c_in, ng, rank))
        b = rng.standard_normal((c_in, rank, k))
        m = np.einsum("cnr,crk->cnk", a, b)  # [C, Ng, K]
        return m.reshape(group, cg, ng, k).transpose(0, 2, 1, 3).reshape(c_out, cg, *kernel)
    if kind == "pw-dw":
        a = rng.standard_normal((c_out, cg, rank))
        b = rng.standard_normal((c_out, rank, k))
        return np.einsum("ncr,nrk->nck", a, b).reshape(c_out, cg, *kernel)
    if kind == "spatial-kernel":
        assert cg == 1
        kh, kw = kernel
        a = rng.standard_normal((c_out, kh, rank))
        b = rng.standard_normal((c_out, rank, kw))
        return np.einsum("nir,nrj->nij", a, b).reshape(c_out, 1, kh, kw)
    if kind == "spatial-cross":
        kh, kw = kernel
        if vertical_first:
            a = rng.standard_normal((group, cg, kh, rank))
            b = rng.standard_normal((group, rank, ng, kw))
            w = np.einsum("qcit,qtnj->qncij", a, b)
        else:
            a = rng.standard_normal((group, cg, kw, rank))
            b = rng.standard_normal((group, rank, ng, kh))
            w = np.einsum("qcjt,qtni->qncij", a, b)
        return w.reshape(c_out, cg, kh, kw)
    raise ValueError(kind)


def conv_model(x_shape, w: np.ndarray, *, bias: np.ndarray | None = None, weight: str = "initializer",
               node_name: str = "conv", dtype=np.float32, w_name: str = "w", **attrs) -> onnx.ModelProto:
    """``y = Conv(x, w[, b])`` with fully declared shapes (output computed by hand)."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    w = np.asarray(w).astype(dtype)
    g = ConvGeo.of(x_shape, w.shape, group=attrs.get("group", 1), strides=attrs.get("strides"),
                   dilations=attrs.get("dilations"), pads=attrs.get("pads"), auto_pad=attrs.get("auto_pad", "NOTSET"))
    y_shape = [x_shape[0], w.shape[0], *g.out_spatial]
    inputs, inits, nodes = [vi("x", x_shape, elem)], [], []
    if weight == "initializer":
        inits.append(numpy_helper.from_array(w, w_name))
    elif weight == "constant":
        nodes.append(helper.make_node("Constant", [], [w_name], name="weight_const",
                                      value=numpy_helper.from_array(w, w_name + "_value")))
    elif weight == "input":
        inputs.append(vi(w_name, list(w.shape), elem))
    else:
        raise ValueError(weight)
    conv_in = ["x", w_name]
    if bias is not None:
        inits.append(numpy_helper.from_array(np.asarray(bias).astype(dtype), "b"))
        conv_in.append("b")
    attrs.setdefault("kernel_shape", list(w.shape[2:]))
    nodes.append(helper.make_node("Conv", conv_in, ["y"], name=node_name, **attrs))
    return make_model(nodes, inputs, [vi("y", y_shape, elem)], inits)


def session(model: onnx.ModelProto | str | Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    src = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def random_feeds(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        dims = [d.dim_value for d in tt.shape.dim]
        dt = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if dt == np.bool_:
            feeds[inp.name] = np.array(True)
        elif np.issubdtype(dt, np.floating):
            feeds[inp.name] = rng.standard_normal(dims).astype(dt)
        else:
            feeds[inp.name] = rng.integers(0, 255, size=dims).astype(dt)
    return feeds


def run(model, feeds) -> list[np.ndarray]:
    return session(model).run(None, feeds)


def assert_matches(ref: Sequence[np.ndarray], new: Sequence[np.ndarray], rel: float = 1e-5) -> None:
    assert len(ref) == len(new)
    for a, b in zip(ref, new):
        assert a.shape == b.shape and a.dtype == b.dtype
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        scale = max(float(np.abs(a64).max()), 1e-30)
        diff = float(np.abs(a64 - b64).max())
        assert diff <= rel * scale, f"max |diff| {diff:.3e} > {rel:g} x max|y| {scale:.3e}"


def io_names(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    return [i.name for i in model.graph.input], [o.name for o in model.graph.output]


def conv_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    return [n for n in graph.node if n.op_type == "Conv"]


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def expected_node_counts(r, lowering: str = "branches") -> tuple[int, int]:
    """(Conv nodes, Add/Sum nodes) that one rewritten node becomes.

    Unchained chains have 2 stages and chained ones 3.  Under the default ``branches`` lowering a
    rank-r > 1 dw-pw / pw-dw chain is written as r rank-1 chains summed by a chain of r − 1 Adds.
    """
    if lowering == "branches" and not r.chained and r.scheme in ("dw-pw", "pw-dw") and r.rank > 1:
        return 2 * r.rank, r.rank - 1
    return (3 if r.chained else 2), 0


def all_nodes(graph: onnx.GraphProto):
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(a.g)
            for g in a.graphs:
                yield from all_nodes(g)


def graph_conv_macs(model: onnx.ModelProto, feeds) -> int:
    """MACs of every main-graph Conv from the shapes onnxruntime produces (prod(y)·w.shape[1]·prod(k))."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    existing = {o.name for o in copy.graph.output}
    convs = conv_nodes(model.graph)
    for n in convs:
        if n.output[0] not in existing:
            copy.graph.output.add().name = n.output[0]
            existing.add(n.output[0])
    sess = session(copy)
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(names, feeds)))
    total = 0
    for n in convs:
        w = inits[n.input[1]]
        total += int(np.prod(values[n.output[0]].shape)) * w.shape[1] * int(np.prod(w.shape[2:]))
    return total


def check_lossless(model: onnx.ModelProto, out: onnx.ModelProto, report, *, rel: float = 1e-5, feeds=None,
                   expect_macs_before: int | None = None) -> None:
    """The common contract of an exact rewrite."""
    assert report.changed and report.rewritten
    assert out is not model
    onnx.checker.check_model(out, full_check=True)
    assert out.ir_version <= 10
    assert io_names(out) == io_names(model)
    feeds = feeds if feeds is not None else random_feeds(model)
    assert_matches(run(model, feeds), run(out, feeds), rel)
    for r in report.rewritten:
        assert r.macs_after < r.macs_before
    assert report.conv_macs_after < report.conv_macs_before
    assert report.conv_macs_before - report.conv_macs_after == sum(r.macs_before - r.macs_after for r in report.rewritten)
    if expect_macs_before is not None:
        assert report.conv_macs_before == expect_macs_before
    names = {n.name for n in all_nodes(out.graph)}
    for r in report.rewritten:
        assert r.new_nodes and set(r.new_nodes) <= names
        assert r.name not in names  # the original node is gone


# ==============================================================================================
# 1. Exact constructions, one Conv, parametrized geometry
# ==============================================================================================
@dataclass
class Case:
    id: str
    kind: str  # dw-pw | pw-dw | spatial-kernel | spatial-cross
    rank: int
    c_in: int
    c_out: int
    spatial: tuple
    kernel: tuple
    group: int = 1
    batch: int = 1
    bias: bool = False
    attrs: dict = field(default_factory=dict)

    @property
    def scheme(self) -> str:
        return "spatial" if self.kind.startswith("spatial") else self.kind

    def geo(self) -> ConvGeo:
        return ConvGeo.of([self.batch, self.c_in, *self.spatial], [self.c_out, self.c_in // self.group, *self.kernel],
                          group=self.group, strides=self.attrs.get("strides"), dilations=self.attrs.get("dilations"),
                          pads=self.attrs.get("pads"), auto_pad=self.attrs.get("auto_pad", "NOTSET"))


P1 = dict(pads=[1, 1, 1, 1])
CASES = [
    # --- every scheme at rank 1 and 2 ---
    Case("dwpw_r1", "dw-pw", 1, 8, 16, (12, 12), (3, 3), attrs=P1),
    Case("dwpw_r2", "dw-pw", 2, 8, 16, (12, 12), (3, 3), attrs=P1),
    Case("pwdw_r1", "pw-dw", 1, 16, 8, (12, 12), (3, 3), attrs=P1),
    Case("pwdw_r2", "pw-dw", 2, 16, 8, (12, 12), (3, 3), attrs=P1),
    Case("spatial_dw_r1", "spatial-kernel", 1, 8, 8, (12, 12), (3, 3), group=8, attrs=P1),
    Case("spatial_dw_5x5_r2", "spatial-kernel", 2, 4, 4, (12, 12), (5, 5), group=4, attrs=dict(pads=[2, 2, 2, 2])),
    Case("spatial_dw_mult2_r1", "spatial-kernel", 1, 4, 8, (10, 10), (3, 5), group=4, attrs=dict(pads=[1, 2, 1, 2])),
    Case("spatial_cross_r1", "spatial-cross", 1, 8, 8, (12, 12), (3, 3), attrs=P1),
    Case("spatial_cross_r2", "spatial-cross", 2, 8, 8, (12, 12), (3, 3), attrs=P1),
    # --- strides ---
    Case("dwpw_s2", "dw-pw", 1, 8, 16, (13, 13), (3, 3), attrs=dict(strides=[2, 2], pads=[1, 1, 1, 1])),
    Case("pwdw_s2", "pw-dw", 1, 16, 8, (13, 13), (3, 3), attrs=dict(strides=[2, 2], pads=[1, 1, 1, 1])),
    Case("dwpw_s_2x3", "dw-pw", 2, 8, 16, (13, 14), (3, 3), attrs=dict(strides=[2, 3])),
    Case("spatial_dw_s2", "spatial-kernel", 1, 8, 8, (13, 13), (5, 5), group=8,
         attrs=dict(strides=[2, 2], pads=[2, 2, 2, 2])),
    Case("spatial_cross_s2", "spatial-cross", 1, 8, 8, (13, 13), (3, 3), attrs=dict(strides=[2, 2], pads=P1["pads"])),
    # --- asymmetric pads (ONNX layout [h_begin, w_begin, h_end, w_end]) ---
    Case("dwpw_asym", "dw-pw", 1, 8, 16, (11, 12), (3, 3), attrs=dict(pads=[0, 2, 1, 0])),
    Case("pwdw_asym", "pw-dw", 2, 16, 8, (11, 12), (3, 3), attrs=dict(pads=[2, 0, 0, 1], strides=[2, 1])),
    Case("spatial_dw_asym", "spatial-kernel", 1, 8, 8, (11, 12), (3, 3), group=8, attrs=dict(pads=[0, 1, 2, 1])),
    Case("spatial_cross_asym_s", "spatial-cross", 1, 8, 8, (11, 12), (3, 3),
         attrs=dict(pads=[1, 0, 1, 0], strides=[2, 2])),
    Case("spatial_cross_asym", "spatial-cross", 2, 8, 8, (11, 12), (3, 3), attrs=dict(pads=[2, 0, 0, 1])),
    # --- auto_pad with odd input sizes and strides ---
    # (a strided depthwise 3×3 split does not pay for itself — see test_strided_depthwise_split_no_saving —
    # so the per-kernel spatial cases use 5×5)
    *[Case(f"{kind.replace('-', '')}_{ap.lower()}", kind, 1, ci, co, (11, 13), k, group=g,
           attrs=dict(auto_pad=ap, strides=[2, 2]))
      for ap in ("SAME_UPPER", "SAME_LOWER", "VALID")
      for kind, ci, co, g, k in (("dw-pw", 8, 16, 1, (3, 3)), ("pw-dw", 16, 8, 1, (3, 3)),
                                 ("spatial-kernel", 8, 8, 8, (5, 5)), ("spatial-cross", 8, 8, 1, (3, 3)))],
    Case("dwpw_same_upper_k4_s3", "dw-pw", 1, 8, 16, (13, 11), (4, 4), attrs=dict(auto_pad="SAME_UPPER", strides=[3, 2])),
    Case("pwdw_same_lower_k4", "pw-dw", 1, 16, 8, (13, 11), (4, 2), attrs=dict(auto_pad="SAME_LOWER")),
    # --- dilations ---
    Case("dwpw_dil2", "dw-pw", 1, 8, 16, (13, 13), (3, 3), attrs=dict(dilations=[2, 2], pads=[2, 2, 2, 2])),
    Case("pwdw_dil_2x1", "pw-dw", 1, 16, 8, (13, 13), (3, 3), attrs=dict(dilations=[2, 1], pads=[1, 0, 2, 1])),
    Case("spatial_dw_dil", "spatial-kernel", 1, 8, 8, (13, 13), (3, 3), group=8,
         attrs=dict(dilations=[3, 2], pads=[3, 2, 3, 2])),
    Case("spatial_cross_dil_s", "spatial-cross", 1, 8, 8, (15, 15), (3, 3),
         attrs=dict(dilations=[2, 1], strides=[1, 2], pads=[0, 1, 0, 1])),
    # --- groups ---
    Case("dwpw_g2_r1", "dw-pw", 1, 8, 16, (10, 10), (3, 3), group=2, attrs=P1),
    Case("dwpw_g4_r2", "dw-pw", 2, 16, 32, (10, 10), (3, 3), group=4, attrs=P1),
    Case("pwdw_g2_r2", "pw-dw", 2, 16, 8, (10, 10), (3, 3), group=2, attrs=P1),
    Case("pwdw_g4_r1", "pw-dw", 1, 32, 16, (10, 10), (3, 3), group=4, attrs=P1),
    Case("spatial_cross_g2_r1", "spatial-cross", 1, 8, 8, (10, 10), (3, 3), group=2, attrs=P1),
    Case("spatial_cross_g4_r2", "spatial-cross", 2, 16, 16, (10, 10), (3, 3), group=4, attrs=P1),
    # --- 1-D and 3-D ---
    Case("dwpw_1d", "dw-pw", 1, 8, 16, (31,), (5,), attrs=dict(strides=[2], pads=[1, 2])),
    Case("pwdw_1d", "pw-dw", 2, 16, 8, (31,), (5,), attrs=dict(pads=[2, 2], dilations=[2])),
    Case("dwpw_3d", "dw-pw", 1, 8, 16, (6, 7, 8), (3, 3, 3), attrs=dict(pads=[1, 1, 1, 1, 1, 1])),
    Case("pwdw_3d", "pw-dw", 1, 16, 8, (6, 7, 8), (3, 3, 3), attrs=dict(strides=[1, 2, 2], pads=[0, 1, 1, 1, 0, 1])),
    Case("dwpw_3d_same", "dw-pw", 2, 8, 16, (5, 7, 9), (3, 3, 3), attrs=dict(auto_pad="SAME_UPPER", strides=[2, 2, 2])),
    # --- bias and batch 2 ---
    Case("dwpw_bias_b2", "dw-pw", 1, 8, 16, (12, 12), (3, 3), batch=2, bias=True, attrs=P1),
    Case("pwdw_bias_b2", "pw-dw", 2, 16, 8, (12, 12), (3, 3), batch=2, bias=True, attrs=dict(pads=[1, 0, 0, 1])),
    Case("pwdw_bias_b2_s2", "pw-dw", 1, 32, 8, (12, 12), (3, 3), batch=2, bias=True,
         attrs=dict(strides=[2, 2], pads=[1, 1, 1, 1])),
    Case("spatial_dw_bias_b2", "spatial-kernel", 1, 8, 8, (12, 12), (3, 3), group=8, batch=2, bias=True, attrs=P1),
    Case("spatial_cross_bias_b2", "spatial-cross", 2, 8, 8, (12, 12), (3, 3), batch=2, bias=True, attrs=P1),
]


def build_case(case: Case, seed: int = 0, weight: str = "initializer") -> onnx.ModelProto:
    geo = case.geo()
    vfirst = True
    if case.kind == "spatial-cross":
        v, h = spatial_order_macs(geo, case.rank)
        vfirst = v <= h
    w = lowrank_weight(case.kind, case.rank, case.c_in, case.c_out, case.group, case.kernel, seed, vfirst)
    bias = np.random.default_rng(seed + 100).standard_normal(case.c_out) if case.bias else None
    attrs = dict(case.attrs)
    if case.group != 1:
        attrs["group"] = case.group
    return conv_model([case.batch, case.c_in, *case.spatial], w.astype(np.float32), bias=bias, weight=weight, **attrs)


def expected_macs_after(case: Case) -> int | None:
    """Hand MACs of the chain sepify should build for ``case`` (None: not spelled out)."""
    g = case.geo()
    b, r = g.batch, case.rank
    cg = case.c_in // case.group
    k = math.prod(case.kernel)
    out = math.prod(g.out_spatial)
    if case.kind == "dw-pw":  # depthwise (C·r outputs, K each) at output res, then pointwise Cg·r → N
        return b * out * (case.c_in * r * k + case.c_out * cg * r)
    if case.kind == "pw-dw":  # pointwise at INPUT res (C_out·r outputs, Cg each), then grouped kernel r → 1
        return b * (math.prod(g.in_spatial) * case.c_out * r * cg + out * case.c_out * r * k)
    return min(spatial_order_macs(g, r))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_exact_construction_rewritten_losslessly(case: Case):
    model = build_case(case)
    out, report = sepify.rewrite(model)
    geo = case.geo()
    check_lossless(model, out, report, expect_macs_before=geo.macs)
    (r,) = report.rewritten
    assert r.qualified_name == "conv"
    assert (r.scheme, r.rank) == (case.scheme, case.rank)
    assert not r.chained
    assert r.weight_error <= 2.4e-7
    assert r.macs_before == geo.macs
    assert r.macs_after == expected_macs_after(case)
    # The report's MACs are those of the graph onnxruntime actually runs.
    feeds = random_feeds(model)
    assert graph_conv_macs(out, feeds) == r.macs_after
    assert graph_conv_macs(model, feeds) == r.macs_before
    n_conv, n_sum = expected_node_counts(r)
    assert len(conv_nodes(out.graph)) == n_conv
    assert sum(n.op_type in ("Add", "Sum") for n in out.graph.node) == n_sum
    assert len(out.graph.node) == n_conv + n_sum
    assert "conv" not in [n.name for n in out.graph.node]
    assert report.kept == []


RANK2_CASES = [c for c in CASES if c.rank > 1 and c.kind in ("dw-pw", "pw-dw")]


@pytest.mark.parametrize("case", RANK2_CASES, ids=[c.id for c in RANK2_CASES])
def test_exact_rank2_grouped_lowering(case: Case):
    """``lowering="grouped"``: one multiplier-r depthwise / r-input grouped conv instead of r summed branches."""
    model = build_case(case)
    out, report = sepify.rewrite(model, lowering="grouped")
    check_lossless(model, out, report, expect_macs_before=case.geo().macs)
    (r,) = report.rewritten
    assert (r.scheme, r.rank) == (case.scheme, case.rank)
    assert r.macs_after == expected_macs_after(case)
    assert graph_conv_macs(out, random_feeds(model)) == r.macs_after
    assert [n.op_type for n in out.graph.node] == ["Conv", "Conv"]
    # both lowerings: same MACs, same math
    out_b, report_b = sepify.rewrite(model)
    assert report_b.rewritten[0].macs_after == r.macs_after
    feeds = random_feeds(model, seed=5)
    assert_matches(run(out, feeds), run(out_b, feeds))


def test_unknown_lowering_refused():
    with pytest.raises(sepify.SepifyError):
        sepify.rewrite(sobel_model(), lowering="bogus")


def test_rewritten_chain_structure_dw_pw_rank2():
    """dw-pw r=2: depthwise C→2C (group C) with the original geometry, then pointwise 2C→N (+bias)."""
    case = Case("s", "dw-pw", 2, 8, 16, (13, 13), (3, 3), bias=True, attrs=dict(strides=[2, 1], pads=[0, 1, 2, 1]))
    out, report = sepify.rewrite(build_case(case), lowering="grouped")
    dw, pw = conv_nodes(out.graph)
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert dw.input[0] == "x" and pw.output[0] == "y" and pw.input[0] == dw.output[0]
    assert inits[dw.input[1]].shape == (16, 1, 3, 3) and attr(dw, "group") == 8
    assert attr(dw, "strides") == [2, 1] and attr(dw, "pads") == [0, 1, 2, 1]
    assert inits[pw.input[1]].shape == (16, 16, 1, 1) and attr(pw, "group", 1) == 1
    assert attr(pw, "strides", [1, 1]) == [1, 1] and attr(pw, "pads", [0] * 4) == [0] * 4
    assert len(dw.input) == 2 and pw.input[2] == "b"
    assert "w" not in inits  # the original weight is gone


def test_rewritten_chain_structure_dw_pw_rank2_branches():
    """Default lowering of dw-pw r=2: two multiplier-1 chains (depthwise C→C, pointwise C→N) summed by Add;
    the bias goes to exactly one branch."""
    case = Case("s", "dw-pw", 2, 8, 16, (13, 13), (3, 3), bias=True, attrs=dict(strides=[2, 1], pads=[0, 1, 2, 1]))
    model = build_case(case)
    out, report = sepify.rewrite(model)
    check_lossless(model, out, report)
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    convs = conv_nodes(out.graph)
    assert len(convs) == 4
    (add,) = [n for n in out.graph.node if n.op_type == "Add"]
    assert add.output[0] == "y"
    dws = [n for n in convs if n.input[0] == "x"]
    pws = [n for n in convs if n.input[0] != "x"]
    assert len(dws) == len(pws) == 2
    for dw in dws:
        assert inits[dw.input[1]].shape == (8, 1, 3, 3) and attr(dw, "group") == 8
        assert attr(dw, "strides") == [2, 1] and attr(dw, "pads") == [0, 1, 2, 1]
    for pw in pws:
        assert inits[pw.input[1]].shape == (16, 8, 1, 1) and attr(pw, "group", 1) == 1
        assert pw.output[0] in add.input
    assert sorted(len(pw.input) for pw in pws) == [2, 3]
    assert [pw.input[2] for pw in pws if len(pw.input) == 3] == ["b"]


def test_rewritten_chain_structure_pw_dw_grouped():
    """pw-dw r=2, g=2: pointwise C→2N (group 2) at input resolution, then N groups of 2 with the geometry."""
    case = Case("s", "pw-dw", 2, 16, 8, (9, 9), (3, 3), group=2, attrs=dict(strides=[2, 2], dilations=[1, 2], pads=[1, 2, 1, 2]))
    out, _ = sepify.rewrite(build_case(case), lowering="grouped")
    pw, kc = conv_nodes(out.graph)
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert inits[pw.input[1]].shape == (16, 8, 1, 1) and attr(pw, "group") == 2
    assert inits[kc.input[1]].shape == (8, 2, 3, 3) and attr(kc, "group") == 8
    assert attr(kc, "strides") == [2, 2] and attr(kc, "dilations") == [1, 2] and attr(kc, "pads") == [1, 2, 1, 2]


# ==============================================================================================
# 2. Weight sources, sharing, subgraphs, dtypes
# ==============================================================================================
def test_weight_from_constant_node():
    case = Case("c", "dw-pw", 1, 8, 16, (12, 12), (3, 3), bias=True, attrs=P1)
    model = build_case(case, weight="constant")
    assert model.graph.node[0].op_type == "Constant"
    out, report = sepify.rewrite(model)
    check_lossless(model, out, report)
    assert [r.scheme for r in report.rewritten] == ["dw-pw"]
    # the Constant that fed only the old conv is gone
    assert [n.op_type for n in out.graph.node] == ["Conv", "Conv"]


def _shared_weight_model(second_attrs: dict | None = None) -> onnx.ModelProto:
    """Two convs (names conv_a, conv_b) read the same exact dw-pw weight ``w``."""
    w = lowrank_weight("dw-pw", 1, 8, 16, 1, (3, 3), seed=3).astype(np.float32)
    second_attrs = second_attrs or dict(pads=[1, 1, 1, 1])
    ga = ConvGeo.of([1, 8, 12, 12], w.shape, pads=[1, 1, 1, 1])
    gb = ConvGeo.of([1, 8, 12, 12], w.shape, strides=second_attrs.get("strides"), pads=second_attrs.get("pads"))
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["ya"], name="conv_a", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "w"], ["yb"], name="conv_b", kernel_shape=[3, 3], **second_attrs),
    ]
    return make_model(nodes, [vi("x", [1, 8, 12, 12])],
                      [vi("ya", [1, 16, *ga.out_spatial]), vi("yb", [1, 16, *gb.out_spatial])],
                      [numpy_helper.from_array(w, "w")])


@pytest.mark.parametrize("second_attrs", [None, dict(strides=[2, 2], pads=[0, 1, 1, 0])], ids=["same_geo", "other_geo"])
def test_shared_weight_both_rewritten(second_attrs):
    model = _shared_weight_model(second_attrs)
    out, report = sepify.rewrite(model)
    check_lossless(model, out, report)
    assert sorted(r.qualified_name for r in report.rewritten) == ["conv_a", "conv_b"]
    assert all(r.scheme == "dw-pw" and r.rank == 1 for r in report.rewritten)
    names = {t.name for t in out.graph.initializer}
    assert "w" not in names
    assert len(conv_nodes(out.graph)) == 4
    # the factors are computed once and shared by both chains
    assert len(names) == 2
    weights_used = [n.input[1] for n in conv_nodes(out.graph)]
    assert len(set(weights_used)) == 2


def test_shared_weight_one_excluded_keeps_original_weight():
    model = _shared_weight_model()
    out, report = sepify.rewrite(model, Policy(exclude="conv_b"))
    check_lossless(model, out, report)
    assert [r.qualified_name for r in report.rewritten] == ["conv_a"]
    assert {"name": "conv_b", "reason": "not_selected"} in report.kept
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    np.testing.assert_array_equal(inits["w"], numpy_helper.to_array(model.graph.initializer[0]))
    (conv_b,) = [n for n in out.graph.node if n.name == "conv_b"]
    assert list(conv_b.input) == ["x", "w"]
    assert len(conv_nodes(out.graph)) == 3


def _if_model() -> onnx.ModelProto:
    """``y = If(cond) then Conv(x, w_then) else Conv(x, w_else)``; both weights outer-scope initializers."""
    w_then = lowrank_weight("dw-pw", 1, 8, 16, 1, (3, 3), seed=5).astype(np.float32)
    w_else = lowrank_weight("pw-dw", 1, 8, 16, 1, (3, 3), seed=6).astype(np.float32)
    then_g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w_then"], ["y_then"], name="conv_then", kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
        "then_body", [], [vi("y_then", [1, 16, 12, 12])])
    else_g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w_else", "b_else"], ["y_else"], name="conv_else", kernel_shape=[3, 3],
                          pads=[1, 1, 1, 1])],
        "else_body", [], [vi("y_else", [1, 16, 12, 12])])
    node = helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)
    b = np.random.default_rng(7).standard_normal(16).astype(np.float32)
    return make_model([node], [vi("cond", [], TensorProto.BOOL), vi("x", [1, 8, 12, 12])], [vi("y", [1, 16, 12, 12])],
                      [numpy_helper.from_array(w_then, "w_then"), numpy_helper.from_array(w_else, "w_else"),
                       numpy_helper.from_array(b, "b_else")])


def test_conv_inside_if_branches():
    model = _if_model()
    out, report = sepify.rewrite(model)
    onnx.checker.check_model(out, full_check=True)
    assert io_names(out) == io_names(model)
    got = {r.qualified_name.split("/")[-1]: r for r in report.rewritten}
    assert set(got) == {"conv_then", "conv_else"}
    assert got["conv_then"].scheme == "dw-pw" and got["conv_else"].scheme == "pw-dw"
    assert all("branch" in r.qualified_name for r in report.rewritten)
    (if_node,) = out.graph.node
    for a in if_node.attribute:
        assert [n.op_type for n in a.g.node].count("Conv") == 2
    x = np.random.default_rng(2).standard_normal((1, 8, 12, 12)).astype(np.float32)
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": x}
        assert_matches(run(model, feeds), run(out, feeds))


FP16_CASES = [
    Case("dwpw", "dw-pw", 1, 8, 16, (12, 12), (3, 3), batch=2, bias=True, attrs=P1),
    Case("pwdw_r2", "pw-dw", 2, 16, 8, (12, 12), (3, 3), batch=2, bias=True, attrs=dict(pads=[0, 1, 2, 1])),
    Case("spatial_dw", "spatial-kernel", 1, 8, 8, (12, 12), (5, 5), group=8, bias=True,
         attrs=dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    Case("spatial_cross_g2", "spatial-cross", 2, 8, 8, (12, 12), (3, 3), group=2, attrs=P1),
]


def test_if_branch_nodes_selected_by_qualified_name():
    model = _if_model()
    out, report = sepify.rewrite(model, Policy(include="then_branch/"))
    assert [r.qualified_name for r in report.rewritten] == ["branch/then_branch/conv_then"]
    assert [k["reason"] for k in report.kept] == ["not_selected"]
    x = np.random.default_rng(8).standard_normal((1, 8, 12, 12)).astype(np.float32)
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": x}
        assert_matches(run(model, feeds), run(out, feeds))


def test_if_branch_excluded_conv_keeps_outer_weight():
    model = _if_model()
    out, report = sepify.rewrite(model, Policy(exclude="conv_else"))
    assert [r.qualified_name.split("/")[-1] for r in report.rewritten] == ["conv_then"]
    onnx.checker.check_model(out, full_check=True)
    x = np.random.default_rng(3).standard_normal((1, 8, 12, 12)).astype(np.float32)
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": x}
        assert_matches(run(model, feeds), run(out, feeds))
    else_conv = [n for n in all_nodes(out.graph) if n.name == "conv_else"]
    assert len(else_conv) == 1 and else_conv[0].input[1] == "w_else"


def _shared_across_scopes_model() -> onnx.ModelProto:
    """``w`` (exact dw-pw) read by a main-graph conv and by a conv inside an If branch."""
    w = lowrank_weight("dw-pw", 1, 8, 16, 1, (3, 3), seed=3).astype(np.float32)
    then_g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["t"], name="conv_then", kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
        "then_body", [], [vi("t", [1, 16, 12, 12])])
    else_g = helper.make_graph([helper.make_node("Identity", ["ya"], ["e"], name="pass")], "else_body", [],
                               [vi("e", [1, 16, 12, 12])])
    nodes = [helper.make_node("Conv", ["x", "w"], ["ya"], name="conv_main", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    return make_model(nodes, [vi("cond", [], TensorProto.BOOL), vi("x", [1, 8, 12, 12])],
                      [vi("y", [1, 16, 12, 12]), vi("ya", [1, 16, 12, 12])], [numpy_helper.from_array(w, "w")])


def test_weight_shared_by_main_graph_and_branch_outputs():
    model = _shared_across_scopes_model()
    out, report = sepify.rewrite(model)
    assert sorted(r.qualified_name for r in report.rewritten) == ["branch/then_branch/conv_then", "conv_main"]
    onnx.checker.check_model(out, full_check=True)
    x = np.random.default_rng(4).standard_normal((1, 8, 12, 12)).astype(np.float32)
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": x}
        assert_matches(run(model, feeds), run(out, feeds))


def _defined_names(graph: onnx.GraphProto) -> list[str]:
    """Values a graph itself defines: inputs, initializers, node outputs."""
    names = [i.name for i in graph.input] + [t.name for t in graph.initializer]
    return names + [o for n in graph.node for o in n.output if o]


def _shadowed(graph: onnx.GraphProto, outer: frozenset = frozenset()) -> list[str]:
    here = set(_defined_names(graph))
    bad = sorted(here & outer)
    for n in graph.node:
        for a in n.attribute:
            subs = ([a.g] if a.type == onnx.AttributeProto.GRAPH else []) + list(a.graphs)
            for g in subs:
                bad += _shadowed(g, frozenset(outer | here))
    return bad


def test_weight_shared_by_main_graph_and_branch_no_shadowing():
    """ONNX names are SSA across nested graphs: a subgraph may read an outer value but must not define
    a value of the same name (the checker's own comment: "we do not allow shadowing").  The shared
    factors must be defined once, in the outer graph, and read from the branch."""
    model = _shared_across_scopes_model()
    assert _shadowed(model.graph) == []
    out, _ = sepify.rewrite(model)
    assert _shadowed(out.graph) == []
    total = sum(len(t.raw_data) for g in [out.graph, *[a.g for a in out.graph.node[-1].attribute]]
                for t in g.initializer)
    one_copy = sum(len(t.raw_data) for t in out.graph.initializer)
    assert total == one_copy


def test_unnamed_nodes_and_name_collisions():
    """Unnamed convs get Conv_<index> names; fresh names never collide with existing ones."""
    w = lowrank_weight("dw-pw", 1, 8, 8, 1, (3, 3), seed=16).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["y/sep_0"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["y/sep_0"], ["w/sep_0_depthwise"], name="conv/sep_0_depthwise"),
        helper.make_node("Conv", ["w/sep_0_depthwise", "w"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    model = make_model(nodes, [vi("x", [1, 8, 12, 12])], [vi("y", [1, 8, 12, 12])], [numpy_helper.from_array(w, "w")])
    out, report = sepify.rewrite(model)
    check_lossless(model, out, report)
    assert sorted(r.qualified_name for r in report.rewritten) == ["Conv_0", "conv"]
    node_names = [n.name for n in out.graph.node if n.name]
    assert len(node_names) == len(set(node_names))
    values = _defined_names(out.graph)
    assert len(values) == len(set(values))
    relu = [n for n in out.graph.node if n.op_type == "Relu"]
    assert relu[0].name == "conv/sep_0_depthwise" and list(relu[0].output) == ["w/sep_0_depthwise"]


def test_dynamic_batch_sample_with_input_shapes():
    path = Path(__file__).resolve().parent.parent / "sample_models" / "dynamic_batch.onnx"
    model = onnx.load(str(path))
    out, report = sepify.rewrite(path, input_shapes={"x": [4, 3, 32, 32]})
    assert sorted((r.qualified_name, r.scheme, r.rank) for r in report.rewritten) == [
        ("down/conv", "pw-dw", 1), ("mid/conv", "dw-pw", 1)]
    assert report.kept == [{"name": "stem/conv", "reason": "no_exact_saving"}]
    # MACs scale with the given batch: mid/conv 16→16 3×3 at 32×32 (pads 1)
    mid = {r.qualified_name: r for r in report.rewritten}["mid/conv"]
    assert mid.macs_before == 4 * 32 * 32 * 16 * 16 * 9
    # the symbolic batch dim survives and the model runs at any batch
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [n.op_type for n in out.graph.node].count("Constant") == 0
    onnx.checker.check_model(out, full_check=True)
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        assert_matches(run(model, {"x": x}), run(out, {"x": x}))


@pytest.mark.parametrize("edit", ["bogus_scheme", "spatial_on_3d", "rewrite_dynamic_weight", "rank_zero"])
def test_invalid_plan_edits_raise_sepify_error(edit):
    """An edited Plan that cannot be realized is a usage error (SepifyError), not a crash."""
    if edit == "rewrite_dynamic_weight":
        model = conv_model([1, 8, 12, 12], lowrank_weight("dw-pw", 1, 8, 16, 1, (3, 3)), weight="input",
                           pads=[1, 1, 1, 1])
    elif edit == "spatial_on_3d":
        model = build_case(Case("c", "dw-pw", 1, 8, 16, (6, 7, 8), (3, 3, 3), attrs=dict(pads=[1] * 6)))
    else:
        model = sobel_model()
    p = sepify.plan(model)
    node = p.nodes[0]
    if edit == "bogus_scheme":
        node.scheme = "bogus"
    elif edit == "spatial_on_3d":
        node.scheme = "spatial"
    elif edit == "rank_zero":
        node.rank = 0
    else:
        node.action, node.scheme, node.rank = "rewrite", "dw-pw", 1
    with pytest.raises(sepify.SepifyError):
        sepify.rewrite(model, p)


@pytest.mark.parametrize("case", FP16_CASES, ids=[c.id for c in FP16_CASES])
def test_fp16_model(case):
    f32 = build_case(case)
    w64 = numpy_helper.to_array(f32.graph.initializer[0]).astype(np.float64)
    bias = np.random.default_rng(10).standard_normal(case.c_out) if case.bias else None
    attrs = dict(case.attrs, **({"group": case.group} if case.group > 1 else {}))
    model = conv_model([case.batch, case.c_in, *case.spatial], w64, bias=bias, dtype=np.float16, **attrs)
    out, report = sepify.rewrite(model)
    assert report.changed
    (r,) = report.rewritten
    assert (r.scheme, r.rank) == (case.scheme, case.rank)
    assert r.weight_error <= 2.0e-3  # float16 exactness: 2·eps16
    onnx.checker.check_model(out, full_check=True)
    assert all(t.data_type == TensorProto.FLOAT16 for t in out.graph.initializer)
    feeds = random_feeds(model)
    assert feeds["x"].dtype == np.float16
    (ref,), (new,) = run(model, feeds), run(out, feeds)
    assert new.dtype == np.float16
    scale = float(np.abs(ref.astype(np.float32)).max())
    assert float(np.abs(ref.astype(np.float32) - new.astype(np.float32)).max()) <= 1e-2 * scale


def _ir3_conv_bn_model() -> onnx.ModelProto:
    """IR version 3 (opset 8), as old exporters wrote it: every initializer is also a graph input."""
    w = lowrank_weight("dw-pw", 1, 4, 6, 1, (3, 3), seed=30).astype(np.float32)
    rng = np.random.default_rng(31)
    params = {"w": w, "b": rng.standard_normal(6), "gamma": rng.uniform(0.5, 2, 6), "beta": rng.standard_normal(6),
              "mean": rng.standard_normal(6), "var": rng.uniform(0.5, 2, 6)}
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in params.items()]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["h"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["h", "gamma", "beta", "mean", "var"], ["y"], name="bn")]
    inputs = [vi("x", [1, 4, 8, 8])] + [vi(t.name, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "g", inputs, [vi("y", [1, 6, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], producer_name="sepify-rewrite-tests")
    model.ir_version = 3
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("calibrated", [False, True], ids=["weights", "calibrated_bn_folded"])
def test_ir3_model_lists_new_initializers_as_inputs(calibrated):
    """IR 3 requires initializers to be graph inputs too.  graphsurgeon's export dropped them from
    the inputs and the factor weights were never listed, so the written model failed the ONNX
    checker (and ``rewrite --verify`` exited 2 on its own output)."""
    from sepify.calibration.calibrate import calibrated_rewrite

    model = _ir3_conv_bn_model()
    if calibrated:
        out, report, cal = calibrated_rewrite(model, Policy(), "random", samples=4)
        assert cal.folded_batchnorms
    else:
        out, report = sepify.rewrite(model)
    assert report.changed and [(r.scheme, r.rank) for r in report.rewritten] == [("dw-pw", 1)]
    assert out.ir_version == 3
    onnx.checker.check_model(out, full_check=True)
    names = [i.name for i in out.graph.input]
    assert names[0] == "x" and set(names[1:]) == {t.name for t in out.graph.initializer}
    assert [i.name for i in session(out).get_inputs()] == ["x"]
    feeds = random_feeds(model)
    assert_matches(run(model, feeds), run(out, feeds), rel=1e-4)


# ==============================================================================================
# 3. The Sobel chain and the spatial order choice
# ==============================================================================================
LUMA = np.array([0.299, 0.587, 0.114])
SOBEL_X = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])


def sobel_model() -> onnx.ModelProto:
    w = np.stack([np.einsum("c,ij->cij", LUMA, s) for s in (SOBEL_X, SOBEL_X.T)]).astype(np.float32)
    return conv_model([1, 3, 32, 32], w, pads=[1, 1, 1, 1], node_name="edges/conv")


def test_rgb_sobel_chain():
    model = sobel_model()
    out, report = sepify.rewrite(model)
    check_lossless(model, out, report, expect_macs_before=32 * 32 * 2 * 3 * 9)
    (r,) = report.rewritten
    assert (r.scheme, r.rank, r.chained) == ("pw-dw", 1, True)
    convs = conv_nodes(out.graph)
    assert len(convs) == 3
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    shapes = [inits[n.input[1]].shape for n in convs]
    # pointwise 3→2, then depthwise 3×1 and 1×3 (either order)
    assert shapes[0] == (2, 3, 1, 1)
    assert sorted(shapes[1:]) == [(2, 1, 1, 3), (2, 1, 3, 1)]
    # 32·32·(2·3) + 32·32·2·3 + 32·32·2·3
    assert r.macs_after == 32 * 32 * 2 * 3 + 2 * 32 * 32 * 2 * 3
    assert graph_conv_macs(out, random_feeds(model)) == r.macs_after


def test_no_chain_policy_keeps_two_stages():
    model = sobel_model()
    out, report = sepify.rewrite(model, Policy(chain=False))
    check_lossless(model, out, report)
    (r,) = report.rewritten
    assert (r.scheme, r.chained) == ("pw-dw", False) and len(conv_nodes(out.graph)) == 2


def chained_weight(kind: str, c_in: int, c_out: int, seed: int = 0) -> np.ndarray:
    """Rank 1 for ``kind`` AND every kernel of the kernel stage spatially rank 1 (k = 3×3).

    pw-dw: W[n,c,i,j] = a[n,c]·u[n,i]·v[n,j];  dw-pw: W[n,c,i,j] = a[c,n]·u[c,i]·v[c,j].
    """
    rng = np.random.default_rng(seed)
    if kind == "pw-dw":
        a, u, v = rng.standard_normal((c_out, c_in)), rng.standard_normal((c_out, 3)), rng.standard_normal((c_out, 3))
        return np.einsum("nc,ni,nj->ncij", a, u, v)
    a, u, v = rng.standard_normal((c_in, c_out)), rng.standard_normal((c_in, 3)), rng.standard_normal((c_in, 3))
    return np.einsum("cn,ci,cj->ncij", a, u, v)


CHAIN_GEOMETRIES = {
    "pad1": dict(pads=[1, 1, 1, 1]),
    "s1x4_asym": dict(strides=[1, 4], pads=[1, 0, 1, 3]),
    "same_upper_s2": dict(strides=[2, 2], auto_pad="SAME_UPPER"),
    "same_lower_s2x1": dict(strides=[2, 1], auto_pad="SAME_LOWER"),
    "dil_2x3_asym": dict(dilations=[2, 3], pads=[2, 3, 1, 0]),
}


@pytest.mark.parametrize("geometry", list(CHAIN_GEOMETRIES))
@pytest.mark.parametrize("kind, c_in, c_out", [("pw-dw", 16, 8), ("dw-pw", 8, 16)])
def test_chained_rewrite_geometry(kind, c_in, c_out, geometry):
    """A dw-pw / pw-dw whose kernel stage is also exactly separable becomes three convs, correct in every geometry."""
    w = chained_weight(kind, c_in, c_out, seed=14).astype(np.float32)
    b = np.random.default_rng(15).standard_normal(c_out).astype(np.float32)
    model = conv_model([1, c_in, 17, 16], w, bias=b, **CHAIN_GEOMETRIES[geometry])
    out, report = sepify.rewrite(model)
    check_lossless(model, out, report)
    (r,) = report.rewritten
    assert (r.scheme, r.rank, r.chained) == (kind, 1, True)
    assert len(conv_nodes(out.graph)) == 3 and len(out.graph.node) == 3
    assert graph_conv_macs(out, random_feeds(model)) == r.macs_after
    # the chain is cheaper than the unchained factorization
    _, plain = sepify.rewrite(model, Policy(chain=False))
    assert r.macs_after < plain.rewritten[0].macs_after


def test_spatial_order_choice_is_the_cheaper_one():
    """Depthwise rank-1 3×3 on [1, 4, 9, 16] with strides (1, 4) and pads [1, 0, 1, 3].

    H: (9 + 2 - 3) // 1 + 1 = 9;  W: (16 + 0 + 3 - 3) // 4 + 1 = 5.   Original: 4·9·5·9 = 1620.
    vertical first:   3×1 at (9, 16): 4·9·16·3 = 1728, then 1×3 at (9, 5): 4·9·5·3 = 540 → 2268 (no saving)
    horizontal first: 1×3 at (9, 5): 4·9·5·3 = 540,  then 3×1 at (9, 5): 540 → 1080.
    """
    w = lowrank_weight("spatial-kernel", 1, 4, 4, 4, (3, 3), seed=11).astype(np.float32)
    model = conv_model([1, 4, 9, 16], w, group=4, strides=[1, 4], pads=[1, 0, 1, 3])
    out, report = sepify.rewrite(model)
    check_lossless(model, out, report, expect_macs_before=1620)
    (r,) = report.rewritten
    assert r.scheme == "spatial" and r.rank == 1
    assert r.macs_after == 1080
    assert graph_conv_macs(out, random_feeds(model)) == 1080
    first, second = conv_nodes(out.graph)
    assert attr(first, "kernel_shape") == [1, 3] and attr(first, "strides") == [1, 4]
    assert attr(first, "pads") == [0, 0, 0, 3]
    assert attr(second, "kernel_shape") == [3, 1] and attr(second, "pads") == [1, 0, 1, 0]


def test_exact_spatial_split_found_in_the_costlier_order():
    """Cross-channel rank 1 built for vertical-first (W[n,c,i,j] = a[c,i]·b[n,j]) in a geometry that
    favours horizontal-first: 8→8 3×3, strides (1, 4), pads [1, 0, 1, 3] on [1, 8, 10, 16] → out 10×5.

        original          8·(10·5)·8·9                          = 28800
        vertical first    1·(10·16)·8·3 + 8·(10·5)·1·3 = 3840 + 1200 = 5040   exact for this weight
        horizontal first  1·(10·5)·8·3  + 8·(10·5)·1·3 = 1200 + 1200 = 2400   not exact (M' is full rank)
        dw-pw             exact only at rank 3 (each [8, 9] matrix is a[c,i]·b[n,j]): 8·50·(8·3·9 + 8·8·3) = 16800

    The vertical-first split is the cheapest exact decomposition of this weight, so the lossless
    policy ("the cheapest decomposition within the bound") should take it.
    """
    w = lowrank_weight("spatial-cross", 1, 8, 8, 1, (3, 3), seed=1, vertical_first=True).astype(np.float32)
    model = conv_model([1, 8, 10, 16], w, strides=[1, 4], pads=[1, 0, 1, 3])
    geo = ConvGeo.of([1, 8, 10, 16], w.shape, strides=[1, 4], pads=[1, 0, 1, 3])
    assert geo.out_spatial == [10, 5] and geo.macs == 28800
    assert spatial_order_macs(geo, 1) == (5040, 2400)
    out, report = sepify.rewrite(model)
    check_lossless(model, out, report)
    (r,) = report.rewritten
    assert (r.scheme, r.rank, r.macs_after) == ("spatial", 1, 5040), (r.scheme, r.rank, r.macs_after)


def test_strided_depthwise_split_no_saving():
    """Exact rank-1 depthwise 3×3, VALID, stride 2 on [1, 8, 11, 13] → out 5×6: 8·30·9 = 2160 MACs.

    vertical first 8·(5·13·3 + 5·6·3) = 2280, horizontal first 8·(11·6·3 + 5·6·3) = 2304: both cost more,
    so the lossless rewrite keeps it (and returns the original proto).
    """
    w = lowrank_weight("spatial-kernel", 1, 8, 8, 8, (3, 3), seed=13).astype(np.float32)
    model = conv_model([1, 8, 11, 13], w, group=8, auto_pad="VALID", strides=[2, 2])
    out, report = sepify.rewrite(model)
    assert out is model and not report.changed
    assert report.kept == [{"name": "conv", "reason": "no_exact_saving"}]
    assert report.conv_macs_before == report.conv_macs_after == 2160
    assert spatial_order_macs(ConvGeo.of([1, 8, 11, 13], w.shape, group=8, strides=[2, 2]), 1) == (2280, 2304)


def test_spatial_order_choice_vertical_cross_channel():
    """Cross-channel rank 1, 8→8, 3×3, strides (3, 1), no pads, input [1, 8, 15, 10].

    H: (15-3)//3+1 = 5, W: 8.  Original 8·5·8·8·9 = 23040.
    vertical first:   g·r = 1 mid channel: 5·10·1·8·3 = 1200, then 8 outputs 1×3 over r=1: 5·8·8·3 = 960 → 2160
    horizontal first: 15·8·1·8·3 = 2880 + 960 = 3840.
    """
    w = lowrank_weight("spatial-cross", 1, 8, 8, 1, (3, 3), seed=12, vertical_first=True).astype(np.float32)
    model = conv_model([1, 8, 15, 10], w, strides=[3, 1])
    out, report = sepify.rewrite(model)
    check_lossless(model, out, report, expect_macs_before=23040)
    (r,) = report.rewritten
    assert (r.scheme, r.rank, r.macs_after) == ("spatial", 1, 2160)
    first, _ = conv_nodes(out.graph)
    assert attr(first, "kernel_shape") == [3, 1]


# ==============================================================================================
# 4. Things a lossless rewrite must leave alone
# ==============================================================================================
def _random_conv(x_shape=(1, 8, 12, 12), w_shape=(16, 8, 3, 3), seed=0, **attrs) -> onnx.ModelProto:
    w = np.random.default_rng(seed).standard_normal(w_shape).astype(np.float32)
    attrs.setdefault("pads", [1] * (2 * (len(w_shape) - 2)))
    return conv_model(list(x_shape), w, **attrs)


@pytest.mark.parametrize("source", ["proto", "bytes", "path"])
def test_full_rank_random_left_alone(source, tmp_path):
    model = _random_conv(bias=np.ones(16, np.float32))
    data = model.SerializeToString()
    arg = {"proto": model, "bytes": data}.get(source)
    if source == "path":
        arg = tmp_path / "m.onnx"
        arg.write_bytes(data)
    out, report = sepify.rewrite(arg)
    assert not report.changed and report.rewritten == []
    assert report.kept == [{"name": "conv", "reason": "no_exact_saving"}]
    assert report.conv_macs_after == report.conv_macs_before == 12 * 12 * 16 * 8 * 9
    if source == "proto":
        assert out is model
    assert out.SerializeToString() == data


def test_vgg_sample_left_alone():
    path = Path(__file__).resolve().parent.parent / "sample_models" / "vgg_small.onnx"
    data = path.read_bytes()
    out, report = sepify.rewrite(path)
    assert not report.changed and len(report.kept) == 4
    assert out.SerializeToString() == data


def _conv_transpose_model():
    w = np.ones((8, 4, 3, 3), np.float32)  # exactly rank 1 everywhere, still not rewritable
    return make_model([helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="deconv", kernel_shape=[3, 3])],
                      [vi("x", [1, 8, 6, 6])], [vi("y", [1, 4, 8, 8])], [numpy_helper.from_array(w, "w")])


def _conv_integer_model():
    w = np.ones((8, 8, 3, 3), np.uint8)
    return make_model([helper.make_node("ConvInteger", ["x", "w"], ["y"], name="qconv", kernel_shape=[3, 3])],
                      [vi("x", [1, 8, 6, 6], TensorProto.UINT8)], [vi("y", [1, 8, 4, 4], TensorProto.INT32)],
                      [numpy_helper.from_array(w, "w")])


INELIGIBLE = {
    "weight_is_graph_input": (lambda: conv_model([1, 8, 12, 12], lowrank_weight("dw-pw", 1, 8, 16, 1, (3, 3)),
                                                 weight="input", pads=[1, 1, 1, 1]), "conv", "weight_not_constant"),
    "pointwise_1x1": (lambda: conv_model([1, 8, 12, 12], np.ones((16, 8, 1, 1))), "conv", "pointwise_kernel"),
    "conv_transpose": (_conv_transpose_model, "deconv", "transposed_conv"),
    "conv_integer": (_conv_integer_model, "qconv", "quantized_op"),
}


@pytest.mark.parametrize("which", list(INELIGIBLE))
def test_ineligible_untouched_with_reason(which):
    build, name, reason = INELIGIBLE[which]
    model = build()
    data = model.SerializeToString()
    for policy in (None, Policy(mode="rank", rank=1), Policy(mode="tol", tol=0.9)):
        out, report = sepify.rewrite(model, policy)
        assert out is model and not report.changed
        assert report.kept == [{"name": name, "reason": reason}]
        assert out.SerializeToString() == data
    with pytest.raises(sepify.ParameterError, match="no conv can be rewritten"):  # a budget it cannot reach
        sepify.rewrite(model, Policy(mode="budget", budget=0.1))
    session(model)  # the fixture itself is valid


def test_ineligible_next_to_rewritten():
    """A model mixing every ineligible kind with one exact conv: only the exact conv changes."""
    w_exact = lowrank_weight("dw-pw", 1, 8, 16, 1, (3, 3), seed=4).astype(np.float32)
    w_pw = np.random.default_rng(1).standard_normal((8, 16, 1, 1)).astype(np.float32)
    w_t = np.random.default_rng(2).standard_normal((8, 4, 3, 3)).astype(np.float32)
    w_in = np.random.default_rng(3).standard_normal((8, 8, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w_exact"], ["a"], name="exact", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "w_pw"], ["b"], name="pw", kernel_shape=[1, 1]),
        helper.make_node("ConvTranspose", ["b", "w_t"], ["c"], name="deconv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "w_in"], ["d"], name="dyn", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    model = make_model(nodes, [vi("x", [1, 8, 12, 12]), vi("w_in", [8, 8, 3, 3])],
                       [vi("c", [1, 4, 12, 12]), vi("d", [1, 8, 12, 12])],
                       [numpy_helper.from_array(w, n) for w, n in ((w_exact, "w_exact"), (w_pw, "w_pw"), (w_t, "w_t"))])
    out, report = sepify.rewrite(model)
    feeds = random_feeds(model)
    feeds["w_in"] = w_in
    check_lossless(model, out, report, feeds=feeds)
    assert [r.qualified_name for r in report.rewritten] == ["exact"]
    assert sorted((k["name"], k["reason"]) for k in report.kept) == [
        ("deconv", "transposed_conv"), ("dyn", "weight_not_constant"), ("pw", "pointwise_kernel")]
    old = {n.name: n for n in model.graph.node}
    new = {n.name: n for n in out.graph.node}
    for name in ("pw", "deconv", "dyn"):
        assert new[name] == old[name]
    assert "w_in" in io_names(out)[0]


# ==============================================================================================
# 5. Idempotence, metadata, files
# ==============================================================================================
def test_rewrite_is_idempotent():
    model = sobel_model()
    once, r1 = sepify.rewrite(model)
    assert r1.changed
    twice, r2 = sepify.rewrite(once)
    assert not r2.changed and r2.rewritten == []
    assert twice is once
    assert r2.kept == [
        {"name": "edges/conv/sep_0_pointwise", "reason": "pointwise_kernel"},
        {"name": "edges/conv/sep_1_vertical", "reason": "depthwise"},
        {"name": "edges/conv/sep_2_horizontal", "reason": "depthwise"},
    ]
    # also for a lossy rewrite followed by a lossless one
    lossy, _ = sepify.rewrite(_random_conv(), Policy(mode="rank", rank=2))
    again, r3 = sepify.rewrite(lossy)
    assert not r3.changed and again is lossy


def test_metadata_mentions_every_rewritten_node():
    path = Path(__file__).resolve().parent.parent / "sample_models" / "lowrank_separable.onnx"
    src = onnx.load(str(path))
    src.metadata_props.add(key="author", value="someone")
    out, report = sepify.rewrite(src)
    meta = {p.key: p.value for p in out.metadata_props}
    assert meta["author"] == "someone"
    assert "sepify" in meta
    data = json.loads(meta["sepify"])
    (entry,) = data["history"]
    assert entry["policy"]["mode"] == "lossless"
    assert sorted(n["node"] for n in entry["nodes"]) == sorted(r.qualified_name for r in report.rewritten)
    assert sorted(n["node"] for n in entry["nodes"]) == ["dwpw1/conv", "dwpw2/conv", "pwdw/conv"]
    for n in entry["nodes"]:
        assert n["scheme"] in ("dw-pw", "pw-dw") and n["rank"] in (1, 2) and n["weight_error"] < 2.4e-7
    # a second (lossy) rewrite appends to the history
    out2, rep2 = sepify.rewrite(out, Policy(mode="rank", rank=1, scheme="spatial", include="dwpw1"))
    assert [r.qualified_name for r in rep2.rewritten] == ["dwpw1/conv/sep_0_depthwise"]
    meta2 = {p.key: p.value for p in out2.metadata_props}
    hist = json.loads(meta2["sepify"])["history"]
    assert len(hist) == 2 and hist[0] == entry
    assert hist[1]["policy"]["mode"] == "rank" and [n["node"] for n in hist[1]["nodes"]] == ["dwpw1/conv/sep_0_depthwise"]
    assert meta2["author"] == "someone"


def _big_exact_model() -> onnx.ModelProto:
    """Two exact convs whose factors exceed save_model's 1 KiB external-data threshold."""
    w1 = lowrank_weight("dw-pw", 1, 32, 64, 1, (3, 3), seed=20).astype(np.float32)
    w2 = lowrank_weight("pw-dw", 2, 64, 32, 1, (3, 3), seed=21).astype(np.float32)
    b2 = np.random.default_rng(22).standard_normal(32).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], name="c1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("Conv", ["hr", "w2", "b2"], ["y"], name="c2", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
    ]
    return make_model(nodes, [vi("x", [1, 32, 16, 16])], [vi("y", [1, 32, 8, 8])],
                      [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                       numpy_helper.from_array(b2, "b2")])


@pytest.mark.parametrize("cwd", ["elsewhere", "model_folder"])
def test_external_data_in_external_data_out_cli(tmp_path, monkeypatch, cwd):
    """``cwd`` matters only because of a loader bug: see the report (load.py runs the ONNX checker on the
    proto, whose external-data paths the checker resolves against the current directory)."""
    from sepify.cli import main

    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(tmp_path if cwd == "model_folder" else work)

    model = _big_exact_model()
    src = tmp_path / "m.onnx"
    onnx.save_model(_big_exact_model(), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    assert (tmp_path / "m.onnx.data").exists()
    out_path = tmp_path / "out.onnx"
    assert main(["rewrite", str(src), "-o", str(out_path)]) == 0
    assert (tmp_path / "out.onnx.data").exists()
    stored = onnx.load(str(out_path), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in stored.graph.initializer)
    assert len(conv_nodes(stored.graph)) == 2 + 4  # c1 dw-pw r1; c2 pw-dw r2 as two summed branches
    onnx.checker.check_model(str(out_path), full_check=True)
    feeds = random_feeds(model)
    assert_matches(run(model, feeds), session(out_path).run(None, feeds))
    # the source files are untouched
    reloaded = onnx.load(str(src))
    for a, b in zip(reloaded.graph.initializer, model.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


def test_two_cli_rewrites_byte_identical(tmp_path):
    from sepify.cli import main

    src = tmp_path / "m.onnx"
    src.write_bytes(_big_exact_model().SerializeToString())
    outs = []
    for k in (1, 2):
        o = tmp_path / f"out{k}.onnx"
        assert main(["rewrite", str(src), "-o", str(o), "--report", str(tmp_path / f"r{k}.json")]) == 0
        outs.append(o.read_bytes())
    assert outs[0] == outs[1]
    # and the same via the API, in process
    a, _ = sepify.rewrite(src)
    b, _ = sepify.rewrite(src)
    assert a.SerializeToString() == b.SerializeToString()


# ==============================================================================================
# 6. Lossy policies
# ==============================================================================================
def effective_weight(model: onnx.ModelProto, c_in: int, kernel: Sequence[int]) -> np.ndarray:
    """The dense weight a single-input, no-pad, stride-1 conv chain computes, probed with onnxruntime.

    The model is re-declared for an input of exactly the kernel's size (output 1×…×1) and fed
    one-hot images: output[b, n] - output(0)[n] = W_eff[n, c, k] for the b-th basis image.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    k = math.prod(kernel)
    batch = c_in * k
    x = probe.graph.input[0]
    del x.type.tensor_type.shape.dim[:]
    for d in [batch, c_in, *kernel]:
        x.type.tensor_type.shape.dim.add().dim_value = d
    for o in probe.graph.output:
        o.type.tensor_type.ClearField("shape")
    del probe.graph.value_info[:]
    eye = np.eye(batch, dtype=np.float32).reshape(batch, c_in, *kernel)
    sess = session(probe)
    (y,) = sess.run(None, {x.name: eye})
    (y0,) = sess.run(None, {x.name: np.zeros_like(eye)})
    n = y.shape[1]
    return (y - y0).reshape(batch, n).T.reshape(n, c_in, *kernel)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.mark.parametrize("scheme", ["auto", "dw-pw", "pw-dw", "spatial"])
def test_tol_policy_bounds_weight_error(scheme):
    w = np.random.default_rng(30).standard_normal((16, 16, 3, 3)).astype(np.float32)
    b = np.random.default_rng(31).standard_normal(16).astype(np.float32)
    model = conv_model([1, 16, 10, 10], w, bias=b)
    out, report = sepify.rewrite(model, Policy(mode="tol", tol=0.3, scheme=scheme))
    onnx.checker.check_model(out, full_check=True)
    for r in report.rewritten:
        assert r.weight_error <= 0.3
        if scheme != "auto":
            assert r.scheme == scheme
    if report.changed:
        (r,) = report.rewritten
        w_eff = effective_weight(out, 16, (3, 3))
        assert abs(_rel(w, w_eff) - r.weight_error) <= 1e-4
        assert r.macs_after < r.macs_before
    else:
        assert report.kept[0]["reason"] == "no_saving_within_tol"


def test_tol_policy_multi_layer_random():
    model = random_conv_stack()
    out, report = sepify.rewrite(model, Policy(mode="tol", tol=0.3))
    assert report.changed
    onnx.checker.check_model(out, full_check=True)
    assert all(r.weight_error <= 0.3 for r in report.rewritten)
    session(out).run(None, random_feeds(model))


@pytest.mark.parametrize("lowering", ["branches", "grouped"])
@pytest.mark.parametrize("scheme", ["dw-pw", "pw-dw", "spatial", "auto"])
def test_rank_policy_gives_rank_2(scheme, lowering):
    w = np.random.default_rng(32).standard_normal((16, 16, 3, 3)).astype(np.float32)
    model = conv_model([1, 16, 10, 10], w)
    out, report = sepify.rewrite(model, Policy(mode="rank", rank=2, scheme=scheme), lowering=lowering)
    (r,) = report.rewritten
    assert r.rank == 2
    if scheme != "auto":
        assert r.scheme == scheme
    assert 0 < r.weight_error < 1
    onnx.checker.check_model(out, full_check=True)
    w_eff = effective_weight(out, 16, (3, 3))
    assert abs(_rel(w, w_eff) - r.weight_error) <= 1e-4
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    shapes = [inits[n.input[1]].shape for n in conv_nodes(out.graph)]
    if r.scheme == "dw-pw":
        want = [(16, 1, 3, 3), (16, 16, 1, 1)] * 2 if lowering == "branches" else [(32, 1, 3, 3), (16, 32, 1, 1)]
        assert sorted(shapes) == sorted(want)
    elif r.scheme == "pw-dw":
        want = [(16, 16, 1, 1), (16, 1, 3, 3)] * 2 if lowering == "branches" else [(32, 16, 1, 1), (16, 2, 3, 3)]
        assert sorted(shapes) == sorted(want)
    else:
        # Both orders cost the same here; the one whose cross-channel spectrum is more accurate wins.
        assert sorted(shapes) in (sorted([(2, 16, 3, 1), (16, 2, 1, 3)]), sorted([(2, 16, 1, 3), (16, 2, 3, 1)]))
    # rank 2 of the best scheme is at least as accurate as rank 1
    _, rep1 = sepify.rewrite(model, Policy(mode="rank", rank=1, scheme=r.scheme))
    assert rep1.rewritten[0].weight_error >= r.weight_error - 1e-9


def test_rank_policy_rank_exceeding_maximum_is_clamped_or_skipped():
    """Depthwise 3×3: spatial per-kernel max rank 3, whose split (3·(3+3)) does not save MACs."""
    w = np.random.default_rng(33).standard_normal((8, 1, 3, 3)).astype(np.float32)
    model = conv_model([1, 8, 10, 10], w, group=8, pads=[1, 1, 1, 1])
    out, report = sepify.rewrite(model, Policy(mode="rank", rank=50))
    assert not report.changed and out is model
    assert report.kept == [{"name": "conv", "reason": "rank_saves_nothing"}]


def random_conv_stack(seed: int = 40) -> onnx.ModelProto:
    """conv 3×3 16→32, relu, conv 3×3 32→32, relu, conv 3×3 s2 32→64, relu, conv 5×5 64→64 (random, with biases)."""
    rng = np.random.default_rng(seed)
    specs = [("c1", 16, 32, 3, 1), ("c2", 32, 32, 3, 1), ("c3", 32, 64, 3, 2), ("c4", 64, 64, 5, 1)]
    nodes, inits = [], []
    cur, size = "x", 16
    for i, (name, ci, co, k, s) in enumerate(specs):
        w = (rng.standard_normal((co, ci, k, k)) / math.sqrt(ci * k * k)).astype(np.float32)
        b = rng.standard_normal(co).astype(np.float32) * 0.1
        inits += [numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(b, f"{name}.b")]
        nodes.append(helper.make_node("Conv", [cur, f"{name}.w", f"{name}.b"], [f"{name}.y"], name=name,
                                      kernel_shape=[k, k], strides=[s, s], pads=[k // 2] * 4))
        size = (size + 2 * (k // 2) - k) // s + 1
        last = i == len(specs) - 1
        nodes.append(helper.make_node("Relu", [f"{name}.y"], ["y" if last else f"{name}.r"], name=f"{name}/relu"))
        cur = f"{name}.r"
    return make_model(nodes, [vi("x", [1, 16, 16, 16])], [vi("y", [1, 64, size, size])], inits)


def test_budget_policy_half_the_macs():
    model = random_conv_stack()
    before = (16 * 16 * 32 * 16 * 9) + (16 * 16 * 32 * 32 * 9) + (8 * 8 * 64 * 32 * 9) + (8 * 8 * 64 * 64 * 25)
    out, report = sepify.rewrite(model, Policy(mode="budget", budget=0.5))
    assert report.conv_macs_before == before
    assert report.changed
    ratio = report.conv_macs_after / before
    assert 0.3 <= ratio <= 0.55, ratio
    onnx.checker.check_model(out, full_check=True)
    feeds = random_feeds(model)
    assert graph_conv_macs(out, feeds) == report.conv_macs_after
    (y0,), (y1,) = run(model, feeds), run(out, feeds)
    assert y0.shape == y1.shape and np.all(np.isfinite(y1))
    assert all(0 < r.weight_error < 1 for r in report.rewritten)
    # the plan agrees with the report
    p = sepify.plan(model, Policy(mode="budget", budget=0.5))
    assert p.conv_macs_after == report.conv_macs_after


def test_budget_one_changes_nothing():
    model = random_conv_stack()
    out, report = sepify.rewrite(model, Policy(mode="budget", budget=1.0))
    assert not report.changed and out is model
    assert {k["reason"] for k in report.kept} == {"not_needed_for_budget"}


def _three_exact_convs() -> onnx.ModelProto:
    """stem (small), body/a and body/b (large), all exact dw-pw rank 1, in sequence."""
    ws = [lowrank_weight("dw-pw", 1, 8, 8, 1, (3, 3), seed=s).astype(np.float32) for s in (50, 51, 52)]
    sizes = [(1, 8, 4, 4), (1, 8, 16, 16)]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["s"], name="stem", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["z", "w1"], ["a"], name="body/a", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "w2"], ["b"], name="body/b", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    return make_model(nodes, [vi("x", sizes[0]), vi("z", sizes[1])], [vi("s", sizes[0]), vi("b", sizes[1])],
                      [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)])


@pytest.mark.parametrize(
    "policy, rewritten, kept",
    [
        (Policy(), ["body/a", "body/b", "stem"], {}),
        (Policy(include="^body/"), ["body/a", "body/b"], {"stem": "not_selected"}),
        (Policy(include="a$"), ["body/a"], {"stem": "not_selected", "body/b": "not_selected"}),
        (Policy(exclude="body/b"), ["body/a", "stem"], {"body/b": "not_selected"}),
        (Policy(include="body", exclude="/a"), ["body/b"], {"stem": "not_selected", "body/a": "not_selected"}),
        (Policy(min_macs=16 * 16 * 8 * 8 * 9), ["body/a", "body/b"], {"stem": "below_min_macs"}),
        (Policy(min_macs=16 * 16 * 8 * 8 * 9 + 1), [], {"stem": "below_min_macs", "body/a": "below_min_macs",
                                                         "body/b": "below_min_macs"}),
        (Policy(mode="rank", rank=1, exclude="stem", min_macs=1000), ["body/a", "body/b"], {"stem": "not_selected"}),
    ],
    ids=["all", "include", "include_anchor", "exclude", "include_exclude", "min_macs", "min_macs_all", "rank_exclude"],
)
def test_include_exclude_min_macs(policy, rewritten, kept):
    model = _three_exact_convs()
    out, report = sepify.rewrite(model, policy)
    assert sorted(r.qualified_name for r in report.rewritten) == rewritten
    assert {k["name"]: k["reason"] for k in report.kept} == kept
    if rewritten:
        check_lossless(model, out, report)
        names = {n.name for n in out.graph.node}
        for name in kept:
            assert name in names
    else:
        assert out is model


def test_edited_plan_is_honoured():
    """A Plan from sepify.pipeline.plan, edited (scheme/rank/action), drives the rewrite."""
    model = _three_exact_convs()
    p = sepify.plan(model)
    assert [n.action for n in p.nodes] == ["rewrite"] * 3
    p.node("stem").action = "keep"
    p.node("body/a").rank = 2  # more than needed: still exact
    out, report = sepify.rewrite(model, p)
    assert sorted(r.qualified_name for r in report.rewritten) == ["body/a", "body/b"]
    assert {r.qualified_name: r.rank for r in report.rewritten}["body/a"] == 2
    check_lossless(model, out, report)
    assert "stem" in {n.name for n in out.graph.node}


def test_one_input_channel_conv_splits_dw_pw():
    """A plain 1→24 3×3 conv (a grey-image stem) whose 24×9 weight has rank 4: depthwise 1→4 (3×3)
    then pointwise 4→24 costs 4·9 + 4·24 = 132 MACs per pixel instead of 216.  It is not a
    depthwise conv (group 1), so dw-pw applies."""
    rng = np.random.default_rng(21)
    w = (rng.standard_normal((24, 4)) @ rng.standard_normal((4, 9))).reshape(24, 1, 3, 3).astype(np.float32)
    model = conv_model([1, 1, 12, 12], w, pads=[1, 1, 1, 1])
    audit = sepify.audit(model)
    (node,) = audit.nodes
    assert node.eligible and node.separability.schemes["dw-pw"].exact_rank == 4
    out, report = sepify.rewrite(model)
    check_lossless(model, out, report, expect_macs_before=144 * 216)
    (r,) = report.rewritten
    assert (r.scheme, r.rank, r.macs_after) == ("dw-pw", 4, 144 * 132)


def test_true_depthwise_conv_is_no_dw_pw_candidate():
    w = np.random.default_rng(22).standard_normal((8, 1, 3, 3)).astype(np.float32)
    model = conv_model([1, 8, 12, 12], w, group=8, pads=[1, 1, 1, 1])
    schemes = sepify.audit(model).nodes[0].separability.schemes
    assert schemes["dw-pw"].reason == schemes["pw-dw"].reason == "depthwise"
