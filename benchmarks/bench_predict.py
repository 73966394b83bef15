"""Predictor + Detections.to_labels against stock torchvision Mask R-CNN, measured in the same run.

    python benchmarks/bench_predict.py [--repeat 3] [--threads N] [--device cpu|cuda] [--throughput N]

Model: the default ModelConfig (convnext_tiny + FPN 256, 500 detections per image), random
weights (seed 0) with the box classifier's cell bias raised so that all 500 detections pass
box_conf 0.5; input: one 704x520 synthetic phase-contrast image.

* stock  = ``model([image])`` (torchvision pastes all N masks into N x H x W floats) + the
  starter's overlap removal (threshold, then each mask loses the pixels of higher-scoring ones),
  done with one running "occupied" mask (O(N*H*W), faster than the starter's O(N^2) loop).
* fast   = ``Predictor.predict`` + ``Detections.to_labels`` (first call, crops built).
* time: median of ``--repeat`` runs after one warm-up, stock and fast interleaved in one process.
* memory: peak RSS growth (VmHWM, reset via /proc/self/clear_refs, minus RSS before the call)
  of one cold call, each pipeline in its own fresh subprocess. torch allocations are counted (RSS).
* --device cuda: both sides on the GPU (stock's masks come back to the host for the overlap
  removal, as a user's script would); memory is not measured there.
* --throughput N: the ``cellseg predict`` path end to end (batch.predict_items: PNG decoding on
  worker threads, --batch-size images per forward, painting + RLE encoding on a thread pool, the
  journal) over N copies of the image: images/s. Target: >= 50 images/s for 704x520 with 500
  detections on one H200-class GPU (``--device cuda --throughput 200 --batch-size 8``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def setup(threads: int | None, device: str = "cpu"):
    import torch

    from napari_cellseg.io.images import to_rgb_float
    from napari_cellseg.model.maskrcnn import ModelConfig, build_model
    from napari_cellseg.io.synthetic import make_image

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = ModelConfig()
    model = build_model(config).eval()
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[1] = 6.0  # >= 500 boxes pass
    image, _ = make_image("cells", shape=(520, 704), seed=1)
    return model.to(device), config, to_rgb_float(image)


def stock(model, image, box_conf=0.5, mask_threshold=0.5):
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model([torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).to(device)])[0]
    scores = out["scores"].cpu().numpy()
    masks = out["masks"][:, 0].cpu().numpy() > mask_threshold  # N x H x W
    labels = np.zeros(image.shape[:2], np.int32)
    occupied = np.zeros(image.shape[:2], bool)
    k = 0
    for i in np.argsort(-scores, kind="stable"):
        if scores[i] < box_conf:
            continue
        m = masks[i] & ~occupied
        if m.any():
            occupied |= m
            k += 1
            labels[m] = k
    return labels


def fast(predictor, image, box_conf=0.5, mask_threshold=0.5):
    dets = predictor.predict(image)
    return dets.to_labels(box_conf, mask_threshold), dets


def worker(kind: str, threads: int | None) -> None:
    """One cold call in a fresh process; print peak RSS growth as JSON."""
    from napari_cellseg.inference.predictor import Predictor

    model, config, image = setup(threads)
    pred = Predictor.from_model(model, config, precision="bf16" if kind == "bf16" else "fp32") if kind != "stock" else None
    import gc

    gc.collect()
    if not reset_peak():
        print("warning: cannot reset the peak-RSS counter; the figure includes set-up", file=sys.stderr)
    base = rss_bytes()
    t = time.perf_counter()
    labels = stock(model, image) if kind == "stock" else fast(pred, image)[0]
    dt = time.perf_counter() - t
    peak = peak_rss_bytes() - base
    print(json.dumps({"peak": peak, "cold_s": dt, "instances": int(labels.max())}))


def measure_memory(kind: str, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind] + (["--threads", str(threads)] if threads else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def throughput(model, config, image, device, n: int, batch_size: int) -> None:
    """``cellseg predict``'s own loop (batch.predict_items) over n PNG copies of the image."""
    import tempfile
    from pathlib import Path

    import imageio.v3 as iio

    from napari_cellseg.commands.predict import Item, predict_items
    from napari_cellseg.io.journal import Journal
    from napari_cellseg.inference.runner import Runner
    from napari_cellseg.options import PredictOptions
    from napari_cellseg.inference.pipeline import Pipeline

    runner = Runner(model, config, device=device)
    pipe = Pipeline(runner, PredictOptions(scale=1.0, batch_size=batch_size))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "img.png"
        iio.imwrite(src, (image * 255).astype(np.uint8))
        items = [Item(f"img{i:04d}", src) for i in range(n)]
        warm = Journal(Path(tmp) / "warm.journal")
        predict_items(pipe, items[:batch_size], warm)
        warm.close()
        journal = Journal(Path(tmp) / "run.journal")
        t = time.perf_counter()
        failed = predict_items(pipe, items, journal)
        dt = time.perf_counter() - t
        journal.close()
    print(f"cellseg predict path: {n} images, batch {batch_size}: {n / dt:.3g} images/s "
          f"({dt / n * 1e3:.0f} ms/image){'; FAILED ' + str(len(failed)) if failed else ''}"
          f"  [target on one H200-class GPU: >= 50 images/s]")


