"""training.finetune: the few-image preset over the training engine (tiny random model)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import tiny_checkpoint  # noqa: E402


def _images(n: int, size: int = 96):
    from napari_cellseg.io.synthetic import make_image

    pairs = [make_image("nuclei", shape=(size, size), seed=i) for i in range(n)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _drain(gen):
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            return events, stop.value


@pytest.mark.slow
def test_finetune_saves_a_loadable_model_and_reports_before_and_after(tmp_path):
    from napari_cellseg.model.checkpoint import load_checkpoint
    from training.finetune import finetune

    ckpt = tiny_checkpoint(tmp_path / "start.bin")
    images, labels = _images(2)  # fewer than 4 images: tiled, so one tile is held out
    events, result = _drain(finetune(images, labels, ckpt, tmp_path / "out", device="cpu",
                                     ids=["a", "b"], epochs=2, steps_per_epoch=2))
    assert result.checkpoint == tmp_path / "out" / "best_model.bin" and result.checkpoint.is_file()
    load_checkpoint(result.checkpoint)  # safe load + validation
    assert 0.0 <= result.val_map_before <= 1.0 and 0.0 <= result.val_map_after <= 1.0
    assert result.epochs == 2
    assert result.val_ids and all("@r" in i for i in result.val_ids)  # tiles of a / b
    assert [e["epoch"] for e in events if e["stage"] == "epoch"] == [0, 1, 2]
    assert any(e["stage"] == "train" for e in events)


@pytest.mark.slow
def test_finetune_stops_at_its_time_budget(tmp_path):
    from training.finetune import finetune

    ckpt = tiny_checkpoint(tmp_path / "start.bin")
    images, labels = _images(4)
    # the budget mode runs up to MAX_EPOCHS epochs: only the time budget ends this run
    events, result = _drain(finetune(images, labels, ckpt, tmp_path / "out", device="cpu",
                                     minutes=0.001, steps_per_epoch=2))
    assert result.epochs == 1 and result.checkpoint.is_file()
    assert any("time budget" in e.get("message", "") for e in events)


def test_finetune_refuses_bad_input_with_one_line(tmp_path):
    from training.data import DataError
    from training.finetune import finetune

    ckpt = tiny_checkpoint(tmp_path / "start.bin")
    with pytest.raises(DataError, match="no corrected image"):
        next(finetune([], [], ckpt, tmp_path / "o"))
    with pytest.raises(ValueError, match="minutes"):
        next(finetune([np.zeros((8, 8))], [np.zeros((8, 8), int)], ckpt, tmp_path / "o", minutes=-1))
    with pytest.raises(DataError, match="2 images but 1"):
        next(finetune([np.zeros((8, 8))] * 2, [np.zeros((8, 8), int)], ckpt, tmp_path / "o"))
