"""The audit: per Conv-like node cost and separability, plus model totals."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

import numpy as np
import onnx

from ..threads import single_blas, start_each
from ..core.chain import chained_macs
from ..core.geometry import ConvGeometry, prod
from ..core.linalg import FULL_SPECTRUM_LIMIT, NEAR_EXACT_TOL, certify_tail, energy, exact_rank, exact_tolerance
from ..core.reasons import Reason, primary
from ..core.schemes import get as get_scheme, names as scheme_names
from ..model.cost import CONVENTION, LINEAR_OPS, LINEAR_WEIGHT_TYPES, conv_cost, matmul_macs
from ..model.graph import MATMUL_OPS
from ..model.load import FLOAT_TYPES, LoadedModel, ModelSource, iter_all_tensors
from ..model.shapes import input_values_record
from ..serialize import SCHEMA_VERSION, dumps
from ..version import __version__
from .analysis import analyze_model, check_weight, geometry_reason

ERROR_RANKS = (1, 2, 3, 4)
# The default audit examines large matrices cheaply: a full spectrum only up to this short side, and
# above it a certificate that no rank up to AUDIT_DEPTH is (near-)exact, nothing more (no error is
# estimated: a guess at the leading errors of a 512-channel matrix cost half the audit and said only
# "about 0.99").  ``certify=True`` (--certify) proves it up to the break-even rank instead, with full
# spectra up to FULL_SPECTRUM_LIMIT and the leading errors estimated above it.
AUDIT_LIMIT = 128
AUDIT_DEPTH = 32
MAX_CURVE_POINTS = 64  # error/MAC curves list at most this many ranks



def flat_dict(obj) -> dict[str, Any]:
    """``asdict`` for a dataclass whose fields are scalars and lists of scalars (lists copied): a
    fraction of ``asdict``'s cost, which recursed into every number of every curve (the JSON of
    ResNet-50's audit took 0.16 s)."""
    return {f.name: (list(v) if isinstance(v := getattr(obj, f.name), list) else v) for f in fields(obj)}


@dataclass
class SchemeAnalysis:
    scheme: str
    eligible: bool
    reason: Reason | None = None
    exact_rank: int | None = None
    max_rank: int | None = None
    errors: dict[int, float] = field(default_factory=dict)  # rank -> relative Frobenius weight error
    macs: dict[int, int] = field(default_factory=dict)  # rank -> MACs after rewrite
    break_even_rank: int | None = None  # largest rank that still saves MACs (0: none)
    exact_saves_macs: bool = False
    curve_errors: list[float] = field(default_factory=list)  # error at rank 0, 1, 2, …
    macs_per_rank: int | None = None  # MACs at rank 1
    curve_macs: list[int] = field(default_factory=list)  # MACs at rank 1, 2, … (as far as curve_errors goes)
    variant: str = ""  # the scheme's variant analysed (spatial: "v" kh×1 first, "h" 1×kw first)
    # False: a large matrix certified to have no (near-)exact factorization up to exact_rank_above
    # (exact_rank is then None); errors are then empty (default audit) or estimates within ~1e-3 (--certify).
    spectrum_complete: bool = True
    exact_rank_above: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = flat_dict(self)
        d["errors"] = {str(k): v for k, v in self.errors.items()}
        d["macs"] = {str(k): v for k, v in self.macs.items()}
        return d


@dataclass
class Decomposition:
    scheme: str  # "pw-dw+spatial" / "dw-pw+spatial": the kernel stage is split into kh×1 and 1×kw too
    rank: int
    error: float
    macs: int
    macs_ratio: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Separability:
    dtype: str
    exact_tolerance: float
    schemes: dict[str, SchemeAnalysis]
    best_exact: Decomposition | None = None
    best_near_exact: Decomposition | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "exact_tolerance": self.exact_tolerance,
            "near_exact_tolerance": NEAR_EXACT_TOL,
            "schemes": {k: v.to_dict() for k, v in self.schemes.items()},
            "best_exact": self.best_exact.to_dict() if self.best_exact else None,
            "best_near_exact": self.best_near_exact.to_dict() if self.best_near_exact else None,
        }