def per_instance_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest IoU between instance k of a and instance k of b (ids in score order)."""
    n = max(a.max(), b.max())
    inter = np.bincount(a[(a == b) & (a > 0)], minlength=n + 1)[1:]
    area_a = np.bincount(a.ravel(), minlength=n + 1)[1:]
    area_b = np.bincount(b.ravel(), minlength=n + 1)[1:]
    union = area_a + area_b - inter
    return float(np.min(np.where(union > 0, inter / np.maximum(union, 1), 1.0))) if n else 1.0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--worker", choices=["stock", "fp32", "bf16"], help=argparse.SUPPRESS)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    ap.add_argument("--throughput", type=int, default=0, metavar="N",
                    help="also run the cellseg predict path over N copies of the image (images/s)")
    ap.add_argument("--batch-size", type=int, default=4, help="images per forward for --throughput")
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.threads)

    from napari_cellseg.model.devices import cuda_has_bf16, resolve_device
    from napari_cellseg.inference.predictor import Predictor
    from napari_cellseg.inference.runner import cpu_has_bf16

    device = resolve_device(args.device)
    model, config, image = setup(args.threads, device)
    pred = Predictor.from_model(model, config, device=device)
    cuda = device.type == "cuda"
    precisions = ["fp32"] + (["bf16"] if (cuda_has_bf16(device) if cuda else cpu_has_bf16()) else []) \
        + (["fp16"] if cuda else [])
    preds = {"fp32": pred}
    for name in precisions[1:]:
        preds[name] = Predictor.from_model(model, config, device=device, precision=name)
    print(f"device: {device}, threads: {__import__('torch').get_num_threads()}")
    ref = stock(model, image)  # warm-up
    for p in preds.values():
        fast(p, image)
    times: dict[str, list[float]] = {"stock": [], **{k: [] for k in preds}}
    for _ in range(args.repeat):
        t = time.perf_counter()
        ref = stock(model, image)
        times["stock"].append(time.perf_counter() - t)
        for name, p in preds.items():
            t = time.perf_counter()
            labels, dets = fast(p, image)
            times[name].append(time.perf_counter() - t)
            if name == "fp32":
                fp32_labels, fp32_dets = labels, dets
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"detections: {len(fp32_dets)}, instances: stock {ref.max()}, fast {fp32_labels.max()}")
    print(f"same masks (fp32): pixels equal {np.mean(ref == fp32_labels):.6f}, "
          f"min per-instance IoU {per_instance_iou(ref, fp32_labels):.4f}")
    print(f"stock predict+labels     : {med['stock']:.2f} s (median of {args.repeat})")
    for name in preds:
        print(f"fast {name} predict+labels: {med[name]:.2f} s  -> {med['stock'] / med[name]:.2f}x faster")
    if "bf16" not in preds and not cuda:
        print("bf16: skipped, this CPU has no native bfloat16 (AVX512-BF16/AMX); emulated bf16 is far "
              "slower than fp32 here")

    lab_times = []
    for i in range(50):
        fp32_dets._cache = None if i == 0 else fp32_dets._cache
        t = time.perf_counter()
        fp32_dets.to_labels(0.5, 0.3 + 0.01 * (i % 20))
        lab_times.append(time.perf_counter() - t)
    print(f"to_labels, {fp32_dets.count(0.5)} instances: first call (builds crops) "
          f"{lab_times[0] * 1e3:.1f} ms, then median {statistics.median(lab_times[1:]) * 1e3:.2f} ms")

    if args.throughput:
        throughput(model, config, image, device, args.throughput, args.batch_size)
    if not args.skip_memory and not cuda:
        mem = {k: measure_memory(k, args.threads) for k in ["stock", *preds]}
        for k, v in mem.items():
            ratio = "" if k == "stock" else f"  -> {mem['stock']['peak'] / max(v['peak'], 1):.1f}x less"
            print(f"peak RSS growth {k:5s}: {v['peak'] / 2**20:7.0f} MiB{ratio}")


if __name__ == "__main__":
    main()
