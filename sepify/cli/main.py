"""The ``sepify`` command: a thin shell over the Python API (parse, call, render, exit code).

Exit codes: 0 success · 1 verify found drift beyond tolerance (or the --max-drift / --min-cosine /
--min-top1 criteria failed) · 2 bad input (unreadable or invalid model, bad arguments,
unresolvable shapes; in a multi-model audit: any model failed) · 3 internal error (a bug;
``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Sequence

from ..errors import EXIT_BAD_INPUT, EXIT_INTERNAL, SepifyError, UsageError
from ..core.schemes import names as scheme_names
from ..version import __version__
from .args import (BenchArgs, CalibrationArgs, GateArgs, HelpFormatter, LatencyArgs, PolicyArgs, ProgressArgs, ShapeArgs,
                   SweepArgs, ToleranceArgs, error_message)


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so usage errors share the one-line error path."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*a, **kw)

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def _common(p: argparse.ArgumentParser) -> None:
    # Accepted after the subcommand too (``sepify audit M --debug``); main() reads it from argv.
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")


def _format(p, choices, what: str, default: str | None = "table") -> None:
    p.add_argument("--format", choices=choices, default=default,
                   help=f"{what}: table for people, json for programs (stdout then holds exactly one JSON document)"
                   + ("" if default else "; default: from -o's suffix (.json, .csv, .md), else table"))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sepify", description="Find the expensive convolutions in an ONNX model and make them "
                                                "cheaper. Run `sepify COMMAND --help` for a command's flags.")
    parser.add_argument("--version", action="version", version=f"sepify {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    a = sub.add_parser("audit", help="cost and separability of every Conv-like node",
                       description="Cost and separability of every Conv-like node; several models or a folder give "
                                   "one status row per model, then the details of each.")
    _common(a)
    a.add_argument("models", nargs="+", metavar="MODEL", help="ONNX file(s) or folder(s) of .onnx files")
    ShapeArgs().add(a)
    _format(a, ("table", "json", "csv", "md"), "report format (csv: one row per node; md: Markdown)", default=None)
    a.add_argument("-o", "--output", metavar="FILE", help="write the report here (atomically) instead of stdout")
    a.add_argument("--sort", choices=("macs", "name", "graph"), default="macs",
                   help="node order: most MACs first, by name, or as in the graph")
    a.add_argument("--top", type=int, default=None, metavar="K",
                   help="only the K most expensive nodes per model (default: all)")
    a.add_argument("--no-spectra", action="store_true", help="cost only, skip the separability analysis")
    a.add_argument("--certify", action="store_true",
                   help="prove for every large weight matrix that no exact split up to its break-even rank exists "
                        "(slower; by default ranks up to 32 are examined and the report says so)")
    a.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="audit several models in N parallel processes (a failing model never stops the others)")
    ProgressArgs().add(a)

    r = sub.add_parser("rewrite", help="replace eligible convolutions by cheaper factorized chains",
                       description="Replace eligible convolutions by cheaper factorized chains and write the model.")
    _common(r)
    r.add_argument("model", metavar="MODEL", help="the ONNX model to rewrite")
    r.add_argument("-o", "--output", metavar="OUT", help="where to write the rewritten model")
    r.add_argument("--in-place", action="store_true", help="overwrite MODEL (only when asked)")
    ShapeArgs().add(r)
    PolicyArgs().add(r)
    LatencyArgs().add(r)
    r.add_argument("--dry-run", action="store_true",
                   help="write no model (-o and --in-place are left alone); print the plan, and --verify / --bench "
                        "the rewrite in memory")
    r.add_argument("--report", metavar="FILE.json", help="write the rewrite report as JSON")
    _format(r, ("table", "json"), "how to print the plan (and --verify / --bench)")
    r.add_argument("--verify", action="store_true",
                   help="compare original and rewritten outputs in onnxruntime (exit 1 when they differ beyond the "
                        "tolerance or the pass criteria)")
    r.add_argument("--bench", action="store_true", help="time original vs rewritten in onnxruntime")
    ToleranceArgs().add(r)
    GateArgs(drift=False).add(r)
    CalibrationArgs(html=True, verify=True).add(r)
    ProgressArgs().add(r)

    v = sub.add_parser("verify", help="compare two models' outputs in onnxruntime (exit 1 on drift)",
                       description="Run both models on the same inputs in onnxruntime and compare every output.")
    _common(v)
    v.add_argument("original", metavar="ORIGINAL", help="the reference model")
    v.add_argument("rewritten", metavar="REWRITTEN", help="the model to check against it")
    ShapeArgs().add(v)
    v.add_argument("--inputs", metavar="DATA",
                   help="real inputs, as --calibrate takes them: an .npz keyed by input name or a folder of "
                        ".npy/.npz, each array's first axis the sample axis; every sample is run (default: random "
                        "inputs)")
    v.add_argument("--seed", type=int, default=None, metavar="S", help="seed of the random inputs (default: 0)")
    ToleranceArgs().add(v)
    GateArgs(drift=True).add(v)
    v.add_argument("--per-layer", action="store_true", help="also compare the rewritten nodes' outputs")
    _format(v, ("table", "json"), "report format")

    b = sub.add_parser("bench", help="latency of a model, or of two in interleaved rounds",
                       description="Latency in onnxruntime: one model, or two in interleaved A/B rounds with the "
                                   "speedup, MAC reduction, efficiency and per-conv profiler times.")
    _common(b)
    b.add_argument("model", metavar="MODEL", help="the model to time (the original, with OTHER)")
    b.add_argument("other", metavar="OTHER", nargs="?", help="a second model (the rewrite) timed against MODEL")
    ShapeArgs().add(b)
    BenchArgs().add(b)
    _format(b, ("table", "json"), "report format")

    t = sub.add_parser("latency-table", help="measure a model's convs and candidate chains on this machine (the "
                                             "deployment target) for --latency-table",
                       description="Time every conv of MODEL and each candidate chain on the latency grid in "
                                   "onnxruntime at --threads, plus the whole model, and write the latency table "
                                   "that --latency-table plans with elsewhere.")
    _common(t)
    t.add_argument("model", metavar="MODEL", help="the ONNX model")
    t.add_argument("-o", "--output", metavar="FILE.json", required=True, help="where to write the table")
    ShapeArgs().add(t)
    t.add_argument("--threads", type=int, default=None, metavar="T",
                   help="onnxruntime intra-op threads to measure at (default: onnxruntime's)")
    t.add_argument("--scheme", action="append", default=None, choices=scheme_names(),
                   help="only these schemes' candidates (repeatable; default: every registered scheme)")
    t.add_argument("--linear", action="store_true",
                   help="also the MatMul / Gemm layers with a constant weight and their pw-lowrank chains "
                        "(for plans with --linear)")
    _format(t, ("table", "json"), "how to print the summary")
    ProgressArgs().add(t)

    for name, helptext in (("plan", "show the rewrite plan; with --sweep the MACs/drift trade-off curve"),
                           ("report", "write a self-contained HTML report (audit, plan, calibration, curve)")):
        p = sub.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + "; nothing else "
                           "is written.")
        _common(p)
        p.add_argument("model", metavar="MODEL", help="the ONNX model")
        ShapeArgs().add(p)
        PolicyArgs(threads=True).add(p)
        CalibrationArgs(html=name == "plan").add(p)
        SweepArgs(plot=name == "plan").add(p)
        ProgressArgs().add(p)
        if name == "plan":
            _format(p, ("table", "json"), "how to print the plan or the sweep")
            p.add_argument("-o", "--output", metavar="FILE", help="write the table/JSON here instead of stdout")
        else:
            p.add_argument("-o", "--output", metavar="FILE.html", required=True, help="where to write the page")
            p.add_argument("--verify", action="store_true",
                           help="per-layer drift of the rewritten model on every --eval (or calibration) sample")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .commands import COMMANDS

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if sys.stderr is None:  # started with stderr closed: messages have nowhere to go (print would use stdout)
        sys.stderr = open(os.devnull, "w")
    if sys.stdout is None:  # started with stdout closed: where the results go
        print("sepify: error: standard output is closed (sepify writes its results and tables there)", file=sys.stderr)
        return EXIT_BAD_INPUT
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
    except MemoryError as exc:  # a size the machine cannot hold (e.g. --input-shape 1x3x100000x100000): not a bug
        if debug:
            traceback.print_exc()
        said = " ".join(str(exc).split()) or "MemoryError"
        print(f"sepify: error: out of memory ({said}); give smaller input dims (--input-shape) or fewer samples "
              "(--calib-samples, --calib-rows)", file=sys.stderr)
        return EXIT_BAD_INPUT
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


def run() -> None:
    """The ``sepify`` command and ``python -m sepify``: :func:`main`, then leave without tearing the
    interpreter down.  By then every file sepify writes is closed and renamed into place; what is
    left is freeing the loaded model, its arrays and the worker threads one object at a time (≈40 ms
    after an audit of a 100 MB model, a tenth of the whole command).  Under a profiler or a tracer
    (cProfile, coverage), whose reports are written at exit, the interpreter exits normally."""
    code = main()
    if sys.getprofile() is not None or sys.gettrace() is not None or os.environ.get("SEPIFY_NORMAL_EXIT"):
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # no stream (closed at start), the reader went away (| head)
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
