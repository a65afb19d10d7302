"""Cost of Conv-like and MatMul-like nodes.

Convention (printed in every report): MACs count the multiply-accumulates of the
weight product, bias excluded (as thop, fvcore and onnx-opcounter do):

* Conv, ConvInteger, QLinearConv: ``prod(output shape) × (C_in / group) × prod(kernel)``
* ConvTranspose: ``prod(input shape) × (C_out / group) × prod(kernel)``
* Gemm: ``M × N × K``; MatMul: ``prod(batch dims) × M × N × K``

FLOPs = 2·MACs, plus one add per output element when there is a bias.
Bytes moved = (input + weight + output elements) × their item sizes — a lower bound on
memory traffic; arithmetic intensity = FLOPs / bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..core.geometry import ConvGeometry, conv_out_spatial, conv_transpose_out_spatial, explicit_pads, prod
from .graph import GraphView, NodeRef, attr
from .shapes import ShapeTable

CONVENTION = (
    "MACs = multiply-accumulates of the weight product, bias excluded (as thop/fvcore/onnx-opcounter). "
    "Conv: prod(output shape) x (C_in/group) x prod(kernel); ConvTranspose: prod(input shape) x "
    "(C_out/group) x prod(kernel); Gemm/MatMul: batch x M x N x K. FLOPs = 2*MACs + one add per output "
    "element when there is a bias. Bytes = (input + weight + output elements) x item size."
)

# Input positions of x / w / bias per op type.
_INPUTS = {
    "Conv": (0, 1, 2),
    "ConvTranspose": (0, 1, 2),
    "ConvInteger": (0, 1, None),
    "QLinearConv": (0, 3, 8),
}


def _itemsize(dtype: int | None, default: int = 4) -> int:
    if not dtype:
        return default
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(dtype).itemsize
    except Exception:  # noqa: BLE001
        return default


@dataclass
class ConvSpec:
    """A Conv-like node with its attributes resolved against real shapes."""

    ref: NodeRef
    x_name: str
    w_name: str
    b_name: str | None
    input_shape: list[int] | None
    output_shape: list[int] | None
    weight_shape: list[int] | None
    kernel: list[int] | None
    strides: list[int] | None
    dilations: list[int] | None
    pads: list[int] | None  # explicit, auto_pad resolved
    auto_pad: str
    group: int
    output_padding: list[int] | None
    shape_source: str
    dtype: int | None
    weight_dtype: int | None
    # A linear layer (``"MatMul"`` / ``"Gemm"``) seen as the 1×1 conv it computes (:func:`linear_spec`),
    # with its constant weight in conv layout ``[N, K, 1]``; "" for a conv.
    linear: str = ""
    conv_weight: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def transposed(self) -> bool:
        return self.ref.op_type == "ConvTranspose"

    def fits_input(self) -> bool | None:
        """Whether the weight fits the input (None while either shape is unknown): see :meth:`misfit`."""
        if self.input_shape is None or self.weight_shape is None:
            return None
        return self.misfit() is None

    def misfit(self) -> str | None:
        """Why the weight cannot run on the input (None: it fits, or a shape is unknown): equal ranks,
        input channels = weight dim 1 × group (ConvTranspose: weight dim 0), output channels
        divisible by group, and a (dilated) kernel no larger than the padded input."""
        x, w = self.input_shape, self.weight_shape
        if x is None or w is None:
            return None
        if len(w) != len(x) or len(x) < 3:
            return f"a rank-{len(w)} weight on a rank-{len(x)} input"
        if self.group < 1:
            return f"group {self.group}"
        if self.transposed:
            if w[0] != x[1]:
                return f"the weight reads {w[0]} input channels, the input has {x[1]}"
            if w[0] % self.group:
                return f"{w[0]} input channels do not split into {self.group} groups"
        else:
            if w[1] * self.group != x[1]:
                return f"the weight reads {w[1]} × group {self.group} = {w[1] * self.group} input channels, " \
                       f"the input has {x[1]}"
            if w[0] % self.group:
                return f"{w[0]} output channels do not split into {self.group} groups"
        if self.output_shape is not None and not all(d > 0 for d in self.output_shape):
            return "the (dilated) kernel is larger than the padded input"
        return None

    def geometry(self) -> ConvGeometry | None:
        if self.input_shape is None or self.output_shape is None or self.weight_shape is None or self.transposed:
            return None
        return ConvGeometry(
            batch=self.input_shape[0],
            c_in=self.input_shape[1],
            c_out=self.output_shape[1],
            group=self.group,
            kernel=tuple(self.kernel),
            in_spatial=tuple(self.input_shape[2:]),
            out_spatial=tuple(self.output_shape[2:]),
            strides=tuple(self.strides),
            dilations=tuple(self.dilations),
            pads=tuple(self.pads),
        )


def conv_spec(view: GraphView, ref: NodeRef, table: ShapeTable) -> ConvSpec:
    node = ref.node
    xi, wi, bi = _INPUTS[node.op_type]
    x_name = node.input[xi] if len(node.input) > xi else ""
    w_name = node.input[wi] if len(node.input) > wi else ""
    b_name = node.input[bi] if bi is not None and len(node.input) > bi and node.input[bi] else None
    x_shape = table.get(x_name)
    w_shape = table.get(w_name)
    if w_shape is None:
        const = view.constant(w_name, ref)
        if const is not None:
            w_shape = list(const.value.shape)
    if x_shape is not None and len(x_shape) < 3:
        x_shape = None  # a declared shape that cannot be a conv input (exporters get outputs wrong too)
    y_shape = table.get(node.output[0])
    if y_shape is not None and (x_shape is None or len(y_shape) != len(x_shape)):
        y_shape = None
    sources = {table.source.get(x_name, "unknown"), table.source.get(node.output[0], "unknown")}
    kernel = attr(node, "kernel_shape")
    if kernel is None and w_shape is not None:
        kernel = list(w_shape[2:])
    kernel = list(kernel) if kernel is not None else None
    d = len(kernel) if kernel is not None else (len(x_shape) - 2 if x_shape else None)
    strides = list(attr(node, "strides", None) or ([1] * d if d else [])) or None
    dilations = list(attr(node, "dilations", None) or ([1] * d if d else [])) or None
    group = int(attr(node, "group", 1))
    auto_pad = attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    output_padding = None
    pads = None
    if d and kernel is not None and len(kernel) == d:
        raw_pads = attr(node, "pads", None)
        x_fits = x_shape if x_shape is not None and len(x_shape) == d + 2 else None  # rank mismatch: no pads
        if node.op_type == "ConvTranspose":
            output_padding = list(attr(node, "output_padding", None) or [0] * d)
            pads = _transpose_pads(node, x_fits, kernel, strides, dilations, output_padding, raw_pads, auto_pad)
        elif x_fits is not None:
            pads = explicit_pads(x_shape[2:], kernel, strides, dilations, raw_pads, auto_pad)
        elif auto_pad in ("NOTSET", "", "VALID"):
            pads = explicit_pads([0] * d, kernel, strides, dilations, raw_pads, auto_pad)
    if x_shape is not None and w_shape is not None and pads is not None and len(x_shape) == d + 2:
        # The spec's formula beats ONNX shape inference, which gets e.g. ConvTranspose with
        # SAME_* and output_padding wrong; onnxruntime agrees with the formula.
        if node.op_type == "ConvTranspose":
            spatial = attr(node, "output_shape", None)
            if spatial is None:
                spatial = conv_transpose_out_spatial(x_shape[2:], kernel, strides, dilations, pads, output_padding)
            y_shape = [x_shape[0], w_shape[1] * group, *list(spatial)[-d:]]
        else:
            y_shape = [x_shape[0], w_shape[0], *conv_out_spatial(x_shape[2:], kernel, strides, dilations, pads)]
        sources.add("computed")
    sources.discard("model")
    if x_shape is None or y_shape is None:
        source = "unknown"
    else:
        sources.discard("unknown")
        order = ["onnxruntime", "computed", "inferred", "input"]
        source = next((s for s in order if s in sources), "inferred")
    w_const = table.dtypes.get(w_name)
    if w_const is None:
        const = view.constant(w_name, ref)
        w_const = onnx.helper.np_dtype_to_tensor_dtype(const.value.dtype) if const is not None else None
    return ConvSpec(
        ref=ref, x_name=x_name, w_name=w_name, b_name=b_name, input_shape=x_shape, output_shape=y_shape,
        weight_shape=w_shape, kernel=kernel, strides=strides, dilations=dilations, pads=pads,
        auto_pad=auto_pad, group=group, output_padding=output_padding, shape_source=source,
        dtype=table.dtypes.get(x_name), weight_dtype=w_const,
    )


LINEAR_OPS = ("MatMul", "Gemm")
LINEAR_WEIGHT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


def linear_spec(view: GraphView, ref: NodeRef, table: ShapeTable) -> ConvSpec | None:
    r"""A MatMul or Gemm whose second operand is a constant 2-D float weight, as the 1×1 conv it
    computes (None for any other node, or while the data operand's shape is unknown).

    ``MatMul(A[…, K], B[K, N])`` and ``Gemm(A, B)`` (``transA``/``transB``, ``alpha``, ``beta``, ``C`` as
    given) multiply the ``M`` rows of ``A`` (every leading dim, or the rows of ``A'``) by a ``K × N``
    matrix: the geometry of a 1-D 1×1 conv with ``K`` input channels, ``N`` output channels and ``M``
    positions, whose weight is ``Bᵀ`` (``[N, K, 1]``).  ``pw-lowrank`` splits it like any 1×1 conv, and
    the rewrite writes the two factors back as two MatMuls (two Gemms, ``C`` on the second)."""
    node = ref.node
    if node.op_type not in LINEAR_OPS or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    a_name, w_name = node.input[0], node.input[1]
    if not a_name or not w_name or view.constant(a_name, ref) is not None:
        return None  # a product of constants runs once: nothing to factor
    const = view.constant(w_name, ref)
    if const is None or const.value.ndim != 2 or const.via_dequantize:
        return None
    w_dtype = onnx.helper.np_dtype_to_tensor_dtype(const.value.dtype) if const.value.dtype.kind == "f" else None
    if w_dtype not in LINEAR_WEIGHT_TYPES:
        return None
    a_shape = table.get(a_name)
    if a_shape is None or len(a_shape) < 2 or not all(isinstance(d, int) and d > 0 for d in a_shape):
        return None
    w = const.value
    if node.op_type == "Gemm":
        if len(a_shape) != 2:
            return None
        trans_a, trans_b = int(attr(node, "transA", 0)), int(attr(node, "transB", 0))
        m, k = (a_shape[1], a_shape[0]) if trans_a else (a_shape[0], a_shape[1])
        conv_w = w if trans_b else w.T  # [N, K]
    else:
        m, k = prod(a_shape[:-1]), a_shape[-1]
        conv_w = w.T
    if conv_w.shape[1] != k:
        return None  # a weight that does not fit the data: onnxruntime would refuse it too
    n = conv_w.shape[0]
    return ConvSpec(
        ref=ref, x_name=a_name, w_name=w_name, b_name=None, input_shape=[1, k, m], output_shape=[1, n, m],
        weight_shape=[n, k, 1], kernel=[1], strides=[1], dilations=[1], pads=[0, 0], auto_pad="NOTSET", group=1,
        output_padding=None, shape_source=table.source.get(a_name, "inferred"), dtype=table.dtypes.get(a_name),
        weight_dtype=w_dtype, linear=node.op_type, conv_weight=np.ascontiguousarray(conv_w)[:, :, None],
    )


def _transpose_pads(node, x_shape, kernel, strides, dilations, output_padding, raw_pads, auto_pad):
    d = len(kernel)
    output_shape = attr(node, "output_shape", None)
    if output_shape is None and auto_pad in ("NOTSET", ""):
        return list(raw_pads) if raw_pads else [0] * (2 * d)
    if x_shape is None:
        return None
    in_sp = x_shape[2:]
    if output_shape is not None:
        target = list(output_shape)[-d:]
    elif auto_pad == "VALID":
        return [0] * (2 * d)
    else:
        target = [in_sp[i] * strides[i] for i in range(d)]
    begins, ends = [], []
    for i in range(d):
        total = strides[i] * (in_sp[i] - 1) + output_padding[i] + ((kernel[i] - 1) * dilations[i] + 1) - target[i]
        total = max(total, 0)
        if auto_pad == "SAME_UPPER":
            begins.append(total // 2)
            ends.append(total - total // 2)
        else:  # SAME_LOWER and explicit output_shape follow the same split in onnxruntime
            begins.append(total - total // 2)
            ends.append(total // 2)
    return begins + ends


@dataclass
class Cost:
    params: int | None
    macs: int | None
    flops: int | None
    bytes: int | None
    intensity: float | None


def conv_cost(spec: ConvSpec, table: ShapeTable, weight_numel: int | None, bias_numel: int) -> Cost:
    params = (weight_numel + bias_numel) if weight_numel is not None else None
    if spec.input_shape is None or spec.output_shape is None or spec.weight_shape is None or not spec.fits_input():
        return Cost(params, None, None, None, None)  # unknown, or a weight that does not fit: no cost to count
    k = prod(spec.kernel)
    if spec.transposed:
        macs = prod(spec.input_shape) * spec.weight_shape[1] * k
    else:
        macs = prod(spec.output_shape) * spec.weight_shape[1] * k
    has_bias = spec.b_name is not None
    flops = 2 * macs + (prod(spec.output_shape) if has_bias else 0)
    xb = _itemsize(spec.dtype)
    yb = _itemsize(table.dtypes.get(spec.ref.node.output[0]), xb)
    wb = _itemsize(spec.weight_dtype, xb)
    nbytes = prod(spec.input_shape) * xb + prod(spec.weight_shape) * wb + prod(spec.output_shape) * yb
    return Cost(params, macs, flops, nbytes, flops / nbytes if nbytes else None)


def matmul_operands(node: onnx.NodeProto) -> tuple[int, int]:
    """Input indices of the two multiplied operands of a Gemm / MatMul-like node."""
    return (0, 3) if node.op_type == "QLinearMatMul" else (0, 1)


def matmul_macs(view: GraphView, ref: NodeRef, table: ShapeTable) -> int | None:
    """MACs of Gemm / MatMul-like nodes from their operand shapes (None when unknown)."""
    node = ref.node

    def shape(i: int) -> list[int] | None:
        if len(node.input) <= i or not node.input[i]:
            return None
        s = table.get(node.input[i])
        if s is None:
            c = view.constant(node.input[i], ref)
            s = list(c.value.shape) if c is not None else None
        return s

    a_idx, b_idx = matmul_operands(node)
    a, b = shape(a_idx), shape(b_idx)
    if a is None or b is None:
        return None
    if node.op_type == "Gemm":
        if len(a) != 2 or len(b) != 2:
            return None
        m, k = (a[1], a[0]) if attr(node, "transA", 0) else (a[0], a[1])
        n = b[0] if attr(node, "transB", 0) else b[1]
        return m * n * k
    a2 = a if len(a) >= 2 else [1, *a]
    b2 = b if len(b) >= 2 else [*b, 1]
    m, k, n = a2[-2], a2[-1], b2[-1]
    batch = np.broadcast_shapes(tuple(a2[:-2]), tuple(b2[:-2])) if (len(a2) > 2 or len(b2) > 2) else ()
    return prod(batch) * m * n * k