@dataclass
class NodeAudit:
    name: str
    qualified_name: str
    op_type: str
    scope: str
    group: int
    kernel_shape: list[int] | None
    strides: list[int] | None
    pads: list[int] | None
    dilations: list[int] | None
    auto_pad: str
    input_shape: list[int] | None
    output_shape: list[int] | None
    weight_shape: list[int] | None
    weight_name: str
    weight_source: str
    weight_shared_with: list[str]
    has_bias: bool
    dtype: str | None
    params: int | None
    macs: int | None
    flops: int | None
    bytes: int | None
    arithmetic_intensity: float | None
    share: float | None
    shape_source: str
    eligible: bool
    reason: str | None
    separability: Separability | None

    def to_dict(self) -> dict[str, Any]:
        d = flat_dict(self)
        d["separability"] = self.separability.to_dict() if self.separability else None
        return d


@dataclass
class Totals:
    conv_nodes: int
    conv_macs: int
    matmul_macs: int
    total_macs: int
    conv_flops: int
    conv_params: int
    model_params: int
    unknown_cost_nodes: int
    eligible_nodes: int
    exact_savings_macs: int  # MACs removable by the cheapest exact decomposition of each node
    # Gemm/MatMul MACs of linear layers — a constant 2-D float weight as second operand — that
    # ``rewrite --linear`` can factor (weights read by dims only)
    linear_macs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AuditReport:
    model: str
    producer: str
    opset: int
    ir_version: int
    input_shapes: dict[str, list[int]]
    shape_sources: dict[str, int]
    totals: Totals
    nodes: list[NodeAudit]
    warnings: list[str] = field(default_factory=list)
    # Inputs fed a fixed value (input_values=, --input-value), at their shapes; the other inputs were
    # random wherever the model ran.  In to_dict: a number for a scalar fill, else the flat list.
    input_values: dict[str, np.ndarray] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    convention: str = CONVENTION
    sepify_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "sepify_version": self.sepify_version,
            "convention": self.convention,
            "model": self.model,
            "producer": self.producer,
            "opset": self.opset,
            "ir_version": self.ir_version,
            "input_shapes": self.input_shapes,
            "input_values": input_values_record(self.input_values),
            "shape_sources": self.shape_sources,
            "totals": self.totals.to_dict(),
            "nodes": [n.to_dict() for n in self.nodes],
            "warnings": self.warnings,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return dumps(self.to_dict(), indent=indent)

    def __repr__(self) -> str:
        t = self.totals
        return (f"AuditReport(model={self.model!r}, conv_nodes={t.conv_nodes}, conv_macs={t.conv_macs}, "
                f"eligible_nodes={t.eligible_nodes}, exact_savings_macs={t.exact_savings_macs}, "
                f"warnings={len(self.warnings)})")

    def node(self, name: str) -> NodeAudit:
        for n in self.nodes:
            if n.name == name or n.qualified_name == name:
                return n
        raise KeyError(name)


