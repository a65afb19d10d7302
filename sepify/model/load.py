"""Load an ONNX model from a path, bytes or a ModelProto — and refuse what cannot be trusted.

Every refusal is a :class:`~sepify.errors.ModelLoadError` with a one-line message
naming the file, so that the CLI can print it and exit with code 2.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Iterator, Union

import onnx
from onnx import TensorProto
from onnx.external_data_helper import ExternalDataInfo

from ..errors import ModelLoadError, ParameterError
from .inline import MAPPABLE as _MAPPABLE, InlineWeights, tensor_nbytes
from .walk import iter_graphs, node_subgraphs

if TYPE_CHECKING:
    import numpy as np

ModelSource = Union[str, os.PathLike, bytes, onnx.ModelProto]

# Protobuf cannot hold more than this in one message; beyond it weights must be external.
PROTOBUF_LIMIT = 2**31 - 1
# External data up to this many bytes is read into the proto (so that the model can be handed to
# onnxruntime as bytes); beyond it, it stays in its files: mapped for reading, streamed when saved.
MAP_EXTERNAL_OVER = PROTOBUF_LIMIT


@dataclass
class LoadedModel:
    """A parsed model plus where it came from (external data resolves against ``base_dir``)."""

    model: onnx.ModelProto
    label: str
    path: Path | None = None
    base_dir: Path | None = None
    has_external_data: bool = False
    external_files: tuple[Path, ...] = ()  # the external data files read (resolved), for save's overwrite guard
    mapped_external: bool = False  # external data left in its files (over MAP_EXTERNAL_OVER bytes), see load_model
    notes: tuple[str, ...] = ()  # what loading changed in the model (functions inlined), for the reports
    original: onnx.ModelProto | None = None  # a caller's ModelProto, when loading changed a copy of it
    inline: InlineWeights | None = None  # the serialized bytes, kept on request (load_model(inline=True))

    @property
    def as_given(self) -> onnx.ModelProto:
        """The model as it was given (what a rewrite with nothing to change returns)."""
        return self.model if self.original is None else self.original


def _error(label: str, message: str) -> ModelLoadError:
    return ModelLoadError(f"{label}: {message}")


@functools.lru_cache(maxsize=None)
def ort_max_ir_version() -> int:
    """The newest IR version the installed onnxruntime accepts (probed once with a tiny model)."""
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    for ir in range(onnx.IR_VERSION, 3, -1):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = ir
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            return ir
        except Exception:  # noqa: BLE001 - the probe only wants to know "does it load"
            continue
    return 7


def ort_max_opset() -> int:
    """Highest default-domain opset the installed onnxruntime implements (as published by onnxruntime)."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as _c  # type: ignore

        return int(getattr(_c, "max_onnx_opset", onnx.defs.onnx_opset_version()))
    except Exception:  # noqa: BLE001
        return onnx.defs.onnx_opset_version()


def iter_all_tensors(model: onnx.ModelProto, *, sparse: bool = True) -> Iterator[TensorProto]:
    """Initializers and tensor attributes, in every (sub)graph — the tensors that can hold weights
    (with ``sparse``, the values of sparse initializers too).  Graph order: a subgraph's tensors
    come where its node's attribute is (the order external data is written in); iterative."""

    def items(graph: onnx.GraphProto):
        yield from graph.initializer
        if sparse:
            for sp in graph.sparse_initializer:
                yield sp.values
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield attr.g
                yield from attr.graphs

    stack = [items(model.graph)]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
        elif isinstance(item, onnx.GraphProto):
            stack.append(items(item))
        else:
            yield item


_TYPED_FIELDS = (
    "float_data",
    "int32_data",
    "int64_data",
    "double_data",
    "uint64_data",
)


def _stored_nbytes(tensor: TensorProto) -> int | None:
    """Bytes of data actually present in the proto (None when it cannot be told, e.g. strings)."""
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    if tensor.data_type == TensorProto.STRING:
        return None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:  # noqa: BLE001 - undefined or unknown element type
        return None
    for field in _TYPED_FIELDS:
        n = len(getattr(tensor, field))
        if n:
            if field == "int32_data" and itemsize < 4:
                # int8/uint8/float16/bool are stored one per int32 element
                return n * itemsize
            if tensor.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128):
                return n * itemsize // 2
            return n * itemsize
    return 0


