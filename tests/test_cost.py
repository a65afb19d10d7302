"""MACs / params / FLOPs of Conv-like and MatMul-like nodes.

Every number is checked twice: against a value written out by hand as arithmetic
(the convention in ``sepify.model.cost``), and against the same formula evaluated on the
shapes onnxruntime actually produces when it runs the model.

Convention:
  Conv           MACs = prod(output shape) × (C_in/group) × prod(kernel)
  ConvTranspose  MACs = prod(input shape)  × (C_out/group) × prod(kernel)
  FLOPs = 2·MACs (+ prod(output shape) with a bias);  params = weight numel + bias numel
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import sepify
from sepify.errors import ShapeError, UsageError

from conftest import (
    conv_flops,
    conv_macs_from_shapes,
    const_node,
    init,
    make_conv_model,
    make_model,
    ort_run,
    ort_shapes,
    prod,
    rand,
    vi,
)

# ----------------------------------------------------------------------------------------------
# Parametrized single-node cases.
# (id, x shape, w shape, attributes, output shape by hand, MACs by hand, explicit pads by hand)
# ----------------------------------------------------------------------------------------------
CONV_CASES = [
    ("basic", [1, 3, 8, 8], [4, 3, 3, 3], {},
     [1, 4, 6, 6], 1 * 4 * 6 * 6 * (3 // 1) * 3 * 3, [0, 0, 0, 0]),
    ("batch2_pad1", [2, 3, 8, 8], [4, 3, 3, 3], dict(pads=[1, 1, 1, 1]),
     [2, 4, 8, 8], 2 * 4 * 8 * 8 * 3 * 3 * 3, [1, 1, 1, 1]),
    # out = (9 + 1 + 1 - 3) // 2 + 1 = 5
    ("stride2_pad1", [1, 3, 9, 9], [8, 3, 3, 3], dict(strides=[2, 2], pads=[1, 1, 1, 1]),
     [1, 8, 5, 5], 1 * 8 * 5 * 5 * 3 * 3 * 3, [1, 1, 1, 1]),
    # H = (11 - 3) // 2 + 1 = 5, W = (10 - 3) // 3 + 1 = 3
    ("stride_2x3", [1, 2, 11, 10], [4, 2, 3, 3], dict(strides=[2, 3]),
     [1, 4, 5, 3], 1 * 4 * 5 * 3 * 2 * 3 * 3, [0, 0, 0, 0]),
    # pads = [h_begin 0, w_begin 2, h_end 1, w_end 0]: H = (7+0+1-3)//2+1 = 3, W = (6+2+0-2)//1+1 = 7
    ("asymmetric_pads", [1, 2, 7, 6], [4, 2, 3, 2], dict(strides=[2, 1], pads=[0, 2, 1, 0]),
     [1, 4, 3, 7], 1 * 4 * 3 * 7 * 2 * 3 * 2, [0, 2, 1, 0]),
    # out = ceil(7/2) = 4, total pad = (4-1)*2 + 4 - 7 = 3 -> UPPER (1, 2), LOWER (2, 1)
    ("same_upper_k4_s2", [1, 2, 7, 7], [3, 2, 4, 4], dict(auto_pad="SAME_UPPER", strides=[2, 2]),
     [1, 3, 4, 4], 1 * 3 * 4 * 4 * 2 * 4 * 4, [1, 1, 2, 2]),
    ("same_lower_k4_s2", [1, 2, 7, 7], [3, 2, 4, 4], dict(auto_pad="SAME_LOWER", strides=[2, 2]),
     [1, 3, 4, 4], 1 * 3 * 4 * 4 * 2 * 4 * 4, [2, 2, 1, 1]),
    # H: out 4, total (4-1)*2+3-8 = 1;  W: out 5, total (5-1)*2+3-9 = 2
    ("same_upper_k3_s2", [1, 2, 8, 9], [3, 2, 3, 3], dict(auto_pad="SAME_UPPER", strides=[2, 2]),
     [1, 3, 4, 5], 1 * 3 * 4 * 5 * 2 * 3 * 3, [0, 1, 1, 1]),
    ("same_lower_k3_s2", [1, 2, 8, 9], [3, 2, 3, 3], dict(auto_pad="SAME_LOWER", strides=[2, 2]),
     [1, 3, 4, 5], 1 * 3 * 4 * 5 * 2 * 3 * 3, [1, 1, 0, 1]),
    # 1-D, kernel 4, stride 3: out = ceil(10/3) = 4, total = 3*3 + 4 - 10 = 3
    # (onnxruntime refuses dilations together with SAME_*, so none here)
    ("same_upper_1d", [1, 2, 10], [2, 2, 4], dict(auto_pad="SAME_UPPER", strides=[3]),
     [1, 2, 4], 1 * 2 * 4 * 2 * 4, [1, 2]),
    ("same_lower_1d", [1, 2, 10], [2, 2, 4], dict(auto_pad="SAME_LOWER", strides=[3]),
     [1, 2, 4], 1 * 2 * 4 * 2 * 4, [2, 1]),
    # H = (7-3)//2+1 = 3, W = (9-3)//3+1 = 3
    ("valid", [1, 2, 7, 9], [3, 2, 3, 3], dict(auto_pad="VALID", strides=[2, 3]),
     [1, 3, 3, 3], 1 * 3 * 3 * 3 * 2 * 3 * 3, [0, 0, 0, 0]),
    # eff. kernel (3-1)*2+1 = 5 and (3-1)*3+1 = 7: H = 10+2-5+1 = 8, W = 10+2-7+1 = 6
    ("dilations", [1, 2, 10, 10], [4, 2, 3, 3], dict(dilations=[2, 3], pads=[1, 1, 1, 1]),
     [1, 4, 8, 6], 1 * 4 * 8 * 6 * 2 * 3 * 3, [1, 1, 1, 1]),
    ("group3", [1, 6, 8, 8], [9, 2, 3, 3], dict(group=3, pads=[1, 1, 1, 1]),
     [1, 9, 8, 8], 1 * 9 * 8 * 8 * (6 // 3) * 3 * 3, [1, 1, 1, 1]),
    ("depthwise", [1, 4, 8, 8], [4, 1, 3, 3], dict(group=4),
     [1, 4, 6, 6], 1 * 4 * 6 * 6 * (4 // 4) * 3 * 3, [0, 0, 0, 0]),
    # depthwise with channel multiplier 2; H = (8+2-3)//2+1 = 4
    ("depthwise_mult2", [1, 4, 8, 8], [8, 1, 3, 3], dict(group=4, strides=[2, 2], pads=[1, 1, 1, 1]),
     [1, 8, 4, 4], 1 * 8 * 4 * 4 * (4 // 4) * 3 * 3, [1, 1, 1, 1]),
    ("pointwise", [1, 16, 5, 5], [8, 16, 1, 1], {},
     [1, 8, 5, 5], 1 * 8 * 5 * 5 * 16 * 1 * 1, [0, 0, 0, 0]),
    ("kernel_shape_attr", [1, 3, 8, 8], [4, 3, 3, 5], dict(kernel_shape=[3, 5], pads=[1, 2, 1, 2]),
     [1, 4, 8, 8], 1 * 4 * 8 * 8 * 3 * 3 * 5, [1, 2, 1, 2]),
    # 1-D: (20 + 1 + 2 - 4) // 3 + 1 = 7
    ("conv1d", [1, 3, 20], [5, 3, 4], dict(strides=[3], pads=[1, 2]),
     [1, 5, 7], 1 * 5 * 7 * 3 * 4, [1, 2]),
    # 3-D: D = 5+2-3+1 = 5, H = (6+2-3)//2+1 = 3, W = (7+2-3)//2+1 = 4
    ("conv3d", [1, 2, 5, 6, 7], [4, 2, 3, 3, 3], dict(strides=[1, 2, 2], pads=[1, 1, 1, 1, 1, 1]),
     [1, 4, 5, 3, 4], 1 * 4 * 5 * 3 * 4 * 2 * 3 * 3 * 3, [1, 1, 1, 1, 1, 1]),
    # 3-D grouped SAME_UPPER, stride 2: outs 3,3,4; totals (3-1)*2+2-5 = 1, (3-1)*2+3-6 = 1, (4-1)*2+3-7 = 2
    ("conv3d_group_same_upper", [1, 4, 5, 6, 7], [4, 2, 2, 3, 3], dict(group=2, auto_pad="SAME_UPPER", strides=[2, 2, 2]),
     [1, 4, 3, 3, 4], 1 * 4 * 3 * 3 * 4 * (4 // 2) * 2 * 3 * 3, [0, 0, 1, 1, 1, 1]),
]

# ConvTranspose: out = s*(in-1) + output_padding + (k-1)*d + 1 - pad_begin - pad_end;
# MACs = prod(x) × (C_out/group) × prod(k), where C_out/group = w.shape[1].
CONVT_CASES = [
    ("t_basic", [1, 2, 4, 4], [2, 3, 3, 3], {},
     [1, 3, 6, 6], 1 * 2 * 4 * 4 * 3 * 3 * 3, [0, 0, 0, 0]),
    # 2*(5-1) + 1 + 3 - 1 - 1 = 10
    ("t_stride_output_padding", [1, 2, 5, 5], [2, 4, 3, 3], dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]),
     [1, 4, 10, 10], 1 * 2 * 5 * 5 * 4 * 3 * 3, [1, 1, 1, 1]),
    # H = 3*(3-1) + 3 - 1 - 0 = 8, W = 2*(4-1) + 3 - 2 - 1 = 6
    ("t_asymmetric_pads", [1, 1, 3, 4], [1, 2, 3, 3], dict(strides=[3, 2], pads=[1, 2, 0, 1]),
     [1, 2, 8, 6], 1 * 1 * 3 * 4 * 2 * 3 * 3, [1, 2, 0, 1]),
    # output_shape [10, 8] is beyond the natural 3*2+3 = 9 and 2*2+3 = 7: no padding at all
    ("t_output_shape_grow", [1, 1, 3, 3], [1, 2, 3, 3], dict(strides=[3, 2], output_shape=[10, 8]),
     [1, 2, 10, 8], 1 * 1 * 3 * 3 * 2 * 3 * 3, [0, 0, 0, 0]),
    # output_shape [8, 6]: one row/column of total padding each (onnxruntime puts it first)
    ("t_output_shape_shrink", [1, 1, 3, 3], [1, 2, 3, 3], dict(strides=[3, 2], output_shape=[8, 6]),
     [1, 2, 8, 6], 1 * 1 * 3 * 3 * 2 * 3 * 3, [1, 1, 0, 0]),
    # output_shape together with auto_pad: the explicit target wins; SAME_* only decides the split
    ("t_output_shape_same_upper", [1, 1, 3, 3], [1, 2, 3, 3],
     dict(strides=[3, 2], output_shape=[8, 6], auto_pad="SAME_UPPER"),
     [1, 2, 8, 6], 1 * 1 * 3 * 3 * 2 * 3 * 3, [0, 0, 1, 1]),
    ("t_output_shape_same_lower", [1, 1, 3, 3], [1, 2, 3, 3],
     dict(strides=[3, 2], output_shape=[8, 6], auto_pad="SAME_LOWER"),
     [1, 2, 8, 6], 1 * 1 * 3 * 3 * 2 * 3 * 3, [1, 1, 0, 0]),
    # group 2: C_out = 3 * 2 = 6, out = 3 + 2 - 1 = 4
    ("t_group2", [1, 4, 3, 3], [4, 3, 2, 2], dict(group=2),
     [1, 6, 4, 4], 1 * 4 * 3 * 3 * 3 * 2 * 2, [0, 0, 0, 0]),
    # SAME: out = in*stride = 6, total = 2*2 + 3 - 6 = 1
    ("t_same_upper", [1, 1, 3, 3], [1, 2, 3, 3], dict(auto_pad="SAME_UPPER", strides=[2, 2]),
     [1, 2, 6, 6], 1 * 1 * 3 * 3 * 2 * 3 * 3, [0, 0, 1, 1]),
    ("t_same_lower", [1, 1, 3, 3], [1, 2, 3, 3], dict(auto_pad="SAME_LOWER", strides=[2, 2]),
     [1, 2, 6, 6], 1 * 1 * 3 * 3 * 2 * 3 * 3, [1, 1, 0, 0]),
    # SAME with output_padding: out is still in*stride = 6 (onnxruntime, ONNX spec); total = 2*2 + 1 + 3 - 6 = 2
    ("t_same_upper_output_padding", [1, 1, 3, 3], [1, 1, 3, 3], dict(auto_pad="SAME_UPPER", strides=[2, 2], output_padding=[1, 1]),
     [1, 1, 6, 6], 1 * 1 * 3 * 3 * 1 * 3 * 3, [1, 1, 1, 1]),
    ("t_valid", [1, 1, 3, 3], [1, 2, 3, 3], dict(auto_pad="VALID", strides=[2, 2]),
     [1, 2, 7, 7], 1 * 1 * 3 * 3 * 2 * 3 * 3, [0, 0, 0, 0]),
    # 1-D: 2*(5-1) + (3-1)*2 + 1 = 13
    ("t_1d_dilated", [1, 2, 5], [2, 3, 3], dict(strides=[2], dilations=[2]),
     [1, 3, 13], 1 * 2 * 5 * 3 * 3, [0, 0]),
    ("t_3d", [1, 1, 3, 4, 5], [1, 2, 3, 3, 3], {},
     [1, 2, 5, 6, 7], 1 * 1 * 3 * 4 * 5 * 2 * 3 * 3 * 3, [0, 0, 0, 0, 0, 0]),
    # 3-D, stride 2, output_padding on D only: D = 2*(3-1) + 1 + (2-1) + 1 = 7, H = W = 2*(2-1) + 0 + (2-1) + 1 = 4
    ("t_3d_stride_output_padding", [1, 2, 3, 2, 2], [2, 1, 2, 2, 2], dict(strides=[2, 2, 2], output_padding=[1, 0, 0]),
     [1, 1, 7, 4, 4], 1 * 2 * 3 * 2 * 2 * 1 * 2 * 2 * 2, [0, 0, 0, 0, 0, 0]),
]

ALL_CASES = [("Conv", *c) for c in CONV_CASES] + [("ConvTranspose", *c) for c in CONVT_CASES]


def _explicit_equivalent(op_type, x_shape, w_shape, attrs, pads, y_shape, bias):
    """The same node with sepify's explicit pads instead of auto_pad / output_shape."""
    a = {k: v for k, v in attrs.items() if k not in ("auto_pad", "output_shape")}
    a["pads"] = list(pads)
    if op_type == "ConvTranspose":
        d = len(w_shape) - 2
        s = a.get("strides", [1] * d)
        dil = a.get("dilations", [1] * d)
        op = list(a.get("output_padding", [0] * d))
        natural = [s[i] * (x_shape[2 + i] - 1) + op[i] + (w_shape[2 + i] - 1) * dil[i] + 1 - pads[i] - pads[i + d]
                   for i in range(d)]
        extra = [y_shape[2 + i] - natural[i] for i in range(d)]
        if any(extra):
            a["output_padding"] = [op[i] + extra[i] for i in range(d)]
    return make_conv_model(x_shape, w_shape, op_type=op_type, bias=bias, y_shape=y_shape, **a)


