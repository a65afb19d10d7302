"""The dual (kernel) form of calibration's least squares equals the primal one, and the Gram-based
truncated factors equal the SVD's."""

from __future__ import annotations

import numpy as np
import pytest

from sepify.calibration import dual, lstsq
from sepify.calibration.dual import DesignRows, dual_pays, new_system, rank_curve_dual, solve_ridge_cv_dual
from sepify.calibration.lstsq import NormalEquations, rank_curve, solve_ridge_cv
from sepify.core import linalg


def _pair(rng, groups, d, outs, rows_per_fold, chunks=3, one_fold=False):
    """The same rows in normal equations and kept (targets correlated with the first columns)."""
    eq = NormalEquations(groups, d, outs)
    kept = DesignRows(groups, d, outs, dtype=np.float64)
    mix = rng.standard_normal((groups, d, outs))
    for f in ((0,) if one_fold else (0, 1)):
        for _ in range(chunks):
            z = rng.standard_normal((groups, rows_per_fold // chunks, d)) * np.linspace(2, 0.2, d)
            y = z @ mix + 0.3 * rng.standard_normal((groups, rows_per_fold // chunks, outs)) + 0.5
            eq.add(f, z, y)
            kept.add(f, z, y)
    return eq, kept


@pytest.mark.parametrize("one_way", [False, True])
@pytest.mark.parametrize("groups,d,outs,rows", [(1, 40, 5, 90), (3, 12, 2, 30), (1, 200, 8, 60)])
def test_dual_rank_curve_equals_the_primal(groups, d, outs, rows, one_way, monkeypatch):
    """Both validation folds (or one way, fit on fold 0 and measured on fold 1, for wide systems),
    every rank of the grid, the weight-only curve: to float rounding — including more unknowns
    than rows (the case the dual form is for)."""
    monkeypatch.setattr(lstsq, "ONE_WAY_MIN", 1 if one_way else 10 ** 9)
    rng = np.random.default_rng(d)
    eq, kept = _pair(rng, groups, d, outs, rows)
    x0 = 0.1 * rng.standard_normal((groups, d + 1, outs))
    inner = np.append(np.arange(d) % 7, 0)
    ranks = [1, 3, 7]
    want, want_base = rank_curve(eq, x0, inner, ranks)
    got, got_base = rank_curve_dual(kept, x0, inner, ranks)
    np.testing.assert_allclose(got, want, rtol=1e-7)
    np.testing.assert_allclose(got_base, want_base, rtol=1e-9)


@pytest.mark.parametrize("mask_rank", [None, 3])
@pytest.mark.parametrize("grid", [(1e-3,), (1e-5, 1e-2, 1.0)])
def test_dual_ridge_cv_equals_the_primal(grid, mask_rank):
    """Same λ chosen (the weight-only candidate included), same solution and validation error."""
    rng = np.random.default_rng(7)
    d, outs = 30, 4
    eq, kept = _pair(rng, 2, d, outs, 48)
    x0 = 0.2 * rng.standard_normal((2, d + 1, outs))
    mask = None if mask_rank is None else (np.arange(d) % 6) < mask_rank
    xa, la, ea = solve_ridge_cv(eq, x0, mask, grid=grid)
    xb, lb, eb = solve_ridge_cv_dual(kept, x0, mask, grid=grid)
    assert la == lb
    assert eb == pytest.approx(ea, rel=1e-7)
    np.testing.assert_allclose(xb, xa, atol=1e-8)
    if mask is not None:  # unknowns outside the rank stay zero, as the primal leaves them
        assert not xb[:, :-1][:, ~mask].any()


def test_dual_one_fold_fits_all_rows():
    rng = np.random.default_rng(2)
    eq, kept = _pair(rng, 1, 10, 3, 30, one_fold=True)
    x0 = np.zeros((1, 11, 3))
    xa, la, ea = solve_ridge_cv(eq, x0)
    xb, lb, eb = solve_ridge_cv_dual(kept, x0)
    assert la == lb == lstsq.CURVE_RIDGE
    np.testing.assert_allclose(xb, xa, atol=1e-9)
    assert eb == pytest.approx(ea, rel=1e-7)
    assert dual.svd_error(kept, xa) == pytest.approx(dual.svd_error(eq, xa), rel=1e-9)


def test_the_dual_form_is_chosen_for_wide_layers_with_few_rows():
    """ResNet-18's last stage at 224: 1,568 rows, dw-pw's 4,609 unknowns → rows kept; a 64-channel
    layer with 4,096 rows → normal equations."""
    assert dual_pays(1, 512 * 9, 512, 1568, 9)
    assert isinstance(new_system(1, 512 * 9, 512, 1568, 9), DesignRows)
    assert not dual_pays(1, 64 * 9, 64, 4096, 9)
    assert isinstance(new_system(1, 64 * 9, 64, 4096, 9), NormalEquations)


@pytest.mark.parametrize("shape,r", [((2, 200, 300), 50), ((1, 300, 150), 40), ((3, 130, 500), 200),
                                     ((1, 256, 256), 300)])
def test_gram_factors_equal_the_svd(shape, r, monkeypatch):
    """The same truncation (and nested leading factors) as LAPACK's SVD, zero-padded past the rank."""
    rng = np.random.default_rng(r)
    m = rng.standard_normal(shape) * np.geomspace(1, 1e-3, shape[2])
    left, right = linalg.truncated_factors(m, r)
    monkeypatch.setattr(linalg, "GRAM_FACTOR_MIN", 10 ** 9)
    l_svd, r_svd = linalg.truncated_factors(m, r)
    np.testing.assert_allclose(left @ right, l_svd @ r_svd, atol=1e-10 * np.abs(m).max())
    np.testing.assert_allclose(np.linalg.norm(left, axis=1), np.linalg.norm(l_svd, axis=1), rtol=1e-8, atol=1e-12)
    assert left.shape == (shape[0], shape[1], r) and right.shape == (shape[0], r, shape[2])


def test_gram_factors_reproduce_an_exact_low_rank_matrix():
    rng = np.random.default_rng(0)
    m = rng.standard_normal((1, 256, 5)) @ rng.standard_normal((1, 5, 400))
    for r in (5, 8):  # the exact rank, and past it (zero factors, no division by zero)
        left, right = linalg.truncated_factors(m, r)
        assert np.isfinite(left).all() and np.isfinite(right).all()
        assert np.linalg.norm(left @ right - m) / np.linalg.norm(m) < 1e-12


def test_calibration_in_the_dual_form_chooses_and_solves_as_the_primal(monkeypatch):
    """A whole calibrated rewrite with every system in the dual form (forced) picks the same schemes
    and ranks and writes the same weights, to float32 rounding of the kept rows."""
    import onnx

    from sepify.calibration.calibrate import calibrated_rewrite
    from sepify.pipeline.plan import Policy
    from test_calibrate import anisotropic, net

    m = net(bn=False)
    data = {"x": anisotropic(8, 1)}
    policy = Policy(mode="budget", budget=0.6)
    monkeypatch.setattr(dual, "DUAL_ADVANTAGE", 0.0)  # never pays: the primal form
    out_p, _, cal_p = calibrated_rewrite(m, policy, data)
    monkeypatch.setattr(dual, "DUAL_ADVANTAGE", 1e12)  # always pays: the dual form
    out_d, _, cal_d = calibrated_rewrite(m, policy, data)
    assert cal_d.layers and [(l.name, l.scheme, l.rank) for l in cal_d.layers] == \
        [(l.name, l.scheme, l.rank) for l in cal_p.layers]
    for a, b in zip(out_p.graph.initializer, out_d.graph.initializer):
        assert a.name == b.name
        np.testing.assert_allclose(onnx.numpy_helper.to_array(b), onnx.numpy_helper.to_array(a), rtol=1e-4, atol=1e-5)
