import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import sepify
from sepify.cli import main


def _conv_model(w: np.ndarray, **attrs) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], **attrs)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[1], 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", w.shape[0], 16, 16])],
        [numpy_helper.from_array(w.astype(np.float32), "w")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    return m


def test_audit_counts_macs_and_finds_rank_one_sobel():
    sobel = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float32)
    report = sepify.audit(_conv_model(sobel[None, None], pads=[1, 1, 1, 1]))
    node = report.nodes[0]
    assert node.macs == 16 * 16 * 9
    best = node.separability.best_exact
    assert best.scheme == "spatial" and best.rank == 1 and best.macs == 16 * 16 * 3 + 16 * 16 * 3


def test_cli_bad_file_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01garbage")
    assert main(["audit", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sepify: error:") and "bad.onnx" in err and "Traceback" not in err
