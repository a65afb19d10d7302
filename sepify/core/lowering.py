"""Lowerings: the same chain written as different ONNX subgraphs (same math, same MACs) — pure numpy.

Only an unchained rank-r > 1 dw-pw / pw-dw chain has a choice (:func:`lowering_kinds`); every
other chain is written as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from .geometry import ConvGeometry, prod
from .stages import Stage


def branch_lowering(stages: Sequence[Stage]) -> list[list[Stage]]:
    """Rewrite a rank-r (r > 1) dw-pw or pw-dw chain as r rank-1 chains whose outputs are summed.

    Same MACs and the same math, but every depthwise stage has channel multiplier 1 and one
    input per group — the layout onnxruntime's fast depthwise kernel handles; a multiplier-r
    depthwise conv (or an N-group conv with r inputs per group) falls back to a generic grouped
    convolution that reaches only a fraction of the MAC cut.  Other chains come back unchanged
    as a single branch.  The bias belongs to the caller's last node of branch 0.
    """
    if len(stages) != 2:
        return [list(stages)]
    first, second = stages
    if first.role == "depthwise" and second.role == "pointwise" and first.out_channels > first.group:
        r = first.out_channels // first.group  # dw-pw: dw channel c*r + j, pw column cl*r + j
        c = first.group
        pw = second.weight
        branches = []
        for j in range(r):
            dw_j = first.weight[j::r]
            pw_j = pw[:, j::r]
            branches.append([
                replace(first, out_channels=c, weight=dw_j),
                replace(second, in_per_group=second.in_per_group // r, weight=pw_j),
            ])
        return branches
    if first.role == "pointwise" and second.role == "grouped" and second.in_per_group > 1:
        r = second.in_per_group  # pw-dw: pw channel n*r + j feeds output n through kernel [n, j]
        n = second.out_channels
        branches = []
        for j in range(r):
            branches.append([
                replace(first, out_channels=n, weight=first.weight[j::r]),
                replace(second, in_per_group=1, role="depthwise", weight=second.weight[:, j:j + 1]),
            ])
        return branches
    return [list(stages)]


LOWERINGS = ("branches", "grouped", "concat")
SINGLE = "single"  # the lowering of a chain that can be written only one way (rank 1, chained, spatial)


@dataclass
class Lowered:
    """A chain written as ``x → head → fan-out → branches → join → tail → y``.

    Every branch reads the head's output (or ``x`` when there is no head); with ``split`` the
    head's output is cut into ``len(branches)`` equal channel slices and branch ``j`` reads slice
    ``j``.  ``join`` combines the branch outputs: ``"sum"`` (a chain of Adds) or ``"concat"`` (Concat
    on channels); a single branch needs no join.  The bias belongs to :meth:`bias_stage`.
    """

    kind: str  # "grouped" | "branches" | "concat"
    head: list[Stage]
    branches: list[list[Stage]]
    join: str = "sum"
    split: bool = False
    tail: list[Stage] | None = None

    def __post_init__(self) -> None:
        self.tail = list(self.tail or [])

    def bias_stage(self) -> Stage:
        """The conv that adds the bias: the last of the tail, else the last of branch 0."""
        return self.tail[-1] if self.tail else self.branches[0][-1]

    def all_stages(self) -> list[Stage]:
        return [*self.head, *(s for b in self.branches for s in b), *self.tail]

    def macs(self, geo: ConvGeometry) -> int:
        """MACs of every conv of the lowered graph (joins and splits are free by convention)."""
        def run(stages, spatial):
            total = 0
            for st in stages:
                spatial = st.out_spatial(geo, spatial)
                total += geo.batch * prod(spatial) * st.out_channels * st.in_per_group * prod(st.kernel)
            return total, spatial

        total, spatial = run(self.head, list(geo.in_spatial))
        out = spatial
        for branch in self.branches:
            t, out = run(branch, spatial)
            total += t
        return total + run(self.tail, out)[0]


def lowering_kinds(stages: Sequence[Stage]) -> list[str]:
    """The lowerings that give distinct graphs for this chain (``[]``: only one way to write it).

    Only an unchained rank-r > 1 dw-pw / pw-dw chain has a choice: ``grouped`` (as factorized: one
    multiplier-r depthwise conv / one N-group conv with r inputs per group), ``branches`` (r rank-1
    chains summed) and, when the pointwise stage is ungrouped, ``concat``.
    """
    if len(stages) != 2:
        return []
    first, second = stages
    if first.role == "depthwise" and second.role == "pointwise" and first.out_channels > first.group:
        return ["branches", "grouped"] + (["concat"] if second.group == 1 else [])
    if first.role == "pointwise" and second.role == "grouped" and second.in_per_group > 1:
        return ["branches", "grouped"] + (["concat"] if first.group == 1 else [])
    return []


def lower(stages: Sequence[Stage], kind: str) -> Lowered:
    """Write ``stages`` as lowering ``kind`` (see :data:`LOWERINGS`).

    ``concat`` for dw-pw: r multiplier-1 depthwise convs (kernel ``j`` of every channel), their
    outputs concatenated branch-major (channel ``j·C + c``) and one pointwise conv with its
    columns permuted to match.  Its mirror for pw-dw: one pointwise conv ``C → r·N`` with its rows
    permuted branch-major, split into r slices of N channels, r multiplier-1 depthwise convs,
    summed.  Both need an ungrouped pointwise stage (a permutation across groups would break the
    grouping); a chain that cannot take ``kind`` falls back to ``branches``, and one with no choice
    (rank 1, chained, spatial) comes back as written — :attr:`Lowered.kind` says which was used.
    """
    if kind not in LOWERINGS:
        raise ValueError(f"unknown lowering {kind!r}")
    kinds = lowering_kinds(stages)
    if not kinds:
        return Lowered("grouped", [], [list(stages)])
    if kind not in kinds:
        kind = "branches"
    if kind == "grouped":
        return Lowered("grouped", [], [list(stages)])
    if kind == "branches":
        return Lowered("branches", [], branch_lowering(stages), join="sum")
    first, second = stages
    if first.role == "depthwise":  # dw-pw: dw channel c*r + j, pw column c*r + j
        r = first.out_channels // first.group
        c = first.group
        branches = [[replace(first, out_channels=c, weight=first.weight[j::r])] for j in range(r)]
        pw = np.concatenate([second.weight[:, j::r] for j in range(r)], axis=1)
        return Lowered("concat", [], branches, join="concat", tail=[replace(second, weight=pw)])
    r = second.in_per_group  # pw-dw: pw channel n*r + j feeds output n through kernel [n, j]
    pw = np.concatenate([first.weight[j::r] for j in range(r)], axis=0)
    branches = [[replace(second, in_per_group=1, role="depthwise", weight=second.weight[:, j:j + 1])]
                for j in range(r)]
    return Lowered("concat", [replace(first, weight=pw)], branches, join="sum", split=True)


__all__ = ["LOWERINGS", "Lowered", "SINGLE", "branch_lowering", "lower", "lowering_kinds"]
