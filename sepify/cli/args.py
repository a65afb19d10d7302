"""Argument groups: each owns its flags and parses them into the typed options the API takes.

A group lists the API parameter behind each flag (``FLAGS``), so an API error that names a
parameter (:class:`sepify.errors.ParameterError`) is reported with the flag the user typed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from ..core.lowering import LOWERINGS
from ..core.schemes import names as scheme_names
from ..errors import ParameterError, UsageError

# API parameter -> CLI flag, filled by the groups below (for error messages).
FLAGS: dict[str, str] = {}


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
                       help="concrete dims for an input, e.g. images=1x3x640x640 (repeatable); "
                            "symbolic leading dims default to 1")
        p.add_argument("--input-value", action="append", default=[], metavar="NAME=V",
                       help="feed this input a fixed value instead of a random one wherever the model is run "
                            "(shape fallback, verify, bench, random calibration data), e.g. sr=16000; a list "
                            "V1,V2,… gives every element (repeatable). For models that branch on an input's value")

    def parse(self, args) -> dict[str, Any]:
        """``{"input_shapes": …, "input_values": …}`` as the API takes them (None when not given)."""
        return {"input_shapes": args.input_shape or None, "input_values": args.input_value or None}


class PolicyArgs(ArgGroup):
    flags = {"lossless": "--lossless", "tol": "--tol", "rank": "--rank", "budget": "--budget",
             "scheme": "--scheme", "include": "--include", "exclude": "--exclude", "min_macs": "--min-macs"}

    def add(self, p):
        pol = p.add_argument_group("policy (default --lossless)")
        pol.add_argument("--lossless", action="store_true", help="only exact factorizations that cut MACs")
        pol.add_argument("--tol", type=float, metavar="E", help="max relative weight error per layer")
        pol.add_argument("--rank", type=int, metavar="R", help="fixed rank for every rewritten layer")
        pol.add_argument("--budget", type=float, metavar="F", help="keep about a fraction F of the conv MACs")
        pol.add_argument("--scheme", choices=("auto", *scheme_names()), default="auto")
        pol.add_argument("--include", metavar="REGEX", help="only nodes whose name matches")
        pol.add_argument("--exclude", metavar="REGEX", help="skip nodes whose name matches")
        pol.add_argument("--min-macs", type=int, default=0, metavar="N", help="skip layers below N MACs")
        pol.add_argument("--no-chain", action="store_true", help="do not split a dw-pw/pw-dw kernel stage further")

    def parse(self, args):
        from ..pipeline.plan import Policy

        return Policy.from_args(lossless=args.lossless, tol=args.tol, rank=args.rank, budget=args.budget,
                                scheme=args.scheme, include=args.include, exclude=args.exclude,
                                min_macs=args.min_macs, chain=not args.no_chain)


@dataclass(frozen=True)
class LatencyOptions:
    lowering: str | None = None
    only_faster: bool = False
    threads: int | None = None
    latency_runs: int | None = None


class LatencyArgs(ArgGroup):
    flags = {"lowering": "--lowering", "threads": "--threads", "runs": "--latency-runs",
             "latency_runs": "--latency-runs"}

    def add(self, p):
        p.add_argument("--lowering", choices=LOWERINGS, default=None,
                       help="how a rank>1 dw-pw/pw-dw is written (same math): r summed multiplier-1 branches "
                            "(default), one grouped conv, or concat (dw-pw: r depthwise, Concat, one pointwise; "
                            "pw-dw: one pointwise, Split, r depthwise, Adds); with --only-faster: the only one tried")
        lat = p.add_argument_group("latency-aware selection")
        lat.add_argument("--only-faster", action="store_true",
                         help="time each planned rewrite against its original conv in onnxruntime (isolated, real "
                              "shapes) and keep it only if faster, written in its fastest lowering")
        lat.add_argument("--threads", type=int, default=None, metavar="T",
                         help="onnxruntime intra-op threads for --only-faster and --bench (default: onnxruntime's)")
        lat.add_argument("--latency-runs", type=int, default=None, metavar="N",
                         help="interleaved rounds per node for --only-faster (default: as many as fit 1 s, 10-50)")

    def parse(self, args) -> LatencyOptions:
        if args.threads is not None and args.threads < 1:
            raise UsageError(f"--threads {args.threads}: must be ≥ 1")
        if args.latency_runs is not None and args.latency_runs < 1:
            raise UsageError(f"--latency-runs {args.latency_runs}: must be ≥ 1")
        return LatencyOptions(args.lowering, args.only_faster, args.threads, args.latency_runs)


class ToleranceArgs(ArgGroup):
    flags = {"atol": "--atol", "rtol": "--rtol"}

    def add(self, p):
        from ..pipeline.verify import DEFAULT_ATOL, DEFAULT_RTOL, LOW_PRECISION_ULPS

        p.add_argument("--atol", type=float, default=None,
                       help=f"absolute tolerance (default {DEFAULT_ATOL}; float16 outputs: {LOW_PRECISION_ULPS}·eps·max|a|)")
        p.add_argument("--rtol", type=float, default=None,
                       help=f"relative tolerance (default {DEFAULT_RTOL}; float16 outputs: 2·eps)")

    def parse(self, args) -> dict[str, Any]:
        return {"atol": args.atol, "rtol": args.rtol}


class CalibrationArgs(ArgGroup):
    flags = {"data": "--calibrate", "max_drift": "--max-drift", "drift_metric": "--drift-metric",
             "allocation": "--allocation", "samples": "--calib-samples", "rows": "--calib-rows",
             "value_range": "--calib-range", "seed": "--calib-seed", "budgets": "--budgets"}

    def __init__(self, html: bool = True):
        self.html = html

    def add(self, p):
        from ..calibration.options import ALLOCATIONS, DRIFT_METRICS

        g = p.add_argument_group("calibration (data-aware factors; see sepify.calibration)")
        g.add_argument("--calibrate", metavar="DATA",
                       help="sample inputs: an .npz keyed by input name, a folder of .npy/.npz, or 'random'; each "
                            "array's first axis is the sample axis")
        g.add_argument("--max-drift", type=float, metavar="D",
                       help="bound on the output drift (1 - cosine, see --drift-metric) measured on the calibration data")
        g.add_argument("--drift-metric", choices=DRIFT_METRICS, default="channel",
                       help="channel (default): 1 - cosine after standardizing each output channel, so channels in "
                            "different units weigh alike; cosine: the plain cosine sepify verify prints")
        g.add_argument("--allocation", choices=ALLOCATIONS, default="auto",
                       help="sensitivity: ranks from per-layer drift on the data (default for --budget/--max-drift); "
                            "plan: the weight-based plan's ranks, calibrated factors")
        g.add_argument("--calib-samples", type=int, default=None, metavar="N",
                       help="samples to use (random: how many to draw, default 32)")
        g.add_argument("--calib-rows", type=int, default=None, metavar="N",
                       help="sampled output positions per layer (default 4096)")
        g.add_argument("--calib-range", default=None, metavar="LO,HI",
                       help="--calibrate random draws uniformly in [LO, HI] (default: N(0, 1), as sepify verify)")
        g.add_argument("--calib-seed", type=int, default=0, metavar="S", help="seed of random data and sampled positions")
        g.add_argument("--no-fold-bn", action="store_true", help="keep Conv -> BatchNormalization pairs unfused")
        g.add_argument("--progress", action="store_true", default=None,
                       help="progress bars on stderr (default: when stderr is a terminal)")
        if self.html:
            p.add_argument("--html", metavar="FILE.html", help="also write a self-contained HTML report")

    @staticmethod
    def wanted(args) -> bool:
        return bool(getattr(args, "calibrate", None)) or getattr(args, "max_drift", None) is not None

    def parse(self, args):
        """The :class:`~sepify.calibration.options.CalibrationOptions` of the flags (None without calibration)."""
        from ..calibration.options import DEFAULT_ROWS, CalibrationOptions

        if args.max_drift is not None and not args.calibrate:
            raise UsageError("--max-drift measures drift on data: add --calibrate DATA (or --calibrate random)")
        if not self.wanted(args):
            return None
        if args.calib_samples is not None and args.calib_samples < 1:
            raise UsageError(f"--calib-samples {args.calib_samples}: must be ≥ 1")
        if args.calib_rows is not None and args.calib_rows < 1:
            raise UsageError(f"--calib-rows {args.calib_rows}: must be ≥ 1")
        return CalibrationOptions(
            samples=args.calib_samples, rows=args.calib_rows or DEFAULT_ROWS, seed=args.calib_seed,
            value_range=_range(args.calib_range), fold_bn=not args.no_fold_bn, drift_metric=args.drift_metric,
            allocation=args.allocation, max_drift=args.max_drift,
            progress=sys.stderr.isatty() if args.progress is None else args.progress)


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


class SweepArgs(ArgGroup):
    flags = {"eval_data": "--eval"}

    def __init__(self, plot: bool):
        self.plot = plot

    def add(self, p):
        p.add_argument("--sweep", action="store_true", help="conv MACs vs drift over --budgets (needs --calibrate)")
        p.add_argument("--budgets", metavar="F,F,…", help="budgets of the sweep (default 0.9,0.8,0.7,0.6,0.5,0.4)")
        p.add_argument("--eval", metavar="DATA", help="held-out samples the sweep's drift is measured on")
        p.add_argument("--no-weight-only", action="store_true", help="sweep: skip the weight-only comparison")
        p.add_argument("--latency", action="store_true", help="sweep: also time each rewritten model (slow)")
        if self.plot:
            p.add_argument("--plot", metavar="FILE.png", help="sweep: draw the curve (needs matplotlib: sepify[plot])")


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


__all__ = ["error_message", "ArgGroup", "CalibrationArgs", "FLAGS", "LatencyArgs", "LatencyOptions", "PolicyArgs", "ShapeArgs",
           "SweepArgs", "ToleranceArgs"]
