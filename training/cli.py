"""``cellseg-train`` / ``python -m training`` / ``torchrun --nproc_per_node=N -m training``.

Flags are generated 1:1 from ``TrainConfig`` (and ``ModelConfig`` for the architecture):
``--field-name``; booleans get ``--x/--no-x``. Bad input -> one clear line, exit code 2.

Example (cellpose/stardist-style folders, small CPU demo model)::

    cellseg-train --image-dir data/images --label-dir data/labels --out runs/demo \\
        --backbone convnext_atto --fpn-channels 64 --mask-head-channels 64 --box-head-size 256 \\
        --crop-size 256 --steps-per-epoch 200 --scale-range 0.5 2.0 --epochs 30
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from napari_cellseg.model.maskrcnn import ModelConfig

from .config import CHOICES, HELP, ConfigError, TrainConfig

_SKIP = {"model"}
_MODEL_SKIP = {"num_classes"}  # always 2 (background + cell)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_field(group, name: str, default, dest: str) -> None:
    help_ = HELP.get(name, name.replace("_", " "))
    kw = dict(dest=dest, default=argparse.SUPPRESS)
    if isinstance(default, bool):
        if name == "resume":
            group.add_argument(_flag(name), action="store_true", help=help_, **kw)
        else:
            group.add_argument(_flag(name), action=argparse.BooleanOptionalAction,
                               help=f"{help_} (default: {default})", **kw)
    elif isinstance(default, tuple):
        typ = int if all(isinstance(v, int) for v in default) else float
        nargs = "+" if name in ("anchor_sizes", "aspect_ratios") else len(default)
        group.add_argument(_flag(name), type=typ, nargs=nargs, metavar="V",
                           help=f"{help_} (default: {' '.join(map(str, default))})", **kw)
    elif isinstance(default, (int, float)):
        group.add_argument(_flag(name), type=type(default), metavar=type(default).__name__.upper(),
                           help=f"{help_} (default: {default})", **kw)
    else:
        choices = CHOICES.get(name)
        metavar = None if choices else ("imagenet|random|FILE" if name == "backbone_weights" else "PATH"
                                        if name not in ("device", "backbone") else name.upper())
        group.add_argument(_flag(name), type=str, choices=choices, metavar=metavar,
                           help=help_ + (f" (default: {default})" if default else ""), **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cellseg-train",
        description="Fine-tune the napari-cellseg Mask R-CNN (Kaggle Sartorius starter recipe: AdamW, "
                    "ReduceLROnPlateau on val loss, gradient clipping, AMP: bf16 or fp16 + GradScaler on CUDA). Writes OUT/best_model.bin "
                    "(lowest val loss, or best val mAP), OUT/last.ckpt (for --resume), OUT/log.csv, "
                    "OUT/loss.png and OUT/figures/*.png. Multi-GPU: torchrun --nproc_per_node=N -m training ...",
    )
    tg = p.add_argument_group("training")
    for f in dataclasses.fields(TrainConfig):
        if f.name not in _SKIP:
            _add_field(tg, f.name, getattr(TrainConfig(), f.name), f.name)
    mg = p.add_argument_group("model architecture (stored in the checkpoint)")
    for f in dataclasses.fields(ModelConfig):
        if f.name not in _MODEL_SKIP:
            _add_field(mg, f.name, getattr(ModelConfig(), f.name), "model." + f.name)
    return p


def parse_args(argv=None) -> tuple[TrainConfig, frozenset[str]]:
    """The TrainConfig and the names of the fields the user gave (``"model.NAME"`` for the
    architecture): ``settings.effective_config`` derives only what was not given."""
    ns = vars(build_parser().parse_args(argv))  # flags default to SUPPRESS: only the given ones
    model_kw = {k[6:]: (tuple(v) if isinstance(v, list) else v) for k, v in ns.items() if k.startswith("model.")}
    train_kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in ns.items() if not k.startswith("model.")}
    return TrainConfig(**train_kw, model=ModelConfig(**model_kw)), frozenset(ns)


def _interrupted(config: TrainConfig, started: float) -> str:
    """What a Ctrl-C leaves: the --resume hint only when OUT/last.ckpt holds an epoch of this
    run (or the run being resumed)."""
    last = os.path.join(config.out, "last.ckpt")
    try:
        ours = config.resume or os.stat(last).st_mtime >= started - 1.0
    except OSError:
        ours = False
    if ours and os.path.isfile(last):
        return f"interrupted; the last finished epoch is in {last} (continue with --resume)"
    return (f"interrupted before the first epoch finished; nothing to resume ({last} was not written): "
            "run the same command again, without --resume")


def main(argv=None) -> int:
    started = time.time()
    quiet = int(os.environ.get("RANK", "0")) != 0  # torchrun: rank 0 alone reports
    state: dict = {"bar": None}
    config = None
    try:  # Ctrl-C anywhere from here on, also during the torch import in _run: one line, no traceback
        config, given = parse_args(argv)
        return _run(config, given, quiet, state)
    except KeyboardInterrupt:
        if state["bar"] is not None:
            state["bar"].close()
        if not quiet:
            print(f"cellseg-train: {_interrupted(config, started) if config else 'interrupted'}", file=sys.stderr)
        _forget_interrupt()
        return 130


def _forget_interrupt() -> None:
    """Make a caught Ctrl-C exit with 130 under ``python -m training`` (and torchrun) too.

    CPython marks a KeyboardInterrupt that leaves code run from a *string* (``exec``/``eval`` of
    source: dataclasses, namedtuple and typing generate methods that way during our imports) as
    unhandled, even when a caller catches it; under ``-m`` the interpreter then ends by killing
    itself with SIGINT (exit -2) instead of our ``return 130``. Every string ``exec`` clears that
    mark when it starts, so running an empty one forgets it. The console script is not affected.
    """
    exec("")  # noqa: S102 -- constant, empty source


def _done_line(summary: dict) -> str:
    """"done; best model: OUT/best_model.bin" only when that file exists; otherwise what does."""
    best = summary["best_model"]
    if os.path.isfile(best):
        return f"done; best model: {best}"
    out = summary["out"]
    kept = [name for name in ("last.ckpt", "log.csv") if os.path.isfile(os.path.join(out, name))]
    return (f"done; {best} does not exist (no epoch that updated the weights had a finite validation "
            f"score, or the file was removed); {out} holds {', '.join(kept) or 'no checkpoint'}")


def _run(config: TrainConfig, given: frozenset, quiet: bool, state: dict) -> int:
    from napari_cellseg.model.maskrcnn import BackboneError
    from tqdm import tqdm

    from .data import DataError
    from .engine import train
    from .runstate import OutputError, SaveError

    healthy = True
    try:
        config.check_backbone()  # the timm name lookup (slow: not in validate(), which the widget runs)
        gen = train(config, given=given)  # validates the effective config before any work
        try:
            for ev in gen:
                stage = ev["stage"]
                bar = state["bar"]
                if quiet:
                    continue
                if stage == "config":
                    print(f"cellseg-train: effective config (amp {ev['amp']} on {ev['device']}): "
                          f"{json.dumps(ev['config'], separators=(',', ':'))}", file=sys.stderr)
                elif stage == "setup":
                    print(f"cellseg-train: {ev['message']}", file=sys.stderr)
                elif stage == "warning":
                    (tqdm.write if bar is not None else print)(f"cellseg-train: warning: {ev['message']}",
                                                               file=sys.stderr)
                elif stage in ("train", "val"):
                    if bar is None or ev["step"] == 1:
                        if bar is not None:
                            bar.close()
                        bar = state["bar"] = tqdm(total=ev["total"], desc=f"epoch {ev['epoch']} {stage}", leave=False,
                                                  dynamic_ncols=True, mininterval=1.0)
                    bar.update(1)
                    if stage == "train" and (ev["step"] % 5 == 0 or ev["step"] == ev["total"]):
                        bar.set_postfix(loss=f"{ev['loss']:.3f}", stepped=f"{ev['optimizer_steps']}/{ev['step']}",
                                        nonfinite=ev["skipped"], scaler_skip=ev["scaler_skipped"])
                elif stage == "epoch":
                    if bar is not None:
                        bar.close()
                        state["bar"] = None
                    r = ev["row"]
                    if r["epoch"] == 0:
                        tqdm.write(f"epoch 0 (the --init-checkpoint model): val loss {r['val_loss']:.4f}  val mAP "
                                   f"{r['val_map']:.3f}")
                        continue
                    skips = "" if r["optimizer_steps"] == r["steps"] else (
                        f"  stepped {r['optimizer_steps']}/{r['steps']} ({r['skipped_batches']} non-finite, "
                        f"{r['scaler_skipped']} scaler-skipped)")
                    tqdm.write(f"epoch {r['epoch']}/{ev['epochs']}: train loss {r['train_loss']:.4f}  val loss "
                               f"{r['val_loss']:.4f}  val mAP {r['val_map']:.3f} (box_conf {r['box_conf']}, mask "
                               f"{r['mask_threshold']})  lr {r['lr']:.2e}  {r['time_s']:.0f}s (val {r['val_s']:.1f}s, "
                               f"save {r['save_s']:.1f}s){skips}{'  *best*' if r['best'] else ''}")
                elif stage == "done":
                    healthy = ev.get("healthy", True)
                    if healthy:
                        print(f"cellseg-train: {_done_line(ev)}", file=sys.stderr)
        finally:  # Ctrl-C in this loop: the engine's pending checkpoint writes finish before the message
            gen.close()
    except (ConfigError, DataError, OutputError, BackboneError, ValueError, FileNotFoundError) as exc:
        if state["bar"] is not None:
            state["bar"].close()
            state["bar"] = None
        print(f"cellseg-train: error: {exc}", file=sys.stderr)
        return 2
    except SaveError as exc:  # a full disk while saving: the earlier files are kept
        if state["bar"] is not None:
            state["bar"].close()
            state["bar"] = None
        print(f"cellseg-train: error: {exc}", file=sys.stderr)
        return 1
    if not healthy:
        print("cellseg-train: error: the optimizer never stepped, the weights did not change (see log.csv)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
