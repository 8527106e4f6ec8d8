"""Whole epochs against the training step: how close an epoch of `tlkit finetune` comes to the
rate of its optimiser steps, and where the rest of the epoch goes.

    apt-get install dataset-fashion-mnist
    python benchmarks/epoch.py --strategies features partial full --sizes 64 224 --epochs 3

Data, by input size (--sizes): 64 px, Fashion-MNIST from Debian's dataset-fashion-mnist written
as PNG class folders, DATA/train (--train-images, a stratified subset of the training split)
and DATA/val (--val-images, from the test split), 28 px grayscale files upscaled by tlkit's
transforms; 224 px, photos: square crops (224 to 512 px side, random position and size) of the
eight colour photos bundled with scikit-image (astronaut, cat, coffee, rocket, motorcycle, the
Hubble deep field, a retina, a stained tissue sample), written as JPEG (quality 90), one class
per source photo (--photo-train-images / --photo-val-images), so every image is decoded from a
photo-sized file and resized, as in a real photo dataset.

For each strategy (--strategies: features, partial with its last 2 stages, full) and size:

- Epoch: an ordinary `tlkit.train.finetune` run of --epochs epochs with tlkit's defaults
  (bundled EfficientNet-Lite0, batch --batch-size, default augmentation, loader workers,
  checkpoints, CSV log, progress bar; no test split). An epoch lasts from its start to the next
  epoch's start (or training's end), so loading, validation, both checkpoint writes, logging
  and callbacks are in it; its images/s is its training images (full batches) over that time.
  The table gives the median over the epochs after the first, and the first apart (it also
  starts the loader workers), and in brackets the median of summary.json's epoch seconds
  (EpochSummary's: up to its end-of-epoch line, before Lightning writes the checkpoints). A
  callback splits each epoch into phases: optimiser steps (a batch's start to its end,
  Lightning's hooks included), waits for the next training batch, validation, and the rest
  (the checkpoint writes and the other end-of-epoch hooks).
- Step rate: the same model, optimiser and schedule (tlkit's parameter groups) in a plain
  PyTorch loop (forward, cross-entropy, backward, optimiser and schedule steps) on --preloaded
  batches taken from the same training loader beforehand, so nothing is loaded while it is
  timed: images/s over at least --step-seconds (and 3 steps) after --warmup-steps, the
  ceiling an epoch can reach; measured before and after the run, and averaged. The steps'
  share of the epoch (the steps phase over the epoch's time) is measured within the epoch,
  so it holds even where other work on the machine moves the rates.
- features: the epochs train the head on cached features (a matrix product per batch), so
  their images/s says nothing about the backbone, whose work is the one-off extraction before
  the first epoch. Its row compares that extraction's images/s (train and validation images,
  decoding included, from summary.json's feature_cache) with the backbone's forward pass on
  preloaded batches (the extraction's step: every view of a training image counts), and gives
  the epochs' seconds.

On a GPU the runs and the step rate use the device (tlkit's defaults there: bf16-mixed and
channels-last); --precision, --no-channels-last, --num-workers and --torch-threads change
tlkit's settings for a comparison; --profile adds Lightning's SimpleProfiler to the runs
(every hook's time). Runs are kept in WORK/runs/<strategy>-<size>; the script runs in pieces
(`--strategies partial --sizes 64`). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import skimage
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_lightning.profilers import SimpleProfiler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from fashion_mnist import CLASSES, load_split, stratified_subset  # noqa: E402

from tlkit import FinetuneConfig, finetune  # noqa: E402
from tlkit.data.images import write_image_folder  # noqa: E402
from tlkit.runfolder import RunSummary  # noqa: E402
from tlkit.train.build import build_datamodule, build_model, data_facts  # noqa: E402
from tlkit.train.hardware import device_defaults, training_device  # noqa: E402

STRATEGIES: dict[str, dict[str, Any]] = {
    "features": {"strategy": "features"},
    "partial": {"strategy": "partial", "unfreeze_stages": 2},
    "full": {"strategy": "full"},
}
# scikit-image's bundled colour photos (file name -> class), at least 300 px on each side
PHOTOS = {
    "astronaut.png": "astronaut",
    "chelsea.png": "cat",
    "coffee.png": "coffee",
    "rocket.jpg": "rocket",
    "motorcycle_left.png": "motorcycle",
    "hubble_deep_field.jpg": "galaxies",
    "retina.jpg": "retina",
    "ihc.png": "tissue",
}
CROP_SIDES = (224, 512)
MIN_STEPS = 3  # timed steps of the step rate, however long they take


def write_fashion_mnist_splits(folder: Path, train_images: int, val_images: int) -> Path:
    """DATA/train (from the training split) and DATA/val (from the test split) as PNG class
    folders of stratified, seeded subsets; reused when complete."""
    marker = folder / f".complete-{train_images}-{val_images}"
    if not marker.exists():
        shutil.rmtree(folder, ignore_errors=True)
        for split, source, count in (("train", "train", train_images), ("val", "test", val_images)):
            images, labels = load_split(source)
            chosen = stratified_subset(labels, count, seed=0)
            write_image_folder(images[chosen], labels[chosen], CLASSES, folder / split)
        marker.touch()
    return folder


def write_photo_crops(folder: Path, train_images: int, val_images: int) -> Path:
    """DATA/train and DATA/val: random square crops (CROP_SIDES px) of scikit-image's colour
    photos as JPEG, one class per photo, as many per class; reused when complete."""
    marker = folder / f".complete-{train_images}-{val_images}"
    if marker.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    photos_folder = Path(skimage.data.__file__).parent
    generator = np.random.default_rng(0)
    for split, count in (("train", train_images), ("val", val_images)):
        for index in range(count):
            file_name, label = list(PHOTOS.items())[index % len(PHOTOS)]
            with Image.open(photos_folder / file_name) as photo:
                photo = photo.convert("RGB")
                largest = min(CROP_SIDES[1], *photo.size)
                side = int(generator.integers(CROP_SIDES[0], largest + 1))
                left = int(generator.integers(0, photo.width - side + 1))
                top = int(generator.integers(0, photo.height - side + 1))
                crop = photo.crop((left, top, left + side, top + side))
            (folder / split / label).mkdir(parents=True, exist_ok=True)
            crop.save(folder / split / label / f"{index:05d}.jpg", quality=90)
    marker.touch()
    return folder


def benchmark_data(work: Path, arguments: argparse.Namespace) -> dict[int, Callable[[], Path]]:
    """By input size, what writes (or finds) its data under `work`, sized by the arguments."""
    return {
        64: lambda: write_fashion_mnist_splits(
            work / "fashion-mnist", arguments.train_images, arguments.val_images
        ),
        224: lambda: write_photo_crops(
            work / "photos", arguments.photo_train_images, arguments.photo_val_images
        ),
    }


class EpochPhases(pl.Callback):
    """Each training epoch's wall time, from its start to the next epoch's (or training's end),
    in phases: optimiser steps (a batch's start to its end, Lightning's hooks included), waits
    for the next training batch, validation, and the rest after validation (the checkpoint
    writes, which Lightning runs after the other epoch-end hooks, and those hooks)."""

    PHASES = ("steps", "waits", "validation", "rest")

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self._last = 0.0

    def _add(self, phase: str) -> None:
        now = time.perf_counter()
        if self.epochs:  # the sanity check's validation comes before the first epoch
            self.epochs[-1][phase] += now - self._last
        self._last = now

    def on_train_epoch_start(self, trainer, module) -> None:
        self._add("rest")  # the previous epoch's
        self.epochs.append(dict.fromkeys(self.PHASES, 0.0))
        self._last = time.perf_counter()

    def on_train_batch_start(self, trainer, module, batch, batch_index: int) -> None:
        self._add("waits")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index: int) -> None:
        self._add("steps")

    def on_validation_start(self, trainer, module) -> None:
        if not trainer.sanity_checking:
            self._add("waits")

    def on_validation_end(self, trainer, module) -> None:
        if not trainer.sanity_checking:
            self._add("validation")

    def on_train_end(self, trainer, module) -> None:
        self._add("rest")


def run_epochs(
    config: FinetuneConfig, profile: bool = False
) -> tuple[RunSummary, list[dict[str, float]]]:
    """A fresh finetune run; its summary and the phases of its epochs (with `profile`,
    Lightning's SimpleProfiler writes its report to OUT/fit-profile.txt)."""
    shutil.rmtree(config.out, ignore_errors=True)
    phases = EpochPhases()
    profiler = SimpleProfiler(dirpath=config.out, filename="profile") if profile else None
    summary = finetune(config, callbacks=[phases], profiler=profiler)
    return summary, phases.epochs


def step_rate(config: FinetuneConfig, arguments: argparse.Namespace) -> float:
    """Images/s of plain training steps on preloaded batches of the run's training loader (for
    `features`: the backbone's forward pass, the step of the extraction), on the run's device
    and at its precision (torch's autocast, and a gradient scaler for 16-mixed, as Lightning's
    mixed-precision plugin runs them)."""
    config = device_defaults(config)  # the layout and precision the run trains in
    device = training_device(config)
    pl.seed_everything(config.seed, verbose=False)
    datamodule = build_datamodule(replace(config, num_workers=0))
    datamodule.setup("fit")
    model = build_model(config, data_facts(config, datamodule))
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    batches = [  # in the run's layout (the backbone alone does not convert them)
        (images.to(device).contiguous(memory_format=layout), labels.to(device))
        for images, labels in itertools.islice(datamodule.train_dataloader(), arguments.preloaded)
    ]
    optimizer, schedule = model.optimizer_and_schedule(total_steps=1000, steps_per_epoch=100)
    model = model.to(device, memory_format=layout)
    model.train()  # frozen backbone modules stay in eval mode (TransferClassifier.train)
    half = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(config.precision)
    scaler = torch.amp.GradScaler(device, enabled=config.precision == "16-mixed")

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast(device, dtype=half, enabled=half is not None):
            if config.strategy == "features":
                with torch.no_grad():
                    model.backbone.eval()(images)
                return
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        schedule.step()

    def now() -> float:
        if device == "cuda":
            torch.cuda.synchronize()  # the queued kernels are part of the steps' time
        return time.perf_counter()

    cycle = itertools.cycle(batches)
    for images, labels in itertools.islice(cycle, arguments.warmup_steps):
        step(images, labels)
    started, steps = now(), 0
    while steps < MIN_STEPS or now() - started < arguments.step_seconds:
        step(*next(cycle))
        steps += 1
    return steps * arguments.batch_size / (now() - started)


def table_row(
    strategy: str,
    size: int,
    summary: RunSummary,
    phases: list[dict[str, float]],
    step_speed: float,
    batch_size: int,
) -> str:
    """One Markdown row: the step rate, the epochs' rates (median of those after the first),
    their ratio, the epochs' seconds and their phases."""
    cycles = [sum(epoch.values()) for epoch in phases]
    later = phases[1:] or phases
    seconds = statistics.median(cycles[1:] or cycles)
    recorded = statistics.median(
        record["seconds"] for record in summary.history[1:] or summary.history
    )
    split = " / ".join(
        f"{statistics.median(epoch[phase] for epoch in later):.2f}" for phase in EpochPhases.PHASES
    )
    share = statistics.median(epoch["steps"] / sum(epoch.values()) for epoch in later)
    if strategy == "features":
        cache = summary.feature_cache or {}
        extracted = summary.train_images * cache["train"]["views"] + summary.val_images
        achieved = extracted / cache["extraction_s"]
        label, first = "features: extraction vs backbone forward", "n/a"
    else:
        images_per_epoch = summary.train_images // batch_size * batch_size  # the last is dropped
        achieved = images_per_epoch / seconds
        label, first = strategy, f"{images_per_epoch / cycles[0]:.0f}"
    return (
        f"| {label} | {size} | {step_speed:.0f} | {achieved:.0f} | {achieved / step_speed:.2f} | "
        f"{first} | {share:.2f} | {seconds:.2f} ({recorded:.2f}) | {split} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/bench-epoch")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 224], choices=[64, 224])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-images", type=int, default=5000, help="Fashion-MNIST, 64 px")
    parser.add_argument("--val-images", type=int, default=1000, help="Fashion-MNIST, 64 px")
    parser.add_argument("--photo-train-images", type=int, default=640, help="photos, 224 px")
    parser.add_argument("--photo-val-images", type=int, default=128, help="photos, 224 px")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--step-seconds", type=float, default=20.0, help="time the step rate for this long"
    )
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--preloaded", type=int, default=4, help="batches the steps cycle over")
    parser.add_argument("--num-workers", type=int, default=-1, help="tlkit's --num-workers")
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=FinetuneConfig.field_default("channels_last"),
        help="tlkit's --channels-last",
    )
    parser.add_argument(
        "--precision",
        choices=["32", "16-mixed", "bf16-mixed"],
        default=FinetuneConfig.field_default("precision"),
        help="tlkit's --precision (default: the device's, tlkit's default)",
    )
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="torch's intra-op threads (0: its default)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="Lightning's SimpleProfiler in each run: WORK/runs/<strategy>-<size>/fit-profile.txt",
    )
    arguments = parser.parse_args()
    if arguments.torch_threads:
        torch.set_num_threads(arguments.torch_threads)

    work = Path(arguments.work)
    datasets = benchmark_data(work, arguments)
    rows = []
    for size in arguments.sizes:
        data = datasets[size]()
        for strategy in arguments.strategies:
            config = FinetuneConfig(
                data_dir=str(data),
                out=str(work / "runs" / f"{strategy}-{size}"),
                pretrained="bundled",
                img_size=size,
                epochs=arguments.epochs,
                patience=arguments.epochs,
                batch_size=arguments.batch_size,
                num_workers=arguments.num_workers,
                channels_last=arguments.channels_last,
                precision=arguments.precision,
                test_fraction=0.0,  # DATA/val is the validation split; no test split
                **STRATEGIES[strategy],
            )
            before = step_rate(config, arguments)
            summary, phases = run_epochs(config, arguments.profile)
            step_speed = (before + step_rate(config, arguments)) / 2  # a load that drifts
            rows.append(
                table_row(strategy, size, summary, phases, step_speed, arguments.batch_size)
            )
            print(rows[-1], flush=True)

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(
        f"\n{platform.machine()}, {os.cpu_count()} cores, {gpu}, precision "
        f"{arguments.precision or 'the device default'}, channels-last "
        f"{arguments.channels_last}, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M')}; batch "
        f"{arguments.batch_size}, {arguments.epochs} epochs; 64 px: Fashion-MNIST "
        f"{arguments.train_images} train / {arguments.val_images} val PNG; 224 px: photo crops "
        f"{arguments.photo_train_images} train / {arguments.photo_val_images} val JPEG\n"
    )
    print(
        "| strategy | px | step images/s (preloaded) | epoch images/s | epoch / step | "
        "first epoch images/s | steps' share of the epoch | epoch s (summary.json's) | "
        "steps / waits / validation / rest (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