@pytest.mark.parametrize("declare_output", ["full", "symbolic"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize(
    "op_type,case_id,x_shape,w_shape,attrs,hand_y,hand_macs,hand_pads",
    ALL_CASES, ids=[c[1] for c in ALL_CASES],
)
def test_conv_cost_matches_hand_and_onnxruntime(op_type, case_id, x_shape, w_shape, attrs, hand_y, hand_macs,
                                                hand_pads, bias, declare_output):
    model = make_conv_model(x_shape, w_shape, op_type=op_type, bias=bias, declare_output=declare_output, **attrs)
    report = sepify.audit(model)
    assert len(report.nodes) == 1
    node = report.nodes[0]

    # onnxruntime's actual output shape
    ort_y = ort_shapes(model)["y"]
    assert ort_y == hand_y, "the hand-computed output shape disagrees with onnxruntime (test bug)"
    ort_macs = conv_macs_from_shapes(op_type, x_shape, w_shape, ort_y)
    assert ort_macs == hand_macs, "the hand-computed MACs disagree with onnxruntime's shapes (test bug)"

    assert node.op_type == op_type
    assert node.input_shape == list(x_shape)
    assert node.output_shape == ort_y
    assert node.weight_shape == list(w_shape)
    assert node.kernel_shape == list(w_shape[2:])
    assert node.group == attrs.get("group", 1)
    assert node.has_bias is bias
    assert node.macs == hand_macs == ort_macs

    c_out = hand_y[1]
    assert node.params == prod(w_shape) + (c_out if bias else 0)
    assert node.flops == conv_flops(hand_macs, ort_y, bias)
    assert node.flops == 2 * hand_macs + (prod(hand_y) if bias else 0)

    d = len(w_shape) - 2
    assert node.strides == list(attrs.get("strides", [1] * d))
    assert node.dilations == list(attrs.get("dilations", [1] * d))
    assert node.pads == hand_pads

    t = report.totals
    assert t.conv_nodes == 1
    assert t.conv_macs == t.total_macs == hand_macs
    assert t.matmul_macs == 0
    assert t.conv_flops == node.flops
    assert t.conv_params == node.params == t.model_params
    assert t.unknown_cost_nodes == 0
    assert node.share == pytest.approx(1.0)


@pytest.mark.parametrize(
    "op_type,case_id,x_shape,w_shape,attrs,hand_y,hand_macs,hand_pads",
    [c for c in ALL_CASES if "auto_pad" in c[4] or "output_shape" in c[4] or "pads" in c[4]],
    ids=[c[1] for c in ALL_CASES if "auto_pad" in c[4] or "output_shape" in c[4] or "pads" in c[4]],
)
def test_reported_pads_reproduce_onnxruntime_numerically(op_type, case_id, x_shape, w_shape, attrs, hand_y,
                                                         hand_macs, hand_pads):
    """The explicit pads sepify reports compute exactly what onnxruntime computes with the original node."""
    model = make_conv_model(x_shape, w_shape, op_type=op_type, bias=True, **attrs)
    node = sepify.audit(model, spectra=False).nodes[0]
    equivalent = _explicit_equivalent(op_type, x_shape, w_shape, attrs, node.pads, node.output_shape, True)
    feeds = {"x": np.random.default_rng(3).standard_normal(x_shape).astype(np.float32)}
    want = ort_run(model, feeds=feeds)["y"]
    got = ort_run(equivalent, feeds=feeds)["y"]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Symbolic dims
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_dim", ["N", None], ids=["named", "unnamed"])
def test_symbolic_batch_defaults_to_one(batch_dim):
    model = make_conv_model([batch_dim, 3, 8, 8], [4, 3, 3, 3], pads=[1, 1, 1, 1], y_shape=[batch_dim, 4, 8, 8])
    report = sepify.audit(model)
    node = report.nodes[0]
    assert report.input_shapes == {"x": [1, 3, 8, 8]}
    assert node.input_shape == [1, 3, 8, 8]
    ort_y = ort_shapes(model, input_shapes={"x": [1, 3, 8, 8]})["y"]
    assert node.output_shape == ort_y == [1, 4, 8, 8]
    assert node.macs == 1 * 4 * 8 * 8 * 3 * 3 * 3 == conv_macs_from_shapes("Conv", [1, 3, 8, 8], [4, 3, 3, 3], ort_y)


@pytest.mark.parametrize("spec_form", ["dict", "strings", "tuple_dims"])
def test_symbolic_spatial_dims_from_input_shapes(spec_form):
    model = make_conv_model(["N", 3, "H", "W"], [4, 3, 3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                            y_shape=["N", 4, "OH", "OW"])
    dims = [2, 3, 17, 13]
    shapes = {"dict": {"x": dims}, "strings": ["x=2x3x17x13"], "tuple_dims": {"x": tuple(dims)}}[spec_form]
    report = sepify.audit(model, input_shapes=shapes)
    node = report.nodes[0]
    ort_y = ort_shapes(model, input_shapes={"x": dims})["y"]
    # H = (17 + 2 - 3) // 2 + 1 = 9, W = (13 + 2 - 3) // 2 + 1 = 7
    assert ort_y == [2, 4, 9, 7]
    assert node.input_shape == dims
    assert node.output_shape == ort_y
    assert node.macs == 2 * 4 * 9 * 7 * 3 * 3 * 3 == conv_macs_from_shapes("Conv", dims, [4, 3, 3, 3], ort_y)
    assert report.input_shapes == {"x": dims}


def test_unnamed_input_shape_for_single_input_model():
    model = make_conv_model(["N", 3, "H", "W"], [4, 3, 3, 3], y_shape=["N", 4, "OH", "OW"])
    node = sepify.audit(model, input_shapes=["1x3x10x12"]).nodes[0]
    assert node.output_shape == ort_shapes(model, input_shapes={"x": [1, 3, 10, 12]})["y"] == [1, 4, 8, 10]
    assert node.macs == 1 * 4 * 8 * 10 * 3 * 3 * 3


def test_symbol_fixed_on_one_input_applies_to_another():
    """Two inputs share the symbols H, W; giving x's dims resolves x2's too."""
    w = rand([4, 3, 3, 3])
    nodes = [
        helper.make_node("Add", ["x", "x2"], ["s"], name="add"),
        helper.make_node("Conv", ["s", "w"], ["y"], name="conv"),
    ]
    model = make_model(nodes, [vi("x", ["N", 3, "H", "W"]), vi("x2", ["N", 3, "H", "W"])],
                       [vi("y", ["N", 4, "OH", "OW"])], [init("w", w)])
    report = sepify.audit(model, input_shapes={"x": [1, 3, 9, 11]})
    assert report.input_shapes["x2"] == [1, 3, 9, 11]
    ort_y = ort_shapes(model, input_shapes={"x": [1, 3, 9, 11], "x2": [1, 3, 9, 11]})["y"]
    assert report.nodes[0].output_shape == ort_y == [1, 4, 7, 9]
    assert report.nodes[0].macs == 1 * 4 * 7 * 9 * 3 * 3 * 3


def test_unresolvable_symbolic_spatial_dim_raises_shape_error_naming_input():
    model = make_conv_model(["N", 3, "H", 8], [4, 3, 3, 3], y_shape=["N", 4, "OH", 6])
    with pytest.raises(ShapeError) as err:
        sepify.audit(model)
    msg = str(err.value)
    assert "'x'" in msg and "\n" not in msg


def test_input_shapes_naming_a_non_input_raises():
    model = make_conv_model([1, 3, 8, 8], [4, 3, 3, 3])
    with pytest.raises(UsageError, match="nope"):
        sepify.audit(model, input_shapes={"nope": [1, 3, 8, 8]})
    with pytest.raises(UsageError, match="'w'"):
        sepify.audit(model, input_shapes=["w=4x3x3x3"])  # an initializer is not a graph input


# ----------------------------------------------------------------------------------------------
# Where the weight comes from
# ----------------------------------------------------------------------------------------------
def _conv_on(weight_nodes, initializers=(), *, w="w", bias=False):
    nodes = list(weight_nodes) + [helper.make_node("Conv", ["x", w] + (["b"] if bias else []), ["y"], name="conv",
                                                   pads=[1, 1, 1, 1])]
    inits = list(initializers) + ([init("b", rand([4], 9))] if bias else [])
    return make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 4, 8, 8])], inits)


