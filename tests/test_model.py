"""ModelConfig / build_model: timm features_only backbone + FPN + torchvision Mask R-CNN."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from napari_cellseg.model import BackboneError, ModelConfig, build_model  # noqa: E402

TINY = dict(backbone="convnext_atto", fpn_channels=32, mask_head_channels=32, box_head_size=128,
            min_size=96, max_size=128, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=100)


def test_config_round_trip_through_plain_dict():
    config = ModelConfig(**TINY, anchor_sizes=(8, 16, 32, 64, 128))
    d = config.to_dict()
    assert all(not isinstance(v, tuple) for v in d.values())  # weights_only-safe builtins
    assert ModelConfig.from_dict(d) == config
    with pytest.warns(UserWarning, match="unknown"):
        assert ModelConfig.from_dict({**d, "bogus": 1}) == config


def test_defaults_follow_the_starter():
    c = ModelConfig()
    assert (c.backbone, c.num_classes, c.min_size, c.max_size, c.box_detections_per_img) == (
        "convnext_tiny", 2, 520, 704, 500)


def test_tiny_model_trains_and_predicts():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY))
    assert model.backbone.out_channels == 32
    images = [torch.rand(3, 96, 112)]
    masks = torch.zeros(1, 96, 112, dtype=torch.uint8)
    masks[0, 20:40, 30:60] = 1
    targets = [{"boxes": torch.tensor([[30.0, 20.0, 59.0, 39.0]]), "labels": torch.tensor([1]),
                "masks": masks}]
    model.train()
    losses = model(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.inference_mode():
        out = model(images)[0]
    assert out["masks"].shape[1:] == (1, 96, 112) and len(out["boxes"]) <= 500


def test_bad_anchor_sizes_rejected():
    with pytest.raises(ValueError, match="anchor_sizes"):
        build_model(ModelConfig(**{**TINY, "anchor_sizes": (16, 32)}))


def test_imagenet_weights_without_network_fail_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here anyway; offline just fails fast
    hub = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    with pytest.raises(BackboneError, match="could not download ImageNet weights.*--backbone-weights FILE.*"
                                            "--backbone-weights random"):
        build_model(ModelConfig(**TINY), backbone_weights="imagenet")


def test_loading_a_checkpoint_never_downloads(tmp_path, monkeypatch):
    import timm
    from napari_cellseg.checkpoint import load_checkpoint, save_checkpoint

    config = ModelConfig(**TINY)
    save_checkpoint(tmp_path / "m.bin", build_model(config, backbone_weights="random"), config)
    real = timm.create_model
    calls = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: calls.append(k.get("pretrained")) or real(*a, **k))
    load_checkpoint(tmp_path / "m.bin")
    assert calls == [False]


def test_backbone_weights_from_local_file(tmp_path):
    import timm

    torch.manual_seed(1)
    ref = timm.create_model("convnext_atto", pretrained=False)
    torch.save(ref.state_dict(), tmp_path / "atto.pth")
    model = build_model(ModelConfig(**TINY), backbone_weights=tmp_path / "atto.pth")
    body = model.backbone.body
    assert torch.equal(body.stem_0.weight, ref.stem[0].weight)
    with pytest.raises(BackboneError, match="not found"):
        build_model(ModelConfig(**TINY), backbone_weights=tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="junk.pth"):
        build_model(ModelConfig(**TINY), backbone_weights=tmp_path / "junk.pth")


@pytest.mark.slow
def test_default_convnext_tiny_builds():
    model = build_model()
    n = sum(p.numel() for p in model.parameters())
    assert 30e6 < n < 60e6
    assert model.roi_heads.detections_per_img == 500
    assert model.transform.min_size == (520,) and model.transform.max_size == 704


# ---- issue 15, D9: ModelConfig validation ------------------------------------------------------
@pytest.mark.parametrize("field, value, problem", [
    ("fpn_channels", 0, r"fpn_channels: must be an integer in \[1, 1024\], got 0"),
    ("fpn_channels", True, "fpn_channels: must be an integer"),
    ("num_classes", 1, r"num_classes: must be an integer in \[2, "),
    ("box_detections_per_img", 10**9, "box_detections_per_img: must be an integer"),
    ("box_nms_thresh", 1.5, r"box_nms_thresh: must be a number in \[0, 1\]"),
    ("aspect_ratios", (0.5, -1.0), "aspect_ratios: must be 1 to 16 finite numbers > 0"),
    ("image_mean", (0.5, 0.5), "image_mean: must be 3 finite numbers"),
    ("native_scale", "yes", "native_scale: must be true or false"),
    ("backbone", "hf-hub:a/b", "backbone: 'hf-hub:a/b' is not a local timm model name"),
    ("diameter", float("inf"), "diameter: must be a finite number >= 0"),
])
def test_config_fields_validated(field, value, problem):
    from napari_cellseg.model import ConfigError

    with pytest.raises(ConfigError, match=problem):
        ModelConfig(**{**TINY, field: value}).validate()
    with pytest.raises(ConfigError, match=problem):
        ModelConfig.from_dict({**ModelConfig(**TINY).to_dict(), field: value})


def test_validate_normalises_and_returns_self():
    config = ModelConfig(**{**TINY, "anchor_sizes": [8, 16, 32, 64, 128], "diameter": 30})
    assert config.validate() is config
    assert config.anchor_sizes == (8, 16, 32, 64, 128) and config.diameter == 30.0
    assert ModelConfig().validate() == ModelConfig()


def test_from_dict_checks_backbone_against_local_timm_names():
    from napari_cellseg.model import ConfigError

    with pytest.raises(ConfigError, match="backbone: 'convnext_tinyy' is not a timm model name known locally"):
        ModelConfig.from_dict({"backbone": "convnext_tinyy"})
    assert ModelConfig.from_dict({"backbone": "convnext_atto.d2_in1k"}).backbone == "convnext_atto.d2_in1k"
    with pytest.raises(ConfigError, match="must be a mapping"):
        ModelConfig.from_dict(["backbone"])
