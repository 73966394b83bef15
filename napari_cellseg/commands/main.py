"""The ``cellseg`` command line: ``cellseg predict | to-labels | to-csv | evaluate ...``.

Adding a sub-command: write ``_add_xxx(subparsers)`` that creates the parser and calls
``parser.set_defaults(func=_cmd_xxx)``, write ``_cmd_xxx(args) -> int``, and append
``_add_xxx`` to ``COMMANDS``. Import heavy modules (torch, ...) inside ``_cmd_xxx`` only: the
file commands here must stay torch-free. Any ValueError / OSError (CsvError, ImageError,
CheckpointError, ...) raised by a command becomes one line on stderr,
``cellseg <cmd>: error: <message>``, and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

from napari_cellseg.options import PRECISIONS, valid_diameter

__all__ = ["main", "build_parser", "COMMANDS"]


# ---- shared helpers --------------------------------------------------------------------------
def _shape_arg(text: str) -> tuple[int, int]:
    """argparse type for ``HxW`` (height x width), e.g. ``520x704``."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        if h > 0 and w > 0:
            return h, w
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 520x704, got {text!r}")


def _progress(iterable=None, **kwargs):
    """tqdm bar on stderr (hidden when stderr is not a terminal)."""
    from tqdm import tqdm

    kwargs.setdefault("unit", "image")
    return tqdm(iterable, file=sys.stderr, disable=None, dynamic_ncols=True, **kwargs)


# the file helpers live in files.py (tune_cmd and batch use them too)
from napari_cellseg.io.files import LabelFiles as _LabelFiles  # noqa: E402
from napari_cellseg.io.files import files_by_id as _files_by_id  # noqa: E402
from napari_cellseg.io.files import image_shape as _image_shape  # noqa: E402
from napari_cellseg.io.files import label_source as _label_source  # noqa: E402
from napari_cellseg.io.files import check_not_inputs as _check_not_inputs  # noqa: E402
from napari_cellseg.io.files import label_tiff_path as _label_tiff_path  # noqa: E402
from napari_cellseg.io.files import write_label_tiff as _write_label_tiff  # noqa: E402
from napari_cellseg.io.files import refuse_existing_files  # noqa: E402




def _safe_id(image_id: str) -> str:
    if not image_id or image_id in (".", "..") or any(c in image_id for c in '/\\:\0'):
        raise ValueError(f"image id {image_id!r} cannot be used as a file name")
    return image_id


# ---- to-labels -------------------------------------------------------------------------------
def _add_to_labels(subparsers) -> None:
    p = subparsers.add_parser(
        "to-labels", help="annotation CSV -> one label TIFF per image",
        description="Decode an annotation / submission CSV into one label TIFF per image id "
                    "(uint16, or int32 above 65535 cells). Image sizes come from the CSV's "
                    "width/height columns, else from --shape, else from the matching images.")
    p.add_argument("annotations", help="train.csv-style, Kaggle (id,predicted) or starter CSV")
    p.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--shape", type=_shape_arg, metavar="HxW",
                      help="image size (height x width) when the CSV has no width/height")
    size.add_argument("--images", metavar="DIR",
                      help="folder of the original images (file stem = image id) for the sizes")
    p.add_argument("--overwrite", action="store_true",
                   help="replace label files that exist in --out (without it: exit 2, naming one)")
    p.set_defaults(func=_cmd_to_labels)


def _cmd_to_labels(args) -> int:
    from napari_cellseg.io.annotations import NO_ROWS, read_annotations

    ann = read_annotations(args.annotations)
    if not ann.ids:
        print(f"cellseg to-labels: {args.annotations} {NO_ROWS}: no label image to write", file=sys.stderr)
    images = _files_by_id([args.images], "images") if args.images else {}
    shapes = {}
    for image_id in ann.ids:  # check every size and every row before writing anything
        _safe_id(image_id)
        shape = None
        if ann.shape(image_id) is None and args.shape:
            shape = args.shape
        elif ann.shape(image_id) is None and images:
            if image_id not in images:
                raise ValueError(f"no image for id {image_id!r} in {args.images}")
            shape = _image_shape(images[image_id])  # the header only: no pixels decoded
        shapes[image_id] = ann.check(image_id, shape)  # CsvError naming the file and row
    targets = [_label_tiff_path(args.out, i) for i in ann.ids]
    _check_not_inputs(targets, images.values(), f"--out {args.out}")
    if not args.overwrite:  # label files may be ground truth; the folder may be the image folder
        refuse_existing_files(targets, f"--out {args.out}", "--overwrite to replace them")
    args.out.mkdir(parents=True, exist_ok=True)
    for image_id in _progress(ann.ids, desc="to-labels"):
        _write_label_tiff(_label_tiff_path(args.out, image_id), ann.labels(image_id, shapes[image_id]))
    print(f"wrote {len(ann.ids)} label images to {args.out}")
    return 0


