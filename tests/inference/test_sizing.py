"""The size estimate (auto diameter) and the checkpoint's input rule, driven through the pipeline
with a deterministic stand-in for the network."""

import numpy as np
import pytest

from napari_cellseg.options import DEFAULT_THRESHOLDS, ImageInput, PredictOptions


class BlobRunner:
    """Runner stand-in: 'detects' every connected region brighter than 0.05 of the image it is
    given; a region's score is its mean brightness. Reference size 40 px (size-normalised)."""

    def __init__(self, info=None):
        from napari_cellseg.model.maskrcnn import ModelConfig

        self.config = ModelConfig(native_scale=True, diameter=40.0)
        self.model = None
        self.thresholds = DEFAULT_THRESHOLDS  # the model's own: box_conf 0.5
        self.info = dict(info or {})
        self.checkpoint_path = "blob.bin"
        self.reference_diameter, self.size_normalised = 40.0, True

    def base_factor(self, shape):
        return 1.0

    def iter_forward(self, arrays, factors, box_filter=None):
        from scipy import ndimage
        from skimage.transform import resize

        from napari_cellseg.inference.detections import Detections

        factors = factors if isinstance(factors, (list, tuple)) else [factors] * len(arrays)
        yield {"stage": "forward", "fraction": 0.5}
        out = []
        for a, f in zip(arrays, factors):
            if f != 1.0:
                h, w = int(a.shape[0] * f), int(a.shape[1] * f)
                a = resize(a, (h, w), order=1, anti_aliasing=False)
            lab, _ = ndimage.label(a[..., 0] > 0.05)
            boxes, scores, probs = [], [], []
            for i, sl in enumerate(ndimage.find_objects(lab), start=1):
                crop = (lab[sl] == i).astype(np.float32)
                y, x = sl
                boxes.append(np.array([x.start, y.start, x.stop, y.stop], np.float32) / f)
                scores.append(float(a[sl][..., 0][crop > 0].mean()))
                probs.append(resize(crop, (28, 28), order=1, anti_aliasing=False))
            out.append(Detections(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32),
                                  np.asarray(probs, np.float32).reshape(-1, 28, 28), arrays[0].shape[:2],
                                  labels=np.ones(len(scores), np.int64)))
        return out


def _two_populations() -> np.ndarray:
    """Twelve bright discs 28 px across and forty dim specks 6 px across (float, raw scale)."""
    img = np.zeros((320, 320), np.float32)
    yy, xx = np.mgrid[:320, :320]
    for k in range(12):
        cy, cx = 40 + 80 * (k // 4), 40 + 80 * (k % 4)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 14 ** 2] = 0.9
    rng = np.random.default_rng(0)
    for cy, cx in rng.integers(10, 310, (40, 2)):
        if img[cy - 5:cy + 6, cx - 5:cx + 6].any():
            continue
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 9] = 0.25
    return img


def test_auto_size_never_depends_on_the_users_thresholds():
    """A low box confidence (the user's slider / --box-conf) used to let the dim specks into
    the size estimate: another factor, so other cells (predict disagreed with tune)."""
    from napari_cellseg.inference.pipeline import Pipeline

    image = _two_populations()
    raw = {"intensity": "raw"}
    base = Pipeline(BlobRunner(), PredictOptions(diameter="auto", tile_size=0, **raw)).predict(image)
    low = Pipeline(BlobRunner(), PredictOptions(diameter="auto", tile_size=0, box_conf=0.2, mask_threshold=0.3,
                                                **raw)).predict(image)
    assert base.diameter == pytest.approx(28, abs=3)  # the bright discs, at the model's own 0.5
    assert low.scale == base.scale and low.diameter == base.diameter
    np.testing.assert_array_equal(low.boxes, base.boxes)


def test_the_checkpoint_input_rule_is_the_default_and_flags_override_it():
    from napari_cellseg.inference.pipeline import Pipeline
    from napari_cellseg.inference.runner import PredictError

    stored = {"train_config": {"intensity": "raw", "channel": 2, "channel2": 1, "invert": True, "epochs": 3}}
    pipe = Pipeline(BlobRunner(stored), PredictOptions(scale=1.0))
    assert pipe.input == ImageInput("raw", 2, 1, True)
    pipe = Pipeline(BlobRunner(stored), PredictOptions(scale=1.0, channel=1, channel2=0, invert=False))
    assert pipe.input == ImageInput("raw", 1, 0, False)
    assert Pipeline(BlobRunner(), PredictOptions(scale=1.0)).input == ImageInput()  # stores none
    with pytest.raises(PredictError, match="blob.bin: info.train_config: intensity must be one of"):
        Pipeline(BlobRunner({"train_config": {"intensity": "gamma"}}), PredictOptions(scale=1.0))
    # the rule is applied to what is predicted: channel 2 of a two-channel image, inverted
    two = np.zeros((64, 64, 2), np.uint8)
    two[..., 1] = 200
    two[20:40, 20:40, 1] = 0  # a dark square in channel 2 -> bright after invert
    pipe = Pipeline(BlobRunner(), PredictOptions(scale=1.0, tile_size=0, channel=2, invert=True))
    dets = pipe.predict(two)
    assert len(dets) == 1 and tuple(dets.boxes[0]) == (20, 20, 40, 40)
