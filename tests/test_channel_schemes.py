"""Low rank across channels — out-lowrank, in-lowrank, pw-lowrank, tucker2 — built from exactly
low-rank weights and checked against onnxruntime for every Conv attribute.

Each weight is constructed to have exactly the rank the scheme needs, so a lossless rewrite with
that scheme must reproduce the original conv to float noise, with the hand-computed MACs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest

import sepify
from sepify import Policy
from sepify.core.geometry import ConvGeometry
from sepify.core.schemes import get as get_scheme
from sepify.core.stages import compose, stages_macs
from test_rewrite import ConvGeo, check_lossless, conv_model, graph_conv_macs, random_feeds


def channel_lowrank_weight(scheme: str, rank: int, c_in: int, c_out: int, group: int, kernel, seed: int = 0):
    """``[N, C/g, k…]`` exactly of rank ``rank`` for ``scheme`` (tucker2: multilinear rank
    (min(r, Ng), min(r, Cg)) per group)."""
    rng = np.random.default_rng(seed)
    cg, ng = c_in // group, c_out // group
    kernel = tuple(kernel)
    k = math.prod(kernel)
    if scheme in ("out-lowrank", "pw-lowrank"):
        w = np.einsum("qnr,qrm->qnm", rng.standard_normal((group, ng, rank)), rng.standard_normal((group, rank, cg * k)))
        return w.reshape(c_out, cg, *kernel)
    if scheme == "in-lowrank":
        m = np.einsum("qcr,qrm->qcm", rng.standard_normal((group, cg, rank)), rng.standard_normal((group, rank, ng * k)))
        return m.reshape(group, cg, ng, k).transpose(0, 2, 1, 3).reshape(c_out, cg, *kernel)
    if scheme == "tucker2":
        ro, ri = min(rank, ng), min(rank, cg)
        w = np.einsum("qna,qabk,qcb->qnck", rng.standard_normal((group, ng, ro)),
                      rng.standard_normal((group, ro, ri, k)), rng.standard_normal((group, cg, ri)))
        return w.reshape(c_out, cg, *kernel)
    raise ValueError(scheme)


@dataclass
class Case:
    id: str
    scheme: str
    rank: int
    c_in: int
    c_out: int
    spatial: tuple
    kernel: tuple
    group: int = 1
    batch: int = 1
    bias: bool = False
    dtype: type = np.float32
    attrs: dict = field(default_factory=dict)

    def geo(self) -> ConvGeo:
        return ConvGeo.of([self.batch, self.c_in, *self.spatial], [self.c_out, self.c_in // self.group, *self.kernel],
                          group=self.group, strides=self.attrs.get("strides"), dilations=self.attrs.get("dilations"),
                          pads=self.attrs.get("pads"), auto_pad=self.attrs.get("auto_pad", "NOTSET"))


P1 = dict(pads=[1, 1, 1, 1])
KINDS = (("out-lowrank", (3, 3)), ("in-lowrank", (3, 3)), ("tucker2", (3, 3)), ("pw-lowrank", (1, 1)))
CASES = [
    *[Case(f"{s}_r{r}", s, r, 32, 48, (10, 10), k, attrs=P1 if k != (1, 1) else {}) for s, k in KINDS for r in (1, 4)],
    *[Case(f"{s}_s2_asym", s, 3, 32, 32, (11, 12), k, attrs=dict(strides=[2, 1], pads=[0, 1, 2, 0]))
      for s, k in KINDS],
    *[Case(f"{s}_{ap.lower()}", s, 2, 24, 40, (11, 13), k, attrs=dict(auto_pad=ap, strides=[2, 2]))
      for s, k in KINDS for ap in ("SAME_UPPER", "SAME_LOWER", "VALID")],
    *[Case(f"{s}_dil", s, 2, 32, 32, (13, 13), k, attrs=dict(dilations=[2, 3], pads=[2, 3, 2, 3]))
      for s, k in KINDS if k != (1, 1)],
    *[Case(f"{s}_g2", s, 2, 32, 48, (10, 10), k, group=2, attrs=P1 if k != (1, 1) else {}) for s, k in KINDS],
    *[Case(f"{s}_g4_bias_b2", s, 2, 32, 32, (8, 8), k, group=4, batch=2, bias=True, attrs=P1 if k != (1, 1) else {})
      for s, k in KINDS],
    Case("out_1d", "out-lowrank", 2, 32, 32, (31,), (5,), attrs=dict(strides=[2], pads=[1, 2])),
    Case("in_1d", "in-lowrank", 2, 32, 32, (31,), (5,), attrs=dict(pads=[2, 2], dilations=[2])),
    Case("tucker_1d", "tucker2", 3, 32, 40, (31,), (5,), bias=True, attrs=dict(pads=[2, 2])),
    Case("pw_1d", "pw-lowrank", 3, 32, 40, (31,), (1,), attrs=dict(strides=[3])),
    Case("out_3d", "out-lowrank", 2, 24, 24, (6, 7, 8), (3, 3, 3), attrs=dict(pads=[1] * 6)),
    Case("in_3d", "in-lowrank", 2, 24, 24, (6, 7, 8), (3, 3, 3), attrs=dict(strides=[1, 2, 2], pads=[0, 1, 1, 1, 0, 1])),
    Case("tucker_3d", "tucker2", 2, 24, 24, (5, 7, 9), (3, 3, 3), attrs=dict(auto_pad="SAME_UPPER", strides=[2, 2, 2])),
    Case("pw_3d", "pw-lowrank", 2, 24, 24, (5, 6, 7), (1, 1, 1)),
    Case("tucker_asym_channels", "tucker2", 6, 8, 64, (10, 10), (3, 3), attrs=P1),  # r capped at C_in = 8
    Case("pw_pads", "pw-lowrank", 2, 32, 32, (9, 9), (1, 1), bias=True, attrs=dict(pads=[1, 0, 2, 1])),
    *[Case(f"{s}_fp16", s, 2, 32, 32, (10, 10), k, bias=True, dtype=np.float16, attrs=P1 if k != (1, 1) else {})
      for s, k in KINDS],
]


def build(case: Case, seed: int = 0):
    w = channel_lowrank_weight(case.scheme, case.rank, case.c_in, case.c_out, case.group, case.kernel, seed)
    w = w / np.abs(w).max()  # keep float16 in range
    bias = np.random.default_rng(seed + 1).standard_normal(case.c_out) if case.bias else None
    attrs = dict(case.attrs)
    if case.group != 1:
        attrs["group"] = case.group
    return conv_model([case.batch, case.c_in, *case.spatial], w, bias=bias, dtype=case.dtype, **attrs)


def hand_macs(case: Case) -> int:
    g = case.geo()
    b, r, grp = g.batch, case.rank, case.group
    cg, ng = case.c_in // grp, case.c_out // grp
    k = math.prod(case.kernel)
    out, inp = math.prod(g.out_spatial), math.prod(g.in_spatial)
    if case.scheme in ("out-lowrank", "pw-lowrank"):  # k-conv C→g·r at output res, then 1×1 g·r→N
        return b * out * (grp * r * cg * k + case.c_out * r)
    if case.scheme == "in-lowrank":  # 1×1 C→g·r at input res, then k-conv g·r→N
        return b * (inp * grp * r * cg + out * case.c_out * r * k)
    ri, ro = min(r, cg), min(r, ng)  # tucker2
    return b * (inp * grp * ri * cg + out * grp * ro * ri * k + out * case.c_out * ro)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_exact_channel_lowrank_rewritten_losslessly(case: Case):
    model = build(case)
    out, report = sepify.rewrite(model, Policy(scheme=case.scheme))
    fp16 = case.dtype == np.float16
    check_lossless(model, out, report, rel=4e-3 if fp16 else 1e-5, expect_macs_before=case.geo().macs)
    (r,) = report.rewritten
    assert (r.scheme, r.rank) == (case.scheme, case.rank)
    assert r.weight_error <= (2e-3 if fp16 else 2.4e-7)
    assert r.macs_after == hand_macs(case)
    if not fp16:  # the report's MACs are those onnxruntime runs
        assert graph_conv_macs(out, random_feeds(model)) == r.macs_after


@pytest.mark.parametrize("scheme,kernel", KINDS)
@pytest.mark.parametrize("group", [1, 2])
def test_factors_compose_and_truncate_exactly(scheme, kernel, group):
    """TensorLy-style: factor → compose reproduces the construction; a rank-r chain is the rank-r_max
    chain truncated (calibration relies on it); the curve's error is the factors' error."""
    geo = ConvGeometry(batch=1, c_in=24, c_out=32, group=group, kernel=kernel, in_spatial=(9, 9), out_spatial=(9, 9),
                       pads=(0, 0, 0, 0) if kernel == (1, 1) else (1, 1, 1, 1))
    sch = get_scheme(scheme)
    w = channel_lowrank_weight(scheme, 5, 24, 32, group, kernel, seed=3)
    stages = sch.factor(w, geo, 5)
    assert np.abs(compose(stages, geo) - w).max() <= 1e-9 * np.abs(w).max()
    assert stages_macs(geo, stages) == sch.macs(geo, 5)
    noisy = w + 0.05 * np.random.default_rng(4).standard_normal(w.shape)
    curve = sch.curve(noisy, geo)
    big = sch.factor(noisy, geo, 7)
    for r in (1, 3, 5, 7):
        small = sch.truncate(big, geo, 7, r) if r < 7 else big
        np.testing.assert_allclose(compose(small, geo), compose(sch.factor(noisy, geo, r), geo), atol=1e-9)
        err = np.linalg.norm(noisy - compose(small, geo)) / np.linalg.norm(noisy)
        assert abs(err - curve[r]) < 1e-9
    assert sch.macs_curve(geo, 7) == [sch.macs(geo, r) for r in range(1, 8)]


@pytest.mark.parametrize("c_in,c_out,kernel,group", [(24, 32, (3, 3), 1), (24, 32, (3, 3), 2), (3, 64, (3, 3), 1),
                                                    (64, 8, (1, 1), 1), (16, 16, (5,), 4)])
def test_curves_sharing_a_weights_mode_grams_equal_their_own(c_in, c_out, kernel, group):
    """The planner's per-weight memo: tucker2, out-lowrank, in-lowrank and pw-lowrank curves read
    the mode Grams' eigendecompositions once, in any order, and equal the curves computed alone
    (including a first conv whose output side is the long one, 3·9 < 64, where the memo is not used)."""
    geo = ConvGeometry(batch=1, c_in=c_in, c_out=c_out, group=group, kernel=kernel, in_spatial=(9,) * len(kernel),
                       out_spatial=(9,) * len(kernel), pads=(0,) * 2 * len(kernel))
    w = np.random.default_rng(5).standard_normal((c_out, c_in // group, *kernel))
    names = [n for n in ("out-lowrank", "in-lowrank", "tucker2", "pw-lowrank") if get_scheme(n).reason(geo) is None]
    for order in (names, names[::-1]):
        memo: dict = {}
        for n in order:
            np.testing.assert_allclose(get_scheme(n).curve(w, geo, "", memo), get_scheme(n).curve(w, geo),
                                       rtol=1e-9, atol=1e-12, err_msg=n)
        assert memo or len(order) == 1 or kernel == (1, 1)


def test_tucker2_macs_are_not_linear_in_the_rank_and_break_even_is_exact():
    geo = ConvGeometry(batch=1, c_in=64, c_out=64, group=1, kernel=(3, 3), in_spatial=(16, 16), out_spatial=(16, 16),
                       pads=(1, 1, 1, 1))
    sch = get_scheme("tucker2")
    be = sch.break_even(geo)
    assert sch.macs(geo, be) < geo.macs <= sch.macs(geo, be + 1)
    assert sch.macs(geo, 8) - sch.macs(geo, 4) != 2 * (sch.macs(geo, 4) - sch.macs(geo, 2))


def test_a_pointwise_conv_within_a_budget_is_split():
    """1×1 convs hold most MACs of modern detectors; --budget can now spend them."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64, 1, 1)).astype(np.float32)
    model = conv_model([1, 64, 16, 16], w)
    plan = sepify.plan(model, Policy(mode="budget", budget=0.6))
    (node,) = plan.nodes
    assert node.action == "rewrite" and node.scheme == "pw-lowrank" and node.macs_after <= 0.6 * node.macs


