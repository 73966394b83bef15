"""Safe checkpoints: round trip, bare state_dict, malicious pickles refused, clear errors."""

from __future__ import annotations

import os
import pickle

import pytest

torch = pytest.importorskip("torch")

from napari_cellseg.model.checkpoint import (CheckpointError, load_checkpoint, read_checkpoint, resolve_checkpoint, save_checkpoint)
from napari_cellseg.model.maskrcnn import ModelConfig, build_model  # noqa: E402

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
    with pytest.raises(CheckpointError) as info:  # torch's paragraph of advice is cut to its first sentence
        load_checkpoint(cut)
    assert "If you are seeing this error" not in str(info.value) and len(str(info.value)) < len(str(cut)) + 160


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
    from napari_cellseg.model.checkpoint import bundled_model_path
    if bundled_model_path().is_file():
        assert resolve_checkpoint(None) == bundled_model_path()
    else:
        with pytest.raises(CheckpointError, match="bundled demo model"):
            resolve_checkpoint(None)


# ---- the checkpoint schema is validated before anything is built -----------------
def _variant(tiny, tmp_path, name, **changes):
    """A copy of the tiny checkpoint with top-level keys (or config.KEY) replaced."""
    _, _, path = tiny
    obj = torch.load(path, weights_only=True)
    for key, value in changes.items():
        if key.startswith("config_"):
            obj["config"] = dict(obj["config"], **{key[len("config_"):]: value})
        else:
            obj[key] = value
    out = tmp_path / name
    torch.save(obj, out)
    return out


BAD_CHECKPOINTS = {
    "unknown backbone": (dict(config_backbone="no_such_net"),
                         "config.backbone: 'no_such_net' is not a timm model name known locally"),
    "int backbone": (dict(config_backbone=5), "config.backbone: must be a timm model name, got int"),
    "hf-hub backbone": (dict(config_backbone="hf-hub:someone/evil-model"),
                        "config.backbone: 'hf-hub:someone/evil-model' is not a local timm model name"),
    "url backbone": (dict(config_backbone="https://example.com/x.bin"), "config.backbone: .* not a local"),
    "string config": (dict(config="convnext_tiny"), "config: must be a mapping, got str"),
    "list thresholds": (dict(thresholds=[0.5, 0.5]), "thresholds: must be a mapping, got list"),
    "word threshold": (dict(thresholds={"box_conf": "high"}), r"thresholds: box_conf must be a number in \[0, 1\]"),
    "nan threshold": (dict(thresholds={"mask_threshold": float("nan")}), "thresholds: mask_threshold must be"),
    "list info": (dict(info=[1, 2]), "info: must be a mapping, got list"),
    "string state_dict": (dict(state_dict="weights"), "state_dict: must be a mapping of names to tensors, got str"),
    "huge fpn": (dict(config_fpn_channels=10**9), r"config.fpn_channels: must be an integer in \[1, 1024\], got 1000000000"),
    "deep mask head": (dict(config_mask_head_layers=10**6), r"config.mask_head_layers: must be an integer in \[1, 16\]"),
    "float fpn": (dict(config_fpn_channels=32.5), "config.fpn_channels: must be an integer"),
    "word diameter": (dict(config_diameter="forty"), r"config.diameter: must be a finite number >= 0, got 'forty'"),
    "negative diameter": (dict(config_diameter=-3.0), "config.diameter: must be a finite number >= 0"),
    "nan diameter": (dict(config_diameter=float("nan")), "config.diameter: must be a finite number >= 0"),
    "zero std": (dict(config_image_std=[0.2, 0.0, 0.2]), "config.image_std: must be 3 finite numbers > 0"),
    "anchors": (dict(config_anchor_sizes=[16, 32]), "config.anchor_sizes: must be 5 integers"),
    # a checkpoint of another format version was loaded as if it were version 1 (the field was never read)
    "newer format": (dict(format="napari-cellseg/2"), "format: 'napari-cellseg/2' was written by another "
                     "napari-cellseg version \\(this one reads 'napari-cellseg/1'\\)"),
    "newer dotted format": (dict(format="napari-cellseg/2.0"), "format: 'napari-cellseg/2.0' was written by "
                            "another napari-cellseg version"),
    "foreign format": (dict(format="detectron2/1"), "format: 'detectron2/1' is not a napari-cellseg checkpoint format"),
    "int format": (dict(format=7), "format: 7 is not a napari-cellseg checkpoint format"),
}


def test_additions_of_the_same_format_version_load(tiny, tmp_path):
    """Within format napari-cellseg/1 a newer writer's extra keys (top level, config, thresholds)
    are ignored; no format key at all (a hand-made dict) loads too. Only another version is refused."""
    _, config, path = tiny
    raw = torch.load(path, weights_only=True)
    raw.pop("format")
    raw.update(new_top_level=1, config=dict(raw["config"], new_field=3),
               thresholds=dict(raw["thresholds"], new_threshold=0.1))
    torch.save(raw, tmp_path / "newer.bin")
    _, cfg, thresholds, _ = load_checkpoint(tmp_path / "newer.bin")
    assert cfg == config and thresholds == {"box_conf": 0.6, "mask_threshold": 0.5, "min_area": 5}