_KNOWN_TYPES = frozenset(TensorProto.DataType.values()) - {TensorProto.UNDEFINED}


def _check_tensor_types(model: onnx.ModelProto, label: str) -> None:
    """Refuse tensors of an undefined or unknown element type (nothing can size or read them)."""
    for tensor in iter_all_tensors(model):
        if tensor.data_type not in _KNOWN_TYPES:
            kind = "an undefined" if tensor.data_type == TensorProto.UNDEFINED else f"an unknown ({tensor.data_type})"
            raise _error(label, f"tensor {tensor.name!r} has {kind} element type")


def _check_inline_sizes(model: onnx.ModelProto, label: str, inline: InlineWeights | None = None) -> None:
    """Refuse tensors whose declared dims need more bytes than they hold (memory bombs, corruption).
    ``inline``: the main graph's raw-data spans, whose lengths are known without copying the data."""
    main = len(model.graph.initializer)  # iter_all_tensors yields the main graph's initializers first
    for index, tensor in enumerate(iter_all_tensors(model)):
        if tensor.data_location == TensorProto.EXTERNAL:
            continue
        need = tensor_nbytes(tensor)
        have = inline.nbytes(tensor) if inline is not None and index < main else None
        if have is None:
            have = _stored_nbytes(tensor)
        if need is None or have is None:
            continue
        if need < 0:
            raise _error(label, f"tensor {tensor.name!r} has a negative dimension {list(tensor.dims)}")
        if have == 0 and need == 0:
            continue
        if have != need:
            raise _error(
                label,
                f"tensor {tensor.name!r} declares dims {list(tensor.dims)} ({need} bytes) "
                f"but holds {have} bytes of data",
            )


def _is_escaping(location: str) -> bool:
    if not location:
        return True
    if PurePosixPath(location).is_absolute() or PureWindowsPath(location).is_absolute():
        return True
    if PureWindowsPath(location).drive or location.startswith(("/", "\\")):
        return True
    parts = PurePosixPath(location.replace("\\", "/")).parts
    return ".." in parts


@dataclass
class _ExternalRef:
    tensor: TensorProto
    path: str  # resolved, inside the model's folder
    offset: int
    length: int


def _check_external_data(model: onnx.ModelProto, base_dir: Path | None, label: str) -> list[_ExternalRef]:
    """Validate every external-data reference before anything is read. Returns them, resolved."""
    found: list[_ExternalRef] = []
    base_real = os.path.realpath(base_dir) if base_dir is not None else None
    for tensor in iter_all_tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        try:
            info = ExternalDataInfo(tensor)
            location = info.location
            offset = int(info.offset or 0)
            declared_length = int(info.length) if info.length else None
        except (ValueError, TypeError) as exc:
            raise _error(label, f"tensor {tensor.name!r}: malformed external data entry ({exc})") from None
        if "\x00" in location:
            raise _error(label, f"tensor {tensor.name!r}: external data location contains a NUL byte")
        if base_real is None:
            raise _error(label, f"tensor {tensor.name!r} uses external data {location!r}, "
                                "which needs the model to be loaded from a file path")
        if _is_escaping(location):
            raise _error(label, f"tensor {tensor.name!r}: external data location {location!r} "
                                "leaves the model's folder (absolute or '..'); refused")
        full = os.path.realpath(os.path.join(base_real, location))
        if os.path.commonpath([full, base_real]) != base_real:
            raise _error(label, f"tensor {tensor.name!r}: external data {location!r} resolves "
                                "outside the model's folder (symlink); refused")
        if not os.path.isfile(full):
            raise _error(label, f"tensor {tensor.name!r}: external data file {location!r} is missing")
        size = os.path.getsize(full)
        need = tensor_nbytes(tensor)
        length = declared_length if declared_length else (need if need is not None else size - offset)
        if need is not None and need >= 0 and length != need:
            raise _error(label, f"tensor {tensor.name!r} declares dims {list(tensor.dims)} ({need} bytes) "
                                f"but its external data length is {length} bytes")
        if offset < 0 or offset + length > size:
            raise _error(label, f"tensor {tensor.name!r}: external data {location!r} is truncated "
                                f"(needs bytes {offset}..{offset + length}, file has {size})")
        found.append(_ExternalRef(tensor, full, offset, length))
    return found


