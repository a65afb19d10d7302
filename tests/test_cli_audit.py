"""`sepify audit` on the command line: formats, -o, --top, several models, and bad input.

Bad input must give exit code 2, exactly one stderr line starting with ``sepify: error:``,
no traceback, and no output file.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from sepify.cli import main
from sepify.serialize import SCHEMA_VERSION

from conftest import init, make_conv_model, make_model, rand, vi

NODE_KEYS = {"name", "op_type", "group", "kernel_shape", "strides", "pads", "dilations", "input_shape", "output_shape",
             "weight_shape", "params", "macs", "flops", "eligible", "reason", "separability"}


def _three_conv_model() -> onnx.ModelProto:
    """conv_big (3->16, 3x3, pad 1), conv_mid (16->8, 3x3), conv_small (8->4, 1x1) on 1x3x16x16."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv_big", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "w2"], ["b"], name="conv_mid"),
        helper.make_node("Conv", ["b", "w3"], ["y"], name="conv_small"),
    ]
    inits = [init("w1", rand([16, 3, 3, 3], 1)), init("b1", rand([16], 2)), init("w2", rand([8, 16, 3, 3], 3)),
             init("w3", rand([4, 8, 1, 1], 4))]
    return make_model(nodes, [vi("x", [1, 3, 16, 16])], [vi("y", [1, 4, 14, 14])], inits)


# hand-computed MACs: prod(output) x C_in/group x prod(kernel)
MACS = {
    "conv_big": 1 * 16 * 16 * 16 * 3 * 3 * 3,
    "conv_mid": 1 * 8 * 14 * 14 * 16 * 3 * 3,
    "conv_small": 1 * 4 * 14 * 14 * 8 * 1 * 1,
}


@pytest.fixture
def model_path(tmp_path) -> Path:
    p = tmp_path / "three.onnx"
    p.write_bytes(_three_conv_model().SerializeToString())
    return p


@pytest.fixture
def sobel_path(tmp_path) -> Path:
    sobel = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float32)
    m = make_conv_model([1, 1, 16, 16], [1, 1, 3, 3], pads=[1, 1, 1, 1], y_shape=[1, 1, 16, 16])
    m.graph.initializer[0].CopyFrom(init("w", sobel[None, None]))
    p = tmp_path / "sobel.onnx"
    p.write_bytes(m.SerializeToString())
    return p


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_bad_input(code: int, out: str, err: str, *must_name: str) -> str:
    assert code == 2, (code, out, err)
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {err!r}"
    assert lines[0].startswith("sepify: error:"), lines[0]
    assert "Traceback" not in err and "Traceback" not in out
    for part in must_name:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    return lines[0]


# ----------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------
def test_json_schema(capsys, model_path):
    code, out, err = _run(capsys, "audit", model_path, "--format", "json")
    assert code == 0, err
    assert err == ""
    data = json.loads(out)
    assert data["schema_version"] == SCHEMA_VERSION
    assert "MACs" in data["convention"] and "C_in/group" in data["convention"]
    assert data["model"] == str(model_path)
    totals = data["totals"]
    assert totals["conv_nodes"] == 3
    assert totals["conv_macs"] == sum(MACS.values())
    assert totals["matmul_macs"] == 0
    assert totals["total_macs"] == sum(MACS.values())
    assert len(data["nodes"]) == 3
    for node in data["nodes"]:
        assert NODE_KEYS <= set(node), NODE_KEYS - set(node)
        assert node["op_type"] == "Conv"
        assert node["macs"] == MACS[node["name"]]
        assert isinstance(node["eligible"], bool)
    big = next(n for n in data["nodes"] if n["name"] == "conv_big")
    assert big["input_shape"] == [1, 3, 16, 16] and big["output_shape"] == [1, 16, 16, 16]
    assert big["weight_shape"] == [16, 3, 3, 3] and big["kernel_shape"] == [3, 3]
    assert big["strides"] == [1, 1] and big["dilations"] == [1, 1] and big["pads"] == [1, 1, 1, 1]
    assert big["group"] == 1
    assert big["params"] == 16 * 3 * 3 * 3 + 16
    assert big["flops"] == 2 * MACS["conv_big"] + 1 * 16 * 16 * 16
    assert isinstance(big["separability"], dict) and "schemes" in big["separability"]
    small = next(n for n in data["nodes"] if n["name"] == "conv_small")
    # a 1×1 conv is a matrix: only pw-lowrank applies to it
    schemes = small["separability"]["schemes"]
    assert schemes["pw-lowrank"]["reason"] in (None, "no_mac_saving") and schemes["dw-pw"]["reason"] == "pointwise_kernel"


