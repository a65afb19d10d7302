"""Matplotlib plots (optional dependency: ``pip install sepify[plot]``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:
    from ..calibration.sweep import SweepReport



def plot_sweep(report: SweepReport, path, *, title: str | None = None) -> None:
    """The curve as a PNG/SVG/PDF (by ``path``'s suffix) with matplotlib (``pip install sepify[plot]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("plotting needs matplotlib: pip install 'sepify[plot]'") from None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=100)
    pts = report.points
    for ax, key, label in ((axes[0], "drift", f"drift ({report.drift_metric})"),
                           (axes[1], "drift_cosine", "1 − cosine (sepify verify)")):
        ax.plot([p.macs_ratio for p in pts], [max(getattr(p, key), 1e-12) for p in pts], "o-", color="#1f77b4",
                label="calibrated (sensitivity allocation + LS factors)")
        wo = [p for p in pts if p.drift_weight_only is not None]
        if wo:
            ax.plot([p.macs_ratio_weight_only for p in wo], [max(getattr(p, key + "_weight_only")
                    if key == "drift" else p.drift_cosine_weight_only, 1e-12) for p in wo], "s--", color="#d62728",
                    label="weight-only SVD (spectral budget)")
        ax.set_yscale("log")
        ax.set_xlabel("conv MACs kept (fraction)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.invert_xaxis()
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title or f"{report.model.rsplit('/', 1)[-1]} — eval: {report.eval_data.rsplit('/', 1)[-1]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = ["plot_sweep"]
