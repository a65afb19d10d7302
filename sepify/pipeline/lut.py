"""The latency table: measured onnxruntime latency of a conv and of its candidate chains, keyed by
the op's geometry, on one machine, onnxruntime version and thread count.

A *candidate* is ``(scheme, variant, rank)``: the chain that scheme builds at that rank, written in
the default lowering.  Its latency is measured on an isolated model — the conv (or the chain) at the
real input shape, with random weights of the real shapes, followed by the activation onnxruntime
fuses into convs when the model has one there — timed as :func:`sepify.pipeline.bench.benchmark`
times models: interleaved rounds, warm runs, threads spinning only within a run.  Latency does not
depend on the weights' values, so a table measured on one model serves every model with the same
layer geometry; ``sepify latency-table MODEL -o lut.json`` measures one on the machine it runs on
(the deployment target) and ``--latency-table lut.json`` plans with it elsewhere.

Tables are cached (``~/.cache/sepify/latency`` or ``$SEPIFY_CACHE``), one file per CPU model,
onnxruntime version and thread count, and reused across runs; measuring a model's candidates only
measures what the table lacks.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..core.geometry import ConvGeometry
from ..core.lowering import lower
from ..core.realization import Realization
from ..core.schemes import get as get_scheme
from ..core.stages import Stage
from ..errors import UsageError
from ..model.load import ort_max_ir_version
from ..serialize import SCHEMA_VERSION
from ..version import __version__
from .bench import time_models
from .emit import emit

DEFAULT_LOWERING = "branches"
MIN_ROUNDS = 8
MAX_ROUNDS = 40
ROUND_BUDGET_S = 1.5  # timed seconds per group of models measured together
GROUP = 12  # candidates timed in one interleaved group (with the original conv)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def op_key(geo: ConvGeometry, dtype: str = "float32", activation: str | None = None, bias: bool = True) -> str:
    """The geometry a latency depends on, as one stable string."""
    dims = "x".join(map(str, geo.in_spatial))
    return (f"conv|b{geo.batch}|c{geo.c_in}|n{geo.c_out}|g{geo.group}|k{'x'.join(map(str, geo.kernel))}"
            f"|s{'x'.join(map(str, geo.strides))}|d{'x'.join(map(str, geo.dilations))}"
            f"|p{','.join(map(str, geo.pads))}|in{dims}|{dtype}|bias{int(bias)}|act={activation or '-'}")


def linear_key(op: str, a_shape: Sequence[int], n: int, dtype: str = "float32", trans_a: bool = False,
               bias: bool = False) -> str:
    """A linear layer's latency key (:func:`linear_model`): its op, data operand shape and outputs."""
    return (f"linear|{op}|a{'x'.join(map(str, a_shape))}|n{n}|tA{int(trans_a)}|{dtype}|bias{int(bias)}")


def candidate_key(scheme: str, variant: str, rank: int, lowering: str | None = None) -> str:
    return f"{scheme}|{variant or '-'}|{rank}|{lowering or DEFAULT_LOWERING}"


@dataclass
class LatencyTable:
    """``entries[op_key] = {"original_us": …, "candidates": {candidate_key: µs}}`` for one machine,
    onnxruntime version and thread count (``meta``)."""

    meta: dict[str, Any]
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    path: Path | None = None
    # whole models measured with the table (sepify latency-table): digest -> {"label", "latency_us"}
    models: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def empty(cls, threads: int | None) -> "LatencyTable":
        return cls({"cpu": cpu_model(), "onnxruntime": ort_version(), "threads": threads, "spinning": "run"})

    def matches(self, threads: int | None) -> bool:
        return (self.meta.get("cpu") == cpu_model() and self.meta.get("onnxruntime") == ort_version()
                and self.meta.get("threads") == threads)

    def original(self, key: str) -> float | None:
        return self.entries.get(key, {}).get("original_us")

    def candidate(self, key: str, cand: str) -> float | None:
        return self.entries.get(key, {}).get("candidates", {}).get(cand)

    def put(self, key: str, original_us: float, candidates: dict[str, float], rounds: int) -> None:
        entry = self.entries.setdefault(key, {"original_us": original_us, "candidates": {}, "rounds": 0})
        # a re-measured original keeps the first figure: candidates measured later are relative to it
        entry.setdefault("original_us", original_us)
        entry["candidates"].update(candidates)
        entry["rounds"] = max(entry.get("rounds", 0), rounds)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "sepify_version": __version__, "meta": self.meta,
                "models": self.models, "entries": dict(sorted(self.entries.items()))}

    def save(self, path: str | os.PathLike | None = None) -> Path:
        from ..model.save import write_text_atomic

        target = Path(path) if path is not None else self.path
        if target is None:
            raise UsageError("latency table: no file to save to")
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(target, json.dumps(self.to_dict(), indent=1))
        self.path = target
        return target

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyTable":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            return cls(dict(data["meta"]), dict(data.get("entries", {})), path, dict(data.get("models", {})))
        except FileNotFoundError:
            raise UsageError(f"{path}: no such latency table") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{path}: not a sepify latency table ({exc})") from None


