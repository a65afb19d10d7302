"""Calibration: data loading, BatchNorm folding, activations, least squares, allocation (small synthetic models)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from conftest import init, make_model, vi
from sepify.calibration.bnfold import fold_batchnorms
from sepify.calibration.calibrate import calibrate, calibrated_rewrite
from sepify.core.drift import DriftMeter
from sepify.calibration.data import load_calibration
from sepify.calibration.lstsq import (NormalEquations, apply_stage, gather_patches, last_stage_design, pack_last,
                                      positions, rank_curve, rank_inner, solve_ridge_cv, unpack_last)
from sepify.calibration.profiling import LayerProfile, SchemeCurve
from sepify.calibration.solve import waves
from sepify.core.allocate import greedy
from sepify.core.schemes import get as get_scheme
from sepify.core.stages import compose
from sepify.errors import UsageError
from sepify.core.geometry import ConvGeometry, conv_out_spatial, explicit_pads
from sepify.pipeline.plan import Policy


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def conv_model(w: np.ndarray, x_shape, b=None, **attrs) -> onnx.ModelProto:
    ins = ["x", "w"] + (["b"] if b is not None else [])
    inits = [init("w", w)] + ([init("b", b)] if b is not None else [])
    node = helper.make_node("Conv", ins, ["y"], name="conv", **attrs)
    return make_model([node], [vi("x", x_shape)], [vi("y", None)], inits, check=False)


def geometry(w, x_shape, strides=(1, 1), dilations=(1, 1), pads=(0, 0, 0, 0), group=1) -> ConvGeometry:
    k = tuple(w.shape[2:])
    pads = tuple(explicit_pads(x_shape[2:], k, strides, dilations, list(pads), "NOTSET"))
    out = tuple(conv_out_spatial(x_shape[2:], k, strides, dilations, pads))
    return ConvGeometry(x_shape[0], x_shape[1], w.shape[0], group, k, tuple(x_shape[2:]), out, tuple(strides),
                        tuple(dilations), pads)


GEOMETRIES = [
    dict(strides=(1, 1), dilations=(1, 1), pads=(1, 1, 1, 1)),
    dict(strides=(2, 1), dilations=(1, 2), pads=(0, 2, 1, 1)),
    dict(strides=(1, 2), dilations=(2, 1), pads=(2, 0, 0, 1)),
]


# ----------------------------------------------------------------------------------------------
# Patches and stages against onnxruntime
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attrs", GEOMETRIES)
def test_patches_reproduce_the_conv(attrs):
    rng = np.random.default_rng(0)
    x_shape = [2, 4, 9, 8]
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    x = rng.standard_normal(x_shape).astype(np.float32)
    geo = geometry(w, x_shape, **attrs)
    (y,) = run(conv_model(w, x_shape, strides=list(attrs["strides"]), dilations=list(attrs["dilations"]),
                          pads=list(attrs["pads"])), {"x": x})
    assert y.shape[2:] == geo.out_spatial
    n_out = int(np.prod(geo.out_spatial))
    pos = np.concatenate([positions(0, 0, 0, n_out, 7), positions(0, 0, 1, n_out, 5)])
    bidx = np.array([0] * 7 + [1] * 5)
    patches = gather_patches(x, geo, bidx, pos)
    got = np.einsum("rcij,ncij->rn", patches.astype(np.float64), w.astype(np.float64))
    want = y.reshape(2, 6, -1)[bidx, :, pos]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", ["dw-pw", "pw-dw", "spatial"])
@pytest.mark.parametrize("attrs", GEOMETRIES)
def test_stage_chain_on_patches_equals_composed_weight(scheme, attrs):
    """Prefix stages + last stage applied to patches = the dense weight the chain composes."""
    rng = np.random.default_rng(1)
    x_shape = [1, 4, 9, 8]
    w = rng.standard_normal((6, 4, 3, 3))
    geo = geometry(w, x_shape, **attrs)
    stages = get_scheme(scheme).factor(w, geo, 2)
    x = rng.standard_normal(x_shape)
    pos = np.arange(int(np.prod(geo.out_spatial)))
    patches = gather_patches(x, geo, np.zeros(len(pos), int), pos)
    z = patches
    for st in stages:
        z = apply_stage(z, st)
    got = z.reshape(len(pos), -1)
    want = np.einsum("rcij,ncij->rn", patches, compose(stages, geo))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# Least squares
# ----------------------------------------------------------------------------------------------
def _exact_low_rank(scheme, rank, geo, rng):
    w = rng.standard_normal((geo.c_out, geo.c_in, *geo.kernel))
    return compose(get_scheme(scheme).factor(w, geo, rank), geo)


@pytest.mark.parametrize("scheme", ["dw-pw", "pw-dw", "spatial"])
@pytest.mark.parametrize("attrs", GEOMETRIES[:2])
def test_least_squares_reproduces_exact_low_rank_weights(scheme, attrs):
    """Targets from an exactly rank-r weight: the solve recovers it even from a zero prior."""
    rng = np.random.default_rng(2)
    x_shape = [4, 5, 10, 9]
    geo = geometry(np.zeros((6, 5, 3, 3)), x_shape, **attrs)
    w = _exact_low_rank(scheme, 2, geo, rng)
    bias = rng.standard_normal(6)
    x = rng.standard_normal(x_shape)
    stages = get_scheme(scheme).factor(w, geo, 2)
    last = stages[-1]
    eq = NormalEquations(last.group, last.in_per_group * int(np.prod(last.kernel)), last.out_channels // last.group)
    n_out = int(np.prod(geo.out_spatial))
    for s in range(4):
        pos = np.arange(n_out)
        patches = gather_patches(x, geo, np.full(n_out, s), pos)
        y = np.einsum("rcij,ncij->rn", patches, w) + bias
        z = last_stage_design(patches, stages)
        eq.add(s % 2, z, y.reshape(len(pos), last.group, -1).transpose(1, 0, 2))
    x0 = np.zeros_like(pack_last(stages, bias))
    sol, lam, err = solve_ridge_cv(eq, x0, grid=(1e-9,))
    new, b = unpack_last(stages, sol)
    assert np.linalg.norm(compose(new, geo) - w) / np.linalg.norm(w) < 1e-5
    np.testing.assert_allclose(b, bias, atol=1e-5)
    assert err < 1e-5
    # The weight-only SVD factors are the prior: an exact prior is kept exactly at any ridge.
    sol0, _, _ = solve_ridge_cv(eq, pack_last(stages, bias), grid=(1.0,))
    new0, b0 = unpack_last(stages, sol0)
    assert np.linalg.norm(compose(new0, geo) - w) / np.linalg.norm(w) < 1e-7


@pytest.mark.parametrize("triangular", [False, True])
@pytest.mark.parametrize("scheme", ["dw-pw", "pw-dw", "spatial"])
def test_rank_curve_matches_per_rank_solves(scheme, triangular, monkeypatch):
    """The nested (one Cholesky per fold) curve equals solving each truncated chain on its own
    (``triangular``: through the LAPACK triangular inverse that wide layers take)."""
    from sepify.calibration import lstsq

    monkeypatch.setattr(lstsq, "TRIANGULAR_MIN", 1 if triangular else 10 ** 9)
    monkeypatch.setattr(lstsq, "ONE_WAY_MIN", 10 ** 9)
    rng = np.random.default_rng(3)
    x_shape = [4, 6, 8, 8]
    geo = geometry(np.zeros((8, 6, 3, 3)), x_shape, pads=(1, 1, 1, 1))
    w = rng.standard_normal((8, 6, 3, 3))
    x = rng.standard_normal(x_shape) * np.linspace(3, 0.1, 6)[None, :, None, None]
    r_max = 4
    big = get_scheme(scheme).factor(w, geo, r_max)
    eqs = {}
    for r in (1, 2, 4):
        st = get_scheme(scheme).truncate(big, geo, r_max, r) if r < r_max else big
        np.testing.assert_allclose(compose(st, geo), compose(get_scheme(scheme).factor(w, geo, r), geo), atol=1e-9)
        last = st[-1]
        eqs[r] = (st, NormalEquations(last.group, last.in_per_group * int(np.prod(last.kernel)),
                                      last.out_channels // last.group))
    n_out = int(np.prod(geo.out_spatial))
    for s in range(4):
        patches = gather_patches(x, geo, np.full(n_out, s), np.arange(n_out))
        y = np.einsum("rcij,ncij->rn", patches, w)
        for st, eq in [*eqs.values(), (big, None)]:
            if eq is None:
                continue
            eq.add(s % 2, last_stage_design(patches, st), y.reshape(n_out, st[-1].group, -1).transpose(1, 0, 2))
    eq_big = eqs[4][1]
    errs, base = rank_curve(eq_big, pack_last(big, np.zeros(8)), rank_inner(big, r_max), [1, 2, 4], lam=1e-3)
    for i, r in enumerate((1, 2, 4)):
        st, eq = eqs[r]
        x0 = pack_last(st, np.zeros(8))
        from sepify.calibration.lstsq import ridge_solve, sq_error

        eq.flush()
        e = sum(sq_error(ridge_solve(eq.A[f], eq.B[f], x0, 1e-3), eq.A[1 - f], eq.B[1 - f], eq.yy[1 - f]) for f in (0, 1))
        assert errs[i] == pytest.approx(np.sqrt(e / eq.yy.sum()), rel=1e-6)
        e0 = sq_error(x0, eq.A.sum(0), eq.B.sum(0), eq.yy.sum(0))
        assert base[i] == pytest.approx(np.sqrt(e0 / eq.yy.sum()), rel=1e-6)
    assert errs[0] >= errs[1] >= errs[2] - 1e-9


def test_wide_rank_curves_validate_one_way(monkeypatch):
    """From ONE_WAY_MIN unknowns a curve fits fold 0 and measures fold 1 only."""
    from sepify.calibration import lstsq

    rng = np.random.default_rng(5)
    d, outs = 6, 3
    eq = NormalEquations(1, d, outs)
    for f in (0, 1):
        z = rng.standard_normal((1, 50, d))
        eq.add(f, z, z @ rng.standard_normal((d, outs)) + 0.1 * rng.standard_normal((1, 50, outs)))
    x0 = np.zeros((1, d + 1, outs))
    inner = np.append(np.arange(d), 0)
    monkeypatch.setattr(lstsq, "ONE_WAY_MIN", 1)
    errs, _ = rank_curve(eq, x0, inner, [2, 6], lam=1e-3)
    from sepify.calibration.lstsq import ridge_solve, sq_error

    order = np.concatenate([[d], np.arange(d)])  # bias first, as rank_curve orders the unknowns
    a, b = eq.A[:, :, order[:, None], order[None, :]], eq.B[:, :, order, :]
    for e, k in zip(errs, (3, 7)):
        x = ridge_solve(a[0][:, :k, :k], b[0][:, :k], x0[:, order][:, :k], 1e-3)
        want = sq_error(x, a[1][:, :k, :k], b[1][:, :k], eq.yy[1])
        assert e == pytest.approx(np.sqrt(want / eq.yy[1].sum()), rel=1e-6)


@pytest.mark.parametrize("n", [10, 120])
def test_ridge_solve_small_and_wide(n):
    """Batched LU below TRIANGULAR_MIN unknowns, Cholesky per group from there: the same solution."""
    from sepify.calibration.lstsq import ridge_solve

    rng = np.random.default_rng(n)
    z = rng.standard_normal((2, 3 * n, n))
    a, b, x0 = z.transpose(0, 2, 1) @ z, rng.standard_normal((2, n, 4)), rng.standard_normal((2, n, 4))
    diag = np.diagonal(a, axis1=1, axis2=2)
    d = 1e-3 * (diag + 1e-9 * diag.mean(axis=1, keepdims=True))
    want = np.linalg.solve(a + d[:, :, None] * np.eye(n), b + d[:, :, None] * x0)
    np.testing.assert_allclose(ridge_solve(a, b, x0, 1e-3), want, rtol=1e-8, atol=1e-10)


def test_cholesky_inverse_factor_both_ways():
    from sepify.calibration.lstsq import TRIANGULAR_MIN, cholesky_inverse_factor

    rng = np.random.default_rng(0)
    for n in (5, TRIANGULAR_MIN + 10):
        z = rng.standard_normal((3, 2 * n, n))
        a = z.transpose(0, 2, 1) @ z + np.eye(n)
        li = cholesky_inverse_factor(a)
        np.testing.assert_allclose(np.tril(li), li, atol=1e-12)
        np.testing.assert_allclose(li.transpose(0, 2, 1) @ li, np.linalg.inv(a), rtol=1e-8, atol=1e-10)
    with pytest.raises(np.linalg.LinAlgError):
        cholesky_inverse_factor(-np.eye(TRIANGULAR_MIN + 1)[None])


# ----------------------------------------------------------------------------------------------
# Synthetic network with anisotropic activations
# ----------------------------------------------------------------------------------------------
MIX = np.random.default_rng(123).standard_normal((8, 8)) * np.array([3, 1, .3, .1, .03, .01, .01, .01])


def anisotropic(n: int, seed: int) -> np.ndarray:
    """Inputs whose channels live mostly in a 2-D subspace, spatially smooth."""
    lat = np.random.default_rng(seed).standard_normal((n, 8, 12, 12))
    lat = (lat + np.roll(lat, 1, 2) + np.roll(lat, 1, 3) + np.roll(lat, (1, 1), (2, 3))) / 2
    return np.einsum("ij,njhw->nihw", MIX, lat).astype(np.float32)


def net(batch=1, bn=True, spatial=(12, 12)) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [init("w1", rng.standard_normal((16, 8, 3, 3)).astype(np.float32) / 8),
             init("b1", rng.standard_normal(16).astype(np.float32) * .1),
             init("w2", rng.standard_normal((16, 16, 3, 3)).astype(np.float32) / 12),
             init("w3", rng.standard_normal((8, 16, 3, 3)).astype(np.float32) / 12)]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1])]
    last = "c2"
    if bn:
        nodes.append(helper.make_node("BatchNormalization", ["c2", "g", "be", "m", "v"], ["n2"], name="bn2", epsilon=1e-3))
        inits += [init("g", rng.uniform(.5, 2, 16).astype(np.float32)), init("be", rng.standard_normal(16).astype(np.float32)),
                  init("m", rng.standard_normal(16).astype(np.float32)), init("v", rng.uniform(.5, 2, 16).astype(np.float32))]
        last = "n2"
    nodes += [helper.make_node("Relu", [last], ["r2"], name="relu2"),
              helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3", pads=[1, 1, 1, 1])]
    return make_model(nodes, [vi("x", [batch, 8, *spatial])], [vi("y", [batch, 8, *spatial])], inits)


def held_out_drift(original, rewritten, x) -> float:
    outs_a = [run(original, {"x": x[i:i + 1]}) for i in range(len(x))]
    outs_b = [run(rewritten, {"x": x[i:i + 1]}) for i in range(len(x))]
    return DriftMeter(outs_a, "cosine").drift(outs_b)


def test_calibration_beats_weight_only_on_anisotropic_activations():
    from sepify.pipeline.rewrite import rewrite

    m = net()
    policy = Policy(mode="rank", rank=2, scheme="dw-pw")
    out, report, cal = calibrated_rewrite(m, policy, {"x": anisotropic(16, 1)})
    weight_only, wrep = rewrite(m, policy)
    assert report.macs_ratio == pytest.approx(wrep.macs_ratio)
    held = anisotropic(6, 99)
    d_cal, d_w = held_out_drift(m, out, held), held_out_drift(m, weight_only, held)
    assert d_cal < 0.5 * d_w
    assert cal.drift < cal.drift_weight_only
    for layer in cal.layers:
        assert layer.output_error < layer.output_error_svd
    assert [l.wave for l in cal.layers] == [0, 1, 2]  # a chain: one layer per wave
    assert cal.folded_batchnorms == [{"conv": "conv2", "bn": "bn2"}]
    assert not any(n.op_type == "BatchNormalization" for n in out.graph.node)
    onnx.checker.check_model(out, full_check=True)


def test_budget_allocation_uses_sensitivities_and_meets_the_budget():
    m = net()
    out, report, cal = calibrated_rewrite(m, Policy(mode="budget", budget=0.5), {"x": anisotropic(8, 1)})
    assert cal.allocation == "sensitivity"
    assert report.macs_ratio <= 0.5 + 1e-9 or len(report.rewritten) == 3
    assert all(l.sensitivity is not None for l in cal.layers)
    assert cal.predicted_drift is not None and cal.drift is not None
    assert cal.drift <= cal.drift_weight_only


def test_max_drift_bounds_the_measured_drift():
    m = net()
    res = calibrate(m, Policy(), {"x": anisotropic(8, 1)}, max_drift=0.02)
    assert res.report.drift <= 0.02 or res.report.notes
    assert res.report.conv_macs_after < res.report.conv_macs_before  # something was worth rewriting
    tight = calibrate(m, Policy(), {"x": anisotropic(8, 1)}, max_drift=0.0)
    assert tight.report.conv_macs_after == tight.report.conv_macs_before


def test_sensitivity_allocation_needs_a_budget_or_a_drift_bound():
    with pytest.raises(UsageError, match="needs a budget or a max_drift"):
        calibrate(net(), Policy(mode="tol", tol=0.5), {"x": anisotropic(2, 1)}, allocation="sensitivity")
    res = calibrate(net(), Policy(mode="tol", tol=0.5), {"x": anisotropic(4, 1)})  # auto: the plan's ranks
    assert res.report.allocation == "plan"


def test_exact_layers_stay_exact():
    """A weight that is exactly rank 1 is written with its SVD factors, untouched by the solve."""
    rng = np.random.default_rng(5)
    x_shape = [1, 4, 10, 10]
    geo = geometry(np.zeros((6, 4, 3, 3)), x_shape, pads=(1, 1, 1, 1))
    w = _exact_low_rank("dw-pw", 1, geo, rng).astype(np.float32)
    m = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
                   [vi("x", x_shape)], [vi("y", [1, 6, 10, 10])], [init("w", w)])
    out, report, cal = calibrated_rewrite(m, Policy(), "random")
    assert cal.layers[0].exact and cal.layers[0].ridge is None
    assert report.rewritten[0].weight_error <= 2.4e-7
    x = rng.standard_normal(x_shape).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})[0], run(m, {"x": x})[0], atol=1e-4)


@pytest.mark.parametrize("bn", [True, False])
def test_calibrated_report_names_the_input_model(tmp_path, bn):
    """The calibrated plan is made on a derived ModelProto (BatchNorms folded, calibrated weights),
    which used to label the plan, the rewrite report (``model`` in --report JSON) and the printed
    plan title "<ModelProto>" instead of the user's file."""
    path = tmp_path / "net.onnx"
    onnx.save(net(bn=bn), path)
    out, report, cal = calibrated_rewrite(str(path), Policy(mode="budget", budget=0.6), "random", samples=4)
    assert report.rewritten and report.model == str(path) and cal.model == str(path)
    assert json.loads(report.to_json())["model"] == str(path)


