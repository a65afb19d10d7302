"""The commands: each parses its argument groups into API options, calls the API, renders, and
returns the exit code.  The end of a rewrite (save, verify, bench, report, html, print) is one
function, :func:`finish_rewrite`, for the weight-only and the calibrated path alike.

Output conventions: tables fit the terminal (:func:`sepify.render.table.output_width`); with
``--format json`` stdout holds exactly one JSON document — whatever else was asked (``--verify``,
``--bench``, ``--only-faster``) is folded into it, and status lines ("HTML report written to …")
go to stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import EXIT_BAD_INPUT, EXIT_DRIFT, EXIT_OK, SepifyError, UsageError
from ..serialize import dumps
from .args import (CalibrationArgs, GateArgs, LatencyArgs, PolicyArgs, ShapeArgs, SweepArgs, ToleranceArgs,
                   error_message, progress_wanted, refuse)


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


def say(args, line: str) -> None:
    """A status line: stdout next to tables, stderr when stdout holds a JSON document."""
    print(line, file=sys.stderr if getattr(args, "format", None) == "json" else sys.stdout)


def _width(args):
    from ..render.table import output_width

    return output_width()


def _writable(*targets) -> None:
    from ..model.save import check_writable, same_file

    given = [t for t in targets if t]
    for i, t in enumerate(given):
        check_writable(t)  # before any work: a bad target must not cost the work, or leave a half
        for other in given[:i]:
            if same_file(t, other):  # one file written twice: the second write would erase the first
                raise UsageError(f"{t}: named for two outputs (a model, --report, --html, -o); give each its own file")


# ----------------------------------------------------------------------------------------------
# audit
# ----------------------------------------------------------------------------------------------
def audit_format(args) -> str:
    """--format, or from -o's suffix (.json, .csv, .md), else table."""
    from ..render.text import FORMAT_OF_SUFFIX

    if args.format:
        return args.format
    return FORMAT_OF_SUFFIX.get(Path(args.output).suffix.lower(), "table") if args.output else "table"


def cmd_audit(args) -> int:
    from ..pipeline.audit import audit
    from ..pipeline.batch import AuditBatch, ModelStatus, audit_models, expand_models
    from ..progress import progress
    from ..render.text import render_audit

    if args.top is not None and args.top < 1:
        raise UsageError(f"--top {args.top}: needs a positive number of nodes")
    if args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: needs a positive number of processes")
    if args.no_spectra:
        refuse(args, ["certify"], "certifies the spectra that --no-spectra skips; use one")
    fmt = audit_format(args)
    shapes = ShapeArgs().parse(args)
    paths = expand_models(args.models)  # a missing path: exit 2 before any work, nothing written
    _writable(args.output)
    kwargs = dict(input_shapes=shapes["input_shapes"], input_values=shapes["input_values"],
                  spectra=not args.no_spectra, certify=args.certify)
    if len(paths) == 1:
        try:
            batch = AuditBatch([ModelStatus(str(paths[0]), audit(paths[0], **kwargs))])
        except SepifyError as exc:
            named = naming_file(exc, paths[0])
            if named is exc:
                raise
            raise named from exc
    else:
        with progress(progress_wanted(args)) as bar:
            task = bar.add_task("auditing models", total=len(paths))
            batch = audit_models(paths, jobs=args.jobs, on_done=lambda _: bar.advance(task), **kwargs)
        for e in batch.failed:
            print(f"sepify: error: {e.error}", file=sys.stderr)
    status = max([e.exit_code or EXIT_BAD_INPUT for e in batch.failed], default=EXIT_OK)
    if args.output and batch.failed:
        return status  # bad input writes no file (each failed model has its line on stderr)
    text = render_audit(batch, fmt, args.sort, args.top, width=None if args.output else _width(args))
    if args.output:
        from ..model.save import write_text_atomic

        write_text_atomic(args.output, text)
    else:
        sys.stdout.write(text)
    return status


# ----------------------------------------------------------------------------------------------
# rewrite
# ----------------------------------------------------------------------------------------------
def _check_targets(args) -> None:
    from ..model.save import same_file

    if not args.dry_run:
        if args.in_place:
            if args.output and not same_file(args.output, args.model):
                raise UsageError("--in-place and -o name different files; use one")
            args.output = args.model
        elif not args.output:
            raise UsageError("rewrite needs -o OUT (or --in-place, or --dry-run)")
        elif same_file(args.output, args.model):
            raise UsageError(f"-o {args.output} is the input model; pass --in-place to overwrite it")
    _writable(*([] if args.dry_run else [args.output]), args.report, args.html)


