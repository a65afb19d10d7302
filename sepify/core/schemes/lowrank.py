r"""Low rank across channels: every stage a dense convolution (onnxruntime runs them on its GEMM
kernels at full speed, unlike depthwise or 1-D stages).

For a weight ``W[N, C/g, k…]`` with ``g`` groups (``Ng = N/g``, ``Cg = C/g``, ``K = prod(k)``):

``out-lowrank``  per group ``M_q[n, (c, k)] = W[qNg + n, c, k]`` (``Ng × Cg·K``).  ``M_q ≈ U_q Σ V_qᵀ``
                 at rank ``R`` gives a k-conv ``C → g·R`` (``√Σ V_qᵀ``, the original stride, pads and
                 dilation) then a 1×1 conv ``g·R → N`` (``U_q √Σ``, ``g`` groups, bias) — Zhang et al.
                 (2015)'s channel decomposition.
``in-lowrank``   per group ``M_q[c, (n, k)] = W[qNg + n, c, k]`` (``Cg × Ng·K``): a 1×1 conv ``C → g·R``
                 at input resolution, then a k-conv ``g·R → N`` (``g`` groups, bias).
``pw-lowrank``   a 1×1 conv is a matrix: ``M_q = W[q…][:, :, 0…]`` (``Ng × Cg``) splits into 1×1 ``C → g·R``
                 then 1×1 ``g·R → N``.  (For 1×1 weights ``out-lowrank`` and ``in-lowrank`` are this same
                 split; they apply to larger kernels.)

The rank index is the innermost index of each group of the middle channels (stage 1's output
channel ``q·R + j``), as every scheme keeps it (:mod:`sepify.core.schemes.base`).
"""

from __future__ import annotations

import numpy as np

from ..geometry import ConvGeometry, prod
from ..linalg import FAST_GRAM_MIN, MatrixView, clear_of_exactness, eigh32, relative_errors, truncated_factors
from ..reasons import Reason
from ..stages import Stage
from .base import Scheme


