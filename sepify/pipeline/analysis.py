"""What audit, plan, rewrite and calibration share: the loaded model, its graph view, shapes,
conv specs, and why a node cannot be rewritten at all (:func:`check_weight`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from ..core.reasons import Reason, primary
from ..core.schemes import all_schemes, get as get_scheme
from ..model.cost import LINEAR_OPS, ConvSpec, conv_spec, linear_spec, matmul_operands
from ..model.graph import MATMUL_OPS, GraphView
from ..model.load import LoadedModel, ModelSource, load_model
from ..errors import ShapeError
from ..model.shapes import (ProbeError, fill_from_profile, fill_with_onnxruntime, infer_shapes, normalize_input_shapes,
                            resolve_input_shapes, resolve_input_values)

SUPPORTED_DTYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def all_finite(a: np.ndarray) -> bool:
    """No NaN or infinity in ``a``: two reductions (a NaN propagates through both, an infinity is an
    extreme), instead of a boolean array the size of the weight."""
    if a.size == 0:
        return True
    return bool(np.isfinite(a.max()) and np.isfinite(a.min()))


def node_level_reason(spec: ConvSpec, weight_source: str, weight: np.ndarray | None, via_dq: bool) -> Reason | None:
    """Why a node cannot be rewritten at all (None when some scheme may apply)."""
    op = spec.ref.op_type
    if op in ("ConvInteger", "QLinearConv"):
        return Reason.QUANTIZED_OP
    if op == "ConvTranspose":
        return Reason.TRANSPOSED_CONV
    if weight_source in ("graph_input", "computed"):
        return Reason.WEIGHT_NOT_CONSTANT
    if via_dq:
        return Reason.QUANTIZED_WEIGHT
    if spec.weight_dtype not in SUPPORTED_DTYPES:
        return Reason.UNSUPPORTED_DTYPE
    if weight is not None and not all_finite(weight):
        return Reason.NONFINITE_WEIGHT
    if spec.geometry() is None:
        return Reason.SHAPE_UNKNOWN
    geo = spec.geometry()
    reasons = [sch.reason(geo) for sch in all_schemes()]
    if all(r is not None for r in reasons):  # no scheme applies: decided without reading the weight
        return primary(reasons)
    return None


def geometry_reason(geo) -> str | None:
    """Why no scheme can cut this conv's MACs, from its geometry alone (None: some scheme can at some
    rank) — what a cost-only audit and a full one agree on, and what a plan need not decompose."""
    applicable = [sch for sch in all_schemes() if sch.reason(geo) is None]
    if not applicable:
        return primary(sch.reason(geo) for sch in all_schemes())
    return None if any(sch.break_even(geo) >= 1 for sch in applicable) else Reason.NO_MAC_SAVING


@dataclass
class WeightCheck:
    """Where a conv's weight comes from, its value when constant, and why the node cannot be rewritten."""

    source: str  # initializer | constant_node | constant_subgraph | graph_input | computed | missing
    weight: np.ndarray | None
    reason: Reason | None


def check_weight(view: GraphView, spec: ConvSpec) -> WeightCheck:
    source = view.weight_origin(spec.w_name, spec.ref) if spec.w_name else "missing"
    if source in ("graph_input", "computed", "missing"):
        return WeightCheck(source, None, node_level_reason(spec, source, None, False))
    if source == "initializer":
        # Decide from attributes first: a weight no scheme can take is never read.
        reason = node_level_reason(spec, source, None, False)
        if reason is not None:
            return WeightCheck(source, None, reason)
    if spec.linear:  # a linear layer's weight, already in conv layout (cost.linear_spec)
        return WeightCheck(source, spec.conv_weight, node_level_reason(spec, source, spec.conv_weight, False))
    const = view.constant(spec.w_name, spec.ref)
    return WeightCheck(source, const.value, node_level_reason(spec, source, const.value, const.via_dequantize))


def spec_weight(view: GraphView, spec: ConvSpec) -> np.ndarray:
    """The constant weight of a conv, or of a linear layer in conv layout."""
    return spec.conv_weight if spec.linear else view.constant(spec.w_name, spec.ref).value


