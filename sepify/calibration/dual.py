r"""The same ridge least squares as :mod:`sepify.calibration.lstsq`, in the dual (kernel) form, for
layers with fewer sampled rows than unknowns — pure numpy.

A wide conv late in a network has few output positions (ResNet-18's last stage: 7×7 per image, so
1,568 rows from 32 images) and many unknowns (its dw-pw last stage: 512·9 + 1 = 4,609).  The primal
normal equations cost ``rows·unknowns²`` to form and ``unknowns³`` to factor; the dual costs
``rows²·unknowns`` and ``rows³``.  With ``D = λ·(diag(ZᵀZ) + floor)`` (the ridge of
:func:`~sepify.calibration.lstsq.ridge_solve`) and the residual ``r = Y − Z X₀`` of the weight-only
factors, Woodbury's identity gives the same solution from an ``R × R`` system:

.. math::  X = X_0 + (Z^TZ + D)^{-1} Z^T r = X_0 + D^{-1} Z^T (Z D^{-1} Z^T + I)^{-1} r

A rank-``k`` curve point uses the leading ``k`` unknowns (ordered rank-major, bias first), so the
kernel ``Z_k D_k^{-1} Z_k^T`` grows by one block of columns per grid rank: every rank costs one
``R_f × R_f`` Cholesky factor, not a new system.  Validation is two-fold, as in the primal form,
and one way from :data:`~sepify.calibration.lstsq.ONE_WAY_MIN` unknowns, as there.
The rows are kept (float32, as collected) instead of their normal equations.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from . import lstsq
from .lstsq import (CURVE_RIDGE, RIDGE_GRID, NormalEquations, expand_columns, rank_curve, ridge_weights, solve_ridge_cv,
                    sq_error)

# The dual form is used when its estimated work is below this fraction of the primal's (the primal
# accumulates its Gram in float32 and runs fast BLAS kernels; the dual does more, smaller steps).
DUAL_ADVANTAGE = 0.5


def dual_pays(groups: int, unknowns: int, outs: int, rows: int, ranks: int) -> bool:
    """True when a system of ``rows`` expected rows and ``unknowns`` per group is cheaper in the dual
    form (flop estimates of :func:`rank_curve_dual` against :func:`~sepify.calibration.lstsq.rank_curve`)."""
    u, n, r = unknowns + 1, outs, max(rows, 1)
    f = r / 2  # rows per fold
    primal = r * u * u + 2 * (2 * u ** 3 / 3) + 2 * ranks * 2 * (u * u * n) / 3
    dual = 2 * (2 * f * f * u + ranks * (f ** 3 / 3 + 3 * f * f * n))
    return groups * dual < DUAL_ADVANTAGE * groups * primal


class DesignRows:
    """The rows ``[Z, 1]`` and targets ``Y`` of a least-squares system per group, in two folds
    (the interface of :class:`~sepify.calibration.lstsq.NormalEquations` that calibration uses:
    ``add``, ``flush``, ``rows``, ``yy``)."""

    def __init__(self, groups: int, d: int, outs: int, dtype=np.float32):
        self.groups, self.d, self.outs = groups, d, outs
        self.dtype = np.dtype(dtype)
        self._z: list[list[np.ndarray]] = [[], []]
        self._y: list[list[np.ndarray]] = [[], []]
        self.rows = [0, 0]
        self.yy = np.zeros((2, groups))
        self._done: list[tuple[np.ndarray, np.ndarray] | None] = [None, None]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for f in (0, 1) for a in (*self._z[f], *self._y[f]))

    def add(self, fold: int, z: np.ndarray, y: np.ndarray) -> None:
        """``z``: ``[g, R, d]``; ``y``: ``[g, R, outs]``."""
        self._z[fold].append(np.asarray(z, dtype=self.dtype))
        self._y[fold].append(np.asarray(y, dtype=self.dtype))
        self.rows[fold] += z.shape[1]
        y64 = np.asarray(y, dtype=np.float64)
        self.yy[fold] += np.einsum("grk,grk->g", y64, y64)
        self._done[fold] = None

    def flush(self) -> "DesignRows":
        return self

    def fold(self, f: int) -> tuple[np.ndarray, np.ndarray]:
        """``([g, R_f, d + 1], [g, R_f, outs])`` of fold ``f`` in float64, the bias column last."""
        if self._done[f] is None:
            g = self.groups
            n = self.rows[f]
            z = np.empty((g, n, self.d + 1))
            y = np.empty((g, n, self.outs))
            at = 0
            for zb, yb in zip(self._z[f], self._y[f]):
                k = zb.shape[1]
                z[:, at:at + k, :self.d] = zb
                y[:, at:at + k] = yb
                at += k
            z[:, :, self.d] = 1.0
            self._done[f] = (z, y)
        return self._done[f]


def _ridge_diag(z: np.ndarray, lam: float) -> np.ndarray:
    """``λ·(diag(ZᵀZ) + floor)`` per group, the primal form's ridge (from the rows' column norms)."""
    return ridge_weights(np.einsum("grk,grk->gk", z, z), lam)


def _solve_spd(k: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``k⁻¹ rhs`` per group for ``k = K + I`` (symmetric, eigenvalues ≥ 1: LU is as stable as
    Cholesky here).  numpy's solver releases the GIL, so layers solved on the other analysis
    threads go on meanwhile (scipy's triangular solves held it)."""
    return np.linalg.solve(k, rhs)


