"""Command-line glue for calibration, ``sepify plan`` (with ``--sweep``) and ``sepify report``.

Kept apart from :mod:`sepify.cli` so the shell there only hooks these in: calibration flags on
``rewrite``, the calibrated rewrite path, ``--html`` reports, and the two subcommands.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import EXIT_DRIFT, EXIT_OK, SepifyError, UsageError


def add_calibration_args(p: argparse.ArgumentParser, *, html: bool = True) -> None:
    g = p.add_argument_group("calibration (data-aware factors; see sepify.calibrate)")
    g.add_argument("--calibrate", metavar="DATA",
                   help="sample inputs: an .npz keyed by input name, a folder of .npy/.npz, or 'random'; each "
                        "array's first axis is the sample axis")
    g.add_argument("--max-drift", type=float, metavar="D",
                   help="bound on the output drift (1 - cosine, see --drift-metric) measured on the calibration data")
    g.add_argument("--drift-metric", choices=("channel", "cosine"), default="channel",
                   help="channel (default): 1 - cosine after standardizing each output channel, so channels in "
                        "different units weigh alike; cosine: the plain cosine sepify verify prints")
    g.add_argument("--allocation", choices=("auto", "sensitivity", "plan"), default="auto",
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
    if html:
        p.add_argument("--html", metavar="FILE.html", help="also write a self-contained HTML report")


def wants_calibration(args) -> bool:
    return bool(getattr(args, "calibrate", None)) or getattr(args, "max_drift", None) is not None


def _range(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.replace(":", ",").split(","))
    except ValueError:
        raise UsageError(f"--calib-range {text!r}: give LO,HI") from None
    if not lo < hi:
        raise UsageError("--calib-range needs LO < HI")
    return lo, hi


def calibration_kwargs(args) -> dict:
    if getattr(args, "max_drift", None) is not None and not getattr(args, "calibrate", None):
        raise UsageError("--max-drift measures drift on data: add --calibrate DATA (or --calibrate random)")
    if args.calib_samples is not None and args.calib_samples < 1:
        raise UsageError("--calib-samples must be ≥ 1")
    if args.calib_rows is not None and args.calib_rows < 1:
        raise UsageError("--calib-rows must be ≥ 1")
    kw = dict(samples=args.calib_samples, seed=args.calib_seed, value_range=_range(args.calib_range),
              fold_bn=not args.no_fold_bn, drift_metric=args.drift_metric,
              progress=sys.stderr.isatty() if args.progress is None else args.progress)
    if args.calib_rows is not None:
        kw["rows"] = args.calib_rows
    return kw


def _policy(args):
    from .main import _policy_from_args

    return _policy_from_args(args)


# ----------------------------------------------------------------------------------------------
# rewrite --calibrate / --html
# ----------------------------------------------------------------------------------------------
def run_calibrated_rewrite(args) -> int:
    """``sepify rewrite … --calibrate DATA``: plan, calibrate, rewrite, save, then the usual extras."""
    from ..calibration.calibrate import calibrated_rewrite
    from ..model.load import load_model
    from ..render.text import render_drift, render_rewrite
    from ..model.save import save_model, write_text_atomic

    if getattr(args, "only_faster", False):
        raise UsageError("--only-faster cannot be combined with --calibrate yet")
    policy = _policy(args)
    loaded = load_model(args.model)
    lowering = getattr(args, "lowering", None)
    model, report, cal = calibrated_rewrite(loaded, policy, args.calibrate, args.input_shape or None,
                                            input_values=args.input_value or None, max_drift=args.max_drift, lowering=lowering,
                                            allocation=args.allocation, **calibration_kwargs(args))
    if not args.dry_run:
        save_model(model, args.output, external=loaded.has_external_data or None, source=loaded)
    if args.report:
        import json

        d = report.to_dict()
        d["calibration"] = cal.to_dict()
        write_text_atomic(args.report, json.dumps(d, indent=2, default=str))
    if args.format == "json":
        import json

        d = report.to_dict()
        d["calibration"] = cal.to_dict()
        sys.stdout.write(json.dumps(d, indent=2, default=str) + "\n")
    else:
        sys.stdout.write(render_rewrite(report, args.output if not args.dry_run else None))
        sys.stdout.write(render_calibration(cal))
    status = EXIT_OK
    drift = None
    if args.verify and not args.dry_run:
        from ..pipeline.verify import verify

        drift = verify(args.model, args.output, input_shapes=args.input_shape or None,
                       input_values=args.input_value or None, atol=args.atol, rtol=args.rtol, per_layer=bool(args.html))
        sys.stdout.write(render_drift(drift))
        status = EXIT_OK if drift.passed else EXIT_DRIFT
    if args.bench and not args.dry_run:
        from ..pipeline.bench import benchmark
        from ..render.text import render_bench

        sys.stdout.write(render_bench(benchmark(args.model, args.output, input_shapes=args.input_shape or None,
                                                input_values=args.input_value or None)))
    if args.html:
        write_report(args.html, loaded, args.input_shape or None, rewrite=report, calibration=cal, drift=drift,
                     input_values=args.input_value or None)
    return status


def render_calibration(cal) -> str:
    lines = [f"calibration: {cal.data}, {cal.samples} samples, allocation {cal.allocation}; "
             f"drift ({cal.drift_metric}) {_g(cal.drift)} vs weight-only {_g(cal.drift_weight_only)}; "
             f"1-cosine {_g(cal.drift_cosine)} vs {_g(cal.drift_cosine_weight_only)} (on the calibration samples)"]
    if cal.folded_batchnorms:
        lines.append(f"BatchNormalization folded into {len(cal.folded_batchnorms)} rewritten conv(s)")
    lines.extend(f"note: {n}" for n in cal.notes)
    return "\n".join(lines) + "\n"


def _g(v) -> str:
    return "?" if v is None else f"{v:.3g}"


def write_report(path, loaded, input_shapes=None, *, input_values=None, **parts) -> None:
    """Audit the model and write the HTML page with whatever ``parts`` were computed."""
    from ..pipeline.audit import audit
    from ..render.html import render_html
    from ..model.save import write_text_atomic

    shapes = input_shapes
    for part in ("calibration", "sweep"):
        if not shapes and parts.get(part) is not None and getattr(parts[part], "input_shapes", None):
            shapes = parts[part].input_shapes  # the shapes the calibration data ran at
    notes = []
    try:
        report = audit(loaded, shapes, input_values=input_values)
    except SepifyError as exc:  # the page is still useful without the audit table
        report = None
        notes.append(f"no audit table: {str(exc).strip().splitlines()[0]}")
    title = f"sepify report: {Path(loaded.label).name}"
    write_text_atomic(path, render_html(title=title, audit=report, notes=notes, **parts))


def write_rewrite_html(args, loaded, report) -> None:
    """``sepify rewrite … --html FILE`` without calibration."""
    write_report(args.html, loaded, args.input_shape or None, rewrite=report, input_values=args.input_value or None)


# ----------------------------------------------------------------------------------------------
# sepify plan / sepify report
# ----------------------------------------------------------------------------------------------
def add_policy_args(p: argparse.ArgumentParser) -> None:
    pol = p.add_argument_group("policy (default --lossless)")
    pol.add_argument("--lossless", action="store_true", help="only exact factorizations that cut MACs")
    pol.add_argument("--tol", type=float, metavar="E", help="max relative weight error per layer")
    pol.add_argument("--rank", type=int, metavar="R", help="fixed rank for every rewritten layer")
    pol.add_argument("--budget", type=float, metavar="F", help="keep about a fraction F of the conv MACs")
    pol.add_argument("--scheme", choices=("auto", "dw-pw", "pw-dw", "spatial"), default="auto")
    pol.add_argument("--include", metavar="REGEX", help="only nodes whose name matches")
    pol.add_argument("--exclude", metavar="REGEX", help="skip nodes whose name matches")
    pol.add_argument("--min-macs", type=int, default=0, metavar="N", help="skip layers below N MACs")
    pol.add_argument("--no-chain", action="store_true", help="do not split a dw-pw/pw-dw kernel stage further")


def add_commands(sub, add_shape_args) -> None:
    for name, helptext in (("plan", "show the rewrite plan; with --sweep the MACs/drift trade-off curve"),
                           ("report", "write a self-contained HTML report (audit, plan, calibration, curve)")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("model", metavar="MODEL")
        add_shape_args(p)
        add_policy_args(p)
        add_calibration_args(p, html=name == "plan")
        p.add_argument("--sweep", action="store_true", help="conv MACs vs drift over --budgets (needs --calibrate)")
        p.add_argument("--budgets", metavar="F,F,…", help="budgets of the sweep (default 0.9,0.8,0.7,0.6,0.5,0.4)")
        p.add_argument("--eval", metavar="DATA", help="held-out samples the sweep's drift is measured on")
        p.add_argument("--no-weight-only", action="store_true", help="sweep: skip the weight-only comparison")
        p.add_argument("--latency", action="store_true", help="sweep: also time each rewritten model (slow)")
        if name == "plan":
            p.add_argument("--format", choices=("table", "json"), default="table")
            p.add_argument("-o", "--output", metavar="FILE", help="write the table/JSON here instead of stdout")
            p.add_argument("--plot", metavar="FILE.png", help="sweep: draw the curve (needs matplotlib: sepify[plot])")
        else:
            p.add_argument("-o", "--output", metavar="FILE.html", required=True, help="where to write the page")
            p.add_argument("--verify", action="store_true",
                           help="per-layer drift of the rewritten model on --eval (or the calibration) samples")


def _sweep(args, loaded):
    from ..calibration.sweep import parse_budgets, sweep

    if not args.calibrate:
        raise UsageError("--sweep measures drift on data: add --calibrate DATA (or --calibrate random)")
    kw = calibration_kwargs(args)
    return sweep(loaded, args.calibrate, parse_budgets(args.budgets), args.input_shape or None, policy=_policy(args),
                 input_values=args.input_value or None, eval_data=args.eval, weight_only=not args.no_weight_only, latency=args.latency,
                 samples=kw["samples"], rows=kw.get("rows"), seed=kw["seed"], drift_metric=kw["drift_metric"],
                 progress=kw["progress"])


def _in_memory(args, loaded):
    """(ModelProto, RewriteReport, CalibrationReport | None); nothing is written."""
    if wants_calibration(args):
        from ..calibration.calibrate import calibrated_rewrite

        return calibrated_rewrite(loaded, _policy(args), args.calibrate, args.input_shape or None,
                                  input_values=args.input_value or None, max_drift=args.max_drift, allocation=args.allocation, **calibration_kwargs(args))
    from ..pipeline.rewrite import rewrite

    model, report = rewrite(loaded, _policy(args), args.input_shape or None, input_values=args.input_value or None)
    return model, report, None


def cmd_plan(args) -> int:
    import json

    from ..model.load import load_model
    from ..render.text import render_rewrite
    from ..model.save import write_text_atomic

    if args.plot and args.sweep:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:  # before the long sweep, not after
            raise UsageError("--plot needs matplotlib: pip install 'sepify[plot]'")
    loaded = load_model(args.model)
    if args.sweep:
        result = _sweep(args, loaded)
        if args.format == "json":
            text = result.to_json() + "\n"
        else:
            from ..calibration.sweep import render_sweep

            text = render_sweep(result)
        if args.plot:
            from ..calibration.sweep import plot_sweep

            plot_sweep(result, args.plot)
        if args.html:
            write_report(args.html, loaded, args.input_shape or None, sweep=result,
                         input_values=args.input_value or None)
    else:
        if args.plot:
            raise UsageError("--plot draws the --sweep curve; add --sweep")
        _, report, cal = _in_memory(args, loaded)
        if args.format == "json":
            d = report.to_dict()
            if cal is not None:
                d["calibration"] = cal.to_dict()
            text = json.dumps(d, indent=2, default=str) + "\n"
        else:
            text = render_rewrite(report, None) + (render_calibration(cal) if cal is not None else "")
        if args.html:
            write_report(args.html, loaded, args.input_shape or None, rewrite=report, calibration=cal,
                         input_values=args.input_value or None)
    if args.output:
        write_text_atomic(args.output, text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_report(args) -> int:
    from ..model.load import load_model
    from ..pipeline.verify import verify

    loaded = load_model(args.model)
    parts: dict = {}
    if args.sweep:
        parts["sweep"] = _sweep(args, loaded)
    model, report, cal = _in_memory(args, loaded)
    parts["rewrite"], parts["calibration"] = report, cal
    if args.verify and report.changed:
        data = args.eval or (args.calibrate if args.calibrate and args.calibrate != "random" else None)
        inputs = _verify_inputs(data, loaded) if data else None
        parts["drift"] = verify(loaded, model, inputs, args.input_shape or None, input_values=args.input_value or None,
                                per_layer=True)
        if data:
            n = next(iter(inputs.values())).shape[0]
            parts["drift"].input_source = f"{data} ({n} sample(s) in one batch)"
    write_report(args.output, loaded, args.input_shape or None, input_values=args.input_value or None, **parts)
    sys.stdout.write(f"report written to {args.output}\n")
    return EXIT_OK


def _verify_inputs(data, loaded):
    """One feed for ``verify``: the samples concatenated on the batch axis when it is symbolic, else the first."""
    import numpy as np

    from ..calibration.calibrate import load_calibration

    cs = load_calibration(data, loaded, samples=16)
    if len(cs.feeds) == 1:
        return cs.feeds[0]
    try:
        return {k: np.concatenate([f[k] for f in cs.feeds]) for k in cs.feeds[0]} if cs.batch_sizes[0] > 1 else cs.feeds[0]
    except ValueError:
        return cs.feeds[0]