def test_json_no_spectra(capsys, model_path):
    code, out, _ = _run(capsys, "audit", model_path, "--format", "json", "--no-spectra")
    assert code == 0
    data = json.loads(out)
    assert all(n["separability"] is None for n in data["nodes"])
    assert data["totals"]["conv_macs"] == sum(MACS.values())


def test_table(capsys, model_path):
    code, out, err = _run(capsys, "audit", model_path)
    assert code == 0 and err == ""
    for name in MACS:
        assert name in out
    assert "Convention" in out


def test_table_shows_exact_sobel_separability(capsys, sobel_path):
    code, out, _ = _run(capsys, "audit", sobel_path, "--format", "table")
    assert code == 0
    assert "spatial" in out


def test_csv(capsys, model_path):
    code, out, err = _run(capsys, "audit", model_path, "--format", "csv")
    assert code == 0 and err == ""
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 3
    for required in ("model", "name", "op_type", "macs", "flops", "params", "input_shape", "output_shape", "eligible",
                     "reason"):
        assert required in rows[0]
    by_name = {r["name"]: r for r in rows}
    assert {k: int(by_name[k]["macs"]) for k in MACS} == MACS
    assert by_name["conv_big"]["input_shape"] == "1x3x16x16"
    assert by_name["conv_big"]["model"] == str(model_path)
    # default sort: most MACs first
    assert [int(r["macs"]) for r in rows] == sorted(MACS.values(), reverse=True)


def test_md(capsys, model_path):
    code, out, err = _run(capsys, "audit", model_path, "--format", "md")
    assert code == 0 and err == ""
    assert out.startswith("## ")
    assert "| node |" in out and "|---|" in out
    table_rows = [line for line in out.splitlines() if line.startswith("| `")]
    assert len(table_rows) == 3
    for name in MACS:
        assert f"`{name}`" in out


@pytest.mark.parametrize("sort,expected", [
    ("macs", ["conv_mid", "conv_big", "conv_small"]),
    ("name", ["conv_big", "conv_mid", "conv_small"]),
    ("graph", ["conv_big", "conv_mid", "conv_small"]),
])
def test_sort(capsys, model_path, sort, expected):
    assert MACS["conv_mid"] > MACS["conv_big"] > MACS["conv_small"]
    code, out, _ = _run(capsys, "audit", model_path, "--format", "csv", "--sort", sort)
    assert code == 0
    assert [r["name"] for r in csv.DictReader(io.StringIO(out))] == expected


# ----------------------------------------------------------------------------------------------
# -o and --top
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["json", "csv", "md", "table"])
def test_output_file(capsys, tmp_path, model_path, fmt):
    target = tmp_path / f"report.{fmt}"
    code, out, err = _run(capsys, "audit", model_path, "--format", fmt, "-o", target)
    assert code == 0 and err == ""
    assert out == ""
    text = target.read_text(encoding="utf-8")
    code2, out2, _ = _run(capsys, "audit", model_path, "--format", fmt)
    assert text == out2
    if fmt == "json":
        assert json.loads(text)["totals"]["conv_macs"] == sum(MACS.values())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "temp file left behind"


def test_output_file_replaces_existing(capsys, tmp_path, model_path):
    target = tmp_path / "r.json"
    target.write_text("old")
    assert main(["audit", str(model_path), "--format", "json", "-o", str(target)]) == 0
    assert json.loads(target.read_text())["schema_version"] == SCHEMA_VERSION


@pytest.mark.parametrize("fmt", ["csv", "md", "table"])
def test_top(capsys, model_path, fmt):
    code, out, _ = _run(capsys, "audit", model_path, "--format", fmt, "--top", "1")
    assert code == 0
    assert "conv_mid" in out
    assert "conv_big" not in out and "conv_small" not in out
    code, out, _ = _run(capsys, "audit", model_path, "--format", fmt, "--top", "2")
    assert "conv_mid" in out and "conv_big" in out and "conv_small" not in out


def test_top_json(capsys, model_path):
    """--top K: "only the K most expensive nodes per model" — in every format."""
    code, out, _ = _run(capsys, "audit", model_path, "--format", "json", "--top", "1")
    assert code == 0
    data = json.loads(out)
    assert [n["name"] for n in data["nodes"]] == ["conv_mid"]
    assert data["totals"]["conv_macs"] == sum(MACS.values())  # totals still cover the whole model


def test_top_larger_than_node_count(capsys, model_path):
    code, out, _ = _run(capsys, "audit", model_path, "--format", "csv", "--top", "10")
    assert code == 0
    assert len(list(csv.DictReader(io.StringIO(out)))) == 3


