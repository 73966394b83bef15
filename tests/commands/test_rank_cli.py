"""`cellseg rank` as a subprocess on a tiny random checkpoint: the ranking CSV (sorted worst
first), a bad image skipped with exit 1, --resume after a crash (journal), usage errors (exit 2),
one run per output; and io.ranking's reader (one line naming the row)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import tiny_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def cellseg(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "napari_cellseg.commands.main", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    import imageio.v3 as iio

    root = tmp_path_factory.mktemp("rank_cli")
    tiny_checkpoint(root / "tiny.bin", thresholds={"box_conf": 0.5, "mask_threshold": 0.5})
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("b_img", "a_img", "c_img"):
        iio.imwrite(images / f"{name}.png", (rng.random((64, 80)) * 255).astype(np.uint8))
    (images / "broken.png").write_bytes(b"not a png")
    return root


@pytest.mark.slow
def test_rank_writes_the_images_worst_first_and_resumes_from_a_journal(workdir, tmp_path):
    from napari_cellseg.io.ranking import COLUMNS, read_ranking

    out = tmp_path / "ranking.csv"
    r = cellseg("rank", workdir / "images", "--checkpoint", workdir / "tiny.bin", "--out", out,
                "--device", "cpu", "--scale", "1", "--no-second-pass")
    assert r.returncode == 1, r.stderr  # broken.png: reported, skipped
    assert "broken.png" in r.stderr and "1 of 4 images failed" in r.stderr
    table = rows(out)
    assert tuple(table[0]) == COLUMNS
    assert sorted(t["id"] for t in table) == ["a_img", "b_img", "c_img"]
    u = [float(t["uncertainty"]) for t in table]
    assert u == sorted(u, reverse=True) and all(0 <= v <= 1 for v in u)
    assert all(int(t["cells"]) >= int(t["doubtful_cells"]) >= 0 for t in table)
    assert all(Path(t["file"]).is_file() for t in table)
    assert not list(tmp_path.glob(".ranking.csv.*"))  # journal and lock gone

    # a crash after "d_img" was journaled: --resume keeps that row and ranks only the rest
    (workdir / "images" / "broken.png").rename(tmp_path / "broken.png")
    try:
        import imageio.v3 as iio

        iio.imwrite(workdir / "images" / "d_img.png", np.zeros((64, 80), np.uint8))
        iio.imwrite(workdir / "images" / "e_img.png", np.full((64, 80), 9, np.uint8))
        journal = tmp_path / ".ranking.csv.rank0.journal"
        entry = {"id": "d_img", "uncertainty": 0.0123, "cells": 4, "doubtful_cells": 1,
                 "diameter": 30.0, "file": "d_img.png"}
        journal.write_text(json.dumps(entry) + "\n" + '{"id": "e_im', encoding="utf-8")  # torn line
        r = cellseg("rank", workdir / "images", "--checkpoint", workdir / "tiny.bin", "--out", out,
                    "--device", "cpu", "--scale", "1", "--no-second-pass", "--resume")
        assert r.returncode == 0, r.stderr
        again = {t["id"]: t for t in rows(out)}
        assert sorted(again) == ["a_img", "b_img", "c_img", "d_img", "e_img"]
        assert again["d_img"]["uncertainty"] == "0.0123"  # from the journal, not recomputed
        assert [again[i] for i in ("a_img", "b_img", "c_img")] == \
            [next(t for t in table if t["id"] == i) for i in ("a_img", "b_img", "c_img")]
        assert read_ranking(out)[-1]["id"] == "d_img"  # the most certain last
    finally:
        (tmp_path / "broken.png").rename(workdir / "images" / "broken.png")
        for name in ("d_img.png", "e_img.png"):
            (workdir / "images" / name).unlink(missing_ok=True)


def test_rank_usage_errors_are_one_line_exit_2(workdir, tmp_path):
    from napari_cellseg.io.atomic import output_lock

    r = cellseg("rank", workdir / "images", "--out", tmp_path, "--checkpoint", workdir / "tiny.bin")
    assert r.returncode == 2 and "is a folder" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cellseg("rank", tmp_path / "nothing_here", "--out", tmp_path / "r.csv")
    assert r.returncode == 2 and "not found" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    with output_lock(tmp_path / "r.csv"):  # another run holds this output
        r = cellseg("rank", workdir / "images" / "a_img.png", "--out", tmp_path / "r.csv",
                    "--checkpoint", workdir / "tiny.bin", "--device", "cpu")
    assert r.returncode == 2 and "another cellseg" in r.stderr
    assert not (tmp_path / "r.csv").exists()


def test_read_ranking_names_the_bad_row(tmp_path):
    from napari_cellseg.io.ranking import RankingError, read_ranking, write_ranking

    path = tmp_path / "r.csv"
    n = write_ranking(path, [{"id": "x", "uncertainty": 0.2, "cells": 3, "doubtful_cells": 1, "diameter": None},
                             {"id": "y", "uncertainty": 0.9, "cells": 0, "doubtful_cells": 0, "diameter": 31.5}])
    assert n == 2 and [r["id"] for r in read_ranking(path)] == ["y", "x"]
    assert read_ranking(path)[0]["diameter"] == 31.5 and read_ranking(path)[1]["diameter"] is None
    bad = {"uncertainty": "1.5", "cells": "-1", "doubtful_cells": "x", "diameter": "wide", "id": ""}
    for field, value in bad.items():
        row = {"id": "z", "uncertainty": "0.5", "cells": "2", "doubtful_cells": "1", "diameter": "", "file": ""}
        row[field] = value
        path.write_text("id,uncertainty,cells,doubtful_cells,diameter,file\n"
                        "ok,0.9,1,0,,\n" + ",".join(row.values()) + "\n", encoding="utf-8")
        with pytest.raises(RankingError, match=r"r\.csv: row 3"):
            read_ranking(path)
    path.write_text("id,predicted\na,1 2\n", encoding="utf-8")
    with pytest.raises(RankingError, match="not a cellseg rank CSV"):
        read_ranking(path)
    path.write_text("id,uncertainty,cells,doubtful_cells\na,0.5,1,0\na,0.4,1,0\n", encoding="utf-8")
    with pytest.raises(RankingError, match="row 3: id 'a' appears twice"):
        read_ranking(path)


def test_rank_takes_the_same_run_flags_as_predict():
    """One list of the network-run flags (commands/main._add_run_options): rank has predict's
    channel, size, threshold, device, precision and tile flags, with the same choices."""
    from napari_cellseg.commands.main import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices

    def flags(name):
        return {o: (a.choices, a.default) for a in sub[name]._actions for o in a.option_strings}

    predict, rank = flags("predict"), flags("rank")
    shared = {"--channel", "--channel2", "--invert", "--intensity", "--diameter", "--box-conf",
              "--precision", "--device", "--tile-size", "--tile-overlap", "--checkpoint"}
    assert shared <= set(rank) and all(rank[f] == predict[f] for f in shared)
