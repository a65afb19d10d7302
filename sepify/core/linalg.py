r"""Spectra, rank certificates and truncated factors of batches of matrices — pure numpy.

A scheme (:mod:`sepify.core.schemes`) rearranges a convolution weight into a batch of matrices
``[B, m, n]``; keeping ``r`` terms of each SVD gives the relative Frobenius weight error

.. math::  e(r) = \sqrt{\sum_b \sum_{i>r} \sigma_{b,i}^2} \,/\, \lVert W \rVert_F

Exactness is decided in float64 (:func:`singular_values`, :func:`certify_tail`); estimates that only
feed reported errors may use float32 (:func:`leading_singular_values`), and so may the Gram products
of a lossy plan's curves where they cannot come near an exact rank (:func:`lossy_curve`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

# Relative weight error that counts as exact: a small multiple of the dtype's rounding step.
EXACT_EPS_FACTOR = 2.0
# "Near-exact" for audit summaries: below what any trained network can tell apart.
NEAR_EXACT_TOL = 1e-3


def exact_tolerance(dtype) -> float:
    """Relative Frobenius error at the rounding level of ``dtype`` (float32: 2.4e-7, float16: 2.0e-3)."""
    return EXACT_EPS_FACTOR * float(np.finfo(np.dtype(dtype)).eps)


def singular_values(mats: np.ndarray) -> np.ndarray:
    r"""Singular values of a batch of matrices ``[B, m, n]`` in float64, descending, ``[B, min(m, n)]``.

    Uses the Gram matrix of the short side (``σ² = eig(M Mᵀ)``): its eigenvalues are accurate
    to ``ε₆₄·σ₁²``, i.e. relative errors down to ~1e-8 — well below float32's rounding, which is
    all the exactness test needs — and it is several times faster than a full SVD
    (:func:`short_gram`).
    """
    return gram_singular_values(short_gram(mats, np.float64))


# Widening a float32 weight to float64 in one piece touches fresh memory: on a cold start (the
# audit of a ResNet-50) the page faults of its 190 MB of float64 copies cost ~130 ms of the ~160 ms
# the conversions took.  Pieces of this size stay in the cache and reuse the allocator's memory.
CHUNK_BYTES = 1 << 20


def by_chunks(a: np.ndarray, axis: int, fn, out_axis: int = 0, dtype=np.float64) -> np.ndarray:
    """``fn(a.astype(dtype))`` computed on slices of ``a`` along ``axis`` of about
    :data:`CHUNK_BYTES` each, the results concatenated along ``out_axis`` (``fn`` must treat the
    slices independently).  No conversion (one call) when ``a`` already has ``dtype``."""
    if a.dtype == dtype:
        return fn(a)
    per = a.size // max(1, a.shape[axis]) * np.dtype(dtype).itemsize
    step = max(1, CHUNK_BYTES // max(1, per))
    if step >= a.shape[axis]:
        return fn(a.astype(dtype))
    index = [slice(None)] * a.ndim
    parts = []
    for start in range(0, a.shape[axis], step):
        index[axis] = slice(start, start + step)
        parts.append(fn(a[tuple(index)].astype(dtype)))
    return np.concatenate(parts, axis=out_axis)


def short_gram(mats: np.ndarray, dtype) -> np.ndarray:
    """The Gram matrices ``[B, s, s]`` of the short side of ``mats`` ``[B, m, n]``, products in
    ``dtype``, from strided views (BLAS takes them as they are: no transposed copy).  A narrower
    input is widened a piece at a time (:func:`by_chunks`): by matrices, or for one large matrix
    by columns of its long side, the partial Grams summed."""
    m = np.asarray(mats)
    if m.shape[1] > m.shape[2]:
        m = m.transpose(0, 2, 1)  # [B, s, L], s ≤ L: the Gram is m mᵀ

    def gram(x):
        return np.matmul(x, x.transpose(0, 2, 1))

    if m.dtype == dtype or m.shape[0] > 1 or m.size * np.dtype(dtype).itemsize <= CHUNK_BYTES:
        return by_chunks(m, 0, gram, dtype=dtype)
    step = max(1, CHUNK_BYTES // (m.shape[1] * np.dtype(dtype).itemsize))
    out = np.zeros((1, m.shape[1], m.shape[1]), dtype=dtype)
    for start in range(0, m.shape[2], step):
        out += gram(m[:, :, start:start + step].astype(dtype))
    return out


def gram_singular_values(gram: np.ndarray) -> np.ndarray:
    """Singular values, descending, from the float64 Gram matrices ``[B, s, s]`` of the short side."""
    return eig_singular_values(np.linalg.eigvalsh(gram))


def eig_singular_values(ev: np.ndarray) -> np.ndarray:
    """Singular values, descending, in float64, from a batch of Gram eigenvalues in ascending order ``[B, s]``."""
    return np.sqrt(np.clip(np.asarray(ev, dtype=np.float64)[:, ::-1], 0.0, None))


# A lossy plan's curve of matrices whose short side has at least FAST_GRAM_MIN rows forms its Gram
# and takes its eigenvalues in float32 (:func:`eigvalsh32`).  Measured on the 3×3 and 1×1 convs of
# trained models (VGG-16, a siamese VGG, ResNet-50's open_nsfw): up to the break-even rank the
# curves moved by at most 1.8e-6 of their value (float32 Gram, float64 eigenvalues: 1e-6).  Where
# the float32 curve comes within FAST_GRAM_FLOOR it is recomputed in float64: near an exact rank
# the rounding could show.
FAST_GRAM_MIN = 512
FAST_GRAM_FLOOR = 0.05


# Symmetric eigenvalues in float32 without the GIL.  numpy's eigvalsh computes float32 input in
# float64, and scipy's LAPACK wrappers hold the GIL (two threads then run one after the other).
# The LAPACK routine of the OpenBLAS numpy already loaded, called through ctypes (which releases
# the GIL), does both: a 1536×1536 Gram in 108 ms instead of 168 ms, and on 2 threads 65 ms per
# matrix instead of 112 ms. Integer arguments live in zeroed 64-bit cells: a library with 32-bit
# integers reads their low half on a little-endian machine, one with 64-bit integers the whole.
_SYEVD_SYMBOLS = ("scipy_ssyevd_64_", "scipy_ssyevd_", "ssyevd_64_", "ssyevd_")
_syevd: list = []  # [routine or None], found on first use
_syevd_lock = threading.Lock()


def _ssyevd():
    with _syevd_lock:  # the planner's threads ask at once
        if not _syevd:
            _syevd.append(_find_ssyevd())
        return _syevd[0]


def _find_ssyevd():
    import sys

    if sys.byteorder != "little":
        return None
    try:
        from threadpoolctl import ThreadpoolController

        libs = [lc.dynlib for lc in ThreadpoolController().lib_controllers if lc.internal_api == "openblas"]
    except Exception:  # noqa: BLE001 - no usable BLAS handle: numpy's float64 path
        return None
    for lib in libs:
        for name in _SYEVD_SYMBOLS:
            fn = getattr(lib, name, None)
            if fn is None:
                continue
            fn.restype = None
            probe = np.array([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 5.0]], dtype=np.float32)
            try:
                got = _call_ssyevd(fn, probe)
            except Exception:  # noqa: BLE001 - a routine that does not behave: not used
                continue
            if got is not None and np.allclose(got, [1.0, 3.0, 5.0], atol=1e-5):
                return fn
    return None


def _call_ssyevd(fn, sym: np.ndarray, vectors: bool = False):
    """Eigenvalues (ascending) of one symmetric float32 matrix by LAPACK's ``ssyevd``, or with
    ``vectors`` ``(values, vectors)`` (eigenvectors in the columns); None when LAPACK reports a failure."""
    import ctypes

    a = np.array(sym, dtype=np.float32, order="F")  # LAPACK overwrites it (with the eigenvectors)
    n = a.shape[0]
    cells = np.zeros(5, dtype=np.int64)  # n, lwork, liwork, info, and a spare zero
    cells[0] = n
    w = np.empty(n, dtype=np.float32)

    def call(work: np.ndarray, iwork: np.ndarray) -> None:
        ptr = cells.ctypes.data
        fn(ctypes.c_char_p(b"V" if vectors else b"N"), ctypes.c_char_p(b"L"), ctypes.c_void_p(ptr), a.ctypes.data_as(ctypes.c_void_p),
           ctypes.c_void_p(ptr), w.ctypes.data_as(ctypes.c_void_p), work.ctypes.data_as(ctypes.c_void_p),
           ctypes.c_void_p(ptr + 8), iwork.ctypes.data_as(ctypes.c_void_p), ctypes.c_void_p(ptr + 16),
           ctypes.c_void_p(ptr + 24), ctypes.c_size_t(1), ctypes.c_size_t(1))

    cells[1] = cells[2] = -1  # workspace query
    work, iwork = np.zeros(1, dtype=np.float32), np.zeros(1, dtype=np.int64)
    call(work, iwork)
    if cells[3] != 0:
        return None
    least = (1 + 6 * n + 2 * n * n, 3 + 5 * n) if vectors else (2 * n + 1, 1)  # LAPACK's minimum
    lwork, liwork = max(int(work[0]), least[0]), max(int(iwork[0]), least[1])
    cells[1], cells[2] = lwork, liwork
    call(np.zeros(lwork, dtype=np.float32), np.zeros(liwork, dtype=np.int64))
    if cells[3] != 0:
        return None
    return (w, a) if vectors else w


def _ssyevd_batch(grams: np.ndarray, vectors: bool):
    """``ssyevd`` over a batch ``[B, s, s]``: values ``[B, s]`` (and vectors ``[B, s, s]``), or None."""
    fn = _ssyevd()
    if fn is None:
        return None
    vals, vecs = [], []
    for g in grams:
        got = _call_ssyevd(fn, g, vectors)
        if got is None:
            return None
        w, v = got if vectors else (got, None)
        if not np.isfinite(w).all() or (v is not None and not np.isfinite(v).all()):
            return None
        vals.append(w)
        vecs.append(v)
    if not vals:
        vals_ = np.zeros(grams.shape[:2], dtype=np.float32)
        return (vals_, np.zeros(grams.shape, dtype=np.float32)) if vectors else vals_
    return (np.stack(vals), np.stack(vecs)) if vectors else np.stack(vals)


def eigvalsh32(grams: np.ndarray) -> np.ndarray | None:
    """Eigenvalues, ascending, of a batch of symmetric float32 matrices ``[B, s, s]`` computed in
    float32 with the GIL released; None where no such routine is available (or it failed)."""
    return _ssyevd_batch(grams, False)


def eigh32(grams: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`eigvalsh32` with the eigenvectors: ``(values [B, s] ascending, vectors [B, s, s] in the
    columns)``, float32, or None."""
    return _ssyevd_batch(grams, True)


