import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from napari_cellseg.images import ImageError, list_images, load_image, read_raw, to_rgb_float


def _check(out, shape):
    assert out.dtype == np.float32 and out.shape == (*shape, 3)
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_formats_and_depths(tmp_path):
    rng = np.random.default_rng(0)
    grey8 = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    iio.imwrite(tmp_path / "g.png", grey8)
    iio.imwrite(tmp_path / "rgba.png", rng.integers(0, 256, (20, 30, 4), dtype=np.uint8))
    iio.imwrite(tmp_path / "c.jpg", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    tifffile.imwrite(tmp_path / "g16.tif", rng.integers(100, 3000, (20, 30), dtype=np.uint16))
    out = load_image(tmp_path / "g.png")
    _check(out, (20, 30))
    assert np.allclose(out[..., 0], grey8 / 255) and np.array_equal(out[..., 0], out[..., 2])
    _check(load_image(tmp_path / "rgba.png"), (20, 30))
    _check(load_image(tmp_path / "c.jpg"), (20, 30))
    g16 = load_image(tmp_path / "g16.tif")
    _check(g16, (20, 30))
    assert g16.max() == 1.0 and g16.min() == 0.0  # percentile-stretched


def test_16bit_percentile_normalisation_ignores_hot_pixels():
    image = np.full((50, 50), 1000, np.uint16)
    image[:25] = 2000
    image[0, 0] = 65535  # one hot pixel must not squash the contrast
    out = to_rgb_float(image)[..., 0]
    assert out[10, 10] == 1.0 and out[40, 40] == 0.0


def test_stack_plane_of_real_data(nuclei_data, nuclei_planes):
    path = nuclei_data / "nuclei_z28-43_image.tif"
    stack = read_raw(path)
    out = load_image(path, plane=2)
    _check(out, stack.shape[1:])
    np.testing.assert_array_equal(out, to_rgb_float(nuclei_planes[30][0]))
    with pytest.raises(ImageError, match="stack of 16 planes"):
        load_image(path)
    with pytest.raises(ImageError, match="plane 99 is out of range"):
        to_rgb_float(stack, plane=99, name="s")


def test_in_memory_floats_and_constant():
    f = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    assert np.allclose(to_rgb_float(f)[..., 1], f)
    assert not to_rgb_float(np.full((4, 4), 7, np.uint16)).any()


def test_bad_images_name_the_file(tmp_path):
    tifffile.imwrite(tmp_path / "4d.tif", np.zeros((2, 3, 8, 9), np.uint8))
    (tmp_path / "junk.png").write_bytes(b"this is not a png")
    (tmp_path / "empty.tif").write_bytes(b"")
    for name, problem in [("4d.tif", "4-D image"), ("junk.png", "cannot read image"),
                          ("empty.tif", "cannot read image|empty image"),
                          ("missing.png", "file not found")]:
        with pytest.raises(ImageError, match=problem) as info:
            load_image(tmp_path / name)
        assert str(info.value).startswith(str(tmp_path / name))
    with pytest.raises(ImageError, match="empty image"):
        to_rgb_float(np.zeros((0, 5), np.uint8))


def test_list_images(tmp_path):
    for name in ["b.tif", "a.PNG", "notes.txt", ".hidden.png"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.PNG", "b.tif"]
    assert list_images([tmp_path / "b.tif", tmp_path / "notes.txt"]) == [tmp_path / "b.tif"]
    with pytest.raises(ImageError, match="not found"):
        list_images(tmp_path / "nope")
