"""Loading models: every source gives the same answer, and nothing untrusted gets through.

Every refusal must be a :class:`sepify.SepifyError` whose message is one line and, when
the model came from a path, names that file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import sepify
from sepify.errors import ModelLoadError, SepifyError, ShapeError, UsageError
from sepify.model.load import load_model

from conftest import init, make_conv_model, make_model, ort_run, rand, vi


def _model() -> onnx.ModelProto:
    return make_conv_model([1, 3, 8, 8], [4, 3, 3, 3], bias=True, pads=[1, 1, 1, 1])


def _comparable(report) -> dict:
    d = report.to_dict()
    d.pop("model")
    return d


def _assert_one_line(exc: BaseException, *must_contain: str) -> str:
    msg = str(exc)
    assert msg.strip(), "empty error message"
    assert "\n" not in msg.strip(), f"error message is not one line: {msg!r}"
    for part in must_contain:
        assert part in msg, f"{part!r} not in {msg!r}"
    return msg


def _save_external(model: onnx.ModelProto, folder: Path, location: str = "w.bin", name: str = "m.onnx") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / location).parent.mkdir(parents=True, exist_ok=True)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # save_model converts the proto it is given
    path = folder / name
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                    size_threshold=0)
    return path


def _rewrite_external(path: Path, tensor: str, **entries: str) -> None:
    """Change external-data entries (location/offset/length) of one tensor in a saved model."""
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        if t.name == tensor:
            for e in t.external_data:
                if e.key in entries:
                    e.value = entries[e.key]
    path.write_bytes(model.SerializeToString())


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Run from a folder that is neither the model's folder nor its parent."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------
def test_path_bytes_and_modelproto_give_the_same_report(tmp_path):
    model = _model()
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    by_path = sepify.audit(path)
    by_str = sepify.audit(str(path))
    by_bytes = sepify.audit(model.SerializeToString())
    by_proto = sepify.audit(model)
    assert by_path.model == str(path)
    assert _comparable(by_path) == _comparable(by_str) == _comparable(by_bytes) == _comparable(by_proto)
    assert by_path.nodes[0].macs == 1 * 4 * 8 * 8 * 3 * 3 * 3


def test_bytearray_and_memoryview_sources():
    data = _model().SerializeToString()
    want = _comparable(sepify.audit(data))
    assert _comparable(sepify.audit(bytearray(data))) == want
    assert _comparable(sepify.audit(memoryview(data))) == want


def test_modelproto_is_not_modified():
    model = _model()
    before = model.SerializeToString()
    sepify.audit(model)
    assert model.SerializeToString() == before


def test_load_model_returns_label_and_folder(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(_model().SerializeToString())
    loaded = load_model(path)
    assert loaded.label == str(path)
    assert loaded.base_dir == tmp_path.resolve()
    assert loaded.has_external_data is False
    assert load_model(_model()).label == "<ModelProto>"
    assert load_model(_model().SerializeToString()).label == "<bytes>"


# ----------------------------------------------------------------------------------------------
# External data
# ----------------------------------------------------------------------------------------------
def test_external_data_loads_from_the_models_folder(tmp_path, monkeypatch):
    path = _save_external(_model(), tmp_path / "model")
    assert (tmp_path / "model" / "w.bin").is_file()
    monkeypatch.chdir(tmp_path / "model")
    report = sepify.audit(path)
    assert _comparable(report) == _comparable(sepify.audit(_model()))


def test_external_data_loads_from_any_working_directory(tmp_path, elsewhere):
    """External data resolves against the model's folder, not the current directory."""
    path = _save_external(_model(), tmp_path / "model")
    loaded = load_model(path)
    assert loaded.has_external_data
    w = next(t for t in loaded.model.graph.initializer if t.name == "w")
    np.testing.assert_array_equal(numpy_helper.to_array(w),
                                  numpy_helper.to_array(next(t for t in _model().graph.initializer if t.name == "w")))
    report = sepify.audit(path)
    assert _comparable(report) == _comparable(sepify.audit(_model()))


