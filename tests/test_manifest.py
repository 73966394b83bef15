"""The npe2 manifest validates and every python_name in it imports (without torch)."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "napari.yaml"


def _python_names():
    data = yaml.safe_load(MANIFEST.read_text())
    return [c["python_name"] for c in data["contributions"]["commands"]]


def test_package_manifest_is_a_real_identical_copy_and_entry_point():
    """napari.yaml lives at the top level (the project's layout) and, as a plain file (a symlink
    breaks in Windows checkouts), inside the package where the entry point finds it."""
    copy = ROOT / "napari_cellseg" / "napari.yaml"
    assert not copy.is_symlink()
    assert copy.read_bytes() == MANIFEST.read_bytes(), "cp napari.yaml napari_cellseg/napari.yaml"
    assert 'napari-cellseg = "napari_cellseg:napari.yaml"' in (ROOT / "pyproject.toml").read_text()


def test_npe2_validate():
    exe = shutil.which("npe2")
    cmd = [exe] if exe else [sys.executable, "-m", "npe2"]
    res = subprocess.run(cmd + ["validate", "napari-cellseg"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "valid" in (res.stdout + res.stderr).lower()


@pytest.mark.parametrize("python_name", _python_names())
def test_python_names_import(python_name):
    module, _, attr = python_name.partition(":")
    obj = getattr(importlib.import_module(module), attr)
    assert callable(obj)


def test_contributions_import_without_torch():
    code = ("import sys, importlib, yaml\n"
            f"d = yaml.safe_load(open({str(MANIFEST)!r}))\n"
            "for c in d['contributions']['commands']:\n"
            "    m, _, a = c['python_name'].partition(':')\n"
            "    getattr(importlib.import_module(m), a)\n"
            "bad = [m for m in ('torch', 'torchvision', 'timm') if m in sys.modules]\n"
            "assert not bad, bad\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def test_samples_load():
    from napari_cellseg.gui.sample import cells_sample, nuclei_sample

    for fn, name in ((nuclei_sample, "nuclei"), (cells_sample, "cells")):
        (img, meta, kind), (lab, lmeta, lkind) = fn()
        assert kind == "image" and meta["name"] == name and img.ndim in (2, 3)
        assert lkind == "labels" and lab.shape == img.shape[:2] and lab.max() > 0


def test_training_package_is_headless():
    """training/ imports no Qt/napari/magicgui and nothing of napari_cellseg.gui
    (the Train widget lives in the plugin: napari_cellseg/gui/train/widget.py)."""
    import ast

    bad = []
    for path in sorted((ROOT / "training").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                top = name.split(".")[0]
                private = name.startswith("napari_cellseg.gui")
                if top in ("qtpy", "napari", "magicgui", "PyQt5", "PyQt6", "superqt") or private:
                    bad.append(f"{path.name}: {name}")
    assert not bad, bad
