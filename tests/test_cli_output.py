"""The command line as a new user and a build pipeline meet it (issue 13): terminal width, one JSON
document, providers, bad input in multi-model audits, --debug / python -m / --progress, flags that
would do nothing, help text, and the README's commands table."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from sepify.cli import main
from sepify.cli.main import build_parser
from sepify.render.table import middle_ellipsis

from conftest import long_names_model

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _width(text: str) -> int:
    from rich.cells import cell_len

    return max((cell_len(line) for line in text.splitlines()), default=0)


def _one_error_line(err: str, *needles: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("sepify: error:"), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def long_model(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("long") / "long.onnx"
    onnx.save(long_names_model(), p)
    return p


@pytest.fixture(scope="module")
def lossy(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lossy") / "vgg_r1.onnx"
    assert main(["rewrite", str(SAMPLES / "vgg_small.onnx"), "-o", str(out), "--rank", "1"]) == 0
    return out


# ----------------------------------------------------------------------------------------------
# 1. terminal width
# ----------------------------------------------------------------------------------------------
def test_middle_ellipsis_keeps_head_and_tail():
    name = "/model.22/cv3.0/cv3.0.1/conv/Conv"
    short = middle_ellipsis(name, 20)
    assert len(short) == 20 and "…" in short and short.startswith("/model") and short.endswith("/conv/Conv")
    assert middle_ellipsis("short", 20) == "short"


@pytest.mark.parametrize("columns", [80, 100])
def test_audit_rewrite_verify_bench_fit_the_terminal(capsys, monkeypatch, tmp_path, long_model, lossy, columns):
    monkeypatch.setenv("COLUMNS", str(columns))
    runs = [
        ["audit", SAMPLES / "sobel_rgb.onnx"],
        ["audit", SAMPLES / "lowrank_separable.onnx", SAMPLES / "vgg_small.onnx"],
        ["audit", long_model],
        ["rewrite", SAMPLES / "lowrank_separable.onnx", "-o", tmp_path / "lr.onnx", "--verify"],
        ["rewrite", long_model, "-o", tmp_path / "long_r1.onnx", "--rank", "1", "--verify", "--min-cosine", "0"],
        ["verify", SAMPLES / "vgg_small.onnx", lossy, "--per-layer"],
        ["bench", SAMPLES / "lowrank_separable.onnx", tmp_path / "lr.onnx", "--runs", "3", "--warmup", "0"],
    ]
    for argv in runs:
        code, out, err = _run(capsys, *argv)
        assert code in (0, 1), err
        assert _width(out) <= columns, f"{argv[0]}: a line of {_width(out)} columns:\n{out}"
    code, out, _ = _run(capsys, "audit", long_model)  # node names are shortened in the middle, not cut off
    assert re.search(r"/model\S*…\S*Conv_0", out) and "separability" in out


def test_piped_output_is_never_wrapped(capsys, monkeypatch, long_model):
    monkeypatch.delenv("COLUMNS", raising=False)  # capsys' stdout is no terminal: natural width
    code, out, _ = _run(capsys, "audit", long_model)
    assert code == 0
    name = "/model.0/backbone.stage0.block0.cv0/conv.depthwise_separable_candidate/Conv_0"
    assert any(name in line for line in out.splitlines())  # whole, on one line
    assert any(line.startswith("Convention: ") and "there is a bias" in line for line in out.splitlines())
    assert "left out to fit" not in out


# ----------------------------------------------------------------------------------------------
# 2. --format json: one document
# ----------------------------------------------------------------------------------------------
def test_json_stdout_is_one_document_whatever_else_is_asked(capsys, tmp_path):
    code, out, err = _run(capsys, "rewrite", SAMPLES / "lowrank_separable.onnx", "-o", tmp_path / "o.onnx",
                          "--format", "json", "--verify", "--bench", "--threads", "1", "--html", tmp_path / "r.html",
                          "--report", tmp_path / "r.json")
    assert code == 0, err
    data = json.loads(out)
    assert data["verify"]["passed"] is True and data["bench"]["speedup"] > 0
    assert {r["lowering"] for r in data["rewritten"]} <= {"single", "branches"}
    assert "HTML report written to" in err and "HTML report written to" not in out
    assert json.loads((tmp_path / "r.json").read_text())["verify"]["passed"] is True
    # --only-faster and a lossy rewrite that fails verify: still one document (exit 1)
    code, out, err = _run(capsys, "rewrite", SAMPLES / "vgg_small.onnx", "-o", tmp_path / "v.onnx", "--rank", "1",
                          "--only-faster", "--threads", "1", "--latency-runs", "2", "--format", "json", "--verify")
    data = json.loads(out)
    assert code == 1 and data["verify"]["passed"] is False
    assert all(r["latency"] for r in data["rewritten"])
    # dry run: verify and bench the rewrite in memory
    code, out, err = _run(capsys, "rewrite", SAMPLES / "lowrank_separable.onnx", "--dry-run", "--format", "json",
                          "--verify")
    assert code == 0 and json.loads(out)["verify"]["passed"] is True
    # plan --html with JSON: the document on stdout, the status line on stderr
    code, out, err = _run(capsys, "plan", SAMPLES / "lowrank_separable.onnx", "--format", "json", "--html",
                          tmp_path / "p.html")
    assert code == 0 and json.loads(out)["changed"] and "HTML report written to" in err


# ----------------------------------------------------------------------------------------------
# 3. providers
# ----------------------------------------------------------------------------------------------
def test_bogus_or_unavailable_providers_are_exit_2_with_one_line(capsys):
    import onnxruntime as ort

    code, out, err = _run(capsys, "bench", SAMPLES / "sobel_rgb.onnx", "--providers", "bogus", "--runs", "2")
    assert code == 2 and out == ""
    _one_error_line(err, "--providers bogus", "unknown execution provider", "cpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        code, out, err = _run(capsys, "bench", SAMPLES / "sobel_rgb.onnx", "--providers", "CUDAExecutionProvider")
        assert code == 2 and out == ""
        _one_error_line(err, "CUDAExecutionProvider is not available")


def test_providers_short_names_and_the_model_after_them(capsys):
    # `--providers EP MODEL` must not swallow MODEL; short names map to onnxruntime's
    code, out, err = _run(capsys, "bench", "--providers", "cpu", SAMPLES / "sobel_rgb.onnx", "--runs", "2",
                          "--warmup", "0", "--format", "json")
    assert code == 0, err
    data = json.loads(out)
    assert data["providers"] == ["CPUExecutionProvider"] and data["model_b"] is None
    code, out, err = _run(capsys, "bench", SAMPLES / "sobel_rgb.onnx", "--providers", "cpu,CPUExecutionProvider",
                          "--runs", "2", "--format", "json")
    assert code == 0 and json.loads(out)["providers"] == ["CPUExecutionProvider"]


def test_api_names_the_provider():
    import sepify

    with pytest.raises(sepify.ParameterError, match="providers='nope'"):
        sepify.benchmark(SAMPLES / "sobel_rgb.onnx", runs=2, providers=["nope"])


# ----------------------------------------------------------------------------------------------
# 5. bad input among several models
# ----------------------------------------------------------------------------------------------
def test_audit_good_and_missing_is_exit_2_with_nothing_written(capsys, tmp_path):
    target = tmp_path / "F.json"
    code, out, err = _run(capsys, "audit", SAMPLES / "sobel_rgb.onnx", tmp_path / "missing.onnx", "-o", target)
    assert code == 2 and out == "" and not target.exists()
    _one_error_line(err, "missing.onnx")


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_folder_audit_lists_every_model_with_its_status(capsys, tmp_path, jobs):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    for name in ("sobel_rgb", "lowrank_separable", "gaussian_blur"):
        (zoo / f"{name}.onnx").write_bytes((SAMPLES / f"{name}.onnx").read_bytes())
    (zoo / "broken.onnx").write_bytes(b"not a model")
    code, out, err = _run(capsys, "audit", zoo, "--format", "json", "--jobs", jobs, "--no-spectra")
    assert code == 2
    data = json.loads(out)
    status = {Path(m["model"]).name: m["status"] for m in data["models"]}
    assert status == {"broken.onnx": "error", "gaussian_blur.onnx": "ok", "lowrank_separable.onnx": "ok",
                      "sobel_rgb.onnx": "ok"}
    assert data["failed"] == 1
    bad = next(m for m in data["models"] if m["status"] == "error")
    assert "broken.onnx" in bad["error"]
    _one_error_line(err, "broken.onnx")
    code, out, err = _run(capsys, "audit", zoo, "--jobs", jobs, "--no-spectra")
    assert code == 2 and "error: " in out and "status" in out


def test_parallel_audit_matches_the_serial_one(tmp_path):
    from sepify.pipeline.batch import audit_models

    paths = [SAMPLES / f"{n}.onnx" for n in ("sobel_rgb", "lowrank_separable", "conv1d")]
    seen = []
    serial = audit_models(paths, spectra=False)
    parallel = audit_models(paths, jobs=2, spectra=False, on_done=seen.append)
    assert len(seen) == 3 and not parallel.failed
    assert [e.report.to_dict()["totals"] for e in serial.entries] == [e.report.to_dict()["totals"]
                                                                      for e in parallel.entries]


# ----------------------------------------------------------------------------------------------
# 6. --debug, python -m sepify, --progress
# ----------------------------------------------------------------------------------------------
def test_debug_after_the_subcommand_shows_the_traceback(capsys, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"junk")
    code, out, err = _run(capsys, "audit", bad, "--debug")
    assert code == 2 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("sepify: error:")
    code, out, err = _run(capsys, "audit", bad)
    assert "Traceback" not in err


def test_python_dash_m_sepify():
    res = subprocess.run([sys.executable, "-m", "sepify", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "audit" in res.stdout and "rewrite" in res.stdout
    res = subprocess.run([sys.executable, "-m", "sepify", "audit", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "--jobs" in res.stdout


def test_the_command_leaves_without_teardown_but_with_everything_written(tmp_path):
    """``python -m sepify`` ends with ``os._exit`` (no interpreter teardown): stdout through a pipe,
    the model and the report it writes are complete, exit codes are kept — and under a tracer the
    interpreter exits normally (its atexit handlers run)."""
    lowrank = str(SAMPLES / "lowrank_separable.onnx")
    res = subprocess.run([sys.executable, "-m", "sepify", "audit", lowrank, str(SAMPLES / "vgg_small.onnx"),
                          "--format", "json"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and len(json.loads(res.stdout)["models"]) == 2
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    res = subprocess.run([sys.executable, "-m", "sepify", "rewrite", lowrank, "-o", str(out), "--report", str(report)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    onnx.checker.check_model(onnx.load(str(out)))
    assert json.loads(report.read_text())["changed"] is True
    res = subprocess.run([sys.executable, "-m", "sepify", "audit", str(tmp_path / "missing.onnx")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == "" and res.stderr.startswith("sepify: error:")
    traced = ("import atexit, sys; sys.settrace(lambda *a: None); atexit.register(lambda: print('atexit ran')); "
              "sys.argv = ['sepify', 'audit', '--help']; from sepify.cli import run; run()")
    res = subprocess.run([sys.executable, "-c", traced], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.rstrip().endswith("atexit ran")


def test_progress_forces_bars_when_stderr_is_no_terminal(capsys, tmp_path):
    models = [SAMPLES / "sobel_rgb.onnx", SAMPLES / "conv1d.onnx"]
    code, out, err = _run(capsys, "audit", *models, "--no-spectra", "--progress")
    assert code == 0 and "auditing models" in err
    code, out, err = _run(capsys, "audit", *models, "--no-spectra")
    assert code == 0 and "auditing models" not in err  # capsys' stderr is no terminal
    code, out, err = _run(capsys, "rewrite", SAMPLES / "lowrank_separable.onnx", "--dry-run", "--budget", "0.5",
                          "--calibrate", "random", "--calib-samples", "2", "--progress")
    assert code == 0 and ("reference activations" in err or "calibrating layers" in err)


# ----------------------------------------------------------------------------------------------
# 9. every accepted flag does something, or is refused
# ----------------------------------------------------------------------------------------------
LR = str(SAMPLES / "lowrank_separable.onnx")


@pytest.mark.parametrize("argv, needle", [
    (["rewrite", LR, "-o", "{t}/o.onnx", "--tol", "5"], "--tol 5"),
    (["rewrite", LR, "-o", "{t}/o.onnx", "--budget", "0.01"], "reachable floor"),
    (["rewrite", LR, "-o", "{t}/o.onnx", "--threads", "-1", "--only-faster"], "--threads -1"),
    (["rewrite", LR, "-o", "{t}/o.onnx", "--threads", "2"], "--threads"),
    (["rewrite", LR, "-o", "{t}/o.onnx", "--latency-runs", "3"], "--latency-runs"),
    (["rewrite", LR, "-o", "{t}/o.onnx", "--atol", "1e-3"], "--atol"),
    (["rewrite", LR, "-o", "{t}/o.onnx", "--min-cosine", "0.9"], "--min-cosine"),
    (["rewrite", LR, "-o", "{t}/o.onnx", "--max-drift", "0.1"], "--max-drift"),
    (["rewrite", LR, "-o", "{t}/o.onnx", "--verify", "--min-cosine", "0.9", "--atol", "1"], "--atol"),
    (["rewrite", LR, "-o", "{t}/o.onnx", "--allocation", "plan"], "--allocation"),
    (["rewrite", LR, "-o", "{t}/o.onnx", "--calib-rows", "100"], "--calib-rows"),
    (["rewrite", LR, "-o", "{t}/o.onnx", "--drift-metric", "cosine"], "--drift-metric"),
    (["rewrite", LR, "-o", "{t}/o.onnx", "--progress"], "--progress"),
    (["rewrite", LR, "-o", "{t}/o.onnx", "--calibrate", "random", "--calib-range", "0,1", "--calibrate",
      f"{SAMPLES}/none.npz"], "--calib-range"),
    (["plan", LR, "--eval", "x.npz"], "--eval"),
    (["plan", LR, "--budgets", "0.5"], "--budgets"),
    (["plan", LR, "--latency"], "--latency"),
    (["plan", LR, "--calibrate", "random", "--sweep", "--budget", "0.5"], "--budget"),
    (["report", LR, "-o", "{t}/r.html", "--eval", "x.npz"], "--eval"),
    (["verify", LR, LR, "--inputs", "x.npz", "--seed", "3"], "--seed"),
    (["verify", LR, LR, "--inputs", "x.npz", "--input-shape", "1x16x32x32"], "--input-shape"),
    (["verify", LR, LR, "--drift-metric", "channel"], "--drift-metric"),
    (["verify", LR, LR, "--max-drift", "0.1", "--rtol", "1"], "--rtol"),
    (["verify", LR, LR, "--max-drift", "3"], "--max-drift 3"),
    (["verify", LR, LR, "--min-top1", "0.9"], "--min-top1"),
    (["audit", LR, "--no-spectra", "--certify"], "--certify"),
    (["audit", LR, "--jobs", "0"], "--jobs 0"),
    (["bench", LR, "--threads", "0"], "--threads 0"),
    (["bench", LR, "--runs", "0"], "--runs 0"),
])
def test_flags_that_would_do_nothing_are_refused(capsys, tmp_path, argv, needle):
    code, out, err = _run(capsys, *[a.replace("{t}", str(tmp_path)) for a in argv])
    assert code == 2, (out, err)
    _one_error_line(err, needle)
    assert not list(tmp_path.iterdir())


def test_dry_run_may_keep_its_output_flags(capsys, tmp_path):
    """Accepted on purpose: --dry-run can be added to any rewrite command line (-o is left alone)."""
    code, out, err = _run(capsys, "rewrite", LR, "--dry-run", "-o", tmp_path / "o.onnx")
    assert code == 0 and "dry run, nothing written" in out and not list(tmp_path.iterdir())


def test_rewrite_table_shows_the_lowering_and_plan_json_names_it(capsys, tmp_path):
    code, out, _ = _run(capsys, "rewrite", LR, "-o", tmp_path / "o.onnx")
    assert "lowering" in out and "branches" in out and "single" in out
    code, out, _ = _run(capsys, "plan", LR, "--format", "json")
    lowerings = {r["qualified_name"]: r["lowering"] for r in json.loads(out)["rewritten"]}
    assert lowerings == {"dwpw1/conv": "single", "dwpw2/conv": "branches", "pwdw/conv": "single"}
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "o.onnx")).metadata_props}
    recorded = {n["node"]: n["lowering"] for n in json.loads(meta["sepify"])["history"][-1]["nodes"]}
    assert recorded == lowerings
    code, out, _ = _run(capsys, "rewrite", LR, "--dry-run", "--format", "json")
    assert {r["qualified_name"]: r["lowering"] for r in json.loads(out)["rewritten"]} == lowerings


def test_plan_html_says_it_wrote_the_page(capsys, tmp_path):
    page = tmp_path / "p.html"
    code, out, _ = _run(capsys, "plan", LR, "--html", page)
    assert code == 0 and page.exists()
    assert f"HTML report written to {page}" in out and "dry run" not in out and "plan only, no model written" in out


@pytest.mark.parametrize("suffix, check", [
    (".json", lambda text: json.loads(text)["totals"]["conv_nodes"] == 3),
    (".csv", lambda text: text.startswith("model,name,op_type")),
    (".md", lambda text: text.startswith("## ")),
    (".txt", lambda text: "Convention:" in text and "┏" in text),
])
def test_audit_output_format_follows_the_suffix(capsys, tmp_path, suffix, check):
    target = tmp_path / f"a{suffix}"
    code, out, _ = _run(capsys, "audit", LR, "-o", target)
    assert code == 0 and out == "" and check(target.read_text())
    code, out, _ = _run(capsys, "audit", LR, "-o", tmp_path / "b.json", "--format", "csv")  # --format wins
    assert (tmp_path / "b.json").read_text().startswith("model,")


# ----------------------------------------------------------------------------------------------
# 10. the channel drift explains itself
# ----------------------------------------------------------------------------------------------
def test_channel_drift_is_followed_by_what_it_means(capsys):
    code, out, _ = _run(capsys, "rewrite", SAMPLES / "vgg_small.onnx", "--dry-run", "--budget", "0.5",
                        "--calibrate", "random", "--calib-samples", "4")
    assert code == 0
    lines = out.replace("\n", " ")
    assert "drift (channel)" in lines and "drift (channel) is 1 - cosine after scaling every output channel" in lines
    assert "for accuracy read 1 - cosine and top-1 agreement" in lines
    code, out, _ = _run(capsys, "rewrite", SAMPLES / "vgg_small.onnx", "--dry-run", "--budget", "0.5",
                        "--calibrate", "random", "--calib-samples", "4", "--drift-metric", "cosine")
    assert "scaling every output channel" not in out  # only under the metric it explains


# ----------------------------------------------------------------------------------------------
# 11. help and the README commands table
# ----------------------------------------------------------------------------------------------
def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, action.choices


def test_every_flag_and_positional_has_help_and_shows_its_default():
    parser, subs = _subparsers()
    for name, sub in subs.items():
        text = sub.format_help()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            label = action.option_strings[-1] if action.option_strings else action.metavar or action.dest
            assert action.help, f"sepify {name} {label}: no help text"
            if action.default not in (None, False, argparse.SUPPRESS, []) and action.option_strings:
                assert "default" in sub._get_formatter()._expand_help(action), f"sepify {name} {label}: no default"
        assert "(default: " in text
    assert "--sort" in subs["audit"].format_help() and "(default: macs)" in subs["audit"].format_help()


def _readme_rows() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Commands"):text.index("## Conventions")]
    rows = []
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))])
    return rows


def test_readme_commands_table_lists_every_flag():
    _, subs = _subparsers()
    rows = _readme_rows()
    missing = []
    for name, sub in subs.items():
        applies = [r for r in rows
                   if f"`sepify {name}" in r[0] or (len(r) > 2 and (name in r[1] or "every command" in r[1]))]
        text = " ".join(" ".join(r[:2]) for r in applies)
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if action.option_strings:
                if not any(re.search(r"(?<![\w-])" + re.escape(f) + r"(?![\w-])", text) for f in action.option_strings):
                    missing.append(f"sepify {name} {max(action.option_strings, key=len)}")
            elif action.metavar and action.metavar not in text:
                missing.append(f"sepify {name} {action.metavar}")
    assert not missing, "flags missing from the README commands table: " + ", ".join(missing)


def test_readme_reason_table_matches_the_enum():
    from sepify.core.reasons import Reason

    text = (ROOT / "README.md").read_text()
    table = text[text.index("| reason | meaning |"):]
    table = table[:table.index("\n\n")]
    codes = set(re.findall(r"^\| `([a-z_0-9]+)`(?:, `([a-z_0-9]+)`)?", table, flags=re.M))
    listed = {c for pair in codes for c in pair if c}
    assert listed == {r.value for r in Reason}
