"""Calibration makes no assumption about input and output layouts it does not check.

Regressions from models in the wild: a TCN taking ``[frames, bins]`` (no batch axis), a model
whose first input is a scalar gain, a model that reshapes to batch 1 inside although its batch
axis is symbolic, and a time-major output ``[T, B, C]`` with runs of 8 and 4 samples.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import sepify
from conftest import init, make_model, rand, vi
from sepify.calibration.calibrate import calibrate, calibrated_rewrite


def _conv(x, w, y, name):
    return helper.make_node("Conv", [x, w], [y], name=name, pads=[1, 1, 1, 1])


def test_an_input_without_batch_axis():
    """``[frames, bins]`` unsqueezed to NCHW inside: each run feeds exactly the input's shape."""
    nodes = [helper.make_node("Unsqueeze", ["x", "axes"], ["u"], name="unsq"),
             _conv("u", "w1", "h", "c1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             _conv("r", "w2", "y", "c2")]
    model = make_model(nodes, [vi("x", [16, 8])], [vi("y", [1, 6, 16, 8])],
                       [init("axes", np.array([0, 1], np.int64)), init("w1", rand([6, 1, 3, 3])),
                        init("w2", rand([6, 6, 3, 3], seed=1))])
    out, rep, cal = calibrated_rewrite(model, sepify.Policy(mode="budget", budget=0.7), "random", samples=6)
    assert cal.samples == 6 and rep.changed


def test_a_scalar_first_input():
    nodes = [helper.make_node("Mul", ["x", "gain"], ["g"], name="gain"), _conv("g", "w1", "h", "c1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"), _conv("r", "w2", "y", "c2")]
    model = make_model(nodes, [vi("gain", []), vi("x", [1, 4, 10, 10])], [vi("y", [1, 8, 10, 10])],
                       [init("w1", rand([8, 4, 3, 3])), init("w2", rand([8, 8, 3, 3], seed=1))])
    res = calibrate(model, sepify.Policy(mode="budget", budget=0.7), "random", samples=5)
    assert res.report.samples == 5 and res.report.layers


def _batch_one_inside(batch="N"):
    """A symbolic batch axis, but a Reshape to [1, -1] before a MatMul: only one sample per run works."""
    nodes = [_conv("x", "w1", "h", "c1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             _conv("r", "w2", "c", "c2"), helper.make_node("Reshape", ["c", "flat"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "wm"], ["y"], name="head")]
    return make_model(nodes, [vi("x", [batch, 4, 6, 6])], [vi("y", [1, 5])],
                      [init("w1", rand([8, 4, 3, 3])), init("w2", rand([8, 8, 3, 3], seed=1)),
                       init("flat", np.array([1, -1], np.int64)), init("wm", rand([8 * 36, 5], seed=2))])


def test_a_model_that_refuses_stacked_samples_is_calibrated_one_sample_per_run():
    res = calibrate(_batch_one_inside(), sepify.Policy(mode="budget", budget=0.7), "random", samples=10)
    assert res.report.layers and any("one sample per run" in n for n in res.report.notes)
    assert res.report.drift is not None and np.isfinite(res.report.drift)


def test_a_time_major_output_is_measured_with_the_plain_cosine():
    """Output ``[T, B, C]`` (the samples on axis 1), 12 samples in runs of 8 and 4."""
    nodes = [_conv("x", "w1", "h", "c1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             _conv("r", "w2", "c", "c2"),
             helper.make_node("Reshape", ["c", "tbc"], ["t"], name="to_time"),  # [N, 8, 6, 6] -> [N, 8, 36]
             helper.make_node("Transpose", ["t"], ["y"], name="time_major", perm=[2, 0, 1])]  # [36, N, 8]
    model = make_model(nodes, [vi("x", ["N", 4, 6, 6])], [vi("y", [36, "N", 8])],
                       [init("w1", rand([8, 4, 3, 3])), init("w2", rand([8, 8, 3, 3], seed=1)),
                        init("tbc", np.array([0, 8, 36], np.int64))])
    res = calibrate(model, sepify.Policy(mode="budget", budget=0.7), "random", samples=12)
    assert res.report.drift is not None and np.isfinite(res.report.drift)
    assert any("axis 1 is no channel axis" in n for n in res.report.notes)


def test_stacked_runs_agree_with_one_sample_per_run():
    """Sample numbering follows the activations: the same targets whether samples run 8 at a time or one."""
    stacked = calibrate(_ok_batched(), sepify.Policy(mode="rank", rank=2), "random", samples=9, batch=8)
    single = calibrate(_ok_batched(), sepify.Policy(mode="rank", rank=2), "random", samples=9, batch=1)
    for a, b in zip(stacked.report.layers, single.report.layers):
        assert abs(a.output_error - b.output_error) < 1e-4 * max(1.0, b.output_error)


def _ok_batched():
    nodes = [_conv("x", "w1", "h", "c1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             _conv("r", "w2", "y", "c2")]
    return make_model(nodes, [vi("x", ["N", 4, 6, 6])], [vi("y", ["N", 8, 6, 6])],
                      [init("w1", rand([8, 4, 3, 3])), init("w2", rand([8, 8, 3, 3], seed=1))])


def test_int_inputs_keep_their_dtype():
    nodes = [helper.make_node("Cast", ["ids"], ["f"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Mul", ["x", "f"], ["g"], name="scale"), _conv("g", "w1", "y", "c1")]
    model = make_model(nodes, [vi("x", [1, 4, 6, 6]), vi("ids", [1], TensorProto.INT64)], [vi("y", [1, 8, 6, 6])],
                       [init("w1", rand([8, 4, 3, 3]))])
    res = calibrate(model, sepify.Policy(mode="rank", rank=2), "random", samples=3)
    assert res.report.layers[0].output_error is not None


def test_a_calibrated_budget_lands_on_the_budget_with_one_dominant_layer():
    """One conv holds ~94 % of the MACs (as in an EEG net).  Its rank curves are sampled on a coarse
    grid (16 ranks, geometric beyond); the allocator fills what the last step left instead of
    stopping a third of the model below the budget."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="big", pads=[1, 1, 1, 1])]
    model = make_model(nodes, [vi("x", [1, 4, 12, 12])], [vi("y", [1, 64, 12, 12])],
                       [init("w1", rand([64, 4, 3, 3])), init("w2", rand([64, 64, 3, 3], seed=1))])
    res = calibrate(model, sepify.Policy(mode="budget", budget=0.67), "random", samples=8)
    assert 0.67 - 0.02 <= res.report.macs_ratio <= 0.67, res.report.layers
    assert not any("no candidate that fits" in n for n in res.report.notes)


def test_every_calibration_flag_reaches_the_sweep(tmp_path, capsys, monkeypatch):
    """plan --sweep / report --sweep used to drop --calib-range and --no-fold-bn."""
    import sepify.calibration.sweep as sweep_module
    from sepify.cli import main

    seen = {}
    real = sweep_module.Calibrator

    class Spy(real):
        def __init__(self, *a, options=None, **kw):
            seen["options"] = options
            super().__init__(*a, options=options, **kw)

    monkeypatch.setattr(sweep_module, "Calibrator", Spy)
    path = tmp_path / "m.onnx"
    path.write_bytes(_ok_batched().SerializeToString())
    for command in (["plan", str(path), "--format", "json"], ["report", str(path), "-o", str(tmp_path / "r.html")]):
        assert main([*command, "--sweep", "--budgets", "0.8", "--calibrate", "random", "--calib-range", "0,1",
                     "--no-fold-bn", "--calib-samples", "3", "--calib-rows", "64", "--calib-seed", "5",
                     "--drift-metric", "cosine", "--no-weight-only"]) == 0
        capsys.readouterr()
        o = seen.pop("options")
        assert (o.value_range, o.fold_bn, o.samples, o.rows, o.seed, o.drift_metric) == ((0.0, 1.0), False, 3, 64, 5,
                                                                                         "cosine")


def test_calibration_samples_that_make_the_model_non_finite_are_refused():
    """Random N(0, 1) data into a log (a diffusion UNet's noise level): NaN activations used to disable
    most layers silently and miss the budget; now it is one clear error, and a fixed value fixes it."""
    nodes = [_conv("x", "w1", "a", "c1"), helper.make_node("Log", ["s"], ["ls"], name="log"),
             helper.make_node("Add", ["a", "ls"], ["b"], name="add"), _conv("b", "w2", "y", "c2")]
    model = make_model(nodes, [vi("x", [1, 8, 10, 10]), vi("s", [1])], [vi("y", [1, 16, 10, 10])],
                       [init("w1", rand([16, 8, 3, 3])), init("w2", rand([16, 16, 3, 3], seed=1))])
    import pytest as _pytest

    from sepify.errors import UsageError

    with _pytest.raises(UsageError, match="non-finite values at .* --input-value"):
        calibrate(model, sepify.Policy(mode="budget", budget=0.6), "random", samples=8)
    res = calibrate(model, sepify.Policy(mode="budget", budget=0.6), "random", samples=8, input_values={"s": 0.5})
    assert res.report.macs_ratio <= 0.6


def test_layer_options_above_the_error_cap_are_left_out():
    from sepify.calibration.profiling import LayerProfile, SchemeCurve

    prof = LayerProfile("l", 100, {"dw-pw": SchemeCurve("dw-pw", [1, 2, 4], [20, 40, 80], [0.8, 0.4, 0.1],
                                                        [0.9, 0.5, 0.2])}, sensitivity=2.0)
    assert [o.payload for o in prof.options()] == [("dw-pw", 1), ("dw-pw", 2), ("dw-pw", 4)]
    assert [o.payload for o in prof.options(max_error=0.5)] == [("dw-pw", 2), ("dw-pw", 4)]
    assert prof.options(max_error=0.5)[0].loss == pytest.approx(2.0 * 0.4 ** 2)


def test_a_budget_out_of_reach_of_small_layer_errors_uses_larger_ones_and_says_so(monkeypatch):
    from sepify.calibration import calibrate as cal_module
    from test_calibrate import anisotropic, net

    data = {"x": anisotropic(8, 1)}
    res = calibrate(net(), sepify.Policy(mode="budget", budget=0.5), data)
    assert not any("output error above" in n for n in res.report.notes)
    monkeypatch.setattr(cal_module, "MAX_OUTPUT_ERROR", 1e-9)  # nothing passes: every option is "large"
    res = calibrate(net(), sepify.Policy(mode="budget", budget=0.5), data)
    assert res.report.macs_ratio <= 0.5 + 1e-9 or len(res.report.layers) == 3
    assert any("output error above" in n for n in res.report.notes)
