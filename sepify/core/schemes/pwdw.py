r"""``pw-dw``: pointwise then grouped k-conv (blueprint order).

Per *output* channel ``n``: ``M_n = W[n]`` is ``Cg × K``; a pointwise conv ``C → N·r``
(``√σ_j a_j``, channel ``n·r + j``) at input resolution, then a k-conv with ``N`` groups of ``r``
inputs (``√σ_j b_j``) that adds the bias.
"""

from __future__ import annotations

import numpy as np

from ..geometry import ConvGeometry, prod
from ..linalg import truncated_factors
from ..reasons import Reason
from ..stages import Stage
from .base import Scheme


def pw_dw_matrices(w: np.ndarray) -> np.ndarray:
    """Per output channel: ``[N, Cg, K]``."""
    return w.reshape(w.shape[0], w.shape[1], -1)


class PwDw(Scheme):
    name = "pw-dw"
    chainable = True
    summary = "pointwise C→N·r at input resolution, then k-conv with N groups of r (bias)"

    def reason(self, geo: ConvGeometry) -> Reason | None:
        if geo.is_depthwise:
            return Reason.DEPTHWISE
        return Reason.POINTWISE_KERNEL if prod(geo.kernel) == 1 else None

    def matrix_shape(self, geo: ConvGeometry, variant: str = "") -> tuple[int, int, int]:
        return geo.c_out, geo.cin_per_group, prod(geo.kernel)

    def stages(self, geo: ConvGeometry, r: int, variant: str = "") -> list[Stage]:
        d = geo.rank
        return [
            Stage(geo.c_out * r, geo.cin_per_group, geo.group, (1,) * d, (), role="pointwise"),
            Stage(geo.c_out, r, geo.c_out, geo.kernel, tuple(range(d)), role="depthwise" if r == 1 else "grouped"),
        ]

    def matrices(self, w: np.ndarray, geo: ConvGeometry, variant: str = "") -> np.ndarray:
        return pw_dw_matrices(w)

    def factor(self, w: np.ndarray, geo: ConvGeometry, r: int, variant: str = "") -> list[Stage]:
        pw_st, k_st = self.stages(geo, r)
        left, right = truncated_factors(pw_dw_matrices(np.asarray(w, dtype=np.float64)), r)  # [N, Cg, r], [N, r, K]
        pw = left.transpose(0, 2, 1).reshape(geo.c_out * r, geo.cin_per_group, *((1,) * geo.rank))
        return [pw_st.with_weight(pw), k_st.with_weight(right.reshape(geo.c_out, r, *geo.kernel))]
