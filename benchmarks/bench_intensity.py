"""The intensity rule against the demo model: held-out mAP of the old rule (8-bit / 255, other
dtypes 1st-99.8th percentile) and the one rule (every dtype, each channel 1st-99th percentile).

Data the demo model never trained on: the held-out real nuclei planes z 30-38 (tests/data holds
z 28-43), as the 16-bit original and as three 8-bit exports of the same planes: full range
(min..max -> 0..255), offset (background ~35/255: 35 + 220 * full) and dim (0..120); plus
held-out synthetic phase-contrast-like cells (8-bit, seeds 9000+). Each variant runs through the
pipeline with the model's own size rule (auto size) and its stored thresholds.

    python benchmarks/bench_intensity.py [--checkpoint CKPT] [--cells 4]

Prints one row per variant: mean mAP (IoU 0.5-0.95) and cells found / true, old vs new.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HELD_OUT = range(30, 39)  # z 30-38: the demo model's held-out real planes (scripts/make_demo_data.py)
Z0 = 28  # first plane stored in tests/data


def eight_bit(plane: np.ndarray, kind: str) -> np.ndarray:
    f = (plane.astype(np.float64) - plane.min()) / max(float(np.ptp(plane)), 1.0)
    if kind == "offset":
        f = (35 + 220 * f) / 255
    elif kind == "dim":
        f = f * 120 / 255
    return np.round(f * 255).astype(np.uint8)


def old_rule(array: np.ndarray) -> np.ndarray:
    """The rule before: uint8 / 255, everything else 1st-99.8th percentile (float32 HxWx3)."""
    from napari_cellseg.io.images import normalise

    f = array.astype(np.float32) / 255 if array.dtype == np.uint8 else normalise(array, percentiles=(1.0, 99.8))
    return np.repeat(f[..., None], 3, axis=2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="default: the bundled demo model")
    ap.add_argument("--cells", type=int, default=4, help="synthetic 8-bit cell images")
    args = ap.parse_args(argv)
    import tifffile

    sys.path.insert(0, str(REPO))
    from napari_cellseg.inference.metrics import average_precision
    from napari_cellseg.inference.pipeline import Pipeline
    from napari_cellseg.io.synthetic import make_image
    from napari_cellseg.options import PredictOptions

    image = tifffile.imread(REPO / "tests/data/nuclei_z28-43_image.tif")
    labels = tifffile.imread(REPO / "tests/data/nuclei_z28-43_labels.tif")
    pairs = [(image[z - Z0], labels[z - Z0].astype(np.int32)) for z in HELD_OUT]
    sets = {"nuclei 16-bit (original)": pairs}
    for kind in ("full", "offset", "dim"):
        sets[f"nuclei 8-bit {kind}"] = [(eight_bit(im, kind), lab) for im, lab in pairs]
    sets["cells 8-bit (synthetic)"] = [make_image("cells", shape=(256, 256), seed=9000 + k)
                                       for k in range(args.cells)]
    new = Pipeline.from_options(PredictOptions(checkpoint=args.checkpoint, device="cpu"))
    old = Pipeline(new.runner, PredictOptions(checkpoint=args.checkpoint, device="cpu", intensity="raw"))
    print(f"model: {new.runner.checkpoint_path}; its input rule: {new.input}; size: {new.describe()}")
    print(f"{'data':28s} {'n':>3s} {'mAP old':>8s} {'mAP new':>8s} {'cells old':>10s} {'cells new':>10s} {'true':>5s}")
    for name, items in sets.items():
        row = {}
        for rule, pipe, prep in (("old", old, old_rule), ("new", new, lambda a: a)):
            scores, found = [], 0
            for im, gt in items:
                pred = pipe.labels(pipe.predict(prep(im)))
                scores.append(average_precision(gt, pred))
                found += int(len(np.unique(pred)) - 1)
            row[rule] = (float(np.mean(scores)), found)
        true = sum(int(len(np.unique(gt)) - 1) for _, gt in items)
        print(f"{name:28s} {len(items):3d} {row['old'][0]:8.3f} {row['new'][0]:8.3f} "
              f"{row['old'][1]:10d} {row['new'][1]:10d} {true:5d}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
