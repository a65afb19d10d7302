"""Running the model during calibration: the working model whose conv weights can be swapped, the
sampled targets, and the drift between two models' outputs.

Drift (what ``--max-drift`` bounds and the sweep plots) is ``1 − cosine`` between the original
and the rewritten model's output tensors over all samples (:class:`DriftMeter`), averaged over
the model's float outputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ParameterError
from ..model.names import NameGenerator
from ..model.session import ort_session
from .data import CalibrationSet
from .options import DRIFT_METRICS

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

    def session(self, extra_outputs: Sequence[str] = (), threads: int | None = None):
        return calibration_session(self.model, extra_outputs, threads=threads)


def float_outputs(model: onnx.ModelProto) -> list[str]:
    names = []
    for o in model.graph.output:
        et = o.type.tensor_type.elem_type
        if et in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16):
            names.append(o.name)
    return names


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
            raise ParameterError("drift_metric", metric, f"unknown drift metric ({', '.join(DRIFT_METRICS)})")
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


def iterate_runs(session, calib: CalibrationSet, names: Sequence[str]):
    """(first global sample index, batch size, {name: value}) per run."""
    inputs = {i.name for i in session.get_inputs()}
    start = 0
    for feed in calib.feeds:
        values = session.run(list(names), {k: v for k, v in feed.items() if k in inputs})
        b = int(next(iter(feed.values())).shape[0])
        yield start, b, dict(zip(names, values))
        start += b


__all__ = ["DRIFT_METRICS", "DriftMeter", "Targets", "WorkingModel", "calibration_session", "float_outputs",
           "iterate_runs", "run_outputs"]
