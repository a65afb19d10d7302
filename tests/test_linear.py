"""Linear layers (MatMul / Gemm with a constant 2-D weight) factored by pw-lowrank (``linear=True``).

A linear layer is the 1×1 conv it computes (``sepify.model.cost.linear_spec``): its weight splits
``K → R → N`` like any 1×1 conv's, and the rewrite writes two MatMuls (two Gemms, ``C`` on the
second).  Exactly low-rank weights must come back exact against onnxruntime, for every Gemm
attribute; without ``linear=True`` nothing about them changes.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import sepify
from sepify.cli import main
from sepify.errors import ParameterError
from sepify.pipeline.plan import Policy

from conftest import init, make_model, ort_run, rand, vi


def _low_rank(k: int, n: int, r: int, seed: int, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((k, r)) @ rng.standard_normal((r, n)) / np.sqrt(r)).astype(dtype)


def _close(got: np.ndarray, want: np.ndarray, rel: float = 1e-5) -> None:
    """Float noise relative to the output's scale (elementwise rtol fails on cancellations)."""
    assert got.shape == want.shape
    assert float(np.abs(got.astype(np.float64) - want).max()) <= rel * float(np.abs(want).max())


def _matmul_model(a_shape, k, n, r, dtype=TensorProto.FLOAT, np_dtype=np.float32):
    w = _low_rank(k, n, r, 1, np_dtype)
    return make_model([helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm")], [vi("A", a_shape, dtype)],
                      [vi("Y", [*a_shape[:-1], n], dtype)], [init("W", w)])


def _gemm_model(trans_a: int, trans_b: int, c_shape, alpha=1.0, beta=1.0, m=12, k=40, n=32, r=6):
    w = _low_rank(k, n, r, 2)
    w = w.T.copy() if trans_b else w
    inputs = ["A", "W"] + (["C"] if c_shape is not None else [])
    attrs = {"transA": trans_a, "transB": trans_b, "alpha": alpha, "beta": beta}
    inits = [init("W", w)] + ([init("C", rand(c_shape, 3))] if c_shape is not None else [])
    a_shape = [k, m] if trans_a else [m, k]
    return make_model([helper.make_node("Gemm", inputs, ["Y"], name="gemm", **attrs)], [vi("A", a_shape)],
                      [vi("Y", [m, n])], inits)


def _feeds(model):
    a = model.graph.input[0]
    dims = [d.dim_value for d in a.type.tensor_type.shape.dim]
    dtype = helper.tensor_dtype_to_np_dtype(a.type.tensor_type.elem_type)
    return {"A": rand(dims, 7).astype(dtype)}


@pytest.mark.parametrize("a_shape", [[12, 40], [2, 5, 40], [2, 3, 4, 40]])
def test_matmul_exact_low_rank_is_rewritten_exactly(a_shape):
    model = _matmul_model(a_shape, 40, 32, 6)
    out, report = sepify.rewrite(model, Policy(linear=True))
    (rw,) = report.rewritten
    assert (rw.scheme, rw.rank) == ("pw-lowrank", 6) and rw.weight_error < 1e-6
    assert [n.op_type for n in out.graph.node] == ["MatMul", "MatMul"]
    m = int(np.prod(a_shape[:-1]))
    assert (rw.macs_before, rw.macs_after) == (m * 40 * 32, m * 6 * (40 + 32))
    feeds = _feeds(model)
    _close(ort_run(out, feeds=feeds)["Y"], ort_run(model, feeds=feeds)["Y"])


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape, alpha, beta", [(None, 1.0, 1.0), ([32], 0.5, 2.0), ([12, 32], 1.5, -1.0),
                                                  ([1], 1.0, 0.25)])
def test_gemm_every_attribute_exact(trans_a, trans_b, c_shape, alpha, beta):
    model = _gemm_model(trans_a, trans_b, c_shape, alpha, beta)
    out, report = sepify.rewrite(model, Policy(linear=True))
    (rw,) = report.rewritten
    assert (rw.scheme, rw.rank) == ("pw-lowrank", 6)
    assert [n.op_type for n in out.graph.node] == ["Gemm", "Gemm"]
    feeds = _feeds(model)
    _close(ort_run(out, feeds=feeds)["Y"], ort_run(model, feeds=feeds)["Y"])


def test_fp16_weights_exact_to_half_precision():
    model = _matmul_model([8, 64], 64, 48, 4, TensorProto.FLOAT16, np.float16)
    out, report = sepify.rewrite(model, Policy(linear=True))
    assert [r.rank for r in report.rewritten] == [4]
    feeds = _feeds(model)
    _close(ort_run(out, feeds=feeds)["Y"], ort_run(model, feeds=feeds)["Y"].astype(np.float64), rel=4e-3)