def cache_dir() -> Path:
    return Path(os.environ.get("SEPIFY_CACHE", Path.home() / ".cache" / "sepify")) / "latency"


def cached_table(threads: int | None) -> LatencyTable:
    """This machine's cached table for ``threads`` (empty when there is none yet)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", cpu_model()).strip("-")[:60]
    path = cache_dir() / f"{slug}_ort{ort_version()}_t{threads or 'default'}.json"
    if path.exists():
        try:
            table = LatencyTable.load(path)
            if table.matches(threads):
                return table
        except UsageError:
            pass  # a damaged cache is measured again
    table = LatencyTable.empty(threads)
    table.path = path
    return table


# Activations onnxruntime fuses into a preceding Conv (ConvActivationFusion, NCHWc).
FUSED_ACTIVATIONS = ("Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "HardSigmoid")


def fused_activation(an, spec):
    """The conv's only consumer when it is an activation onnxruntime fuses into convs (constant extra inputs)."""
    ref = spec.ref
    y = ref.node.output[0]
    users = an.view.consumers.get(y, [])
    if len(users) != 1 or y in {o.name for o in ref.graph.output}:
        return None
    act = users[0]
    if act.op_type not in FUSED_ACTIVATIONS or act.node.domain not in ("", "ai.onnx") or act.graph is not ref.graph:
        return None
    for name in act.node.input[1:]:
        if name and an.view.constant(name, act) is None:
            return None
    return act


# ----------------------------------------------------------------------------------------------
# Isolated models with random weights
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Activation:
    """The activation after a conv that onnxruntime fuses into it (op type, constant inputs, attributes)."""

    op_type: str
    inputs: tuple = ()  # constant extra inputs (Clip min/max) as numpy arrays
    attributes: tuple = ()  # (name, value) pairs

    @property
    def label(self) -> str:
        return self.op_type