# The next tests run from the model's folder, so that they test only what they are about
# (test_external_data_loads_from_any_working_directory covers the working directory).
def test_external_data_in_a_subfolder_loads(tmp_path, monkeypatch):
    path = _save_external(_model(), tmp_path / "model", location="data/w.bin")
    assert (tmp_path / "model" / "data" / "w.bin").is_file()
    monkeypatch.chdir(tmp_path / "model")
    report = sepify.audit(path)
    assert report.nodes[0].macs == 1 * 4 * 8 * 8 * 3 * 3 * 3


def test_external_data_via_symlink_inside_the_folder_loads_or_is_cleanly_refused(tmp_path, monkeypatch):
    """A symlink staying inside the folder is sepify's to allow; the ONNX checker refuses all symlinks."""
    folder = tmp_path / "model"
    path = _save_external(_model(), folder, location="real.bin")
    (folder / "w.bin").symlink_to(folder / "real.bin")
    _rewrite_external(path, "w", location="w.bin")
    monkeypatch.chdir(folder)
    try:
        loaded = load_model(path)
    except SepifyError as exc:
        _assert_one_line(exc, str(path))
    else:
        assert loaded.has_external_data


@pytest.mark.parametrize("source", ["bytes", "proto"])
def test_external_data_without_a_path_is_refused(tmp_path, source):
    path = _save_external(_model(), tmp_path / "model")
    data = path.read_bytes()
    src = data if source == "bytes" else onnx.load_from_string(data)
    with pytest.raises(SepifyError) as err:
        load_model(src)
    _assert_one_line(err.value, "'w'", "w.bin")


def test_external_location_absolute_is_refused(tmp_path, elsewhere):
    path = _save_external(_model(), tmp_path / "model")
    _rewrite_external(path, "w", location=str((tmp_path / "model" / "w.bin").resolve()))
    with pytest.raises(SepifyError) as err:
        load_model(path)
    _assert_one_line(err.value, str(path), "'w'")


def test_external_location_etc_passwd_is_refused(tmp_path, elsewhere):
    path = _save_external(_model(), tmp_path / "model")
    _rewrite_external(path, "w", location="/etc/passwd")
    with pytest.raises(SepifyError) as err:
        load_model(path)
    _assert_one_line(err.value, str(path), "'w'")


@pytest.mark.parametrize("location", ["../w.bin", "sub/../../w.bin", "..\\w.bin", "sub/../w.bin"])
def test_external_location_with_dotdot_is_refused(tmp_path, elsewhere, location):
    folder = tmp_path / "model"
    path = _save_external(_model(), folder)
    (tmp_path / "w.bin").write_bytes((folder / "w.bin").read_bytes())
    (folder / "sub").mkdir()
    _rewrite_external(path, "w", location=location)
    with pytest.raises(SepifyError) as err:
        load_model(path)
    _assert_one_line(err.value, str(path), "'w'")


def test_external_location_symlink_leaving_the_folder_is_refused(tmp_path, elsewhere):
    folder = tmp_path / "model"
    path = _save_external(_model(), folder, location="data.bin")
    outside = tmp_path / "outside.bin"
    outside.write_bytes((folder / "data.bin").read_bytes())
    (folder / "w.bin").symlink_to(outside)
    _rewrite_external(path, "w", location="w.bin")
    with pytest.raises(SepifyError) as err:
        load_model(path)
    _assert_one_line(err.value, str(path), "'w'")


def test_external_location_through_symlinked_subfolder_leaving_the_folder_is_refused(tmp_path, elsewhere):
    folder = tmp_path / "model"
    path = _save_external(_model(), folder)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "w.bin").write_bytes((folder / "w.bin").read_bytes())
    (folder / "link").symlink_to(tmp_path / "out", target_is_directory=True)
    _rewrite_external(path, "w", location="link/w.bin")
    with pytest.raises(SepifyError) as err:
        load_model(path)
    _assert_one_line(err.value, str(path), "'w'")


def test_missing_external_file_is_refused(tmp_path, elsewhere):
    path = _save_external(_model(), tmp_path / "model")
    (tmp_path / "model" / "w.bin").unlink()
    with pytest.raises(SepifyError) as err:
        load_model(path)
    _assert_one_line(err.value, str(path), "w.bin")


def test_truncated_external_file_is_refused(tmp_path, elsewhere):
    path = _save_external(_model(), tmp_path / "model")
    data = (tmp_path / "model" / "w.bin").read_bytes()
    (tmp_path / "model" / "w.bin").write_bytes(data[: len(data) - 10])  # cuts into "b" (the last tensor)
    with pytest.raises(SepifyError) as err:
        load_model(path)
    _assert_one_line(err.value, str(path), "'b'")


