"""``cellseg tune``: flags in, :func:`napari_cellseg.inference.tuning.tune` called, the best pair
and the mAP table printed (or one JSON document). The work (one forward pass per image, the
grid scored from the kept output, ``--write`` into the checkpoint) lives in inference/tuning.py.
"""

from __future__ import annotations

import json
import sys

import numpy as np

__all__ = ["run_tune", "format_table"]


def format_table(result) -> str:
    """The mAP table as a B x M grid (rows: box_conf, columns: mask_threshold), best marked *."""
    head = "box_conf \\ mask_thr " + " ".join(f"{m:>7.3g}" for m in result.mask_thresholds)
    lines = [head]
    bi = int(np.flatnonzero(result.box_confs == result.best["box_conf"])[0])
    bj = int(np.flatnonzero(result.mask_thresholds == result.best["mask_threshold"])[0])
    for i, b in enumerate(result.box_confs):
        cells = [f"{result.map[i, j]:.4f}" + ("*" if (i, j) == (bi, bj) else " ")
                 for j in range(len(result.mask_thresholds))]
        lines.append(f"{b:>19.3g} " + " ".join(f"{c:>7}" for c in cells))
    return "\n".join(lines)


def _grid(args) -> tuple:
    from napari_cellseg.inference.tuning import DEFAULT_BOX_CONFS, DEFAULT_MASK_THRESHOLDS, grid_values

    if args.grid is not None:
        values = grid_values(args.grid)
        return values, values
    return args.box_confs or DEFAULT_BOX_CONFS, args.mask_thresholds or DEFAULT_MASK_THRESHOLDS


def run_tune(args, progress_factory=None) -> int:
    """The ``cellseg tune`` command (args from main.py's parser): the library call, then the print."""
    from napari_cellseg.inference.tuning import check_values, tune
    from napari_cellseg.options import PredictOptions

    box_confs, mask_thresholds = _grid(args)
    check_values(box_confs, "--box-confs")
    check_values(mask_thresholds, "--mask-thresholds")
    if args.write and args.checkpoint is None:
        raise ValueError("--write needs --checkpoint FILE; the bundled demo model is read-only: "
                         "copy it first and tune the copy; nothing written")
    options = PredictOptions.from_args(args)  # min_area and the size options checked here
    found = tune(options, args.gt, args.images, box_confs, mask_thresholds, write=args.write,
                 progress_factory=progress_factory,
                 note=lambda message: print(f"cellseg tune: {message}", file=sys.stderr))
    if args.json:
        json.dump(found.to_dict(), sys.stdout, indent=1)
        print()
        return 0
    best = found.best
    print(f"mAP over {found.sweep.n_images} images (rows: box_conf, columns: mask_threshold; "
          f"min_area {best['min_area']}):")
    print(format_table(found.sweep))
    print(f"best: box_conf {best['box_conf']:.3g}  mask_threshold {best['mask_threshold']:.3g}  "
          f"mAP {best['map']:.4f}")
    if found.written:
        print(f"stored in {found.checkpoint}")
    return 0
