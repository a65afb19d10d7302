#!/usr/bin/env python3
"""Peak memory of ``sepify audit`` and ``sepify rewrite`` on a > 2 GiB model with external data.

The issue's bar: handle such a model "without holding more than about twice its weights in
memory".  This script generates the model (``scripts/make_large_model.py``: a chain of big 3×3
convs, ≈ 2.26 GB of float32 weights, one of them exactly rank 1 per input channel so that the
lossless rewrite has something to do), runs every command in a fresh child process, and reads
the child's peak resident set size from ``os.wait4`` (``ru_maxrss``), next to the weights' size.

Usage::

    python benchmarks/bench_memory.py                   # generate in a temp dir, measure, delete
    python benchmarks/bench_memory.py --dir /data/tmp   # where to put the ≈ 4.5 GB of files
    python benchmarks/bench_memory.py --verify          # also `sepify verify` (onnxruntime, two sessions)
    python benchmarks/bench_memory.py --json out.json

Needs ≈ 4.5 GB of free disk (the model and its rewrite) and ≈ 6 GB of RAM.  Nothing is kept
unless ``--keep``.  The baseline row ``onnx.load`` is what merely loading the model with its
external data costs (the floor for anything that reads every weight).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GENERATOR = REPO / "scripts" / "make_large_model.py"
CLI = "import sys; from sepify.cli import main; sys.exit(main())"
IMPORTS = "import numpy, onnx, onnxruntime, onnx_graphsurgeon, networkx, rich, sepify.cli, sepify.pipeline.audit, sepify.pipeline.rewrite"


def run_child(argv: list[str], label: str) -> dict:
    """Run ``argv`` as a child; return exit code, wall time and its peak RSS (bytes)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # wait4 gives this child's own rusage (ru_maxrss in KiB on Linux); communicate() would reap it first.
    out_chunks, err_chunks = [], []
    import threading

    def pump(stream, sink):
        for line in stream:
            sink.append(line)

    threads = [threading.Thread(target=pump, args=(proc.stdout, out_chunks)),
               threading.Thread(target=pump, args=(proc.stderr, err_chunks))]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    for t in threads:
        t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return {"label": label, "argv": argv, "exit": proc.returncode, "seconds": wall,
            "peak_rss": usage.ru_maxrss * scale, "stdout": "".join(out_chunks), "stderr": "".join(err_chunks)}


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated and rewritten models")
    ap.add_argument("--verify", action="store_true", help="also run `sepify verify` on the pair")
    ap.add_argument("--convs", type=int, default=8)
    ap.add_argument("--wide", type=int, default=65536)
    ap.add_argument("--channels", type=int, default=120)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="sepify-bench-memory-", dir=args.dir))
    need = 2 * args.convs * args.wide * args.channels * 9 * 4 + (256 << 20)
    free = shutil.disk_usage(work).free
    if free < need:
        print(f"{work}: {free / 1e9:.1f} GB free, need ≈ {need / 1e9:.1f} GB", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
        return 2
    results: list[dict] = []
    try:
        src_dir, out_dir = work / "model", work / "rewritten"
        src_dir.mkdir()
        out_dir.mkdir()
        t0 = time.perf_counter()
        gen = run_child([sys.executable, str(GENERATOR), str(src_dir), "--convs", str(args.convs), "--wide",
                         str(args.wide), "--channels", str(args.channels)], "generate")
        if gen["exit"] != 0:
            print(gen["stderr"], file=sys.stderr)
            return 1
        model = src_dir / "large.onnx"
        sys.path.insert(0, str(GENERATOR.parent))
        from make_large_model import weight_bytes  # noqa: E402

        weights = weight_bytes(model)
        print(f"generated {model} in {time.perf_counter() - t0:.0f} s: {weights / 2**30:.2f} GiB of weights "
              f"({folder_size(src_dir) / 1e9:.2f} GB on disk)", flush=True)

        out = out_dir / "large_sep.onnx"
        commands = [
            ("baseline: python + sepify's imports", [sys.executable, "-c", IMPORTS]),
            ("onnx.load (with external data)", [sys.executable, "-c", f"import onnx; m = onnx.load({str(model)!r})"]),
            ("sepify audit --no-spectra", [sys.executable, "-c", CLI, "audit", str(model), "--no-spectra",
                                           "--format", "json", "-o", str(work / "audit_nospectra.json")]),
            ("sepify audit", [sys.executable, "-c", CLI, "audit", str(model), "--format", "json",
                              "-o", str(work / "audit.json")]),
            ("sepify rewrite (lossless)", [sys.executable, "-c", CLI, "rewrite", str(model), "-o", str(out),
                                           "--format", "json", "--report", str(work / "rewrite.json")]),
        ]
        if args.verify:
            commands.append(("sepify verify", [sys.executable, "-c", CLI, "verify", str(model), str(out)]))
        baseline = 0
        for label, cmd in commands:
            r = run_child(cmd, label)
            baseline = baseline or r["peak_rss"]
            r["ratio"] = r["peak_rss"] / weights
            r["ratio_above_baseline"] = (r["peak_rss"] - baseline) / weights
            results.append(r)
            print(f"  {label:48s} exit {r['exit']}  {r['seconds']:7.1f} s  peak RSS {r['peak_rss'] / 2**30:6.2f} GiB"
                  f"  = {r['ratio']:.2f} x weights ({r['ratio_above_baseline']:.2f} x above the baseline)", flush=True)
            if r["exit"] not in (0, 1):
                print(r["stderr"][-2000:], file=sys.stderr)
        rewrite = next(r for r in results if r["label"].startswith("sepify rewrite"))
        summary = {}
        if rewrite["exit"] == 0:
            rep = json.loads((work / "rewrite.json").read_text())
            summary = {
                "rewritten": [(r["qualified_name"], r["scheme"], r["rank"], r["weight_error"]) for r in rep["rewritten"]],
                "macs_ratio": rep["totals"]["macs_ratio"],
                "output_files": sorted(p.name for p in out_dir.iterdir()),
                "output_bytes": folder_size(out_dir),
            }
            print(f"rewrite: {summary['rewritten']}; conv MACs x{summary['macs_ratio']:.3f}; "
                  f"wrote {summary['output_files']} ({summary['output_bytes'] / 1e9:.2f} GB)")
        env = (f"Python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}, "
               f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM")
        print(env)
        if args.json:
            args.json.write_text(json.dumps({"weights_bytes": weights, "environment": env, "summary": summary,
                                             "runs": [{k: v for k, v in r.items() if k not in ("stdout",)}
                                                      for r in results]}, indent=2))
        return 0 if all(r["exit"] in (0, 1) for r in results) else 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
