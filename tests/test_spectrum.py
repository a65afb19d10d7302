"""Large-matrix spectra: the Courant–Fischer certificate and the estimated leading errors."""

import numpy as np
import pytest

from sepify.core import linalg as F
from sepify.pipeline.audit import AUDIT_DEPTH
import sepify


def _low_rank(rng, n, r):
    return (rng.standard_normal((1, n, r)) @ rng.standard_normal((1, r, n)))


def test_certificate_holds_for_full_rank_and_never_for_low_rank():
    rng = np.random.default_rng(0)
    full = rng.standard_normal((1, 600, 600))
    assert F.certify_tail(full, 300, 1e-3)
    for r in (5, 150, 300):
        # rank r ≤ 300: a rank-300 truncation is exact, so no certificate may claim otherwise
        assert not F.certify_tail(_low_rank(rng, 600, r), 300, 1e-3)


def test_certificate_falls_back_to_every_row_when_the_row_sample_misses_the_rank():
    # Rank 250 on the rows the cheap first attempt samples; the remaining rows add 350 more
    # directions.  The sample alone cannot show σ₃₀₁ > 0, all rows can.
    rng = np.random.default_rng(5)
    n, rank = 600, 300
    few = rank + 1 + max(32, (rank + 1) // 4)
    sampled = np.linspace(0, n - 1, few).round().astype(int)
    m = _low_rank(rng, n, 250)
    others = np.setdiff1d(np.arange(n), sampled)
    m[0, others] += 10 * rng.standard_normal((others.size, n))
    assert F.relative_errors(F.singular_values(m))[rank] > 1e-3
    assert F.certify_tail(m, rank, 1e-3)
    assert not F.certify_tail(m[:, sampled], rank, 1e-3)  # the sample alone is rank 250


def test_certificate_agrees_with_the_full_spectrum():
    rng = np.random.default_rng(1)
    for decay in (40.0, 120.0, 400.0):
        u, _ = np.linalg.qr(rng.standard_normal((600, 600)))
        v, _ = np.linalg.qr(rng.standard_normal((600, 600)))
        m = ((u * np.exp(-np.arange(600) / decay)) @ v.T)[None]
        errors = F.relative_errors(F.singular_values(m))
        for rank in (50, 300):
            if F.certify_tail(m, rank, 1e-3):
                assert errors[rank] > 1e-3  # a certificate is never wrong


def test_spectrum_skips_the_decomposition_only_when_certified():
    rng = np.random.default_rng(2)
    full = rng.standard_normal((1, 600, 600))
    s = F.spectrum(full, 300, 1e-3)
    assert not s.complete and s.exact_above == 300
    exact = F.relative_errors(F.singular_values(full))
    assert len(s.errors) == F.LEADING_TERMS + 1
    assert np.allclose(s.errors, exact[:F.LEADING_TERMS + 1], atol=1e-3)
    low = _low_rank(rng, 600, 40)
    s = F.spectrum(low, 300, 1e-3)
    assert s.complete and F.exact_rank(s.errors, 1e-7) == 40


def _cross_channel_model(w):
    from onnx import TensorProto, helper, numpy_helper

    n, c = w.shape[:2]
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n, 8, 8])],
        [numpy_helper.from_array(w.astype(np.float32), "w")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    return m


@pytest.mark.parametrize("exact_rank", [None, 12])
def test_audit_of_a_wide_conv(exact_rank):
    rng = np.random.default_rng(3)
    c = n = 192  # cross-channel matrix 576 x 576: above the full-spectrum limit
    if exact_rank is None:
        w = rng.standard_normal((n, c, 3, 3))
    else:  # W[n,c,i,j] = Σ_t a_t[c,i] b_t[n,j]: exactly rank 12 in the kh×1-first arrangement
        a = rng.standard_normal((exact_rank, c, 3))
        b = rng.standard_normal((exact_rank, n, 3))
        w = np.einsum("tci,tnj->ncij", a, b)
    for certify in (True, False):
        spatial = sepify.audit(_cross_channel_model(w), certify=certify).nodes[0].separability.schemes["spatial"]
        if exact_rank is None:
            assert not spatial.spectrum_complete and spatial.exact_rank is None and not spatial.exact_saves_macs
            # --certify proves it up to break-even; the default says how far it looked
            assert spatial.exact_rank_above == (spatial.break_even_rank if certify else AUDIT_DEPTH)
            if certify:  # the leading errors are estimated
                assert 0.9 < spatial.errors[1] < 1.0
            else:  # the default examines, and reports, nothing more than the certificate
                assert spatial.errors == {} and spatial.curve_errors == [1.0] and spatial.curve_macs == []
        else:
            assert spatial.spectrum_complete and spatial.exact_rank == exact_rank and spatial.exact_saves_macs


@pytest.mark.parametrize("exact_rank", [None, 12])
def test_lossless_plan_of_a_wide_conv(exact_rank):
    rng = np.random.default_rng(4)
    c = n = 192
    if exact_rank is None:
        w = rng.standard_normal((n, c, 3, 3))
    else:
        w = np.einsum("tci,tnj->ncij", rng.standard_normal((exact_rank, c, 3)), rng.standard_normal((exact_rank, n, 3)))
    node = sepify.plan(_cross_channel_model(w)).nodes[0]
    if exact_rank is None:
        assert node.action == "keep" and node.reason == "no_exact_saving"
    else:
        assert (node.action, node.scheme, node.rank) == ("rewrite", "spatial", exact_rank)


def test_default_audit_says_how_far_it_looked_and_certify_finds_the_rest():
    """Exactly rank 40 (> the default depth of 32): the default audit certifies nothing up to 32 is exact
    and stops there; --certify goes to break-even and finds the split."""
    rng = np.random.default_rng(5)
    w = np.einsum("tci,tnj->ncij", rng.standard_normal((40, 192, 3)), rng.standard_normal((40, 192, 3)))
    quick = sepify.audit(_cross_channel_model(w)).nodes[0].separability.schemes["spatial"]
    assert not quick.spectrum_complete and quick.exact_rank is None and quick.exact_rank_above == AUDIT_DEPTH
    full = sepify.audit(_cross_channel_model(w), certify=True).nodes[0].separability.schemes["spatial"]
    assert full.spectrum_complete and full.exact_rank == 40 and full.exact_saves_macs
    assert sepify.plan(_cross_channel_model(w)).nodes[0].rank == 40  # a lossless plan always decides fully


@pytest.mark.parametrize("channels, inputs", [(160, 96), (200, 96), (200, 3), (200, 1)])
def test_tucker2_default_audit_certifies_wide_layers_and_estimates_the_leading_errors(channels, inputs):
    from sepify.core.schemes import get as get_scheme
    from sepify.pipeline.audit import AUDIT_LIMIT
    from test_calibrate import geometry

    rng = np.random.default_rng(channels)
    w = rng.standard_normal((channels, inputs, 3, 3))
    geo = geometry(w, (1, inputs, 8, 8), pads=(1, 1, 1, 1))
    sch = get_scheme("tucker2")
    full = sch.spectrum(w, geo, "", 1e-3, sch.break_even(geo))
    quick = sch.spectrum(w, geo, "", 1e-3, sch.break_even(geo), depth=AUDIT_DEPTH, limit=AUDIT_LIMIT)
    assert full.complete and not quick.complete and quick.exact_above == min(AUDIT_DEPTH, sch.break_even(geo))
    assert len(quick.errors) == 5  # ranks 0-4, whatever the narrow side
    np.testing.assert_allclose(quick.errors, full.errors[:len(quick.errors)], atol=1e-3)
    # what the audit reads off it
    from sepify.pipeline.audit import analyze_weight

    analyze_weight(w.astype(np.float32), geo, np.dtype(np.float32))


def test_tucker2_default_audit_decomposes_a_wide_layer_that_may_be_low_rank():
    from sepify.core.schemes import get as get_scheme
    from sepify.pipeline.audit import AUDIT_DEPTH, AUDIT_LIMIT
    from test_calibrate import geometry

    rng = np.random.default_rng(1)
    core = rng.standard_normal((3, 3, 9))
    u_out, _ = np.linalg.qr(rng.standard_normal((160, 3)))
    u_in, _ = np.linalg.qr(rng.standard_normal((140, 3)))
    w = np.einsum("na,abk,cb->nck", u_out, core, u_in).reshape(160, 140, 3, 3)  # multilinear rank (3, 3)
    geo = geometry(w, (1, 140, 8, 8), pads=(1, 1, 1, 1))
    sch = get_scheme("tucker2")
    spec = sch.spectrum(w, geo, "", 1e-3, sch.break_even(geo), depth=AUDIT_DEPTH, limit=AUDIT_LIMIT)
    assert spec.complete and spec.errors[3] < 1e-6 < spec.errors[2]


@pytest.mark.parametrize("group", [1, 2, 4])
def test_matrix_views_read_the_same_matrices_without_copying(group):
    """in-lowrank's and the spatial split's unfoldings as views: the same entries, sub-matrices,
    transpose and energy as the copies; a certificate on either gives the same answer."""
    from sepify.core.geometry import ConvGeometry
    from sepify.core.linalg import MatrixView, energy
    from sepify.core.schemes import get
    from sepify.core.schemes.lowrank import in_matrices, in_view

    rng = np.random.default_rng(group)
    w = rng.standard_normal((12, 8 // group, 3, 3))
    geo = ConvGeometry(1, 8, 12, group, (3, 3), (5, 5), (5, 5), (1, 1), (1, 1), (1, 1, 1, 1))
    pairs = [(in_view(w, group), in_matrices(w, group))]
    pairs += [(get("spatial").matrix_view(w, geo, v), get("spatial").matrices(w, geo, v)) for v in ("v", "h")]
    for view, mats in pairs:
        assert isinstance(view, MatrixView) and view.shape == mats.shape
        np.testing.assert_array_equal(view.full(), mats)
        np.testing.assert_array_equal(view.T.full(), mats.transpose(0, 2, 1))
        rows = np.array([mats.shape[1] - 1, 0, mats.shape[1] // 2])
        cols = np.array([1, mats.shape[2] - 1, 0, 4])
        np.testing.assert_array_equal(view.take(rows, cols), mats[:, rows[:, None], cols])
        assert energy(view) == pytest.approx(energy(mats), rel=1e-12)
        for rank in (1, 3):
            assert F.certify_tail(view, rank, 1e-3) == F.certify_tail(mats, rank, 1e-3)


def test_audit_json_is_the_dataclasses_as_they_are():
    """The flat serialization of the audit's node and scheme records equals ``asdict``'s."""
    from dataclasses import asdict

    rng = np.random.default_rng(0)
    report = sepify.audit(_cross_channel_model(rng.standard_normal((24, 24, 3, 3))))
    node = report.nodes[0]
    want = asdict(node)
    got = node.to_dict()
    for name, a in node.separability.schemes.items():
        d = asdict(a)
        d["errors"] = {str(k): v for k, v in a.errors.items()}
        d["macs"] = {str(k): v for k, v in a.macs.items()}
        assert got["separability"]["schemes"][name] == d
    want.pop("separability"), got.pop("separability")
    assert got == want


def test_the_audit_table_says_how_far_a_certified_scheme_was_examined():
    """A scheme the default audit only certified shows its certificate, not a blank."""
    from sepify.render.text import render_audit

    rng = np.random.default_rng(3)
    report = sepify.audit(_cross_channel_model(rng.standard_normal((192, 192, 3, 3))))
    spatial = report.nodes[0].separability.schemes["spatial"]
    assert spatial.errors == {} and spatial.exact_rank_above == AUDIT_DEPTH
    text = render_audit([report], "table", "macs", None, width=400)
    assert f"spatial not exact to r{AUDIT_DEPTH}" in text


def test_lossy_curve_uses_float32_grams_only_clear_of_exactness():
    """A lossy plan's curve of a large matrix may form its Gram in float32: it agrees with the
    float64 curve to 1e-5 of its value where the errors are large, and a near-exact matrix (an
    exact rank-40 one: float32 rounding would blur its zero tail) falls back to float64."""
    from sepify.core.linalg import FAST_GRAM_MIN, lossy_curve

    rng = np.random.default_rng(11)
    n = FAST_GRAM_MIN + 64
    noisy = rng.standard_normal((1, n, n + 32)).astype(np.float32)
    ref = F.relative_errors(F.singular_values(noisy))
    fast = lossy_curve(noisy, n // 2)
    np.testing.assert_allclose(fast[: n // 2], ref[: n // 2], rtol=1e-5)
    low = (rng.standard_normal((1, n, 40)) @ rng.standard_normal((1, 40, n + 32))).astype(np.float32)
    exact = lossy_curve(low, n // 2)
    np.testing.assert_array_equal(exact, F.relative_errors(F.singular_values(low)))
    assert exact[40] < 1e-6


def test_eigvalsh32_matches_numpy():
    """The float32 eigenvalues through the loaded OpenBLAS (ctypes) agree with numpy's float64 ones
    to float32 rounding of the largest, on a batch of random Grams; an empty batch and a 1×1 matrix
    work too."""
    from sepify.core import linalg

    rng = np.random.default_rng(5)
    m = rng.standard_normal((3, 70, 90)).astype(np.float32)
    grams = np.matmul(m, m.transpose(0, 2, 1))
    got = linalg.eigvalsh32(grams)
    if got is None:
        pytest.skip("no OpenBLAS ssyevd in this process (numpy's float64 path is used)")
    ref = np.linalg.eigvalsh(grams.astype(np.float64))
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-5 * ref.max())
    assert linalg.eigvalsh32(np.full((1, 1, 1), 4.0, dtype=np.float32))[0, 0] == 4.0
    assert linalg.eigvalsh32(np.zeros((0, 5, 5), dtype=np.float32)).shape == (0, 5)


def test_lossy_curve_without_a_float32_eigensolver(monkeypatch):
    """Where no float32 routine is found, the float32 Gram's eigenvalues come from numpy in float64:
    the same curve to 1e-5."""
    from sepify.core import linalg

    rng = np.random.default_rng(12)
    n = linalg.FAST_GRAM_MIN + 8
    mats = rng.standard_normal((1, n, n + 16)).astype(np.float32)
    ref = F.relative_errors(F.singular_values(mats))
    with_routine = linalg.lossy_curve(mats, n // 2)
    monkeypatch.setattr(linalg, "_syevd", [None])
    without = linalg.lossy_curve(mats, n // 2)
    np.testing.assert_allclose(without[: n // 2], ref[: n // 2], rtol=1e-5)
    np.testing.assert_allclose(with_routine[: n // 2], ref[: n // 2], rtol=1e-5)


def test_scheme_curves_of_large_weights_fall_back_to_full_precision_near_exactness():
    """Scheme.curve hands the fast path a float32 rearrangement; where the curve comes near an exact
    rank (a spatial split of exact rank 3 across 576×576 matrices) the float64 curve comes back,
    identical to the full-precision spectrum, and a noisy weight's fast curve agrees to 1e-5."""
    from sepify.core.geometry import ConvGeometry
    from sepify.core.schemes import get

    geo = ConvGeometry(batch=1, c_in=192, c_out=192, group=1, kernel=(3, 3), in_spatial=(8, 8), out_spatial=(8, 8),
                       strides=(1, 1), dilations=(1, 1), pads=(1, 1, 1, 1))
    spatial = get("spatial")
    rng = np.random.default_rng(4)
    left, right = rng.standard_normal((1, 576, 3)), rng.standard_normal((1, 3, 576))
    m = (left @ right)[0]  # M[(c,i),(n,j)] of rank 3
    exact_w = m.reshape(192, 3, 192, 3).transpose(2, 0, 1, 3).copy()
    assert np.allclose(spatial.matrices(exact_w, geo, "v")[0], m)
    want = F.relative_errors(F.singular_values(spatial.matrices(exact_w, geo, "v")))
    np.testing.assert_array_equal(spatial.curve(exact_w, geo, "v"), want)
    assert want[3] < 1e-6
    noisy = rng.standard_normal((192, 192, 3, 3))
    ref = F.relative_errors(F.singular_values(spatial.matrices(noisy, geo, "v")))
    np.testing.assert_allclose(spatial.curve(noisy, geo, "v")[:300], ref[:300], rtol=1e-5)


@pytest.mark.parametrize("shape", [(40, 9, 300), (40, 300, 9), (1, 24, 5000), (1, 5000, 24), (3, 7, 7)])
def test_grams_of_narrow_weights_widened_piece_by_piece_equal_the_whole_float64_gram(monkeypatch, shape):
    # Pieces of a few KB: every path of short_gram's chunking (by matrices, by columns of one matrix).
    monkeypatch.setattr(F, "CHUNK_BYTES", 4096)
    m = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    want = F.short_gram(m.astype(np.float64), np.float64)
    got = F.short_gram(m, np.float64)
    assert got.dtype == np.float64 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


def test_dw_pw_spectrum_of_a_float32_weight_is_its_float64_spectrum(monkeypatch):
    from sepify.core.geometry import ConvGeometry
    from sepify.core.schemes import get

    monkeypatch.setattr(F, "CHUNK_BYTES", 4096)
    # Exactly rank 2 per input channel (grouped): the exact rank must survive the piecewise widening.
    rng = np.random.default_rng(4)
    g, ng, cg, k = 2, 16, 12, 9
    w = np.einsum("qnr,qcrk->qnck", rng.standard_normal((g, ng, 2)), rng.standard_normal((g, cg, 2, k)))
    w = w.reshape(g * ng, cg, 3, 3).astype(np.float32)
    geo = ConvGeometry(1, g * cg, g * ng, g, (3, 3), (8, 8), (8, 8), (1, 1), (1, 1), (1, 1, 1, 1))
    dwpw = get("dw-pw")
    narrow = dwpw.spectrum(w, geo, "", 1e-3, 5).errors
    wide = dwpw.spectrum(w.astype(np.float64), geo, "", 1e-3, 5).errors
    np.testing.assert_allclose(narrow, wide, rtol=1e-9, atol=1e-12)
    assert F.exact_rank(narrow, F.exact_tolerance(np.float32)) == 2