# ---- to-csv ----------------------------------------------------------------------------------
def _add_to_csv(subparsers) -> None:
    p = subparsers.add_parser(
        "to-csv", help="label images -> annotation CSV",
        description="Encode label images (file stem = image id) as one CSV row per cell.")
    p.add_argument("labels", nargs="+", help="label image files and/or folders of them")
    p.add_argument("--out", required=True, type=Path, help="CSV file to write (atomically)")
    p.add_argument("--format", choices=("kaggle", "starter", "train"),
                   help="kaggle: id,predicted; starter: idx,id,annotation; "
                        "train: id,annotation,width,height (default: kaggle; with --merge the "
                        "format of --out)")
    p.add_argument("--merge", action="store_true",
                   help="keep rows of other images already in --out, replace these images' rows")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --out that holds rows (without it or --merge: exit 2)")
    p.set_defaults(func=_cmd_to_csv)


def _cmd_to_csv(args) -> int:
    from napari_cellseg.io.annotations import csv_format, refuse_replacing, write_annotations

    skipped: list[str] = []  # names that cannot be CSV ids: reported (one line each) before any read
    files = _files_by_id(args.labels, "label images", skipped)
    _check_not_inputs([args.out], files.values(), "--out", "file")
    fmt = args.format or (csv_format(args.out, "kaggle") if args.merge else "kaggle")
    if not (args.merge or args.overwrite):  # (checked again under the lock, before the write)
        refuse_replacing(args.out, "--merge to replace only these images' rows, or --overwrite")
    labels = _LabelFiles(files)  # label stacks: one id per plane (stack_000 ..), as predict names them
    with _progress(total=len(labels), desc="to-csv") as bar:
        labels.bar = bar
        write_annotations(args.out, labels, format=fmt, merge=args.merge, overwrite=args.overwrite)
    print(f"wrote {len(labels)} images to {args.out} ({fmt} format)")
    if labels.intensity_like:  # a folder of raw images given as labels: every grey value a "cell"
        image_id, share = next(iter(labels.intensity_like.items()))
        print(f"cellseg to-csv: warning: {len(labels.intensity_like)} of {len(labels)} files look like raw "
              f"images, not label images (e.g. {labels.files[image_id][0]}: the id changes between "
              f"{share:.0%} of neighbouring pixels; in a label image each cell is one id): every grey "
              f"value became a cell; give the label images", file=sys.stderr)
    if skipped:
        print(f"cellseg to-csv: {len(skipped)} of {len(files) + len(skipped)} label images skipped "
              "(file names that are not UTF-8)", file=sys.stderr)
        return 1
    return 0


# ---- evaluate --------------------------------------------------------------------------------
def _add_evaluate(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="Kaggle mAP of predictions against ground truth",
        description="Score predictions with the Kaggle Sartorius metric (mean over IoU "
                    "0.50:0.05:0.95 of TP/(TP+FP+FN)). Every image in GT is scored; a missing "
                    "prediction counts as an empty one (0 when GT has cells), so a predictions CSV "
                    "with a header and no rows is a valid empty submission. Sizes for a CSV "
                    "without width/height come from the ground truth.")
    p.add_argument("--gt", required=True, help="ground truth: annotation CSV or label folder")
    p.add_argument("--pred", required=True, help="predictions: CSV (any format) or label folder")
    p.add_argument("--shape", type=_shape_arg, metavar="HxW",
                   help="image size when the ground truth CSV has no width/height")
    p.add_argument("--iou", type=float, default=0.5,
                   help="IoU threshold for the TP/FP/FN counts (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead")
    p.set_defaults(func=_cmd_evaluate)


def _predicted(pred, image_id, shape):
    """One image's prediction: each row of a CSV its own mask (metrics.MaskSet: a duplicate or an
    overlapping row is a prediction of its own), a label image as it is."""
    from napari_cellseg.inference.metrics import MaskSet
    from napari_cellseg.io.annotations import Annotations

    if isinstance(pred, Annotations):
        pred.check(image_id, shape)  # sizes and RLEs, naming the row
        return MaskSet.from_rles(pred.rles(image_id), shape)
    return pred.labels(image_id, shape)


