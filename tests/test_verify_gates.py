"""verify on sample files (every sample, one convention with calibration) and the pass criteria
for lossy rewrites (--max-drift, --min-cosine, --min-top1), issue 13 points 4 and 8."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from sepify.cli import main
from sepify.core.drift import STD_FLOOR, DriftMeter, drift_definition
from sepify.errors import ParameterError, UsageError
from sepify.pipeline.verify import compare_tensors, verify

from conftest import make_model, vi

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
VGG = SAMPLES / "vgg_small.onnx"  # input "image" fixed at 1x3x64x64, output logits [1, 10]


@pytest.fixture(scope="module")
def lossy(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("g") / "vgg_r2.onnx"
    assert main(["rewrite", str(VGG), "-o", str(out), "--rank", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> tuple[Path, np.ndarray]:
    x = np.random.default_rng(3).standard_normal((8, 3, 64, 64)).astype(np.float32)
    p = tmp_path_factory.mktemp("s") / "eight.npz"
    np.savez(p, image=x)
    return p, x


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------------
# 4. one sample-file convention; every sample is run
# ----------------------------------------------------------------------------------------------
def test_verify_takes_a_multi_sample_npz_for_a_batch_1_model(capsys, lossy, samples):
    path, x = samples
    code, out, err = _run(capsys, "verify", VGG, lossy, "--inputs", path, "--format", "json")
    assert code == 1, err  # lossy: the elementwise rule fails, but the run works
    report = json.loads(out)
    assert report["samples"] == 8 and report["runs"] == 8 and "8 samples in 8 runs" in report["input_source"]


def test_statistics_are_over_every_sample(lossy, samples):
    path, x = samples
    report = verify(VGG, lossy, inputs=path)
    sa, sb = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (VGG, lossy))
    a = np.concatenate([sa.run(None, {"image": x[i:i + 1]})[0] for i in range(8)])
    b = np.concatenate([sb.run(None, {"image": x[i:i + 1]})[0] for i in range(8)])
    expect = compare_tensors("logits", a, b)
    (got,) = report.outputs
    for field in ("max_abs", "mean_abs", "p99_abs", "max_rel", "cosine", "snr_db", "mismatched", "top1_agreement",
                  "top5_agreement"):
        assert getattr(got, field) == pytest.approx(getattr(expect, field), rel=1e-6), field
    assert got.top1_agreement is not None  # 8 rows of class scores


def test_a_folder_of_npy_and_the_sample_axis_on_the_batch_axis(tmp_path, lossy, samples):
    _, x = samples
    folder = tmp_path / "dir"
    folder.mkdir()
    np.save(folder / "a.npy", x[:5])
    np.save(folder / "b.npy", x[5:, None])  # [S, 1, 3, 64, 64]: explicit sample axis
    report = verify(VGG, lossy, inputs=folder)
    assert report.samples == 8 and report.runs == 8


def test_calibration_and_verify_read_the_same_file(samples):
    from sepify.calibration.data import load_calibration
    from sepify.model.samples import load_samples

    path, _ = samples
    a, b = load_calibration(path, VGG), load_samples(path, VGG)
    assert a.samples == b.samples == 8 and all(np.array_equal(f["image"], g["image"]) for f, g in zip(a.feeds, b.feeds))


def test_onnxruntime_failure_names_the_model(tmp_path):
    """A model that fails at run time (a Reshape that cannot hold its input): the message names it."""
    shape = onnx.numpy_helper.from_array(np.array([7], np.int64), "shape")
    m = make_model([helper.make_node("Reshape", ["x", "shape"], ["y"], name="bad_reshape")],
                   [vi("x", [1, 8])], [vi("y", [7])], [shape], check=False)
    p = tmp_path / "breaks.onnx"
    onnx.save(m, p)
    with pytest.raises(UsageError, match=r"onnxruntime failed to run .*breaks\.onnx.*bad_reshape"):
        verify(p, p)


def test_report_verify_uses_every_eval_sample(capsys, tmp_path, samples):
    path, _ = samples
    page = tmp_path / "r.html"
    code, out, err = _run(capsys, "report", VGG, "-o", page, "--rank", "2", "--verify", "--eval", path)
    assert code == 0, err
    assert "8 samples in 8 runs" in page.read_text()


# ----------------------------------------------------------------------------------------------
# 8. pass criteria for lossy rewrites
# ----------------------------------------------------------------------------------------------
def test_gates_replace_the_elementwise_rule(capsys, lossy, samples):
    path, _ = samples
    base = ["verify", VGG, lossy, "--inputs", path]
    assert _run(capsys, *base)[0] == 1
    cosine = verify(VGG, lossy, inputs=path).outputs[0].cosine
    assert 0.5 < cosine < 0.9999
    assert _run(capsys, *base, "--min-cosine", f"{cosine - 1e-3:.6f}")[0] == 0
    assert _run(capsys, *base, "--min-cosine", f"{min(cosine + 1e-3, 1):.6f}")[0] == 1
    assert _run(capsys, *base, "--max-drift", f"{1 - cosine + 1e-3:.6f}")[0] == 0
    assert _run(capsys, *base, "--max-drift", f"{max(1 - cosine - 1e-3, 0):.6f}")[0] == 1
    code, out, _ = _run(capsys, *base, "--min-top1", "0", "--min-cosine", "0", "--format", "json")
    report = json.loads(out)
    assert code == 0 and report["gates"]["min_top1"] == 0 and "not applied" in report["rule"]
    assert report["outputs"][0]["drift"] is None  # no --max-drift: no drift column
    code, out, _ = _run(capsys, *base, "--min-cosine", "0")
    assert "PASSED: cosine >= 0" in out.replace("\n", " ")


def test_top1_agreement_gate(lossy, samples):
    path, _ = samples
    top1 = verify(VGG, lossy, inputs=path).outputs[0].top1_agreement
    assert verify(VGG, lossy, inputs=path, min_top1=top1).passed
    if top1 < 1:
        assert not verify(VGG, lossy, inputs=path, min_top1=min(1.0, top1 + 0.125)).passed
    with pytest.raises(ParameterError, match="min_top1.*class scores"):
        verify(SAMPLES / "lowrank_separable.onnx", SAMPLES / "lowrank_separable.onnx", min_top1=0.9)


def test_channel_metric_drift_is_the_calibration_meter(lossy, samples):
    path, x = samples
    report = verify(VGG, lossy, inputs=path, max_drift=2.0, drift_metric="channel")
    sa, sb = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (VGG, lossy))
    ref = [[sa.run(None, {"image": x[i:i + 1]})[0]] for i in range(8)]
    new = [[sb.run(None, {"image": x[i:i + 1]})[0]] for i in range(8)]
    expect = DriftMeter(ref, "channel", [1] * 8).per_output(new)[0]
    assert report.outputs[0].drift == pytest.approx(expect) and report.passed
    assert report.to_dict()["drift_definition"] == drift_definition("channel")


def test_rewrite_verify_with_criteria(capsys, tmp_path):
    out = tmp_path / "o.onnx"
    base = ["rewrite", VGG, "-o", out, "--rank", "2", "--verify"]
    assert _run(capsys, *base)[0] == 1  # the elementwise rule: a lossy rewrite always fails it
    assert _run(capsys, *base, "--min-cosine", "0.5")[0] == 0
    assert _run(capsys, *base, "--min-cosine", "0.999999")[0] == 1
    code, text, _ = _run(capsys, *base, "--max-drift", "2", "--format", "json")
    data = json.loads(text)
    assert code == 0 and data["verify"]["gates"]["drift_metric"] == "channel"  # rewrite's metric


def test_gate_values_are_checked():
    with pytest.raises(ParameterError, match="max_drift"):
        verify(VGG, VGG, max_drift=-1)
    with pytest.raises(ParameterError, match="min_cosine"):
        verify(VGG, VGG, min_cosine=2)
    with pytest.raises(ParameterError, match="atol"):
        verify(VGG, VGG, min_cosine=0.9, atol=1e-3)


def test_drift_definition_follows_the_code():
    text = drift_definition("channel")
    assert f"{STD_FLOOR:g} x the channel's RMS" in text and "axis 1" in text and "mean over the outputs" in text
    assert "standardiz" not in drift_definition("cosine")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 3, 5)) * np.array([1, 100, 0.01])[None, :, None]
    b = a + rng.standard_normal(a.shape) * 0.1
    # by hand, as the text says: standardize each channel with the original's mean and floored std
    flat = np.moveaxis(a, 1, 0).reshape(3, -1)
    mean, rms = flat.mean(1), np.sqrt((flat ** 2).mean(1))
    scale = 1 / np.maximum(flat.std(1), STD_FLOOR * rms)
    sa = (a - mean[None, :, None]) * scale[None, :, None]
    sb = (b - mean[None, :, None]) * scale[None, :, None]
    by_hand = 1 - (sa.ravel() @ sb.ravel()) / np.linalg.norm(sa) / np.linalg.norm(sb)
    assert DriftMeter([[a]], "channel").drift([[b]]) == pytest.approx(by_hand)
