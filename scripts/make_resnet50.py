#!/usr/bin/env python3
"""Generate a ResNet-50 v1.5 (or, with ``--depth 18``, a ResNet-18) architecture as ONNX, with
random weights (numpy + onnx.helper only).

The layer structure is exactly torchvision's ``resnet50`` (v1.5: the stride of a
downsampling bottleneck sits on its 3x3 conv):

* stem: Conv 7x7/2 pad 3 (3->64) + ReLU, MaxPool 3x3/2 pad 1
* layer1..layer4: [3, 4, 6, 3] bottlenecks, widths 64/128/256/512, expansion 4;
  each bottleneck is Conv1x1 -> ReLU -> Conv3x3/s pad 1 -> ReLU -> Conv1x1, plus the
  identity or a 1x1/s ``downsample`` Conv, then Add -> ReLU
* GlobalAveragePool -> Flatten -> Gemm 2048->1000

BatchNorm is folded into the conv bias (every Conv has a bias, no BatchNormalization
nodes). Weights are He-initialised float32 (``kaiming_normal``, fan_out, as torchvision
does) from a fixed seed, so the file is deterministic; biases are small normals.
Input ``input`` is ``[N, 3, 224, 224]`` with a symbolic batch dim ``N``; output ``logits``
``[N, 1000]``. Opset 17, IR version 10. Conv MACs at 224x224, batch 1: 4,087,136,256;
plus 2,048,000 for the Gemm that is 4,089,184,256 -- torchvision's "4.09 GFLOPS".

``--depth 18`` builds torchvision's ``resnet18`` instead: [2, 2, 2, 2] basic blocks (Conv3x3/s ->
ReLU -> Conv3x3, plus the identity or a 1x1/s ``downsample`` Conv, Add -> ReLU), Gemm 512->1000;
conv MACs at 224x224: 1,813,561,344 (torchvision's "1.81 GFLOPS"), ~47 MB.

The file is ~100 MB: write it outside the repo, never commit it.

Usage::

    python scripts/make_resnet50.py                      # -> /tmp/sepify-bench/resnet50.onnx
    python scripts/make_resnet50.py out.onnx --seed 1 --check
    python scripts/make_resnet50.py /tmp/sepify-bench/resnet18.onnx --depth 18 --check
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DEFAULT_OUT = Path("/tmp/sepify-bench/resnet50.onnx")
LAYERS = (3, 4, 6, 3)
WIDTHS = (64, 128, 256, 512)
EXPANSION = 4
EXPECTED_CONV_MACS = {50: 4_087_136_256, 18: 1_813_561_344}  # batch 1, 224x224 (+ the Gemm)
OPSET = 17
IR_VERSION = 10


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def conv(self, name: str, x: str, cin: int, cout: int, k: int, stride: int = 1, pad: int = 0) -> str:
        fan_out = cout * k * k
        w = (self.rng.standard_normal((cout, cin, k, k), dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_out)))
        b = (self.rng.standard_normal(cout, dtype=np.float32) * np.float32(0.01))
        self.inits += [numpy_helper.from_array(w, f"{name}.weight"), numpy_helper.from_array(b, f"{name}.bias")]
        y = f"{name}_out"
        self.nodes.append(helper.make_node(
            "Conv", [x, f"{name}.weight", f"{name}.bias"], [y], name=name,
            kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, dilations=[1, 1], group=1))
        return y

    def relu(self, name: str, x: str) -> str:
        y = f"{name}_out"
        self.nodes.append(helper.make_node("Relu", [x], [y], name=name))
        return y

    def bottleneck(self, prefix: str, x: str, cin: int, width: int, stride: int) -> str:
        cout = width * EXPANSION
        h = self.relu(f"{prefix}.relu1", self.conv(f"{prefix}.conv1", x, cin, width, 1))
        h = self.relu(f"{prefix}.relu2", self.conv(f"{prefix}.conv2", h, width, width, 3, stride, 1))
        h = self.conv(f"{prefix}.conv3", h, width, cout, 1)
        if stride != 1 or cin != cout:
            identity = self.conv(f"{prefix}.downsample.0", x, cin, cout, 1, stride, 0)
        else:
            identity = x
        s = f"{prefix}.add_out"
        self.nodes.append(helper.make_node("Add", [h, identity], [s], name=f"{prefix}.add"))
        return self.relu(f"{prefix}.relu3", s)

    def basic(self, prefix: str, x: str, cin: int, width: int, stride: int) -> str:
        h = self.relu(f"{prefix}.relu1", self.conv(f"{prefix}.conv1", x, cin, width, 3, stride, 1))
        h = self.conv(f"{prefix}.conv2", h, width, width, 3, 1, 1)
        identity = self.conv(f"{prefix}.downsample.0", x, cin, width, 1, stride, 0) if stride != 1 or cin != width else x
        s = f"{prefix}.add_out"
        self.nodes.append(helper.make_node("Add", [h, identity], [s], name=f"{prefix}.add"))
        return self.relu(f"{prefix}.relu2", s)


def build(seed: int = 0, depth: int = 50) -> onnx.ModelProto:
    b = _Builder(seed)
    x = b.relu("relu", b.conv("conv1", "input", 3, 64, 7, 2, 3))
    b.nodes.append(helper.make_node("MaxPool", [x], ["maxpool_out"], name="maxpool",
                                    kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    x, cin = "maxpool_out", 64
    layers, expansion, block = {50: (LAYERS, EXPANSION, b.bottleneck), 18: ((2, 2, 2, 2), 1, b.basic)}[depth]
    for li, (blocks, width) in enumerate(zip(layers, WIDTHS), start=1):
        for bi in range(blocks):
            stride = 2 if (bi == 0 and li > 1) else 1
            x = block(f"layer{li}.{bi}", x, cin, width, stride)
            cin = width * expansion
    b.nodes.append(helper.make_node("GlobalAveragePool", [x], ["avgpool_out"], name="avgpool"))
    b.nodes.append(helper.make_node("Flatten", ["avgpool_out"], ["flatten_out"], name="flatten", axis=1))
    fc_w = b.rng.standard_normal((1000, cin), dtype=np.float32) * np.float32(np.sqrt(1.0 / cin))
    fc_b = np.zeros(1000, np.float32)
    b.inits += [numpy_helper.from_array(fc_w, "fc.weight"), numpy_helper.from_array(fc_b, "fc.bias")]
    b.nodes.append(helper.make_node("Gemm", ["flatten_out", "fc.weight", "fc.bias"], ["logits"], name="fc",
                                    alpha=1.0, beta=1.0, transB=1))
    graph = helper.make_graph(
        b.nodes, "resnet50_v1_5" if depth == 50 else f"resnet{depth}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="sepify.make_resnet50", producer_version="1" if depth == 50 else f"1-resnet{depth}")
    model.ir_version = IR_VERSION
    return model


def conv_macs(model: onnx.ModelProto, h: int = 224, w: int = 224, batch: int = 1) -> int:
    """Conv MACs from onnx shape inference at a concrete input size (independent of sepify)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_value = h
    m.graph.input[0].type.tensor_type.shape.dim[3].dim_value = w
    m = onnx.shape_inference.infer_shapes(m)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in m.graph.value_info}
    inits = {t.name: list(t.dims) for t in m.graph.initializer}
    total = 0
    for n in m.graph.node:
        if n.op_type == "Conv":
            wshape = inits[n.input[1]]
            total += int(np.prod(shapes[n.output[0]])) * wshape[1] * int(np.prod(wshape[2:]))
    return total


