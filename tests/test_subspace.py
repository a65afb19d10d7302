"""Data-aware first stages of the channel low-rank schemes (output principal components) and the
normal equations derived from the conv's output moments."""

from __future__ import annotations

import numpy as np
import pytest

from sepify.calibration import subspace
from sepify.calibration.lstsq import (NormalEquations, add_rows, gather_patches, grouped_targets, last_stage_design,
                                      pack_last)
from sepify.core.schemes import get as get_scheme
from sepify.core.stages import compose
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


def _error(stages, bias, geo, patches, y):
    z = last_stage_design(patches, stages)  # [g, R, r]
    x = pack_last(stages, bias)
    pred = np.concatenate([np.concatenate([z, np.ones(z.shape[:2] + (1,))], axis=2)[q] @ x[q]
                           for q in range(geo.group)], axis=1)
    return np.linalg.norm(pred - y) / np.linalg.norm(y)


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("scheme", ["out-lowrank", "pw-lowrank"])
def test_output_moments_give_the_first_stage_outputs(scheme, group):
    """``[z, 1] = T [y, 1]`` for the data-aware and for the SVD first stage, so the normal
    equations projected from the output moments equal the ones from the design."""
    geo, w, b, patches, y, bidx = _layer(scheme, group)
    sub = subspace.output_subspace(scheme, _moments(geo, y, bidx), w, b, geo)
    for stages in (sub.stages(3)[0], get_scheme(scheme).factor(w, geo, 3)):
        t = subspace.from_outputs(stages, geo, b)
        z = last_stage_design(patches, stages)  # [g, R, r]
        yg = y.reshape(len(y), group, -1).transpose(1, 0, 2)
        ones = np.ones(yg.shape[:2] + (1,))
        got = np.concatenate([yg, ones], axis=2) @ t.transpose(0, 2, 1)
        np.testing.assert_allclose(got[:, :, :-1], z, atol=1e-9 * np.abs(z).max())
        direct = NormalEquations(geo.group, 3, geo.cout_per_group)
        add_rows(direct, z, grouped_targets(y, stages[-1]), bidx % 2)
        direct.flush()
        projected = subspace.project(_moments(geo, y, bidx), t)
        np.testing.assert_allclose(projected.A, direct.A, rtol=1e-5, atol=1e-6 * np.abs(direct.A).max())
        np.testing.assert_allclose(projected.B, direct.B, rtol=1e-5, atol=1e-6 * np.abs(direct.B).max())


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("scheme", ["out-lowrank", "pw-lowrank"])
def test_principal_components_reconstruct_the_outputs_better_than_the_svd(scheme, group):
    """On inputs far from isotropic the output-PCA chain is the better rank-r map of the same inputs
    (it is the best), and its stages nest: rank r is the leading part of rank r_max."""
    geo, w, b, patches, y, bidx = _layer(scheme, group, seed=1)
    sub = subspace.output_subspace(scheme, _moments(geo, y, bidx), w, b, geo)
    for r in (1, 2, 3):
        pca, bias = sub.stages(r)
        svd = get_scheme(scheme).factor(w, geo, r)
        assert _error(pca, bias, geo, patches, y) < _error(svd, b, geo, patches, y)
    big, _ = sub.stages(5)
    small, _ = sub.stages(2)
    np.testing.assert_allclose(compose(get_scheme(scheme).truncate(big, geo, 5, 2), geo), compose(small, geo),
                               atol=1e-12)
    # full rank reproduces the conv exactly (bias included)
    full, bias = sub.stages(geo.cout_per_group)
    np.testing.assert_allclose(compose(full, geo), w, atol=1e-9)
    np.testing.assert_allclose(bias, b, atol=1e-9)
