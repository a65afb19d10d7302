"""Argument groups: each owns its flags and parses them into the typed options the API takes.

A group lists the API parameter behind each flag (``FLAGS``), so an API error that names a
parameter (:class:`sepify.errors.ParameterError`) is reported with the flag the user typed.

Flags whose value depends on other flags are defined with ``default=None`` ("not given") and get
their real default here, so that a flag that would have no effect can be refused instead of
ignored (:func:`refuse`); their help text states the default.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, Sequence

from ..core.drift import DRIFT_METRICS
from ..core.lowering import LOWERINGS
from ..core.schemes import names as scheme_names
from ..errors import ParameterError, UsageError

# API parameter -> CLI flag, filled by the groups below (for error messages).
FLAGS: dict[str, str] = {}


class HelpFormatter(argparse.HelpFormatter):
    """Help that shows every default: ``(default: X)`` unless the help text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or action.default == []:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text + " (default: %(default)s)"
        return text


def given(args, *dests: str) -> list[str]:
    """The flags among ``dests`` (namespace names) that the user gave: not None, not False, not []."""
    out = []
    for d in dests:
        v = getattr(args, d, None)
        if v is not None and v is not False and v != []:
            out.append("--" + d.replace("_", "-"))
    return out


def refuse(args, dests: Sequence[str], why: str) -> None:
    """Refuse the given flags among ``dests``: ``why`` says what they need (``"need --calibrate"``)."""
    found = given(args, *dests)
    if found:
        raise UsageError(f"{' '.join(found)}: {why}")


class ArgGroup:
    """One set of flags: ``add`` them to a parser, ``parse`` the namespace into typed options."""

    flags: dict[str, str] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        FLAGS.update(cls.flags)

    def add(self, parser: argparse.ArgumentParser) -> None:
        raise NotImplementedError

    def parse(self, args: argparse.Namespace) -> Any:
        raise NotImplementedError


class ShapeArgs(ArgGroup):
    flags = {"input_shapes": "--input-shape", "input_values": "--input-value"}

    def add(self, p):
        p.add_argument("--input-shape", action="append", default=[], metavar="NAME=DIMS",
                       help="concrete dims for an input, e.g. images=1x3x640x640 (repeatable; a single-input model "
                            "also takes 1x3x640x640); symbolic leading dims default to 1")
        p.add_argument("--input-value", action="append", default=[], metavar="NAME=V",
                       help="feed this input a fixed value instead of a random one wherever the model is run "
                            "(shape fallback, verify, bench, random calibration data), e.g. sr=16000; a list "
                            "V1,V2,… gives every element (repeatable). For models that branch on an input's value")

    def parse(self, args) -> dict[str, Any]:
        """``{"input_shapes": …, "input_values": …}`` as the API takes them (None when not given)."""
        return {"input_shapes": args.input_shape or None, "input_values": args.input_value or None}


POLICY_DESTS = ("lossless", "tol", "rank", "budget")


