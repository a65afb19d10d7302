#!/usr/bin/env python3
"""Calibrated vs weight-only factorization of a pretrained detector, measured on held-out photos.

Model: nudenet's ``320n.onnx`` (YOLOv8n, from the ``nudenet`` PyPI package, fetched by
``scripts/fetch_real_models.py``).  Data: real photos shipped inside PyPI packages
(``benchmarks/photos.py``: scikit-image's ``skimage.data`` and matplotlib's sample photo); the
calibration photos and the held-out photos are different pictures.  Needs::

    pip install -e ".[images,plot]"        # scikit-image + matplotlib

At the same conv MAC budget (default 0.67), every variant is rewritten with the ``sepify`` CLI and
measured with ``sepify verify --inputs heldout.npz`` (its ``1 − cosine`` of ``output0``), plus the
box rows (0–3) and the class-score rows (4–21) of ``output0`` separately: the plain cosine of the
whole output is dominated by box coordinates in pixels, and a class branch can be wrecked without
moving it much.

Variants:

* ``weight-only``: ``--budget F`` (SVD factors, spectral-energy greedy across layers);
* ``calibrated``: ``--budget F --calibrate calib.npz`` (per-layer sensitivities on the calibration
  photos, Lagrangian allocation, least-squares factors, channel-standardized drift objective);
* ``calibrated-plan-ranks``: ``--allocation plan`` (the weight-only ranks, least-squares factors);
* ``calibrated-cosine-objective``: ``--drift-metric cosine`` (allocation by the plain cosine).

Usage::

    python benchmarks/bench_calibration.py                       # the table
    python benchmarks/bench_calibration.py --sweep --plot docs/tradeoff_yolov8n.png
    python benchmarks/bench_calibration.py --budget 0.5 --variants weight-only,calibrated
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "benchmarks"))

VARIANTS = {
    "weight-only": [],
    "calibrated": ["--calibrate", "{calib}"],
    "calibrated-plan-ranks": ["--calibrate", "{calib}", "--allocation", "plan"],
    "calibrated-cosine-objective": ["--calibrate", "{calib}", "--drift-metric", "cosine"],
}


def sepify(*args: str) -> str:
    cmd = [sys.executable, "-m", "sepify", *args]
    print("$ sepify " + " ".join(args), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        sys.stderr.write(done.stderr)
        raise SystemExit(f"sepify failed ({done.returncode}): {' '.join(args)}")
    return done.stdout


def split_drift(model_a: str, model_b: str, images: np.ndarray) -> dict[str, float]:
    """1 − cosine of output0's box rows and class-score rows, and top-1 class agreement on confident anchors."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    a = ort.InferenceSession(model_a, opts, providers=["CPUExecutionProvider"]).run(None, {"images": images})[0]
    b = ort.InferenceSession(model_b, opts, providers=["CPUExecutionProvider"]).run(None, {"images": images})[0]

    def drift(x, y):
        x, y = x.ravel().astype(np.float64), y.ravel().astype(np.float64)
        return float(1 - x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))

    scores_a, scores_b = a[:, 4:], b[:, 4:]
    confident = scores_a.max(axis=1) > 0.25  # [N, anchors]
    agree = (scores_a.argmax(axis=1) == scores_b.argmax(axis=1))[confident]
    return {"boxes": drift(a[:, :4], b[:, :4]), "scores": drift(scores_a, scores_b),
            "max_score_err": float(np.abs(scores_a - scores_b).max()),
            "class_agreement": float(agree.mean()) if agree.size else float("nan"), "confident": int(confident.sum())}


def main(argv=None) -> int:
    from environment import finish

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=0.67)
    ap.add_argument("--out", default="/tmp/sepify-bench-calibration", help="work folder (models, data, reports)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    ap.add_argument("--sweep", action="store_true", help="also run sepify plan --sweep on the held-out photos")
    ap.add_argument("--budgets", default="0.9,0.8,0.7,0.6,0.5,0.4")
    ap.add_argument("--plot", help="where the sweep's PNG goes (e.g. docs/tradeoff_yolov8n.png)")
    ap.add_argument("--json", help="write all figures here")
    args = ap.parse_args(argv)

    from fetch_real_models import fetch_all
    from photos import write_sets

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    entry = next(e for e in fetch_all(only=["nudenet_320n"]))
    model = str(entry["path"])
    calib, held = write_sets(out)
    held_images = np.load(held)["images"]
    shape = ["--input-shape", "images=1x3x320x320"]
    rows = []
    results: dict = {"model": model, "budget": args.budget, "calibration": str(calib), "held_out": str(held),
                     "held_out_images": int(held_images.shape[0]), "variants": {}}
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        extra = [a.format(calib=calib) for a in VARIANTS[name]]
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r} (one of {', '.join(VARIANTS)})")
        target = out / (name + ".onnx")
        report = out / (target.stem + ".json")
        t0 = time.perf_counter()
        sepify("rewrite", model, *shape, "--budget", str(args.budget), *extra, "-o", str(target),
               "--report", str(report))
        seconds = time.perf_counter() - t0
        rep = json.loads(report.read_text())
        ver = json.loads(sepify("verify", model, str(target), "--inputs", str(held), "--format", "json"))
        cos = ver["outputs"][0]["cosine"]
        parts = split_drift(model, str(target), held_images)
        row = {"variant": name, "macs_ratio": rep["totals"]["macs_ratio"], "drift": 1 - cos, **parts,
               "rewritten": rep["totals"]["rewritten_nodes"], "seconds": seconds}
        if "calibration" in rep:
            row["calibration_drift_in_sample"] = rep["calibration"].get("drift")
        rows.append(row)
        results["variants"][name] = row

    base = next((r for r in rows if r["variant"] == "weight-only"), None)
    print(f"\nYOLOv8n (nudenet 320n), conv MAC budget {args.budget}; drift = 1 - cosine of output0 on "
          f"{held_images.shape[0]} held-out photo crops (sepify verify --inputs {held.name})\n")
    print("| variant | conv MACs | 1 − cos (verify) | vs weight-only | boxes 1 − cos | scores 1 − cos | "
          "class agreement | time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{base['drift'] / r['drift']:.1f}× lower" if base and r is not base and r["drift"] > 0 else "—"
        print(f"| {r['variant']} | {r['macs_ratio']:.3f} | {r['drift']:.2e} | {ratio} | {r['boxes']:.2e} | "
              f"{r['scores']:.2e} | {r['class_agreement']:.3f} | {r['seconds']:.0f} s |")

    if args.sweep:
        sweep_json = out / "sweep.json"
        cmd = ["plan", model, "--calibrate", str(calib), "--eval", str(held), "--sweep", "--budgets", args.budgets,
               "--format", "json", "-o", str(sweep_json)]
        if args.plot:
            cmd += ["--plot", args.plot]
        sepify(*cmd)
        sw = json.loads(sweep_json.read_text())
        results["sweep"] = sw["points"]
        print("\n| budget | conv MACs (calibrated) | drift (channel) | 1 − cos | conv MACs (weight-only) | "
              "drift (channel) | 1 − cos |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for p in sw["points"]:
            print(f"| {p['budget']:.2f} | {p['macs_ratio']:.3f} | {p['drift']:.2e} | {p['drift_cosine']:.2e} | "
                  f"{p['macs_ratio_weight_only']:.3f} | {p['drift_weight_only']:.2e} | "
                  f"{p['drift_cosine_weight_only']:.2e} |")
    finish(results, args.json, f"work folder {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