# ----------------------------------------------------------------------------------------------
# Several models, folders, input shapes
# ----------------------------------------------------------------------------------------------
def test_multiple_models_json(capsys, model_path, sobel_path):
    code, out, err = _run(capsys, "audit", model_path, sobel_path, "--format", "json")
    assert code == 0 and err == ""
    data = json.loads(out)
    assert data["schema_version"] == SCHEMA_VERSION
    assert [m["model"] for m in data["models"]] == [str(model_path), str(sobel_path)]
    assert data["models"][0]["totals"]["conv_macs"] == sum(MACS.values())
    assert data["models"][1]["totals"]["conv_macs"] == 1 * 1 * 16 * 16 * 1 * 3 * 3


def test_multiple_models_csv_and_table(capsys, model_path, sobel_path):
    code, out, _ = _run(capsys, "audit", model_path, sobel_path, "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert {r["model"] for r in rows} == {str(model_path), str(sobel_path)}
    assert len(rows) == 4
    code, out, _ = _run(capsys, "audit", model_path, sobel_path)
    assert code == 0
    assert "models" in out  # the summary table
    assert "three.onnx" in out and "sobel.onnx" in out


def test_folder(capsys, tmp_path):
    folder = tmp_path / "zoo"
    (folder / "nested").mkdir(parents=True)
    (folder / "b.onnx").write_bytes(_three_conv_model().SerializeToString())
    (folder / "nested" / "a.onnx").write_bytes(make_conv_model([1, 3, 8, 8], [4, 3, 3, 3]).SerializeToString())
    (folder / "notes.txt").write_text("not a model")
    code, out, err = _run(capsys, "audit", folder, "--format", "json")
    assert code == 0, err
    models = json.loads(out)["models"]
    assert sorted(m["model"] for m in models) == sorted([str(folder / "b.onnx"), str(folder / "nested" / "a.onnx")])


def test_input_shape_option(capsys, tmp_path):
    p = tmp_path / "sym.onnx"
    p.write_bytes(make_conv_model(["N", 3, "H", "W"], [4, 3, 3, 3], y_shape=["N", 4, "OH", "OW"]).SerializeToString())
    code, out, err = _run(capsys, "audit", p, "--format", "json", "--input-shape", "x=2x3x10x12")
    assert code == 0, err
    node = json.loads(out)["nodes"][0]
    assert node["input_shape"] == [2, 3, 10, 12] and node["output_shape"] == [2, 4, 8, 10]
    assert node["macs"] == 2 * 4 * 8 * 10 * 3 * 3 * 3
    code, out, err = _run(capsys, "audit", p, "--format", "json", "--input-shape", "1x3x10x12")
    assert code == 0, err
    assert json.loads(out)["nodes"][0]["macs"] == 1 * 4 * 8 * 10 * 3 * 3 * 3


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert "sepify" in capsys.readouterr().out
    assert main(["audit", "--help"]) == 0
    assert "--format" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Bad input: exit 2, one line, no traceback, no output file
# ----------------------------------------------------------------------------------------------
def _bad_model_file(tmp_path: Path, kind: str) -> Path:
    p = tmp_path / f"{kind}.onnx"
    if kind == "garbage":
        p.write_bytes(b"\x00\x01garbage\xff" * 10)
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "json":
        p.write_text('{"graph": {}}')
    elif kind == "opset99":
        m = _three_conv_model()
        m.opset_import[0].version = 99
        p.write_bytes(m.SerializeToString())
    elif kind == "checker":
        m = _three_conv_model()
        m.graph.node[1].input[0] = "undefined_tensor"
        p.write_bytes(m.SerializeToString())
    elif kind == "bomb":
        m = _three_conv_model()
        del m.graph.initializer[0].dims[:]
        m.graph.initializer[0].dims.extend([10**6, 10**6, 3, 3])
        p.write_bytes(m.SerializeToString())
    elif kind == "symbolic":
        p.write_bytes(make_conv_model(["N", 3, "H", "W"], [4, 3, 3, 3], y_shape=["N", 4, "OH", "OW"]).SerializeToString())
    else:
        raise ValueError(kind)
    return p


@pytest.mark.parametrize("kind", ["garbage", "empty", "json", "opset99", "checker", "bomb", "symbolic"])
@pytest.mark.parametrize("fmt", ["json", "table"])
def test_bad_model_exit_2_one_line_no_output_file(capsys, tmp_path, kind, fmt):
    bad = _bad_model_file(tmp_path, kind)
    target = tmp_path / "out" / "report.txt"
    target.parent.mkdir()
    code, out, err = _run(capsys, "audit", bad, "--format", fmt, "-o", target)
    _assert_bad_input(code, out, err, str(bad))
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no temp files either


def test_missing_model(capsys, tmp_path):
    missing = tmp_path / "nope.onnx"
    target = tmp_path / "r.json"
    code, out, err = _run(capsys, "audit", missing, "--format", "json", "-o", target)
    _assert_bad_input(code, out, err, str(missing))
    assert not target.exists()


def test_one_bad_model_among_good_ones(capsys, tmp_path, model_path):
    bad = _bad_model_file(tmp_path, "garbage")
    target = tmp_path / "r.json"
    code, out, err = _run(capsys, "audit", model_path, bad, "--format", "json", "-o", target)
    _assert_bad_input(code, out, err, str(bad))
    assert not target.exists()


def test_folder_with_a_bad_model(capsys, tmp_path):
    folder = tmp_path / "zoo"
    folder.mkdir()
    (folder / "good.onnx").write_bytes(_three_conv_model().SerializeToString())
    (folder / "bad.onnx").write_bytes(b"nonsense")
    target = tmp_path / "r.csv"
    code, out, err = _run(capsys, "audit", folder, "--format", "csv", "-o", target)
    _assert_bad_input(code, out, err, "bad.onnx")
    assert not target.exists()


def test_folder_without_models(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = _run(capsys, "audit", empty)
    _assert_bad_input(code, out, err, str(empty))


@pytest.mark.parametrize("argv", [
    ["--format", "xml"],
    ["--sort", "size"],
    ["--top", "many"],
    ["--input-shape", "x=1x3xAx8"],
    ["--input-shape", "x=1x3x0x8"],
    ["--input-shape", "nope=1x3x16x16"],
    ["--input-shape", "x=1x3x16"],
    ["--input-shape", "x=1x4x16x16"],
    ["--no-such-flag"],
], ids=["format", "sort", "top-not-int", "shape-letters", "shape-zero", "shape-unknown-input", "shape-rank",
        "shape-fixed-dim", "unknown-flag"])
def test_bad_arguments(capsys, tmp_path, model_path, argv):
    target = tmp_path / "r.json"
    code, out, err = _run(capsys, "audit", model_path, *argv, "-o", target)
    _assert_bad_input(code, out, err)
    assert not target.exists()


def test_negative_top_is_a_usage_error(capsys, tmp_path, model_path):
    code, out, err = _run(capsys, "audit", model_path, "--format", "csv", "--top", "-1")
    _assert_bad_input(code, out, err)


def test_no_models_given(capsys):
    code, out, err = _run(capsys, "audit")
    _assert_bad_input(code, out, err)


def test_unknown_command(capsys):
    code, out, err = _run(capsys, "frobnicate")
    _assert_bad_input(code, out, err)


def test_output_into_missing_folder_is_bad_input(capsys, tmp_path, model_path):
    target = tmp_path / "no" / "such" / "dir" / "r.json"
    code, out, err = _run(capsys, "audit", model_path, "--format", "json", "-o", target)
    _assert_bad_input(code, out, err)
    assert not target.exists()


def test_output_onto_a_directory_is_bad_input(capsys, tmp_path, model_path):
    target = tmp_path / "adir"
    target.mkdir()
    code, out, err = _run(capsys, "audit", model_path, "--format", "json", "-o", target)
    _assert_bad_input(code, out, err)
    assert target.is_dir() and list(target.iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_refused_external_data_via_cli(capsys, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    copy = _three_conv_model()
    onnx.save_model(copy, str(folder / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.bin", size_threshold=0)
    model = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../w.bin"
    (folder / "m.onnx").write_bytes(model.SerializeToString())
    (tmp_path / "w.bin").write_bytes((folder / "w.bin").read_bytes())
    target = tmp_path / "r.json"
    code, out, err = _run(capsys, "audit", folder / "m.onnx", "--format", "json", "-o", target)
    _assert_bad_input(code, out, err, str(folder / "m.onnx"))
    assert not target.exists()


def test_malformed_external_data_via_cli(capsys, tmp_path):
    """A non-integer external-data offset is bad input (exit 2), not an internal error (exit 3)."""
    folder = tmp_path / "m"
    folder.mkdir()
    onnx.save_model(_three_conv_model(), str(folder / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
    model = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    for e in model.graph.initializer[0].external_data:
        if e.key == "offset":
            e.value = "zero"
    (folder / "m.onnx").write_bytes(model.SerializeToString())
    code, out, err = _run(capsys, "audit", folder / "m.onnx")
    _assert_bad_input(code, out, err, str(folder / "m.onnx"))


def test_debug_shows_traceback_only_when_asked(capsys, tmp_path):
    bad = _bad_model_file(tmp_path, "garbage")
    code, out, err = _run(capsys, "--debug", "audit", bad)
    assert code == 2
    assert "sepify: error:" in err