class PolicyArgs(ArgGroup):
    flags = {"lossless": "--lossless", "tol": "--tol", "rank": "--rank", "budget": "--budget",
             "scheme": "--scheme", "include": "--include", "exclude": "--exclude", "min_macs": "--min-macs",
             "target_speedup": "--target-speedup", "cost": "--cost", "latency_table": "--latency-table",
             "linear": "--linear"}

    def __init__(self, threads: bool = False):
        self.threads = threads  # add --threads here (commands without the latency group's)

    def add(self, p):
        pol = p.add_argument_group("policy (one of --lossless, --tol, --rank, --budget, --target-speedup; default "
                                   "--lossless)")
        pol.add_argument("--lossless", action="store_true", help="only exact factorizations that cut MACs")
        pol.add_argument("--tol", type=float, metavar="E",
                         help="per layer the cheapest factorization within relative weight error E, 0 <= E <= 1 "
                              "(||W - W'||/||W||; 1 is what rank 0 gives)")
        pol.add_argument("--rank", type=int, metavar="R", help="fixed rank for every rewritten layer")
        pol.add_argument("--budget", type=float, metavar="F",
                         help="keep about a fraction F of the conv MACs, 0 < F <= 1 (refused below the reachable floor)")
        pol.add_argument("--scheme", choices=("auto", *scheme_names()), default="auto",
                         help="restrict the factorization: auto picks per layer the cheapest meeting the policy")
        pol.add_argument("--include", metavar="REGEX", help="only nodes whose name matches (default: every node)")
        pol.add_argument("--exclude", metavar="REGEX", help="skip nodes whose name matches")
        pol.add_argument("--min-macs", type=int, default=0, metavar="N", help="skip layers below N MACs")
        pol.add_argument("--no-chain", action="store_true", help="do not split a dw-pw/pw-dw kernel stage further")
        pol.add_argument("--target-speedup", type=float, metavar="S",
                         help="the least error that makes the model S times faster end to end at --threads, on "
                              "measured latency (checked by timing the result; corrected in up to 3 rounds)")
        pol.add_argument("--cost", choices=("macs", "latency"), default=None,
                         help="what --budget / --tol / --max-drift spend: conv MACs (default; the same plan on every "
                              "machine) or onnxruntime latency measured per conv and candidate at --threads "
                              "(--target-speedup: always latency)")
        pol.add_argument("--latency-table", metavar="FILE.json",
                         help="plan with a latency table measured elsewhere (sepify latency-table on the target) "
                              "instead of this machine's cache")
        pol.add_argument("--linear", action="store_true",
                         help="also factor MatMul / Gemm layers with a constant 2-D weight (pw-lowrank: two "
                              "thinner products, calibrated with --calibrate); --budget then counts their MACs too "
                              "(MAC cost)")
        if self.threads:
            pol.add_argument("--threads", type=int, default=None, metavar="T",
                             help="onnxruntime intra-op threads the latencies are measured at (latency cost)")

    def parse(self, args):
        from ..pipeline.plan import Policy

        if args.min_macs < 0:
            raise UsageError(f"--min-macs {args.min_macs}: must be ≥ 0")
        threads = getattr(args, "threads", None)
        check_threads(threads)
        latency = args.cost == "latency" or args.target_speedup is not None
        if not latency:
            refuse(args, ["latency_table"], "is what latency cost plans with: add --cost latency or --target-speedup")
        if args.target_speedup is not None:
            given_policies = given(args, *POLICY_DESTS)
            if given_policies:
                raise UsageError(f"--target-speedup and {given_policies[0]}: choose one policy")
            return Policy(target_speedup=args.target_speedup, scheme=args.scheme, include=args.include,
                          exclude=args.exclude, min_macs=args.min_macs, chain=not args.no_chain, cost=args.cost,
                          threads=threads, latency_table=args.latency_table, linear=args.linear)
        return Policy.from_args(lossless=args.lossless, tol=args.tol, rank=args.rank, budget=args.budget,
                                scheme=args.scheme, include=args.include, exclude=args.exclude,
                                min_macs=args.min_macs, chain=not args.no_chain, cost=args.cost,
                                threads=threads if latency else None, latency_table=args.latency_table,
                                linear=args.linear)


@dataclass(frozen=True)
class LatencyOptions:
    lowering: str | None = None
    only_faster: bool = False
    threads: int | None = None
    latency_runs: int | None = None


def check_threads(value: int | None, flag: str = "--threads") -> None:
    if value is not None and value < 1:
        raise UsageError(f"{flag} {value}: must be ≥ 1 (leave it out for onnxruntime's default)")


class LatencyArgs(ArgGroup):
    flags = {"lowering": "--lowering", "threads": "--threads", "runs": "--latency-runs",
             "latency_runs": "--latency-runs"}

    def add(self, p):
        p.add_argument("--lowering", choices=LOWERINGS, default=None,
                       help="how a rank>1 dw-pw/pw-dw is written (same math): r summed multiplier-1 branches "
                            "(default: branches), one grouped conv, or concat (dw-pw: r depthwise, Concat, one "
                            "pointwise; pw-dw: one pointwise, Split, r depthwise, Adds); with --only-faster: the only "
                            "one tried")
        lat = p.add_argument_group("latency-aware selection")
        lat.add_argument("--only-faster", action="store_true",
                         help="time each planned rewrite against its original conv in onnxruntime (isolated, real "
                              "shapes) and keep it only if faster, written in its fastest lowering")
        lat.add_argument("--threads", type=int, default=None, metavar="T",
                         help="onnxruntime intra-op threads for --only-faster, --bench, --cost latency and "
                              "--target-speedup (default: onnxruntime's)")
        lat.add_argument("--latency-runs", type=int, default=None, metavar="N",
                         help="interleaved rounds per node for --only-faster (default: as many as fit 1 s, 10-50)")

    def parse(self, args) -> LatencyOptions:
        check_threads(args.threads)
        if args.latency_runs is not None and args.latency_runs < 1:
            raise UsageError(f"--latency-runs {args.latency_runs}: must be ≥ 1")
        if not args.only_faster:
            refuse(args, ["latency_runs"], "times --only-faster's measurements; add --only-faster")
            latency_cost = getattr(args, "cost", None) == "latency" or getattr(args, "target_speedup", None) is not None
            if not getattr(args, "bench", False) and not latency_cost:
                refuse(args, ["threads"], "sets the threads of --only-faster, --bench and latency cost; add one of "
                                          "them")
        return LatencyOptions(args.lowering, args.only_faster, args.threads, args.latency_runs)


