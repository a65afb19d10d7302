"""Stored tensors: their sizes, and the main graph's weights read in place from the serialized model.

Reading ``tensor.raw_data`` from a parsed proto copies the bytes (protobuf hands out a new ``bytes``
each time).  For a reader of every weight that changes none (the audit), the file's own bytes are
kept instead and each main-graph initializer becomes a read-only numpy view of them: a few hundred
fields walked in Python find where each ``raw_data`` lies.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import onnx
from onnx import TensorProto

if TYPE_CHECKING:
    import numpy as np


# numpy dtypes whose in-memory layout is exactly ONNX's raw little-endian layout (memory-mappable)
MAPPABLE = {
    TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT8, TensorProto.INT16,
    TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32,
    TensorProto.UINT64, TensorProto.BOOL, TensorProto.COMPLEX64, TensorProto.COMPLEX128,
}


def tensor_nbytes(tensor: TensorProto) -> int | None:
    """Bytes the tensor's declared dims need, or None for types without a fixed size."""
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:  # noqa: BLE001 - strings, undefined types
        return None
    numel = 1
    for d in tensor.dims:
        if d < 0:
            return -1
        numel *= d
    if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4, getattr(TensorProto, "FLOAT4E2M1", -1)):
        return (numel + 1) // 2
    return numel * itemsize


class _WireError(ValueError):
    pass


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    b = data[pos]
    if b < 0x80:
        return b, pos + 1
    value, shift = b & 0x7F, 7
    while True:
        pos += 1
        b = data[pos]
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos + 1
        shift += 7
        if shift > 63:
            raise _WireError("varint over 10 bytes")


def _wire_fields(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """``(field number, wire type, start, end)`` of each field in ``data[start:end]`` (protobuf wire
    format; a length-delimited field's payload is ``data[start:end]``, other kinds are skipped)."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
            continue
        if wire == 2:
            size, pos = _varint(data, pos)
            if pos + size > end:
                raise _WireError("field runs past its message")
            yield number, wire, pos, pos + size
            pos += size
            continue
        if wire in (1, 5):
            pos += 8 if wire == 1 else 4
            continue
        raise _WireError(f"wire type {wire}")  # groups: not in ONNX's protos
    if pos != end:
        raise _WireError("field runs past its message")


# ModelProto.graph, GraphProto.initializer, TensorProto.name and .raw_data (onnx.proto field numbers)
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_NAME, _TENSOR_RAW = 7, 5, 8, 9


def _raw_spans(data: bytes) -> dict[str, tuple[int, int]]:
    """Where each main-graph initializer's ``raw_data`` lies in the serialized model, by name — for
    the names that occur once, in tensors that hold ``raw_data`` once (protobuf's last-wins merging
    of repeated occurrences is not followed: such tensors are copied out of the proto as usual)."""
    graphs = [(a, b) for number, wire, a, b in _wire_fields(data, 0, len(data)) if number == _MODEL_GRAPH]
    if len(graphs) != 1:
        return {}
    spans: dict[str, tuple[int, int]] = {}
    repeated: set[str] = set()
    for number, _, a, b in _wire_fields(data, *graphs[0]):
        if number != _GRAPH_INITIALIZER:
            continue
        name, raws = None, []
        for field_number, _, c, d in _wire_fields(data, a, b):
            if field_number == _TENSOR_NAME:
                name = data[c:d].decode("utf-8", "surrogateescape")
            elif field_number == _TENSOR_RAW:
                raws.append((c, d))
        if name is None:
            continue
        if name in spans or len(raws) != 1:
            repeated.add(name)
        else:
            spans[name] = raws[0]
    for name in repeated:
        spans.pop(name, None)
    return spans


@dataclass
class InlineWeights:
    """The serialized model a proto was parsed from, and where its main graph's initializers keep
    their ``raw_data`` in it.  Reading ``tensor.raw_data`` from the proto copies the bytes (protobuf
    hands out a new ``bytes`` each time): for a 100 MB ResNet-50 that was ~40 ms of page faults to
    read the weights and ~15 ms more to check their sizes, a seventh of a cold audit.  Here the
    weights are read-only views of the file's bytes instead."""

    data: bytes
    spans: dict[str, tuple[int, int]]

    @classmethod
    def of(cls, data: bytes) -> "InlineWeights | None":
        try:
            spans = _raw_spans(data)
        except (_WireError, IndexError):  # malformed past what protobuf accepted: copy as usual
            return None
        return cls(data, spans) if spans else None

    def nbytes(self, tensor: TensorProto) -> int | None:
        """Bytes of ``raw_data`` of a main-graph initializer (None when not known here)."""
        span = self.spans.get(tensor.name)
        if span is None or not tensor.HasField("raw_data"):
            return None
        return span[1] - span[0]

    def array(self, tensor: TensorProto) -> "np.ndarray | None":
        """A main-graph initializer as a read-only view of the serialized bytes, or None where that is
        not its exact value (not indexed, packed or exotic types, a big-endian machine)."""
        import numpy as np

        span = self.spans.get(tensor.name)
        if (span is None or tensor.data_type not in MAPPABLE or sys.byteorder != "little"
                or tensor.data_location == TensorProto.EXTERNAL or not tensor.HasField("raw_data")
                or span[1] - span[0] != tensor_nbytes(tensor)):
            return None
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        shape = tuple(int(d) for d in tensor.dims)
        return np.frombuffer(self.data, dtype=dtype, count=int(np.prod(shape, dtype=np.int64)),
                             offset=span[0]).reshape(shape)


__all__ = ["MAPPABLE", "InlineWeights", "tensor_nbytes"]
