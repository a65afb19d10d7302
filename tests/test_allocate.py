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
    """Regression: the 1×1 conv cannot be rewritten, yet its MACs count in the budget's total."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((32, 16, 1, 1)).astype(np.float32)
    w3 = rng.standard_normal((16, 32, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="pw"),
             helper.make_node("Conv", ["h", "w3"], ["y"], name="k3", pads=[1, 1, 1, 1])]
    model = make_model(nodes, [vi("x", [1, 16, 16, 16])], [vi("y", [1, 16, 16, 16])], [init("w1", w1), init("w3", w3)])
    plan = sepify.plan(model, sepify.Policy(mode="budget", budget=0.6))
    assert plan.node("pw").action == "keep" and plan.node("k3").action == "rewrite"
    assert plan.conv_macs_after <= 0.6 * plan.conv_macs + 1e-9 or plan.node("k3").rank == 1


@pytest.mark.parametrize("convex", [False, True])
def test_greedy_is_deterministic_with_ties_in_layer_order(convex):
    layers = {k: (10, [Option(5, 1.0, k)]) for k in ("c", "a", "b")}
    assert list(greedy(layers, target=25, convex=convex).chosen) == ["c"]
