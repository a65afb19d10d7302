"""The one place sepify makes onnxruntime sessions: verify, bench, latency, calibration and the
shape probe all come through :func:`ort_session` (with their own presets of its options)."""

from __future__ import annotations

import contextlib
import numbers
import io
from typing import Sequence

import onnx

from ..errors import ModelLoadError, ParameterError, UsageError
from .load import ort_max_ir_version

PROVIDER_SUFFIX = "ExecutionProvider"


def provider_names() -> dict[str, str]:
    """Every name ``providers`` accepts → onnxruntime's name: the full names onnxruntime knows
    (``onnxruntime.get_all_providers()``) and, for each, its short name — the full name without
    "ExecutionProvider", in any case (``cpu``, ``cuda``, ``tensorrt``, ``openvino``, ``coreml``…)."""
    import onnxruntime as ort

    names: dict[str, str] = {}
    for full in ort.get_all_providers():
        names[full.lower()] = full
        if full.endswith(PROVIDER_SUFFIX):
            names[full[: -len(PROVIDER_SUFFIX)].lower()] = full
    return names


def resolve_providers(providers) -> list[str] | None:
    """``providers`` (names, or one comma-separated string; short names allowed, see
    :func:`provider_names`) as onnxruntime's names, in order, each checked against the providers
    this onnxruntime build has (``onnxruntime.get_available_providers()``): an unknown or
    unavailable one is a ParameterError naming it and what is available.  None or empty: None
    (onnxruntime on the CPU)."""
    import onnxruntime as ort

    if providers is None:
        return None
    items = [providers] if isinstance(providers, str) else list(providers)
    wanted = [p.strip() for item in items for p in str(item).split(",") if p.strip()]
    if not wanted:
        return None
    known = provider_names()
    available = ort.get_available_providers()
    short = ", ".join(p[: -len(PROVIDER_SUFFIX)].lower() if p.endswith(PROVIDER_SUFFIX) else p for p in available)
    out: list[str] = []
    for name in wanted:
        full = known.get(name.lower())
        if full is None:
            raise ParameterError("providers", name, f"unknown execution provider (this onnxruntime has: {short})")
        if full not in available:
            raise ParameterError("providers", name, f"{full} is not available in this onnxruntime build "
                                                    f"(it has: {short})")
        if full not in out:
            out.append(full)
    return out


def ort_session_bytes(model: onnx.ModelProto, extra_outputs: Sequence[str] = ()) -> bytes:
    """Serialize ``model`` for onnxruntime: IR version clamped, extra tensors exposed as outputs.

    The model is restored afterwards, so the caller's proto is unchanged.
    """
    graph = model.graph
    existing = {o.name for o in graph.output}
    added = [n for n in dict.fromkeys(extra_outputs) if n not in existing]
    old_ir = model.ir_version
    for name in added:
        graph.output.add().name = name
    model.ir_version = min(old_ir, ort_max_ir_version())
    try:
        return model.SerializeToString()
    finally:
        model.ir_version = old_ir
        if added:
            del graph.output[len(graph.output) - len(added):]


SPINNING = ("run", "off")


def check_threads(threads) -> None:
    """``threads`` is None (onnxruntime's default) or a positive number of intra-op threads."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1):
        raise ParameterError("threads", threads, "needs a positive number of threads (or none: onnxruntime's default)")
_OPTIMIZATION = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "all": "ORT_ENABLE_ALL"}


def ort_session(model: onnx.ModelProto, extra_outputs: Sequence[str] = (), *, providers=None,
                threads: int | None = None, spinning: str | None = "off", optimization: str | None = None,
                profile_prefix: str | None = None, log_severity: int = 3):
    """The one place sepify makes onnxruntime sessions (verify, bench, the latency-aware rewrite,
    calibration, the shape probe): ``model`` serialized by :func:`ort_session_bytes` (IR version
    clamped, ``extra_outputs`` exposed), on ``providers`` (default: CPU only).

    * ``threads``: intra-op threads, with one inter-op thread (None: onnxruntime's defaults).
    * ``spinning`` (see :mod:`sepify.bench`): ``"off"`` never spins (``session.intra_op.allow_spinning
      = 0``), so an idle session's threads never steal CPU from the one running; ``"run"`` spins within
      a run and stops when it returns (``session.force_spinning_stop``), for timing; None: onnxruntime's
      default.
    * ``optimization``: ``"disable"``, ``"basic"`` or ``"all"`` graph optimizations (None: onnxruntime's
      default, all).
    * ``profile_prefix``: profile every run into a file with this prefix (``session.end_profiling()``).

    A model onnxruntime refuses raises ModelLoadError with its first line.
    """
    import onnxruntime as ort

    if spinning is not None and spinning not in SPINNING:
        raise UsageError(f"unknown spinning mode {spinning!r} (one of {', '.join(SPINNING)})")
    check_threads(threads)
    opts = ort.SessionOptions()
    opts.log_severity_level = log_severity
    if spinning == "off":
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif spinning == "run":
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if optimization is not None:
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPTIMIZATION[optimization])
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    wanted = resolve_providers(providers) or ["CPUExecutionProvider"]
    banner = io.StringIO()
    try:
        # onnxruntime prints an "EP Error … Falling back" banner on stdout when a provider fails to
        # start, and retries on the CPU: keep it off stdout, and refuse the fallback below.
        with contextlib.redirect_stdout(banner):
            session = ort.InferenceSession(ort_session_bytes(model, extra_outputs), opts, providers=wanted)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"onnxruntime cannot load the model: {ort_message(exc)}") from None
    missing = [p for p in wanted if p not in session.get_providers()]
    if missing:
        said = next((ln for ln in banner.getvalue().splitlines() if "EP Error" in ln), "")
        raise ParameterError("providers", missing[0], "onnxruntime could not start it"
                             + (f" ({ort_message(said.replace('EP Error', '', 1))})" if said else "")
                             + "; it fell back to " + ", ".join(session.get_providers()))
    return session


def ort_message(exc: BaseException, limit: int = 400) -> str:
    """onnxruntime's error on one line with its essential part kept: the status prefix
    (``[ONNXRuntimeError] : 2 : INVALID_ARGUMENT :``) dropped, the node name and the status message
    kept, whitespace folded, cut at ``limit`` characters."""
    import re

    text = " ".join(str(exc).split())
    text = re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*[A-Z_]+\s*:\s*", "", text)
    text = text.replace("Non-zero status code returned while running ", "")
    if not text:
        return type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


__all__ = ["PROVIDER_SUFFIX", "SPINNING", "ort_message", "ort_session", "ort_session_bytes", "provider_names",
           "check_threads", "resolve_providers"]