def test_float16_layers_get_no_rounding_note():
    """The chain is stored in float16, so it differs from the calibrated float64 weight by ~3e-4 from
    rounding alone; the note meant for unexpected differences (threshold 1e-4) fired on every float16
    layer.  The threshold is now the dtype's exactness bound (2·eps, 2e-3 for float16)."""
    w = np.random.default_rng(6).standard_normal((32, 16, 3, 3)).astype(np.float16)
    m = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
                   [vi("x", [1, 16, 12, 12], onnx.TensorProto.FLOAT16)],
                   [vi("y", [1, 32, 12, 12], onnx.TensorProto.FLOAT16)], [init("w", w)])
    out, report, cal = calibrated_rewrite(m, Policy(mode="rank", rank=2), "random", samples=4)
    assert [r.qualified_name for r in report.rewritten] == ["conv"]
    assert not [n for n in cal.notes if "differs from the calibrated weight" in n], cal.notes


# ----------------------------------------------------------------------------------------------
# BatchNorm folding
# ----------------------------------------------------------------------------------------------
def test_batchnorm_folding_is_exact_and_only_for_sole_readers():
    m = net()
    folded, pairs = fold_batchnorms(m)
    assert pairs == [{"conv": "conv2", "bn": "bn2"}]
    assert [n.op_type for n in folded.graph.node].count("BatchNormalization") == 0
    conv2 = next(n for n in folded.graph.node if n.name == "conv2")
    assert conv2.output[0] == "n2" and len(conv2.input) == 3  # a bias was added
    assert not {"g", "be", "m", "v", "w2"} & {t.name for t in folded.graph.initializer}
    onnx.checker.check_model(folded, full_check=True)
    x = anisotropic(1, 3)
    np.testing.assert_allclose(run(folded, {"x": x})[0], run(m, {"x": x})[0], rtol=1e-5, atol=1e-5)
    assert m.graph.node[3].op_type == "BatchNormalization"  # the input is not modified

    # The conv output read by something else as well: no fold.
    m2 = net()
    m2.graph.node.append(helper.make_node("Identity", ["c2"], ["c2_copy"], name="tap"))
    m2.graph.output.append(vi("c2_copy", [1, 16, 12, 12]))
    assert fold_batchnorms(m2)[1] == []


