r"""Data-aware factorization: calibration samples, activations, least squares, sensitivities.

A weight-only factorization keeps the top singular directions of a weight; a trained network
does not weigh all directions of its weights equally, because its activations are far from
isotropic.  Calibration runs the model on sample inputs and chooses factors that reconstruct
each rewritten convolution's *output* on those inputs.

For a chain of stages ``x → F₁ → … → F_{k−1} → S → y`` (see :mod:`sepify.factorize`), the first
stages ``F`` stay as the SVD gives them (the depthwise / pointwise / kh×1 factor) and the last
stage ``S`` and the bias are solved by ridge least squares, per group of ``S``:

.. math::  \min_{S, b} \sum_{p} \lVert S\,F(\hat x_p) + b - y_p \rVert^2 + λ \lVert D^{1/2}([S, b] - [S_0, b_0]) \rVert^2

where ``y_p`` is the original (BatchNorm-folded) conv's output at position ``p`` computed from
the *original* model's activations, ``\hat x_p`` the input patch in the model whose earlier
layers are already rewritten (asymmetric reconstruction, Zhang et al. 2015: errors do not
compound), ``[S₀, b₀]`` the weight-only solution and ``D = diag`` of the Gram matrix.  The ridge
pulls toward the weight-only factors, so an exact low-rank weight is reproduced exactly and
``λ → ∞`` is weight-only SVD; λ is chosen per layer by two-fold cross-validation over the
samples.  Which stage is "last" per scheme: dw-pw → the pointwise conv (it sees the depthwise
outputs); pw-dw → the grouped k-conv; spatial → the second 1-D conv (1×kw or kh×1); chained
chains → their last 1-D stage.

Layers are calibrated in *waves*: every planned layer whose input does not depend on a layer
still pending is calibrated from one pass over the samples, then its weights are replaced in the
working model by the dense weight its chain computes (the same math as the rewritten chain).

Memory stays bounded: onnxruntime exposes only the tensors one wave needs, and each layer keeps
``rows`` sampled output positions (a fixed budget spread over the samples) as normal equations.

Drift (what ``--max-drift`` bounds and the sweep plots) is ``1 − cosine`` between the original
and the rewritten model's output tensor over all samples (the cosine ``sepify verify`` prints),
averaged over the model's float outputs.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import UsageError
from ..core.factorize import (SCHEMES, Stage, compose, exact_tolerance, factor, scheme_stages, split_kernel_stage,
                        stages_macs)
from ..core.geometry import ConvGeometry, prod
from ..model.graph import GraphView, attr, list_initializers_as_inputs
from ..model.load import LoadedModel, ModelSource, load_model

DEFAULT_SAMPLES = 32  # random calibration samples / cap on real ones
DEFAULT_ROWS = 4096  # sampled output positions per layer
DEFAULT_BATCH = 8  # samples per run when the batch dim is symbolic
RIDGE_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
CURVE_RIDGE = 1e-3  # ridge of the per-rank error curves (the final solve cross-validates)
MAX_CURVE_RANKS = 16  # ranks evaluated per scheme (a geometric grid beyond that)
GRAM_BUDGET = 768 << 20  # bytes of normal equations held at once in the reference pass
SENSITIVITY_TARGET = 0.3  # relative output error of the perturbation used to measure sensitivity


# ----------------------------------------------------------------------------------------------
# Calibration data
# ----------------------------------------------------------------------------------------------
@dataclass
class CalibrationSet:
    """Model-ready batches (``feeds``) and where they came from."""

    feeds: list[dict[str, np.ndarray]]
    source: str
    samples: int  # batch entries over all feeds

    @property
    def batch_sizes(self) -> list[int]:
        return [int(next(iter(f.values())).shape[0]) if f else 1 for f in self.feeds]


def _declared(vi: onnx.ValueInfoProto) -> list[int | None] | None:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]


def _np_dtype(vi: onnx.ValueInfoProto) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type or onnx.TensorProto.FLOAT))


def _read_arrays(path: Path, names: Sequence[str]) -> dict[str, list[np.ndarray]]:
    """name -> arrays, from an .npz, an .npy (single-input models) or a folder of them (sorted)."""
    files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy")) if path.is_dir() else [path]
    if path.is_dir() and not files:
        raise UsageError(f"{path}: folder holds no .npy/.npz files")
    found: dict[str, list[np.ndarray]] = {}
    for f in files:
        try:
            if f.suffix == ".npz":
                with np.load(f, allow_pickle=False) as data:
                    for k in data.files:
                        found.setdefault(k, []).append(data[k])
            elif f.suffix == ".npy":
                key = f.stem if f.stem in names or len(names) != 1 else names[0]
                found.setdefault(key, []).append(np.load(f, allow_pickle=False))
            else:
                raise UsageError(f"{f}: calibration data must be .npz, .npy or a folder of them")
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"{f}: cannot read calibration data ({str(exc).strip().splitlines()[0]})") from None
    return found


def _split_samples(name: str, arrays: list[np.ndarray], declared: list[int | None] | None) -> list[np.ndarray]:
    """Per-sample arrays shaped like one model feed (leading batch dim kept)."""
    out: list[np.ndarray] = []
    rank = len(declared) if declared is not None else None
    b0 = declared[0] if declared else None
    for a in arrays:
        if rank is not None and a.ndim == rank + 1:
            out.extend(a[i] for i in range(a.shape[0]))
        elif rank is None or a.ndim == rank:
            step = b0 or 1
            if a.shape[0] % step:
                raise UsageError(f"calibration input {name!r}: {a.shape[0]} rows do not fill batches of {step}")
            out.extend(a[i:i + step] for i in range(0, a.shape[0], step))
        else:
            raise UsageError(f"calibration input {name!r}: array of rank {a.ndim} for an input of rank {rank} "
                             f"(give [samples, ...input dims] or stack samples on the batch axis)")
    if declared is not None:
        for s in out[:1]:
            bad = [i for i, (d, v) in enumerate(zip(declared, s.shape)) if d is not None and d != v]
            if len(s.shape) != len(declared) or bad:
                raise UsageError(f"calibration input {name!r}: sample shape {list(s.shape)} does not fit the "
                                 f"declared {['?' if d is None else d for d in declared]}")
    return out


def load_calibration(data, model: ModelSource | LoadedModel, input_shapes=None, *, samples: int | None = None,
                     seed: int = 0, value_range: tuple[float, float] | None = None,
                     batch: int = DEFAULT_BATCH, input_values=None) -> CalibrationSet:
    """Calibration batches for ``model``.

    ``data``: ``"random"`` (``samples`` seeded inputs: floats N(0, 1) as ``sepify verify`` draws them, or
    uniform in ``value_range`` when given; integers in [0, 10)), a mapping name → array, or a path: an
    ``.npz`` keyed by input name, an ``.npy`` (one
    input), or a folder of them (arrays of the same input are concatenated in file-name order).
    Each array's first axis is the sample axis: ``[S, *input dims]``, or samples stacked on the
    batch axis (``[S·b, …]`` for a fixed batch ``b``).  A model whose batch dim is fixed gets
    samples of that batch one run at a time; a symbolic batch takes up to ``batch`` samples a run.
    ``input_values`` (see :func:`sepify.audit`) fix those inputs of random samples; given data wins
    and must agree with them.
    """
    from ..model.shapes import cast_input_values, check_values_agree, normalize_input_shapes, resolve_input_shapes
    from ..model.shapes import resolve_input_values

    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    view = GraphView(loaded.model)
    inputs = view.main_inputs
    names = [i.name for i in inputs]
    declared = {i.name: _declared(i) for i in inputs}
    dtypes = {i.name: _np_dtype(i) for i in inputs}
    if isinstance(data, str) and data.startswith("random"):
        n = samples or DEFAULT_SAMPLES
        shapes, _ = resolve_input_shapes(view, normalize_input_shapes(input_shapes, names))
        fixed = resolve_input_values(view, input_values, shapes)
        rng = np.random.default_rng(seed)
        per_input: dict[str, list[np.ndarray]] = {}
        for name in names:
            dt = dtypes[name]
            if np.issubdtype(dt, np.floating) and value_range is not None:
                arr = rng.uniform(value_range[0], value_range[1], size=(n, *shapes[name])).astype(dt)
            elif np.issubdtype(dt, np.floating):
                arr = rng.standard_normal(size=(n, *shapes[name])).astype(dt)
            elif dt == np.bool_:
                arr = rng.integers(0, 2, size=(n, *shapes[name])).astype(dt)
            else:
                arr = rng.integers(0, 10, size=(n, *shapes[name])).astype(dt)
            per_input[name] = list(arr) if name not in fixed else [fixed[name].copy() for _ in range(n)]
        dist = "N(0, 1)" if value_range is None else f"uniform {value_range[0]:g}..{value_range[1]:g}"
        source = f"random ({n} samples, seed {seed}, {dist}" + (f"; {', '.join(fixed)} fixed" if fixed else "") + ")"
    else:
        if isinstance(data, Mapping):
            raw = {k: [np.asarray(v)] for k, v in data.items()}
            source = "given arrays"
        else:
            path = Path(data)
            if not path.exists():
                raise UsageError(f"{path}: no such calibration data")
            raw = _read_arrays(path, names)
            source = str(path)
        missing = [n for n in names if n not in raw]
        if missing:
            raise UsageError(f"{source}: no calibration array for input(s) {', '.join(missing)} "
                             f"(has {', '.join(raw) or 'none'})")
        fixed = cast_input_values(view, input_values)
        for name in fixed:
            for a in raw.get(name, []):
                check_values_agree({name: a}, fixed, source)
        per_input = {n: _split_samples(n, raw[n], declared[n]) for n in names}
        for n, arrays in per_input.items():
            odd = next((a.shape for a in arrays if a.shape != arrays[0].shape), None)
            if odd is not None:
                raise UsageError(f"{source}: calibration samples of input {n!r} differ in shape "
                                 f"({list(arrays[0].shape)} and {list(odd)}); calibrate at one shape")
        counts = {len(v) for v in per_input.values()}
        if len(counts) != 1:
            raise UsageError(f"{source}: inputs have different sample counts "
                             f"({', '.join(f'{k}: {len(v)}' for k, v in per_input.items())})")
        if samples:
            per_input = {k: v[:samples] for k, v in per_input.items()}
    n = len(next(iter(per_input.values()))) if per_input else 0
    if n == 0:
        raise UsageError(f"{source}: no calibration samples")
    for name in names:
        if np.issubdtype(dtypes[name], np.floating):
            per_input[name] = [np.asarray(a, dtype=dtypes[name]) for a in per_input[name]]
    # Batch dim symbolic on every input (and samples of batch 1): several samples per run.
    symbolic = all(declared[n] and declared[n][0] is None for n in names)
    per_run = max(1, batch) if symbolic and all(a.shape[0] == 1 for n in names for a in per_input[n][:1]) else 1
    feeds = []
    for start in range(0, n, per_run):
        feeds.append({name: np.concatenate(per_input[name][start:start + per_run], axis=0) if per_run > 1
                      else per_input[name][start] for name in names})
    total = sum(int(next(iter(f.values())).shape[0]) for f in feeds)
    return CalibrationSet(feeds, source, total)


# ----------------------------------------------------------------------------------------------
# BatchNormalization folding
# ----------------------------------------------------------------------------------------------
def _fresh(used: set[str], base: str) -> str:
    name, k = base, 1
    while name in used:
        k += 1
        name = f"{base}_{k}"
    used.add(name)
    return name


def _all_names(model: onnx.ModelProto) -> set[str]:
    from ..model.load import iter_all_tensors

    view = GraphView(model)
    used = {r.node.name for r in view.nodes} | set(view.producer) | set(view.consumers)
    return used | {t.name for t in iter_all_tensors(model)} | {i.name for i in model.graph.input}


def fold_batchnorms(model: onnx.ModelProto, only: Iterable[str] | None = None) -> tuple[onnx.ModelProto, list[dict[str, str]]]:
    """Fold every ``Conv → BatchNormalization`` pair of the main graph whose BN is the conv output's
    only reader (and the conv output no graph output) into the conv: ``W' = W·s``,
    ``b' = (b − mean)·s + β`` with ``s = γ/√(var + ε)``, computed in float64.  The conv then writes
    the BN's output tensor and the BN node is gone.  ``only``: names of the convs to consider.

    Returns a new model (the input is not modified) and the folded ``{"conv", "bn"}`` pairs.
    """
    view = GraphView(model)
    graph_outputs = {o.name for o in model.graph.output}
    wanted = set(only) if only is not None else None
    pairs = []
    for ref in view.nodes:
        node = ref.node
        if ref.scope or node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        if wanted is not None and ref.qualified_name not in wanted:
            continue
        y = node.output[0]
        readers = view.consumers.get(y, [])
        if y in graph_outputs or len(readers) != 1:
            continue
        bn_ref = readers[0]
        bn = bn_ref.node
        if bn_ref.scope or bn.op_type != "BatchNormalization" or bn.input[0] != y or len(bn.input) != 5:
            continue
        if attr(bn, "training_mode", 0) or any(o for o in bn.output[1:]):
            continue
        consts = [view.constant(n, bn_ref) for n in bn.input[1:]]
        w = view.constant(node.input[1], ref)
        b = view.constant(node.input[2], ref) if len(node.input) > 2 and node.input[2] else None
        if any(c is None for c in consts) or w is None or (len(node.input) > 2 and node.input[2] and b is None):
            continue
        if w.value.dtype not in (np.float32, np.float16, np.float64) or w.value.ndim < 3:
            continue
        pairs.append((ref, bn_ref, w.value, None if b is None else b.value, [c.value for c in consts]))
    if not pairs:
        return model, []
    out = onnx.ModelProto()
    out.CopyFrom(model)
    used = _all_names(model)
    nodes = list(out.graph.node)
    drop = set()
    folded = []
    for ref, bn_ref, w, b, (gamma, beta, mean, var) in pairs:
        eps = float(attr(bn_ref.node, "epsilon", 1e-5))
        s = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
        w2 = w.astype(np.float64) * s.reshape(-1, *([1] * (w.ndim - 1)))
        b0 = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
        b2 = (b0 - mean.astype(np.float64)) * s + beta.astype(np.float64)
        conv = nodes[ref.index]
        wn = _fresh(used, f"{conv.input[1]}/bnfold")
        bname = _fresh(used, f"{conv.input[1]}/bnfold_bias")
        out.graph.initializer.extend([numpy_helper.from_array(w2.astype(w.dtype), wn),
                                      numpy_helper.from_array(b2.astype(w.dtype), bname)])
        while len(conv.input) < 3:
            conv.input.append("")
        conv.input[1], conv.input[2] = wn, bname
        conv.output[0] = bn_ref.node.output[0]
        drop.add(bn_ref.index)
        folded.append({"conv": ref.qualified_name, "bn": bn_ref.qualified_name})
    replaced = {name for ref, bn_ref, *_ in pairs for name in list(ref.node.input[1:3]) + list(bn_ref.node.input[1:])}
    del out.graph.node[:]
    out.graph.node.extend(n for i, n in enumerate(nodes) if i not in drop)
    # Initializers and Constant nodes nothing reads any more (the BN's parameters, replaced conv
    # weights) go.
    read = {i for n in out.graph.node for i in n.input} | {o.name for o in out.graph.output}
    for n in out.graph.node:
        for a in n.attribute:
            for sub in ([a.g] if a.HasField("g") else list(a.graphs)):
                read |= _subgraph_reads(sub)
    dead = [n for n in out.graph.node if n.op_type == "Constant" and n.output[0] in replaced and n.output[0] not in read]
    for n in dead:
        out.graph.node.remove(n)
    keep = [t for t in out.graph.initializer if t.name in read]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    vis = [v for v in out.graph.value_info if v.name != "" and v.name not in {p[0].node.output[0] for p in pairs}]
    del out.graph.value_info[:]
    out.graph.value_info.extend(vis)
    # Inputs that only listed a dropped initializer (IR 3 lists every initializer as an input) go;
    # real inputs stay even when unread, so the model's interface does not change.
    was_init = {t.name for t in model.graph.initializer}
    graph_inputs = [i for i in out.graph.input if i.name in read or i.name not in was_init]
    del out.graph.input[:]
    out.graph.input.extend(graph_inputs)
    if out.ir_version < 4:
        list_initializers_as_inputs(out.graph, model.graph.input)
    return out, folded


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    names = set()
    for n in graph.node:
        names.update(n.input)
        for a in n.attribute:
            for sub in ([a.g] if a.HasField("g") else list(a.graphs)):
                names |= _subgraph_reads(sub)
    return names


# ----------------------------------------------------------------------------------------------
# Patches, windows and the least-squares systems
# ----------------------------------------------------------------------------------------------
def positions(seed: int, layer: int, sample: int, n_out: int, k: int) -> np.ndarray:
    """``k`` distinct output positions (flat indices into the output's spatial grid) for one sample."""
    if k >= n_out:
        return np.arange(n_out)
    rng = np.random.default_rng([seed, layer, sample])
    return np.sort(rng.choice(n_out, size=k, replace=False))


def gather_patches(x: np.ndarray, geo: ConvGeometry, batch_index: np.ndarray, flat_out: np.ndarray) -> np.ndarray:
    """Input patches ``[R, C, *kernel]`` of the output positions ``flat_out`` (row-major over the
    output spatial grid) of batch entries ``batch_index``: the conv's dilated receptive fields,
    zero outside the input (its padding)."""
    d = geo.rank
    pads = [(0, 0), (0, 0)] + [(geo.pads[a], geo.pads[d + a]) for a in range(d)]
    xp = np.pad(x, pads) if any(geo.pads) else x
    coords = np.unravel_index(flat_out, geo.out_spatial)
    r = len(flat_out)
    index: list[np.ndarray] = [np.asarray(batch_index).reshape((r,) + (1,) * d)]
    for a in range(d):
        shape = [r] + [1] * d
        shape[1 + a] = geo.kernel[a]
        idx = coords[a][:, None] * geo.strides[a] + np.arange(geo.kernel[a])[None, :] * geo.dilations[a]
        index.append(idx.reshape(shape))
    # xp[b, :, i, j] with advanced indices around a slice: the advanced dims come first.
    patches = xp[(index[0], slice(None), *index[1:])]  # [R, k..., C]
    return np.moveaxis(patches, -1, 1)


def apply_stage(window: np.ndarray, stage: Stage) -> np.ndarray:
    """One stage of a chain applied to windows ``[R, C_in, w…]``: the stage sums its kernel over
    its own axes (whose window length equals its kernel), the other axes are carried along.
    Computed as one batched matrix product per group, in the window's dtype."""
    r, d = window.shape[0], window.ndim - 2
    g, ip = stage.group, stage.in_per_group
    op = stage.out_channels // g
    axes = [a for a in range(d) if a in stage.axes]
    kept = [a for a in range(d) if a not in stage.axes]
    dims = window.shape[2:]
    t = window.reshape(r, g, ip, *dims)
    # [g, r, kept…, ip, axes…] -> [g, r·kept, ip·axes]
    order = [1, 0] + [3 + a for a in kept] + [2] + [3 + a for a in axes]
    t = t.transpose(order).reshape(g, r * prod(dims[a] for a in kept), ip * prod(dims[a] for a in axes))
    w = np.asarray(stage.weight).reshape(g, op, ip * prod(stage.kernel[a] for a in axes)).astype(window.dtype, copy=False)
    out = np.matmul(t, w.transpose(0, 2, 1))  # [g, r·kept, op]
    out = out.reshape(g, r, *[dims[a] for a in kept], op)
    out = np.moveaxis(out, -1, 1).transpose([2, 0, 1] + list(range(3, 3 + len(kept))))  # [r, g, op, kept…]
    shape = [r, g * op] + [1 if a in stage.axes else dims[a] for a in range(d)]
    return out.reshape(shape)


def last_stage_design(patches: np.ndarray, stages: Sequence[Stage], dtype=np.float64) -> np.ndarray:
    """The last stage's inputs at each row, per group: ``[g, R, ip·K]``."""
    z = np.asarray(patches, dtype=dtype)
    for st in stages[:-1]:
        z = apply_stage(z, st)
    last = stages[-1]
    r = z.shape[0]
    g, ip = last.group, last.in_per_group
    # Window axes the last stage does not convolve have length 1 by now.
    z = z.reshape(r, g, ip * prod(last.kernel))
    return np.ascontiguousarray(z.transpose(1, 0, 2))


class NormalEquations:
    """Per-group normal equations of ``[Z, 1]·X ≈ Y`` in two folds (for ridge cross-validation).

    ``A[f, q] = Σ [z,1]ᵀ[z,1]``, ``B[f, q] = Σ [z,1]ᵀ y``, ``yy[f, q] = Σ ‖y‖²`` over the rows of fold f.
    Rows are buffered and folded in by blocks (few large products instead of many small ones).
    """

    BLOCK_BYTES = 64 << 20  # buffered design rows per fold

    def __init__(self, groups: int, d: int, outs: int, dtype=np.float64):
        self.A = np.zeros((2, groups, d + 1, d + 1))
        self.B = np.zeros((2, groups, d + 1, outs))
        self.yy = np.zeros((2, groups))
        self.rows = [0, 0]
        self.dtype = np.dtype(dtype)  # of the products (float32: twice as fast, sums still in float64)
        self._buf: list[list[tuple[np.ndarray, np.ndarray]]] = [[], []]
        self._buffered = [0, 0]
        self.block = max(64, min(8192, self.BLOCK_BYTES // max(1, groups * (d + 1 + outs) * self.dtype.itemsize)))

    @property
    def nbytes(self) -> int:
        return self.A.nbytes + self.B.nbytes

    def add(self, fold: int, z: np.ndarray, y: np.ndarray) -> None:
        """``z``: ``[g, R, d]``; ``y``: ``[g, R, outs]``."""
        self._buf[fold].append((z, y))
        self._buffered[fold] += z.shape[1]
        self.rows[fold] += z.shape[1]
        if self._buffered[fold] >= self.block:
            self._flush(fold)

    def _flush(self, fold: int) -> None:
        if not self._buf[fold]:
            return
        g, d = self.A.shape[1], self.A.shape[2] - 1
        n = self._buffered[fold]
        za = np.empty((g, n, d + 1), dtype=self.dtype)
        y = np.empty((g, n, self.B.shape[3]), dtype=self.dtype)
        at = 0
        for zb, yb in self._buf[fold]:
            k = zb.shape[1]
            za[:, at:at + k, :d] = zb
            y[:, at:at + k] = yb
            at += k
        za[:, :, d] = 1.0
        self._buf[fold], self._buffered[fold] = [], 0
        zt = za.transpose(0, 2, 1)
        self.A[fold] += zt @ za
        self.B[fold] += zt @ y
        y64 = y.astype(np.float64, copy=False)
        self.yy[fold] += np.einsum("grk,grk->g", y64, y64)

    def flush(self) -> "NormalEquations":
        self._flush(0)
        self._flush(1)
        return self


def _ridge_terms(a: np.ndarray, lam: float) -> np.ndarray:
    """``λ·(diag(A) + floor)`` per column: the ridge weights toward the weight-only solution."""
    diag = np.diagonal(a, axis1=1, axis2=2)
    floor = 1e-9 * np.maximum(diag.mean(axis=1, keepdims=True), 1e-30)
    return lam * (diag + floor)


def _solve(a: np.ndarray, b: np.ndarray, x0: np.ndarray, lam: float) -> np.ndarray:
    """``argmin ‖[Z,1]X − Y‖² + λ Σ D_ii ‖X_i − X0_i‖²`` with ``D = diag(A)`` (+ a floor), batched over groups."""
    if not np.isfinite(lam):
        return x0.copy()
    dreg = _ridge_terms(a, lam)
    lhs = a + dreg[:, :, None] * np.eye(a.shape[1])[None]
    rhs = b + dreg[:, :, None] * x0
    try:
        return np.linalg.solve(lhs, rhs)
    except np.linalg.LinAlgError:
        return np.stack([np.linalg.lstsq(l, r, rcond=None)[0] for l, r in zip(lhs, rhs)])


def _sq_error(x: np.ndarray, a: np.ndarray, b: np.ndarray, yy: np.ndarray) -> float:
    """``Σ ‖[Z,1]X − Y‖²`` from the normal equations (clipped at 0 against rounding)."""
    e = yy.sum() - 2 * float((x * b).sum()) + float((x * (a @ x)).sum())
    return float(max(e, 0.0))


def solve_ridge_cv(eq: NormalEquations, x0: np.ndarray, mask: np.ndarray | None = None,
                   grid: Sequence[float] = RIDGE_GRID) -> tuple[np.ndarray, float, float]:
    """Cross-validated ridge solve.  ``mask`` selects the columns (rank) in use, bias always kept.

    Returns ``(X, λ, relative validation error)``; ``λ = inf`` means the weight-only solution won.
    """
    eq.flush()
    cols = np.flatnonzero(np.append(mask, True)) if mask is not None else np.arange(eq.A.shape[2])
    a = eq.A[:, :, cols[:, None], cols[None, :]]
    b = eq.B[:, :, cols, :]
    x0c = x0[:, cols, :]
    total_yy = float(eq.yy.sum())
    candidates = list(grid) + [math.inf]
    both = eq.rows[0] > 0 and eq.rows[1] > 0
    if not both:
        lam = CURVE_RIDGE
        x = _solve(a.sum(0), b.sum(0), x0c, lam)
        err = _sq_error(x, a.sum(0), b.sum(0), eq.yy.sum(0))
        return _expand(x, cols, x0), lam, math.sqrt(err / total_yy) if total_yy > 0 else 0.0
    scores = []
    for lam in candidates:
        e = 0.0
        for f in (0, 1):
            x = _solve(a[f], b[f], x0c, lam)
            e += _sq_error(x, a[1 - f], b[1 - f], eq.yy[1 - f])
        scores.append(e)
    best = int(np.argmin(scores))
    lam = candidates[best]
    x = _solve(a[0] + a[1], b[0] + b[1], x0c, lam)
    return _expand(x, cols, x0), lam, math.sqrt(scores[best] / total_yy) if total_yy > 0 else 0.0


def rank_curve(eq: NormalEquations, x0: np.ndarray, inner: np.ndarray, ranks: Sequence[int],
               lam: float = CURVE_RIDGE) -> tuple[list[float], list[float]]:
    """Relative output error per rank of the ridge solution (two-fold validation) and of ``x0``.

    ``inner[j]``: the rank index of unknown ``j`` (the bias, last, has 0).  With the unknowns
    ordered rank-major, rank ``r`` uses a leading block, so one Cholesky factor ``L`` per fold
    serves every rank: the leading block of ``L⁻¹`` is the inverse of the leading block of ``L``.
    """
    eq.flush()
    order = np.lexsort((np.arange(len(inner)), inner))
    order = np.concatenate([[len(inner) - 1], order[order != len(inner) - 1]])  # bias first
    a = eq.A[:, :, order[:, None], order[None, :]]
    b = eq.B[:, :, order, :]
    x0o = x0[:, order, :]
    sizes = [int(np.count_nonzero(inner[order] < r)) for r in ranks]
    total = float(eq.yy.sum())
    if total <= 0:
        return [0.0] * len(ranks), [0.0] * len(ranks)
    a_all, b_all, yy_all = a.sum(0), b.sum(0), eq.yy.sum(0)
    base = [math.sqrt(_sq_error(x0o[:, :k], a_all[:, :k, :k], b_all[:, :k], yy_all) / total) for k in sizes]
    folds = (0, 1) if eq.rows[0] > 0 and eq.rows[1] > 0 else (None,)
    errs = np.zeros(len(ranks))
    for f in folds:
        af, bf = (a[f], b[f]) if f is not None else (a_all, b_all)
        av, bv, yv = (a[1 - f], b[1 - f], eq.yy[1 - f]) if f is not None else (a_all, b_all, yy_all)
        dreg = _ridge_terms(af, lam)
        lhs = af + dreg[:, :, None] * np.eye(af.shape[1])[None]
        rhs = bf + dreg[:, :, None] * x0o
        try:
            linv = np.linalg.inv(np.linalg.cholesky(lhs))
        except np.linalg.LinAlgError:
            linv = None
        for i, k in enumerate(sizes):
            if linv is not None:
                li = linv[:, :k, :k]
                x = li.transpose(0, 2, 1) @ (li @ rhs[:, :k])
            else:
                x = _solve(af[:, :k, :k], bf[:, :k], x0o[:, :k], lam)
            errs[i] += _sq_error(x, av[:, :k, :k], bv[:, :k], yv)
    return [math.sqrt(e / total) for e in errs], base


def _expand(x: np.ndarray, cols: np.ndarray, like: np.ndarray) -> np.ndarray:
    full = np.zeros_like(like)
    full[:, cols, :] = x
    return full


def pack_last(stages: Sequence[Stage], bias: np.ndarray) -> np.ndarray:
    """The last stage's weight and ``bias`` as the unknowns ``X[g, ip·K + 1, op]``."""
    last = stages[-1]
    g = last.group
    op = last.out_channels // g
    w = np.asarray(last.weight, dtype=np.float64).reshape(g, op, -1).transpose(0, 2, 1)
    return np.concatenate([w, np.asarray(bias, dtype=np.float64).reshape(g, 1, op)], axis=1)


def unpack_last(stages: Sequence[Stage], x: np.ndarray) -> tuple[list[Stage], np.ndarray]:
    last = stages[-1]
    w = x[:, :-1, :].transpose(0, 2, 1).reshape(last.out_channels, last.in_per_group, *last.kernel)
    return [*stages[:-1], replace(last, weight=w)], x[:, -1, :].reshape(-1)


def rank_inner(stages: Sequence[Stage], r_max: int) -> np.ndarray:
    """Rank index of every unknown of the last stage (bias last, index 0), for a rank-``r_max`` chain."""
    last = stages[-1]
    k = prod(last.kernel)
    col = np.arange(last.in_per_group * k)
    return np.append((col // k) % r_max, 0)


def rank_mask(stages: Sequence[Stage], r_max: int, r: int) -> np.ndarray:
    """Columns of the last stage's unknowns that a rank-``r`` chain uses, within a rank-``r_max``
    one whose rank index is the innermost of the last stage's per-group inputs."""
    last = stages[-1]
    k = prod(last.kernel)
    col = np.arange(last.in_per_group * k)
    return ((col // k) % r_max) < r


def truncate(stages: Sequence[Stage], geo: ConvGeometry, scheme: str, r_max: int, r: int) -> list[Stage]:
    """The rank-``r`` chain inside a rank-``r_max`` one (the SVD factors are nested)."""
    small = scheme_stages(geo, scheme, r)
    out = []
    for big, st in zip(stages, small):
        w = np.asarray(big.weight)
        if st.out_channels != big.out_channels:  # first stage: channel (…, j) with j the rank index
            w = w.reshape(-1, r_max, *w.shape[1:])[:, :r].reshape(st.out_channels, *w.shape[1:])
        if st.in_per_group != big.in_per_group:
            w = w.reshape(w.shape[0], -1, r_max, *w.shape[2:])[:, :, :r].reshape(w.shape[0], st.in_per_group, *w.shape[2:])
        out.append(replace(st, weight=w, kernel=big.kernel, axes=big.axes, role=big.role))
    return out


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------
@dataclass
class Layer:
    """One candidate conv of the main graph (BatchNorm already folded)."""

    index: int
    name: str  # qualified
    node_name: str
    geo: ConvGeometry
    weight: np.ndarray  # stored dtype
    bias: np.ndarray  # float64 (zeros when the conv has none)
    x_name: str
    y_name: str
    spec: Any = field(repr=False, default=None)

    @property
    def w64(self) -> np.ndarray:
        return self.weight.astype(np.float64)

    def rows_per_sample(self, rows: int, samples: int) -> int:
        return max(1, min(prod(self.geo.out_spatial), math.ceil(rows / max(samples, 1))))


def candidate_ranks(geo: ConvGeometry, scheme: str, max_ranks: int = MAX_CURVE_RANKS) -> tuple[list[int], dict[int, int]]:
    """Ranks of ``scheme`` that cut MACs (all of them, or a geometric grid of ``max_ranks``), with their MACs."""
    per_rank = stages_macs(geo, scheme_stages(geo, scheme, 1))
    if per_rank <= 0:
        return [], {}
    r_top = (geo.macs - 1) // per_rank
    if r_top < 1:
        return [], {}
    if r_top <= max_ranks:
        ranks = list(range(1, r_top + 1))
    else:
        ranks = sorted({int(round(v)) for v in np.geomspace(1, r_top, max_ranks)})
    return ranks, {r: per_rank * r for r in ranks}


# ----------------------------------------------------------------------------------------------
# Running the model
# ----------------------------------------------------------------------------------------------
class WorkingModel:
    """The model with every candidate conv given its own weight and bias initializers, whose
    values can be replaced (the dense weight of a calibrated chain) without touching the source."""

    def __init__(self, model: onnx.ModelProto, layers: Sequence[Layer]):
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        used = _all_names(model)
        nodes = {n.name: n for n in self.model.graph.node if n.name}
        by_output = {n.output[0]: n for n in self.model.graph.node if n.output}
        self.slots: dict[str, tuple[onnx.TensorProto, onnx.TensorProto]] = {}
        for layer in layers:
            node = by_output.get(layer.y_name) or nodes.get(layer.node_name)
            wt = numpy_helper.from_array(layer.weight, _fresh(used, f"{node.input[1]}/calib"))
            bt = numpy_helper.from_array(layer.bias.astype(layer.weight.dtype), _fresh(used, f"{node.input[1]}/calib_bias"))
            self.model.graph.initializer.extend([wt, bt])
            while len(node.input) < 3:
                node.input.append("")
            node.input[1], node.input[2] = wt.name, bt.name
            self.slots[layer.name] = (self.model.graph.initializer[-2], self.model.graph.initializer[-1])
        self.original = {k: (onnx.TensorProto(), onnx.TensorProto()) for k in self.slots}
        for k, (wt, bt) in self.slots.items():
            self.original[k][0].CopyFrom(wt)
            self.original[k][1].CopyFrom(bt)

    def set(self, name: str, weight: np.ndarray, bias: np.ndarray) -> None:
        wt, bt = self.slots[name]
        dtype = numpy_helper.to_array(wt).dtype
        wt.CopyFrom(numpy_helper.from_array(np.asarray(weight).astype(dtype), wt.name))
        bt.CopyFrom(numpy_helper.from_array(np.asarray(bias).astype(dtype), bt.name))

    def reset(self, name: str) -> None:
        wt, bt = self.slots[name]
        wt.CopyFrom(self.original[name][0])
        bt.CopyFrom(self.original[name][1])

    def session(self, extra_outputs: Sequence[str] = (), threads: int | None = None):
        from ..pipeline.verify import make_session

        return make_session(self.model, extra_outputs, threads=threads)


def float_outputs(model: onnx.ModelProto) -> list[str]:
    names = []
    for o in model.graph.output:
        et = o.type.tensor_type.elem_type
        if et in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16):
            names.append(o.name)
    return names


DRIFT_METRICS = ("channel", "cosine")
STD_FLOOR = 0.1


class DriftMeter:
    """``1 − cosine`` between reference and new outputs over all samples, mean over outputs.

    ``metric="cosine"``: the plain cosine of each output tensor (what ``sepify verify`` prints).
    ``metric="channel"``: each output channel (axis 1) is first standardized with the reference's
    mean and standard deviation of that channel, so channels in different units and offsets weigh
    alike — a detector's box coordinates (hundreds of pixels, offset by the anchor grid) would
    otherwise drown its class probabilities (0…1) in the plain cosine.  A channel's standard
    deviation counts as at least a tenth of its RMS, so nearly constant channels (logits of random
    inputs) are not blown up.
    """

    def __init__(self, reference: Sequence[Sequence[np.ndarray]], metric: str = "channel"):
        if metric not in DRIFT_METRICS:
            raise UsageError(f"unknown drift metric {metric!r} ({', '.join(DRIFT_METRICS)})")
        self.metric = metric
        self.reference = [[np.asarray(t, dtype=np.float64) for t in outs] for outs in reference]
        self.stats: list[tuple[np.ndarray, np.ndarray] | None] = []
        if self.reference:
            for i in range(len(self.reference[0])):
                first = self.reference[0][i]
                if metric != "channel" or first.ndim < 2:
                    self.stats.append(None)
                    continue
                c = first.shape[1]
                s1, s2, count = np.zeros(c), np.zeros(c), 0
                for outs in self.reference:
                    t = np.moveaxis(np.where(np.isfinite(outs[i]), outs[i], 0.0), 1, 0).reshape(c, -1)
                    s1 += t.sum(axis=1)
                    s2 += (t * t).sum(axis=1)
                    count += t.shape[1]
                mean = s1 / max(count, 1)
                rms = np.sqrt(s2 / max(count, 1))
                std = np.sqrt(np.maximum(rms * rms - mean * mean, 0.0))
                # A channel that barely varies over the samples is measured against a tenth of its size.
                floor = np.maximum(STD_FLOOR * rms, 1e-30)
                self.stats.append((mean, 1.0 / np.maximum(std, floor)))

    def _scaled(self, t: np.ndarray, i: int) -> np.ndarray:
        st = self.stats[i]
        if st is None:
            return t
        shape = (1, -1) + (1,) * (t.ndim - 2)
        return (t - st[0].reshape(shape)) * st[1].reshape(shape)

    def drift(self, outputs: Sequence[Sequence[np.ndarray]]) -> float:
        return float(np.mean(self.per_output(outputs))) if self.reference else 0.0

    def per_output(self, outputs: Sequence[Sequence[np.ndarray]]) -> list[float]:
        if not self.reference:
            return []
        k = len(self.reference[0])
        dots, na, nb = np.zeros(k), np.zeros(k), np.zeros(k)
        for ref, new in zip(self.reference, outputs):
            for i, (a, b) in enumerate(zip(ref, new)):
                b = np.asarray(b, dtype=np.float64)
                ok = np.isfinite(a) & np.isfinite(b)
                av, bv = self._scaled(np.where(ok, a, 0.0), i).ravel(), self._scaled(np.where(ok, b, 0.0), i).ravel()
                dots[i] += av @ bv
                na[i] += av @ av
                nb[i] += bv @ bv
        cos = np.where((na > 0) & (nb > 0), dots / np.sqrt(np.maximum(na * nb, 1e-300)), np.where(na == nb, 1.0, 0.0))
        return [float(v) for v in np.clip(1.0 - cos, 0.0, 2.0)]


def run_outputs(session, feeds: Sequence[Mapping[str, np.ndarray]], names: Sequence[str]) -> list[list[np.ndarray]]:
    inputs = {i.name for i in session.get_inputs()}
    return [session.run(list(names), {k: v for k, v in f.items() if k in inputs}) for f in feeds]


def _progress(enabled: bool):
    """A rich progress bar on stderr (a no-op object when disabled)."""
    if not enabled:
        return _NoProgress()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True)


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *a, **k):
        return 0

    def advance(self, *a, **k):
        pass

    def update(self, *a, **k):
        pass


# ----------------------------------------------------------------------------------------------
# The reference pass: targets, per-rank output-error curves, a probe per layer
# ----------------------------------------------------------------------------------------------
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

    def options(self) -> list[tuple[int, float, str, int]]:
        """(MACs, predicted drift, scheme, rank) of every candidate, predicted drift = s·e²."""
        s = self.sensitivity or 0.0
        out = []
        for c in self.curves.values():
            for r, m, e in zip(c.ranks, c.macs, c.error):
                out.append((m, s * e * e, c.scheme, r))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "macs": self.macs, "sensitivity": self.sensitivity, "probe_drift": self.probe_drift,
                "probe": None if self.probe is None else {"scheme": self.probe.scheme, "rank": self.probe.rank,
                                                          "output_error": self.probe.error},
                "curves": {k: v.to_dict() for k, v in self.curves.items()}}


class Targets:
    """Sampled output positions and the original conv outputs there, per layer and sample."""

    def __init__(self):
        self.rows: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}

    def put(self, layer: str, sample: int, pos: np.ndarray, y: np.ndarray) -> None:
        self.rows.setdefault(layer, {})[sample] = (pos, y.astype(np.float32))

    def get(self, layer: str, sample: int) -> tuple[np.ndarray, np.ndarray]:
        return self.rows[layer][sample]

    def drop(self, layer: str) -> None:
        self.rows.pop(layer, None)


def _folds(sample_of_row: np.ndarray, samples: int) -> np.ndarray:
    """Cross-validation fold of every row: by sample parity (rows of one image stay together),
    by row parity when there is a single sample."""
    if samples >= 2:
        return sample_of_row % 2
    return np.arange(len(sample_of_row)) % 2


def _grouped_y(y: np.ndarray, last: Stage, dtype=np.float64) -> np.ndarray:
    g = last.group
    return np.ascontiguousarray(y.reshape(y.shape[0], g, -1).transpose(1, 0, 2), dtype=dtype)


def _add_rows(eq: NormalEquations, z: np.ndarray, y: np.ndarray, folds: np.ndarray) -> None:
    for f in (0, 1):
        sel = np.flatnonzero(folds == f)
        if sel.size == 0:
            continue
        if sel.size == len(folds):
            eq.add(f, z, y)
        elif sel[-1] - sel[0] + 1 == sel.size:  # one run of rows: a view
            eq.add(f, z[:, sel[0]:sel[-1] + 1], y[:, sel[0]:sel[-1] + 1])
        else:
            eq.add(f, z[:, sel], y[:, sel])


def _iterate(session, calib: CalibrationSet, names: Sequence[str]):
    """(first global sample index, batch size, {name: value}) per run."""
    inputs = {i.name for i in session.get_inputs()}
    start = 0
    for feed in calib.feeds:
        values = session.run(list(names), {k: v for k, v in feed.items() if k in inputs})
        b = int(next(iter(feed.values())).shape[0])
        yield start, b, dict(zip(names, values))
        start += b


def _run_rows(layer: Layer, start: int, b: int, rows: int, samples: int, seed: int):
    """Sampled rows of one run: (batch index, flat output position, global sample) per row."""
    n_out = prod(layer.geo.out_spatial)
    k = layer.rows_per_sample(rows, samples)
    order = sorted(range(b), key=lambda j: ((start + j) % 2, j))  # rows of one fold together
    pos = [positions(seed, layer.index, start + j, n_out, k) for j in order]
    bidx = np.concatenate([np.full(len(p), j) for j, p in zip(order, pos)])
    return bidx, np.concatenate(pos), bidx + start


def _systems(layer: Layer, schemes: Sequence[str]):
    """Per scheme: (r_max, SVD stages at r_max, candidate ranks, MACs) for a layer."""
    from ..pipeline.audit import scheme_reason

    out = {}
    for s in schemes:
        if scheme_reason(layer.geo, s) is not None:
            continue
        ranks, macs = candidate_ranks(layer.geo, s)
        if not ranks:
            continue
        r_max = ranks[-1]
        out[s] = (r_max, factor(layer.w64, layer.geo, s, r_max), ranks, macs)
    return out


def _eq_bytes(stages: Sequence[Stage]) -> int:
    last = stages[-1]
    d = last.in_per_group * prod(last.kernel) + 1
    return 2 * last.group * d * (d + last.out_channels // last.group) * 8


def reference_pass(work: WorkingModel, layers: Sequence[Layer], calib: CalibrationSet, *, rows: int, seed: int,
                   schemes: Sequence[str] | None, targets: Targets, progress=None,
                   probe_target: float = SENSITIVITY_TARGET) -> dict[str, LayerProfile]:
    """One pass per chunk of layers over the original model: stores the targets (original conv
    outputs at the sampled positions) and, when ``schemes`` is given, every layer's output-error
    curves per scheme and rank plus a probe candidate for its sensitivity."""
    profiles: dict[str, LayerProfile] = {}
    chunks: list[list[tuple[Layer, dict]]] = []
    budget = 0
    for layer in layers:
        systems = _systems(layer, schemes) if schemes else {}
        size = sum(_eq_bytes(v[1]) for v in systems.values())
        if not chunks or budget + size > GRAM_BUDGET:
            chunks.append([])
            budget = 0
        chunks[-1].append((layer, systems))
        budget += size
    task = progress.add_task("reference activations", total=len(layers)) if progress else None
    for chunk in chunks:
        names = list(dict.fromkeys(n for layer, systems in chunk
                                   for n in ([layer.x_name, layer.y_name] if systems else [layer.y_name])))
        session = work.session(names)
        eqs = {layer.name: {s: NormalEquations(v[1][-1].group, v[1][-1].in_per_group * prod(v[1][-1].kernel),
                                               v[1][-1].out_channels // v[1][-1].group, dtype=np.float32)
                            for s, v in systems.items()} for layer, systems in chunk}
        for start, b, values in _iterate(session, calib, names):
            for layer, systems in chunk:
                y_all = values[layer.y_name]
                bidx, pos, smp = _run_rows(layer, start, b, rows, calib.samples, seed)
                y = y_all.reshape(y_all.shape[0], y_all.shape[1], -1)[bidx, :, pos]  # [R, N]
                for s_idx in range(start, start + b):
                    sel = smp == s_idx
                    targets.put(layer.name, s_idx, pos[sel], y[sel])
                if not systems:
                    continue
                patches = gather_patches(values[layer.x_name], layer.geo, bidx, pos)
                folds = _folds(smp, calib.samples)
                for s, (r_max, stages, _, _) in systems.items():
                    z = last_stage_design(patches, stages, np.float32)
                    _add_rows(eqs[layer.name][s], z, _grouped_y(y, stages[-1], np.float32), folds)
        for layer, systems in chunk:
            prof = LayerProfile(layer.name, layer.geo.macs)
            best = None
            for s, (r_max, stages, ranks, macs) in systems.items():
                eq = eqs[layer.name][s]
                x0 = pack_last(stages, layer.bias)
                errs, errs_w = rank_curve(eq, x0, rank_inner(stages, r_max), ranks)
                prof.curves[s] = SchemeCurve(s, list(ranks), [macs[r] for r in ranks], errs, errs_w)
                for r, e in zip(ranks, errs):
                    score = abs(math.log(max(e, 1e-12) / probe_target))
                    if e > 1e-6 and (best is None or score < best[0]):
                        best = (score, s, r)
            if best is not None:
                _, s, r = best
                r_max, stages, _, _ = systems[s]
                mask = rank_mask(stages, r_max, r)
                x, lam, e = solve_ridge_cv(eqs[layer.name][s], pack_last(stages, layer.bias), mask)
                new, bias = unpack_last(stages, x)
                small = truncate(new, layer.geo, s, r_max, r)
                prof.probe = Probe(s, r, e, compose(small, layer.geo), bias)
            profiles[layer.name] = prof
            eqs.pop(layer.name)
            if progress:
                progress.advance(task)
        del session
    return profiles


def measure_sensitivities(work: WorkingModel, layers: Sequence[Layer], profiles: dict[str, LayerProfile],
                          calib: CalibrationSet, *, max_samples: int = 16, metric: str = "channel",
                          progress=None) -> None:
    """Model drift when only one layer carries its probe perturbation: ``s = drift / e²``.

    ``1 − cos`` of the outputs is quadratic in a small perturbation, so a layer whose output is
    off by a relative ``e`` moves the model's drift by about ``s·e²``, and independent layers add.
    """
    sizes = np.cumsum(calib.batch_sizes)
    n_feeds = int(np.searchsorted(sizes, max_samples) + 1)  # runs until max_samples samples are in
    feeds = CalibrationSet(calib.feeds[:n_feeds], calib.source, int(sizes[min(n_feeds, len(sizes)) - 1]))
    outs = float_outputs(work.model)
    meter = DriftMeter(run_outputs(work.session(), feeds.feeds, outs), metric)
    task = progress.add_task("layer sensitivities", total=len(layers)) if progress else None
    for layer in layers:
        prof = profiles.get(layer.name)
        if prof is not None and prof.probe is not None:
            work.set(layer.name, prof.probe.weight, prof.probe.bias)
            try:
                d = meter.drift(run_outputs(work.session(), feeds.feeds, outs))
            finally:
                work.reset(layer.name)
            prof.probe_drift = d
            prof.sensitivity = d / max(prof.probe.error ** 2, 1e-12)
        elif prof is not None:
            prof.sensitivity = 0.0
        if progress:
            progress.advance(task)


# ----------------------------------------------------------------------------------------------
# Allocation
# ----------------------------------------------------------------------------------------------
@dataclass
class Choice:
    scheme: str
    rank: int
    macs: int
    predicted_drift: float


def _hull(macs0: int, options: Sequence[tuple[int, float, str, int]]) -> list[tuple[int, float, str, int]]:
    """Lower convex hull of (MACs, drift), from the original layer (macs0, 0) toward fewer MACs:
    the Pareto options with the drift added per MAC saved rising from step to step."""
    front = []  # ascending MACs, drift strictly falling: the Pareto options
    best = math.inf
    for o in sorted((o for o in options if o[0] < macs0), key=lambda o: (o[0], o[1])):
        if o[1] < best:
            front.append(o)
            best = o[1]
    hull: list[tuple[int, float, str, int]] = []
    origin = (macs0, 0.0)
    for o in reversed(front):  # MACs falling, drift rising
        while hull:
            prev = hull[-2] if len(hull) > 1 else origin
            last = hull[-1]
            s_prev = (last[1] - prev[1]) / max(prev[0] - last[0], 1)
            s_new = (o[1] - last[1]) / max(last[0] - o[0], 1)
            if s_new < s_prev:
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def allocate(profiles: Mapping[str, LayerProfile], total_macs: int, budget: float | None = None,
             max_drift: float | None = None) -> tuple[dict[str, Choice], float, int]:
    """Greedy Lagrangian allocation on the per-layer convex hulls of (MACs, predicted drift).

    Steps are taken in order of drift added per MAC saved until the conv MACs are within
    ``budget × total`` (overshooting by at most one step) or the next step would take the predicted
    drift past ``max_drift``.  Returns (choices, predicted drift, conv MACs after).
    """
    hulls = {n: _hull(p.macs, p.options()) for n, p in profiles.items()}
    steps = []
    for n, hull in hulls.items():
        prev_m, prev_d = profiles[n].macs, 0.0
        for k, o in enumerate(hull):
            steps.append(((o[1] - prev_d) / max(prev_m - o[0], 1), n, k, prev_m - o[0], o[1] - prev_d))
            prev_m, prev_d = o[0], o[1]
    steps.sort(key=lambda s: (s[0], s[1], s[2]))
    target = budget * total_macs if budget is not None else -1
    spent, drift = total_macs, 0.0
    chosen: dict[str, int] = {}
    for slope, n, k, saved, added in steps:
        if budget is not None and spent <= target:
            break
        if max_drift is not None and drift + added > max_drift:
            break
        if chosen.get(n, -1) != k - 1:
            continue  # hull steps of a layer come in order; this cannot happen on a convex hull
        chosen[n] = k
        spent -= saved
        drift += added
    out = {}
    for n, k in chosen.items():
        m, d, s, r = hulls[n][k]
        out[n] = Choice(s, r, m, d)
    return out, drift, spent


# ----------------------------------------------------------------------------------------------
# Sequential (asymmetric) calibration of the chosen layers, in waves
# ----------------------------------------------------------------------------------------------
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
    vertical_first: bool | None = None  # spatial: the order calibrated (None: the cheaper one)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["ridge"] is not None and not math.isfinite(d["ridge"]):
            d["ridge"] = "inf"
        return d


def _subgraph_names(node: onnx.NodeProto) -> set[str]:
    names: set[str] = set()
    for a in node.attribute:
        for sub in ([a.g] if a.HasField("g") else list(a.graphs)):
            names |= _subgraph_reads(sub)
    return names


def upstream_layers(model: onnx.ModelProto, layers: Sequence[Layer]) -> dict[str, set[str]]:
    """For each layer, the other layers its input depends on (main graph, subgraph reads included)."""
    nodes = list(model.graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    reads = [list(n.input) + sorted(_subgraph_names(n)) for n in nodes]
    layer_of_node = {producer[l.y_name]: l.name for l in layers if l.y_name in producer}
    out = {}
    for layer in layers:
        seen: set[int] = set()
        stack = [producer[layer.x_name]] if layer.x_name in producer else []
        found = set()
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            if i in layer_of_node:
                found.add(layer_of_node[i])
            stack.extend(producer[t] for t in reads[i] if t in producer)
        out[layer.name] = found
    return out


def waves(model: onnx.ModelProto, layers: Sequence[Layer]) -> list[list[Layer]]:
    """Layers grouped so that each one's input depends only on layers of earlier groups."""
    up = upstream_layers(model, layers)
    pending = list(layers)
    done: set[str] = set()
    out = []
    while pending:
        ready = [l for l in pending if not (up[l.name] - done) & {p.name for p in pending}]
        if not ready:  # a cycle cannot happen in a valid graph; be safe
            ready = pending[:1]
        out.append(ready)
        done |= {l.name for l in ready}
        pending = [l for l in pending if l.name not in done]
    return out


def _weight_error(w: np.ndarray, dense: np.ndarray) -> float:
    w64 = np.asarray(w, dtype=np.float64)
    n = np.linalg.norm(w64)
    return float(np.linalg.norm(w64 - dense) / n) if n > 0 else 0.0


def calibrate_layers(work: WorkingModel, layers: Sequence[Layer], choices: Mapping[str, tuple[str, int]],
                     calib: CalibrationSet, targets: Targets, *, rows: int, seed: int, progress=None,
                     ) -> tuple[dict[str, LayerResult], dict[str, tuple[list[Stage], np.ndarray]]]:
    """Solve the last stage and bias of every chosen layer on activations of the partly rewritten
    model (``work`` is updated layer by layer).  Returns per-layer results and the calibrated
    (stages, bias)."""
    chosen = [l for l in layers if l.name in choices]
    results: dict[str, LayerResult] = {}
    solved: dict[str, tuple[list[Stage], np.ndarray]] = {}
    todo = []
    for layer in chosen:
        scheme, r, *order = choices[layer.name]
        stages = _factor(layer, scheme, r, order[0] if order else None)
        dense = compose(stages, layer.geo)
        err_svd = _weight_error(layer.weight, dense)
        macs = stages_macs(layer.geo, stages)
        if err_svd <= exact_tolerance(layer.weight.dtype):
            results[layer.name] = LayerResult(layer.name, scheme, r, layer.geo.macs, macs, err_svd, err_svd,
                                              0.0, 0.0, None, None, exact=True,
                                              vertical_first=order[0] if order else None)
            solved[layer.name] = (stages, layer.bias)
            work.set(layer.name, dense, layer.bias)
        else:
            todo.append((layer, stages))
    groups = waves(work.model, [l for l, _ in todo])
    stage_of = {l.name: s for l, s in todo}
    task = progress.add_task("calibrating layers", total=len(todo)) if progress else None
    for wave_index, wave in enumerate(groups):
        names = list(dict.fromkeys(l.x_name for l in wave))
        session = work.session(names)
        eqs = {}
        for l in wave:
            last = stage_of[l.name][-1]
            eqs[l.name] = NormalEquations(last.group, last.in_per_group * prod(last.kernel),
                                          last.out_channels // last.group)
        for start, b, values in _iterate(session, calib, names):
            for l in wave:
                stages = stage_of[l.name]
                order = sorted(range(b), key=lambda j: ((start + j) % 2, j))  # rows of one fold together
                got = [targets.get(l.name, start + j) for j in order]
                pos = np.concatenate([p for p, _ in got])
                y = np.concatenate([t for _, t in got])
                smp = np.concatenate([np.full(len(p), start + j) for j, (p, _) in zip(order, got)])
                patches = gather_patches(values[l.x_name], l.geo, smp - start, pos)
                z = last_stage_design(patches, stages)
                _add_rows(eqs[l.name], z, _grouped_y(y, stages[-1]), _folds(smp, calib.samples))
        del session
        for l in wave:
            stages = stage_of[l.name]
            eq = eqs.pop(l.name)
            x0 = pack_last(stages, l.bias)
            x, lam, err = solve_ridge_cv(eq, x0)
            total = float(eq.yy.sum())
            err_svd = math.sqrt(_sq_error(x0, eq.A.sum(0), eq.B.sum(0), eq.yy.sum(0)) / total) if total > 0 else 0.0
            new, bias = unpack_last(stages, x)
            dense = compose(new, l.geo)
            work.set(l.name, dense, bias)
            solved[l.name] = (new, bias)
            results[l.name] = LayerResult(
                l.name, choices[l.name][0], choices[l.name][1], l.geo.macs, stages_macs(l.geo, stages),
                _weight_error(l.weight, dense), _weight_error(l.weight, compose(stages, l.geo)), err, err_svd,
                lam, wave_index, vertical_first=choices[l.name][2] if len(choices[l.name]) > 2 else None)
            if progress:
                progress.advance(task)
    return results, solved


# ----------------------------------------------------------------------------------------------
# The whole procedure
# ----------------------------------------------------------------------------------------------
ELIGIBLE_REASONS = ("no_exact_saving", "no_saving_within_tol", "rank_saves_nothing", "not_needed_for_budget")
MAX_DRIFT_TRIES = 3


@dataclass
class CalibrationReport:
    model: str
    data: str
    samples: int
    rows: int
    seed: int
    allocation: str  # "sensitivity" (per-layer drift on calibration data) | "plan" (the policy's weight-based plan)
    budget: float | None
    max_drift: float | None
    conv_macs_before: int
    conv_macs_after: int
    predicted_drift: float | None
    drift_metric: str  # "channel" | "cosine" (see DriftMeter): what allocation and --max-drift use
    drift: float | None  # measured on the calibration samples, calibrated factors
    drift_weight_only: float | None  # the same layers and ranks with weight-only SVD factors
    drift_cosine: float | None  # plain 1 − cosine (sepify verify's), calibrated
    drift_cosine_weight_only: float | None
    layers: list[LayerResult]
    folded_batchnorms: list[dict[str, str]]
    profiles: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    input_shapes: dict[str, list[int]] = field(default_factory=dict)  # what the plan was made at

    @property
    def macs_ratio(self) -> float:
        return self.conv_macs_after / self.conv_macs_before if self.conv_macs_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("layers", "profiles")}
        d["macs_ratio"] = self.macs_ratio
        d["drift_definition"] = ("1 - cosine of each float output over all samples (channel: each output channel "
                                 "scaled to unit RMS first), mean over outputs")
        d["layers"] = [l.to_dict() for l in self.layers]
        d["profiles"] = self.profiles
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_json_default)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    raise TypeError(type(o).__name__)


@dataclass
class CalibrationResult:
    """``model``: the source model with BatchNorms folded into the rewritten convs and their weights
    replaced by the dense weights of their calibrated chains; ``plan``: a plan on ``model`` that
    :func:`sepify.rewrite.rewrite` turns into the separable graph."""

    model: onnx.ModelProto
    plan: Any
    report: CalibrationReport
    profiles: dict[str, LayerProfile] = field(default_factory=dict, repr=False)
    stages: dict[str, tuple[list[Stage], np.ndarray]] = field(default_factory=dict, repr=False)


def _layers_from_plan(the_plan, names: Iterable[str] | None = None) -> list[Layer]:
    an = the_plan.analysis
    specs = {s.ref.qualified_name: s for s in an.specs}
    order = {s.ref.qualified_name: i for i, s in enumerate(an.specs)}
    wanted = set(names) if names is not None else None
    out = []
    for node in the_plan.nodes:
        if wanted is not None and node.qualified_name not in wanted:
            continue
        if wanted is None and not (node.action == "rewrite" or node.reason in ELIGIBLE_REASONS):
            continue
        spec = specs[node.qualified_name]
        if spec.ref.scope or spec.ref.op_type != "Conv":
            continue  # convs inside If/Loop bodies: their activations cannot be exposed; weight-only
        geo = spec.geometry()
        const = an.view.constant(spec.w_name, spec.ref)
        if geo is None or const is None:
            continue
        bias = np.zeros(geo.c_out)
        if spec.b_name:
            b = an.view.constant(spec.b_name, spec.ref)
            if b is None:
                continue
            bias = b.value.astype(np.float64).reshape(-1)
        out.append(Layer(order[node.qualified_name], node.qualified_name, spec.ref.name, geo, const.value, bias,
                         spec.x_name, spec.ref.node.output[0], spec))
    return out


def _input_shapes_of(model: onnx.ModelProto, calib: CalibrationSet, input_shapes) -> dict[str, list[int]]:
    """The shapes the plan is made at: the user's (resolved), else the calibration samples' (batch 1
    where the batch dim is symbolic), so every conv's geometry matches the activations."""
    from ..model.shapes import normalize_input_shapes, resolve_input_shapes

    view = GraphView(model)
    names = [i.name for i in view.main_inputs]
    declared = {i.name: _declared(i) for i in view.main_inputs}
    data = {}
    for k, v in calib.feeds[0].items():
        dims = list(v.shape)
        if declared.get(k) and declared[k][0] is None and dims:
            dims[0] = 1
        data[k] = dims
    if not input_shapes:
        return data
    resolved, _ = resolve_input_shapes(view, normalize_input_shapes(input_shapes, names))
    for k, dims in resolved.items():
        if k in data and list(dims[1:]) != data[k][1:]:
            raise UsageError(f"--input-shape gives {k} as {'x'.join(map(str, dims))}, but the calibration samples "
                             f"are {'x'.join(map(str, data[k]))}")
    return {k: list(v) for k, v in resolved.items()}


def substitute(model: onnx.ModelProto, weights: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> onnx.ModelProto:
    """A copy of ``model`` whose convs (by qualified name, main graph) compute the given dense
    weight and bias.  An initializer read by that conv alone is overwritten; otherwise new ones."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    view = GraphView(out)
    used = _all_names(out)
    inits = {t.name: t for t in out.graph.initializer}
    for ref in view.nodes:
        if ref.scope or ref.qualified_name not in weights:
            continue
        w, b = weights[ref.qualified_name]
        node = ref.node
        dtype = view.constant(node.input[1], ref).value.dtype
        while len(node.input) < 3:
            node.input.append("")
        for slot, value, suffix in ((1, w, "calibrated"), (2, b, "calibrated_bias")):
            name = node.input[slot]
            tensor = numpy_helper.from_array(np.asarray(value).astype(dtype))
            sole = name and name in inits and len(view.consumers.get(name, [])) == 1 and \
                name not in {o.name for o in out.graph.output}
            if sole:
                tensor.name = name
                inits[name].CopyFrom(tensor)
            else:
                tensor.name = _fresh(used, f"{node.input[1] or node.name}/{suffix}")
                out.graph.initializer.append(tensor)
                node.input[slot] = tensor.name
    return out


class Calibrator:
    """The state calibration shares between one rewrite and a sweep of budgets: the model (with
    BatchNorms folded), the samples, the candidate layers, the reference targets and profiles.

    ``allocation``: ``"sensitivity"`` profiles every eligible layer (output-error curves per scheme
    and rank, and its measured sensitivity) and chooses scheme and rank by
    :func:`allocate`; ``"plan"`` calibrates the layers the policy's weight-based plan rewrites.
    """

    def __init__(self, model: ModelSource | LoadedModel, policy=None, data: Any = "random", input_shapes=None, *,
                 allocation: str = "sensitivity", samples: int | None = None, rows: int = DEFAULT_ROWS,
                 seed: int = 0, value_range: tuple[float, float] | None = None, batch: int = DEFAULT_BATCH,
                 fold_bn: bool = True, drift_metric: str = "channel", progress: bool = False,
                 input_values=None):
        from ..pipeline.plan import Policy, plan as make_plan

        if allocation not in ("sensitivity", "plan"):
            raise UsageError(f"unknown allocation {allocation!r} (sensitivity, plan)")
        if drift_metric not in DRIFT_METRICS:
            raise UsageError(f"unknown drift metric {drift_metric!r} ({', '.join(DRIFT_METRICS)})")
        if rows < 1:
            raise UsageError("calibration rows per layer must be ≥ 1")
        self.timings: dict[str, float] = {}
        t0 = time.perf_counter()
        self.policy = policy or Policy()
        self.allocation = allocation
        self.rows, self.seed, self.drift_metric, self.fold_bn = rows, seed, drift_metric, fold_bn
        self.progress = progress
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model)
        self.calib = data if isinstance(data, CalibrationSet) else load_calibration(
            data, self.loaded, input_shapes, samples=samples, seed=seed, value_range=value_range, batch=batch,
            input_values=input_values)
        self.shapes = _input_shapes_of(self.loaded.model, self.calib, input_shapes)
        self.input_values = input_values  # for the plans' shape fallback (and benchmarks) at self.shapes
        self.folded_model, self.folded = fold_batchnorms(self.loaded.model) if fold_bn else (self.loaded.model, [])
        self.base = make_plan(self._derived(self.folded_model), self.policy, self.shapes, input_values=input_values)
        if allocation == "sensitivity":
            self.layers = _layers_from_plan(self.base)
        else:
            self.layers = _layers_from_plan(self.base, [n.qualified_name for n in self.base.rewrites])
        self.by_name = {l.name: l for l in self.layers}
        self.work = WorkingModel(self.folded_model, self.layers)
        self.outputs = float_outputs(self.folded_model)
        self.targets = Targets()
        self.profiles: dict[str, LayerProfile] = {}
        self._meters: dict[int, tuple[DriftMeter, DriftMeter]] = {}
        self.timings["setup"] = time.perf_counter() - t0

    @property
    def conv_macs(self) -> int:
        return self.base.conv_macs

    def profile(self) -> None:
        """The reference pass (targets; curves and probes under sensitivity allocation) and the sensitivities."""
        schemes = list(SCHEMES) if self.policy.scheme == "auto" else [self.policy.scheme]
        with _progress(self.progress) as bar:
            t = time.perf_counter()
            self.profiles = reference_pass(self.work, self.layers, self.calib, rows=self.rows, seed=self.seed,
                                           schemes=schemes if self.allocation == "sensitivity" else None,
                                           targets=self.targets, progress=bar)
            self.timings["reference_pass"] = time.perf_counter() - t
            if self.allocation == "sensitivity":
                t = time.perf_counter()
                measure_sensitivities(self.work, self.layers, self.profiles, self.calib, metric=self.drift_metric,
                                      progress=bar)
                self.timings["sensitivities"] = time.perf_counter() - t

    def choose(self, budget: float | None = None, max_drift: float | None = None) -> tuple[dict[str, tuple[str, int]], float | None]:
        """Scheme and rank per layer, and the predicted drift (None under plan allocation)."""
        if self.allocation == "plan":
            return {n.qualified_name: (n.scheme, n.rank, getattr(n, "vertical_first", None)) for n in self.base.rewrites
                    if n.qualified_name in self.by_name}, None
        if budget is None and max_drift is None:
            raise UsageError("allocation by sensitivity needs --budget F or --max-drift D")
        picks, predicted, _ = allocate(self.profiles, self.conv_macs, budget, max_drift)
        return {n: (c.scheme, c.rank) for n, c in picks.items()}, predicted

    def _derived(self, model: onnx.ModelProto) -> LoadedModel:
        """A model derived from the input (BatchNorms folded, calibrated weights), loaded and checked
        like any, but labelled as the input so that plans and reports name the user's model."""
        if model is self.loaded.model:
            return self.loaded
        return replace(load_model(model), label=self.loaded.label)

    def weight_only_choices(self, budget: float) -> dict[str, tuple[str, int]]:
        """The weight-only planner's choices at ``budget`` (its spectral-energy greedy), main-graph layers."""
        from ..pipeline.plan import plan as make_plan

        p = make_plan(self._derived(self.folded_model), replace(self.policy, mode="budget", budget=budget),
                      self.shapes, input_values=self.input_values)
        return {n.qualified_name: (n.scheme, n.rank, getattr(n, "vertical_first", None)) for n in p.rewrites}

    def solve(self, choices: Mapping[str, tuple[str, int]]):
        """Calibrate ``choices`` from the original model on (the working model is reset first)."""
        for name in list(self.work.slots):
            self.work.reset(name)
        missing = [n for n in choices if n not in self.targets.rows]
        if missing:
            raise UsageError(f"no calibration targets for {', '.join(missing[:3])}: run profile() first")
        with _progress(self.progress) as bar:
            t = time.perf_counter()
            out = calibrate_layers(self.work, self.layers, choices, self.calib, self.targets, rows=self.rows,
                                   seed=self.seed, progress=bar)
            self.timings["calibration"] = self.timings.get("calibration", 0.0) + time.perf_counter() - t
        return out

    def set_weight_only(self, choices: Mapping[str, tuple[str, int]]) -> None:
        """The working model with the weight-only SVD factors of ``choices`` (everything else original)."""
        for name in list(self.work.slots):
            self.work.reset(name)
        for name, (scheme, r, *order) in choices.items():
            layer = self.by_name.get(name)
            if layer is not None:
                self.work.set(name, compose(_factor(layer, scheme, r, order[0] if order else None), layer.geo),
                              layer.bias)

    def drift(self, feeds: CalibrationSet | None = None) -> tuple[float, float]:
        """(drift in the chosen metric, plain 1 − cosine) of the working model against the original, on
        ``feeds`` (default: the calibration samples)."""
        feeds = feeds or self.calib
        key = id(feeds)
        if key not in self._meters:
            ref = run_outputs(make_reference_session(self.folded_model), feeds.feeds, self.outputs)
            meter = DriftMeter(ref, self.drift_metric)
            self._meters[key] = (meter, DriftMeter(ref, "cosine") if self.drift_metric != "cosine" else meter)
        meter, cos = self._meters[key]
        got = run_outputs(self.work.session(), feeds.feeds, self.outputs)
        return meter.drift(got), cos.drift(got)

    def finish(self, results: dict[str, LayerResult], solved: dict[str, tuple[list[Stage], np.ndarray]]):
        """The model to rewrite (BatchNorms folded only where a conv is rewritten, calibrated dense
        weights in) and a plan on it that :func:`sepify.rewrite.rewrite` realizes."""
        from ..pipeline.plan import Policy, plan as make_plan

        policy = self.policy
        bn_of = {f["conv"]: f["bn"] for f in self.folded}
        if self.fold_bn:
            final_src, final_folded = fold_batchnorms(self.loaded.model, only=[n for n in solved if n in bn_of])
        else:
            final_src, final_folded = self.loaded.model, []
        dense = {n: (compose(st, self.by_name[n].geo), b) for n, (st, b) in solved.items()}
        final_model = substitute(final_src, dense)
        final = make_plan(self._derived(final_model), Policy(mode="lossless", scheme=policy.scheme, include=policy.include,
                                              exclude=policy.exclude, min_macs=policy.min_macs, chain=policy.chain),
                          self.shapes, input_values=self.input_values)
        planned = {n.qualified_name: n for n in self.base.nodes}
        for node in final.nodes:
            res = results.get(node.qualified_name)
            ref = planned.get(node.qualified_name)
            if res is not None:
                node.action, node.reason = "rewrite", None
                node.scheme, node.rank = res.scheme, res.rank
                if hasattr(node, "vertical_first"):
                    node.vertical_first = res.vertical_first  # the spatial order calibrated
                node.error, node.macs_after = res.weight_error, res.macs_after
                if ref is not None:
                    node.exact_tolerance = node.exact_tolerance or ref.exact_tolerance
                node.chained = False
                if policy.chain and res.scheme != "spatial":
                    # Split the kernel stage further only where the calibrated chain still splits exactly.
                    layer = self.by_name[node.qualified_name]
                    w = dense[node.qualified_name][0].astype(layer.weight.dtype)
                    chain = split_kernel_stage(factor(w, layer.geo, res.scheme, res.rank), layer.geo,
                                               node.exact_tolerance or exact_tolerance(layer.weight.dtype))
                    if chain is not None:
                        node.chained, node.macs_after = True, stages_macs(layer.geo, chain)
            elif self.allocation == "plan" and ref is not None and ref.action == "rewrite":
                # Not calibrated (a conv inside an If/Loop body): the weight-only choice stands.
                node.action, node.reason = "rewrite", None
                node.scheme, node.rank, node.chained = ref.scheme, ref.rank, ref.chained
                node.error, node.macs_after = ref.error, ref.macs_after
                if hasattr(node, "vertical_first"):
                    node.vertical_first = getattr(ref, "vertical_first", None)
            elif node.action == "rewrite" or node.reason in ELIGIBLE_REASONS:
                node.action = "keep"
                node.reason = "not_needed_for_budget" if self.allocation == "sensitivity" else (ref.reason if ref else "kept")
        final.policy = policy
        for name, res in results.items():
            prof = self.profiles.get(name)
            if prof is not None and prof.sensitivity is not None:
                res.sensitivity = prof.sensitivity
                if res.output_error is not None:
                    res.predicted_drift = prof.sensitivity * res.output_error ** 2
            res.bn_folded = bn_of.get(name)
        return final_model, final, final_folded


def _factor(layer: Layer, scheme: str, r: int, vertical_first: bool | None = None) -> list[Stage]:
    """SVD factors; a spatial split in the order a plan chose (None: the cheaper one)."""
    if scheme == "spatial" and vertical_first is not None:
        return factor(layer.w64, layer.geo, scheme, r, vertical_first)
    return factor(layer.w64, layer.geo, scheme, r)


def make_reference_session(model: onnx.ModelProto):
    from ..pipeline.verify import make_session

    return make_session(model)


def calibrate(model: ModelSource | LoadedModel, policy=None, data: Any = "random", input_shapes=None, *,
              max_drift: float | None = None, samples: int | None = None, rows: int = DEFAULT_ROWS, seed: int = 0,
              value_range: tuple[float, float] | None = None, batch: int = DEFAULT_BATCH,
              allocation: str = "auto", fold_bn: bool = True, drift_metric: str = "channel",
              progress: bool = False, measure: bool = True, input_values=None) -> CalibrationResult:
    """Plan and calibrate the factors of ``model`` on sample inputs (see the module docstring).

    ``allocation``: ``"sensitivity"`` chooses scheme and rank per layer from drift measured on the
    calibration data (Lagrangian greedy under ``policy.budget`` and/or ``max_drift``); ``"plan"``
    keeps the policy's weight-based choices and only calibrates the factors; ``"auto"``:
    sensitivity for ``--budget`` / ``max_drift``, the plan otherwise.  ``max_drift`` bounds the
    drift measured on the calibration samples: when the first allocation overshoots, the bound is
    tightened and the layers calibrated again (at most 3 tries; the report notes a miss).
    ``input_values`` (see :func:`sepify.audit`) fix those inputs in random data and in the plans'
    shape fallback; calibration data that holds them must agree.
    """
    from ..pipeline.plan import Policy

    policy = policy or Policy()
    if max_drift is not None and not max_drift >= 0:
        raise UsageError("--max-drift needs a non-negative drift (1 - cosine)")
    if max_drift is not None and policy.mode in ("tol", "rank"):
        raise UsageError(f"--max-drift chooses ranks itself; drop --{policy.mode}")
    if allocation == "auto":
        allocation = "sensitivity" if (policy.mode == "budget" or max_drift is not None) else "plan"
    t0 = time.perf_counter()
    cal = Calibrator(model, policy, data, input_shapes, allocation=allocation, samples=samples, rows=rows, seed=seed,
                     value_range=value_range, batch=batch, fold_bn=fold_bn, drift_metric=drift_metric,
                     progress=progress, input_values=input_values)
    cal.profile()
    budget = policy.budget if policy.mode == "budget" else None
    notes: list[str] = []
    bound = max_drift
    drift = drift_cos = drift_w = drift_w_cos = None
    for attempt in range(MAX_DRIFT_TRIES if max_drift is not None else 1):
        choices, predicted = cal.choose(budget, bound)
        results, solved = cal.solve(choices)
        if measure or max_drift is not None:
            drift, drift_cos = cal.drift()
        if max_drift is None or drift is None or drift <= max_drift or not choices:
            break
        notes.append(f"attempt {attempt + 1}: predicted drift {predicted:.3g}, measured {drift:.3g} > "
                     f"{max_drift:g}; tightening")
        bound = (bound if bound else max_drift) * max_drift / drift * 0.9
    if max_drift is not None and drift is not None and drift > max_drift:
        notes.append(f"measured drift {drift:.3g} stays above --max-drift {max_drift:g} after {MAX_DRIFT_TRIES} tries")
    final_model, final, final_folded = cal.finish(results, solved)
    if measure and choices:
        cal.set_weight_only(choices)
        drift_w, drift_w_cos = cal.drift()
    cal.timings["total"] = time.perf_counter() - t0
    report = CalibrationReport(
        cal.loaded.label, cal.calib.source, cal.calib.samples, rows, seed, allocation, budget, max_drift,
        final.conv_macs, final.conv_macs_after, predicted, drift_metric, drift, drift_w, drift_cos, drift_w_cos,
        [results[l.name] for l in cal.layers if l.name in results], final_folded,
        [p.to_dict() for p in cal.profiles.values()] if allocation == "sensitivity" else [], dict(cal.timings), notes,
        {k: list(v) for k, v in cal.shapes.items()})
    return CalibrationResult(final_model, final, report, cal.profiles, solved)


def calibrated_rewrite(model: ModelSource | LoadedModel, policy=None, data: Any = "random", input_shapes=None, *,
                       lowering: str | None = None, **kw):
    """:func:`calibrate`, then :func:`sepify.rewrite.rewrite` of its plan.

    Returns ``(ModelProto, RewriteReport, CalibrationReport)``.  The rewrite report's
    ``weight_error`` is against the original (BatchNorm-folded) weight and ``planned_error`` is the
    layer's relative output error on the calibration data.
    """
    from ..pipeline.rewrite import METADATA_KEY, rewrite

    result = calibrate(model, policy, data, input_shapes, **kw)
    kwargs = {"lowering": lowering} if lowering is not None else {}
    out, report = rewrite(result.plan, **kwargs)
    by_name = {l.name: l for l in result.report.layers}
    for rec in report.rewritten:
        res = by_name.get(rec.qualified_name)
        if res is None:
            continue
        node = result.plan.node(rec.qualified_name)
        # The chain is stored in the weight's dtype: float16 factors alone differ by ~3e-4.
        expected = max(1e-4, exact_tolerance(np.dtype(node.dtype)) if node.dtype else 0.0)
        if rec.weight_error > expected:
            result.report.notes.append(f"{rec.qualified_name}: the rewritten chain differs from the calibrated "
                                       f"weight by {rec.weight_error:.2e} (expected rounding only)")
        rec.weight_error = res.weight_error
        if res.output_error is not None:
            rec.planned_error = res.output_error
    for p in out.metadata_props:
        if p.key == METADATA_KEY:
            try:
                meta = json.loads(p.value)
                entry = meta["history"][-1]
                for n in entry.get("nodes", []):
                    if n["node"] in by_name:
                        n["weight_error"] = by_name[n["node"]].weight_error
                entry["calibration"] = {"data": result.report.data, "samples": result.report.samples,
                                        "allocation": result.report.allocation, "drift": result.report.drift,
                                        "folded_batchnorms": result.report.folded_batchnorms}
                p.value = json.dumps(meta, sort_keys=True, default=_json_default)
            except (ValueError, KeyError, IndexError, TypeError):
                pass
    report.changed = report.changed or bool(result.report.folded_batchnorms)
    return out, report, result.report
