"""``--input-value NAME=V`` / ``input_values=``: fixed values for inputs a model branches on.

The model here picks its conv by the *value* of an int64 scalar input ``sr`` (as silero VAD
does with its sample rate): ``If(sr == 16000)`` — then a 3→8 3×3 conv, else a 3→4 5×5 stride-2
conv — and each branch first resizes ``x`` by ``sr / 8000``, with scales computed at run time,
so ONNX shape inference cannot size either conv: only running the model can, and only the
branch that runs.  Random feeds (integers 0..9) never take the 16 kHz branch.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper

import sepify
from sepify.serialize import SCHEMA_VERSION
from sepify.pipeline.bench import benchmark
from sepify.calibration.data import load_calibration
from sepify.cli import main
from sepify.errors import UsageError
from sepify.model.shapes import cast_input_value
from sepify.pipeline.verify import model_inputs, verify

from conftest import init, make_model, rand, vi

Y = ["n", "c", "h", "w"]  # branch outputs differ in shape: declared symbolic


def _rate_model():
    u, v = np.array([1.0, 2.0, 1.0], np.float32), np.array([1.0, 0.0, -1.0], np.float32)
    # rank 1 per input channel (dw-pw) and spatially: a lossless rewrite splits it
    w16 = (rand([8, 3], 5)[:, :, None, None] * np.outer(u, v)[None, None]).astype(np.float32)
    then = helper.make_graph([
        helper.make_node("Resize", ["x", "", "scales"], ["up16"], mode="nearest", name="resize_16k"),
        helper.make_node("Conv", ["up16", "w16"], ["y16"], name="conv_16k", pads=[1, 1, 1, 1]),
    ], "then", [], [vi("y16", Y)])
    other = helper.make_graph([
        helper.make_node("Resize", ["x", "", "scales"], ["up8"], mode="nearest", name="resize_8k"),
        helper.make_node("Conv", ["up8", "w8"], ["y8"], name="conv_8k", strides=[2, 2], pads=[2, 2, 2, 2]),
    ], "else", [], [vi("y8", Y)])
    nodes = [
        helper.make_node("Equal", ["sr", "k16000"], ["is16k"], name="is16k"),
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Div", ["srf", "k8000"], ["s"], name="div"),
        helper.make_node("Unsqueeze", ["s", "axis0"], ["s1"], name="unsqueeze"),
        helper.make_node("Concat", ["ones", "s1", "s1"], ["scales"], axis=0, name="concat"),
        helper.make_node("If", ["is16k"], ["y"], then_branch=then, else_branch=other, name="by_rate"),
    ]
    inits = [init("k16000", np.array(16000, np.int64)), init("k8000", np.array(8000, np.float32)),
             init("axis0", np.array([0], np.int64)), init("ones", np.ones(2, np.float32)),
             init("w16", w16), init("w8", rand([4, 3, 5, 5], 6))]
    return make_model(nodes, [vi("x", [1, 3, 16, 16]), vi("sr", [], TensorProto.INT64)], [vi("y", Y)], inits)


CONV_16K, CONV_8K = "by_rate/then_branch/conv_16k", "by_rate/else_branch/conv_8k"
# hand-computed: prod(output) × C_in × prod(kernel)
#   16 kHz: x resized ×2 to 1x3x32x32; 3→8, 3×3, pad 1 → 1x8x32x32
#    8 kHz: x as is, 1x3x16x16; 3→4, 5×5, stride 2, pad 2 → 1x4x8x8
BRANCH = {
    16000: dict(runs=CONV_16K, skipped=CONV_8K, x=[1, 3, 32, 32], y=[1, 8, 32, 32], macs=8 * 32 * 32 * 3 * 3 * 3),
    8000: dict(runs=CONV_8K, skipped=CONV_16K, x=[1, 3, 16, 16], y=[1, 4, 8, 8], macs=4 * 8 * 8 * 3 * 5 * 5),
}
assert BRANCH[16000]["macs"] == 221184 and BRANCH[8000]["macs"] == 19200


@pytest.fixture(scope="module")
def model():
    return _rate_model()


@pytest.fixture
def model_path(tmp_path, model):
    p = tmp_path / "rate.onnx"
    p.write_bytes(model.SerializeToString())
    return p


def _bad(capsys, *argv, names=()):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.strip("\n").splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("sepify: error:"), err
    assert "Traceback" not in err + out
    for part in names:
        assert part in lines[0], (part, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------------------
# audit: the given value picks the branch
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sr", [16000, 8000])
def test_audit_sizes_the_branch_the_value_takes(model, sr):
    b = BRANCH[sr]
    report = sepify.audit(model, input_values={"sr": sr})
    runs, skipped = report.node(b["runs"]), report.node(b["skipped"])
    assert (runs.macs, runs.input_shape, runs.output_shape) == (b["macs"], b["x"], b["y"])
    assert runs.shape_source == "onnxruntime"
    # the branch not taken is not executed: unknown, with a warning, as without values
    assert skipped.macs is None and skipped.shape_source == "unknown"
    assert any(w.startswith(b["skipped"] + ":") for w in report.warnings)
    assert report.totals.conv_macs == b["macs"] and report.totals.unknown_cost_nodes == 1


@pytest.mark.parametrize("values", [["sr=16000"], "sr=16000", ["sr=16e3"], {"sr": "16000"}, {"sr": np.int64(16000)},
                                    {"sr": [16000]}, {"sr": 16000.0}, {"sr": np.array([[16000]])}])
def test_value_spellings(model, values):
    assert sepify.audit(model, input_values=values, spectra=False).node(CONV_16K).macs == BRANCH[16000]["macs"]


def test_random_feeds_never_take_the_16k_branch(model):
    """The problem this solves: random integers 0..9 for ``sr``."""
    report = sepify.audit(model, spectra=False)
    assert report.node(CONV_16K).macs is None


def test_fixed_value_leaves_other_random_inputs_alone(model):
    from sepify.model.load import load_model

    loaded = load_model(model)
    plain, src = model_inputs(loaded, seed=3)
    fixed, src_fixed = model_inputs(loaded, seed=3, input_values={"sr": 16000})
    assert np.array_equal(plain["x"], fixed["x"])
    assert fixed["sr"].dtype == np.int64 and fixed["sr"].shape == () and int(fixed["sr"]) == 16000
    assert src == "random (seed 3)" and src_fixed == "random (seed 3), fixed sr=16000"
    # a scalar fills a tensor input; a list gives every element
    filled, _ = model_inputs(loaded, input_values=["x=0.5", "sr=8000"])
    assert filled["x"].dtype == np.float32 and filled["x"].shape == (1, 3, 16, 16) and np.all(filled["x"] == 0.5)
    ramp = np.arange(768, dtype=np.float32)
    given, _ = model_inputs(loaded, input_values={"x": ramp.tolist(), "sr": 8000})
    assert np.array_equal(given["x"], ramp.reshape(1, 3, 16, 16))


def test_reports_record_the_fixed_values(capsys, model, model_path):
    """Audit and Plan JSON say which inputs had fixed values: a number for a scalar fill, else the
    flat list of elements (what --input-value takes back); inputs left random are not listed."""
    plain = sepify.audit(model, spectra=False).to_dict()
    assert plain["input_values"] == {}
    ramp = np.arange(768, dtype=np.float32)
    for values, recorded in [({"sr": 16000}, {"sr": 16000}),
                             (["x=0.5", "sr=8000"], {"x": 0.5, "sr": 8000}),
                             ({"x": ramp, "sr": [16000]}, {"x": ramp.tolist(), "sr": 16000})]:
        report = sepify.audit(model, input_values=values, spectra=False)
        d = json.loads(report.to_json())
        assert d["input_values"] == recorded
        assert type(d["input_values"]["sr"]) is int
        assert d["schema_version"] == SCHEMA_VERSION and d["input_shapes"] == {"x": [1, 3, 16, 16], "sr": []}
        assert report.input_values["sr"].dtype == np.int64  # the feeds themselves, at their shapes
        plan = sepify.plan(model, input_values=values)
        assert json.loads(plan.to_json())["input_values"] == recorded
    assert sepify.plan(model).to_dict()["input_values"] == {}
    assert main(["audit", str(model_path), "--input-value", "sr=16e3", "--format", "json", "--no-spectra"]) == 0
    assert json.loads(capsys.readouterr().out)["input_values"] == {"sr": 16000}
    two = main(["audit", str(model_path), str(model_path), "--input-value", "sr=8000", "--format", "json",
                "--no-spectra"])
    assert two == 0
    assert [m["input_values"] for m in json.loads(capsys.readouterr().out)["models"]] == [{"sr": 8000}] * 2


# ----------------------------------------------------------------------------------------------
# plan / rewrite / verify / bench / calibration
# ----------------------------------------------------------------------------------------------
def test_rewrite_and_verify_with_fixed_value(model):
    _, blind = sepify.rewrite(model)
    assert not blind.changed  # the 16 kHz conv's shapes are unknown: kept
    out, report = sepify.rewrite(model, input_values={"sr": 16000})
    assert [r.qualified_name for r in report.rewritten] == [CONV_16K]
    drift = verify(model, out, input_values={"sr": 16000})
    assert drift.passed and drift.outputs[0].shape == BRANCH[16000]["y"]  # the rewritten branch ran
    assert "sr=16000" in drift.input_source
    other = verify(model, out, input_values=["sr=8000"])
    assert other.passed and other.outputs[0].shape == [1, 4, 8, 8]
    plan = sepify.plan(model, input_values={"sr": 16000})
    assert plan.node(CONV_16K).action == "rewrite"


def test_cli_rewrite_verify_bench(capsys, tmp_path, model_path):
    out = tmp_path / "rate_sep.onnx"
    assert main(["rewrite", str(model_path), "-o", str(out), "--input-value", "sr=16000", "--format", "json"]) == 0
    assert [r["qualified_name"] for r in json.loads(capsys.readouterr().out)["rewritten"]] == [CONV_16K]
    assert main(["verify", str(model_path), str(out), "--input-value", "sr=16000", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["outputs"][0]["shape"] == BRANCH[16000]["y"]
    assert report["input_source"] == "random (seed 0), fixed sr=16000"
    for sr in (16000, 8000):
        assert main(["bench", str(model_path), "--input-value", f"sr={sr}", "--runs", "2", "--warmup", "0",
                     "--no-profile", "--format", "json"]) == 0
        assert json.loads(capsys.readouterr().out)["macs_a"] == BRANCH[sr]["macs"]


def test_cli_audit_and_plan(capsys, model_path):
    assert main(["audit", str(model_path), "--input-value", "sr=8000", "--format", "json", "--no-spectra"]) == 0
    nodes = {n["qualified_name"]: n for n in json.loads(capsys.readouterr().out)["nodes"]}
    assert nodes[CONV_8K]["macs"] == BRANCH[8000]["macs"] and nodes[CONV_16K]["macs"] is None
    assert main(["plan", str(model_path), "--input-value", "sr=16000", "--format", "json"]) == 0
    assert [r["qualified_name"] for r in json.loads(capsys.readouterr().out)["rewritten"]] == [CONV_16K]


def test_bench_api_macs_follow_the_value(model):
    rep = benchmark(model, runs=2, warmup=0, profile_runs=0, input_values={"sr": 16000})
    assert rep.macs_a == BRANCH[16000]["macs"]


def test_npz_inputs_win_and_must_agree(capsys, tmp_path, model_path):
    npz = tmp_path / "in.npz"
    np.savez(npz, x=np.ones((1, 3, 16, 16), np.float32), sr=np.array(16000, np.int64))
    assert main(["verify", str(model_path), str(model_path), "--inputs", str(npz), "--input-value", "sr=16000"]) == 0
    capsys.readouterr()
    _bad(capsys, "verify", model_path, model_path, "--inputs", npz, "--input-value", "sr=8000",
         names=(str(npz), "'sr'", "sr=8000"))


def test_calibration_random_data_uses_the_value(model):
    cs = load_calibration("random", model, samples=3, input_values={"sr": 16000})
    assert len(cs.feeds) == 3 and all(int(f["sr"]) == 16000 and f["sr"].dtype == np.int64 for f in cs.feeds)
    assert "sr fixed" in cs.source
    data = {"x": np.zeros((2, 1, 3, 16, 16), np.float32), "sr": np.array([16000, 16000], np.int64)}
    assert len(load_calibration(data, model, input_values={"sr": 16000}).feeds) == 2
    with pytest.raises(UsageError, match="sr=8000.*holds other values for input .sr."):
        load_calibration(data, model, input_values={"sr": 8000})


# ----------------------------------------------------------------------------------------------
# bad specs: one line, exit 2, on every command that takes --input-shape
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, names", [
    ("nope=1", ("--input-value nope", "not a graph input", "inputs: x, sr")),
    ("sr=abc", ("sr=abc", "int64", "'abc' is not a number")),
    ("sr=0.5", ("sr=0.5", "int64", "is not an integer")),
    ("sr=1e30", ("sr=1e30", "out of its range")),
    ("sr=8000,16000", ("sr=8000,16000", "scalar", "2 values")),
    ("x=1,2,3", ("x=1,2,3", "1x3x16x16", "768 element", "3 values")),
    ("x=big", ("x=big", "float", "'big' is not a number")),
    ("x=1e300", ("x=1e300", "float", "out of its range")),
    ("sr", ("expected NAME=V",)),
    ("sr=", ("expected NAME=V",)),
    ("=5", ("expected NAME=V",)),
    ("sr=1,,2", ("expected NAME=V",)),
])
def test_bad_specs_cli(capsys, model_path, spec, names):
    _bad(capsys, "audit", model_path, "--input-value", spec, names=names)


def test_value_given_twice(capsys, model_path):
    _bad(capsys, "audit", model_path, "--input-value", "sr=8000", "--input-value", "sr=16000", names=("--input-value sr: given twice",))


@pytest.mark.parametrize("command", [
    ["audit", "{m}"], ["plan", "{m}"], ["rewrite", "{m}", "--dry-run"], ["verify", "{m}", "{m}"],
    ["bench", "{m}", "--runs", "1"], ["report", "{m}", "-o", "{d}/r.html"],
    ["rewrite", "{m}", "--dry-run", "--calibrate", "random"],
])
def test_every_command_takes_input_value(capsys, tmp_path, model_path, command):
    argv = [a.format(m=model_path, d=tmp_path) for a in command]
    _bad(capsys, *argv, "--input-value", "sr=abc", names=("'abc' is not a number",))
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("elem, value, expected", [
    (TensorProto.BOOL, ["true", "0", "1", "FALSE"], [True, False, True, False]),
    (TensorProto.BOOL, [1, 0], [True, False]),
    (TensorProto.UINT8, ["255"], [255]),
    (TensorProto.INT32, ["-7", "3.0"], [-7, 3]),
    (TensorProto.FLOAT16, ["0.5"], [0.5]),
    (TensorProto.DOUBLE, [1, 2.5], [1.0, 2.5]),
    (TensorProto.STRING, ["en"], ["en"]),
])
def test_cast(elem, value, expected):
    got = cast_input_value("v", value, elem)
    assert got.tolist() == expected


@pytest.mark.parametrize("elem, value, match", [
    (TensorProto.BOOL, ["2"], "give 0, 1, true or false"),
    (TensorProto.BOOL, ["yes"], "give 0, 1, true or false"),
    (TensorProto.BOOL, [0.5], "give 0, 1, true or false"),
    (TensorProto.UINT8, ["-1"], "out of its range"),
    (TensorProto.UINT8, [256], "out of its range"),
    (TensorProto.INT64, [float("nan")], "not an integer"),
    (TensorProto.FLOAT16, ["1e6"], "out of its range"),
    (TensorProto.FLOAT, [1 + 2j], "give numbers"),
    (TensorProto.FLOAT, [], "no values"),
    (TensorProto.BFLOAT16, ["1"], "bfloat16"),
])
def test_cast_refuses(elem, value, match):
    with pytest.raises(UsageError, match=match):
        cast_input_value("v", value, elem)
