"""Calibration data: the sample files every command reads (:mod:`sepify.model.samples`), and the
shapes a calibrated plan is made at.

**Data**: an ``.npz`` keyed by input name, or a folder of ``.npy``/``.npz`` (a single-input model
takes any ``.npy`` name); each array's first axis is the sample axis (``[S, *input dims]``, or
samples stacked on the batch axis).  A model whose batch dim is fixed gets one sample per run, a
symbolic batch up to ``batch`` per run.
"""

from __future__ import annotations

import onnx

from ..errors import ParameterError
from ..model.graph import GraphView
from ..model.samples import DEFAULT_SAMPLES, SampleSet, declared_dims, load_samples
from ..model.shapes import normalize_input_shapes, resolve_input_shapes
from .options import DEFAULT_BATCH

CalibrationSet = SampleSet  # the samples as calibration takes them (one type for every command)


def load_calibration(data, model, input_shapes=None, *, samples: int | None = None, seed: int = 0,
                     value_range: tuple[float, float] | None = None, batch: int = DEFAULT_BATCH,
                     input_values=None) -> SampleSet:
    """Calibration batches for ``model``: :func:`sepify.model.samples.load_samples` (see there)."""
    return load_samples(data, model, input_shapes, samples=samples, seed=seed, value_range=value_range, batch=batch,
                        input_values=input_values)


def plan_input_shapes(model: onnx.ModelProto, calib: SampleSet, input_shapes) -> dict[str, list[int]]:
    """The shapes the plan is made at: the user's (resolved), else the calibration samples' (batch 1
    where the batch dim is symbolic), so every conv's geometry matches the activations."""
    view = GraphView(model)
    names = [i.name for i in view.main_inputs]
    declared = {i.name: declared_dims(i) for i in view.main_inputs}
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
            raise ParameterError("input_shapes", f"{k}={'x'.join(map(str, dims))}", "the calibration samples "
                             f"are {'x'.join(map(str, data[k]))}")
    return {k: list(v) for k, v in resolved.items()}


__all__ = ["CalibrationSet", "DEFAULT_BATCH", "DEFAULT_SAMPLES", "SampleSet", "declared_dims", "load_calibration",
           "plan_input_shapes"]
