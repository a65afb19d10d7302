"""Why a node is not rewritten: one machine-readable code per cause, shared by every stage.

The codes are strings (``Reason.DEPTHWISE == "depthwise"``), so reports and JSON carry them as
they are; the README lists each with its meaning (``tests/test_architecture.py`` checks that).
A node carries exactly one code (:func:`primary` when its schemes give several; each scheme's own
stays in the audit's ``separability.schemes``), so ``reason == "depthwise"`` is a test that works.
"""

from __future__ import annotations

from enum import Enum


class Reason(str, Enum):
    # the node itself (no scheme can apply)
    QUANTIZED_OP = "quantized_op"  # ConvInteger / QLinearConv
    TRANSPOSED_CONV = "transposed_conv"
    WEIGHT_NOT_CONSTANT = "weight_not_constant"  # a graph input or computed at run time
    QUANTIZED_WEIGHT = "quantized_weight"  # float weight behind DequantizeLinear (QDQ)
    UNSUPPORTED_DTYPE = "unsupported_dtype"  # not float32/float16
    NONFINITE_WEIGHT = "nonfinite_weight"
    SHAPE_UNKNOWN = "shape_unknown"
    # a scheme (by geometry)
    POINTWISE_KERNEL = "pointwise_kernel"  # 1×1 (1-element) kernel: nothing spatial to split
    NOT_POINTWISE = "not_pointwise"  # pw-lowrank: only for 1×1 kernels (out-/in-lowrank split larger ones)
    DEPTHWISE = "depthwise"  # one input channel per group: no dw-pw / pw-dw
    NOT_2D = "not_2d"  # spatial (kh×1 then 1×kw) needs two spatial axes
    KERNEL_ALREADY_1D = "kernel_already_1d"
    NO_MAC_SAVING = "no_mac_saving"  # no rank of the scheme costs fewer MACs than the conv
    # the plan (policy)
    NOT_SELECTED = "not_selected"  # --include / --exclude
    BELOW_MIN_MACS = "below_min_macs"
    NO_EXACT_SAVING = "no_exact_saving"  # lossless: no exact factorization cuts MACs
    NO_SAVING_WITHIN_TOL = "no_saving_within_tol"
    RANK_SAVES_NOTHING = "rank_saves_nothing"
    NOT_NEEDED_FOR_BUDGET = "not_needed_for_budget"  # the budget was met without it
    KEPT_BY_PLAN = "kept_by_plan"  # an (edited) plan says keep
    DRIFT_BOUND_REACHED = "drift_bound_reached"  # --max-drift: rewriting it too would pass the bound
    # the rewrite
    EXACTNESS_LOST_IN_ROUNDING = "exactness_lost_in_rounding"  # exact in float64, not after the cast
    NOT_FASTER = "not_faster"  # --only-faster measured no gain
    LATENCY_NOT_MEASURED = "latency_not_measured"  # onnxruntime could not run the isolated node

    def __str__(self) -> str:  # f-strings and joins give the code, not "Reason.X"
        return self.value


def primary(reasons) -> Reason | None:
    """One code for the reasons several schemes give for one node: ``no_mac_saving`` when a scheme
    applies but no rank of it saves MACs, else the first scheme's (registry order: dw-pw, pw-dw,
    spatial — ``depthwise`` for a depthwise 1-D conv)."""
    codes = [Reason(str(r)) for r in reasons if r]
    if not codes:
        return None
    return Reason.NO_MAC_SAVING if Reason.NO_MAC_SAVING in codes else codes[0]


__all__ = ["Reason", "primary"]
