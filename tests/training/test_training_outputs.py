"""What a training run leaves in OUT and says about it: leftovers of an interrupted save are
cleaned, the closing line names files that exist, failed saves and damaged checkpoints are one
line with the way on, and a fine-tune's stored thresholds come from a validation big enough."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from training.cli import main  # noqa: E402
from test_training_cli import TINY  # noqa: E402
from test_training_data import write_folder  # noqa: E402


def test_the_next_run_removes_what_an_interrupted_save_left(tmp_path):
    """SIGTERM during a checkpoint write leaves io.atomic's '.last.ckpt.XXXX.tmp': the next run in
    that folder (new or --resume) removes the run's temporary files, and only those."""
    from training.runstate import prepare_output

    out = tmp_path / "run"
    (out / "figures").mkdir(parents=True)
    left = [out / ".last.ckpt.k2j3h4.tmp", out / ".best_model.bin.a1b2.tmp", out / ".log.csv.zz.tmp",
            out / "figures" / ".val_epoch002.png.q9.tmp"]
    for path in left:
        path.write_bytes(b"PK partial")
    mine = out / ".notes.txt.tmp"
    mine.write_text("not ours")
    removed = prepare_output(out, False)
    assert sorted(removed) == sorted(str(p.relative_to(out)) for p in left)
    assert not any(p.exists() for p in left) and mine.exists()
    (out / "last.ckpt").write_bytes(b"x")
    left[0].write_bytes(b"PK partial")
    assert prepare_output(out, True) == [left[0].name] and not left[0].exists()


def test_a_failed_checkpoint_save_names_the_file_and_the_way_on(tmp_path, monkeypatch):
    """torch.save on a full disk fails with "[enforce fail at inline_container.cc:672] . unexpected
    pos"; the writer turns it (and ENOSPC) into one line naming the file, saying the last
    finished epoch is kept and how to continue."""
    import errno

    from napari_cellseg.model import checkpoint
    from training.runstate import SaveError, _Writer

    for exc in (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4800 vs 4736"),
                OSError(errno.ENOSPC, "No space left on device")):
        def full(path, **kwargs):
            raise exc

        monkeypatch.setattr(checkpoint, "save_checkpoint", full)
        writer = _Writer()
        writer.submit([(tmp_path / "run" / "last.ckpt", {})])
        with pytest.raises(SaveError) as info:
            writer.wait()
        assert str(info.value) == (f"{tmp_path / 'run' / 'last.ckpt'}: could not be written (the disk is full); "
                                   f"the files of the last finished epoch are kept in {tmp_path / 'run'}: free some "
                                   f"space, then continue with cellseg-train --out {tmp_path / 'run'} --resume "
                                   f"--epochs N")


def test_resume_from_a_truncated_last_ckpt_says_what_can_be_done(tmp_path, capsys):
    from conftest import tiny_checkpoint

    out = tmp_path / "run"
    out.mkdir()
    whole = tiny_checkpoint(out / "best_model.bin").read_bytes()
    (out / "last.ckpt").write_bytes(whole[: len(whole) // 2])
    assert main(["--out", str(out), "--resume", "--epochs", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"cellseg-train: error: {out / 'last.ckpt'}: not a readable PyTorch checkpoint"), err
    assert err[-1].endswith(f"--resume cannot continue from it: start a new run from its best model: "
                            f"--init-checkpoint {out / 'best_model.bin'} --out NEW")


@pytest.mark.slow
def test_done_line_names_best_model_only_when_it_exists(tmp_path, capsys, monkeypatch):
    """An epoch whose validation gives no finite score writes no best_model.bin: the closing line
    must not name it as the result; it says what the folder holds."""
    from training import engine

    def no_score(model, dataset, device, epoch, config, gts):
        yield {"stage": "val", "epoch": epoch, "step": 1, "total": 1}
        return float("nan"), float("nan"), []

    monkeypatch.setattr(engine, "evaluate", no_score)
    images, labels = write_folder(tmp_path / "d", n=3)
    out = tmp_path / "run"
    assert main(["--image-dir", str(images), "--label-dir", str(labels), "--out", str(out), *TINY,
                 "--steps-per-epoch", "1", "--epochs", "1", "--no-figures"]) == 0
    err = capsys.readouterr().err
    assert not (out / "best_model.bin").exists() and "best model:" not in err
    assert f"cellseg-train: done; {out / 'best_model.bin'} does not exist" in err and \
        f"{out} holds last.ckpt, log.csv" in err


@pytest.mark.slow
def test_fine_tune_on_few_cells_keeps_its_parents_thresholds(tmp_path, capsys):
    """A fine-tune whose validation images hold fewer than MIN_TUNE_CELLS cells stores its
    --init-checkpoint's thresholds (with one warning line), not a pair tuned on a few cells."""
    from conftest import tiny_checkpoint
    from napari_cellseg.model.checkpoint import load_checkpoint

    images, labels = write_folder(tmp_path / "d", n=4)  # 6 cells per image; 1 validation image
    parent = tiny_checkpoint(tmp_path / "parent.bin", thresholds={"box_conf": 0.83, "mask_threshold": 0.47},
                             native_scale=True)
    out = tmp_path / "ft"
    assert main(["--image-dir", str(images), "--label-dir", str(labels), "--out", str(out), "--init-checkpoint",
                 str(parent), "--steps-per-epoch", "1", "--epochs", "1", "--no-figures", "--val-fraction",
                 "0.25"]) == 0
    err = capsys.readouterr().err
    assert "the validation images hold 6 cells (fewer than 30): the model keeps the --init-checkpoint's " \
           "thresholds (box_conf 0.83, mask_threshold 0.47)" in err, err
    for name in ("best_model.bin", "last.ckpt"):
        thr = load_checkpoint(out / name)[2]
        assert (thr["box_conf"], thr["mask_threshold"]) == (0.83, 0.47), name


@pytest.mark.parametrize("which", ["images", "labels"])
def test_out_that_is_a_data_folder_is_refused_before_anything_is_written(tmp_path, capsys, which):
    """--out = the image (or label) folder put loss.png among the images, and --resume then
    failed on it: one line naming the flag and a folder that works, exit 2, the folder untouched."""
    images, labels = write_folder(tmp_path / "d", n=3)
    folder = images if which == "images" else labels
    before = sorted(p.name for p in folder.iterdir())
    assert main(["--image-dir", str(images), "--label-dir", str(labels), "--out", str(folder), *TINY,
                 "--epochs", "1", "--no-figures"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    flag = "--image-dir" if which == "images" else "--label-dir"
    assert err == (f"cellseg-train: error: --out {folder}: is the {flag} folder; the run's files (loss.png, "
                   f"log.csv, checkpoints) would land among the data: choose another folder, e.g. "
                   f"--out {folder / 'run'}")
    assert sorted(p.name for p in folder.iterdir()) == before
