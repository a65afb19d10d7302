"""Latency in onnxruntime: one model, or two timed in interleaved rounds.

Two models are timed A, B, B, A, A, B … (the order flips every round) so that drift in
machine load hits both equally; the speedup is the ratio of medians, and its spread the
10th–90th percentiles of the per-round ratios.  Sessions never spin idle threads
(``session.intra_op.allow_spinning = 0``): on a small machine a spinning idle session
steals the other's cores.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .audit import audit
from .load import LoadedModel, ModelSource, load_model
from .verify import make_session, model_inputs


@dataclass
class Latency:
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int

    @classmethod
    def of(cls, seconds: list[float]) -> "Latency":
        ms = np.asarray(seconds) * 1e3
        return cls(float(np.median(ms)), float(np.percentile(ms, 10)), float(np.percentile(ms, 90)), len(ms))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class NodeTime:
    name: str  # the original conv's name
    time_a_us: float | None
    time_b_us: float | None  # sum over the nodes that replaced it

    @property
    def speedup(self) -> float | None:
        return self.time_a_us / self.time_b_us if self.time_a_us and self.time_b_us else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["speedup"] = self.speedup
        return d


@dataclass
class BenchReport:
    model_a: str
    latency_a: Latency
    model_b: str | None = None
    latency_b: Latency | None = None
    threads: int | None = None
    speedup: float | None = None
    speedup_p10: float | None = None
    speedup_p90: float | None = None
    macs_a: int | None = None
    macs_b: int | None = None
    nodes: list[NodeTime] = field(default_factory=list)

    @property
    def mac_reduction(self) -> float | None:
        return self.macs_a / self.macs_b if self.macs_a and self.macs_b else None

    @property
    def efficiency(self) -> float | None:
        """Achieved speedup over the MAC reduction (1.0: latency fell as much as MACs did)."""
        return self.speedup / self.mac_reduction if self.speedup and self.mac_reduction else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_a": self.model_a,
            "model_b": self.model_b,
            "threads": self.threads,
            "latency_a": self.latency_a.to_dict(),
            "latency_b": self.latency_b.to_dict() if self.latency_b else None,
            "speedup": self.speedup,
            "speedup_p10": self.speedup_p10,
            "speedup_p90": self.speedup_p90,
            "macs_a": self.macs_a,
            "macs_b": self.macs_b,
            "mac_reduction": self.mac_reduction,
            "efficiency": self.efficiency,
            "nodes": [n.to_dict() for n in self.nodes],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _timed(session, feeds) -> float:
    start = time.perf_counter()
    session.run(None, feeds)
    return time.perf_counter() - start


def round_order(k: int, i: int) -> list[int]:
    """The order of ``k`` sessions in round ``i``: rotated by one every round, reversed every
    other ``k`` rounds, so every session takes every position equally often (k = 2: AB, BA, …)."""
    order = list(range(k))
    order = order[i % k:] + order[:i % k]
    return order[::-1] if (i // k) % 2 else order


def interleaved_times(sessions, feeds, runs: int, warmup: int = 0) -> list[list[float]]:
    """Wall times (s) of ``runs`` rounds in which every session runs once, in :func:`round_order`."""
    for _ in range(warmup):
        for s in sessions:
            s.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for i in range(runs):
        for j in round_order(len(sessions), i):
            times[j].append(_timed(sessions[j], feeds))
    return times


def profile_node_times(model, feeds, runs: int, providers=None, threads=None) -> dict[str, float]:
    """Median kernel time per node name (µs) from onnxruntime's profiler."""
    import onnxruntime as ort

    from .shapes import ort_session_bytes

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    # Basic optimizations only: the extended level fuses Conv+activation under new names,
    # and then no kernel time can be attributed to the rewritten nodes.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with tempfile.TemporaryDirectory() as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "prof")
        sess = ort.InferenceSession(ort_session_bytes(model), opts, providers=providers or ["CPUExecutionProvider"])
        for _ in range(runs):
            sess.run(None, feeds)
        path = sess.end_profiling()
        with open(path) as fh:
            events = json.load(fh)
    per_node: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_node.setdefault(e["name"][: -len("_kernel_time")], []).append(float(e["dur"]))
    return {k: float(np.median(v)) for k, v in per_node.items()}


def benchmark(
    model_a: ModelSource | LoadedModel,
    model_b: ModelSource | LoadedModel | None = None,
    *,
    runs: int = 100,
    warmup: int = 10,
    threads: int | None = None,
    providers=None,
    input_shapes=None,
    inputs=None,
    seed: int = 0,
    profile_runs: int = 20,
) -> BenchReport:
    la = model_a if isinstance(model_a, LoadedModel) else load_model(model_a)
    lb = None if model_b is None else (model_b if isinstance(model_b, LoadedModel) else load_model(model_b))
    feeds, _ = model_inputs(la, inputs, input_shapes, seed)
    sa = make_session(la.model, providers=providers, threads=threads)
    sb = make_session(lb.model, providers=providers, threads=threads) if lb else None
    ta, *rest = interleaved_times([sa] + ([sb] if sb else []), feeds, runs, warmup)
    tb = rest[0] if rest else []
    report = BenchReport(la.label, Latency.of(ta), threads=threads)
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    report.macs_a = audit(la, shapes, spectra=False).totals.total_macs
    if lb is None:
        return report
    report.model_b, report.latency_b = lb.label, Latency.of(tb)
    report.speedup = report.latency_a.median_ms / report.latency_b.median_ms
    ratios = np.asarray(ta) / np.asarray(tb)
    report.speedup_p10, report.speedup_p90 = float(np.percentile(ratios, 10)), float(np.percentile(ratios, 90))
    report.macs_b = audit(lb, shapes, spectra=False).totals.total_macs
    if profile_runs:
        report.nodes = _rewritten_node_times(la, lb, feeds, profile_runs, providers, threads)
    return report


def _rewritten_node_times(la, lb, feeds, runs, providers, threads) -> list[NodeTime]:
    new_nodes: dict[str, list[str]] = {}
    for n in lb.model.graph.node:
        if "/sep_" in n.name:
            new_nodes.setdefault(n.name.split("/sep_")[0], []).append(n.name)
    if not new_nodes:
        return []
    times_a = profile_node_times(la.model, feeds, runs, providers, threads)
    times_b = profile_node_times(lb.model, feeds, runs, providers, threads)
    out = []
    for original, parts in new_nodes.items():
        b_times = [times_b[p] for p in parts if p in times_b]
        out.append(NodeTime(original, times_a.get(original), sum(b_times) if b_times else None))
    return out
