"""Hardening (issue 6): bad input, safe writes, determinism.

Every bad input of the issue is built here and run through **both** ``sepify audit`` and
``sepify rewrite``: exit code 2, exactly one stderr line ``sepify: error: <file>: …`` (checked at
the file-descriptor level, so onnxruntime's C++ logging would show up too), no traceback, and
nothing written — no output file, no report, no temp file — while the input stays untouched.
Some inputs are not refused but reported: NaN/Inf weights get a reason in the audit and are
skipped by the rewrite, which still rewrites the rest.  A weight that does not fit its input is
refused (no runtime can execute such a model).

(tests/test_load.py covers the loader's refusals one by one through the Python API, and
tests/test_cli_*.py bad arguments; this file is the command-line corpus over both commands.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import sepify
import sepify.model.load
import sepify.model.save
from sepify.cli import main
from sepify.model.load import ort_max_ir_version

from conftest import init, make_conv_model, make_model, rand, vi
from test_rewrite import assert_matches, lowrank_weight, random_conv_stack, random_feeds, session

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
LOWRANK = SAMPLES / "lowrank_separable.onnx"


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _conv_model() -> onnx.ModelProto:
    return make_conv_model([1, 3, 8, 8], [4, 3, 3, 3], bias=True, pads=[1, 1, 1, 1])


def _save_external(model: onnx.ModelProto, path: Path, location: str = "weights.bin") -> Path:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return path


def _edit_external(path: Path, **entries: str) -> None:
    """Set external-data entries (location/offset/length) of weight 'w' in a saved model."""
    model = onnx.load(str(path), load_external_data=False)
    w = next(t for t in model.graph.initializer if t.name == "w")
    for e in w.external_data:
        if e.key in entries:
            e.value = entries[e.key]
    path.write_bytes(model.SerializeToString())


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    def content(p: Path) -> bytes | None:
        if not p.is_file():
            return None
        with open(p, "rb") as fh:  # not Path.read_bytes, which a test may patch
            return fh.read()

    return {str(p.relative_to(folder)): content(p) for p in sorted(folder.rglob("*"))}


def _one_error_line(err: str, out: str = "") -> str:
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {err!r}"
    assert lines[0].startswith("sepify: error: "), lines[0]
    return lines[0]


# ----------------------------------------------------------------------------------------------
# The bad-input corpus: name -> builder(folder) -> path of the bad input
# ----------------------------------------------------------------------------------------------
BAD: dict[str, Callable[[Path], Path]] = {}


def bad(name: str):
    def register(fn):
        BAD[name] = fn
        return fn
    return register


def _bytes_file(folder: Path, name: str, data: bytes) -> Path:
    p = folder / name
    p.write_bytes(data)
    return p


def _model_file(folder: Path, model: onnx.ModelProto, name: str = "m.onnx") -> Path:
    return _bytes_file(folder, name, model.SerializeToString())


@bad("empty_file")
def _(f):
    return _bytes_file(f, "empty.onnx", b"")


@bad("random_bytes")
def _(f):
    return _bytes_file(f, "random.onnx", np.random.default_rng(6).integers(0, 256, 5000, dtype=np.uint8).tobytes())


@bad("truncated_model")
def _(f):
    data = LOWRANK.read_bytes()
    return _bytes_file(f, "truncated.onnx", data[: len(data) * 2 // 3])


@bad("text_file")
def _(f):
    return _bytes_file(f, "notes.onnx", b"This is a README, not a model.\nSecond line.\n")


@bad("json_file")
def _(f):
    return _bytes_file(f, "model.json", json.dumps({"ir_version": 10, "graph": {"node": [{"op_type": "Conv"}]}}).encode())


@bad("directory")
def _(f):
    d = f / "folder.onnx"
    d.mkdir()
    return d


@bad("missing_path")
def _(f):
    return f / "does_not_exist.onnx"


@bad("unreadable_path")
def _(f):
    p = _model_file(f, _conv_model(), "locked.onnx")
    p.chmod(0)
    return p


@bad("protobuf_not_a_model")
def _(f):
    return _bytes_file(f, "tensor.onnx", numpy_helper.from_array(rand([4, 3, 3, 3]), "t").SerializeToString())


@bad("graph_proto_not_a_model")
def _(f):
    return _bytes_file(f, "graph.onnx", _conv_model().graph.SerializeToString())


def _with_invalid_utf8(model: onnx.ModelProto, placeholder: str) -> bytes:
    """Serialize, then swap a placeholder string for bytes that are not UTF-8 (protobuf cannot set them)."""
    data = model.SerializeToString()
    assert data.count(placeholder.encode()) == 1
    return data.replace(placeholder.encode(), b"\xff\xfe" + b"\x80" * (len(placeholder) - 2))


@bad("invalid_utf8_doc_string")
def _(f):
    m = _conv_model()
    m.doc_string = "PLACEHOLDER"
    return _bytes_file(f, "m.onnx", _with_invalid_utf8(m, "PLACEHOLDER"))


@bad("invalid_utf8_node_name")
def _(f):
    m = _conv_model()
    m.graph.node[0].name = "PLACEHOLDER"
    return _bytes_file(f, "m.onnx", _with_invalid_utf8(m, "PLACEHOLDER"))


@bad("tensor_of_unknown_element_type")
def _(f):
    m = _conv_model()
    next(t for t in m.graph.initializer if t.name == "b").data_type = 65  # not a TensorProto.DataType
    return _model_file(f, m)


@bad("fails_checker")
def _(f):
    m = _conv_model()
    m.graph.node.append(helper.make_node("Relu", ["nowhere"], ["z"], name="dangling"))
    m.graph.output.append(vi("z", [1, 4, 8, 8]))
    return _model_file(f, m)


@bad("weight_produced_by_nothing")
def _(f):
    m = _conv_model()
    m.graph.initializer.remove(next(t for t in m.graph.initializer if t.name == "w"))
    return _model_file(f, m)


@bad("opset_99")
def _(f):
    m = _conv_model()
    m.opset_import[0].version = 99
    return _model_file(f, m)


@bad("ir_version_newer_than_onnx")
def _(f):
    m = _conv_model()
    m.ir_version = onnx.IR_VERSION + 1
    return _model_file(f, m)


@bad("ir_version_99")
def _(f):
    m = _conv_model()
    m.ir_version = 99
    return _model_file(f, m)


@bad("external_data_missing")
def _(f):
    p = _save_external(_conv_model(), f / "m.onnx")
    (f / "weights.bin").unlink()
    return p


@bad("external_data_truncated")
def _(f):
    p = _save_external(_conv_model(), f / "m.onnx")
    data = (f / "weights.bin").read_bytes()
    (f / "weights.bin").write_bytes(data[:20])
    return p


@bad("external_location_absolute")
def _(f):
    p = _save_external(_conv_model(), f / "m.onnx")
    _edit_external(p, location=str((f / "weights.bin").resolve()))
    return p


@bad("external_location_etc_passwd")
def _(f):
    p = _save_external(_conv_model(), f / "m.onnx")
    _edit_external(p, location="/etc/passwd")
    return p


@bad("external_location_dotdot")
def _(f):
    sub = f / "model"
    sub.mkdir()
    p = _save_external(_conv_model(), sub / "m.onnx")
    shutil.copy(sub / "weights.bin", f / "weights.bin")  # a real file is there: still refused
    _edit_external(p, location="../weights.bin")
    return p


@bad("external_location_symlink_out")
def _(f):
    sub = f / "model"
    sub.mkdir()
    p = _save_external(_conv_model(), sub / "m.onnx", location="data.bin")
    shutil.copy(sub / "data.bin", f / "outside.bin")
    (sub / "link.bin").symlink_to(f / "outside.bin")
    _edit_external(p, location="link.bin")
    return p


@bad("dims_bomb_inline")
def _(f):
    m = _conv_model()
    w = next(t for t in m.graph.initializer if t.name == "w")
    del w.dims[:]
    w.dims.extend([100000, 100000, 100, 3])  # 1.2e13 bytes declared, 432 held
    return _model_file(f, m)


@bad("dims_bomb_external")
def _(f):
    p = _save_external(_conv_model(), f / "m.onnx")
    m = onnx.load(str(p), load_external_data=False)
    w = next(t for t in m.graph.initializer if t.name == "w")
    del w.dims[:]
    w.dims.extend([100000, 100000, 3, 3])
    for e in list(w.external_data):
        if e.key == "length":
            w.external_data.remove(e)
    p.write_bytes(m.SerializeToString())
    return p


def _conv_attrs_model(**attrs) -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attrs)]
    return make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", ["N", "C", "H", "W"])],
                      [init("w", rand([4, 3, 3, 3])), init("b", rand([4], 1))], check=False)


for _name, _attrs in {
    "conv_strides_zero": {"strides": [0, 1]},
    "conv_dilations_negative": {"dilations": [1, -2]},
    "conv_pads_negative": {"pads": [-9, 0, 0, 0]},
    "conv_pads_wrong_length": {"pads": [1, 1]},
    "conv_kernel_shape_not_the_weights": {"kernel_shape": [5, 5]},
    "conv_group_not_dividing_weight": {"group": 3},
    "conv_group_zero": {"group": 0},
    "conv_auto_pad_bogus": {"auto_pad": "SAME_BOGUS"},
}.items():
    BAD[_name] = (lambda attrs: lambda f: _model_file(f, _conv_attrs_model(**attrs)))(_attrs)


@bad("conv_bias_wrong_length")
def _(f):
    m = _conv_attrs_model()
    b = next(t for t in m.graph.initializer if t.name == "b")
    b.CopyFrom(init("b", rand([7], 1)))
    return _model_file(f, m)


@bad("conv_weight_with_a_zero_dim")
def _(f):
    m = _conv_attrs_model()
    w = next(t for t in m.graph.initializer if t.name == "w")
    w.CopyFrom(init("w", np.zeros([4, 3, 0, 3], np.float32)))
    return _model_file(f, m)


@bad("unresolvable_symbolic_dims")
def _(f):
    return _model_file(f, make_conv_model(["N", 3, "H", "W"], [4, 3, 3, 3], y_shape=["N", 4, "OH", "OW"]))


def _run_bad(kind: str, command: str, tmp_path: Path, capfd, monkeypatch, *extra: str) -> tuple[int, str, str, Path]:
    src = tmp_path / "in"
    dst = tmp_path / "out"
    src.mkdir()
    dst.mkdir()
    path = BAD[kind](src)
    before = _snapshot(src)
    if kind == "unreadable_path" and os.geteuid() == 0:  # root reads mode-000 files: simulate the refusal
        real = Path.read_bytes

        def read_bytes(self):
            if self == path:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)
    if command == "audit":
        argv = ["audit", str(path), "--format", "json", "-o", str(dst / "report.json")]
    else:
        argv = ["rewrite", str(path), "-o", str(dst / "m.onnx"), "--report", str(dst / "r.json")]
    capfd.readouterr()
    code = main([*extra, *argv])
    out, err = capfd.readouterr()
    assert list(dst.iterdir()) == [], f"{kind}: {command} left {[p.name for p in dst.iterdir()]}"
    assert _snapshot(src) == before, f"{kind}: {command} changed its input folder"
    return code, out, err, path


@pytest.mark.parametrize("command", ["audit", "rewrite"])
@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_one_line_exit_2_nothing_written(kind, command, tmp_path, capfd, monkeypatch):
    code, out, err, path = _run_bad(kind, command, tmp_path, capfd, monkeypatch)
    assert code == 2, (kind, command, code, err)
    line = _one_error_line(err, out)
    assert line.startswith(f"sepify: error: {path}: "), line
    assert out == ""


@pytest.mark.parametrize("command", ["audit", "rewrite"])
@pytest.mark.parametrize("kind", ["truncated_model", "conv_strides_zero", "external_location_dotdot",
                                  "unresolvable_symbolic_dims"])
def test_debug_adds_the_traceback_and_keeps_exit_2(kind, command, tmp_path, capfd, monkeypatch):
    code, out, err, path = _run_bad(kind, command, tmp_path, capfd, monkeypatch, "--debug")
    assert code == 2
    assert "Traceback" in err
    assert err.strip().splitlines()[-1].startswith(f"sepify: error: {path}: ")


def test_bad_input_through_the_installed_command(tmp_path):
    """The real ``sepify`` process: one stderr line, nothing from onnx/onnxruntime's C++ side."""
    path = BAD["conv_kernel_shape_not_the_weights"](tmp_path)
    for argv in (["audit", str(path)], ["rewrite", str(path), "-o", str(tmp_path / "o.onnx")]):
        proc = subprocess.run([sys.executable, "-c", "import sys; from sepify.cli import main; sys.exit(main())", *argv],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert _one_error_line(proc.stderr, proc.stdout).startswith(f"sepify: error: {path}: node 'conv' (Conv): ")
    assert not (tmp_path / "o.onnx").exists()


def test_a_command_started_with_a_closed_stream_says_so_or_stays_silent(tmp_path):
    """Started with stdout closed (``>&-``): one error line on stderr, exit 2, no traceback.  With
    stderr closed, an error never lands on stdout (print(file=None) would write there)."""
    sample = str(Path(__file__).resolve().parents[1] / "sample_models" / "vgg_small.onnx")
    cmd = [sys.executable, "-m", "sepify", "audit"]
    proc = subprocess.run(cmd + [sample], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120,
                          preexec_fn=lambda: os.close(1))
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "sepify: error: standard output is closed (sepify writes its results and tables there)")
    proc = subprocess.run(cmd + [str(tmp_path / "missing.onnx")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True, timeout=120, preexec_fn=lambda: os.close(2))
    assert proc.returncode == 2 and proc.stdout == ""
    proc = subprocess.run(cmd + [sample], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=120,
                          preexec_fn=lambda: os.close(2))
    assert proc.returncode == 0 and "vgg_small.onnx" in proc.stdout


def test_malformed_conv_messages_say_what_is_wrong(tmp_path):
    expect = {
        "conv_strides_zero": "strides [0, 1]",
        "conv_pads_wrong_length": "pads [1, 1]",
        "conv_kernel_shape_not_the_weights": "kernel_shape [5, 5] does not match",
        "conv_group_not_dividing_weight": "not divisible by group 3",
        "conv_auto_pad_bogus": "'SAME_BOGUS'",
        "conv_bias_wrong_length": "expected [4]",
        "weight_produced_by_nothing": "'w'",
        "invalid_utf8_node_name": "model.graph.node[0].name is not valid UTF-8",
    }
    for kind, needle in expect.items():
        folder = tmp_path / kind
        folder.mkdir()
        with pytest.raises(sepify.SepifyError, match=None) as err:
            sepify.model.load.load_model(BAD[kind](folder))
        assert needle in str(err.value), (kind, str(err.value))
        assert "\n" not in str(err.value)


def test_conv_checks_follow_subgraph_scopes(tmp_path):
    """A Conv inside an If branch with a malformed attribute is refused; a branch input that
    shadows an outer initializer is not mistaken for that initializer."""
    then_graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["t_y"], name="inner", strides=[0, 0])],
                                   "then", [], [vi("t_y", None)])
    else_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["e_y"], name="id")], "else", [],
                                   [vi("e_y", None)])
    model = make_model([helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_graph,
                                         else_branch=else_graph)],
                       [vi("x", [1, 3, 8, 8]), vi("cond", [], TensorProto.BOOL)], [vi("y", None)],
                       [init("w", rand([4, 3, 3, 3]))], check=False)
    with pytest.raises(sepify.SepifyError, match="'inner'.*strides"):
        sepify.model.load.load_model(model, check=False)  # (the checker wants typed branch outputs)
    # A Loop body input named like an outer 5x5 initializer is a runtime value (dims unknown): the
    # body's 3x3 Conv on it is fine; without that input it would read the outer weight, and clash.
    def loop_model(shadow: bool) -> onnx.ModelProto:
        body_inputs = [vi("i", [], TensorProto.INT64), vi("c", [], TensorProto.BOOL)] + ([vi("w", None)] if shadow else [])
        body = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["b_y"], name="body_conv", kernel_shape=[3, 3]),
                                  helper.make_node("Identity", ["c"], ["c_out"], name="c_id")],
                                 "body", body_inputs, [vi("c_out", [], TensorProto.BOOL), vi("b_y", None)])
        loop = helper.make_node("Loop", ["", "cond"] + (["w"] if shadow else []), ["y"] + (["w_final"] if shadow else []),
                                name="loop", body=body)
        return make_model([loop], [vi("x", [1, 3, 8, 8]), vi("cond", [], TensorProto.BOOL)], [vi("y", None)],
                          [init("w", rand([4, 3, 5, 5]))], check=False)

    sepify.model.load._check_conv_nodes(loop_model(shadow=True), "<m>")
    with pytest.raises(sepify.SepifyError, match="'body_conv'.*kernel_shape"):
        sepify.model.load._check_conv_nodes(loop_model(shadow=False), "<m>")


