"""Class imbalance on real data: a long-tailed Fashion-MNIST subset, trained plainly, with
balanced class weights and with class-balanced sampling; each epoch scored on a balanced test set.

    apt-get install dataset-fashion-mnist
    python benchmarks/imbalance.py --ratio 10 --largest 300 --rows plain weights sampling both
    python benchmarks/imbalance.py --ratio 1 --largest 120 --rows plain

The training set is long-tailed as in Cui et al. 2019 (CIFAR-LT): the c-th class of a seeded
random order of the 10 keeps `largest x ratio^(-c / 9)` images of Fashion-MNIST's training
split, so the largest class holds `ratio` times the images of the smallest (the order is random
because the package's order would leave the easiest classes, sneaker, bag and ankle boot, the
rarest); tlkit holds out its usual validation share of each. The test set is balanced
(--test-per-class images of each class from the test split), so its top-1 is its balanced
accuracy. Rows: `plain`, `weights` (--class-weights balanced), `sampling` (--sampling
balanced), `both`. Every row is an ordinary `tlkit.train.finetune` run (bundled Lite0, 64px,
no augmentation; by default `--strategy features`, the head on cached features, which the rows
of one ratio share, so an epoch costs little; `--strategy partial` fine-tunes the last 2 stages)
in WORK/ratio-R/<row>; a callback scores every epoch's weights on the test set, so the table
can compare the checkpoint that validation top-1 picks with the one validation balanced
accuracy picks (what `--monitor auto` chooses between), beside the minority classes' recall
(the three smallest classes).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from fashion_mnist import CLASSES, load_split  # noqa: E402

from tlkit import FinetuneConfig, finetune  # noqa: E402
from tlkit.data.images import write_image_folder  # noqa: E402
from tlkit.metrics import classification_metrics  # noqa: E402

ROWS = {
    "plain": {},
    "weights": {"class_weights": "balanced"},
    "sampling": {"sampling": "balanced"},
    "both": {"class_weights": "balanced", "sampling": "balanced"},
}
MINORITY = 3  # the smallest classes, whose recall the table shows


def long_tailed_counts(largest: int, ratio: float, classes: int = len(CLASSES)) -> list[int]:
    """Images per class, from `largest` down to `largest / ratio` geometrically."""
    return [max(1, round(largest * ratio ** (-index / (classes - 1)))) for index in range(classes)]


def class_sizes(counts: list[int], seed: int) -> list[int]:
    """`counts` given to the classes in a seeded random order: images per class, in CLASSES'
    order."""
    order = np.random.default_rng(seed).permutation(len(CLASSES))
    sizes = [0] * len(CLASSES)
    for rank, label in enumerate(order.tolist()):
        sizes[label] = counts[rank]
    return sizes


def write_data(work: Path, sizes: list[int], test_per_class: int, seed: int) -> Path:
    """DATA/train/<class>/ with `sizes` images per class, DATA/test/<class>/ balanced."""
    data = work / "data"
    marker = data / ".complete"
    if marker.exists():
        return data
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", sizes), ("test", [test_per_class] * len(CLASSES))):
        images, labels = load_split(split)
        chosen = np.concatenate(
            [
                rng.choice(np.flatnonzero(labels == label), size=count, replace=False)
                for label, count in enumerate(per_class)
            ]
        )
        write_image_folder(images[chosen], labels[chosen], CLASSES, data / split)
    marker.touch()
    return data


class TestEveryEpoch(pl.Callback):
    """Scores each epoch's weights on the run's test split (after validation), with the
    metrics `tlkit evaluate` uses."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, Any]] = []

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        data = trainer.datamodule  # images, or their cached features (which keep the images)
        classes = getattr(data, "images", data).classes
        loader = data.test_dataloader()
        probabilities, labels = [], []
        training = module.training
        module.eval()
        with torch.no_grad():
            for images, targets in loader:
                probabilities.append(module.predict_batch(images.to(module.device)).cpu())
                labels.append(targets)
        module.train(training)
        metrics = classification_metrics(torch.cat(probabilities), torch.cat(labels), classes)
        values = trainer.callback_metrics
        self.epochs.append(
            {
                "epoch": trainer.current_epoch + 1,
                "val_acc": float(values["val_acc"]),
                "val_balanced_acc": float(values["val_balanced_acc"]),
                "test_top1": metrics.top1,
                "test_recall": {row.name: row.recall for row in metrics.per_class},
            }
        )


