"""options.py: one scale range for --scale and for the diameter-derived factor (sizing.py)."""

from __future__ import annotations

import pytest

from napari_cellseg.inference import sizing
from napari_cellseg.options import SCALE_RANGE, OptionError, PredictOptions


@pytest.mark.parametrize("scale", [0.05, 0.07, 13.3, 20])
def test_explicit_scale_accepts_what_a_diameter_may_give(scale):
    """--scale 0.07 was refused (rc 2) while --diameter 3 ran at x13.3: one range now."""
    assert PredictOptions(scale=scale).scale == float(scale)
    sizing.check_scale(scale)  # the predictor's check agrees


@pytest.mark.parametrize("scale", [0.04, 21, float("nan"), float("inf"), "x", True])
def test_scale_out_of_the_range_refused_naming_it(scale):
    with pytest.raises(OptionError, match=r"scale must be a number in \[0.05, 20\]"):
        PredictOptions(scale=scale)
    with pytest.raises(ValueError):
        sizing.check_scale(scale)


def test_sizing_uses_the_options_range():
    assert sizing.SCALE_RANGE is SCALE_RANGE
