r"""The scheme interface: how one family of decompositions rearranges, factorizes and lowers a weight.

A convolution weight ``W`` has shape ``[N, C/g, k_1 … k_d]`` (``g`` groups, ``Cg = C/g`` inputs and
``Ng = N/g`` outputs per group, ``K = prod(k)``).  A scheme arranges ``W`` into a batch of matrices
(:meth:`Scheme.matrices`) whose rank-``r`` truncated SVDs are the factors of a chain of
convolutions (:meth:`Scheme.stages`, :meth:`Scheme.factor`).  The relative weight error at rank
``r`` is then the tail energy of those spectra (:func:`sepify.core.linalg.relative_errors`).

Some schemes come in *variants* whose spectra differ (the spatial split's two orders); a
variant is a short string, ``""`` where a scheme has one form.  :meth:`Scheme.variants` lists the
ones worth analysing, the cheaper (fewer MACs per rank) first.

Conventions every scheme keeps, which calibration relies on (:mod:`sepify.calibration.lstsq`):
the chain's *last* stage reads channels whose rank index ``j`` is the innermost index within each
of its groups, and the rank-``r`` chain is the rank-``r_max`` chain with the ranks ``≥ r`` cut
(:meth:`Scheme.truncate`) — SVD factors are nested.
"""

from __future__ import annotations

import functools

from abc import ABC, abstractmethod
from typing import ClassVar, Sequence

import numpy as np

from ..geometry import ConvGeometry
from ..linalg import FAST_GRAM_MIN, Spectrum, lossy_curve, spectrum
from ..reasons import Reason
from ..stages import Stage, stages_macs


@functools.lru_cache(maxsize=1 << 16)
def _macs(scheme: "Scheme", geo: ConvGeometry, r: int, variant: str) -> int:
    """A chain's MACs depend on the geometry alone: cached (a network repeats its shapes, and Tucker-2's
    break-even search and curve ask for the same ranks again)."""
    return stages_macs(geo, scheme.stages(geo, r, variant))