# ----------------------------------------------------------------------------------------------
# Reported, not refused: NaN/Inf weights; refused: a weight that does not fit its input
# ----------------------------------------------------------------------------------------------
def _two_branch_model(bad_w: np.ndarray, bad_attrs: dict | None = None, bad_x: str = "x") -> onnx.ModelProto:
    """x [1,8,10,10] -> 'bad' conv (given weight) -> y_bad;  x -> 'good' exact dw-pw conv -> y_good."""
    good_w = lowrank_weight("dw-pw", 1, 8, 16, 1, (3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", [bad_x, "w_bad"], ["y_bad"], name="bad", **(bad_attrs or {})),
             helper.make_node("Conv", ["x", "w_good"], ["y_good"], name="good", pads=[1, 1, 1, 1])]
    inputs = [vi("x", [1, 8, 10, 10])] + ([vi(bad_x, [1, 8, 10])] if bad_x != "x" else [])
    return make_model(nodes, inputs, [vi("y_bad", ["a", "b", "c", "d"][: 4 if bad_x == "x" else 3]),
                                      vi("y_good", [1, 16, 10, 10])],
                      [init("w_bad", bad_w), init("w_good", good_w)], check=False)


def _audit_and_rewrite(path: Path, capfd) -> tuple[dict, dict, Path]:
    out_path = path.with_name("out.onnx")
    assert main(["audit", str(path), "--format", "json"]) == 0
    out, err = capfd.readouterr()
    assert err == ""
    audit = json.loads(out)
    assert main(["rewrite", str(path), "-o", str(out_path), "--format", "json"]) == 0
    out, err = capfd.readouterr()
    assert err == ""
    return audit, json.loads(out), out_path


def _check_good_rewritten(path: Path, report: dict, out_path: Path, bad_reason: str) -> None:
    assert [r["qualified_name"] for r in report["rewritten"]] == ["good"]
    assert {k["name"]: k["reason"] for k in report["kept"]} == {"bad": bad_reason}
    onnx.checker.check_model(str(out_path))
    rewritten = onnx.load(str(out_path))
    assert any(n.name == "bad" for n in rewritten.graph.node)  # kept as it was
    assert not any(n.name == "good" for n in rewritten.graph.node)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("kernel", [3, 1], ids=["3x3", "1x1"])
def test_nonfinite_weights_are_reported_and_skipped(tmp_path, capfd, value, kernel):
    w = rand([4, 8, kernel, kernel])
    w[1, 2, 0, 0] = value
    path = tmp_path / "m.onnx"
    path.write_bytes(_two_branch_model(w).SerializeToString())
    audit, report, out_path = _audit_and_rewrite(path, capfd)
    # A 1x1 conv is a matrix pw-lowrank may split: its weight is read and checked like any other.
    reason = "nonfinite_weight"
    nodes = {n["name"]: n for n in audit["nodes"]}
    assert nodes["bad"]["reason"] == reason and nodes["bad"]["eligible"] is False
    assert nodes["bad"]["separability"] is None
    assert nodes["bad"]["macs"] == 4 * 8 * (10 - kernel + 1) ** 2 * kernel * kernel  # still costed
    assert nodes["good"]["eligible"] is True
    _check_good_rewritten(path, report, out_path, reason)
    # the rewrite also skips it under lossy policies
    assert main(["rewrite", str(path), "-o", str(out_path), "--rank", "1", "--format", "json"]) == 0
    kept = {k["name"]: k["reason"] for k in json.loads(capfd.readouterr().out)["kept"]}
    assert kept["bad"] == reason


@pytest.mark.parametrize("case,problem", [
    ("channels", "reads 5 × group 1 = 5 input channels, the input has 8"),
    ("kernel_larger_than_input", "kernel is larger than the padded input"),
    ("weight_rank", "a rank-3 weight on a rank-4 input"),
    ("input_rank", "a rank-4 weight on a rank-3 input")])
def test_weight_not_fitting_its_input_is_refused(tmp_path, capfd, case, problem):
    """A weight that contradicts the input's shape: no runtime can execute the model, so audit and
    rewrite exit 2 with one line naming the node and both shapes — no output, nothing on stdout."""
    if case == "channels":
        model = _two_branch_model(rand([4, 5, 3, 3]))  # x has 8 channels
    elif case == "kernel_larger_than_input":
        model = _two_branch_model(rand([4, 8, 13, 13]))  # 13 > 10, no pads
    elif case == "weight_rank":
        model = _two_branch_model(rand([4, 8, 3]))  # 1-D kernel on a 2-D input
    else:
        model = _two_branch_model(rand([4, 8, 3, 3]), bad_x="x1d")  # 2-D kernel on a 1-D input
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    out_path = tmp_path / "out.onnx"
    for argv in (["audit", str(path)], ["rewrite", str(path), "-o", str(out_path)]):
        assert main(argv) == 2
        out, err = capfd.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1, err
        assert "node 'bad': weight [4, " in err and "does not fit input [1, 8, 10" in err and problem in err
    assert not out_path.exists() and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


# ----------------------------------------------------------------------------------------------
# IR versions: newer than onnxruntime but known to onnx is accepted; the output is always clamped
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(onnx.IR_VERSION <= ort_max_ir_version(), reason="onnx and onnxruntime accept the same IR")
@pytest.mark.parametrize("rewritable", [True, False], ids=["rewritten", "unchanged"])
def test_ir_version_newer_than_onnxruntime_is_accepted_and_clamped(tmp_path, capfd, rewritable):
    model = onnx.load(str(LOWRANK)) if rewritable else _conv_model()
    model.ir_version = onnx.IR_VERSION  # what onnx.helper.make_model stamps by default
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(Exception):  # the premise: onnxruntime itself refuses this model
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert main(["audit", str(path), "--format", "json"]) == 0
    assert json.loads(capfd.readouterr().out)["ir_version"] == onnx.IR_VERSION
    out_path = tmp_path / "out.onnx"
    assert main(["rewrite", str(path), "-o", str(out_path), "--verify"]) == 0
    assert ("3 node(s) rewritten" if rewritable else "0 node(s) rewritten") in capfd.readouterr().out
    written = onnx.load(str(out_path))
    assert written.ir_version == ort_max_ir_version()
    onnx.checker.check_model(written, full_check=True)
    feeds = random_feeds(model)
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    ref.ir_version = ort_max_ir_version()
    assert_matches(session(ref).run(None, feeds), session(out_path).run(None, feeds))


# ----------------------------------------------------------------------------------------------
# Safe writes
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def external_model(tmp_path) -> Path:
    """The lowrank sample with its weights in weights.bin, in its own folder."""
    folder = tmp_path / "in"
    folder.mkdir()
    return _save_external(onnx.load(str(LOWRANK)), folder / "m.onnx")


def test_external_data_output_is_written_beside_it_as_out_data(tmp_path, capfd, external_model, monkeypatch):
    dst = tmp_path / "dst"
    dst.mkdir()
    before = _snapshot(external_model.parent)
    assert main(["rewrite", str(external_model), "-o", str(dst / "r.onnx")]) == 0
    assert "3 node(s) rewritten" in capfd.readouterr().out
    assert sorted(p.name for p in dst.iterdir()) == ["r.onnx", "r.onnx.data"]
    assert _snapshot(external_model.parent) == before
    proto = onnx.load(str(dst / "r.onnx"), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"r.onnx.data"}
    monkeypatch.chdir(tmp_path)  # loads from anywhere: the location is relative to the model
    onnx.checker.check_model(str(dst / "r.onnx"), full_check=True)
    feeds = random_feeds(onnx.load(str(LOWRANK)))
    assert_matches(session(LOWRANK).run(None, feeds), session(dst / "r.onnx").run(None, feeds))


@pytest.mark.parametrize("flags", [["--verify"], ["--bench"], ["--html", "page.html"]])
def test_nothing_rewritten_with_external_data_then_checked(tmp_path, capfd, flags):
    """A lossless rewrite that rewrites nothing returns the input's own proto; writing it with
    external data must not empty that proto, which --verify, --bench and the reports read next
    (a torch dynamo export, weights in <model>.onnx.data, failed with 'External data path … does
    not exist')."""
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(2)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 12, 12])],
        [numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32), "w")]),
        opset_imports=[helper.make_opsetid("", 17)])
    path = _save_external(model, folder / "m.onnx", location="m.onnx.data")
    flags = [f if f != "page.html" else str(tmp_path / f) for f in flags]
    assert main(["rewrite", str(path), "--lossless", "-o", str(tmp_path / "r.onnx"), *flags]) == 0
    assert "0 node(s) rewritten" in capfd.readouterr().out
    feeds = {"x": rng.standard_normal((1, 8, 12, 12)).astype(np.float32)}
    assert_matches(session(path).run(None, feeds), session(tmp_path / "r.onnx").run(None, feeds))


