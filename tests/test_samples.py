"""The committed sample models: reproducible, valid, runnable, and audited as designed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import sepify

ROOT = Path(__file__).resolve().parent.parent
SAMPLES_DIR = ROOT / "sample_models"
SCRIPT = ROOT / "scripts" / "make_samples.py"

SAMPLES = ["sobel_rgb", "gaussian_blur", "vgg_small", "lowrank_separable", "conv1d", "dynamic_batch"]
BATCH = {"batch": 2}  # concrete value for symbolic dims when running


def sample_path(name: str) -> Path:
    return SAMPLES_DIR / f"{name}.onnx"


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("samples")
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--quiet"], check=True)
    return out


def _session(path: Path):
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _dims(value_info: onnx.ValueInfoProto) -> list:
    return [d.dim_param if d.dim_param else d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _concrete(dims: list) -> list[int]:
    return [BATCH[d] if isinstance(d, str) else d for d in dims]


def _run(name: str, seed: int = 0) -> tuple[dict, dict, onnx.ModelProto]:
    path = sample_path(name)
    model = onnx.load(str(path))
    rng = np.random.default_rng(seed)
    feeds = {i.name: rng.standard_normal(_concrete(_dims(i))).astype(np.float32) for i in model.graph.input}
    sess = _session(path)
    names = [o.name for o in model.graph.output]
    outs = dict(zip(names, sess.run(names, feeds)))
    return feeds, outs, model


# ----------------------------------------------------------------------------------------------
# (a) reproducible
# ----------------------------------------------------------------------------------------------
def test_regeneration_is_byte_identical(regenerated):
    fresh = sorted(p.name for p in regenerated.glob("*.onnx"))
    assert fresh == sorted(f"{n}.onnx" for n in SAMPLES)
    for name in fresh:
        assert (regenerated / name).read_bytes() == (SAMPLES_DIR / name).read_bytes(), (
            f"{name} differs from the committed file: rerun `python scripts/make_samples.py` and commit"
        )


def test_committed_samples_are_exactly_the_generated_set():
    assert sorted(p.stem for p in SAMPLES_DIR.glob("*.onnx")) == sorted(SAMPLES)


# ----------------------------------------------------------------------------------------------
# (b) valid and runnable
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SAMPLES)
def test_sample_is_valid(name):
    path = sample_path(name)
    assert path.stat().st_size < 1_000_000
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 10
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert model.doc_string.strip()
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    for v in [*model.graph.input, *model.graph.output]:
        assert v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        dims = v.type.tensor_type.shape.dim
        assert len(dims) > 0 and all(d.HasField("dim_value") or d.dim_param for d in dims), v.name
    for t in model.graph.initializer:
        assert t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64)


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_runs_in_onnxruntime(name):
    _, outs, model = _run(name)
    for o in model.graph.output:
        got = outs[o.name]
        assert list(got.shape) == _concrete(_dims(o)), o.name
        assert got.dtype == np.float32 and np.all(np.isfinite(got))


def test_dynamic_batch_input_is_symbolic():
    model = onnx.load(str(sample_path("dynamic_batch")))
    assert _dims(model.graph.input[0]) == ["batch", 3, 32, 32]
    feeds, outs, _ = _run("dynamic_batch")
    assert feeds["x"].shape[0] == 2 and outs["y"].shape[0] == 2
    assert any(n.op_type == "Constant" for n in model.graph.node)


# ----------------------------------------------------------------------------------------------
# (c) Sobel against a numpy reference
# ----------------------------------------------------------------------------------------------
def _conv2d_reference(x: np.ndarray, w: np.ndarray, pad: int) -> np.ndarray:
    """Plain cross-correlation (ONNX Conv, stride 1, group 1) in float64."""
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh, ow = h - kh + 1, wd - kw + 1
    y = np.zeros((n, o, oh, ow))
    for i in range(kh):
        for j in range(kw):
            y += np.einsum("nchw,oc->nohw", x[:, :, i : i + oh, j : j + ow], w[:, :, i, j].astype(np.float64))
    return y


def test_sobel_matches_numpy_reference():
    feeds, outs, model = _run("sobel_rgb", seed=3)
    lum = np.array([0.299, 0.587, 0.114])
    gx = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float64)
    w = np.stack([np.einsum("c,ij->cij", lum, s) for s in (gx, gx.T)])
    stored = onnx.numpy_helper.to_array(model.graph.initializer[0])
    np.testing.assert_allclose(stored, w, rtol=1e-7, atol=0)
    ref = _conv2d_reference(feeds["image"], w, pad=1)
    np.testing.assert_allclose(outs["gradients"], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outs["edges"], np.sqrt((ref**2).sum(axis=1, keepdims=True)), rtol=1e-5, atol=1e-5)
    # Gray-level gradient: a horizontal ramp of the gray image gives Gx = -8 * slope inside.
    ramp = np.broadcast_to(np.arange(64, dtype=np.float32), (1, 3, 64, 64)).copy()
    gx_out = _session(sample_path("sobel_rgb")).run(["gradients"], {"image": ramp})[0]
    np.testing.assert_allclose(gx_out[0, 0, 1:-1, 1:-1], -8.0 * lum.sum(), rtol=1e-5)
    np.testing.assert_allclose(gx_out[0, 1, 1:-1, 1:-1], 0.0, atol=1e-4)


def test_gaussian_blur_preserves_constant_image():
    sess = _session(sample_path("gaussian_blur"))
    blurred, half = sess.run(["blurred", "half"], {"image": np.full((1, 3, 128, 128), 0.5, np.float32)})
    np.testing.assert_allclose(blurred[:, :, 2:-2, 2:-2], 0.5, rtol=1e-6)
    np.testing.assert_allclose(half[:, :, 2:-2, 2:-2], 0.5, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# (d) sepify audit finds what the samples were built to contain
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def audits() -> dict:
    return {name: sepify.audit(str(sample_path(name)), input_shapes=None) for name in SAMPLES}


@pytest.mark.parametrize("name", SAMPLES)
def test_audit_runs_on_every_sample(audits, name):
    r = audits[name]
    assert r.nodes, name
    assert all(n.macs for n in r.nodes)
    assert r.totals.conv_macs == sum(n.macs for n in r.nodes) > 0


def _schemes(node):
    assert node.separability is not None, f"{node.name}: no separability analysis ({node.reason})"
    return node.separability.schemes


def test_audit_sobel(audits):
    node = audits["sobel_rgb"].node("edges/conv")
    original = 64 * 64 * 2 * 3 * 9
    assert node.macs == original
    assert audits["sobel_rgb"].totals.conv_macs == original
    best = node.separability.best_exact
    assert best is not None and best.macs < original
    # Rank 1 per output channel (luma ⊗ kernel): pointwise 3->2, then depthwise 3x3.
    assert _schemes(node)["pw-dw"].exact_rank == 1
    # Low rank across input channels too: in-lowrank r=1 (a 3→1 luma conv, then a 1→2 3×3) with the
    # 3×3 split into 3×1 and 1×3: 64·64·(3 + 2·3 + 2·3) MACs — below pw-dw+spatial's 64·64·(2·3)·3.
    assert _schemes(node)["in-lowrank"].exact_rank == 1
    assert (best.scheme, best.rank, best.macs) == ("in-lowrank+spatial", 1, 64 * 64 * (3 + 2 * 3 + 2 * 3))


def test_audit_gaussian_kernels_are_spatially_rank_one(audits):
    r = audits["gaussian_blur"]
    for name in ("blur/conv", "down/conv"):
        assert _schemes(r.node(name))["spatial"].exact_rank == 1, name
    blur = r.node("blur/conv")
    assert blur.macs == 128 * 128 * 3 * 25
    best = blur.separability.best_exact
    assert (best.scheme, best.rank, best.macs) == ("spatial", 1, 2 * 128 * 128 * 3 * 5)


def test_audit_lowrank_separable(audits):
    r = audits["lowrank_separable"]
    assert _schemes(r.node("dwpw1/conv"))["dw-pw"].exact_rank == 1
    assert _schemes(r.node("dwpw2/conv"))["dw-pw"].exact_rank == 2
    assert _schemes(r.node("pwdw/conv"))["pw-dw"].exact_rank == 1
    for name in ("dwpw1/conv", "dwpw2/conv", "pwdw/conv"):
        best = r.node(name).separability.best_exact
        assert best is not None and best.macs < r.node(name).macs, name
    assert r.node("pwdw/conv").output_shape == [1, 32, 16, 16]


def test_audit_vgg_small_is_full_rank(audits):
    convs = audits["vgg_small"].nodes
    assert len(convs) == 4
    for node in convs:
        assert node.separability is not None, node.name
        assert node.separability.best_exact is None, node.name
    assert audits["vgg_small"].totals.exact_savings_macs == 0


def test_audit_conv1d(audits):
    r = audits["conv1d"]
    assert r.node("conv1/conv").macs == 256 * 16 * 8 * 5
    assert _schemes(r.node("conv1/conv"))["dw-pw"].exact_rank == 1
    assert r.node("conv2/conv").macs == 256 * 16 * 8 * 3
    assert r.node("conv2/conv").separability.best_exact is None


def test_audit_dynamic_batch(audits):
    r = audits["dynamic_batch"]
    mid = r.node("mid/conv")  # weight from a Constant node
    assert _schemes(mid)["dw-pw"].exact_rank == 1
    down = r.node("down/conv")  # auto_pad SAME_UPPER, stride 2
    assert down.pads == [0, 0, 1, 1] and down.output_shape == [1, 32, 16, 16]
    assert _schemes(down)["pw-dw"].exact_rank == 1
    assert r.node("stem/conv").separability.best_exact is None
    r2 = sepify.audit(str(sample_path("dynamic_batch")), input_shapes={"x": [2, 3, 32, 32]})
    assert r2.totals.conv_macs == 2 * r.totals.conv_macs
