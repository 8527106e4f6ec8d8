"""Training loader throughput at 224px: tlkit's image-folder loader vs its LitData shard loader.

    nice -n 10 python benchmarks/loader.py --images 2000 --workers 1 2

Data: Fashion-MNIST training images (Debian's dataset-fashion-mnist), a class-stratified
subset upscaled (bicubic) to --source-size px RGB and written as JPEG (quality 90), so every
image is decoded and cropped from a photo-sized file. The same folder is converted once with
`tlkit convert` (timed). For each source and worker count, one epoch of the train loader as
`tlkit finetune` builds it (`ImageDataModule` / `ShardDataModule`, batch 64): decode + tlkit's
train augmentation (albumentations: scale and crop, flip, colour jitter, normalise) with
tf_efficientnet_lite0's preprocessing at 224px. No model runs. Prints a Markdown table of
images/s over the epoch (worker start-up included; median of --repeats epochs, the order of
the sources alternating) and after the first batch, and the data module's set-up time (the
folder's scan decodes every image; shards read their metadata).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from fashion_mnist import CLASSES, load_split, stratified_subset  # noqa: E402

from tlkit.data.datamodule import ImageDataModule  # noqa: E402
from tlkit.data.shards import ShardDataModule, convert  # noqa: E402
from tlkit.model.backbones import preprocessing  # noqa: E402

BACKBONE = "tf_efficientnet_lite0"


def write_jpeg_folder(folder: Path, images: int, size: int, seed: int = 0) -> Path:
    """DATA/<class>/<i>.jpg: `images` Fashion-MNIST training images at `size` px; reused when
    complete."""
    marker = folder / f".complete-{images}-{size}-{seed}"
    if marker.exists():
        return folder
    pixels, labels = load_split("train")
    for position in stratified_subset(labels, images, seed).tolist():
        class_dir = folder / CLASSES[labels[position]]
        class_dir.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(pixels[position]).convert("RGB")
        image.resize((size, size), Image.BICUBIC).save(class_dir / f"{position}.jpg", quality=90)
    marker.touch()
    return folder


def time_epoch(module: ImageDataModule | ShardDataModule) -> dict[str, Any]:
    """Set the module up and run one epoch of its train loader: images and seconds."""
    started = time.perf_counter()
    module.setup("fit")
    set_up = time.perf_counter()
    images = first_batch_images = 0
    first_batch = None
    for batch, _labels in module.train_dataloader():
        images += len(batch)
        if first_batch is None:
            first_batch, first_batch_images = time.perf_counter(), len(batch)
    ended = time.perf_counter()
    return {
        "images": images,
        "setup_s": set_up - started,
        "epoch_s": ended - set_up,
        "images_per_s": images / (ended - set_up),
        "after_first_batch_images_per_s": (images - first_batch_images) / (ended - first_batch),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/bench-loader")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--source-size", type=int, default=300, help="JPEG side in pixels")
    parser.add_argument("--img-size", type=int, default=224, help="training crop")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="epochs per row (median shown)")
    arguments = parser.parse_args()

    work = Path(arguments.work)
    data = write_jpeg_folder(work / "jpeg", arguments.images, arguments.source_size)
    shards = work / "shards"
    started = time.perf_counter()
    convert(data, shards, workers=2, overwrite=True, progress=False)
    convert_s = time.perf_counter() - started

    common = dict(
        preprocessing=preprocessing(BACKBONE, arguments.img_size),
        batch_size=arguments.batch_size,
        val_fraction=0.1,
        seed=0,
    )
    sources = {"folder": (ImageDataModule, data), "shards": (ShardDataModule, shards)}
    results: list[dict[str, Any]] = []
    for repeat in range(arguments.repeats):
        # Alternating order: neither source always runs first on a machine whose load changes.
        for workers in arguments.workers:
            for source in sorted(sources, reverse=repeat % 2 == 1):
                kind, location = sources[source]
                row = time_epoch(kind(location, num_workers=workers, **common))
                results.append({"source": source, "workers": workers, "repeat": repeat, **row})
                print(json.dumps(results[-1]), flush=True)
    (work / "results.json").write_text(
        json.dumps({"convert_s": convert_s, "rows": results}, indent=2)
    )

    print(
        f"\n{arguments.images} Fashion-MNIST JPEGs at {arguments.source_size}px "
        f"({sum(path.stat().st_size for path in data.rglob('*.jpg')) / 2**20:.1f} MiB), "
        f"{results[0]['images']} training images per epoch (10% held out), batch "
        f"{arguments.batch_size}, {arguments.img_size}px {BACKBONE} train augmentation; "
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}; tlkit convert: {convert_s:.1f} s\n"
    )
    print(
        "| source | workers | images/s (epoch, median) | range | images/s after the 1st batch "
        "(median) | set-up (s, median) |"
    )
    print("|---|---|---|---|---|---|")
    medians: dict[tuple[str, int], float] = {}
    for workers in arguments.workers:
        for source in sources:
            rows = [r for r in results if (r["source"], r["workers"]) == (source, workers)]
            speeds = [row["images_per_s"] for row in rows]
            medians[source, workers] = statistics.median(speeds)
            print(
                f"| {source} | {workers} | {medians[source, workers]:.0f} | "
                f"{min(speeds):.0f}-{max(speeds):.0f} | "
                f"{statistics.median(r['after_first_batch_images_per_s'] for r in rows):.0f} | "
                f"{statistics.median(r['setup_s'] for r in rows):.1f} |"
            )
    for workers in arguments.workers:
        ratio = medians["shards", workers] / medians["folder", workers]
        print(f"shards / folder at {workers} worker(s): {ratio:.2f}x")


if __name__ == "__main__":
    main()