# Conv-like ops: positions of the weight and bias inputs.
_CONV_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "ConvInteger": (1, None), "QLinearConv": (3, 8)}
_AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")
_INTS_ATTRS = {"kernel_shape": 1, "strides": 1, "dilations": 1, "pads": 0, "output_padding": 0, "output_shape": 0}


def _constant_dims(node: onnx.NodeProto) -> list[int] | None:
    """Dims of a Constant node's value (None for sparse or unknown forms)."""
    for a in node.attribute:
        if a.name == "value" and a.HasField("t"):
            return list(a.t.dims)
        if a.name in ("value_float", "value_int", "value_string"):
            return []
        if a.name in ("value_floats", "value_ints"):
            return [len(a.floats) if a.name == "value_floats" else len(a.ints)]
    return None


def _check_conv_node(node: onnx.NodeProto, dims_of: dict[str, list[int] | None], label: str) -> None:
    """Refuse a Conv-like node whose attributes or constant weight/bias dims break the ONNX spec.

    These are models no runtime can execute (onnxruntime refuses each of them); refusing them
    here, with the node named, spares every later stage from defending against them.  What
    depends on the input's shape (channels, a kernel larger than the padded input) is not
    decided here: the analysis refuses such a node once the shapes are known (sepify.pipeline.analysis).
    """
    op = node.op_type
    who = f"node {node.name!r}" if node.name else f"the {op} node producing {list(node.output)[:1]}"

    def bad(problem: str) -> ModelLoadError:
        return _error(label, f"{who} ({op}): {problem}")

    ints: dict[str, list[int]] = {}
    group = 1
    auto_pad = "NOTSET"
    for a in node.attribute:
        if a.name in _INTS_ATTRS:
            if a.type != onnx.AttributeProto.INTS:
                raise bad(f"attribute {a.name} must be a list of integers")
            ints[a.name] = list(a.ints)
            low = _INTS_ATTRS[a.name]
            if any(v < low for v in a.ints):
                raise bad(f"{a.name} {list(a.ints)} must all be ≥ {low}")
        elif a.name == "group":
            if a.type != onnx.AttributeProto.INT or a.i < 1:
                raise bad(f"group must be a positive integer, not {a.i if a.type == onnx.AttributeProto.INT else '?'}")
            group = a.i
        elif a.name == "auto_pad":
            try:
                auto_pad = a.s.decode("ascii") or "NOTSET"
            except UnicodeDecodeError:
                auto_pad = repr(a.s)
            if a.type != onnx.AttributeProto.STRING or auto_pad not in _AUTO_PADS:
                raise bad(f"auto_pad {auto_pad!r} is not one of {', '.join(_AUTO_PADS)}")
    w_index, b_index = _CONV_INPUTS[op]
    inputs = list(node.input)
    w_dims = dims_of.get(inputs[w_index]) if len(inputs) > w_index and inputs[w_index] else None
    ranks: dict[str, int] = {}
    if w_dims is not None:
        if len(w_dims) < 3:
            raise bad(f"weight {inputs[w_index]!r} has dims {w_dims}; a convolution weight needs at least 3")
        if any(d <= 0 for d in w_dims):
            raise bad(f"weight {inputs[w_index]!r} has dims {w_dims}; every dim must be positive")
        ranks[f"weight {inputs[w_index]!r} (dims {w_dims})"] = len(w_dims) - 2
        if w_dims[0] % group:
            raise bad(f"weight {inputs[w_index]!r} dim 0 ({w_dims[0]}) is not divisible by group {group}")
        if "kernel_shape" in ints and ints["kernel_shape"] != w_dims[2:]:
            raise bad(f"kernel_shape {ints['kernel_shape']} does not match weight {inputs[w_index]!r} dims {w_dims}")
    for key in ("kernel_shape", "strides", "dilations", "output_padding"):
        if key in ints:
            ranks[f"{key} {ints[key]}"] = len(ints[key])
    if "pads" in ints:
        if len(ints["pads"]) % 2:
            raise bad(f"pads {ints['pads']} must hold a begin and an end per spatial axis")
        ranks[f"pads {ints['pads']}"] = len(ints["pads"]) // 2
    if len(set(ranks.values())) > 1:
        raise bad("spatial ranks disagree: " + ", ".join(f"{k} → {v}" for k, v in ranks.items()))
    if ranks and next(iter(ranks.values())) < 1:
        raise bad("a convolution needs at least one spatial axis")
    if w_dims is not None and b_index is not None and len(inputs) > b_index and inputs[b_index]:
        b_dims = dims_of.get(inputs[b_index])
        c_out = w_dims[1] * group if op == "ConvTranspose" else w_dims[0]
        if b_dims is not None and b_dims != [c_out]:
            raise bad(f"bias {inputs[b_index]!r} has dims {b_dims}, expected [{c_out}] (one per output channel)")


