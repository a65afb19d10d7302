r"""Data-aware first stages for the channel low-rank schemes (``out-lowrank``, ``pw-lowrank``) —
pure numpy.

A rank-``R`` split of a conv into a k-conv ``C → R`` and a 1×1 ``R → N`` can only reproduce outputs
inside the ``R``-dimensional subspace its 1×1 stage spans.  The weight's SVD picks the subspace that
keeps most of the *weight*; the subspace that keeps most of the *outputs* on real data is spanned by
the principal components of the layer's responses (Zhang et al. 2015, "Accelerating very deep
convolutional networks for classification and detection", §3.1):

.. math::  Σ_y = W Σ_x W^T, \quad Σ_y = U Λ U^T, \quad
           \hat y = U_R U_R^T (W x - W\bar x) + W \bar x + b

so the first stage is ``U_Rᵀ W`` (no bias), the second ``U_R`` with bias ``b + (I − U_R U_Rᵀ) W x̄``.
Among rank-``R`` maps of the same inputs this minimizes the squared output error on the samples,
for every ``R`` at once (the eigenvectors are nested, as truncation needs).  Calibration then refits
the last stage on the partly rewritten model's inputs as for every scheme.

On the original model (the reference pass) the first stage's outputs are linear in the conv's own
outputs: ``U_rᵀ W x = U_rᵀ (y − b)``, and the SVD's ``√Σ V_rᵀ x = Σ^{-1/2} U_rᵀ (y − b)``.  So the
output moments ``Σ [y, 1][y, 1]ᵀ`` (``N² `` per row, no patches) give both schemes' normal
equations at every rank (:func:`project`), with either first stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..core.geometry import ConvGeometry
from ..core.schemes import get as get_scheme
from ..core.stages import Stage
from .lstsq import NormalEquations

SCHEMES = ("out-lowrank", "pw-lowrank")


def applies(scheme: str, geo: ConvGeometry) -> bool:
    return scheme in SCHEMES


def grouped_weight(w: np.ndarray, geo: ConvGeometry) -> np.ndarray:
    """``[g, Ng, Cg·K]`` float64."""
    return np.asarray(w, dtype=np.float64).reshape(geo.group, geo.cout_per_group, -1)


@dataclass
class OutputSubspace:
    """The principal output directions of one layer on the calibration samples, per group:
    ``basis[q]`` (``Ng × Ng``, columns by decreasing variance) and ``wx[q] = W_q x̄``."""

    scheme: str
    geo: ConvGeometry
    weight: np.ndarray = field(repr=False)  # [g, Ng, Cg·K]
    bias: np.ndarray = field(repr=False)  # [g, Ng]
    basis: np.ndarray = field(repr=False)
    wx: np.ndarray = field(repr=False)  # W x̄ = ȳ − b per group

    def stages(self, r: int) -> tuple[list[Stage], np.ndarray]:
        """The rank-``r`` chain (first ``U_rᵀW``, second ``U_r``) and its bias (flat, ``N``)."""
        g, ng, ck = self.weight.shape
        k = min(r, ng)
        u = np.zeros((g, ng, r))
        u[:, :, :k] = self.basis[:, :, :k]
        first = u.transpose(0, 2, 1) @ self.weight  # [g, r, Cg·K]
        bias = self.bias + self.wx - np.einsum("gnr,gr->gn", u, np.einsum("gnr,gn->gr", u, self.wx))
        a, b = get_scheme(self.scheme).stages(self.geo, r)
        geo = self.geo
        return ([a.with_weight(first.reshape(g * r, geo.cin_per_group, *geo.kernel)),
                 b.with_weight(u.reshape(geo.c_out, r, *((1,) * geo.rank)))], bias.reshape(-1))


def output_subspace(scheme: str, moments: NormalEquations, w: np.ndarray, bias: np.ndarray,
                    geo: ConvGeometry) -> OutputSubspace:
    """The principal components of the conv's outputs from their moments (both folds; ``moments``:
    :func:`output_moments`' system, the ones column last)."""
    moments.flush()
    a = moments.A.sum(0)  # [g, Ng+1, Ng+1]
    n = np.maximum(a[:, -1, -1], 1.0)
    mean = a[:, :-1, -1] / n[:, None]
    cov = a[:, :-1, :-1] / n[:, None, None] - mean[:, :, None] * mean[:, None, :]
    _, vecs = np.linalg.eigh(0.5 * (cov + cov.transpose(0, 2, 1)))
    b = np.asarray(bias, np.float64).reshape(geo.group, -1)
    return OutputSubspace(scheme, geo, grouped_weight(w, geo), b, vecs[:, :, ::-1].copy(), mean - b)


def output_moments(geo: ConvGeometry) -> NormalEquations:
    """The system :func:`output_subspace` and :func:`project` read: ``[y, 1]`` against ``y`` per group."""
    return NormalEquations(geo.group, geo.cout_per_group, geo.cout_per_group, dtype=np.float32)


def from_outputs(stages: list[Stage], geo: ConvGeometry, bias: np.ndarray) -> np.ndarray:
    """``T`` ``[g, r+1, Ng+1]`` with ``[z, 1] = T [y, 1]``: the first stage's outputs ``z`` of a two-stage
    channel split, on the original model (``y = W x + b``).

    Both first stages this module meets are ``F = D Bᵀ W`` for the second stage ``B`` (orthogonal
    columns) and ``D = diag(1/‖B_j‖²)``: ``U_rᵀ W`` with ``B = U_r``, and the SVD's ``√Σ V_rᵀ`` with
    ``B = U_r √Σ``.  So ``z = D Bᵀ (y − b)``; zero columns of ``B`` (ranks past the weight's) give
    zero rows."""
    g, ng = geo.group, geo.cout_per_group
    second = np.asarray(stages[-1].weight, dtype=np.float64).reshape(g, ng, -1)  # [g, Ng, r]
    r = second.shape[2]
    norms = (second ** 2).sum(axis=1)  # [g, r]
    scale = np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0)
    t_y = second.transpose(0, 2, 1) * scale[:, :, None]  # [g, r, Ng]
    out = np.zeros((g, r + 1, ng + 1))
    out[:, :r, :ng] = t_y
    out[:, :r, ng] = -np.einsum("grn,gn->gr", t_y, np.asarray(bias, np.float64).reshape(g, ng))
    out[:, r, ng] = 1.0
    return out


def project(moments: NormalEquations, t: np.ndarray) -> NormalEquations:
    """The last stage's normal equations when its inputs are ``[z, 1] = t [y, 1]`` (per group):
    ``t A tᵀ`` and ``t B``."""
    moments.flush()
    g = t.shape[0]
    out = NormalEquations(g, t.shape[1] - 1, moments.B.shape[3])
    out.A = np.einsum("gij,fgjk,glk->fgil", t, moments.A, t, optimize=True)
    out.B = np.einsum("gij,fgjk->fgik", t, moments.B, optimize=True)
    out.yy = moments.yy.copy()
    out.rows = list(moments.rows)
    return out


__all__ = ["OutputSubspace", "SCHEMES", "applies", "from_outputs", "output_moments", "output_subspace", "project"]