def check(path: Path, model: onnx.ModelProto, depth: int = 50) -> None:
    import onnxruntime as ort

    onnx.checker.check_model(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((2, 3, 224, 224), dtype=np.float32)
    (y,) = sess.run(None, {"input": x})
    assert y.shape == (2, 1000) and np.all(np.isfinite(y)), (y.shape, np.isfinite(y).all())
    macs = conv_macs(model)
    n_conv = sum(n.op_type == "Conv" for n in model.graph.node)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    print(f"ok: onnxruntime ran batch 2 -> {y.shape}; {n_conv} Conv nodes, {params:,} params, "
          f"conv MACs @224 = {macs:,} ({macs / 1e9:.3f} G)")
    assert macs == EXPECTED_CONV_MACS[depth], macs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Generate a random-weight ResNet-50 v1.5 (or ResNet-18) ONNX model.")
    ap.add_argument("output", nargs="?", default=str(DEFAULT_OUT), help=f"output path (default {DEFAULT_OUT})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--depth", type=int, choices=(18, 50), default=50, help="ResNet-50 v1.5 (default) or ResNet-18")
    ap.add_argument("--check", action="store_true", help="run onnx.checker + onnxruntime and verify the MACs")
    ap.add_argument("--force", action="store_true", help="rewrite even if the file exists")
    args = ap.parse_args(argv)
    out = Path(args.output).expanduser()
    model = None
    if out.is_file() and not args.force:
        print(f"{out} exists (use --force to rewrite)", file=sys.stderr)
    else:
        model = build(args.seed, args.depth)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".part")
        onnx.save_model(model, str(tmp))
        os.replace(tmp, out)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    if args.check:
        check(out, model if model is not None else onnx.load(str(out)), args.depth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
