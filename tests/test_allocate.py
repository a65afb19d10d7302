"""The one allocator (sepify.core.allocate): fronts, hulls, the greedy walk, and the budget plans built on it."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import sepify
from conftest import init, make_model, vi
from sepify.core.allocate import Option, front, greedy, hull


def test_front_keeps_the_pareto_options_cheapest_last():
    opts = [Option(80, 0.1, "a"), Option(60, 0.3, "b"), Option(70, 0.5, "dominated"), Option(100, 0.0, "not cheaper")]
    assert [o.payload for o in front(100, opts)] == ["a", "b"]


def test_front_tells_apart_what_the_loss_rounds_together():
    """Two exact options whose loss rounds to 0: the key (the weight error) keeps the better one too."""
    opts = [Option(50, 0.0, "rank 4", key=8.9e-9), Option(40, 0.0, "rank 3", key=1.3e-8)]
    assert [o.payload for o in front(100, opts)] == ["rank 4", "rank 3"]
    assert [o.payload for o in front(100, [Option(o.cost, o.loss, o.payload) for o in opts])] == ["rank 3"]


def test_hull_drops_options_above_the_lower_convex_hull():
    opts = [Option(90, 0.5, "bad"), Option(80, 0.2, "good"), Option(50, 0.8, "far")]
    # from (100, 0): slopes 0.05/MAC to "bad" then ... "good" is below the chord: "bad" goes
    assert [o.payload for o in hull(100, opts)] == ["good", "far"]


def test_greedy_takes_the_least_loss_per_cost_first_and_stops_at_the_target():
    layers = {"a": (100, [Option(50, 1.0)]), "b": (100, [Option(50, 10.0)])}
    res = greedy(layers, target=160)
    assert set(res.chosen) == {"a"} and res.cost == 150 and res.loss == 1.0 and not res.exhausted
    res = greedy(layers, target=90)
    assert set(res.chosen) == {"a", "b"} and res.exhausted  # 100 > 90: every option taken, still above
    assert greedy(layers, max_loss=5.0).loss == 1.0


def test_greedy_counts_the_fixed_cost_outside_the_layers():
    """A budget is a fraction of all conv MACs, including convs no option applies to."""
    layers = {"a": (100, [Option(20, 1.0)])}
    assert greedy(layers, target=100).chosen == {}  # 100 ≤ 100 without fixed cost
    assert set(greedy(layers, target=100, fixed=100).chosen) == {"a"}  # 200 > 100


def test_budget_plan_reaches_the_budget_when_a_pointwise_conv_holds_half_the_macs():
    """Regression: the conv whose weight is a graph input cannot be rewritten, yet its MACs count in
    the budget's total."""
    rng = np.random.default_rng(0)
    w3 = rng.standard_normal((16, 32, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="pw"),
             helper.make_node("Conv", ["h", "w3"], ["y"], name="k3", pads=[1, 1, 1, 1])]
    model = make_model(nodes, [vi("x", [1, 16, 16, 16]), vi("w1", [32, 16, 1, 1])], [vi("y", [1, 16, 16, 16])],
                       [init("w3", w3)])
    plan = sepify.plan(model, sepify.Policy(mode="budget", budget=0.6))
    assert plan.node("pw").action == "keep" and plan.node("k3").action == "rewrite"
    assert plan.conv_macs_after <= 0.6 * plan.conv_macs + 1e-9 or plan.node("k3").rank == 1


@pytest.mark.parametrize("convex", [False, True])
def test_greedy_is_deterministic_with_ties_in_layer_order(convex):
    layers = {k: (10, [Option(5, 1.0, k)]) for k in ("c", "a", "b")}
    assert list(greedy(layers, target=25, convex=convex).chosen) == ["c"]


