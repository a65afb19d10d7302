#!/usr/bin/env python3
"""Write the small, deterministic sample ONNX models used by sepify's docs and tests.

Usage::

    python scripts/make_samples.py              # writes into sample_models/ (next to this folder)
    python scripts/make_samples.py --out DIR    # somewhere else
    python scripts/make_samples.py --only sobel_rgb --only conv1d

Only numpy and ``onnx.helper`` are used (no torch).  Every random tensor comes from
``numpy.random.default_rng`` with a fixed per-model seed, and every model is built with
explicit ``ir_version`` / opset / producer fields, so two runs write byte-identical files.

Every model: opset 17, ``ir_version = 10`` (onnx 1.23 would stamp IR 14, which
onnxruntime 1.31 refuses), float32, fully shaped graph inputs/outputs (symbolic names for
dynamic dims), named nodes ("edges/conv"), a doc_string, and it passes
``onnx.checker.check_model(model, full_check=True)`` before it is written.

Weights that are meant to be *exactly* low rank are built in float64 and cast to float32
once, so the only deviation from the ideal rank is float32 rounding (relative Frobenius
error <= 2**-24, below sepify's float32 exactness tolerance of 2*eps = 2.4e-7).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 10
PRODUCER = "sepify/scripts/make_samples.py"
PRODUCER_VERSION = "1"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "sample_models"

FLOAT = TensorProto.FLOAT


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------
def f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float64).astype(np.float32))


def init(name: str, value: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(value), name)


def vi(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, FLOAT, shape)


def he(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    """He-normal weights (float64): N(0, 2 / fan_in)."""
    return rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)


def bias(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.uniform(-0.1, 0.1, size=n)


def finish(graph: onnx.GraphProto, doc: str) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER,
        producer_version=PRODUCER_VERSION,
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    model.model_version = 1
    onnx.checker.check_model(model, full_check=True)
    return model


def conv(name: str, x: str, w: str, y: str, b: str | None = None, **attrs) -> onnx.NodeProto:
    inputs = [x, w] + ([b] if b else [])
    return helper.make_node("Conv", inputs, [y], name=name, **attrs)


def relu(name: str, x: str, y: str) -> onnx.NodeProto:
    return helper.make_node("Relu", [x], [y], name=name)


# ----------------------------------------------------------------------------------------------
# 1. Sobel on RGB
# ----------------------------------------------------------------------------------------------
LUMA = np.array([0.299, 0.587, 0.114])
SOBEL_X = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
SOBEL_Y = SOBEL_X.T


def sobel_weight() -> np.ndarray:
    """[2, 3, 3, 3]: W[o, c] = luma[c] * S_o (grayscale conversion folded into the Sobel kernels)."""
    return f32(np.stack([np.einsum("c,ij->cij", LUMA, s) for s in (SOBEL_X, SOBEL_Y)]))


def make_sobel_rgb() -> onnx.ModelProto:
    h = w = 64
    nodes = [
        conv("edges/conv", "image", "edges.sobel.weight", "gradients", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["gradients", "gradients"], ["edges.squared"], name="edges/square"),
        helper.make_node("ReduceSum", ["edges.squared", "edges.channel_axis"], ["edges.sum_sq"],
                         name="edges/sum", keepdims=1),
        helper.make_node("Sqrt", ["edges.sum_sq"], ["edges"], name="edges/magnitude"),
    ]
    graph = helper.make_graph(
        nodes,
        "sobel_rgb",
        [vi("image", [1, 3, h, w])],
        [vi("edges", [1, 1, h, w]), vi("gradients", [1, 2, h, w])],
        [init("edges.sobel.weight", sobel_weight()), init("edges.channel_axis", np.array([1], np.int64))],
        doc_string="RGB -> luma -> Sobel Gx/Gy -> gradient magnitude.",
    )
    doc = (
        "Sobel edge detector on an RGB image. One Conv (no bias, pads 1) with weight [2,3,3,3], "
        "W[o,c] = luma[c] * S_o (luma = 0.299, 0.587, 0.114; S_0 = Gx = [[1,0,-1],[2,0,-2],[1,0,-1]], "
        "S_1 = Gy = Gx^T), outputs 'gradients' [1,2,64,64] (Gx, Gy of the gray image) and "
        "'edges' = sqrt(Gx^2 + Gy^2) [1,1,64,64]. Every output channel is rank 1 (luma x kernel: "
        "exact pointwise-then-depthwise) and every 3x3 kernel is rank 1 spatially."
    )
    return finish(graph, doc)


# ----------------------------------------------------------------------------------------------
# 2. Gaussian blur + binomial blur-downsample (depthwise)
# ----------------------------------------------------------------------------------------------
def gaussian_1d(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x**2) / (2.0 * sigma**2))
    return g / g.sum()


def gaussian_weight(channels: int = 3, size: int = 5, sigma: float = 1.0) -> np.ndarray:
    g = gaussian_1d(size, sigma)
    return f32(np.broadcast_to(np.outer(g, g), (channels, 1, size, size)))


def binomial_weight(channels: int = 3) -> np.ndarray:
    b = np.array([1.0, 2.0, 1.0]) / 4.0
    return f32(np.broadcast_to(np.outer(b, b), (channels, 1, 3, 3)))


def make_gaussian_blur() -> onnx.ModelProto:
    nodes = [
        conv("blur/conv", "image", "blur.gaussian5.weight", "blurred",
             kernel_shape=[5, 5], pads=[2, 2, 2, 2], group=3),
        conv("down/conv", "blurred", "down.binomial3.weight", "half",
             kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2], group=3),
    ]
    graph = helper.make_graph(
        nodes,
        "gaussian_blur",
        [vi("image", [1, 3, 128, 128])],
        [vi("blurred", [1, 3, 128, 128]), vi("half", [1, 3, 64, 64])],
        [init("blur.gaussian5.weight", gaussian_weight()), init("down.binomial3.weight", binomial_weight())],
        doc_string="Depthwise 5x5 Gaussian blur, then depthwise 3x3 binomial blur with stride 2.",
    )
    doc = (
        "Separable image filters as depthwise convolutions (group 3, no bias) on [1,3,128,128]: "
        "'blur/conv' is a 5x5 Gaussian (sigma 1.0, normalized, pads 2) -> 'blurred' [1,3,128,128]; "
        "'down/conv' is a 3x3 binomial ([1,2,1]/4 outer itself) with stride 2, pads 1 -> 'half' "
        "[1,3,64,64]. Every kernel is exactly rank 1 (outer product of a 1-D filter with itself)."
    )
    return finish(graph, doc)


# ----------------------------------------------------------------------------------------------
# 3. Small VGG with trained-like (random, full-rank) weights
# ----------------------------------------------------------------------------------------------
def make_vgg_small() -> onnx.ModelProto:
    rng = np.random.default_rng(20240303)
    layers = [  # name, cin, cout
        ("block1/conv1", 3, 32),
        ("block1/conv2", 32, 32),
        ("block2/conv1", 32, 64),
        ("block2/conv2", 64, 64),
    ]
    inits: list[TensorProto] = []
    weights = {}
    for name, cin, cout in layers:
        prefix = name.replace("/", ".")
        weights[name] = (f"{prefix}.weight", f"{prefix}.bias")
        inits.append(init(f"{prefix}.weight", f32(he(rng, (cout, cin, 3, 3), cin * 9))))
        inits.append(init(f"{prefix}.bias", f32(bias(rng, cout))))
    inits.append(init("head.fc.weight", f32(rng.standard_normal((10, 64)) * np.sqrt(1.0 / 64))))
    inits.append(init("head.fc.bias", f32(bias(rng, 10))))

    def block_conv(name: str, x: str, y: str) -> list[onnx.NodeProto]:
        w, b = weights[name]
        pre = f"{name.replace('/', '.')}.out"
        return [
            conv(name, x, w, pre, b, kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            relu(name.replace("conv", "relu"), pre, y),
        ]

    nodes = [
        *block_conv("block1/conv1", "image", "block1.act1"),
        *block_conv("block1/conv2", "block1.act1", "block1.act2"),
        helper.make_node("MaxPool", ["block1.act2"], ["block1.pool"], name="block1/pool",
                         kernel_shape=[2, 2], strides=[2, 2]),
        *block_conv("block2/conv1", "block1.pool", "block2.act1"),
        *block_conv("block2/conv2", "block2.act1", "block2.act2"),
        helper.make_node("GlobalAveragePool", ["block2.act2"], ["head.gap"], name="head/gap"),
        helper.make_node("Flatten", ["head.gap"], ["head.flat"], name="head/flatten", axis=1),
        helper.make_node("Gemm", ["head.flat", "head.fc.weight", "head.fc.bias"], ["logits"],
                         name="head/fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "vgg_small",
        [vi("image", [1, 3, 64, 64])],
        [vi("logits", [1, 10])],
        inits,
        doc_string="conv3x3(3->32) relu conv3x3(32->32) relu maxpool2 conv3x3(32->64) relu "
                   "conv3x3(64->64) relu gap flatten gemm(64->10).",
    )
    doc = (
        "Small VGG-like classifier with trained-like weights: He-normal random weights (seed 20240303) "
        "and small uniform biases, so every convolution is full rank under every separable scheme. "
        "Input 'image' [1,3,64,64] -> 'logits' [1,10]. A lossless rewrite must leave every conv alone."
    )
    return finish(graph, doc)


# ----------------------------------------------------------------------------------------------
# 4. Convolutions that are exactly low rank by construction
# ----------------------------------------------------------------------------------------------
def dw_pw_weight(rng: np.random.Generator, cin: int, cout: int, k: tuple[int, ...], rank: int) -> np.ndarray:
    """W[n, c] = sum_j P_j[n, c] * D_j[c]: rank `rank` per input channel (float64)."""
    fan_in = cin * int(np.prod(k))
    d = rng.standard_normal((rank, cin) + k)
    p = rng.standard_normal((rank, cout, cin))
    w = np.einsum("jnc,jc...->nc...", p, d)
    return w * np.sqrt(2.0 / fan_in) / np.sqrt(rank)


def pw_dw_weight(rng: np.random.Generator, cin: int, cout: int, k: tuple[int, ...]) -> np.ndarray:
    """W[n, c] = A[n, c] * K[n]: rank 1 per output channel (float64)."""
    fan_in = cin * int(np.prod(k))
    a = rng.standard_normal((cout, cin))
    kern = rng.standard_normal((cout,) + k)
    return np.einsum("nc,n...->nc...", a, kern) * np.sqrt(2.0 / fan_in)


def make_lowrank_separable() -> onnx.ModelProto:
    rng = np.random.default_rng(1234)
    w1 = dw_pw_weight(rng, 16, 32, (3, 3), rank=1)
    w2 = dw_pw_weight(rng, 32, 32, (3, 3), rank=2)
    w3 = pw_dw_weight(rng, 32, 32, (3, 3))
    inits = [
        init("dwpw1.weight", f32(w1)), init("dwpw1.bias", f32(bias(rng, 32))),
        init("dwpw2.weight", f32(w2)), init("dwpw2.bias", f32(bias(rng, 32))),
        init("pwdw.weight", f32(w3)), init("pwdw.bias", f32(bias(rng, 32))),
    ]
    nodes = [
        conv("dwpw1/conv", "x", "dwpw1.weight", "dwpw1.out", "dwpw1.bias", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        relu("dwpw1/relu", "dwpw1.out", "dwpw1.act"),
        conv("dwpw2/conv", "dwpw1.act", "dwpw2.weight", "dwpw2.out", "dwpw2.bias",
             kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        relu("dwpw2/relu", "dwpw2.out", "dwpw2.act"),
        # pads [top, left, bottom, right] = [0, 1, 1, 0]: asymmetric, stride 2.
        conv("pwdw/conv", "dwpw2.act", "pwdw.weight", "pwdw.out", "pwdw.bias",
             kernel_shape=[3, 3], pads=[0, 1, 1, 0], strides=[2, 2]),
        relu("pwdw/relu", "pwdw.out", "y"),
    ]
    graph = helper.make_graph(
        nodes,
        "lowrank_separable",
        [vi("x", [1, 16, 32, 32])],
        [vi("y", [1, 32, 16, 16])],
        inits,
        doc_string="Three 3x3 convs with exactly low-rank weights, biases and ReLUs.",
    )
    doc = (
        "Convolutions whose weights are exactly low rank by construction (built in float64, stored "
        "float32; seed 1234). 'dwpw1/conv' 3x3 16->32 = depthwise(multiplier 1) then pointwise: rank 1 "
        "per input channel (dw-pw exact at r=1). 'dwpw2/conv' 3x3 32->32: rank 2 per input channel "
        "(dw-pw exact at r=2). 'pwdw/conv' 3x3 32->32, stride 2, pads [0,1,1,0] = pointwise then "
        "depthwise: rank 1 per output channel (pw-dw exact at r=1). Biases and ReLUs in between. "
        "Input 'x' [1,16,32,32] -> 'y' [1,32,16,16]."
    )
    return finish(graph, doc)


# ----------------------------------------------------------------------------------------------
# 5. Conv1d
# ----------------------------------------------------------------------------------------------
def make_conv1d() -> onnx.ModelProto:
    rng = np.random.default_rng(777)
    w1 = dw_pw_weight(rng, 8, 16, (5,), rank=1)  # exactly rank 1 per input channel
    w2 = he(rng, (16, 8, 3), 8 * 3)  # group 2: 8 input channels per group, random
    inits = [
        init("conv1.weight", f32(w1)), init("conv1.bias", f32(bias(rng, 16))),
        init("conv2.weight", f32(w2)), init("conv2.bias", f32(bias(rng, 16))),
    ]
    nodes = [
        conv("conv1/conv", "signal", "conv1.weight", "conv1.out", "conv1.bias",
             kernel_shape=[5], pads=[2, 2], dilations=[1]),
        relu("conv1/relu", "conv1.out", "conv1.act"),
        conv("conv2/conv", "conv1.act", "conv2.weight", "conv2.out", "conv2.bias",
             kernel_shape=[3], pads=[2, 2], dilations=[2], group=2),
        relu("conv2/relu", "conv2.out", "features"),
    ]
    graph = helper.make_graph(
        nodes,
        "conv1d",
        [vi("signal", [1, 8, 256])],
        [vi("features", [1, 16, 256])],
        inits,
        doc_string="Two 1-D convs: k5 8->16 (rank 1 per input channel), k3 dilation 2 group 2 16->16.",
    )
    doc = (
        "1-D convolutions on 'signal' [1,8,256] -> 'features' [1,16,256] (seed 777). 'conv1/conv' k=5, "
        "8->16, pads 2: weight exactly rank 1 per input channel (depthwise k5 then pointwise; dw-pw "
        "exact at r=1). 'conv2/conv' k=3, 16->16, dilation 2, pads 2, group 2: random full-rank "
        "weights. Biases and ReLUs. The 2-D-only 'spatial' scheme does not apply."
    )
    return finish(graph, doc)


# ----------------------------------------------------------------------------------------------
# 6. Dynamic batch, Constant-node weight, auto_pad SAME_UPPER stride 2
# ----------------------------------------------------------------------------------------------
def make_dynamic_batch() -> onnx.ModelProto:
    rng = np.random.default_rng(4242)
    w1 = he(rng, (16, 3, 3, 3), 3 * 9)
    b1 = bias(rng, 16)
    w2 = dw_pw_weight(rng, 16, 16, (3, 3), rank=1)  # held by a Constant node
    b2 = bias(rng, 16)
    w3 = pw_dw_weight(rng, 16, 32, (3, 3))
    b3 = bias(rng, 32)
    nodes = [
        conv("stem/conv", "x", "stem.weight", "stem.out", "stem.bias", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        relu("stem/relu", "stem.out", "stem.act"),
        helper.make_node("Constant", [], ["mid.weight"], name="mid/weight",
                         value=numpy_helper.from_array(f32(w2), "mid.weight")),
        conv("mid/conv", "stem.act", "mid.weight", "mid.out", "mid.bias", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        relu("mid/relu", "mid.out", "mid.act"),
        conv("down/conv", "mid.act", "down.weight", "down.out", "down.bias",
             kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
        relu("down/relu", "down.out", "y"),
    ]
    graph = helper.make_graph(
        nodes,
        "dynamic_batch",
        [vi("x", ["batch", 3, 32, 32])],
        [vi("y", ["batch", 32, 16, 16])],
        [
            init("stem.weight", f32(w1)), init("stem.bias", f32(b1)),
            init("mid.bias", f32(b2)),
            init("down.weight", f32(w3)), init("down.bias", f32(b3)),
        ],
        doc_string="stem conv (random) -> Constant-weight conv (rank 1 per input channel) -> "
                   "SAME_UPPER stride-2 conv (rank 1 per output channel).",
    )
    doc = (
        "Small conv stack with a symbolic batch: 'x' [batch,3,32,32] -> 'y' [batch,32,16,16] (seed 4242). "
        "'stem/conv' 3x3 3->16 pads 1, random full-rank weights. 'mid/conv' 3x3 16->16 pads 1 reads its "
        "weight from a Constant node ('mid/weight', not an initializer); it is exactly rank 1 per input "
        "channel (dw-pw exact at r=1). 'down/conv' 3x3 16->32 stride 2 auto_pad SAME_UPPER (explicit "
        "pads [0,0,1,1]): exactly rank 1 per output channel (pw-dw exact at r=1). Biases and ReLUs."
    )
    return finish(graph, doc)


# ----------------------------------------------------------------------------------------------
SAMPLES: dict[str, Callable[[], onnx.ModelProto]] = {
    "sobel_rgb": make_sobel_rgb,
    "gaussian_blur": make_gaussian_blur,
    "vgg_small": make_vgg_small,
    "lowrank_separable": make_lowrank_separable,
    "conv1d": make_conv1d,
    "dynamic_batch": make_dynamic_batch,
}


def build(name: str) -> bytes:
    """Serialized bytes of one sample (deterministic)."""
    return SAMPLES[name]().SerializeToString(deterministic=True)


def write_samples(out: Path, only: list[str] | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in only or list(SAMPLES):
        data = build(name)
        path = out / f"{name}.onnx"
        tmp = path.with_suffix(".onnx.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--only", action="append", choices=sorted(SAMPLES), help="write only this sample (repeatable)")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    for path in write_samples(args.out, args.only):
        if not args.quiet:
            data = path.read_bytes()
            print(f"{path}  {len(data):>8} bytes  sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
