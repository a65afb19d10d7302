"""The Python API as a new user meets it (issue 13 points 7, 9, 12): parameters named, short reprs,
RewriteReport.totals, one reason code per node from the Reason enum, profiler times that add up."""

from __future__ import annotations

from pathlib import Path

import pytest

import sepify
from sepify.core.drift import drift_definition
from sepify.core.reasons import Reason, primary

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
ALL = sorted(SAMPLES.glob("*.onnx"))


# ----------------------------------------------------------------------------------------------
# 12. parameters, reprs, totals
# ----------------------------------------------------------------------------------------------
def test_policy_names_its_parameters_and_infers_its_mode():
    with pytest.raises(sepify.ParameterError, match=r"^budget=2: needs a fraction in \(0, 1\]") as e:
        sepify.Policy(budget=2)
    assert e.value.param == "budget" and "--budget" not in str(e.value)
    with pytest.raises(sepify.ParameterError, match="tol=5"):
        sepify.Policy(tol=5)
    with pytest.raises(sepify.ParameterError, match="budget=0.5: is not a parameter of a lossless policy"):
        sepify.Policy(mode="lossless", budget=0.5)
    with pytest.raises(sepify.ParameterError, match="choose one policy"):
        sepify.Policy(budget=0.5, rank=2)
    assert sepify.Policy(budget=0.5).mode == "budget" and sepify.Policy().mode == "lossless"
    assert sepify.Policy(tol=1.0).mode == "tol"  # 1 is the error of rank 0: the largest that means something
    assert "budget" in sepify.Policy.__doc__ and "ParameterError" in sepify.Policy.__doc__


@pytest.mark.parametrize("bad", [42, 3.5, [1, 2], object()])
def test_a_model_of_the_wrong_type_is_a_parameter_error(bad):
    with pytest.raises(sepify.ParameterError) as e:
        sepify.audit(bad)
    assert e.value.param == "model" and "path" in str(e.value)


def test_reports_have_short_reprs(tmp_path):
    audit = sepify.audit(SAMPLES / "vgg_small.onnx")
    plan = sepify.plan(SAMPLES / "vgg_small.onnx", sepify.Policy(rank=1))
    model, rewrite = sepify.rewrite(plan)
    drift = sepify.verify(SAMPLES / "vgg_small.onnx", model, per_layer=True)
    bench = sepify.benchmark(SAMPLES / "vgg_small.onnx", model, runs=2, warmup=0, profile_runs=2)
    _, _, cal = sepify.calibrated_rewrite(SAMPLES / "vgg_small.onnx", sepify.Policy(budget=0.5), "random", samples=2)
    for report in (audit, plan, rewrite, drift, bench, cal):
        text = repr(report)
        assert len(text) < 300 and text.startswith(type(report).__name__ + "("), text
    assert len(repr(audit.to_dict())) > 3000  # the data is all still there


def test_rewrite_report_totals_match_its_dict():
    _, report = sepify.rewrite(SAMPLES / "lowrank_separable.onnx")
    assert report.totals.to_dict() == report.to_dict()["totals"]
    assert report.totals.rewritten_nodes == 3 and report.totals.macs_ratio == pytest.approx(report.macs_ratio)
    assert report.node("dwpw2/conv").lowering == "branches"


def test_calibration_reports_define_their_drift_metric():
    _, _, cal = sepify.calibrated_rewrite(SAMPLES / "vgg_small.onnx", sepify.Policy(budget=0.5), "random",
                                          samples=2, drift_metric="cosine")
    assert cal.to_dict()["drift_definition"] == drift_definition("cosine")


# ----------------------------------------------------------------------------------------------
# 9. reason codes: one per node, all from the enum
# ----------------------------------------------------------------------------------------------
def test_primary_reason():
    assert primary(["depthwise", "depthwise", "not_2d"]) == Reason.DEPTHWISE
    assert primary([Reason.DEPTHWISE, None, Reason.NO_MAC_SAVING]) == Reason.NO_MAC_SAVING
    assert primary([None, None]) is None


@pytest.mark.parametrize("policy", [sepify.Policy(), sepify.Policy(tol=0.3), sepify.Policy(rank=1),
                                    sepify.Policy(budget=0.6, scheme="spatial"), sepify.Policy(min_macs=10**9)],
                         ids=["lossless", "tol", "rank", "budget", "min_macs"])
@pytest.mark.parametrize("path", ALL, ids=[p.stem for p in ALL])
def test_every_reason_is_one_enum_code(path, policy):
    codes = {r.value for r in Reason}
    for n in sepify.audit(path).nodes:
        assert n.reason is None or str(n.reason) in codes, (n.qualified_name, n.reason)
    try:
        _, report = sepify.rewrite(path, policy)
    except sepify.ParameterError as exc:  # a budget below the floor of this model
        assert "unreachable" in str(exc)
        return
    for k in report.kept:
        assert str(k["reason"]) in codes and "," not in str(k["reason"]), k


def test_an_edited_keep_has_a_code():
    plan = sepify.plan(SAMPLES / "lowrank_separable.onnx")
    plan.node("dwpw1/conv").action = "keep"
    plan.node("dwpw1/conv").reason = None
    _, report = sepify.rewrite(plan)
    assert {"name": "dwpw1/conv", "reason": "kept_by_plan"} in report.kept


def test_a_drift_bound_that_stops_a_budget_says_so():
    _, report, cal = sepify.calibrated_rewrite(SAMPLES / "vgg_small.onnx", sepify.Policy(budget=0.3), "random",
                                               samples=2, max_drift=1e-9)
    reasons = {str(k["reason"]) for k in report.kept}
    assert cal.conv_macs_after / cal.conv_macs_before > 0.3 + 0.02
    assert "not_needed_for_budget" not in reasons and reasons <= {"drift_bound_reached", "no_mac_saving"}


# ----------------------------------------------------------------------------------------------
# 7. profiler times that say what they add up to
# ----------------------------------------------------------------------------------------------
def test_per_conv_profiler_times_add_up_and_use_the_timed_settings():
    model, _ = sepify.rewrite(SAMPLES / "lowrank_separable.onnx")
    rep = sepify.benchmark(SAMPLES / "lowrank_separable.onnx", model, runs=3, warmup=1, profile_runs=3, threads=1)
    assert sorted(n.name for n in rep.nodes) == ["dwpw1/conv", "dwpw2/conv", "pwdw/conv"]
    p = rep.profile
    assert p.threads == 1 and p.spinning == "run" and p.runs == 3
    assert sum(n.time_a_us for n in rep.nodes) == pytest.approx(p.rewritten_a_us)
    assert sum(n.time_b_us for n in rep.nodes) == pytest.approx(p.rewritten_b_us)
    assert p.rewritten_a_us <= p.kernels_a_us and p.rewritten_b_us + p.other_b_us == pytest.approx(p.kernels_b_us)
    d = rep.to_dict()
    assert "nodes that replaced it" in d["nodes_measure"] and d["profile"]["threads"] == 1
    from sepify.render.text import render_bench

    text = render_bench(rep).replace("\n", " ")
    assert "Rows add up to" in text and "all kernels" in text


def test_profiler_names_map_fused_nodes_to_their_conv():
    from sepify.pipeline.bench import conv_of

    model, _ = sepify.rewrite(SAMPLES / "lowrank_separable.onnx")
    of = conv_of(model)
    assert of["dwpw1.act_nchwc"] == "dwpw1/conv"  # Relu fused into the chain's last conv
    assert of["dwpw2/conv/sep_sum"] == "dwpw2/conv" and of["y_nchwc"] == "pwdw/conv"
    assert "ReorderInput" not in of
