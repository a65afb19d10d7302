"""What the benchmark scripts print about the machine they ran on, and how they end (shared by every
bench_*.py)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_average() -> str:
    return "load avg %.2f/%.2f/%.2f" % os.getloadavg() if hasattr(os, "getloadavg") else "load avg ?"


def finish(results: dict, json_path: str | None = None, note: str = "") -> None:
    """A benchmark's last words: every figure to ``json_path`` (if given), then the cores and the load
    the run ended on (a loaded machine inflates every latency)."""
    import json

    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))
    print(f"\nmachine: {os.cpu_count()} cores, {load_average()}" + (f"; {note}" if note else ""))


def describe(packages=("sepify", "onnx", "onnxruntime", "numpy")) -> str:
    """Python, CPUs, machine, the packages' versions (sepify's with the repo revision) and any
    OPENBLAS_* settings — enough to tell two runs' figures apart."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for pkg in packages:
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg} (missing)")
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001 - no git, not a checkout: the versions still say enough
        rev = ""
    if rev and parts and parts[0].startswith("sepify "):
        parts[0] += f" (repo {rev})"
    blas = " ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith("OPENBLAS_"))
    return (f"Python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}; "
            + ", ".join(parts) + (f"; {blas}" if blas else ""))


def precompile(packages=("sepify",)) -> None:
    """Bytecode for ``packages`` before timing whole processes.  A wheel install has its ``.pyc``
    (pip compiles them; onnx-tool's are there), an editable install of sepify does not, and with
    ``PYTHONDONTWRITEBYTECODE`` set every fresh process would recompile sepify's ~50 modules (≈0.1 s
    of a ~0.9 s audit) — a cost of how the checkout was installed, not of the tool."""
    import compileall
    import importlib.util
    import sys

    for pkg in packages:
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.submodule_search_locations:
            for where in spec.submodule_search_locations:
                compileall.compile_dir(where, quiet=1)
    print(f"[bench] bytecode compiled for {', '.join(packages)} (as a wheel install has it)", file=sys.stderr)