class Scheme(ABC):
    """One family of decompositions (a registry entry; see :mod:`sepify.core.schemes`)."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line: what the chain is
    # A full-kernel stage of this scheme's chain may be split further into kh×1 and 1×kw when that is
    # exact (sepify.core.chain): worth trying for the depthwise / grouped kernel stages of dw-pw, pw-dw.
    chainable: ClassVar[bool] = False

    # -- eligibility and shapes (no weight needed) ----------------------------------------------
    @abstractmethod
    def reason(self, geo: ConvGeometry) -> Reason | None:
        """Why this scheme cannot apply to a conv of this geometry (None: it can)."""

    def variants(self, geo: ConvGeometry) -> tuple[str, ...]:
        """The variants whose spectra differ, cheaper first."""
        return ("",)

    def resolve(self, geo: ConvGeometry, variant: str | None) -> str:
        """``variant``, or the cheaper one when it is None or empty."""
        return variant or self.variants(geo)[0]

    @abstractmethod
    def stages(self, geo: ConvGeometry, r: int, variant: str = "") -> list[Stage]:
        """Shape-only stages at rank ``r``."""

    @abstractmethod
    def matrix_shape(self, geo: ConvGeometry, variant: str = "") -> tuple[int, int, int]:
        """``(B, m, n)`` of :meth:`matrices` (without reading the weight)."""

    def macs(self, geo: ConvGeometry, r: int, variant: str = "") -> int:
        return _macs(self, geo, r, self.resolve(geo, variant))

    #: MACs grow linearly with the rank (``r`` times :meth:`macs_per_rank`); a scheme whose stages
    #: multiply two ranks (Tucker-2's core) says False and :meth:`macs_curve` computes each rank.
    linear_macs: ClassVar[bool] = True

    def macs_per_rank(self, geo: ConvGeometry, variant: str = "") -> int:
        """MACs of rank 1 (for linear schemes: every rank costs ``r`` times this)."""
        return self.macs(geo, 1, variant)

    def macs_curve(self, geo: ConvGeometry, top: int, variant: str = "") -> list[int]:
        """MACs at rank 1 … ``top``."""
        if self.linear_macs:
            per = self.macs_per_rank(geo, variant)
            return [per * r for r in range(1, top + 1)]
        return [self.macs(geo, r, variant) for r in range(1, top + 1)]

    def max_rank(self, geo: ConvGeometry, variant: str = "") -> int:
        _, m, n = self.matrix_shape(geo, self.resolve(geo, variant))
        return min(m, n)

    def break_even(self, geo: ConvGeometry, variant: str = "") -> int:
        """The largest rank that still costs fewer MACs than the conv (0: none), capped at the max rank."""
        top = self.max_rank(geo, variant)
        if self.linear_macs:
            per = self.macs_per_rank(geo, variant)
            return max(0, min(top, (geo.macs - 1) // per)) if per else top
        lo, hi = 0, top  # MACs rise with the rank: the last rank below the conv's
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.macs(geo, mid, variant) < geo.macs:
                lo = mid
            else:
                hi = mid - 1
        return lo

    # -- the weight ------------------------------------------------------------------------------
    @abstractmethod
    def matrices(self, w: np.ndarray, geo: ConvGeometry, variant: str = "") -> np.ndarray:
        """The batch of matrices ``[B, m, n]`` whose spectra give the errors of this scheme."""

    @abstractmethod
    def factor(self, w: np.ndarray, geo: ConvGeometry, r: int, variant: str = "") -> list[Stage]:
        """Stages with float64 weights whose composition approximates ``w`` at rank ``r``."""

    def curve(self, w: np.ndarray, geo: ConvGeometry, variant: str = "", memo: dict | None = None) -> np.ndarray:
        """Relative weight error at rank 0, 1, …, max rank (full spectrum, float64).  ``memo``: a dict
        for this one weight (and group count) in which schemes reading the same decomposition share it.
        Large matrices form their Gram in float32 where the errors up to the break-even rank stay
        clear of exactness (:func:`sepify.core.linalg.lossy_curve`)."""
        variant = self.resolve(geo, variant)
        if min(self.matrix_shape(geo, variant)[1:]) < FAST_GRAM_MIN:
            return lossy_curve(self.matrices(w, geo, variant), self.break_even(geo, variant))
        # Rearranged from the float32 weight: the copy is half the bytes, and its Gram is float32 anyway.
        return lossy_curve(self.matrices(np.asarray(w, dtype=np.float32), geo, variant), self.break_even(geo, variant),
                           exact=lambda: self.matrices(w, geo, variant))

    def matrix_view(self, w: np.ndarray, geo: ConvGeometry, variant: str = ""):
        """:meth:`matrices` as a :class:`~sepify.core.linalg.MatrixView` where they are a transposed
        copy of the weight (a certificate then reads a few rows and columns, not a copy); by default
        the matrices themselves."""
        return self.matrices(w, geo, variant)

    def spectrum(self, w: np.ndarray, geo: ConvGeometry, variant: str, bound: float, useful_rank: int,
                 **kw) -> Spectrum:
        """Errors by rank, certified instead of decomposed for large matrices (:func:`sepify.core.linalg.spectrum`;
        ``depth`` and ``limit`` pass through)."""
        return spectrum(self.matrix_view(w, geo, self.resolve(geo, variant)), useful_rank, bound, **kw)

    def truncate(self, stages: Sequence[Stage], geo: ConvGeometry, r_max: int, r: int,
                 variant: str = "") -> list[Stage]:
        """The rank-``r`` chain inside a rank-``r_max`` one (the SVD factors are nested): the first
        stage's channels ``(…, j)`` and the following stages' per-group inputs ``(…, j)`` with ``j < r``."""
        small = self.stages(geo, r, self.resolve(geo, variant))
        out = []
        for big, st in zip(stages, small):
            w = np.asarray(big.weight)
            if st.out_channels != big.out_channels:
                w = w.reshape(-1, r_max, *w.shape[1:])[:, :r].reshape(st.out_channels, *w.shape[1:])
            if st.in_per_group != big.in_per_group:
                w = w.reshape(w.shape[0], -1, r_max, *w.shape[2:])[:, :, :r].reshape(
                    w.shape[0], st.in_per_group, *w.shape[2:])
            out.append(Stage(st.out_channels, st.in_per_group, st.group, big.kernel, big.axes, w, big.role))
        return out

    def __repr__(self) -> str:
        return f"<scheme {self.name}>"


__all__ = ["Scheme"]
