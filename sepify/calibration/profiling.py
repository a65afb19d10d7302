"""Profiling: the reference pass (targets; per-layer output-error curves per scheme and rank; a
probe per layer) and per-layer sensitivities.

A layer's **sensitivity** ``s`` is the model's drift when only that layer carries one calibrated
candidate's error (drift ≈ s·e²: 1 − cos is quadratic in a small perturbation, and independent
layers add).  Output-error curves come from the normal equations of one pass, validated on the
other fold (:func:`sepify.calibration.lstsq.rank_curve`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ..core.allocate import Option
from ..core.geometry import prod
from ..core.schemes import get as get_scheme
from ..core.stages import Stage, compose
from ..core.drift import DriftMeter
from ..errors import SepifyError, UsageError
from .capture import BatchOffsets, Targets, WorkingModel, float_outputs, iterate_runs, run_outputs
from .data import CalibrationSet
from .layers import Layer, candidate_ranks
from . import subspace
from .dual import curve, new_system, solve_cv, system_bytes
from ..threads import parallel_map
from .lstsq import (add_rows, folds_of, gather_patches, grouped_targets, last_stage_design, pack_last, positions,
                    rank_inner, rank_mask, unpack_last)

GRAM_BUDGET = 768 << 20  # bytes of normal equations held at once in the reference pass
SENSITIVITY_TARGET = 0.3  # relative output error of the perturbation used to measure sensitivity
# Measuring sensitivities runs the whole model once per layer: they get at most this many passes over
# the calibration samples (samples per layer = passes · samples / layers), within these bounds.
SENSITIVITY_PASSES = 6
SENSITIVITY_SAMPLES = (4, 16)


@dataclass
class SchemeCurve:
    """Relative output error of one scheme per rank, on calibration activations (two-fold validation)."""

    scheme: str
    ranks: list[int]
    macs: list[int]
    error: list[float]  # least-squares factors
    error_weight_only: list[float]  # SVD factors

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Probe:
    """The perturbation a layer's sensitivity is measured with: one calibrated candidate."""

    scheme: str
    rank: int
    error: float
    weight: np.ndarray = field(repr=False)
    bias: np.ndarray = field(repr=False)


@dataclass
class LayerProfile:
    name: str
    macs: int
    curves: dict[str, SchemeCurve] = field(default_factory=dict)
    probe: Probe | None = None
    sensitivity: float | None = None  # model drift per unit squared relative output error
    probe_drift: float | None = None

    def interpolated_error(self, scheme: str, r: int) -> float:
        """The layer's output error at rank ``r`` of ``scheme``: measured on the grid, log-log
        interpolated between grid ranks."""
        c = self.curves[scheme]
        if r in c.ranks:
            return c.error[c.ranks.index(r)]
        lo = max(q for q in c.ranks if q < r)
        hi = min(q for q in c.ranks if q > r)
        e_lo, e_hi = c.error[c.ranks.index(lo)], c.error[c.ranks.index(hi)]
        if e_lo <= 0 or e_hi <= 0:
            return e_lo + (e_hi - e_lo) * (r - lo) / (hi - lo)
        t = (math.log(r) - math.log(lo)) / (math.log(hi) - math.log(lo))
        return math.exp(math.log(e_lo) + t * (math.log(e_hi) - math.log(e_lo)))

    def options(self, cost_of=None, max_error: float | None = None) -> list[Option]:
        """(cost, predicted drift = s·e², (scheme, rank)) of every candidate, for the allocator; cost:
        the MACs, or ``cost_of(scheme, rank)`` (None leaves the candidate out); ``max_error``: only
        candidates whose output error ``e`` is at most this."""
        s = self.sensitivity or 0.0
        out = []
        for c in self.curves.values():
            for r, m, e in zip(c.ranks, c.macs, c.error):
                if max_error is not None and e > max_error:
                    continue
                cost = m if cost_of is None else cost_of(c.scheme, r)
                if cost is not None:
                    out.append(Option(cost, s * e * e, (c.scheme, r)))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "macs": self.macs, "sensitivity": self.sensitivity, "probe_drift": self.probe_drift,
                "probe": None if self.probe is None else {"scheme": self.probe.scheme, "rank": self.probe.rank,
                                                          "output_error": self.probe.error},
                "curves": {k: v.to_dict() for k, v in self.curves.items()}}


