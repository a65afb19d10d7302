r"""The chain of convolutions a decomposition lowers to — pure numpy, no ONNX.

A :class:`Stage` is one convolution ``[out, in/group, k…]``.  ``axes`` are the spatial axes on
which the original stride, padding and dilation apply; on every other axis the stage has kernel
1, stride 1, no padding.  In every chain sepify builds each spatial axis is convolved by at most
one stage, so the chain computes a single convolution whose kernel is the broadcast product of
the stage kernels (:func:`compose`).

Composition works on block-diagonal operators: a grouped stage maps ``g`` contiguous channel
blocks to ``g`` blocks, and the product of two such operators is again block-diagonal (with the
coarser of the two block structures), so the dense weight of a chain costs
``O(Σ stage params × block size)`` — never a dense ``C × C`` matrix for a depthwise stage.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import gcd
from typing import Sequence

import numpy as np

from .geometry import ConvGeometry, conv_out_spatial, prod


@dataclass(frozen=True, eq=False)
class Stage:
    """One convolution of a decomposition (``weight`` None in shape-only chains)."""

    out_channels: int
    in_per_group: int
    group: int
    kernel: tuple[int, ...]
    axes: tuple[int, ...]
    weight: np.ndarray | None = None
    role: str = ""  # "depthwise", "pointwise", "grouped", "vertical", "horizontal", "dense"

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

    def with_weight(self, weight: np.ndarray) -> "Stage":
        return replace(self, weight=weight)

    def cast(self, dtype) -> "Stage":
        """The stage with its weight cast to ``dtype`` (contiguous)."""
        return replace(self, weight=np.ascontiguousarray(np.asarray(self.weight).astype(dtype)))


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


def cast_stages(stages: Sequence[Stage], dtype) -> list[Stage]:
    return [s.cast(dtype) for s in stages]


# ----------------------------------------------------------------------------------------------
# Composition
# ----------------------------------------------------------------------------------------------
def _blocks(stage: Stage) -> np.ndarray:
    """A stage as its diagonal blocks ``[g, out/g, in/g, k…]`` (float64)."""
    w = np.asarray(stage.weight, dtype=np.float64)
    g = stage.group
    return w.reshape(g, stage.out_channels // g, stage.in_per_group, *w.shape[2:])


def _coarsen(t: np.ndarray, groups: int) -> np.ndarray:
    """Block-diagonal ``[G, O, I, k…]`` rewritten with ``groups`` (a divisor of G) larger blocks."""
    big, o, i = t.shape[:3]
    f = big // groups
    out = np.zeros((groups, f * o, f * i) + t.shape[3:], dtype=t.dtype)
    for q in range(groups):
        for a in range(f):
            out[q, a * o:(a + 1) * o, a * i:(a + 1) * i] = t[q * f + a]
    return out


def _kernel_matmul(a: np.ndarray, b: np.ndarray, nk: int) -> np.ndarray:
    """``out[…, o, i, k…] = Σ_m a[…, o, m, k…] · b[…, m, i, k…]``, the ``nk`` kernel axes broadcast
    (a pointwise stage's are 1): one batched matmul over the leading and kernel axes, where einsum
    with broadcast ellipses falls back to a slow loop."""
    lead = a.ndim - nk
    if all(k == 1 for k in b.shape[lead:]):  # b pointwise: a's kernel rides along its rows
        rows = np.moveaxis(a, list(range(lead, lead + nk)), list(range(lead - 2, lead - 2 + nk)))  # […, k…, o, m]
        out = np.matmul(rows.reshape(*a.shape[:lead - 2], -1, a.shape[lead - 1]), b.reshape(b.shape[:lead]))
        out = out.reshape(*a.shape[:lead - 2], *a.shape[lead:], a.shape[lead - 2], b.shape[lead - 1])
        return np.moveaxis(out, list(range(lead - 2, lead - 2 + nk)), list(range(lead, lead + nk)))
    if all(k == 1 for k in a.shape[lead:]):  # a pointwise: b's kernel rides along its columns
        cols = b.reshape(*b.shape[:lead - 1], -1)  # […, m, (i, k…)]
        out = np.matmul(a.reshape(a.shape[:lead]), cols)
        return out.reshape(*out.shape[:-1], b.shape[lead - 1], *b.shape[lead:])
    kernel = np.broadcast_shapes(a.shape[lead:], b.shape[lead:])
    a = np.broadcast_to(a, a.shape[:lead] + kernel)
    b = np.broadcast_to(b, b.shape[:lead] + kernel)
    ks = list(range(lead, lead + nk))
    front = list(range(lead - 2, lead - 2 + nk))
    out = np.matmul(np.moveaxis(a, ks, front), np.moveaxis(b, ks, front))  # […, k…, o, i]
    return np.moveaxis(out, front, ks)


def _then(t: np.ndarray, stage: Stage) -> np.ndarray:
    """The block-diagonal composite ``t`` (input → mid) followed by ``stage`` (mid → out)."""
    s = _blocks(stage)
    nk = s.ndim - 3
    g_t, g_s = t.shape[0], s.shape[0]
    common = gcd(g_t, g_s)
    if common != g_t and common != g_s:
        t = _coarsen(t, common)  # block structures that do not nest (never built by sepify's schemes)
        g_t = common
    if g_t % g_s == 0:  # each stage group reads f whole blocks of t
        f = g_t // g_s
        t5 = t.reshape(g_s, f, t.shape[1], t.shape[2], *t.shape[3:])  # q, a, m, i, k…
        s5 = s.reshape(g_s, s.shape[1], f, t.shape[1], *s.shape[3:])  # q, o, a, m, k…
        out = _kernel_matmul(s5.swapaxes(1, 2), t5, nk)  # q, a, o, i, k…
        return out.swapaxes(1, 2).reshape(g_s, s.shape[1], f * t.shape[2], *out.shape[4:])
    f = g_s // g_t  # each block of t feeds f stage groups
    t5 = t.reshape(g_t, f, s.shape[2], t.shape[2], *t.shape[3:])  # a, b, m, i, k…
    s5 = s.reshape(g_t, f, s.shape[1], s.shape[2], *s.shape[3:])  # a, b, o, m, k…
    out = _kernel_matmul(s5, t5, nk)
    return out.reshape(g_t, f * s.shape[1], t.shape[2], *out.shape[4:])


def compose(stages: Sequence[Stage], geo: ConvGeometry) -> np.ndarray:
    """The dense weight ``[N, C/g, k…]`` that a chain of stages computes (float64).

    Along one path input → … → output the composed kernel is the broadcast product of the stage
    kernels (each is 1 on the axes it does not convolve).  Blocks of the composite that fall
    outside the original conv's groups are not part of its weight (sepify's chains never fill them).
    """
    t = _blocks(stages[0])
    for st in stages[1:]:
        t = _then(t, st)
    full = tuple(geo.kernel)
    t = np.broadcast_to(t, t.shape[:3] + full) if t.shape[3:] != full else t
    g = geo.group
    blocks = t.shape[0]
    if blocks % g == 0:  # finer than the conv's groups: the conv's blocks hold several
        t = _coarsen(np.ascontiguousarray(t), g)
    else:  # coarser: keep the conv's diagonal blocks
        f = g // blocks
        ng, cg = geo.cout_per_group, geo.cin_per_group
        t = np.stack([t[q // f, (q % f) * ng:(q % f + 1) * ng, (q % f) * cg:(q % f + 1) * cg] for q in range(g)])
    return np.ascontiguousarray(t).reshape(geo.c_out, geo.cin_per_group, *full)


def relative_error(w: np.ndarray, stages: Sequence[Stage], geo: ConvGeometry) -> float:
    """‖W − compose(stages)‖ / ‖W‖ in float64."""
    w64 = np.asarray(w, dtype=np.float64)
    norm = np.linalg.norm(w64)
    if norm == 0:
        return 0.0
    return float(np.linalg.norm(w64 - compose(stages, geo)) / norm)


def balance(stages: Sequence[Stage], sweeps: int = 4) -> list[Stage]:
    r"""The same chain with the scale of every intermediate channel shared evenly by the two stages
    around it (cross-layer equalization, Nagel et al. 2019), so that per-channel int8 of each stage
    and per-tensor int8 of the activations between them lose little.

    The stages are linear with no bias between them (the bias sits on the last), so scaling output
    channel ``j`` of stage ``i`` by ``s_j`` and input channel ``j`` of stage ``i + 1`` by ``1/s_j``
    leaves the chain's function unchanged.  With ``r¹_j`` the largest magnitude of channel ``j``'s
    weights in stage ``i`` and ``r²_j`` in stage ``i + 1``, ``s_j = √(r²_j / r¹_j)`` makes both
    ``√(r¹_j r²_j)``.  A longer chain is swept pair by pair ``sweeps`` times.  Channels that are zero
    on either side (padded ranks) are left alone.
    """
    ws = [np.array(st.weight, dtype=np.float64) for st in stages]
    for _ in range(sweeps if len(ws) > 2 else 1):
        for i in range(len(ws) - 1):
            a, nxt = ws[i], stages[i + 1]
            m = a.shape[0]
            g, ipg = nxt.group, nxt.in_per_group
            b = ws[i + 1].reshape(g, nxt.out_channels // g, ipg, -1)
            ra = np.abs(a.reshape(m, -1)).max(axis=1)
            rb = np.abs(b).max(axis=(1, 3)).reshape(-1)
            ok = (ra > 0) & (rb > 0)
            scale = np.ones(m)
            scale[ok] = np.sqrt(rb[ok] / ra[ok])
            ws[i] = a * scale.reshape(m, *([1] * (a.ndim - 1)))
            ws[i + 1] = (b / scale.reshape(g, 1, ipg, 1)).reshape(ws[i + 1].shape)
    return [st.with_weight(w) for st, w in zip(stages, ws)]


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


__all__ = ["Stage", "balance", "cast_stages", "compose", "relative_error", "stage_geometry", "stages_macs", "stages_params"]
