#!/usr/bin/env python3
"""Benchmark ``sepify audit`` against onnx-tool's profiler on the same models, side by side.

Needs the peer tool::

    pip install onnx-tool

What is timed, per model (runs interleaved A, B, A, B, … so drift hits both alike):

* warm (in-process, after one untimed warm-up each):
  ``sepify.audit(path, shapes)`` (full audit, spectra on), ``sepify.audit(..., spectra=False)``
  (cost only: the like-for-like job), and onnx-tool
  ``Model(path); graph.shape_infer(feeds); graph.profile()``;
* cold (a fresh subprocess per run, import time included; both packages' bytecode compiled first,
  as a wheel install has it — see :func:`precompile`): the CLI end to end,
  ``sepify audit PATH --format json [--input-shape …]``, and a ``python -c`` running the same
  onnx-tool calls.

Medians of N repeats (default 5) and the ratio sepify/onnx-tool (<1: sepify faster). Conv MACs
are compared too: sepify's ``totals.conv_macs`` against the sum over onnx-tool's Conv-like nodes,
with onnx-tool's bias adds (it counts one MAC per output element for a bias) taken out so both
follow the same convention; onnx-tool's raw number is shown as well.

Models: the generated ResNet-50 (``scripts/make_resnet50.py``; written on first use), every
``sample_models/*.onnx`` present, and, unless ``--quick``, the real models already in the
``scripts/fetch_real_models.py`` cache (input shapes from its MANIFEST; nothing is downloaded
unless ``--fetch``).

Usage::

    python benchmarks/bench_audit.py                 # everything, N=5
    python benchmarks/bench_audit.py --quick -n 3    # ResNet-50 + samples only
    python benchmarks/bench_audit.py --no-cold --json results.json
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import describe, load_average, precompile  # noqa: E402 (benchmarks/environment.py)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RESNET = Path("/tmp/sepify-bench/resnet50.onnx")
CONV_OPS = ("Conv", "ConvTranspose", "ConvInteger", "QLinearConv")
TRANSPOSE_NOTE = (" (convention: onnx-tool counts prod(Y)·W[1]·k, sepify prod(X)·W[1]·k, the multiplies a "
                  "transposed conv does: each input element meets C_out/group·k weights)")

# Run in a fresh interpreter for the cold onnx-tool timing; prints its conv MACs as JSON.
ONNX_TOOL_SNIPPET = r"""
import json, sys
import numpy as np
import onnx_tool
path, feeds_json = sys.argv[1], sys.argv[2]
feeds = {k: np.full(shape, value, dtype=dtype) for k, (shape, dtype, value) in json.loads(feeds_json).items()}
m = onnx_tool.Model(path, {"verbose": False})
m.graph.shape_infer(feeds)
m.graph.profile()
raw = adj = 0
by_op = {}
for n in m.graph.nodemap.values():
    if n.op_type in ("Conv", "ConvTranspose", "ConvInteger", "QLinearConv"):
        mac = int(round(n.macs[0]))
        bias = (n.op_type in ("Conv", "ConvTranspose") and len(n.input) > 2) or (n.op_type == "QLinearConv" and len(n.input) == 9)
        outvol = int(np.prod(m.graph.tensormap[n.output[0]].get_shape())) if bias else 0
        raw += mac
        adj += mac - outvol
        by_op[n.op_type] = by_op.get(n.op_type, 0) + mac - outvol
