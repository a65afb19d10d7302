"""The HTML report's content (issue 13, "The HTML report"); its layout in a browser is checked by
tests/test_html_browser.py (opt-in)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sepify.cli import main
from sepify.pipeline.verify import DriftReport, TensorDrift
from sepify.render.html import _drift_section, _ticks, line_chart

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


@pytest.fixture(scope="module")
def bench_page(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("page")
    page = d / "r.html"
    assert main(["rewrite", str(SAMPLES / "lowrank_separable.onnx"), "-o", str(d / "o.onnx"), "--html", str(page),
                 "--bench", "--verify"]) == 0
    return page.read_text()


@pytest.fixture(scope="module")
def calibrated_page(tmp_path_factory) -> str:
    page = tmp_path_factory.mktemp("page") / "c.html"
    assert main(["report", str(SAMPLES / "vgg_small.onnx"), "-o", str(page), "--budget", "0.5", "--calibrate",
                 "random", "--calib-samples", "4", "--sweep", "--budgets", "0.8,0.5", "--no-fold-bn"]) == 0
    return page.read_text()


def _headers(page: str) -> list[str]:
    return re.findall(r"<th[^>]*>([^<]*)</th>", page)


def test_rewrite_html_with_bench_has_the_benchmark(bench_page):
    assert "Benchmark (onnxruntime)" in bench_page and "measured speedup" in bench_page
    assert "summed kernel times" in bench_page


def test_header_shows_inputs_not_a_dict(bench_page):
    assert "{'" not in bench_page and "inputs x 1×16×32×32" in bench_page


def test_empty_columns_and_sections_are_left_out(calibrated_page):
    headers = _headers(calibrated_page)
    assert "BN folded" not in headers and "speedup" not in headers  # nothing folded, no --latency
    assert "0 conv(s)" not in calibrated_page and "folded into" not in calibrated_page
    assert "best (near-)exact split" not in headers  # vgg has no (near-)exact split anywhere


def test_node_names_break_only_after_separators(bench_page):
    assert "dwpw1/<wbr>conv" in bench_page and "word-break:break-all" not in bench_page


def test_legends_sit_below_the_plots():
    chart = line_chart([{"x": [1, 2, 3], "y": [1e-3, 1e-2, 1e-1], "label": "curve A"}], logy=True, title="t")
    svg, after = chart.split("</svg>")
    assert "curve A" not in svg and 'class="legend"' in after and "curve A" in after


def test_layer_index_ticks_are_integers():
    assert _ticks(0, 2, False, integer=True) == [0, 1, 2]
    chart = line_chart([{"x": [0, 1, 2], "y": [0.1, 0.2, 0.3]}], integer_x=True)
    assert ">0.5<" not in chart and ">1<" in chart


def _layer(name, cosine):
    return TensorDrift(name, [1, 4], 0.0, 0.0, 0.0, 0.0, cosine, 100.0, 0, 0, 0, True)


def test_exact_layers_are_not_clamped_onto_the_axis():
    drift = DriftReport("a", "b", 1e-4, 1e-3, 0, "random (seed 0)", [_layer("y", 0.999)],
                        layers=[_layer("l0", 1.0), _layer("l1", 0.99), _layer("l2", 0.999)])
    html = _drift_section(drift)
    assert "1 layer(s) match exactly" in html
    assert "1e-12" not in html  # the old clamp floor
    assert html.count("<circle") == 2  # the exact layer is in the table, not drawn at a made-up value


def test_bars_scale_with_the_page(bench_page):
    assert 'class="bars"' in bench_page and "width:100.0%" in bench_page
    assert not re.search(r'<svg[^>]*width="1100"', bench_page)
