"""Property tests (hypothesis) for the lossless rewrite.

1. A random exact-rank weight (random scheme, rank, channels, groups, kernel, stride, pads,
   auto_pad, dilation, batch, bias, with or without ``kernel_shape``) is rewritten whenever its
   own factorization saves MACs (by hand arithmetic), and the rewritten model reproduces the
   original's onnxruntime outputs to float32 noise with the MACs the report states.
2. A random (full-rank) weight is left alone: the same proto comes back, byte for byte.
3. A weight that is a graph input is never touched, whatever the policy.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import sepify
from sepify import Policy

from test_rewrite import (
    ConvGeo,
    assert_matches,
    conv_model,
    conv_nodes,
    expected_node_counts,
    graph_conv_macs,
    io_names,
    lowrank_weight,
    random_feeds,
    run,
    spatial_order_macs,
)

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@st.composite
def conv_config(draw, kinds=("dw-pw", "pw-dw", "spatial-kernel", "spatial-cross")):
    kind = draw(st.sampled_from(kinds))
    rank = draw(st.integers(1, 3))
    d = 2 if kind.startswith("spatial") else draw(st.sampled_from([1, 2, 2, 2, 3]))
    group = draw(st.sampled_from([1, 1, 2, 4]))
    if kind == "spatial-kernel":
        c_in = group = draw(st.sampled_from([1, 2, 4, 6]))  # depthwise: C/g = 1
        c_out = c_in * draw(st.sampled_from([1, 1, 2]))
    else:
        cg = draw(st.integers(2, 6))
        ng = draw(st.integers(1, 6))
        c_in, c_out = cg * group, ng * group
    kmax = {1: 5, 2: 5, 3: 3}[d]
    kmin = 2 if kind.startswith("spatial") else 1
    kernel = [draw(st.integers(kmin, kmax)) for _ in range(d)]
    if not kind.startswith("spatial"):
        assume(math.prod(kernel) > 1)
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    strides = [draw(st.integers(1, 3)) for _ in range(d)]
    dilations = [1] * d if auto_pad.startswith("SAME") else [draw(st.sampled_from([1, 1, 2])) for _ in range(d)]
    eff = [(k - 1) * dl + 1 for k, dl in zip(kernel, dilations)]
    pads = [draw(st.integers(0, e - 1)) for e in eff] + [draw(st.integers(0, e - 1)) for e in eff]
    spatial = [draw(st.integers(max(e, 3), {1: 24, 2: 12, 3: 6}[d])) for e in eff]
    batch = draw(st.sampled_from([1, 1, 2]))
    attrs = {}
    if auto_pad == "NOTSET":
        attrs["pads"] = pads
    else:
        attrs["auto_pad"] = auto_pad
    if any(s != 1 for s in strides) or draw(st.booleans()):
        attrs["strides"] = strides
    if any(dl != 1 for dl in dilations):
        attrs["dilations"] = dilations
    if group != 1:
        attrs["group"] = group
    if draw(st.booleans()):
        attrs["kernel_shape"] = kernel
    return dict(kind=kind, rank=rank, c_in=c_in, c_out=c_out, group=group, kernel=kernel, batch=batch,
                x_shape=[batch, c_in, *spatial], attrs=attrs, bias=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def _geo(cfg) -> ConvGeo:
    a = cfg["attrs"]
    return ConvGeo.of(cfg["x_shape"], [cfg["c_out"], cfg["c_in"] // cfg["group"], *cfg["kernel"]], group=cfg["group"],
                      strides=a.get("strides"), dilations=a.get("dilations"), pads=a.get("pads"),
                      auto_pad=a.get("auto_pad", "NOTSET"))


def _hand_macs(cfg, geo: ConvGeo) -> int:
    """MACs of the construction's own factorization at its rank (the cheaper order for spatial)."""
    r, b = cfg["rank"], geo.batch
    c, n, g = cfg["c_in"], cfg["c_out"], cfg["group"]
    cg, k = c // g, math.prod(cfg["kernel"])
    out = math.prod(geo.out_spatial)
    if cfg["kind"] == "dw-pw":
        return b * out * (c * r * k + n * cg * r)
    if cfg["kind"] == "pw-dw":
        return b * (math.prod(geo.in_spatial) * n * r * cg + out * n * r * k)
    return min(spatial_order_macs(geo, r))


