"""Multi-label on real images: Fashion-MNIST items composed into 2 x 2 grids, each image labelled
with every class it shows; a short tlkit run, scored on held-out compositions.

    apt-get install dataset-fashion-mnist
    python benchmarks/multilabel.py --train-images 1500 --test-images 500 --epochs 3

Each image is a 56 x 56 grid of four 28px cells; one to four cells (uniformly many) hold a
Fashion-MNIST item drawn at random, the others stay black, and the image's labels are the
distinct classes of its items (so 1 to 4 labels of 10). Training compositions use the package's
training split, test compositions its test split, so no item is in both. They are written as
`WORK/data/train.csv` and `WORK/data/test.csv` (`path,labels`, labels separated by `;`), the
format `tlkit finetune` reads as multi-label.

The run is an ordinary `tlkit.train.finetune` (bundled EfficientNet-Lite0, partial, last 2
stages, no augmentation) in WORK/run; validation (its usual 10% of train.csv) chooses each
class's threshold. The test set is then scored with `tlkit.metrics.multilabel_metrics`, the
numbers `tlkit evaluate` gives: mAP, macro-F1, micro-F1 and exact match at the chosen
thresholds, and, for comparison, at 0.5 for every class.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from fashion_mnist import CLASSES, load_split  # noqa: E402

from tlkit import FinetuneConfig, finetune  # noqa: E402
from tlkit.infer.predict import load_model, predict_labelled  # noqa: E402
from tlkit.metrics import multilabel_metrics  # noqa: E402

CELL = 28
GRID = 2


def compose(images: np.ndarray, labels: np.ndarray, count: int, rng) -> tuple[np.ndarray, list]:
    """`count` grid images and the sorted class names each shows."""
    composed = np.zeros((count, GRID * CELL, GRID * CELL), dtype=np.uint8)
    names = []
    for index in range(count):
        cells = rng.choice(GRID * GRID, size=rng.integers(1, GRID * GRID + 1), replace=False)
        items = rng.choice(len(images), size=len(cells), replace=False)
        for cell, item in zip(cells, items, strict=True):
            row, column = divmod(int(cell), GRID)
            composed[index, row * CELL : (row + 1) * CELL, column * CELL : (column + 1) * CELL] = (
                images[item]
            )
        names.append(sorted({CLASSES[int(labels[item])] for item in items}))
    return composed, names


def write_split(folder: Path, split: str, count: int, rng) -> Path:
    """folder/<split>/<i>.png and folder/<split>.csv."""
    images, labels = load_split(split)
    composed, names = compose(images, labels, count, rng)
    (folder / split).mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (image, shown) in enumerate(zip(composed, names, strict=True)):
        path = f"{split}/{index:05d}.png"
        Image.fromarray(image).save(folder / path)
        rows.append((path, ";".join(shown)))
    with open(folder / f"{split}.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "labels"])
        writer.writerows(rows)
    return folder / f"{split}.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/bench-multilabel")
    parser.add_argument("--train-images", type=int, default=1500)
    parser.add_argument("--test-images", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()

    work = Path(arguments.work)
    data = work / "data"
    marker = data / f".complete-{arguments.train_images}-{arguments.test_images}"
    if not marker.exists():
        rng = np.random.default_rng(arguments.seed)
        write_split(data, "train", arguments.train_images, rng)
        write_split(data, "test", arguments.test_images, rng)
        marker.touch()
    out = work / "run"
    started = time.perf_counter()
    summary = finetune(
        FinetuneConfig(
            data_dir=str(data / "train.csv"),
            out=str(out),
            pretrained="bundled",
            strategy="partial",
            unfreeze_stages=2,
            augment=False,
            epochs=arguments.epochs,
            patience=arguments.epochs,
            img_size=arguments.img_size,
            lr=arguments.lr,
            batch_size=arguments.batch_size,
            seed=arguments.seed,
            test_fraction=0.0,  # test.csv is the test set
        ),
        enable_progress_bar=False,
    )
    training_seconds = time.perf_counter() - started
    model = load_model(out)
    predictions = predict_labelled(model, data / "test.csv", arguments.batch_size)
    results = {}
    for name, thresholds in (("chosen on validation", model.thresholds), ("0.5", None)):
        metrics = multilabel_metrics(
            predictions.probabilities, predictions.labels, model.class_names, thresholds
        )
        results[name] = metrics.scores()
    per_class = multilabel_metrics(
        predictions.probabilities, predictions.labels, model.class_names, model.thresholds
    ).per_class
    labels_per_image = predictions.labels.sum(dim=1).float().mean().item()
    print(
        f"\n{arguments.train_images} train / {arguments.test_images} test compositions "
        f"({labels_per_image:.2f} labels per test image), {arguments.epochs} epochs at "
        f"{arguments.img_size}px, task {summary.task}, monitor {summary.monitor} (best epoch "
        f"{summary.best_epoch}); training {training_seconds:.0f} s; {platform.machine()}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print("| thresholds | mAP | macro-F1 | micro-F1 | exact match |")
    print("|---|---|---|---|---|")
    for name, scores in results.items():
        print(
            f"| {name} | {scores['map']:.4f} | {scores['macro_f1']:.4f} | "
            f"{scores['micro_f1']:.4f} | {scores['exact_match']:.4f} |"
        )
    print("\nPer class (test): average precision, threshold, F1")
    for row in per_class:
        print(
            f"  {row.name}: AP {row.average_precision:.4f}, t {row.threshold:.3f}, F1 {row.f1:.4f}"
        )
    (work / "multilabel.json").write_text(
        json.dumps({"scores": results, "training_seconds": round(training_seconds, 1)}, indent=2)
    )


if __name__ == "__main__":
    main()
