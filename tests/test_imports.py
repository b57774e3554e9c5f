"""The package's import graph: every module imports, no two modules import each other in a circle,
and the web app needs neither the command line, nor training, nor torch.

The graph counts every import of an aicrl module anywhere in a file, at module level or inside a
function: an import put off until a function runs is still a dependency of the design, and a circle
through it is still a circle. Only imports under `if TYPE_CHECKING:` (type hints, never executed)
are left out, and so is the implicit import of a package's __init__ when one of its modules loads.
"""
from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import aicrl

from .conftest import SAMPLES

PACKAGE = "aicrl"
REPO = Path(__file__).resolve().parent.parent


def package_modules() -> dict[str, Path]:
    """Every module of the package -> its source file."""
    modules = {PACKAGE: Path(aicrl.__file__)}
    for info in pkgutil.walk_packages(aicrl.__path__, PACKAGE + "."):
        spec = info.module_finder.find_spec(info.name, None)
        modules[info.name] = Path(spec.origin)
    return modules


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST):
    """Import nodes anywhere in the tree, except in the body of `if TYPE_CHECKING:`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if _is_type_checking(node):
            for other in node.orelse:
                yield from _imports(ast.Module(body=[other], type_ignores=[]))
            continue
        yield from _imports(node)


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The module `name` is, or the innermost package module it lies in; None outside the package."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {_known(a.name, modules) for a in node.names}
                continue
            if node.level:  # relative: from the module's own package, up level - 1
                base = (name if is_package else name.rpartition(".")[0]).split(".")
                base = ".".join(base[:len(base) - (node.level - 1)])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:  # `from pkg import module` imports that module
                targets.add(_known(f"{source}.{alias.name}", modules) if f"{source}.{alias.name}" in modules
                            else _known(source, modules))
        graph[name] = {t for t in targets if t and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (a -> b -> ... -> a) per group of modules that import each other (Tarjan's strongly
    connected components, then a path round each)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for group in groups:
        start = min(group)
        path, seen = [start], {start}
        while True:  # walk inside the group until the start or a module already on the path comes back
            step = sorted(w for w in graph[path[-1]] if w in group)
            nxt = start if start in step else next((w for w in step if w not in seen), step[0])
            path.append(nxt)
            if nxt in seen:
                break
            seen.add(nxt)
        found.append(path[path.index(path[-1]):])
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        v = todo.pop()
        if v not in seen:
            seen.add(v)
            todo.extend(graph.get(v, ()))
    return seen


def test_every_module_imports():
    for name in package_modules():
        importlib.import_module(name)


def test_the_import_graph_reads_relative_and_lazy_imports():
    graph = import_graph(package_modules())
    assert "aicrl.model.captioner" in graph["aicrl.serving.app"]  # module level, relative
    assert "aicrl.serving.app" in graph["aicrl.serving.commands"]  # inside a function
    assert "aicrl.model.folder" in graph["aicrl.runtime"]


def test_circles_are_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    found = circles(import_graph(package_modules()))
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_decoding_imports_nothing_from_model():
    graph = import_graph(package_modules())
    decoding = {m for m in graph if m == "aicrl.decoding" or m.startswith("aicrl.decoding.")}
    assert not {t for m in decoding for t in graph[m] if t.startswith("aicrl.model")}


def test_serving_imports_neither_the_command_line_nor_training():
    graph = import_graph(package_modules())
    for entry in ("aicrl.serving.app", "aicrl.serving.card"):
        assert not reachable(graph, entry) & {"aicrl.cli", "aicrl.training"}, entry


def test_the_web_app_serves_the_shipped_model_without_torch(tmp_path):
    """What `make serve` runs on the base install (no torch): the app, the model card, a caption."""
    photo = sorted(SAMPLES.glob("*.jpg"))[0]
    code = f"""
import sys
sys.modules.update(dict.fromkeys(["torch", "torchvision"]))  # `import torch` raises ImportError
from fastapi.testclient import TestClient
from aicrl.serving.app import create_app
with TestClient(create_app(db_path={str(tmp_path / "g.db")!r})) as client:
    assert client.get("/healthz").json()["status"] == "ok"
    info = client.get("/api/info").json()
    assert info["backend"] == "onnx" and "ONNX Runtime" in info["runtime"], info["runtime"]
    assert info["training_data"]["dataset"] == "flickr8k" and info["scores"]["factual"]["CIDEr"] > 0.3
    r = client.post("/api/captions", files={{"image": ("p.jpg", open({str(photo)!r}, "rb").read(), "image/jpeg")}})
    assert r.status_code == 200 and r.json()["captions"][0]["text"], r.text
assert sys.modules["torch"] is None
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
