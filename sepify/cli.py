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

from . import __version__
from .errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_OK, SepifyError, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so usage errors share the one-line error path."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def _add_shape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=DIMS",
                   help="concrete dims for an input, e.g. images=1x3x640x640 (repeatable); "
                        "symbolic leading dims default to 1")


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
    return parser


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
    from .audit import audit
    from .report import render_audit

    reports = []
    failed = 0
    for path in _expand_models(args.models):
        try:
            reports.append(audit(path, args.input_shape or None, spectra=not args.no_spectra))
        except SepifyError as exc:
            failed += 1
            _print_error(exc, path)
    if reports:
        text = render_audit(reports, args.format, args.sort, args.top)
        if args.output and not failed:
            from .save import write_text_atomic

            write_text_atomic(args.output, text)
        else:
            sys.stdout.write(text)
    return EXIT_BAD_INPUT if failed else EXIT_OK


def _print_error(exc: BaseException, path: Path | None = None) -> None:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if path is not None and str(path) not in msg:
        msg = f"{path}: {msg}"
    print(f"sepify: error: {msg}", file=sys.stderr)


COMMANDS = {"audit": cmd_audit}


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