def test_linear_layers_are_left_alone_unless_asked():
    model = _matmul_model([12, 40], 40, 32, 6)
    out, report = sepify.rewrite(model)
    assert out is model and not report.rewritten
    assert [n.op_type for n in sepify.plan(model).nodes] == []
    nodes = sepify.plan(model, Policy(linear=True)).nodes
    assert [(n.op_type, n.action) for n in nodes] == [("MatMul", "rewrite")]


def test_budget_counts_convs_and_linear_layers_together():
    """A conv then a linear head: one budget over both, each rewrite reported with its MACs."""
    rng = np.random.default_rng(5)
    conv_w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["X", "Wc"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Flatten", ["c"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "Wl", "B"], ["Y"], transB=1, name="fc")]
    model = make_model(nodes, [vi("X", [4, 8, 6, 6])], [vi("Y", [4, 50])],
                       [init("Wc", conv_w), init("Wl", rand([50, 16 * 36], 6)), init("B", rand([50], 7))])
    plan = sepify.plan(model, Policy(budget=0.5, linear=True))
    assert {n.op_type for n in plan.nodes} == {"Conv", "Gemm"}
    assert plan.conv_macs == 4 * 36 * 16 * 8 * 9 + 4 * 16 * 36 * 50
    assert plan.conv_macs_after <= 0.5 * plan.conv_macs
    out, report = sepify.rewrite(plan)
    assert report.conv_macs_after == plan.conv_macs_after
    feeds = {"X": rand([4, 8, 6, 6], 8)}
    want, got = ort_run(model, feeds=feeds)["Y"], ort_run(out, feeds=feeds)["Y"]
    errs = {r.qualified_name: r.weight_error for r in report.rewritten}
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2 * max(errs.values()) + 1e-5


@pytest.mark.parametrize("case", ["two data operands", "constant on the left", "integer weight", "3-D weight",
                                  "both constant"])
def test_only_products_with_one_constant_2d_float_weight_are_linear_layers(case):
    w = rand([40, 32], 1)
    if case == "two data operands":  # attention's Q·Kᵀ
        model = make_model([helper.make_node("MatMul", ["A", "B"], ["Y"])], [vi("A", [12, 40]), vi("B", [40, 32])],
                           [vi("Y", [12, 32])])
    elif case == "constant on the left":
        model = make_model([helper.make_node("MatMul", ["W", "A"], ["Y"])], [vi("A", [32, 12])], [vi("Y", [40, 12])],
                           [init("W", w)])
    elif case == "integer weight":
        model = make_model([helper.make_node("MatMul", ["A", "W"], ["Y"])], [vi("A", [12, 40], TensorProto.INT32)],
                           [vi("Y", [12, 32], TensorProto.INT32)], [init("W", np.ones((40, 32), np.int32))])
    elif case == "3-D weight":
        model = make_model([helper.make_node("MatMul", ["A", "W"], ["Y"])], [vi("A", [2, 12, 40])],
                           [vi("Y", [2, 12, 32])], [init("W", np.stack([w, w]))])
    else:
        model = make_model([helper.make_node("MatMul", ["V", "W"], ["P"]), helper.make_node("Add", ["A", "P"], ["Y"])],
                           [vi("A", [12, 32])], [vi("Y", [12, 32])], [init("V", rand([12, 40], 2)), init("W", w)])
    assert sepify.plan(model, Policy(linear=True)).nodes == []


def test_linear_refusals(tmp_path, capfd):
    model = _matmul_model([12, 40], 40, 32, 6)
    with pytest.raises(ParameterError, match="only_faster"):
        sepify.rewrite(model, Policy(budget=0.5, linear=True), only_faster=True)
    with pytest.raises(ParameterError, match="only_faster"):
        sepify.calibrate(model, Policy(budget=0.5, linear=True), "random", only_faster=True)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    for extra in (["--only-faster"], ["--calibrate", "random", "--only-faster"]):
        capfd.readouterr()
        assert main(["rewrite", str(path), "-o", str(tmp_path / "o.onnx"), "--linear", "--budget", "0.5", *extra]) == 2, extra
        out, err = capfd.readouterr()
        assert out == "" and err.startswith("sepify: error: --linear") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()
    assert main(["rewrite", str(path), "-o", str(tmp_path / "o.onnx"), "--linear", "--verify"]) == 0
    assert "conv and linear MACs" in capfd.readouterr().out


def test_linear_layers_in_the_latency_table(tmp_path, monkeypatch):
    """Under latency cost a linear layer is timed as itself — its product against the two thinner
    ones ``pw-lowrank`` writes — in the table (keys ``linear|…``), and plans pick from those times."""
    from sepify.pipeline.lut import Linear, linear_chain_model, linear_model

    monkeypatch.setenv("SEPIFY_CACHE", str(tmp_path))
    lin = Linear("Gemm", (40, 12), 32, trans_a=True, bias=True)
    original = linear_model(lin)
    chain = linear_chain_model(original, lin, "pw-lowrank", "", 4)
    assert [n.op_type for n in chain.graph.node] == ["Gemm", "Gemm"]
    feeds = {"x": rand([40, 12], 3)}
    assert ort_run(chain, feeds=feeds)["c"].shape == ort_run(original, feeds=feeds)["c"].shape == (12, 32)

    model = _matmul_model([64, 256], 256, 256, 8)
    plan = sepify.plan(model, Policy(tol=0.01, linear=True, cost="latency", threads=1))
    (node,) = plan.nodes
    assert node.op_type == "MatMul" and node.latency_us and node.latency_us > 0
    table = json.loads(next(tmp_path.glob("latency/*.json")).read_text())
    (key,) = [k for k in table["entries"] if k.startswith("linear|MatMul|a64x256|n256|")]
    candidates = table["entries"][key]["candidates"]
    assert candidates
    if node.action == "rewrite":
        # Every split from the exact rank 8 up meets tol: the plan takes whichever of them was timed
        # fastest (ranks 8 and 16 are within a microsecond here, so either may win a run).
        exact = {int(k.split("|")[2]): t for k, t in candidates.items() if int(k.split("|")[2]) >= 8}
        assert node.rank in exact and node.latency_us_after == min(exact.values()) < node.latency_us


# ----------------------------------------------------------------------------------------------
# Calibrated linear layers: calibration runs them as 1×1 convs in a working copy
# ----------------------------------------------------------------------------------------------
def _token_model():
    """Tokens ``[1, 36, 16]`` → MatMul (``[16, 64]``) → Relu → a Gemm head with transA, alpha, beta
    and C; both weights low rank plus a little noise (what a budget wants to cut)."""
    rng = np.random.default_rng(11)
    wm = _low_rank(16, 64, 4, 2) + 0.05 * rng.standard_normal((16, 64)).astype(np.float32)
    wg = (_low_rank(36 * 64, 10, 3, 3) + 0.05 * rng.standard_normal((36 * 64, 10))).astype(np.float32) / 30
    nodes = [helper.make_node("MatMul", ["X", "Wm"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["h2"]),
             helper.make_node("Reshape", ["h2", "s2"], ["flat"]),
             helper.make_node("Transpose", ["flat"], ["flatT"], perm=[1, 0]),
             helper.make_node("Gemm", ["flatT", "Wg", "Cg"], ["Y"], transA=1, alpha=0.7, beta=1.3, name="head")]
    inits = [init("Wm", wm), init("s2", np.array([1, 36 * 64], np.int64)), init("Wg", wg), init("Cg", rand([10], 4))]
    return make_model(nodes, [vi("X", [1, 36, 16])], [vi("Y", [1, 10])], inits)


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("c_shape, alpha, beta", [(None, 1.0, 1.0), ([32], 0.5, 2.0), ([12, 32], 1.0, 1.0)])
def test_working_copy_computes_the_same_function(trans_a, c_shape, alpha, beta):
    from sepify.calibration.linear import as_convs
    from sepify.pipeline.analysis import analyze_model

    for model in (_gemm_model(trans_a, 1, c_shape, alpha, beta), _matmul_model([2, 5, 40], 40, 32, 6)):
        an = analyze_model(model)
        specs = an.linear_specs()
        work = as_convs(model, specs, {s.ref.qualified_name: an.table.get(s.x_name) for s in specs})
        onnx.checker.check_model(work)
        assert [n.name for n in work.graph.node if n.op_type == "Conv"] == [s.ref.name for s in specs]
        feeds = _feeds(model)
        _close(ort_run(work, feeds=feeds)["Y"], ort_run(model, feeds=feeds)["Y"])


def test_calibrated_linear_layers_are_written_back_as_linear_layers():
    model = _token_model()
    out, report, cal = sepify.calibrated_rewrite(model, Policy(budget=0.35, linear=True), "random", samples=16)
    ops = {r.qualified_name: r for r in report.rewritten}
    assert set(ops) == {"mm", "head"} and all(r.source == "calibrated" for r in ops.values())
    assert "Conv" not in [n.op_type for n in out.graph.node]
    for name in ops:
        chain = [n.op_type for n in out.graph.node if n.name.startswith(name + "/sep_")]
        assert chain == ([2 * ["MatMul"], 2 * ["Gemm"]][name == "head"] + ["Add"]), chain  # the fitted bias
    assert [o.name for o in out.graph.output] == ["Y"] and [i.name for i in out.graph.input] == ["X"]
    assert cal.drift <= cal.drift_weight_only + 1e-9
    # on samples the calibration did not see, the calibrated rewrite stays closer than the weight-only one
    weight_only, _ = sepify.rewrite(model, Policy(budget=report.macs_ratio, linear=True))
    feeds = {"X": rand([8, 36, 16], 9).reshape(8, 1, 36, 16)}
    err = {}
    for tag, m in (("calibrated", out), ("weight-only", weight_only)):
        got = np.stack([ort_run(m, feeds={"X": x})["Y"] for x in feeds["X"]])
        want = np.stack([ort_run(model, feeds={"X": x})["Y"] for x in feeds["X"]])
        err[tag] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert err["calibrated"] < err["weight-only"], err


def test_audit_counts_the_macs_linear_layers_hold():
    """The audit names the Gemm/MatMul MACs ``--linear`` could factor (weights read by dims only):
    a constant 2-D float weight, not a product of two data tensors."""
    nodes = [helper.make_node("MatMul", ["A", "W"], ["h"], name="mm"),
             helper.make_node("MatMul", ["h", "B"], ["Y"], name="data_product")]
    model = make_model(nodes, [vi("A", [12, 40]), vi("B", [32, 5])], [vi("Y", [12, 5])], [init("W", rand([40, 32], 1))])
    t = sepify.audit(model).totals
    assert t.matmul_macs == 12 * 40 * 32 + 12 * 32 * 5 and t.linear_macs == 12 * 40 * 32
    assert t.linear_macs == sepify.plan(model, Policy(linear=True)).conv_macs


def test_calibrated_linear_layers_under_latency_cost(tmp_path):
    """With calibration and latency cost, a linear layer is costed as the MatMul / Gemm it stays in the
    written model (its ``linear|…`` entry of the table), not as the 1×1 conv calibration runs it as:
    a synthetic table where every rank of the head saves nothing leaves the head alone, and the
    MatMul is rewritten at a rank whose chain the table says is faster."""
    from sepify.core.geometry import prod
    from sepify.pipeline.analysis import analyze_model
    from sepify.pipeline.lut import LatencyCosts, LatencyTable, candidate_key, grid_candidates, ort_version

    model = _token_model()
    an = analyze_model(model)
    table = LatencyTable({"cpu": "a CPU elsewhere", "onnxruntime": ort_version(), "threads": 1})
    costs = LatencyCosts(an, 1, table, linear=True)
    for spec in an.linear_specs():
        geo = spec.geometry()
        per_rank = prod(geo.out_spatial) * (geo.c_in + geo.c_out) * 1e-3
        orig = prod(geo.out_spatial) * geo.c_in * geo.c_out * 1e-3
        slow = spec.ref.name == "head"  # the head's chains all cost more than the product itself
        cands = {candidate_key(s, v, r): (orig * 1.5 if slow else per_rank * r)
                 for s, v, r in grid_candidates(geo, ["pw-lowrank"])}
        assert cands, spec.ref.name
        table.put(costs.key(spec), orig, cands, 10)
    path = tmp_path / "lut.json"
    table.save(path)
    out, report, cal = sepify.calibrated_rewrite(model, Policy(budget=0.7, linear=True, cost="latency", threads=1,
                                                               latency_table=str(path)), "random", samples=8)
    (rz,) = report.rewritten
    assert rz.qualified_name == "mm" and rz.source == "calibrated" and rz.rank < 16
    assert [n.op_type for n in out.graph.node if n.name.startswith("mm/sep_")] == ["MatMul", "MatMul", "Add"]
    assert "Conv" not in [n.op_type for n in out.graph.node]
    # the prediction adds the table's linear entries (a foreign table has no conv entry for them at all)
    us = {s.ref.name: table.original(costs.key(s)) for s in an.linear_specs()}
    mm = next(s for s in an.linear_specs() if s.ref.name == "mm")
    chain = table.candidate(costs.key(mm), candidate_key("pw-lowrank", "", rz.rank))
    assert cal.prediction["conv_us"] == pytest.approx(us["mm"] + us["head"])
    assert cal.prediction["conv_us_after"] == pytest.approx(us["head"] + chain)
