"""Convs quantized by onnxruntime's own tool (``onnxruntime.quantization``) on a tiny model.

QDQ format keeps a float ``Conv`` whose weight is an int8 initializer through ``DequantizeLinear``
(opset 13 as the quantizer writes it): sepify must see that weight as a constant and report the conv
``quantized_weight`` — onnx's reference evaluator implements DequantizeLinear only from opset 19,
and a failed fold used to make such weights ``computed`` (``weight_not_constant``). QOperator format
gives ``QLinearConv`` (``quantized_op``). A lossless rewrite leaves both alone although the float
weight they quantize is exactly rank 1.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import sepify
from sepify import Policy

from conftest import init, make_model, ort_run, vi

quantization = pytest.importorskip("onnxruntime.quantization")

X = [1, 3, 10, 10]
MACS = 1 * 4 * 8 * 8 * 3 * 9  # Y [1, 4, 8, 8], C_in 3, 3x3


def _float_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    # Exactly rank 1 per input channel (dw-pw) and per kernel: a float conv a lossless rewrite would split.
    w = np.einsum("n,c,h,w->nchw", rng.uniform(0.5, 1, 4), rng.uniform(0.5, 1, 3), [1.0, 2.0, 1.0],
                  [1.0, 0.0, -1.0]).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return make_model(nodes, [vi("x", X)], [vi("y", [1, 4, 8, 8])],
                      [init("w", w), init("b", np.linspace(-1, 1, 4).astype(np.float32))], opset=13)


class _Reader(quantization.CalibrationDataReader):
    def __init__(self):
        rng = np.random.default_rng(1)
        self._it = iter([{"x": rng.standard_normal(X).astype(np.float32)} for _ in range(2)])

    def get_next(self):
        return next(self._it, None)


def _quantize(tmp_path, fmt: str, per_channel: bool) -> onnx.ModelProto:
    src, dst = tmp_path / "f.onnx", tmp_path / f"{fmt}_{per_channel}.onnx"
    onnx.save(_float_model(), src)
    quant_format = quantization.QuantFormat.QDQ if fmt == "qdq" else quantization.QuantFormat.QOperator
    quantization.quantize_static(str(src), str(dst), _Reader(), quant_format=quant_format, per_channel=per_channel,
                                 activation_type=quantization.QuantType.QUInt8,
                                 weight_type=quantization.QuantType.QInt8)
    return onnx.load(dst)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("fmt,op,reason", [("qdq", "Conv", "quantized_weight"),
                                           ("qop", "QLinearConv", "quantized_op")])
def test_onnxruntime_quantized_conv_is_costed_and_left_alone(tmp_path, fmt, op, reason, per_channel):
    model = _quantize(tmp_path, fmt, per_channel)
    assert [n.op_type for n in model.graph.node if "Conv" in n.op_type] == [op]
    node = sepify.audit(model).nodes[0]
    assert (node.op_type, node.eligible, node.reason) == (op, False, reason)
    assert node.macs == MACS and node.weight_shape == [4, 3, 3, 3]
    if fmt == "qdq":
        assert node.weight_source == "constant_subgraph"
    out, report = sepify.rewrite(model, Policy(mode="lossless"))
    assert not report.changed and out.SerializeToString() == model.SerializeToString()
    assert {k: v.shape for k, v in ort_run(out).items()} == {"y": (1, 4, 8, 8)}


@pytest.mark.parametrize("opset", [10, 13, 19, 21])
def test_dequantize_linear_weight_folds_at_every_opset(opset):
    """A hand-built int8 weight through DequantizeLinear (per-tensor at opset 10, per-axis from 13)."""
    rng = np.random.default_rng(2)
    q = rng.integers(-127, 128, [4, 3, 3, 3]).astype(np.int8)
    per_axis = opset >= 13
    scale = np.linspace(0.01, 0.04, 4).astype(np.float32) if per_axis else np.array(0.02, np.float32)
    zp = np.zeros(4 if per_axis else (), np.int8)
    dq = helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], name="dq", **({"axis": 0} if per_axis else {}))
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    model = make_model([dq, conv], [vi("x", X)], [vi("y", [1, 4, 8, 8])],
                       [init("wq", q), init("ws", scale), init("wz", zp)], opset=opset)
    from sepify.model.graph import GraphView

    view = GraphView(model)
    info = view.constant("w", next(r for r in view.nodes if r.op_type == "Conv"))
    assert info is not None and info.via_dequantize
    expected = q.astype(np.float32) * (scale.reshape(4, 1, 1, 1) if per_axis else scale)
    np.testing.assert_array_equal(info.value, expected)
    node = sepify.audit(model).nodes[0]
    assert (node.reason, node.weight_source, node.macs) == ("quantized_weight", "constant_subgraph", MACS)
    assert node.input_shape == X and node.output_shape == [1, 4, 8, 8]
    assert TensorProto.FLOAT == model.graph.output[0].type.tensor_type.elem_type


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_quantized_weights_are_model_parameters(tmp_path, fmt):
    """An int8 model's weights are its parameters (the float scales alone used to be counted)."""
    report = sepify.audit(_quantize(tmp_path, fmt, per_channel=True))
    weight = 4 * 3 * 3 * 3
    assert report.totals.model_params >= weight + 4  # the int8 weight and the int32 (or float) bias
