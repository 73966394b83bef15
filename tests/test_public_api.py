"""The names users script against are importable from ``napari_cellseg`` itself (docs/API.md),
lazily: ``import napari_cellseg`` stays torch-free."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

import napari_cellseg

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(napari_cellseg._PUBLIC))
def test_public_name_resolves_to_its_home(name):
    obj = getattr(napari_cellseg, name)
    assert obj.__name__ == name
    assert obj.__module__ == napari_cellseg._PUBLIC[name]


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        napari_cellseg.nope  # noqa: B018


def test_public_names_are_documented():
    api = (REPO / "docs" / "API.md").read_text(encoding="utf-8")
    missing = [n for n in napari_cellseg._PUBLIC if not re.search(rf"\b{n}\b", api)]
    assert missing == []


def test_public_names_stay_lazy():
    code = ("import sys, napari_cellseg; from napari_cellseg import Thresholds, rle_encode\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_predictor_is_the_documented_entry():
    Predictor = napari_cellseg.Predictor
    assert callable(getattr(Predictor, "from_checkpoint")) and callable(getattr(Predictor, "predict"))
