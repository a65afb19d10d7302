"""A :class:`Realization`: everything the emitter needs to replace one conv by its chain.

Realizations are what every path from a decision to the graph produces — the weight-only
rewrite, the latency measurement of isolated nodes and the calibrated rewrite — and what the one
emitter (:mod:`sepify.pipeline.emit`) consumes.  Pure data: tensor names, geometry and factors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .geometry import ConvGeometry
from .lowering import SINGLE, Lowered, lowering_kinds
from .stages import Stage, stages_macs

SOURCES = ("exact", "svd", "calibrated")


@dataclass(frozen=True, eq=False)
class Realization:
    """One conv (and, when ``absorbs`` names one, the BatchNormalization after it) replaced by a chain.

    ``stages`` hold the factors as they will be stored (the weight's dtype); ``lowered`` is how they
    are written (:mod:`sepify.core.lowering`).  The chain reads ``input`` and its last node writes
    ``output`` — the conv's output tensor, or the absorbed BatchNormalization's — so consumers and
    graph outputs are untouched.  ``bias`` None keeps the conv's own bias input (if any).
    """

    node: str  # qualified name of the conv
    input: str
    output: str
    replaces: tuple[str, ...]  # first output tensor of every node the chain replaces (conv, then BN)
    weight_name: str  # the conv's weight: factors of one weight realized alike are stored once
    geometry: ConvGeometry
    auto_pad: str
    scheme: str
    variant: str
    rank: int
    chained: bool
    stages: tuple[Stage, ...]
    lowered: Lowered
    weight_error: float  # realized ‖W − Ŵ‖/‖W‖ after the cast (W: BatchNorm folded when absorbed)
    planned_error: float
    source: str  # one of SOURCES
    bias: np.ndarray | None = None
    absorbs: str | None = None  # qualified name of the absorbed BatchNormalization
    linear: str = ""  # "MatMul" / "Gemm": a linear layer, its two 1×1 stages written as two of its own op

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"unknown realization source {self.source!r}")

    @property
    def macs_before(self) -> int:
        return self.geometry.macs

    @property
    def macs_after(self) -> int:
        return stages_macs(self.geometry, self.stages)

    @property
    def lowering(self) -> str:
        """The lowering used: one of ``LOWERINGS``, or ``"single"`` when the chain can be written only one way."""
        return self.lowered.kind if lowering_kinds(self.stages) else SINGLE

    @property
    def label(self) -> str:
        return self.scheme + ("+spatial" if self.chained else "")


__all__ = ["Realization", "SOURCES"]