def verify_checks(args) -> dict | None:
    """rewrite's --verify keywords (tolerances or pass criteria), None without --verify."""
    if not args.verify:
        refuse(args, ["atol", "rtol", "min_cosine", "min_top1"], "criteria of --verify: add --verify")
        return None
    if args.max_drift is None and not args.calibrate:
        refuse(args, ["drift_metric"], "is the metric of --max-drift (and of --calibrate): add one")
    gates = GateArgs(drift=False).parse(args, default_metric=args.drift_metric or "channel")
    if GateArgs.active(args):
        refuse(args, ["atol", "rtol"], "set the elementwise rule, which --max-drift / --min-cosine / --min-top1 "
                                       "replace: give one or the other")
        return gates
    return ToleranceArgs().parse(args)


def cmd_rewrite(args) -> int:
    from ..model.load import load_model

    policy = PolicyArgs().parse(args)
    latency = LatencyArgs().parse(args)
    calibration = CalibrationArgs(verify=True).parse(args)
    checks = verify_checks(args)
    shapes = ShapeArgs().parse(args)
    if calibration is None and policy.cost != "latency":
        refuse(args, ["progress"], "progress bars are drawn for calibration and latency measurements: add "
                                   "--calibrate or --cost latency")
    _check_targets(args)
    if policy.linear and latency.only_faster:
        raise UsageError("--linear: --only-faster times isolated convs; leave out one of them")
    loaded = load_model(args.model)
    try:
        if calibration is not None:
            from dataclasses import replace

            from ..calibration.calibrate import calibrated_rewrite

            if latency.only_faster:
                if latency.latency_runs is not None:
                    raise UsageError("--latency-runs: with --calibrate, --only-faster uses the latency table "
                                     "(its own rounds); leave it out")
                calibration = replace(calibration, only_faster=True)
                policy = replace(policy, threads=latency.threads)
            model, report, cal = calibrated_rewrite(loaded, policy, args.calibrate, shapes["input_shapes"],
                                                    input_values=shapes["input_values"], lowering=latency.lowering,
                                                    options=calibration)
        else:
            from ..pipeline.rewrite import rewrite

            model, report = rewrite(loaded, policy, shapes["input_shapes"], input_values=shapes["input_values"],
                                    lowering=latency.lowering, only_faster=latency.only_faster,
                                    threads=latency.threads, latency_runs=latency.latency_runs,
                                    progress=progress_wanted(args))
            cal = None
    except SepifyError as exc:
        named = naming_file(exc, args.model)
        if named is exc:
            raise
        raise named from exc
    return finish_rewrite(args, loaded, model, report, cal, shapes, latency, checks)


def finish_rewrite(args, loaded, model, report, cal, shapes, latency, checks=None) -> int:
    """Save the model (unless --dry-run), --verify / --bench it (in memory with --dry-run), write the
    JSON report and the HTML page, then print: one JSON document, or the tables."""
    from ..model.save import external_data_name, save_model

    if args.verify or args.bench:
        # Inputs the runs cannot be fed are bad input (exit 2): found before anything is written.
        from ..model.graph import GraphView
        from ..model.samples import require_tensor_inputs

        require_tensor_inputs(GraphView(loaded.model))
    written: list[Path] = []  # what this run wrote (removed again on a later exit 2)
    if not args.dry_run:
        target = Path(args.output)
        data = target.parent / external_data_name(target)
        had_data = data.exists()
        to_save = model
        if model is loaded.model and loaded.has_external_data:
            # Nothing was rewritten, so this is the input's own proto, which --verify, --bench and the
            # reports still read; saving with external data moves its weights out of the proto given.
            import onnx

            to_save = onnx.ModelProto()
            to_save.CopyFrom(model)
        save_model(to_save, args.output, external=loaded.has_external_data or None, source=loaded)
        written = [target] + ([data] if data.exists() and not had_data else [])
    try:
        return _checked_rewrite(args, loaded, model, report, cal, shapes, latency, checks)
    except (SepifyError, MemoryError):
        # Bad input found while verifying or benchmarking (exit 2): no output file is left behind —
        # unless it replaced the input itself (--in-place), which stays the rewritten model.
        if not getattr(args, "in_place", False):
            for path in written:
                path.unlink(missing_ok=True)
        raise


