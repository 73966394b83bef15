"""Object size: predict at the image's own scale vs at the true size vs ``scale="auto"``.

Synthetic images (exact labels) whose cells have a fixed typical diameter (12 .. 60 px) are
predicted three ways with a real model: at scale 1 (no resize: what a model without size
handling does), at the oracle scale ``reference_diameter / true median diameter``, and with
``scale="auto"`` (first pass, estimate, re-run). Printed per diameter: the mAP of each, auto's
estimated vs true diameter, its passes and its time relative to one scale-1 pass.

    python benchmarks/bench_autosize.py [--checkpoint CKPT] [--n 3] [--size 320]

Without --checkpoint the bundled demo model is used. Seeds 7000+ are not used by the demo's data.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--n", type=int, default=3, help="images per kind and diameter")
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--diameters", type=float, nargs="+", default=[12, 20, 30, 45, 60])
    ap.add_argument("--kinds", nargs="+", default=["nuclei", "cells"])
    args = ap.parse_args(argv)

    from napari_cellseg.io.images import to_rgb_float
    from napari_cellseg.inference.metrics import average_precision, median_diameter
    from napari_cellseg.inference.predictor import Predictor
    from napari_cellseg.inference.sizing import clamp_scale
    from napari_cellseg.io.synthetic import make_image

    pred = Predictor.from_checkpoint(args.checkpoint, device="cpu")
    th = pred.thresholds
    ref = pred.runner.reference_diameter
    print(f"model reference diameter {ref:.0f} px; thresholds {th.box_conf:.2f} / {th.mask_threshold:.2f}")
    print(f"{'kind':7} {'diam':>5} {'mAP x1':>7} {'oracle':>7} {'auto':>7} {'est/true':>9} "
          f"{'passes':>6} {'time auto/x1':>12}")
    totals = {"x1": [], "oracle": [], "auto": [], "t1": 0.0, "ta": 0.0}

    def run(image, scale):
        t0 = time.perf_counter()
        det = pred.predict(image, scale=scale)
        return det, time.perf_counter() - t0

    for kind in args.kinds:
        for d in args.diameters:
            rows = []
            for i in range(args.n):
                raw, gt = make_image(kind, shape=(args.size, args.size), seed=7000 + 100 * int(d) + i, diameter=d)
                image = to_rgb_float(raw)
                true = median_diameter(gt)
                lab = {}
                det1, t1 = run(image, 1.0)
                det_o, _ = run(image, clamp_scale(ref / true))
                calls = []
                orig = pred.runner._forward

                def counted(*a, **k):
                    calls.append(1)
                    return (yield from orig(*a, **k))

                pred.runner._forward = counted
                det_a, ta = run(image, "auto")
                del pred.runner._forward
                for key, det in (("x1", det1), ("oracle", det_o), ("auto", det_a)):
                    lab[key] = average_precision(gt, det.to_labels(th))
                rows.append((lab["x1"], lab["oracle"], lab["auto"], (det_a.diameter or 0) / true, len(calls), ta / t1))
                for key in ("x1", "oracle", "auto"):
                    totals[key].append(lab[key])
                totals["t1"] += t1
                totals["ta"] += ta
            m = np.mean(rows, axis=0)
            print(f"{kind:7} {d:5.0f} {m[0]:7.3f} {m[1]:7.3f} {m[2]:7.3f} {m[3]:9.2f} {m[4]:6.1f} {m[5]:11.2f}x",
                  flush=True)
    print(f"mean mAP over {len(totals['x1'])} images: scale 1 {np.mean(totals['x1']):.3f}, oracle "
          f"{np.mean(totals['oracle']):.3f}, auto {np.mean(totals['auto']):.3f}; auto takes "
          f"{totals['ta'] / totals['t1']:.2f}x the time of one scale-1 pass")


if __name__ == "__main__":
    main()