print(json.dumps({"raw": raw, "conv": adj, "by_op": by_op}))
"""


def _import_path(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, mod)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------------
# Models
def _model_inputs(path: str) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Concrete input shapes (as sepify resolves them) and numpy dtypes of the main inputs."""
    import onnx
    import sepify

    report = sepify.audit(path, spectra=False)
    model = onnx.load(path, load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    dtypes = {
        vi.name: onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name
        for vi in model.graph.input if vi.name not in inits
    }
    return report.input_shapes, dtypes


def collect_models(args) -> list[dict]:
    models: list[dict] = []
    resnet = Path(args.resnet)
    if not resnet.is_file():
        print(f"[bench] generating {resnet}", file=sys.stderr)
        mk = _import_path("make_resnet50", REPO / "scripts" / "make_resnet50.py")
        mk.main([str(resnet)])
    models.append(dict(id="resnet50 (generated)", path=str(resnet), inputs={"input": [1, 3, 224, 224]},
                       dtypes={"input": "float32"}, values={}))
    samples = sorted(Path(args.samples).glob("*.onnx")) if Path(args.samples).is_dir() else []
    for p in samples:
        try:
            shapes, dtypes = _model_inputs(str(p))
        except Exception as exc:  # noqa: BLE001
            print(f"[bench] skip {p}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        models.append(dict(id=f"sample/{p.stem}", path=str(p), inputs=shapes, dtypes=dtypes, values={}))
    if not args.quick:
        fetcher = _import_path("fetch_real_models", REPO / "scripts" / "fetch_real_models.py")
        if args.fetch:
            entries = fetcher.fetch_all()
        else:
            dest = fetcher.default_dest()
            entries = [dict(e, path=str(dest / fetcher.model_filename(e))) for e in fetcher.MANIFEST
                       if (dest / fetcher.model_filename(e)).is_file()]
        for e in entries:
            dtypes = {k: e.get("input_dtypes", {}).get(k, "float32") for k in e["inputs"]}
            models.append(dict(id=e["id"], path=e["path"], inputs=e["inputs"], dtypes=dtypes,
                               values=e.get("input_values", {})))
    if args.only:
        models = [m for m in models if any(o in m["id"] for o in args.only)]
    return models


def _feeds_spec(m: dict) -> dict[str, list]:
    """{name: [shape, dtype, fill value]}: onnx-tool only needs shapes, but data-driven shapes need values."""
    return {k: [list(shape), m["dtypes"].get(k, "float32"), m["values"].get(k, 0)] for k, shape in m["inputs"].items()}


def _cli_args(m: dict) -> list[str]:
    # rank-0 inputs cannot be spelled with NAME=DIMS; the models declare them as scalars anyway
    shapes = [a for k, s in m["inputs"].items() if s for a in ("--input-shape", f"{k}=" + "x".join(map(str, s)))]
    return shapes + [a for k, v in m["values"].items() for a in ("--input-value", f"{k}={v}")]


# ---------------------------------------------------------------------------------------------
# Runners: each returns conv MACs (or a dict for onnx-tool) and is timed by the caller.
def sepify_api(m: dict, spectra: bool = True):
    import sepify

    r = sepify.audit(m["path"], m["inputs"], input_values=m["values"] or None, spectra=spectra)
    by_op: dict[str, int] = {}
    for n in r.nodes:
        by_op[n.op_type] = by_op.get(n.op_type, 0) + (n.macs or 0)
    return {"conv": r.totals.conv_macs, "nodes": r.totals.conv_nodes, "unknown": r.totals.unknown_cost_nodes,
            "by_op": by_op}


def onnx_tool_api(m: dict):
    import numpy as np
    import onnx_tool

    feeds = {k: np.full(shape, value, dtype=dtype) for k, (shape, dtype, value) in _feeds_spec(m).items()}
    model = onnx_tool.Model(m["path"], {"verbose": False})
    model.graph.shape_infer(feeds)
    model.graph.profile()
    raw = adj = 0
    by_op: dict[str, int] = {}
    for n in model.graph.nodemap.values():
        if n.op_type in CONV_OPS:
            mac = int(round(n.macs[0]))
            bias = (n.op_type in ("Conv", "ConvTranspose") and len(n.input) > 2) or (
                n.op_type == "QLinearConv" and len(n.input) == 9)
            outvol = int(np.prod(model.graph.tensormap[n.output[0]].get_shape())) if bias else 0
            raw += mac
            adj += mac - outvol
            by_op[n.op_type] = by_op.get(n.op_type, 0) + mac - outvol
    return {"raw": raw, "conv": adj, "by_op": by_op}


def sepify_cli(m: dict):
    exe = shutil.which("sepify")
    cmd = [*([exe] if exe else [sys.executable, "-m", "sepify"]), "audit", m["path"], "--format", "json",
           *_cli_args(m)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sepify exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
    data = json.loads(proc.stdout)
    return {"conv": sum(n["macs"] or 0 for n in data["nodes"])}


def onnx_tool_cli(m: dict):
    proc = subprocess.run([sys.executable, "-c", ONNX_TOOL_SNIPPET, m["path"], json.dumps(_feeds_spec(m))],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or ["?"]
        raise RuntimeError(f"exit {proc.returncode}: {tail[0][:200]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def timed(fn, m):
    gc.collect()
    t0 = time.perf_counter()
    try:
        out = fn(m)
        err = None
    except Exception as exc:  # noqa: BLE001 - a tool failing on a model is a result, not a crash
        out, err = None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"
    return time.perf_counter() - t0, out, err


def bench_model(m: dict, runners: dict, n: int, warmup: bool) -> dict:
    res = {k: {"times": [], "out": None, "error": None} for k in runners}
    if warmup:
        for k, fn in runners.items():
            _, out, err = timed(fn, m)
            res[k]["out"], res[k]["error"] = out, err
    for _ in range(n):
        for k, fn in runners.items():  # interleaved: A, B, A, B, …
            if res[k]["error"]:
                continue
            dt, out, err = timed(fn, m)
            if err:
                res[k]["error"] = err
                continue
            res[k]["times"].append(dt)
            res[k]["out"] = out
    for r in res.values():
        r["median"] = statistics.median(r["times"]) if r["times"] else None
        r["min"] = min(r["times"]) if r["times"] else None
    return res


# ---------------------------------------------------------------------------------------------
def _fmt_t(t):
    if t is None:
        return "—"
    return f"{t:.2f} s" if t >= 1 else (f"{t * 1000:.0f} ms" if t >= 0.01 else f"{t * 1000:.1f} ms")


def _ratio(a, b):
    return f"{a / b:.2f}×" if a is not None and b else "—"


def _fmt_int(v):
    return "—" if v is None else f"{v:,}"


def _cell(r: dict):
    return f"error ({r['error'][:60]})" if r["error"] and r["median"] is None else _fmt_t(r["median"])


def _versions() -> str:
    return f"{describe(('sepify', 'onnx-tool', 'onnx', 'onnxruntime', 'numpy'))}; {load_average()} at the end"


def render(models: list[dict], warm: dict, cold: dict, n: int) -> str:
    lines = [f"Environment: {_versions()}; N = {n} repeats, medians.", ""]
    head = ["model", "MB"]
    if warm:
        head += ["sepify API (spectra)", "sepify API (cost only)", "onnx-tool API", "ratio (spectra)", "ratio (cost only)"]
    if cold:
        head += ["sepify CLI cold", "onnx-tool cold", "ratio cold"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ratios: dict[str, list[float]] = {"spectra": [], "cost": [], "cold": []}
    for m in models:
        row = [m["id"], f"{Path(m['path']).stat().st_size / 1e6:.1f}"]
        if warm:
            w = warm[m["id"]]
            a, a0, b = w["sepify"], w["sepify_cost"], w["onnx_tool"]
            row += [_cell(a), _cell(a0), _cell(b), _ratio(a["median"], b["median"]), _ratio(a0["median"], b["median"])]
            if a["median"] and b["median"]:
                ratios["spectra"].append(a["median"] / b["median"])
            if a0["median"] and b["median"]:
                ratios["cost"].append(a0["median"] / b["median"])
        if cold:
            c = cold[m["id"]]
            a, b = c["sepify_cli"], c["onnx_tool_cli"]
            row += [_cell(a), _cell(b), _ratio(a["median"], b["median"])]
            if a["median"] and b["median"]:
                ratios["cold"].append(a["median"] / b["median"])
        lines.append("| " + " | ".join(row) + " |")

    def gmean(v):
        return f"{statistics.geometric_mean(v):.2f}×" if v else "—"

    foot = ["**geometric mean of ratios**", ""]
    if warm:
        foot += ["", "", "", gmean(ratios["spectra"]), gmean(ratios["cost"])]
    if cold:
        foot += ["", "", gmean(ratios["cold"])]
    lines += ["| " + " | ".join(foot) + " |", ""]

    # MAC agreement
    lines += ["| model | sepify conv MACs | onnx-tool conv MACs (bias adds removed) | rel. diff | "
              "onnx-tool raw (incl. bias adds) | sepify CLI = API | note |",
              "|---|---|---|---|---|---|---|"]
    for m in models:
        src = warm.get(m["id"]) or {}
        csrc = cold.get(m["id"]) or {}
        s = (src.get("sepify") or {}).get("out") or (src.get("sepify_cost") or {}).get("out")
        o = (src.get("onnx_tool") or {}).get("out") or (csrc.get("onnx_tool_cli") or {}).get("out")
        cli = (csrc.get("sepify_cli") or {}).get("out")
        sm, om = (s or {}).get("conv"), (o or {}).get("conv")
        diff = "—"
        if sm is not None and om is not None:
            diff = f"{(sm - om) / om:+.2e}" if om else ("0" if sm == 0 else "inf")
        notes = []
        if s and s.get("unknown"):
            notes.append(f"sepify: {s['unknown']}/{s['nodes']} convs of unknown cost")
        if sm is not None and om is not None and sm != om:
            for op in sorted(set(s["by_op"]) | set(o["by_op"])):
                a, b = s["by_op"].get(op, 0), o["by_op"].get(op, 0)
                if a != b:
                    why = TRANSPOSE_NOTE if op == "ConvTranspose" else ""
                    notes.append(f"{op}: sepify {a:,} vs onnx-tool {b:,}{why}")
        errs = [f"{k}: {r['error'][:80]}" for d in (src, csrc) for k, r in d.items() if r.get("error")]
        notes += errs
        same = "—" if cli is None or sm is None else ("yes" if cli["conv"] == sm else f"NO ({cli['conv']:,})")
        lines.append(f"| {m['id']} | {_fmt_int(sm)} | {_fmt_int(om)} | {diff} | {_fmt_int((o or {}).get('raw'))} | "
                     f"{same} | {'; '.join(notes)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="sepify audit vs onnx-tool profiler: wall time and conv MACs.")
    ap.add_argument("-n", "--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="only the generated ResNet-50 and sample_models/")
    ap.add_argument("--resnet", default=str(DEFAULT_RESNET), help=f"ResNet-50 path (generated if missing; {DEFAULT_RESNET})")
    ap.add_argument("--samples", default=str(REPO / "sample_models"))
    ap.add_argument("--fetch", action="store_true", help="download missing real models (default: use the cache only)")
    ap.add_argument("--only", action="append", metavar="SUBSTR", help="only models whose id contains this (repeatable)")
    ap.add_argument("--no-warm", action="store_true", help="skip the in-process timings")
    ap.add_argument("--no-cold", action="store_true", help="skip the subprocess timings")
    ap.add_argument("--json", metavar="FILE", help="also write raw timings and MACs here")
    args = ap.parse_args(argv)

    try:
        import onnx_tool  # noqa: F401
    except ImportError:
        print("onnx-tool is not installed: pip install onnx-tool", file=sys.stderr)
        return 2

    models = collect_models(args)
    if not args.no_cold:
        precompile(("sepify", "onnx_tool"))
    warm: dict = {}
    cold: dict = {}
    for i, m in enumerate(models, 1):
        print(f"[bench] {i}/{len(models)} {m['id']}", file=sys.stderr, flush=True)
        if not args.no_warm:
            warm[m["id"]] = bench_model(m, {
                "sepify": sepify_api,
                "sepify_cost": lambda mm: sepify_api(mm, spectra=False),
                "onnx_tool": onnx_tool_api,
            }, args.repeats, warmup=True)
        if not args.no_cold:
            cold[m["id"]] = bench_model(m, {"sepify_cli": sepify_cli, "onnx_tool_cli": onnx_tool_cli},
                                        args.repeats, warmup=False)
    text = render(models, warm, cold, args.repeats)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"models": models, "warm": warm, "cold": cold}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