def clear_of_exactness(errors: np.ndarray, useful_rank: int | None = None) -> bool:
    """Whether a float32 curve may stand: every error up to ``useful_rank`` (default: all) at or
    above :data:`FAST_GRAM_FLOOR`, where float32 rounding cannot hide an exact rank."""
    top = len(errors) - 1 if useful_rank is None else min(useful_rank, len(errors) - 1)
    return bool(np.asarray(errors)[:top + 1].min() >= FAST_GRAM_FLOOR)


def lossy_curve(mats: np.ndarray, useful_rank: int | None = None, exact=None) -> np.ndarray:
    """``relative_errors(singular_values(mats))`` for a lossy plan: from :data:`FAST_GRAM_MIN` on,
    the Gram product and its eigenvalues in float32 unless the errors up to ``useful_rank``
    (default: all) come within :data:`FAST_GRAM_FLOOR`.  ``exact()``: the matrices in full precision
    for that fallback, when ``mats`` were handed over in float32 (default: ``mats``)."""
    m = np.asarray(mats)
    if min(m.shape[1:]) >= FAST_GRAM_MIN:
        gram = short_gram(m, np.float32)
        ev = eigvalsh32(gram)
        if ev is None:
            ev = np.linalg.eigvalsh(gram.astype(np.float64))
        errors = relative_errors(eig_singular_values(ev))
        if clear_of_exactness(errors, useful_rank):
            return errors
    return relative_errors(singular_values(m if exact is None else exact()))


