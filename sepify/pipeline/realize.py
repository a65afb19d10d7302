"""From a planned node to a :class:`~sepify.core.realization.Realization`: factors from the weight
(float64), chained where the plan says, cast to the weight's dtype, written in a lowering.

The realized error is measured after the cast: that is what the graph will hold.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..core.chain import split_kernel_stage
from ..core.geometry import ConvGeometry
from ..core.lowering import LOWERINGS, lower
from ..core.realization import Realization
from ..core.schemes import get as get_scheme, names as scheme_names
from ..core.stages import Stage, balance, cast_stages, relative_error
from ..errors import UsageError
from ..model.cost import ConvSpec
from .analysis import ModelAnalysis, check_weight, spec_weight
from .plan import NodePlan

DEFAULT_LOWERING = "branches"


def check_edit(np_: NodePlan, spec: ConvSpec, an: ModelAnalysis) -> None:
    """A (possibly hand-edited) plan entry must still describe a rewrite sepify can build."""
    where = f"plan for {np_.qualified_name}"
    if np_.scheme not in scheme_names():
        raise UsageError(f"{where}: unknown scheme {np_.scheme!r} (one of {', '.join(scheme_names())})")
    if not isinstance(np_.rank, int) or np_.rank < 1:
        raise UsageError(f"{where}: rewrite needs a rank ≥ 1, not {np_.rank!r}")
    if np_.lowering is not None and np_.lowering not in LOWERINGS:
        raise UsageError(f"{where}: unknown lowering {np_.lowering!r} (one of {', '.join(LOWERINGS)})")
    sch = get_scheme(np_.scheme)
    reason = check_weight(an.view, spec).reason
    if reason is None:
        reason = sch.reason(spec.geometry())
    if reason is not None:
        raise UsageError(f"{where}: cannot rewrite with {np_.scheme} ({reason})")
    if np_.variant and np_.variant not in sch.variants(spec.geometry()) + (sch.resolve(spec.geometry(), None),):
        raise UsageError(f"{where}: {np_.scheme} has no variant {np_.variant!r}")


def factor_node(weight: np.ndarray, geo: ConvGeometry, np_: NodePlan, tol_exact: float,
                factors: list[Stage] | None = None) -> list[Stage]:
    """The stages (float64 weights) for a planned node, chained if the plan says so; ``factors``: the
    scheme's stages when already computed (:meth:`ModelAnalysis.factored`)."""
    stages = factors if factors is not None else get_scheme(np_.scheme).factor(weight, geo, np_.rank, np_.variant)
    if np_.chained:
        chain = split_kernel_stage(stages, geo, tol_exact)
        if chain is not None:
            stages = chain
    return stages


def realization(spec: ConvSpec, np_: NodePlan, stages: list[Stage], weight: np.ndarray, *, lowering: str | None,
                source: str, bias: np.ndarray | None = None, absorbs: tuple[str, str] | None = None,
                reference: np.ndarray | None = None, planned_error: float | None = None,
                error: float | None = None) -> Realization:
    """A Realization of ``stages`` (already in the stored dtype) for the conv of ``spec``.

    ``absorbs``: (qualified name, output tensor) of a BatchNormalization the chain replaces too;
    ``reference``: the weight the error is measured against (default ``weight``; the BN-folded
    weight when one is absorbed); ``error``: the stages' relative error against it when already known."""
    geo = spec.geometry()
    err = relative_error(weight if reference is None else reference, stages, geo) if error is None else error
    out = spec.ref.node.output[0]
    return Realization(
        node=spec.ref.qualified_name, input=spec.x_name, output=absorbs[1] if absorbs else out,
        replaces=(out, absorbs[1]) if absorbs else (out,), weight_name=spec.w_name, geometry=geo,
        auto_pad=spec.auto_pad, scheme=np_.scheme, variant=np_.variant, rank=np_.rank, chained=np_.chained,
        stages=tuple(stages), lowered=lower(stages, np_.lowering or lowering or DEFAULT_LOWERING),
        weight_error=err, planned_error=float(np_.error or 0.0) if planned_error is None else planned_error,
        source=source, bias=bias, absorbs=absorbs[0] if absorbs else None, linear=spec.linear)


def realize(an: ModelAnalysis, spec: ConvSpec, np_: NodePlan, lowering: str | None = None,
            memo: dict | None = None) -> Realization:
    """The weight-only Realization of a planned node (SVD factors of the model's weight).

    ``memo``: stages and error by (weight, geometry, choice), shared by the nodes of one rewrite —
    convs reading one trained weight with one plan (a siamese net's towers) are factored once."""
    check_edit(np_, spec, an)
    weight = spec_weight(an.view, spec)
    geo = spec.geometry()
    key = (spec.w_name, id(weight), geo, np_.scheme, np_.variant, np_.rank, np_.chained, np_.exact_tolerance)
    hit = memo.get(key) if memo is not None else None
    if hit is None:
        # Balanced before the cast: int8 quantization of the written model then loses little (stages.balance).
        raw = an.factored(spec.w_name, weight, geo, np_.scheme, np_.rank, np_.variant)
        stages = cast_stages(balance(factor_node(weight, geo, np_, np_.exact_tolerance or 0.0, raw)), weight.dtype)
        hit = (stages, relative_error(weight, stages, geo))
        if memo is not None:
            memo[key] = hit
    stages, error = hit
    rz = realization(spec, np_, stages, weight, lowering=lowering, source="svd", error=error)
    if np_.exact_tolerance is not None and rz.weight_error <= np_.exact_tolerance:
        rz = replace(rz, source="exact")
    return rz


__all__ = ["DEFAULT_LOWERING", "check_edit", "factor_node", "realization", "realize"]