def test_in_place_with_external_data_replaces_model_and_its_data(tmp_path, capfd):
    folder = tmp_path / "in"
    folder.mkdir()
    path = _save_external(onnx.load(str(LOWRANK)), folder / "m.onnx", location="m.onnx.data")
    assert main(["rewrite", str(path), "--in-place"]) == 0
    capfd.readouterr()
    assert sorted(p.name for p in folder.iterdir()) == ["m.onnx", "m.onnx.data"]
    feeds = random_feeds(onnx.load(str(LOWRANK)))
    assert_matches(session(LOWRANK).run(None, feeds), session(path).run(None, feeds))
    assert len(onnx.load(str(path)).graph.node) > len(onnx.load(str(LOWRANK)).graph.node)


def test_in_place_keeps_the_data_file_name(tmp_path, capfd):
    """In place, a model whose data file is not named <model>.data keeps that name: nothing is left behind."""
    folder = tmp_path / "in"
    folder.mkdir()
    path = _save_external(onnx.load(str(LOWRANK)), folder / "m.onnx", location="weights.bin")
    assert main(["rewrite", str(path), "--in-place"]) == 0
    capfd.readouterr()
    assert sorted(p.name for p in folder.iterdir()) == ["m.onnx", "weights.bin"]
    feeds = random_feeds(onnx.load(str(LOWRANK)))
    assert_matches(session(LOWRANK).run(None, feeds), session(path).run(None, feeds))


