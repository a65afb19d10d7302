"""The scheme registry is the only place a scheme lives; plans round-trip through JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

import sepify
from sepify.cli import main
from sepify.core import schemes
from sepify.core.schemes.pwdw import PwDw
from sepify.pipeline.plan import Plan
from test_rewrite import Case, build_case, random_feeds, run


class _Registered(PwDw):
    """A scheme the planner, audit, rewrite and CLI have never heard of (pw-dw's math, its own name)."""

    name = "test-scheme"
    summary = "pw-dw under another name, registered by a test"


@pytest.fixture
def extra_scheme(monkeypatch):
    registry = dict(schemes.REGISTRY)
    registry[_Registered.name] = _Registered()
    monkeypatch.setattr(schemes, "REGISTRY", registry)
    return _Registered.name


def test_a_registered_scheme_reaches_audit_plan_rewrite_and_cli(extra_scheme, tmp_path, capsys):
    model = build_case(Case("r", "pw-dw", 1, 8, 16, (12, 12), (3, 3), attrs=dict(pads=[1, 1, 1, 1])))
    report = sepify.audit(model)
    node = report.nodes[0]
    assert extra_scheme in node.separability.schemes and node.separability.schemes[extra_scheme].exact_rank == 1
    plan = sepify.plan(model, sepify.Policy(scheme=extra_scheme))
    assert plan.nodes[0].action == "rewrite" and plan.nodes[0].scheme == extra_scheme
    out, rep = sepify.rewrite(plan)
    assert rep.rewritten[0].scheme == extra_scheme and rep.rewritten[0].source == "exact"
    feeds = random_feeds(model)
    np.testing.assert_allclose(run(out, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-4)
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString())
    code = main(["rewrite", str(src), "-o", str(tmp_path / "o.onnx"), "--scheme", extra_scheme, "--format", "json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["rewritten"][0]["scheme"] == extra_scheme


def test_an_edited_plan_round_trips_through_json():
    model = build_case(Case("j", "dw-pw", 2, 8, 16, (12, 12), (3, 3), attrs=dict(pads=[1, 1, 1, 1])))
    plan = sepify.plan(model, sepify.Policy(mode="rank", rank=2))
    again = Plan.from_dict(json.loads(plan.to_json()), plan.analysis)
    assert again.policy == plan.policy and [n.to_dict() for n in again.nodes] == [n.to_dict() for n in plan.nodes]
    a, _ = sepify.rewrite(plan)
    b, _ = sepify.rewrite(again)
    assert a.SerializeToString() == b.SerializeToString()
    edited = json.loads(plan.to_json())
    edited["nodes"][0]["action"] = "keep"
    out, rep = sepify.rewrite(Plan.from_dict(edited, plan.analysis))
    assert not rep.changed and out is plan.analysis.loaded.model


def test_every_schemes_mac_curve_is_its_chain_at_each_rank():
    """``macs_curve`` (Tucker-2's in closed form) agrees with the MACs of the chain built at each rank,
    over groups, strides, pads, dilations, 1-D/2-D/3-D and unequal channel counts."""
    from sepify.core.geometry import ConvGeometry, conv_out_spatial
    from sepify.core.stages import stages_macs

    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(60):
        d = int(rng.integers(1, 4))
        g = int(rng.choice([1, 2, 4]))
        cin, cout = g * int(rng.integers(1, 9)), g * int(rng.integers(1, 9))
        kernel = tuple(int(k) for k in rng.integers(1, 4, d))
        strides = tuple(int(s) for s in rng.integers(1, 3, d))
        dil = tuple(int(s) for s in rng.integers(1, 3, d))
        pads = tuple(int(p) for p in rng.integers(0, 2, 2 * d))
        inp = tuple(int(s) for s in rng.integers(6, 12, d))
        out = tuple(conv_out_spatial(inp, kernel, strides, dil, pads))
        geo = ConvGeometry(int(rng.integers(1, 3)), cin, cout, g, kernel, inp, out, strides, dil, pads)
        for name in schemes.names():
            sch = schemes.get(name)
            if sch.reason(geo) is not None:
                continue
            for variant in sch.variants(geo):
                top = sch.max_rank(geo, variant)
                want = [stages_macs(geo, sch.stages(geo, r, variant)) for r in range(1, top + 1)]
                assert sch.macs_curve(geo, top, variant) == want, (name, variant, geo)
                checked += 1
    assert checked > 100
