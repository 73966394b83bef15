"""options.py: the range rules of prediction options, each in one function that every user
calls (scale, diameter, [0, 1] thresholds, precision names, tile size and overlap)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from napari_cellseg.inference import sizing
from napari_cellseg.options import (DEFAULT_THRESHOLDS, PRECISIONS, SCALE_RANGE, THRESHOLD_FIELDS, TILE_OVERLAP,
                                    TILE_SIZE, OptionError, PredictOptions, Thresholds, tile_settings, unit_value,
                                    valid_diameter)


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


# ---- Thresholds -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["box_conf", "mask_threshold"])
@pytest.mark.parametrize("value", [-0.01, 1.01, float("nan"), float("inf"), "x", None, True])
def test_unit_thresholds_refused_naming_the_field(name, value):
    with pytest.raises(OptionError, match=rf"{name} must be a number in \[0, 1\]"):
        Thresholds(**{name: value})


@pytest.mark.parametrize("value", [0, 0.0, 1, "0.25", 1.0])
def test_unit_thresholds_accept_the_closed_interval(value):
    assert Thresholds(box_conf=value).box_conf == float(value)
    assert unit_value(value) == float(value)


@pytest.mark.parametrize("value", [-1, 2.5, "many", float("nan"), True, 2**31])
def test_min_area_must_be_a_whole_count(value):
    with pytest.raises(OptionError, match="min_area must be an integer"):
        Thresholds(min_area=value)
    assert Thresholds(min_area=7.0).min_area == 7


@pytest.mark.parametrize("name", ["fill_holes", "keep_largest"])
def test_post_processing_switches_are_booleans(name):
    with pytest.raises(OptionError, match=f"{name} must be true or false"):
        Thresholds(**{name: 1})


def test_from_dict_names_where_and_ignores_unknown_keys():
    assert Thresholds.from_dict({"box_conf": 0.3, "note": "x"}) == Thresholds(box_conf=0.3)
    assert Thresholds.from_dict(None) == DEFAULT_THRESHOLDS
    with pytest.raises(OptionError, match="ckpt.bin: mask_threshold must be"):
        Thresholds.from_dict({"mask_threshold": 7}, where="ckpt.bin")
    with pytest.raises(OptionError, match="thresholds must be a mapping"):
        Thresholds.from_dict([0.5, 0.5])


def test_predict_options_override_exactly_the_threshold_fields():
    """The five names come from Thresholds: PredictOptions has one override per field, and
    thresholds() applies each of them (None keeps the base value)."""
    names = {f.name for f in dataclasses.fields(PredictOptions)}
    assert set(THRESHOLD_FIELDS) <= names and THRESHOLD_FIELDS == tuple(Thresholds().to_dict())
    flipped = {"box_conf": 0.2, "mask_threshold": 0.7, "min_area": 9, "fill_holes": False, "keep_largest": True}
    assert set(flipped) == set(THRESHOLD_FIELDS)
    assert PredictOptions(**flipped).thresholds(Thresholds()) == Thresholds(**flipped)
    base = Thresholds(box_conf=0.6, min_area=4)
    assert PredictOptions(mask_threshold=0.3).thresholds(base) == Thresholds(box_conf=0.6, mask_threshold=0.3,
                                                                             min_area=4)
    with pytest.raises(OptionError, match="box_conf"):
        PredictOptions(box_conf=1.5)  # checked when the options are built, not at first use


# ---- PredictOptions ----------------------------------------------------------------------------
@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_name_is_accepted(precision):
    assert PredictOptions(precision=precision).precision == precision


@pytest.mark.parametrize("precision", ["fp8", "FP32", "", None, "half"])
def test_unknown_precision_refused_listing_the_names(precision):
    with pytest.raises(OptionError, match="precision must be one of fp32, bf16, fp16, auto"):
        PredictOptions(precision=precision)


def test_the_runner_and_the_cli_use_the_same_precision_names():
    from napari_cellseg.commands.main import build_parser

    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["predict"]._actions
                  if "--precision" in a.option_strings)
    assert tuple(action.choices) == PRECISIONS
    runner = pytest.importorskip("napari_cellseg.inference.runner")
    assert runner.PRECISIONS is PRECISIONS


@pytest.mark.parametrize("diameter", [0, -3, float("nan"), float("inf"), "big", True])
def test_diameter_must_be_positive_pixels_or_auto(diameter):
    with pytest.raises(OptionError, match="diameter must be a number of pixels > 0 or 'auto'"):
        PredictOptions(diameter=diameter)
    assert valid_diameter(diameter) is None


def test_diameter_auto_or_a_number():
    assert PredictOptions(diameter="auto").diameter == "auto"
    assert PredictOptions(diameter="12.5").diameter == 12.5
    assert PredictOptions().diameter is None


@pytest.mark.parametrize("text,ok", [("24", True), ("auto", True), ("0", False), ("-2", False), ("nan", False),
                                     ("inf", False), ("x", False)])
def test_cli_diameter_flag_uses_the_same_rule(text, ok):
    import argparse

    from napari_cellseg.commands.main import _diameter_arg

    if ok:
        assert _diameter_arg(text) == (text if text == "auto" else float(text))
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="diameter in pixels > 0"):
            _diameter_arg(text)


def test_sizing_refuses_the_diameters_options_refuse():
    class _Model:
        reference_diameter = 30.0

    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="diameter must be a positive number"):
            sizing.scale_for_diameter(_Model(), bad)
    assert sizing.scale_for_diameter(_Model(), 15) == 2.0


# ---- tiles: one rule (options.tile_settings) ---------------------------------------------------------
def test_tile_defaults():
    assert tile_settings() == (TILE_SIZE, TILE_OVERLAP) == (1024, 128)
    assert PredictOptions().tile_size is None and PredictOptions().tile_overlap is None  # None = defaults


@pytest.mark.parametrize("tile,overlap", [(64, 31), (1024, 511), (0, 0), (0, 5000), (None, 511), (256, None)])
def test_tile_overlap_below_half_the_tile_accepted(tile, overlap):
    got = tile_settings(tile, overlap)
    default_overlap = 127 if tile == 256 else TILE_OVERLAP  # the default, below half a small tile
    assert got == (TILE_SIZE if tile is None else tile, default_overlap if overlap is None else overlap)
    options = PredictOptions(tile_size=tile, tile_overlap=overlap)
    assert (options.tile_size, options.tile_overlap) == (tile, overlap)


@pytest.mark.parametrize("tile,overlap,match", [
    (64, 32, r"tile_overlap must be < tile_size / 2 \(32\), got 32"),
    (1024, 900, r"tile_overlap must be < tile_size / 2"),
    (None, 512, r"tile_overlap must be < tile_size / 2 \(512\)"),  # against the default tile
    (200, 100, r"< tile_size / 2 \(100\)"),
    (32, None, "tile_size must be 0 .never tile. or at least 64"),
    (-1, None, r"tile_size must be an integer in \[0, 16384\]"),
    (100000, None, r"tile_size must be an integer"),
    (256, -4, r"tile_overlap must be an integer in \[0, 16384\]"),
    (256, 1.5, "tile_overlap must be an integer"),
])
def test_tile_settings_refused_naming_the_field(tile, overlap, match):
    with pytest.raises(OptionError, match=match):
        tile_settings(tile, overlap)
    with pytest.raises(OptionError, match=match):
        PredictOptions(tile_size=tile, tile_overlap=overlap)


# ---- the rest ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, -1, 1025, 1.5, True])
def test_batch_size_range(value):
    with pytest.raises(OptionError, match=r"batch_size must be an integer in \[1, 1024\]"):
        PredictOptions(batch_size=value)


@pytest.mark.parametrize("device", ["", None, 0])
def test_device_must_be_a_name(device):
    with pytest.raises(OptionError, match="device must be auto, cpu"):
        PredictOptions(device=device)


def test_from_args_takes_every_known_flag_once():
    import argparse

    ns = argparse.Namespace(checkpoint=Path("m.bin"), scale=2, tile_size=128, tile_overlap=None, box_conf=0.4,
                            unrelated="x")
    options = PredictOptions.from_args(ns)
    assert (options.checkpoint, options.scale, options.tile_size, options.tile_overlap, options.box_conf) == \
        ("m.bin", 2.0, 128, None, 0.4)
    with pytest.raises(OptionError, match="tile_overlap must be < tile_size / 2"):
        PredictOptions.from_args(argparse.Namespace(tile_size=128, tile_overlap=64))