WEIGHT_SOURCES = {
    "constant_node": lambda bias: _conv_on([const_node("w", rand([4, 3, 3, 3]))], bias=bias),
    "constant_of_shape_mul": lambda bias: _conv_on([
        const_node("wshape", np.array([4, 3, 3, 3], np.int64)),
        helper.make_node("ConstantOfShape", ["wshape"], ["ones"], name="cos",
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])),
        const_node("two", np.array(2.0, np.float32)),
        helper.make_node("Mul", ["ones", "two"], ["w"], name="mul"),
    ], bias=bias),
    "reshape_of_constant": lambda bias: _conv_on([
        const_node("flat", rand([108])),
        const_node("target", np.array([4, 3, 3, 3], np.int64)),
        helper.make_node("Reshape", ["flat", "target"], ["w"], name="reshape"),
    ], bias=bias),
    "cast_of_initializer": lambda bias: _conv_on(
        [helper.make_node("Cast", ["w16"], ["w"], name="cast", to=TensorProto.FLOAT)],
        [init("w16", rand([4, 3, 3, 3]).astype(np.float16))], bias=bias,
    ),
    "transpose_of_initializer": lambda bias: _conv_on(
        [helper.make_node("Transpose", ["wt"], ["w"], name="transpose", perm=[3, 2, 1, 0])],
        [init("wt", rand([3, 3, 3, 4]))], bias=bias,
    ),
}


