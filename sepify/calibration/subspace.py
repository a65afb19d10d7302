r"""The two-stage channel splits (``out-lowrank``, ``pw-lowrank``) profiled from the conv's output
moments instead of a design matrix — pure numpy.

A rank-``R`` split of a conv into a k-conv ``C → R`` (first stage ``F``) and a 1×1 ``R → N`` (the
last stage, which calibration refits) needs, for its last stage's normal equations, the first
stage's outputs ``z = F x`` at every sampled row.  The SVD's first stage is ``F = √Σ V_rᵀ`` and the
conv is ``W = U Σ Vᵀ``, so on the original model (the reference pass, ``y = W x + b``)

.. math::  z = Σ^{-1/2} U_r^T (y - b)

— a linear function of the conv's own outputs.  The output moments ``Σ [y, 1][y, 1]ᵀ`` (``N²`` per
row, no patches, no first stage run) then give the normal equations at every rank
(:func:`project`), where a design costs ``rows · C·K · R``.

(Measured and left out: starting from the principal components of the outputs, ``U_Rᵀ W``
(Zhang et al. 2015, §3.1).  The refit of the last stage made the final factors as good either way,
but the curves it gave moved YOLOv8n's allocation towards these schemes: a lower channel drift on
the calibration photos, a higher 1 − cos on held-out ones, 2.0e-3 against 1.2e-3.)
"""

from __future__ import annotations

import numpy as np

from ..core.geometry import ConvGeometry
from ..core.stages import Stage
from .lstsq import NormalEquations

SCHEMES = ("out-lowrank", "pw-lowrank")  # the schemes profiled from output moments
# The moments are N² per group: a layer with very many outputs (a text recognizer's 18,385-way
# classifier head: 10.8 GB in two folds) is profiled from a design like the other schemes — its
# last stage has only r_max unknowns per output there.
MOMENTS_MAX_BYTES = 256 << 20


def moments_bytes(geo: ConvGeometry) -> int:
    """Memory of :func:`output_moments` (float64, two folds)."""
    n = geo.cout_per_group
    return 2 * geo.group * (n + 1) * (2 * n + 1) * 8


def fits(geo: ConvGeometry) -> bool:
    """Whether the layer's output moments are small enough to profile its channel splits from."""
    return moments_bytes(geo) <= MOMENTS_MAX_BYTES


def output_moments(geo: ConvGeometry) -> NormalEquations:
    """The system :func:`project` reads: ``[y, 1]`` against ``y`` per group."""
    return NormalEquations(geo.group, geo.cout_per_group, geo.cout_per_group, dtype=np.float32)


def from_outputs(stages: list[Stage], geo: ConvGeometry, bias: np.ndarray) -> np.ndarray:
    """``T`` ``[g, r+1, Ng+1]`` with ``[z, 1] = T [y, 1]``: the first stage's outputs ``z`` of a two-stage
    channel split, on the original model (``y = W x + b``).

    The SVD's first stage is ``F = D Bᵀ W`` for its second stage ``B = U_r √Σ`` (orthogonal columns)
    and ``D = diag(1/‖B_j‖²)``.  So ``z = D Bᵀ (y − b)``; zero columns of ``B`` (ranks past the
    weight's) give zero rows."""
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


__all__ = ["MOMENTS_MAX_BYTES", "SCHEMES", "fits", "from_outputs", "moments_bytes", "output_moments", "project"]