def test_output_onto_the_inputs_external_data_is_refused(tmp_path, capfd, external_model):
    folder = external_model.parent
    before = _snapshot(folder)
    # -o naming the data file itself
    code = main(["rewrite", str(external_model), "-o", str(folder / "weights.bin")])
    line = _one_error_line(capfd.readouterr().err)
    assert code == 2 and "external data" in line
    # -o whose OUT.data would be the input's data file
    other = _save_external(onnx.load(str(LOWRANK)), folder / "n.onnx", location="o.onnx.data")
    before = _snapshot(folder)
    code = main(["rewrite", str(other), "-o", str(folder / "o.onnx")])
    line = _one_error_line(capfd.readouterr().err)
    assert code == 2 and "o.onnx.data" in line
    assert _snapshot(folder) == before


def test_minus_o_equal_to_input_refused_even_through_a_symlinked_folder(tmp_path, capfd):
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / "m.onnx"
    shutil.copy(LOWRANK, path)
    (tmp_path / "alias").symlink_to(folder, target_is_directory=True)
    code = main(["rewrite", str(path), "-o", str(tmp_path / "alias" / "m.onnx")])
    assert code == 2 and "--in-place" in _one_error_line(capfd.readouterr().err)
    assert path.read_bytes() == LOWRANK.read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == ["m.onnx"]