@pytest.mark.parametrize("kind", list(WEIGHT_SOURCES))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_weight_from_constant_nodes_and_subgraphs(kind, bias):
    model = WEIGHT_SOURCES[kind](bias)
    report = sepify.audit(model)
    node = report.nodes[0]
    shapes = ort_shapes(model, ["w"])
    assert shapes["w"] == [4, 3, 3, 3]
    assert node.weight_shape == shapes["w"]
    assert node.output_shape == shapes["y"] == [1, 4, 8, 8]
    hand = 1 * 4 * 8 * 8 * 3 * 3 * 3
    assert node.macs == hand == conv_macs_from_shapes("Conv", [1, 3, 8, 8], shapes["w"], shapes["y"])
    assert node.params == 4 * 3 * 3 * 3 + (4 if bias else 0)
    assert node.flops == 2 * hand + (1 * 4 * 8 * 8 if bias else 0)
    expected_source = "constant_node" if kind == "constant_node" else "constant_subgraph"
    assert node.weight_source == expected_source
    assert node.reason != "weight_not_constant"


def test_weight_from_graph_input_is_costed_but_not_rewritable():
    model = make_conv_model([1, 3, 8, 8], [4, 3, 3, 3], weight="input")
    node = sepify.audit(model).nodes[0]
    assert node.weight_source == "graph_input"
    assert node.macs == 1 * 4 * 6 * 6 * 3 * 3 * 3
    assert node.params == 4 * 3 * 3 * 3
    assert node.eligible is False and node.reason == "weight_not_constant"


# ----------------------------------------------------------------------------------------------
# Subgraphs and shared weights
# ----------------------------------------------------------------------------------------------
def _if_model():
    then_graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["t_y"], name="conv", pads=[1, 1, 1, 1])],
        "then_body", [], [vi("t_y", [1, 4, 8, 8])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w_else", "b_else"], ["e_y"], name="conv_else", strides=[2, 2],
                          pads=[1, 1, 1, 1], dilations=[1, 1]),
         helper.make_node("Resize", ["e_y", "", "sc"], ["e_up"], name="up", mode="nearest")],
        "else_body", [], [vi("e_up", [1, 4, 8, 8])],
        [init("w_else", rand([4, 3, 3, 3], 5)), init("b_else", rand([4], 6)),
         init("sc", np.array([1, 1, 2, 2], np.float32))],
    )
    nodes = [helper.make_node("If", ["cond"], ["y"], name="myif", then_branch=then_graph, else_branch=else_graph)]
    return make_model(nodes, [vi("x", [1, 3, 8, 8]), vi("cond", [], TensorProto.BOOL)], [vi("y", [1, 4, 8, 8])],
                      [init("w", rand([4, 3, 3, 3]))])


def test_conv_inside_if_branches():
    model = _if_model()
    report = sepify.audit(model)
    names = sorted(n.qualified_name for n in report.nodes)
    assert names == ["myif/else_branch/conv_else", "myif/then_branch/conv"]
    then_node = report.node("myif/then_branch/conv")
    else_node = report.node("myif/else_branch/conv_else")
    assert "myif" in then_node.qualified_name and "then_branch" in then_node.qualified_name
    assert then_node.name == "conv" and then_node.scope == "myif/then_branch"
    assert else_node.scope == "myif/else_branch"

    # onnxruntime: the then branch output is the conv's output
    x = np.random.default_rng(0).standard_normal([1, 3, 8, 8]).astype(np.float32)
    then_y = ort_run(model, feeds={"x": x, "cond": np.array(True)})["y"]
    assert then_node.output_shape == list(then_y.shape) == [1, 4, 8, 8]
    assert then_node.macs == 1 * 4 * 8 * 8 * 3 * 3 * 3
    # else branch: (8 + 2 - 3) // 2 + 1 = 4, upsampled x2 by Resize -> 8
    else_y = ort_run(model, feeds={"x": x, "cond": np.array(False)})["y"]
    assert list(else_y.shape) == [1, 4, 8, 8]
    assert else_node.output_shape == [1, 4, 4, 4]
    assert else_node.macs == 1 * 4 * 4 * 4 * 3 * 3 * 3
    # Both branches are sized statically, so both are in the totals: an upper bound, and said so.
    assert report.totals.conv_macs == then_node.macs + else_node.macs
    [warning] = [w for w in report.warnings if w.startswith("myif:")]
    assert "else_branch, then_branch" in warning and "upper bound" in warning
    assert else_node.has_bias and else_node.flops == 2 * else_node.macs + 1 * 4 * 4 * 4
    assert else_node.params == 4 * 3 * 3 * 3 + 4
    assert then_node.weight_source == "initializer" and else_node.weight_source == "initializer"
    assert report.totals.conv_macs == then_node.macs + else_node.macs


def test_shared_weight_between_two_convs():
    w = rand([3, 3, 3, 3])
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "w"], ["y"], name="conv_b"),
    ]
    model = make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 3, 6, 6])], [init("w", w)])
    report = sepify.audit(model)
    a, b = report.node("conv_a"), report.node("conv_b")
    assert a.weight_shared_with == ["conv_b"]
    assert b.weight_shared_with == ["conv_a"]
    shapes = ort_shapes(model, ["a"])
    assert a.output_shape == shapes["a"] and b.output_shape == shapes["y"]
    assert a.macs == 1 * 3 * 8 * 8 * 3 * 3 * 3 == conv_macs_from_shapes("Conv", [1, 3, 8, 8], [3, 3, 3, 3], shapes["a"])
    assert b.macs == 1 * 3 * 6 * 6 * 3 * 3 * 3 == conv_macs_from_shapes("Conv", shapes["a"], [3, 3, 3, 3], shapes["y"])
    assert report.totals.model_params == 3 * 3 * 3 * 3  # one tensor, counted once


def test_unshared_weights_have_empty_shared_list():
    report = sepify.audit(make_conv_model([1, 3, 8, 8], [4, 3, 3, 3]))
    assert report.nodes[0].weight_shared_with == []


# ----------------------------------------------------------------------------------------------
# Shapes only knowable by running: the onnxruntime fallback
# ----------------------------------------------------------------------------------------------
def _resize_runtime_scales_model():
    """Resize by scales = 16 / H computed at runtime from Shape(x) (shape inference cannot follow)."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        const_node("start", np.array([2], np.int64)),
        const_node("end", np.array([4], np.int64)),
        helper.make_node("Slice", ["s", "start", "end"], ["hw"], name="slice"),
        helper.make_node("Cast", ["hw"], ["hwf"], name="cast", to=TensorProto.FLOAT),
        const_node("sixteen", np.array(16.0, np.float32)),
        helper.make_node("Div", ["sixteen", "hwf"], ["scale_hw"], name="div"),
        const_node("ones", np.array([1, 1], np.float32)),
        helper.make_node("Concat", ["ones", "scale_hw"], ["scales"], name="concat", axis=0),
        helper.make_node("Resize", ["x", "", "scales"], ["r"], name="resize", mode="nearest"),
        helper.make_node("Conv", ["r", "w", "b"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    return make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 4, 14, 14])],
                      [init("w", rand([4, 3, 3, 3])), init("b", rand([4]))])


def _reshape_runtime_target_model():
    """Reshape to a target computed through float arithmetic on Shape(x)."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Cast", ["s"], ["sf"], name="cast", to=TensorProto.FLOAT),
        const_node("factors", np.array([1, 1, 2, 0.5], np.float32)),
        helper.make_node("Mul", ["sf", "factors"], ["tf"], name="mul"),
        helper.make_node("Cast", ["tf"], ["target"], name="cast2", to=TensorProto.INT64),
        helper.make_node("Reshape", ["x", "target"], ["r"], name="reshape"),
        helper.make_node("Conv", ["r", "w"], ["y"], name="conv"),
    ]
    return make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 2, 14, 2])], [init("w", rand([2, 3, 3, 3]))])