def _checked_rewrite(args, loaded, model, report, cal, shapes, latency, checks) -> int:
    from ..model.save import write_text_atomic

    rewritten = model if args.dry_run else args.output  # verify/bench what was written, or the rewrite in memory
    drift = bench = None
    if args.verify:
        from ..pipeline.verify import verify

        drift = verify(loaded, rewritten, input_shapes=shapes["input_shapes"], input_values=shapes["input_values"],
                       per_layer=bool(args.html), **(checks or {}))
    if args.bench:
        from ..pipeline.bench import benchmark

        bench = benchmark(loaded, rewritten, input_shapes=shapes["input_shapes"], input_values=shapes["input_values"],
                          threads=latency.threads)
    record = report.to_dict()
    if cal is not None:
        record["calibration"] = cal.to_dict()
    if drift is not None:
        record["verify"] = drift.to_dict()
    if bench is not None:
        record["bench"] = bench.to_dict()
    if args.report:
        write_text_atomic(args.report, dumps(record))
    if args.html:
        from ..render.html import write_html_report

        write_html_report(args.html, loaded, shapes["input_shapes"], rewrite=report, calibration=cal, drift=drift,
                          bench=bench, input_values=shapes["input_values"])
    if args.format == "json":
        sys.stdout.write(dumps(record) + "\n")
    else:
        from ..render.text import (render_bench, render_calibration, render_drift, render_latency, render_prediction,
                                   render_rewrite)

        width = _width(args)
        status = f"written to {args.output}" if not args.dry_run else "dry run, nothing written"
        sys.stdout.write(render_rewrite(report, status, width) + render_latency(report, width)
                         + render_prediction(report, width)
                         + (render_calibration(cal, width) if cal is not None else "")
                         + (render_drift(drift, width) if drift is not None else "")
                         + (render_bench(bench, width) if bench is not None else ""))
    for what, path in (("rewrite report", args.report), ("HTML report", args.html)):
        if path:
            say(args, f"{what} written to {path}")
    if drift is not None and not drift.passed:
        return EXIT_DRIFT
    if report.speedup and report.speedup.get("met") is False:
        say(args, f"warning: measured speedup {report.speedup['measured']:.2f}x is below --target-speedup "
                  f"{report.speedup['target']:g}x")
        return EXIT_DRIFT  # the result misses a stated criterion, as a failed --verify
    return EXIT_OK


# ----------------------------------------------------------------------------------------------
# verify, bench
# ----------------------------------------------------------------------------------------------
def cmd_verify(args) -> int:
    from ..pipeline.verify import verify
    from ..render.text import render_drift

    shapes = ShapeArgs().parse(args)
    if args.inputs:
        refuse(args, ["input_shape", "seed"], "shape and seed random inputs; --inputs gives the inputs")
    gates = GateArgs(drift=True).parse(args)
    tolerances = ToleranceArgs().parse(args)
    if GateArgs.active(args):
        refuse(args, ["atol", "rtol"], "set the elementwise rule, which --max-drift / --min-cosine / --min-top1 "
                                       "replace: give one or the other")
    report = verify(args.original, args.rewritten, args.inputs, shapes["input_shapes"],
                    input_values=shapes["input_values"], seed=args.seed or 0, **tolerances,
                    per_layer=args.per_layer, **gates)
    sys.stdout.write(report.to_json() + "\n" if args.format == "json" else render_drift(report, _width(args)))
    return EXIT_OK if report.passed else EXIT_DRIFT


def cmd_bench(args) -> int:
    from ..pipeline.bench import benchmark
    from ..render.text import render_bench
    from .args import BenchArgs

    options = BenchArgs().parse(args)
    shapes = ShapeArgs().parse(args)
    report = benchmark(args.model, args.other, input_shapes=shapes["input_shapes"],
                       input_values=shapes["input_values"], **options)
    sys.stdout.write(report.to_json() + "\n" if args.format == "json" else render_bench(report, _width(args)))
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


def _no_progress_without_calibration(args, calibration) -> None:
    if calibration is None:
        refuse(args, ["progress"], "progress bars are drawn for calibration: add --calibrate")


