"""`cellseg predict` end to end on a tiny random checkpoint, and the torchrun split/merge logic."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_cellseg.commands.predict import merge_shards, shard  # noqa: E402
from napari_cellseg.commands.main import main  # noqa: E402

from conftest import tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    import imageio.v3 as iio

    root = tmp_path_factory.mktemp("predict_cli")
    tiny_checkpoint(root / "tiny.bin", thresholds={"box_conf": 0.5, "mask_threshold": 0.5})
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("b_img", "a_img", "c_img"):
        iio.imwrite(images / f"{name}.png", (rng.random((96, 112)) * 255).astype(np.uint8))
    return root


def _run(args, capsys):
    rc = main(["predict", *map(str, args)])
    return rc, capsys.readouterr()


def test_predict_writes_csv_and_labels(workdir, tmp_path, capsys):
    from napari_cellseg.io.annotations import read_annotations

    out = tmp_path / "sub.csv"
    rc, cap = _run(["--checkpoint", workdir / "tiny.bin", workdir / "images", "--out", out,
                    "--labels-dir", tmp_path / "labels", "--device", "cpu", "--batch-size", "2"], capsys)
    assert rc == 0, cap.err
    ann = read_annotations(out)
    assert ann.format == "kaggle" and set(ann.ids) == {"a_img", "b_img", "c_img"}
    for image_id in ann.ids:
        assert len(ann.rles(image_id)) > 5
    import tifffile
    lab = tifffile.imread(tmp_path / "labels" / "a_img.tif")
    assert lab.shape == (96, 112) and lab.max() == len(ann.rles("a_img"))
    assert np.array_equal(ann.labels("a_img", (96, 112)) > 0, lab > 0)


def test_image_without_cells_gets_its_row_starter(workdir, tmp_path, capsys):
    from napari_cellseg.io.annotations import read_annotations

    out = tmp_path / "sub.csv"
    rc, cap = _run(["--checkpoint", workdir / "tiny.bin", workdir / "images" / "a_img.png",
                    workdir / "images" / "c_img.png", "--out", out, "--box-conf", "1",
                    "--format", "starter", "--device", "cpu"], capsys)
    assert rc == 0, cap.err
    ann = read_annotations(out)
    assert ann.format == "starter" and ann.ids == ["a_img", "c_img"]
    assert ann.rles("a_img") == [] and "-1" in out.read_text()


@pytest.mark.parametrize("case", ["missing_ckpt", "truncated_ckpt", "empty_dir", "no_ckpt"])
def test_bad_input_exit_2_nothing_written(workdir, tmp_path, capsys, case, monkeypatch):
    images = tmp_path / "imgs"
    images.mkdir()
    ckpt = workdir / "tiny.bin"
    if case != "empty_dir":
        (images / "ok.png").write_bytes((workdir / "images" / "a_img.png").read_bytes())
    if case == "missing_ckpt":
        ckpt = tmp_path / "nope.bin"
    elif case == "truncated_ckpt":
        ckpt = tmp_path / "cut.bin"
        ckpt.write_bytes((workdir / "tiny.bin").read_bytes()[:5000])
    out, labels = tmp_path / "sub.csv", tmp_path / "labels"
    args = ([] if case == "no_ckpt" else ["--checkpoint", ckpt]) + [images, "--out", out,
                                                                     "--labels-dir", labels, "--device", "cpu"]
    if case == "no_ckpt":  # a wheel built without the demo model: a clear error, not a traceback
        from napari_cellseg.model import checkpoint
        monkeypatch.setattr(checkpoint, "bundled_model_path", lambda: tmp_path / "models" / "demo.bin")
    rc, cap = _run(args, capsys)
    assert rc == 2
    err = cap.err.strip().splitlines()
    assert err[-1].startswith("cellseg predict: error: ") and "Traceback" not in cap.err
    expected = {"missing_ckpt": "nope.bin", "truncated_ckpt": "cut.bin",
                "empty_dir": "no images", "no_ckpt": "bundled demo model"}[case]
    assert expected in err[-1]
    if case == "no_ckpt":
        assert "using the bundled demo model" in cap.err
    assert not out.exists() and not labels.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".sub.csv")]


def test_labels_dir_never_overwrites_an_input_image(workdir, tmp_path, capsys):
    """--labels-dir = the image folder: a.tif's labels would go to a.tif, the input image itself
    (before: the image was silently replaced by its label image). Exit 2, nothing written."""
    import tifffile

    images = tmp_path / "imgs"
    images.mkdir()
    raw = (np.random.default_rng(1).random((96, 112)) * 60000).astype(np.uint16)
    tifffile.imwrite(images / "a.tif", raw)
    (images / "b.png").write_bytes((workdir / "images" / "a_img.png").read_bytes())
    before = (images / "a.tif").read_bytes()
    out = tmp_path / "sub.csv"
    rc, cap = _run(["--checkpoint", workdir / "tiny.bin", images, "--out", out, "--labels-dir", images,
                    "--device", "cpu"], capsys)
    assert rc == 2, cap.err
    err = cap.err.strip().splitlines()[-1]
    assert err.startswith("cellseg predict: error: --labels-dir ") and "a.tif" in err and "overwrite" in err
    assert (images / "a.tif").read_bytes() == before and not out.exists()
    assert sorted(p.name for p in images.iterdir()) == ["a.tif", "b.png"]
    # a label folder beside the images is fine
    rc, cap = _run(["--checkpoint", workdir / "tiny.bin", images, "--out", out, "--labels-dir",
                    tmp_path / "labels", "--device", "cpu"], capsys)
    assert rc == 0, cap.err
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == ["a.tif", "b.tif"]


@pytest.mark.parametrize("target", ["image", "checkpoint"])
def test_out_never_overwrites_an_input(workdir, tmp_path, capsys, target):
    """--out typed as the input image or as the checkpoint (before: replaced by the CSV, the image
    or the model lost). Exit 2, nothing changed."""
    import shutil

    image, ckpt = tmp_path / "a.png", tmp_path / "model.bin"
    shutil.copy(workdir / "images" / "a_img.png", image)
    shutil.copy(workdir / "tiny.bin", ckpt)
    out = {"image": image, "checkpoint": ckpt}[target]
    before = out.read_bytes()
    rc, cap = _run(["--checkpoint", ckpt, image, "--out", out, "--device", "cpu"], capsys)
    assert rc == 2, cap.err
    err = cap.err.strip().splitlines()[-1]
    assert err == (f"cellseg predict: error: --out: writing {out} would overwrite the input {out}; "
                   f"choose another file")
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "model.bin"]


def test_resume_keeps_the_format_of_out(workdir, tmp_path, capsys):
    """--resume without --format adds rows in the file's own format (before: a starter CSV was
    silently rewritten as kaggle, its idx column gone); an explicit --format still converts."""
    from napari_cellseg.io.annotations import read_annotations

    out, images = tmp_path / "sub.csv", workdir / "images"
    base = ["--checkpoint", workdir / "tiny.bin", "--out", out, "--device", "cpu"]
    rc, cap = _run([*base, images / "a_img.png", "--format", "starter"], capsys)
    assert rc == 0, cap.err
    rc, cap = _run([*base, images, "--resume"], capsys)
    assert rc == 0, cap.err
    assert "(starter format)" in cap.out
    ann = read_annotations(out)
    assert ann.format == "starter" and sorted(ann.ids) == ["a_img", "b_img", "c_img"]
    rc, cap = _run([*base, images, "--resume", "--format", "kaggle"], capsys)
    assert rc == 0 and read_annotations(out).format == "kaggle"



def test_resume_after_a_kill_before_the_first_flush_keeps_the_run_format(workdir, tmp_path, capsys,
                                                                         monkeypatch):
    """Killed before the first CSV flush (only the journal exists): --resume without --format
    takes the format the run was started with from the journal (before: kaggle)."""
    from napari_cellseg.commands import predict as batch
    from napari_cellseg.io.annotations import read_annotations

    class Killed(Exception):
        pass

    def killed(*args, **kwargs):
        raise Killed

    out, images = tmp_path / "sub.csv", workdir / "images"
    base = ["--checkpoint", workdir / "tiny.bin", "--out", out, "--device", "cpu"]
    monkeypatch.setattr(batch, "flush_csv", killed)
    with pytest.raises(Killed):
        main(["predict", *map(str, [*base, images / "a_img.png", "--format", "starter"])])
    monkeypatch.undo()
    assert not out.exists() and list(tmp_path.glob(".sub.csv.rank0.journal"))
    rc, cap = _run([*base, images, "--resume"], capsys)
    assert rc == 0, cap.err
    assert "(starter format)" in cap.out
    ann = read_annotations(out)
    assert ann.format == "starter" and sorted(ann.ids) == ["a_img", "b_img", "c_img"]

# ---- torchrun split / merge ---------------------------------------------------------------------
def test_shard_and_merge_restore_input_order():
    items = list("abcdefg")
    parts = [shard(items, r, 3) for r in range(3)]
    assert [v for _, v in parts[1]] == items[1::3]
    assert merge_shards(reversed(parts), len(items)) == items
    with pytest.raises(ValueError, match="not predicted"):
        merge_shards(parts[:2], len(items))


def test_bad_image_is_reported_and_skipped_exit_1(workdir, tmp_path, capsys):
    from napari_cellseg.io.annotations import read_annotations

    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("a_img", "c_img"):
        (images / f"{name}.png").write_bytes((workdir / "images" / f"{name}.png").read_bytes())
    (images / "b_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "sub.csv"
    rc, cap = _run(["--checkpoint", workdir / "tiny.bin", images, "--out", out, "--device", "cpu",
                    "--batch-size", "2"], capsys)
    assert rc == 1
    assert "b_broken.png" in cap.err and "1 of 3 images failed" in cap.err
    ann = read_annotations(out)
    assert set(ann.ids) == {"a_img", "c_img"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".sub.csv")]  # no journal left


def _dist_worker(rank, world, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch.distributed as dist

    try:
        rc = main(["predict", *args])
        Path(args[args.index("--out") + 1] + f".rc{rank}").write_text(str(rc))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_predict_on_two_gloo_ranks(workdir, tmp_path):
    """torchrun-style run: each rank predicts its share into its journal, rank 0 writes the CSV."""
    import socket

    import torch.multiprocessing as mp

    from napari_cellseg.io.annotations import read_annotations

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "sub.csv"
    args = ["--checkpoint", str(workdir / "tiny.bin"), str(workdir / "images"), "--out", str(out),
            "--device", "cpu"]
    mp.spawn(_dist_worker, args=(2, port, args), nprocs=2, join=True)
    assert Path(f"{out}.rc0").read_text() == "0" and Path(f"{out}.rc1").read_text() == "0"
    ann = read_annotations(out)
    assert set(ann.ids) == {"a_img", "b_img", "c_img"}
    assert not list(tmp_path.glob(".sub.csv.*"))
    # the same images in one process give the same cells
    single = tmp_path / "single.csv"
    assert main(["predict", *args[:3], "--out", str(single), "--device", "cpu"]) == 0
    ref = read_annotations(single)
    for image_id in ref.ids:
        assert sorted(ann.rles(image_id)) == sorted(ref.rles(image_id))


# torchrun runs this instead of `-m napari_cellseg.commands.main`: rank 0's CSV write waits until rank 1's
# process is gone (at most 10 s), then 2 s more, as a write of many images would. The old code (rank 1
# returned 1 right after the gather) then had rank 0 SIGTERMed by torchrun's agent, CSV not written;
# now rank 1 waits for rank 0's status, so rank 0 writes after the 10 s.
_SLOW_FLUSH = """
import os, sys, time
from pathlib import Path
import napari_cellseg.commands.predict as batch
from napari_cellseg.commands.main import main
pids = Path(sys.argv[sys.argv.index("--out") + 1] + ".pids")
pids.mkdir(exist_ok=True)
(pids / os.environ["RANK"]).write_text(str(os.getpid()))
real = batch.flush_csv
def gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False
def slow_flush_csv(*args, **kwargs):
    others = [int(f.read_text()) for f in pids.iterdir() if f.name != os.environ["RANK"]]
    end = time.monotonic() + 10
    while time.monotonic() < end and not all(gone(pid) for pid in others):
        time.sleep(0.1)
    time.sleep(2)
    return real(*args, **kwargs)