def rank_curve_dual(rows: DesignRows, x0: np.ndarray, inner: np.ndarray, ranks: Sequence[int],
                    lam: float = CURVE_RIDGE) -> tuple[list[float], list[float]]:
    """:func:`~sepify.calibration.lstsq.rank_curve` from kept rows: the relative output error per
    rank of the ridge solution (two-fold validation) and of ``x0`` (on all rows)."""
    order = np.lexsort((np.arange(len(inner)), inner))
    order = np.concatenate([[len(inner) - 1], order[order != len(inner) - 1]])  # bias first
    sizes = [int(np.count_nonzero(inner[order] < r)) for r in ranks]
    x0o = x0[:, order, :]
    total = float(rows.yy.sum())
    if total <= 0:
        return [0.0] * len(ranks), [0.0] * len(ranks)
    parts = [rows.fold(f) for f in (0, 1)]
    both = rows.rows[0] > 0 and rows.rows[1] > 0
    # Weight-only error on every row: the predictions grow block by block.
    pred = [np.zeros_like(y) for _, y in parts]
    prev = 0
    base_sq = []
    for k in sizes:
        for f, (z, _) in enumerate(parts):
            if rows.rows[f]:
                pred[f] += z[:, :, order[prev:k]] @ x0o[:, prev:k]
        prev = k
        base_sq.append(sum(float(((pred[f] - parts[f][1]) ** 2).sum()) for f in (0, 1) if rows.rows[f]))
    base = [math.sqrt(e / total) for e in base_sq]
    plans = [(0, 1), (1, 0)] if both else [(0 if rows.rows[0] else 1,) * 2]
    if both and x0.shape[1] >= lstsq.ONE_WAY_MIN:
        plans = [(0, 1)]  # wide: fit on one fold, validate on the other, as the primal form does
    errs = np.zeros(len(ranks))
    for fit, val in plans:
        zf, yf = parts[fit]
        zv, yv = parts[val]
        zf, zv = zf[:, :, order], zv[:, :, order]
        dinv = 1.0 / _ridge_diag(zf, lam)  # [g, U]
        g, nf = zf.shape[0], zf.shape[1]
        kern = np.zeros((g, nf, nf))
        cross = np.zeros((g, zv.shape[1], nf))
        rf = yf.copy()  # Y_f − Z_f,k X0_k
        pv = np.zeros_like(yv)  # Z_v,k X0_k
        prev = 0
        for i, k in enumerate(sizes):
            blk = slice(prev, k)
            zs = zf[:, :, blk] * dinv[:, None, blk]
            kern += zs @ zf[:, :, blk].transpose(0, 2, 1)
            cross += zv[:, :, blk] @ zs.transpose(0, 2, 1)
            rf -= zf[:, :, blk] @ x0o[:, blk]
            pv += zv[:, :, blk] @ x0o[:, blk]
            prev = k
            lhs = kern.copy()
            lhs[:, np.arange(nf), np.arange(nf)] += 1.0
            alpha = _solve_spd(lhs, rf)
            errs[i] += float(((pv + cross @ alpha - yv) ** 2).sum())
    checked = sum(float(rows.yy[val].sum()) for _, val in plans)
    return [math.sqrt(e / checked) if checked > 0 else 0.0 for e in errs], base


def _scaled_kernels(z: np.ndarray, zv: np.ndarray | None):
    """``K₁ = Z W Zᵀ`` (eigen-decomposed), ``C₁ = Z_v W Zᵀ`` and ``W Zᵀ`` for ``W = (diag(ZᵀZ) + floor)⁻¹``:
    the ridge ``λ`` only rescales ``K₁``, so one decomposition serves every λ of the grid."""
    ws = z * (1.0 / _ridge_diag(z, 1.0))[:, None, :]
    kern = ws @ z.transpose(0, 2, 1)
    evals, evecs = np.linalg.eigh(kern)
    cross = None if zv is None else zv @ ws.transpose(0, 2, 1)
    return np.clip(evals, 0.0, None), evecs, cross, ws


def _alpha(evals, evecs, qr, lam):
    """``(K₁/λ + I)⁻¹ r`` from ``K₁ = Q Λ Qᵀ`` and ``qr = Qᵀ r``."""
    return evecs @ ((lam / (evals + lam))[:, :, None] * qr)