class ToleranceArgs(ArgGroup):
    flags = {"atol": "--atol", "rtol": "--rtol"}

    def add(self, p):
        from ..pipeline.verify import DEFAULT_ATOL, DEFAULT_RTOL, LOW_PRECISION_ULPS

        p.add_argument("--atol", type=float, default=None, metavar="A",
                       help=f"absolute tolerance of the elementwise rule (default: {DEFAULT_ATOL}; float16 outputs: "
                            f"{LOW_PRECISION_ULPS}·eps·max|a|)")
        p.add_argument("--rtol", type=float, default=None, metavar="R",
                       help=f"relative tolerance of the elementwise rule (default: {DEFAULT_RTOL}; float16 outputs: "
                            "2·eps)")

    def parse(self, args) -> dict[str, Any]:
        for flag, v in (("--atol", args.atol), ("--rtol", args.rtol)):
            if v is not None and not v >= 0:
                raise UsageError(f"{flag} {v}: must be ≥ 0")
        return {"atol": args.atol, "rtol": args.rtol}


class GateArgs(ArgGroup):
    """Pass criteria for lossy rewrites (:class:`sepify.pipeline.verify.Gates`).  ``drift``: this
    group defines ``--max-drift``/``--drift-metric`` itself (verify); on rewrite the calibration
    group has them and they serve both."""

    flags = {"min_cosine": "--min-cosine", "min_top1": "--min-top1", "max_drift": "--max-drift",
             "drift_metric": "--drift-metric"}

    def __init__(self, drift: bool = True):
        self.drift = drift

    def add(self, p):
        g = p.add_argument_group("pass criteria for lossy rewrites (any of them replaces the --atol/--rtol rule)")
        if self.drift:
            g.add_argument("--max-drift", type=float, metavar="D",
                           help="every float output's 1 - cosine (over all samples) at most D, in --drift-metric")
            g.add_argument("--drift-metric", choices=DRIFT_METRICS, default=None,
                           help="for --max-drift: cosine, the plain cosine verify prints (default: cosine), or "
                                "channel: each output channel standardized first (the calibration's metric)")
        g.add_argument("--min-cosine", type=float, metavar="C", help="every float output's cosine at least C")
        g.add_argument("--min-top1", type=float, metavar="A",
                       help="outputs that look like class scores ([batch, classes]) pick the original's top class on "
                            "at least a fraction A of their rows")

    def parse(self, args, default_metric: str = "cosine") -> dict[str, Any]:
        """The gates as :func:`sepify.verify` keywords (``max_drift=None`` etc. when not given)."""
        if args.max_drift is None:
            if self.drift:
                refuse(args, ["drift_metric"], "is the metric of --max-drift; add --max-drift")
        return {"max_drift": args.max_drift, "drift_metric": args.drift_metric or default_metric,
                "min_cosine": args.min_cosine, "min_top1": args.min_top1}

    @staticmethod
    def active(args) -> bool:
        return bool(given(args, "max_drift", "min_cosine", "min_top1"))


CALIBRATION_ONLY = ("allocation", "calib_samples", "calib_rows", "calib_range", "calib_seed", "no_fold_bn")


