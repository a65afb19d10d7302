"""Chaining: a dw-pw / pw-dw chain whose full-kernel stage is itself exactly separable is split
further into kh×1 and 1×kw (how an RGB Sobel becomes pointwise + depthwise 3×1 + depthwise 1×3)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .geometry import ConvGeometry
from .linalg import exact_rank, relative_errors, singular_values
from .schemes import get
from .stages import Stage, stage_geometry, stages_macs


def split_kernel_stage(stages: Sequence[Stage], geo: ConvGeometry, tol: float) -> list[Stage] | None:
    """The chain with its full-kernel stage split into kh×1 and 1×kw when that is exact (relative
    error of the stage within ``tol``) and cuts MACs; None otherwise."""
    if geo.rank != 2 or 1 in geo.kernel:
        return None
    index = next((i for i, st in enumerate(stages) if st.axes == (0, 1)), None)
    if index is None:
        return None
    spatial = get("spatial")
    sub = stage_geometry(geo, stages, index)
    w = stages[index].weight
    errors = relative_errors(singular_values(spatial.matrices(w, sub)))
    r = exact_rank(errors, tol)
    if r == 0 or errors[r] > tol:
        return None
    chain = [*stages[:index], *spatial.factor(w, sub, r), *stages[index + 1:]]
    if stages_macs(geo, chain) >= stages_macs(geo, stages):
        return None
    return chain


def chained_macs(w: np.ndarray, geo: ConvGeometry, scheme: str, r: int, tol: float, variant: str = "",
                 factor=None) -> int | None:
    """MACs of ``scheme`` at rank ``r`` with its full-kernel stage split exactly, or None if that does
    not pay.  ``factor()``: the scheme's stages at ``r`` when a caller keeps them (default: factored here)."""
    sch = get(scheme)
    if not sch.chainable:
        return None
    stages = factor() if factor is not None else sch.factor(w, geo, r, variant)
    chain = split_kernel_stage(stages, geo, tol)
    return stages_macs(geo, chain) if chain is not None else None


__all__ = ["chained_macs", "split_kernel_stage"]
