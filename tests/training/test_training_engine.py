"""training.engine: AMP modes and the fp16 stem fix, DDP step agreement (2 gloo ranks, NaN on
one), exact resume, one-line errors (no optimizer state, offline ImageNet), the caller's config
left alone, config.json, the health warning when the optimizer does not step."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from training.cli import main  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from test_training_cli import TINY  # noqa: E402
from test_training_data import write_folder  # noqa: E402

TIMING = {"loader_start_s", "train_s", "val_s", "save_s", "time_s"}


def rows(out: Path):
    with open(out / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def folder(tmp_path):
    return write_folder(tmp_path / "d", n=5)


# ---------------------------------------------------------------- AMP
def test_amp_modes_resolve_per_device():
    from training.loops import resolve_amp

    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) == "off"  # never on CPU unless asked
    assert resolve_amp("fp16", cpu) == "fp16" and resolve_amp("off", cpu) == "off"
    assert resolve_amp(True, cpu) == "off" and resolve_amp(False, cpu) == "off"  # old bool configs
    assert TrainConfig.from_dict({"amp": True}).amp == "auto"
    assert TrainConfig.from_dict({"amp": False}).amp == "off"
    with pytest.raises(ValueError, match="--amp"):
        TrainConfig(amp="fp8").validate()


def _fp16_step(size: int, fixed: bool, monkeypatch):
    """One fp16-autocast step of the tiny model on a synthetic cell image; returns whether the
    GradScaler skipped it (scale decreased) and the parameters whose gradients were not finite."""
    import napari_cellseg.model.maskrcnn as M
    from napari_cellseg.io.synthetic import make_image
    from training.data import labels_to_layers
    from training.dataset import layers_to_instances

    if not fixed:
        monkeypatch.setattr(M, "keep_stem_fp32", lambda body: None)
    torch.manual_seed(0)
    model = M.build_model(M.ModelConfig(backbone="convnext_atto", fpn_channels=32, mask_head_channels=32,
                                        box_head_size=128, min_size=size, max_size=size,
                                        anchor_sizes=(8, 16, 32, 64, 128)))
    model.transform.resize = lambda im, t=None: (im, t)
    im, lab = make_image("cells", (size, size), seed=1)
    masks, boxes, _ = layers_to_instances(labels_to_layers(lab))
    images = [torch.from_numpy(np.repeat(im[None].astype(np.float32) / 255, 3, 0))]
    targets = [{"boxes": torch.from_numpy(boxes), "labels": torch.ones(len(boxes), dtype=torch.int64),
                "masks": torch.from_numpy(masks)}]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cpu")
    model.train()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = sum(model(images, targets).values())
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    before = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    return scaler.get_scale() < before, bad


@pytest.mark.slow
def test_fp16_stem_runs_in_float32_so_the_scaler_does_not_skip(monkeypatch):
    """The cause of the fp16 stall: ConvNeXt's stem conv + LayerNorm make the stem's weight
    gradients sum a ~1/sqrt(eps)-amplified gradient over every pixel; in fp16 they overflow (at
    704x520 even at scale 1). With the stem kept in float32 the same step is not skipped."""
    skipped, bad = _fp16_step(192, fixed=False, monkeypatch=monkeypatch)
    assert skipped and any(n.startswith("backbone.body.stem_0") for n in bad)  # the failure, reproduced
    monkeypatch.undo()
    skipped, bad = _fp16_step(192, fixed=True, monkeypatch=monkeypatch)
    assert not skipped and bad == []


def test_stem_conv_keeps_float32_under_autocast_and_same_state_dict():
    import timm
    from napari_cellseg.model.maskrcnn import keep_stem_fp32

    body = timm.create_model("convnext_atto", pretrained=False, features_only=True)
    keys = list(body.state_dict())
    kept = keep_stem_fp32(body)
    assert list(body.state_dict()) == keys  # checkpoints stay compatible
    names = {m: n for n, m in body.named_modules()}
    assert [names[m] for m in kept] == ["stem_0", "stages_1.downsample.1", "stages_2.downsample.1",
                                        "stages_3.downsample.1"]  # stem + patchify downsampling convs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kept[0](torch.rand(1, 3, 32, 32)).dtype == torch.float32
        assert body.stages_0.blocks[0].conv_dw(torch.rand(1, 40, 8, 8)).dtype == torch.bfloat16  # others: autocast


# ---------------------------------------------------------------- step accounting / DDP
class Toy(torch.nn.Module):
    """Stands in for Mask R-CNN: model(images, targets) -> dict of losses; NaN on ``nan_rank``
    at step ``nan_step``."""

    def __init__(self, rank=0, nan_rank=-1, nan_step=-1):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        self.rank, self.nan_rank, self.nan_step, self.calls = rank, nan_rank, nan_step, 0

    def forward(self, images, targets):
        x = torch.stack(images)
        loss = (self.lin(x) - 1).pow(2).mean()
        if self.rank == self.nan_rank and self.calls == self.nan_step:
            loss = loss * float("nan")
        self.calls += 1
        return {"loss_mask": loss, "loss_box_reg": loss * 0.5}


def _drain(gen):
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            return events, stop.value


def _toy_batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [([torch.rand(4, generator=g)], [{"boxes": torch.zeros(0, 4)}]) for _ in range(n)]


def test_train_one_epoch_counts_nonfinite_and_never_steps_on_them():
    from training.loops import _health_warning, train_one_epoch

    model = Toy(nan_rank=0, nan_step=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    events, r = _drain(train_one_epoch(model, _toy_batches(4), opt, scaler, torch.device("cpu"), 1,
                                       TrainConfig(), "off"))
    assert (r["steps"], r["optimizer_steps"], r["skipped_batches"], r["scaler_skipped"]) == (4, 3, 1, 0)
    assert np.isnan(events[1]["loss"]) and events[-1]["optimizer_steps"] == 3
    assert "elapsed_s" in events[0] and "eta_epoch_s" not in events[0] and events[-1]["eta_epoch_s"] > 0
    assert _health_warning(1, r, "off") is None
    msg = _health_warning(3, {**r, "optimizer_steps": 1, "scaler_skipped": 2, "skipped_batches": 1}, "fp16")
    assert msg.startswith("epoch 3: 3 of 4 steps did not update the weights") and "--amp bf16" in msg
    assert "\n" not in msg


class SteepToy(Toy):
    """Finite loss whose gradient (4 x scale) overflows float16 until the scaler reaches 2^13."""

    def forward(self, images, targets):
        return {"loss_mask": self.lin(torch.stack(images)).float().mean() * 4}


def test_fp16_scaler_skips_are_counted_apart():
    from training.loops import train_one_epoch

    model = SteepToy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    events, r = _drain(train_one_epoch(model, _toy_batches(5), opt, scaler, torch.device("cpu"), 1,
                                       TrainConfig(), "fp16"))
    assert (r["scaler_skipped"], r["skipped_batches"], r["optimizer_steps"]) == (3, 0, 2)  # 2^16, 2^15, 2^14
    assert [e["scaler_skipped"] for e in events] == [1, 2, 3, 3, 3]


def _ddp_rank(rank, world, init_file, result_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from training.loops import train_one_epoch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DDP(Toy(rank=rank, nan_rank=1, nan_step=2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    _, r = _drain(train_one_epoch(model, _toy_batches(5, seed=rank), opt, scaler, torch.device("cpu"), 1,
                                  TrainConfig(), "off", world))
    weights = [p.detach().clone() for p in model.parameters()]
    dist.barrier()
    dist.destroy_process_group()
    torch.save({"r": r, "w": weights}, Path(result_dir) / f"rank{rank}.pt")


@pytest.mark.slow
def test_ddp_two_gloo_ranks_agree_to_skip_a_nan_on_one_rank(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    res = [torch.load(tmp_path / f"rank{k}.pt", weights_only=False) for k in (0, 1)]
    for got in res:  # the batch is counted as skipped on BOTH ranks, and both stepped 4 times
        assert (got["r"]["steps"], got["r"]["skipped_batches"], got["r"]["optimizer_steps"]) == (5, 1, 4)
    assert res[0]["r"]["train_loss"] == res[1]["r"]["train_loss"]  # losses reduced across ranks
    for a, b in zip(res[0]["w"], res[1]["w"]):
        assert torch.equal(a, b)  # identical weights: the same steps on every rank


# ---------------------------------------------------------------- whole runs (tiny model)
@pytest.mark.slow
def test_resume_is_exact_and_config_is_saved_and_untouched(folder, tmp_path, capsys):
    images, labels = folder
    args = ["--image-dir", str(images), "--label-dir", str(labels), *TINY, "--no-figures", "--workers", "1"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main([*args, "--out", str(full), "--epochs", "3"]) == 0
    err = capsys.readouterr().err
    assert "effective config" in err and '"native_scale":true' in err
    assert main([*args, "--out", str(part), "--epochs", "2"]) == 0
    assert main([*args, "--out", str(part), "--epochs", "3", "--resume"]) == 0
    a, b = rows(full), rows(part)
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == ["1", "2", "3"]
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in TIMING} == {k: v for k, v in rb.items() if k not in TIMING}
    assert all(float(r[k]) >= 0 for r in a for k in TIMING)  # per-epoch costs are reported
    saved = json.loads((full / "config.json").read_text())
    assert saved["epochs"] == 3 and saved["model"]["native_scale"] is True and saved["backbone_weights"] == "random"
    from napari_cellseg.model.checkpoint import read_checkpoint
    ck = read_checkpoint(full / "last.ckpt")
    assert ck["train_config"] == saved and ck["sampler"]["next_epoch"] == 4
    assert {"torch", "numpy", "python"} <= set(ck["rng"])


def test_engine_works_on_a_copy_of_the_config(folder, tmp_path):
    from training.settings import effective_config

    images, labels = folder
    cfg = TrainConfig(image_dir=str(images), label_dir=str(labels), out=str(tmp_path / "o"), width=0, height=0)
    before = cfg.to_dict()
    eff = effective_config(cfg)
    assert eff.model.native_scale and not cfg.model.native_scale
    assert cfg.to_dict() == before


def test_resume_without_optimizer_state_is_one_line_exit_2(folder, tmp_path, capsys):
    from napari_cellseg.model.checkpoint import save_checkpoint
    from napari_cellseg.model.maskrcnn import ModelConfig, build_model

    images, labels = folder
    out = tmp_path / "run"
    out.mkdir()
    mc = ModelConfig(backbone="convnext_atto", fpn_channels=32, mask_head_channels=32, box_head_size=128,
                     anchor_sizes=(8, 16, 32, 64, 128))
    save_checkpoint(out / "last.ckpt", build_model(mc), mc)  # a model-only checkpoint
    assert main(["--image-dir", str(images), "--label-dir", str(labels), "--out", str(out), *TINY,
                 "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cellseg-train: error:") and "last.ckpt" in err[-1] and "optimizer" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_imagenet_default_offline_stops_before_any_work(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    images, labels = folder
    out = tmp_path / "run"
    tiny = [a for a in TINY if a not in ("--backbone-weights", "random")]
    assert TrainConfig().backbone_weights == "imagenet"
    assert main(["--image-dir", str(images), "--label-dir", str(labels), "--out", str(out), *tiny]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cellseg-train: error:") and "--backbone-weights FILE" in err[-1]
    assert "--backbone-weights random" in err[-1]
    assert not out.exists() and "loading data" not in "\n".join(err)  # before any work


@pytest.mark.slow
def test_fine_tune_needs_no_backbone_weights_and_reports_epoch_0(folder, tmp_path, monkeypatch):
    """--init-checkpoint: no download (offline is fine) and the starting model is validated as
    an "epoch" event with epoch 0 for the widget."""
    from napari_cellseg.model.checkpoint import save_checkpoint
    from napari_cellseg.model.maskrcnn import ModelConfig, build_model
    from training.engine import train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    images, labels = folder
    mc = ModelConfig(backbone="convnext_atto", fpn_channels=32, mask_head_channels=32, box_head_size=128,
                     anchor_sizes=(8, 16, 32, 64, 128), box_detections_per_img=50)
    save_checkpoint(tmp_path / "start.bin", build_model(mc), mc)
    cfg = TrainConfig(image_dir=str(images), label_dir=str(labels), out=str(tmp_path / "ft"), width=0, height=0,
                      epochs=1, steps_per_epoch=1, val_fraction=0.3, figures=False, tune_thresholds=False,
                      init_checkpoint=str(tmp_path / "start.bin"))  # backbone_weights: the "imagenet" default
    events, summary = _drain(train(cfg))
    epochs = [e for e in events if e["stage"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert np.isfinite(epochs[0]["row"]["val_loss"]) and 0 <= epochs[0]["row"]["val_map"] <= 1
    assert summary["healthy"] and [r["epoch"] for r in rows(tmp_path / "ft")] == ["1"]


@pytest.mark.slow
def test_a_run_whose_optimizer_never_stepped_does_not_look_healthy(folder, tmp_path, capsys, monkeypatch):
    images, labels = folder
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, *a, **k: torch.tensor(float("inf")))
    out = tmp_path / "run"
    assert main(["--image-dir", str(images), "--label-dir", str(labels), "--out", str(out), *TINY,
                 "--no-figures", "--epochs", "1"]) == 1
    err = capsys.readouterr().err
    assert "epoch 1: 2 of 2 steps did not update the weights (2 non-finite loss/gradient)" in err
    assert "the optimizer never stepped" in err and "done; best model" not in err
    r = rows(out)[0]
    assert (r["optimizer_steps"], r["skipped_batches"], r["best"]) == ("0", "2", "0")
    assert not (out / "best_model.bin").exists()


def test_loader_keeps_workers_pins_memory_on_cuda_and_prefetches():
    from training.data import array_samples
    from training.dataset import EpochSampler, InstanceDataset
    from training.augment import test_pipeline
    from training.loops import _loader
    from test_training_data import synth

    im, lab = synth(0)
    ds = InstanceDataset(array_samples([im], [lab]), test_pipeline(0, 0))
    sampler = EpochSampler(len(ds), seed=0)
    with_workers = _loader(ds, TrainConfig(workers=2), sampler, torch.device("cpu"))
    assert with_workers.persistent_workers and with_workers.prefetch_factor == 4 and not with_workers.pin_memory
    assert _loader(ds, TrainConfig(workers=2), sampler, torch.device("cuda")).pin_memory
    plain = _loader(ds, TrainConfig(workers=0), sampler, torch.device("cpu"))
    assert not plain.persistent_workers and plain.num_workers == 0


# ---------------------------------------------------------------- fine-tuning: the derived config
def _native_checkpoint(path, diameter=24.0):
    from napari_cellseg.model.checkpoint import save_checkpoint
    from napari_cellseg.model.maskrcnn import ModelConfig, build_model

    mc = ModelConfig(backbone="convnext_atto", fpn_channels=32, mask_head_channels=32, box_head_size=128,
                     anchor_sizes=(8, 16, 32, 64, 128), native_scale=True, diameter=diameter)
    save_checkpoint(path, build_model(mc), mc)
    return path


def test_fine_tuning_a_native_scale_checkpoint_trains_at_native_size(folder, tmp_path):
    """README: `cellseg-train --init-checkpoint demo.bin ...` without --width/--height: the derived
    config keeps the checkpoint's diameter and trains at native size (0x0), and is itself valid."""
    from training.cli import parse_args
    from training.settings import effective_config

    images, labels = folder
    start = _native_checkpoint(tmp_path / "start.bin")
    base = ["--image-dir", str(images), "--label-dir", str(labels), "--out", str(tmp_path / "ft"),
            "--init-checkpoint", str(start)]
    for cfg, given in (parse_args(base),  # the CLI knows which flags were given
                       (TrainConfig(image_dir=str(images), label_dir=str(labels), init_checkpoint=str(start)), None)):
        eff = effective_config(cfg, given)
        assert (eff.width, eff.height, eff.crop_size) == (0, 0, 0)
        assert eff.model.diameter == 24.0 and eff.model.native_scale
        eff.validate()
    # a new --diameter on fine-tuning (no --width/--height) is valid as well
    eff = effective_config(*parse_args([*base, "--diameter", "30"]))
    assert (eff.width, eff.height, eff.model.diameter) == (0, 0, 30.0)
    # a run that crops keeps the given --width/--height (only the val images' size; crops are native)
    eff = effective_config(*parse_args([*base, "--crop-size", "64"]))
    assert (eff.width, eff.height, eff.crop_size) == (704, 520, 64) and eff.model.native_scale


