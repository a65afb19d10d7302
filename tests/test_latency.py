"""Lowerings (branches / grouped / concat) are the same math; latency-aware selection (--only-faster).

Every lowering of an exact low-rank weight must reproduce the ORIGINAL model's onnxruntime output
to float32 noise.  The latency code runs here with tiny round counts: these tests check the
plumbing (isolated models, what is recorded, decisions follow the measured figures), never speed.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import sepify
from sepify.pipeline.bench import Rounds, interleaved_times, round_order
from sepify.cli import main
from sepify.core.lowering import LOWERINGS, lower, lowering_kinds
from sepify.core.schemes import get as get_scheme
from sepify.core.stages import stages_macs
from sepify.pipeline.realize import factor_node, realize
from sepify.pipeline.verify import make_session
from sepify.pipeline.latency import (
    SINGLE,
    candidate_lowerings,
    isolated_model,
    lowered_model,
    measure_plan,
)
from sepify.render.text import render_latency

from test_rewrite import (
    Case,
    assert_matches,
    build_case,
    check_lossless,
    conv_nodes,
    expected_macs_after,
    graph_conv_macs,
    lowrank_weight,
    make_model,
    random_feeds,
    run,
    vi,
)

P1 = dict(pads=[1, 1, 1, 1])
LOWERING_CASES = [
    Case("dwpw_r2", "dw-pw", 2, 8, 16, (12, 12), (3, 3), attrs=P1),
    Case("dwpw_r3_bias", "dw-pw", 3, 8, 16, (12, 12), (3, 3), bias=True, attrs=P1),
    Case("dwpw_r4_s2_asym", "dw-pw", 4, 8, 8, (13, 14), (3, 3), bias=True, attrs=dict(strides=[2, 1], pads=[0, 1, 2, 1])),
    Case("dwpw_r2_same_upper", "dw-pw", 2, 8, 16, (11, 13), (3, 3), attrs=dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    Case("dwpw_r2_dil_b2", "dw-pw", 2, 8, 16, (13, 13), (3, 3), batch=2, bias=True,
         attrs=dict(dilations=[2, 2], pads=[2, 2, 2, 2])),
    Case("dwpw_r2_g2", "dw-pw", 2, 8, 16, (10, 10), (3, 3), group=2, attrs=P1),
    Case("dwpw_r2_1d", "dw-pw", 2, 8, 16, (31,), (5,), attrs=dict(strides=[2], pads=[1, 2])),
    Case("dwpw_r2_3d", "dw-pw", 2, 8, 16, (5, 7, 9), (3, 3, 3), attrs=dict(auto_pad="SAME_LOWER", strides=[2, 2, 2])),
    Case("pwdw_r2", "pw-dw", 2, 16, 8, (12, 12), (3, 3), attrs=P1),
    Case("pwdw_r3_bias_b2", "pw-dw", 3, 16, 8, (12, 12), (3, 3), batch=2, bias=True, attrs=dict(pads=[1, 0, 0, 1])),
    Case("pwdw_r2_s2", "pw-dw", 2, 16, 8, (11, 12), (3, 3), attrs=dict(pads=[2, 0, 0, 1], strides=[2, 1])),
    Case("pwdw_r2_same_lower", "pw-dw", 2, 16, 8, (13, 11), (4, 2), attrs=dict(auto_pad="SAME_LOWER")),
    Case("pwdw_r2_g2", "pw-dw", 2, 16, 8, (10, 10), (3, 3), group=2, attrs=P1),
    Case("pwdw_r2_1d_dil", "pw-dw", 2, 16, 8, (31,), (5,), attrs=dict(pads=[2, 2], dilations=[2])),
]


def _ops(model: onnx.ModelProto) -> list[str]:
    return sorted(n.op_type for n in model.graph.node)


def _expected_ops(case: Case, used: str) -> list[str]:
    r = case.rank
    join = ["Add"] * (r - 1)  # a chain of Adds, each fusable into a conv
    if used == "grouped":
        return ["Conv", "Conv"]
    if used == "branches":
        return sorted(["Conv"] * (2 * r) + join)
    if case.kind == "dw-pw":  # concat: r depthwise, Concat, one pointwise
        return sorted(["Conv"] * (r + 1) + ["Concat"])
    return sorted(["Conv"] * (r + 1) + ["Split"] + join)  # pw-dw: one pointwise, Split, r depthwise, Adds


# ==============================================================================================
# Every lowering is exact
# ==============================================================================================
@pytest.mark.parametrize("lowering", LOWERINGS)
@pytest.mark.parametrize("case", LOWERING_CASES, ids=[c.id for c in LOWERING_CASES])
def test_every_lowering_matches_the_original(case: Case, lowering: str):
    model = build_case(case)
    out, report = sepify.rewrite(model, lowering=lowering)
    check_lossless(model, out, report, expect_macs_before=case.geo().macs)
    (r,) = report.rewritten
    assert (r.scheme, r.rank) == (case.scheme, case.rank)
    # concat needs an ungrouped pointwise stage; elsewhere it falls back to branches, and says so
    used = "branches" if lowering == "concat" and case.group > 1 else lowering
    assert r.lowering == used
    assert _ops(out) == _expected_ops(case, used)
    # same MACs every way, and they are the MACs onnxruntime runs
    assert r.macs_after == expected_macs_after(case)
    assert graph_conv_macs(out, random_feeds(model)) == r.macs_after
    meta = json.loads(next(p.value for p in out.metadata_props if p.key == "sepify"))
    assert meta["history"][-1]["nodes"][0]["lowering"] == used
    assert all("/sep_" in n.name for n in out.graph.node)


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_pw_dw_split_across_opsets(opset):
    """Split's signature changed at opsets 13 (split as input) and 18 (num_outputs required)."""
    w = lowrank_weight("pw-dw", 2, 16, 8, 1, (3, 3), seed=3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    model = make_model(nodes, [vi("x", [1, 16, 10, 10])], [vi("y", [1, 8, 10, 10])],
                       [numpy_helper.from_array(w, "w")], opset=opset)
    out, report = sepify.rewrite(model, lowering="concat")
    check_lossless(model, out, report)
    (split,) = [n for n in out.graph.node if n.op_type == "Split"]
    assert len(split.output) == 2 and len(split.input) == 1
    assert [a.name for a in split.attribute] == (["axis", "num_outputs"] if opset >= 18 else ["axis"])


def test_concat_structure_dw_pw():
    """dw-pw r=2 as concat: two multiplier-1 depthwise convs on x, Concat, one pointwise 2C→N with the bias."""
    case = Case("s", "dw-pw", 2, 8, 16, (13, 13), (3, 3), bias=True, attrs=dict(strides=[2, 1], pads=[0, 1, 2, 1]))
    out, _ = sepify.rewrite(build_case(case), lowering="concat")
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    convs = conv_nodes(out.graph)
    (cat,) = [n for n in out.graph.node if n.op_type == "Concat"]
    dws = [n for n in convs if n.input[0] == "x"]
    (pw,) = [n for n in convs if n.input[0] == cat.output[0]]
    assert len(dws) == 2 and list(cat.input) == [d.output[0] for d in dws]
    for dw in dws:
        assert inits[dw.input[1]].shape == (8, 1, 3, 3) and len(dw.input) == 2
        assert helper.get_attribute_value(next(a for a in dw.attribute if a.name == "strides")) == [2, 1]
    assert inits[pw.input[1]].shape == (16, 16, 1, 1) and pw.input[2] == "b" and pw.output[0] == "y"


def test_lowered_macs_and_kinds():
    rng = np.random.default_rng(0)
    case = Case("m", "dw-pw", 3, 8, 16, (12, 12), (3, 3), attrs=P1)
    from sepify.core.geometry import ConvGeometry

    geo = ConvGeometry(batch=1, c_in=8, c_out=16, group=1, kernel=(3, 3), in_spatial=(12, 12), out_spatial=(12, 12),
                       strides=(1, 1), dilations=(1, 1), pads=(1, 1, 1, 1))
    w = rng.standard_normal((16, 8, 3, 3))
    for scheme in ("dw-pw", "pw-dw"):
        stages = get_scheme(scheme).factor(w, geo, case.rank)
        assert lowering_kinds(stages) == ["branches", "grouped", "concat"]
        for k in LOWERINGS:
            lw = lower(stages, k)
            assert lw.kind == k and lw.macs(geo) == stages_macs(geo, stages)
        assert lowering_kinds(get_scheme(scheme).factor(w, geo, 1)) == []  # rank 1: one way to write it
    with pytest.raises(ValueError):
        lower(get_scheme("dw-pw").factor(w, geo, 2), "bogus")


def test_plan_lowering_edit_wins_and_bad_one_is_refused():
    case = Case("e", "dw-pw", 2, 8, 16, (12, 12), (3, 3), attrs=P1)
    model = build_case(case)
    plan = sepify.plan(model)
    plan.node("conv").lowering = "concat"
    out, report = sepify.rewrite(plan, lowering="grouped")
    assert report.rewritten[0].lowering == "concat" and "Concat" in _ops(out)
    plan.node("conv").lowering = "bogus"
    with pytest.raises(sepify.SepifyError, match="lowering"):
        sepify.rewrite(plan)


# ==============================================================================================
# Isolated models
# ==============================================================================================
def _relu_stack(second_consumer: bool = False) -> onnx.ModelProto:
    """x → conv(+b) → Relu → conv2 → y, optionally with the first conv's output also read by an Add."""
    rng = np.random.default_rng(1)
    w = lowrank_weight("dw-pw", 2, 8, 16, 1, (3, 3), seed=1).astype(np.float32)
    w2 = rng.standard_normal((8, 16, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    outputs = [vi("y", [1, 8, 12, 12])]
    if second_consumer:
        nodes.append(helper.make_node("Add", ["c", "c"], ["z"], name="add"))
        outputs.append(vi("z", [1, 16, 12, 12]))
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b"),
             numpy_helper.from_array(w2, "w2")]
    return make_model(nodes, [vi("x", [1, 8, 12, 12])], outputs, inits)


def test_isolated_model_has_the_conv_its_fused_relu_and_real_weights():
    model = _relu_stack()
    plan = sepify.plan(model)
    an = plan.analysis
    spec = next(s for s in an.specs if s.ref.name == "conv")
    iso = isolated_model(an, spec)
    onnx.checker.check_model(iso, full_check=True)
    assert [n.op_type for n in iso.graph.node] == ["Conv", "Relu"]
    assert [i.name for i in iso.graph.input] == ["x"] and [o.name for o in iso.graph.output] == ["r"]
    feeds = random_feeds(model)
    full = make_session(model, ["r"]).run(["r"], feeds)[0]
    assert_matches([full], run(iso, feeds), rel=1e-6)
    # the rewritten chain (every lowering) computes the same as the isolated original
    rz = realize(an, spec, plan.node("conv"))
    cands = candidate_lowerings(rz.stages, None)
    assert sorted(cands) == sorted(LOWERINGS)
    for lw in cands.values():
        new = lowered_model(iso, rz, lw)
        assert "Relu" in [n.op_type for n in new.graph.node]
        assert_matches(run(iso, feeds), run(new, feeds), rel=1e-5)


def test_isolated_model_leaves_out_an_activation_that_is_not_the_only_consumer():
    model = _relu_stack(second_consumer=True)
    an = sepify.plan(model).analysis
    spec = next(s for s in an.specs if s.ref.name == "conv")
    assert [n.op_type for n in isolated_model(an, spec).graph.node] == ["Conv"]


def test_candidate_lowerings_single_and_restricted():
    case = Case("c", "dw-pw", 1, 8, 16, (12, 12), (3, 3), attrs=P1)
    plan = sepify.plan(build_case(case))
    an = plan.analysis
    spec = an.specs[0]
    stages = factor_node(an.view.constant("w", spec.ref).value, spec.geometry(), plan.node("conv"), 0.0)
    assert list(candidate_lowerings(stages)) == [SINGLE]
    g2 = Case("g", "dw-pw", 2, 8, 16, (10, 10), (3, 3), group=2, attrs=P1)
    plan = sepify.plan(build_case(g2))
    spec = plan.analysis.specs[0]
    stages = factor_node(plan.analysis.view.constant("w", spec.ref).value, spec.geometry(), plan.node("conv"), 0.0)
    assert list(candidate_lowerings(stages)) == ["branches", "grouped"]  # no concat across groups
    assert list(candidate_lowerings(stages, ["concat"])) == ["branches"]  # its fallback


# ==============================================================================================
# Measurement plumbing (tiny run counts; no assertion on speed)
# ==============================================================================================
def _stack_model() -> onnx.ModelProto:
    """Two exact rank-2 dw-pw convs and a rank-1 one, with a Relu between."""
    w1 = lowrank_weight("dw-pw", 2, 16, 16, 1, (3, 3), seed=1).astype(np.float32)
    w2 = lowrank_weight("dw-pw", 1, 16, 16, 1, (3, 3), seed=2).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ar"], name="relu"),
             helper.make_node("Conv", ["ar", "w2"], ["y"], name="c2", kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    return make_model(nodes, [vi("x", [1, 16, 16, 16])], [vi("y", [1, 16, 16, 16])],
                      [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])


@pytest.fixture(scope="module")
def measured():
    model = _stack_model()
    plan = sepify.plan(model)
    return model, plan, measure_plan(plan, threads=1, runs=3, warmup=1, min_speedup=0.0)


def test_measure_plan_records_figures_and_leaves_the_input_plan_alone(measured):
    model, plan, timed = measured
    assert all(n.latency is None and n.lowering is None for n in plan.nodes)
    c1, c2 = timed.node("c1"), timed.node("c2")
    for n in (c1, c2):
        lat = n.latency
        assert lat["runs"] == 3 and lat["threads"] == 1 and lat["original_us"] > 0
        assert set(lat["speedups"]) == set(lat["lowerings_us"])
        assert lat["chosen"] == max(lat["speedups"], key=lat["speedups"].get)
        assert lat["speedup"] == lat["speedups"][lat["chosen"]] and lat["faster"] is True
        assert n.action == "rewrite"
    assert set(c1.latency["lowerings_us"]) == set(LOWERINGS) and c1.latency["activation"] == "Relu"
    assert c1.lowering == c1.latency["chosen"]
    assert list(c2.latency["lowerings_us"]) == [SINGLE] and c2.lowering is None and c2.latency["activation"] is None
    # the measured plan rewrites each node in its chosen lowering, exactly
    out, report = sepify.rewrite(timed)
    check_lossless(model, out, report)
    by_name = {r.name: r for r in report.rewritten}
    assert by_name["c1"].lowering == c1.latency["chosen"] and by_name["c1"].latency == c1.latency
    assert by_name["c2"].lowering == SINGLE
    table = render_latency(report)
    assert "c1 (+Relu)" in table and "c2" in table and "speedup" in table


def test_nothing_faster_keeps_the_model_unchanged():
    model = _stack_model()
    timed = measure_plan(sepify.plan(model), runs=2, warmup=1, min_speedup=math.inf)
    assert [n.action for n in timed.nodes] == ["keep", "keep"]
    assert {n.reason for n in timed.nodes} == {"not_faster"}
    out, report = sepify.rewrite(timed)
    assert out is model and not report.changed
    assert [k["reason"] for k in report.kept] == ["not_faster", "not_faster"]
    assert all(k["latency"]["faster"] is False for k in report.kept)
    assert "no" in render_latency(report)


def test_rewrite_only_faster_api_with_a_fixed_lowering():
    model = _stack_model()
    out, report = sepify.rewrite(model, only_faster=True, threads=1, latency_runs=2, lowering="grouped")
    timed = [r.latency for r in report.rewritten] + [k["latency"] for k in report.kept if "latency" in k]
    assert len(timed) == 2
    c1 = next(t for t in timed if t["node"] == "c1")
    assert list(c1["lowerings_us"]) == ["grouped"]
    for r in report.rewritten:
        assert r.lowering in (SINGLE, "grouped")
    if report.changed:
        check_lossless(model, out, report)


@pytest.mark.parametrize("kw, msg", [(dict(threads=0), "threads"), (dict(runs=0), "runs"),
                                     (dict(lowerings=["bogus"]), "lowering")])
def test_measure_plan_bad_arguments(kw, msg):
    with pytest.raises(sepify.SepifyError, match=msg):
        measure_plan(sepify.plan(_stack_model()), **kw)


def test_cli_only_faster(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(_stack_model(), src)
    out = tmp_path / "o.onnx"
    rc = main(["rewrite", str(src), "-o", str(out), "--only-faster", "--threads", "1", "--latency-runs", "2",
               "--format", "json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    timed = [r["latency"] for r in report["rewritten"]] + [k["latency"] for k in report["kept"] if "latency" in k]
    assert sorted(t["node"] for t in timed) == ["c1", "c2"] and all(t["runs"] == 2 for t in timed)
    assert main(["rewrite", str(src), "-o", str(out), "--only-faster", "--latency-runs", "2"]) == 0
    assert "onnxruntime latency per node" in capsys.readouterr().out


@pytest.mark.parametrize("flag", [["--threads", "0"], ["--latency-runs", "0"], ["--lowering", "bogus"]])
def test_cli_bad_latency_flags(tmp_path, capsys, flag):
    src = tmp_path / "m.onnx"
    onnx.save(_stack_model(), src)
    assert main(["rewrite", str(src), "-o", str(tmp_path / "o.onnx"), "--only-faster", *flag]) == 2
    assert not (tmp_path / "o.onnx").exists()
    assert capsys.readouterr().err.startswith("sepify: error:")


# ==============================================================================================
# Interleaving
# ==============================================================================================
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_round_order_balances_positions(k):
    rounds = [round_order(k, i) for i in range(2 * k)]
    assert all(sorted(r) == list(range(k)) for r in rounds)
    for pos in range(k):
        assert sorted(r[pos] for r in rounds) == sorted(list(range(k)) * 2)
    if k == 2:
        assert rounds[:2] == [[0, 1], [1, 0]]


def test_interleaved_times_rewarms_then_times_every_session_once_per_round():
    calls = []

    class S:
        def __init__(self, i):
            self.i = i

        def run(self, _, feeds):
            calls.append(self.i)

    rounds = interleaved_times([S(0), S(1), S(2)], {}, runs=4, warmup=1)
    assert [len(t) for t in rounds.times] == [4, 4, 4]
    # warm-up round, then per round each session twice in a row (untimed re-warm, timed run)
    assert calls[:3] == [0, 1, 2] and calls[3:9] == [0, 0, 1, 1, 2, 2] and len(calls) == 3 + 24
    calls.clear()
    interleaved_times([S(0), S(1)], {}, runs=2, rewarm=0)
    assert calls == [0, 1, 1, 0]
    if rounds.waits is not None:  # Linux: how long the threads waited for a CPU, per run
        assert [len(w) for w in rounds.waits] == [4, 4, 4] and min(min(w) for w in rounds.waits) >= 0


def test_contended_rounds_are_set_aside_when_enough_are_clean():
    times = [[1.0] * 40, [0.5] * 40]
    waits = [[0.0] * 40, [0.0] * 40]
    for i in range(10):  # a quarter of the rounds: the first run waited 20% of its time
        times[0][i], waits[0][i] = 2.0, 0.4
    rounds = Rounds(times, waits)
    assert list(rounds.used()) == list(range(10, 40))
    assert rounds.contention(0) == 0.0 and rounds.contention(1) == 0.0
    for i in range(10, 31):  # now fewer than a quarter are clean: every round counts
        waits[1][i] = 0.2
    assert len(Rounds(times, waits).used()) == 40
    assert len(Rounds(times, None).used()) == 40 and Rounds(times, None).contention(0) is None


def test_a_node_onnxruntime_cannot_run_is_kept_with_the_error(monkeypatch):
    import sepify.pipeline.latency as latency

    def refuse(*a, **k):
        raise sepify.SepifyError("onnxruntime cannot load the model: nope")

    monkeypatch.setattr(latency, "time_models", refuse)
    model = _stack_model()
    out, report = sepify.rewrite(model, only_faster=True, latency_runs=2)
    assert out is model and not report.changed
    assert {k["reason"] for k in report.kept} == {"latency_not_measured"}
    assert all("nope" in k["latency"]["error"] for k in report.kept)
    assert "not measured" in render_latency(report)


def test_benchmark_records_its_timing_conditions(tmp_path):
    from sepify.pipeline.bench import benchmark

    model = _stack_model()
    out, _ = sepify.rewrite(model)
    report = benchmark(model, out, runs=3, warmup=1, threads=1, profile_runs=0, spinning="off", rewarm=0)
    d = report.to_dict()
    assert (d["spinning"], d["rewarm"], d["rounds"]) == ("off", 0, 3) and d["rounds_used"] == 3
    assert report.speedup > 0
    with pytest.raises(sepify.SepifyError, match="spinning"):
        benchmark(model, out, runs=1, spinning="sometimes")


def test_cli_bench_timing_flags(tmp_path, capsys):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    model = _stack_model()
    onnx.save(model, a)
    onnx.save(sepify.rewrite(model)[0], b)
    assert main(["bench", str(a), str(b), "--runs", "2", "--warmup", "0", "--no-profile", "--spinning", "off",
                 "--cold", "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["spinning"], d["rewarm"]) == ("off", 0)
    assert main(["bench", str(a), "--runs", "1", "--spinning", "sometimes"]) == 2
