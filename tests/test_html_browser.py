"""The HTML report in a real browser (opt-in: ``pytest -m browser``; needs Debian's Chromium,
``apt-get install chromium``).

Each page is rendered headless at 1400 and 800 px: a script injected into a copy of the page
measures the layout and writes its findings into the DOM, which ``--dump-dom`` hands back.  The
page must never scroll sideways (no element right of the viewport, except inside a table's own
scroll box), and no number may be broken over two lines.  Screenshots at both widths are taken
too; set ``SEPIFY_SCREENSHOTS=DIR`` to keep them for a look.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import onnx
import pytest

from sepify.cli import main

from conftest import long_names_model

pytestmark = pytest.mark.browser

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
WIDTHS = (1400, 800)

CHECK = r"""
(function(){
  var W = document.documentElement.clientWidth;
  var out = {width: W, scrollWidth: document.documentElement.scrollWidth, offenders: [], wrapped: []};
  function box(el){ for (var p = el.parentElement; p; p = p.parentElement)
                      if (p.classList && p.classList.contains('scroll')) return p; return null; }
  document.querySelectorAll('body *').forEach(function(el){
    var r = el.getBoundingClientRect(); if (!r.width) return;
    if (box(el)) return;  // inside a table's scroll box: it may scroll there, the box itself is checked
    if (r.right > W + 1) out.offenders.push(el.tagName + '.' + el.className + ' "' +
                                            (el.textContent || '').trim().slice(0, 40) + '" right=' + Math.round(r.right));
  });
  document.querySelectorAll('td, .kpi b').forEach(function(td){
    var t = (td.textContent || '').trim();
    if (!/^[-−+]?[0-9][0-9.,]*(e[-+]?[0-9]+)?\s*[×%kMGT]*(\s*→\s*[0-9][0-9.]*[kMGT]?)?$/.test(t)) return;
    var range = document.createRange(); range.selectNodeContents(td);
    var tops = new Set(Array.from(range.getClientRects()).map(function(r){ return Math.round(r.top); }));
    if (tops.size > 1) out.wrapped.push(t);
  });
  var pre = document.createElement('pre'); pre.id = 'sepify-check'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
"""


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp / "profile"
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module", autouse=True)
def _browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip("no chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pages")
    out = {}
    out["report"] = d / "report.html"
    assert main(["report", str(SAMPLES / "vgg_small.onnx"), "-o", str(out["report"]), "--budget", "0.5",
                 "--calibrate", "random", "--calib-samples", "6", "--sweep", "--budgets", "0.8,0.5", "--verify"]) == 0
    out["bench"] = d / "bench.html"
    assert main(["rewrite", str(SAMPLES / "lowrank_separable.onnx"), "-o", str(d / "lr.onnx"), "--html",
                 str(out["bench"]), "--bench", "--verify"]) == 0
    long_model = d / "long.onnx"
    onnx.save(long_names_model(), long_model)
    out["long_names"] = d / "long.html"
    assert main(["plan", str(long_model), "--rank", "1", "--html", str(out["long_names"])]) == 0
    return out


def _measure(page: Path, width: int, tmp: Path) -> dict:
    probe = tmp / f"{page.stem}_{width}_probe.html"
    probe.write_text(page.read_text().replace("</body>", f"<script>{CHECK}</script></body>"))
    res = _chromium(tmp, f"--window-size={width},900", "--dump-dom", probe.as_uri())
    m = re.search(r'<pre id="sepify-check">([^<]*)</pre>', res.stdout)
    assert m, f"no measurement from chromium: {res.stderr[-500:]}"
    import html as html_lib

    return json.loads(html_lib.unescape(m.group(1)))


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", ["report", "bench", "long_names"])
def test_page_fits_the_window_and_numbers_never_break(pages, name, width, tmp_path):
    got = _measure(pages[name], width, tmp_path)
    assert got["width"] <= width
    assert got["scrollWidth"] <= got["width"], f"the page scrolls sideways at {width} px: {got}"
    assert got["offenders"] == [], f"elements beyond {width} px: {got['offenders'][:5]}"
    assert got["wrapped"] == [], f"numbers broken over two lines at {width} px: {got['wrapped'][:5]}"


def test_the_checker_sees_an_overflow(tmp_path):
    """The measurement itself works: a page with a 2000 px element and a wrapped number fails it."""
    page = tmp_path / "bad.html"
    page.write_text("<!doctype html><html><body><div style='width:2000px'>wide</div>"
                    "<table><tr><td style='width:10px;white-space:normal'>1.9 e-08</td></tr></table></body></html>")
    got = _measure(page, 800, tmp_path)
    assert got["scrollWidth"] > got["width"] and any("wide" in o for o in got["offenders"])


def test_screenshots(pages, tmp_path):
    keep = os.environ.get("SEPIFY_SCREENSHOTS")
    for name, page in pages.items():
        for width in WIDTHS:
            png = tmp_path / f"{name}_{width}.png"
            res = _chromium(tmp_path, f"--window-size={width},900", "--hide-scrollbars", f"--screenshot={png}",
                            page.as_uri())
            assert png.exists() and png.stat().st_size > 10_000, res.stderr[-500:]
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            if keep:
                Path(keep).mkdir(parents=True, exist_ok=True)
                shutil.copy(png, Path(keep) / png.name)
