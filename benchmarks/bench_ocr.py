#!/usr/bin/env python3
"""Does an OCR model still read the same text after sepify?  PP-OCRv4 rec (rapidocr's, fetched by
``scripts/fetch_real_models.py``) on text lines rendered with Pillow's bundled font.

Calibration lines and held-out lines are different texts.  For the original and each rewrite
(``sepify rewrite --budget B --calibrate calib.npz``, and weight-only ``--budget B`` for
comparison), onnxruntime's int8 quantization of the original (the peer: ``quant_pre_process`` then
``quantize_static``, QDQ, per-channel, the same calibration lines) and of the calibrated rewrite, it reports: the share of held-out lines read exactly as the original reads them, the
character error rate against the original's reading (edit distance / length), and the original's
own accuracy against the rendered ground truth.  Decoding is greedy CTC with the character list
stored in the model's metadata (``character``).

Needs Pillow (``pip install -e ".[images]"`` brings it) and the real model (fetched on first use).
Usage::

    python benchmarks/bench_ocr.py                    # --budget 0.67
    python benchmarks/bench_ocr.py --budget 0.5 --json out.json
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

WORDS = ("invoice total amount paid date number order customer address street city phone email account "
         "balance due tax rate price quantity item description shipping delivery reference payment bank "
         "transfer receipt station platform ticket gate seat coach departure arrival monday friday june "
         "march report page chapter section table figure result value sample model layer speed").split()
HEIGHT, WIDTH = 48, 320


def texts(n: int, seed: int) -> list[str]:
    """``n`` lines of two or three words and a number (the same seed gives the same lines)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = [WORDS[i] for i in rng.choice(len(WORDS), size=int(rng.integers(2, 4)), replace=False)]
        out.append(" ".join(words + [str(int(rng.integers(10, 99999)))]))
    return out


def render(line: str, size: int = 30) -> np.ndarray:
    """``[1, 3, 48, 320]`` float32 as PP-OCR's recognizer takes it: black text on white, height 48,
    aspect kept, padded right, scaled to [-1, 1]."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=size)
    left, top, right, bottom = font.getbbox(line)
    img = Image.new("RGB", (right - left + 16, bottom - top + 16), "white")
    ImageDraw.Draw(img).text((8 - left, 8 - top), line, fill="black", font=font)
    w = min(WIDTH, max(1, round(img.width * HEIGHT / img.height)))
    img = img.resize((w, HEIGHT), Image.BILINEAR)
    x = np.zeros((HEIGHT, WIDTH, 3), np.float32)
    x[:, :w] = (np.asarray(img, np.float32) / 255 - 0.5) / 0.5
    return x.transpose(2, 0, 1)[None]


def characters(model_path: str) -> list[str]:
    import onnx

    meta = {p.key: p.value for p in onnx.load(model_path, load_external_data=False).metadata_props}
    return ["<blank>"] + meta["character"].splitlines() + [" "]


def read(model_path: str, images: np.ndarray, chars: list[str]) -> list[str]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    out = []
    for x in images:
        ids = sess.run(None, {name: x})[0][0].argmax(axis=-1)
        keep = [i for j, i in enumerate(ids) if i != 0 and (j == 0 or i != ids[j - 1])]
        out.append("".join(chars[i] for i in keep if i < len(chars)).strip())  # a pipeline strips the ends too
    return out


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=0.67)
    ap.add_argument("--calib", type=int, default=32, help="calibration lines")
    ap.add_argument("--held-out", type=int, default=40, help="held-out lines")
    ap.add_argument("--out", default="/tmp/sepify-bench-ocr")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--no-int8", action="store_true", help="leave out onnxruntime's int8 quantization")
    args = ap.parse_args(argv)
    from fetch_real_models import fetch_all

    model = str(fetch_all(only=["rapidocr_ppocrv4_rec"])[0]["path"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chars = characters(model)
    calib_lines, held_lines = texts(args.calib, 0), texts(args.held_out, 1)
    np.savez(out / "calib.npz", x=np.stack([render(t) for t in calib_lines]))
    held = np.stack([render(t) for t in held_lines])
    base = read(model, held, chars)
    rows = {"original": {"build_s": 0.0, "macs_ratio": 1.0, "read": base}}
    variants = {"weight-only": [], "calibrated": ["--calibrate", str(out / "calib.npz")]}
    for name, extra in variants.items():
        target = out / f"{name}.onnx"
        cmd = [sys.executable, "-m", "sepify", "rewrite", model, "-o", str(target), "--input-shape",
               f"x=1x3x{HEIGHT}x{WIDTH}", "--budget", str(args.budget), *extra, "--format", "json"]
        t = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stderr)
            raise SystemExit(f"sepify failed ({done.returncode}) for {name}")
        rows[name] = {"build_s": time.perf_counter() - t,
                      "macs_ratio": json.loads(done.stdout)["totals"]["macs_ratio"], "read": read(str(target), held, chars)}
    if not args.no_int8:
        # The peer a user would pick instead: onnxruntime's int8 (QDQ, per-channel weights, the same
        # calibration lines) after its quant_pre_process, which the quantizer recommends — without
        # it this model's unfolded BatchNormalizations leave int8 reading 6 of 40 lines unchanged.
        # Alone and on top of the calibrated rewrite.
        from bench_vs_int8 import quantize

        calib = np.load(out / "calib.npz")["x"]
        for name, src, before in (("int8", Path(model), None), ("calibrated + int8", out / "calibrated.onnx", "calibrated")):
            target = out / (name.replace(" + ", "-") + ".onnx")
            build = quantize(src, target, "x", calib, preprocess=True)
            rows[name] = {"build_s": build + (rows[before]["build_s"] if before else 0.0),
                          "macs_ratio": rows[before]["macs_ratio"] if before else 1.0,
                          "read": read(str(target), held, chars)}
    print(f"\nPP-OCRv4 rec on {len(held_lines)} held-out rendered lines (calibrated on {len(calib_lines)} others), "
          f"conv MAC budget {args.budget}\n")
    print("| variant | conv MACs | same reading as the original | CER vs the original | correct (vs rendered text) | build |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        same = float(np.mean([a == b for a, b in zip(r["read"], base)]))
        cer = sum(edit_distance(a, b) for a, b in zip(r["read"], base)) / max(1, sum(len(b) for b in base))
        correct = float(np.mean([a == t for a, t in zip(r["read"], held_lines)]))
        r.update(same=same, cer=cer, correct=correct)
        print(f"| {name} | {r['macs_ratio']:.3f} | {same:.3f} | {cer:.4f} | {correct:.3f} | {r['build_s']:.0f} s |")
    diffs = [(t, a, b) for t, a, b in zip(held_lines, base, rows["calibrated"]["read"]) if a != b]
    for t, a, b in diffs[:5]:
        print(f"  {t!r}: original {a!r}, calibrated {b!r}")
    if args.json:
        Path(args.json).write_text(json.dumps({"held_out": held_lines, "variants": rows}, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