def test_models_over_the_protobuf_limit_are_saved_with_external_data(tmp_path, capfd, monkeypatch):
    """external=None (the CLI's default for inline inputs) switches to external data when the proto
    is over the limit; the limit is lowered here so that a small model crosses it."""
    monkeypatch.setattr(sepify.model.save, "PROTOBUF_LIMIT", 10_000)
    src = tmp_path / "m.onnx"
    shutil.copy(LOWRANK, src)  # 92 KB inline
    assert main(["rewrite", str(src), "-o", str(tmp_path / "big.onnx")]) == 0
    capfd.readouterr()
    assert (tmp_path / "big.onnx.data").is_file()
    assert (tmp_path / "big.onnx").stat().st_size < 10_000
    feeds = random_feeds(onnx.load(str(LOWRANK)))
    assert_matches(session(LOWRANK).run(None, feeds), session(tmp_path / "big.onnx").run(None, feeds))
    # below the limit: one file
    monkeypatch.setattr(sepify.model.save, "PROTOBUF_LIMIT", 2**31 - 1)
    assert main(["rewrite", str(src), "-o", str(tmp_path / "small.onnx")]) == 0
    capfd.readouterr()
    assert not (tmp_path / "small.onnx.data").exists()


def test_a_proto_over_the_limit_by_its_graph_alone_is_saved_with_external_data(tmp_path, monkeypatch):
    """The size is measured on the serialized model, not guessed from the tensors: a model whose
    weights are far under the limit but whose doc string is not still goes external."""
    from sepify.model.save import save_model

    monkeypatch.setattr(sepify.model.save, "PROTOBUF_LIMIT", 60_000)

    def small(doc: str) -> onnx.ModelProto:
        m = onnx.load(str(LOWRANK))
        del m.graph.initializer[1:]  # one 18 KB weight: under half the limit
        m.graph.doc_string = doc
        return m

    save_model(small(""), tmp_path / "plain.onnx")
    assert not (tmp_path / "plain.onnx.data").exists()
    assert onnx.load(str(tmp_path / "plain.onnx")) == small("")
    save_model(small("x" * 70_000), tmp_path / "doc.onnx")
    assert (tmp_path / "doc.onnx.data").stat().st_size >= 18_432
    back = onnx.load(str(tmp_path / "doc.onnx"))
    assert back.graph.initializer[0].raw_data == small("").graph.initializer[0].raw_data


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
def test_a_failing_write_leaves_the_old_output_and_no_temp_files(tmp_path, capfd, monkeypatch, external):
    src = tmp_path / "in" / "m.onnx"
    src.parent.mkdir()
    if external:
        _save_external(onnx.load(str(LOWRANK)), src)
    else:
        shutil.copy(LOWRANK, src)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "r.onnx").write_bytes(b"previous output")
    real_replace = os.replace

    def failing_replace(a, b):
        if Path(b).name == "r.onnx":
            raise OSError(28, "No space left on device")
        return real_replace(a, b)

    monkeypatch.setattr(sepify.model.save.os, "replace", failing_replace)
    code = main(["rewrite", str(src), "-o", str(dst / "r.onnx")])
    out, err = capfd.readouterr()
    assert code == 2
    assert "No space left on device" in _one_error_line(err, out)
    names = sorted(p.name for p in dst.iterdir())
    assert names in (["r.onnx"], ["r.onnx", "r.onnx.data"]), names  # the data file may already be in place
    assert (dst / "r.onnx").read_bytes() == b"previous output"


