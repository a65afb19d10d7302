"""Sample files: the one convention every command reads inputs by (``verify --inputs``, ``--calibrate``,
``--eval``), cut into model-ready onnxruntime runs.

**Data**: an ``.npz`` keyed by input name, or a folder of ``.npy``/``.npz`` (a single-input model
takes any ``.npy`` name); each array's first axis is the sample axis (``[S, *input dims]``, or
samples stacked on the batch axis).  A model whose batch dim is fixed gets one sample per run, a
symbolic batch up to ``batch`` per run.  ``"random"`` draws seeded samples instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

from ..errors import UsageError
from .graph import GraphView
from .load import LoadedModel, ModelSource, load_model
from .shapes import cast_input_values, check_values_agree, normalize_input_shapes, resolve_input_shapes, resolve_input_values

DEFAULT_BATCH = 8  # samples per run when the batch dim is symbolic

DEFAULT_SAMPLES = 32  # random samples drawn when no count is given


@dataclass
class SampleSet:
    """Model-ready runs (``feeds``: one dict per onnxruntime run, every input at the shape the model
    takes) and where they came from.  ``per_run[i]`` is how many of the file's samples run ``i``
    holds: one, or several stacked on a symbolic batch axis.  The sample axis is the file's; how many
    batch entries a run's activations have is read from the activations themselves."""

    feeds: list[dict[str, np.ndarray]]
    source: str
    samples: int  # samples over all runs
    per_run: list[int] = field(default_factory=list)
    stack_axis: bool = False  # several samples per run, concatenated on every input's axis 0

    def __post_init__(self) -> None:
        if not self.per_run:
            self.per_run = [1] * len(self.feeds)

    def head(self, samples: int) -> "SampleSet":
        """The first ``samples`` samples (all of them if fewer); a run of stacked samples is cut to
        the ones needed."""
        runs, total = [], 0
        for feed, k in zip(self.feeds, self.per_run):
            if total >= samples:
                break
            if self.stack_axis and total + k > samples:
                k = samples - total
                feed = {n: v[:k] for n, v in feed.items()}
            runs.append((feed, k))
            total += k
        return SampleSet([f for f, _ in runs], self.source, total, [k for _, k in runs], self.stack_axis)

    def unstacked(self) -> "SampleSet":
        """One sample per run (for a model that refuses several on its batch axis)."""
        if not self.stack_axis:
            return self
        feeds = []
        for feed, k in zip(self.feeds, self.per_run):
            feeds.extend({n: v[j:j + 1] for n, v in feed.items()} for j in range(k))
        return SampleSet(feeds, self.source, self.samples, [1] * len(feeds), False)


def declared_dims(vi: onnx.ValueInfoProto) -> list[int | None] | None:
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
                raise UsageError(f"{f}: sample data must be .npz, .npy or a folder of them")
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"{f}: cannot read sample data ({str(exc).strip().splitlines()[0]})") from None
    return found


def _split_samples(name: str, arrays: list[np.ndarray], declared: list[int | None] | None,
                   source: str = "") -> list[np.ndarray]:
    """Per-sample arrays shaped like one model feed (leading batch dim kept)."""
    where = f"{source}: " if source else ""
    out: list[np.ndarray] = []
    rank = len(declared) if declared is not None else None
    b0 = declared[0] if declared else None
    for a in arrays:
        if rank is not None and a.ndim == rank + 1:
            out.extend(a[i] for i in range(a.shape[0]))
        elif a.ndim == 0:  # a scalar input given as it is: one sample
            out.append(a)
        elif rank is None or a.ndim == rank:
            step = b0 or 1
            if a.shape[0] % step:
                raise UsageError(f"{where}input {name!r}: {a.shape[0]} rows do not fill batches of {step}")
            out.extend(a[i:i + step] for i in range(0, a.shape[0], step))
        else:
            raise UsageError(f"{where}input {name!r}: array of rank {a.ndim} for an input of rank {rank} "
                             f"(give [samples, ...input dims] or stack samples on the batch axis)")
    if declared is not None:
        for s in out[:1]:
            bad = [i for i, (d, v) in enumerate(zip(declared, s.shape)) if d is not None and d != v]
            if len(s.shape) != len(declared) or bad:
                raise UsageError(f"{where}input {name!r}: sample shape {list(s.shape)} does not fit the "
                                 f"declared {['?' if d is None else d for d in declared]}")
    return out


