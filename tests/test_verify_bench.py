"""verify / bench through the CLI and the API: exit codes, pass rule, per-layer drift, A/B report."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import sepify
from sepify.pipeline.bench import benchmark
from sepify.cli import main
from sepify.pipeline.verify import compare_tensors, verify

from conftest import make_model, vi

SAMPLES = "sample_models"


@pytest.fixture(scope="module")
def lossless(tmp_path_factory):
    out = tmp_path_factory.mktemp("v") / "lowrank_sep.onnx"
    assert main(["rewrite", f"{SAMPLES}/lowrank_separable.onnx", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def lossy(tmp_path_factory):
    out = tmp_path_factory.mktemp("v") / "vgg_r1.onnx"
    assert main(["rewrite", f"{SAMPLES}/vgg_small.onnx", "-o", str(out), "--rank", "1"]) == 0
    return out


def test_verify_exit_0_on_lossless_rewrite(lossless, capsys):
    assert main(["verify", f"{SAMPLES}/lowrank_separable.onnx", str(lossless), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is True
    (out,) = report["outputs"]
    assert out["name"] == "y" and out["cosine"] > 0.999999 and out["mismatched"] == 0


def test_verify_exit_1_on_lossy_rewrite_under_tight_tolerance(lossy, capsys):
    assert main(["verify", f"{SAMPLES}/vgg_small.onnx", str(lossy), "--atol", "1e-6", "--rtol", "1e-6"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_verify_exit_2_on_broken_file(tmp_path, lossless, capsys):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(lossless.read_bytes()[:100])
    assert main(["verify", f"{SAMPLES}/lowrank_separable.onnx", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sepify: error:") and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_per_layer_reports_each_rewritten_node(lossless):
    report = verify(f"{SAMPLES}/lowrank_separable.onnx", lossless, per_layer=True)
    assert sorted(d.name for d in report.layers) == ["dwpw1.out", "dwpw2.out", "pwdw.out"]
    assert all(d.passed for d in report.layers)


def test_inputs_from_npz_are_used(tmp_path, lossless):
    x = np.full((1, 16, 32, 32), 0.5, np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    report = verify(f"{SAMPLES}/lowrank_separable.onnx", lossless, inputs=tmp_path / "in.npz")
    assert "in.npz" in report.input_source and report.passed and report.samples == report.runs == 1


def test_pass_rule_is_allclose():
    a = np.array([1.0, 100.0], np.float32)
    b = a + np.array([0.5e-3, 0.09], np.float32)  # within 1e-4 + 1e-3·|a| for both
    assert compare_tensors("t", a, b, 1e-4, 1e-3).passed
    assert not compare_tensors("t", a, a + np.float32(0.2), 1e-4, 1e-3).passed
    nan = a.copy()
    nan[0] = np.nan
    assert not compare_tensors("t", a, nan, 1.0, 1.0).passed


def test_class_scores_get_topk_agreement(lossy):
    report = verify(f"{SAMPLES}/vgg_small.onnx", lossy, atol=10, rtol=10)
    (logits,) = report.outputs
    assert logits.top1_agreement is not None and 0.0 <= logits.top5_agreement <= 1.0


def test_bench_ab_report(lossless):
    report = benchmark(f"{SAMPLES}/lowrank_separable.onnx", lossless, runs=6, warmup=1, profile_runs=2)
    assert report.latency_a.runs == report.latency_b.runs == 6
    assert report.macs_a == sepify.audit(f"{SAMPLES}/lowrank_separable.onnx").totals.total_macs
    assert report.mac_reduction == pytest.approx(report.macs_a / report.macs_b) and report.mac_reduction > 3
    assert report.speedup > 0 and report.efficiency == pytest.approx(report.speedup / report.mac_reduction)
    assert sorted(n.name for n in report.nodes) == ["dwpw1/conv", "dwpw2/conv", "pwdw/conv"]


def test_bench_cli_json(capsys):
    assert main(["bench", f"{SAMPLES}/sobel_rgb.onnx", "--runs", "3", "--warmup", "0", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["latency_a"]["runs"] == 3 and report["model_b"] is None
    assert main(["bench", f"{SAMPLES}/sobel_rgb.onnx", "--runs", "0"]) == 2


def _fp16_conv_model(w: np.ndarray):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c_out, c_in = w.shape[:2]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, c_in, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, c_out, 32, 32])],
        [numpy_helper.from_array(w.astype(np.float16), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def test_float16_lossless_rewrite_passes_verify(tmp_path, capsys):
    """A float16 model's exact rewrite rounds one more intermediate to float16: its outputs differ from
    the original's by ~1 ulp of the largest values, thousands of elements beyond the float32 defaults
    (atol 1e-4, rtol 1e-3), so every lossless float16 rewrite used to FAIL verify (exit 1).  float16
    outputs now default to 8·eps·max|a| / 2·eps; a lossy rewrite still fails, and given tolerances
    are used as given."""
    import onnx

    from sepify.pipeline.verify import LOW_PRECISION_ULPS, default_tolerance

    rng = np.random.default_rng(0)
    exact = np.einsum("nc,ck->nck", rng.standard_normal((32, 1)), rng.standard_normal((1, 9))) \
        .reshape(32, 1, 9).repeat(16, axis=1)  # every input channel's 32x9 matrix is rank 1
    exact *= rng.standard_normal((1, 16, 1))
    src = tmp_path / "fp16.onnx"
    onnx.save(_fp16_conv_model(exact.reshape(32, 16, 3, 3)), src)
    out = tmp_path / "fp16_sep.onnx"
    assert main(["rewrite", str(src), "-o", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "1 node(s) rewritten" in text and "PASSED: |a-b| <= atol + rtol*|a| (y: " in text
    report = verify(src, out)
    (y,) = report.outputs
    eps16 = float(np.finfo(np.float16).eps)
    assert y.passed and y.max_abs > 0 and y.rtol == 2 * eps16 and y.atol > report.atol
    assert not verify(src, out, atol=1e-4, rtol=1e-3).passed  # the float32 rule, when asked for
    lossy = tmp_path / "fp16_r1.onnx"
    full = rng.standard_normal((32, 16, 3, 3))
    onnx.save(_fp16_conv_model(full), src)
    assert main(["rewrite", str(src), "-o", str(lossy), "--rank", "1", "--verify"]) == 1
    assert default_tolerance(np.ones(3, np.float32)) == (1e-4, 1e-3)
    a16 = np.array([-40.0, 2.0], np.float16)
    assert default_tolerance(a16) == (LOW_PRECISION_ULPS * eps16 * 40.0, 2 * eps16)


def test_verify_says_when_the_outputs_do_not_respond_to_the_inputs(tmp_path, capsys):
    """A lossy rewrite 'passes' on outputs that are saturated at the inputs used (argmax ids of
    logits one bias dominates): verify says that its agreement proves little."""
    import numpy as np
    from onnx import TensorProto, helper

    from conftest import init, make_model, rand, vi
    from sepify.cli import main

    bias = np.zeros(8, np.float32)
    bias[0] = 1e4
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["logits"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("ArgMax", ["logits"], ["ids"], name="argmax", axis=1, keepdims=0)]
    model = make_model(nodes, [vi("x", [1, 4, 8, 8])], [vi("ids", [1, 8, 8], TensorProto.INT64)],
                       [init("w", rand([8, 4, 3, 3])), init("b", bias)])
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    src.write_bytes(model.SerializeToString())
    assert main(["rewrite", str(src), "-o", str(out), "--rank", "1"]) == 0
    capsys.readouterr()
    assert main(["verify", str(src), str(out), "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["passed"] and d["insensitive_outputs"] == ["ids"] and "proves little" in d["warnings"][0]
    assert main(["verify", str(src), str(out)]) == 0
    assert "warning: output(s) ids do not change when the inputs do" in capsys.readouterr().out
    assert sepify.verify(src, src).insensitive == ["ids"]


@pytest.mark.parametrize("command", ["verify", "bench"])
@pytest.mark.parametrize("other", ["another input name", "another rank", "another element type"])
def test_comparing_unrelated_models_is_bad_input(command, other, tmp_path, capfd):
    """verify and bench run both models on the first one's feeds: a second model that needs another
    input, or refuses those feeds, is a one-line exit 2 — not a crash."""
    a = make_model([helper.make_node("Relu", ["X"], ["Y"])], [vi("X", [1, 4, 8, 8])], [vi("Y", [1, 4, 8, 8])])
    name, shape, dtype = {"another input name": ("Z", [2, 5], TensorProto.FLOAT),
                          "another rank": ("X", [1, 3, 5], TensorProto.FLOAT),
                          "another element type": ("X", [1, 4, 8, 8], TensorProto.INT64)}[other]
    b = make_model([helper.make_node("Identity", [name], ["Y"])], [vi(name, shape, dtype)], [vi("Y", shape, dtype)])
    pa, pb = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(a, str(pa))
    onnx.save(b, str(pb))
    extra = ["--runs", "3"] if command == "bench" else []
    capfd.readouterr()
    assert main([command, str(pa), str(pb), *extra]) == 2
    out, err = capfd.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert out == "" and len(lines) == 1 and lines[0].startswith("sepify: error: ") and "Traceback" not in err
    assert str(pb) in lines[0]