batch.flush_csv = slow_flush_csv
sys.exit(main())
"""


@pytest.mark.slow
@pytest.mark.parametrize("broken", ["b_broken", "a_broken"], ids=["fails-on-rank-1", "fails-on-rank-0"])
def test_torchrun_summary_covers_every_rank(workdir, tmp_path, broken):
    """`torchrun --nproc_per_node=2 ... cellseg predict --diameter auto`, as a user runs it: the
    size summary, the failure count and the exit status cover the images of BOTH ranks (the
    summary used to count rank 0's images only), and every rank waits for rank 0's CSV write
    (rank 1 used to exit 1 first, and torchrun killed rank 0 before the CSV was written).
    Rank R takes items[R::2] in sorted order: a_broken is rank 0's, b_broken rank 1's."""
    import subprocess
    import sys

    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("a_img", "b_img", "c_img"):
        (images / f"{name}.png").write_bytes((workdir / "images" / f"{name}.png").read_bytes())
    (images / "d_img.png").write_bytes((workdir / "images" / "a_img.png").read_bytes())
    (images / f"{broken}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    script = tmp_path / "slow_flush.py"
    script.write_text(_SLOW_FLUSH)
    out = tmp_path / "sub.csv"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), "predict", "--checkpoint", str(workdir / "tiny.bin"),
                           str(images), "--out", str(out), "--device", "cpu", "--diameter", "auto"],
                          env=env, capture_output=True, text=True, timeout=600)
    err = proc.stderr
    assert proc.returncode == 1, err[-3000:]  # one image failed
    summary = [line for line in err.splitlines() if "Cell size estimated at" in line]
    assert len(summary) == 1 and summary[0].endswith("(4 images)."), err[-3000:]
    assert err.count("1 of 5 images failed") == 1 and f"{broken}.png" in err, err[-3000:]
    assert proc.stdout.count(f"wrote 4 images to {out}") == 1, err[-3000:]
    from napari_cellseg.io.annotations import read_annotations
    assert set(read_annotations(out).ids) == {"a_img", "b_img", "c_img", "d_img"}
    assert not list(tmp_path.glob(".sub.csv*"))  # no journal left


def test_diameter_option_sizes_images(workdir, tmp_path, capsys):
    from napari_cellseg.io.annotations import read_annotations

    out = tmp_path / "sub.csv"
    base = ["--checkpoint", workdir / "tiny.bin", workdir / "images" / "a_img.png", "--out", out,
            "--device", "cpu"]
    rc, cap = _run([*base, "--diameter", "auto"], capsys)
    assert rc == 0, cap.err
    assert "object size: estimated per image" in cap.err and read_annotations(out).ids == ["a_img"]
    rc, cap = _run([*base, "--diameter", "15", "--overwrite"], capsys)  # tiny model: reference 30 px -> x2
    assert rc == 0 and "object size: scale 2\n" in cap.err
    for bad, expected in ((["--diameter", "0"], "--diameter: expected a diameter in pixels > 0"),
                          (["--diameter", "10", "--scale", "2"], "not allowed with argument")):
        out.unlink(missing_ok=True)
        rc, cap = _run([*base, *bad], capsys)
        assert rc == 2 and expected in cap.err and not out.exists()


def test_journal_records_the_format_and_old_journals_stay_readable(tmp_path):
    from napari_cellseg.io.journal import Journal, done_ids, journal_format, journal_path, read_journal

    out = tmp_path / "sub.csv"
    old = journal_path(out, 0)
    old.write_text('{"id": "a", "shape": [4, 5], "rles": ["1 2"]}\n')  # written before the format was
    assert journal_format(out) is None and [e["id"] for e in read_journal(old)] == ["a"]
    journal = Journal(journal_path(out, 1), "starter")
    journal.add("b", (4, 5), [])
    journal.close()
    assert journal_format(out) == "starter" and done_ids(out) == {"a", "b"}
