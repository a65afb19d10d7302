"""How far two models' outputs are apart — pure numpy, shared by ``verify`` and calibration.

* :class:`DriftMeter`: ``1 − cosine`` per output over all samples, plain or after standardizing
  each output channel (``metric="channel"``); :func:`drift_definition` says it in words, from the
  same constants the code uses.
* :class:`TensorStats`: the elementwise statistics ``sepify verify`` reports (max/mean/p99 of
  ``|a − b|``, cosine, SNR, mismatches against ``atol + rtol·|a|``, top-k agreement), accumulated
  run by run so that many samples never have to be held at once.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import ParameterError

DRIFT_METRICS = ("channel", "cosine")
STD_FLOOR = 0.1  # channel metric: a channel's spread counts as at least this fraction of its RMS
P99_EXACT_ELEMENTS = 1 << 20  # TensorStats keeps every |a − b| up to this many, then a strided sample


def drift_definition(metric: str) -> str:
    """What :class:`DriftMeter` computes for ``metric``, in one sentence (the JSON ``drift_definition``)."""
    if metric not in DRIFT_METRICS:
        raise ParameterError("drift_metric", metric, f"unknown drift metric ({', '.join(DRIFT_METRICS)})")
    if metric == "cosine":
        return ("1 - cosine between the original's and the rewritten model's values of each float output, over "
                "all samples at once (non-finite elements left out), clipped to [0, 2]; the mean over the outputs")
    return ("1 - cosine between the original's and the rewritten model's values of each float output, over all "
            "samples at once, after standardizing each output channel (axis 1) with the original's mean and "
            f"standard deviation of that channel over all samples and positions (the deviation floored at "
            f"{STD_FLOOR:g} x the channel's RMS); an output whose axis 1 is no channel axis (it holds the samples "
            "or changes from run to run) gets the plain cosine; non-finite elements left out, clipped to [0, 2]; "
            "the mean over the outputs")


class DriftMeter:
    """``1 − cosine`` between reference and new outputs over all samples, mean over outputs.

    ``reference[run][output]``: the original's outputs, run by run.  ``metric="cosine"``: the plain
    cosine of each output tensor (what ``sepify verify`` prints).  ``metric="channel"``: each output
    channel (axis 1) is first standardized with the reference's mean and standard deviation of that
    channel, so channels in different units and offsets weigh alike — a detector's box coordinates
    (hundreds of pixels, offset by the anchor grid) would otherwise drown its class probabilities
    (0…1) in the plain cosine.  A channel's standard deviation counts as at least
    :data:`STD_FLOOR` of its RMS, so nearly constant channels (logits of random inputs) are not
    blown up.

    Axis 1 is taken as the channel axis only where it can be one: every run gives the output the
    same shape except on axis 0, and (when the runs' sample counts ``per_run`` are known) axis 0 is
    the one that follows them.  A time-major output (``[T, B, …]``: the samples on axis 1) is
    measured with the plain cosine instead, and :attr:`plain` names it.
    """

    def __init__(self, reference: Sequence[Sequence[np.ndarray]], metric: str = "channel",
                 per_run: Sequence[int] | None = None):
        if metric not in DRIFT_METRICS:
            raise ParameterError("drift_metric", metric, f"unknown drift metric ({', '.join(DRIFT_METRICS)})")
        self.metric = metric
        self.reference = [[np.asarray(t, dtype=np.float64) for t in outs] for outs in reference]
        self.stats: list[tuple[np.ndarray, np.ndarray] | None] = []
        self.plain: list[int] = []  # outputs whose axis 1 is no channel axis (plain cosine)
        if self.reference:
            for i in range(len(self.reference[0])):
                first = self.reference[0][i]
                if metric != "channel" or first.ndim < 2:
                    self.stats.append(None)
                    continue
                shapes = [outs[i].shape for outs in self.reference]
                varies = any(sh[1:] != first.shape[1:] for sh in shapes)  # axis 1+ changes run to run
                samples_on_axis_1 = per_run is not None and len(per_run) == len(shapes) and \
                    all(sh[1] == k for sh, k in zip(shapes, per_run)) and \
                    any(sh[0] != k for sh, k in zip(shapes, per_run))
                if varies or samples_on_axis_1:
                    self.stats.append(None)
                    self.plain.append(i)
                    continue
                c = first.shape[1]
                s1, s2, count = np.zeros(c), np.zeros(c), 0
                for outs in self.reference:
                    t = np.moveaxis(np.where(np.isfinite(outs[i]), outs[i], 0.0), 1, 0).reshape(c, -1)
                    s1 += t.sum(axis=1)
                    s2 += (t * t).sum(axis=1)
                    count += t.shape[1]
                mean = s1 / max(count, 1)
                rms = np.sqrt(s2 / max(count, 1))
                std = np.sqrt(np.maximum(rms * rms - mean * mean, 0.0))
                # A channel that barely varies over the samples is measured against a tenth of its size.
                floor = np.maximum(STD_FLOOR * rms, 1e-30)
                self.stats.append((mean, 1.0 / np.maximum(std, floor)))

    def _scaled(self, t: np.ndarray, i: int) -> np.ndarray:
        st = self.stats[i]
        if st is None:
            return t
        shape = (1, -1) + (1,) * (t.ndim - 2)
        return (t - st[0].reshape(shape)) * st[1].reshape(shape)

    def drift(self, outputs: Sequence[Sequence[np.ndarray]]) -> float:
        return float(np.mean(self.per_output(outputs))) if self.reference else 0.0

    def per_output(self, outputs: Sequence[Sequence[np.ndarray]]) -> list[float]:
        if not self.reference:
            return []
        k = len(self.reference[0])
        dots, na, nb = np.zeros(k), np.zeros(k), np.zeros(k)
        for ref, new in zip(self.reference, outputs):
            for i, (a, b) in enumerate(zip(ref, new)):
                b = np.asarray(b, dtype=np.float64)
                ok = np.isfinite(a) & np.isfinite(b)
                av, bv = self._scaled(np.where(ok, a, 0.0), i).ravel(), self._scaled(np.where(ok, b, 0.0), i).ravel()
                dots[i] += av @ bv
                na[i] += av @ av
                nb[i] += bv @ bv
        cos = np.where((na > 0) & (nb > 0), dots / np.sqrt(np.maximum(na * nb, 1e-300)), np.where(na == nb, 1.0, 0.0))
        return [float(v) for v in np.clip(1.0 - cos, 0.0, 2.0)]


class TensorStats:
    """Elementwise comparison of one tensor ``b`` against the original ``a``, run by run.

    :meth:`add` one run's pair; the properties give the statistics over every element of every
    run (the p99 of ``|a − b|`` from every element up to :data:`P99_EXACT_ELEMENTS` in all, from an
    evenly strided sample of each run above).  ``atol``/``rtol``: the elementwise rule
    ``|a − b| ≤ atol + rtol·|a|`` whose violations :attr:`mismatched` counts."""

    def __init__(self, atol: float, rtol: float, expected_runs: int = 1):
        self.atol, self.rtol, self.expected_runs = float(atol), float(rtol), max(1, expected_runs)
        self.shape: list[int] | None = None
        self.shape_mismatch = False
        self.float = True
        self.size = 0
        self.finite = 0  # elements finite in both
        self.max_abs = self.sum_abs = self.max_rel = 0.0
        self.dot = self.na = self.nb = self.noise = 0.0
        self.nonfinite_a = self.nonfinite_b = 0
        self.same_nonfinite = True
        self.mismatched = 0
        self.equal = 0  # non-float tensors: equal elements
        self.diffs: list[np.ndarray] = []
        self.stride = 1
        self.rows = 0
        self.top1 = 0
        self.top5 = 0.0
        self.runs = 0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.asarray(a), np.asarray(b)
        self.runs += 1
        if self.shape is None:
            self.shape = list(a.shape)
            self.float = a.dtype.kind in "fc"
            self.stride = max(1, -(-a.size * self.expected_runs // P99_EXACT_ELEMENTS))
        if a.shape != b.shape:
            self.shape_mismatch = True
            return
        self.size += a.size
        if not self.float:
            self.equal += int(np.count_nonzero(a == b))
            return
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        fin_a, fin_b = np.isfinite(a64), np.isfinite(b64)
        self.nonfinite_a += int((~fin_a).sum())
        self.nonfinite_b += int((~fin_b).sum())
        if not (np.array_equal(fin_a, fin_b) and np.array_equal(a64[~fin_a], b64[~fin_b])):
            self.same_nonfinite = False
        both = fin_a & fin_b
        av, bv = a64[both], b64[both]
        diff = np.abs(av - bv)
        ref = np.abs(av)
        self.finite += diff.size
        if diff.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
            self.sum_abs += float(diff.sum())
            self.max_rel = max(self.max_rel, float((diff / np.maximum(ref, np.finfo(np.float32).tiny)).max()))
            self.dot += float(av @ bv)
            self.na += float(av @ av)
            self.nb += float(bv @ bv)
            self.noise += float((diff ** 2).sum())
            self.mismatched += int(np.count_nonzero(diff > self.atol + self.rtol * ref))
            self.diffs.append(diff[:: self.stride].astype(np.float32))
        if a.ndim == 2 and a.shape[1] >= 2:
            # Looks like class scores [batch, classes]: top-k agreement per row.
            self.rows += a.shape[0]
            self.top1 += int((a64.argmax(1) == b64.argmax(1)).sum())
            k = min(5, a.shape[1])
            ta, tb = np.argsort(-a64, axis=1)[:, :k], np.argsort(-b64, axis=1)[:, :k]
            self.top5 += float(sum(len(set(x) & set(y)) / k for x, y in zip(ta, tb)))

    @property
    def mean_abs(self) -> float:
        return self.sum_abs / self.finite if self.finite else 0.0

    @property
    def p99_abs(self) -> float:
        if not self.diffs:
            return 0.0
        return float(np.percentile(np.concatenate(self.diffs).astype(np.float64), 99))

    @property
    def cosine(self) -> float:
        if self.na > 0 and self.nb > 0:
            return float(self.dot / np.sqrt(self.na * self.nb))
        return 1.0 if self.na == self.nb else 0.0

    @property
    def snr_db(self) -> float:
        if self.noise == 0:
            return float("inf")
        return 10 * float(np.log10(max(self.na, 1e-300) / self.noise))

    @property
    def top1_agreement(self) -> float | None:
        return self.top1 / self.rows if self.rows else None

    @property
    def top5_agreement(self) -> float | None:
        return self.top5 / self.rows if self.rows else None


__all__ = ["DRIFT_METRICS", "DriftMeter", "P99_EXACT_ELEMENTS", "STD_FLOOR", "TensorStats", "drift_definition"]
