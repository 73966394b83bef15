"""Does the image uncertainty track the real error? Spearman rank correlation between
``uncertainty.score(...).image`` and (1 - image mAP) on a varied set with ground truth.

The set (``varied_set``): real nuclei planes of tests/data (hand-checked labels) clean, blurred,
noisy, low-contrast (a few grey levels of an 8-bit file) and inverted; synthetic nuclei and
phase-like cells of io/synthetic.py (seeds the demo model was not trained on); and empty images
(background and noise only, no cell: mAP 1 when nothing is found, 0 for any false cell).
Predicted with the bundled demo model (napari_cellseg/models/demo.bin) as ``cellseg rank`` does
(auto size, the checkpoint's thresholds) plus the flipped second pass.

    python benchmarks/bench_uncertainty.py [--checkpoint CKPT] [--no-second-pass]

Prints one line per image, the rank correlation with and without the second pass, and the
correlation of the single signals (what each contributes). Target: >= 0.6.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PLANES = (0, 4, 8, 12, 15)  # of tests/data/nuclei_z28-43_*.tif (z 28, 32, 36, 40, 43)


def _unit(raw: np.ndarray) -> np.ndarray:
    x = raw.astype(np.float32)
    lo, hi = np.percentile(x, (1.0, 99.8))
    return np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def degrade(raw: np.ndarray, kind: str, strength: float, rng: np.random.Generator) -> np.ndarray:
    """One image condition of the set: clean / blur / noise / lowcontrast / inverted."""
    from scipy import ndimage

    x = _unit(raw)
    if kind == "clean":
        return raw
    if kind == "blur":
        return ndimage.gaussian_filter(x, strength)
    if kind == "noise":
        return np.clip(x + rng.normal(0.0, strength, x.shape), 0.0, 1.0).astype(np.float32)
    if kind == "lowcontrast":  # an 8-bit file using a few grey levels: no percentile stretch
        y = 0.45 + strength * x + rng.normal(0.0, 0.01, x.shape)
        return np.clip(np.round(y * 255), 0, 255).astype(np.uint8)
    if kind == "inverted":
        return (1.0 - x).astype(np.float32)
    raise ValueError(kind)


def empty_image(shape, seed: int) -> np.ndarray:
    """Background only: smooth uneven illumination + camera noise, 16-bit."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    bg = ndimage.gaussian_filter(rng.normal(0, 1, shape), 40)
    bg = 1000 + 200 * bg / (np.abs(bg).max() + 1e-6)
    return np.clip(bg + rng.normal(0, 30, shape), 0, 65535).astype(np.uint16)


def varied_set(seed: int = 0, planes=PLANES, n_synthetic: int = 3, n_empty: int = 3):
    """``[(name, raw image, ground-truth labels)]``: the benchmark's images."""
    import tifffile

    from napari_cellseg.io.synthetic import make_image

    rng = np.random.default_rng(seed)
    data = REPO / "tests" / "data"
    images = tifffile.imread(data / "nuclei_z28-43_image.tif")
    labels = tifffile.imread(data / "nuclei_z28-43_labels.tif")
    ranges = {"clean": (0, 0), "blur": (1.0, 5.0), "noise": (0.03, 0.25), "lowcontrast": (0.06, 0.4),
              "inverted": (0, 0)}
    out = []
    for p in planes:
        for kind, (lo, hi) in ranges.items():
            s = float(rng.uniform(lo, hi))
            out.append((f"z{28 + p}-{kind}{s:.2f}" if hi else f"z{28 + p}-{kind}",
                        degrade(images[p], kind, s, rng), labels[p].astype(np.int32)))
    for i in range(n_synthetic):
        for kind in ("nuclei", "cells"):
            raw, gt = make_image(kind, shape=(256, 256), seed=9100 + i)
            cond = ("clean", "noise", "blur")[i % 3]
            s = {"clean": 0.0, "noise": 0.2, "blur": 2.5}[cond]
            out.append((f"syn-{kind}{i}-{cond}", degrade(raw, cond, s, rng), gt))
    for i in range(n_empty):
        out.append((f"empty{i}", empty_image((256, 256), 9200 + i), np.zeros((256, 256), np.int32)))
    return out


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def predict_set(pipe, items, second: bool = True):
    """``[(Detections, second-pass Detections or None)]`` for every item, as ``cellseg rank``."""
    from napari_cellseg.inference.uncertainty import second_pass

    out = []
    for _, raw, _ in items:
        d = pipe.predict(raw)
        out.append((d, second_pass(pipe, raw, scale=d.scale) if second else None))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--no-second-pass", action="store_true")
    args = ap.parse_args(argv)

    from napari_cellseg.inference.metrics import average_precision
    from napari_cellseg.inference.pipeline import Pipeline
    from napari_cellseg.inference.runner import Runner
    from napari_cellseg.inference.uncertainty import score
    from napari_cellseg.options import PredictOptions

    pipe = Pipeline(Runner.from_checkpoint(args.checkpoint, device="cpu"),
                    PredictOptions(checkpoint=args.checkpoint))
    th = pipe.thresholds
    items = varied_set()
    t0 = time.perf_counter()
    dets = predict_set(pipe, items, second=not args.no_second_pass)
    seconds = time.perf_counter() - t0
    err, u1, u2 = [], [], []
    print(f"{'image':28} {'cells':>5} {'gt':>4} {'mAP':>5} {'u':>5} {'u(1 pass)':>9}")
    for (name, _, gt), (d, d2) in zip(items, dets):
        m = average_precision(gt, d.to_labels(th))
        a = score(d, th).image
        b = score(d, th, second=d2).image if d2 is not None else a
        err.append(1.0 - m)
        u1.append(a)
        u2.append(b)
        print(f"{name:28} {d.count(th.box_conf):5d} {int(gt.max()):4d} {m:5.2f} {b:5.2f} {a:9.2f}")
    print(f"{len(items)} images, predicted in {seconds:.0f} s (with second pass: {not args.no_second_pass})")
    print(f"Spearman(uncertainty, 1 - mAP), one pass:        {spearman(u1, err):.3f}")
    if not args.no_second_pass:
        print(f"Spearman(uncertainty, 1 - mAP), flipped 2nd pass: {spearman(u2, err):.3f}")
    print(f"mean mAP of the set: {1 - np.mean(err):.3f}")


if __name__ == "__main__":
    main()
