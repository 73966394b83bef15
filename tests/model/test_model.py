"""ModelConfig / build_model: timm features_only backbone + FPN + torchvision Mask R-CNN."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from napari_cellseg.model.maskrcnn import BackboneError, ModelConfig, build_model  # noqa: E402

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
    from napari_cellseg.model.checkpoint import load_checkpoint, save_checkpoint

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


def _fb_names(sd):
    """timm ConvNeXt names -> the original facebookresearch/ConvNeXt release's."""
    import re

    out = {}
    for k, v in sd.items():
        k = re.sub(r"^stem\.", "downsample_layers.0.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.", r"stages.\1.", k)
        k = k.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        k = k.replace("head.norm.", "norm.").replace("head.fc.", "head.")
        out[k] = v
    return out


def test_backbone_weights_file_must_hold_this_backbone(tmp_path):
    """red team 5: any file was accepted (timm's features_only load is not strict) and the run
    silently trained from random weights. Now every backbone weight must be in the file with
    its shape; the one-line refusal says how many matched."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(2)
    ref = timm.create_model("convnext_atto", pretrained=False)
    sd = ref.state_dict()
    n = len(build_model(ModelConfig(**TINY), backbone_weights="random").backbone.body.state_dict())
    cases = {
        "foreign.bin": ({"foo": torch.zeros(3)}, f"matches 0 of {n} backbone weights"),
        "partial.pth": ({k: v for k, v in sd.items() if k != "stages.2.blocks.1.conv_dw.bias"},
                        f"matches {n - 1} of {n} backbone weights.*stages.2.blocks.1.conv_dw.bias"),
        "femto.pth": (timm.create_model("convnext_femto").state_dict(),
                      r"stem.0.weight is \(48, 3, 4, 4\), the model needs \(40, 3, 4, 4\)"),
        "nan.pth": ({**sd, "stem.0.bias": torch.full_like(sd["stem.0.bias"], float("nan"))}, "NaN"),
    }
    for name, (weights, message) in cases.items():
        torch.save(weights, tmp_path / name)
        with pytest.raises(BackboneError, match=f"{name}: .*{message}"):
            build_model(ModelConfig(**TINY), backbone_weights=tmp_path / name)
    # accepted: timm's nesting ({"model": ...}), safetensors, the original ConvNeXt names
    torch.save({"model": sd}, tmp_path / "nested.pth")
    save_file(sd, str(tmp_path / "atto.safetensors"))
    torch.save({"model": _fb_names(sd)}, tmp_path / "fb.pth")
    for name in ("nested.pth", "atto.safetensors", "fb.pth"):
        body = build_model(ModelConfig(**TINY), backbone_weights=tmp_path / name).backbone.body
        assert torch.equal(body.stages_3.blocks[1].mlp.fc2.weight, ref.stages[3].blocks[1].mlp.fc2.weight), name
        assert torch.equal(body.stem_0.weight, ref.stem[0].weight), name


@pytest.mark.slow
def test_default_convnext_tiny_builds():
    model = build_model()
    n = sum(p.numel() for p in model.parameters())
    assert 30e6 < n < 60e6
    assert model.roi_heads.detections_per_img == 500
    assert model.transform.min_size == (520,) and model.transform.max_size == 704


# ---- ModelConfig validation ------------------------------------------------------
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
    from napari_cellseg.model.maskrcnn import ConfigError

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
    from napari_cellseg.model.maskrcnn import ConfigError

    with pytest.raises(ConfigError, match="backbone: 'convnext_tinyy' is not a timm model name known locally"):
        ModelConfig.from_dict({"backbone": "convnext_tinyy"})
    assert ModelConfig.from_dict({"backbone": "convnext_atto.d2_in1k"}).backbone == "convnext_atto.d2_in1k"
    with pytest.raises(ConfigError, match="must be a mapping"):
        ModelConfig.from_dict(["backbone"])


def test_weight_estimate_counts_the_network_build_model_makes():
    """The size check counts from the config alone; it is exact for what build_model builds."""
    from napari_cellseg.model.maskrcnn import ModelConfig, build_model, weight_estimate

    from conftest import TINY_MODEL

    for config in (ModelConfig(**TINY_MODEL), ModelConfig(**{**TINY_MODEL, "mask_head_layers": 2,
                                                                "aspect_ratios": (1.0,), "num_classes": 3})):
        model = build_model(config)
        assert weight_estimate(config)["total"] == sum(p.numel() for p in model.parameters())


def test_a_network_too_large_is_refused_before_it_is_built(monkeypatch):
    """convnext_xxlarge (~3.4 GiB of float32 weights), or heads too wide together: ConfigError
    naming the parts and the limit, from the config alone (build_backbone is never reached)."""
    from napari_cellseg.model import maskrcnn
    from napari_cellseg.model.maskrcnn import ConfigError, ModelConfig, build_model

    monkeypatch.setattr(maskrcnn, "build_backbone", lambda *a, **k: pytest.fail("built"))
    with pytest.raises(ConfigError, match=r"^backbone: convnext_xxlarge .* makes 8\d\dM weights \(backbone 843M"
                                          r".*GiB in float32.*the limit is 1 GiB"):
        build_model(ModelConfig(backbone="convnext_xxlarge"))
    with pytest.raises(ConfigError, match=r"^box_head_size: convnext_atto with .*box_head 222M, mask_head 42M\)"):
        ModelConfig.from_dict({"backbone": "convnext_atto", "fpn_channels": 1024, "box_head_size": 4096,
                               "mask_head_channels": 1024})
    ModelConfig.from_dict({"backbone": "convnext_large"})  # 0.81 GiB: allowed


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_precision_means_one_thing_per_device_for_training_and_inference(monkeypatch, has_bf16):
    """"auto": bf16 on a CUDA GPU with bfloat16, fp16 on an older one, float32 on CPU, whether
    training (--amp auto) or predicting (precision auto) asks; inference said fp16 on every GPU."""
    from napari_cellseg.inference.runner import _resolve_precision
    from napari_cellseg.model import devices
    from training.loops import resolve_amp

    monkeypatch.setattr(devices, "cuda_has_bf16", lambda device: has_bf16)
    gpu, cpu = torch.device("cuda:0"), torch.device("cpu")
    assert devices.auto_precision(gpu) == resolve_amp("auto", gpu) == _resolve_precision("auto", gpu) \
        == ("bf16" if has_bf16 else "fp16")
    assert devices.auto_precision(cpu) == resolve_amp("auto", cpu) == "off" and _resolve_precision("auto", cpu) == "fp32"
    assert [devices.amp_mode(v) for v in (True, False, "bf16")] == ["auto", "off", "bf16"]


def test_one_config_error_class():
    from napari_cellseg.model.maskrcnn import ConfigError
    from training.config import ConfigError as TrainConfigError, TrainConfig

    assert TrainConfigError is ConfigError
    with pytest.raises(ConfigError, match="^--epochs: must be >= 1"):
        TrainConfig(epochs=0).validate()
