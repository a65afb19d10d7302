"""Latency in onnxruntime: one model, or two timed in interleaved rounds.

Two models are timed in interleaved rounds (A B, B A, …: the order flips) so that drift in
machine load hits both equally; the speedup is the median of the per-round ratios ``t_A / t_B``
(each from two runs next to each other in time) and its spread their 10th–90th percentiles.  In a round each model first runs once untimed
(``rewarm``): a model timed right after the other starts with the other's data in its caches,
which costs a short run proportionally more than a long one — serving runs one model over and
over, with warm caches.  Outputs stay in onnxruntime's arena (IO binding), so the time is the
inference, not the copy of the outputs into fresh numpy arrays.

Threads (``spinning``): an idle session must never spin, or on a small machine its threads
steal the timed session's cores.  ``"run"`` (default) keeps onnxruntime's default spinning
*within* a run and stops it when the run returns (``session.force_spinning_stop``), so no idle
session spins; ``"off"`` never spins (``session.intra_op.allow_spinning = 0``), which makes
every parallel operator wake its worker threads — on 2 threads that alone costs a graph of many
short operators (a rank-1 rewrite of a VGG stack) a quarter of its time.

On a shared machine other processes preempt the timed threads, and that hurts a long run more
than a short one (a run shorter than a scheduler slice often escapes it), which inflates the
speedup of a faster model.  On Linux every run also records how long this process's threads
waited for a CPU (``/proc/self/task/*/schedstat``); a round in which any run waited more than
:data:`CLEAN_WAIT_FRACTION` of its wall time is *contended*.  When at least a quarter of the
rounds (and :data:`MIN_CLEAN_ROUNDS`) are clean, medians and ratios come from the clean rounds
only; otherwise from all, and the report's ``rounds_used`` / ``contention_*`` say so.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import onnx

from .audit import audit
from ..model.load import LoadedModel, ModelSource, load_model
from ..errors import ParameterError, UsageError
from ..serialize import SCHEMA_VERSION, dumps
from ..model.session import SPINNING, check_threads, ort_session, resolve_providers
from .verify import check_same_inputs, model_inputs, run_checked


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


NODES_MEASURE = ("per rewritten conv: onnxruntime profiler kernel times (median over the profiled runs, same threads "
                 "and spinning as the timed runs, full graph optimizations) of the original conv and of the nodes "
                 "that replaced it, activations fused into them included; layout reorders and the time between "
                 "kernels are in no row")


@dataclass
class NodeTime:
    name: str  # the original conv's name
    time_a_us: float | None  # the conv's kernel time (fused activation included)
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
    rounds: int | None = None  # rounds timed
    rounds_used: int | None = None  # the clean ones, or all (see the module doc)
    contention_a: float | None = None  # median fraction of a run spent waiting for a CPU (Linux)
    contention_b: float | None = None
    spinning: str | None = None  # "run" or "off" (module doc)
    rewarm: int | None = None  # untimed runs before each timed one
    # Wall seconds of the rounds used, per model (for pooling repeated benchmarks; not in to_dict).
    times_a: np.ndarray | None = field(default=None, repr=False, compare=False)
    times_b: np.ndarray | None = field(default=None, repr=False, compare=False)
    profile: "ProfileSummary | None" = None  # what the per-node times in ``nodes`` add up to
    providers: list[str] | None = None  # onnxruntime execution providers (None: the CPU)

    def __repr__(self) -> str:
        return (f"BenchReport(model_a={self.model_a!r}, model_b={self.model_b!r}, median_a_ms="
                f"{self.latency_a.median_ms:.3f}, speedup={self.speedup}, nodes={len(self.nodes)})")

    @property
    def mac_reduction(self) -> float | None:
        return self.macs_a / self.macs_b if self.macs_a and self.macs_b else None

    @property
    def efficiency(self) -> float | None:
        """Achieved speedup over the MAC reduction (1.0: latency fell as much as MACs did)."""
        return self.speedup / self.mac_reduction if self.speedup and self.mac_reduction else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "model_a": self.model_a,
            "model_b": self.model_b,
            "threads": self.threads,
            "providers": self.providers or ["CPUExecutionProvider"],
            "latency_a": self.latency_a.to_dict(),
            "latency_b": self.latency_b.to_dict() if self.latency_b else None,
            "speedup": self.speedup,
            "speedup_p10": self.speedup_p10,
            "speedup_p90": self.speedup_p90,
            "macs_a": self.macs_a,
            "macs_b": self.macs_b,
            "mac_reduction": self.mac_reduction,
            "efficiency": self.efficiency,
            "rounds": self.rounds,
            "rounds_used": self.rounds_used,
            "contention_a": self.contention_a,
            "contention_b": self.contention_b,
            "spinning": self.spinning,
            "rewarm": self.rewarm,
            "nodes": [n.to_dict() for n in self.nodes],
            "nodes_measure": NODES_MEASURE,
            "profile": self.profile.to_dict() if self.profile else None,
        }

    def to_json(self) -> str:
        return dumps(self.to_dict())


def bench_session(model, providers=None, threads: int | None = None, spinning: str = "run"):
    """An onnxruntime session for timing (see the module doc for ``spinning``; :func:`sepify.shapes.ort_session`)."""
    if spinning not in SPINNING:  # a timing mode is required here (ort_session also takes None: its default)
        raise UsageError(f"unknown spinning mode {spinning!r} (one of {', '.join(SPINNING)})")
    return ort_session(model, providers=providers, threads=threads, spinning=spinning)


class Runner:
    """One inference of a session on fixed feeds, outputs kept in onnxruntime's arena (IO binding)."""

    def __init__(self, session, feeds):
        self.session, self.feeds, self.binding = session, feeds, None
        if hasattr(session, "io_binding"):
            try:
                binding = session.io_binding()
                for name, value in feeds.items():
                    binding.bind_cpu_input(name, value)
                for out in session.get_outputs():
                    binding.bind_output(out.name, "cpu")
                self.binding = binding
            except Exception:  # noqa: BLE001 - e.g. a non-tensor input: plain runs
                self.binding = None

    def __call__(self) -> None:
        if self.binding is not None:
            self.session.run_with_iobinding(self.binding)
        else:
            self.session.run(None, self.feeds)


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