def solve_ridge_cv_dual(rows: DesignRows, x0: np.ndarray, mask: np.ndarray | None = None,
                        grid: Sequence[float] = RIDGE_GRID) -> tuple[np.ndarray, float, float]:
    """:func:`~sepify.calibration.lstsq.solve_ridge_cv` from kept rows: ``(X, λ, relative validation
    error)``, λ chosen by two-fold cross-validation (``inf``: the weight-only solution won).
    ``X = X₀ + W Zᵀ (K₁ + λI)⁻¹ r`` with ``K₁ = Z W Zᵀ`` (the module docstring's, divided by λ)."""
    cols = np.flatnonzero(np.append(mask, True)) if mask is not None else np.arange(x0.shape[1])
    x0c = x0[:, cols, :]
    total = float(rows.yy.sum())
    parts = [(z[:, :, cols], y) for z, y in (rows.fold(f) for f in (0, 1))]
    candidates = list(grid) + [math.inf]
    if rows.rows[0] > 0 and rows.rows[1] > 0:
        scores = np.zeros(len(candidates))
        for f in (0, 1):
            (z, y), (zv, yv) = parts[f], parts[1 - f]
            evals, evecs, cross, _ = _scaled_kernels(z, zv)
            qr = evecs.transpose(0, 2, 1) @ (y - z @ x0c)
            base = zv @ x0c - yv
            for i, lam in enumerate(candidates):
                delta = 0.0 if not np.isfinite(lam) else cross @ _alpha(evals, evecs, qr, lam) / lam
                scores[i] += float(((base + delta) ** 2).sum())
        best = int(np.argmin(scores))
        lam, score = candidates[best], float(scores[best])
        z = np.concatenate([parts[0][0], parts[1][0]], axis=1)
        y = np.concatenate([parts[0][1], parts[1][1]], axis=1)
    else:  # one fold only: no validation, the curves' ridge, in-sample error
        z, y = parts[0] if rows.rows[0] else parts[1]
        lam, score = CURVE_RIDGE, None
    if np.isfinite(lam):
        evals, evecs, _, ws = _scaled_kernels(z, None)
        alpha = _alpha(evals, evecs, evecs.transpose(0, 2, 1) @ (y - z @ x0c), lam)
        x = x0c + ws.transpose(0, 2, 1) @ alpha / lam
    else:
        x = x0c.copy()
    if score is None:
        score = float(((z @ x - y) ** 2).sum())
    return expand_columns(x, cols, x0), lam, math.sqrt(score / total) if total > 0 else 0.0


def weight_only_error(rows: DesignRows, x0: np.ndarray) -> float:
    """Relative output error of ``x0`` on every row."""
    total = float(rows.yy.sum())
    if total <= 0:
        return 0.0
    e = sum(float(((z @ x0 - y) ** 2).sum()) for f in (0, 1) if rows.rows[f] for z, y in [rows.fold(f)])
    return math.sqrt(e / total)


# -- either form ------------------------------------------------------------------------------------
def new_system(groups: int, d: int, outs: int, rows: int, ranks: int = 1, dtype=np.float64):
    """Normal equations, or kept rows when ``rows`` expected rows make the dual form cheaper."""
    if dual_pays(groups, d, outs, rows, ranks):
        return DesignRows(groups, d, outs, dtype)
    return NormalEquations(groups, d, outs, dtype=dtype)


def system_bytes(groups: int, d: int, outs: int, rows: int, ranks: int = 1) -> int:
    """Memory of :func:`new_system`'s choice (float32 rows; float64 normal equations in two folds)."""
    if dual_pays(groups, d, outs, rows, ranks):
        return groups * rows * (d + 1 + outs) * 4
    return 2 * groups * (d + 1) * (d + 1 + outs) * 8


def curve(eq, x0: np.ndarray, inner: np.ndarray, ranks: Sequence[int]) -> tuple[list[float], list[float]]:
    """Error curve per rank of either form (:func:`rank_curve`, :func:`rank_curve_dual`)."""
    return rank_curve_dual(eq, x0, inner, ranks) if isinstance(eq, DesignRows) else rank_curve(eq, x0, inner, ranks)


def solve_cv(eq, x0: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
    """Cross-validated ridge solve of either form."""
    return solve_ridge_cv_dual(eq, x0, mask) if isinstance(eq, DesignRows) else solve_ridge_cv(eq, x0, mask)


def svd_error(eq, x0: np.ndarray) -> float:
    """Relative output error of the weight-only unknowns ``x0`` on every row, either form."""
    if isinstance(eq, DesignRows):
        return weight_only_error(eq, x0)
    eq.flush()
    total = float(eq.yy.sum())
    return math.sqrt(sq_error(x0, eq.A.sum(0), eq.B.sum(0), eq.yy.sum(0)) / total) if total > 0 else 0.0


__all__ = ["DUAL_ADVANTAGE", "DesignRows", "curve", "dual_pays", "new_system", "rank_curve_dual", "solve_cv",
           "solve_ridge_cv_dual", "svd_error", "system_bytes", "weight_only_error"]
