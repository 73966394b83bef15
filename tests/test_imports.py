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
