"""Tiled vs whole-image prediction with a real model: accuracy and time.

For large synthetic images (exact labels) predict once whole (no tiling) and once in
overlapping tiles, and print the competition mAP of each against the ground truth, the
difference, and the time ratio. The README's "within 0.02" claim comes from this script.

    python benchmarks/bench_tiling.py [--checkpoint CKPT] [--n 4] [--size 768] [--tile 256 --overlap 96]

Without --checkpoint the bundled demo model is used. The model's per-image caps are raised
(--max-detections) so that the whole-image reference is not cut at 500 cells.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--n", type=int, default=4, help="images per kind")
    ap.add_argument("--size", type=int, default=768)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=96)
    ap.add_argument("--kinds", nargs="+", default=["nuclei", "cells"])
    ap.add_argument("--max-detections", type=int, default=3000,
                    help="raise the model's per-image caps (detections, RPN proposals) to this, so "
                         "the whole-image run is not cut at 500 cells on dense images")
    args = ap.parse_args(argv)

    from napari_cellseg.inference.metrics import average_precision
    from napari_cellseg.inference.predictor import Predictor
    from napari_cellseg.io.synthetic import make_image

    pred = Predictor.from_checkpoint(args.checkpoint, device="cpu")
    pred.tile_size, pred.tile_overlap = args.tile, args.overlap
    net = pred.runner.model
    net.roi_heads.detections_per_img = max(net.roi_heads.detections_per_img, args.max_detections)
    for key in ("_pre_nms_top_n", "_post_nms_top_n"):
        caps = getattr(net.rpn, key)
        caps["testing"] = max(caps["testing"], args.max_detections)
    t = pred.thresholds
    rows = []
    t_whole = t_tiled = 0.0
    for kind in args.kinds:
        for seed in range(args.n):
            image, gt = make_image(kind, shape=(args.size, args.size), seed=1000 + seed)
            t0 = time.perf_counter()
            whole = pred.predict(image, tile=None)
            t1 = time.perf_counter()
            tiled = pred.predict(image, tile=args.tile)
            t2 = time.perf_counter()
            t_whole += t1 - t0
            t_tiled += t2 - t1
            lw, lt = whole.to_labels(t), tiled.to_labels(t)
            rows.append((kind, seed, int(gt.max()), average_precision(gt, lw), average_precision(gt, lt),
                         int(lw.max()), int(lt.max())))
            print(f"{kind:7s} seed {seed}: {rows[-1][2]:4d} cells  whole mAP {rows[-1][3]:.3f} "
                  f"({rows[-1][5]} found)  tiled mAP {rows[-1][4]:.3f} ({rows[-1][6]} found)", flush=True)
    mw = float(np.mean([r[3] for r in rows]))
    mt = float(np.mean([r[4] for r in rows]))
    print(f"\n{len(rows)} synthetic {args.size}x{args.size} images, tiles {args.tile} px, overlap "
          f"{args.overlap} px, thresholds {t.box_conf:.2f}/{t.mask_threshold:.2f}")
    print(f"mean mAP whole {mw:.4f}  tiled {mt:.4f}  difference {mt - mw:+.4f}")
    print(f"time whole {t_whole:.1f} s  tiled {t_tiled:.1f} s  (tiled/whole {t_tiled / max(t_whole, 1e-9):.2f}x)")


if __name__ == "__main__":
    main()