def nonfinite_activations(tensor: str, calib: CalibrationSet) -> UsageError:
    """The original model gives NaN/Inf on the calibration samples: nothing can be fitted to them."""
    hint = ("random N(0, 1) inputs may be invalid for the model (a logarithm of a negative value, an index "
            "out of range): pass real samples, --input-value NAME=V or --calib-range LO,HI"
            if calib.source.startswith("random") else "check the samples")
    return UsageError(f"the original model gives non-finite values at {tensor!r} on the calibration samples "
                      f"({calib.source}); {hint}")


def _run_rows(layer: Layer, start: int, b: int, rows: int, samples: int, seed: int):
    """Sampled rows of one run: (batch index, flat output position, global sample) per row."""
    n_out = prod(layer.geo.out_spatial)
    k = layer.rows_per_sample(rows, samples)
    order = sorted(range(b), key=lambda j: ((start + j) % 2, j))  # rows of one fold together
    pos = [positions(seed, layer.index, start + j, n_out, k) for j in order]
    bidx = np.concatenate([np.full(len(p), j) for j, p in zip(order, pos)])
    return bidx, np.concatenate(pos), bidx + start


def _systems(layer: Layer, schemes: Sequence[str], rank_grid=None):
    """Per scheme: (r_max, SVD stages at r_max, candidate ranks, MACs) for a layer; ``rank_grid(layer,
    scheme)``: the ranks to evaluate (None: :func:`~sepify.calibration.layers.candidate_ranks`' grid)."""
    out = {}
    for s in schemes:
        sch = get_scheme(s)
        if sch.reason(layer.geo) is not None:
            continue
        ranks, macs = candidate_ranks(layer.geo, s, grid=rank_grid(layer, s) if rank_grid else None)
        if not ranks:
            continue
        r_max = ranks[-1]
        out[s] = (r_max, sch.factor(layer.w64, layer.geo, r_max), ranks, macs)
    return out


def _shape(stages: Sequence[Stage]) -> tuple[int, int, int]:
    """(groups, unknowns per group without the bias, outputs per group) of a chain's last stage."""
    last = stages[-1]
    return last.group, last.in_per_group * prod(last.kernel), last.out_channels // last.group