@pytest.mark.parametrize("bad_report", ["missing_folder", "directory"])
def test_bad_report_target_writes_no_model(tmp_path, capfd, bad_report):
    src = tmp_path / "m.onnx"
    shutil.copy(LOWRANK, src)
    report = tmp_path / "nope" / "r.json" if bad_report == "missing_folder" else tmp_path
    code = main(["rewrite", str(src), "-o", str(tmp_path / "out.onnx"), "--report", str(report)])
    assert code == 2
    _one_error_line(capfd.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


# ----------------------------------------------------------------------------------------------
# Determinism: same model + flags -> the same bytes
# ----------------------------------------------------------------------------------------------
POLICIES = {
    "lossless": ("lowrank", []),
    "tol": ("random", ["--tol", "0.3"]),
    "rank": ("random", ["--rank", "2", "--scheme", "dw-pw"]),
    "budget": ("random", ["--budget", "0.5"]),
    "grouped": ("random", ["--rank", "3", "--lowering", "grouped"]),
    "spatial": ("random", ["--tol", "0.5", "--scheme", "spatial", "--no-chain"]),
}


def _policy_source(tmp_path: Path, which: str, external: bool = False) -> Path:
    folder = tmp_path / "src"
    folder.mkdir(exist_ok=True)
    model = onnx.load(str(LOWRANK)) if which == "lowrank" else random_conv_stack()
    if external:
        return _save_external(model, folder / "m.onnx")
    path = folder / "m.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _rewrite_into(src: Path, folder: Path, flags: list[str]) -> dict[str, bytes]:
    folder.mkdir()
    assert main(["rewrite", str(src), "-o", str(folder / "r.onnx"), "--report", str(folder / "r.json"), *flags]) == 0
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_two_rewrites_give_identical_bytes(tmp_path, capfd, policy):
    which, flags = POLICIES[policy]
    src = _policy_source(tmp_path, which)
    a = _rewrite_into(src, tmp_path / "a", flags)
    b = _rewrite_into(src, tmp_path / "b", flags)
    capfd.readouterr()
    assert a.keys() == {"r.onnx", "r.json"}
    assert a["r.onnx"] != src.read_bytes()  # something was rewritten
    assert a == b


def test_two_rewrites_with_external_data_give_identical_bytes(tmp_path, capfd):
    src = _policy_source(tmp_path, "random", external=True)
    a = _rewrite_into(src, tmp_path / "a", ["--budget", "0.5"])
    b = _rewrite_into(src, tmp_path / "b", ["--budget", "0.5"])
    capfd.readouterr()
    assert a.keys() == {"r.onnx", "r.onnx.data", "r.json"}
    assert a == b


@pytest.mark.parametrize("policy", ["budget", "tol"])
def test_rewrites_in_separate_processes_give_identical_bytes(tmp_path, policy):
    """Across processes with different hash seeds (set/dict ordering of strings changes)."""
    which, flags = POLICIES[policy]
    src = _policy_source(tmp_path, which)
    outputs = []
    for seed in ("1", "2"):
        out = tmp_path / f"p{seed}"
        out.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run([sys.executable, "-c", "import sys; from sepify.cli import main; sys.exit(main())",
                               "rewrite", str(src), "-o", str(out / "r.onnx"), *flags],
                              capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr
        outputs.append((out / "r.onnx").read_bytes())
    assert outputs[0] == outputs[1]


# ----------------------------------------------------------------------------------------------
# Big external data (over MAP_EXTERNAL_OVER, lowered here): mapped for reading, streamed when saved
# ----------------------------------------------------------------------------------------------
def _audit_json(path: Path, capfd) -> dict:
    assert main(["audit", str(path), "--format", "json"]) == 0
    data = json.loads(capfd.readouterr().out)
    data.pop("model")
    return data


@pytest.mark.parametrize("flags", [[], ["--budget", "0.5"], ["--include", "nothing-matches"]],
                         ids=["lossless", "budget", "nothing-rewritten"])
def test_mapped_external_data_gives_the_same_reports_and_bytes(tmp_path, capfd, monkeypatch, flags):
    """Leaving the weights in their file changes nothing a user sees: same audit, same output bytes."""
    src = _policy_source(tmp_path, "lowrank" if not flags or flags[0] != "--budget" else "random", external=True)
    loaded_audit = _audit_json(src, capfd)
    loaded_out = _rewrite_into(src, tmp_path / "loaded", flags)
    capfd.readouterr()
    monkeypatch.setattr(sepify.model.load, "MAP_EXTERNAL_OVER", 0)
    loaded = sepify.model.load.load_model(src)
    assert loaded.mapped_external and loaded.model.ByteSize() < 10_000
    for t in loaded.model.graph.initializer:
        assert t.data_location == TensorProto.EXTERNAL
        assert os.path.isabs(next(e.value for e in t.external_data if e.key == "location"))
    assert _audit_json(src, capfd) == loaded_audit
    mapped_out = _rewrite_into(src, tmp_path / "mapped", flags)
    capfd.readouterr()
    assert mapped_out == loaded_out
    assert sorted(mapped_out) == ["r.json", "r.onnx", "r.onnx.data"]
    if "--budget" not in flags:  # lossless: the same function
        feeds = random_feeds(onnx.load(str(src)))
        assert_matches(session(src).run(None, feeds), session(tmp_path / "mapped" / "r.onnx").run(None, feeds))


def test_mapped_weights_are_views_of_the_file_not_copies(tmp_path, monkeypatch):
    monkeypatch.setattr(sepify.model.load, "MAP_EXTERNAL_OVER", 0)
    w = rand([64, 32, 3, 3])
    folder = tmp_path / "m"
    folder.mkdir()
    src = _save_external(make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
                                    [vi("x", [1, 32, 8, 8])], [vi("y", [1, 64, 8, 8])], [init("w", w)]),
                         folder / "m.onnx")
    loaded = sepify.model.load.load_model(src)
    arr = sepify.model.load.tensor_array(loaded.model.graph.initializer[0])
    np.testing.assert_array_equal(arr, w)
    assert not arr.flags.writeable and not arr.flags.owndata
    base = arr
    while getattr(base, "base", None) is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap)


