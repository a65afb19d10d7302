"""sepify: find the expensive convolutions in an ONNX model and make them cheaper."""

__version__ = "0.1.0"

from .errors import SepifyError  # noqa: E402
from .load import load_model  # noqa: E402
from .audit import AuditReport, audit  # noqa: E402
from .plan import Plan, Policy, plan  # noqa: E402
from .rewrite import RewriteReport, rewrite  # noqa: E402

__all__ = [
    "AuditReport", "Plan", "Policy", "RewriteReport", "SepifyError", "__version__",
    "audit", "load_model", "plan", "rewrite",
]
