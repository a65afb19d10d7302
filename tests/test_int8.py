"""Rewrites made for int8 afterwards: factor stages balanced (cross-layer equalization), and the
rewritten model quantized by onnxruntime's own quantize_static (QDQ, per-channel)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import rand
from sepify.core.schemes import get as get_scheme
from sepify.core.stages import balance, compose
from sepify.pipeline.plan import Policy
from sepify.pipeline.rewrite import rewrite
from test_calibrate import geometry

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def _fake_quant_per_channel(w: np.ndarray) -> np.ndarray:
    """Symmetric int8 per output channel (what quantize_static does to a weight)."""
    flat = w.reshape(w.shape[0], -1)
    scale = np.abs(flat).max(axis=1, keepdims=True) / 127
    scale[scale == 0] = 1
    return (np.round(flat / scale).clip(-127, 127) * scale).reshape(w.shape)


CASES = [("dw-pw", 1), ("pw-dw", 1), ("spatial", 1), ("out-lowrank", 1), ("in-lowrank", 1), ("tucker2", 1),
         ("dw-pw", 2), ("pw-dw", 4), ("tucker2", 2)]


@pytest.mark.parametrize("scheme, group", CASES)
def test_balance_keeps_the_chain_and_evens_the_channel_ranges(scheme, group):
    w = rand((8, 8 // group, 3, 3), seed=3)
    geo = geometry(w, (1, 8, 10, 10), pads=(1, 1, 1, 1), group=group)
    sch = get_scheme(scheme)
    if sch.reason(geo) is not None:
        pytest.skip(f"{scheme} does not apply: {sch.reason(geo)}")
    stages = sch.factor(w.astype(np.float64), geo, 2)
    # unbalance it on purpose: channel j of every intermediate tensor scaled by 10^±3
    skewed = list(stages)
    for i in range(len(skewed) - 1):
        st, nxt = skewed[i], skewed[i + 1]
        s = 10.0 ** np.linspace(-3, 3, st.out_channels)
        a = np.array(st.weight) * s.reshape(-1, *([1] * (st.weight.ndim - 1)))
        b = np.array(nxt.weight).reshape(nxt.group, nxt.out_channels // nxt.group, nxt.in_per_group, -1)
        b = (b / s.reshape(nxt.group, 1, nxt.in_per_group, 1)).reshape(nxt.weight.shape)
        skewed[i], skewed[i + 1] = st.with_weight(a), nxt.with_weight(b)
    np.testing.assert_allclose(compose(skewed, geo), compose(stages, geo), rtol=1e-9, atol=1e-12)
    even = balance(skewed)
    np.testing.assert_allclose(compose(even, geo), compose(stages, geo), rtol=1e-9, atol=1e-12)
    if len(even) == 2:  # one pair: both sides of every channel end with the same range
        a, nxt = even[0].weight, even[1]
        ra = np.abs(a.reshape(a.shape[0], -1)).max(axis=1)
        rb = np.abs(nxt.weight.reshape(nxt.group, nxt.out_channels // nxt.group, nxt.in_per_group, -1)).max(axis=(1, 3))
        live = ra > 0
        np.testing.assert_allclose(ra[live], rb.reshape(-1)[live], rtol=1e-9)

    def int8_error(sts):
        q = [s.with_weight(_fake_quant_per_channel(np.asarray(s.weight))) for s in sts]
        ref = compose(sts, geo)
        return np.linalg.norm(compose(q, geo) - ref) / np.linalg.norm(ref)

    assert int8_error(even) < int8_error(skewed)
    assert int8_error(even) < 0.05


def test_rewritten_model_quantizes_with_onnxruntime(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    model = onnx.load(str(SAMPLES / "vgg_small.onnx"))
    name = model.graph.input[0].name
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    out, report = rewrite(model, Policy(mode="rank", rank=4, scheme="out-lowrank"))
    assert report.totals.rewritten_nodes > 0
    src = tmp_path / "rewritten.onnx"
    onnx.save(out, str(src))
    data = [np.random.default_rng(i).random(shape, dtype=np.float32) for i in range(8)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(data)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {name: x}

    dst = tmp_path / "int8.onnx"
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    fp = ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(str(dst), opts, providers=["CPUExecutionProvider"])
    a, b = fp.run(None, {name: data[0]})[0].ravel(), q.run(None, {name: data[0]})[0].ravel()
    assert sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(dst)).graph.node) > 0
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99
