"""The two-stage channel splits' normal equations from the conv's output moments equal the ones
from the design (the SVD's first stage is a linear function of the conv's outputs)."""

from __future__ import annotations

import numpy as np
import pytest

from sepify.calibration import subspace
from sepify.calibration.lstsq import NormalEquations, add_rows, gather_patches, grouped_targets, last_stage_design
from sepify.core.schemes import get as get_scheme
from test_calibrate import geometry


def _layer(scheme, group, seed=0):
    """A conv, anisotropic inputs (channels in a low-dimensional subspace) and its outputs."""
    rng = np.random.default_rng(seed)
    k = (1, 1) if scheme == "pw-lowrank" else (3, 3)
    c, n = 8, 12
    w = rng.standard_normal((n, c // group, *k))
    b = rng.standard_normal(n)
    mix = rng.standard_normal((c, 3)) @ rng.standard_normal((3, c)) + 0.05 * rng.standard_normal((c, c))
    x = np.einsum("ij,bjhw->bihw", mix, rng.standard_normal((4, c, 7, 7))) + 0.3
    geo = geometry(w, list(x.shape), pads=(1, 1, 1, 1) if k == (3, 3) else (0, 0, 0, 0), group=group)
    n_out = int(np.prod(geo.out_spatial))
    bidx = np.repeat(np.arange(4), n_out)
    pos = np.tile(np.arange(n_out), 4)
    patches = gather_patches(x, geo, bidx, pos)
    y = np.einsum("rgcij,gncij->rgn", patches.reshape(len(pos), group, c // group, *k),
                  w.reshape(group, n // group, c // group, *k)).reshape(len(pos), n) + b
    return geo, w, b, patches, y, bidx


def _moments(geo, y, bidx):
    m = subspace.output_moments(geo)
    yg = grouped_targets(y, get_scheme("pw-lowrank").stages(geo, 1)[-1])
    add_rows(m, yg, yg, bidx % 2)
    return m


@pytest.mark.parametrize("rank", [3, 12, 20])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("scheme", ["out-lowrank", "pw-lowrank"])
def test_output_moments_give_the_first_stage_outputs(scheme, group, rank):
    """``[z, 1] = T [y, 1]`` for the SVD's first stage (ranks past the weight's rank included: zero
    factors), so the normal equations projected from the output moments equal the design's."""
    geo, w, b, patches, y, bidx = _layer(scheme, group)
    stages = get_scheme(scheme).factor(w, geo, rank)
    t = subspace.from_outputs(stages, geo, b)
    z = last_stage_design(patches, stages)  # [g, R, r]
    yg = y.reshape(len(y), group, -1).transpose(1, 0, 2)
    got = np.concatenate([yg, np.ones(yg.shape[:2] + (1,))], axis=2) @ t.transpose(0, 2, 1)
    np.testing.assert_allclose(got[:, :, :-1], z, atol=1e-9 * np.abs(z).max())
    direct = NormalEquations(geo.group, rank, geo.cout_per_group)
    add_rows(direct, z, grouped_targets(y, stages[-1]), bidx % 2)
    direct.flush()
    projected = subspace.project(_moments(geo, y, bidx), t)
    np.testing.assert_allclose(projected.A, direct.A, rtol=1e-5, atol=1e-6 * np.abs(direct.A).max())
    np.testing.assert_allclose(projected.B, direct.B, rtol=1e-5, atol=1e-6 * np.abs(direct.B).max())
    np.testing.assert_allclose(projected.yy, direct.yy, rtol=1e-6)
    assert projected.rows == direct.rows


def test_very_wide_layers_are_profiled_from_a_design_not_from_their_moments(monkeypatch):
    """The moments are N² per group: an 18,385-way head would need 10.8 GB (PP-OCRv5 rec, killed by
    the OOM killer under --linear --calibrate).  Past MOMENTS_MAX_BYTES the channel splits are
    profiled from a design (r_max unknowns per output), and calibration gives the same kind of
    result: a calibrated layer whose drift is no worse than weight-only."""
    import onnx
    from onnx import helper

    import sepify
    from sepify.calibration import profiling
    from sepify.pipeline.plan import Policy
    from conftest import init, make_model, rand, vi

    head = geometry(np.zeros((18385, 120, 1, 1)), (1, 120, 1, 40))
    assert subspace.moments_bytes(head) > 10e9 and not subspace.fits(head)
    assert subspace.fits(geometry(np.zeros((512, 512, 1, 1)), (1, 512, 4, 4)))

    made = []
    real = subspace.output_moments
    monkeypatch.setattr(subspace, "output_moments", lambda geo: made.append(geo) or real(geo))
    monkeypatch.setattr(subspace, "MOMENTS_MAX_BYTES", 1024)  # every layer is "very wide" now
    w = (rand([64, 4, 1, 1], 1) * 0.1 + np.einsum("nr,rc->nc", rand([64, 3], 2), rand([3, 4], 3))[:, :, None, None]
         ).astype(np.float32)
    model = make_model([helper.make_node("Conv", ["X", "W"], ["Y"], name="pw")], [vi("X", [1, 4, 8, 8])],
                       [vi("Y", [1, 64, 8, 8])], [init("W", w)])
    onnx.checker.check_model(model)
    _, report, cal = sepify.calibrated_rewrite(model, Policy(budget=0.6), "random", samples=8)
    assert made == [] and [r.scheme for r in report.rewritten] == ["pw-lowrank"]
    assert cal.drift <= cal.drift_weight_only + 1e-12
    assert profiling.subspace is subspace