@pytest.fixture
def no_onnxruntime_fallback(monkeypatch):
    """Shapes must come from static inference: the onnxruntime fallback fails the test if called."""
    import sepify.pipeline.analysis as analysis

    def refuse(*a, **k):
        raise AssertionError("onnxruntime fallback called")

    monkeypatch.setattr(analysis, "fill_with_onnxruntime", refuse)
    monkeypatch.setattr(analysis, "fill_from_profile", refuse)


def test_shape_values_fold_statically_resize_with_computed_scales(no_onnxruntime_fallback):
    """onnx's inference cannot follow scales computed from Shape(x) through Cast and Div; sepify
    folds those values once x's shape is known (model.shapes._fold_shape_values) and sizes the
    conv exactly as onnxruntime runs it — without a run."""
    model = _resize_runtime_scales_model()
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    known = {v.name for v in inferred.graph.value_info if v.type.tensor_type.HasField("shape")
             and all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim)}
    assert "r" not in known, "precondition: ONNX shape inference must not know the Resize output"
    report = sepify.audit(model)
    node = report.node("conv")
    shapes = ort_shapes(model, ["r", "c"])
    assert shapes["r"] == [1, 3, 16, 16]
    assert node.shape_source == "computed"
    assert node.input_shape == shapes["r"]
    assert node.output_shape == shapes["c"] == [1, 4, 14, 14]
    hand = 1 * 4 * 14 * 14 * 3 * 3 * 3
    assert node.macs == hand == conv_macs_from_shapes("Conv", shapes["r"], [4, 3, 3, 3], shapes["c"])
    assert node.flops == 2 * hand + 1 * 4 * 14 * 14
    assert report.totals.unknown_cost_nodes == 0
    assert report.shape_sources == {"computed": 1}


def test_shape_values_fold_statically_reshape_with_computed_target(no_onnxruntime_fallback):
    model = _reshape_runtime_target_model()
    report = sepify.audit(model)
    node = report.nodes[0]
    shapes = ort_shapes(model, ["r"])
    assert shapes["r"] == [1, 3, 16, 4]
    assert node.shape_source == "computed"
    assert node.input_shape == shapes["r"]
    assert node.output_shape == shapes["y"] == [1, 2, 14, 2]
    assert node.macs == 1 * 2 * 14 * 2 * 3 * 3 * 3 == conv_macs_from_shapes("Conv", shapes["r"], [2, 3, 3, 3], shapes["y"])


def test_onnxruntime_fallback_sizes_what_depends_on_input_values():
    """Scales fed as a graph input (--input-value): no static inference knows them, onnxruntime runs
    the model with the given values and sizes the conv."""
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["r"], name="resize", mode="nearest"),
             helper.make_node("Conv", ["r", "w"], ["c"], name="conv")]
    model = make_model(nodes, [vi("x", [1, 3, 8, 8]), vi("scales", [4])], [vi("c", [1, 4, "H", "W"])], [init("w", rand([4, 3, 3, 3]))])
    report = sepify.audit(model, input_values={"scales": [1, 1, 2, 2]})
    node = report.node("conv")
    assert node.shape_source == "onnxruntime"
    assert node.input_shape == [1, 3, 16, 16] and node.output_shape == [1, 4, 14, 14]
    assert node.macs == 4 * 14 * 14 * 3 * 9


def test_fallback_does_not_modify_callers_model():
    model = _resize_runtime_scales_model()
    before = model.SerializeToString()
    sepify.audit(model)
    assert model.SerializeToString() == before


def test_static_shapes_report_inferred_source():
    report = sepify.audit(make_conv_model([1, 3, 8, 8], [4, 3, 3, 3], declare_output="symbolic"))
    assert report.nodes[0].shape_source in ("inferred", "input", "computed")
    assert report.nodes[0].shape_source != "onnxruntime"


# ----------------------------------------------------------------------------------------------
# Gemm / MatMul totals
# ----------------------------------------------------------------------------------------------
def test_gemm_and_matmul_totals():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"], name="flatten", axis=1),
        # f [1, 256] x B^T, B [10, 256]  ->  M=1, N=10, K=256
        helper.make_node("Gemm", ["f", "B", "C"], ["g"], name="gemm_transb", transB=1),
        # p^T [2, 7] x B2 [7, 5]  ->  M=2, N=5, K=7
        helper.make_node("Gemm", ["p", "B2"], ["g2"], name="gemm_transa", transA=1),
        # [2, 1, 5, 6] @ [3, 6, 7] -> batch (2, 3), M=5, N=7, K=6
        helper.make_node("MatMul", ["m", "M2"], ["mm"], name="matmul_batched"),
        # vector [6] @ [6, 7] -> N=7, K=6
        helper.make_node("MatMul", ["v", "M3"], ["mv"], name="matmul_vector"),
    ]
    inits = [init("w", rand([4, 3, 3, 3])), init("B", rand([10, 256])), init("C", rand([10])),
             init("B2", rand([7, 5])), init("M2", rand([3, 6, 7])), init("M3", rand([6, 7]))]
    model = make_model(
        nodes,
        [vi("x", [1, 3, 8, 8]), vi("p", [7, 2]), vi("m", [2, 1, 5, 6]), vi("v", [6])],
        [vi("g", [1, 10]), vi("g2", [2, 5]), vi("mm", [2, 3, 5, 7]), vi("mv", [7])],
        inits,
    )
    report = sepify.audit(model)
    shapes = ort_shapes(model, ["f"])
    assert shapes["f"] == [1, 256] and shapes["g"] == [1, 10] and shapes["g2"] == [2, 5]
    assert shapes["mm"] == [2, 3, 5, 7] and shapes["mv"] == [7]
    gemm1 = 1 * 10 * 256
    gemm2 = 2 * 5 * 7
    mm = (2 * 3) * 5 * 7 * 6
    mv = 1 * 7 * 6
    conv = 1 * 4 * 8 * 8 * 3 * 3 * 3
    t = report.totals
    assert t.matmul_macs == gemm1 + gemm2 + mm + mv
    assert t.conv_macs == conv == report.node("conv").macs
    assert t.total_macs == conv + gemm1 + gemm2 + mm + mv
    assert report.node("conv").share == pytest.approx(conv / t.total_macs)
    assert t.model_params == 4 * 27 + 10 * 256 + 10 + 7 * 5 + 3 * 6 * 7 + 6 * 7