def test_tucker2_curve_of_a_wide_layer_forms_its_core_in_float32_only_clear_of_exactness(monkeypatch):
    """From 512 channels on a side the core's products run in float32 (the bases stay float64):
    the curve agrees with the float64 one up to the break-even rank, and a weight of exact low
    multilinear rank falls back to float64 (its zero tail is an exactness decision)."""
    import sepify.core.schemes.tucker2 as t2

    geo = ConvGeometry(batch=1, c_in=16, c_out=512, group=1, kernel=(3, 3), in_spatial=(8, 8), out_spatial=(8, 8),
                       pads=(1, 1, 1, 1))
    sch = get_scheme("tucker2")
    rng = np.random.default_rng(12)
    noisy = rng.standard_normal((512, 16, 3, 3)).astype(np.float32)
    low = np.einsum("na,abk,cb->nck", rng.standard_normal((512, 4)), rng.standard_normal((4, 4, 9)),
                    rng.standard_normal((16, 4))).reshape(512, 16, 3, 3).astype(np.float32)
    fast = [sch.curve(w, geo) for w in (noisy, low)]
    monkeypatch.setattr(t2, "FAST_GRAM_MIN", 10 ** 9)
    ref = [sch.curve(w, geo) for w in (noisy, low)]
    be = sch.break_even(geo)
    np.testing.assert_allclose(fast[0][:be + 1], ref[0][:be + 1], rtol=1e-5)
    np.testing.assert_array_equal(fast[1], ref[1])
    assert ref[1][4] < 1e-6


