"""Which settings a training run uses: its *effective config* (``effective_config``).

A run's effective config is made of
  * the given flags (``training.cli.parse_args`` says which were given; the Python API and the
    widget: the fields that differ from the defaults, ``given_fields``), on top of the
    ``TrainConfig`` defaults;
  * on ``--resume`` (OUT/last.ckpt exists): every setting of the run as it started, from
    last.ckpt's ``train_config`` and its model ``config`` (``_resumed_config``); only a GIVEN
    ``config.RESUME_MAY_CHANGE`` flag (how long and on what the remaining epochs train) changes
    one (said in one line), data folders may be given in a new place (``RESUME_MAY_MOVE``),
    init_checkpoint and backbone_weights are ignored, any other given flag with another value is a
    ``ConfigError`` naming both values;
  * when fine-tuning (``--init-checkpoint``): that checkpoint's architecture (a given architecture
    flag with another value is a ``ConfigError``; only ``--diameter`` may be given) and its
    diameter, at native size (width = height = 0) when that checkpoint is native-scale or
    normalises cell size and neither --width nor --height was given;
plus what the run derives (``model.native_scale``; path fields stored absolute, so a resume works
from any folder). ``_architecture_conflict`` is the one rule for the architecture flags, at a
fine-tune start and on --resume. ``training.engine.train`` runs the result.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import RESUME_MAY_CHANGE, RESUME_MAY_MOVE, ConfigError, TrainConfig


def _checkpoint_config(path) -> tuple[dict, dict]:
    """(model config, image input) stored in a checkpoint: the input rule (intensity, channel,
    channel2, invert) of its ``info.train_config``, only the fields it stores."""
    from dataclasses import fields

    from napari_cellseg.model.checkpoint import read_checkpoint, stored_train_config
    from napari_cellseg.options import ImageInput

    obj = read_checkpoint(path)
    if not isinstance(obj, dict):
        return {}, {}
    stored = stored_train_config(obj.get("info"))
    image_input = {k: stored[k] for k in (f.name for f in fields(ImageInput)) if k in stored}
    ImageInput.from_dict(image_input, where=f"{path}: info.train_config")  # a bad value: one line
    return obj.get("config", {}), image_input


_PATH_FIELDS = ("train_csv", "images", "image_dir", "label_dir", "init_checkpoint", "backbone_weights")
_RESUME_IGNORES = ("init_checkpoint", "backbone_weights")
"""Given on --resume, these are neither compared nor used: they only chose the run's start."""
_FINE_TUNE_FREE = ("diameter", "native_scale")
"""Model fields a fine-tuning run may set itself (``--diameter``; native_scale is derived); every
other architecture field is the --init-checkpoint's."""
ARCH_CHECKED = "architecture_checked"
"""last.ckpt key (``engine.train`` writes it True into every new last.ckpt): the run was started
under the fine-tune architecture rule (a given architecture flag that differed from
--init-checkpoint's was refused). Older fine-tune runs silently took the checkpoint's
architecture over the given flags, so their resume does not compare those flags."""


def _shown(value) -> str:
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value))
    return "none" if value is None else str(value)


def _abspath(value):
    return os.path.abspath(os.path.expanduser(str(value))) if value else value


def _stored_paths_absolute(cfg: TrainConfig, only_existing: bool = False) -> None:
    """Path fields as absolute paths (config.json / train_config), so --resume works from any
    folder; ``only_existing``: a relative path that does not exist from here stays as it is."""
    for name in _PATH_FIELDS:
        value = getattr(cfg, name)
        if value and not (name == "backbone_weights" and value in ("imagenet", "random")) \
                and not (only_existing and not os.path.exists(os.path.expanduser(value))):
            setattr(cfg, name, _abspath(value))


