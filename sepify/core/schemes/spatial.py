r"""``spatial``: a kh×1 conv then a 1×kw conv (or the other order) — 2-D only.

If every kernel sees one input channel (``Cg = 1``), each ``kh × kw`` kernel is split on its own
(``M_n = W[n, 0]``): a ``kh×1`` conv to ``N·r`` channels, then ``1×kw`` with ``N`` groups.
Otherwise the cross-channel matrix ``M[(c,i),(n,j)] = W[n,c,i,j]`` (``Cg·kh × Ng·kw`` per group)
of rank ``R`` gives ``C → g·R`` (``kh×1``) then ``g·R → N`` (``1×kw``).  The vertical
stride/pad/dilation go to the ``kh×1`` stage, the horizontal ones to the ``1×kw`` stage.

Variants: ``"v"`` runs the ``kh×1`` stage first, ``"h"`` the ``1×kw`` stage.  The first stage
runs at the input resolution of the axis it leaves alone, so with strides and asymmetric pads
the orders cost different MACs (``r`` times a rank-independent amount each: the cheaper order is
cheaper at every rank).  A per-kernel split has the same spectrum in both orders (a kernel and
its transpose); a cross-channel one does not — horizontal first factorizes ``M'[(c,j),(n,i)]``.
A rank-1 kernel (Sobel, Gaussian, box) is split exactly.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..geometry import ConvGeometry
from ..linalg import MatrixView, truncated_factors
from ..reasons import Reason
from ..stages import Stage, stages_macs
from .base import Scheme

VERTICAL, HORIZONTAL = "v", "h"


def kernel_matrices(w: np.ndarray) -> np.ndarray:
    """Per 2-D kernel: ``[N·Cg, kh, kw]``."""
    return w.reshape(-1, w.shape[-2], w.shape[-1])


def cross_channel_matrices(w: np.ndarray, group: int) -> np.ndarray:
    """Per group: ``M[(c,i),(n,j)] = W[n,c,i,j]``, shape ``[g, Cg·kh, Ng·kw]``."""
    n, cg, kh, kw = w.shape
    g5 = w.reshape(group, n // group, cg, kh, kw)  # q, n, c, i, j
    return np.ascontiguousarray(g5.transpose(0, 2, 3, 1, 4)).reshape(group, cg * kh, (n // group) * kw)


def _oriented_stages(geo: ConvGeometry, r: int, vertical_first: bool) -> list[Stage]:
    kh, kw = geo.kernel
    if geo.cin_per_group == 1:  # every kernel on its own
        first = Stage(geo.c_out * r, 1, geo.group, (kh, 1), (0,), role="vertical")
        second = Stage(geo.c_out, r, geo.c_out, (1, kw), (1,), role="horizontal")
    else:
        first = Stage(geo.group * r, geo.cin_per_group, geo.group, (kh, 1), (0,), role="vertical")
        second = Stage(geo.c_out, r, geo.group, (1, kw), (1,), role="horizontal")
    if vertical_first:
        return [first, second]
    # Horizontal first: same channel structure, axes swapped.
    return [replace(first, kernel=(1, kw), axes=(1,), role="horizontal"),
            replace(second, kernel=(kh, 1), axes=(0,), role="vertical")]


class Spatial(Scheme):
    name = "spatial"
    summary = "kh×1 then 1×kw (or the other order, whichever is cheaper with the strides/pads)"

    def reason(self, geo: ConvGeometry) -> Reason | None:
        if geo.rank != 2:
            return Reason.NOT_2D
        if 1 in geo.kernel:
            return Reason.KERNEL_ALREADY_1D
        return None

    def _cheaper(self, geo: ConvGeometry) -> str:
        v = stages_macs(geo, _oriented_stages(geo, 1, True))
        h = stages_macs(geo, _oriented_stages(geo, 1, False))
        return VERTICAL if v <= h else HORIZONTAL

    def variants(self, geo: ConvGeometry) -> tuple[str, ...]:
        first = self._cheaper(geo)
        if geo.cin_per_group == 1:
            return (first,)
        return (first, HORIZONTAL if first == VERTICAL else VERTICAL)

    def resolve(self, geo: ConvGeometry, variant: str | None) -> str:
        return variant or self._cheaper(geo)

    def matrix_shape(self, geo: ConvGeometry, variant: str = "") -> tuple[int, int, int]:
        kh, kw = geo.kernel
        if geo.cin_per_group == 1:
            return geo.c_out * geo.cin_per_group, kh, kw
        if self.resolve(geo, variant) == HORIZONTAL:
            kh, kw = kw, kh
        return geo.group, geo.cin_per_group * kh, geo.cout_per_group * kw

    def stages(self, geo: ConvGeometry, r: int, variant: str = "") -> list[Stage]:
        return _oriented_stages(geo, r, self.resolve(geo, variant) == VERTICAL)

    def matrices(self, w: np.ndarray, geo: ConvGeometry, variant: str = "") -> np.ndarray:
        if geo.cin_per_group == 1:
            return kernel_matrices(w)
        oriented = w if self.resolve(geo, variant) == VERTICAL else w.transpose(0, 1, 3, 2)
        return cross_channel_matrices(oriented, geo.group)

    def matrix_view(self, w: np.ndarray, geo: ConvGeometry, variant: str = ""):
        if geo.cin_per_group == 1:
            return kernel_matrices(w)
        oriented = w if self.resolve(geo, variant) == VERTICAL else w.transpose(0, 1, 3, 2)
        n, cg, kh, kw = oriented.shape
        return MatrixView(oriented.reshape(geo.group, n // geo.group, cg, kh, kw), 0, (2, 3), (1, 4))  # q; (c,i); (n,j)

    def factor(self, w: np.ndarray, geo: ConvGeometry, r: int, variant: str = "") -> list[Stage]:
        first, second = self.stages(geo, r, variant)
        vertical_first = first.role == "vertical"
        w64 = np.asarray(w, dtype=np.float64)
        kh, kw = geo.kernel
        if geo.cin_per_group == 1:
            left, right = truncated_factors(kernel_matrices(w64), r)  # [N, kh, r], [N, r, kw]
            if vertical_first:
                return [first.with_weight(left.transpose(0, 2, 1).reshape(geo.c_out * r, 1, kh, 1)),
                        second.with_weight(right.reshape(geo.c_out, r, 1, kw))]
            # Horizontal first: mid channel n*r+j carries v_j; the vertical stage sums j.
            return [first.with_weight(right.reshape(geo.c_out * r, 1, 1, kw)),
                    second.with_weight(left.transpose(0, 2, 1).reshape(geo.c_out, r, kh, 1))]
        g, cg, ng = geo.group, geo.cin_per_group, geo.cout_per_group
        # Horizontal first factorizes the transposed roles: M'[(c,j),(n,i)] = W[n,c,i,j].
        a_len, b_len = (kh, kw) if vertical_first else (kw, kh)
        oriented = w64 if vertical_first else w64.transpose(0, 1, 3, 2)
        left, right = truncated_factors(cross_channel_matrices(oriented, g), r)  # [g, Cg*a, r], [g, r, Ng*b]
        a = left.reshape(g, cg, a_len, r).transpose(0, 3, 1, 2)  # q, t, c, i
        b = right.reshape(g, r, ng, b_len).transpose(0, 2, 1, 3)  # q, n, t, j
        a_shape, b_shape = ((kh, 1), (1, kw)) if vertical_first else ((1, kw), (kh, 1))
        return [first.with_weight(a.reshape(g * r, cg, *a_shape)),
                second.with_weight(b.reshape(geo.c_out, r, *b_shape))]