def test_fine_tuning_keeps_the_models_channels_and_intensity_unless_given(folder, tmp_path):
    """A model trained on channel 2 (inverted, raw intensity) is fine-tuned on what it was trained
    on: its stored input rule is the run's, unless the run gives its own (and says so)."""
    import torch

    from training.cli import parse_args
    from training.settings import effective_config

    images, labels = folder
    start = _native_checkpoint(tmp_path / "start.bin")
    obj = torch.load(start, weights_only=True)
    obj["info"] = dict(obj.get("info") or {}, train_config={"intensity": "raw", "channel": 2, "invert": True})
    torch.save(obj, start)
    base = ["--image-dir", str(images), "--label-dir", str(labels), "--out", str(tmp_path / "ft"),
            "--init-checkpoint", str(start)]
    notes: list[str] = []
    for cfg, given in (parse_args(base),
                       (TrainConfig(image_dir=str(images), label_dir=str(labels), init_checkpoint=str(start)), None)):
        eff = effective_config(cfg, given, notes)
        assert (eff.intensity, eff.channel, eff.channel2, eff.invert) == ("raw", 2, 0, True)
    assert notes and "intensity raw" in notes[0] and "channel 2" in notes[0] and "invert True" in notes[0]
    eff = effective_config(*parse_args([*base, "--channel", "1", "--intensity", "percentile"]))
    assert (eff.intensity, eff.channel, eff.invert) == ("percentile", 1, True)
    bad = tmp_path / "bad.bin"
    obj["info"]["train_config"] = {"channel": -3}
    torch.save(obj, bad)
    with pytest.raises(ValueError, match="bad.bin: info.train_config"):
        effective_config(*parse_args([*base[:-1], str(bad)]))


