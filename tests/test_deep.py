"""Deep graphs: every walk over the graph is iterative, so depth never exhausts Python's recursion limit.

Regression: a pretrained NHWC ResNet-50 crashed the audit with RecursionError — constant
resolution recursed once per producer once a MatMul operand had no inferred shape.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from onnx import TensorProto, helper

import sepify
from conftest import init, make_model, vi


@pytest.fixture
def low_recursion_limit():
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)  # Python's default: what a user's process has
    yield
    sys.setrecursionlimit(old)


def conv_chain(n: int, c: int = 2, hw: int = 6) -> "onnx.ModelProto":  # noqa: F821
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(n):
        if i % 2 == 0:  # rank 1 per output channel: a lossless rewrite applies
            w = rng.standard_normal((c, c, 1, 1)) * rng.standard_normal((c, 1, 3, 3))
        else:
            w = rng.standard_normal((c, c, 3, 3))
        inits.append(init(f"w{i}", w.astype(np.float32)))
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        prev = f"r{i}"
    return make_model(nodes, [vi("x", [1, c, hw, hw])], [vi(prev, [1, c, hw, hw])], inits)


def test_a_chain_of_1500_convs_audits_and_rewrites(low_recursion_limit):
    model = conv_chain(1500)
    report = sepify.audit(model)
    assert report.totals.conv_nodes == 1500 and report.totals.unknown_cost_nodes == 0
    out, rep = sepify.rewrite(model)
    assert len(rep.rewritten) == 750 and rep.macs_ratio < 1
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]


def test_10000_elementwise_nodes_before_a_matmul_with_no_inferred_operand_shape(low_recursion_limit):
    """Compress leaves the MatMul operand's shape to run time: its constness is resolved through
    every Add back to the input (that walk used to recurse), then onnxruntime sizes it."""
    nodes, prev = [], "x"
    for i in range(10000):
        nodes.append(helper.make_node("Add", [prev, "one"], [f"a{i}"], name=f"add{i}"))
        prev = f"a{i}"
    nodes += [helper.make_node("Compress", [prev, "keep"], ["rows"], name="compress", axis=0),
              helper.make_node("MatMul", ["rows", "w"], ["y"], name="mm")]
    model = make_model(nodes, [vi("x", [3, 16]), vi("keep", [3], TensorProto.BOOL)], [vi("y", ["n", 4])],
                       [init("one", np.ones(1, np.float32)), init("w", np.ones((16, 4), np.float32))])
    report = sepify.audit(model, input_values={"keep": [1, 1, 1]})
    assert report.totals.matmul_macs == 3 * 16 * 4
