"""sepify: find the expensive convolutions in an ONNX model and make them cheaper.

The API: :func:`audit`, :func:`plan`, :func:`rewrite`, :func:`verify`, :func:`benchmark`,
:func:`calibrate`, :func:`calibrated_rewrite`, :func:`sweep` (results are typed dataclasses with
``to_dict()``).  The heavier ones are imported on first use, so ``import sepify`` stays cheap.
"""

from .version import __version__  # noqa: E402

from .errors import ParameterError, SepifyError  # noqa: E402
from .model.load import load_model  # noqa: E402
from .pipeline.audit import AuditReport, audit  # noqa: E402
from .pipeline.plan import Plan, Policy, plan  # noqa: E402
from .pipeline.rewrite import RewriteReport, rewrite  # noqa: E402

_LAZY = {
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
