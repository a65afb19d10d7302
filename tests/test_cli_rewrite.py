"""``sepify rewrite`` on the command line (through ``sepify.cli.main``, which returns the exit code)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from sepify.cli import main

from test_rewrite import random_conv_stack, assert_matches, conv_model, lowrank_weight, random_feeds, session

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


@pytest.fixture
def model_path(tmp_path) -> Path:
    """A copy of the lowrank_separable sample (three exact convs) in a fresh folder."""
    p = tmp_path / "m.onnx"
    shutil.copy(SAMPLES / "lowrank_separable.onnx", p)
    return p


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _assert_clean_error(capsys, code: int, expected_code: int = 2, needle: str | None = None) -> str:
    out, err = capsys.readouterr()
    assert code == expected_code, err
    assert "Traceback" not in err and "Traceback" not in out
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("sepify: error:"), err
    if needle:
        assert needle in lines[0]
    return lines[0]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------------------------
# Happy paths
# ----------------------------------------------------------------------------------------------
def test_table_output_and_written_model(model_path, capsys, monkeypatch):
    monkeypatch.chdir(model_path.parent)  # short paths: the table title stays on one line
    out_path = model_path.with_name("out.onnx")
    assert main(["rewrite", "m.onnx", "-o", "out.onnx"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    for needle in ("m.onnx: lossless rewrite plan", "dwpw1/conv", "dwpw2/conv", "pwdw/conv", "dw-pw", "pw-dw",
                   "0.14x", "0.28x", "0.48x", "3 node(s) rewritten", "written to out.onnx"):
        assert needle in out, needle
    assert "16.52M -> 4.48M" in out
    original = onnx.load(str(model_path))
    rewritten = onnx.load(str(out_path))
    onnx.checker.check_model(rewritten, full_check=True)
    feeds = random_feeds(original)
    assert_matches(session(model_path).run(None, feeds), session(out_path).run(None, feeds))
    assert model_path.read_bytes() == (SAMPLES / "lowrank_separable.onnx").read_bytes()
    assert _files(model_path.parent) == {"m.onnx", "out.onnx"}  # no temp files left behind


def test_json_format(model_path, capsys):
    out_path = model_path.with_name("out.onnx")
    assert main(["rewrite", str(model_path), "-o", str(out_path), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["changed"] is True
    assert data["totals"]["conv_macs_before"] == 16515072 and data["totals"]["conv_macs_after"] == 4481024
    assert sorted(r["qualified_name"] for r in data["rewritten"]) == ["dwpw1/conv", "dwpw2/conv", "pwdw/conv"]


def test_dry_run_writes_nothing(model_path, capsys):
    before = _files(model_path.parent)
    data = model_path.read_bytes()
    assert main(["rewrite", str(model_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dwpw1/conv" in out and "dry run, nothing written" in out
    # even with -o: the plan is printed, no file is written
    assert main(["rewrite", str(model_path), "--dry-run", "-o", str(model_path.with_name("out.onnx"))]) == 0
    assert "dry run" in capsys.readouterr().out
    # and -o pointing at the input is fine for a dry run (nothing is overwritten)
    assert main(["rewrite", str(model_path), "--dry-run", "-o", str(model_path)]) == 0
    assert _files(model_path.parent) == before
    assert model_path.read_bytes() == data


def test_report_json(model_path, capsys):
    out_path, rep = model_path.with_name("out.onnx"), model_path.with_name("report.json")
    assert main(["rewrite", str(model_path), "-o", str(out_path), "--report", str(rep), "--tol", "0.3"]) == 0
    capsys.readouterr()
    data = json.loads(rep.read_text())
    assert data["policy"]["mode"] == "tol" and data["policy"]["tol"] == 0.3
    assert data["changed"] is True
    assert {"sepify_version", "model", "totals", "rewritten", "kept"} <= set(data)
    for r in data["rewritten"]:
        assert r["weight_error"] <= 0.3 and r["macs_after"] < r["macs_before"]
        assert {"qualified_name", "scheme", "rank", "chained", "new_nodes"} <= set(r)
    t = data["totals"]
    assert t["conv_macs_before"] - t["conv_macs_after"] == sum(r["macs_before"] - r["macs_after"] for r in data["rewritten"])
    # the metadata of the written model names the same nodes
    meta = {p.key: p.value for p in onnx.load(str(out_path)).metadata_props}
    entry = json.loads(meta["sepify"])["history"][-1]
    assert sorted(n["node"] for n in entry["nodes"]) == sorted(r["qualified_name"] for r in data["rewritten"])


def test_in_place(model_path, capsys):
    original = onnx.load(str(model_path))
    assert main(["rewrite", str(model_path), "--in-place"]) == 0
    capsys.readouterr()
    rewritten = onnx.load(str(model_path))
    assert len(rewritten.graph.node) > len(original.graph.node)
    feeds = random_feeds(original)
    ref = session(SAMPLES / "lowrank_separable.onnx").run(None, feeds)
    assert_matches(ref, session(model_path).run(None, feeds))
    assert _files(model_path.parent) == {"m.onnx"}
    # --in-place with -o naming the same file is accepted; a second lossless pass changes nothing
    assert main(["rewrite", str(model_path), "--in-place", "-o", str(model_path)]) == 0
    assert "0 node(s) rewritten" in capsys.readouterr().out


def test_lossy_policies_and_filters_via_cli(model_path, capsys):
    rep = model_path.with_name("r.json")
    out_path = model_path.with_name("o.onnx")
    args = ["rewrite", str(model_path), "-o", str(out_path), "--report", str(rep)]
    assert main(args + ["--rank", "1", "--scheme", "dw-pw", "--exclude", "pwdw"]) == 0
    data = json.loads(rep.read_text())
    assert sorted((r["qualified_name"], r["scheme"], r["rank"]) for r in data["rewritten"]) == [
        ("dwpw1/conv", "dw-pw", 1), ("dwpw2/conv", "dw-pw", 1)]
    assert {k["name"]: k["reason"] for k in data["kept"]} == {"pwdw/conv": "not_selected"}
    assert main(args + ["--include", "dwpw1", "--lowering", "grouped"]) == 0
    assert [r["qualified_name"] for r in json.loads(rep.read_text())["rewritten"]] == ["dwpw1/conv"]
    assert main(args + ["--min-macs", "5000000"]) == 0
    data = json.loads(rep.read_text())
    assert [r["qualified_name"] for r in data["rewritten"]] == ["dwpw2/conv"]
    assert main(args + ["--budget", "0.5"]) == 0
    data = json.loads(rep.read_text())
    assert data["totals"]["macs_ratio"] <= 0.5 + 1e-9
    assert main(args + ["--no-chain", "--lossless"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("args, mode, key, value", [
    (["--tol", "0"], "tol", "tol", 0.0),
    (["--tol", "0.25"], "tol", "tol", 0.25),
    (["--rank", "3"], "rank", "rank", 3),
    (["--budget", "1"], "budget", "budget", 1.0),
    ([], "lossless", None, None),
    (["--lossless"], "lossless", None, None),
])
def test_policy_flags_select_the_mode(model_path, capsys, args, mode, key, value):
    """Each policy flag selects its mode with the given value — including falsy values such as 0."""
    rep = model_path.with_name("r.json")
    assert main(["rewrite", str(model_path), "--dry-run", "--report", str(rep), *args]) == 0
    capsys.readouterr()
    policy = json.loads(rep.read_text())["policy"]
    assert policy["mode"] == mode
    if key:
        assert policy[key] == value


@pytest.mark.parametrize("args", [["--tol", "0.3"], ["--rank", "2"], ["--budget", "0.5"]], ids=["tol", "rank", "budget"])
def test_lossy_policies_on_random_weights(tmp_path, capsys, args):
    src, out_path, rep = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    model = random_conv_stack()
    src.write_bytes(model.SerializeToString())
    assert main(["rewrite", str(src), "-o", str(out_path), "--report", str(rep), *args]) == 0
    capsys.readouterr()
    data = json.loads(rep.read_text())
    assert data["changed"] is True and data["rewritten"]
    for r in data["rewritten"]:
        assert 0 < r["weight_error"] < 1 and r["macs_after"] < r["macs_before"]
        if args[0] == "--tol":
            assert r["weight_error"] <= 0.3
        if args[0] == "--rank":
            assert r["rank"] == 2
    if args[0] == "--budget":
        assert 0.3 <= data["totals"]["macs_ratio"] <= 0.55
    onnx.checker.check_model(str(out_path), full_check=True)
    (y,) = session(out_path).run(None, random_feeds(model))
    assert y.shape == (1, 64, 8, 8) and np.all(np.isfinite(y))


def test_input_shape_scales_macs(tmp_path, capsys):
    rep = tmp_path / "r.json"
    src = SAMPLES / "dynamic_batch.onnx"
    assert main(["rewrite", str(src), "--dry-run", "--report", str(rep), "--input-shape", "x=4x3x32x32"]) == 0
    four = json.loads(rep.read_text())["totals"]["conv_macs_before"]
    assert main(["rewrite", str(src), "--dry-run", "--report", str(rep)]) == 0
    one = json.loads(rep.read_text())["totals"]["conv_macs_before"]
    capsys.readouterr()
    assert four == 4 * one


def test_nothing_to_rewrite_writes_identical_copy(tmp_path, capsys):
    w = np.random.default_rng(0).standard_normal((16, 8, 3, 3))
    src = tmp_path / "full.onnx"
    src.write_bytes(conv_model([1, 8, 10, 10], w, pads=[1, 1, 1, 1]).SerializeToString())
    out_path = tmp_path / "out.onnx"
    assert main(["rewrite", str(src), "-o", str(out_path)]) == 0
    out = capsys.readouterr().out
    assert "0 node(s) rewritten" in out and "no_exact_saving" in out
    assert out_path.read_bytes() == src.read_bytes()


def test_written_files_respect_umask(model_path, capsys):
    """Written files get the usual permissions (0666 & ~umask), like any other tool's output —
    not the 0600 of a private temporary file."""
    want = 0o666 & ~_umask()
    out_path, rep = model_path.with_name("out.onnx"), model_path.with_name("r.json")
    assert main(["rewrite", str(model_path), "-o", str(out_path), "--report", str(rep)]) == 0
    capsys.readouterr()
    assert oct(out_path.stat().st_mode & 0o777) == oct(want)
    assert oct(rep.stat().st_mode & 0o777) == oct(want)


def test_in_place_keeps_file_mode(model_path, capsys):
    model_path.chmod(0o644)
    assert main(["rewrite", str(model_path), "--in-place"]) == 0
    capsys.readouterr()
    assert oct(model_path.stat().st_mode & 0o777) == oct(0o644)


# ----------------------------------------------------------------------------------------------
# Refusals: exit 2, one line on stderr, nothing written
# ----------------------------------------------------------------------------------------------
def test_output_equal_to_input_refused(model_path, capsys, monkeypatch):
    data = model_path.read_bytes()
    _assert_clean_error(capsys, main(["rewrite", str(model_path), "-o", str(model_path)]), needle="--in-place")
    # the same file spelled differently
    monkeypatch.chdir(model_path.parent)
    _assert_clean_error(capsys, main(["rewrite", "m.onnx", "-o", "./m.onnx"]))
    link = model_path.with_name("link.onnx")
    link.symlink_to(model_path)
    _assert_clean_error(capsys, main(["rewrite", str(model_path), "-o", str(link)]))
    assert model_path.read_bytes() == data
    assert _files(model_path.parent) == {"m.onnx", "link.onnx"}


def test_missing_output_and_conflicting_in_place(model_path, capsys):
    _assert_clean_error(capsys, main(["rewrite", str(model_path)]), needle="-o")
    _assert_clean_error(capsys, main(["rewrite", str(model_path), "--in-place", "-o",
                                      str(model_path.with_name("other.onnx"))]))
    assert _files(model_path.parent) == {"m.onnx"}


@pytest.mark.parametrize("args", [
    ["--tol", "-1"],
    ["--tol", "nan"],
    ["--rank", "0"],
    ["--rank", "abc"],
    ["--budget", "0"],
    ["--budget", "1.5"],
    ["--tol", "0.1", "--rank", "2"],
    ["--lossless", "--budget", "0.5"],
    ["--scheme", "bogus"],
    ["--include", "("],
    ["--exclude", "[a-"],
    ["--min-macs", "many"],
    ["--lowering", "bogus"],
    ["--no-such-flag"],
], ids=lambda a: "_".join(a).replace("-", ""))
def test_bad_policy_args(model_path, capsys, args):
    out_path = model_path.with_name("out.onnx")
    _assert_clean_error(capsys, main(["rewrite", str(model_path), "-o", str(out_path), *args]))
    assert _files(model_path.parent) == {"m.onnx"}


@pytest.mark.parametrize("kind", ["missing", "garbage", "empty", "truncated", "directory", "invalid_graph"])
def test_bad_model(tmp_path, capsys, kind):
    src = tmp_path / "bad.onnx"
    if kind == "garbage":
        src.write_bytes(b"this is not a protobuf \x00\xff\xfe")
    elif kind == "empty":
        src.write_bytes(b"")
    elif kind == "truncated":
        data = (SAMPLES / "lowrank_separable.onnx").read_bytes()
        src.write_bytes(data[: len(data) // 2])
    elif kind == "directory":
        src.mkdir()
    elif kind == "invalid_graph":
        m = conv_model([1, 8, 10, 10], lowrank_weight("dw-pw", 1, 8, 16, 1, (3, 3)), pads=[1, 1, 1, 1])
        m.graph.node[0].input[0] = "nowhere"  # dangling input: fails the checker
        src.write_bytes(m.SerializeToString())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out_path = out_dir / "out.onnx"
    _assert_clean_error(capsys, main(["rewrite", str(src), "-o", str(out_path), "--report",
                                      str(out_dir / "r.json")]))
    assert _files(out_dir) == set()
