"""The layout's rules, checked on the source: layers import only downwards, no import circle, no
module reaches for another module's private names, no module over 800 lines, the core is pure numpy.

Layers, lowest first (README "Layout"): ``errors``/``version``/``serialize``/``progress`` → ``core``
(pure numpy) → ``model`` (ONNX adapters) → ``pipeline`` → ``calibration`` → ``render`` → ``cli``;
``sepify/__init__.py``, ``__main__.py`` and ``command.py`` (the command's entry point) are the front door
and may import any layer.
Every import counts, including those inside functions (lazy imports are imports too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent / "sepify"
LAYERS = {"errors": 0, "version": 0, "serialize": 0, "progress": 0, "threads": 0, "core": 1, "model": 2, "pipeline": 3,
          "calibration": 4, "render": 5, "cli": 6}
FRONT = {"sepify", "sepify.__main__", "sepify.command"}
MAX_LINES = 800


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str):
    """(imported sepify module, names taken from it, line) for every import in the module."""
    tree = ast.parse(MODULES[module].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "sepify":
                    yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if target.split(".")[0] != "sepify":
                continue
            names = [a.name for a in node.names]
            for name in names:  # ``from . import x`` may import a submodule
                if f"{target}.{name}" in MODULES:
                    yield f"{target}.{name}", [], node.lineno
            yield target, [n for n in names if f"{target}.{n}" not in MODULES], node.lineno


def _owner(name: str) -> str:
    """The module an imported name lives in (``sepify.core.schemes.get`` → ``sepify.core.schemes``)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _layer(module: str) -> int | None:
    if module in FRONT:
        return None
    return LAYERS[module.split(".")[1]]


def _graph() -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_nodes_from(MODULES)
    for module in MODULES:
        for target, _, _ in _imports(module):
            target = _owner(target)
            if target != module:
                g.add_edge(module, target)
    return g


def test_every_module_is_in_a_layer():
    unknown = [m for m in MODULES if m not in FRONT and m.split(".")[1] not in LAYERS]
    assert not unknown, f"modules outside the layer map (add them to LAYERS and the README): {unknown}"


def test_layers_import_only_downwards():
    wrong = []
    for module in MODULES:
        for target, _, line in _imports(module):
            target = _owner(target)
            a, b = _layer(module), _layer(target)
            if target in FRONT and module not in FRONT:
                wrong.append(f"{module}:{line} imports the API front door {target}")
            elif a is not None and b is not None and b > a:
                wrong.append(f"{module}:{line} (layer {a}) imports {target} (layer {b})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    cycles = [c for c in nx.simple_cycles(_graph()) if not set(c) & FRONT]
    assert not cycles, "import circles: " + "; ".join(" → ".join(c + [c[0]]) for c in cycles[:10])


def test_no_private_name_crosses_a_module():
    leaks = []
    for module in MODULES:
        for target, names, line in _imports(module):
            if _owner(target) == module:
                continue
            for name in names:
                if name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
                    leaks.append(f"{module}:{line} imports {target}.{name}")
        # ``module._private`` through an imported module object
        tree = ast.parse(MODULES[module].read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("sepify"):
                        aliases[a.asname or a.name.split(".")[0]] = a.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                if isinstance(base, ast.Name) and base.id in aliases:
                    leaks.append(f"{module}:{node.lineno} uses {aliases[base.id]}.{node.attr}")
    assert not leaks, "\n".join(leaks)


def test_no_module_is_too_long():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("sepify.core")])
def test_core_is_pure_numpy(module):
    tree = ast.parse(MODULES[module].read_text())
    heavy = {"onnx", "onnxruntime", "onnx_graphsurgeon", "rich", "networkx"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in heavy]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in heavy:
            found.append(node.module)
    assert not found, f"{module} imports {found}"


def test_the_rules_catch_what_they_are_for(tmp_path, monkeypatch):
    """The checks themselves: an upward import, a circle and a private import are each found."""
    fake = {
        "sepify.core.a": "from ..pipeline.b import thing\n",
        "sepify.pipeline.b": "from ..core.a import _secret\nfrom . import c\n",
        "sepify.pipeline.c": "from .b import thing\n",
    }
    paths = {}
    for name, text in fake.items():
        p = tmp_path / (name.replace(".", "_") + ".py")
        p.write_text(text)
        paths[name] = p
    monkeypatch.setattr(__import__(__name__), "MODULES", paths)
    with pytest.raises(AssertionError, match="layer 1"):
        test_layers_import_only_downwards()
    with pytest.raises(AssertionError, match="import circles"):
        test_no_import_circle()
    with pytest.raises(AssertionError, match="_secret"):
        test_no_private_name_crosses_a_module()


def test_every_reason_code_is_documented():
    from sepify.core.reasons import Reason

    readme = (ROOT.parent / "README.md").read_text()
    missing = [r.value for r in Reason if f"`{r.value}`" not in readme]
    assert not missing, f"reason codes missing from the README's table: {missing}"
