"""sepify: find the expensive convolutions in an ONNX model and make them cheaper."""

from .version import __version__  # noqa: E402

from .errors import SepifyError  # noqa: E402
from .model.load import load_model  # noqa: E402
from .pipeline.audit import AuditReport, audit  # noqa: E402
from .pipeline.plan import Plan, Policy, plan  # noqa: E402
from .pipeline.rewrite import RewriteReport, rewrite  # noqa: E402

__all__ = [
    "AuditReport", "Plan", "Policy", "RewriteReport", "SepifyError", "__version__",
    "audit", "load_model", "plan", "rewrite",
]