def tail_energy(sv: np.ndarray) -> np.ndarray:
    """``t[r] = Σ_b Σ_{i≥r} σ_{b,i}²`` for r = 0 … max rank (t[0] is ‖W‖²)."""
    per_rank = (sv.astype(np.float64) ** 2).sum(axis=0)
    tails = np.concatenate([np.cumsum(per_rank[::-1])[::-1], [0.0]])
    return tails


def relative_errors(sv: np.ndarray) -> np.ndarray:
    """Relative Frobenius error after keeping r terms in every matrix, for r = 0 … max rank."""
    tails = tail_energy(sv)
    total = tails[0]
    if total <= 0:
        return np.zeros_like(tails)
    return np.sqrt(np.clip(tails / total, 0.0, None))


def exact_rank(errors: np.ndarray, tol: float) -> int:
    """Smallest r whose relative error is within ``tol``."""
    hits = np.nonzero(errors <= tol)[0]
    return int(hits[0]) if hits.size else len(errors) - 1


# ----------------------------------------------------------------------------------------------
# Large matrices: certify "no (near-)exact factorization below rank B" without a full spectrum
# ----------------------------------------------------------------------------------------------
FULL_SPECTRUM_LIMIT = 512  # short side up to this: the full eigen-decomposition is cheap enough
LEADING_TERMS = 4  # leading singular values estimated when the full spectrum is skipped (ranks 1–4)