def test_matmul_with_runtime_shape_uses_fallback():
    """A MatMul operand whose shape only onnxruntime knows is still counted."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Cast", ["s"], ["sf"], name="cast", to=TensorProto.FLOAT),
        const_node("factors", np.array([1, 2, 0.5], np.float32)),
        helper.make_node("Mul", ["sf", "factors"], ["tf"], name="mul"),
        helper.make_node("Cast", ["tf"], ["target"], name="cast2", to=TensorProto.INT64),
        helper.make_node("Reshape", ["x", "target"], ["r"], name="reshape"),  # [2, 4, 8] -> [2, 8, 4]
        helper.make_node("MatMul", ["r", "M"], ["y"], name="matmul"),
    ]
    model = make_model(nodes, [vi("x", [2, 4, 8])], [vi("y", [2, 8, 5])], [init("M", rand([4, 5]))])
    report = sepify.audit(model)
    shapes = ort_shapes(model, ["r"])
    assert shapes["r"] == [2, 8, 4]
    assert report.totals.matmul_macs == 2 * 8 * 5 * 4
    assert not report.warnings


def _matmul_if_model() -> onnx.ModelProto:
    """``If(cond)``: then x [2, 4, 8] is reshaped to [2, 8, 4] through a runtime-only target, then
    MatMul by M [4, 5] -> [2, 8, 5], Flatten -> [2, 40], Gemm by G [40, 3] -> [2, 3]; else MatMul by
    M2 [8, 3] -> [2, 4, 3], Flatten -> [2, 12], Gemm by G2^T (transB) -> [2, 3]: shapes inference knows."""
    then_graph = helper.make_graph([
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Cast", ["s"], ["sf"], name="cast", to=TensorProto.FLOAT),
        const_node("factors", np.array([1, 2, 0.5], np.float32)),
        helper.make_node("Mul", ["sf", "factors"], ["tf"], name="mul"),
        helper.make_node("Cast", ["tf"], ["target"], name="cast2", to=TensorProto.INT64),
        helper.make_node("Reshape", ["x", "target"], ["r"], name="reshape"),
        helper.make_node("MatMul", ["r", "M"], ["t_mm"], name="t_matmul"),
        helper.make_node("Flatten", ["t_mm"], ["t_f"], name="t_flatten", axis=1),
        helper.make_node("Gemm", ["t_f", "G"], ["t_y"], name="t_gemm"),
    ], "then", [], [vi("t_y", [2, 3])])
    else_graph = helper.make_graph([
        helper.make_node("MatMul", ["x", "M2"], ["e_mm"], name="e_matmul"),
        helper.make_node("Flatten", ["e_mm"], ["e_f"], name="e_flatten", axis=1),
        helper.make_node("Gemm", ["e_f", "G2"], ["e_y"], name="e_gemm", transB=1),
    ], "else", [], [vi("e_y", [2, 3])])
    return make_model([helper.make_node("If", ["cond"], ["y"], name="myif", then_branch=then_graph,
                                        else_branch=else_graph)],
                      [vi("x", [2, 4, 8]), vi("cond", [], TensorProto.BOOL)], [vi("y", [2, 3])],
                      [init("M", rand([4, 5])), init("G", rand([40, 3], 1)), init("M2", rand([8, 3], 2)),
                       init("G2", rand([3, 12], 3))])


def test_matmul_in_if_branch_sized_by_the_profiled_run():
    """Gemm/MatMul operands inside an If body that only a run can size come from the profiled
    onnxruntime run, like convs: counted in the branch that runs, reported in the one that does not."""
    model = _matmul_if_model()
    x = np.random.default_rng(0).standard_normal([2, 4, 8]).astype(np.float32)
    assert list(ort_run(model, feeds={"x": x, "cond": np.array(True)})["y"].shape) == [2, 3]
    assert list(ort_run(model, feeds={"x": x, "cond": np.array(False)})["y"].shape) == [2, 3]
    then_macs = 2 * 8 * 5 * 4 + 2 * 3 * 40  # MatMul batch·M·N·K + Gemm M·N·K
    else_macs = 2 * 4 * 3 * 8 + 2 * 3 * 12  # inferred statically: counted either way
    taken = sepify.audit(model, input_values={"cond": True}, spectra=False)
    assert taken.totals.matmul_macs == taken.totals.total_macs == then_macs + else_macs
    # both branches in the totals: the only warning says they are an upper bound
    assert [w.split(":")[0] for w in taken.warnings] == ["myif"] and "upper bound" in taken.warnings[0]
    skipped = sepify.audit(model, input_values={"cond": False}, spectra=False)
    assert skipped.totals.matmul_macs == else_macs
    assert not any(w.startswith("myif:") for w in skipped.warnings)  # one branch counted
    for name in ("myif/then_branch/t_matmul", "myif/then_branch/t_gemm"):
        assert any(w.startswith(name + ":") and "not counted" in w for w in skipped.warnings), name


def test_profile_events_decodes_only_the_wanted_nodes_lines(tmp_path):
    """onnxruntime's profile has one event per line; only the wanted nodes' lines are decoded, up to
    the first of each with both shapes (a Loop body logs one per iteration); a file laid out otherwise
    is decoded whole, with the same result."""
    import json

    from sepify.model.shapes import _profile_events

    def ev(name, args):
        return {"cat": "Node", "pid": 1, "tid": 1, "dur": 3, "ts": 0, "ph": "X", "name": name + "_kernel_time",
                "args": args}

    both = {"input_type_shape": [{"float": [1, 2]}], "output_type_shape": [{"float": [1, 3]}]}
    events = [{"cat": "Session", "name": "model_loading_uri", "args": {}},
              ev("conv", {"input_type_shape": [{"float": [1, 2]}]}),  # no output shape: keep looking
              ev("other", both), ev("conv", both), ev('q"uoted', both),
              *[ev("conv", {"input_type_shape": [{"float": [9, 9]}], "output_type_shape": [{"float": [9]}]})] * 50]
    lines = tmp_path / "lines.json"
    lines.write_text("[\n" + ",\n".join(json.dumps(e, separators=(",", " :")) for e in events) + "\n]\n")
    got = _profile_events(str(lines), {"conv", 'q"uoted'})
    assert [e["name"] for e in got] == ["conv_kernel_time", "conv_kernel_time", 'q"uoted_kernel_time']
    assert got[1]["args"] == both
    whole = tmp_path / "whole.json"
    whole.write_text(json.dumps(events))
    assert [e["name"] for e in _profile_events(str(whole), {"conv"}) if e.get("name", "").startswith("conv")][:2] == \
        ["conv_kernel_time", "conv_kernel_time"]


# ----------------------------------------------------------------------------------------------
# ONNX's own backend test cases
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _onnx_cases(op_type: str):
    from onnx.backend.test.case import node as node_cases

    with warnings.catch_warnings():  # the case generators emit numpy overflow warnings
        warnings.simplefilter("ignore")
        cases = [c for c in node_cases.collect_testcases(op_type)
                 if c.model is not None and len(c.model.graph.node) == 1 and c.model.graph.node[0].op_type == op_type]
    if cases:
        return cases
    # collect_testcases() imports the case modules only once, so a second call with another
    # op_type returns the first call's list: re-run this operator's exporters instead.
    import importlib

    saved = (node_cases._TargetOpType, node_cases._NodeTestCases, node_cases._existing_names)
    node_cases._TargetOpType, node_cases._NodeTestCases, node_cases._existing_names = op_type, [], {}
    try:
        module = importlib.import_module(f"onnx.backend.test.case.node.{op_type.lower()}")
        cls = getattr(module, op_type)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for attr_name in dir(cls):
                if attr_name.startswith("export"):
                    np.random.seed(0)
                    getattr(cls, attr_name)()
        cases = list(node_cases._NodeTestCases)
    finally:
        node_cases._TargetOpType, node_cases._NodeTestCases, node_cases._existing_names = saved
    return [c for c in cases if c.model.graph.node[0].op_type == op_type]


_WEIGHT_INDEX = {"Conv": 1, "ConvTranspose": 1, "ConvInteger": 1, "QLinearConv": 3}
_BIAS_INDEX = {"Conv": 2, "ConvTranspose": 2, "ConvInteger": None, "QLinearConv": 8}


def _frozen(case, op_type) -> tuple[onnx.ModelProto, list[int], list[int], list[int], int]:
    """The case's model with the weight (and every other non-data input: scales, zero points,
    bias) turned into initializers.  Returns (model, x shape, w shape, expected y shape, bias numel)."""
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    node = model.graph.node[0]
    inputs, outputs = case.data_sets[0]
    values = dict(zip([n for n in node.input if n], inputs))
    x_name = node.input[0]
    w = np.asarray(values[node.input[_WEIGHT_INDEX[op_type]]])
    kept = [i for i in model.graph.input if i.name == x_name]
    for i in model.graph.input:
        if i.name != x_name:
            model.graph.initializer.append(init(i.name, np.asarray(values[i.name])))
    del model.graph.input[:]
    model.graph.input.extend(kept)
    bi = _BIAS_INDEX[op_type]
    bias_numel = np.asarray(values[node.input[bi]]).size if bi is not None and len(node.input) > bi and node.input[bi] else 0
    x_shape = list(np.asarray(values[x_name]).shape)
    y_shape = list(np.asarray(outputs[0]).shape)
    return model, x_shape, list(w.shape), y_shape, bias_numel


def _case_params():
    params = []
    for op in ("Conv", "ConvTranspose", "ConvInteger", "QLinearConv"):
        for case in _onnx_cases(op):
            params.append(pytest.param(op, case.name, id=f"{op}-{case.name}"))
    return params


@pytest.mark.parametrize("op_type,case_name", _case_params())
def test_onnx_backend_conv_cases(op_type, case_name):
    case = next(c for c in _onnx_cases(op_type) if c.name == case_name)
    model, x_shape, w_shape, y_shape, bias_numel = _frozen(case, op_type)
    report = sepify.audit(model)
    assert len(report.nodes) == 1
    node = report.nodes[0]
    expected = conv_macs_from_shapes(op_type, x_shape, w_shape, y_shape)
    assert node.input_shape == x_shape
    assert node.output_shape == y_shape
    assert node.weight_shape == w_shape
    assert node.macs == expected
    assert node.params == prod(w_shape) + bias_numel
    assert node.flops == 2 * expected + (prod(y_shape) if bias_numel else 0)
    if op_type in ("ConvInteger", "QLinearConv"):
        assert node.eligible is False and node.reason == "quantized_op"
    # onnxruntime agrees with the data set's expected output shape (where it implements the case)
    x = np.asarray(case.data_sets[0][0][0])
    try:
        got = ort_run(model, feeds={model.graph.input[0].name: x})
    except Exception as exc:  # e.g. per-channel ConvInteger zero points: "not supported now"
        if "not supported" not in str(exc).lower():
            raise
        return
    assert list(next(iter(got.values())).shape) == y_shape


def test_onnx_backend_cases_were_found():
    assert len(_onnx_cases("Conv")) >= 5
    assert len(_onnx_cases("ConvTranspose")) >= 8
    assert len(_onnx_cases("ConvInteger")) >= 1
    assert len(_onnx_cases("QLinearConv")) >= 1


def test_qlinearconv_with_bias_grouped():
    """QLinearConv: weight at input 3, bias at input 8; group 2, stride 2, pad 1."""
    rng = np.random.default_rng(0)
    inits = [init("xs", np.array(0.1, np.float32)), init("xz", np.array(128, np.uint8)),
             init("w", rng.integers(0, 255, [8, 2, 3, 3]).astype(np.uint8)),
             init("ws", np.array(0.05, np.float32)), init("wz", np.array(100, np.uint8)),
             init("ys", np.array(0.2, np.float32)), init("yz", np.array(128, np.uint8)),
             init("B", np.arange(8, dtype=np.int32))]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "B"], ["y"], name="qconv",
                            group=2, pads=[1, 1, 1, 1], strides=[2, 2])
    model = make_model([node], [vi("x", [1, 4, 6, 6], TensorProto.UINT8)], [vi("y", [1, 8, 3, 3], TensorProto.UINT8)],
                       inits)
    ort_y = ort_shapes(model)["y"]
    # (6 + 2 - 3) // 2 + 1 = 3
    assert ort_y == [1, 8, 3, 3]
    n = sepify.audit(model).nodes[0]
    hand = 1 * 8 * 3 * 3 * (4 // 2) * 3 * 3
    assert n.macs == hand == conv_macs_from_shapes("Conv", [1, 4, 6, 6], [8, 2, 3, 3], ort_y)
    assert n.params == 8 * 2 * 3 * 3 + 8
    assert n.flops == 2 * hand + 1 * 8 * 3 * 3
    assert n.has_bias and n.reason == "quantized_op"


# ----------------------------------------------------------------------------------------------
# Unknown shapes, and what the totals count
# ----------------------------------------------------------------------------------------------
def _runtime_weight_model(kernel_shape_attr: bool):
    """The weight is ConstantOfShape(target) with target computed by float arithmetic on Shape(x):
    its shape [4, 3, 3, 3] is only knowable by running the model."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Cast", ["s"], ["sf"], name="cast", to=TensorProto.FLOAT),
        const_node("factors", np.array([4, 1, 3 / 8, 3 / 8], np.float32)),
        helper.make_node("Mul", ["sf", "factors"], ["tf"], name="mul"),
        helper.make_node("Cast", ["tf"], ["target"], name="cast2", to=TensorProto.INT64),
        helper.make_node("ConstantOfShape", ["target"], ["w"], name="cos",
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])),
        helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1],
                         **({"kernel_shape": [3, 3]} if kernel_shape_attr else {})),
    ]
    return make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 4, 8, 8])])


