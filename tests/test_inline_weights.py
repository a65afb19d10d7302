"""Weights read in place from the model file's bytes (``sepify.model.inline``).

A view must be exactly what protobuf parsed — same dtype, dims and bytes as ``numpy_helper.to_array`` —
or not be made at all (the proto's copy is used): repeated names, a ``raw_data`` field stored twice
(protobuf keeps the last), typed-field tensors, external data.  It must never be writable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import sepify
from sepify.model.graph import GraphView
from sepify.model.inline import InlineWeights, _raw_spans
from sepify.model.load import load_model

from conftest import init, make_conv_model, make_model, rand, vi

SAMPLES = sorted((Path(__file__).resolve().parent.parent / "sample_models").glob("*.onnx"))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _model_bytes(model: onnx.ModelProto, extra_initializers: list[bytes]) -> bytes:
    """``model`` serialized with serialized TensorProtos appended to its graph's initializers
    (protobuf merges the fields of a message however they are split; repeated fields append)."""
    graph = model.graph.SerializeToString() + b"".join(_field(5, t) for t in extra_initializers)
    rest = onnx.ModelProto()
    rest.CopyFrom(model)
    rest.ClearField("graph")
    return rest.SerializeToString() + _field(7, graph)


def _every_dtype_model() -> onnx.ModelProto:
    model = make_conv_model([1, 3, 8, 8], [4, 3, 3, 3], bias=True, pads=[1, 1, 1, 1])
    extra = [
        init("f16", rand([5, 7]).astype(np.float16)),
        init("f64", rand([3]).astype(np.float64)),
        init("i8", np.arange(-5, 6, dtype=np.int8)),
        init("i64", np.array([1, -2, 3 << 40], dtype=np.int64)),
        init("flag", np.array([True, False, True])),
        init("empty", np.zeros((0, 3), np.float32)),
        init("scalar", np.array(2.5, np.float32)),
        helper.make_tensor("typed", TensorProto.FLOAT, [2, 2], [1.0, 2.0, 3.0, 4.0]),  # float_data, no raw_data
    ]
    model.graph.initializer.extend(extra)
    return model


def _root(a: np.ndarray):
    """The object an array's memory belongs to."""
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return a


def _check_views(loaded) -> int:
    """Every main-graph initializer's view (where one is made) equals protobuf's copy; the number made."""
    made = 0
    for t in loaded.model.graph.initializer:
        view = loaded.inline.array(t)
        if view is None:
            continue
        want = numpy_helper.to_array(t)
        assert view.dtype == want.dtype and view.shape == want.shape, t.name
        assert view.tobytes() == want.tobytes(), t.name
        assert not view.flags.writeable and _root(view) is loaded.inline.data, t.name
        assert loaded.inline.nbytes(t) == want.nbytes, t.name
        made += 1
    return made


def test_views_equal_protobufs_copies_for_every_stored_type(tmp_path):
    model = _every_dtype_model()
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    loaded = load_model(path, inline=True)
    assert _check_views(loaded) == len(model.graph.initializer) - 1
    typed = next(t for t in loaded.model.graph.initializer if t.name == "typed")
    assert loaded.inline.array(typed) is None and loaded.inline.nbytes(typed) is None
    assert load_model(path).inline is None  # only on request: the bytes are not kept otherwise


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_sample_models_views_and_audits_match_the_copies(sample):
    loaded = load_model(sample, inline=True)
    assert _check_views(loaded) > 0
    by_view = sepify.audit(sample).to_dict()  # the audit reads views of the file
    by_copy = sepify.audit(onnx.load(str(sample))).to_dict()  # a ModelProto: copies
    by_view.pop("model"), by_copy.pop("model")
    assert by_view == by_copy


def test_repeated_names_and_raw_data_stored_twice_are_copied_not_viewed():
    model = make_conv_model([1, 3, 8, 8], [4, 3, 3, 3], pads=[1, 1, 1, 1])
    w = next(t for t in model.graph.initializer if t.name == "w")
    first = numpy_helper.to_array(w)
    # A second raw_data field in the same tensor: protobuf keeps the last one.
    last = (first * 2).astype(np.float32)
    model.graph.initializer.remove(w)
    twice = w.SerializeToString() + _field(9, last.tobytes())
    # The same name twice: the graph view takes the last initializer of that name.
    dup_a, dup_b = init("dup", np.ones(3, np.float32)), init("dup", np.full(3, 7.0, np.float32))
    data = _model_bytes(model, [twice, dup_a.SerializeToString(), dup_b.SerializeToString()])
    assert set(_raw_spans(data)) == set()  # neither is indexed
    loaded = load_model(data, inline=True, check=False)  # the ONNX checker refuses the repeated name
    view = GraphView(loaded.model, loaded.inline)
    np.testing.assert_array_equal(view.constant("w").value, last)
    np.testing.assert_array_equal(view.constant("dup").value, np.full(3, 7.0, np.float32))


