"""Convolution geometry: explicit pads, output sizes and MAC counts.

Pure Python on integers, shared by the cost model, the factorizer's cost
estimates and the rewriter, so that all three agree on every padding corner.

Conventions (ONNX Conv, spatial axis ``i``)::

    eff_k[i]  = (k[i] - 1) * d[i] + 1
    out[i]    = floor((in[i] + pb[i] + pe[i] - eff_k[i]) / s[i]) + 1

``auto_pad`` SAME_UPPER / SAME_LOWER give ``out[i] = ceil(in[i] / s[i])`` and a
total pad of ``max(0, (out[i] - 1) * s[i] + eff_k[i] - in[i])``; the odd pixel
goes to the end (UPPER) or the beginning (LOWER).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


def prod(values: Sequence[int]) -> int:
    result = 1
    for v in values:
        result *= int(v)
    return result


def explicit_pads(
    in_spatial: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    pads: Sequence[int] | None,
    auto_pad: str = "NOTSET",
) -> list[int]:
    """Return ONNX-layout pads ``[b_0, …, b_{n-1}, e_0, …, e_{n-1}]`` with auto_pad resolved."""
    n = len(kernel)
    auto_pad = (auto_pad or "NOTSET").upper()
    if auto_pad in ("NOTSET", ""):
        return list(pads) if pads else [0] * (2 * n)
    if auto_pad == "VALID":
        return [0] * (2 * n)
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise ValueError(f"unknown auto_pad {auto_pad!r}")
    begins, ends = [], []
    for i in range(n):
        eff = (kernel[i] - 1) * dilations[i] + 1
        out = -(-in_spatial[i] // strides[i])
        total = max(0, (out - 1) * strides[i] + eff - in_spatial[i])
        small, big = total // 2, total - total // 2
        if auto_pad == "SAME_UPPER":
            begins.append(small)
            ends.append(big)
        else:
            begins.append(big)
            ends.append(small)
    return begins + ends


def conv_out_spatial(
    in_spatial: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    pads: Sequence[int],
) -> list[int]:
    n = len(kernel)
    out = []
    for i in range(n):
        eff = (kernel[i] - 1) * dilations[i] + 1
        out.append((in_spatial[i] + pads[i] + pads[i + n] - eff) // strides[i] + 1)
    return out


def conv_transpose_out_spatial(
    in_spatial: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    pads: Sequence[int],
    output_padding: Sequence[int],
) -> list[int]:
    n = len(kernel)
    return [
        strides[i] * (in_spatial[i] - 1)
        + output_padding[i]
        + (kernel[i] - 1) * dilations[i]
        + 1
        - pads[i]
        - pads[i + n]
        for i in range(n)
    ]


@dataclass(frozen=True)
class ConvGeometry:
    """Everything about one convolution that cost and factorization need.

    Shapes are NC-first: ``batch``, ``c_in``, ``c_out`` and spatial tuples.
    ``pads`` are explicit (auto_pad already resolved).
    """

    batch: int
    c_in: int
    c_out: int
    group: int
    kernel: tuple[int, ...]
    in_spatial: tuple[int, ...]
    out_spatial: tuple[int, ...]
    strides: tuple[int, ...] = field(default=())
    dilations: tuple[int, ...] = field(default=())
    pads: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        n = len(self.kernel)
        if not self.strides:
            object.__setattr__(self, "strides", (1,) * n)
        if not self.dilations:
            object.__setattr__(self, "dilations", (1,) * n)
        if not self.pads:
            object.__setattr__(self, "pads", (0,) * (2 * n))

    @property
    def rank(self) -> int:
        return len(self.kernel)

    @property
    def cin_per_group(self) -> int:
        return self.c_in // self.group

    @property
    def cout_per_group(self) -> int:
        return self.c_out // self.group

    @property
    def is_depthwise(self) -> bool:
        return self.group > 1 and self.cin_per_group == 1

    @property
    def macs(self) -> int:
        return self.batch * prod(self.out_spatial) * self.c_out * self.cin_per_group * prod(self.kernel)


def stage_macs(batch: int, out_spatial: Sequence[int], c_out: int, cin_per_group: int, kernel: Sequence[int]) -> int:
    """MACs of one Conv stage: prod(output) × (C_in/group) × prod(kernel)."""
    return batch * prod(out_spatial) * c_out * cin_per_group * prod(kernel)


def spatial_split_macs(geo: ConvGeometry, mid_channels: int, first_cin_per_group: int,
                       second_cin_per_group: int, vertical_first: bool) -> int:
    """MACs of a 2-D kh×1 / 1×kw split in the given order.

    The first stage applies only its own axis' stride/pad/dilation, so its
    output keeps the other axis at input resolution.
    """
    (kh, kw), (h_in, w_in), (h_out, w_out) = geo.kernel, geo.in_spatial, geo.out_spatial
    if vertical_first:
        first = stage_macs(geo.batch, (h_out, w_in), mid_channels, first_cin_per_group, (kh, 1))
        second = stage_macs(geo.batch, (h_out, w_out), geo.c_out, second_cin_per_group, (1, kw))
    else:
        first = stage_macs(geo.batch, (h_in, w_out), mid_channels, first_cin_per_group, (1, kw))
        second = stage_macs(geo.batch, (h_out, w_out), geo.c_out, second_cin_per_group, (kh, 1))
    return first + second


__all__ = [
    "ConvGeometry",
    "conv_out_spatial",
    "conv_transpose_out_spatial",
    "explicit_pads",
    "prod",
    "spatial_split_macs",
    "stage_macs",
]
