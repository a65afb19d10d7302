r"""Low-rank factorizations of convolution weights — pure numpy, no ONNX.

A convolution weight ``W`` has shape ``[N, C/g, k_1 … k_d]`` (``g`` groups,
``Cg = C/g`` inputs and ``Ng = N/g`` outputs per group, ``K = prod(k)``).
Each scheme rearranges ``W`` into a batch of matrices, takes their SVDs and
keeps ``r`` terms; the relative Frobenius weight error at rank ``r`` is

.. math::  e(r) = \sqrt{\sum_b \sum_{i>r} \sigma_{b,i}^2} \,/\, \lVert W \rVert_F

Schemes (the resulting chain of convolutions is described by :class:`Stage`):

``dw-pw``   per *input* channel ``c`` (in group ``q``): ``M_c = W[qNg:(q+1)Ng, c', :]`` is ``Ng × K``.
            ``M_c ≈ Σ_j σ_j u_j v_jᵀ`` gives a depthwise k-conv with channel multiplier ``r``
            (kernel ``√σ_j v_j``) followed by a pointwise conv (weights ``√σ_j u_j``, ``g`` groups).
``pw-dw``   per *output* channel ``n``: ``M_n = W[n]`` is ``Cg × K``; a pointwise conv ``C → N·r``
            (``√σ_j a_j``) at input resolution, then a k-conv with ``N`` groups of ``r`` inputs.
``spatial`` 2-D only.  If every kernel sees one input channel (``Cg = 1``), each ``kh × kw`` kernel
            is split on its own (``M_n = W[n, 0]``): ``kh×1`` conv to ``N·r`` channels, then ``1×kw``
            with ``N`` groups.  Otherwise the cross-channel matrix ``M[(c,i),(n,j)] = W[n,c,i,j]``
            (``Cg·kh × Ng·kw`` per group) of rank ``R`` gives ``C → g·R`` (``kh×1``) then
            ``g·R → N`` (``1×kw``).  The vertical stride/pad/dilation go to the ``kh×1`` stage and the
            horizontal ones to the ``1×kw`` stage; either may run first (:func:`spatial_vertical_first`).

A rank-1 kernel (Sobel, Gaussian, box) is split exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from .geometry import ConvGeometry, conv_out_spatial, prod

SCHEMES = ("dw-pw", "pw-dw", "spatial")

# Relative weight error that counts as exact: a small multiple of the dtype's rounding step.
EXACT_EPS_FACTOR = 2.0
# "Near-exact" for audit summaries: below what any trained network can tell apart.
NEAR_EXACT_TOL = 1e-3


def exact_tolerance(dtype) -> float:
    """Relative Frobenius error at the rounding level of ``dtype`` (float32: 2.4e-7, float16: 2.0e-3)."""
    return EXACT_EPS_FACTOR * float(np.finfo(np.dtype(dtype)).eps)


# ----------------------------------------------------------------------------------------------
# Matrices and spectra
# ----------------------------------------------------------------------------------------------
def _grouped(w: np.ndarray, group: int) -> np.ndarray:
    """[N, Cg, K…] -> [g, Ng, Cg, K] (kernel flattened)."""
    n, cg = w.shape[:2]
    return w.reshape(group, n // group, cg, -1)


def dw_pw_matrices(w: np.ndarray, group: int) -> np.ndarray:
    """Per input channel: ``[C, Ng, K]`` with ``C = g·Cg`` ordered as the conv's input channels."""
    g4 = _grouped(w, group)  # g, Ng, Cg, K
    return np.ascontiguousarray(g4.transpose(0, 2, 1, 3)).reshape(group * w.shape[1], w.shape[0] // group, -1)


def pw_dw_matrices(w: np.ndarray) -> np.ndarray:
    """Per output channel: ``[N, Cg, K]``."""
    return w.reshape(w.shape[0], w.shape[1], -1)


def kernel_matrices(w: np.ndarray) -> np.ndarray:
    """Per 2-D kernel: ``[N·Cg, kh, kw]``."""
    return w.reshape(-1, w.shape[-2], w.shape[-1])


def cross_channel_matrices(w: np.ndarray, group: int) -> np.ndarray:
    """Per group: ``M[(c,i),(n,j)] = W[n,c,i,j]``, shape ``[g, Cg·kh, Ng·kw]``."""
    n, cg, kh, kw = w.shape
    g5 = w.reshape(group, n // group, cg, kh, kw)  # q, n, c, i, j
    return np.ascontiguousarray(g5.transpose(0, 2, 3, 1, 4)).reshape(group, cg * kh, (n // group) * kw)


def singular_values(mats: np.ndarray) -> np.ndarray:
    r"""Singular values of a batch of matrices ``[B, m, n]`` in float64, descending, ``[B, min(m, n)]``.

    Uses the Gram matrix of the short side (``σ² = eig(M Mᵀ)``): its eigenvalues are accurate
    to ``ε₆₄·σ₁²``, i.e. relative errors down to ~1e-8 — well below float32's rounding, which is
    all the exactness test needs — and it is several times faster than a full SVD.  The Gram is
    formed from strided views (BLAS takes them as they are: no transposed copy of the weight).
    """
    m = np.asarray(mats, dtype=np.float64)
    if m.shape[1] > m.shape[2]:
        gram = np.matmul(m.transpose(0, 2, 1), m)
    else:
        gram = np.matmul(m, m.transpose(0, 2, 1))
    ev = np.linalg.eigvalsh(gram)[:, ::-1]
    return np.sqrt(np.clip(ev, 0.0, None))


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
    p = min(k + 20, m.shape[1])
    y = m @ np.random.default_rng(seed).standard_normal((m.shape[0], m.shape[2], p), dtype=np.float32)
    for _ in range(3):
        q, _ = np.linalg.qr(y)
        y = m @ (m.transpose(0, 2, 1) @ q)
    q, _ = np.linalg.qr(y)
    small = (q.transpose(0, 2, 1) @ m).astype(np.float64)
    return np.linalg.svd(small, compute_uv=False)[:, :k]


def _gamma(n: int) -> float:
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
    margin = 1.01 * (_gamma(p) + _gamma(q + 1)) * trace
    gram[:, np.arange(q), np.arange(q)] -= shift + margin
    try:
        np.linalg.cholesky(gram)
    except np.linalg.LinAlgError:
        return False
    return True


def energy(mats: np.ndarray) -> float:
    """``Σ mᵢⱼ²`` over the batch, accumulated in float64 (no float64 copy of the matrices)."""
    return float(np.einsum("bij,bij->", mats, mats, dtype=np.float64))


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
    m = np.asarray(mats)
    if m.shape[1] < m.shape[2]:
        m = m.transpose(0, 2, 1)  # columns on the short side: rank + 1 ≤ short ≤ rows
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
        sub = m[:, :, cols] if picked is None else m[:, picked[:, None], cols]
        if _certified_positive(np.ascontiguousarray(sub, dtype=np.float64), t):
            return True
    return False


def spectrum(mats: np.ndarray, useful_rank: int, bound: float) -> Spectrum:
    """Errors by rank, exact where it matters and cheap where it cannot.

    Matrices whose short side exceeds :data:`FULL_SPECTRUM_LIMIT` first try
    :func:`certify_tail`: if no rank up to ``useful_rank`` (the break-even rank) gets within
    ``bound`` (the near-exact tolerance), only the leading singular values are estimated for
    the report.  Otherwise (a weight that may well be low rank) the full spectrum is computed.
    """
    short = min(mats.shape[1], mats.shape[2])
    if short <= FULL_SPECTRUM_LIMIT or useful_rank < 1:
        return Spectrum(relative_errors(singular_values(mats)))
    total = energy(mats)
    if not certify_tail(mats, min(useful_rank, short - 1), bound, total):
        return Spectrum(relative_errors(singular_values(mats)))
    lead = leading_singular_values(mats, min(LEADING_TERMS, short))
    captured = np.concatenate([[0.0], np.cumsum((lead ** 2).sum(axis=0))])
    errors = np.sqrt(np.clip(1.0 - captured / total, 0.0, None))
    return Spectrum(errors, complete=False, exact_above=min(useful_rank, short - 1), certified_error=bound)


# ----------------------------------------------------------------------------------------------
# Stages: the chain of convolutions a decomposition lowers to
# ----------------------------------------------------------------------------------------------
@dataclass
class Stage:
    """One convolution of a decomposition.

    ``axes`` are the spatial axes on which the original stride, padding and dilation apply;
    on every other axis this stage has kernel 1, stride 1, no padding.  ``weight`` is
    ``[out, in/group, k…]`` (None in shape-only plans).
    """

    out_channels: int
    in_per_group: int
    group: int
    kernel: tuple[int, ...]
    axes: tuple[int, ...]
    weight: np.ndarray | None = None
    role: str = ""  # "depthwise", "pointwise", "grouped", "vertical", "horizontal"

    def attributes(self, geo: ConvGeometry) -> dict:
        """strides/pads/dilations of this stage (ONNX layout)."""
        d = len(self.kernel)
        strides = [geo.strides[i] if i in self.axes else 1 for i in range(d)]
        dil = [geo.dilations[i] if i in self.axes else 1 for i in range(d)]
        pads = [geo.pads[i] if i in self.axes else 0 for i in range(d)] + [
            geo.pads[d + i] if i in self.axes else 0 for i in range(d)
        ]
        return {"strides": strides, "pads": pads, "dilations": dil}

    def out_spatial(self, geo: ConvGeometry, in_spatial: Sequence[int]) -> list[int]:
        a = self.attributes(geo)
        return conv_out_spatial(in_spatial, self.kernel, a["strides"], a["dilations"], a["pads"])


def stages_macs(geo: ConvGeometry, stages: Sequence[Stage]) -> int:
    """MACs of a chain of stages: Σ prod(stage output) × (in/group) × prod(kernel)."""
    spatial = list(geo.in_spatial)
    total = 0
    for st in stages:
        spatial = st.out_spatial(geo, spatial)
        total += geo.batch * prod(spatial) * st.out_channels * st.in_per_group * prod(st.kernel)
    return total


def stages_params(stages: Sequence[Stage]) -> int:
    return sum(st.out_channels * st.in_per_group * prod(st.kernel) for st in stages)


def dw_pw_stages(geo: ConvGeometry, r: int) -> list[Stage]:
    d = geo.rank
    return [
        Stage(geo.c_in * r, 1, geo.c_in, geo.kernel, tuple(range(d)), role="depthwise"),
        Stage(geo.c_out, geo.cin_per_group * r, geo.group, (1,) * d, (), role="pointwise"),
    ]


def pw_dw_stages(geo: ConvGeometry, r: int) -> list[Stage]:
    d = geo.rank
    return [
        Stage(geo.c_out * r, geo.cin_per_group, geo.group, (1,) * d, (), role="pointwise"),
        Stage(geo.c_out, r, geo.c_out, geo.kernel, tuple(range(d)), role="depthwise" if r == 1 else "grouped"),
    ]


def spatial_stages(geo: ConvGeometry, r: int, per_kernel: bool, vertical_first: bool) -> list[Stage]:
    kh, kw = geo.kernel
    if per_kernel:  # Cg == 1: every kernel on its own
        mid, first = geo.c_out * r, Stage(geo.c_out * r, 1, geo.group, (kh, 1), (0,), role="vertical")
        second = Stage(geo.c_out, r, geo.c_out, (1, kw), (1,), role="horizontal")
    else:
        mid = geo.group * r
        first = Stage(mid, geo.cin_per_group, geo.group, (kh, 1), (0,), role="vertical")
        second = Stage(geo.c_out, r, geo.group, (1, kw), (1,), role="horizontal")
    if vertical_first:
        return [first, second]
    # Horizontal first: same channel structure, axes swapped.
    return [
        replace(first, kernel=(1, kw), axes=(1,), role="horizontal"),
        replace(second, kernel=(kh, 1), axes=(0,), role="vertical"),
    ]


def spatial_orders(geo: ConvGeometry) -> list[bool]:
    """The spatial orders whose spectra differ: one for per-kernel splits (a kernel and its
    transpose have the same singular values), both for cross-channel ones, cheaper first."""
    first = spatial_vertical_first(geo)
    return [first] if geo.cin_per_group == 1 else [first, not first]


def spatial_vertical_first(geo: ConvGeometry) -> bool:
    """True when kh×1-then-1×kw costs no more than the other order.

    Both orders cost ``r`` times a rank-independent amount, so the choice holds at every rank.
    With strides and asymmetric pads they differ: the first stage runs at the input
    resolution of the axis it leaves alone.
    """
    per_kernel = geo.cin_per_group == 1
    v = stages_macs(geo, spatial_stages(geo, 1, per_kernel, True))
    h = stages_macs(geo, spatial_stages(geo, 1, per_kernel, False))
    return v <= h


def scheme_stages(geo: ConvGeometry, scheme: str, r: int, vertical_first: bool | None = None) -> list[Stage]:
    """Shape-only stages of ``scheme`` at rank ``r`` (spatial: in the given order, default the cheaper)."""
    if scheme == "dw-pw":
        return dw_pw_stages(geo, r)
    if scheme == "pw-dw":
        return pw_dw_stages(geo, r)
    if scheme == "spatial":
        if vertical_first is None:
            vertical_first = spatial_vertical_first(geo)
        return spatial_stages(geo, r, geo.cin_per_group == 1, vertical_first)
    raise ValueError(f"unknown scheme {scheme!r}")


def scheme_matrices(w: np.ndarray, geo: ConvGeometry, scheme: str, vertical_first: bool | None = None) -> np.ndarray:
    if scheme == "dw-pw":
        return dw_pw_matrices(w, geo.group)
    if scheme == "pw-dw":
        return pw_dw_matrices(w)
    if scheme == "spatial":
        if geo.cin_per_group == 1:
            return kernel_matrices(w)
        # Horizontal-first factorizes M'[(c,j),(n,i)]: the arrangement with kh and kw swapped.
        if vertical_first is None:
            vertical_first = spatial_vertical_first(geo)
        oriented = w if vertical_first else w.transpose(0, 1, 3, 2)
        return cross_channel_matrices(oriented, geo.group)
    raise ValueError(f"unknown scheme {scheme!r}")


# ----------------------------------------------------------------------------------------------
# Factors
# ----------------------------------------------------------------------------------------------
def truncated_factors(mats: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """``M_b ≈ L_b R_b`` with ``L = U√Σ`` ``[B, m, r]`` and ``R = √Σ Vᵀ`` ``[B, r, n]`` (float64).

    Ranks beyond ``min(m, n)`` are padded with zero factors so the lowered graph keeps a
    uniform channel multiplier.
    """
    m = np.asarray(mats, dtype=np.float64)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    k = min(r, s.shape[1])
    root = np.sqrt(s[:, :k])
    left = u[:, :, :k] * root[:, None, :]
    right = vt[:, :k, :] * root[:, :, None]
    if k < r:
        left = np.concatenate([left, np.zeros(left.shape[:2] + (r - k,))], axis=2)
        right = np.concatenate([right, np.zeros((right.shape[0], r - k, right.shape[2]))], axis=1)
    return left, right


def factor(w: np.ndarray, geo: ConvGeometry, scheme: str, r: int, vertical_first: bool | None = None) -> list[Stage]:
    """Stages with weights (float64) whose composition approximates ``w`` at rank ``r``
    (spatial: in the given order, default the cheaper one)."""
    stages = scheme_stages(geo, scheme, r, vertical_first)
    w64 = np.asarray(w, dtype=np.float64)
    kshape = tuple(geo.kernel)
    d = geo.rank
    ones = (1,) * d
    if scheme == "dw-pw":
        left, right = truncated_factors(dw_pw_matrices(w64, geo.group), r)  # [C, Ng, r], [C, r, K]
        dw = right.reshape(geo.c_in * r, 1, *kshape)
        # pointwise[n, c_local*r + j] for n in group q = left[q*Cg + c_local, n_local, j]
        ng, cg = geo.cout_per_group, geo.cin_per_group
        pw = left.reshape(geo.group, cg, ng, r).transpose(0, 2, 1, 3).reshape(geo.c_out, cg * r, *ones)
        stages[0].weight, stages[1].weight = dw, pw
    elif scheme == "pw-dw":
        left, right = truncated_factors(pw_dw_matrices(w64), r)  # [N, Cg, r], [N, r, K]
        stages[0].weight = left.transpose(0, 2, 1).reshape(geo.c_out * r, geo.cin_per_group, *ones)
        stages[1].weight = right.reshape(geo.c_out, r, *kshape)
    elif scheme == "spatial":
        kh, kw = kshape
        vertical_first = stages[0].role == "vertical"
        if geo.cin_per_group == 1:
            left, right = truncated_factors(kernel_matrices(w64), r)  # [N, kh, r], [N, r, kw]
            vert = left.transpose(0, 2, 1).reshape(geo.c_out * r, 1, kh, 1)
            horiz = right.reshape(geo.c_out, r, 1, kw)
            if vertical_first:
                stages[0].weight, stages[1].weight = vert, horiz
            else:
                # Horizontal first: mid channel n*r+j carries v_j; the vertical stage sums j.
                stages[0].weight = right.reshape(geo.c_out * r, 1, 1, kw)
                stages[1].weight = left.transpose(0, 2, 1).reshape(geo.c_out, r, kh, 1)
        else:
            g, cg, ng = geo.group, geo.cin_per_group, geo.cout_per_group
            left, right = truncated_factors(cross_channel_matrices(w64, g), r)  # [g, Cg*kh, r], [g, r, Ng*kw]
            a = left.reshape(g, cg, kh, r).transpose(0, 3, 1, 2)  # q, t, c, i
            b = right.reshape(g, r, ng, kw).transpose(0, 2, 1, 3)  # q, n, t, j
            if vertical_first:
                stages[0].weight = a.reshape(g * r, cg, kh, 1)
                stages[1].weight = b.reshape(geo.c_out, r, 1, kw)
            else:
                # Horizontal first needs the factorization of the transposed roles:
                # M'[(c,j),(n,i)] = W[n,c,i,j] — i.e. the same spectrum with kh and kw swapped.
                wt = w64.transpose(0, 1, 3, 2)
                left, right = truncated_factors(cross_channel_matrices(wt, g), r)
                a = left.reshape(g, cg, kw, r).transpose(0, 3, 1, 2)
                b = right.reshape(g, r, ng, kh).transpose(0, 2, 1, 3)
                stages[0].weight = a.reshape(g * r, cg, 1, kw)
                stages[1].weight = b.reshape(geo.c_out, r, kh, 1)
    else:
        raise ValueError(f"unknown scheme {scheme!r}")
    return stages


def _dense(stage: Stage, full_kernel: tuple[int, ...]) -> np.ndarray:
    """A stage as a dense ``[out, in_total, *full_kernel]`` operator (groups as zero blocks)."""
    w = np.asarray(stage.weight, dtype=np.float64)
    op, ip = stage.out_channels // stage.group, stage.in_per_group
    dense = np.zeros((stage.out_channels, ip * stage.group) + tuple(full_kernel))
    kernel = np.broadcast_to(w, w.shape[:2] + tuple(full_kernel)) if w.shape[2:] != tuple(full_kernel) else w
    for q in range(stage.group):
        dense[q * op:(q + 1) * op, q * ip:(q + 1) * ip] = kernel[q * op:(q + 1) * op]
    return dense


def compose(stages: Sequence[Stage], geo: ConvGeometry) -> np.ndarray:
    """The dense weight ``[N, Cg, k…]`` that a chain of stages computes.

    Every stage's kernel is 1 on the axes it does not touch, so along one path
    input → … → output the composed kernel is the broadcast product of the stage kernels.
    """
    full = tuple(geo.kernel)
    total = _dense(stages[0], full)
    for st in stages[1:]:
        total = np.einsum("om...,mi...->oi...", _dense(st, full), total)
    ng, cg = geo.cout_per_group, geo.cin_per_group
    out = np.empty((geo.c_out, cg) + full)
    for q in range(geo.group):
        out[q * ng:(q + 1) * ng] = total[q * ng:(q + 1) * ng, q * cg:(q + 1) * cg]
    return out


def relative_error(w: np.ndarray, stages: Sequence[Stage], geo: ConvGeometry) -> float:
    """‖W − compose(stages)‖ / ‖W‖ in float64."""
    w64 = np.asarray(w, dtype=np.float64)
    norm = np.linalg.norm(w64)
    if norm == 0:
        return 0.0
    return float(np.linalg.norm(w64 - compose(stages, geo)) / norm)


def stage_geometry(geo: ConvGeometry, stages: Sequence[Stage], index: int) -> ConvGeometry:
    """The geometry that stage ``index`` of a chain sees (its input is the previous stage's output)."""
    spatial = list(geo.in_spatial)
    for st in stages[:index]:
        spatial = st.out_spatial(geo, spatial)
    st = stages[index]
    return ConvGeometry(
        batch=geo.batch, c_in=st.in_per_group * st.group, c_out=st.out_channels, group=st.group,
        kernel=tuple(st.kernel), in_spatial=tuple(spatial), out_spatial=tuple(st.out_spatial(geo, spatial)),
        strides=geo.strides, dilations=geo.dilations, pads=geo.pads,
    )


def split_kernel_stage(stages: list[Stage], geo: ConvGeometry, tol: float) -> list[Stage] | None:
    """Split the full-kernel stage of a dw-pw / pw-dw chain into kh×1 and 1×kw when that is
    exact (relative error of the stage within ``tol``) and cuts MACs; None otherwise.

    This is how an RGB Sobel becomes pointwise + depthwise 3×1 + depthwise 1×3.
    """
    if geo.rank != 2 or 1 in geo.kernel:
        return None
    index = next((i for i, st in enumerate(stages) if st.axes == (0, 1)), None)
    if index is None:
        return None
    sub = stage_geometry(geo, stages, index)
    w = stages[index].weight
    mats = scheme_matrices(w, sub, "spatial")
    errors = relative_errors(singular_values(mats))
    r = exact_rank(errors, tol)
    if r == 0 or errors[r] > tol:
        return None
    split = factor(w, sub, "spatial", r)
    chain = stages[:index] + split + stages[index + 1:]
    if stages_macs(geo, chain) >= stages_macs(geo, stages):
        return None
    return chain


def chained_macs(w: np.ndarray, geo: ConvGeometry, scheme: str, r: int, tol: float) -> int | None:
    """MACs of ``scheme`` at rank ``r`` with its full-kernel stage split exactly, or None if that does not pay."""
    if scheme == "spatial":
        return None
    chain = split_kernel_stage(factor(w, geo, scheme, r), geo, tol)
    return stages_macs(geo, chain) if chain is not None else None


def branch_lowering(stages: Sequence[Stage]) -> list[list[Stage]]:
    """Rewrite a rank-r (r > 1) dw-pw or pw-dw chain as r rank-1 chains whose outputs are summed.

    Same MACs and the same math, but every depthwise stage has channel multiplier 1 and one
    input per group — the layout onnxruntime's fast depthwise kernel handles; a multiplier-r
    depthwise conv (or an N-group conv with r inputs per group) falls back to a generic grouped
    convolution that reaches only a fraction of the MAC cut.  Other chains come back unchanged
    as a single branch.  The bias belongs to the caller's last node of branch 0.
    """
    if len(stages) != 2:
        return [list(stages)]
    first, second = stages
    if first.role == "depthwise" and second.role == "pointwise" and first.out_channels > first.group:
        r = first.out_channels // first.group  # dw-pw: dw channel c*r + j, pw column cl*r + j
        c = first.group
        pw = second.weight
        branches = []
        for j in range(r):
            dw_j = first.weight[j::r]
            pw_j = pw[:, j::r]
            branches.append([
                replace(first, out_channels=c, weight=dw_j),
                replace(second, in_per_group=second.in_per_group // r, weight=pw_j),
            ])
        return branches
    if first.role == "pointwise" and second.role == "grouped" and second.in_per_group > 1:
        r = second.in_per_group  # pw-dw: pw channel n*r + j feeds output n through kernel [n, j]
        n = second.out_channels
        branches = []
        for j in range(r):
            branches.append([
                replace(first, out_channels=n, weight=first.weight[j::r]),
                replace(second, in_per_group=1, role="depthwise", weight=second.weight[:, j:j + 1]),
            ])
        return branches
    return [list(stages)]


# ----------------------------------------------------------------------------------------------
# Lowerings: the same chain written as different ONNX subgraphs (same math, same MACs)
# ----------------------------------------------------------------------------------------------
LOWERINGS = ("branches", "grouped", "concat")


@dataclass
class Lowered:
    """A chain written as ``x → head → fan-out → branches → join → tail → y``.

    Every branch reads the head's output (or ``x`` when there is no head); with ``split`` the
    head's output is cut into ``len(branches)`` equal channel slices and branch ``j`` reads slice
    ``j``.  ``join`` combines the branch outputs: ``"sum"`` (a chain of Adds) or ``"concat"`` (Concat
    on channels); a single branch needs no join.  The bias belongs to :meth:`bias_stage`.
    """

    kind: str  # "grouped" | "branches" | "concat"
    head: list[Stage]
    branches: list[list[Stage]]
    join: str = "sum"
    split: bool = False
    tail: list[Stage] | None = None

    def __post_init__(self) -> None:
        self.tail = list(self.tail or [])

    def bias_stage(self) -> Stage:
        """The conv that adds the bias: the last of the tail, else the last of branch 0."""
        return self.tail[-1] if self.tail else self.branches[0][-1]

    def all_stages(self) -> list[Stage]:
        return [*self.head, *(s for b in self.branches for s in b), *self.tail]

    def macs(self, geo: ConvGeometry) -> int:
        """MACs of every conv of the lowered graph (joins and splits are free by convention)."""
        def run(stages, spatial):
            total = 0
            for st in stages:
                spatial = st.out_spatial(geo, spatial)
                total += geo.batch * prod(spatial) * st.out_channels * st.in_per_group * prod(st.kernel)
            return total, spatial

        total, spatial = run(self.head, list(geo.in_spatial))
        out = spatial
        for branch in self.branches:
            t, out = run(branch, spatial)
            total += t
        return total + run(self.tail, out)[0]


def lowering_kinds(stages: Sequence[Stage]) -> list[str]:
    """The lowerings that give distinct graphs for this chain (``[]``: only one way to write it).

    Only an unchained rank-r > 1 dw-pw / pw-dw chain has a choice: ``grouped`` (as factorized: one
    multiplier-r depthwise conv / one N-group conv with r inputs per group), ``branches`` (r rank-1
    chains summed) and, when the pointwise stage is ungrouped, ``concat``.
    """
    if len(stages) != 2:
        return []
    first, second = stages
    if first.role == "depthwise" and second.role == "pointwise" and first.out_channels > first.group:
        return ["branches", "grouped"] + (["concat"] if second.group == 1 else [])
    if first.role == "pointwise" and second.role == "grouped" and second.in_per_group > 1:
        return ["branches", "grouped"] + (["concat"] if first.group == 1 else [])
    return []


def lower(stages: Sequence[Stage], kind: str) -> Lowered:
    """Write ``stages`` as lowering ``kind`` (see :data:`LOWERINGS`).

    ``concat`` for dw-pw: r multiplier-1 depthwise convs (kernel ``j`` of every channel), their
    outputs concatenated branch-major (channel ``j·C + c``) and one pointwise conv with its
    columns permuted to match.  Its mirror for pw-dw: one pointwise conv ``C → r·N`` with its rows
    permuted branch-major, split into r slices of N channels, r multiplier-1 depthwise convs,
    summed.  Both need an ungrouped pointwise stage (a permutation across groups would break the
    grouping); a chain that cannot take ``kind`` falls back to ``branches``, and one with no choice
    (rank 1, chained, spatial) comes back as written — :attr:`Lowered.kind` says which was used.
    """
    if kind not in LOWERINGS:
        raise ValueError(f"unknown lowering {kind!r}")
    kinds = lowering_kinds(stages)
    if not kinds:
        return Lowered("grouped", [], [list(stages)])
    if kind not in kinds:
        kind = "branches"
    if kind == "grouped":
        return Lowered("grouped", [], [list(stages)])
    if kind == "branches":
        return Lowered("branches", [], branch_lowering(stages), join="sum")
    first, second = stages
    if first.role == "depthwise":  # dw-pw: dw channel c*r + j, pw column c*r + j
        r = first.out_channels // first.group
        c = first.group
        branches = [[replace(first, out_channels=c, weight=first.weight[j::r])] for j in range(r)]
        pw = np.concatenate([second.weight[:, j::r] for j in range(r)], axis=1)
        return Lowered("concat", [], branches, join="concat", tail=[replace(second, weight=pw)])
    r = second.in_per_group  # pw-dw: pw channel n*r + j feeds output n through kernel [n, j]
    n = second.out_channels
    pw = np.concatenate([first.weight[j::r] for j in range(r)], axis=0)
    branches = [[replace(second, in_per_group=1, role="depthwise", weight=second.weight[:, j:j + 1])]
                for j in range(r)]
    return Lowered("concat", [replace(first, weight=pw)], branches, join="sum", split=True)