def out_matrices(w: np.ndarray, group: int) -> np.ndarray:
    """``[g, Ng, Cg·K]``: rows are output channels."""
    n, cg = w.shape[:2]
    return w.reshape(group, n // group, -1)


def in_view(w: np.ndarray, group: int) -> MatrixView:
    """:func:`in_matrices` without the copy."""
    n, cg = w.shape[:2]
    return MatrixView(w.reshape(group, n // group, cg, -1), 0, (2,), (1, 3))  # q; c; (n, k)


def in_matrices(w: np.ndarray, group: int) -> np.ndarray:
    """``[g, Cg, Ng·K]``: rows are input channels."""
    n, cg = w.shape[:2]
    g4 = w.reshape(group, n // group, cg, -1)  # q, n, c, k
    return np.ascontiguousarray(g4.transpose(0, 2, 1, 3)).reshape(group, cg, -1)


def gram_eigh(w: np.ndarray, group: int, mode: str, memo: dict | None = None,
              fast: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, ``[g, s]``) and eigenvectors (``[g, s, s]``, columns in that order) of
    the Gram ``M Mᵀ`` of :func:`out_matrices` (``mode="out"``) or :func:`in_matrices` (``"in"``):
    ``σ²`` and the left singular vectors of the mode unfolding, in float64.  ``memo`` (a dict for one
    weight) keeps them for the other schemes reading the same unfolding — Tucker-2 needs both modes'
    vectors, out-lowrank and in-lowrank the same eigenvalues.  ``fast``: from
    :data:`~sepify.core.linalg.FAST_GRAM_MIN` rows on, Gram and decomposition in float32 (for a
    lossy plan's curves, which check that they stay clear of exactness)."""
    rows = w.shape[0] // group if mode == "out" else w.shape[1]
    fast = fast and rows >= FAST_GRAM_MIN
    key = ("gram_eigh", mode, group, fast)
    if memo is not None and key in memo:
        return memo[key]

    def gram(dtype):
        wd = np.asarray(w, dtype=dtype)
        m = out_matrices(wd, group) if mode == "out" else in_matrices(wd, group)
        return np.matmul(m, m.transpose(0, 2, 1))

    got = eigh32(gram(np.float32)) if fast else None
    if got is None:
        got = np.linalg.eigh(gram(np.float64))
    out = (got[0][:, ::-1].astype(np.float64, copy=False), got[1][:, :, ::-1].astype(np.float64, copy=False))
    if memo is not None:
        memo[key] = out
    return out


def _mode_curve(scheme: Scheme, w: np.ndarray, geo: ConvGeometry, mode: str, memo: dict | None) -> np.ndarray:
    """The scheme's curve from the memoized mode Gram when its rows are the short side (the base
    curve factors that same Gram); otherwise the base curve.  Large Grams in float32 first, as
    :func:`~sepify.core.linalg.lossy_curve` does, kept where the errors up to the break-even rank
    stay clear of exactness (:func:`~sepify.core.linalg.clear_of_exactness`)."""
    g, rows, cols = scheme.matrix_shape(geo)
    if memo is None or rows > cols:
        return Scheme.curve(scheme, w, geo)
    if rows >= FAST_GRAM_MIN:
        ev, _ = gram_eigh(w, geo.group, mode, memo, fast=True)
        errors = relative_errors(np.sqrt(np.clip(ev, 0.0, None)))
        if clear_of_exactness(errors, scheme.break_even(geo)):
            return errors
    ev, _ = gram_eigh(np.asarray(w, dtype=np.float64), geo.group, mode, memo)
    return relative_errors(np.sqrt(np.clip(ev, 0.0, None)))


class OutLowRank(Scheme):
    name = "out-lowrank"
    chainable = True  # its k×k stage may split into kh×1 and 1×kw exactly
    summary = "k×k conv C→R (the original stride/pads), then 1×1 R→N (bias); g groups each"

    def reason(self, geo: ConvGeometry) -> Reason | None:
        return Reason.POINTWISE_KERNEL if prod(geo.kernel) == 1 else None

    def matrix_shape(self, geo: ConvGeometry, variant: str = "") -> tuple[int, int, int]:
        return geo.group, geo.cout_per_group, geo.cin_per_group * prod(geo.kernel)

    def stages(self, geo: ConvGeometry, r: int, variant: str = "") -> list[Stage]:
        d = geo.rank
        return [Stage(geo.group * r, geo.cin_per_group, geo.group, tuple(geo.kernel), tuple(range(d)), role="dense"),
                Stage(geo.c_out, r, geo.group, (1,) * d, (), role="pointwise")]

    def matrices(self, w: np.ndarray, geo: ConvGeometry, variant: str = "") -> np.ndarray:
        return out_matrices(w, geo.group)

    def curve(self, w: np.ndarray, geo: ConvGeometry, variant: str = "", memo: dict | None = None) -> np.ndarray:
        return _mode_curve(self, w, geo, "out", memo)

    def factor(self, w: np.ndarray, geo: ConvGeometry, r: int, variant: str = "") -> list[Stage]:
        first, second = self.stages(geo, r)
        left, right = truncated_factors(out_matrices(np.asarray(w, dtype=np.float64), geo.group), r)
        # left [g, Ng, r] -> second[q·Ng + n, j]; right [g, r, Cg·K] -> first[q·r + j, c, k]
        w1 = right.reshape(geo.group * r, geo.cin_per_group, *geo.kernel)
        w2 = left.reshape(geo.c_out, r, *((1,) * geo.rank))
        return [first.with_weight(w1), second.with_weight(w2)]


class InLowRank(Scheme):
    name = "in-lowrank"
    chainable = True  # its k×k stage may split into kh×1 and 1×kw exactly
    summary = "1×1 conv C→R at input resolution, then k×k R→N (the original stride/pads, bias); g groups each"

    def reason(self, geo: ConvGeometry) -> Reason | None:
        return Reason.POINTWISE_KERNEL if prod(geo.kernel) == 1 else None

    def matrix_shape(self, geo: ConvGeometry, variant: str = "") -> tuple[int, int, int]:
        return geo.group, geo.cin_per_group, geo.cout_per_group * prod(geo.kernel)

    def stages(self, geo: ConvGeometry, r: int, variant: str = "") -> list[Stage]:
        d = geo.rank
        return [Stage(geo.group * r, geo.cin_per_group, geo.group, (1,) * d, (), role="pointwise"),
                Stage(geo.c_out, r, geo.group, tuple(geo.kernel), tuple(range(d)), role="dense")]

    def matrices(self, w: np.ndarray, geo: ConvGeometry, variant: str = "") -> np.ndarray:
        return in_matrices(w, geo.group)

    def matrix_view(self, w: np.ndarray, geo: ConvGeometry, variant: str = "") -> MatrixView:
        return in_view(w, geo.group)

    def curve(self, w: np.ndarray, geo: ConvGeometry, variant: str = "", memo: dict | None = None) -> np.ndarray:
        return _mode_curve(self, w, geo, "in", memo)

    def factor(self, w: np.ndarray, geo: ConvGeometry, r: int, variant: str = "") -> list[Stage]:
        first, second = self.stages(geo, r)
        left, right = truncated_factors(in_matrices(np.asarray(w, dtype=np.float64), geo.group), r)
        # left [g, Cg, r] -> first[q·r + j, c]; right [g, r, Ng·K] -> second[q·Ng + n, j, k]
        g, cg, ng = geo.group, geo.cin_per_group, geo.cout_per_group
        w1 = left.transpose(0, 2, 1).reshape(g * r, cg, *((1,) * geo.rank))
        w2 = right.reshape(g, r, ng, -1).transpose(0, 2, 1, 3).reshape(geo.c_out, r, *geo.kernel)
        return [first.with_weight(w1), second.with_weight(w2)]


class PwLowRank(OutLowRank):
    name = "pw-lowrank"
    chainable = False
    summary = "a 1×1 conv as a matrix: 1×1 C→R then 1×1 R→N (bias); g groups each"

    def reason(self, geo: ConvGeometry) -> Reason | None:
        return None if prod(geo.kernel) == 1 else Reason.NOT_POINTWISE


__all__ = ["InLowRank", "OutLowRank", "PwLowRank", "gram_eigh", "in_matrices", "out_matrices"]