def conv_model(geo: ConvGeometry, *, dtype=np.float32, bias: bool = True, activation: Activation | None = None,
               seed: int = 0) -> onnx.ModelProto:
    """``y = act(Conv(x, w, b))`` at ``geo`` with random weights (latency does not depend on their values)."""
    rng = np.random.default_rng(seed)
    np_dtype = np.dtype(dtype)
    elem = helper.np_dtype_to_tensor_dtype(np_dtype)
    w = (rng.standard_normal((geo.c_out, geo.cin_per_group, *geo.kernel)) * 0.1).astype(np_dtype)
    inits = [numpy_helper.from_array(w, "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array((rng.standard_normal(geo.c_out) * 0.1).astype(np_dtype), "b"))
        inputs.append("b")
    nodes = [helper.make_node("Conv", inputs, ["c"], name="conv", kernel_shape=list(geo.kernel), group=geo.group,
                              strides=list(geo.strides), dilations=list(geo.dilations), pads=list(geo.pads))]
    out = "c"
    if activation is not None:
        extra = []
        for k, value in enumerate(activation.inputs):
            name = f"act_in{k}"
            inits.append(numpy_helper.from_array(np.asarray(value), name))
            extra.append(name)
        nodes.append(helper.make_node(activation.op_type, ["c", *extra], ["y"], name="act",
                                      **dict(activation.attributes)))
        out = "y"
    graph = helper.make_graph(nodes, "latency", [helper.make_tensor_value_info("x", elem, [geo.batch, geo.c_in,
                                                                                          *geo.in_spatial])],
                              [helper.make_tensor_value_info(out, elem, [geo.batch, geo.c_out, *geo.out_spatial])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="sepify-latency")
    model.ir_version = min(model.ir_version, ort_max_ir_version())
    return model


def chain_model(original: onnx.ModelProto, geo: ConvGeometry, scheme: str, variant: str, rank: int, *,
                dtype=np.float32, lowering: str | None = None, seed: int = 1, linear: str = "") -> onnx.ModelProto:
    """``original`` (from :func:`conv_model`; with ``linear``, from :func:`linear_model`) with its node
    (``c``'s producer) replaced by the scheme's chain at ``rank`` (random factor weights of the real
    shapes), through the emitter the rewrite uses."""
    rng = np.random.default_rng(seed)
    np_dtype = np.dtype(dtype)
    shapes = get_scheme(scheme).stages(geo, rank, variant)
    stages = [Stage(s.out_channels, s.in_per_group, s.group, s.kernel, s.axes,
                    (rng.standard_normal((s.out_channels, s.in_per_group, *s.kernel)) * 0.1).astype(np_dtype), s.role)
              for s in shapes]
    rz = Realization(node=original.graph.node[0].name, input="x", output="c", replaces=("c",), weight_name="w",
                     geometry=geo, auto_pad="NOTSET", scheme=scheme, variant=variant, rank=rank, chained=False,
                     stages=tuple(stages), lowered=lower(stages, lowering or DEFAULT_LOWERING), weight_error=0.0,
                     planned_error=0.0, source="svd", linear=linear)
    return emit(original, [rz], {})[0]


@dataclass(frozen=True)
class Linear:
    """What a linear layer's latency depends on: op, data operand shape (as given to the op), outputs,
    ``transA`` (Gemm) and whether a bias ``C`` (``[N]``) is added."""

    op: str
    a_shape: tuple
    n: int
    trans_a: bool = False
    bias: bool = False

    @property
    def k(self) -> int:
        return self.a_shape[0] if self.trans_a else self.a_shape[-1]


def linear_model(lin: Linear, *, dtype=np.float32, seed: int = 0) -> onnx.ModelProto:
    """``Y = A·W (+ C)`` — a MatMul or Gemm at ``lin``'s shapes with random weights."""
    rng = np.random.default_rng(seed)
    np_dtype = np.dtype(dtype)
    elem = helper.np_dtype_to_tensor_dtype(np_dtype)
    inits = [numpy_helper.from_array((rng.standard_normal((lin.k, lin.n)) * 0.1).astype(np_dtype), "w")]
    inputs = ["x", "w"]
    if lin.bias:
        inits.append(numpy_helper.from_array((rng.standard_normal(lin.n) * 0.1).astype(np_dtype), "b"))
        inputs.append("b")
    attrs = {"transA": 1} if lin.trans_a else {}
    node = helper.make_node(lin.op, inputs, ["c"], name="linear", **attrs)
    rows = list(lin.a_shape[1:] if lin.trans_a else lin.a_shape[:-1])
    graph = helper.make_graph([node], "latency", [helper.make_tensor_value_info("x", elem, list(lin.a_shape))],
                              [helper.make_tensor_value_info("c", elem, [*rows, lin.n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="sepify-latency")
    model.ir_version = min(model.ir_version, ort_max_ir_version())
    return model


def linear_chain_model(original: onnx.ModelProto, lin: Linear, scheme: str, variant: str, rank: int, *,
                       dtype=np.float32, lowering: str | None = None, seed: int = 1) -> onnx.ModelProto:
    """``original`` (from :func:`linear_model`) with its product replaced by the two thinner ones of
    ``pw-lowrank`` at ``rank`` (random factors), through the emitter the rewrite uses."""
    m = int(np.prod(lin.a_shape)) // lin.k
    geo = ConvGeometry(1, lin.k, lin.n, 1, (1,), (m,), (m,), (1,), (1,), (0, 0))
    return chain_model(original, geo, scheme, variant, rank, dtype=dtype, lowering=lowering, seed=seed, linear=lin.op)


def measure(table: LatencyTable, geo: "ConvGeometry | Linear", candidates: Sequence[tuple[str, str, int]], *,
            dtype: str = "float32", bias: bool = True, activation: Activation | None = None,
            threads: int | None = None, progress=None, task=None) -> None:
    """Measure ``geo``'s conv (a :class:`Linear`: its product) and every candidate the table lacks
    (``(scheme, variant, rank)``), interleaved in groups of :data:`GROUP` with the original; results
    go into ``table``."""
    if isinstance(geo, Linear):
        key = linear_key(geo.op, geo.a_shape, geo.n, dtype, geo.trans_a, geo.bias)
        original = linear_model(geo, dtype=dtype)
        shape = list(geo.a_shape)
        chain = linear_chain_model
    else:
        key = op_key(geo, dtype, activation.label if activation else None, bias)
        original = conv_model(geo, dtype=dtype, bias=bias, activation=activation)
        shape = [geo.batch, geo.c_in, *geo.in_spatial]
        chain = chain_model
    todo = [c for c in dict.fromkeys(candidates) if table.candidate(key, candidate_key(*c)) is None]
    if not todo and table.original(key) is not None:
        return
    feeds = {"x": np.random.default_rng(2).standard_normal(shape).astype(dtype)}
    groups = [todo[i:i + GROUP] for i in range(0, len(todo), GROUP)] or [[]]
    for group in groups:
        models = [original] + [chain(original, geo, *c, dtype=dtype) for c in group]
        rounds = time_models(models, feeds, threads=threads, budget_s=ROUND_BUDGET_S)
        idx = rounds.used(min(MIN_ROUNDS, len(rounds.times[0])))
        t = [float(np.median(rounds.of(j, idx))) * 1e6 for j in range(len(models))]
        # each candidate relative to the original in the same rounds, scaled to the table's original
        base = table.original(key) or t[0]
        ratios = [float(np.median(rounds.of(j, idx) / rounds.of(0, idx))) for j in range(1, len(models))]
        table.put(key, base, {candidate_key(*c): base * r for c, r in zip(group, ratios)}, len(idx))
        if progress is not None and task is not None:
            progress.advance(task, len(group))
    table.meta["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")


# ----------------------------------------------------------------------------------------------
# The candidates of a model and their costs
# ----------------------------------------------------------------------------------------------
def latency_grid(top: int) -> list[int]:
    """The ranks the latency planner measures, up to ``top``: 1, 2, 4, then every multiple of 8 up to
    64, of 16 up to 256, of 32 up to 512 and of 64 beyond.  GEMM kernels work on channel blocks, so
    a rank between two block sizes usually runs as slowly as the larger one; which sizes pay is
    decided by the measurements (a rank no faster than a larger one is never chosen: the larger one
    has less error), the grid only bounds how many are measured."""
    out = [r for r in (1, 2, 4) if r <= top]
    r = 8
    while r <= top:
        out.append(r)
        r += 8 if r < 64 else 16 if r < 256 else 32 if r < 512 else 64
    return out


MAX_MAC_RATIO = 0.9  # candidates keeping more of the conv's MACs are not measured: they cannot pay for a node more


def grid_candidates(geo: ConvGeometry, schemes: Sequence[str], max_mac_ratio: float = MAX_MAC_RATIO
                    ) -> list[tuple[str, str, int]]:
    """``(scheme, variant, rank)`` on :func:`latency_grid` for every applicable scheme and variant
    (variant ``""`` for a scheme's first, as plans name it) below ``max_mac_ratio`` of the conv's MACs."""
    out = []
    for name in schemes:
        sch = get_scheme(name)
        if sch.reason(geo) is not None:
            continue
        for k, variant in enumerate(sch.variants(geo)):
            top = sch.break_even(geo, variant)
            for r in latency_grid(top):
                if sch.macs(geo, r, variant) <= max_mac_ratio * geo.macs:
                    out.append((name, "" if k == 0 else variant, r))
    return out


def model_key(model: onnx.ModelProto) -> str:
    """A digest of the model's graph (for the end-to-end latency stored with a table)."""
    import hashlib

    return hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()[:20]


class LatencyCosts:
    """Measured latencies (µs) of a model's convs and of their candidate chains, at ``threads``.

    ``table``: a :class:`LatencyTable` or the path of one measured elsewhere (``sepify latency-table``
    on the deployment target), used as it is — a candidate it lacks is not a candidate, a conv it
    lacks is an error; None: this machine's cached table, completed by measuring what it lacks
    (:func:`measure`) and saved back.
    """

    def __init__(self, analysis, threads: int | None, table: "LatencyTable | str | os.PathLike | None" = None,
                 *, progress: bool = False, linear: bool = False):
        self.an = analysis
        self.threads = threads
        self.progress = progress
        if table is None:
            self.table, self.measuring = cached_table(threads), True
        else:
            self.table = table if isinstance(table, LatencyTable) else LatencyTable.load(table)
            self.measuring = False
            if self.table.meta.get("threads") != threads:
                raise UsageError(f"latency table {self.table.path or ''}: measured at threads="
                                 f"{self.table.meta.get('threads')}, not {threads}; measure one with "
                                 f"sepify latency-table --threads {threads}")
        self._sig: dict[str, tuple[str, ConvGeometry, str, Activation | None, bool]] = {}
        for spec in analysis.specs:
            geo = spec.geometry() if spec.ref.op_type == "Conv" else None
            if geo is None:
                continue
            act = fused_activation(analysis, spec)
            activation = None
            if act is not None:
                consts = tuple(np.asarray(analysis.view.constant(n, act).value) for n in act.node.input[1:] if n)
                attrs = tuple((a.name, helper.get_attribute_value(a)) for a in act.node.attribute)
                activation = Activation(act.op_type, consts, attrs)
            elem = spec.dtype or onnx.TensorProto.FLOAT
            dtype = str(helper.tensor_dtype_to_np_dtype(elem))
            key = op_key(geo, dtype, activation.label if activation else None, bool(spec.b_name))
            self._sig[spec.ref.qualified_name] = (key, geo, dtype, activation, bool(spec.b_name))
        for spec in (analysis.linear_specs() if linear else []):  # linear layers (--linear): the products themselves
            node = spec.ref.node
            a_shape = analysis.table.get(spec.x_name)
            if a_shape is None:
                continue
            gemm = spec.linear == "Gemm"
            trans_a = gemm and bool(next((a.i for a in node.attribute if a.name == "transA"), 0))
            bias = gemm and len(node.input) > 2 and bool(node.input[2])
            lin = Linear(spec.linear, tuple(a_shape), spec.conv_weight.shape[0], trans_a, bias)
            dtype = str(helper.tensor_dtype_to_np_dtype(spec.dtype or onnx.TensorProto.FLOAT))
            self._sig[spec.ref.qualified_name] = (linear_key(lin.op, lin.a_shape, lin.n, dtype, trans_a, bias), lin,
                                                 dtype, None, bias)

    @property
    def local(self) -> bool:
        """Whether the table was measured on this machine (its end-to-end checks mean something here)."""
        return self.table.matches(self.threads) or self.measuring

    def covers(self, spec) -> bool:
        return spec.ref.qualified_name in self._sig

    def key(self, spec) -> str:
        return self._sig[spec.ref.qualified_name][0]

    def require(self, wanted: dict[str, Sequence[tuple[str, str, int]]]) -> None:
        """Make sure the table holds every node of ``wanted`` (qualified name → candidates): measured
        here when the table is this machine's, else a clear error for a conv the table lacks."""
        by_key: dict[str, tuple[tuple, list]] = {}
        for name, cands in wanted.items():
            if name not in self._sig:
                continue
            key, geo, dtype, act, bias = self._sig[name]
            entry = by_key.setdefault(key, ((geo, dtype, act, bias), []))
            entry[1].extend(cands)
        if not self.measuring:
            missing = [k for k in by_key if self.table.original(k) is None]
            if missing:
                raise UsageError(f"latency table {self.table.path or ''} has no entry for {len(missing)} conv "
                                 f"geometr{'y' if len(missing) == 1 else 'ies'} of this model (e.g. {missing[0]}); "
                                 "measure the model with sepify latency-table on the target")
            return
        todo = {k: v for k, v in by_key.items()
                if self.table.original(k) is None or any(self.table.candidate(k, candidate_key(*c)) is None
                                                          for c in v[1])}
        if not todo:
            return
        from ..progress import progress as progress_bar

        total = sum(len(v[1]) for v in todo.values())
        with progress_bar(self.progress) as bar:
            task = bar.add_task("latency table", total=total) if bar else None
            for key, ((geo, dtype, act, bias), cands) in todo.items():
                measure(self.table, geo, cands, dtype=dtype, bias=bias, activation=act, threads=self.threads,
                        progress=bar, task=task)
        if self.table.path is not None:
            try:
                self.table.save()
            except OSError:
                pass  # an unwritable cache only costs measuring again next time

    def original(self, spec) -> float | None:
        sig = self._sig.get(spec.ref.qualified_name)
        return self.table.original(sig[0]) if sig else None

    def candidate(self, spec, scheme: str, variant: str, rank: int) -> float | None:
        sig = self._sig.get(spec.ref.qualified_name)
        return self.table.candidate(sig[0], candidate_key(scheme, variant, rank)) if sig else None

    def model_us(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray], label: str = "") -> float:
        """The whole model's median latency (µs) at ``threads``: measured here when the table is this
        machine's (the load of the moment matters more than a cached figure), else the one stored
        with a table measured on the target."""
        key = model_key(model)
        if not self.measuring:
            stored = self.table.models.get(key)
            if stored is None:
                raise UsageError(f"latency table {self.table.path or ''} has no end-to-end latency of this model: "
                                 "measure it with sepify latency-table MODEL on the target")
            return float(stored["latency_us"])
        us = measure_model(model, feeds, self.threads)
        self.table.models[key] = {"label": label, "latency_us": us}
        return us


@dataclass
class TableReport:
    """What ``sepify latency-table`` measured: the table (this model's entries) and a summary."""

    model: str
    threads: int | None
    convs: int  # convs with a latency entry
    geometries: int  # distinct op keys among them
    candidates: int
    measured: int  # candidates measured in this run (the rest came from this machine's cache)
    model_us: float
    seconds: float
    table: LatencyTable = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "model": self.model, "threads": self.threads, "convs": self.convs,
                "geometries": self.geometries, "candidates": self.candidates, "measured": self.measured,
                "model_us": self.model_us, "seconds": self.seconds, "meta": self.table.meta}


def latency_table(model, input_shapes=None, *, threads: int | None = None, schemes: Sequence[str] | None = None,
                  input_values=None, progress: bool = False, linear: bool = False) -> TableReport:
    """Measure every conv of ``model`` and its candidate chains on :func:`latency_grid` (all registered
    schemes, or ``schemes``) at ``threads``, and the whole model's latency — on this machine, as the
    deployment target.  This machine's cache supplies what it already holds and takes the new
    entries; the returned table holds only this model's (write it with ``report.table.save(path)``)."""
    from ..core.schemes import names as scheme_names
    from .analysis import analyze_model
    from .verify import model_inputs

    t0 = time.perf_counter()
    an = analyze_model(model, input_shapes, input_values)
    costs = LatencyCosts(an, threads, progress=progress, linear=linear)
    specs = list(an.specs) + (an.linear_specs() if linear else [])
    wanted = {}
    for spec in specs:
        if costs.covers(spec):
            wanted[spec.ref.qualified_name] = grid_candidates(spec.geometry(), list(schemes or scheme_names()))
    keys = {costs.key(s) for s in specs if costs.covers(s)}
    before = sum(len(costs.table.entries.get(k, {}).get("candidates", {})) for k in keys)
    costs.require(wanted)
    feeds, _ = model_inputs(an.loaded, None, an.input_shapes, 0, an.table.input_values or None)
    model_us = costs.model_us(an.loaded.model, feeds, an.loaded.label)
    out = LatencyTable(dict(costs.table.meta))
    for k in keys:
        out.entries[k] = costs.table.entries[k]
    out.models[model_key(an.loaded.model)] = {"label": an.loaded.label, "latency_us": model_us}
    total = sum(len(costs.table.entries[k].get("candidates", {})) for k in keys)
    return TableReport(an.loaded.label, threads, len(wanted), len(keys), total, max(0, total - before), model_us,
                       time.perf_counter() - t0, out)


def measure_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray], threads: int | None,
                  budget_s: float = 2.0) -> float:
    """One model's median latency (µs), timed as :func:`sepify.pipeline.bench.benchmark` times."""
    rounds = time_models([model], feeds, threads=threads, budget_s=budget_s)
    return float(np.median(rounds.of(0, rounds.used(min(MIN_ROUNDS, len(rounds.times[0])))))) * 1e6


__all__ = ["Activation", "LatencyCosts", "LatencyTable", "Linear", "TableReport", "latency_table", "cached_table",
           "candidate_key", "chain_model", "linear_chain_model", "linear_key", "linear_model",
           "conv_model", "cpu_model", "grid_candidates", "latency_grid", "measure", "measure_model", "model_key", "op_key"]
