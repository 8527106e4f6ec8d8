"""What tlkit costs: its training steps against a plain PyTorch loop, and albumentations against
torchvision.transforms.v2.

    apt-get install dataset-fashion-mnist
    python benchmarks/overhead.py --steps 120 --warmup-steps 20 --repeats 2

Part 1, the training loop. The same network (bundled EfficientNet-Lite0 and tlkit's head), the
same data loader (tlkit's ImageDataModule over Fashion-MNIST at 64px, default augmentation), batch
size, optimiser and schedule (AdamW with tlkit's parameter groups, warm-up then cosine) and number
of steps, timed side by side in one process: a plain PyTorch loop (forward, cross-entropy,
backward, optimiser and schedule step) and `tlkit.train.finetune` (Lightning's Trainer with tlkit's
callbacks, torchmetrics, logging and progress bar). Steady-state images/s counts the steps after
the warm-up steps, data loading included; start-up (scanning the data, building the model,
starting workers, up to the first batch) is reported separately. The two sides alternate
--repeats times; the table gives the median. Run for each strategy in --strategies.

Part 2, augmentation. tlkit's albumentations training pipeline (scale crop, flip, colour jitter,
normalise) against the equivalent torchvision.transforms.v2 pipeline, images/s through a
DataLoader with one worker process, decoding included, on Fashion-MNIST (28px files, 64px output)
and on scikit-image's bundled photos (224px output).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import skimage
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from fashion_mnist import write_fashion_mnist  # noqa: E402

from tlkit import FinetuneConfig, finetune  # noqa: E402
from tlkit.data.augment import REFERENCE_SIZE, train_transform  # noqa: E402
from tlkit.data.datasets import ImageDataset
from tlkit.data.sources import scan_folder  # noqa: E402
from tlkit.model.backbones import preprocessing as backbone_preprocessing  # noqa: E402
from tlkit.model.classifier import TransferClassifier  # noqa: E402
from tlkit.runfolder import Preprocessing  # noqa: E402
from tlkit.train.build import build_datamodule, build_model, data_facts  # noqa: E402


class BatchClock(pl.Callback):
    """Wall-clock time at the start of the first training batch and at the end of every one."""

    def __init__(self) -> None:
        self.first_batch_start = 0.0
        self.batch_ends: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_index: int) -> None:
        if batch_index == 0:
            self.first_batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index: int) -> None:
        self.batch_ends.append(time.perf_counter())


def steady_images_per_second(batch_ends: list[float], warmup_steps: int, batch_size: int) -> float:
    """Images/s over the steps after the warm-up steps (from the end of the last warm-up step)."""
    steps = len(batch_ends) - warmup_steps
    return steps * batch_size / (batch_ends[-1] - batch_ends[warmup_steps - 1])


def plain_pytorch_loop(
    config: FinetuneConfig, steps: int
) -> tuple[float, list[float], TransferClassifier]:
    """Train `steps` steps with a hand-written loop; return start-up seconds, batch end times and
    the trained model (the same steps as tlkit's: tests/test_overhead_benchmark.py)."""
    started = time.perf_counter()
    pl.seed_everything(config.seed, workers=True, verbose=False)
    datamodule = build_datamodule(config)
    datamodule.setup("fit")
    model = build_model(config, data_facts(config, datamodule))
    optimizer, schedule = model.optimizer_and_schedule(total_steps=steps, steps_per_epoch=steps)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()  # frozen backbone modules stay in eval mode (TransferClassifier.train)
    pl.seed_everything(config.seed, workers=True, verbose=False)  # as tlkit.train.finetune does
    batch_ends: list[float] = []
    first_batch_start = 0.0
    for step, (images, labels) in enumerate(datamodule.train_dataloader()):
        if step == 0:
            first_batch_start = time.perf_counter()
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        batch_ends.append(time.perf_counter())
        if step + 1 == steps:
            break
    return first_batch_start - started, batch_ends, model


def tlkit_training_steps(
    config: FinetuneConfig, steps: int, **trainer_options: Any
) -> tuple[float, list[float]]:
    """The same steps through `tlkit.finetune`; return start-up seconds and batch end times."""
    clock = BatchClock()
    started = time.perf_counter()
    finetune(
        config,
        callbacks=[clock],
        limit_train_batches=steps,
        limit_val_batches=2,
        limit_test_batches=0,
        **trainer_options,
    )
    return clock.first_batch_start - started, clock.batch_ends


def compare_loops(arguments: argparse.Namespace, data: Path, work: Path) -> list[str]:
    """Part 1: Markdown rows, one per strategy."""
    rows = []
    for strategy in arguments.strategies:
        measured: dict[str, dict[str, list[float]]] = {
            side: {"startup": [], "images_per_second": []} for side in ("plain", "tlkit")
        }
        for repeat in range(arguments.repeats):
            for side, train in (("plain", plain_pytorch_loop), ("tlkit", tlkit_training_steps)):
                config = FinetuneConfig(
                    data_dir=str(data),
                    out=str(work / f"{strategy}-{side}-{repeat}"),
                    pretrained="bundled",
                    strategy=strategy,
                    unfreeze_stages=1,
                    epochs=1,
                    img_size=64,
                    lr=2e-3,
                    batch_size=arguments.batch_size,
                    channels_last=True,
                    cache=False,
                )
                startup, batch_ends = train(config, arguments.steps)[:2]
                speed = steady_images_per_second(
                    batch_ends, arguments.warmup_steps, arguments.batch_size
                )
                measured[side]["startup"].append(startup)
                measured[side]["images_per_second"].append(speed)
                print(f"{strategy} {side} #{repeat}: {speed:.1f} images/s, start-up {startup:.1f}s")
        plain, ours = (
            {key: statistics.median(values) for key, values in measured[side].items()}
            for side in ("plain", "tlkit")
        )
        label = "partial (last stage)" if strategy == "partial" else strategy
        rows.append(
            f"| {label} | {plain['images_per_second']:.1f} | {ours['images_per_second']:.1f} | "
            f"{ours['images_per_second'] / plain['images_per_second']:.3f}x | "
            f"{plain['startup']:.1f} | {ours['startup']:.1f} |"
        )
    return rows


class TorchvisionOnArrays:
    """Adapter so a torchvision v2 pipeline runs on decoded HxWx3 arrays with the albumentations
    calling convention that tlkit's ImageDataset uses (`transform(image=array)["image"]`)."""

    def __init__(self, pipeline: v2.Compose) -> None:
        self.pipeline = pipeline

    def __call__(self, image: np.ndarray) -> dict[str, torch.Tensor]:
        return {"image": self.pipeline(torch.from_numpy(image).permute(2, 0, 1).contiguous())}


def torchvision_train_transform(preprocessing: Preprocessing) -> v2.Compose:
    """torchvision.transforms.v2's equivalent of tlkit's default albumentations train pipeline."""
    size = preprocessing.input_size
    low, high = (round(side * size / REFERENCE_SIZE) for side in (256, 480))
    return v2.Compose(
        [
            v2.RandomShortestSize(
                min_size=list(range(low, high + 1)),
                interpolation=v2.InterpolationMode(preprocessing.interpolation),
                antialias=True,
            ),
            v2.RandomCrop(size),
            v2.RandomHorizontalFlip(0.5),
            v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(preprocessing.mean), std=list(preprocessing.std)),
        ]
    )