def run_row(name: str, data: Path, out: Path, arguments: argparse.Namespace) -> dict[str, Any]:
    result_file = out / "imbalance.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    config = FinetuneConfig(
        data_dir=str(data),
        out=str(out),
        pretrained="bundled",
        strategy=arguments.strategy,
        unfreeze_stages=2,
        augment=False,
        cache_dir=str(out.parent / "cache"),  # the rows of one ratio share the features
        epochs=arguments.epochs,
        patience=arguments.epochs,
        img_size=arguments.img_size,
        lr=arguments.lr,
        batch_size=arguments.batch_size,
        seed=arguments.seed,
        monitor="balanced_acc",
        **ROWS[name],
    )
    scorer = TestEveryEpoch()
    started = time.perf_counter()
    summary = finetune(config, callbacks=[scorer], enable_progress_bar=False, limit_test_batches=0)
    result = {
        "row": name,
        "seconds": round(time.perf_counter() - started, 1),
        "epochs": scorer.epochs,
        "train_images_per_class": json.loads((out / "data.json").read_text())["images_per_class"][
            "train"
        ],
        "best_epoch": summary.best_epoch,
    }
    result_file.write_text(json.dumps(result, indent=2))
    return result


def picked(epochs: list[dict[str, Any]], monitor: str) -> dict[str, Any]:
    """The epoch a monitor keeps: its highest value, the earliest of equals (as Lightning)."""
    return max(epochs, key=lambda record: (record[monitor], -record["epoch"]))


def table(results: list[dict[str, Any]], sizes: list[int]) -> str:
    smallest = [CLASSES[index] for index in np.argsort(sizes, kind="stable")[:MINORITY]]
    lines = [
        f"Minority classes (the {MINORITY} smallest): {', '.join(smallest)}",
        "",
        "| row | picked by | epoch | test top-1 (= balanced) | minority recall (mean / min) "
        "| val top-1 / balanced | training (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for monitor in ("val_acc", "val_balanced_acc"):
            epoch = picked(result["epochs"], monitor)
            recalls = [epoch["test_recall"][name] for name in smallest]
            lines.append(
                f"| {result['row']} | {monitor} | {epoch['epoch']} | {epoch['test_top1']:.4f} | "
                f"{np.mean(recalls):.4f} / {min(recalls):.4f} | "
                f"{epoch['val_acc']:.4f} / {epoch['val_balanced_acc']:.4f} | "
                f"{result['seconds']:.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/bench-imbalance")
    parser.add_argument("--ratio", type=float, default=10.0, help="largest over smallest class")
    parser.add_argument("--largest", type=int, default=300, help="images of the largest class")
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--strategy", default="features", choices=["features", "partial"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", nargs="+", default=["plain", "weights", "sampling"], choices=ROWS)
    arguments = parser.parse_args()

    counts = long_tailed_counts(arguments.largest, arguments.ratio)
    sizes = class_sizes(counts, arguments.seed)
    work = Path(arguments.work) / f"ratio-{arguments.ratio:g}"
    data = write_data(work, sizes, arguments.test_per_class, arguments.seed)
    shown = ", ".join(f"{name} {size}" for name, size in zip(CLASSES, sizes, strict=True))
    print(f"Training images per class: {shown} ({sum(sizes)})", flush=True)
    results = []
    for name in arguments.rows:
        results.append(run_row(name, data, work / name, arguments))
        print(f"{name}: done in {results[-1]['seconds']:.0f} s", flush=True)
    print(
        f"\nRatio {arguments.ratio:g}:1, {sum(counts)} training images, "
        f"{arguments.test_per_class} test images per class, {arguments.strategy}, "
        f"{arguments.epochs} epochs at {arguments.img_size}px, lr {arguments.lr:g}; "
        f"{platform.machine()}, {torch.get_num_threads()} threads\n"
    )
    print(table(results, sizes))


if __name__ == "__main__":
    main()
