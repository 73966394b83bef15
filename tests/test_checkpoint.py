"""Safe checkpoints: round trip, bare state_dict, malicious pickles refused, clear errors."""

from __future__ import annotations

import os
import pickle

import pytest

torch = pytest.importorskip("torch")

from napari_cellseg.checkpoint import (  # noqa: E402
    CheckpointError, load_checkpoint, read_checkpoint, resolve_checkpoint, save_checkpoint)
from napari_cellseg.model import ModelConfig, build_model  # noqa: E402

TINY = dict(backbone="convnext_atto", fpn_channels=32, mask_head_channels=32, box_head_size=128,
            min_size=96, max_size=128)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    config = ModelConfig(**TINY)
    model = build_model(config).eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.bin"
    save_checkpoint(path, model, config, thresholds={"box_conf": 0.6, "min_area": 5},
                    info={"epoch": 3, "val_map": 0.25})
    return model, config, path


def test_round_trip(tiny):
    model, config, path = tiny
    loaded, cfg, thresholds, info = load_checkpoint(path)
    assert cfg == config
    assert thresholds == {"box_conf": 0.6, "mask_threshold": 0.5, "min_area": 5}
    assert info == {"epoch": 3, "val_map": 0.25}
    assert not loaded.training
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    raw = torch.load(path, weights_only=True)  # the format is plain weights_only data
    assert raw["format"] == "napari-cellseg/1" and raw["config"]["backbone"] == "convnext_atto"


def test_bare_state_dict_loads_with_config_from_arguments(tiny, tmp_path):
    model, config, _ = tiny
    bare = tmp_path / "bare.pth"
    torch.save(model.state_dict(), bare)
    loaded, cfg, thresholds, info = load_checkpoint(bare, config=config)
    assert cfg == config and thresholds["box_conf"] == 0.5 and "bare" in info["note"]
    k = "roi_heads.mask_predictor.mask_fcn_logits.weight"
    assert torch.equal(loaded.state_dict()[k], model.state_dict()[k])
    with pytest.raises(CheckpointError, match="bare.pth"):  # default (convnext_tiny) config: no fit
        load_checkpoint(bare)


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EVIL_MARKER']}",))


def test_malicious_pickle_is_refused_and_not_run(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    path = tmp_path / "evil.bin"
    torch.save({"state_dict": {}, "config": Evil()}, path)  # torch.save pickles the class ref
    with open(tmp_path / "plain.pkl", "wb") as fh:
        pickle.dump(Evil(), fh)
    for p in (path, tmp_path / "plain.pkl"):
        with pytest.raises(CheckpointError, match="refused|not a readable"):
            load_checkpoint(p)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(path)
    assert not marker.exists()


def test_truncated_foreign_empty_missing(tiny, tmp_path):
    _, _, path = tiny
    cut = tmp_path / "cut.bin"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (tmp_path / "foreign.bin").write_text("id,predicted\na,1 2\n")
    (tmp_path / "empty.bin").write_bytes(b"")
    torch.save({"epoch": 1, "lr": 0.1}, tmp_path / "other.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    cases = {"cut.bin": "truncated", "foreign.bin": "not a readable", "empty.bin": "empty",
             "missing.bin": "not found", "other.pt": "not a napari-cellseg checkpoint",
             "list.pt": "expected a dict"}
    for name, msg in cases.items():
        with pytest.raises(CheckpointError, match=msg) as info:
            load_checkpoint(tmp_path / name)
        assert str(info.value).startswith(str(tmp_path / name)) and "\n" not in str(info.value)


def test_mismatched_keys_are_listed(tiny, tmp_path):
    model, config, _ = tiny
    state = dict(model.state_dict())
    del state["roi_heads.box_head.fc6.weight"]
    state["extra.layer.weight"] = torch.zeros(1)
    save_checkpoint(tmp_path / "m.bin", model, config)
    obj = torch.load(tmp_path / "m.bin", weights_only=True)
    obj["state_dict"] = state
    torch.save(obj, tmp_path / "m.bin")
    with pytest.raises(CheckpointError, match=r"missing keys \[roi_heads.box_head.fc6.weight\]; "
                                              r"unexpected keys \[extra.layer.weight\]"):
        load_checkpoint(tmp_path / "m.bin")


def test_shape_mismatch_is_a_checkpoint_error(tiny, tmp_path):
    model, config, _ = tiny
    other = ModelConfig(**{**TINY, "box_head_size": 64})
    save_checkpoint(tmp_path / "m.bin", model, config)
    obj = torch.load(tmp_path / "m.bin", weights_only=True)
    obj["config"] = other.to_dict()
    torch.save(obj, tmp_path / "m.bin")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path / "m.bin")


def test_save_is_atomic_and_unwraps_module(tiny, tmp_path):
    model, config, _ = tiny

    class Wrapper(torch.nn.Module):  # like DistributedDataParallel: .module
        def __init__(self, m):
            super().__init__()
            self.module = m
    save_checkpoint(tmp_path / "w.bin", Wrapper(model), config)
    assert not any(k.startswith("module.") for k in read_checkpoint(tmp_path / "w.bin")["state_dict"])
    assert [p.name for p in tmp_path.iterdir()] == ["w.bin"]  # no temp file left behind


def test_resolve_checkpoint(tmp_path):
    assert resolve_checkpoint(tmp_path / "x.bin") == tmp_path / "x.bin"
    from napari_cellseg.checkpoint import bundled_model_path
    if bundled_model_path().is_file():
        assert resolve_checkpoint(None) == bundled_model_path()
    else:
        with pytest.raises(CheckpointError, match="bundled demo model"):
            resolve_checkpoint(None)