def reference_pass(work: WorkingModel, layers: Sequence[Layer], calib: CalibrationSet, *, rows: int, seed: int,
                   schemes: Sequence[str] | None, targets: Targets, progress=None,
                   probe_target: float = SENSITIVITY_TARGET, rank_grid=None,
                   unit_of: Mapping[str, str] | None = None) -> dict[str, LayerProfile]:
    """One pass per chunk of layers over the original model: stores the targets (original conv
    outputs at the sampled positions) and, when ``schemes`` is given, every layer's output-error
    curves per scheme and rank plus a probe candidate for its sensitivity.

    ``unit_of`` maps convs that share a weight (and their geometry) to the first of them: one system
    collects the rows of all of them — the one the joint solve of such twins will see — and its
    curves and probe serve each (a siamese net's two towers cost one set of curves, not two)."""
    profiles: dict[str, LayerProfile] = {}
    by_name = {l.name: l for l in layers}
    members: dict[str, list[Layer]] = {}
    for layer in layers:
        lead = by_name.get((unit_of or {}).get(layer.name, layer.name))
        key = lead.name if lead is not None and lead.geo == layer.geo else layer.name
        members.setdefault(key, []).append(layer)
    chunks: list[list[tuple[Layer, dict, list[Layer]]]] = []
    budget = 0
    expected: dict[str, int] = {}  # rows each system will see (every member's sampled positions)
    # Each lead's SVD factors at its largest ranks (a 512-channel 3×3 conv's spatial split: a 1536²
    # eigendecomposition), one lead per core.
    leads = [by_name[key] for key in members]
    factored = parallel_map(lambda lead: _systems(lead, schemes, rank_grid) if schemes else {}, leads)
    for (key, group), systems in zip(members.items(), factored):
        lead = by_name[key]
        expected[key] = len(group) * calib.samples * lead.rows_per_sample(rows, calib.samples)
        # what the chunk will hold: each scheme's system, or the output moments the channel splits share
        from_moments = subspace.fits(lead.geo) and any(s in subspace.SCHEMES for s in systems)
        size = sum(system_bytes(*_shape(v[1]), expected[key], len(v[2])) for s, v in systems.items()
                   if not (from_moments and s in subspace.SCHEMES))
        size += subspace.moments_bytes(lead.geo) if from_moments else 0
        if not chunks or budget + size > GRAM_BUDGET:
            chunks.append([])
            budget = 0
        chunks[-1].append((lead, systems, group))
        budget += size
    # One step per run of every chunk and one per layer profiled: the bar moves while a chunk's
    # runs go by, not only when its curves are done.
    runs = len(chunks) * len(calib.feeds)
    task = progress.add_task("reference activations", total=runs + len(layers)) if progress else None
    for chunk in chunks:
        names = list(dict.fromkeys(n for _, systems, group in chunk for layer in group
                                   for n in ([layer.x_name, layer.y_name] if systems else [layer.y_name])))
        session = work.session(names, prefix=True)
        # Two-stage channel splits (subspace.SCHEMES) need no design: the conv's output moments serve them.
        by_moments = {lead.name: [s for s in systems if s in subspace.SCHEMES and subspace.fits(lead.geo)]
                      for lead, systems, _ in chunk}
        moments = {lead.name: subspace.output_moments(lead.geo) for lead, _, _ in chunk if by_moments[lead.name]}
        eqs = {lead.name: {s: new_system(*_shape(v[1]), expected[lead.name], len(v[2]), dtype=np.float32)
                           for s, v in systems.items() if s not in by_moments[lead.name]} for lead, systems, _ in chunk}
        offsets = BatchOffsets()

        def add_run(item, values):
            """One run's rows into a lead's systems (its twins' rows too, in order: the system is the
            task's own, so leads run side by side)."""
            lead, systems, taken = item
            for layer, bidx, pos, smp, y in taken:
                patches = gather_patches(values[layer.x_name], layer.geo, bidx, pos)
                folds = folds_of(smp, calib.samples)
                if lead.name in moments:  # the split's last stage has the conv's groups
                    yg = grouped_targets(y, systems[by_moments[lead.name][0]][1][-1], np.float32)
                    add_rows(moments[lead.name], yg, yg, folds)
                for s, (r_max, stages, _, _) in systems.items():
                    if s in by_moments[lead.name]:
                        continue
                    z = last_stage_design(patches, stages, np.float32)
                    add_rows(eqs[lead.name][s], z, grouped_targets(y, stages[-1], np.float32), folds)

        for values in iterate_runs(session, calib, names):
            work_items = []
            for lead, systems, group in chunk:
                taken = []  # (layer, batch index, position, sample, target) of this run's rows
                for layer in group:
                    y_all = values[layer.y_name]
                    for name in (layer.x_name, layer.y_name):
                        if name in values and not np.isfinite(values[name]).all():
                            raise nonfinite_activations(name, calib)
                    b = int(y_all.shape[0])
                    start = offsets.take(layer.name, b)
                    bidx, pos, smp = _run_rows(layer, start, b, rows, calib.samples, seed)
                    y = y_all.reshape(y_all.shape[0], y_all.shape[1], -1)[bidx, :, pos]  # [R, N]
                    for s_idx in range(start, start + b):
                        sel = smp == s_idx
                        targets.put(layer.name, s_idx, pos[sel], y[sel])
                    taken.append((layer, bidx, pos, smp, y))
                if systems:
                    work_items.append((lead, systems, taken))
            # Designs and normal equations are numpy that releases the GIL: one lead per core.
            parallel_map(lambda item: add_run(item, values), work_items)
            if progress:
                progress.advance(task)

        def profile(item):
            lead, systems, group = item
            curves: dict[str, SchemeCurve] = {}
            best = None
            for s, (r_max, stages, ranks, macs) in systems.items():
                if s in by_moments[lead.name]:  # its normal equations, projected from the output moments
                    eqs[lead.name][s] = subspace.project(moments[lead.name],
                                                         subspace.from_outputs(stages, lead.geo, lead.bias))
                errs, errs_w = curve(eqs[lead.name][s], pack_last(stages, lead.bias), rank_inner(stages, r_max), ranks)
                curves[s] = SchemeCurve(s, list(ranks), [macs[r] for r in ranks], errs, errs_w)
                for r, e in zip(ranks, errs):
                    score = abs(math.log(max(e, 1e-12) / probe_target))
                    if e > 1e-6 and (best is None or score < best[0]):
                        best = (score, s, r)
            probe = None
            if best is not None:
                _, s, r = best
                r_max, stages, _, _ = systems[s]
                mask = rank_mask(stages, r_max, r)
                x, lam, e = solve_cv(eqs[lead.name][s], pack_last(stages, lead.bias), mask)
                new, bias = unpack_last(stages, x)
                small = get_scheme(s).truncate(new, lead.geo, r_max, r)
                probe = Probe(s, r, e, compose(small, lead.geo), bias)
            if progress:  # as each layer's curves are done (the pool's threads; rich's bars take a lock)
                progress.advance(task, len(group))
            return curves, probe

        # Each lead's curves and probe from its own systems: one lead per core.
        for (lead, systems, group), (curves, probe) in zip(chunk, parallel_map(profile, chunk)):
            for layer in group:
                profiles[layer.name] = LayerProfile(layer.name, layer.geo.macs, dict(curves), probe)
            eqs.pop(lead.name)
            moments.pop(lead.name, None)
        del session
    return {l.name: profiles[l.name] for l in layers}