# ----------------------------------------------------------------------------------------------
def analyze_scheme(w: np.ndarray, geo: ConvGeometry, scheme: str, tol: float,
                   variant: str | None = None, certify: bool = False, total: float | None = None) -> SchemeAnalysis:
    """One scheme's spectrum of ``w``.  Large matrices (short side over
    :data:`~sepify.core.linalg.FULL_SPECTRUM_LIMIT`) are certified instead of decomposed: with
    ``certify`` up to the break-even rank (no exact split that saves MACs exists), by default up to
    :data:`AUDIT_DEPTH` only ("no exact split up to rank k; not examined above").  ``total``: ``Σ w²``
    if known (the same for every scheme: their matrices rearrange ``w``)."""
    sch = get_scheme(scheme)
    reason = sch.reason(geo)
    if reason is not None:
        return SchemeAnalysis(scheme, eligible=False, reason=reason)
    variants = sch.variants(geo)
    if variant is None and len(variants) > 1:
        # Variants with different spectra (the spatial split's two orders): an exact split in the
        # costlier variant still beats an inexact one in the cheaper.
        cheaper, *others = variants
        options = [analyze_scheme(w, geo, scheme, tol, cheaper, certify, total)]
        for other in others:
            # The costlier variant only matters if it has an exact split: a certificate that it
            # has none up to its break-even rank settles that without analysing it further.
            break_even = min(sch.max_rank(geo, other) - 1, sch.break_even(geo, other))
            if break_even < 1:
                continue  # saves nothing in this variant
            depth = break_even if certify else min(break_even, AUDIT_DEPTH)
            if certify_tail(sch.matrix_view(w, geo, other), depth, tol, total):  # never reported: no spectrum needed
                continue
            options.append(analyze_scheme(w, geo, scheme, tol, other, certify, total))
        exact = [a for a in options if a.exact_saves_macs]
        return min(exact, key=lambda a: sch.macs(geo, a.exact_rank, a.variant)) if exact else options[0]
    variant = sch.resolve(geo, variant)
    max_rank = sch.max_rank(geo, variant)
    break_even = sch.break_even(geo, variant)
    spec = sch.spectrum(w, geo, variant, max(NEAR_EXACT_TOL, tol), break_even,
                        depth=None if certify else AUDIT_DEPTH, limit=FULL_SPECTRUM_LIMIT if certify else AUDIT_LIMIT,
                        estimate=certify, total=total)
    errors = spec.errors
    # Incomplete spectra come with a certificate that nothing up to break-even is (near-)exact.
    ex = exact_rank(errors, tol) if spec.complete else None
    macs_at = sch.macs_curve(geo, min(len(errors) - 1, MAX_CURVE_POINTS), variant)
    return SchemeAnalysis(
        scheme,
        eligible=break_even > 0,
        reason=None if break_even > 0 else Reason.NO_MAC_SAVING,
        exact_rank=ex,
        max_rank=max_rank,
        errors={r: float(errors[r]) for r in ERROR_RANKS if r <= max_rank and r < len(errors)},
        macs={r: macs_at[r - 1] for r in ERROR_RANKS if r <= len(macs_at)},
        break_even_rank=break_even,
        exact_saves_macs=ex is not None and 0 < ex <= break_even,
        curve_errors=[float(e) for e in errors[: MAX_CURVE_POINTS + 1]],
        macs_per_rank=macs_at[0] if macs_at else None,
        curve_macs=macs_at,
        variant=variant,
        spectrum_complete=spec.complete,
        exact_rank_above=spec.exact_above,
    )


def _best(schemes: Mapping[str, SchemeAnalysis], tol: float, original: int,
          w: np.ndarray | None = None, geo: ConvGeometry | None = None, chain_tol: float = 0.0) -> Decomposition | None:
    best = None
    for a in schemes.values():
        if not a.eligible or not a.curve_errors:
            continue
        hits = [r for r, e in enumerate(a.curve_errors) if r > 0 and e <= tol]
        if not hits:
            continue
        r = hits[0]
        if r > len(a.curve_macs):
            continue
        macs = a.curve_macs[r - 1]
        if macs >= original:
            continue
        scheme = a.scheme
        if w is not None and geo is not None:
            chained = chained_macs(w, geo, a.scheme, r, chain_tol)
            if chained is not None:
                scheme, macs = f"{a.scheme}+spatial", chained
        if best is None or macs < best.macs:
            best = Decomposition(scheme, r, a.curve_errors[r], macs, macs / original)
    return best


def analyze_weight(w: np.ndarray, geo: ConvGeometry, dtype: np.dtype, certify: bool = False) -> Separability:
    tol = exact_tolerance(dtype)
    # The weight as stored: every scheme widens to float64 only what it decomposes, a piece at a time
    # (a whole float64 copy of each weight cost a cold ResNet-50 audit ~60 ms in page faults).
    total = energy(w)  # every scheme's matrices rearrange w: one sum of squares serves them all
    schemes = {s: analyze_scheme(w, geo, s, tol, certify=certify, total=total) for s in scheme_names()}
    return Separability(
        dtype=str(np.dtype(dtype)),
        exact_tolerance=tol,
        schemes=schemes,
        best_exact=_best(schemes, tol, geo.macs, w, geo, tol),
        best_near_exact=_best(schemes, max(NEAR_EXACT_TOL, tol), geo.macs),
    )


def _if_branches(ref) -> list[tuple[str, str]]:
    """(If node, branch attribute) for every If that ``ref`` sits in, innermost first."""
    out = []
    while ref.parent is not None:
        parent = ref.parent
        if parent.op_type == "If":
            out.append((parent.qualified_name, ref.scope[len(parent.qualified_name) + 1:]))
        ref = parent
    return out


def _linear_layer(view, ref) -> bool:
    """A MatMul / Gemm whose second operand is a stored 2-D float weight (what ``--linear`` factors;
    see :func:`sepify.model.cost.linear_spec`), judged from dims alone."""
    node = ref.node
    if node.op_type not in LINEAR_OPS or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return False
    stored = view.stored_dims(node.input[1], ref) if node.input[1] else None
    return (stored is not None and len(stored[0]) == 2 and stored[1] in LINEAR_WEIGHT_TYPES
            and view.stored_dims(node.input[0], ref) is None)


