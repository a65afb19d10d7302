"""Static shapes for every tensor a cost needs.

Order of trust:
1. graph inputs: fixed dims from the model, symbolic dims from the user's
   ``--input-shape`` (or the documented default: a symbolic *leading* dim is the
   batch and becomes 1); any other unresolved dim is an error naming the input;
2. ONNX shape inference (with data propagation) on a weight-less copy;
3. for tensors still unknown: one onnxruntime run at those input shapes,
   exposing only the tensors that are needed.

Each shape remembers how it was obtained (``"model"``, ``"inferred"``, ``"onnxruntime"``).

Inputs given a fixed value (``--input-value NAME=V``) are fed that value instead of a random
one wherever sepify runs the model (the onnxruntime fallback here, ``verify``, ``bench``,
random calibration data): a model may branch on an input's value (an ``If`` on a sample
rate), and only the branch that runs gets shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto

from ..errors import ParameterError, ShapeError, UsageError
from .graph import GraphView
from .walk import iter_graphs
from .load import PROTOBUF_LIMIT, light_copy
from .session import ort_message, ort_session

DEFAULT_BATCH = 1


def parse_input_shape(spec: str) -> tuple[str | None, list[int]]:
    """Parse ``NAME=1x3x224x224`` (or just ``1x3x224x224`` for single-input models)."""
    name, sep, dims = spec.rpartition("=")
    if not sep:
        name, dims = None, spec
    text = dims.strip().lower().replace(",", "x").replace("*", "x")
    if not re.fullmatch(r"\d+(x\d+)*", text):
        raise ParameterError("input_shapes", spec, "expected NAME=D1xD2x… with positive integers")
    values = [int(v) for v in text.split("x")]
    if any(v <= 0 for v in values):
        raise ParameterError("input_shapes", spec, "dims must be positive")
    return (name or None), values


def normalize_input_shapes(
    shapes: Mapping[str, Sequence[int]] | Iterable[str] | None, input_names: Sequence[str]
) -> dict[str, list[int]]:
    if shapes is None:
        return {}
    result: dict[str, list[int]] = {}
    items = shapes.items() if isinstance(shapes, Mapping) else (parse_input_shape(s) for s in shapes)
    for name, dims in items:
        if name is None:
            if len(input_names) != 1:
                raise ParameterError("input_shapes", "x".join(map(str, dims)), "a shape without NAME= needs a model "
                                     "with exactly one input; "
                                 f"inputs are {', '.join(input_names)}")
            name = input_names[0]
        if name not in input_names:
            raise ParameterError("input_shapes", name, "not a graph input "
                             f"(inputs: {', '.join(input_names) or 'none'})")
        result[name] = [int(d) for d in dims]
    return result


@dataclass
class ShapeTable:
    shapes: dict[str, list[int]] = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    input_dtypes: dict[str, int] = field(default_factory=dict)
    input_values: dict[str, np.ndarray] = field(default_factory=dict)  # fixed feeds (--input-value)

    def get(self, name: str) -> list[int] | None:
        return self.shapes.get(name)

    def set(self, name: str, dims: Sequence[int], source: str, dtype: int | None = None) -> None:
        self.shapes[name] = [int(d) for d in dims]
        self.source[name] = source
        if dtype:
            self.dtypes[name] = dtype


def _static_dims(type_proto: onnx.TypeProto) -> list[int] | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    dims = []
    for d in type_proto.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value >= 0:
            dims.append(d.dim_value)
        else:
            return None
    return dims


def resolve_input_shapes(view: GraphView, user: Mapping[str, Sequence[int]]) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Concrete dims for every main-graph input, or a ShapeError naming the input."""
    symbols: dict[str, int] = {}
    inputs = view.main_inputs
    # Dims named by a symbol the user fixed on one input apply to every input using that symbol.
    for vi in inputs:
        if vi.name in user and vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            for d, value in zip(vi.type.tensor_type.shape.dim, user[vi.name]):
                if d.dim_param:
                    symbols.setdefault(d.dim_param, value)
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, int] = {}
    for vi in inputs:
        if not vi.type.HasField("tensor_type"):
            continue  # sequences/maps: nothing to cost
        tt = vi.type.tensor_type
        dtypes[vi.name] = tt.elem_type
        declared = list(tt.shape.dim) if tt.HasField("shape") else None
        if vi.name in user:
            given = user[vi.name]
            if declared is not None:
                if len(declared) != len(given):
                    raise ShapeError(f"input {vi.name!r} has rank {len(declared)}, "
                                     f"but the given shape has {len(given)} dims")
                for axis, (d, value) in enumerate(zip(declared, given)):
                    if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != value:
                        raise ShapeError(f"input {vi.name!r} dim {axis} is fixed at {d.dim_value}, "
                                         f"but the given shape says {value}")
            shapes[vi.name] = list(given)
            continue
        if declared is None:
            raise ShapeError(f"input {vi.name!r} has no declared shape; give its shape "
                             f"(input_shapes; CLI: --input-shape {vi.name}=D1xD2x…)")
        dims = []
        for axis, d in enumerate(declared):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            elif d.dim_param and d.dim_param in symbols:
                dims.append(symbols[d.dim_param])
            elif axis == 0:
                dims.append(DEFAULT_BATCH)
            else:
                label = f"{d.dim_param!r}" if d.dim_param else "unknown"
                raise ShapeError(
                    f"input {vi.name!r} has an unresolved dim {axis} ({label}); "
                    f"give its shape (input_shapes; CLI: --input-shape {vi.name}=" + "x".join(
                        str(x.dim_value) if x.HasField("dim_value") and x.dim_value > 0 else ("1" if i == 0 else "N")
                        for i, x in enumerate(declared)
                    ) + ")"
                )
        shapes[vi.name] = dims
    return shapes, dtypes