@pytest.mark.parametrize("ka,kb", [((3, 3), (1, 1)), ((1, 1), (3, 3)), ((3, 1), (1, 3)), ((1, 1), (1, 1)),
                                   ((5,), (1,)), ((1,), (5,)), ((1, 1, 3), (3, 1, 1))])
def test_stage_products_equal_the_broadcast_kernel_product(ka, kb):
    """compose's product of two stages: ``Σ_m a[…, o, m, k…]·b[…, m, i, k…]`` with the kernel axes
    broadcast — a pointwise side rides along the other's rows or columns, kh×1 with 1×kw
    broadcasts; all against einsum on the explicitly broadcast kernels."""
    from sepify.core.stages import _kernel_matmul

    rng = np.random.default_rng(13)
    a, b = rng.standard_normal((2, 4, 5, 6, *ka)), rng.standard_normal((2, 4, 6, 7, *kb))
    kernel = np.broadcast_shapes(ka, kb)
    big_a = np.broadcast_to(a, a.shape[:4] + kernel).reshape(2, 4, 5, 6, -1)
    big_b = np.broadcast_to(b, b.shape[:4] + kernel).reshape(2, 4, 6, 7, -1)
    want = np.einsum("qaomk,qamik->qaoik", big_a, big_b).reshape(2, 4, 5, 7, *kernel)
    np.testing.assert_allclose(_kernel_matmul(a, b, len(ka)), want, rtol=1e-12, atol=1e-12)