# ----------------------------------------------------------------------------------------------
# Data loading and batching
# ----------------------------------------------------------------------------------------------
def test_npz_with_a_sample_axis(tmp_path):
    x = anisotropic(5, 0)
    np.savez(tmp_path / "c.npz", x=x[:, None])  # [S, 1, 8, 12, 12]
    cs = load_calibration(tmp_path / "c.npz", net())
    assert cs.samples == 5 and len(cs.feeds) == 5 and cs.feeds[0]["x"].shape == (1, 8, 12, 12)


def test_batch_one_model_gets_one_sample_per_run(tmp_path):
    np.savez(tmp_path / "c.npz", x=anisotropic(3, 0))  # samples stacked on the batch axis
    cs = load_calibration(tmp_path / "c.npz", net(batch=1))
    assert cs.per_run == [1, 1, 1]


def test_symbolic_batch_takes_several_samples_per_run(tmp_path):
    np.savez(tmp_path / "c.npz", x=anisotropic(11, 0))
    cs = load_calibration(tmp_path / "c.npz", net(batch="N"), batch=4)
    assert cs.per_run == [4, 4, 3] and cs.samples == 11 and cs.stack_axis
    res = calibrate(net(batch="N"), Policy(mode="rank", rank=2), cs)
    assert res.report.samples == 11 and res.report.drift < res.report.drift_weight_only