def test_external_length_disagreeing_with_dims_is_refused(tmp_path, elsewhere):
    path = _save_external(_model(), tmp_path / "model")
    _rewrite_external(path, "w", length="16")
    with pytest.raises(SepifyError) as err:
        load_model(path)
    _assert_one_line(err.value, str(path), "'w'")


@pytest.mark.parametrize("entries", [
    {"offset": "abc"},
    {"offset": "-4"},
    {"length": "abc"},
    {"location": "w\x00.bin"},
], ids=["offset-not-int", "offset-negative", "length-not-int", "location-nul-byte"])
def test_malformed_external_data_entries_are_refused(tmp_path, elsewhere, entries):
    path = _save_external(_model(), tmp_path / "model")
    _rewrite_external(path, "w", **entries)
    with pytest.raises(SepifyError) as err:
        load_model(path)
    _assert_one_line(err.value, str(path))


def test_external_dims_bomb_is_refused_without_reading(tmp_path, elsewhere):
    path = _save_external(_model(), tmp_path / "model")
    model = onnx.load(str(path), load_external_data=False)
    w = next(t for t in model.graph.initializer if t.name == "w")
    del w.dims[:]
    w.dims.extend([100000, 100000, 3, 3])
    for e in list(w.external_data):
        if e.key == "length":
            w.external_data.remove(e)
    path.write_bytes(model.SerializeToString())
    with pytest.raises(SepifyError) as err:
        load_model(path)
    _assert_one_line(err.value, str(path), "'w'")


# ----------------------------------------------------------------------------------------------
# Memory bombs
# ----------------------------------------------------------------------------------------------
def _bomb(model: onnx.ModelProto, tensor: onnx.TensorProto) -> None:
    del tensor.dims[:]
    tensor.dims.extend([100000, 100000, 100, 3])  # 1.2e13 bytes declared


@pytest.mark.parametrize("source", ["proto", "bytes", "path"])
def test_dims_far_larger_than_raw_data_are_refused_without_allocating(tmp_path, source):
    model = _model()
    _bomb(model, next(t for t in model.graph.initializer if t.name == "w"))
    path = tmp_path / "bomb.onnx"
    path.write_bytes(model.SerializeToString())
    src = {"proto": model, "bytes": model.SerializeToString(), "path": path}[source]
    tracemalloc.start()
    try:
        with pytest.raises(SepifyError) as err:
            sepify.audit(src)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20, f"refusing the bomb allocated {peak} bytes"
    _assert_one_line(err.value, "'w'", *([str(path)] if source == "path" else []))


def test_dims_far_larger_than_float_data_are_refused():
    model = _model()
    w = next(t for t in model.graph.initializer if t.name == "w")
    values = numpy_helper.to_array(w).ravel().tolist()
    w.ClearField("raw_data")
    w.float_data.extend(values)
    assert load_model(model).model is model  # consistent typed data loads
    _bomb(model, w)
    with pytest.raises(SepifyError) as err:
        load_model(model)
    _assert_one_line(err.value, "'w'")


def test_bomb_in_a_constant_node_inside_a_subgraph_is_refused():
    big = numpy_helper.from_array(rand([4, 3, 3, 3]), "big")
    del big.dims[:]
    big.dims.extend([100000, 100000, 100, 3])
    then_graph = helper.make_graph(
        [helper.make_node("Constant", [], ["wc"], name="c", value=big),
         helper.make_node("Conv", ["x", "wc"], ["t_y"], name="conv")],
        "then", [], [vi("t_y", None)])
    else_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["e_y"], name="id")], "else", [],
                                   [vi("e_y", None)])
    model = make_model([helper.make_node("If", ["cond"], ["y"], name="myif", then_branch=then_graph,
                                         else_branch=else_graph)],
                       [vi("x", [1, 3, 8, 8]), vi("cond", [], TensorProto.BOOL)], [vi("y", None)], check=False)
    tracemalloc.start()
    try:
        with pytest.raises(SepifyError) as err:
            sepify.audit(model)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20
    _assert_one_line(err.value, "'big'")


