"""Synthetic image generator (napari_cellseg.io.synthetic) and packaged samples (napari_cellseg.io.samples)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_cellseg.io import samples
from napari_cellseg.io import synthetic
from napari_cellseg.io.synthetic import make_image, write_dataset

KINDS = ("nuclei", "cells")


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_arrays_different_seed_differs(kind):
    a_img, a_lab = make_image(kind, shape=(128, 160), seed=3)
    b_img, b_lab = make_image(kind, shape=(128, 160), seed=3)
    c_img, c_lab = make_image(kind, shape=(128, 160), seed=4)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, c_img)
    assert not np.array_equal(a_lab, c_lab)


@pytest.mark.parametrize("kind, dtype", [("nuclei", np.uint16), ("cells", np.uint8)])
def test_dtype_and_shape(kind, dtype):
    img, lab = make_image(kind, shape=(96, 130), seed=1, density=0.3)
    assert img.dtype == dtype and img.shape == (96, 130)
    assert lab.dtype == np.int32 and lab.shape == (96, 130)
    assert img.max() > img.min()  # not a flat image


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_labels_contiguous_nonempty_connected(kind, seed):
    img, lab = make_image(kind, shape=(192, 192), seed=seed, density=0.5, overlap=0.25, min_size=15)
    n = int(lab.max())
    assert n > 0
    ids = np.unique(lab)
    np.testing.assert_array_equal(ids, np.arange(0, n + 1))  # 0 plus exactly 1..N
    areas = np.bincount(lab.ravel())[1:]
    assert areas.min() >= 15
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        _, pieces = ndi.label(lab[sl] == i)
        assert pieces == 1, f"instance {i} is split into {pieces} pieces"


def _inner_equiv_diameters(lab):
    """Equivalent diameters of instances that do not touch the image border."""
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    areas = np.bincount(lab.ravel())
    ids = np.setdiff1d(np.arange(1, len(areas)), border)
    return 2 * np.sqrt(areas[ids] / np.pi)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lo, hi", [(12, 18), (40, 60)])
def test_sizes_follow_requested_diameter(kind, lo, hi):
    d = np.concatenate([
        _inner_equiv_diameters(make_image(kind, shape=(256, 256), seed=s, diameter=(lo, hi),
                                          density=0.3)[1])
        for s in range(3)
    ])
    assert len(d) >= 5
    assert lo * 0.8 <= np.median(d) <= hi * 1.15
    assert np.percentile(d, 90) <= hi * 1.4
    assert np.percentile(d, 10) >= lo * 0.45  # occluded and mitotic-like ones are smaller


def test_default_sizes_vary_between_images():
    medians = [np.median(_inner_equiv_diameters(make_image("nuclei", (256, 256), seed=s)[1]))
               for s in range(8)]
    assert max(medians) > 1.8 * min(medians)
    assert 8 <= min(medians) and max(medians) <= 90


def test_density_controls_coverage_and_neighbours_touch():
    sparse = make_image("nuclei", (256, 256), seed=5, density=0.1, diameter=(20, 30))[1]
    crowded = make_image("nuclei", (256, 256), seed=5, density=0.6, diameter=(20, 30), overlap=0.2)[1]
    assert (crowded > 0).mean() > 2 * (sparse > 0).mean()
    # touching / overlapping neighbours: some foreground pixels border a different instance
    right = (crowded[:, 1:] > 0) & (crowded[:, :-1] > 0) & (crowded[:, 1:] != crowded[:, :-1])
    down = (crowded[1:] > 0) & (crowded[:-1] > 0) & (crowded[1:] != crowded[:-1])
    assert right.sum() + down.sum() > 20


def test_nuclei_are_bright_on_dark_background():
    img, lab = make_image("nuclei", (256, 256), seed=2, density=0.3)
    fg = ndi.binary_erosion(lab > 0, iterations=2)
    bg = ~ndi.binary_dilation(lab > 0, iterations=4)
    assert np.median(img[fg]) > 2 * np.median(img[bg])


def test_cells_have_bright_halo_and_grey_background():
    img, lab = make_image("cells", (256, 256), seed=2, density=0.3)
    fg = lab > 0
    ring = ndi.binary_dilation(fg, iterations=2) & ~fg
    far = ~ndi.binary_dilation(fg, iterations=8)
    assert 60 < np.median(img[far]) < 200  # mid-grey background
    assert np.mean(img[ring]) > np.mean(img[far]) + 10  # bright halo just outside the cells


def test_bad_options_raise():
    with pytest.raises(ValueError, match="kind"):
        make_image("bacteria")
    with pytest.raises(TypeError, match="unknown option"):
        make_image("nuclei", shape=(64, 64), sizes=(1, 2))
    with pytest.raises(ValueError, match="density"):
        make_image("cells", shape=(64, 64), density=2.0)
    with pytest.raises(ValueError, match="diameter"):
        make_image("cells", shape=(64, 64), diameter=(30, 10))


def test_write_dataset_folder_pair(tmp_path):
    import tifffile

    names = write_dataset(tmp_path / "a", 4, kind="mixed", seed=9, shape=(64, 80))
    again = write_dataset(tmp_path / "b", 2, kind="mixed", seed=9, shape=(64, 80), start=2)
    assert names[2:] == again  # image i depends only on (seed, i)
    assert len(names) == 4 and all(n.startswith(("synth_nuclei_", "synth_cells_")) for n in names)
    assert names[3].endswith("_0003")
    for name in names:
        img = tifffile.imread(tmp_path / "a" / "images" / f"{name}.tif")
        lab = tifffile.imread(tmp_path / "a" / "labels" / f"{name}.tif")
        assert img.shape == lab.shape == (64, 80) and lab.dtype == np.int32
        assert img.dtype == (np.uint16 if "_nuclei_" in name else np.uint8)
    for name in again:
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "a" / "labels" / f"{name}.tif"),
                                      tifffile.imread(tmp_path / "b" / "labels" / f"{name}.tif"))
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers
    with pytest.raises(ValueError, match="kind"):
        write_dataset(tmp_path / "c", 1, kind="dots")


@pytest.mark.parametrize("name, dtype, shape", [("nuclei", np.uint16, (256, 256)),
                                                ("cells", np.uint8, (520, 704))])
def test_load_sample_returns_packaged_files(name, dtype, shape):
    import tifffile

    img, lab = samples.load_sample(name)
    path = samples.sample_path(name)
    assert path.parent == samples.DATA_DIR and samples.DATA_DIR.parent.name == "napari_cellseg"
    assert path.stat().st_size < 1_000_000
    np.testing.assert_array_equal(img, tifffile.imread(path))
    assert img.dtype == dtype and img.shape == shape
    assert lab.dtype == np.int32 and lab.shape == shape and lab.max() >= 10
    assert len(np.unique(lab)) - 1 >= 10


def test_nuclei_sample_is_plane_35_of_the_nuclei_stack(nuclei_planes):
    img, lab = samples.load_sample("nuclei")
    np.testing.assert_array_equal(img, nuclei_planes[35][0])
    np.testing.assert_array_equal(lab, nuclei_planes[35][1])


def test_unknown_sample_name():
    with pytest.raises(ValueError, match="unknown sample"):
        samples.sample_path("zebrafish")


def test_generator_has_no_heavy_imports():
    import subprocess
    import sys

    code = ("import sys, napari_cellseg.io.synthetic, napari_cellseg.io.samples; "
            "bad = [m for m in ('torch', 'napari', 'qtpy', 'magicgui') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert synthetic.KINDS == ("nuclei", "cells")