def require_tensor_inputs(view: GraphView, given=()) -> None:
    """A UsageError naming the first main-graph input that is no tensor (a sequence, map or optional)
    and is not in ``given``: sepify feeds the model tensors only (random or from sample files)."""
    for i in view.main_inputs:
        if not i.type.HasField("tensor_type") and i.name not in given:
            kind = (i.type.WhichOneof("value") or "untyped").replace("_type", "")
            raise UsageError(f"input {i.name!r} is a {kind}, not a tensor: runs of the model (verify, bench, "
                             "calibration, latency) feed tensors only; audit and rewrite work without them")


def load_samples(data, model: ModelSource | LoadedModel, input_shapes=None, *, samples: int | None = None,
                     seed: int = 0, value_range: tuple[float, float] | None = None,
                     batch: int = DEFAULT_BATCH, input_values=None) -> SampleSet:
    """Model-ready runs of the samples in ``data`` for ``model``.

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
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    view = GraphView(loaded.model)
    inputs = view.main_inputs
    require_tensor_inputs(view, given=data.keys() if isinstance(data, Mapping) else ())
    names = [i.name for i in inputs]
    declared = {i.name: declared_dims(i) for i in inputs}
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
            # np.asarray: a scalar input's samples stay 0-d arrays (onnxruntime refuses numpy.bool_ scalars)
            per_input[name] = [np.asarray(a) for a in arr] if name not in fixed else [fixed[name].copy() for _ in range(n)]
        dist = "N(0, 1)" if value_range is None else f"uniform {value_range[0]:g}..{value_range[1]:g}"
        source = f"random ({n} samples, seed {seed}, {dist}" + (f"; {', '.join(fixed)} fixed" if fixed else "") + ")"
    else:
        if isinstance(data, Mapping):
            raw = {k: [np.asarray(v)] for k, v in data.items()}
            source = "given arrays"
        else:
            path = Path(data)
            if not path.exists():
                raise UsageError(f"{path}: no such sample file or folder")
            raw = _read_arrays(path, names)
            source = str(path)
        missing = [n for n in names if n not in raw]
        if missing:
            raise UsageError(f"{source}: no array for input(s) {', '.join(missing)} "
                             f"(has {', '.join(raw) or 'none'})")
        fixed = cast_input_values(view, input_values)
        for name in fixed:
            for a in raw.get(name, []):
                check_values_agree({name: a}, fixed, source)
        per_input = {n: _split_samples(n, raw[n], declared[n], source) for n in names}
        for n, arrays in per_input.items():
            odd = next((a.shape for a in arrays if a.shape != arrays[0].shape), None)
            if odd is not None:
                raise UsageError(f"{source}: samples of input {n!r} differ in shape "
                                 f"({list(arrays[0].shape)} and {list(odd)}); give samples of one shape")
        counts = {len(v) for v in per_input.values()}
        if len(counts) != 1:
            raise UsageError(f"{source}: inputs have different sample counts "
                             f"({', '.join(f'{k}: {len(v)}' for k, v in per_input.items())})")
        if samples:
            per_input = {k: v[:samples] for k, v in per_input.items()}
    n = len(next(iter(per_input.values()))) if per_input else 0
    if n == 0:
        raise UsageError(f"{source}: no samples")
    for name in names:
        if np.issubdtype(dtypes[name], np.floating):
            per_input[name] = [np.asarray(a, dtype=dtypes[name]) for a in per_input[name]]
    # Batch dim symbolic on every input (and samples of batch 1): several samples per run.
    symbolic = all(declared[n] and declared[n][0] is None for n in names)
    per_run = max(1, batch) if symbolic and all(a.shape[0] == 1 for n in names for a in per_input[n][:1]) else 1
    feeds, counts = [], []
    for start in range(0, n, per_run):
        feeds.append({name: np.concatenate(per_input[name][start:start + per_run], axis=0) if per_run > 1
                      else per_input[name][start] for name in names})
        counts.append(min(per_run, n - start))
    return SampleSet(feeds, source, n, counts, per_run > 1)



__all__ = ["DEFAULT_BATCH", "DEFAULT_SAMPLES", "SampleSet", "declared_dims", "load_samples"]
