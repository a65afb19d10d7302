"""The ``sepify`` command: a thin shell over the Python API (parse, call, render, exit code).

Exit codes: 0 success · 1 verify found drift beyond tolerance · 2 bad input (unreadable or
invalid model, bad arguments, unresolvable shapes) · 3 internal error (a bug; ``--debug``
shows the traceback).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Sequence

from ..version import __version__
from ..errors import EXIT_BAD_INPUT, EXIT_DRIFT, EXIT_INTERNAL, EXIT_OK, SepifyError, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so usage errors share the one-line error path."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def _add_shape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=DIMS",
                   help="concrete dims for an input, e.g. images=1x3x640x640 (repeatable); "
                        "symbolic leading dims default to 1")
    p.add_argument("--input-value", action="append", default=[], metavar="NAME=V",
                   help="feed this input a fixed value instead of a random one wherever the model is run "
                        "(shape fallback, verify, bench, random calibration data), e.g. sr=16000; a list "
                        "V1,V2,… gives every element (repeatable). For models that branch on an input's value")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sepify", description="Find the expensive convolutions in an ONNX model and make them cheaper.")
    parser.add_argument("--version", action="version", version=f"sepify {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    a = sub.add_parser("audit", help="cost and separability of every Conv-like node")
    a.add_argument("models", nargs="+", metavar="MODEL", help="ONNX file(s) or folder(s) of .onnx files")
    _add_shape_args(a)
    a.add_argument("--format", choices=("table", "json", "csv", "md"), default="table")
    a.add_argument("-o", "--output", metavar="FILE", help="write the report here (atomically) instead of stdout")
    a.add_argument("--sort", choices=("macs", "name", "graph"), default="macs")
    a.add_argument("--top", type=int, default=None, metavar="K", help="only the K most expensive nodes per model")
    a.add_argument("--no-spectra", action="store_true", help="cost only, skip the separability analysis")

    r = sub.add_parser("rewrite", help="replace eligible convolutions by cheaper factorized chains")
    r.add_argument("model", metavar="MODEL")
    r.add_argument("-o", "--output", metavar="OUT", help="where to write the rewritten model")
    r.add_argument("--in-place", action="store_true", help="overwrite MODEL (only when asked)")
    _add_shape_args(r)
    from .calibration import add_policy_args

    add_policy_args(r)
    r.add_argument("--lowering", choices=("branches", "grouped", "concat"), default=None,
                   help="how a rank>1 dw-pw/pw-dw is written (same math): r summed multiplier-1 branches "
                        "(default), one grouped conv, or concat (dw-pw: r depthwise, Concat, one pointwise; "
                        "pw-dw: one pointwise, Split, r depthwise, Adds); with --only-faster: the only one tried")
    lat = r.add_argument_group("latency-aware selection")
    lat.add_argument("--only-faster", action="store_true",
                     help="time each planned rewrite against its original conv in onnxruntime (isolated, real "
                          "shapes) and keep it only if faster, written in its fastest lowering")
    lat.add_argument("--threads", type=int, default=None, metavar="T",
                     help="onnxruntime intra-op threads for --only-faster and --bench (default: onnxruntime's)")
    lat.add_argument("--latency-runs", type=int, default=None, metavar="N",
                     help="interleaved rounds per node for --only-faster (default: as many as fit 1 s, 10-50)")
    r.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    r.add_argument("--report", metavar="FILE.json", help="write the rewrite report as JSON")
    r.add_argument("--format", choices=("table", "json"), default="table", help="how to print the plan")
    r.add_argument("--verify", action="store_true", help="compare original and rewritten outputs after writing")
    r.add_argument("--bench", action="store_true", help="time original vs rewritten after writing")
    _add_tolerance_args(r)
    from .calibration import add_calibration_args

    add_calibration_args(r)

    v = sub.add_parser("verify", help="compare two models' outputs in onnxruntime (exit 1 on drift)")
    v.add_argument("original", metavar="ORIGINAL")
    v.add_argument("rewritten", metavar="REWRITTEN")
    _add_shape_args(v)
    v.add_argument("--inputs", metavar="FILE.npz", help="real inputs keyed by input name")
    v.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    _add_tolerance_args(v)
    v.add_argument("--per-layer", action="store_true", help="also compare the rewritten nodes' outputs")
    v.add_argument("--format", choices=("table", "json"), default="table")

    b = sub.add_parser("bench", help="latency of a model, or of two in interleaved rounds")
    b.add_argument("model", metavar="MODEL")
    b.add_argument("other", metavar="OTHER", nargs="?")
    _add_shape_args(b)
    b.add_argument("--runs", type=int, default=100)
    b.add_argument("--warmup", type=int, default=10)
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--providers", nargs="+", default=None, metavar="EP")
    b.add_argument("--no-profile", action="store_true", help="skip per-node profiler times")
    b.add_argument("--spinning", choices=("run", "off"), default="run",
                   help="worker threads spin within a run and stop when it returns (default), or never spin")
    b.add_argument("--cold", action="store_true",
                   help="time each run right after the other model's (no untimed re-warm run per round)")
    b.add_argument("--format", choices=("table", "json"), default="table")
    from .calibration import add_commands

    add_commands(sub, _add_shape_args)
    return parser


def _add_tolerance_args(p: argparse.ArgumentParser) -> None:
    from ..pipeline.verify import DEFAULT_ATOL, DEFAULT_RTOL, LOW_PRECISION_ULPS

    p.add_argument("--atol", type=float, default=None,
                   help=f"absolute tolerance (default {DEFAULT_ATOL}; float16 outputs: {LOW_PRECISION_ULPS}·eps·max|a|)")
    p.add_argument("--rtol", type=float, default=None,
                   help=f"relative tolerance (default {DEFAULT_RTOL}; float16 outputs: 2·eps)")


def cmd_verify(args) -> int:
    from ..render.text import render_drift
    from ..pipeline.verify import verify

    report = verify(args.original, args.rewritten, args.inputs, args.input_shape or None,
                    input_values=args.input_value or None, seed=args.seed, atol=args.atol, rtol=args.rtol,
                    per_layer=args.per_layer)
    sys.stdout.write(report.to_json() + "\n" if args.format == "json" else render_drift(report))
    return EXIT_OK if report.passed else EXIT_DRIFT


def cmd_bench(args) -> int:
    from ..pipeline.bench import benchmark
    from ..render.text import render_bench

    if args.runs < 1 or args.warmup < 0:
        raise UsageError("--runs must be ≥ 1 and --warmup ≥ 0")
    report = benchmark(args.model, args.other, runs=args.runs, warmup=args.warmup, threads=args.threads,
                       providers=args.providers, input_shapes=args.input_shape or None,
                       input_values=args.input_value or None,
                       profile_runs=0 if args.no_profile else 20, spinning=args.spinning, rewarm=0 if args.cold else 1)
    sys.stdout.write(report.to_json() + "\n" if args.format == "json" else render_bench(report))
    return EXIT_OK


def _policy_from_args(args):
    from ..pipeline.plan import Policy

    return Policy.from_args(
        lossless=args.lossless, tol=args.tol, rank=args.rank, budget=args.budget, scheme=args.scheme,
        include=args.include, exclude=args.exclude, min_macs=args.min_macs, chain=not args.no_chain,
    )


def cmd_rewrite(args) -> int:
    from ..model.load import load_model
    from ..render.text import render_rewrite
    from ..pipeline.rewrite import rewrite
    from ..model.save import check_writable, save_model, same_file, write_text_atomic

    policy = _policy_from_args(args)
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be ≥ 1")
    if args.latency_runs is not None and args.latency_runs < 1:
        raise UsageError("--latency-runs must be ≥ 1")
    if not args.dry_run:
        if args.in_place:
            if args.output and not same_file(args.output, args.model):
                raise UsageError("--in-place and -o name different files; use one")
            args.output = args.model
        elif not args.output:
            raise UsageError("rewrite needs -o OUT (or --in-place, or --dry-run)")
        elif same_file(args.output, args.model):
            raise UsageError(f"-o {args.output} is the input model; pass --in-place to overwrite it")
    for target in ([] if args.dry_run else [args.output]) + ([args.report] if args.report else []) + \
            ([args.html] if args.html else []):
        check_writable(target)  # before any work: a bad target must not leave a model written
    from .calibration import run_calibrated_rewrite, wants_calibration, write_rewrite_html

    if wants_calibration(args):
        return run_calibrated_rewrite(args)
    try:
        loaded = load_model(args.model)
        model, report = rewrite(loaded, policy, args.input_shape or None, input_values=args.input_value or None,
                                lowering=args.lowering, only_faster=args.only_faster, threads=args.threads,
                                latency_runs=args.latency_runs)
    except SepifyError as exc:
        named = naming_file(exc, args.model)
        if named is exc:
            raise
        raise named from exc
    if not args.dry_run:
        save_model(model, args.output, external=loaded.has_external_data or None, source=loaded)
    if args.report:
        write_text_atomic(args.report, report.to_json())
    if args.format == "json":
        sys.stdout.write(report.to_json() + "\n")
    else:
        from ..pipeline.latency import render_latency

        sys.stdout.write(render_rewrite(report, args.output if not args.dry_run else None) + render_latency(report))
    status = EXIT_OK
    if (args.verify or args.bench) and not args.dry_run:
        from ..render.text import render_bench, render_drift

        if args.verify:
            from ..pipeline.verify import verify

            drift = verify(args.model, args.output, input_shapes=args.input_shape or None,
                           input_values=args.input_value or None, atol=args.atol, rtol=args.rtol)
            sys.stdout.write(render_drift(drift))
            status = EXIT_OK if drift.passed else EXIT_DRIFT
        if args.bench:
            from ..pipeline.bench import benchmark

            sys.stdout.write(render_bench(benchmark(args.model, args.output, input_shapes=args.input_shape or None,
                                                    input_values=args.input_value or None, threads=args.threads)))
    if args.html:
        write_rewrite_html(args, loaded, report)
    return status


def _expand_models(items: Sequence[str]) -> list[Path]:
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.rglob("*.onnx"))
            if not found:
                raise UsageError(f"{p}: folder holds no .onnx files")
            paths.extend(found)
        else:
            paths.append(p)
    return paths


def cmd_audit(args) -> int:
    from ..pipeline.audit import audit
    from ..render.text import render_audit

    if args.top is not None and args.top < 1:
        raise UsageError("--top needs a positive number of nodes")
    reports = []
    failed = 0
    for path in _expand_models(args.models):
        try:
            reports.append(audit(path, args.input_shape or None, input_values=args.input_value or None,
                                 spectra=not args.no_spectra))
        except SepifyError as exc:
            failed += 1
            if args.debug:
                traceback.print_exc()
            _print_error(exc, path)
    if reports:
        text = render_audit(reports, args.format, args.sort, args.top)
        if args.output and not failed:
            from ..model.save import write_text_atomic

            write_text_atomic(args.output, text)
        else:
            sys.stdout.write(text)
    return EXIT_BAD_INPUT if failed else EXIT_OK


def naming_file(exc: SepifyError, path) -> SepifyError:
    """``exc`` with its message prefixed by ``path`` (unless it already names it), same type and exit code."""
    if str(path) in str(exc):
        return exc
    named = type(exc)(f"{path}: {exc}")
    named.exit_code = exc.exit_code
    return named


def _print_error(exc: BaseException, path: Path | None = None) -> None:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if path is not None and str(path) not in msg:
        msg = f"{path}: {msg}"
    print(f"sepify: error: {msg}", file=sys.stderr)


def cmd_plan(args) -> int:
    from .calibration import cmd_plan as run

    return run(args)


def cmd_report(args) -> int:
    from .calibration import cmd_report as run

    return run(args)


COMMANDS = {"audit": cmd_audit, "rewrite": cmd_rewrite, "verify": cmd_verify, "bench": cmd_bench,
            "plan": cmd_plan, "report": cmd_report}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help(sys.stderr)
            return EXIT_BAD_INPUT
        return COMMANDS[args.command](args)
    except SepifyError as exc:
        if debug:
            traceback.print_exc()
        _print_error(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        print("sepify: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no tracebacks for users
        if debug:
            traceback.print_exc()
        print(f"sepify: internal error: {type(exc).__name__}: {exc} (rerun with --debug for a traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