def images_per_second(dataset: ImageDataset, batch_size: int) -> float:
    """Throughput of one epoch through a one-worker DataLoader, from the first batch on."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=1)
    batches = iter(loader)
    first = next(batches)[0]
    started = time.perf_counter()
    images = sum(len(images) for images, _ in batches)
    assert first.dtype == torch.float32
    return images / (time.perf_counter() - started)


def compare_augmentation(arguments: argparse.Namespace, data: Path) -> list[str]:
    """Part 2: Markdown rows, one per image source."""
    photos_folder = Path(skimage.data.__file__).parent
    photos = [
        (str(path), 0)
        for path in sorted(photos_folder.glob("*.*"))
        if path.name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")
    ]
    sources = {
        "Fashion-MNIST, 28px files -> 64px": (scan_folder(data / "train").samples, 64),
        "scikit-image photos (300-512px) -> 224px": (photos * 256, 224),
    }
    rows = []
    for name, (samples, size) in sources.items():
        samples = samples[: arguments.augmentation_images]
        preprocessing = backbone_preprocessing("tf_efficientnet_lite0", size)
        albumentations = images_per_second(
            ImageDataset(samples, train_transform(preprocessing, seed=0)), arguments.batch_size
        )
        torchvision = images_per_second(
            ImageDataset(samples, TorchvisionOnArrays(torchvision_train_transform(preprocessing))),
            arguments.batch_size,
        )
        rows.append(
            f"| {name} | {len(samples)} | {albumentations:.0f} | {torchvision:.0f} | "
            f"{albumentations / torchvision:.2f}x |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/bench-overhead")
    parser.add_argument("--train-images", type=int, default=10000)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--strategies", nargs="*", default=["full", "partial"])
    parser.add_argument("--augmentation-images", type=int, default=4096)
    arguments = parser.parse_args()
    if arguments.steps * arguments.batch_size > 0.9 * arguments.train_images:
        parser.error("--steps x --batch-size must fit in one epoch of the training split")

    work = Path(arguments.work)
    data = write_fashion_mnist(work / "data", arguments.train_images, 1000)
    with tempfile.TemporaryDirectory(dir=work) as runs:
        loop_rows = compare_loops(arguments, data, Path(runs))
    augmentation_rows = compare_augmentation(arguments, data)

    print(
        f"\n{platform.machine()}, {torch.get_num_threads()} threads, "
        f"{time.strftime('%Y-%m-%d')}; Fashion-MNIST {arguments.train_images:,} train images "
        f"(10% held out), 64px, batch {arguments.batch_size}, {arguments.steps} steps of which "
        f"the first {arguments.warmup_steps} are warm-up; median of {arguments.repeats}\n"
    )
    print(
        "| strategy | plain PyTorch images/s | tlkit images/s | tlkit / plain | "
        "plain start-up (s) | tlkit start-up (s) |"
    )
    print("|---|---|---|---|---|---|")
    print("\n".join(loop_rows))
    print("\n| images | count | albumentations images/s | torchvision v2 images/s | ratio |")
    print("|---|---|---|---|---|")
    print("\n".join(augmentation_rows))


if __name__ == "__main__":
    main()
