r"""Least squares of the last stage of a chain, on sampled activations — pure numpy.

For a chain ``x → F₁ → … → F_{k−1} → S → y`` (see :mod:`sepify.core.schemes`), the first stages
``F`` stay as the SVD gives them and the last stage ``S`` and the bias are solved by ridge least
squares, per group of ``S``:

.. math::  \min_{S, b} \sum_{p} \lVert S\,F(\hat x_p) + b - y_p \rVert^2 + λ \lVert D^{1/2}([S, b] - [S_0, b_0]) \rVert^2

where ``y_p`` is the original conv's output at position ``p``, ``\hat x_p`` the input patch,
``[S₀, b₀]`` the weight-only solution and ``D = diag`` of the Gram matrix.  The ridge pulls toward
the weight-only factors, so an exact low-rank weight is reproduced exactly and ``λ → ∞`` is
weight-only SVD; λ is chosen by two-fold cross-validation (:func:`solve_ridge_cv`).  Rows are kept
as normal equations (:class:`NormalEquations`), so memory does not grow with the samples.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..threads import scratch

from ..core.geometry import ConvGeometry, prod
from ..core.stages import Stage

RIDGE_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
CURVE_RIDGE = 1e-3  # ridge of the per-rank error curves (the final solve cross-validates)
# A curve over this many unknowns is validated one way (fit on fold 0, errors on fold 1) instead of
# both: its cost is O(unknowns² · outputs) per rank and fold (a 512-channel 3×3 conv: 4,000+
# unknowns, ~5 s a fold), and one way is as unbiased, only noisier.  The final solve of a chosen
# rank still cross-validates both ways.
ONE_WAY_MIN = 1024
# Where the triangular inverse and Cholesky solves come from: scipy's LAPACK, on scipy's own OpenBLAS
# (the calibration entry points preload it, see sepify.threads.limited_blas).
LSTSQ_BLAS = ("scipy.linalg",)


def positions(seed: int, layer: int, sample: int, n_out: int, k: int) -> np.ndarray:
    """``k`` distinct output positions (flat indices into the output's spatial grid) for one sample."""
    if k >= n_out:
        return np.arange(n_out)
    rng = np.random.default_rng([seed, layer, sample])
    return np.sort(rng.choice(n_out, size=k, replace=False))


def gather_patches(x: np.ndarray, geo: ConvGeometry, batch_index: np.ndarray, flat_out: np.ndarray) -> np.ndarray:
    """Input patches ``[R, C, *kernel]`` of the output positions ``flat_out`` (row-major over the
    output spatial grid) of batch entries ``batch_index``: the conv's dilated receptive fields,
    zero outside the input (its padding)."""
    d = geo.rank
    pads = [(0, 0), (0, 0)] + [(geo.pads[a], geo.pads[d + a]) for a in range(d)]
    xp = np.pad(x, pads) if any(geo.pads) else x
    coords = np.unravel_index(flat_out, geo.out_spatial)
    r = len(flat_out)
    index: list[np.ndarray] = [np.asarray(batch_index).reshape((r,) + (1,) * d)]
    for a in range(d):
        shape = [r] + [1] * d
        shape[1 + a] = geo.kernel[a]
        idx = coords[a][:, None] * geo.strides[a] + np.arange(geo.kernel[a])[None, :] * geo.dilations[a]
        index.append(idx.reshape(shape))
    # xp[b, :, i, j] with advanced indices around a slice: the advanced dims come first.
    patches = xp[(index[0], slice(None), *index[1:])]  # [R, k..., C]
    return np.moveaxis(patches, -1, 1)


def apply_stage(window: np.ndarray, stage: Stage, slot: str | None = None) -> np.ndarray:
    """One stage of a chain applied to windows ``[R, C_in, w…]``: the stage sums its kernel over
    its own axes (whose window length equals its kernel), the other axes are carried along.
    Computed as one batched matrix product per group, in the window's dtype; ``slot``: the product
    goes to that :func:`~sepify.threads.scratch` buffer (a view of it comes back)."""
    r, d = window.shape[0], window.ndim - 2
    g, ip = stage.group, stage.in_per_group
    op = stage.out_channels // g
    axes = [a for a in range(d) if a in stage.axes]
    kept = [a for a in range(d) if a not in stage.axes]
    dims = window.shape[2:]
    t = window.reshape(r, g, ip, *dims)
    # [g, r, kept…, ip, axes…] -> [g, r·kept, ip·axes]
    order = [1, 0] + [3 + a for a in kept] + [2] + [3 + a for a in axes]
    t = t.transpose(order).reshape(g, r * prod(dims[a] for a in kept), ip * prod(dims[a] for a in axes))
    w = np.asarray(stage.weight).reshape(g, op, ip * prod(stage.kernel[a] for a in axes)).astype(window.dtype, copy=False)
    if slot is None:
        out = np.matmul(t, w.transpose(0, 2, 1))  # [g, r·kept, op]
    else:
        out = np.matmul(t, w.transpose(0, 2, 1), out=scratch(slot, (g, t.shape[1], op), t.dtype))
    out = out.reshape(g, r, *[dims[a] for a in kept], op)
    out = np.moveaxis(out, -1, 1).transpose([2, 0, 1] + list(range(3, 3 + len(kept))))  # [r, g, op, kept…]
    shape = [r, g * op] + [1 if a in stage.axes else dims[a] for a in range(d)]
    return out.reshape(shape)


def last_stage_design(patches: np.ndarray, stages: Sequence[Stage], dtype=np.float64) -> np.ndarray:
    """The last stage's inputs at each row, per group: ``[g, R, ip·K]``."""
    z = np.asarray(patches, dtype=dtype)
    for i, st in enumerate(stages[:-1]):  # intermediate products in scratch buffers, two in turn
        z = apply_stage(z, st, slot=f"design{i % 2}")
    last = stages[-1]
    r = z.shape[0]
    g, ip = last.group, last.in_per_group
    # Window axes the last stage does not convolve have length 1 by now: one copy into the layout.
    split = z.reshape(r, g, ip, *z.shape[2:])
    out = np.empty((g, r, ip, *z.shape[2:]), dtype=z.dtype)
    np.copyto(out, split.transpose(1, 0, *range(2, split.ndim)))
    return out.reshape(g, r, ip * prod(last.kernel))


class NormalEquations:
    """Per-group normal equations of ``[Z, 1]·X ≈ Y`` in two folds (for ridge cross-validation).

    ``A[f, q] = Σ [z,1]ᵀ[z,1]``, ``B[f, q] = Σ [z,1]ᵀ y``, ``yy[f, q] = Σ ‖y‖²`` over the rows of fold f.
    Rows are buffered and folded in by blocks (few large products instead of many small ones).
    """

    BLOCK_BYTES = 8 << 20  # buffered design rows per fold

    def __init__(self, groups: int, d: int, outs: int, dtype=np.float64):
        self.A = np.zeros((2, groups, d + 1, d + 1))
        self.B = np.zeros((2, groups, d + 1, outs))
        self.yy = np.zeros((2, groups))
        self.rows = [0, 0]
        self.dtype = np.dtype(dtype)  # of the products (float32: twice as fast, sums still in float64)
        self._buf: list[list[tuple[np.ndarray, np.ndarray]]] = [[], []]
        self._buffered = [0, 0]
        self.block = max(64, min(8192, self.BLOCK_BYTES // max(1, groups * (d + 1 + outs) * self.dtype.itemsize)))

    @property
    def nbytes(self) -> int:
        return self.A.nbytes + self.B.nbytes

    def add(self, fold: int, z: np.ndarray, y: np.ndarray) -> None:
        """``z``: ``[g, R, d]``; ``y``: ``[g, R, outs]``."""
        self._buf[fold].append((z, y))
        self._buffered[fold] += z.shape[1]
        self.rows[fold] += z.shape[1]
        if self._buffered[fold] >= self.block:
            self._flush(fold)

    def _flush(self, fold: int) -> None:
        if not self._buf[fold]:
            return
        g, d = self.A.shape[1], self.A.shape[2] - 1
        n = self._buffered[fold]
        # Filled and consumed here: scratch buffers, not fresh blocks (their page faults cost more
        # than the products).
        za = scratch("flush_z", (g, n, d + 1), self.dtype)
        y = scratch("flush_y", (g, n, self.B.shape[3]), self.dtype)
        at = 0
        for zb, yb in self._buf[fold]:
            k = zb.shape[1]
            za[:, at:at + k, :d] = zb
            y[:, at:at + k] = yb
            at += k
        za[:, :, d] = 1.0
        self._buf[fold], self._buffered[fold] = [], 0
        zt = za.transpose(0, 2, 1)
        outs = self.B.shape[3]
        self.A[fold] += np.matmul(zt, za, out=scratch("flush_a", (g, d + 1, d + 1), self.dtype))
        self.B[fold] += np.matmul(zt, y, out=scratch("flush_b", (g, d + 1, outs), self.dtype))
        self.yy[fold] += np.einsum("grk,grk->g", y, y, dtype=np.float64)

    def flush(self) -> "NormalEquations":
        self._flush(0)
        self._flush(1)
        return self


def _ridge_terms(a: np.ndarray, lam: float) -> np.ndarray:
    """``λ·(diag(A) + floor)`` per column: the ridge weights toward the weight-only solution."""
    return ridge_weights(np.diagonal(a, axis1=1, axis2=2), lam)


def ridge_weights(diag: np.ndarray, lam: float) -> np.ndarray:
    """``λ·(diag + floor)`` per group from the Gram's diagonal ``[g, d]`` (the floor keeps an all-zero
    column regularized)."""
    floor = 1e-9 * np.maximum(diag.mean(axis=1, keepdims=True), 1e-30)
    return lam * (diag + floor)


def _plus_diagonal(a: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``a + diag(d)`` per group (without a ``[g, n, n]`` identity product)."""
    out = a.copy()
    i = np.arange(a.shape[1])
    out[:, i, i] += d
    return out


# Below this size a batched general inverse of the groups' factors is cheaper than one LAPACK
# triangular inverse per group (pw-dw's last stage: hundreds of groups of a few unknowns).
TRIANGULAR_MIN = 96


def cholesky_inverse_factor(lhs: np.ndarray) -> np.ndarray:
    """``L⁻¹`` for ``lhs = L Lᵀ`` per group (raises LinAlgError when not positive definite).

    A triangular inverse costs a eighth of numpy's general one (LU + solve): the rank curves of
    wide layers (4,000+ unknowns for a 512-channel 3×3 conv) spend most of their time here.
    """
    low = np.linalg.cholesky(lhs)
    if lhs.shape[-1] < TRIANGULAR_MIN:
        return np.linalg.inv(low)
    from scipy.linalg.lapack import dtrtri

    out = np.empty_like(low)
    for q in range(low.shape[0]):
        inv, info = dtrtri(low[q], lower=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"triangular inverse failed (info {info})")
        out[q] = inv
    return out


def ridge_solve(a: np.ndarray, b: np.ndarray, x0: np.ndarray, lam: float) -> np.ndarray:
    """``argmin ‖[Z,1]X − Y‖² + λ Σ D_ii ‖X_i − X0_i‖²`` with ``D = diag(A)`` (+ a floor), batched over groups."""
    if not np.isfinite(lam):
        return x0.copy()
    dreg = _ridge_terms(a, lam)
    lhs = _plus_diagonal(a, dreg)
    rhs = b + dreg[:, :, None] * x0
    if lhs.shape[-1] >= TRIANGULAR_MIN:  # positive definite: Cholesky is half the work of LU
        from scipy.linalg import LinAlgError as ScipyLinAlgError, cho_factor, cho_solve

        try:
            return np.stack([cho_solve(cho_factor(l, lower=True, check_finite=False), r, check_finite=False)
                             for l, r in zip(lhs, rhs)])
        except (np.linalg.LinAlgError, ScipyLinAlgError):
            pass  # not numerically positive definite: LU, then least squares
    try:
        return np.linalg.solve(lhs, rhs)
    except np.linalg.LinAlgError:
        return np.stack([np.linalg.lstsq(l, r, rcond=None)[0] for l, r in zip(lhs, rhs)])


def sq_error(x: np.ndarray, a: np.ndarray, b: np.ndarray, yy: np.ndarray) -> float:
    """``Σ ‖[Z,1]X − Y‖²`` from the normal equations (clipped at 0 against rounding)."""
    e = yy.sum() - 2 * float((x * b).sum()) + float((x * (a @ x)).sum())
    return float(max(e, 0.0))


def solve_ridge_cv(eq: NormalEquations, x0: np.ndarray, mask: np.ndarray | None = None,
                   grid: Sequence[float] = RIDGE_GRID) -> tuple[np.ndarray, float, float]:
    """Cross-validated ridge solve.  ``mask`` selects the columns (rank) in use, bias always kept.

    Returns ``(X, λ, relative validation error)``; ``λ = inf`` means the weight-only solution won.
    """
    eq.flush()
    cols = np.flatnonzero(np.append(mask, True)) if mask is not None else np.arange(eq.A.shape[2])
    a = eq.A[:, :, cols[:, None], cols[None, :]]
    b = eq.B[:, :, cols, :]
    x0c = x0[:, cols, :]
    total_yy = float(eq.yy.sum())
    candidates = list(grid) + [math.inf]
    both = eq.rows[0] > 0 and eq.rows[1] > 0
    if not both:
        lam = CURVE_RIDGE
        x = ridge_solve(a.sum(0), b.sum(0), x0c, lam)
        err = sq_error(x, a.sum(0), b.sum(0), eq.yy.sum(0))
        return expand_columns(x, cols, x0), lam, math.sqrt(err / total_yy) if total_yy > 0 else 0.0
    scores = []
    for lam in candidates:
        e = 0.0
        for f in (0, 1):
            x = ridge_solve(a[f], b[f], x0c, lam)
            e += sq_error(x, a[1 - f], b[1 - f], eq.yy[1 - f])
        scores.append(e)
    best = int(np.argmin(scores))
    lam = candidates[best]
    x = ridge_solve(a[0] + a[1], b[0] + b[1], x0c, lam)
    return expand_columns(x, cols, x0), lam, math.sqrt(scores[best] / total_yy) if total_yy > 0 else 0.0


def rank_curve(eq: NormalEquations, x0: np.ndarray, inner: np.ndarray, ranks: Sequence[int],
               lam: float = CURVE_RIDGE) -> tuple[list[float], list[float]]:
    """Relative output error per rank of the ridge solution (two-fold validation; one way from
    :data:`ONE_WAY_MIN` unknowns) and of ``x0``.

    ``inner[j]``: the rank index of unknown ``j`` (the bias, last, has 0).  With the unknowns
    ordered rank-major, rank ``r`` uses a leading block, so one Cholesky factor ``L`` per fold
    serves every rank: the leading block of ``L⁻¹`` is the inverse of the leading block of ``L``.
    """
    eq.flush()
    order = np.lexsort((np.arange(len(inner)), inner))
    order = np.concatenate([[len(inner) - 1], order[order != len(inner) - 1]])  # bias first
    a = eq.A[:, :, order[:, None], order[None, :]]
    b = eq.B[:, :, order, :]
    x0o = x0[:, order, :]
    sizes = [int(np.count_nonzero(inner[order] < r)) for r in ranks]
    total = float(eq.yy.sum())
    if total <= 0:
        return [0.0] * len(ranks), [0.0] * len(ranks)
    a_all, b_all, yy_all = a.sum(0), b.sum(0), eq.yy.sum(0)
    base = [math.sqrt(sq_error(x0o[:, :k], a_all[:, :k, :k], b_all[:, :k], yy_all) / total) for k in sizes]
    folds = (0, 1) if eq.rows[0] > 0 and eq.rows[1] > 0 else (None,)
    if len(folds) == 2 and a.shape[-1] >= ONE_WAY_MIN:
        folds = (0,)  # wide: fit on one fold, validate on the other (see ONE_WAY_MIN)
    errs = np.zeros(len(ranks))
    for f in folds:
        af, bf = (a[f], b[f]) if f is not None else (a_all, b_all)
        av, bv, yv = (a[1 - f], b[1 - f], eq.yy[1 - f]) if f is not None else (a_all, b_all, yy_all)
        dreg = _ridge_terms(af, lam)
        lhs = _plus_diagonal(af, dreg)
        rhs = bf + dreg[:, :, None] * x0o
        try:
            linv = cholesky_inverse_factor(lhs)
        except np.linalg.LinAlgError:
            linv = None
        # L⁻¹ is lower triangular, so the leading rows of L⁻¹·rhs are the leading block's own:
        # one product serves every rank.
        w = linv @ rhs if linv is not None else None
        for i, k in enumerate(sizes):
            if linv is not None:
                x = linv[:, :k, :k].transpose(0, 2, 1) @ w[:, :k]
            else:
                x = ridge_solve(af[:, :k, :k], bf[:, :k], x0o[:, :k], lam)
            errs[i] += sq_error(x, av[:, :k, :k], bv[:, :k], yv)
    checked = sum(float(eq.yy[1 - f].sum()) for f in folds) if folds != (None,) else total
    return [math.sqrt(e / checked) if checked > 0 else 0.0 for e in errs], base


def expand_columns(x: np.ndarray, cols: np.ndarray, like: np.ndarray) -> np.ndarray:
    """The unknowns ``x`` of columns ``cols`` in an array shaped ``like``, zero elsewhere."""
    full = np.zeros_like(like)
    full[:, cols, :] = x
    return full


def pack_last(stages: Sequence[Stage], bias: np.ndarray) -> np.ndarray:
    """The last stage's weight and ``bias`` as the unknowns ``X[g, ip·K + 1, op]``."""
    last = stages[-1]
    g = last.group
    op = last.out_channels // g
    w = np.asarray(last.weight, dtype=np.float64).reshape(g, op, -1).transpose(0, 2, 1)
    return np.concatenate([w, np.asarray(bias, dtype=np.float64).reshape(g, 1, op)], axis=1)


def unpack_last(stages: Sequence[Stage], x: np.ndarray) -> tuple[list[Stage], np.ndarray]:
    last = stages[-1]
    w = x[:, :-1, :].transpose(0, 2, 1).reshape(last.out_channels, last.in_per_group, *last.kernel)
    return [*stages[:-1], last.with_weight(w)], x[:, -1, :].reshape(-1)


def rank_inner(stages: Sequence[Stage], r_max: int) -> np.ndarray:
    """Rank index of every unknown of the last stage (bias last, index 0), for a rank-``r_max`` chain."""
    last = stages[-1]
    k = prod(last.kernel)
    col = np.arange(last.in_per_group * k)
    return np.append((col // k) % r_max, 0)


def rank_mask(stages: Sequence[Stage], r_max: int, r: int) -> np.ndarray:
    """Columns of the last stage's unknowns that a rank-``r`` chain uses, within a rank-``r_max``
    one whose rank index is the innermost of the last stage's per-group inputs."""
    last = stages[-1]
    k = prod(last.kernel)
    col = np.arange(last.in_per_group * k)
    return ((col // k) % r_max) < r


def folds_of(sample_of_row: np.ndarray, samples: int) -> np.ndarray:
    """Cross-validation fold of every row: by sample parity (rows of one image stay together),
    by row parity when there is a single sample."""
    if samples >= 2:
        return sample_of_row % 2
    return np.arange(len(sample_of_row)) % 2


def grouped_targets(y: np.ndarray, last: Stage, dtype=np.float64) -> np.ndarray:
    g = last.group
    return np.ascontiguousarray(y.reshape(y.shape[0], g, -1).transpose(1, 0, 2), dtype=dtype)


def add_rows(eq: NormalEquations, z: np.ndarray, y: np.ndarray, folds: np.ndarray) -> None:
    for f in (0, 1):
        sel = np.flatnonzero(folds == f)
        if sel.size == 0:
            continue
        if sel.size == len(folds):
            eq.add(f, z, y)
        elif sel[-1] - sel[0] + 1 == sel.size:  # one run of rows: a view
            eq.add(f, z[:, sel[0]:sel[-1] + 1], y[:, sel[0]:sel[-1] + 1])
        else:
            eq.add(f, z[:, sel], y[:, sel])


__all__ = ["CURVE_RIDGE", "NormalEquations", "RIDGE_GRID", "add_rows", "apply_stage", "folds_of", "gather_patches",
           "grouped_targets", "last_stage_design", "pack_last", "positions", "rank_curve", "rank_inner", "rank_mask",
           "ridge_solve", "ridge_weights", "expand_columns", "solve_ridge_cv", "sq_error", "unpack_last"]