# ---------------------------------------------------------------------------------------------
# Fixed input values: --input-value NAME=V (a scalar) or NAME=V1,V2,… (every element)
# ---------------------------------------------------------------------------------------------
_BOOL_TEXT = {"0": False, "1": True, "false": False, "true": True}
_VALUE_KINDS = "biufO"  # bool, integers, floats, strings (onnx maps STRING to object)


def parse_input_value(spec: str) -> tuple[str, list[str]]:
    """Parse ``NAME=V`` or ``NAME=V1,V2,…``; the values stay text until the input's dtype is known."""
    if not isinstance(spec, str):
        raise UsageError(f"input values: expected NAME=V strings or a mapping, got {type(spec).__name__}")
    name, sep, text = spec.rpartition("=")
    name = name.strip()
    items = [t.strip() for t in text.split(",")]
    if not sep or not name or not all(items):
        raise ParameterError("input_values", spec, "expected NAME=V or NAME=V1,V2,… (e.g. sr=16000)")
    return name, items


def normalize_input_values(values, input_names: Sequence[str]) -> dict[str, object]:
    """``{name: value}`` from a mapping (values: numbers, lists, arrays) or ``NAME=V`` strings;
    every name must be a graph input, and named once."""
    if values is None:
        return {}
    if isinstance(values, str):
        values = [values]
    items = list(values.items()) if isinstance(values, Mapping) else [parse_input_value(s) for s in values]
    result: dict[str, object] = {}
    for name, value in items:
        if name not in input_names:
            raise ParameterError("input_values", name, "not a graph input "
                             f"(inputs: {', '.join(input_names) or 'none'})")
        if name in result:
            raise ParameterError("input_values", name, "given twice")
        result[name] = value
    return result


def _spec(name: str, value) -> str:
    if isinstance(value, str) or isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        text = value if isinstance(value, str) else ",".join(value)
    else:
        flat = np.asarray(value).reshape(-1)
        text = ",".join(str(v) for v in flat[:8].tolist()) + (",…" if flat.size > 8 else "")
    return f"{name}={text if len(text) <= 60 else text[:57] + '…'}"


def _type_name(elem_type: int) -> str:
    try:
        return TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return str(elem_type)