def test_fine_tuning_with_an_explicit_resize_that_conflicts_is_one_line_exit_2(folder, tmp_path, capsys):
    """--width/--height given against a checkpoint that normalises cell size: refused before
    anything is written (the derived config is validated)."""
    images, labels = folder
    start = _native_checkpoint(tmp_path / "start.bin")
    out = tmp_path / "ft"
    tiny = ["--width", "704", "--height", "520", "--steps-per-epoch", "2"]  # the architecture: the checkpoint's
    assert main(["--image-dir", str(images), "--label-dir", str(labels), "--out", str(out), *tiny,
                 "--epochs", "1", "--no-figures", "--init-checkpoint", str(start)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cellseg-train: error: --diameter:") and "--width 0 --height 0" in err[-1]
    assert not out.exists()


# ---------------------------------------------------------------- --resume keeps the run's settings
@pytest.mark.slow
def test_resume_keeps_the_runs_settings_and_refuses_changed_ones(folder, tmp_path, capsys):
    """--resume: select_by, seed, val_fraction, the data sources ... come from last.ckpt (a
    different split or a `best` compared across criteria would be silently wrong); a flag given
    with another value is one line naming it and both values, exit 2, nothing touched."""
    from napari_cellseg.model.checkpoint import read_checkpoint

    images, labels = folder
    out = tmp_path / "run"
    args = [*TINY, "--no-figures", "--out", str(out)]
    assert main(["--image-dir", str(images), "--label-dir", str(labels), *args, "--epochs", "1",
                 "--select-by", "map", "--seed", "7"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    for flag, value, saved in (("--select-by", "loss", "map"), ("--seed", "1", "7"),
                               ("--val-fraction", "0.5", "0.3"),
                               ("--lr", "0.001", "0.0001"), ("--fpn-channels", "64", "32")):
        assert main([*args, "--epochs", "2", "--resume", flag, value]) == 2, flag
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"cellseg-train: error: {flag}:"), err[-1]
        assert saved in err[-1] and value in err[-1] and "Traceback" not in "\n".join(err)
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before, flag
    # the run's own settings need not be repeated (data sources included); --epochs may change
    assert main([*args, "--epochs", "2", "--resume", "--workers", "1"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["select_by"], saved["seed"], saved["image_dir"], saved["epochs"]) == ("map", 7, str(images), 2)
    ck = read_checkpoint(out / "last.ckpt")
    assert ck["best_by"] == "map" and ck["epoch"] == 2
    r = rows(out)
    stepped = [float(x["val_map"]) for x in r if int(x["optimizer_steps"]) > 0]
    assert ck["best"] == pytest.approx(-max(stepped), abs=1e-5)  # best = -mAP, over both runs
    assert int(r[-1]["best"]) == (float(r[-1]["val_map"]) > float(r[0]["val_map"]))


def test_resume_refuses_data_that_gives_another_validation_set(folder, tmp_path, capsys):
    """--resume draws the split again from the data: an image removed (or a stack whose planes an
    older version named NAME[z]) silently changed the validation set, and best_model.bin was then
    chosen across two sets. Now one line naming an image that differs, exit 2, nothing touched."""
    import shutil

    from napari_cellseg.model.checkpoint import read_checkpoint

    images, labels = folder
    out = tmp_path / "run"
    data = tmp_path / "data"
    shutil.copytree(images, data / "images")
    shutil.copytree(labels, data / "labels")
    args = ["--image-dir", str(data / "images"), "--label-dir", str(data / "labels"), *TINY, "--no-figures",
            "--out", str(out)]
    assert main([*args, "--epochs", "1"]) == 0
    val_ids = read_checkpoint(out / "last.ckpt")["info"]["val_ids"]
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    gone = sorted((data / "images").glob(f"{val_ids[0]}.*"))[0]
    gone.unlink()
    next((data / "labels").glob(f"{val_ids[0]}.*")).unlink()
    capsys.readouterr()
    assert main([*args, "--epochs", "2", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"cellseg-train: error: {out / 'last.ckpt'}: the data gives another validation set") and \
        "--init-checkpoint" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_resume_reads_best_with_its_criterion():
    from training.runstate import resume_best

    assert resume_best({"best": -0.5, "best_by": "map"}, "map") == -0.5
    assert resume_best({"best": -0.5, "best_by": "map"}, "loss") is None  # never compared across criteria
    assert resume_best({}, "loss") is None


# ---------------------------------------------------------------- fine-tune start and --resume: one architecture rule
def _config_checkpoint(path, mc, **extra):
    """A checkpoint holding only configs (effective_config reads no weights)."""
    from napari_cellseg.model.checkpoint import save_checkpoint
    from training.runstate import _Frozen

    save_checkpoint(path, _Frozen({}), mc, extra=extra or None)
    return path


def _demo_model(**kw):
    from napari_cellseg.model.maskrcnn import ModelConfig

    return ModelConfig(backbone="convnext_atto", fpn_channels=32, mask_head_channels=32, box_head_size=128,
                       anchor_sizes=(8, 16, 32, 64, 128), native_scale=True, diameter=24.0, **kw)


def test_fine_tuning_refuses_an_architecture_flag_the_checkpoint_does_not_have(folder, tmp_path, capsys):
    """Fine-tuning keeps --init-checkpoint's architecture: a given architecture flag with
    another value is one line naming both, exit 2, nothing written (it used to be replaced
    silently, and the same command + --resume was then refused); equal values and --diameter
    may be given."""
    from training.cli import parse_args
    from training.settings import effective_config

    images, labels = folder
    start = _config_checkpoint(tmp_path / "demo.bin", _demo_model())
    out = tmp_path / "ft"
    base = ["--image-dir", str(images), "--label-dir", str(labels), "--out", str(out), "--init-checkpoint", str(start)]
    eff = effective_config(*parse_args([*base, "--fpn-channels", "32", "--anchor-sizes", "8", "16", "32", "64", "128",
                                        "--diameter", "30"]))
    assert (eff.model.fpn_channels, eff.model.diameter) == (32, 30.0)
    assert main([*base, "--anchor-sizes", "16", "32", "64", "128", "256", "--epochs", "1", "--no-figures"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"cellseg-train: error: --anchor-sizes: the --init-checkpoint {start} was trained "
                              f"with 8 16 32 64 128, got 16 32 64 128 256"), err[-1]
    assert "Traceback" not in "\n".join(err) and not out.exists()


def _last_ckpt(out, run: TrainConfig, **extra):
    out.mkdir(parents=True, exist_ok=True)
    return _config_checkpoint(out / "last.ckpt", run.model, train_config=run.to_dict(), **extra)


def test_resume_repeats_the_first_fine_tune_command(folder, tmp_path):
    """The first command + --resume continues the run. A fine-tune run started before the
    architecture rule (no "architecture_checked" in last.ckpt) took the checkpoint's
    architecture over the given flags: they are not compared on its resume; a newer run's
    resume refuses a changed one."""
    from training.cli import parse_args
    from training.config import ConfigError
    from training.settings import effective_config

    images, labels = folder
    start = _config_checkpoint(tmp_path / "demo.bin", _demo_model())
    out = tmp_path / "ft"
    first = ["--image-dir", str(images), "--label-dir", str(labels), "--out", str(out), *TINY, "--epochs", "1",
             "--init-checkpoint", str(start)]
    # TINY's rpn/box flags differ from the checkpoint's: refused at a fine-tune start now
    with pytest.raises(ConfigError, match="^--box-batch-size-per-image: the --init-checkpoint"):
        effective_config(*parse_args(first))
    # ... but an old run started so (its train_config: the checkpoint's architecture) resumes
    run = TrainConfig(image_dir=str(images), label_dir=str(labels), out=str(out), init_checkpoint=str(start),
                      width=0, height=0, steps_per_epoch=2, val_fraction=0.3, backbone_weights="random", epochs=1)
    run.model = _demo_model()
    _last_ckpt(out, run)
    eff = effective_config(*parse_args([*first, "--epochs", "2", "--resume"]))
    assert eff.model == _demo_model() and eff.epochs == 2 and eff.init_checkpoint == str(start)
    # a run started under the rule: its first command resumes, a changed architecture flag does not
    _last_ckpt(out, run, architecture_checked=True)
    ok = ["--image-dir", str(images), "--label-dir", str(labels), "--out", str(out), "--fpn-channels", "32",
          "--diameter", "24", "--init-checkpoint", str(start), "--epochs", "2", "--resume"]
    assert effective_config(*parse_args(ok)).model == _demo_model()
    with pytest.raises(ConfigError, match=f"^--fpn-channels: the run in {out} was started with 32, got 64"):
        effective_config(*parse_args([*ok, "--fpn-channels", "64"]))


def test_resume_ignores_init_checkpoint_and_backbone_weights(folder, tmp_path):
    """An old *resumed* run stored init_checkpoint = None: repeating --init-checkpoint X --resume
    is accepted (they only chose the start; the stored values are kept)."""
    from training.cli import parse_args
    from training.settings import effective_config

    images, labels = folder
    out = tmp_path / "run"
    first = ["--image-dir", str(images), "--label-dir", str(labels), "--out", str(out), *TINY, "--epochs", "1"]
    run = effective_config(*parse_args(first))
    _last_ckpt(out, run, architecture_checked=True)
    start = _config_checkpoint(tmp_path / "x.bin", run.model)
    eff = effective_config(*parse_args([*first, "--init-checkpoint", str(start), "--backbone-weights", "imagenet",
                                        "--resume"]))
    assert (eff.init_checkpoint, eff.backbone_weights) == (None, "random")


def test_resume_from_another_folder_with_relative_paths(folder, tmp_path, monkeypatch):
    """Data paths are stored absolute, so a run started with relative paths resumes from any
    folder; an old last.ckpt holding them as typed accepts a given path that exists and ends
    with the stored one (and uses it)."""
    from training.cli import parse_args
    from training.config import ConfigError
    from training.settings import effective_config

    images, labels = folder
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    rel = [os.path.relpath(images), os.path.relpath(labels)]  # d/images, d/labels
    first = ["--image-dir", rel[0], "--label-dir", rel[1], "--out", "run", *TINY, "--epochs", "1"]
    run = effective_config(*parse_args(first))
    assert (run.image_dir, run.label_dir) == (str(images), str(labels))
    _last_ckpt(tmp_path / "run", run, architecture_checked=True)
    monkeypatch.chdir(tmp_path / "elsewhere")
    there = ["--image-dir", os.path.join("..", rel[0]), "--label-dir", os.path.join("..", rel[1]),
             "--out", "../run", *TINY, "--epochs", "2", "--resume"]
    eff = effective_config(*parse_args(there))
    assert (eff.image_dir, eff.label_dir, eff.epochs) == (str(images), str(labels), 2)
    # an old run: the paths as typed in tmp_path
    run.image_dir, run.label_dir = rel
    _last_ckpt(tmp_path / "run", run, architecture_checked=True)
    eff = effective_config(*parse_args(there))
    assert (eff.image_dir, eff.label_dir) == (str(images), str(labels))
    notes = []  # another folder is taken as the data's new place (its image ids are checked at load)
    eff = effective_config(*parse_args([*there, "--label-dir", os.path.join("..", rel[0])]), notes=notes)
    assert eff.label_dir == str(images) and notes == [f"--resume: --label-dir {os.path.join('..', rel[0])} "
                                                      f"(the run had {rel[1]})"]
    monkeypatch.chdir(tmp_path)  # from where it started, without the paths: made absolute
    eff = effective_config(*parse_args(["--out", "run", "--resume"]))
    assert (eff.image_dir, eff.label_dir) == (str(images), str(labels))


def test_resume_of_a_run_with_invalid_stored_settings_says_start_a_new_run(folder, tmp_path, capsys):
    """Old versions started fine-tune runs at 704x520 with a checkpoint's diameter (invalid): the
    resume error names last.ckpt and the way out, not a flag the user never gave."""
    images, labels = folder
    out = tmp_path / "run"
    run = TrainConfig(image_dir=str(images), label_dir=str(labels), out=str(out), width=704, height=520)
    run.model = _demo_model()  # diameter 24 at 704x520
    last = _last_ckpt(out, run)
    assert main(["--out", str(out), "--resume", "--epochs", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"cellseg-train: error: {last}: its run settings are not valid (--diameter:"), err[-1]
    assert err[-1].endswith(f"start a new run with --init-checkpoint {last} --out NEW")


def test_label_file_without_an_image_is_one_warning_line(folder, tmp_path, capsys):
    """A label file whose image is missing is not used: cellseg-train says so in one
    'cellseg-train: warning:' line (the engine's warning event, also shown by the Train widget)."""
    import tifffile

    images, labels = folder
    tifffile.imwrite(labels / "orphan.tif", np.zeros((16, 16), np.uint16))
    out = tmp_path / "run"
    assert main(["--image-dir", str(images), "--label-dir", str(labels), "--out", str(out), *TINY,
                 "--epochs", "1"]) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "orphan.tif" in ln]
    assert len(lines) == 1 and lines[0].startswith("cellseg-train: warning:"), err
    assert "DataWarning" not in err


def test_resume_with_only_out_and_epochs_keeps_every_flag_of_the_run(folder, tmp_path):
    """`--out RUN --resume --epochs N` continues with the run's own batch size, steps per epoch,
    scale range, augment, grad clip, figures, device, amp, ...; a flag typed with a new value is
    taken where it may change, and said in one line."""
    from training.cli import parse_args
    from training.settings import effective_config

    images, labels = folder
    out = tmp_path / "run"
    first = ["--image-dir", str(images), "--label-dir", str(labels), "--out", str(out), *TINY, "--epochs", "2",
             "--batch-size", "2", "--steps-per-epoch", "3", "--scale-range", "0.8", "1.25", "--no-augment",
             "--grad-clip", "0.5", "--no-figures", "--device", "cpu", "--amp", "off", "--workers", "1",
             "--freeze-backbone-epochs", "1", "--crop-size", "64"]
    run = effective_config(*parse_args(first))
    _last_ckpt(out, run, architecture_checked=True)
    notes = []
    eff = effective_config(*parse_args(["--out", str(out), "--resume", "--epochs", "3"]), notes=notes)
    kept = ("batch_size", "steps_per_epoch", "scale_range", "augment", "grad_clip", "figures", "device", "amp",
            "workers", "freeze_backbone_epochs", "crop_size", "image_dir", "label_dir", "model")
    assert {k: getattr(eff, k) for k in kept} == {k: getattr(run, k) for k in kept}
    assert (eff.epochs, eff.resume, notes) == (3, True, [])
    eff = effective_config(*parse_args(["--out", str(out), "--resume", "--epochs", "3", "--batch-size", "4",
                                        "--grad-clip", "0.5"]), notes=notes)
    assert (eff.batch_size, eff.grad_clip, eff.steps_per_epoch) == (4, 0.5, 3)
    assert notes == ["--resume: --batch-size 4 (the run had 2)"]


def test_resume_of_a_run_whose_data_folder_moved(folder, tmp_path, capsys):
    """The stored data folder is gone: one line saying how to give its new place; given so (the
    same image ids) the run resumes from there; other images are refused."""
    import shutil
    from training.cli import parse_args
    from training.config import ConfigError
    from training.settings import effective_config

    images, labels = folder
    out = tmp_path / "run"
    run = effective_config(*parse_args(["--image-dir", str(images), "--label-dir", str(labels), "--out", str(out),
                                        *TINY, "--epochs", "1", "--no-figures"]))
    _last_ckpt(out, run, architecture_checked=True)
    moved = tmp_path / "moved"
    shutil.move(str(images.parent), str(moved))
    with pytest.raises(ConfigError, match=r"^--image-dir: the run's .* is not there any more; .*--resume "
                                          r"--image-dir NEW --label-dir NEW"):
        effective_config(*parse_args(["--out", str(out), "--resume", "--epochs", "2"]))
    notes = []
    eff = effective_config(*parse_args(["--out", str(out), "--resume", "--epochs", "2", "--image-dir",
                                        str(moved / "images"), "--label-dir", str(moved / "labels")]), notes=notes)
    assert (eff.image_dir, eff.label_dir) == (str(moved / "images"), str(moved / "labels"))
    assert len(notes) == 1 and f"--image-dir {moved / 'images'} (the run had {images})" in notes[0]


@pytest.mark.slow
def test_resume_with_only_out_and_epochs_gives_the_uninterrupted_numbers(folder, tmp_path, capsys, monkeypatch):
    """`--epochs 2`, then `--out RUN --resume --epochs 3`, with flags off their defaults: epoch 3
    has the train loss of 3 uninterrupted epochs; with --steps-per-epoch every training image
    is loaded over the epochs."""
    from training import dataset

    images, labels = folder
    flags = ["--image-dir", str(images), "--label-dir", str(labels), *TINY, "--batch-size", "2", "--crop-size", "64",
             "--steps-per-epoch", "1",
             "--scale-range", "0.8", "1.25", "--grad-clip", "0.5", "--no-figures", "--no-tune-thresholds",
             "--val-fraction", "0.2"]
    loaded = []
    getitem = dataset.InstanceDataset.__getitem__

    def record(self, key):
        if isinstance(key, tuple):
            loaded.append(self.samples[key[1] % len(self.samples)].image_id)
        return getitem(self, key)

    monkeypatch.setattr(dataset.InstanceDataset, "__getitem__", record)
    assert main([*flags, "--out", str(tmp_path / "whole"), "--epochs", "3"]) == 0
    assert len(set(loaded)) == 4  # 4 training images, 1 step x batch 2 per epoch: all of them by epoch 2
    assert main([*flags, "--out", str(tmp_path / "cut"), "--epochs", "2"]) == 0
    capsys.readouterr()
    assert main(["--out", str(tmp_path / "cut"), "--resume", "--epochs", "3"]) == 0
    assert "--resume:" not in capsys.readouterr().err  # nothing changed, nothing said
    whole, cut = rows(tmp_path / "whole"), rows(tmp_path / "cut")
    print("epoch-3 train loss: uninterrupted", whole[2]["train_loss"], "resumed", cut[2]["train_loss"])
    assert [r["train_loss"] for r in cut] == [r["train_loss"] for r in whole]
    assert [r["val_loss"] for r in cut] == [r["val_loss"] for r in whole]
