"""Backbone weights from a local file (``--backbone-weights FILE``): read the file (safetensors
or PyTorch, ``torch.load(weights_only=True)`` through timm's reader), map its names onto a timm
``features_only`` body and load it only when every weight is there with its shape and finite
values; else one ``BackboneError`` line naming the file.

``model.build_backbone`` calls :func:`load_backbone_file`; "imagenet" / "random" weights are
``model``'s (timm's own download, or none). torch and timm are imported inside the functions:
importing this module stays cheap.
"""

from __future__ import annotations

from pathlib import Path


class BackboneError(RuntimeError):
    """Backbone weights could not be built or loaded (a weights file here; the ImageNet download
    in ``model``, which uses this class: ``napari_cellseg.model.maskrcnn.BackboneError`` is the same)."""


def first_line(exc: BaseException) -> str:
    """An exception's first line (at most 200 characters), for one-line messages."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _read_weights_file(path: Path) -> dict:
    """name -> tensor from a weights file: safetensors (``.safetensors``) or a PyTorch file read
    with ``torch.load(weights_only=True)``; timm's reader (EMA / ``state_dict`` / ``model``
    nesting and DDP prefixes handled as timm does). BackboneError when unreadable."""
    import torch
    from timm.models import load_state_dict

    if path.name.endswith(".safetensors"):
        try:
            import safetensors.torch  # noqa: F401
        except ImportError:
            raise BackboneError(f"{path}: reading .safetensors needs the safetensors package "
                                "(pip install safetensors), or pass the PyTorch .pth/.bin file") from None
    try:
        sd = load_state_dict(str(path), use_ema=True, device="cpu", weights_only=True)
    except Exception as exc:  # not a weights file, a pickle that needs code, truncated ...
        raise BackboneError(f"{path}: not a readable weights file ({first_line(exc)})") from None
    tensors = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise BackboneError(f"{path}: holds no weights (no name -> tensor mapping)")
    return tensors


def _source_names(full, body_keys) -> dict[str, list[str]]:
    """For each key of a timm ``features_only`` body, the candidate names of the same tensor in
    the plain model's state_dict (what weights files hold): timm's feature wrapper flattens the
    first level of ``nn.Sequential`` children, ``stem.0`` -> ``stem_0``."""
    from torch import nn

    prefix = {}
    for name, module in full.named_children():
        prefix.setdefault(name, name)
        if isinstance(module, nn.Sequential):
            for child, _ in module.named_children():
                prefix.setdefault(f"{name}_{child}", f"{name}.{child}")
    out = {}
    for key in body_keys:
        head, _, rest = key.partition(".")
        mapped = prefix.get(head, head) + (f".{rest}" if rest else "")
        out[key] = list(dict.fromkeys([mapped, key, key.removeprefix("model.")]))
    return out


def load_backbone_file(body, backbone: str, path: str | Path) -> int:
    """Load ImageNet (or any) weights of timm model ``backbone`` from a local file into ``body``
    (a timm ``features_only`` model). Every parameter and buffer of ``body`` must be in the file
    with the right shape and finite values (the classifier head, which ``features_only`` drops,
    may be there or not); else BackboneError ``FILE: matches k of n backbone weights ...``.
    Original (non-timm) checkpoints are converted by the timm model's own filter. Returns n."""
    import inspect

    import timm
    import torch
    from timm.models import model_entrypoint

    path = Path(path)
    sd = _read_weights_file(path)
    body_sd = body.state_dict()
    full = timm.create_model(backbone, pretrained=False)  # the names weights files use
    names = _source_names(full, body_sd)

    def match(weights):
        got, wrong = {}, []
        for key, target in body_sd.items():
            src = next((n for n in names[key] if n in weights), None)
            if src is None:
                continue
            if tuple(weights[src].shape) != tuple(target.shape):
                wrong.append(f"{src} is {tuple(weights[src].shape)}, the model needs {tuple(target.shape)}")
            else:
                got[key] = weights[src]
        return got, wrong

    got, wrong = match(sd)
    filter_fn = getattr(inspect.getmodule(model_entrypoint(backbone.split(".")[0])), "checkpoint_filter_fn", None)
    if len(got) < len(body_sd) and filter_fn is not None:  # e.g. the original ConvNeXt release
        try:
            converted = filter_fn(dict(sd), full)
        except Exception:  # the filter does not know this file either
            converted = None
        if isinstance(converted, dict):
            got2, wrong2 = match(converted)
            if len(got2) > len(got):
                got, wrong = got2, wrong2
    del full
    n = len(body_sd)
    if len(got) < n:
        first = next((k for k in body_sd if k not in got), "")
        why = wrong[0] if wrong else f"no {names[first][0]}"
        hint = (" (it is a napari-cellseg checkpoint: fine-tune it with --init-checkpoint)"
                if any(k.startswith("backbone.body.") for k in sd) else "")
        raise BackboneError(f"{path}: matches {len(got)} of {n} backbone weights of timm model "
                            f"{backbone!r} ({why}){hint}; pass this backbone's ImageNet weights file, "
                            "or --backbone-weights imagenet / random")
    bad = next((k for k, v in got.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise BackboneError(f"{path}: backbone weight {bad} holds NaN or infinite values")
    body.load_state_dict(got, strict=True)
    return n
