"""sepify: find the expensive convolutions in an ONNX model and make them cheaper.

The API: :func:`audit`, :func:`plan`, :func:`rewrite`, :func:`verify`, :func:`benchmark`,
:func:`calibrate`, :func:`calibrated_rewrite`, :func:`sweep` (results are typed dataclasses with
``to_dict()``).  They are imported on first use, so ``import sepify`` stays cheap.
"""

from .version import __version__  # noqa: E402

from .errors import ParameterError, SepifyError  # noqa: E402

# Every entry point is imported on first use: ``sepify audit`` need not load the rewriter, and a
# build step that only audits pays for what it runs.
_LAZY = {
    "load_model": ("model.load", "load_model"),
    "audit": ("pipeline.audit", "audit"),
    "AuditReport": ("pipeline.audit", "AuditReport"),
    "plan": ("pipeline.plan", "plan"),
    "Plan": ("pipeline.plan", "Plan"),
    "Policy": ("pipeline.plan", "Policy"),
    "rewrite": ("pipeline.rewrite", "rewrite"),
    "RewriteReport": ("pipeline.rewrite", "RewriteReport"),
    "verify": ("pipeline.verify", "verify"),
    "DriftReport": ("pipeline.verify", "DriftReport"),
    "benchmark": ("pipeline.bench", "benchmark"),
    "BenchReport": ("pipeline.bench", "BenchReport"),
    "calibrate": ("calibration.calibrate", "calibrate"),
    "calibrated_rewrite": ("calibration.calibrate", "calibrated_rewrite"),
    "CalibrationOptions": ("calibration.options", "CalibrationOptions"),
    "sweep": ("calibration.sweep", "sweep"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sepify' has no attribute {name!r}")


__all__ = [
    "AuditReport", "BenchReport", "CalibrationOptions", "DriftReport", "ParameterError", "Plan", "Policy",
    "RewriteReport", "SepifyError", "__version__", "audit", "benchmark", "calibrate", "calibrated_rewrite",
    "load_model", "plan", "rewrite", "sweep", "verify",
]
