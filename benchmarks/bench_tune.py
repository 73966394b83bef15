"""Threshold sweep speed: a 10x10 box_conf x mask_threshold grid over 40 images of 704x520 with
~300 detections each, scored from kept Detections (``tuning.sweep``), against

* the baseline the issue names: re-running the network for every grid point (4,000 forward passes
  of the default convnext_tiny Mask R-CNN at 704x520 with ~300 detections; a few are timed and
  the rest extrapolated). Must be < 1 %.
* brute force from the kept Detections: ``to_labels`` + ``average_precision`` at every grid point
  (timed on a few images, extrapolated to 40), to show what the shared-work reuse buys.

Detections are synthetic (300 boxes 15-60 px, blobby 28x28 probabilities, scores 0.02-1); each
image's GT is a jittered subset of them, so matches span the whole IoU range. The sweep time
includes pasting each image's crops once (what ``cellseg tune`` pays after its forward passes).

Run: ``python benchmarks/bench_tune.py [--forward N] [--brute-images N]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

H, W, N_DET, N_IMAGES = 520, 704, 300, 40


def fake_detections(rng, n=N_DET, boxes=None):
    from napari_cellseg.inference.predictor import Detections

    if boxes is None:
        size = rng.uniform(15, 60, (n, 2))
        x0, y0 = rng.uniform(-5, W - 15, n), rng.uniform(-5, H - 15, n)
        boxes = np.stack([x0, y0, x0 + size[:, 0], y0 + size[:, 1]], 1)
    n = len(boxes)
    g = np.linspace(-1, 1, 28)
    blob = np.exp(-(g[:, None] ** 2 + g[None, :] ** 2) / 0.4)
    probs = np.clip(blob[None] * rng.uniform(0.7, 1.1, (n, 1, 1)) + rng.normal(0, 0.07, (n, 28, 28)), 0, 1)
    return Detections(boxes=boxes, scores=rng.uniform(0.02, 1.0, n), probs=probs, image_shape=(H, W))


def make_pairs(n_images, seed=0):
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n_images):
        dets = fake_detections(rng)
        keep = np.sort(rng.choice(len(dets), 200, replace=False))
        jitter = rng.normal(0, 3, (len(keep), 4))
        gt = fake_detections(rng, boxes=dets.boxes[keep] + jitter).to_labels(0.0, 0.5)
        pairs.append((dets, gt))
    return pairs


def fresh(pairs):
    """Same Detections without the pasted-crop cache (as right after the forward pass)."""
    from napari_cellseg.inference.predictor import Detections

    return [(Detections(d.boxes, d.scores, d.probs, d.image_shape), g) for d, g in pairs]


def _plain():
    """No post-processing: the sweep is then exact, and brute force (to_labels(c, m)) is its reference."""
    from napari_cellseg.options import Thresholds

    return Thresholds(fill_holes=False)


PLAIN = _plain()


def time_forward(n_passes):
    import torch

    from napari_cellseg.model.maskrcnn import ModelConfig, build_model
    from napari_cellseg.inference.predictor import Predictor

    torch.manual_seed(0)
    cfg = ModelConfig(box_score_thresh=0.0, box_detections_per_img=N_DET)  # default convnext_tiny
    predictor = Predictor.from_model(build_model(cfg), cfg, device="cpu")
    image = np.random.default_rng(0).uniform(0, 1, (H, W, 3)).astype(np.float32)
    dets = predictor.predict(image)  # warm-up
    times = []
    for _ in range(n_passes):
        t0 = time.perf_counter()
        dets = predictor.predict(image)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), len(dets), torch.get_num_threads()


def main(argv=None):
    from napari_cellseg.inference.metrics import average_precision
    from napari_cellseg.inference.tuning import DEFAULT_BOX_CONFS, DEFAULT_MASK_THRESHOLDS, sweep

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--forward", type=int, default=2, help="timed forward passes (after a warm-up)")
    ap.add_argument("--brute-images", type=int, default=2, help="images for the brute-force timing")
    args = ap.parse_args(argv)
    confs, masks = DEFAULT_BOX_CONFS, DEFAULT_MASK_THRESHOLDS
    grid = len(confs) * len(masks)

    pairs = make_pairs(N_IMAGES)
    print(f"{N_IMAGES} images {W}x{H}, {N_DET} detections each, GT cells per image "
          f"~{np.mean([g.max() for _, g in pairs]):.0f}, grid {len(confs)}x{len(masks)}")

    run = fresh(pairs)
    t0 = time.perf_counter()
    res = sweep(run, confs, masks, base=PLAIN)
    t_sweep = time.perf_counter() - t0
    t0 = time.perf_counter()
    sweep(run, confs, masks, base=PLAIN)  # crops already pasted (the napari widget's case)
    t_sweep_cached = time.perf_counter() - t0
    print(f"sweep (tuning.sweep, incl. pasting crops once): {t_sweep:8.2f} s   "
          f"best {res.best['box_conf']:.2f}/{res.best['mask_threshold']:.2f} mAP {res.best['map']:.3f}")
    print(f"sweep, crops already cached (widget):           {t_sweep_cached:8.2f} s")

    k = max(1, min(args.brute_images, N_IMAGES))
    sub = pairs[:k]  # crops cached by the sweep above: brute force pays only to_labels + metric
    t0 = time.perf_counter()
    brute = np.array([[[average_precision(g, d.to_labels(c, m)) for m in masks] for c in confs]
                      for d, g in sub]).mean(0)
    t_brute = (time.perf_counter() - t0) * N_IMAGES / k
    assert np.allclose(brute, sweep(sub, confs, masks, base=PLAIN).map), "brute force and sweep disagree"
    print(f"brute force (to_labels + average_precision x {grid} x {N_IMAGES}, timed on {k} "
          f"image(s), extrapolated): {t_brute:8.2f} s  -> sweep is {t_brute / t_sweep_cached:.1f}x faster")

    t_fwd, n_dets, threads = time_forward(args.forward)
    t_net = t_fwd * grid * N_IMAGES
    print(f"forward pass convnext_tiny {W}x{H} ({n_dets} detections, CPU, {threads} threads, "
          f"median of {args.forward}): {t_fwd:.2f} s")
    print(f"re-running the network per grid point ({grid * N_IMAGES} passes, extrapolated): "
          f"{t_net:10.0f} s")
    ratio = t_sweep / t_net
    print(f"sweep / re-run = {100 * ratio:.4f} %  ({'OK' if ratio < 0.01 else 'FAIL'}: must be < 1 %)")
    return 0 if ratio < 0.01 else 1


if __name__ == "__main__":
    sys.exit(main())
