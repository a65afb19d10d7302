"""Sequential (asymmetric) calibration of the chosen layers, in waves.

Every planned layer whose input does not depend on a layer still pending is calibrated from one
pass over the samples (a *wave*: the topological generations of the layers' dependency graph),
then its weights are replaced in the working model by the dense weight its chain computes (the
same math as the rewritten chain), so the next wave sees the inputs of the partly rewritten
model (Zhang et al. 2015: errors do not compound).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..core.geometry import prod
from ..core.linalg import exact_tolerance
from ..core.schemes import get as get_scheme
from ..core.stages import Stage, compose, stages_macs
from ..model.graph import GraphView
from .capture import BatchOffsets, Targets, WorkingModel, iterate_runs
from .data import CalibrationSet
from .layers import Layer
from .dual import new_system, solve_cv, svd_error
from ..threads import parallel_map
from .lstsq import add_rows, folds_of, gather_patches, grouped_targets, last_stage_design, pack_last, unpack_last

# A layer's choice: (scheme, rank, variant) — variant "" is the scheme's cheaper one.
Pick = tuple[str, int, str]


@dataclass
class LayerResult:
    name: str
    scheme: str
    rank: int
    macs_before: int
    macs_after: int
    weight_error: float  # ‖W − Ŵ‖/‖W‖ of the calibrated chain (W: BatchNorm folded)
    weight_error_svd: float  # the same for the weight-only SVD factors
    output_error: float | None  # relative output error on calibration rows (validation), calibrated
    output_error_svd: float | None  # … of the weight-only factors, on the same inputs
    ridge: float | None  # chosen λ; None: exact factorization kept as is; inf: weight-only won
    wave: int | None
    exact: bool = False
    sensitivity: float | None = None
    predicted_drift: float | None = None
    bn_folded: str | None = None
    variant: str = ""  # the scheme variant calibrated ("": the cheaper one)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["ridge"] is not None and not math.isfinite(d["ridge"]):
            d["ridge"] = "inf"
        return d


def upstream_layers(model, layers: Sequence[Layer]) -> dict[str, set[str]]:
    """For each layer, the other layers its input depends on (main graph, subgraph reads included)."""
    import networkx as nx

    view = model if isinstance(model, GraphView) else GraphView(model)
    flow = view.dataflow()
    index = {o: i for i, n in enumerate(view.model.graph.node) for o in n.output if o}
    layer_at = {index[l.y_name]: l.name for l in layers if l.y_name in index}
    out = {}
    for layer in layers:
        src = index.get(layer.x_name)
        if src is None:
            out[layer.name] = set()
            continue
        seen = nx.ancestors(flow, src) | {src}
        out[layer.name] = {layer_at[i] for i in seen if i in layer_at}
    return out


def waves(model, layers: Sequence[Layer], unit_of: Mapping[str, str] | None = None) -> list[list[Layer]]:
    """Layers grouped so that each one's input depends only on layers of earlier groups (the
    topological generations of the layer dependency graph), in layer order within a group.

    ``unit_of`` maps layers that must be solved together (convs sharing a weight) to one unit: a
    unit waits for everything any member depends on (its own members aside), and whatever depends on
    a member waits for the unit."""
    import networkx as nx

    unit_of = dict(unit_of or {})
    unit = {l.name: unit_of.get(l.name, l.name) for l in layers}
    up = upstream_layers(model, layers)
    g = nx.DiGraph()
    g.add_nodes_from(unit.values())
    g.add_edges_from((unit[u], unit[l.name]) for l in layers for u in up[l.name]
                     if u in unit and unit[u] != unit[l.name])
    rank = {l.name: i for i, l in enumerate(layers)}
    members: dict[str, list[Layer]] = {}
    for l in layers:
        members.setdefault(unit[l.name], []).append(l)
    out = []
    for gen in nx.topological_generations(g):
        wave = [l for u in gen for l in members[u]]
        out.append(sorted(wave, key=lambda l: rank[l.name]))
    return out


def weight_units(layers: Sequence[Layer]) -> dict[str, str]:
    """Layer name -> the first layer with the same weight and bias (one decision and one solve per weight)."""
    first: dict[bytes, str] = {}
    out = {}
    for l in layers:
        key = (l.weight.dtype.str.encode() + repr(l.weight.shape).encode() + l.weight.tobytes()
               + np.asarray(l.bias, np.float64).tobytes())
        out[l.name] = first.setdefault(key, l.name)
    return out


def _weight_error(w: np.ndarray, dense: np.ndarray) -> float:
    w64 = np.asarray(w, dtype=np.float64)
    n = np.linalg.norm(w64)
    return float(np.linalg.norm(w64 - dense) / n) if n > 0 else 0.0


def calibrate_layers(work: WorkingModel, layers: Sequence[Layer], choices: Mapping[str, Pick],
                     calib: CalibrationSet, targets: Targets, *, rows: int, seed: int, progress=None,
                     ) -> tuple[dict[str, LayerResult], dict[str, tuple[list[Stage], np.ndarray]]]:
    """Solve the last stage and bias of every chosen layer on activations of the partly rewritten
    model (``work`` is updated layer by layer).  Returns per-layer results and the calibrated
    (stages, bias) — float64, exact layers as their SVD factors."""
    chosen = [l for l in layers if l.name in choices]
    results: dict[str, LayerResult] = {}
    solved: dict[str, tuple[list[Stage], np.ndarray]] = {}
    todo = []

    def factored(layer):
        scheme, r, variant = choices[layer.name]
        stages = get_scheme(scheme).factor(layer.w64, layer.geo, r, variant)
        dense = compose(stages, layer.geo)
        return stages, dense, _weight_error(layer.weight, dense)

    for layer, (stages, dense, err_svd) in zip(chosen, parallel_map(factored, chosen)):  # numpy: one per core
        scheme, r, variant = choices[layer.name]
        macs = stages_macs(layer.geo, stages)
        if err_svd <= exact_tolerance(layer.weight.dtype):
            results[layer.name] = LayerResult(layer.name, scheme, r, layer.geo.macs, macs, err_svd, err_svd,
                                              0.0, 0.0, None, None, exact=True, variant=variant)
            solved[layer.name] = (stages, layer.bias)
            work.set(layer.name, dense, layer.bias)
        else:
            todo.append((layer, stages))
    unit_of = weight_units(chosen)
    groups = waves(work.model, [l for l, _ in todo], unit_of)
    stage_of = {l.name: s for l, s in todo}
    task = progress.add_task("calibrating layers", total=len(todo)) if progress else None
    for wave_index, wave in enumerate(groups):
        names = list(dict.fromkeys(l.x_name for l in wave))
        session = work.session(names, prefix=True)
        eqs = {}
        for l in wave:  # one system per unit: every conv sharing a weight adds its rows to it
            if unit_of[l.name] not in eqs:
                last = stage_of[l.name][-1]
                members = sum(1 for m in wave if unit_of[m.name] == unit_of[l.name])
                expected = members * calib.samples * l.rows_per_sample(rows, calib.samples)
                eqs[unit_of[l.name]] = new_system(last.group, last.in_per_group * prod(last.kernel),
                                                  last.out_channels // last.group, expected)
        offsets = BatchOffsets()

        def add_run(unit_rows, values):
            """One run's rows of a unit's convs into its system (in wave order: the system is the
            task's own, so units run side by side)."""
            for l, start, pos, y, smp in unit_rows:
                stages = stage_of[l.name]
                patches = gather_patches(values[l.x_name], l.geo, smp - start, pos)
                z = last_stage_design(patches, stages)
                add_rows(eqs[unit_of[l.name]], z, grouped_targets(y, stages[-1]), folds_of(smp, calib.samples))

        for values in iterate_runs(session, calib, names):
            by_unit: dict[str, list] = {}
            for l in wave:
                b = int(values[l.x_name].shape[0])
                start = offsets.take(l.name, b)
                order = sorted(range(b), key=lambda j: ((start + j) % 2, j))  # rows of one fold together
                got = [targets.get(l.name, start + j) for j in order]
                pos = np.concatenate([p for p, _ in got])
                y = np.concatenate([t for _, t in got])
                smp = np.concatenate([np.full(len(p), start + j) for j, (p, _) in zip(order, got)])
                by_unit.setdefault(unit_of[l.name], []).append((l, start, pos, y, smp))
            # Designs and normal equations are numpy that releases the GIL: one unit per core.
            parallel_map(lambda unit_rows: add_run(unit_rows, values), list(by_unit.values()))
        del session

        def fit(l):
            eq = eqs[unit_of[l.name]]
            x0 = pack_last(stage_of[l.name], l.bias)
            x, lam, err = solve_cv(eq, x0)
            return x, lam, err, svd_error(eq, x0)

        leads = {}
        for l in wave:  # each unit's first conv (its stages and bias are the unit's)
            leads.setdefault(unit_of[l.name], l)
        fits = dict(zip(leads, parallel_map(fit, list(leads.values()))))  # one unit per core
        eqs.clear()
        for l in wave:
            unit = unit_of[l.name]
            stages = stage_of[l.name]
            x, lam, err, err_svd = fits[unit]
            new, bias = unpack_last(stages, x)
            dense = compose(new, l.geo)
            work.set(l.name, dense, bias)
            solved[l.name] = (new, bias)
            scheme, r, variant = choices[l.name]
            results[l.name] = LayerResult(
                l.name, scheme, r, l.geo.macs, stages_macs(l.geo, stages),
                _weight_error(l.weight, dense), _weight_error(l.weight, compose(stages, l.geo)), err, err_svd,
                lam, wave_index, variant=variant)
            if progress:
                progress.advance(task)
    return results, solved


__all__ = ["LayerResult", "Pick", "calibrate_layers", "upstream_layers", "waves", "weight_units"]
