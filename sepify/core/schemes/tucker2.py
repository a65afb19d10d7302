r"""``tucker2``: 1×1 ``C → R``, k×k ``R → R``, 1×1 ``R → N`` (Kim et al. 2016) — three dense convs.

Per group ``q`` the weight ``W_q[n, c, k]`` (``Ng × Cg × K``) is compressed on both channel modes by
the higher-order SVD: ``U_out`` are the leading left singular vectors of the mode-0 unfolding
``W_q[n, (c, k)]``, ``U_in`` those of the mode-1 unfolding ``W_q[c, (n, k)]``, and the core is
``G = W_q ×₀ U_outᵀ ×₁ U_inᵀ`` (``R × R × K``).  The chain is ``U_inᵀ`` (1×1), ``G`` (k-conv with the
original stride, pads and dilation, ``g`` groups) and ``U_out`` (1×1, bias).  One rank ``r`` sets
both ranks, capped by the channels of each side: ``R_in = min(r, Cg)``, ``R_out = min(r, Ng)``.

With orthonormal factors the truncation error is the core energy left out:
``e(r)² = 1 − ‖G_full[:R_out, :R_in]‖² / ‖W‖²``, so one pair of eigen-decompositions gives the
error at every rank.  A weight of multilinear rank ``(R_out, R_in)`` is reproduced exactly.
"""

from __future__ import annotations

import numpy as np

from ..geometry import ConvGeometry, prod
from ..linalg import (FAST_GRAM_MIN, LEADING_TERMS, Spectrum, certify_tail, clear_of_exactness, energy,
                      range_basis)
from ..reasons import Reason
from ..stages import Stage, stages_macs
from .base import Scheme
from .lowrank import gram_eigh, in_view, out_matrices