def test_raw_readers_check_the_format(tiny, tmp_path):
    """cellseg-train --resume (runstate.read_resume) and --init-checkpoint (settings reading the
    architecture) read raw checkpoint dicts: another format version is refused there too."""
    from training.runstate import read_resume
    from training.settings import _checkpoint_config

    newer = _variant(tiny, tmp_path, "newer.bin", format="napari-cellseg/2")
    with pytest.raises(CheckpointError, match="written by another napari-cellseg version"):
        _checkpoint_config(newer)
    last = _variant(tiny, tmp_path, "last.ckpt", format="napari-cellseg/2", optimizer={}, scheduler={},
                    epoch=1, history=[])
    with pytest.raises(CheckpointError, match="written by another napari-cellseg version"):
        read_resume(last)


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_contents_refused_before_building(tiny, tmp_path, monkeypatch, case):
    """One CheckpointError 'FILE: field: problem'; no model is built, nothing is fetched."""
    import timm

    import napari_cellseg.model.checkpoint as ckpt_mod

    changes, problem = BAD_CHECKPOINTS[case]
    path = _variant(tiny, tmp_path, "bad ckpt.bin", **changes)

    def no_build(*args, **kwargs):
        raise AssertionError("a model was built from an invalid checkpoint")

    monkeypatch.setattr(ckpt_mod, "build_model", no_build)
    monkeypatch.setattr(timm, "create_model", no_build)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    import re
    assert re.search(problem, message), message


def test_non_finite_weights_refused(tiny, tmp_path):
    model, _, _ = tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["roi_heads.box_predictor.cls_score.weight"][0, 0] = float("nan")
    path = _variant(tiny, tmp_path, "nan.bin", state_dict=state)
    with pytest.raises(CheckpointError, match=r"nan.bin: state_dict: 'roi_heads.box_predictor"
                                              r".cls_score.weight' holds non-finite values"):
        load_checkpoint(path)
    state = {k: v for k, v in model.state_dict().items()}
    state["extra"] = "not a tensor"
    path = _variant(tiny, tmp_path, "str.bin", state_dict=state)
    with pytest.raises(CheckpointError, match="state_dict: 'extra' is str, not a tensor"):
        load_checkpoint(path)


def test_plain_text_file_is_named(tmp_path):
    """A text file 'hello' gave 'KeyError: 101'."""
    path = tmp_path / "hello.bin"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match=r"hello.bin: not a readable PyTorch checkpoint "
                                              r"\(neither a zip archive nor a pickle\)"):
        read_checkpoint(path)
    path.write_bytes(b"\x80\x02hello")  # looks like a pickle, is not one
    with pytest.raises(CheckpointError, match="hello.bin: not a readable PyTorch checkpoint"):
        read_checkpoint(path)


def test_valid_checkpoint_thresholds_checked_and_kept(tiny, tmp_path):
    path = _variant(tiny, tmp_path, "ok.bin", thresholds={"box_conf": 0.7, "fill_holes": True})
    _, _, thresholds, _ = load_checkpoint(path)
    assert thresholds == {"box_conf": 0.7, "mask_threshold": 0.5, "min_area": 0, "fill_holes": True}


def test_code_version_names_this_checkout_only(tmp_path, monkeypatch):
    """info["code"] of a trained checkpoint: the commit of THIS project's checkout, or None
    (a wheel; or installed inside some other git repository: its commit would be a lie)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import napari_cellseg
    from napari_cellseg.model.checkpoint import code_version

    root = Path(napari_cellseg.__file__).resolve().parents[1]
    found = code_version()
    assert found["package"] == napari_cellseg.__version__
    if shutil.which("git") is None or not (root / ".git").exists():
        assert found["git_commit"] is None
    else:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        assert found["git_commit"] == head and isinstance(found["git_dirty"], bool)
    # a copy of the package inside another repository: no commit claimed
    other = tmp_path / "other"
    shutil.copytree(root / "napari_cellseg", other / "site" / "napari_cellseg",
                    ignore=shutil.ignore_patterns("models", "__pycache__", "data"))
    if shutil.which("git"):
        subprocess.run(["git", "init", "-q", str(other)], check=True)
    out = subprocess.run([sys.executable, "-c", "from napari_cellseg.model.checkpoint import code_version as c; print(c())"],
                         cwd=other / "site", capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(other / "site")})
    assert out.returncode == 0, out.stderr
    assert "'git_commit': None" in out.stdout and "'git_dirty': None" in out.stdout


def test_checkpoint_naming_a_huge_backbone_is_refused_before_building(tmp_path, monkeypatch):
    """A schema-valid checkpoint whose config names convnext_xxlarge: CheckpointError naming the
    file, the size and the limit, without building the network (it used to take 12.5 s and 4 GB)."""
    import torch

    from napari_cellseg.model import maskrcnn
    from napari_cellseg.model.checkpoint import CheckpointError, FORMAT, load_checkpoint
    from napari_cellseg.model.maskrcnn import ModelConfig

    path = tmp_path / "huge.bin"
    torch.save({"format": FORMAT, "config": ModelConfig(backbone="convnext_xxlarge").to_dict(),
                "state_dict": {"w": torch.zeros(2_000_000)}, "thresholds": {}, "info": {}}, path)
    monkeypatch.setattr(maskrcnn, "build_backbone", lambda *a, **k: pytest.fail("built"))
    with pytest.raises(CheckpointError, match=rf"^{path}: config\.backbone: convnext_xxlarge .*the limit is 1 GiB"):
        load_checkpoint(path)
