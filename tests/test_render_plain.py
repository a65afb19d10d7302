"""Tables drawn without rich (files and pipes) are character for character what rich draws."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sepify.render import table as T

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
ALPHABET = "abcXYZ019 .,:/_-%()×→—µé…≈"  # what sepify prints: node names, numbers, units, arrows


def _rich(part: T.PlainTable) -> str:
    buf = io.StringIO()
    T.console(buf, None).print(part.rich_table(), soft_wrap=True)
    return buf.getvalue()


texts = st.text(alphabet=ALPHABET, min_size=0, max_size=12)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_plain_lines_match_rich(data):
    ncols = data.draw(st.integers(1, 5))
    justify = st.sampled_from(["left", "right", "center"])
    cols = [(data.draw(texts.filter(lambda t: t.strip() == t and t)), data.draw(justify), None) for _ in range(ncols)]
    rows = [[data.draw(texts).strip() for _ in range(ncols)] for _ in range(data.draw(st.integers(0, 6)))]
    title = data.draw(st.one_of(st.none(), texts.map(str.strip)))
    caption = data.draw(st.one_of(st.none(), texts.map(str.strip)))
    table = T.PlainTable(cols, rows, title or None, caption or None)
    assert T.plain_lines(table) == _rich(table)


@pytest.mark.parametrize("cell", ["a\tb", "two\nlines", " padded", "wide 表", "e\u0301"])
def test_what_only_rich_lays_out_goes_to_rich(cell):
    """Tabs, line breaks, surrounding spaces, wide and combining characters: not drawn by hand."""
    table = T.PlainTable([("h", "left", None)], [[cell]])
    assert T.plain_lines(table) is None
    assert T.render([table], None) == _rich(table)


def test_a_narrowed_column_goes_to_rich():
    table = T.PlainTable([("status", "left", 8)], [["a long status message that folds"]])
    assert T.plain_lines(table) is None
    assert "folds" in T.render([table], None)


def test_audit_output_is_the_same_with_and_without_rich(monkeypatch):
    """The whole audit text of every sample model, both ways."""
    import sepify
    from sepify.render.text import render_audit

    reports = [sepify.audit(p) for p in sorted(SAMPLES.glob("*.onnx"))]
    fast = render_audit(reports, "table", "macs", None, width=None)
    monkeypatch.setattr(T, "plain_lines", lambda table: None)
    monkeypatch.setattr(T, "_plain_text", lambda text: False)
    slow = render_audit(reports, "table", "macs", None, width=None)
    assert fast == slow and "┏" in fast
    np.testing.assert_equal(len(fast.splitlines()), len(slow.splitlines()))
