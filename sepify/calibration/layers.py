"""The layers calibration works on: candidate convs of the main graph with their (BatchNorm-folded)
weights, and the ranks worth evaluating per scheme."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from ..core.geometry import ConvGeometry, prod
from ..core.reasons import Reason
from ..core.schemes import get as get_scheme

MAX_CURVE_RANKS = 16  # ranks evaluated per scheme (a geometric grid beyond that)
# Reasons of nodes whose weight-based plan left them alone, though some scheme could apply.
ELIGIBLE_REASONS = (Reason.NO_EXACT_SAVING, Reason.NO_SAVING_WITHIN_TOL, Reason.RANK_SAVES_NOTHING,
                    Reason.NOT_NEEDED_FOR_BUDGET)


@dataclass
class Layer:
    """One candidate conv of the main graph (BatchNorm already folded)."""

    index: int
    name: str  # qualified
    node_name: str
    geo: ConvGeometry
    weight: np.ndarray  # stored dtype
    bias: np.ndarray  # float64 (zeros when the conv has none)
    x_name: str
    y_name: str
    spec: Any = field(repr=False, default=None)

    @property
    def w64(self) -> np.ndarray:
        return self.weight.astype(np.float64)

    def rows_per_sample(self, rows: int, samples: int) -> int:
        return max(1, min(prod(self.geo.out_spatial), math.ceil(rows / max(samples, 1))))


def candidate_ranks(geo: ConvGeometry, scheme: str, max_ranks: int = MAX_CURVE_RANKS,
                    grid: Iterable[int] | None = None) -> tuple[list[int], dict[int, int]]:
    """Ranks of ``scheme`` that cut MACs (all of them, or a geometric grid of ``max_ranks``; ``grid``:
    those of the given ranks), with their MACs."""
    sch = get_scheme(scheme)
    r_top = sch.break_even(geo)
    if r_top < 1:
        return [], {}
    if grid is not None:
        ranks = sorted({int(r) for r in grid if 1 <= r <= r_top})
    elif r_top <= max_ranks:
        ranks = list(range(1, r_top + 1))
    else:
        ranks = sorted({int(round(v)) for v in np.geomspace(1, r_top, max_ranks)})
    return ranks, {r: sch.macs(geo, r) for r in ranks}


def layers_from_plan(the_plan, names: Iterable[str] | None = None) -> list[Layer]:
    an = the_plan.analysis
    specs = {s.ref.qualified_name: s for s in an.specs}
    order = {s.ref.qualified_name: i for i, s in enumerate(an.specs)}
    wanted = set(names) if names is not None else None
    out = []
    for node in the_plan.nodes:
        if wanted is not None and node.qualified_name not in wanted:
            continue
        if wanted is None and not (node.action == "rewrite" or node.reason in ELIGIBLE_REASONS):
            continue
        spec = specs[node.qualified_name]
        if spec.ref.scope or spec.ref.op_type != "Conv":
            continue  # convs inside If/Loop bodies: their activations cannot be exposed; weight-only
        geo = spec.geometry()
        const = an.view.constant(spec.w_name, spec.ref)
        if geo is None or const is None:
            continue
        bias = np.zeros(geo.c_out)
        if spec.b_name:
            b = an.view.constant(spec.b_name, spec.ref)
            if b is None:
                continue
            bias = b.value.astype(np.float64).reshape(-1)
        out.append(Layer(order[node.qualified_name], node.qualified_name, spec.ref.name, geo, const.value, bias,
                         spec.x_name, spec.ref.node.output[0], spec))
    return out


__all__ = ["ELIGIBLE_REASONS", "Layer", "MAX_CURVE_RANKS", "candidate_ranks", "layers_from_plan"]
