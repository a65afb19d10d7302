#!/usr/bin/env python3
"""Write a > 2 GiB ONNX model with external data, for sepify's large-model benchmark.

Never commit its output: it is ~2.3 GB.  ``benchmarks/bench_memory.py`` calls it and deletes the
result afterwards.

Usage::

    python scripts/make_large_model.py OUT_DIR                  # OUT_DIR/large.onnx + large.onnx.data
    python scripts/make_large_model.py OUT_DIR --convs 8 --wide 65536 --channels 120

The model is a chain of 3×3 convs (pads 1) on ``x`` [1, C, S, S] that alternately widen C → N
and narrow N → C, each with a bias, ReLU in between.  Every weight is [N, C, 3, 3] or
[C, N, 3, 3] (N·C·9·4 bytes: 283 MB at the defaults, 8 convs ≈ 2.26 GB).  The shapes keep the
separability spectra cheap (every scheme's matrices have a side of at most 3·C), so the benchmark
measures sepify's memory, not an eigen-decomposition.  Conv ``conv2`` is *exactly* rank 1 per
input channel (W[n, c] = P[n, c] · K[c], built in float64, cast once to float32), so a lossless
rewrite turns it into depthwise + pointwise (about 1/9 of its MACs); the others are random
(full rank: kept).

The weights are generated in chunks and written straight into the data file, so the script
itself holds at most one chunk (≈ 64 MB) at a time.  Same arguments → byte-identical files.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 17
IR_VERSION = 10
CHUNK_ROWS_BYTES = 64 << 20
LOWRANK_CONV = 2


def _external(name: str, dims: list[int], location: str, offset: int, length: int) -> TensorProto:
    t = TensorProto()
    t.name = name
    t.data_type = TensorProto.FLOAT
    t.dims.extend(dims)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def _write_weight(fh, rng: np.random.Generator, dims: list[int], lowrank: bool) -> int:
    """Append an [O, I, 3, 3] float32 weight to ``fh`` in row chunks; returns bytes written."""
    out_ch, in_ch, kh, kw = dims
    fan_in = in_ch * kh * kw
    rows = max(1, CHUNK_ROWS_BYTES // (in_ch * kh * kw * 4))
    kernels = rng.standard_normal((in_ch, kh, kw)) if lowrank else None  # K[c]: one kernel per input channel
    written = 0
    for start in range(0, out_ch, rows):
        n = min(rows, out_ch - start)
        if lowrank:
            p = rng.standard_normal((n, in_ch)) * np.sqrt(2.0 / fan_in)
            chunk = (p[:, :, None, None] * kernels[None]).astype(np.float32)
        else:
            chunk = (rng.standard_normal((n, in_ch, kh, kw)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        data = np.ascontiguousarray(chunk).tobytes()
        fh.write(data)
        written += len(data)
    return written


def make_large_model(out_dir: Path, *, convs: int = 8, wide: int = 65536, channels: int = 120,
                     spatial: int = 8, name: str = "large.onnx", seed: int = 0) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    location = f"{name}.data"
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    offset = 0
    current, c_cur = "x", channels
    with open(out_dir / location, "wb") as fh:
        for i in range(convs):
            c_out = wide if i % 2 == 0 else channels
            w_dims = [c_out, c_cur, 3, 3]
            length = _write_weight(fh, rng, w_dims, lowrank=(i == LOWRANK_CONV))
            inits.append(_external(f"conv{i}.weight", w_dims, location, offset, length))
            offset += length
            bias = (rng.uniform(-0.1, 0.1, c_out)).astype(np.float32).tobytes()
            fh.write(bias)
            inits.append(_external(f"conv{i}.bias", [c_out], location, offset, len(bias)))
            offset += len(bias)
            out = "y" if i == convs - 1 else f"conv{i}.out"
            nodes.append(helper.make_node("Conv", [current, f"conv{i}.weight", f"conv{i}.bias"],
                                          [out if i == convs - 1 else f"conv{i}.pre"], name=f"conv{i}",
                                          kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
            if i < convs - 1:
                nodes.append(helper.make_node("Relu", [f"conv{i}.pre"], [out], name=f"relu{i}"))
            current, c_cur = out, c_out
    graph = helper.make_graph(
        nodes, "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, spatial, spatial])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c_cur, spatial, spatial])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="sepify/scripts/make_large_model.py", producer_version="1")
    model.ir_version = IR_VERSION
    path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path))  # by path: the checker resolves the external data beside it
    return path


def weight_bytes(path: Path) -> int:
    """Bytes of tensor data the model declares (external or inline)."""
    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        total += n
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--convs", type=int, default=8)
    ap.add_argument("--wide", type=int, default=65536, help="channels of the wide activations (N)")
    ap.add_argument("--channels", type=int, default=120, help="channels of the narrow activations (C)")
    ap.add_argument("--spatial", type=int, default=8)
    ap.add_argument("--name", default="large.onnx")
    args = ap.parse_args(argv)
    path = make_large_model(args.out_dir, convs=args.convs, wide=args.wide, channels=args.channels,
                            spatial=args.spatial, name=args.name)
    data = path.with_name(path.name + ".data")
    print(f"{path}: {os.path.getsize(path)} bytes + {data.name}: {os.path.getsize(data)} bytes "
          f"({weight_bytes(path) / 2**30:.2f} GiB of weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