CLEAN_WAIT_FRACTION = 0.05
MIN_CLEAN_ROUNDS = 10
MIN_RUNS = 10  # rounds of time_models when sized by a time budget
MAX_RUNS = 50
DEFAULT_WARMUP = 3
DEFAULT_BUDGET_S = 1.0  # timed seconds time_models aims at when no round count is given


def cpu_wait_s() -> float | None:
    """Seconds this process's threads have spent runnable but waiting for a CPU (Linux), or None."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    total, found = 0, False
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[1])
            found = True
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9 if found else None


@dataclass
class Rounds:
    """Interleaved timings: ``times[j][i]`` wall seconds of session ``j`` in round ``i``, ``waits[j][i]``
    the seconds its threads waited for a CPU meanwhile (None where the OS does not say)."""

    times: list[list[float]]
    waits: list[list[float]] | None = None

    def contention(self, j: int) -> float | None:
        """Median fraction of session ``j``'s run time spent waiting for a CPU."""
        if not self.waits:
            return None
        return float(np.median(np.asarray(self.waits[j]) / np.maximum(np.asarray(self.times[j]), 1e-12)))

    def used(self, min_clean: int = MIN_CLEAN_ROUNDS) -> np.ndarray:
        """Indices of the rounds to use: the clean ones when there are at least ``min_clean`` and a
        quarter of all, else every round."""
        n = len(self.times[0]) if self.times else 0
        if not self.waits or n == 0:
            return np.arange(n)
        frac = np.asarray(self.waits) / np.maximum(np.asarray(self.times), 1e-12)
        clean = np.nonzero((frac <= CLEAN_WAIT_FRACTION).all(axis=0))[0]
        return clean if len(clean) >= max(min_clean, n / 4) else np.arange(n)

    def of(self, j: int, idx: np.ndarray) -> np.ndarray:
        return np.asarray(self.times[j])[idx]


