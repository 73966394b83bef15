"""Robustness: stacks, odd paths, --resume, hostile checkpoints and CSVs, kill -9 fault tests."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_cellseg.io.annotations import CsvError, read_annotations  # noqa: E402
from napari_cellseg.commands.main import main  # noqa: E402

from conftest import TINY_MODEL, tiny_checkpoint  # noqa: E402

TINY = {**TINY_MODEL, "box_detections_per_img": 50}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny model é.bin", box_detections_per_img=50)


def _images(folder: Path, names, seed=0):
    import imageio.v3 as iio

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        iio.imwrite(folder / f"{name}.png", (rng.random((64, 80)) * 255).astype(np.uint8))


def test_stack_planes_and_unicode_paths_with_spaces(ckpt, tmp_path, capsys):
    import tifffile

    folder = tmp_path / "my images ü 細胞"
    _images(folder, ["plain ä"])
    rng = np.random.default_rng(1)
    stack = (rng.random((3, 64, 80)) * 4000).astype(np.uint16)
    tifffile.imwrite(folder / "stack ß.tif", stack, metadata={"axes": "ZYX"})  # (else 3 channels)
    out = tmp_path / "résultats 1" / "sub mission.csv"
    out.parent.mkdir()
    rc = main(["predict", str(folder), "--out", str(out), "--checkpoint", str(ckpt), "--device", "cpu",
               "--labels-dir", str(tmp_path / "label ö")])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    ann = read_annotations(out)
    assert set(ann.ids) == {"plain ä", "stack ß_000", "stack ß_001", "stack ß_002"}
    # each plane is predicted on its own: plane 1 alone gives the same cells as in the stack run
    tifffile.imwrite(tmp_path / "one.tif", stack[1])
    one = tmp_path / "one.csv"
    assert main(["predict", str(tmp_path / "one.tif"), "--out", str(one), "--checkpoint", str(ckpt),
                 "--device", "cpu"]) == 0
    assert read_annotations(one).rles("one") == ann.rles("stack ß_001")
    assert (tmp_path / "label ö" / "stack ß_002.tif").is_file()


def test_resume_skips_done_ids_and_folds_in_the_journal(ckpt, tmp_path, capsys):
    from napari_cellseg.commands.predict import journal_path

    folder = tmp_path / "imgs"
    _images(folder, ["a", "b", "c"])
    out = tmp_path / "sub.csv"
    args = ["predict", str(folder), "--out", str(out), "--checkpoint", str(ckpt), "--device", "cpu"]
    assert main(args) == 0
    first = out.read_text()
    _images(folder, ["d", "e"], seed=5)
    # a crashed run journalled "d" (with a made-up mask, so we can tell) and died mid-line
    journal_path(out, 0).write_text('{"id": "d", "shape": [64, 80], "rles": ["1 7"]}\n{"id": "e", "sh')
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0
    cap = capsys.readouterr()
    assert "4 images already done" in cap.err
    ann = read_annotations(out)
    assert ann.ids == ["a", "b", "c", "d", "e"]
    assert ann.rles("d") == ["1 7"]  # from the journal, not predicted again
    assert out.read_text().startswith(first)  # old rows kept as they were
    assert not journal_path(out, 0).exists()
    # nothing left to do: the CSV stays the same, exit 0
    assert main(args + ["--resume"]) == 0
    assert read_annotations(out).ids == ann.ids


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['CELLSEG_EVIL_MARKER']}",))


def test_malicious_checkpoint_refused_by_the_cli(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("CELLSEG_EVIL_MARKER", str(marker))
    # check the payload is real: plain pickle.loads runs it
    pickle.loads(pickle.dumps(Evil()))
    assert marker.exists()
    marker.unlink()
    evil = tmp_path / "evil ckpt.bin"
    torch.save({"format": "napari-cellseg/1", "config": Evil(), "state_dict": {}}, evil)
    _images(tmp_path / "imgs", ["a"])
    out = tmp_path / "sub.csv"
    rc = main(["predict", str(tmp_path / "imgs"), "--out", str(out), "--checkpoint", str(evil),
               "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "evil ckpt.bin: refused" in err and ("posix.system" in err or "os.system" in err)
    assert not marker.exists() and not out.exists()


def test_absurd_sizes_refused_before_allocating(tmp_path, capsys):
    from napari_cellseg.io.rle import rles_to_labels

    big = tmp_path / "big.csv"
    big.write_text("id,annotation,width,height\nimg,1 5,200000,200000\n")
    with pytest.raises(CsvError, match=r"big.csv: row 2: image size 200000x200000.*2\^28"):
        read_annotations(big)
    with pytest.raises(ValueError, match="over the limit"):
        rles_to_labels(["1 5"], (100000, 100000))
    # millions of tokens in one annotation of a 10x10 image: refused without parsing them
    tokens = tmp_path / "tokens.csv"
    tokens.write_text("id,annotation,width,height\nimg,1 1" + " 3 1" * 2_000_000 + ",10,10\n")
    tracemalloc.start()
    try:
        with pytest.raises(CsvError, match="tokens.csv: row 2: annotation: RLE of 8,000,003 characters is longer"):
            read_annotations(tokens)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 * 2**20  # a few copies of the 16 MB text, never 8 bytes x 4M tokens x copies
    kaggle = tmp_path / "kaggle.csv"
    runs = " ".join(f"{2 * i + 1} 1" for i in range(8_000))  # valid runs, under csv's field limit
    kaggle.write_text(f"id,predicted\nimg,{runs}\n")
    tokens.write_text("id,annotation,width,height\nimg,1 1" + " 3 1" * 30_000 + ",10,10\n")
    with pytest.raises(CsvError, match="row 2: annotation: RLE of 120,003 characters is longer"):
        read_annotations(tokens)
    rc = main(["to-labels", str(kaggle), "--shape", "10x10", "--out", str(tmp_path / "lab")])
    err = capsys.readouterr().err
    assert rc == 2 and "kaggle.csv" in err and "longer than any mask" in err
    rc = main(["to-labels", str(kaggle), "--shape", "50000x50000", "--out", str(tmp_path / "lab")])
    assert rc == 2 and "2^28" in capsys.readouterr().err


# ---- kill -9 fault tests -----------------------------------------------------------------------
# the writers below loop forever until killed: each also exits when its parent (pytest) is gone,
# so a test run that is itself killed leaves no writer behind
_ORPHAN_GUARD = """
import os as _os, threading as _threading, time as _time
_parent = _os.getppid()
def _watch():
    while _os.getppid() == _parent:
        _time.sleep(0.5)
    _os._exit(1)
