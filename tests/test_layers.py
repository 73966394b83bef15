"""Import rules: public modules never import Qt/napari/magicgui; `import napari_cellseg` is torch-free."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"qtpy", "napari", "magicgui", "superqt", "PyQt5", "PyQt6", "PySide2", "PySide6"}


LAYERS = ["base", "io", "model", "inference", "training", "commands", "gui"]
"""Bottom to top. A module may import its own layer and the layers below it. ``base`` is the
top level of ``napari_cellseg`` (options, progress, errors: plain data, no imports of the package).
``commands`` may import ``gui`` lazily for ``cellseg demo`` only (LAZY_UP)."""
LAZY_UP = {("napari_cellseg.commands.main", "napari_cellseg.gui.demo")}
GUI_ONLY = "gui"  # the one folder that may import Qt, napari, superqt or magicgui


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "training":
        return "training"
    if len(parts) == 1 or (len(parts) == 2 and parts[1] not in LAYERS):
        return "base"
    return parts[1]


def _non_gui_modules():
    for package in ("napari_cellseg", "training"):
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if not (len(parts) > 1 and parts[0] == "napari_cellseg" and parts[1] == GUI_ONLY):
                yield path


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_non_gui_module_list_is_not_empty():
    names = {str(p.relative_to(REPO)) for p in _non_gui_modules()}
    assert {"napari_cellseg/io/rle.py", "napari_cellseg/commands/main.py",
            "napari_cellseg/__init__.py", "training/engine.py"} <= names
    assert not any(n.startswith("napari_cellseg/gui/") for n in names)


@pytest.mark.parametrize("path", list(_non_gui_modules()), ids=lambda p: str(p.relative_to(REPO)))
def test_only_the_gui_folder_imports_qt_napari_or_magicgui(path):
    bad = _imported_roots(path) & FORBIDDEN
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}; only napari_cellseg/gui/ may"


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, cwd=REPO, check=True)
    return set(out.stdout.split())


def test_import_package_does_not_import_torch():
    loaded = _modules_after("import napari_cellseg")
    assert "napari_cellseg" in loaded and "torch" not in loaded


def test_file_commands_do_not_import_torch():
    loaded = _modules_after(
        "import napari_cellseg.io.rle, napari_cellseg.io.annotations, napari_cellseg.io.images, "
        "napari_cellseg.inference.metrics, napari_cellseg.commands.main\n"
        "from napari_cellseg.commands.main import build_parser; build_parser()")
    assert "napari_cellseg.commands.main" in loaded
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
    assert graph["napari_cellseg.inference.pipeline"] >= {"napari_cellseg.inference.runner", "napari_cellseg.inference.tiling"}
    assert _cycles(graph) == []


def test_layer_of():
    assert layer_of("napari_cellseg") == "base" and layer_of("napari_cellseg.options") == "base"
    assert layer_of("napari_cellseg.io.rle") == "io" and layer_of("napari_cellseg.gui.segment.widget") == "gui"
    assert layer_of("training.engine") == "training"


def test_each_folder_imports_only_its_layer_and_below():
    """io < model < inference < training < commands, gui; the top level is the base of all."""
    mods = _all_modules()
    bad = []
    for name, path in mods.items():
        rank = LAYERS.index(layer_of(name))
        for target in _import_edges(name, path, mods):
            if target == "napari_cellseg" or (name, target) in LAZY_UP:
                continue  # the package __init__ (version, lazy public API) / cellseg demo
            if LAYERS.index(layer_of(target)) > rank or (
                    layer_of(name) == "commands" and layer_of(target) == "gui"):
                bad.append(f"{name} -> {target}")
    assert bad == []


def test_layer_checker_sees_a_climbing_import(tmp_path):
    (tmp_path / "c.py").write_text("def f():\n    from napari_cellseg.gui import layers\n")
    mods = {"napari_cellseg.io.c": tmp_path / "c.py", "napari_cellseg.gui.layers": tmp_path / "c.py"}
    edges = _import_edges("napari_cellseg.io.c", mods["napari_cellseg.io.c"], mods)
    assert edges == {"napari_cellseg.gui.layers"}
    assert LAYERS.index(layer_of("napari_cellseg.gui.layers")) > LAYERS.index(layer_of("napari_cellseg.io.c"))


def test_inference_layers_never_call_up():
    """detections < network < pipeline < predict; sizing / tiling sit beside the runner."""
    mods = _all_modules()
    below = {
        "napari_cellseg.inference.detections": {"napari_cellseg.inference.runner", "napari_cellseg.inference.pipeline", "napari_cellseg.inference.predictor",
                                      "napari_cellseg.inference.sizing", "napari_cellseg.inference.tiling"},
        "napari_cellseg.inference.runner": {"napari_cellseg.inference.pipeline", "napari_cellseg.inference.predictor", "napari_cellseg.inference.sizing",
                                   "napari_cellseg.inference.tiling"},
        "napari_cellseg.inference.sizing": {"napari_cellseg.inference.pipeline", "napari_cellseg.inference.predictor"},
        "napari_cellseg.inference.tiling": {"napari_cellseg.inference.pipeline", "napari_cellseg.inference.predictor"},
        "napari_cellseg.inference.pipeline": {"napari_cellseg.inference.predictor", "napari_cellseg.commands.predict", "napari_cellseg.commands.main"},
        "napari_cellseg.commands.tune": {"napari_cellseg.commands.main"},
    }
    for name, forbidden in below.items():
        bad = _import_edges(name, mods[name], mods) & forbidden
        assert not bad, f"{name} imports {sorted(bad)}, a layer above it"