@dataclass
class ModelAnalysis:
    """What audit, plan and rewrite share: the loaded model, its graph view, shapes and conv specs."""

    loaded: LoadedModel
    view: GraphView
    input_shapes: dict[str, list[int]]
    specs: list[ConvSpec]
    table: Any
    warnings: list[str]
    # SVD factors (float64 stages) by (weight name, geometry, scheme, rank, variant): the planner's
    # exact-split check of a pick and its realization read the same factorization.
    factors: dict = field(default_factory=dict, repr=False, compare=False)
    linear: list[ConvSpec] | None = field(default=None, repr=False, compare=False)  # see linear_specs

    def linear_specs(self) -> list[ConvSpec]:
        """The MatMul / Gemm nodes with a constant 2-D weight, as 1×1 convs (:func:`linear_spec`); made
        on first use (plans that factor linear layers ask for them, audits do not)."""
        if self.linear is None:
            self.linear = [s for ref in self.view.nodes if ref.op_type in LINEAR_OPS
                           for s in [linear_spec(self.view, ref, self.table)] if s is not None]
        return self.linear

    def factored(self, w_name: str, weight: np.ndarray, geo, scheme: str, rank: int, variant: str = "") -> list:
        """``get_scheme(scheme).factor(weight, geo, rank, variant)``, once per analysis."""
        key = (w_name, id(weight), geo, scheme, rank, variant)
        if key not in self.factors:
            self.factors[key] = get_scheme(scheme).factor(weight, geo, rank, variant)
        return self.factors[key]


def analyze_model(model: ModelSource | LoadedModel, input_shapes=None, input_values=None, *,
                  inline: bool = False) -> ModelAnalysis:
    """``inline``: weights read as read-only views of the model file's bytes where it can (see
    :class:`~sepify.model.inline.InlineWeights`), for callers that only read them."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model, inline=inline)
    view = GraphView(loaded.model, loaded.inline if inline else None)
    user = normalize_input_shapes(input_shapes, [i.name for i in view.main_inputs])
    shapes, dtypes = resolve_input_shapes(view, user)
    table = infer_shapes(view, shapes, dtypes, resolve_input_values(view, input_values, shapes))
    convs = view.conv_nodes()
    specs = [conv_spec(view, ref, table) for ref in convs]
    warnings: list[str] = list(loaded.notes)
    missing = [n for s in specs if s.shape_source == "unknown" or s.weight_shape is None
               for n in (s.x_name, s.w_name, s.ref.node.output[0])]
    matmuls = [r for r in view.nodes if r.op_type in MATMUL_OPS]

    def mm_unknown(ref) -> list[str]:  # the operands of a Gemm/MatMul with neither a shape nor a value
        return [i for i in (ref.node.input[k] for k in matmul_operands(ref.node) if k < len(ref.node.input))
                if i and table.get(i) is None and view.constant(i, ref) is None]

    mm_missing = [i for r in matmuls for i in mm_unknown(r)]
    # A weight that contradicts the input's shape from inference (or the model's own value_info):
    # onnxruntime's executed shapes decide, and a conv that still does not fit is refused below.
    misfits = [n for s in specs if s.fits_input() is False for n in (s.x_name, s.ref.node.output[0])]
    if missing or mm_missing or misfits:
        try:
            fill_with_onnxruntime(view, table, [*missing, *mm_missing])
            if misfits:
                fill_with_onnxruntime(view, table, misfits, override=True)
        except ProbeError as exc:
            shape_text = ", ".join(f"{k}={'x'.join(map(str, v)) or 'scalar'}" for k, v in shapes.items())
            if exc.loaded and missing and not misfits:  # a misfit conv is reported in its own words below
                raise ShapeError(f"onnxruntime cannot run the model at input shapes {shape_text} (needed for conv "
                                 f"shapes): {exc}; check the input shapes and values") from None
            if not exc.loaded:
                warnings.append(f"onnxruntime could not size the remaining tensors: {str(exc).splitlines()[0]}")
        specs = [conv_spec(view, ref, table) if s.shape_source == "unknown" or s.weight_shape is None
                 or s.fits_input() is False else s for ref, s in zip(convs, specs)]
        # What no graph output can expose (inside If/Loop/Scan bodies): convs and Gemm/MatMuls
        # alike, from one profiled run.
        still = [s.ref for s in specs if s.shape_source == "unknown"] + [r for r in matmuls if mm_unknown(r)]
        if still:
            fill_from_profile(view, table, still)
            specs = [conv_spec(view, ref, table) if s.shape_source == "unknown" else s for ref, s in zip(convs, specs)]
    for s in specs:
        problem = s.misfit()
        if problem is not None:
            # No runtime can execute it: a build pipeline must hear it (exit 2), not get a half audit.
            raise ShapeError(f"node {s.ref.qualified_name!r}: weight {s.weight_shape} does not fit input "
                             f"{s.input_shape} ({problem})")
        if s.shape_source == "unknown" or s.weight_shape is None:
            warnings.append(f"{s.ref.qualified_name}: input/output shape unknown; its cost is not counted")
    return ModelAnalysis(loaded, view, shapes, specs, table, warnings)


__all__ = ["ModelAnalysis", "SUPPORTED_DTYPES", "WeightCheck", "analyze_model", "check_weight", "geometry_reason",
           "node_level_reason", "spec_weight"]
