"""Import rules: public modules never import Qt/napari/magicgui; `import napari_cellseg` is torch-free."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"qtpy", "napari", "magicgui", "PyQt5", "PyQt6", "PySide2", "PySide6"}


def _public_modules():
    for package in ("napari_cellseg", "training"):
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if not any(p.startswith("_") and p != "__init__" for p in parts):
                yield path


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_public_module_list_is_not_empty():
    names = {p.name for p in _public_modules()}
    assert {"rle.py", "annotations.py", "cli.py", "__init__.py"} <= names


@pytest.mark.parametrize("path", list(_public_modules()), ids=lambda p: str(p.relative_to(REPO)))
def test_public_modules_do_not_import_gui(path):
    bad = _imported_roots(path) & FORBIDDEN
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}; move it to a _module"


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, cwd=REPO, check=True)
    return set(out.stdout.split())


def test_import_package_does_not_import_torch():
    loaded = _modules_after("import napari_cellseg")
    assert "napari_cellseg" in loaded and "torch" not in loaded


def test_file_commands_do_not_import_torch():
    loaded = _modules_after(
        "import napari_cellseg.rle, napari_cellseg.annotations, napari_cellseg.images, "
        "napari_cellseg.metrics, napari_cellseg.cli\n"
        "from napari_cellseg.cli import build_parser; build_parser()")
    assert "napari_cellseg.cli" in loaded
    assert not loaded & ({"torch"} | FORBIDDEN)


# ---- no import cycles, lazy (in-function) imports included -------------------------------------
def _all_modules() -> dict[str, Path]:
    mods = {}
    for package in ("napari_cellseg", "training"):
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _import_edges(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Repository modules that ``name`` imports anywhere in its file (top level or in functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        out |= {t for t in targets if t in mods and t != name}
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_sees_lazy_imports(tmp_path):
    """The checker itself: a cycle closed only by an import inside a function is found."""
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import x\n")
    mods = {"p.a": tmp_path / "a.py", "p.b": tmp_path / "b.py"}
    graph = {n: _import_edges(n, p, mods) for n, p in mods.items()}
    assert graph == {"p.a": {"p.b"}, "p.b": {"p.a"}}
    assert _cycles(graph) == [["p.a", "p.b"]]


def test_no_import_cycles_lazy_imports_included():
    mods = _all_modules()
    graph = {n: _import_edges(n, p, mods) for n, p in mods.items()}
    assert graph["napari_cellseg.pipeline"] >= {"napari_cellseg.network", "napari_cellseg.tiling"}
    assert _cycles(graph) == []


def test_inference_layers_never_call_up():
    """detections < network < pipeline < predict; sizing / tiling sit beside the runner."""
    mods = _all_modules()
    below = {
        "napari_cellseg.detections": {"napari_cellseg.network", "napari_cellseg.pipeline", "napari_cellseg.predict",
                                      "napari_cellseg.sizing", "napari_cellseg.tiling"},
        "napari_cellseg.network": {"napari_cellseg.pipeline", "napari_cellseg.predict", "napari_cellseg.sizing",
                                   "napari_cellseg.tiling"},
        "napari_cellseg.sizing": {"napari_cellseg.pipeline", "napari_cellseg.predict"},
        "napari_cellseg.tiling": {"napari_cellseg.pipeline", "napari_cellseg.predict"},
        "napari_cellseg.pipeline": {"napari_cellseg.predict", "napari_cellseg.batch", "napari_cellseg.cli"},
        "napari_cellseg.tune_cmd": {"napari_cellseg.cli"},
    }
    for name, forbidden in below.items():
        bad = _import_edges(name, mods[name], mods) & forbidden
        assert not bad, f"{name} imports {sorted(bad)}, a layer above it"
