"""What calibration costs: prefix sessions (only the part of the model a pass needs), the samples
the sensitivities are measured on, stacked runs cut to the samples asked for."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from conftest import make_model, vi
from sepify.calibration import capture
from sepify.calibration.calibrate import calibrated_rewrite
from sepify.calibration.profiling import SENSITIVITY_SAMPLES, sensitivity_samples
from sepify.model.samples import SampleSet
from sepify.model.walk import prefix_model
from sepify.pipeline.plan import Policy
from test_calibrate import anisotropic, net


def run(model: onnx.ModelProto, feeds: dict, names=None) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(names, {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}})


def test_prefix_keeps_only_what_the_tensors_need_and_computes_them_alike():
    m = net(bn=False)
    part = prefix_model(m, ["r1"])
    assert [n.name for n in part.graph.node] == ["conv1", "relu1"]
    assert {t.name for t in part.graph.initializer} == {"w1", "b1"}
    assert [o.name for o in part.graph.output] == ["r1"]
    x = anisotropic(2, 3)[:1]
    full = onnx.ModelProto()
    full.CopyFrom(m)
    full.graph.output.add().name = "r1"
    (want,) = run(full, {"x": x}, ["r1"])
    (got,) = run(part, {"x": x})
    np.testing.assert_array_equal(got, want)
    # two tensors of different depths: the deeper one's ancestors, in graph order
    part = prefix_model(m, ["c2", "r1"])
    assert [n.name for n in part.graph.node] == ["conv1", "relu1", "conv2"]
    assert [o.name for o in part.graph.output] == ["c2", "r1"]


def test_prefix_follows_reads_inside_subgraphs_and_refuses_unknown_names():
    # an If whose branch reads an outer tensor (t) that only a node before it computes
    then = helper.make_graph([helper.make_node("Neg", ["t"], ["o1"])], "then", [], [vi("o1", None)])
    other = helper.make_graph([helper.make_node("Identity", ["t"], ["o2"])], "else", [], [vi("o2", None)])
    nodes = [helper.make_node("Relu", ["x"], ["t"], name="relu"),
             helper.make_node("Sigmoid", ["x"], ["unused"], name="sig"),
             helper.make_node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=other)]
    m = make_model(nodes, [vi("x", [2]), vi("c", [], onnx.TensorProto.BOOL)], [vi("y", None), vi("unused", None)],
                   check=False)
    part = prefix_model(m, ["y"])
    assert [n.name for n in part.graph.node] == ["relu", "if"]
    assert {i.name for i in part.graph.input} == {"x", "c"}
    x = np.array([-1.0, 2.0], np.float32)
    (got,) = run(part, {"x": x, "c": np.array(True)})
    np.testing.assert_array_equal(got, -np.maximum(x, 0))
    assert prefix_model(m, ["no_such_tensor"]) is None


def test_calibration_on_prefix_sessions_solves_the_same_factors(monkeypatch):
    m = net()
    data = {"x": anisotropic(8, 1)}
    policy = Policy(mode="budget", budget=0.6)
    calls = []
    original = capture.WorkingModel.session

    def counting(self, extra_outputs=(), threads=None, *, prefix=False):
        calls.append(prefix)
        return original(self, extra_outputs, threads, prefix=prefix)

    monkeypatch.setattr(capture.WorkingModel, "session", counting)
    out_prefix, rep_prefix, cal_prefix = calibrated_rewrite(m, policy, data)
    assert any(calls), "the reference pass and the waves run on prefix sessions"

    def whole(self, extra_outputs=(), threads=None, *, prefix=False):
        return original(self, extra_outputs, threads, prefix=False)

    monkeypatch.setattr(capture.WorkingModel, "session", whole)
    out_whole, rep_whole, cal_whole = calibrated_rewrite(m, policy, data)
    assert [(l.name, l.scheme, l.rank) for l in cal_prefix.layers] == [(l.name, l.scheme, l.rank) for l in cal_whole.layers]
    for a, b in zip(out_prefix.graph.initializer, out_whole.graph.initializer):
        assert a.name == b.name
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))


def test_sensitivity_samples_spend_a_bounded_number_of_passes():
    lo, hi = SENSITIVITY_SAMPLES
    assert sensitivity_samples(3, 32) == hi              # few layers: as many samples as allowed
    assert sensitivity_samples(64, 32) == lo             # many layers: the floor
    assert sensitivity_samples(20, 32) == 9              # 6 passes: 6 · 32 / 20 samples per layer
    assert sensitivity_samples(20, 2) == 2               # never more samples than there are
    for layers in (1, 5, 20, 40, 100):
        k = sensitivity_samples(layers, 32)
        assert lo <= k <= hi and (k == lo or layers * k <= 6 * 32)


@pytest.mark.parametrize("want, sizes", [(4, [4]), (8, [8]), (11, [8, 3]), (100, [8, 8, 4])])
def test_head_cuts_stacked_runs_to_the_samples_asked_for(want, sizes):
    x = np.arange(20 * 2, dtype=np.float32).reshape(20, 2)
    feeds = [{"x": x[i:i + 8]} for i in range(0, 20, 8)]
    s = SampleSet(feeds, "t", 20, [8, 8, 4], stack_axis=True)
    h = s.head(want)
    assert h.per_run == sizes and h.samples == sum(sizes)
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in h.feeds]), x[:sum(sizes)])
    # one sample per run: whole runs
    one = SampleSet([{"x": x[i:i + 1]} for i in range(5)], "t", 5)
    assert one.head(3).per_run == [1, 1, 1]


def test_sensitivities_from_one_session_with_fed_weights_equal_a_session_per_layer(monkeypatch):
    """The probe weights fed to one session (slots declared as inputs too) measure the same
    drifts as a session built per layer — and they do perturb the model."""
    from sepify.calibration.calibrate import Calibrator
    from sepify.errors import ModelLoadError

    cal = Calibrator(net(), Policy(mode="budget", budget=0.6), {"x": anisotropic(8, 2)})
    cal.profile()
    fed = {n: p.sensitivity for n, p in cal.profiles.items()}
    assert any(v > 0 for v in fed.values())

    def refuse(self, threads=None):
        raise ModelLoadError("no")

    monkeypatch.setattr(capture.WorkingModel, "override_session", refuse)
    cal.profile()
    rebuilt = {n: p.sensitivity for n, p in cal.profiles.items()}
    assert fed.keys() == rebuilt.keys()
    for n in fed:
        assert fed[n] == pytest.approx(rebuilt[n], rel=1e-4, abs=1e-9)


def test_reference_bar_moves_as_each_layers_curves_are_done_and_reaches_its_total(monkeypatch):
    """The reference pass's bar advances from the worker threads as each layer's curves finish (it
    stood still through the curves of a whole chunk: seconds without an ETA), and ends at its total."""
    import threading

    from sepify.calibration import calibrate as calibrate_module

    events = []

    class Recorder:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def add_task(self, description, total=None, **kw):
            events.append(("add", description, total, threading.current_thread().name))
            return description

        def advance(self, task, n=1):
            events.append(("advance", task, n, threading.current_thread().name))

        def update(self, *a, **k):
            pass

    from sepify import threads

    monkeypatch.setenv(threads.THREADS_ENV, "2")  # a pool, whatever the machine's cores
    monkeypatch.setattr(calibrate_module, "progress_bar", lambda enabled: Recorder())
    calibrated_rewrite(net(), Policy(mode="budget", budget=0.6), {"x": anisotropic(8, 1)}, progress=True)
    [(_, name, total, _)] = [e for e in events if e[0] == "add" and e[1] == "reference activations"]
    steps = [e for e in events if e[0] == "advance" and e[1] == name]
    assert sum(n for _, _, n, _ in steps) == total
    assert any(thread != threading.main_thread().name for *_, thread in steps)  # layers' curves, as they finish
