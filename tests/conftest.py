"""Shared model-building helpers for the sepify tests.

Every model is built at ``IR_VERSION`` 10 / opset 17 with fully declared input and
output shapes (or symbolic dims where the test wants them), so that it passes the
ONNX checker that :func:`sepify.model.load.load_model` runs.  ``ort_*`` helpers run a model
with onnxruntime to obtain the shapes it *actually* produces, which the tests use as
the ground truth next to hand-computed values.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10
OPSET = 17


# ----------------------------------------------------------------------------------------------
# Small builders
# ----------------------------------------------------------------------------------------------
def vi(name: str, shape: Sequence | None, dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    """A tensor value info; ``str`` dims become symbolic (dim_param)."""
    return helper.make_tensor_value_info(name, dtype, None if shape is None else list(shape))


def init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def rand(shape: Sequence[int], seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(list(shape)).astype(dtype)


def const_node(output: str, array: np.ndarray, name: str | None = None) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [output], name=name or f"const_{output}",
                            value=numpy_helper.from_array(np.asarray(array), f"{output}_value"))


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    *,
    name: str = "g",
    value_info: Sequence[onnx.ValueInfoProto] = (),
    opset: int = OPSET,
    ir_version: int = IR_VERSION,
    check: bool = True,
) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(initializers),
                              value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="sepify-tests")
    model.ir_version = ir_version
    if check:
        onnx.checker.check_model(model)
    return model


def prod(values: Iterable[int]) -> int:
    return math.prod(int(v) for v in values)


# ----------------------------------------------------------------------------------------------
# onnxruntime ground truth
# ----------------------------------------------------------------------------------------------
def _concrete(shape: Sequence, overrides: Sequence[int] | None) -> list[int]:
    if overrides is not None:
        return [int(d) for d in overrides]
    dims = []
    for axis, d in enumerate(shape):
        if isinstance(d, int) and d > 0:
            dims.append(d)
        elif axis == 0:
            dims.append(1)  # sepify's documented default for a symbolic leading (batch) dim
        else:
            raise ValueError(f"symbolic dim {d!r} at axis {axis} needs an explicit shape")
    return dims


def _declared(vinfo: onnx.ValueInfoProto) -> list | None:
    tt = vinfo.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]


def ort_feeds(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None,
              seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds for every (non-initializer) graph input, at the declared or given dims."""
    input_shapes = dict(input_shapes or {})
    inits = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = _concrete(_declared(inp) or [], input_shapes.get(inp.name))
        np_dtype = helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        if np_dtype == np.bool_:
            feeds[inp.name] = np.array(rng.integers(0, 2, size=dims), dtype=np.bool_)
        elif np.issubdtype(np_dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(dims).astype(np_dtype)
        else:
            feeds[inp.name] = rng.integers(0, 10, size=dims).astype(np_dtype)
    return feeds


def ort_run(model: onnx.ModelProto, tensors: Sequence[str] = (), *,
            input_shapes: Mapping[str, Sequence[int]] | None = None,
            feeds: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Run ``model`` with onnxruntime; return the graph outputs plus the named intermediate tensors.

    The caller's model is not modified (a copy exposes the intermediates as outputs).
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    existing = [o.name for o in copy.graph.output]
    for name in tensors:
        if name not in existing:
            copy.graph.output.add().name = name
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(copy.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds = dict(feeds) if feeds is not None else ort_feeds(model, input_shapes)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def ort_shapes(model: onnx.ModelProto, tensors: Sequence[str] = (), *,
               input_shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in ort_run(model, tensors, input_shapes=input_shapes).items()}


# ----------------------------------------------------------------------------------------------
# The cost convention, written once from shapes (tests also spell it out by hand)
# ----------------------------------------------------------------------------------------------
def conv_macs_from_shapes(op_type: str, x_shape: Sequence[int], w_shape: Sequence[int],
                          y_shape: Sequence[int]) -> int:
    """Conv: prod(y) × (C_in/group) × prod(k);  ConvTranspose: prod(x) × (C_out/group) × prod(k).

    In both cases the weight's dim 1 is the per-group channel count the formula needs.
    """
    kernel = prod(w_shape[2:])
    if op_type == "ConvTranspose":
        return prod(x_shape) * int(w_shape[1]) * kernel
    return prod(y_shape) * int(w_shape[1]) * kernel


def conv_flops(macs: int, y_shape: Sequence[int], bias: bool) -> int:
    return 2 * macs + (prod(y_shape) if bias else 0)


# ----------------------------------------------------------------------------------------------
# One-conv models
# ----------------------------------------------------------------------------------------------
def make_conv_model(
    x_shape: Sequence,
    w_shape: Sequence[int],
    *,
    op_type: str = "Conv",
    bias: bool = False,
    weight: str = "initializer",
    y_shape: Sequence | None = None,
    declare_output: str = "full",
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    node_name: str = "conv",
    seed: int = 0,
    dtype=np.float32,
    **attrs,
) -> onnx.ModelProto:
    """A model ``y = <op_type>(x, w[, b])``.

    ``weight``: ``"initializer"`` | ``"constant"`` (a Constant node) | ``"input"`` (a graph input).
    ``declare_output``: ``"full"`` declares the output dims — ``y_shape`` if given, else the shape
    onnxruntime produces (a symbolic batch dim of ``x`` stays symbolic, as do spatial dims when
    ``x`` has symbolic spatial dims); ``"symbolic"`` declares only the rank (dims ``y0, y1, …``), so
    the output shape has to be worked out by shape inference.
    """
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    w = rand(w_shape, seed, dtype)
    c_out = w_shape[1] * attrs.get("group", 1) if op_type == "ConvTranspose" else w_shape[0]
    b = rand([c_out], seed + 1, dtype)
    inputs = [vi("x", x_shape, elem)]
    initializers: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    if weight == "initializer":
        initializers.append(init("w", w))
    elif weight == "constant":
        nodes.append(const_node("w", w))
    elif weight == "input":
        inputs.append(vi("w", list(w_shape), elem))
    else:
        raise ValueError(weight)
    conv_inputs = ["x", "w"]
    if bias:
        initializers.append(init("b", b))
        conv_inputs.append("b")
    nodes.append(helper.make_node(op_type, conv_inputs, ["y"], name=node_name, **attrs))
    rank = len(x_shape)

    def build(out_shape):
        return make_model(nodes, inputs, [vi("y", out_shape, elem)], initializers)

    if declare_output == "symbolic":
        return build([f"y{i}" for i in range(rank)])
    if y_shape is not None:
        return build(y_shape)
    probe = build([f"y{i}" for i in range(rank)])
    ort_in = dict(input_shapes or {})
    if weight == "input":
        ort_in.setdefault("w", list(w_shape))
    actual = ort_shapes(probe, input_shapes=ort_in)["y"]
    declared: list = list(actual)
    if isinstance(x_shape[0], str):
        declared[0] = x_shape[0]
    if any(isinstance(d, str) for d in x_shape[2:]):
        declared[2:] = [f"y{i}" for i in range(2, rank)]
    return build(declared)


@pytest.fixture
def conv_model_factory():
    return make_conv_model


def long_names_model(layers: int = 10) -> onnx.ModelProto:
    """3x3 convs with exporter-style node names far longer than a table cell or a terminal column."""
    nodes, inits = [], []
    x = "images"
    for i in range(layers):
        name = f"/model.{i}/backbone.stage{i}.block{i}.cv{i}/conv.depthwise_separable_candidate/Conv_{i}"
        w = f"model.{i}.backbone.stage.weight"
        nodes.append(helper.make_node("Conv", [x, w], [f"{name}_output_0"], name=name, pads=[1, 1, 1, 1]))
        inits.append(init(w, rand([8, 8, 3, 3], i)))
        x = f"{name}_output_0"
    return make_model(nodes, [vi("images", [1, 8, 24, 24])], [vi(x, [1, 8, 24, 24])], inits)