def _build(cfg, weight: str = "initializer", full_rank: bool = False):
    geo = _geo(cfg)
    vfirst = True
    if cfg["kind"] == "spatial-cross":
        v, h = spatial_order_macs(geo, cfg["rank"])
        vfirst = v <= h
    rng = np.random.default_rng(cfg["seed"])
    if full_rank:
        w = rng.standard_normal((cfg["c_out"], cfg["c_in"] // cfg["group"], *cfg["kernel"]))
    else:
        w = lowrank_weight(cfg["kind"], cfg["rank"], cfg["c_in"], cfg["c_out"], cfg["group"], cfg["kernel"],
                           seed=cfg["seed"], vertical_first=vfirst)
    bias = rng.standard_normal(cfg["c_out"]) if cfg["bias"] else None
    return conv_model(cfg["x_shape"], w, bias=bias, weight=weight, **cfg["attrs"]), geo


KINDS = ["dw-pw", "pw-dw", "spatial-kernel", "spatial-cross"]


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=30, **SETTINGS)
@given(data=st.data())
def test_exact_rank_weights_rewrite_losslessly(kind, data):
    cfg = data.draw(conv_config(kinds=(kind,)), label="cfg")
    model, geo = _build(cfg)
    assume(min(geo.out_spatial) >= 1)
    hand = _hand_macs(cfg, geo)
    out, report = sepify.rewrite(model)
    event(f"{cfg['kind']} rewritten={report.changed}")
    assert report.conv_macs_before == geo.macs
    if hand < geo.macs:
        # its own factorization is exact and cheaper: the lossless policy must find it (or a cheaper one)
        assert report.changed, (cfg, report.kept)
    if not report.changed:
        assert out is model
        assert report.kept[0]["reason"] in ("no_exact_saving", "no_mac_saving")
        return
    (r,) = report.rewritten
    assert r.macs_after <= hand and r.macs_after < geo.macs
    assert r.weight_error <= 2.4e-7
    onnx.checker.check_model(out, full_check=True)
    assert io_names(out) == io_names(model)
    feeds = random_feeds(model, seed=cfg["seed"])
    assert_matches(run(model, feeds), run(out, feeds), 1e-5)
    assert graph_conv_macs(out, feeds) == r.macs_after
    n_conv, n_sum = expected_node_counts(r)
    assert len(conv_nodes(out.graph)) == n_conv and len(out.graph.node) == n_conv + n_sum


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=10, **SETTINGS)
@given(data=st.data())
def test_full_rank_weights_left_alone(kind, data):
    cfg = data.draw(conv_config(kinds=(kind,)), label="cfg")
    model, geo = _build(cfg, full_rank=True)
    assume(min(geo.out_spatial) >= 1)
    data = model.SerializeToString()
    out, report = sepify.rewrite(model)
    assert not report.changed and report.rewritten == []
    assert out is model and out.SerializeToString() == data
    assert [k["reason"] for k in report.kept] in (["no_exact_saving"], ["no_mac_saving"])


POLICIES = [None, Policy(mode="tol", tol=0.5), Policy(mode="rank", rank=1), Policy(mode="budget", budget=0.2),
            Policy(scheme="spatial"), Policy(scheme="dw-pw")]


@settings(max_examples=25, **SETTINGS)
@given(conv_config(), st.sampled_from(POLICIES))
def test_weight_graph_input_never_touched(cfg, policy):
    model, geo = _build(cfg, weight="input")
    assume(min(geo.out_spatial) >= 1)
    data = model.SerializeToString()
    if policy is not None and policy.mode == "budget":  # nothing can be rewritten: a budget below 1 is unreachable, and said so
        with pytest.raises(sepify.ParameterError, match="no conv can be rewritten"):
            sepify.rewrite(model, policy)
        return
    out, report = sepify.rewrite(model, policy)
    assert out is model and not report.changed
    assert report.kept == [{"name": "conv", "reason": "weight_not_constant"}]
    assert out.SerializeToString() == data


@pytest.mark.parametrize("kind", ["dw-pw", "pw-dw", "spatial-kernel", "spatial-cross"])
def test_property_strategy_reaches_every_kind(kind):
    """Sanity: the strategy's constructions of each kind are rewritten in a plain geometry."""
    cfg = dict(kind=kind, rank=1, c_in=8, c_out=8, group=8 if kind == "spatial-kernel" else 1, kernel=[3, 3],
               batch=1, x_shape=[1, 8, 10, 10], attrs=dict(pads=[1, 1, 1, 1]), bias=False, seed=1)
    if kind == "spatial-kernel":
        cfg["attrs"]["group"] = 8
    model, geo = _build(cfg)
    out, report = sepify.rewrite(model)
    assert report.changed and report.rewritten[0].scheme == ("spatial" if kind.startswith("spatial") else kind)