def test_saving_a_mapped_model_streams_its_weights(tmp_path, monkeypatch):
    """The weights go from the input's data file to the output's in STREAM_CHUNK pieces."""
    import tracemalloc

    monkeypatch.setattr(sepify.model.load, "MAP_EXTERNAL_OVER", 0)
    monkeypatch.setattr(sepify.model.save, "STREAM_CHUNK", 1 << 20)
    w = rand([256, 256, 5, 5])  # 6.5 MB
    folder = tmp_path / "m"
    folder.mkdir()
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[2, 2, 2, 2])],
                       [vi("x", [1, 256, 4, 4])], [vi("y", [1, 256, 4, 4])], [init("w", w)])
    src = _save_external(model, folder / "m.onnx")
    loaded = sepify.model.load.load_model(src)
    tracemalloc.start()
    try:
        sepify.model.save.save_model(loaded.model, tmp_path / "o.onnx", external=True, source=loaded)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * (1 << 20), f"saving held {peak} bytes at once"
    out = onnx.load(str(tmp_path / "o.onnx"))
    np.testing.assert_array_equal(numpy_helper.to_array(out.graph.initializer[0]), w)


def test_mapped_model_saved_to_one_file_or_in_place(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(sepify.model.load, "MAP_EXTERNAL_OVER", 0)
    folder = tmp_path / "in"
    folder.mkdir()
    src = _save_external(onnx.load(str(LOWRANK)), folder / "m.onnx", location="m.onnx.data")
    feeds = random_feeds(onnx.load(str(LOWRANK)))
    want = session(LOWRANK).run(None, feeds)
    # explicitly one file: the mapped weights are read in
    loaded = sepify.model.load.load_model(src)
    sepify.model.save.save_model(loaded.model, tmp_path / "single.onnx", external=False, source=loaded)
    assert not (tmp_path / "single.onnx.data").exists()
    assert_matches(want, session(tmp_path / "single.onnx").run(None, feeds))
    # in place: the data file it reads from is replaced only once the new one is complete
    assert main(["rewrite", str(src), "--in-place"]) == 0
    assert "3 node(s) rewritten" in capfd.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert_matches(want, session(src).run(None, feeds))


def _reshape_then_conv() -> onnx.ModelProto:
    """x → Reshape(x, shape) → Conv: the conv's shapes depend on the value of the input ``shape``,
    which shape inference cannot see — only an onnxruntime run can size the conv."""
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"], name="reshape"),
             helper.make_node("Conv", ["r", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    return make_model(nodes, [vi("x", [1, 3, 4, 8]), vi("shape", [4], TensorProto.INT64)], [vi("y", ["n", "c", "h", "w"])],
                      [init("w", rand([4, 3, 3, 3]))], check=False)


def test_audit_at_inputs_the_model_cannot_run_says_why(tmp_path, capfd):
    """onnxruntime's error is the answer when only its run can size the convs (it used to be swallowed,
    leaving 'shape unknown' warnings and a partial total)."""
    path = tmp_path / "m.onnx"
    path.write_bytes(_reshape_then_conv().SerializeToString())
    assert main(["audit", str(path), "--input-value", "shape=1,3,8,4", "--format", "json"]) == 0
    assert json.loads(capfd.readouterr().out)["nodes"][0]["macs"] == 4 * 8 * 4 * 27
    assert main(["audit", str(path), "--input-value", "shape=1,3,5,7"]) == 2
    out, err = capfd.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert "onnxruntime cannot run the model at input shapes x=1x3x4x8, shape=4" in err and "reshape" in err.lower()


# ----------------------------------------------------------------------------------------------
# Models onnxruntime runs that the ONNX checker alone would refuse, and inputs sepify cannot feed
# ----------------------------------------------------------------------------------------------
def _separable_conv(x_info, ir: int = 8, opset: int = 17, extra_nodes=(), extra_outputs=(), extra_inputs=()):
    w = (rand([8, 4, 1, 1], 1) * rand([1, 4, 3, 3], 2)).astype(np.float32)  # dw-pw at rank 1, exactly
    graph = helper.make_graph([helper.make_node("Conv", ["X", "W"], ["Y"], pads=[1, 1, 1, 1]), *extra_nodes], "g",
                              [x_info, *extra_inputs], [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None),
                                                        *extra_outputs], [init("W", w)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    return model


@pytest.mark.parametrize("ir, opset", [(8, 17), (3, 7)])
def test_outputs_without_shape_and_unlisted_ir3_initializers_load(tmp_path, ir, opset):
    """A graph output with an element type and no shape, and (IR 3) an initializer not listed as a
    graph input: onnxruntime runs both, the checker alone refuses them — sepify checks the rest."""
    model = _separable_conv(vi("X", [1, 4, 16, 16]), ir=ir, opset=opset)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert main(["rewrite", str(path), "-o", str(tmp_path / "out.onnx"), "--verify"]) == 0
    out = onnx.load(str(tmp_path / "out.onnx"))
    if ir < 4:  # the new weights are listed as inputs, as IR 3 wants
        assert {t.name for t in out.graph.initializer} <= {i.name for i in out.graph.input}
    feeds = {"X": rand([1, 4, 16, 16], 3)}
    assert_matches(session(out).run(None, feeds)[0], session(model).run(None, feeds)[0])


def test_a_sequence_input_rewrites_but_cannot_be_run(tmp_path, capfd):
    """Runs of the model feed tensors only: --verify / --bench / --calibrate with a sequence input is
    bad input (exit 2, one line) and leaves no output file; audit and rewrite work."""
    seq = helper.make_tensor_sequence_value_info("S", TensorProto.FLOAT, None)
    model = _separable_conv(vi("X", [1, 4, 16, 16]), extra_inputs=[seq],
                            extra_nodes=[helper.make_node("SequenceLength", ["S"], ["L"])],
                            extra_outputs=[helper.make_tensor_value_info("L", TensorProto.INT64, [])])
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    out = tmp_path / "out.onnx"
    assert main(["audit", str(path), "--format", "json"]) == 0
    assert main(["rewrite", str(path), "-o", str(out)]) == 0 and out.is_file()
    out.unlink()
    for extra in (["--verify"], ["--bench"], ["--budget", "0.5", "--calibrate", "random"]):
        capfd.readouterr()
        code = main(["rewrite", str(path), "-o", str(out), *extra])
        stdout, err = capfd.readouterr()
        assert code == 2, (extra, err)
        assert _one_error_line(err, stdout).endswith("audit and rewrite work without them"), err
        assert "'S' is a sequence" in err and stdout == ""
        assert not out.exists() and not list(tmp_path.glob("out.onnx*")), extra


@pytest.mark.parametrize("names", [["conv", "conv", "conv"], ["", "", ""], ["Conv_1", "", "x"]])
def test_repeated_or_missing_node_names_address_each_node_once(names, tmp_path):
    """Node names are not unique in every model (the checker allows repeats; an unnamed node's
    ``<op>_<index>`` may be another node's name): each node still gets a label of its own, and each
    is rewritten exactly once."""
    from sepify.model.graph import node_labels

    ws = [(rand([8, c, 1, 1], 10 + i) * rand([1, c, 3, 3], 20 + i)).astype(np.float32) for i, c in enumerate((4, 8, 8))]
    nodes = [helper.make_node("Conv", [src, f"W{i}"], [dst], pads=[1, 1, 1, 1], name=names[i])
             for i, (src, dst) in enumerate((("X", "a"), ("a", "b"), ("b", "Y")))]
    model = make_model(nodes, [vi("X", [1, 4, 16, 16])], [vi("Y", [1, 8, 16, 16]), vi("a", [1, 8, 16, 16])],
                       [init(f"W{i}", w) for i, w in enumerate(ws)])
    labels = node_labels(model.graph)
    assert len(set(labels)) == 3 and all(n in labels for n in names if n and names.count(n) == 1)
    report = sepify.audit(model)
    assert sorted(n.name for n in report.nodes) == sorted(labels)
    out, rep = sepify.rewrite(model)
    assert sorted(r.qualified_name for r in rep.rewritten) == sorted(labels)
    assert not any(n.op_type == "Conv" and n.name in names for n in out.graph.node if n.name)
    runnable = onnx.ModelProto()
    runnable.CopyFrom(model)
    for n, label in zip(runnable.graph.node, labels):
        n.name = label  # onnxruntime itself refuses repeated node names
    feeds = {"X": rand([1, 4, 16, 16], 5)}
    for got, want in zip(session(out).run(["Y", "a"], feeds), session(runnable).run(["Y", "a"], feeds)):
        assert_matches(got, want)


def test_output_targets_devices_links_and_one_file_twice(tmp_path, capfd):
    """A device is no place for a model (the atomic rename would put a file where /dev/null was); a
    symlink is written through (the link stays a link); one file named for two outputs is refused."""
    src = tmp_path / "m.onnx"
    onnx.save(make_conv_model([1, 3, 8, 8], [4, 3, 3, 3], pads=[1, 1, 1, 1]), str(src))
    for argv in (["-o", os.devnull], ["-o", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "o.onnx")],
                 ["-o", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "r.json"), "--html", str(tmp_path / "r.json")]):
        capfd.readouterr()
        assert main(["rewrite", str(src), "--budget", "0.5", *argv]) == 2, argv
        out, err = capfd.readouterr()
        _one_error_line(err, out)
        assert out == ""
    assert os.path.exists(os.devnull) and not os.path.isfile(os.devnull)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    real = tmp_path / "real.onnx"
    real.write_bytes(b"old")
    link = tmp_path / "link.onnx"
    link.symlink_to(real)
    assert main(["rewrite", str(src), "--budget", "0.5", "-o", str(link)]) == 0
    assert link.is_symlink() and onnx.load(str(real)).graph.node


def test_out_of_memory_is_a_one_line_exit_2_and_leaves_no_file(tmp_path, capfd, monkeypatch):
    """Input dims the machine cannot hold (--input-shape 1x3x100000x100000 and --verify) end in
    numpy's MemoryError: a documented exit 2 with one line, not an internal error, and the model
    written before the check is removed."""
    import sepify.pipeline.verify as verify_mod

    def too_big(*a, **k):
        raise MemoryError("Unable to allocate 298. GiB for an array with shape (1, 4, 100000, 100000)")

    src = tmp_path / "m.onnx"
    onnx.save(make_conv_model([1, 3, 8, 8], [4, 3, 3, 3], pads=[1, 1, 1, 1]), str(src))
    monkeypatch.setattr(verify_mod, "sample_runs", too_big)
    capfd.readouterr()
    out_path = tmp_path / "out.onnx"
    assert main(["rewrite", str(src), "--budget", "0.5", "-o", str(out_path), "--verify"]) == 2
    out, err = capfd.readouterr()
    assert _one_error_line(err, out).startswith("sepify: error: out of memory (Unable to allocate 298. GiB")
    assert out == "" and not out_path.exists()


def test_random_calibration_feeds_a_boolean_scalar_input():
    """A scalar bool input (a flag) gets 0-d arrays as random samples: onnxruntime refused the numpy.bool_
    scalars a sample list held."""
    from sepify.pipeline.plan import Policy

    nodes = [helper.make_node("Conv", ["X", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Cast", ["flag"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["c", "f"], ["Y"])]
    model = make_model(nodes, [vi("X", [1, 8, 8, 8]), vi("flag", [], TensorProto.BOOL)], [vi("Y", [1, 16, 8, 8])],
                       [init("W", rand([16, 8, 3, 3], 1))])
    out, report, cal = sepify.calibrated_rewrite(model, Policy(budget=0.6), "random", samples=4)
    assert report.rewritten and cal.samples == 4