def round_order(k: int, i: int) -> list[int]:
    """The order of ``k`` sessions in round ``i``: rotated by one every round, reversed every
    other ``k`` rounds, so every session takes every position equally often (k = 2: AB, BA, …)."""
    order = list(range(k))
    order = order[i % k:] + order[:i % k]
    return order[::-1] if (i // k) % 2 else order


def interleaved_times(sessions, feeds, runs: int, warmup: int = 0, rewarm: int = 1) -> Rounds:
    """``runs`` rounds in which every session runs ``rewarm`` times untimed and then once timed,
    in :func:`round_order`: wall times and, where the OS tells, the time the threads waited for a
    CPU during each timed run."""
    runners = [Runner(s, feeds) for s in sessions]
    for _ in range(warmup):
        for run in runners:
            run()
    times: list[list[float]] = [[] for _ in sessions]
    waits: list[list[float]] | None = [[] for _ in sessions] if cpu_wait_s() is not None else None
    for i in range(runs):
        for j in round_order(len(sessions), i):
            for _ in range(rewarm):
                runners[j]()
            w0 = cpu_wait_s() if waits is not None else None
            times[j].append(timed(runners[j]))
            if waits is not None:
                w1 = cpu_wait_s()
                waits[j].append(max(0.0, w1 - w0) if w0 is not None and w1 is not None else 0.0)
    return Rounds(times, waits)


def time_models(models: Sequence[onnx.ModelProto], feeds, *, threads: int | None = None, runs: int | None = None,
                warmup: int = DEFAULT_WARMUP, budget_s: float = DEFAULT_BUDGET_S, providers=None,
                spinning: str = "run", rewarm: int = 1):
    """Interleaved timings (:class:`sepify.bench.Rounds`) of ``models`` as :func:`sepify.bench.benchmark`
    takes them; ``runs`` rounds, or as many as fit ``budget_s``."""
    sessions = [bench_session(m, providers=providers, threads=threads, spinning=spinning) for m in models]
    runners = [Runner(s, feeds) for s in sessions]
    for _ in range(max(warmup, 1) - 1):
        for run in runners:
            run()
    probe = sum(timed(run) for run in runners)  # the last warm-up round sizes the experiment
    if runs is None:
        runs = int(np.clip(budget_s / max(probe * (1 + rewarm), 1e-9), MIN_RUNS, MAX_RUNS))
    return interleaved_times(sessions, feeds, runs, rewarm=rewarm)



PROFILE_SKIP = 2  # profiled runs left out at the start (first-run allocations)
# Activations (and the branch sum) onnxruntime fuses into the conv before them: their kernel time is the conv's.
FUSED_INTO_CONV = ("Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "HardSigmoid", "Add")


def profile_node_times(model, feeds, runs: int, providers=None, threads=None, spinning: str = "run",
                       skip: int = PROFILE_SKIP) -> dict[str, float]:
    """Median kernel time (µs) per node onnxruntime ran, from its profiler: a session made like the
    timed ones (same threads and spinning, full graph optimizations), ``skip`` + ``runs`` runs of
    which the first ``skip`` are left out.  Keys are onnxruntime's node names after its graph
    optimizations (a fused NCHWc conv is named after its output tensor: ``<tensor>_nchwc``)."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = ort_session(model, providers=providers, threads=threads, spinning=spinning,
                           profile_prefix=os.path.join(tmp, "prof"))
        for _ in range(skip + runs):
            sess.run(None, feeds)
        path = sess.end_profiling()
        with open(path) as fh:
            events = json.load(fh)
    per_node: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_node.setdefault(e["name"][: -len("_kernel_time")], []).append(float(e["dur"]))
    return {k: float(np.median(v[skip:] if len(v) > skip else v)) for k, v in per_node.items()}


def conv_of(model) -> dict[str, str]:
    """onnxruntime node name → the conv it belongs to, for every main-graph node and the names
    onnxruntime gives fused nodes: a rewritten chain's nodes (``conv/sep_*``) belong to ``conv``, an
    activation or sum fused after a conv belongs to that conv, ``<tensor>_nchwc`` to the producer of
    ``<tensor>``.  Layout reorders (``ReorderInput``/``ReorderOutput``) belong to none."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}

    def owner(node) -> str:
        for _ in range(len(graph.node)):
            if node.op_type in FUSED_INTO_CONV and node.input and node.input[0] in producer:
                before = producer[node.input[0]]
                if before.op_type in ("Conv", "Add") or "/sep_" in before.name:
                    node = before
                    continue
            break
        return node.name.split("/sep_")[0] if "/sep_" in node.name else node.name

    out = {n.name: owner(n) for n in graph.node if n.name}
    for tensor, node in producer.items():
        out.setdefault(f"{tensor}_nchwc", owner(node))
    return out


@dataclass
class ProfileSummary:
    """What the per-node times measure (see :func:`profile_node_times`): sums of medians, µs."""

    runs: int
    threads: int | None
    spinning: str
    kernels_a_us: float  # every kernel of the original model
    kernels_b_us: float
    rewritten_a_us: float  # the kernels of the convs that were rewritten (fused activations included)
    rewritten_b_us: float  # the kernels of the nodes that replaced them
    other_b_us: float  # the rewritten model's kernels attributed to no conv (layout reorders, …)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def benchmark(
    model_a: ModelSource | LoadedModel,
    model_b: ModelSource | LoadedModel | None = None,
    *,
    runs: int = 100,
    warmup: int = 10,
    threads: int | None = None,
    providers=None,
    input_shapes=None,
    input_values=None,
    inputs=None,
    seed: int = 0,
    profile_runs: int = 20,
    spinning: str = "run",
    rewarm: int = 1,
) -> BenchReport:
    """Latency of ``model_a`` (and ``model_b``, in interleaved rounds); see the module doc.

    Feeds: ``inputs`` (an .npz path or a mapping), else seeded random arrays at ``input_shapes``
    with the fixed ``input_values`` for those inputs (as :func:`sepify.verify.verify`).  The MAC
    counts come from audits whose onnxruntime shape fallback runs on the same feeds."""
    providers = resolve_providers(providers)
    check_threads(threads)
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ParameterError("runs", runs, "needs a positive number of timed runs")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ParameterError("warmup", warmup, "needs a number of untimed runs ≥ 0")
    la = model_a if isinstance(model_a, LoadedModel) else load_model(model_a)
    lb = None if model_b is None else (model_b if isinstance(model_b, LoadedModel) else load_model(model_b))
    if lb is not None:
        check_same_inputs(la, lb)
    feeds, _ = model_inputs(la, inputs, input_shapes, seed, input_values)
    sa = bench_session(la.model, providers=providers, threads=threads, spinning=spinning)
    sb = bench_session(lb.model, providers=providers, threads=threads, spinning=spinning) if lb else None
    for session, loaded in ((sa, la), (sb, lb)):
        if session is not None:  # one untimed run each: feeds a model refuses are bad input, not a crash
            run_checked(session, loaded.label, feeds)
    rounds = interleaved_times([sa] + ([sb] if sb else []), feeds, runs, warmup, rewarm)
    idx = rounds.used()
    ta = rounds.of(0, idx)
    report = BenchReport(la.label, Latency.of(list(ta)), threads=threads, rounds=runs, rounds_used=len(idx),
                         contention_a=rounds.contention(0), spinning=spinning, rewarm=rewarm, times_a=ta,
                         providers=providers)
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    report.macs_a = audit(la, shapes, input_values=feeds, spectra=False).totals.total_macs
    if lb is None:
        return report
    tb = rounds.of(1, idx)
    report.model_b, report.latency_b = lb.label, Latency.of(list(tb))
    report.contention_b = rounds.contention(1)
    report.times_b = tb
    ratios = ta / tb
    report.speedup = float(np.median(ratios))
    report.speedup_p10, report.speedup_p90 = float(np.percentile(ratios, 10)), float(np.percentile(ratios, 90))
    report.macs_b = audit(lb, shapes, input_values=feeds, spectra=False).totals.total_macs
    if profile_runs:
        report.nodes, report.profile = _rewritten_node_times(la, lb, feeds, profile_runs, providers, threads, spinning)
    return report


def _rewritten_node_times(la, lb, feeds, runs, providers, threads, spinning) -> tuple[list[NodeTime], ProfileSummary | None]:
    rewritten = list(dict.fromkeys(n.name.split("/sep_")[0] for n in lb.model.graph.node if "/sep_" in n.name))
    if not rewritten:
        return [], None
    times_a = profile_node_times(la.model, feeds, runs, providers, threads, spinning)
    times_b = profile_node_times(lb.model, feeds, runs, providers, threads, spinning)
    of_a, of_b = conv_of(la.model), conv_of(lb.model)
    sums_a: dict[str, float] = {}
    sums_b: dict[str, float] = {}
    for times, of, sums in ((times_a, of_a, sums_a), (times_b, of_b, sums_b)):
        for name, us in times.items():
            conv = of.get(name)
            if conv is not None:
                sums[conv] = sums.get(conv, 0.0) + us
    out = [NodeTime(c, sums_a.get(c), sums_b.get(c)) for c in rewritten]
    mine_b = sum(us for name, us in times_b.items() if of_b.get(name) is not None)
    summary = ProfileSummary(runs, threads, spinning, sum(times_a.values()), sum(times_b.values()),
                             sum(sums_a.get(c, 0.0) for c in rewritten), sum(sums_b.get(c, 0.0) for c in rewritten),
                             sum(times_b.values()) - mine_b)
    return out, summary