def test_folder_of_npy_and_npz(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    x = anisotropic(6, 0)
    np.save(folder / "x.npy", x[:2])
    np.savez(folder / "more.npz", x=x[2:6])
    cs = load_calibration(folder, net())
    assert cs.samples == 6
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in cs.feeds]), np.concatenate([x[2:6], x[:2]]))
    # A single-input model takes any .npy name.
    other = tmp_path / "imgs"
    other.mkdir()
    np.save(other / "a.npy", x[:1])
    np.save(other / "b.npy", x[1:3])
    assert load_calibration(other, net()).samples == 3


def test_bad_calibration_data(tmp_path):
    np.savez(tmp_path / "wrong.npz", y=anisotropic(2, 0))
    with pytest.raises(UsageError, match="no array for input"):
        load_calibration(tmp_path / "wrong.npz", net())
    np.savez(tmp_path / "shape.npz", x=np.zeros((2, 1, 3, 12, 12), np.float32))
    with pytest.raises(UsageError, match="does not fit"):
        load_calibration(tmp_path / "shape.npz", net())
    with pytest.raises(UsageError, match="no such sample file or folder"):
        load_calibration(tmp_path / "missing.npz", net())
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.save(mixed / "a.npy", anisotropic(1, 0))
    np.save(mixed / "b.npy", np.zeros((1, 8, 10, 10), np.float32))
    with pytest.raises(UsageError, match="differ in shape"):
        load_calibration(mixed, net(spatial=("H", "W")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no .npy/.npz"):
        load_calibration(tmp_path / "empty", net())


def test_random_calibration_is_seeded():
    a = load_calibration("random", net(), samples=3, seed=4)
    b = load_calibration("random", net(), samples=3, seed=4)
    assert a.samples == 3 and a.source.startswith("random")
    np.testing.assert_array_equal(a.feeds[2]["x"], b.feeds[2]["x"])
    assert a.feeds[0]["x"].min() < -1 < 1 < a.feeds[0]["x"].max()  # N(0, 1), as sepify verify draws
    u = load_calibration("random", net(), samples=2, value_range=(0.0, 1.0))
    assert 0 <= u.feeds[0]["x"].min() and u.feeds[0]["x"].max() <= 1 and "uniform" in u.source


# ----------------------------------------------------------------------------------------------
# Allocation, waves, drift metric
# ----------------------------------------------------------------------------------------------
def _profile(name, macs, s, points):
    curve = SchemeCurve("dw-pw", [p[0] for p in points], [p[1] for p in points], [p[2] for p in points],
                        [p[2] for p in points])
    return LayerProfile(name, macs, {"dw-pw": curve}, sensitivity=s)


def test_allocation_is_greedy_on_convex_hulls():
    a = _profile("a", 100, 1.0, [(1, 20, 0.5), (2, 40, 0.1), (3, 60, 0.05)])
    b = _profile("b", 100, 10.0, [(1, 30, 0.3), (2, 60, 0.1)])
    layers = {p.name: (p.macs, p.options()) for p in (a, b)}
    res = greedy(layers, target=0.7 * 200, convex=True)
    assert res.cost <= 140 and res.cost == sum(o.cost for o in res.chosen.values()) + 100 * (2 - len(res.chosen))
    # Cheapest drift per MAC first: layer a (s=1) gives up MACs before b (s=10).
    assert "a" in res.chosen
    assert greedy(layers, max_loss=0.01, convex=True).loss <= 0.01
    none = greedy(layers, max_loss=0.0, convex=True)
    assert none.chosen == {} and none.cost == 200


def test_channel_metric_weighs_channels_alike():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((1, 3, 50))
    ref[:, 0] *= 1000  # one channel in large units
    new = ref.copy()
    new[:, 2] += rng.standard_normal(50) * 0.5  # a small channel badly hurt
    plain = DriftMeter([[ref]], "cosine").drift([[new]])
    chan = DriftMeter([[ref]], "channel").drift([[new]])
    assert plain < 1e-5 < 1e-2 < chan


def test_waves_follow_dependencies():
    from sepify.calibration.layers import layers_from_plan
    from sepify.pipeline.plan import plan

    p = plan(net(), Policy(mode="rank", rank=1))
    layers = layers_from_plan(p)
    assert [[l.name for l in w] for w in waves(net(), layers)] == [["conv1"], ["conv2"], ["conv3"]]


# ----------------------------------------------------------------------------------------------
# Command line: rewrite --calibrate, plan --sweep, report, --html
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def files(tmp_path):
    model = tmp_path / "net.onnx"
    onnx.save(net(), model)
    np.savez(tmp_path / "calib.npz", x=anisotropic(8, 1))
    np.savez(tmp_path / "held.npz", x=anisotropic(4, 2))
    return tmp_path, str(model), str(tmp_path / "calib.npz"), str(tmp_path / "held.npz")


def _self_contained(text: str) -> None:
    import re

    assert text.startswith("<!doctype html>") and text.rstrip().endswith("</html>")
    assert "<svg" in text
    # No fetched resources: no src/href pointing anywhere, no script, no stylesheet link.
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", text)
    assert "<script" not in text and "<link" not in text
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_cli_rewrite_calibrate_writes_model_report_and_html(files, capsys):
    from sepify.cli import main

    tmp, model, calib, _ = files
    out, rep, page = tmp / "out.onnx", tmp / "rep.json", tmp / "page.html"
    code = main(["rewrite", model, "--budget", "0.5", "--calibrate", calib, "-o", str(out), "--report", str(rep),
                 "--html", str(page), "--verify", "--atol", "10", "--rtol", "10"])
    assert code == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "calibration:" in text and "allocation sensitivity" in text
    import json

    d = json.loads(rep.read_text())
    assert d["calibration"]["allocation"] == "sensitivity" and d["totals"]["macs_ratio"] <= 0.5 + 1e-9
    onnx.checker.check_model(onnx.load(out), full_check=True)
    html_text = page.read_text()
    _self_contained(html_text)
    for section in ("Conv MACs per layer", "<h2>Calibration</h2>", "Singular-value spectra",
                    "Audit", "conv2", "Drift per rewritten layer"):
        assert section in html_text


def test_cli_calibration_argument_errors(files, capsys):
    from sepify.cli import main

    tmp, model, calib, _ = files
    assert main(["rewrite", model, "--max-drift", "0.01", "-o", str(tmp / "o.onnx")]) == 2
    assert "--calibrate" in capsys.readouterr().err
    assert main(["rewrite", model, "--rank", "2", "--max-drift", "0.01", "--calibrate", calib, "-o",
                 str(tmp / "o.onnx")]) == 2
    assert main(["plan", model, "--sweep"]) == 2
    assert main(["plan", model, "--plot", str(tmp / "p.png")]) == 2
    assert main(["rewrite", model, "--calibrate", str(tmp / "nope.npz"), "-o", str(tmp / "o.onnx")]) == 2
    assert not (tmp / "o.onnx").exists()


def test_cli_plan_sweep_json_and_report(files, capsys):
    import json

    from sepify.cli import main

    tmp, model, calib, held = files
    code = main(["plan", model, "--calibrate", calib, "--sweep", "--budgets", "0.8,0.5", "--eval", held,
                 "--format", "json"])
    assert code == 0, capsys.readouterr().err
    d = json.loads(capsys.readouterr().out)
    assert [p["budget"] for p in d["points"]] == [0.8, 0.5]
    assert d["eval_data"] == held
    for p in d["points"]:
        assert p["macs_ratio"] <= p["budget"] + 0.15
        assert p["drift_weight_only"] is not None
    assert d["points"][0]["drift"] <= d["points"][1]["drift"] + 1e-9
    page = tmp / "report.html"
    assert main(["report", model, "--calibrate", calib, "--budget", "0.6", "--sweep", "--budgets", "0.7",
                 "--eval", held, "--verify", "-o", str(page)]) == 0
    text = page.read_text()
    _self_contained(text)
    assert "Trade-off curve" in text and "Output drift (sepify verify)" in text
    # plan without --sweep prints the plan
    assert main(["plan", model, "--budget", "0.6", "--calibrate", calib]) == 0
    assert "rewrite plan" in capsys.readouterr().out


def test_cli_rewrite_html_without_calibration(files):
    from sepify.cli import main

    tmp, model, _, _ = files
    page = tmp / "w.html"
    assert main(["rewrite", model, "--rank", "2", "-o", str(tmp / "w.onnx"), "--html", str(page)]) == 0
    _self_contained(page.read_text())
    assert "Calibration" not in page.read_text()


def test_input_shape_strings_and_mismatches(tmp_path):
    m = net(batch="N", spatial=("H", "W"))
    res = calibrate(m, Policy(mode="rank", rank=2), {"x": anisotropic(2, 1)}, ["x=1x8x12x12"])
    assert res.report.input_shapes == {"x": [1, 8, 12, 12]}
    with pytest.raises(UsageError, match="calibration samples are"):
        calibrate(m, Policy(mode="rank", rank=2), {"x": anisotropic(2, 1)}, ["x=1x8x16x16"])


def test_report_of_a_model_with_symbolic_spatial_dims_uses_the_data_shapes(tmp_path):
    """Like YOLOv8 exports (height/width symbolic): the audit table is made at the samples' shapes."""
    from sepify.render.html import write_html_report as write_report

    m = net(batch="N", spatial=("H", "W"))
    out, report, cal = calibrated_rewrite(m, Policy(mode="budget", budget=0.6), {"x": anisotropic(4, 1)})
    assert cal.input_shapes == {"x": [1, 8, 12, 12]}
    from sepify.model.load import load_model

    page = tmp_path / "r.html"
    write_report(page, load_model(m), None, rewrite=report, calibration=cal)
    text = page.read_text()
    _self_contained(text)
    assert "no audit table" not in text and "<h2>Audit</h2>" in text