def _same(name: str, a, b) -> bool:
    if name in _PATH_FIELDS and a and b:
        return os.path.realpath(os.path.expanduser(str(a))) == os.path.realpath(os.path.expanduser(str(b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return list(a) == list(b)
    return a == b


def _same_stored_path(given, stored) -> bool:
    """A run stored before paths were made absolute keeps them as typed (relative to where it was
    started): from another folder, a given path that exists and ends with the stored one is it."""
    if _same("image_dir", given, stored):
        return True
    stored_p, given_p = Path(os.path.expanduser(str(stored))), Path(_abspath(given))
    return (not stored_p.is_absolute() and not stored_p.exists() and given_p.exists()
            and given_p.parts[-len(stored_p.parts):] == stored_p.parts)


def _architecture_conflict(given, mine, theirs, free=()):
    """The first architecture flag of ``given`` ("model.NAME") whose value in ``mine`` differs from
    ``theirs`` (both ModelConfig), as (flag, mine, theirs); None when all agree. The one rule for
    the architecture flags of a fine-tuning start (against --init-checkpoint) and of --resume
    (against the run's model)."""
    for name in sorted(n[6:] for n in given if n.startswith("model.")):
        a, b = getattr(mine, name, None), getattr(theirs, name, None)
        if name not in free and not _same(name, a, b):
            return "--" + name.replace("_", "-"), a, b
    return None


def _resumed_config(cfg: TrainConfig, given: set[str], last: Path, notes: list | None = None) -> TrainConfig:
    """The run's config from ``last`` (its train_config and model). Of ``cfg`` only the given
    fields are taken: RESUME_MAY_CHANGE ones and moved data folders (RESUME_MAY_MOVE), each
    change said in one line appended to ``notes``; any other given field that disagrees with
    the run -> ConfigError naming both values."""
    from napari_cellseg.model.maskrcnn import ModelConfig

    from .runstate import read_last

    obj = read_last(last)
    model = ModelConfig.from_dict(obj.get("config") or {})
    saved = obj.get("train_config")
    if not isinstance(saved, dict):  # no run settings stored: the caller's, with the run's model
        cfg.model = model
        _stored_paths_absolute(cfg)
        return cfg.validate()
    run = TrainConfig.from_dict(saved)
    run.model = model
    try:
        run.validate()
    except ConfigError as exc:  # written by an older version that did not validate the whole config
        raise ConfigError(f"{last}: its run settings are not valid ({exc}): start a new run with "
                          f"--init-checkpoint {last} --out NEW") from None
    # a fine-tune run started before the architecture rule took --init-checkpoint's architecture
    # over any given flags: repeating that first command must not be refused for them
    old_fine_tune = bool(saved.get("init_checkpoint")) and not obj.get(ARCH_CHECKED)
    conflict = None if old_fine_tune else _architecture_conflict(given, cfg.model, model)
    if conflict:
        _refuse_on_resume(last, *conflict)
    changed = _take_given(cfg, run, given, last)
    _stored_paths_absolute(run, only_existing=True)
    _check_data_there(run, given)
    if changed and notes is not None:
        notes.append("--resume: " + ", ".join(changed))
    return run.validate()


def _refuse_on_resume(last: Path, flag: str, mine, theirs):
    may = ", ".join("--" + n.replace("_", "-") for n in RESUME_MAY_CHANGE if n not in ("out", "resume"))
    raise ConfigError(f"{flag}: the run in {last.parent} was started with {_shown(theirs)}, got "
                      f"{_shown(mine)}; --resume continues it as it started (only {may} may change): "
                      f"drop {flag}, or start a new run in another --out")


_SOURCES = (("train_csv", "images"), ("image_dir", "label_dir"))


def _take_given(cfg: TrainConfig, run: TrainConfig, given: set[str], last: Path) -> list[str]:
    """Copy the given fields a resume may change (RESUME_MAY_CHANGE, RESUME_MAY_MOVE) from
    ``cfg`` into ``run``; refuse any other given field that differs. A moved data source drops
    the other kind of source (a --train-csv run resumed from folders). Returns "--flag NEW (the
    run had OLD)" for each changed value (--epochs and --out are the resume's own)."""
    changed, moved = [], set()
    for name in sorted(given):
        if name.startswith("model.") or name in _RESUME_IGNORES or not hasattr(run, name):
            continue
        mine, theirs = getattr(cfg, name), getattr(run, name)
        same = (_same_stored_path(mine, theirs) if name in RESUME_MAY_MOVE and mine and theirs
                else _same(name, mine, theirs))
        if not same and name not in RESUME_MAY_CHANGE and name not in RESUME_MAY_MOVE:
            _refuse_on_resume(last, "--" + name.replace("_", "-"), mine, theirs)
        if not same and name not in ("out", "resume", "epochs"):
            changed.append(f"--{name.replace('_', '-')} {_shown(mine)} (the run had {_shown(theirs)})")
            moved |= {name} & set(RESUME_MAY_MOVE)
        if name in RESUME_MAY_MOVE and not mine:
            continue  # an empty path is no new place
        setattr(run, name, mine)  # (a path given from where it resolves: the same folder)
    for source in _SOURCES:
        if moved and not moved & set(source):
            for name in source:
                setattr(run, name, None)
    run.out, run.resume, run.epochs = cfg.out, True, cfg.epochs  # the resume's own, always
    return changed


def _check_data_there(run: TrainConfig, given: set[str]) -> None:
    """A stored data folder that is gone (moved): one line saying how to give its new place."""
    for name in RESUME_MAY_MOVE:
        value = getattr(run, name)
        if value and name not in given and not os.path.exists(os.path.expanduser(value)):
            flags = ("--image-dir NEW --label-dir NEW" if run.image_dir else "--train-csv NEW.csv --images NEW")
            raise ConfigError(f"--{name.replace('_', '-')}: the run's {value} is not there any more; if the "
                              f"data moved, add its new place to the resume: --resume {flags} (the same "
                              f"images: their ids are checked)")


def given_fields(config: TrainConfig) -> set[str]:
    """For callers that do not say which settings they chose (the Python API, the widget): the
    fields that differ from the defaults (``"model.NAME"`` for the architecture)."""
    import dataclasses
    from napari_cellseg.model.maskrcnn import ModelConfig

    d0, m0 = TrainConfig(), ModelConfig()
    given = {f.name for f in dataclasses.fields(config)
             if f.name != "model" and getattr(config, f.name) != getattr(d0, f.name)}
    return given | {"model." + f.name for f in dataclasses.fields(config.model)
                    if getattr(config.model, f.name) != getattr(m0, f.name)}


def effective_config(config: TrainConfig, given=None, notes: list | None = None) -> TrainConfig:
    """A validated COPY of ``config`` with what the run derives filled in (the caller's object is
    never changed): native_scale when training at native size; on --resume the model config of
    OUT/last.ckpt (``_resumed_config``); when fine-tuning the architecture of --init-checkpoint
    (a given architecture flag with another value -> ConfigError, ``_architecture_conflict``; its
    diameter unless --diameter is given), at native size (width = height = 0) when that checkpoint
    is native-scale or normalises cell size and neither --width nor --height was given. Path
    fields are stored absolute (a resume works from any folder).

    ``given``: the names of the fields the user set (``training.cli.parse_args``); None = those
    that differ from the defaults (``given_fields``). The derived config is validated as a whole,
    so a conflict left (e.g. an explicit --width 704 --height 520 with a checkpoint's --diameter)
    is one ConfigError before anything is written."""
    import copy
    from napari_cellseg.model.maskrcnn import ModelConfig

    cfg = copy.deepcopy(config)
    given = given_fields(cfg) if given is None else set(given)
    last = Path(cfg.out) / "last.ckpt"
    if cfg.resume and last.is_file():  # a resumed run goes on with the settings it started with
        return _resumed_config(cfg, given, last, notes)
    _stored_paths_absolute(cfg)
    if cfg.init_checkpoint:  # fine-tuning keeps the checkpoint's architecture and input rule
        src, image_input = _checkpoint_config(cfg.init_checkpoint)
        # the input the model was trained on (channels, intensity), unless the run gives its own
        inherited = {k: v for k, v in image_input.items() if k not in given and getattr(cfg, k) != v}
        for name, value in inherited.items():
            setattr(cfg, name, value)
        if inherited and notes is not None:
            notes.append("--init-checkpoint: the model's input kept ("
                         + ", ".join(f"{k} {v}" for k, v in inherited.items()) + ")")
        diameter = cfg.model.diameter or float(src.get("diameter") or 0.0)
        if src:
            conflict = _architecture_conflict(given, cfg.model, ModelConfig.from_dict(src), _FINE_TUNE_FREE)
            if conflict:
                flag, mine, theirs = conflict
                raise ConfigError(f"{flag}: the --init-checkpoint {cfg.init_checkpoint} was trained with "
                                  f"{_shown(theirs)}, got {_shown(mine)}; fine-tuning keeps its architecture "
                                  f"(only --diameter may be given): drop {flag}")
            cfg.model = ModelConfig.from_dict(src)
        cfg.model.diameter = diameter
        if ((src.get("native_scale") or diameter) and not cfg.crop_size
                and not {"width", "height"} & given):  # the checkpoint was trained at native scale
            cfg.width = cfg.height = 0
        # what this run does: a model trained on resized images must be resized by predict too
        cfg.model.native_scale = bool(cfg.crop_size or not (cfg.width and cfg.height))
    elif cfg.crop_size or not (cfg.width and cfg.height):
        cfg.model.native_scale = True  # trained on native-scale pixels: predict must not rescale either
    return cfg.validate()