@pytest.mark.parametrize("kernel_shape_attr", [True, False], ids=["kernel_shape", "no_kernel_shape"])
def test_weight_shape_only_known_by_running(kernel_shape_attr):
    model = _runtime_weight_model(kernel_shape_attr)
    shapes = ort_shapes(model, ["w"])
    assert shapes["w"] == [4, 3, 3, 3] and shapes["y"] == [1, 4, 8, 8]
    report = sepify.audit(model)  # must not crash
    node = report.nodes[0]
    if node.macs is None:  # an uncounted cost must at least be reported
        assert any("conv" in w for w in report.warnings), "cost not counted, but no warning"
    assert node.weight_source == "computed"
    assert node.reason == "weight_not_constant"
    assert node.weight_shape == shapes["w"]
    assert node.macs == 1 * 4 * 8 * 8 * 3 * 3 * 3 == conv_macs_from_shapes("Conv", [1, 3, 8, 8], shapes["w"], shapes["y"])
    assert node.params == 4 * 3 * 3 * 3


def test_runtime_shape_inside_subgraph_is_right_or_reported():
    """A conv in an If branch whose input shape only a run can tell: either its cost is right
    (shape_source "onnxruntime") or it is left out with a warning — never a wrong number."""
    then_nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Cast", ["s"], ["sf"], name="cast", to=TensorProto.FLOAT),
        const_node("factors", np.array([1, 1, 2, 0.5], np.float32)),
        helper.make_node("Mul", ["sf", "factors"], ["tf"], name="mul"),
        helper.make_node("Cast", ["tf"], ["target"], name="cast2", to=TensorProto.INT64),
        helper.make_node("Reshape", ["x", "target"], ["r"], name="reshape"),
        helper.make_node("Conv", ["r", "w"], ["t_y"], name="conv"),
    ]
    then_graph = helper.make_graph(then_nodes, "then", [], [vi("t_y", [1, 2, 14, 2])])
    else_graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["e0"], name="conv_else"),
         helper.make_node("Reshape", ["e0", "shp"], ["e_y"], name="reshape_else")],
        "else", [], [vi("e_y", [1, 2, 14, 2])], [init("shp", np.array([1, 2, 14, 2], np.int64))])
    model = make_model([helper.make_node("If", ["cond"], ["y"], name="myif", then_branch=then_graph,
                                         else_branch=else_graph)],
                       [vi("x", [1, 3, 8, 8]), vi("cond", [], TensorProto.BOOL)], [vi("y", [1, 2, 14, 2])],
                       [init("w", rand([2, 3, 3, 3]))])
    report = sepify.audit(model)
    runtime = report.node("myif/then_branch/conv")
    known = report.node("myif/else_branch/conv_else")
    assert known.macs == 1 * 2 * 6 * 6 * 3 * 3 * 3
    assert runtime.params == 2 * 3 * 3 * 3  # the weight is known either way
    x = np.random.default_rng(0).standard_normal([1, 3, 8, 8]).astype(np.float32)
    assert list(ort_run(model, feeds={"x": x, "cond": np.array(True)})["y"].shape) == [1, 2, 14, 2]
    if runtime.macs is None:
        assert runtime.flops is None and runtime.shape_source == "unknown"
        assert report.totals.unknown_cost_nodes == 1
        assert report.totals.conv_macs == known.macs
        assert any("myif/then_branch/conv" in w for w in report.warnings)
    else:
        # Reshape [1, 3, 8, 8] -> [1, 3, 16, 4]; conv 3x3 -> [1, 2, 14, 2]
        assert runtime.shape_source == "onnxruntime"
        assert runtime.input_shape == [1, 3, 16, 4]
        assert runtime.output_shape == [1, 2, 14, 2]
        assert runtime.macs == 1 * 2 * 14 * 2 * 3 * 3 * 3
        assert report.totals.conv_macs == known.macs + runtime.macs