def test_field_order_inside_a_tensor_does_not_matter():
    model = make_conv_model([1, 3, 8, 8], [4, 3, 3, 3], pads=[1, 1, 1, 1])
    w = next(t for t in model.graph.initializer if t.name == "w")
    value = numpy_helper.to_array(w)
    model.graph.initializer.remove(w)
    # raw_data before the name and the dims (serializers write fields in number order; others need not)
    reordered = (_field(9, value.tobytes()) + _field(8, b"w") + _varint(2 << 3) + _varint(TensorProto.FLOAT)
                 + b"".join(_varint(1 << 3) + _varint(d) for d in value.shape))
    loaded = load_model(_model_bytes(model, [reordered]), inline=True)
    got = GraphView(loaded.model, loaded.inline).constant("w").value
    assert _root(got) is loaded.inline.data  # it is the view
    np.testing.assert_array_equal(got, value)


@pytest.mark.parametrize("junk", [b"", b"\xff" * 12, b"\x3a\x7f" + b"\x00" * 10, b"\x0b\x00"])
def test_bytes_the_walker_cannot_follow_make_no_views(junk):
    assert InlineWeights.of(junk) is None


def test_external_data_is_not_viewed(tmp_path):
    model = make_conv_model([1, 3, 8, 8], [4, 3, 3, 3], pads=[1, 1, 1, 1])
    path = tmp_path / "m.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # save_model converts the proto it is given
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin",
                    size_threshold=0)
    loaded = load_model(path, inline=True)
    assert loaded.inline is None or all(loaded.inline.array(t) is None for t in loaded.model.graph.initializer)
    want = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w"))
    got = GraphView(loaded.model, loaded.inline).constant("w").value
    np.testing.assert_array_equal(got, want)


def test_a_subgraph_initializer_of_the_same_name_is_not_confused_with_the_main_ones():
    # The then-branch holds its own "w"; the main graph's "w" is another tensor.
    inner_w = rand([4, 3, 3, 3], seed=5)
    then_graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["t_y"], name="inner", pads=[1, 1, 1, 1])],
                                   "then", [], [vi("t_y", None)], [init("w", inner_w)])
    else_graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["e_y"], name="outer_w", pads=[1, 1, 1, 1])],
                                   "else", [], [vi("e_y", None)])
    main_w = rand([4, 3, 3, 3], seed=6)
    model = make_model([helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_graph, else_branch=else_graph)],
                       [vi("x", [1, 3, 8, 8]), vi("c", [], TensorProto.BOOL)], [vi("y", [1, 4, 8, 8])],
                       [init("w", main_w)])
    loaded = load_model(model.SerializeToString(), inline=True)
    view = GraphView(loaded.model, loaded.inline)
    by_name = {r.name: r for r in view.nodes}
    inner, outer = view.constant("w", by_name["inner"]).value, view.constant("w", by_name["outer_w"]).value
    np.testing.assert_array_equal(inner, inner_w)
    assert _root(inner) is not loaded.inline.data  # a subgraph's initializer: copied out of the proto
    np.testing.assert_array_equal(outer, main_w)
    assert _root(outer) is loaded.inline.data  # the main graph's, seen from a branch: the view


def test_the_audit_reads_its_weights_as_views(tmp_path):
    from sepify.pipeline.analysis import analyze_model, check_weight

    path = tmp_path / "m.onnx"
    path.write_bytes(make_conv_model([1, 8, 8, 8], [16, 8, 3, 3], bias=True, pads=[1, 1, 1, 1]).SerializeToString())
    an = analyze_model(path, inline=True)
    weight = check_weight(an.view, an.specs[0]).weight
    assert _root(weight) is an.loaded.inline.data
    copied = analyze_model(path)
    assert copied.loaded.inline is None
    np.testing.assert_array_equal(check_weight(copied.view, copied.specs[0]).weight, weight)