class CalibrationArgs(ArgGroup):
    flags = {"data": "--calibrate", "max_drift": "--max-drift", "drift_metric": "--drift-metric",
             "allocation": "--allocation", "samples": "--calib-samples", "rows": "--calib-rows",
             "value_range": "--calib-range", "seed": "--calib-seed", "budgets": "--budgets"}

    def __init__(self, html: bool = True, verify: bool = False):
        self.html, self.verify = html, verify

    def add(self, p):
        from ..calibration.options import ALLOCATIONS, DEFAULT_ROWS

        g = p.add_argument_group("calibration (data-aware factors; see sepify.calibration)")
        g.add_argument("--calibrate", metavar="DATA",
                       help="sample inputs: an .npz keyed by input name, a folder of .npy/.npz, or 'random'; each "
                            "array's first axis is the sample axis")
        g.add_argument("--max-drift", type=float, metavar="D",
                       help="bound on the output drift (1 - cosine in --drift-metric): with --calibrate the ranks are "
                            "chosen to stay within it on the calibration data"
                            + ("; with --verify every output must stay within it (exit 1 otherwise)" if self.verify
                               else ""))
        g.add_argument("--drift-metric", choices=DRIFT_METRICS, default=None,
                       help="channel (default: channel): 1 - cosine after standardizing each output channel, so "
                            "channels in different units weigh alike; cosine: the plain cosine sepify verify prints")
        g.add_argument("--allocation", choices=ALLOCATIONS, default=None,
                       help="sensitivity: ranks from per-layer drift on the data (what auto, the default, picks for "
                            "--budget/--max-drift); plan: the weight-based plan's ranks, calibrated factors")
        g.add_argument("--calib-samples", type=int, default=None, metavar="N",
                       help="samples to use (default: all of the file's; random: how many to draw, 32)")
        g.add_argument("--calib-rows", type=int, default=None, metavar="N",
                       help=f"sampled output positions per layer (default: {DEFAULT_ROWS})")
        g.add_argument("--calib-range", default=None, metavar="LO,HI",
                       help="--calibrate random draws uniformly in [LO, HI] (default: N(0, 1), as sepify verify)")
        g.add_argument("--calib-seed", type=int, default=None, metavar="S",
                       help="seed of random data and sampled positions (default: 0)")
        g.add_argument("--no-fold-bn", action="store_true", help="keep Conv -> BatchNormalization pairs unfused")
        if self.html:
            p.add_argument("--html", metavar="FILE.html", help="also write a self-contained HTML report")

    @staticmethod
    def wanted(args) -> bool:
        return bool(getattr(args, "calibrate", None))

    def parse(self, args):
        """The :class:`~sepify.calibration.options.CalibrationOptions` of the flags (None without calibration)."""
        from ..calibration.options import DEFAULT_ROWS, CalibrationOptions

        if not self.wanted(args):
            refuse(args, CALIBRATION_ONLY, "calibration options: add --calibrate DATA (or --calibrate random)")
            checks = self.verify and getattr(args, "verify", False)
            if not checks:
                refuse(args, ["max_drift"], "bounds the drift measured on data: add --calibrate DATA (or "
                                            "--calibrate random)" + (", or --verify to check it" if self.verify else ""))
                refuse(args, ["drift_metric"], "is the drift metric of --calibrate" + (" and --max-drift with --verify"
                                                                                       if self.verify else ""))
            return None
        if args.calib_samples is not None and args.calib_samples < 1:
            raise UsageError(f"--calib-samples {args.calib_samples}: must be ≥ 1")
        if args.calib_rows is not None and args.calib_rows < 1:
            raise UsageError(f"--calib-rows {args.calib_rows}: must be ≥ 1")
        if args.calibrate != "random":
            refuse(args, ["calib_range"], "shapes --calibrate random's data; the samples come from "
                                          f"{args.calibrate}")
        return CalibrationOptions(
            samples=args.calib_samples, rows=args.calib_rows or DEFAULT_ROWS, seed=args.calib_seed or 0,
            value_range=_range(args.calib_range), fold_bn=not args.no_fold_bn, drift_metric=args.drift_metric or "channel",
            allocation=args.allocation or "auto", max_drift=args.max_drift, progress=progress_wanted(args))


def _range(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.replace(":", ",").split(","))
    except ValueError:
        raise UsageError(f"--calib-range {text!r}: give LO,HI") from None
    if not lo < hi:
        raise UsageError(f"--calib-range {text!r}: needs LO < HI")
    return lo, hi


class ProgressArgs(ArgGroup):
    def add(self, p):
        p.add_argument("--progress", action="store_true", default=None,
                       help="progress bars on stderr even when it is no terminal (default: when stderr is a terminal)")


def progress_wanted(args) -> bool:
    """``--progress`` forces the bars; without it they show when stderr is a terminal."""
    flag = getattr(args, "progress", None)
    return True if flag else sys.stderr.isatty()


SWEEP_ONLY = ("budgets", "no_weight_only", "latency", "plot")