def _runtime_reshape_branch(tag: str, strides: list[int]) -> onnx.GraphProto:
    """Reshape x [1, 3, 8, 8] -> [1, 3, 16, 4] through a runtime-only target, then a conv named "conv"."""
    nodes = [
        helper.make_node("Shape", ["x"], [f"{tag}_s"], name=f"{tag}_shape"),
        helper.make_node("Cast", [f"{tag}_s"], [f"{tag}_sf"], name=f"{tag}_cast", to=TensorProto.FLOAT),
        const_node(f"{tag}_factors", np.array([1, 1, 2, 0.5], np.float32)),
        helper.make_node("Mul", [f"{tag}_sf", f"{tag}_factors"], [f"{tag}_tf"], name=f"{tag}_mul"),
        helper.make_node("Cast", [f"{tag}_tf"], [f"{tag}_target"], name=f"{tag}_cast2", to=TensorProto.INT64),
        helper.make_node("Reshape", ["x", f"{tag}_target"], [f"{tag}_r"], name=f"{tag}_reshape"),
        helper.make_node("Conv", [f"{tag}_r", "w"], [f"{tag}_c"], name="conv", strides=strides),
        helper.make_node("Flatten", [f"{tag}_c"], [f"{tag}_y"], name=f"{tag}_flatten", axis=0),
    ]
    return helper.make_graph(nodes, tag, [], [vi(f"{tag}_y", [1, "F"])])


def test_same_node_name_in_both_if_branches_gets_each_its_own_shape():
    """Exporters often reuse node names across branches; the executed branch's shapes must not be
    attributed to the other branch's node of the same name."""
    model = make_model(
        [helper.make_node("If", ["cond"], ["y"], name="myif", then_branch=_runtime_reshape_branch("t", [1, 1]),
                          else_branch=_runtime_reshape_branch("e", [2, 2]))],
        [vi("x", [1, 3, 8, 8]), vi("cond", [], TensorProto.BOOL)], [vi("y", [1, "F"])],
        [init("w", rand([2, 3, 3, 3]))])
    x = np.random.default_rng(0).standard_normal([1, 3, 8, 8]).astype(np.float32)
    # then: [1, 3, 16, 4] -> stride 1 -> [1, 2, 14, 2];  else: stride 2 -> [1, 2, 7, 1]
    assert list(ort_run(model, feeds={"x": x, "cond": np.array(True)})["y"].shape) == [1, 2 * 14 * 2]
    assert list(ort_run(model, feeds={"x": x, "cond": np.array(False)})["y"].shape) == [1, 2 * 7 * 1]
    report = sepify.audit(model)
    expected = {
        "myif/then_branch/conv": ([1, 2, 14, 2], 1 * 2 * 14 * 2 * 3 * 3 * 3),
        "myif/else_branch/conv": ([1, 2, 7, 1], 1 * 2 * 7 * 1 * 3 * 3 * 3),
    }
    for qualified, (y_shape, macs) in expected.items():
        node = report.node(qualified)
        if node.macs is None:
            assert any(qualified in w for w in report.warnings)
        else:
            assert node.output_shape == y_shape, qualified
            assert node.macs == macs, qualified


def test_model_params_count_constant_node_weights():
    """Weights held in Constant nodes are model parameters too (conv_params must not exceed model_params)."""
    model = WEIGHT_SOURCES["constant_node"](True)
    t = sepify.audit(model).totals
    assert t.conv_params == 4 * 3 * 3 * 3 + 4
    assert t.model_params == 4 * 3 * 3 * 3 + 4


def test_model_params_count_subgraph_initializers():
    """The If model holds w (108) in the main graph and w_else (108) + b_else (4) + the Resize
    scales sc (4) in the else branch; model_params counts every float tensor, conv_params the convs'."""
    t = sepify.audit(_if_model()).totals
    assert t.conv_params == 108 + 108 + 4  # per node: then conv 108, else conv 108 + 4
    assert t.model_params == 108 + 108 + 4 + 4


def test_shared_weight_counted_once_in_conv_params():
    w = rand([3, 3, 3, 3])
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "w"], ["y"], name="conv_b"),
    ]
    model = make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 3, 6, 6])], [init("w", w)])
    report = sepify.audit(model)
    assert report.node("conv_a").params == report.node("conv_b").params == 81  # per node: its weight
    assert report.totals.model_params == 81
    assert report.totals.conv_params == 81, "a shared weight's parameters must not be counted twice"


# ----------------------------------------------------------------------------------------------
# Property: random geometries agree with onnxruntime
# ----------------------------------------------------------------------------------------------
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def _conv_geometries(draw):
    op_type = draw(st.sampled_from(["Conv", "ConvTranspose"]))
    d = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2]))
    cin = group * draw(st.integers(1, 2))
    cout_g = draw(st.integers(1, 2))
    kernel = [draw(st.integers(1, 4)) for _ in range(d)]
    strides = [draw(st.integers(1, 3)) for _ in range(d)]
    auto_pad = draw(st.sampled_from(["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    # onnxruntime refuses dilations with SAME_* (Conv)
    dilations = [1] * d if auto_pad.startswith("SAME") else [draw(st.integers(1, 2)) for _ in range(d)]
    eff = [(k - 1) * dl + 1 for k, dl in zip(kernel, dilations)]
    attrs = dict(strides=strides, dilations=dilations, group=group)
    if op_type == "Conv":
        spatial = [draw(st.integers(e, e + 6)) for e in eff]
        w_shape = [cout_g * group, cin // group, *kernel]
        if auto_pad == "NOTSET":
            attrs["pads"] = [draw(st.integers(0, k - 1)) for k in kernel] + [draw(st.integers(0, k - 1)) for k in kernel]
    else:
        spatial = [draw(st.integers(1, 5)) for _ in range(d)]
        w_shape = [cin, cout_g, *kernel]
        attrs["output_padding"] = [draw(st.integers(0, s - 1)) for s in strides]  # onnxruntime: < stride
        if auto_pad == "NOTSET":
            natural = [s * (i - 1) + op + e for s, i, op, e in zip(strides, spatial, attrs["output_padding"], eff)]
            begins = [draw(st.integers(0, min(k - 1, (n - 1) // 2))) for k, n in zip(kernel, natural)]
            ends = [draw(st.integers(0, min(k - 1, (n - 1) // 2))) for k, n in zip(kernel, natural)]
            attrs["pads"] = begins + ends
    if auto_pad != "NOTSET":
        attrs["auto_pad"] = auto_pad
    batch = draw(st.integers(1, 2))
    return op_type, [batch, cin, *spatial], w_shape, attrs


@settings(max_examples=60, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.generate, Phase.shrink])
@given(_conv_geometries(), st.booleans())
def test_random_geometry_matches_onnxruntime(geometry, bias):
    op_type, x_shape, w_shape, attrs = geometry
    model = make_conv_model(x_shape, w_shape, op_type=op_type, bias=bias, declare_output="symbolic", **attrs)
    feeds = {"x": np.random.default_rng(1).standard_normal(x_shape).astype(np.float32)}
    want = ort_run(model, feeds=feeds)["y"]
    node = sepify.audit(model, spectra=False).nodes[0]
    assert node.output_shape == list(want.shape)
    macs = conv_macs_from_shapes(op_type, x_shape, w_shape, list(want.shape))
    assert node.macs == macs
    assert node.flops == conv_flops(macs, list(want.shape), bias)
    assert node.params == prod(w_shape) + (want.shape[1] if bias else 0)
    # the reported explicit pads compute the same values
    equivalent = _explicit_equivalent(op_type, x_shape, w_shape, attrs, node.pads, node.output_shape, bias)
    got = ort_run(equivalent, feeds=feeds)["y"]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