def _cmd_evaluate(args) -> int:
    import numpy as np

    from napari_cellseg.inference.metrics import MaskSet, evaluate_image
    from napari_cellseg.io.annotations import NO_ROWS

    gt, pred = _label_source(args.gt), _label_source(args.pred)
    if not gt.ids:
        raise ValueError(f"{args.gt} {NO_ROWS}: no ground truth to score against")
    results, missing, overlapping = [], [], {}
    for image_id in _progress(gt.ids, desc="evaluate"):
        gt_labels = gt.labels(image_id, gt.shape(image_id) or args.shape)
        if image_id in pred:
            predicted = _predicted(pred, image_id, gt_labels.shape)
            if isinstance(predicted, MaskSet) and predicted.overlapping():
                overlapping[image_id] = predicted.overlapping()
        else:
            missing.append(image_id)
            predicted = np.zeros_like(gt_labels)
        score = evaluate_image(gt_labels, predicted, iou=args.iou)
        results.append({"id": image_id, **score.to_dict()})
    extra = [i for i in pred.ids if i not in gt]
    mean = float(np.mean([r["map"] for r in results]))
    if not pred.ids:  # a valid empty submission (every image failed in `cellseg predict`)
        print(f"cellseg evaluate: note: {args.pred} {NO_ROWS}: every image scored as an empty "
              "prediction", file=sys.stderr)
    if overlapping:
        first = next(iter(overlapping))
        print(f"cellseg evaluate: note: {sum(overlapping.values())} predicted masks overlap another mask "
              f"in {len(overlapping)} images (e.g. {first!r}); each is scored as its own prediction "
              f"(the competition refused submissions with overlapping masks)", file=sys.stderr)
    if args.json:
        json.dump({"mean_map": mean, "n_images": len(results), "iou": args.iou,
                   "images": results, "missing_predictions": missing,
                   "extra_predictions": extra, "overlapping_masks": overlapping}, sys.stdout, indent=1)
        print()
        return 0
    width = max(8, *(len(r["id"]) for r in results))
    print(f"{'image':<{width}}  {'mAP':>6}  {'gt':>5}  {'pred':>5}  {'TP':>5}  {'FP':>5}  {'FN':>5}")
    for r in results:
        print(f"{r['id']:<{width}}  {r['map']:6.4f}  {r['n_gt']:5d}  {r['n_pred']:5d}  "
              f"{r['tp']:5d}  {r['fp']:5d}  {r['fn']:5d}")
    print(f"mean mAP over {len(results)} images: {mean:.4f}  (TP/FP/FN at IoU > {args.iou})")
    if missing and pred.ids:
        print(f"note: {len(missing)} images had no prediction (scored as empty)", file=sys.stderr)
    if extra:
        print(f"note: {len(extra)} predicted images are not in the ground truth (ignored)",
              file=sys.stderr)
    return 0


# ---- demo (napari front end; the code lives in _demo.py) ------------------------------------
def _add_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="open napari with a sample image and the Segment cells widget",
        description="Open napari with a sample image (or --image FILE) and the 'Segment cells' "
                    "widget docked, the bundled demo model pre-selected when installed.")
    p.add_argument("--sample", choices=["nuclei", "cells"], default="nuclei",
                   help="packaged sample image to open (default: nuclei)")
    p.add_argument("--image", type=Path, help="open this image file instead of a sample")
    p.add_argument("--checkpoint", type=Path, help="pre-select this checkpoint in the widget")
    p.add_argument("--no-run", action="store_true",
                   help="set everything up but do not enter the event loop (for tests)")
    p.add_argument("--screenshot", type=Path, metavar="PNG",
                   help="press Segment, save a screenshot of the window to PNG and exit")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from napari_cellseg.gui.demo import run_demo

    run_demo(sample=args.sample, checkpoint=args.checkpoint, image=args.image,
             run=not args.no_run, screenshot=args.screenshot)
    return 0


# ---- predict (the logic lives in batch.py) ---------------------------------------------------
def _diameter_arg(text: str):
    if text == "auto":
        return "auto"
    value = valid_diameter(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"expected a diameter in pixels > 0 or 'auto', got {text!r}")
    return value


def _add_size_options(p) -> None:
    size = p.add_mutually_exclusive_group()
    size.add_argument("--diameter", type=_diameter_arg, metavar="PX|auto",
                      help="typical object diameter in image pixels: images are resized so objects "
                           "have the size the model was trained at (like cellpose's diameter); "
                           "'auto' estimates it per image from a first pass. Default: auto for "
                           "size-normalised models (the demo model), else --scale 1")
    size.add_argument("--scale", type=float,
                      help="resize images by this factor before the network instead (> 1 for small objects)")


