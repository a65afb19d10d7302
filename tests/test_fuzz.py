"""Fuzzing the command line with mutated sample models: only clean outcomes may come out.

Hypothesis mutates the bytes of ``sample_models/*.onnx`` (bit flips, truncation, splices from
another sample, inserted and overwritten bytes) and, because most byte mutations stop at the
protobuf parser, also mutates parsed models field by field (Conv attributes, tensor dims and
types, op types, node inputs, declared shapes, versions).  Each mutant goes through
``sepify audit`` and ``sepify rewrite``, which must return 0 or 2 — never 3 (internal error), never
raise — with exactly one ``sepify: error:`` line on exit 2 and no output file left behind.

The example counts are bounded so that the file runs in well under 30 s; they are derandomized
(the same examples every run).  ``SEPIFY_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py`` runs a
longer, randomized campaign.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from sepify.cli import main

SAMPLES = sorted((Path(__file__).resolve().parent.parent / "sample_models").glob("*.onnx"))
SAMPLE_BYTES = [p.read_bytes() for p in SAMPLES]
SAMPLE_MODELS = [onnx.load_from_string(b) for b in SAMPLE_BYTES]

_CAMPAIGN = os.environ.get("SEPIFY_FUZZ_EXAMPLES")


def _settings(default: int):
    return settings(
        max_examples=int(_CAMPAIGN) if _CAMPAIGN else default,
        deadline=None,
        derandomize=not _CAMPAIGN,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


POLICIES = st.sampled_from([[], ["--rank", "1"], ["--tol", "0.5"], ["--budget", "0.5"], ["--scheme", "spatial", "--tol", "0.3"]])


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)  # must not raise
    return code, out.getvalue(), err.getvalue()


def _check_both_commands(data: bytes, policy: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "mutant.onnx"
        src.write_bytes(data)
        dst = Path(tmp) / "out"
        dst.mkdir()
        code, out, err = _run(["audit", str(src), "--format", "json"])
        _check_outcome("audit", code, out, err)
        target = dst / "r.onnx"
        code, out, err = _run(["rewrite", str(src), "-o", str(target), *policy])
        _check_outcome("rewrite", code, out, err)
        left = sorted(p.name for p in dst.iterdir())
        if code == 2:
            assert left == [], f"rewrite failed but left {left}"
        else:
            assert "r.onnx" in left and all(n in ("r.onnx", "r.onnx.data") for n in left), left
        assert src.read_bytes() == data  # the input is never touched


def _check_outcome(command: str, code: int, out: str, err: str) -> None:
    assert code in (0, 2), f"{command}: exit {code}: {err.strip()}"
    assert "Traceback" not in err
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sepify: error: "), err


# ----------------------------------------------------------------------------------------------
# Byte-level mutations
# ----------------------------------------------------------------------------------------------
INTERESTING = [0x00, 0x01, 0x7F, 0x80, 0xFF, 0x08, 0x10, 0x12, 0x1A, 0x22, 0x3A]
MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("splice"), st.integers(0, len(SAMPLES) - 1), st.floats(0, 1), st.integers(1, 256), st.floats(0, 1)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("set"), st.floats(0, 1), st.sampled_from(INTERESTING)),
)


def _at(fraction: float, n: int) -> int:
    return min(int(fraction * n), max(n - 1, 0))


def mutate_bytes(data: bytes, mutations) -> bytes:
    buf = bytearray(data)
    for m in mutations:
        kind = m[0]
        if kind == "flip" and buf:
            buf[_at(m[1], len(buf))] ^= 1 << m[2]
        elif kind == "truncate":
            del buf[int(m[1] * len(buf)):]
        elif kind == "splice":
            other = SAMPLE_BYTES[m[1]]
            start = _at(m[2], len(other))
            at = int(m[4] * len(buf))
            buf[at:at] = other[start:start + m[3]]
        elif kind == "insert":
            at = int(m[1] * len(buf))
            buf[at:at] = m[2]
        elif kind == "set" and buf:
            buf[_at(m[1], len(buf))] = m[2]
    return bytes(buf)


@_settings(200)
@given(sample=st.integers(0, len(SAMPLES) - 1), mutations=st.lists(MUTATION, min_size=1, max_size=4), policy=POLICIES)
def test_mutated_bytes_give_only_clean_outcomes(sample, mutations, policy):
    _check_both_commands(mutate_bytes(SAMPLE_BYTES[sample], mutations), policy)


# ----------------------------------------------------------------------------------------------
# Field-level mutations (what survives the parser and exercises everything after it)
# ----------------------------------------------------------------------------------------------
INTS = st.sampled_from([0, 1, 2, 3, 5, 7, 64, -1, -7, 2**31, -(2**40), 10**9])
CONV_ATTRS = ["strides", "pads", "dilations", "kernel_shape", "output_padding", "group", "auto_pad"]
OP_TYPES = ["Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "Gemm", "MatMul", "Identity", "Relu", "Add",
            "Constant", "Reshape"]


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("g"):
                yield from _graphs(a.g)
            for sub in a.graphs:
                yield from _graphs(sub)


def _mutate_once(model: onnx.ModelProto, draw) -> None:
    graph = draw(st.sampled_from(list(_graphs(model.graph))))
    kind = draw(st.sampled_from(["attr", "dims", "dtype", "op", "input", "shape", "arity", "version", "drop_attr",
                                 "raw_data"]))
    nodes, inits = list(graph.node), list(graph.initializer)
    if kind == "attr" and nodes:
        node = draw(st.sampled_from(nodes))
        name = draw(st.sampled_from(CONV_ATTRS))
        for a in list(node.attribute):
            if a.name == name:
                node.attribute.remove(a)
        if name == "group":
            node.attribute.append(helper.make_attribute(name, draw(INTS)))
        elif name == "auto_pad":
            node.attribute.append(helper.make_attribute(name, draw(st.sampled_from(
                ["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID", "BOGUS", ""]))))
        else:
            node.attribute.append(helper.make_attribute(name, draw(st.lists(INTS, min_size=1, max_size=6))))
    elif kind == "dims" and inits:
        t = draw(st.sampled_from(inits))
        dims = draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, 8, 16, 3 * 3, -1, 10**6]), max_size=5))
        del t.dims[:]
        t.dims.extend(dims)
    elif kind == "dtype" and inits:
        draw(st.sampled_from(inits)).data_type = draw(st.sampled_from([*TensorProto.DataType.values(), 65, 255]))
    elif kind == "op" and nodes:
        draw(st.sampled_from(nodes)).op_type = draw(st.sampled_from(OP_TYPES))
    elif kind == "input" and nodes:
        node = draw(st.sampled_from(nodes))
        names = [n for x in nodes for n in [*x.input, *x.output]] + [t.name for t in inits] + ["", "ghost"]
        if node.input:
            node.input[draw(st.integers(0, len(node.input) - 1))] = draw(st.sampled_from(names))
    elif kind == "shape":
        values = list(graph.input) + list(graph.output) + list(graph.value_info)
        if values:
            dims = draw(st.sampled_from(values)).type.tensor_type.shape.dim
            if dims:
                d = dims[draw(st.integers(0, len(dims) - 1))]
                choice = draw(st.sampled_from(["value", "param", "drop"]))
                if choice == "value":
                    d.dim_value = draw(st.sampled_from([0, 1, 2, 5, 64, 10**9]))
                elif choice == "param":
                    d.dim_param = draw(st.sampled_from(["N", "H", "batch"]))
                else:
                    del dims[len(dims) - 1]
    elif kind == "arity" and nodes:
        node = draw(st.sampled_from(nodes))
        if node.input and draw(st.booleans()):
            del node.input[len(node.input) - 1]
        else:
            node.input.append(draw(st.sampled_from([t.name for t in inits] or ["ghost"])))
    elif kind == "version":
        model.ir_version = draw(st.sampled_from([3, 4, 7, 10, 11, onnx.IR_VERSION, onnx.IR_VERSION + 1]))
        model.opset_import[0].version = draw(st.sampled_from([1, 7, 11, 13, 17, 21, onnx.defs.onnx_opset_version(),
                                                              onnx.defs.onnx_opset_version() + 1]))
    elif kind == "drop_attr" and nodes:
        node = draw(st.sampled_from(nodes))
        if node.attribute:
            del node.attribute[draw(st.integers(0, len(node.attribute) - 1))]
    elif kind == "raw_data" and inits:
        t = draw(st.sampled_from(inits))
        if t.HasField("raw_data"):
            raw = bytearray(t.raw_data)
            cut = draw(st.integers(0, len(raw)))
            t.raw_data = bytes(raw[:cut]) + draw(st.binary(max_size=8))


@_settings(250)
@given(sample=st.integers(0, len(SAMPLES) - 1), n=st.integers(1, 3), policy=POLICIES, data=st.data())
def test_mutated_fields_give_only_clean_outcomes(sample, n, policy, data):
    model = onnx.ModelProto()
    model.CopyFrom(SAMPLE_MODELS[sample])
    for _ in range(n):
        _mutate_once(model, data.draw)
    try:
        blob = model.SerializeToString()
    except Exception:  # noqa: BLE001 - a mutation protobuf itself cannot encode is not an input
        return
    _check_both_commands(blob, policy)


@pytest.mark.parametrize("sample", [p.name for p in SAMPLES])
def test_unmutated_samples_pass_through_the_same_harness(sample):
    """The harness itself accepts the originals (exit 0, output written)."""
    data = SAMPLE_BYTES[[p.name for p in SAMPLES].index(sample)]
    _check_both_commands(data, [])
