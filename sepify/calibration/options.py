"""Calibration options: one typed object that every calibrated path takes (rewrite, plan, sweep, report),
so a flag given on the command line reaches every path it is accepted on."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..core.drift import DRIFT_METRICS
from ..model.samples import DEFAULT_BATCH
from ..errors import ParameterError

DEFAULT_ROWS = 4096  # sampled output positions per layer
ALLOCATIONS = ("auto", "sensitivity", "plan")


@dataclass(frozen=True)
class CalibrationOptions:
    """How to calibrate (see :func:`sepify.calibration.calibrate.calibrate` for each option).

    ``samples``: how many samples to use (random data: how many to draw, default 32); ``rows``:
    sampled output positions per layer; ``seed``: of random data and sampled positions;
    ``value_range``: random data uniform in ``(lo, hi)`` instead of N(0, 1); ``batch``: samples per
    run when the batch dim is symbolic; ``fold_bn``: fold Conv → BatchNormalization pairs;
    ``drift_metric``: ``channel`` | ``cosine``; ``allocation``: ``auto`` | ``sensitivity`` | ``plan``;
    ``max_drift``: bound on the measured drift; ``progress``: progress bars on stderr;
    ``only_faster``: only candidates measured faster than their conv (ranks of the latency grid).
    """

    samples: int | None = None
    rows: int = DEFAULT_ROWS
    seed: int = 0
    value_range: tuple[float, float] | None = None
    batch: int = DEFAULT_BATCH
    fold_bn: bool = True
    drift_metric: str = "channel"
    allocation: str = "auto"
    max_drift: float | None = None
    progress: bool = False
    only_faster: bool = False  # candidates restricted to measured-faster ranks of the latency grid

    def __post_init__(self) -> None:
        if self.samples is not None and self.samples < 1:
            raise ParameterError("samples", self.samples, "must be ≥ 1")
        if self.rows < 1:
            raise ParameterError("rows", self.rows, "calibration rows per layer must be ≥ 1")
        if self.drift_metric not in DRIFT_METRICS:
            raise ParameterError("drift_metric", self.drift_metric, f"unknown drift metric ({', '.join(DRIFT_METRICS)})")
        if self.allocation not in ALLOCATIONS:
            raise ParameterError("allocation", self.allocation, f"unknown allocation ({', '.join(ALLOCATIONS)})")
        if self.max_drift is not None and not self.max_drift >= 0:
            raise ParameterError("max_drift", self.max_drift, "needs a non-negative drift (1 - cosine)")
        if self.value_range is not None and not self.value_range[0] < self.value_range[1]:
            raise ParameterError("value_range", self.value_range, "needs lo < hi")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


__all__ = ["ALLOCATIONS", "CalibrationOptions", "DEFAULT_BATCH", "DEFAULT_ROWS", "DRIFT_METRICS"]