def cast_input_value(name: str, value, elem_type: int) -> np.ndarray:
    """``value`` as a flat array of the input's ONNX dtype, or a UsageError saying why it does not fit.

    Text items (from the command line) are parsed for the dtype: integers (``16000``, also ``1e3``),
    floats, ``0``/``1``/``true``/``false`` for bool; numbers and arrays (Python API) must be
    representable exactly (no fractional value into an integer input, nothing out of range).
    """
    label = _type_name(elem_type)
    spec = _spec(name, value)
    try:
        np_dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:  # noqa: BLE001 - element types numpy cannot hold
        np_dtype = None
    if np_dtype is None or np_dtype.kind not in _VALUE_KINDS:
        raise ParameterError("input_values", spec, f"input {name!r} is {label}; fixed values need a bool, integer, "
                         "float or string input")
    texts = None
    if isinstance(value, str):
        texts = [t.strip() for t in value.split(",")]  # as on the command line
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        texts = list(value)
    elif isinstance(value, np.ndarray) and value.dtype.kind in "US":
        texts = [str(v) for v in value.reshape(-1)]
    if np_dtype.kind == "O":  # string input: the text (or the number's text) as it is
        return np.array(texts if texts is not None else [str(v) for v in np.asarray(value).reshape(-1).tolist()],
                        dtype=object)
    if texts is not None:
        arr = _parse_texts(name, spec, texts, np_dtype, label)
    else:
        try:
            arr = np.asarray(value).reshape(-1)
        except Exception:  # noqa: BLE001 - ragged lists and other shapes numpy refuses
            arr = np.asarray([None])
        if arr.dtype.kind not in "biuf":
            raise ParameterError("input_values", spec, f"input {name!r} is {label}; give numbers")
    if arr.size == 0:
        raise ParameterError("input_values", spec, "no values")
    if np_dtype.kind == "b":
        if arr.dtype.kind != "b" and not np.all((arr == 0) | (arr == 1)):
            raise ParameterError("input_values", spec, f"input {name!r} is bool; give 0, 1, true or false")
        return arr.astype(np.bool_)
    if np_dtype.kind in "iu":
        if arr.dtype.kind == "f":
            bad = arr[~np.isfinite(arr) | (arr != np.round(arr))]
            if bad.size:
                raise ParameterError("input_values", spec, f"input {name!r} is {label}; {bad[0]:g} is not an integer")
        info = np.iinfo(np_dtype)
        lo, hi = arr.min(), arr.max()
        lo, hi = (int(lo), int(hi)) if arr.dtype.kind != "f" else (float(lo), float(hi))
        if lo < info.min or hi > info.max:
            raise ParameterError("input_values", spec, f"input {name!r} is {label}; "
                             f"{lo if lo < info.min else hi} is out of its range [{info.min}, {info.max}]")
        return arr.astype(np_dtype)
    with np.errstate(over="ignore"):
        out = arr.astype(np_dtype)
    overflow = np.isinf(out) & np.isfinite(arr.astype(np.float64))
    if overflow.any():
        raise ParameterError("input_values", spec, f"input {name!r} is {label}; {arr[overflow][0]:g} is out of its range")
    return out


