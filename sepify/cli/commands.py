"""The commands: each parses its argument groups into API options, calls the API, renders, and
returns the exit code.  The end of a rewrite (save, report, print, verify, bench, html) is one
function, :func:`finish_rewrite`, for the weight-only and the calibrated path alike."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from ..errors import EXIT_BAD_INPUT, EXIT_DRIFT, EXIT_OK, SepifyError, UsageError
from ..serialize import dumps
from .args import CalibrationArgs, LatencyArgs, PolicyArgs, ShapeArgs, ToleranceArgs, error_message


def naming_file(exc: SepifyError, path) -> SepifyError:
    """``exc``'s message (flags named, see :func:`~sepify.cli.main.error_message`) prefixed by ``path``
    unless it already names it; the same exit code."""
    msg = error_message(exc)
    if str(path) in msg:
        return exc
    named = SepifyError(f"{path}: {msg}")
    named.exit_code = exc.exit_code
    return named


def print_error(exc: BaseException, path: Path | None = None) -> None:
    msg = error_message(exc)
    if path is not None and str(path) not in msg:
        msg = f"{path}: {msg}"
    print(f"sepify: error: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# audit
# ----------------------------------------------------------------------------------------------
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
    import traceback

    from ..pipeline.audit import audit
    from ..render.text import render_audit

    if args.top is not None and args.top < 1:
        raise UsageError(f"--top {args.top}: needs a positive number of nodes")
    shapes = ShapeArgs().parse(args)
    reports = []
    failed = 0
    for path in _expand_models(args.models):
        try:
            reports.append(audit(path, shapes["input_shapes"], input_values=shapes["input_values"],
                                 spectra=not args.no_spectra, certify=args.certify))
        except SepifyError as exc:
            failed += 1
            if args.debug:
                traceback.print_exc()
            print_error(exc, path)
    if reports:
        text = render_audit(reports, args.format, args.sort, args.top)
        if args.output and not failed:
            from ..model.save import write_text_atomic

            write_text_atomic(args.output, text)
        else:
            sys.stdout.write(text)
    return EXIT_BAD_INPUT if failed else EXIT_OK


# ----------------------------------------------------------------------------------------------
# rewrite
# ----------------------------------------------------------------------------------------------
def _check_targets(args) -> None:
    from ..model.save import check_writable, same_file

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


def cmd_rewrite(args) -> int:
    from ..model.load import load_model

    policy = PolicyArgs().parse(args)
    latency = LatencyArgs().parse(args)
    calibration = CalibrationArgs().parse(args)
    shapes = ShapeArgs().parse(args)
    _check_targets(args)
    loaded = load_model(args.model)
    try:
        if calibration is not None:
            if latency.only_faster:
                raise UsageError("--only-faster cannot be combined with --calibrate yet")
            from ..calibration.calibrate import calibrated_rewrite

            model, report, cal = calibrated_rewrite(loaded, policy, args.calibrate, shapes["input_shapes"],
                                                    input_values=shapes["input_values"], lowering=latency.lowering,
                                                    options=calibration)
        else:
            from ..pipeline.rewrite import rewrite

            model, report = rewrite(loaded, policy, shapes["input_shapes"], input_values=shapes["input_values"],
                                    lowering=latency.lowering, only_faster=latency.only_faster,
                                    threads=latency.threads, latency_runs=latency.latency_runs)
            cal = None
    except SepifyError as exc:
        named = naming_file(exc, args.model)
        if named is exc:
            raise
        raise named from exc
    return finish_rewrite(args, loaded, model, report, cal, shapes, latency)


def finish_rewrite(args, loaded, model, report, cal, shapes, latency) -> int:
    """Save the model, write the JSON report, print the plan, then --verify / --bench / --html."""
    from ..model.save import save_model, write_text_atomic
    from ..render.text import render_calibration, render_latency, render_rewrite

    if not args.dry_run:
        save_model(model, args.output, external=loaded.has_external_data or None, source=loaded)
    record = report.to_dict()
    if cal is not None:
        record["calibration"] = cal.to_dict()
    if args.report:
        write_text_atomic(args.report, dumps(record))
    if args.format == "json":
        sys.stdout.write(dumps(record) + "\n")
    else:
        sys.stdout.write(render_rewrite(report, args.output if not args.dry_run else None) + render_latency(report)
                         + (render_calibration(cal) if cal is not None else ""))
    status = EXIT_OK
    drift = None
    if (args.verify or args.bench) and not args.dry_run:
        from ..render.text import render_bench, render_drift

        if args.verify:
            from ..pipeline.verify import verify

            drift = verify(args.model, args.output, input_shapes=shapes["input_shapes"],
                           input_values=shapes["input_values"], atol=args.atol, rtol=args.rtol,
                           per_layer=bool(args.html))
            sys.stdout.write(render_drift(drift))
            status = EXIT_OK if drift.passed else EXIT_DRIFT
        if args.bench:
            from ..pipeline.bench import benchmark

            sys.stdout.write(render_bench(benchmark(args.model, args.output, input_shapes=shapes["input_shapes"],
                                                    input_values=shapes["input_values"], threads=latency.threads)))
    if args.html:
        from ..render.html import write_html_report

        write_html_report(args.html, loaded, shapes["input_shapes"], rewrite=report, calibration=cal, drift=drift,
                          input_values=shapes["input_values"])
    return status


# ----------------------------------------------------------------------------------------------
# verify, bench
# ----------------------------------------------------------------------------------------------
def cmd_verify(args) -> int:
    from ..pipeline.verify import verify
    from ..render.text import render_drift

    shapes = ShapeArgs().parse(args)
    report = verify(args.original, args.rewritten, args.inputs, shapes["input_shapes"],
                    input_values=shapes["input_values"], seed=args.seed, **ToleranceArgs().parse(args),
                    per_layer=args.per_layer)
    sys.stdout.write(report.to_json() + "\n" if args.format == "json" else render_drift(report))
    return EXIT_OK if report.passed else EXIT_DRIFT


def cmd_bench(args) -> int:
    from ..pipeline.bench import benchmark
    from ..render.text import render_bench

    if args.runs < 1 or args.warmup < 0:
        raise UsageError("--runs must be ≥ 1 and --warmup ≥ 0")
    shapes = ShapeArgs().parse(args)
    report = benchmark(args.model, args.other, runs=args.runs, warmup=args.warmup, threads=args.threads,
                       providers=args.providers, input_shapes=shapes["input_shapes"],
                       input_values=shapes["input_values"],
                       profile_runs=0 if args.no_profile else 20, spinning=args.spinning, rewarm=0 if args.cold else 1)
    sys.stdout.write(report.to_json() + "\n" if args.format == "json" else render_bench(report))
    return EXIT_OK


# ----------------------------------------------------------------------------------------------
# plan, report
# ----------------------------------------------------------------------------------------------
def _sweep(args, loaded, calibration):
    from ..calibration.sweep import parse_budgets, sweep

    if calibration is None:
        raise UsageError("--sweep measures drift on data: add --calibrate DATA (or --calibrate random)")
    shapes = ShapeArgs().parse(args)
    return sweep(loaded, args.calibrate, parse_budgets(args.budgets), shapes["input_shapes"],
                 policy=PolicyArgs().parse(args), input_values=shapes["input_values"], eval_data=args.eval,
                 weight_only=not args.no_weight_only, latency=args.latency, options=calibration)


def _in_memory(args, loaded, calibration):
    """(ModelProto, RewriteReport, CalibrationReport | None); nothing is written."""
    shapes = ShapeArgs().parse(args)
    policy = PolicyArgs().parse(args)
    if calibration is not None:
        from ..calibration.calibrate import calibrated_rewrite

        return calibrated_rewrite(loaded, policy, args.calibrate, shapes["input_shapes"],
                                  input_values=shapes["input_values"], options=calibration)
    from ..pipeline.rewrite import rewrite

    model, report = rewrite(loaded, policy, shapes["input_shapes"], input_values=shapes["input_values"])
    return model, report, None


def cmd_plan(args) -> int:
    from ..model.load import load_model
    from ..model.save import write_text_atomic
    from ..render.html import write_html_report
    from ..render.text import render_calibration, render_rewrite

    calibration = CalibrationArgs(html=True).parse(args)
    shapes = ShapeArgs().parse(args)
    if args.plot and args.sweep:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:  # before the long sweep, not after
            raise UsageError("--plot needs matplotlib: pip install 'sepify[plot]'")
    loaded = load_model(args.model)
    if args.sweep:
        result = _sweep(args, loaded, calibration)
        if args.format == "json":
            text = result.to_json() + "\n"
        else:
            from ..render.text import render_sweep

            text = render_sweep(result)
        if args.plot:
            from ..render.plot import plot_sweep

            plot_sweep(result, args.plot)
        if args.html:
            write_html_report(args.html, loaded, shapes["input_shapes"], sweep=result, input_values=shapes["input_values"])
    else:
        if args.plot:
            raise UsageError("--plot draws the --sweep curve; add --sweep")
        _, report, cal = _in_memory(args, loaded, calibration)
        if args.format == "json":
            d = report.to_dict()
            if cal is not None:
                d["calibration"] = cal.to_dict()
            text = dumps(d) + "\n"
        else:
            text = render_rewrite(report, None) + (render_calibration(cal) if cal is not None else "")
        if args.html:
            write_html_report(args.html, loaded, shapes["input_shapes"], rewrite=report, calibration=cal,
                              input_values=shapes["input_values"])
    if args.output:
        write_text_atomic(args.output, text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_report(args) -> int:
    from ..model.load import load_model
    from ..pipeline.verify import verify
    from ..render.html import write_html_report

    calibration = CalibrationArgs(html=False).parse(args)
    shapes = ShapeArgs().parse(args)
    loaded = load_model(args.model)
    parts: dict = {}
    if args.sweep:
        parts["sweep"] = _sweep(args, loaded, calibration)
    model, report, cal = _in_memory(args, loaded, calibration)
    parts["rewrite"], parts["calibration"] = report, cal
    if args.verify and report.changed:
        data = args.eval or (args.calibrate if args.calibrate and args.calibrate != "random" else None)
        inputs = _verify_inputs(data, loaded) if data else None
        parts["drift"] = verify(loaded, model, inputs, shapes["input_shapes"], input_values=shapes["input_values"],
                                per_layer=True)
        if data:
            n = next(iter(inputs.values())).shape[0]
            parts["drift"].input_source = f"{data} ({n} sample(s) in one batch)"
    write_html_report(args.output, loaded, shapes["input_shapes"], input_values=shapes["input_values"], **parts)
    sys.stdout.write(f"report written to {args.output}\n")
    return EXIT_OK


def _verify_inputs(data, loaded):
    """One feed for ``verify``: the samples concatenated on the batch axis when it is symbolic, else the first."""
    import numpy as np

    from ..calibration.data import load_calibration

    cs = load_calibration(data, loaded, samples=16)
    if len(cs.feeds) == 1:
        return cs.feeds[0]
    try:
        return {k: np.concatenate([f[k] for f in cs.feeds]) for k in cs.feeds[0]} if cs.stack_axis else cs.feeds[0]
    except ValueError:
        return cs.feeds[0]


COMMANDS = {"audit": cmd_audit, "rewrite": cmd_rewrite, "verify": cmd_verify, "bench": cmd_bench,
            "plan": cmd_plan, "report": cmd_report}

__all__ = ["COMMANDS", "finish_rewrite", "naming_file", "print_error"]