def _bases(w64: np.ndarray, group: int, memo: dict | None = None, fast: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal ``U_out`` [g, Ng, Ng] and ``U_in`` [g, Cg, Cg], columns by falling singular value
    (``fast``: large sides from float32 decompositions, :func:`~sepify.core.schemes.lowrank.gram_eigh`)."""
    return gram_eigh(w64, group, "out", memo, fast)[1], gram_eigh(w64, group, "in", memo, fast)[1]


def _leading_basis(mats: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` leading left singular vectors ``[g, rows, k]`` of ``mats`` from a float32 randomized
    range basis (:func:`sepify.core.linalg.range_basis`): estimates for a report, never an
    exactness decision."""
    m = np.asarray(mats, dtype=np.float32)
    q = range_basis(m, k)
    u, _, _ = np.linalg.svd(q.transpose(0, 2, 1) @ m, full_matrices=False)
    return (q @ u[:, :, :k]).astype(np.float64)


def _core(w64: np.ndarray, group: int, u_out: np.ndarray, u_in: np.ndarray) -> np.ndarray:
    """``G[q, a, b, k] = Σ_{n,c} U_out[q, n, a] W[q, n, c, k] U_in[q, c, b]``."""
    n, cg = w64.shape[:2]
    w4 = w64.reshape(group, n // group, cg, -1)
    return np.einsum("qna,qnck,qcb->qabk", u_out, w4, u_in, optimize=True)


class Tucker2(Scheme):
    name = "tucker2"
    chainable = True  # its k×k stage may split into kh×1 and 1×kw exactly
    summary = "1×1 C→R, k×k R→R (the original stride/pads), 1×1 R→N (bias); g groups each"
    linear_macs = False

    def reason(self, geo: ConvGeometry) -> Reason | None:
        if prod(geo.kernel) == 1:
            return Reason.POINTWISE_KERNEL
        if geo.is_depthwise:
            return Reason.DEPTHWISE
        return None

    def _ranks(self, geo: ConvGeometry, r: int) -> tuple[int, int]:
        return min(r, geo.cin_per_group), min(r, geo.cout_per_group)

    def matrix_shape(self, geo: ConvGeometry, variant: str = "") -> tuple[int, int, int]:
        return geo.group, geo.cout_per_group, geo.cin_per_group * prod(geo.kernel)

    def max_rank(self, geo: ConvGeometry, variant: str = "") -> int:
        return max(geo.cin_per_group, geo.cout_per_group)

    def stages(self, geo: ConvGeometry, r: int, variant: str = "") -> list[Stage]:
        return self._stages(geo, *self._ranks(geo, r))

    @staticmethod
    def _stages(geo: ConvGeometry, r_in: int, r_out: int) -> list[Stage]:
        d, g = geo.rank, geo.group
        return [Stage(g * r_in, geo.cin_per_group, g, (1,) * d, (), role="pointwise"),
                Stage(g * r_out, r_in, g, tuple(geo.kernel), tuple(range(d)), role="dense"),
                Stage(geo.c_out, r_out, g, (1,) * d, (), role="pointwise")]

    def macs_curve(self, geo: ConvGeometry, top: int, variant: str = "") -> list[int]:
        """MACs at rank 1 … ``top`` from the chain's form ``a·R_in + b·R_in·R_out + c·R_out`` (each
        stage's MACs are its output channels times its inputs per group; its spatial size does not
        depend on the ranks), its coefficients from the chain at three rank pairs — one chain per
        rank had cost a YOLOv8n audit 20 ms of Python."""
        m11, m21, m12 = (stages_macs(geo, self._stages(geo, i, o)) for i, o in ((1, 1), (2, 1), (1, 2)))
        a, c = 2 * m11 - m12, 2 * m11 - m21
        b = m11 - a - c
        ranks = np.arange(1, top + 1)
        r_in, r_out = np.minimum(ranks, geo.cin_per_group), np.minimum(ranks, geo.cout_per_group)
        return [int(x) for x in a * r_in + b * r_in * r_out + c * r_out]

    def matrices(self, w: np.ndarray, geo: ConvGeometry, variant: str = "") -> np.ndarray:
        return out_matrices(w, geo.group)

    def curve(self, w: np.ndarray, geo: ConvGeometry, variant: str = "", memo: dict | None = None) -> np.ndarray:
        w64 = np.asarray(w, dtype=np.float64)
        total = float(np.sum(w64 * w64))
        top = self.max_rank(geo)
        if total == 0.0:
            return np.zeros(top + 1)

        def errors_of(dtype):
            u_out, u_in = _bases(w64, geo.group, memo, fast=dtype == np.float32)
            core = _core(w64.astype(dtype, copy=False), geo.group, u_out.astype(dtype, copy=False),
                         u_in.astype(dtype, copy=False))
            energy = np.square(core, dtype=np.float64).sum(axis=(0, 3))  # [Ng, Cg]
            kept = energy.cumsum(axis=0).cumsum(axis=1)
            errors = [1.0]
            for r in range(1, top + 1):
                r_in, r_out = self._ranks(geo, r)
                errors.append(float(np.sqrt(max(0.0, 1.0 - kept[r_out - 1, r_in - 1] / total))))
            return np.asarray(errors)

        if max(geo.cin_per_group, geo.cout_per_group) >= FAST_GRAM_MIN:
            # The bases' decompositions and the core's products in float32, as lossy_curve's.
            errors = errors_of(np.float32)
            if clear_of_exactness(errors, self.break_even(geo)):
                return errors
        return errors_of(np.float64)

    def spectrum(self, w: np.ndarray, geo: ConvGeometry, variant: str, bound: float, useful_rank: int, *,
                 depth: int | None = None, limit: int | None = None, estimate: bool = True,
                 total: float | None = None) -> Spectrum:
        """The full HOSVD curve; with ``depth`` (the default audit), a layer with more than ``limit``
        channels on a side is only certified: a rank-``r`` Tucker-2 is no better than the best rank-``r``
        projection of either channel mode, so when Courant–Fischer (:func:`certify_tail`) proves that
        no rank up to ``depth`` of the output mode (or the input mode) is within ``bound``, neither is
        Tucker-2, and the leading errors are estimated from float32 leading bases (``estimate=False``:
        not even those)."""
        g, ng, cg = geo.group, geo.cout_per_group, geo.cin_per_group
        if depth is None or limit is None or max(ng, cg) <= limit or useful_rank < 1:
            return Spectrum(self.curve(w, geo, variant))
        examined = min(depth, useful_rank, self.max_rank(geo) - 1)
        # Views of the weight as stored: a certificate widens only the rows and columns it reads.
        outs, ins = out_matrices(w, g), in_view(w, g)
        mats = [m for m in (outs, ins) if examined + 1 <= min(m.shape[1:])]
        if total is None:
            total = energy(w)
        if total == 0.0 or not any(certify_tail(m, examined, bound, total) for m in mats):
            return Spectrum(self.curve(w, geo, variant))
        if not estimate:
            return Spectrum(np.ones(1), complete=False, exact_above=examined, certified_error=bound)
        w64 = np.asarray(w, dtype=np.float64)
        outs, ins = out_matrices(w64, g), in_view(w64, g)
        top = min(LEADING_TERMS, self.max_rank(geo))
        u_out, u_in = _leading_basis(outs, min(top, ng)), _leading_basis(ins.full(), min(top, cg))
        kept = np.square(_core(w64, g, u_out, u_in)).sum(axis=(0, 3)).cumsum(axis=0).cumsum(axis=1)
        errors = [1.0]
        for r in range(1, top + 1):  # both ranks capped by their side's channels, as in curve()
            r_in, r_out = self._ranks(geo, r)
            errors.append(float(np.sqrt(max(0.0, 1.0 - kept[r_out - 1, r_in - 1] / total))))
        return Spectrum(np.asarray(errors), complete=False, exact_above=examined, certified_error=bound)

    def truncate(self, stages, geo: ConvGeometry, r_max: int, r: int, variant: str = "") -> list[Stage]:
        """The rank-``r`` chain inside the rank-``r_max`` one (HOSVD factors are nested; both ranks capped)."""
        g = geo.group
        (ri_max, ro_max), (r_in, r_out) = self._ranks(geo, r_max), self._ranks(geo, r)
        s1, s2, s3 = self.stages(geo, r)
        w1, w2, w3 = (np.asarray(st.weight) for st in stages)
        w1 = w1.reshape(g, ri_max, *w1.shape[1:])[:, :r_in].reshape(g * r_in, *w1.shape[1:])
        w2 = w2.reshape(g, ro_max, ri_max, *w2.shape[2:])[:, :r_out, :r_in].reshape(g * r_out, r_in, *w2.shape[2:])
        w3 = w3[:, :r_out]
        return [s1.with_weight(w1), s2.with_weight(w2), s3.with_weight(w3)]

    def factor(self, w: np.ndarray, geo: ConvGeometry, r: int, variant: str = "") -> list[Stage]:
        s1, s2, s3 = self.stages(geo, r)
        g, cg, ng = geo.group, geo.cin_per_group, geo.cout_per_group
        r_in, r_out = self._ranks(geo, r)
        w64 = np.asarray(w, dtype=np.float64)
        u_out, u_in = _bases(w64, g)
        u_out, u_in = u_out[:, :, :r_out], u_in[:, :, :r_in]
        core = _core(w64, g, u_out, u_in)  # [g, r_out, r_in, K]
        ones = (1,) * geo.rank
        w1 = u_in.transpose(0, 2, 1).reshape(g * r_in, cg, *ones)
        w2 = core.reshape(g * r_out, r_in, *geo.kernel)
        w3 = u_out.reshape(g * ng, r_out, *ones)
        return [s1.with_weight(w1), s2.with_weight(w2), s3.with_weight(w3)]


__all__ = ["Tucker2"]
