"""Running the model during calibration: the working model whose conv weights can be swapped, the
sampled targets, and the drift between two models' outputs.

Drift (what ``--max-drift`` bounds and the sweep plots) is ``1 − cosine`` between the original
and the rewritten model's output tensors over all samples (:class:`sepify.core.drift.DriftMeter`),
averaged over the model's float outputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from ..core.drift import DRIFT_METRICS, DriftMeter
from ..errors import UsageError
from ..model.names import NameGenerator
from ..model.session import ort_message, ort_session
from ..model.walk import prefix_model
from .data import CalibrationSet

if TYPE_CHECKING:
    from .layers import Layer


def calibration_session(model: onnx.ModelProto, extra_outputs: Sequence[str] = (), threads: int | None = None):
    """A session for calibration runs: threads never spin, so an idle session steals no CPU."""
    return ort_session(model, extra_outputs, threads=threads, spinning="off")


class WorkingModel:
    """The model with every candidate conv given its own weight and bias initializers, whose
    values can be replaced (the dense weight of a calibrated chain) without touching the source."""

    def __init__(self, model: onnx.ModelProto, layers: Sequence[Layer]):
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        names = NameGenerator(model)
        nodes = {n.name: n for n in self.model.graph.node if n.name}
        by_output = {n.output[0]: n for n in self.model.graph.node if n.output}
        self.slots: dict[str, tuple[onnx.TensorProto, onnx.TensorProto]] = {}
        for layer in layers:
            node = by_output.get(layer.y_name) or nodes.get(layer.node_name)
            wt = numpy_helper.from_array(layer.weight, names.fresh(f"{node.input[1]}/calib"))
            bt = numpy_helper.from_array(layer.bias.astype(layer.weight.dtype), names.fresh(f"{node.input[1]}/calib_bias"))
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

    def session(self, extra_outputs: Sequence[str] = (), threads: int | None = None, *, prefix: bool = False):
        """A session on the model as it now is.  ``prefix``: only the part that computes
        ``extra_outputs``, which become its only outputs (:func:`~sepify.model.walk.prefix_model`;
        onnxruntime runs every node of a session, so a pass needing early activations pays for the
        whole model otherwise)."""
        if prefix and extra_outputs:
            part = prefix_model(self.model, list(extra_outputs))
            if part is not None:
                return calibration_session(part, threads=threads)
        return calibration_session(self.model, extra_outputs, threads=threads)

    def override_session(self, threads: int | None = None):
        """One session on the model as it now is in which every slot's weight and bias can be replaced
        per run: they are declared graph inputs too, so a feed overrides the initializer (onnxruntime's
        rule for initializers that are also inputs).  Measuring one perturbation per layer then costs
        runs, not a session per layer (63 sessions of YOLOv8n were half its sensitivity time)."""
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        declared = {i.name for i in model.graph.input}
        for wt, bt in self.slots.values():
            for t in (wt, bt):
                if t.name not in declared:
                    model.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        return calibration_session(model, threads=threads)

    def overrides(self, name: str, weight: np.ndarray, bias: np.ndarray) -> dict[str, np.ndarray]:
        """The feeds that give slot ``name`` this weight and bias in an :meth:`override_session`."""
        wt, bt = self.slots[name]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(wt.data_type)
        return {wt.name: np.ascontiguousarray(weight, dtype=dtype).reshape(tuple(wt.dims)),
                bt.name: np.ascontiguousarray(bias, dtype=dtype).reshape(tuple(bt.dims))}


def float_outputs(model: onnx.ModelProto) -> list[str]:
    names = []
    for o in model.graph.output:
        et = o.type.tensor_type.elem_type
        if et in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16):
            names.append(o.name)
    return names


def run_outputs(session, feeds: Sequence[Mapping[str, np.ndarray]], names: Sequence[str],
                calib: CalibrationSet | None = None) -> list[list[np.ndarray]]:
    return [run_session(session, names, f, calib) for f in feeds]


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


class StackedRunError(Exception):
    """onnxruntime refused a run of several samples stacked on the batch axis (the model may
    reshape to batch 1 inside): calibrate again with one sample per run."""


def _feedable(session) -> set[str]:
    """Names a run may feed: the inputs, and initializers that are inputs too (onnxruntime lists
    those apart, as overridable initializers)."""
    names = getattr(session, "_sepify_feedable", None)
    if names is None:
        names = {i.name for i in session.get_inputs()}
        names |= {i.name for i in session.get_overridable_initializers()}
        try:
            session._sepify_feedable = names
        except AttributeError:
            pass
    return names


def run_session(session, names: Sequence[str] | None, feed: Mapping[str, np.ndarray], calib: CalibrationSet | None = None):
    """One onnxruntime run on ``feed`` (only the inputs the session takes); a failure is a UsageError
    with onnxruntime's essential message, or :class:`StackedRunError` for a stacked run."""
    inputs = _feedable(session)
    try:
        return session.run(list(names) if names is not None else None, {k: v for k, v in feed.items() if k in inputs})
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types
        if calib is not None and calib.stack_axis:
            raise StackedRunError(ort_message(exc)) from None
        raise UsageError(f"onnxruntime failed to run the model on the calibration samples: {ort_message(exc)}") from None


def iterate_runs(session, calib: CalibrationSet, names: Sequence[str]):
    """``{name: value}`` per run of the calibration samples.  How many batch entries a run holds is the
    activations' business (their axis 0), not the inputs': see :class:`BatchOffsets`."""
    for feed in calib.feeds:
        yield dict(zip(names, run_session(session, names, feed, calib)))


class BatchOffsets:
    """Global sample indices per layer: run by run, a layer's activations hold ``b`` batch entries
    (their axis 0), numbered after the ones of the runs before — the same in every pass."""

    def __init__(self):
        self.next: dict[str, int] = {}

    def take(self, layer: str, b: int) -> int:
        start = self.next.get(layer, 0)
        self.next[layer] = start + b
        return start


__all__ = ["BatchOffsets", "DRIFT_METRICS", "DriftMeter", "StackedRunError", "Targets", "WorkingModel",
           "calibration_session", "float_outputs", "iterate_runs", "run_outputs", "run_session"]