def _check_conv_nodes(model: onnx.ModelProto, label: str) -> None:
    """Structural checks of every Conv-like node, in every (sub)graph, with the dims of the constant
    weights visible from its scope."""

    def walk(graph: onnx.GraphProto, outer: dict[str, list[int] | None]) -> None:
        dims_of = dict(outer)
        for vi in graph.input:
            dims_of[vi.name] = None  # a runtime value shadows an outer constant
        for t in graph.initializer:
            dims_of[t.name] = list(t.dims)
        for node in graph.node:
            if node.op_type in _CONV_INPUTS and node.domain in ("", "ai.onnx"):
                _check_conv_node(node, dims_of, label)
            for a in node.attribute:
                for sub in ([a.g] if a.HasField("g") else list(a.graphs)):
                    walk(sub, dims_of)
            const = _constant_dims(node) if node.op_type == "Constant" and node.domain in ("", "ai.onnx") else None
            for out in node.output:
                dims_of[out] = const

    walk(model.graph, {})


def _function_nodes(function: onnx.FunctionProto) -> Iterator[onnx.NodeProto]:
    """A function's nodes and every node of their subgraphs (If/Loop/Scan bodies)."""
    for node in function.node:
        yield node
        for sub in node_subgraphs(node):
            for g in iter_graphs(sub):
                yield from g.node


