"""Real pretrained models quantized by onnxruntime's own tool (opt-in: ``pytest -m realmodels``).

No pretrained model with QLinearConv ships in a wheel, so a few of the cached real models are
quantized here with ``onnxruntime.quantization`` (into ``tmp_path``, never the repo):

* ``qoperator`` — ``quantize_static(quant_format=QOperator)``: ``QLinearConv`` nodes;
* ``qdq`` — ``quantize_static(quant_format=QDQ)``: float ``Conv`` between QuantizeLinear /
  DequantizeLinear, weights int8 initializers through DequantizeLinear;
* ``dynamic`` — ``quantize_dynamic``: ``ConvInteger`` fed by DynamicQuantizeLinear.

Static quantization is calibrated on two random inputs (the manifest's shapes); the graph is
first run through ``quant_pre_process`` where that succeeds. For each quantized model: sepify
lists every conv and its MACs equal those of the shapes onnxruntime executes (the reference of
``test_realmodels``); QLinearConv / ConvInteger are ineligible ``quantized_op`` and every Conv
whose weight comes through DequantizeLinear ``quantized_weight``; a lossless rewrite — and even a
rank-1 rewrite — leaves the quantized convs alone, and its output loads and runs in onnxruntime
with outputs identical to the quantized model's. A model the quantizer itself cannot handle in a
format is skipped with onnxruntime's error.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import sepify
from sepify import Policy

from test_realmodels import X_W, _feeds, _is_conv, _walk, fetched, reference_macs  # noqa: F401 - fixture

pytestmark = pytest.mark.realmodels

quantization = pytest.importorskip("onnxruntime.quantization")

MODELS = ["nudenet_320n", "rapidocr_ppocrv4_det", "mtcnn_pnet", "openwakeword_embedding"]
FORMATS = ["qoperator", "qdq", "dynamic"]
QUANT_OPS = ("QLinearConv", "ConvInteger")


class _RandomReader(quantization.CalibrationDataReader):
    def __init__(self, entry: dict, n: int = 2):
        self._it = iter([_feeds(entry, seed=s) for s in range(n)])

    def get_next(self):
        return next(self._it, None)


def _quantize(entry: dict, fmt: str, tmp_path) -> str:
    src = str(tmp_path / "pre.onnx")
    try:  # symbolic shape inference + optimization, as onnxruntime recommends before quantizing
        quantization.shape_inference.quant_pre_process(entry["path"], src)
    except Exception:  # noqa: BLE001 - e.g. PP-OCR: "Incomplete symbolic shape inference"; quantize as is
        src = entry["path"]
    dst = str(tmp_path / f"{fmt}.onnx")
    try:
        if fmt == "dynamic":
            quantization.quantize_dynamic(src, dst, weight_type=quantization.QuantType.QUInt8)
        else:
            quant_format = quantization.QuantFormat.QOperator if fmt == "qoperator" else quantization.QuantFormat.QDQ
            quantization.quantize_static(src, dst, _RandomReader(entry), quant_format=quant_format,
                                         activation_type=quantization.QuantType.QUInt8,
                                         weight_type=quantization.QuantType.QInt8)
    except Exception as exc:  # noqa: BLE001 - the quantizer's limitation, not sepify's
        pytest.skip(f"{entry['id']}: onnxruntime.quantization cannot make the {fmt} model: "
                    f"{type(exc).__name__}: {str(exc)[:200]}")
    return dst


def _run(model: onnx.ModelProto | str, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("model_id", MODELS)
def test_quantized_real_model(model_id, fmt, fetched, tmp_path, monkeypatch):
    entry = fetched.get(model_id)
    if entry is None:
        pytest.skip(f"{model_id}: could not be fetched (offline?)")
    monkeypatch.chdir(tmp_path)  # quant_pre_process may leave temporary files in the working directory
    path = _quantize(entry, fmt, tmp_path)
    qentry = dict(entry, path=path)
    model = onnx.load(path)
    ops = [n.op_type for _, n, _ in _walk(model.graph) if _is_conv(n)]
    expected_op = {"qoperator": "QLinearConv", "qdq": "Conv", "dynamic": "ConvInteger"}[fmt]
    if expected_op not in ops:
        pytest.skip(f"{model_id}: the {fmt} quantizer left no {expected_op} ({sorted(set(ops))})")

    # -- cost: every conv listed, MACs = those of the shapes onnxruntime executes -----------------
    inputs, values = entry["inputs"], entry.get("input_values")
    report = sepify.audit(path, inputs, input_values=values)
    all_convs = [q for q, n, _ in _walk(model.graph) if _is_conv(n)]
    assert sorted(n.qualified_name for n in report.nodes) == sorted(all_convs)
    ref, unobserved, _ = reference_macs(qentry)
    assert not unobserved
    got = {n.qualified_name: n for n in report.nodes}
    wrong = [f"{r['name']} [{r['op']}]: sepify {got[r['name']].macs} (in {got[r['name']].input_shape} "
             f"out {got[r['name']].output_shape}) != ort {r['macs']} (in {r['x']} out {r['y']})"
             for r in ref if (got[r["name"]].macs, got[r["name"]].input_shape, got[r["name"]].output_shape)
             != (r["macs"], r["x"], r["y"])]
    assert not wrong, f"{len(wrong)}/{len(ref)} convs differ:\n" + "\n".join(wrong[:20])
    assert report.totals.conv_macs == sum(r["macs"] for r in ref)

    # -- eligibility: quantized convs carry the documented reasons -------------------------------
    producers = {o: n for _, n, _ in _walk(model.graph) for o in n.output}
    nodes = {q: n for q, n, _ in _walk(model.graph)}
    quantized = []
    for q, a in got.items():
        node = nodes[q]
        if node.op_type in QUANT_OPS:
            assert (a.eligible, a.reason) == (False, "quantized_op"), (q, a.reason)
            quantized.append(q)
        elif node.op_type == "Conv" and getattr(producers.get(node.input[X_W["Conv"][1]]), "op_type", None) \
                == "DequantizeLinear":
            assert (a.eligible, a.reason, a.weight_source) == (False, "quantized_weight", "constant_subgraph"), \
                (q, a.reason, a.weight_source)
            quantized.append(q)
    assert quantized

    # -- rewrite: quantized convs untouched, output runs with identical results --------------------
    feeds = _feeds(entry)
    expected = _run(path, feeds)
    for policy in (Policy(mode="lossless"), Policy(mode="rank", rank=1)):
        out, rep = sepify.rewrite(path, policy, input_shapes=inputs, input_values=values)
        touched = sorted(set(quantized) & {r.qualified_name for r in rep.rewritten})
        assert not touched, f"{policy.mode}: quantized convs rewritten: {touched}"
        if policy.mode == "lossless":
            assert not rep.changed  # trained weights: nothing exact; quantized ones never eligible
            assert out.SerializeToString() == onnx.load(path).SerializeToString()
        for name, a, b in zip([o.name for o in out.graph.output], expected, _run(out, feeds)):
            if policy.mode == "lossless" or not rep.changed:
                np.testing.assert_array_equal(a, b, err_msg=f"{policy.mode}: output {name}")
            else:
                assert a.shape == b.shape, name
    print(f"\n{model_id} {fmt}: {len(ref)} convs exact ({report.totals.conv_macs:,} MACs), "
          f"{len(quantized)} quantized convs ineligible "
          f"({', '.join(sorted({got[q].reason for q in quantized}))}); kept as is by lossless and rank-1 rewrites")
