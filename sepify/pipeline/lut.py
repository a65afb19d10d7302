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


def candidate_key(scheme: str, variant: str, rank: int, lowering: str | None = None) -> str:
    return f"{scheme}|{variant or '-'}|{rank}|{lowering or DEFAULT_LOWERING}"


@dataclass
class LatencyTable:
    """``entries[op_key] = {"original_us": …, "candidates": {candidate_key: µs}}`` for one machine,
    onnxruntime version and thread count (``meta``)."""

    meta: dict[str, Any]
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    path: Path | None = None

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
                "entries": dict(sorted(self.entries.items()))}

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
            return cls(dict(data["meta"]), dict(data.get("entries", {})), path)
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
                dtype=np.float32, lowering: str | None = None, seed: int = 1) -> onnx.ModelProto:
    """``original`` (from :func:`conv_model`) with its conv replaced by the scheme's chain at ``rank``
    (random factor weights of the real shapes), through the emitter the rewrite uses."""
    rng = np.random.default_rng(seed)
    np_dtype = np.dtype(dtype)
    shapes = get_scheme(scheme).stages(geo, rank, variant)
    stages = [Stage(s.out_channels, s.in_per_group, s.group, s.kernel, s.axes,
                    (rng.standard_normal((s.out_channels, s.in_per_group, *s.kernel)) * 0.1).astype(np_dtype), s.role)
              for s in shapes]
    rz = Realization(node="conv", input="x", output="c", replaces=("c",), weight_name="w", geometry=geo,
                     auto_pad="NOTSET", scheme=scheme, variant=variant, rank=rank, chained=False,
                     stages=tuple(stages), lowered=lower(stages, lowering or DEFAULT_LOWERING), weight_error=0.0,
                     planned_error=0.0, source="svd")
    return emit(original, [rz], {})[0]


def measure(table: LatencyTable, geo: ConvGeometry, candidates: Sequence[tuple[str, str, int]], *,
            dtype: str = "float32", bias: bool = True, activation: Activation | None = None,
            threads: int | None = None, progress=None, task=None) -> None:
    """Measure ``geo``'s conv and every candidate the table lacks (``(scheme, variant, rank)``),
    interleaved in groups of :data:`GROUP` with the original conv; results go into ``table``."""
    key = op_key(geo, dtype, activation.label if activation else None, bias)
    todo = [c for c in dict.fromkeys(candidates) if table.candidate(key, candidate_key(*c)) is None]
    if not todo and table.original(key) is not None:
        return
    original = conv_model(geo, dtype=dtype, bias=bias, activation=activation)
    feeds = {"x": np.random.default_rng(2).standard_normal([geo.batch, geo.c_in, *geo.in_spatial]).astype(dtype)}
    groups = [todo[i:i + GROUP] for i in range(0, len(todo), GROUP)] or [[]]
    for group in groups:
        models = [original] + [chain_model(original, geo, *c, dtype=dtype) for c in group]
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


__all__ = ["Activation", "LatencyTable", "cached_table", "candidate_key", "chain_model", "conv_model", "cpu_model",
           "measure", "op_key"]