_threading.Thread(target=_watch, daemon=True).start()
"""


def _kill_during(code: str, ready: Path, delays, env=None):
    """Run ``code`` in a subprocess; once ``ready`` exists, SIGKILL it after each delay in turn."""
    for delay in delays:
        proc = subprocess.Popen([sys.executable, "-c", _ORPHAN_GUARD + code], env={**os.environ, **(env or {})})
        try:
            deadline = time.time() + 120
            while not ready.exists() and time.time() < deadline and proc.poll() is None:
                time.sleep(0.02)
            assert ready.exists(), "the writer never started"
            time.sleep(delay)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        ready.unlink()


def _no_temp_mistaken(folder: Path, target: str):
    from napari_cellseg.io.images import list_images

    leftovers = [p.name for p in folder.iterdir() if p.name != target and target in p.name]
    # (a kill -9 leaves the writer's lock file: no flock is held, the next writer takes it over)
    assert all(n.startswith(f".{target}.") and n.endswith((".tmp", ".lock")) for n in leftovers), leftovers
    assert not [p for p in list_images(folder) if p.name.startswith(".")]


@pytest.mark.slow
def test_kill9_during_csv_export(tmp_path):
    out, ready = tmp_path / "export.csv", tmp_path / "ready"
    code = f"""
import numpy as np
from pathlib import Path
from napari_cellseg.io.annotations import write_annotations
rng = np.random.default_rng(0)
items = [{{f"img{{i}}": rng.integers(0, 300, (256, 256)).astype(np.int32) for i in range(12)}},
         {{f"img{{i}}": rng.integers(0, 3, (256, 256)).astype(np.int32) for i in range(12)}}]
write_annotations({str(out)!r}, items[0])
Path({str(ready)!r}).touch()
k = 0
while True:
    k += 1
    write_annotations({str(out)!r}, items[k % 2])
"""
    _kill_during(code, ready, [0.05, 0.3, 0.7, 1.1])
    ann = read_annotations(out)  # complete and valid
    assert ann.ids == [f"img{i}" for i in range(12)]
    assert len(ann.rles("img0")) in (299, 2)  # either version, whole
    _no_temp_mistaken(tmp_path, "export.csv")


@pytest.mark.slow
def test_kill9_during_checkpoint_save(tmp_path):
    from napari_cellseg.model.checkpoint import load_checkpoint

    path, ready = tmp_path / "model.bin", tmp_path / "ready"
    code = f"""
import torch
from pathlib import Path
from napari_cellseg.model.checkpoint import save_checkpoint
from napari_cellseg.model.maskrcnn import ModelConfig, build_model
config = ModelConfig(**{TINY!r})
model = build_model(config)
save_checkpoint({str(path)!r}, model, config, info={{"k": 0}})
Path({str(ready)!r}).touch()
k = 0
while True:
    k += 1
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias.fill_(float(k))
    save_checkpoint({str(path)!r}, model, config, info={{"k": k}})
"""
    _kill_during(code, ready, [0.1, 0.6, 1.3])
    model, _, _, info = load_checkpoint(path)
    assert float(model.roi_heads.box_predictor.cls_score.bias[0].detach()) == float(info["k"])
    _no_temp_mistaken(tmp_path, "model.bin")


@pytest.mark.slow
def test_kill9_during_predict_then_resume(ckpt, tmp_path):
    from napari_cellseg.commands.predict import journal_paths

    folder = tmp_path / "imgs"
    names = [f"im{i:02d}" for i in range(14)]
    _images(folder, names)
    out = tmp_path / "sub.csv"
    cmd = [sys.executable, "-m", "napari_cellseg.commands.main", "predict", str(folder), "--out", str(out),
           "--checkpoint", str(ckpt), "--device", "cpu", "--resume"]
    env = {**os.environ, "CELLSEG_FLUSH_EVERY": "3", "OMP_NUM_THREADS": "1"}
    for wait_for in (4, 9):  # kill once some rows are journalled / flushed
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            done = sum(1 for j in journal_paths(out) for _ in open(j, encoding="utf-8"))
            if out.exists():
                done += len(read_annotations(out).ids)
            if done >= wait_for:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():
            ann = read_annotations(out)  # whatever is there is a complete, valid CSV
            assert set(ann.ids) <= set(names)
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    ann = read_annotations(out)
    assert sorted(ann.ids) == names and len(ann.ids) == len(set(ann.ids))
    assert not journal_paths(out)
    clean = tmp_path / "clean.csv"
    assert main(["predict", str(folder), "--out", str(clean), "--checkpoint", str(ckpt),
                 "--device", "cpu"]) == 0
    ref = read_annotations(clean)
    for name in names:
        assert ann.rles(name) == ref.rles(name)
    _no_temp_mistaken(tmp_path, "sub.csv")