def _pointwise_heavy():
    """A conv holding most of the MACs that no scheme can take (its weight is computed: a graph input)
    and a depthwise 3×3 conv, as in nets whose pointwise convs no scheme could take."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="pw"),
             helper.make_node("Conv", ["h", "w3"], ["y"], name="k3", pads=[1, 1, 1, 1], group=64)]
    return make_model(nodes, [vi("x", [1, 64, 16, 16]), vi("w1", [64, 64, 1, 1])], [vi("y", [1, 64, 16, 16])],
                      [init("w3", rng.standard_normal((64, 1, 3, 3)).astype(np.float32))])


@pytest.mark.parametrize("calibrated", [False, True], ids=["weight-only", "calibrated"])
def test_an_unreachable_budget_is_refused_naming_the_floor(tmp_path, capsys, calibrated):
    from sepify.cli import main

    path = tmp_path / "m.onnx"
    path.write_bytes(_pointwise_heavy().SerializeToString())
    argv = ["rewrite", str(path), "-o", str(tmp_path / "o.onnx"), "--budget", "0.5"]
    argv += ["--calibrate", "random", "--calib-samples", "4"] if calibrated else []
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--budget 0.5: unreachable" in err and "floor is 0.9" in err
    assert not (tmp_path / "o.onnx").exists()
    argv[argv.index("0.5")] = "0.97"
    assert main(argv) == 0


def _siamese():
    """Two towers (conv → relu → conv) over inputs a and b reading the same two weights; y = tower(a) − tower(b)."""
    rng = np.random.default_rng(3)
    nodes = []
    for t in ("a", "b"):
        nodes += [helper.make_node("Conv", [t, "w1"], [f"{t}1"], name=f"{t}_conv1", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"{t}1"], [f"{t}r"], name=f"{t}_relu"),
                  helper.make_node("Conv", [f"{t}r", "w2"], [f"{t}2"], name=f"{t}_conv2", pads=[1, 1, 1, 1])]
    nodes.append(helper.make_node("Sub", ["a2", "b2"], ["y"], name="diff"))
    return make_model(nodes, [vi("a", [1, 8, 12, 12]), vi("b", [1, 8, 12, 12])], [vi("y", [1, 16, 12, 12])],
                      [init("w1", rng.standard_normal((16, 8, 3, 3)).astype(np.float32)),
                       init("w2", rng.standard_normal((16, 16, 3, 3)).astype(np.float32))])


@pytest.mark.parametrize("policy", [sepify.Policy(mode="budget", budget=0.7), sepify.Policy(mode="tol", tol=0.6),
                                    sepify.Policy(mode="rank", rank=3)], ids=["budget", "tol", "rank"])
def test_convs_sharing_a_weight_get_one_decision_stored_once(policy):
    model = _siamese()
    plan = sepify.plan(model, policy)
    for w in ("conv1", "conv2"):
        a, b = plan.node(f"a_{w}"), plan.node(f"b_{w}")
        assert (a.action, a.scheme, a.variant, a.rank) == (b.action, b.scheme, b.variant, b.rank)
    assert plan.rewrites
    out, _ = sepify.rewrite(plan)
    readers: dict[str, set[str]] = {}
    for n in out.graph.node:
        for i in n.input[1:2]:
            readers.setdefault(i, set()).add(n.name.split("_")[0])
    factors = [t.name for t in out.graph.initializer if "/sep_" in t.name]
    assert factors and all(readers[f] == {"a", "b"} for f in factors)  # every factor read by both towers
    import onnxruntime as ort

    sess = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    x1, x2 = (np.random.default_rng(s).standard_normal((1, 8, 12, 12)).astype(np.float32) for s in (0, 1))
    y12 = sess.run(None, {"a": x1, "b": x2})[0]
    y21 = sess.run(None, {"a": x2, "b": x1})[0]
    np.testing.assert_allclose(y12, -y21, rtol=0, atol=1e-5)  # f(a, b) = −f(b, a): one function per weight


def test_calibrated_twins_are_solved_together_and_stored_once():
    """Calibration solves the towers' shared weight once, from both towers' activations."""
    import onnxruntime as ort

    from sepify.calibration.calibrate import calibrated_rewrite

    out, rep, cal = calibrated_rewrite(_siamese(), sepify.Policy(mode="budget", budget=0.7), "random", samples=6)
    by = {r.qualified_name: r for r in rep.rewritten}
    assert by, "something is rewritten"
    for name, r in by.items():
        twin = by[("b" if name[0] == "a" else "a") + name[1:]]
        assert (r.scheme, r.rank, r.variant, r.weight_error) == (twin.scheme, twin.rank, twin.variant, twin.weight_error)
    sess = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    x1, x2 = (np.random.default_rng(s).standard_normal((1, 8, 12, 12)).astype(np.float32) for s in (0, 1))
    np.testing.assert_allclose(sess.run(None, {"a": x1, "b": x2})[0], -sess.run(None, {"a": x2, "b": x1})[0],
                               rtol=0, atol=1e-5)


def test_calibration_profiles_twins_once_from_both_towers():
    """One system collects both towers' rows: the twins' curves are one curve, and it differs from
    what either tower alone gives."""
    from sepify.calibration.calibrate import Calibrator
    from sepify.calibration.profiling import reference_pass

    cal = Calibrator(_siamese(), sepify.Policy(mode="budget", budget=0.7), "random", samples=6)
    cal.profile()
    for w in ("conv1", "conv2"):
        a, b = cal.profiles[f"a_{w}"], cal.profiles[f"b_{w}"]
        assert a.curves and {s: c.error for s, c in a.curves.items()} == {s: c.error for s, c in b.curves.items()}
        assert a.probe is b.probe and a.sensitivity is not None and b.sensitivity is not None
    alone = reference_pass(cal.work, cal.layers, cal.calib, rows=cal.rows, seed=cal.seed, schemes=["dw-pw"],
                           targets=type(cal.targets)())
    joint = cal.profiles["a_conv2"].curves["dw-pw"].error
    assert alone["a_conv2"].curves["dw-pw"].error != alone["b_conv2"].curves["dw-pw"].error
    assert joint not in (alone["a_conv2"].curves["dw-pw"].error, alone["b_conv2"].curves["dw-pw"].error)


def test_budget_candidates_on_arrays_are_exactly_the_front_of_every_candidate():
    """The budget walk builds candidates only on each node's Pareto front (numpy, before any object):
    the same members, order and tie-breaks as ``front`` over every candidate, ties included."""
    from types import SimpleNamespace

    from sepify.pipeline.plan import _NodeState, _candidates, _front_candidates

    rng = np.random.default_rng(7)
    for trial in range(200):
        limit = int(rng.integers(50, 400))
        curves = {}
        for name, variant in (("dw-pw", ""), ("spatial", ""), ("spatial", "h"), ("tucker2", "")):
            n = int(rng.integers(0, 30))
            step = int(rng.integers(1, 40))
            macs = list(np.cumsum(rng.integers(0, step + 1, n)) + int(rng.integers(1, 60)))  # repeats: ties
            errs = np.concatenate([[1.0], np.sort(rng.choice([0.0, 0.1, 0.2, 0.3, 0.5, 0.7], n))[::-1]])
            if trial % 3 == 0:
                errs[1:] = rng.choice([0.0, 0.25, 0.5], n)  # not monotone either
            curves[(name, variant)] = (errs, macs)
        st = _NodeState(spec=None, weight=None, geo=SimpleNamespace(macs=limit), tol_exact=0.0, curves=curves)
        schemes = ["dw-pw", "spatial", "tucker2"]
        every = _candidates(st, schemes)
        expected = front(limit, [Option(c.macs, c.error, (c.scheme, c.variant, c.rank), key=c.error) for c in every])
        got = front(limit, [Option(c.macs, c.error, (c.scheme, c.variant, c.rank), key=c.error)
                            for c in _front_candidates(st, schemes)])
        assert [o.payload for o in got] == [o.payload for o in expected]
        kept = {(c.scheme, c.variant, c.rank) for c in _front_candidates(st, schemes)}
        assert kept == {o.payload for o in expected}  # nothing beyond the front is built
