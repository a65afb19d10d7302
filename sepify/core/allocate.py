r"""The one budget allocator, shared by weight-only and calibrated planning — pure Python.

Every layer offers options ``(cost, loss)`` — cost: the MACs (or latency) the layer keeps, loss:
what the option costs in accuracy (weight-only: retained spectral energy lost, ``−log(1 − e²)``;
calibrated: predicted drift ``s·e²``).  Each layer walks its *front* — the Pareto options from the
original layer ``(cost₀, 0)`` towards lower cost — one step at a time, and the step taken next,
across all layers, is the one that adds the least loss per unit of cost saved:

.. math::  \text{slope} = \frac{\text{loss}(o_{k+1}) - \text{loss}(o_k)}{\text{cost}(o_k) - \text{cost}(o_{k+1})}

With ``convex=True`` the front is first reduced to its lower convex hull (slopes rising along
each layer), so the greedy walk is the Lagrangian solution; without it, steps follow the front
as it is (the weight-only planner's rule).  The walk stops once the total cost is within
``target`` (overshooting by at most one step) or before a step would take the total loss past
``max_loss``.  Ties go to the layer given first.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Sequence


@dataclass(frozen=True)
class Option:
    cost: float
    loss: float
    payload: Any = None  # what the caller needs back (a Candidate, a (scheme, rank) pair, …)
    # What the front is Pareto-optimal in (default: the loss).  A loss that rounds several small
    # errors to one value (−log(1 − e²) is 0 for every e below 1e-8) still needs them told apart.
    key: float | None = None

    @property
    def order(self) -> float:
        return self.loss if self.key is None else self.key


def front(cost0: float, options: Sequence[Option]) -> list[Option]:
    """The Pareto options cheaper than ``cost0``, from the most to the least costly (loss rising)."""
    kept: list[Option] = []
    best = math.inf
    for o in sorted((o for o in options if o.cost < cost0), key=lambda o: (o.cost, o.order)):
        if o.order < best:
            kept.append(o)
            best = o.order
    return kept[::-1]


def hull(cost0: float, options: Sequence[Option]) -> list[Option]:
    """The lower convex hull of the front, seen from ``(cost0, 0)``: slopes rise from step to step."""
    out: list[Option] = []
    origin = Option(cost0, 0.0)
    for o in front(cost0, options):
        while out:
            prev = out[-2] if len(out) > 1 else origin
            last = out[-1]
            s_prev = (last.loss - prev.loss) / max(prev.cost - last.cost, 1)
            s_new = (o.loss - last.loss) / max(last.cost - o.cost, 1)
            if s_new < s_prev:
                out.pop()
            else:
                break
        out.append(o)
    return out


@dataclass
class Allocation:
    chosen: dict[Hashable, Option]  # layer -> its option (layers left as they are are absent)
    loss: float
    cost: float  # total cost after
    exhausted: bool  # every layer walked to its cheapest option before the target was met


def greedy(layers: Mapping[Hashable, tuple[float, Sequence[Option]]], *, target: float | None = None,
           max_loss: float | None = None, convex: bool = False, fixed: float = 0.0) -> Allocation:
    """Walk the layers' fronts (``{layer: (cost₀, options)}``) greedily; see the module doc.

    ``fixed``: the cost of everything outside ``layers`` (layers no option applies to), counted in
    the total that ``target`` bounds."""
    paths = {k: (hull if convex else front)(c0, opts) for k, (c0, opts) in layers.items()}
    order = {k: i for i, k in enumerate(layers)}
    position = {k: -1 for k in layers}
    spent = float(fixed + sum(c0 for c0, _ in layers.values()))
    loss = 0.0

    def entry(k):
        path, at = paths[k], position[k]
        if at + 1 >= len(path):
            return None
        cur_cost, cur_loss = (path[at].cost, path[at].loss) if at >= 0 else (layers[k][0], 0.0)
        step = path[at + 1]
        saved = cur_cost - step.cost
        return ((step.loss - cur_loss) / max(saved, 1), order[k], k, saved, step.loss - cur_loss)

    heap = [e for e in (entry(k) for k in layers) if e is not None]
    heapq.heapify(heap)
    while heap:
        if target is not None and spent <= target:
            break
        _, _, k, saved, added = heap[0]
        if max_loss is not None and loss + added > max_loss:
            break
        heapq.heappop(heap)
        position[k] += 1
        spent -= saved
        loss += added
        nxt = entry(k)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    chosen = {k: paths[k][p] for k, p in position.items() if p >= 0}
    exhausted = not heap and target is not None and spent > target
    return Allocation(chosen, loss, spent, exhausted)


__all__ = ["Allocation", "Option", "front", "greedy", "hull"]