def _parse_texts(name: str, spec: str, texts: Sequence[str], np_dtype: np.dtype, label: str) -> np.ndarray:
    if np_dtype.kind == "b":
        try:
            return np.array([_BOOL_TEXT[t.strip().lower()] for t in texts], dtype=np.bool_)
        except KeyError as exc:
            raise ParameterError("input_values", spec, f"input {name!r} is bool; give 0, 1, true or false "
                             f"(got {exc.args[0]!r})") from None
    if np_dtype.kind in "iu":
        ints = []
        for t in texts:
            try:
                ints.append(int(t))
                continue
            except ValueError:
                pass
            try:
                f = float(t)
            except ValueError:
                raise ParameterError("input_values", spec, f"input {name!r} is {label}; {t!r} is not a number") from None
            if not np.isfinite(f) or f != int(f):
                raise ParameterError("input_values", spec, f"input {name!r} is {label}; {t!r} is not an integer")
            ints.append(int(f))
        info = np.iinfo(np_dtype)
        bad = next((v for v in ints if not info.min <= v <= info.max), None)
        if bad is not None:
            raise ParameterError("input_values", spec, f"input {name!r} is {label}; "
                             f"{bad} is out of its range [{info.min}, {info.max}]")
        return np.array(ints, dtype=np_dtype)
    try:
        return np.array([float(t) for t in texts], dtype=np.float64)
    except ValueError:
        bad = next(t for t in texts if not _is_float(t))
        raise ParameterError("input_values", spec, f"input {name!r} is {label}; {bad!r} is not a number") from None


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def shape_input_value(name: str, flat: np.ndarray, dims: Sequence[int], spec: str | None = None) -> np.ndarray:
    """``flat`` at the input's shape: one value fills it, otherwise the counts must match."""
    dims = [int(d) for d in dims]
    count = int(np.prod(dims)) if dims else 1
    if flat.size == 1:
        return np.full(dims, flat.reshape(-1)[0], dtype=flat.dtype)
    if flat.size == count:
        return flat.reshape(dims)
    shape = "x".join(map(str, dims)) if dims else "scalar"
    raise ParameterError("input_values", spec or name, f"input {name!r} has shape {shape} ({count} element(s)), "
                     f"but {flat.size} values are given (one value fills every element)")


def _elem_types(view: GraphView) -> dict[str, int]:
    return {i.name: i.type.tensor_type.elem_type for i in view.main_inputs if i.type.HasField("tensor_type")}


def cast_input_values(view: GraphView, values) -> dict[str, np.ndarray]:
    """The user's values, names checked and cast to each input's dtype (flat; no shapes needed)."""
    names = [i.name for i in view.main_inputs]
    user = normalize_input_values(values, names)
    types = _elem_types(view)
    out = {}
    for name, value in user.items():
        if name not in types:
            raise ParameterError("input_values", name, f"input {name!r} is not a tensor")
        out[name] = cast_input_value(name, value, types[name])
    return out


