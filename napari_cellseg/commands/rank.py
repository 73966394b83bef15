"""``cellseg rank``: images -> a ranking CSV, the images where the model is most likely wrong first.

Each image is predicted as ``cellseg predict`` predicts it (the same PredictOptions: size,
tiling, thresholds, device) plus, unless ``--no-second-pass``, a horizontally flipped pass; its
uncertainty comes from :func:`napari_cellseg.inference.uncertainty.score`. Rows stream into a
journal beside the CSV (one JSON line per image) and the CSV is rewritten atomically, sorted
worst first, every FLUSH_EVERY images and at the end (:mod:`napari_cellseg.io.ranking`);
``--resume`` skips the ids already in the CSV or its journal. One run per output (the lock of
:mod:`napari_cellseg.io.journal`). A bad image is reported and skipped (exit 1).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

from napari_cellseg.io.files import display_path
from napari_cellseg.io.images import list_images, load_plane
from napari_cellseg.io.atomic import output_lock
from napari_cellseg.io.journal import Journal, check_out, journal_path, journal_paths
from napari_cellseg.io.ranking import DOUBTFUL, flush_ranking, ranked_ids

__all__ = ["run_rank", "rank_items", "rank_image", "FLUSH_EVERY"]

FLUSH_EVERY = int(os.environ.get("CELLSEG_FLUSH_EVERY", 50))  # images between atomic CSV rewrites


def rank_items(inputs: Sequence) -> list[tuple[str, Path, int | None]]:
    """``(id, path, plane)`` of every image: cellseg predict's items (stack planes one each, the
    same ids). A duplicate id or a file name that is not UTF-8 is a usage error (ValueError)."""
    from napari_cellseg.commands.predict import expand_items

    return [(it.image_id, it.path, it.plane) for it in expand_items(list_images(inputs))]


def rank_image(pipeline, array, second: bool = True) -> dict:
    """One image's ranking row (without id / file): uncertainty, cells, doubtful_cells, diameter."""
    from napari_cellseg.inference.uncertainty import score, second_pass

    dets = pipeline.predict(array)
    other = second_pass(pipeline, array, scale=dets.scale) if second else None
    u = score(dets, pipeline.thresholds, second=other)
    diameter = dets.diameter or pipeline.runner.reference_diameter / float(dets.scale or 1.0)
    return {"uncertainty": round(u.image, 4), "cells": int(len(u.cells)),
            "doubtful_cells": int((u.cells > DOUBTFUL).sum()), "diameter": round(float(diameter), 1)}


def _report(message: str, bar) -> None:
    if bar is not None and hasattr(bar, "write"):
        bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr)


def run_rank(options, inputs: Sequence, out: Path, *, resume: bool = False, second: bool = True,
             progress_factory=None) -> int:
    """The command: 0 when every image was ranked, 1 when some failed (reported on stderr);
    usage / checkpoint errors raise ValueError (exit 2 in ``cellseg``)."""
    from napari_cellseg.inference.pipeline import Pipeline

    out = Path(out)
    check_out(out)
    items = rank_items(inputs)
    if not items:
        raise ValueError(f"no image files in {', '.join(map(str, inputs))}")
    pipeline = Pipeline.from_options(options)  # loads and validates the checkpoint first
    failed: list[str] = []
    with output_lock(out):
        if not resume:  # a fresh run: an earlier run's journal is not ours
            for j in journal_paths(out):
                j.unlink(missing_ok=True)
        done = ranked_ids(out) if resume else set()
        todo = [it for it in items if it[0] not in done]
        journal = Journal(journal_path(out, 0))
        bar = progress_factory(total=len(todo), desc="rank") if progress_factory else None
        keep = resume  # a fresh run replaces the CSV's old rows at its first flush
        try:
            for k, (image_id, path, plane) in enumerate(todo, start=1):
                label = display_path(path) if plane is None else f"{display_path(path)} [plane {plane}]"
                try:
                    row = rank_image(pipeline, load_plane(path, plane, rule=pipeline.input), second)
                except (ValueError, OSError, MemoryError) as exc:
                    reason = " ".join(str(exc).split())
                    reason = reason if reason.startswith(str(path)) else f"{label}: {reason}"
                    _report(f"cellseg rank: skipped: {reason}", bar)
                    failed.append(label)
                    continue
                journal.add_entry({"id": image_id, **row, "file": str(path)})
                if bar is not None:
                    bar.update(1)
                if k % FLUSH_EVERY == 0:
                    flush_ranking(out, keep_existing=keep)
                    keep = True
        finally:
            journal.close()
            if bar is not None:
                bar.close()
        n = flush_ranking(out, keep_existing=keep)
    print(f"ranked {n} images -> {out} (worst first)")
    if failed:
        print(f"cellseg rank: {len(failed)} of {len(todo)} images failed", file=sys.stderr)
        return 1
    return 0
