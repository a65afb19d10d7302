"""ONNX's own Conv node test cases, rewritten with the spatial scheme, against their expected outputs.

Each case of ``onnx.backend.test.case.node.collect_testcases("Conv")`` is a one-node model with
``x`` and ``W`` as graph inputs plus data sets of (inputs, expected outputs).  The weight is frozen
into an initializer (so that sepify may rewrite it), ``ir_version`` is clamped to 10, and the model
is rewritten with ``Policy(scheme="spatial")``.  Their kernels are all ones (rank 1), so a spatial
split is exact whenever it is 2-D with both kernel dims ≥ 2 and it saves MACs; otherwise the
reason must be reported and the model returned unchanged.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import sepify
from sepify import Policy

from test_rewrite import ConvGeo, attr, session, spatial_order_macs


def _collect():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from onnx.backend.test.case.node import collect_testcases

        return [c for c in collect_testcases("Conv") if c.model.graph.node[0].op_type == "Conv"]


CASES = _collect()

# Hand-computed outcome per known case: (rewritten?, MACs before, MACs after).
# All are C = N = 1, 3×3 kernels of ones, so the split is per-kernel and 1 MAC/tap:
#   original = prod(out)·9;  vertical first = H_out·W_in·3 + H_out·W_out·3;
#   horizontal first = H_in·W_out·3 + H_out·W_out·3.
EXPECTED = {
    # 5×5, pads 1 → 5×5: 225;  V = 5·5·3 + 25·3 = 150
    "test_basic_conv_with_padding": (True, 225, 150),
    # 5×5 → 3×3: 81;  V = 3·5·3 + 9·3 = 72
    "test_basic_conv_without_padding": (True, 81, 72),
    # 7×5, pads 1, s2 → 4×3: 108;  V = 4·5·3 + 12·3 = 96 (H = 7·3·3 + 36 = 99)
    "test_conv_with_strides_padding": (True, 108, 96),
    # 7×5, s2 → 3×2: 54;  V = 3·5·3 + 6·3 = 63, H = 7·2·3 + 18 = 60: no saving
    "test_conv_with_strides_no_padding": (False, 54, 54),
    # 7×5, pads [1,0,1,0], s2 → 4×2: 72;  V = 4·5·3 + 24 = 84, H = 7·2·3 + 24 = 66
    "test_conv_with_strides_and_asymmetric_padding": (True, 72, 66),
    # 5×5 SAME_LOWER s2 → 3×3: 81;  V = 3·5·3 + 27 = 72 = H
    "test_conv_with_autopad_same": (True, 81, 72),
}


def _frozen(case) -> tuple[onnx.ModelProto, list[dict]]:
    """The case's model with input 1 (the weight) as an initializer, plus its data sets as feeds."""
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    node = model.graph.node[0]
    w_name = node.input[1]
    inputs = [i.name for i in model.graph.input]
    w_index = inputs.index(w_name)
    datasets = []
    w_value = None
    for ins, outs in case.data_sets:
        if w_value is None:
            w_value = np.asarray(ins[w_index])
        np.testing.assert_array_equal(ins[w_index], w_value)  # one weight per case
        feeds = {n: np.asarray(v) for n, v in zip(inputs, ins) if n != w_name}
        datasets.append({"feeds": feeds, "expected": [np.asarray(o) for o in outs]})
    del model.graph.input[w_index]
    model.graph.initializer.append(numpy_helper.from_array(w_value, w_name))
    model.ir_version = min(model.ir_version, 10)
    onnx.checker.check_model(model, full_check=True)
    return model, datasets


def test_cases_found():
    names = {c.name for c in CASES}
    assert len(CASES) >= 6
    assert set(EXPECTED) <= names


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_onnx_conv_case_spatial_rewrite(case):
    model, datasets = _frozen(case)
    node = model.graph.node[0]
    w = numpy_helper.to_array(model.graph.initializer[-1])
    kernel = list(w.shape[2:])
    original = model.SerializeToString()

    out, report = sepify.rewrite(model, Policy(scheme="spatial"))

    # Hand MACs of the original conv and of the cheaper split order.
    x_shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    geo = ConvGeo.of(x_shape, w.shape, group=attr(node, "group", 1), strides=attr(node, "strides"),
                     dilations=attr(node, "dilations"), pads=attr(node, "pads"),
                     auto_pad=(attr(node, "auto_pad", b"NOTSET") or b"NOTSET").decode())
    assert report.conv_macs_before == geo.macs
    splittable = len(kernel) == 2 and min(kernel) >= 2
    # ONNX's cases are single-channel (per-kernel split); every kh×kw kernel must be rank 1.
    is_rank1 = splittable and w.shape[1] == 1 and all(np.linalg.matrix_rank(k) == 1 for k in w.reshape(-1, *kernel))
    split_macs = min(spatial_order_macs(geo, 1)) if splittable else None
    saves = splittable and is_rank1 and split_macs < geo.macs

    if case.name in EXPECTED:
        want_rewrite, want_before, want_after = EXPECTED[case.name]
        assert geo.macs == want_before
        assert saves == want_rewrite
        assert report.conv_macs_after == want_after

    if saves:
        assert report.changed
        (r,) = report.rewritten
        assert (r.scheme, r.rank) == ("spatial", 1)
        assert r.macs_before == geo.macs and r.macs_after == split_macs
        assert report.kept == []
        onnx.checker.check_model(out, full_check=True)
        kinds = sorted(tuple(attr(n, "kernel_shape")) for n in out.graph.node if n.op_type == "Conv")
        assert kinds == sorted([(kernel[0], 1), (1, kernel[1])])
        assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input]
        assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    else:
        assert not report.changed and out is model
        assert out.SerializeToString() == original
        (kept,) = report.kept
        assert kept["name"] == (node.name or "Conv_0")
        # (--scheme spatial; a conv no rank of any scheme makes cheaper says no_mac_saving)
        assert kept["reason"] in ("no_exact_saving", "not_2d", "kernel_already_1d", "no_mac_saving")
        if not splittable:
            assert kept["reason"] in ("not_2d", "kernel_already_1d", "no_mac_saving")
        else:
            assert kept["reason"] in ("no_exact_saving", "no_mac_saving")

    # Either way the (possibly rewritten) model reproduces ONNX's expected outputs.
    sess = session(out)
    for ds in datasets:
        got = sess.run(None, ds["feeds"])
        for g, e in zip(got, ds["expected"]):
            assert g.shape == e.shape
            np.testing.assert_allclose(g, e, atol=1e-4, rtol=1e-5)


def test_onnx_cases_auto_scheme_agrees():
    """Under the default (auto) lossless policy the same cases rewrite to the same spatial split:
    dw-pw / pw-dw do not apply to C = N = 1 (depthwise)."""
    for case in CASES:
        model, datasets = _frozen(case)
        out, report = sepify.rewrite(model)
        if case.name in EXPECTED:
            want_rewrite, _, want_after = EXPECTED[case.name]
            assert report.changed == want_rewrite
            assert report.conv_macs_after == want_after
        for r in report.rewritten:
            assert r.scheme == "spatial"
        sess = session(out)
        for ds in datasets:
            for g, e in zip(sess.run(None, ds["feeds"]), ds["expected"]):
                np.testing.assert_allclose(g, e, atol=1e-4, rtol=1e-5)
