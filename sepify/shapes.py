"""Static shapes for every tensor a cost needs.

Order of trust:
1. graph inputs: fixed dims from the model, symbolic dims from the user's
   ``--input-shape`` (or the documented default: a symbolic *leading* dim is the
   batch and becomes 1); any other unresolved dim is an error naming the input;
2. ONNX shape inference (with data propagation) on a weight-less copy;
3. for tensors still unknown: one onnxruntime run at those input shapes,
   exposing only the tensors that are needed.

Each shape remembers how it was obtained (``"model"``, ``"inferred"``, ``"onnxruntime"``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto

from .errors import ShapeError, UsageError
from .graph import GraphView, iter_subgraphs
from .load import PROTOBUF_LIMIT, light_copy, ort_max_ir_version

DEFAULT_BATCH = 1


def parse_input_shape(spec: str) -> tuple[str | None, list[int]]:
    """Parse ``NAME=1x3x224x224`` (or just ``1x3x224x224`` for single-input models)."""
    name, sep, dims = spec.rpartition("=")
    if not sep:
        name, dims = None, spec
    text = dims.strip().lower().replace(",", "x").replace("*", "x")
    if not re.fullmatch(r"\d+(x\d+)*", text):
        raise UsageError(f"--input-shape {spec!r}: expected NAME=D1xD2x… with positive integers")
    values = [int(v) for v in text.split("x")]
    if any(v <= 0 for v in values):
        raise UsageError(f"--input-shape {spec!r}: dims must be positive")
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
                raise UsageError("--input-shape without NAME= needs a model with exactly one input; "
                                 f"inputs are {', '.join(input_names)}")
            name = input_names[0]
        if name not in input_names:
            raise UsageError(f"--input-shape names {name!r}, which is not a graph input "
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
                                     f"but --input-shape gives {len(given)} dims")
                for axis, (d, value) in enumerate(zip(declared, given)):
                    if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != value:
                        raise ShapeError(f"input {vi.name!r} dim {axis} is fixed at {d.dim_value}, "
                                         f"but --input-shape gives {value}")
            shapes[vi.name] = list(given)
            continue
        if declared is None:
            raise ShapeError(f"input {vi.name!r} has no declared shape; pass --input-shape {vi.name}=D1xD2x…")
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
                    f"pass --input-shape {vi.name}=" + "x".join(
                        str(x.dim_value) if x.HasField("dim_value") and x.dim_value > 0 else ("1" if i == 0 else "N")
                        for i, x in enumerate(declared)
                    )
                )
        shapes[vi.name] = dims
    return shapes, dtypes


def _shape_only_copy(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """The model with fixed input dims and large weights reduced to dims (cheap to copy and infer)."""
    copy = light_copy(model)
    for vi in copy.graph.input:
        if vi.name in input_shapes:
            shape = vi.type.tensor_type.shape
            shape.ClearField("dim")
            for d in input_shapes[vi.name]:
                shape.dim.add().dim_value = int(d)
    return copy


def infer_shapes(view: GraphView, input_shapes: Mapping[str, Sequence[int]], input_dtypes: Mapping[str, int]) -> ShapeTable:
    table = ShapeTable(input_shapes={k: list(v) for k, v in input_shapes.items()}, input_dtypes=dict(input_dtypes))
    for name, dims in input_shapes.items():
        table.set(name, dims, "input", input_dtypes.get(name))
    model = view.model
    # Initializers' dims are known without inference.
    for t in model.graph.initializer:
        table.set(t.name, t.dims, "model", t.data_type)
    for sub in iter_subgraphs(model.graph):
        for t in sub.initializer:
            table.set(t.name, t.dims, "model", t.data_type)
    copy = _shape_only_copy(model, input_shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(copy, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort; onnxruntime fills the gaps
        try:
            inferred = onnx.shape_inference.infer_shapes(copy, check_type=False, strict_mode=False, data_prop=False)
        except Exception:  # noqa: BLE001
            inferred = copy
    graphs = [inferred.graph, *iter_subgraphs(inferred.graph)]
    for g in graphs:
        for vi in [*g.value_info, *g.output, *g.input]:
            if vi.name in table.shapes and table.source[vi.name] in ("input", "model"):
                continue
            dims = _static_dims(vi.type)
            if dims is not None:
                table.set(vi.name, dims, "inferred", vi.type.tensor_type.elem_type)
            elif vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                table.dtypes.setdefault(vi.name, vi.type.tensor_type.elem_type)
        for node in g.node:
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value":
                        table.set(node.output[0], a.t.dims, "model", a.t.data_type)
    return table


def random_inputs(shapes: Mapping[str, Sequence[int]], dtypes: Mapping[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs by dtype: floats ~ N(0, 1), integers in [0, 10), booleans fair coins."""
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
    return feeds


def ort_session_bytes(model: onnx.ModelProto, extra_outputs: Sequence[str] = ()) -> bytes:
    """Serialize ``model`` for onnxruntime: IR version clamped, extra tensors exposed as outputs.

    The model is restored afterwards, so the caller's proto is unchanged.
    """
    graph = model.graph
    existing = {o.name for o in graph.output}
    added = [n for n in dict.fromkeys(extra_outputs) if n not in existing]
    old_ir = model.ir_version
    for name in added:
        graph.output.add().name = name
    model.ir_version = min(old_ir, ort_max_ir_version())
    try:
        return model.SerializeToString()
    finally:
        model.ir_version = old_ir
        if added:
            del graph.output[len(graph.output) - len(added):]


def _probe_run(view: GraphView, table: ShapeTable, outputs: Sequence[str] | None, profile_prefix: str | None = None):
    """One quiet, unoptimized CPU run (node names kept) on seeded inputs at the resolved shapes.

    Returns the session and the requested outputs; raises whatever onnxruntime raises.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # sepify reports failures itself
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    session = ort.InferenceSession(ort_session_bytes(view.model, outputs or ()), opts,
                                   providers=["CPUExecutionProvider"])
    accepted = {i.name for i in session.get_inputs()}
    feeds = {k: v for k, v in random_inputs(table.input_shapes, table.input_dtypes).items() if k in accepted}
    return session, session.run(outputs, feeds)


def fill_with_onnxruntime(view: GraphView, table: ShapeTable, needed: Iterable[str]) -> list[str]:
    """Run the model once to read the shapes still missing. Returns the names it could not fill."""
    main_tensors = {o for n in view.model.graph.node for o in n.output} | {i.name for i in view.main_inputs}
    missing = [n for n in dict.fromkeys(needed) if n and n not in table.shapes]
    runnable = [n for n in missing if n in main_tensors]
    if not runnable:
        return missing
    if view.model.ByteSize() > PROTOBUF_LIMIT:
        return missing
    try:
        _, values = _probe_run(view, table, runnable)
    except Exception:  # noqa: BLE001 - the fallback is best effort; callers report what stays unknown
        return missing
    for name, value in zip(runnable, values):
        value = np.asarray(value)
        table.set(name, value.shape, "onnxruntime")
    return [n for n in missing if n not in table.shapes]


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
    import json
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            session, _ = _probe_run(view, table, None, os.path.join(tmp, "shapes"))
            with open(session.end_profiling()) as fh:
                events = json.load(fh)
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