def _conv_functions(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """The model-local functions that hold a Conv-like node, themselves or through a function they
    call (``(domain, name)``)."""
    funcs = {(f.domain, f.name): f for f in model.functions}
    holds: dict[tuple[str, str], bool] = {}

    def has(key: tuple[str, str], path: frozenset) -> bool:
        if key not in holds:
            holds[key] = any(
                (n.op_type in _CONV_INPUTS and n.domain in ("", "ai.onnx"))
                or ((n.domain, n.op_type) in funcs and (n.domain, n.op_type) not in path
                    and has((n.domain, n.op_type), path | {key}))
                for n in _function_nodes(funcs[key]))
        return holds[key]

    return [k for k in funcs if has(k, frozenset())]


def _inline_conv_functions(model: onnx.ModelProto, label: str, *, copy: bool) -> tuple[onnx.ModelProto, tuple[str, ...]]:
    """The model with every call of a model-local function that holds a conv inlined, and a note.

    Exporters write modules as functions (``torch.onnx.export(export_modules_as_functions=…)``,
    onnxscript): a conv inside one is invisible to a graph walk, so it would be neither counted nor
    rewritten.  onnx's inliner expands those calls (other functions stay as they are); it runs on a
    light copy (the weights are not serialized for it) and the inlined nodes replace the graph's —
    in ``model`` itself, or with ``copy`` (a caller's ModelProto, never modified) in a copy.  When the
    inliner refuses the model, it is kept as it is, with a note that those convs were not examined."""
    ids = _conv_functions(model)
    if not ids:
        return model, ()
    shown = ", ".join(f"{d}.{n}" if d else n for d, n in ids[:4]) + (f" and {len(ids) - 4} more" if len(ids) > 4 else "")
    try:
        from onnx import inliner

        inlined = inliner.inline_selected_functions(light_copy(model), ids)
    except Exception as exc:  # noqa: BLE001 - the inliner's C++ errors
        return model, (f"convs inside model-local functions ({shown}) were not examined: onnx's inliner "
                       f"refused the model ({_first_line(exc)})",)
    out = model
    if copy:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    for field in ("node", "value_info"):
        getattr(out.graph, field).__delitem__(slice(None))
        getattr(out.graph, field).extend(getattr(inlined.graph, field))
    del out.functions[:]
    out.functions.extend(inlined.functions)
    del out.opset_import[:]
    out.opset_import.extend(inlined.opset_import)
    return out, (f"inlined {len(ids)} model-local function(s) holding convs ({shown}): their convs are "
                 "counted and rewritable, and a rewritten model has those calls inlined",)


def _repeated(fd) -> bool:
    is_repeated = getattr(fd, "is_repeated", None)  # protobuf ≥ 5.27; ``label`` before (now gone)
    return bool(is_repeated) if is_repeated is not None else fd.label == fd.LABEL_REPEATED


@functools.lru_cache(maxsize=None)
def _string_fields(descriptor) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(string, repeated string, message, repeated message) field names of a message type."""
    from google.protobuf.descriptor import FieldDescriptor

    groups: tuple[list[str], list[str], list[str], list[str]] = ([], [], [], [])
    for fd in descriptor.fields:
        if fd.type == FieldDescriptor.TYPE_STRING:
            groups[1 if _repeated(fd) else 0].append(fd.name)
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            groups[3 if _repeated(fd) else 2].append(fd.name)
    return tuple(tuple(g) for g in groups)  # type: ignore[return-value]


def _check_strings(message, label: str, where: tuple = ()) -> None:
    """Refuse string fields that are not valid UTF-8 (protobuf hands them over as ``bytes``, which
    every later ``str`` operation trips over).  Only string and message fields are visited, so
    tensor payloads are never touched.  ``where`` is the path so far, spelled out only on error."""
    strings, repeated_strings, messages, repeated_messages = _string_fields(message.DESCRIPTOR)
    for name in strings:
        if isinstance(getattr(message, name), bytes):
            raise _bad_string(label, where, name)
    for name in repeated_strings:
        for i, value in enumerate(getattr(message, name)):
            if isinstance(value, bytes):
                raise _bad_string(label, where, f"{name}[{i}]")
    for name in messages:
        if message.HasField(name):
            _check_strings(getattr(message, name), label, (where, name))
    for name in repeated_messages:
        for i, sub in enumerate(getattr(message, name)):
            _check_strings(sub, label, (where, name, i))


def _bad_string(label: str, where: tuple, field: str) -> ModelLoadError:
    parts = [field]
    while where:
        where, name, *index = where
        parts.append(f"{name}[{index[0]}]" if index else name)
    return _error(label, f"not a valid ONNX model: {'.'.join(['model', *reversed(parts)])} is not valid UTF-8")


def _check_versions(model: onnx.ModelProto, label: str) -> None:
    if model.ir_version > onnx.IR_VERSION:
        raise _error(label, f"IR version {model.ir_version} is newer than this onnx ({onnx.IR_VERSION}) "
                            f"and onnxruntime ({ort_max_ir_version()}) support")
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            newest = onnx.defs.onnx_opset_version()
            if opset.version > newest:
                raise _error(label, f"unsupported opset {opset.version} (this onnx knows up to {newest})")


def _looks_like_model(model: onnx.ModelProto) -> bool:
    return model.ir_version > 0 and model.HasField("graph") and (
        len(model.graph.node) > 0 or len(model.graph.output) > 0
    )


def _parse(data: bytes, label: str) -> onnx.ModelProto:
    if not data:
        raise _error(label, "empty file, not an ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and friends
        raise _error(label, f"not a valid ONNX model (protobuf parse failed: {_first_line(exc)})") from None
    if not _looks_like_model(model):
        raise _error(label, "not an ONNX model (parsed as protobuf, but there is no graph or IR version)")
    _check_strings(model, label)
    return model


MAX_MESSAGE = 300  # characters of a third-party error message quoted in a one-line error


def _first_line(exc: BaseException) -> str:
    """The exception's message on one line (onnx's checker spreads one message over several lines,
    e.g. a node dump), shortened to ``MAX_MESSAGE`` characters."""
    text = " ".join(str(exc).split())
    if not text:
        return type(exc).__name__
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


STUB_OVER_BYTES = 1024  # weights larger than this are stubbed in light copies (see light_copy)


# Element types of float weights (what the audit counts as parameters, what light copies stub in Constants)
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


def light_copy(model: onnx.ModelProto, *, checkable: bool = False, constants: bool = False) -> onnx.ModelProto:
    """The model with every main-graph initializer over :data:`STUB_OVER_BYTES` (or stored
    externally) replaced by a stub of the same name and element type — cheap to copy, serialize,
    check and infer, where copying the whole proto would copy every weight once more.

    Stubs keep their dims and hold no data (shape inference reads only dims), or, with
    ``checkable``, hold one zero element per stub with every dim 1: the ONNX checker insists
    that a tensor's data fills its dims, and everything else it checks does not depend on the
    dims.  Data sizes and external-data locations are checked by :func:`load_model` itself.

    ``constants``: the floating-point values of the main graph's ``Constant`` nodes over the same
    size are stubbed too (dims kept) — weights some exporters (Paddle) write as Constant nodes, 10 MB
    serialized again in each round of shape inference.  Only for copies nothing is taken back from
    (the function inliner keeps the nodes of its copy).
    """
    copy = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(copy, field, getattr(model, field))
    copy.opset_import.extend(model.opset_import)
    copy.functions.extend(model.functions)
    copy.metadata_props.extend(model.metadata_props)
    src, graph = model.graph, copy.graph
    graph.name = src.name
    graph.doc_string = src.doc_string
    graph.node.extend(src.node)
    graph.input.extend(src.input)
    graph.output.extend(src.output)
    graph.value_info.extend(src.value_info)
    graph.quantization_annotation.extend(src.quantization_annotation)
    graph.sparse_initializer.extend(src.sparse_initializer)
    for t in src.initializer:
        # Sized by dims, not by the data (reading raw_data copies it): load_model has checked they agree.
        declared = tensor_nbytes(t)
        big = t.data_location == TensorProto.EXTERNAL or (declared is not None and declared > STUB_OVER_BYTES)
        if not big or t.data_type == TensorProto.STRING:
            graph.initializer.add().CopyFrom(t)
            continue
        stub = graph.initializer.add()
        stub.name = t.name
        stub.data_type = t.data_type
        if t.HasField("doc_string"):
            stub.doc_string = t.doc_string
        if checkable:
            _one_zero_element(stub, len(t.dims))
        else:
            stub.dims.extend(t.dims)
    if constants:
        for node in graph.node:
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
                continue
            for a in node.attribute:
                if a.name != "value" or not a.HasField("t") or a.t.data_type not in FLOAT_TYPES:
                    continue
                declared = tensor_nbytes(a.t)
                if a.t.data_location != TensorProto.EXTERNAL and declared is not None and declared > STUB_OVER_BYTES:
                    dims, dtype, name = list(a.t.dims), a.t.data_type, a.t.name
                    a.t.Clear()  # the copy's own attribute: the model's node is untouched
                    a.t.data_type, a.t.name = dtype, name
                    a.t.dims.extend(dims)
    if checkable:
        # A graph input or output that declares its element type but no shape (unknown rank) is
        # something onnxruntime runs and exporters write, but the checker wants a shape there;
        # a placeholder shape in this copy lets it check the rest (the copy only feeds the checker).
        for value in list(graph.input) + list(graph.output):
            _placeholder_shapes(value.type)
        # Before IR 4 every initializer had to be a graph input as well; old exporters did not always
        # list them, and onnxruntime runs such models — the copy lists them for the checker.
        if copy.ir_version < 4:
            listed = {i.name for i in graph.input}
            for t in src.initializer:
                if t.name not in listed:
                    graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        # External tensors elsewhere (subgraphs, Constant attributes): the checker would look for
        # their files relative to the working directory; load_model has already checked them.
        for t in iter_all_tensors(copy):
            if t.data_location == TensorProto.EXTERNAL:
                del t.external_data[:]
                t.data_location = TensorProto.DEFAULT
                _one_zero_element(t, len(t.dims))
    return copy


def _placeholder_shapes(tp: onnx.TypeProto) -> None:
    """Give every tensor type inside ``tp`` that has no shape a one-dim symbolic one (for the checker)."""
    kind = tp.WhichOneof("value")
    if kind == "tensor_type" and not tp.tensor_type.HasField("shape"):
        tp.tensor_type.shape.dim.add().dim_param = "unknown_rank"
    elif kind in ("sequence_type", "optional_type"):
        _placeholder_shapes(getattr(tp, kind).elem_type)
    elif kind == "map_type":
        _placeholder_shapes(tp.map_type.value_type)


def _one_zero_element(tensor: TensorProto, rank: int) -> None:
    """Make ``tensor`` hold a single zero element at its rank (every dim 1), in raw data."""
    tensor.ClearField("dims")
    tensor.dims.extend([1] * rank)
    tensor.raw_data = bytes(max(1, tensor_nbytes(tensor) or 1))


def _run_checker(model: onnx.ModelProto, label: str) -> None:
    try:
        # On a light copy: the checker would otherwise parse (or we serialize) every weight once
        # more, which was most of the load time of a 100 MB model.
        onnx.checker.check_model(light_copy(model, checkable=True).SerializeToString())
    except Exception as exc:  # noqa: BLE001 - ValidationError or C++ errors
        raise _error(label, f"fails the ONNX checker: {_first_line(exc)}") from None


def load_model(source: ModelSource, *, load_external: bool = True, check: bool = True,
               inline: bool = False) -> LoadedModel:
    """Load and validate a model.

    ``source`` may be a path, the serialized bytes, or a ``ModelProto`` (used as is,
    never modified).  External data is read from beside the model file; locations that
    are absolute, contain ``..`` or resolve outside that folder are refused.

    External data of up to ``MAP_EXTERNAL_OVER`` bytes (2 GiB) is loaded into the proto.  Beyond
    that (a proto cannot hold it anyway) it stays in its files, and each external tensor's
    location is rewritten *in memory* to the file's absolute path (``mapped_external``):
    :func:`tensor_array` maps such tensors without copying them, and
    :func:`sepify.save.save_model` streams them into the output's data file, so a model is never
    held in memory twice.

    ``inline``: keep the file's bytes (:class:`InlineWeights`) so that the main graph's weights are
    read as views of them (``LoadedModel.inline``) rather than copied out of the proto; for readers
    of every weight that change none (the audit).
    """
    if isinstance(source, onnx.ModelProto):
        label = "<ModelProto>"
        model = source
        _check_strings(model, label)
        _check_versions(model, label)
        _check_tensor_types(model, label)
        has_ext = bool(_check_external_data(model, None, label)) if load_external else False
        _check_inline_sizes(model, label)
        if check:
            _run_checker(model, label)
        given = model
        model, notes = _inline_conv_functions(model, label, copy=True)
        _check_conv_nodes(model, label)
        return LoadedModel(model=model, label=label, has_external_data=has_ext, notes=notes,
                           original=given if model is not given else None)

    if isinstance(source, (bytes, bytearray, memoryview)):
        label = "<bytes>"
        data = bytes(source)
        model = _parse(data, label)
        path = None
        base_dir = None
    else:
        if not isinstance(source, (str, os.PathLike)):
            shown = source if isinstance(source, (int, float)) else f"<{type(source).__name__}>"
            raise ParameterError("model", shown, "expected a path, the model's bytes or an onnx.ModelProto")
        path = Path(os.fspath(source))
        label = str(path)
        if not path.exists():
            raise _error(label, "no such file")
        if path.is_dir():
            raise _error(label, "is a directory, not an ONNX file")
        if not path.is_file():
            raise _error(label, "not a regular file (device, FIFO or socket); refused")
        try:
            size = path.stat().st_size
            if size > PROTOBUF_LIMIT:
                raise _error(label, f"file is {size} bytes, over protobuf's 2 GiB limit; "
                                    "save the weights as external data")
            data = path.read_bytes()
        except PermissionError:
            raise _error(label, "permission denied") from None
        except OSError as exc:
            raise _error(label, f"cannot read: {exc.strerror or exc}") from None
        model = _parse(data, label)
        base_dir = path.resolve().parent

    _check_versions(model, label)
    _check_tensor_types(model, label)
    refs = _check_external_data(model, base_dir, label)
    has_ext = bool(refs)
    weights = InlineWeights.of(data) if inline else None
    _check_inline_sizes(model, label, weights)
    del data
    if check:
        _run_checker(model, label)
    model, notes = _inline_conv_functions(model, label, copy=False)  # parsed here: ours to change
    if notes:
        weights = None  # the graph changed: its initializers are no longer only the file's
    _check_conv_nodes(model, label)
    mapped = False
    if has_ext and load_external:
        if sum(r.length for r in refs) > MAP_EXTERNAL_OVER:
            # Too big for one proto anyway: leave the bytes in the file, point each tensor at it by
            # absolute path (in memory only), and let readers map it (tensor_array) or stream it (save).
            for r in refs:
                _point_at(r)
            mapped = True
        else:
            try:
                onnx.external_data_helper.load_external_data_for_model(model, str(base_dir))
            except Exception as exc:  # noqa: BLE001
                raise _error(label, f"cannot read external data: {_first_line(exc)}") from None
    return LoadedModel(model=model, label=label, path=path, base_dir=base_dir, has_external_data=has_ext,
                       external_files=tuple(Path(f) for f in dict.fromkeys(r.path for r in refs)),
                       mapped_external=mapped, notes=notes, inline=weights)


def _point_at(ref: _ExternalRef) -> None:
    """Make ``ref.tensor``'s external-data entries say exactly where its bytes are (absolute path)."""
    t = ref.tensor
    del t.external_data[:]
    for key, value in (("location", ref.path), ("offset", str(ref.offset)), ("length", str(ref.length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value


def read_external_bytes(tensor: TensorProto) -> bytes:
    """The bytes of a tensor whose external data was pointed at by absolute path (see ``load_model``)."""
    info = ExternalDataInfo(tensor)
    if not os.path.isabs(info.location):
        raise ValueError(f"tensor {tensor.name!r}: external data {info.location!r} is not resolved")
    with open(info.location, "rb") as fh:
        fh.seek(int(info.offset or 0))
        return fh.read(int(info.length)) if info.length else fh.read()


def tensor_array(tensor: TensorProto) -> "np.ndarray":
    """A tensor's value as numpy.  Inline data: ``numpy_helper.to_array``.  External data of a
    memory-mapped model (see ``load_model``): a read-only view of the file (no copy; pages are
    read on first touch and can be dropped again by the OS), or for packed/exotic types a copy."""
    import numpy as np
    from onnx import numpy_helper

    if tensor.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = ExternalDataInfo(tensor)
    shape = tuple(int(d) for d in tensor.dims)
    if tensor.data_type in _MAPPABLE and sys.byteorder == "little" and os.path.isabs(info.location):
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        if 0 in shape:
            return np.zeros(shape, dtype)
        mapped = np.memmap(info.location, dtype=dtype, mode="r", offset=int(info.offset or 0), shape=shape)
        return np.asarray(mapped)  # a plain ndarray view; the map stays alive through .base
    copy = TensorProto()
    copy.CopyFrom(tensor)
    copy.raw_data = read_external_bytes(tensor)
    copy.data_location = TensorProto.DEFAULT
    del copy.external_data[:]
    return numpy_helper.to_array(copy)