def test_sparse_constant_bomb_does_not_crash():
    """A sparse Constant weight declaring petabytes of dense data: refuse it (or leave it
    unmaterialized) — never an uncaught MemoryError."""
    values = numpy_helper.from_array(np.ones(2, np.float32), "v")
    indices = numpy_helper.from_array(np.array([0, 5], np.int64), "i")
    sparse = helper.make_sparse_tensor(values, indices, [10**7, 10**7, 3, 3])
    nodes = [helper.make_node("Constant", [], ["w"], name="c", sparse_value=sparse),
             helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    model = make_model(nodes, [vi("x", [1, 10**7, 8, 8])], [vi("y", [1, 10**7, 6, 6])])
    try:
        report = sepify.audit(model)
    except SepifyError as exc:
        _assert_one_line(exc)
    else:
        assert report.nodes[0].separability is None


def test_initializer_with_undefined_data_type_is_refused():
    model = _model()
    t = model.graph.initializer.add()
    t.name = "undefined"
    t.data_type = TensorProto.UNDEFINED
    t.dims.extend([2])
    with pytest.raises(SepifyError) as err:
        load_model(model)
    _assert_one_line(err.value)


# ----------------------------------------------------------------------------------------------
# Not a (valid, supported) model
# ----------------------------------------------------------------------------------------------
def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = _model().SerializeToString()
    files = {
        "empty": b"",
        "random_bytes": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "truncated_model": good[: len(good) // 2],
        "json_text": json.dumps({"ir_version": 10, "graph": {"node": []}}).encode(),
        "tensor_proto": numpy_helper.from_array(rand([4, 3, 3, 3]), "t").SerializeToString(),
        # an unnamed tensor even parses as a ModelProto (dims land in ir_version) — but has no graph
        "tensor_proto_unnamed": numpy_helper.from_array(rand([4, 3, 3, 3])).SerializeToString(),
    }
    checker_fail = _model()
    checker_fail.graph.node[0].input[0] = "not_defined_anywhere"
    files["fails_checker"] = checker_fail.SerializeToString()
    unknown_op = _model()
    unknown_op.graph.node.append(helper.make_node("NotARealOp", ["y"], ["z"], name="bogus"))
    files["unknown_op"] = unknown_op.SerializeToString()
    opset99 = _model()
    opset99.opset_import[0].version = 99
    files["opset_99"] = opset99.SerializeToString()
    ir99 = _model()
    ir99.ir_version = 99
    files["ir_version_99"] = ir99.SerializeToString()
    paths = {}
    for name, data in files.items():
        p = tmp_path / f"{name}.onnx"
        p.write_bytes(data)
        paths[name] = p
    return paths


BAD_KINDS = ["empty", "random_bytes", "truncated_model", "json_text", "tensor_proto", "tensor_proto_unnamed",
             "fails_checker", "unknown_op", "opset_99", "ir_version_99"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_files_are_refused_with_one_line_naming_the_file(tmp_path, kind):
    path = _bad_files(tmp_path)[kind]
    with pytest.raises(SepifyError) as err:
        load_model(path)
    assert isinstance(err.value, ModelLoadError)
    _assert_one_line(err.value, str(path))
    with pytest.raises(SepifyError):
        sepify.audit(str(path))


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_bytes_are_refused(tmp_path, kind):
    data = _bad_files(tmp_path)[kind].read_bytes()
    with pytest.raises(SepifyError) as err:
        load_model(data)
    _assert_one_line(err.value)


@pytest.mark.parametrize("kind", ["fails_checker", "unknown_op", "opset_99", "ir_version_99"])
def test_bad_modelprotos_are_refused(tmp_path, kind):
    model = onnx.load_from_string(_bad_files(tmp_path)[kind].read_bytes())
    with pytest.raises(SepifyError) as err:
        load_model(model)
    _assert_one_line(err.value)


def test_version_messages_say_what_is_wrong(tmp_path):
    paths = _bad_files(tmp_path)
    with pytest.raises(SepifyError, match="99"):
        load_model(paths["opset_99"])
    with pytest.raises(SepifyError, match="99"):
        load_model(paths["ir_version_99"])


def test_directory_is_refused(tmp_path):
    folder = tmp_path / "folder.onnx"
    folder.mkdir()
    with pytest.raises(SepifyError) as err:
        load_model(folder)
    _assert_one_line(err.value, str(folder))


def test_missing_path_is_refused(tmp_path):
    missing = tmp_path / "nope.onnx"
    with pytest.raises(SepifyError) as err:
        load_model(missing)
    _assert_one_line(err.value, str(missing))
    with pytest.raises(SepifyError):
        load_model(str(missing))


def test_file_over_protobuf_limit_is_refused_without_reading(tmp_path):
    big = tmp_path / "huge.onnx"
    with open(big, "wb") as f:
        f.truncate(2**31 + 16)  # sparse: no disk space used
    tracemalloc.start()
    try:
        with pytest.raises(SepifyError) as err:
            load_model(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20
    _assert_one_line(err.value, str(big))


@pytest.mark.skipif(not os.path.exists("/dev/zero") or sys.platform != "linux", reason="needs /dev/zero")
def test_endless_device_file_is_refused_not_read_forever():
    """A path that is not a regular file (/dev/zero, a FIFO) must be refused, not read until memory runs out."""
    code = textwrap.dedent("""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))
        from sepify.errors import SepifyError
        from sepify.model.load import load_model
        try:
            load_model("/dev/zero")
        except SepifyError as exc:
            print("REFUSED", exc)
            sys.exit(0)
        except MemoryError:
            print("MEMORYERROR")
            sys.exit(1)
        print("LOADED")
        sys.exit(1)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("REFUSED"), proc.stdout + proc.stderr[-300:]
    assert "/dev/zero" in proc.stdout


# ----------------------------------------------------------------------------------------------
# Input shapes
# ----------------------------------------------------------------------------------------------
def test_unresolvable_symbolic_spatial_dim_names_the_input(tmp_path):
    model = make_conv_model(["N", 3, "H", "W"], [4, 3, 3, 3], y_shape=["N", 4, "OH", "OW"])
    path = tmp_path / "sym.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ShapeError) as err:
        sepify.audit(path)
    msg = _assert_one_line(err.value, "'x'")
    assert "--input-shape" in msg or "input_shapes" in msg
    # giving the dims resolves it
    assert sepify.audit(path, input_shapes={"x": [1, 3, 8, 8]}).nodes[0].macs == 1 * 4 * 6 * 6 * 3 * 3 * 3


@pytest.mark.parametrize("shapes", [{"nope": [1, 3, 8, 8]}, ["nope=1x3x8x8"], {"w": [4, 3, 3, 3]}])
def test_input_shapes_naming_a_non_input_raise(shapes):
    model = make_conv_model([1, 3, 8, 8], [4, 3, 3, 3])
    with pytest.raises(SepifyError) as err:
        sepify.audit(model, input_shapes=shapes)
    assert isinstance(err.value, UsageError)
    _assert_one_line(err.value, "not a graph input")


@pytest.mark.parametrize("shapes,match", [
    ({"x": [1, 3, 8]}, "rank"),
    ({"x": [1, 4, 8, 8]}, "fixed"),
    (["x=1x3x0x8"], "positive"),
    (["x=1x3xAx8"], "x=1x3xAx8"),
    (["x="], "x="),
])
def test_bad_input_shapes_raise(shapes, match):
    model = make_conv_model(["N", 3, 8, 8], [4, 3, 3, 3], y_shape=["N", 4, 6, 6])
    with pytest.raises(SepifyError, match=match) as err:
        sepify.audit(model, input_shapes=shapes)
    _assert_one_line(err.value)


def test_unnamed_input_shape_needs_a_single_input():
    nodes = [helper.make_node("Add", ["a", "b"], ["s"], name="add"),
             helper.make_node("Conv", ["s", "w"], ["y"], name="conv")]
    model = make_model(nodes, [vi("a", ["N", 3, 8, 8]), vi("b", ["N", 3, 8, 8])], [vi("y", ["N", 4, 6, 6])],
                       [init("w", rand([4, 3, 3, 3]))])
    with pytest.raises(UsageError):
        sepify.audit(model, input_shapes=["2x3x8x8"])
    assert sepify.audit(model, input_shapes=["a=2x3x8x8"]).nodes[0].input_shape == [2, 3, 8, 8]


def test_external_data_inside_an_if_branch_loads_from_any_working_directory(tmp_path, monkeypatch):
    # The checker runs on a light copy; external tensors in subgraphs must not send it looking
    # for their files in the working directory.
    then_graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w_sub"], ["t_y"], name="conv", pads=[1, 1, 1, 1])], "then_body", [],
        [vi("t_y", [1, 4, 8, 8])], [init("w_sub", rand([4, 3, 3, 3], 3))])
    else_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["e_y"])], "else_body", [],
                                   [vi("e_y", [1, 3, 8, 8])])
    model = make_model([helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_graph,
                                         else_branch=else_graph)],
                       [vi("x", [1, 3, 8, 8]), vi("c", [], TensorProto.BOOL)], [vi("y", ["a", "b", "h", "w"])])
    path = tmp_path / "m" / "m.onnx"
    path.parent.mkdir()
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="m.bin",
              size_threshold=0)
    stored = onnx.load(path, load_external_data=False)
    branch_weights = [t for a in stored.graph.node[0].attribute for t in a.g.initializer]
    assert [t.data_location for t in branch_weights] == [TensorProto.EXTERNAL]
    monkeypatch.chdir(tmp_path)
    report = sepify.audit(str(path))
    assert report.node("branch/then_branch/conv").macs == 4 * 8 * 8 * 3 * 9


def test_light_copy_for_the_checker_keeps_each_tensor_rank():
    from sepify.model.load import iter_all_tensors, light_copy

    model = make_conv_model([1, 4, 8, 8], [8, 4, 3, 3])
    copy = light_copy(model, checkable=True)
    big = [t for t in iter_all_tensors(copy) if t.name in {x.name for x in model.graph.initializer}
           and len(t.dims) == 4]
    assert big and all(list(t.dims) == [1, 1, 1, 1] and len(t.raw_data) == 4 for t in big)
    onnx.checker.check_model(copy.SerializeToString())


def test_light_copy_for_shape_inference_stubs_large_float_constants_only():
    """Weights written as Constant nodes (Paddle's exporters) are stubbed to their dims in the copy
    that shape inference serializes round after round; integer constants (shape values) and small ones
    keep their data, the model itself is not touched, and the audit is the same as with initializers."""
    from sepify.model.load import light_copy

    w, b = rand([16, 8, 3, 3]), rand([16], 1)
    target = np.array([1, -1], np.int64)
    nodes = [helper.make_node("Constant", [], ["w"], name="cw", value=numpy_helper.from_array(w, "w")),
             helper.make_node("Constant", [], ["b"], name="cb", value=numpy_helper.from_array(b, "b")),
             helper.make_node("Constant", [], ["shape"], name="cs", value=numpy_helper.from_array(target, "shape")),
             helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "shape"], ["y"], name="flat")]
    model = make_model(nodes, [vi("x", [1, 8, 8, 8])], [vi("y", [1, 1024])])
    before = model.SerializeToString()
    copy = light_copy(model, constants=True)
    values = {n.name: n.attribute[0].t for n in copy.graph.node if n.op_type == "Constant"}
    assert list(values["cw"].dims) == [16, 8, 3, 3] and not values["cw"].raw_data and not values["cw"].float_data
    assert values["cw"].data_type == TensorProto.FLOAT and values["cw"].name == "w"
    np.testing.assert_array_equal(numpy_helper.to_array(values["cb"]), b)  # 64 bytes: kept
    np.testing.assert_array_equal(numpy_helper.to_array(values["cs"]), target)
    assert model.SerializeToString() == before
    assert light_copy(model).graph.node[0].attribute[0].t.raw_data  # not unless asked
    as_constants = sepify.audit(model)
    with_inits = make_model(nodes[2:], [vi("x", [1, 8, 8, 8])], [vi("y", [1, 1024])], [init("w", w), init("b", b)])
    assert as_constants.nodes[0].macs == sepify.audit(with_inits).nodes[0].macs == 8 * 8 * 16 * 8 * 9
    assert as_constants.nodes[0].output_shape == [1, 16, 8, 8]


# ----------------------------------------------------------------------------------------------
# Convs inside model-local functions (modules exported as functions): inlined, then seen
# ----------------------------------------------------------------------------------------------
def _function_model(weights: list[np.ndarray]) -> onnx.ModelProto:
    """``X → Outer(ConvBlock) → … → Act → Y``: each conv inside ``pkg.ConvBlock`` (Conv with pads,
    then ``pkg.Act``), called through ``pkg.Outer`` once per weight; ``pkg.Act`` holds no conv."""
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("pkg", 1)]
    act = helper.make_function("pkg", "Act", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])], opsets)
    block = helper.make_function("pkg", "ConvBlock", ["x", "w"], ["y"], [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Act", ["c"], ["y"], domain="pkg")], opsets)
    outer = helper.make_function("pkg", "Outer", ["x", "w"], ["y"],
                                 [helper.make_node("ConvBlock", ["x", "w"], ["y"], domain="pkg")], opsets)
    nodes, prev = [], "X"
    for i in range(len(weights)):
        nodes.append(helper.make_node("Outer", [prev, f"W{i}"], [f"h{i}"], domain="pkg", name=f"call{i}"))
        prev = f"h{i}"
    nodes.append(helper.make_node("Act", [prev], ["Y"], domain="pkg", name="final_act"))
    c = weights[-1].shape[0]
    graph = helper.make_graph(nodes, "g", [vi("X", [1, weights[0].shape[1], 12, 12])], [vi("Y", [1, c, 12, 12])],
                              [init(f"W{i}", w) for i, w in enumerate(weights)])
    model = helper.make_model(graph, opset_imports=opsets, functions=[act, block, outer])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _separable(c_out: int, c_in: int, seed: int) -> np.ndarray:
    """``W[n, c] = P[n, c]·D[c]``: one 3×3 filter per input channel, mixed pointwise — exactly a
    depthwise conv then a 1×1 conv (dw-pw at rank 1)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((c_out, c_in, 1, 1)) * rng.standard_normal((1, c_in, 3, 3))).astype(np.float32)


def test_convs_inside_local_functions_are_counted_after_inlining():
    model = _function_model([rand([8, 4, 3, 3], 1), rand([6, 8, 3, 3], 2)])
    report = sepify.audit(model)
    assert [n.op_type for n in report.nodes] == ["Conv", "Conv"]
    assert [n.kernel_shape for n in report.nodes] == [[3, 3], [3, 3]]
    assert report.nodes[0].macs == 12 * 12 * 8 * 4 * 9 and report.nodes[1].macs == 12 * 12 * 6 * 8 * 9
    assert any("inlined 2 model-local function(s)" in w and "pkg.ConvBlock" in w for w in report.warnings)
    loaded = load_model(model)
    # only the functions holding a conv (directly or by a call) are inlined; the caller's proto is untouched
    assert [f.name for f in loaded.model.functions] == ["Act"]
    assert [f.name for f in model.functions] == ["Act", "ConvBlock", "Outer"]
    assert loaded.as_given is model


def test_exact_rewrite_of_convs_inside_local_functions_matches_onnxruntime(tmp_path):
    model = _function_model([_separable(8, 4, 3), _separable(6, 8, 4)])
    path = tmp_path / "fn.onnx"
    onnx.save(model, str(path))
    out, report = sepify.rewrite(str(path))
    assert len(report.rewritten) == 2 and all(r.scheme == "dw-pw" for r in report.rewritten)
    assert [i.name for i in out.graph.input] == ["X"] and [o.name for o in out.graph.output] == ["Y"]
    feeds = {"X": rand([1, 4, 12, 12], 5)}
    want = ort_run(model, feeds=feeds)["Y"]
    got = ort_run(out, feeds=feeds)["Y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_nothing_to_rewrite_returns_the_given_proto_with_its_functions():
    model = _function_model([rand([8, 4, 3, 3], 1)])  # a dense random kernel: no exact split
    out, report = sepify.rewrite(model)
    assert out is model and not report.rewritten


def test_an_inliner_refusal_is_a_note_not_a_failure(monkeypatch):
    from onnx import inliner

    def refuse(*a, **k):
        raise RuntimeError("cannot inline\nsecond line")

    monkeypatch.setattr(inliner, "inline_selected_functions", refuse)
    report = sepify.audit(_function_model([rand([8, 4, 3, 3], 1)]))
    assert report.nodes == []
    assert any("were not examined" in w and "cannot inline second line" in w for w in report.warnings)