class SweepArgs(ArgGroup):
    flags = {"eval_data": "--eval"}

    def __init__(self, plot: bool):
        self.plot = plot

    def add(self, p):
        g = p.add_argument_group("trade-off sweep")
        g.add_argument("--sweep", action="store_true", help="conv MACs vs drift over --budgets (needs --calibrate)")
        g.add_argument("--budgets", metavar="F,F,…", help="budgets of the sweep (default: 0.9,0.8,0.7,0.6,0.5,0.4)")
        g.add_argument("--eval", metavar="DATA",
                       help="held-out samples (same file convention as --calibrate) the drift is measured on")
        g.add_argument("--no-weight-only", action="store_true", help="sweep: skip the weight-only comparison")
        g.add_argument("--latency", action="store_true", help="sweep: also time each rewritten model (slow)")
        if self.plot:
            g.add_argument("--plot", metavar="FILE.png", help="sweep: draw the curve (needs matplotlib: sepify[plot])")

    def check(self, args, eval_also: str | None = None, policy_used: bool = False) -> None:
        """Refuse sweep flags without --sweep (``eval_also``: what else --eval serves, e.g. report's
        --verify; ``policy_used``: the command uses the policy besides the sweep)."""
        if args.sweep:
            if not policy_used:
                refuse(args, POLICY_DESTS, "the sweep walks its own MAC budgets (--budgets); leave the policy out")
            return
        refuse(args, SWEEP_ONLY, "sweep options: add --sweep")
        if not (eval_also and getattr(args, eval_also.lstrip("-").replace("-", "_"), False)):
            refuse(args, ["eval"], "held-out data for --sweep" + (f" or {eval_also}" if eval_also else "")
                   + ": add " + ("one of them" if eval_also else "--sweep"))


class BenchArgs(ArgGroup):
    flags = {"providers": "--providers", "warmup": "--warmup", "profile_runs": "--no-profile",
             "spinning": "--spinning"}

    def add(self, p):
        p.add_argument("--runs", type=int, default=100, metavar="N", help="timed runs (rounds with two models)")
        p.add_argument("--warmup", type=int, default=10, metavar="N", help="untimed runs of each model first")
        p.add_argument("--threads", type=int, default=None, metavar="T",
                       help="onnxruntime intra-op threads (default: onnxruntime's)")
        p.add_argument("--providers", action="append", default=None, metavar="EP[,EP…]",
                       help="onnxruntime execution providers in order, full or short names (cpu, cuda, …; repeatable "
                            "or comma-separated); each must be available in this onnxruntime (default: cpu)")
        p.add_argument("--no-profile", action="store_true",
                       help="skip the per-conv profiler times (taken with two models)")
        p.add_argument("--spinning", choices=("run", "off"), default="run",
                       help="worker threads spin within a run and stop when it returns (run), or never spin (off)")
        p.add_argument("--cold", action="store_true",
                       help="time each run right after the other model's (no untimed re-warm run per round)")

    def parse(self, args) -> dict[str, Any]:
        from ..model.session import resolve_providers

        if args.runs < 1:
            raise UsageError(f"--runs {args.runs}: must be ≥ 1")
        if args.warmup < 0:
            raise UsageError(f"--warmup {args.warmup}: must be ≥ 0")
        check_threads(args.threads)
        return {"runs": args.runs, "warmup": args.warmup, "threads": args.threads,
                "providers": resolve_providers(args.providers), "profile_runs": 0 if args.no_profile else 20,
                "spinning": args.spinning, "rewarm": 0 if args.cold else 1}


def error_message(exc: BaseException) -> str:
    """One line: the error's first line, an API parameter named by its flag (``--budget 2: …``)."""
    if isinstance(exc, ParameterError) and isinstance(exc.value, (list, tuple)) and exc.param not in FLAGS:
        # several parameters at once (``choose one policy``): each named by its flag
        return f"{exc.problem}, not {' and '.join(FLAGS.get(v, v) for v in exc.value)}"
    if isinstance(exc, ParameterError) and exc.param in FLAGS:
        flag = FLAGS[exc.param]
        return f"{flag} {exc.value}: {exc.problem}" if exc.value is not None else f"{flag}: {exc.problem}"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = ["ArgGroup", "BenchArgs", "CALIBRATION_ONLY", "CalibrationArgs", "FLAGS", "GateArgs", "HelpFormatter",
           "LatencyArgs", "LatencyOptions", "PolicyArgs", "ProgressArgs", "ShapeArgs", "SweepArgs", "ToleranceArgs",
           "check_threads", "error_message", "given", "progress_wanted", "refuse"]