def sensitivity_samples(probed: int, samples: int, passes: float = SENSITIVITY_PASSES,
                        bounds: tuple[int, int] = SENSITIVITY_SAMPLES) -> int:
    """Samples each of ``probed`` layers' sensitivity is measured on: ``passes`` passes over the
    ``samples`` in all, within ``bounds`` (a drift averaged over fewer images is too noisy)."""
    lo, hi = bounds
    return max(1, min(samples, max(lo, min(hi, math.floor(passes * samples / max(probed, 1))))))


def measure_sensitivities(work: WorkingModel, layers: Sequence[Layer], profiles: dict[str, LayerProfile],
                          calib: CalibrationSet, *, max_samples: int | None = None, metric: str = "channel",
                          progress=None) -> None:
    """Model drift when only one layer carries its probe perturbation: ``s = drift / e²``, on the
    first ``max_samples`` samples (default :func:`sensitivity_samples`).

    ``1 − cos`` of the outputs is quadratic in a small perturbation, so a layer whose output is
    off by a relative ``e`` moves the model's drift by about ``s·e²``, and independent layers add.
    """
    if max_samples is None:
        probed = sum(1 for l in layers if profiles.get(l.name) is not None and profiles[l.name].probe is not None)
        max_samples = sensitivity_samples(probed, calib.samples)
    feeds = calib.head(max_samples)
    outs = float_outputs(work.model)
    try:  # one session, the probe's weights fed per run
        session = work.override_session()
    except SepifyError:
        session = None  # a model onnxruntime will not take with weights as inputs: a session per layer
    meter = DriftMeter(run_outputs(session or work.session(), feeds.feeds, outs, feeds), metric, feeds.per_run)
    task = progress.add_task("layer sensitivities", total=len(layers)) if progress else None
    for layer in layers:
        prof = profiles.get(layer.name)
        if prof is not None and prof.probe is not None:
            if session is not None:
                extra = work.overrides(layer.name, prof.probe.weight, prof.probe.bias)
                d = meter.drift(run_outputs(session, [{**f, **extra} for f in feeds.feeds], outs, feeds))
            else:
                work.set(layer.name, prof.probe.weight, prof.probe.bias)
                try:
                    d = meter.drift(run_outputs(work.session(), feeds.feeds, outs, feeds))
                finally:
                    work.reset(layer.name)
            prof.probe_drift = d
            prof.sensitivity = d / max(prof.probe.error ** 2, 1e-12)
        elif prof is not None:
            prof.sensitivity = 0.0
        if progress:
            progress.advance(task)


__all__ = ["LayerProfile", "Probe", "SchemeCurve", "measure_sensitivities", "reference_pass"]