def cmd_plan(args) -> int:
    from ..model.load import load_model
    from ..model.save import write_text_atomic
    from ..render.html import write_html_report
    from ..render.text import render_calibration, render_rewrite

    calibration = CalibrationArgs(html=True).parse(args)
    SweepArgs(plot=True).check(args)
    _no_progress_without_calibration(args, calibration)
    shapes = ShapeArgs().parse(args)
    if args.plot:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:  # before the long sweep, not after
            raise UsageError("--plot needs matplotlib: pip install 'sepify[plot]'")
    _writable(args.output, args.html, args.plot)
    loaded = load_model(args.model)
    width = None if args.output else _width(args)
    if args.sweep:
        result = _sweep(args, loaded, calibration)
        if args.format == "json":
            text = result.to_json() + "\n"
        else:
            from ..render.text import render_sweep

            text = render_sweep(result, width)
        if args.plot:
            from ..render.plot import plot_sweep

            plot_sweep(result, args.plot)
        if args.html:
            write_html_report(args.html, loaded, shapes["input_shapes"], sweep=result, input_values=shapes["input_values"])
    else:
        _, report, cal = _in_memory(args, loaded, calibration)
        if args.format == "json":
            d = report.to_dict()
            if cal is not None:
                d["calibration"] = cal.to_dict()
            text = dumps(d) + "\n"
        else:
            text = render_rewrite(report, "plan only, no model written", width) + \
                (render_calibration(cal, width) if cal is not None else "")
        if args.html:
            write_html_report(args.html, loaded, shapes["input_shapes"], rewrite=report, calibration=cal,
                              input_values=shapes["input_values"])
    if args.output:
        write_text_atomic(args.output, text)
    else:
        sys.stdout.write(text)
    for what, path in (("plan", args.output), ("plot", args.plot), ("HTML report", args.html)):
        if path:
            say(args, f"{what} written to {path}")
    return EXIT_OK


def cmd_report(args) -> int:
    from ..model.load import load_model
    from ..pipeline.verify import verify
    from ..render.html import write_html_report

    calibration = CalibrationArgs(html=False).parse(args)
    SweepArgs(plot=False).check(args, eval_also="--verify", policy_used=True)
    _no_progress_without_calibration(args, calibration)
    shapes = ShapeArgs().parse(args)
    _writable(args.output)
    loaded = load_model(args.model)
    parts: dict = {}
    notes: list[str] = []
    if args.sweep:
        parts["sweep"] = _sweep(args, loaded, calibration)
    model, report, cal = _in_memory(args, loaded, calibration)
    parts["rewrite"], parts["calibration"] = report, cal
    if args.verify:
        if report.changed:
            data = args.eval or (args.calibrate if args.calibrate and args.calibrate != "random" else None)
            parts["drift"] = verify(loaded, model, data, shapes["input_shapes"], input_values=shapes["input_values"],
                                    per_layer=True)  # every sample of the file
        else:
            notes.append("--verify: nothing was rewritten under this policy, so there is no drift to show")
    write_html_report(args.output, loaded, shapes["input_shapes"], input_values=shapes["input_values"], notes=notes,
                      **parts)
    print(f"report written to {args.output}")
    return EXIT_OK


def cmd_latency_table(args) -> int:
    from ..model.load import load_model
    from ..pipeline.lut import latency_table

    from .args import check_threads

    check_threads(args.threads)
    shapes = ShapeArgs().parse(args)
    loaded = load_model(args.model)
    report = latency_table(loaded, shapes["input_shapes"], threads=args.threads, schemes=args.scheme,
                           input_values=shapes["input_values"], progress=progress_wanted(args), linear=args.linear)
    report.table.save(args.output)
    if args.format == "json":
        sys.stdout.write(dumps(report.to_dict()) + "\n")
    else:
        sys.stdout.write(f"{report.model}: {report.convs} convs ({report.geometries} geometries), "
                         f"{report.candidates} candidate chains ({report.measured} measured now, the rest from this "
                         f"machine's cache), whole model {report.model_us / 1e3:.2f} ms at "
                         f"{report.threads or 'default'} thread(s), {report.seconds:.0f} s\n")
    say(args, f"latency table written to {args.output}")
    return EXIT_OK


COMMANDS = {"audit": cmd_audit, "rewrite": cmd_rewrite, "verify": cmd_verify, "bench": cmd_bench,
            "plan": cmd_plan, "report": cmd_report, "latency-table": cmd_latency_table}

__all__ = ["COMMANDS", "audit_format", "finish_rewrite", "naming_file", "print_error", "say", "verify_checks"]