def _add_predict(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="segment images with a checkpoint -> submission CSV",
        description="Run the Mask R-CNN once per image and write one CSV row per cell (id = "
                    "file stem; an image with no cell still gets its row). Thresholds default to "
                    "the checkpoint's. A multi-page TIFF gives one id per plane, <stem>_<plane> "
                    "(zero-padded, 3 digits). Rows stream to the CSV (atomic rewrites); a bad "
                    "image is reported and skipped: exit 1 if any failed, 2 on usage errors. "
                    "Under torchrun each rank takes files[rank::world] and rank 0 writes the CSV.")
    _add_run_options(p, "CSV file to write (atomically)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    p.add_argument("--format", choices=("kaggle", "starter"),
                   help="kaggle: id,predicted; starter: idx,id,annotation (default: kaggle; with "
                        "--resume the format of --out)")
    p.add_argument("--labels-dir", type=Path, help="also write one label TIFF per image here")
    p.add_argument("--resume", action="store_true",
                   help="skip image ids already in --out (or in its journal after a crash); the rows "
                        "of --out are kept except those of images predicted again")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --out that holds rows and existing label TIFFs in --labels-dir "
                        "(without it the run stops, naming the file)")
    p.set_defaults(func=_cmd_predict)


def _add_run_options(p, out_help: str) -> None:
    """The flags of every command that runs the network over image files (predict, rank): the
    images, --out, the checkpoint, threshold / size / input overrides, device, precision, tiles.
    They become one PredictOptions (PredictOptions.from_args)."""
    p.add_argument("images", nargs="+", help="image files and/or folders of images")
    p.add_argument("--out", required=True, type=Path, help=out_help)
    p.add_argument("--checkpoint", type=Path, help="checkpoint (default: the bundled demo model)")
    p.add_argument("--box-conf", type=float, help="keep detections scoring at least this")
    p.add_argument("--mask-threshold", type=float, help="mask probability threshold")
    p.add_argument("--min-area", type=int, help="drop cells smaller than this many pixels")
    _add_postprocess_options(p)
    _add_size_options(p)
    _add_input_options(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32; bf16 autocast (CPUs with native bf16); fp16 autocast (CUDA)")
    p.add_argument("--tile-size", type=int, metavar="PX",
                   help="predict images larger than PX network pixels in overlapping tiles "
                        "(default 1024; 0 = never tile; smaller = less memory)")
    p.add_argument("--tile-overlap", type=int, metavar="PX",
                   help="tile overlap in network pixels, >= the largest cell (default 128)")


def _add_input_options(p) -> None:
    """How images become the model's input (options.ImageInput; the rule: io/images.py). Every
    flag defaults to what the checkpoint was trained with."""
    p.add_argument("--channel", type=int, metavar="N",
                   help="cell channel, numbered from 1 as in cellpose (0 = all channels: grey or RGB "
                        "as they are, the mean of other channel counts). Default: the checkpoint's (0)")
    p.add_argument("--channel2", type=int, metavar="N",
                   help="optional nuclear channel (0 = none): the cell channel goes to the model's "
                        "red + green inputs, this one to blue. Default: the checkpoint's (0)")
    p.add_argument("--invert", action=argparse.BooleanOptionalAction, default=None,
                   help="invert the cell channel (dark cells on a bright background). Default: the checkpoint's")
    p.add_argument("--intensity", choices=("percentile", "raw"),
                   help="percentile: each channel's 1st-99th percentile -> 0-1 (cellpose's normalize99, "
                        "every dtype); raw: the dtype's range (8-bit / 255). Default: the checkpoint's "
                        "(percentile)")


def _add_postprocess_options(p) -> None:
    p.add_argument("--fill-holes", action=argparse.BooleanOptionalAction, default=None,
                   help="fill the background holes inside each cell (default: the checkpoint's)")
    p.add_argument("--keep-largest", action=argparse.BooleanOptionalAction, default=None,
                   help="keep only the largest piece of each cell (default: the checkpoint's)")


def _cmd_predict(args) -> int:
    from napari_cellseg.commands.predict import run_predict
    from napari_cellseg.options import PredictOptions

    return run_predict(PredictOptions.from_args(args), args.images, args.out, fmt=args.format,
                       labels_dir=args.labels_dir, resume=args.resume, progress_factory=_progress,
                       overwrite=args.overwrite)


# ---- tune (the logic lives in tune_cmd.py) --------------------------------------------------
def _add_tune(subparsers) -> None:
    p = subparsers.add_parser(
        "tune", help="choose box_conf / mask_threshold by mAP against ground truth",
        description="Run the network once per image with ground truth (image id = file stem in "
                    "--images), score every box_conf x mask_threshold pair of a grid from the "
                    "kept output (no re-run), print the best pair and the mAP table. --write "
                    "stores the best pair in the checkpoint.")
    p.add_argument("--checkpoint", type=Path, help="checkpoint (default: the bundled demo model)")
    p.add_argument("--gt", required=True, help="ground truth: annotation CSV or label folder")
    p.add_argument("--images", required=True, help="folder of the images (file stem = image id)")
    grid = p.add_mutually_exclusive_group()
    grid.add_argument("--grid", type=int, metavar="N",
                      help="N x N grid of bin centres in (0, 1) (default: 10 -> 0.05 .. 0.95)")
    grid.add_argument("--box-confs", type=float, nargs="+", metavar="C", help="box_conf values")
    p.add_argument("--mask-thresholds", type=float, nargs="+", metavar="T",
                   help="mask_threshold values (with --box-confs; default 0.05 .. 0.95)")
    p.add_argument("--min-area", type=int, help="drop cells smaller than this (default: checkpoint's)")
    _add_postprocess_options(p)
    _add_size_options(p)
    _add_input_options(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda ... (default: auto)")
    p.add_argument("--json", action="store_true",
                   help='print {"box_conf", "mask_threshold", "map", "table": [...]} as JSON')
    p.add_argument("--write", action="store_true", help="store the best pair in the checkpoint")
    p.set_defaults(func=_cmd_tune)


def _cmd_tune(args) -> int:
    if args.grid is not None and args.mask_thresholds:
        raise ValueError("--grid and --mask-thresholds cannot be combined")
    from napari_cellseg.commands.tune import run_tune

    return run_tune(args, progress_factory=_progress)


# ---- rank (the logic lives in commands/rank.py) ----------------------------------------------
def _add_rank(subparsers) -> None:
    p = subparsers.add_parser(
        "rank", help="rank images by how likely the model is wrong -> ranking CSV",
        description="Predict every image (as cellseg predict does, plus a horizontally flipped "
                    "second pass) and write id,uncertainty,cells,doubtful_cells,diameter,file, "
                    "the most uncertain image first. Rows stream to the CSV (atomic rewrites); "
                    "--resume skips ids already ranked; a bad image is reported and skipped "
                    "(exit 1), usage errors exit 2.")
    _add_run_options(p, "ranking CSV to write (atomically)")
    p.add_argument("--second-pass", action=argparse.BooleanOptionalAction, default=True,
                   help="also predict each image flipped and count the disagreement (default: on; "
                        "--no-second-pass halves the time)")
    p.add_argument("--resume", action="store_true", help="skip image ids already in --out or its journal")
    p.set_defaults(func=_cmd_rank)


def _cmd_rank(args) -> int:
    from napari_cellseg.commands.rank import run_rank
    from napari_cellseg.options import PredictOptions

    return run_rank(PredictOptions.from_args(args), args.images, args.out, resume=args.resume,
                    second=args.second_pass, progress_factory=_progress)


# ---- entry point -----------------------------------------------------------------------------
COMMANDS = [_add_to_labels, _add_to_csv, _add_evaluate, _add_demo, _add_predict, _add_tune, _add_rank]


def build_parser() -> argparse.ArgumentParser:
    from napari_cellseg import __version__

    parser = argparse.ArgumentParser(
        prog="cellseg", description="napari-cellseg: cell instance segmentation tools.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        message = f"{exc.filename}: {exc.strerror}"
    else:
        message = str(exc) or type(exc).__name__
    return " ".join(message.split())


class _Terminated(BaseException):
    """SIGTERM (a scheduler, torchrun's agent, ``kill``) as an exception: the ``finally`` blocks
    run, so the output lock, temp files and journals are closed or removed as on Ctrl-C."""


@contextlib.contextmanager
def _terminate_as_exception():
    """Outside torchrun only: there the agent's SIGTERM must end a rank at once (a rank left in
    a collective would wait for the others); the next run takes over its lock files."""
    def handler(signum, frame):
        raise _Terminated

    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        yield
        return
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (a test calling main() from a worker): as it was
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors (argparse already printed)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        with _terminate_as_exception():
            return int(args.func(args) or 0)
    except (ValueError, OSError) as exc:
        print(f"cellseg {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cellseg {args.command}: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"cellseg {args.command}: terminated (SIGTERM); rerun with --resume where the command "
              f"has it", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
