import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from napari_cellseg.io.images import ImageError, list_images, load_image, read_raw, to_rgb_float
from napari_cellseg.options import ImageInput

RAW = ImageInput(intensity="raw")


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
    out = load_image(tmp_path / "g.png", rule=RAW)
    _check(out, (20, 30))
    assert np.allclose(out[..., 0], grey8 / 255) and np.array_equal(out[..., 0], out[..., 2])
    lo, hi = np.percentile(grey8, (1, 99))  # the default: percentile, 8-bit too
    assert np.allclose(load_image(tmp_path / "g.png")[..., 0], np.clip((grey8 - lo) / (hi - lo), 0, 1))
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
    f = np.linspace(0.2, 0.6, 12, dtype=np.float32).reshape(3, 4)
    assert np.allclose(to_rgb_float(f, rule=RAW)[..., 1], f)  # raw: floats as they are
    assert to_rgb_float(f).max() == 1.0 and to_rgb_float(f).min() == 0.0
    assert not to_rgb_float(np.full((4, 4), 7, np.uint16)).any()


def test_bad_images_name_the_file(tmp_path):
    tifffile.imwrite(tmp_path / "4d.tif", np.zeros((2, 3, 8, 9), np.uint8), photometric="minisblack")
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


# ---- limits from the header, two channels are channels --------------------------------------------
def _forbid_decoding(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(tifffile, "imread", boom)
    monkeypatch.setattr(iio, "imread", boom)


@pytest.mark.slow
def test_huge_tiled_compressed_tiff_refused_from_header(tmp_path, monkeypatch):
    """A 17000x17000 tiled zlib TIFF (a few hundred KB) took 8 GiB; now the header refuses it."""
    path = tmp_path / "huge.tif"
    tile = np.zeros((1024, 1024), np.uint8)
    n = (-(-17000 // 1024)) ** 2
    tifffile.imwrite(path, (tile for _ in range(n)), shape=(17000, 17000), dtype=np.uint8,
                     tile=(1024, 1024), compression="zlib")
    assert path.stat().st_size < 2**20
    _forbid_decoding(monkeypatch)
    with pytest.raises(ImageError, match=r"huge.tif: image size 17000x17000 .* over the limit"):
        read_raw(path)
    with pytest.raises(ImageError, match="over the limit"):
        load_image(path)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif"])
def test_pixel_limit_checked_before_decoding(tmp_path, monkeypatch, suffix):
    from napari_cellseg.io import rle
    from napari_cellseg.io.images import image_info

    path = tmp_path / f"img{suffix}"
    data = np.zeros((30, 40, 3), np.uint8)
    (tifffile.imwrite if suffix == ".tif" else iio.imwrite)(path, data)
    info = image_info(path)
    assert (info.planes, info.height, info.width, info.channels) == (1, 30, 40, 3)
    monkeypatch.setattr(rle, "MAX_PIXELS", 1000)
    _forbid_decoding(monkeypatch)
    with pytest.raises(ImageError, match=rf"img{suffix}: image size 40x30 .*1,200 pixels is over"):
        read_raw(path)


def test_plane_channel_and_total_limits(tmp_path, monkeypatch):
    import napari_cellseg.io.images as images

    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((5, 8, 9), np.uint16))
    five = tmp_path / "five.tif"
    tifffile.imwrite(five, np.zeros((8, 9, 5), np.uint8), photometric="rgb", extrasamples=[0, 0])
    _forbid_decoding(monkeypatch)
    monkeypatch.setattr(images, "MAX_CHANNELS", 4)
    with pytest.raises(ImageError, match="five.tif: 5 channels"):
        read_raw(five)
    monkeypatch.setattr(images, "MAX_CHANNELS", 16)
    monkeypatch.setattr(images, "MAX_PLANES", 4)
    with pytest.raises(ImageError, match="stack.tif: 5 planes .* over the limit of 4 planes"):
        read_raw(stack)
    monkeypatch.setattr(images, "MAX_PLANES", 10)
    monkeypatch.setattr(images, "MAX_SAMPLES", 100)
    with pytest.raises(ImageError, match="stack.tif: 360 values .* over the limit"):
        read_raw(stack)
    from napari_cellseg.io.images import read_plane

    assert read_plane(stack, 4).shape == (8, 9)  # one page: within the limits


def test_two_channel_tiff_is_two_channels_and_png_la_is_grey_plus_alpha(tmp_path):
    """A YxXx2 TIFF was read as grey + alpha (its second channel dropped: 0 cells); only PNG's LA
    mode has an alpha. In memory, HxWx2 is two channels too."""
    from napari_cellseg.io.images import image_info

    rng = np.random.default_rng(0)
    la = rng.integers(0, 256, (256, 256, 2), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "two.tif", la)
    iio.imwrite(tmp_path / "la.png", la)
    info = image_info(tmp_path / "two.tif")
    assert (info.planes, info.height, info.width, info.channels) == (1, 256, 256, 2)
    second = load_image(tmp_path / "two.tif", rule=ImageInput(intensity="raw", channel=2))
    assert np.allclose(second[..., 0], la[..., 1] / 255)  # the second channel is there
    info = image_info(tmp_path / "la.png")
    assert (info.planes, info.height, info.width, info.channels) == (1, 256, 256, 1)
    out = load_image(tmp_path / "la.png", rule=RAW)
    _check(out, (256, 256))
    assert np.allclose(out[..., 0], la[..., 0] / 255)  # grey kept, alpha dropped
    both = to_rgb_float(la, rule=ImageInput(intensity="raw", channel=1, channel2=2))
    assert np.allclose(both[..., 1], la[..., 0] / 255) and np.allclose(both[..., 2], la[..., 1] / 255)
    _check(to_rgb_float(np.stack([la, la]), plane=1), (256, 256))  # a stack of 2-channel planes


def test_stack_planes_read_one_at_a_time_with_the_same_rule(tmp_path, monkeypatch):
    """One layout rule for files, arrays and plane reads; hyperstack singleton axes ignored."""
    from napari_cellseg.io.images import image_info, layout, load_plane, read_plane

    stack = np.arange(4 * 6 * 7, dtype=np.uint16).reshape(4, 6, 7)
    tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack")  # (tifffile: not RGBA)
    tifffile.imwrite(tmp_path / "h.tif", stack[:, None], imagej=True)  # Z x C=1 x Y x X
    assert image_info(tmp_path / "s.tif").planes == 4
    assert layout((4, 1, 6, 7)) == (4, 6, 7, 1) and layout((6, 7, 2)) == (1, 6, 7, 2)
    for name in ("s.tif", "h.tif"):
        assert np.array_equal(read_plane(tmp_path / name, 2), stack[2])
        _check(load_plane(tmp_path / name, 3), (6, 7))
        with pytest.raises(ImageError, match="plane 4 is out of range"):
            read_plane(tmp_path / name, 4)
    _check(to_rgb_float(stack[:, None], plane=1), (6, 7))


def test_stack_of_one_plane_is_that_plane(tmp_path):
    """A 1xHxW stack (ImageJ / tifffile write one-slice stacks so) is one plane by images.layout,
    so every reader takes it as the HxW image (before: image_info said 1 plane but to_rgb_float
    refused it as "a stack of 1 planes; choose one plane", so cellseg predict skipped the file and
    to-csv / evaluate refused a 1xHxW label file)."""
    from napari_cellseg.io.files import read_label_image
    from napari_cellseg.io.images import image_info

    raw = (np.random.default_rng(0).random((40, 56)) * 60000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "one.tif", raw[None])
    assert read_raw(tmp_path / "one.tif").shape == (1, 40, 56) and image_info(tmp_path / "one.tif").planes == 1
    expected = to_rgb_float(raw)
    assert np.array_equal(load_image(tmp_path / "one.tif"), expected)
    assert np.array_equal(to_rgb_float(raw[None]), expected)
    assert np.array_equal(to_rgb_float(raw[None], plane=0), expected)
    with pytest.raises(ImageError, match="plane 1 given but the image is a single plane"):
        to_rgb_float(raw[None], plane=1)
    labels = np.arange(40 * 56, dtype=np.uint16).reshape(40, 56) % 7
    tifffile.imwrite(tmp_path / "labels.tif", labels[None])
    assert np.array_equal(read_label_image(tmp_path / "labels.tif"), labels)