def resolve_input_values(view: GraphView, values, shapes: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
    """The user's values as feeds: cast to each input's dtype and shaped to its resolved ``shapes``."""
    user = normalize_input_values(values, [i.name for i in view.main_inputs])
    cast = cast_input_values(view, user)
    return {name: shape_input_value(name, flat, shapes[name], _spec(name, user[name])) for name, flat in cast.items()}


def describe_input_values(values: Mapping[str, np.ndarray]) -> str:
    """``sr=16000, ids=1,2,3`` (a constant array shows its one value)."""
    parts = []
    for name, value in values.items():
        flat = np.asarray(value).reshape(-1)
        if flat.size and np.all(flat == flat[0]):
            flat = flat[:1]
        parts.append(_spec(name, flat))
    return ", ".join(parts)


def input_values_record(values: Mapping[str, np.ndarray]) -> dict[str, object]:
    """The fixed feeds as JSON-ready values: one number (or string, bool) when every element holds
    it (a scalar fill), else the flat list of elements — what ``--input-value NAME=V[,V…]`` takes."""
    out: dict[str, object] = {}
    for name, value in values.items():
        flat = np.asarray(value).reshape(-1)
        if flat.size and np.all(flat == flat[0]):
            out[name] = flat[:1].tolist()[0]  # a Python number, bool or str
        else:
            out[name] = flat.tolist()
    return out


def check_values_agree(feeds: Mapping[str, np.ndarray], values: Mapping[str, np.ndarray], source: str) -> None:
    """Given inputs (an .npz, calibration data) win over ``--input-value``: a value given for an input
    they hold must be what they hold (one value: every element; a list: every stacked copy)."""
    for name, value in values.items():
        if name not in feeds:
            continue
        feed, flat = np.asarray(feeds[name]), np.asarray(value).reshape(-1)
        try:
            same = bool(np.all(feed == flat[0])) if flat.size == 1 else (
                feed.size % flat.size == 0 and bool(np.all(feed.reshape(-1, flat.size) == flat)))
        except (TypeError, ValueError):
            same = False
        if not same:
            raise ParameterError("input_values", _spec(name, flat), f"{source} holds other values for input {name!r}; "
                                 "the given inputs are used: drop the fixed value or change the data")


def _onnx_inference(copy: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(copy, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort; onnxruntime fills the gaps
        try:
            return onnx.shape_inference.infer_shapes(copy, check_type=False, strict_mode=False, data_prop=False)
        except Exception:  # noqa: BLE001
            return copy


_SIZED_OPS = ("Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "Gemm", "MatMul", "MatMulInteger", "QLinearMatMul")


def _wanted(view: GraphView) -> set[str]:
    """The tensors a cost needs: the operands and outputs of the main graph's convs and products."""
    return {t for ref in view.nodes if not ref.scope and ref.op_type in _SIZED_OPS
            for t in (*ref.node.input[:2], *ref.node.output[:1]) if t}


def _shape_only_copy(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """The model with fixed input dims and large weights reduced to dims (cheap to copy and infer)."""
    copy = light_copy(model, constants=True)
    for vi in copy.graph.input:
        if vi.name in input_shapes:
            shape = vi.type.tensor_type.shape
            shape.ClearField("dim")
            for d in input_shapes[vi.name]:
                shape.dim.add().dim_value = int(d)
    return copy


FOLD_ROUNDS = 3  # rounds of shape-value folding after onnx's inference (each may size more tensors)
FOLD_MAX_ELEMENTS = 64  # a folded shape value is a short vector (a Reshape target, a Slice bound)


def _record(table: ShapeTable, inferred: onnx.ModelProto) -> int:
    """Copy the static shapes onnx inferred into ``table`` (not over inputs and initializers);
    returns how many tensors were newly sized."""
    new = 0
    for g in iter_graphs(inferred.graph):
        for vi in [*g.value_info, *g.output, *g.input]:
            if vi.name in table.shapes and table.source[vi.name] in ("input", "model"):
                continue
            dims = _static_dims(vi.type)
            if dims is not None:
                new += vi.name not in table.shapes
                table.set(vi.name, dims, "inferred", vi.type.tensor_type.elem_type)
            elif vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                table.dtypes.setdefault(vi.name, vi.type.tensor_type.elem_type)
    return new


def _fold_shape_values(copy: onnx.ModelProto, table: ShapeTable) -> bool:
    """Make the values that only depend on now-known shapes constants of ``copy`` (main graph):
    ``Shape``/``Size`` of a tensor whose dims are known, and what the ops after them compute
    (``Gather``, ``Div``, ``Cast``, ``Concat``, … — PyTorch's exporter builds Reshape targets this
    way, and onnx's data propagation stops at ops such as ``Div``).  The folded tensors become
    initializers and their producers are dropped, so another round of onnx's inference sizes what
    reads them instead of an onnxruntime run.  Returns whether anything was folded."""
    graph = copy.graph
    known: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Shape", "Size") or not node.input:
            continue
        dims = table.get(node.input[0])
        if dims is None:
            continue
        if node.op_type == "Size":
            known[node.output[0]] = np.array(int(np.prod(dims)), np.int64)
            continue
        start, end = 0, len(dims)
        for a in node.attribute:
            if a.name == "start":
                start = a.i
            elif a.name == "end":
                end = a.i
        known[node.output[0]] = np.array(list(dims)[slice(start, end)], np.int64)
    if not known:
        return False
    inits = {t.name for t in graph.initializer}
    _as_initializers(copy, known)
    graph_outputs = {o.name for o in graph.output}
    view = GraphView(copy)
    # Every small value that folds now, read by a node that is not folded itself.  (The copy's
    # weights are stubs: a value computed from them fails to fold and stays unknown.)
    more: dict[str, np.ndarray] = {}
    for node in graph.node:
        for name in node.input:
            if not name or name in inits or name in known or name in more or name in graph_outputs:
                continue
            producer = view.producer.get(name)
            if producer is None or producer.scope:
                continue
            try:
                const = view.constant(name)
            except Exception:  # noqa: BLE001 - a value the reference evaluator cannot compute stays unknown
                const = None
            if const is not None and np.asarray(const.value).size <= FOLD_MAX_ELEMENTS:
                more[name] = np.asarray(const.value)
    _as_initializers(copy, more)
    return True


def _as_initializers(model: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> None:
    """``values`` become initializers of ``model``'s main graph (changed in place), and the nodes
    that wrote them are dropped."""
    graph = model.graph
    graph.initializer.extend(onnx.numpy_helper.from_array(v, name) for name, v in values.items())
    kept = [n for n in graph.node if not any(o in values for o in n.output)]
    del graph.node[:]
    graph.node.extend(kept)


def infer_shapes(view: GraphView, input_shapes: Mapping[str, Sequence[int]], input_dtypes: Mapping[str, int],
                 input_values: Mapping[str, np.ndarray] | None = None) -> ShapeTable:
    table = ShapeTable(input_shapes={k: list(v) for k, v in input_shapes.items()}, input_dtypes=dict(input_dtypes),
                       input_values=dict(input_values or {}))
    for name, dims in input_shapes.items():
        table.set(name, dims, "input", input_dtypes.get(name))
    model = view.model
    # Initializers' dims are known without inference.
    for g in iter_graphs(model.graph):
        for t in g.initializer:
            table.set(t.name, t.dims, "model", t.data_type)
    copy = _shape_only_copy(model, input_shapes)
    inferred = _onnx_inference(copy)
    _record(table, inferred)
    wanted = _wanted(view)
    for _ in range(FOLD_ROUNDS):  # while a conv or product is unsized and folding sizes more
        if all(t in table.shapes for t in wanted) or not _fold_shape_values(copy, table):
            break
        if not _record(table, _onnx_inference(copy)):
            break
    for g in iter_graphs(inferred.graph):
        for node in g.node:
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value":
                        table.set(node.output[0], a.t.dims, "model", a.t.data_type)
    return table


def random_inputs(shapes: Mapping[str, Sequence[int]], dtypes: Mapping[str, int], seed: int = 0,
                  values: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Seeded inputs by dtype: floats ~ N(0, 1), integers in [0, 10), booleans fair coins.

    ``values`` (from :func:`resolve_input_values`) replace the random arrays of those inputs; the
    others get the same random arrays as without them.
    """
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, dims in shapes.items():
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtypes.get(name, TensorProto.FLOAT))
        if np.issubdtype(np_dtype, np.floating):
            feeds[name] = rng.standard_normal(dims).astype(np_dtype)
        elif np_dtype == np.bool_:
            feeds[name] = rng.integers(0, 2, size=dims).astype(np.bool_)
        elif np.issubdtype(np_dtype, np.integer):
            feeds[name] = rng.integers(0, 10, size=dims).astype(np_dtype)
        else:
            feeds[name] = np.zeros(dims, dtype=np_dtype)
    for name, value in (values or {}).items():
        feeds[name] = value
    return feeds


def _run_probe(session, table: ShapeTable, outputs: Sequence[str] | None):
    """One run of a probe session on seeded inputs at the resolved shapes (the fixed
    ``table.input_values`` for those inputs)."""
    accepted = {i.name for i in session.get_inputs()}
    feeds = {k: v for k, v in random_inputs(table.input_shapes, table.input_dtypes, values=table.input_values).items()
             if k in accepted}
    return session.run(outputs, feeds)


def _probe_run(view: GraphView, table: ShapeTable, outputs: Sequence[str] | None, profile_prefix: str | None = None):
    """One quiet, unoptimized CPU run (node names kept); returns the session and the requested outputs."""
    session = ort_session(view.model, outputs or (), spinning=None, optimization="disable", log_severity=4,
                          profile_prefix=profile_prefix)  # quiet: sepify reports failures itself
    return session, _run_probe(session, table, outputs)


class ProbeError(Exception):
    """The onnxruntime shape probe could not run the model (``loaded``: False when onnxruntime
    refused the model itself, True when the run failed at these inputs)."""

    def __init__(self, message: str, loaded: bool):
        super().__init__(message)
        self.loaded = loaded


def fill_with_onnxruntime(view: GraphView, table: ShapeTable, needed: Iterable[str], *,
                          override: bool = False) -> list[str]:
    """Run the model once to read the shapes still missing (with ``override``, also those the table
    holds from inference: onnxruntime's executed shapes win).  Returns the names it could not fill;
    raises :class:`ProbeError` when onnxruntime cannot load or run the model."""
    main_tensors = {o for n in view.model.graph.node for o in n.output} | {i.name for i in view.main_inputs}
    missing = [n for n in dict.fromkeys(needed) if n and (override or n not in table.shapes)]
    runnable = [n for n in missing if n in main_tensors]
    if not runnable or view.model.ByteSize() > PROTOBUF_LIMIT:
        return [n for n in missing if n not in table.shapes]
    try:
        session = ort_session(view.model, runnable, spinning=None, optimization="disable", log_severity=4)
    except Exception as exc:  # noqa: BLE001 - e.g. an operator onnxruntime does not implement
        raise ProbeError(str(exc), loaded=False) from None
    try:
        values = _run_probe(session, table, runnable)
    except Exception as exc:  # noqa: BLE001 - the run failed at these input shapes / values
        raise ProbeError(ort_message(exc), loaded=True) from None
    for name, value in zip(runnable, values):
        table.set(name, np.asarray(value).shape, "onnxruntime")
    return [n for n in missing if n not in table.shapes]


_KERNEL_EVENT = re.compile(r'"name" ?: ?"((?:[^"\\]|\\.)*)_kernel_time"')


def _profile_events(path: str, names: set[str]) -> list[dict]:
    """The kernel events of the nodes ``names`` in an onnxruntime profile, up to the first of each
    that has both its input and output shapes.
    onnxruntime writes one event per line; a Loop body's nodes log one event per iteration, so a
    table-recognition decoder's profile held 40 MB of them, and decoding all of it took 1.6 s of a
    2.8 s audit.  Only the lines of wanted nodes are decoded here (the whole file where its layout
    is not one event per line)."""
    import json

    with open(path) as fh:
        first = fh.readline()
        if first.strip() != "[":
            return json.loads(first + fh.read())
        events, todo = [], set(names)
        for line in fh:
            found = _KERNEL_EVENT.search(line)
            if found is None:
                continue
            name = found.group(1)
            if "\\" in name:
                name = json.loads(f'"{name}"')
            if name not in todo:
                continue
            event = json.loads(line.rstrip().rstrip(","))
            events.append(event)
            args = event.get("args", {})
            if "input_type_shape" in args and "output_type_shape" in args:
                todo.discard(name)  # later iterations of a Loop body: the first one sized it
                if not todo:
                    break
    return events


def fill_from_profile(view: GraphView, table: ShapeTable, refs) -> None:
    """Read the shapes of nodes that no output can expose (inside If/Loop/Scan bodies) from one
    profiled onnxruntime run: the profiler records every executed node's input/output shapes.

    Only named nodes can be matched, and only executed branches are seen.
    """
    counts: dict[str, int] = {}
    for r in view.nodes:
        counts[r.node.name] = counts.get(r.node.name, 0) + 1
    # The profiler names nodes without their scope: only names used once can be trusted.
    wanted = {r.node.name: r for r in refs if r.node.name and counts.get(r.node.name) == 1}
    if not wanted or view.model.ByteSize() > PROTOBUF_LIMIT:
        return
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            session, _ = _probe_run(view, table, None, os.path.join(tmp, "shapes"))
            events = _profile_events(session.end_profiling(), set(wanted))
        except Exception:  # noqa: BLE001 - best effort, callers report what stays unknown
            return
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        ref = wanted.get(name[: -len("_kernel_time")])
        if ref is None:
            continue
        args = event.get("args", {})
        for tensors, key in ((ref.node.input, "input_type_shape"), (ref.node.output, "output_type_shape")):
            for tensor, entry in zip(tensors, args.get(key, [])):
                dims = next(iter(entry.values()), None) if isinstance(entry, dict) else None
                if tensor and dims is not None and tensor not in table.shapes:
                    table.set(tensor, dims, "onnxruntime")
