r"""``dw-pw``: depthwise then pointwise (MobileNet / Xception).

Per *input* channel ``c`` (in group ``q``): ``M_c = W[qNg:(q+1)Ng, c', :]`` is ``Ng × K``.
``M_c ≈ Σ_j σ_j u_j v_jᵀ`` gives a depthwise k-conv with channel multiplier ``r`` (kernel
``√σ_j v_j``, channel ``c·r + j``) followed by a pointwise conv with ``g`` groups (weights
``√σ_j u_j``, column ``c_local·r + j``) that adds the bias.
"""

from __future__ import annotations

import numpy as np

from ..geometry import ConvGeometry, prod
from ..linalg import Spectrum, by_chunks, gram_singular_values, relative_errors, truncated_factors
from ..reasons import Reason
from ..stages import Stage
from .base import Scheme


def dw_pw_matrices(w: np.ndarray, group: int) -> np.ndarray:
    """Per input channel: ``[C, Ng, K]`` with ``C = g·Cg`` ordered as the conv's input channels."""
    n, cg = w.shape[:2]
    g4 = w.reshape(group, n // group, cg, -1)  # g, Ng, Cg, K
    return np.ascontiguousarray(g4.transpose(0, 2, 1, 3)).reshape(group * cg, n // group, -1)


class DwPw(Scheme):
    name = "dw-pw"
    chainable = True
    summary = "depthwise k-conv with channel multiplier r, then pointwise (g groups, bias)"

    def reason(self, geo: ConvGeometry) -> Reason | None:
        # A group conv with one input channel per group is depthwise already; a plain conv of a
        # one-channel input (an audio front end, a grey-image stem) is not, and may split.
        if geo.is_depthwise:
            return Reason.DEPTHWISE
        return Reason.POINTWISE_KERNEL if prod(geo.kernel) == 1 else None

    def matrix_shape(self, geo: ConvGeometry, variant: str = "") -> tuple[int, int, int]:
        return geo.c_in, geo.cout_per_group, prod(geo.kernel)

    def stages(self, geo: ConvGeometry, r: int, variant: str = "") -> list[Stage]:
        d = geo.rank
        return [
            Stage(geo.c_in * r, 1, geo.c_in, geo.kernel, tuple(range(d)), role="depthwise"),
            Stage(geo.c_out, geo.cin_per_group * r, geo.group, (1,) * d, (), role="pointwise"),
        ]

    def matrices(self, w: np.ndarray, geo: ConvGeometry, variant: str = "") -> np.ndarray:
        return dw_pw_matrices(w, geo.group)

    def spectrum(self, w: np.ndarray, geo: ConvGeometry, variant: str, bound: float, useful_rank: int,
                 **kw) -> Spectrum:
        """Every matrix's short side is its kernel (``K ≤ Ng``): the per-channel ``K × K`` Grams are
        contracted from the weight as it is stored, without the transposed ``[C, Ng, K]`` copy."""
        n, cg = w.shape[:2]
        if prod(geo.kernel) > geo.cout_per_group:
            return super().spectrum(w, geo, variant, bound, useful_rank, **kw)
        g4 = np.asarray(w).reshape(geo.group, n // geo.group, cg, -1)  # q, n, c, k

        def grams(x):  # [q, c, k, n] @ [q, c, n, k]: strided views BLAS takes as they are (einsum was slower)
            return np.matmul(x.transpose(0, 2, 3, 1), x.transpose(0, 2, 1, 3))

        # In float64, widened a few input channels at a time (by_chunks): no float64 copy of the weight.
        gram = by_chunks(g4, 2, grams, out_axis=1).reshape(geo.group * cg, g4.shape[3], -1)
        return Spectrum(relative_errors(gram_singular_values(gram)))

    def factor(self, w: np.ndarray, geo: ConvGeometry, r: int, variant: str = "") -> list[Stage]:
        dw_st, pw_st = self.stages(geo, r)
        w64 = np.asarray(w, dtype=np.float64)
        left, right = truncated_factors(dw_pw_matrices(w64, geo.group), r)  # [C, Ng, r], [C, r, K]
        dw = right.reshape(geo.c_in * r, 1, *geo.kernel)
        # pointwise[n, c_local*r + j] for n in group q = left[q*Cg + c_local, n_local, j]
        ng, cg = geo.cout_per_group, geo.cin_per_group
        pw = left.reshape(geo.group, cg, ng, r).transpose(0, 2, 1, 3).reshape(geo.c_out, cg * r, *((1,) * geo.rank))
        return [dw_st.with_weight(dw), pw_st.with_weight(pw)]