@dataclass
class Spectrum:
    """Relative error by rank of one scheme's matrices (``errors[r]``, r = 0, 1, …).

    ``complete`` is False when only the leading terms were estimated (errors within ~1e-3); then it is
    certified that every rank up to ``exact_above`` has an error above ``certified_error``.
    """

    errors: np.ndarray
    complete: bool = True
    exact_above: int | None = None
    certified_error: float | None = None


def leading_singular_values(mats: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Top-``k`` singular values ``[B, k]`` by randomized subspace iteration (Halko, Martinsson
    & Tropp 2011; 20 oversamples, 3 power iterations, float32).  Exact up to float32 rounding when
    the rank is at most ``k + 20``; they only feed reported errors (``e(r)² = 1 − Σσᵢ²/‖W‖²``),
    whose absolute error stays below ~1e-3 even on the flat spectra where the method converges
    slowest (``tests/test_spectrum.py``) — never an exactness decision, which needs float64."""
    m = np.asarray(mats, dtype=np.float32)
    if m.shape[1] > m.shape[2]:
        m = m.transpose(0, 2, 1)
    q = range_basis(m, k, seed)
    small = (q.transpose(0, 2, 1) @ m).astype(np.float64)
    return np.linalg.svd(small, compute_uv=False)[:, :k]


def range_basis(m: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """An orthonormal basis ``Q`` [B, rows, k + 20 at most] of the leading column space of float32
    ``m`` [B, rows, cols] (randomized range finder with 3 power iterations): ``Q Qᵀ m ≈ m`` on the
    top-``k`` singular directions."""
    p = min(k + 20, m.shape[1], m.shape[2])
    y = m @ np.random.default_rng(seed).standard_normal((m.shape[0], m.shape[2], p), dtype=np.float32)
    for _ in range(3):
        q, _ = np.linalg.qr(y)
        y = m @ (m.transpose(0, 2, 1) @ q)
    q, _ = np.linalg.qr(y)
    return q


def gamma(n: int) -> float:
    """Higham's γₙ = n·u / (1 − n·u) for float64 (u = 2⁻⁵³): the rounding bound of an n-term sum."""
    nu = n * 2.0 ** -53
    return nu / (1.0 - nu)


def _certified_positive(sub: np.ndarray, shift: float) -> bool:
    """True when ``σ_min(sub)² > shift`` for every matrix of the batch ``[B, p, q]`` (p ≥ q), proven
    in floating point: the Gram's rounding (``γ_p·trace``) and the Cholesky's backward error
    (``γ_{q+1}·trace``, Demmel/Rump) are added to the shift before factorizing."""
    if sub.shape[0] == 1:
        s2 = sub[0]
        gram = (s2.T @ s2)[None]  # 2-D: numpy hands AᵀA to BLAS syrk (half the work)
    else:
        gram = np.matmul(sub.transpose(0, 2, 1), sub)
    p, q = sub.shape[1], sub.shape[2]
    trace = float(np.trace(gram, axis1=1, axis2=2).max())
    margin = 1.01 * (gamma(p) + gamma(q + 1)) * trace
    gram[:, np.arange(q), np.arange(q)] -= shift + margin
    try:
        np.linalg.cholesky(gram)
    except np.linalg.LinAlgError:
        return False
    return True


class MatrixView:
    """A batch of matrices ``[B, m, n]`` that is a rearrangement of a weight, read through a strided
    view instead of copied: matrix ``b``'s row ``i`` is a multi-index over ``rows`` axes of the view,
    column ``j`` one over ``cols`` axes.  A certificate reads only a few rows and columns
    (:meth:`take`); only a full spectrum needs the copy (:meth:`full`) — for a 512-channel 3×3
    conv's transposed unfoldings that copy was a third of the default audit's time.
    """

    def __init__(self, view: np.ndarray, batch: int, rows: tuple[int, ...], cols: tuple[int, ...]):
        self.source = view  # the weight's own layout (contiguous when the weight is): for energy()
        self.view = view.transpose((batch, *rows, *cols))
        nr = len(rows)
        self.row_dims = self.view.shape[1:1 + nr]
        self.col_dims = self.view.shape[1 + nr:]
        self.shape = (self.view.shape[0], int(np.prod(self.row_dims)), int(np.prod(self.col_dims)))
        self.dtype = view.dtype

    @property
    def T(self) -> "MatrixView":
        nr = len(self.row_dims)
        axes = tuple(range(1, self.view.ndim))
        out = MatrixView(self.view, 0, axes[nr:], axes[:nr])
        out.source = self.source
        return out

    def full(self) -> np.ndarray:
        return np.ascontiguousarray(self.view).reshape(self.shape)

    def take(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``[B, len(rows), len(cols)]``: the submatrix of every matrix of the batch."""
        r = np.unravel_index(rows, self.row_dims)
        c = np.unravel_index(cols, self.col_dims)
        return self.view[(slice(None), *[i[:, None] for i in r], *[j[None, :] for j in c])]


def as_array(mats) -> np.ndarray:
    return mats.full() if isinstance(mats, MatrixView) else np.asarray(mats)


def energy(mats) -> float:
    """``Σ mᵢⱼ²`` over the batch, accumulated in float64 (a view's: over the weight it reads, in the
    weight's own order — a sum over a strided view costs several times more)."""
    v = mats.source if isinstance(mats, MatrixView) else np.asarray(mats)
    if v.flags.c_contiguous:
        flat = v.reshape(-1)
        if flat.dtype == np.float64:
            return float(flat @ flat)
        # Not via a float64 copy: on a cold start its page faults cost more than einsum's slower loop.
        return float(np.einsum("i,i->", flat, flat, dtype=np.float64))
    letters = "abcdefghij"[:v.ndim]
    return float(np.einsum(f"{letters},{letters}->", v, v, dtype=np.float64))


def certify_tail(mats: np.ndarray, rank: int, error: float, total: float | None = None) -> bool:
    r"""True when *provably* no rank-``rank`` truncation of ``mats`` has a relative error ≤ ``error``.

    Courant–Fischer (interlacing): for any ``rank + 1`` columns ``M_S`` of a matrix ``M``, and any
    subset of its rows, ``σ_{rank+1}(M) ≥ σ_min`` of that submatrix, and the truncation error is at
    least ``σ_{rank+1}²``.  So if ``M_Sᵀ M_S − t·I`` admits a Cholesky factorization,
    ``σ_min(M_S)² > t``, with ``t`` the energy ``error`` allows (plus rounding margins).  This costs a
    ``(rank+1)²`` Gram matrix and its Cholesky factor instead of an ``n³`` eigen-decomposition.
    A quarter more rows than columns is tried first — ``σ_min`` of a rectangle with that aspect
    ratio sits far above the tiny ``t`` unless the matrix really is near low rank — then all rows.
    """
    m = mats if isinstance(mats, MatrixView) else np.asarray(mats)
    if m.shape[1] < m.shape[2]:
        m = m.T if isinstance(m, MatrixView) else m.transpose(0, 2, 1)  # columns on the short side: rank + 1 ≤ short ≤ rows
    rows, short = m.shape[1], m.shape[2]
    if rank + 1 > short:
        return False
    if total is None:
        total = energy(m)
    if total == 0.0:
        return False
    cols = np.linspace(0, short - 1, rank + 1).round().astype(int)
    t = error * error * total
    few = min(rows, rank + 1 + max(32, (rank + 1) // 4))
    attempts = [np.linspace(0, rows - 1, few).round().astype(int)] if few < rows else []
    for picked in [*attempts, None]:
        if isinstance(m, MatrixView):
            sub = m.take(np.arange(rows) if picked is None else picked, cols)
        else:
            sub = m[:, :, cols] if picked is None else m[:, picked[:, None], cols]
        if _certified_positive(np.ascontiguousarray(sub, dtype=np.float64), t):
            return True
    return False


def spectrum(mats: "np.ndarray | MatrixView", useful_rank: int, bound: float, *, depth: int | None = None,
             limit: int = FULL_SPECTRUM_LIMIT, estimate: bool = True, total: float | None = None) -> Spectrum:
    """Errors by rank, exact where it matters and cheap where it cannot.

    Matrices whose short side exceeds ``limit`` first try :func:`certify_tail`: if no rank up to
    ``depth`` (default ``useful_rank``, the break-even rank) gets within ``bound`` (the near-exact
    tolerance), only the leading singular values are estimated for the report, and the spectrum says
    how far it was examined (``exact_above``); ``estimate=False`` skips even those (``errors`` is
    ``[1.0]``, rank 0 only).  Otherwise (a weight that may well be low rank) the full spectrum is
    computed.  ``total``: :func:`energy` of ``mats`` when the caller knows it (every scheme's
    matrices rearrange the same weight: the audit sums its squares once, not once per scheme).
    """
    short = min(mats.shape[1], mats.shape[2])
    if short <= limit or useful_rank < 1:
        return Spectrum(relative_errors(singular_values(as_array(mats))))
    if total is None:
        total = energy(mats)
    examined = min(useful_rank if depth is None else min(depth, useful_rank), short - 1)
    if not certify_tail(mats, examined, bound, total):
        return Spectrum(relative_errors(singular_values(as_array(mats))))
    if not estimate:
        return Spectrum(np.ones(1), complete=False, exact_above=examined, certified_error=bound)
    lead = leading_singular_values(as_array(mats), min(LEADING_TERMS, short))
    captured = np.concatenate([[0.0], np.cumsum((lead ** 2).sum(axis=0))])
    errors = np.sqrt(np.clip(1.0 - captured / total, 0.0, None))
    return Spectrum(errors, complete=False, exact_above=examined, certified_error=bound)


# Short sides from this size factor through the Gram matrix's eigenvectors (several times faster
# than LAPACK's SVD: a 1536×1536 spatial matrix 0.4 s instead of 1 s); below it the SVD is cheap.
GRAM_FACTOR_MIN = 128


def truncated_factors(mats: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """``M_b ≈ L_b R_b`` with ``L = U√Σ`` ``[B, m, r]`` and ``R = √Σ Vᵀ`` ``[B, r, n]`` (float64).

    From :data:`GRAM_FACTOR_MIN` on the short side, the leading singular vectors of that side come
    from the eigenvectors of its Gram matrix and the other factor from projecting ``M`` on them
    (``R = Σ^{-1/2} U_rᵀ M`` is ``√Σ V_rᵀ``): the same truncation, accurate for every direction
    with ``σᵢ/σ₁`` above ~1e-7 (the Gram squares the spectrum), which is all a truncation keeps.
    Ranks beyond ``min(m, n)`` are padded with zero factors so the lowered graph keeps a
    uniform channel multiplier.
    """
    m = np.asarray(mats, dtype=np.float64)
    short = min(m.shape[1], m.shape[2])
    k = min(r, short)
    if short >= GRAM_FACTOR_MIN:
        wide = m.shape[1] <= m.shape[2]
        mt = m.transpose(0, 2, 1)
        gram = m @ mt if wide else mt @ m
        w, vecs = np.linalg.eigh(gram)
        s = np.sqrt(np.clip(w[:, ::-1][:, :k], 0.0, None))
        vecs = vecs[:, :, ::-1][:, :, :k]
        root = np.sqrt(s)
        keep = s > s[:, :1] * 1e-12  # numerically zero directions get zero factors
        inv = np.where(keep, 1.0 / np.where(keep, root, 1.0), 0.0)
        if wide:
            left = vecs * np.where(keep, root, 0.0)[:, None, :]
            right = (vecs.transpose(0, 2, 1) @ m) * inv[:, :, None]
        else:
            right = vecs.transpose(0, 2, 1) * np.where(keep, root, 0.0)[:, :, None]
            left = (m @ vecs) * inv[:, None, :]
    else:
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        root = np.sqrt(s[:, :k])
        left = u[:, :, :k] * root[:, None, :]
        right = vt[:, :k, :] * root[:, :, None]
    if k < r:
        left = np.concatenate([left, np.zeros(left.shape[:2] + (r - k,))], axis=2)
        right = np.concatenate([right, np.zeros((right.shape[0], r - k, right.shape[2]))], axis=1)
    return left, right
