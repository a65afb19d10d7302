"""The ``sepify`` command: a thin shell over the Python API (parse, call, render, exit code).

Exit codes: 0 success · 1 verify found drift beyond tolerance · 2 bad input (unreadable or
invalid model, bad arguments, unresolvable shapes) · 3 internal error (a bug; ``--debug``
shows the traceback).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Sequence

from ..errors import EXIT_BAD_INPUT, EXIT_INTERNAL, SepifyError, UsageError
from ..version import __version__
from .args import CalibrationArgs, LatencyArgs, PolicyArgs, ShapeArgs, SweepArgs, ToleranceArgs, error_message


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so usage errors share the one-line error path."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def _common(p: argparse.ArgumentParser) -> None:
    # Accepted after the subcommand too (``sepify audit --debug M``); main() reads it from argv.
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sepify", description="Find the expensive convolutions in an ONNX model and make them cheaper.")
    parser.add_argument("--version", action="version", version=f"sepify {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    a = sub.add_parser("audit", help="cost and separability of every Conv-like node")
    _common(a)
    a.add_argument("models", nargs="+", metavar="MODEL", help="ONNX file(s) or folder(s) of .onnx files")
    ShapeArgs().add(a)
    a.add_argument("--format", choices=("table", "json", "csv", "md"), default="table")
    a.add_argument("-o", "--output", metavar="FILE", help="write the report here (atomically) instead of stdout")
    a.add_argument("--sort", choices=("macs", "name", "graph"), default="macs")
    a.add_argument("--top", type=int, default=None, metavar="K", help="only the K most expensive nodes per model")
    a.add_argument("--no-spectra", action="store_true", help="cost only, skip the separability analysis")
    a.add_argument("--certify", action="store_true",
                   help="prove for every large weight matrix that no exact split up to its break-even rank exists "
                        "(slower; by default ranks up to 32 are examined and the report says so)")

    r = sub.add_parser("rewrite", help="replace eligible convolutions by cheaper factorized chains")
    _common(r)
    r.add_argument("model", metavar="MODEL")
    r.add_argument("-o", "--output", metavar="OUT", help="where to write the rewritten model")
    r.add_argument("--in-place", action="store_true", help="overwrite MODEL (only when asked)")
    ShapeArgs().add(r)
    PolicyArgs().add(r)
    LatencyArgs().add(r)
    r.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    r.add_argument("--report", metavar="FILE.json", help="write the rewrite report as JSON")
    r.add_argument("--format", choices=("table", "json"), default="table", help="how to print the plan")
    r.add_argument("--verify", action="store_true", help="compare original and rewritten outputs after writing")
    r.add_argument("--bench", action="store_true", help="time original vs rewritten after writing")
    ToleranceArgs().add(r)
    CalibrationArgs(html=True).add(r)

    v = sub.add_parser("verify", help="compare two models' outputs in onnxruntime (exit 1 on drift)")
    _common(v)
    v.add_argument("original", metavar="ORIGINAL")
    v.add_argument("rewritten", metavar="REWRITTEN")
    ShapeArgs().add(v)
    v.add_argument("--inputs", metavar="FILE.npz", help="real inputs keyed by input name")
    v.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    ToleranceArgs().add(v)
    v.add_argument("--per-layer", action="store_true", help="also compare the rewritten nodes' outputs")
    v.add_argument("--format", choices=("table", "json"), default="table")

    b = sub.add_parser("bench", help="latency of a model, or of two in interleaved rounds")
    _common(b)
    b.add_argument("model", metavar="MODEL")
    b.add_argument("other", metavar="OTHER", nargs="?")
    ShapeArgs().add(b)
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

    for name, helptext in (("plan", "show the rewrite plan; with --sweep the MACs/drift trade-off curve"),
                           ("report", "write a self-contained HTML report (audit, plan, calibration, curve)")):
        p = sub.add_parser(name, help=helptext)
        _common(p)
        p.add_argument("model", metavar="MODEL")
        ShapeArgs().add(p)
        PolicyArgs().add(p)
        CalibrationArgs(html=name == "plan").add(p)
        SweepArgs(plot=name == "plan").add(p)
        if name == "plan":
            p.add_argument("--format", choices=("table", "json"), default="table")
            p.add_argument("-o", "--output", metavar="FILE", help="write the table/JSON here instead of stdout")
        else:
            p.add_argument("-o", "--output", metavar="FILE.html", required=True, help="where to write the page")
            p.add_argument("--verify", action="store_true",
                           help="per-layer drift of the rewritten model on --eval (or the calibration) samples")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .commands import COMMANDS

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        args.debug = debug
        if not args.command:
            parser.print_help(sys.stderr)
            return EXIT_BAD_INPUT
        return COMMANDS[args.command](args)
    except SepifyError as exc:
        if debug:
            traceback.print_exc()
        print(f"sepify: error: {error_message(exc)}", file=sys.stderr)
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