def _both_branches_counted(counted) -> list[str]:
    """Totals add every node whose cost is known; an If whose branches both hold such nodes is
    counted as if both ran (only one does): say so, totals are then an upper bound."""
    branches: dict[str, set[str]] = {}
    for ref in counted:
        for if_name, branch in _if_branches(ref):
            branches.setdefault(if_name, set()).add(branch)
    return [f"{name}: nodes in both branches ({', '.join(sorted(b))}) are counted in the totals, though one "
            "inference runs one branch; totals are an upper bound" for name, b in branches.items() if len(b) > 1]


@single_blas
def audit(model: ModelSource | LoadedModel, input_shapes=None, *, input_values=None, spectra: bool = True,
          certify: bool = False) -> AuditReport:
    """Cost and separability of every Conv-like node.

    ``input_shapes`` maps input names to dims (or is a list of ``NAME=1x3x224x224`` strings);
    symbolic leading dims default to 1. ``input_values`` maps input names to fixed values (a
    number fills the input, a list or array gives every element; or ``NAME=V[,V…]`` strings):
    where shapes need an onnxruntime run, those inputs get these values instead of random ones,
    so branches that depend on them (``If`` on a sample rate) take the right way.
    ``spectra=False`` skips the SVDs (cost only).  ``certify=True`` proves, for every large
    matrix, that no exact split up to its break-even rank exists (slower; the default examines ranks
    up to :data:`AUDIT_DEPTH` and says so: ``spectrum_complete`` false, ``exact_rank_above``).
    """
    an = analyze_model(model, input_shapes, input_values, inline=True)  # the audit changes no weight
    view, table = an.view, an.table
    shared = view.shared_weights()
    nodes: list[NodeAudit] = []
    # Each weight's spectra start on the workers as soon as it is read, largest first
    # (longest-processing-time order), while this thread reads the next.  Spectra even where nothing
    # saves MACs: they are reported.  Convs sharing a weight (a siamese net's towers) share its analysis.
    analyze = start_each(lambda wg: analyze_weight(wg[0], wg[1], wg[0].dtype, certify))
    pending: dict[tuple, Any] = {}  # (weight name, weight, geometry) → its analysis, when done
    keys: dict[int, tuple] = {}  # spec index → its key in pending
    checks = {}
    for i in sorted(range(len(an.specs)), key=lambda i: -prod(an.specs[i].weight_shape or [0])):
        spec = an.specs[i]
        checks[i] = check = check_weight(view, spec)
        geo = spec.geometry()
        if check.reason is None and spectra and check.weight is not None and geo is not None:
            keys[i] = key = (spec.w_name, id(check.weight), geo)
            if key not in pending:
                pending[key] = analyze((check.weight, geo))
    for i, spec in enumerate(an.specs):
        ref = spec.ref
        source, reason = checks[i].source, checks[i].reason
        w_numel = int(np.prod(spec.weight_shape)) if spec.weight_shape is not None else None
        b_numel = 0
        if spec.b_name:
            bshape = table.get(spec.b_name)
            if bshape is None:
                bconst = view.constant(spec.b_name, ref)
                bshape = list(bconst.value.shape) if bconst is not None else [0]
            b_numel = prod(bshape)
        cost = conv_cost(spec, table, w_numel, b_numel)
        geo = spec.geometry()
        saves = geometry_reason(geo) if reason is None and geo is not None else None
        nodes.append(
            NodeAudit(
                name=ref.name,
                qualified_name=ref.qualified_name,
                op_type=ref.op_type,
                scope=ref.scope,
                group=spec.group,
                kernel_shape=spec.kernel,
                strides=spec.strides,
                pads=spec.pads,
                dilations=spec.dilations,
                auto_pad=spec.auto_pad,
                input_shape=spec.input_shape,
                output_shape=spec.output_shape,
                weight_shape=spec.weight_shape,
                weight_name=spec.w_name,
                weight_source=source,
                weight_shared_with=[q for q in shared.get(spec.w_name, []) if q != ref.qualified_name],
                has_bias=spec.b_name is not None,
                dtype=_dtype_name(spec.weight_dtype),
                params=cost.params,
                macs=cost.macs,
                flops=cost.flops,
                bytes=cost.bytes,
                arithmetic_intensity=cost.intensity,
                share=None,
                shape_source=spec.shape_source,
                eligible=reason is None and saves is None,
                reason=reason or saves,
                separability=None,
            )
        )
    for i, key in keys.items():  # nodes are in spec order
        node = nodes[i]
        node.separability = sep = pending[key]()
        if not any(a.eligible for a in sep.schemes.values()):
            node.reason = primary(a.reason for a in sep.schemes.values())
            node.eligible = False
    matmul_total = linear_total = 0
    counted = [spec.ref for spec, n in zip(an.specs, nodes) if n.macs is not None]
    for ref in view.nodes:
        if ref.op_type in MATMUL_OPS:
            m = matmul_macs(view, ref, table)
            if m is None:
                an.warnings.append(f"{ref.qualified_name}: {ref.op_type} operand shapes unknown; not counted")
            else:
                matmul_total += m
                counted.append(ref)
                linear_total += m if _linear_layer(view, ref) else 0
    an.warnings.extend(_both_branches_counted(counted))
    conv_total = sum(n.macs or 0 for n in nodes)
    total = conv_total + matmul_total
    for n in nodes:
        n.share = (n.macs / total) if (n.macs is not None and total) else None
    exact_savings = sum(
        n.macs - n.separability.best_exact.macs
        for n in nodes
        if n.separability is not None and n.separability.best_exact is not None and n.macs
    )
    # Every weight-holding tensor: float initializers and Constant-node values of all (sub)graphs, and
    # integer ones that are quantized weights (what DequantizeLinear or a quantized op reads as its weight).
    model_params = sum(int(np.prod(t.dims)) for t in iter_all_tensors(view.model) if t.data_type in FLOAT_TYPES)
    model_params += _quantized_params(view)
    unique_params: dict[tuple[str, str], int] = {}
    for n in nodes:
        if n.params is not None:
            # A weight shared by several convs is one set of parameters.
            unique_params[(n.weight_name or n.qualified_name, n.qualified_name if not n.weight_name else "")] = n.params
    totals = Totals(
        conv_nodes=len(nodes),
        conv_macs=conv_total,
        matmul_macs=matmul_total,
        total_macs=total,
        conv_flops=sum(n.flops or 0 for n in nodes),
        conv_params=sum(unique_params.values()),
        model_params=model_params,
        unknown_cost_nodes=sum(1 for n in nodes if n.macs is None),
        eligible_nodes=sum(1 for n in nodes if n.eligible),
        exact_savings_macs=exact_savings,
        linear_macs=linear_total,
    )
    sources: dict[str, int] = {}
    for n in nodes:
        sources[n.shape_source] = sources.get(n.shape_source, 0) + 1
    model_proto = view.model
    return AuditReport(
        model=an.loaded.label,
        producer=" ".join(x for x in (model_proto.producer_name, model_proto.producer_version) if x),
        opset=view.opset,
        ir_version=model_proto.ir_version,
        input_shapes=an.input_shapes,
        shape_sources=sources,
        totals=totals,
        nodes=nodes,
        warnings=an.warnings,
        input_values=dict(table.input_values),
    )


# Input positions holding a quantized weight (or its integer bias), per op.
_QUANTIZED_WEIGHT_INPUTS = {"DequantizeLinear": (0,), "ConvInteger": (1,), "QLinearConv": (3, 8), "MatMulInteger": (1,),
                            "QLinearMatMul": (3,)}


def _quantized_params(view) -> int:
    """Elements of the integer tensors that are weights: what DequantizeLinear dequantizes and what
    ConvInteger / QLinearConv / MatMulInteger / QLinearMatMul read as their weight (and bias)."""
    seen: dict[str, int] = {}
    for ref in view.nodes:
        for k in _QUANTIZED_WEIGHT_INPUTS.get(ref.op_type, ()):
            name = ref.node.input[k] if len(ref.node.input) > k else ""
            if not name or name in seen:
                continue
            const = view.constant(name, ref)
            seen[name] = int(const.value.size) if const is not None and const.value.dtype.kind in "iu" else 0
    return sum(seen.values())


def _dtype_name(dtype: int | None) -> str | None:
    if not dtype:
        return None
    try:
        return onnx.TensorProto.DataType.Name(dtype).lower()
    except ValueError:
        return str(dtype)


__all__ = ["AuditReport", "NodeAudit", "analyze_weight", "audit"]
