"""Frozen-backbone training with and without the feature cache, on Fashion-MNIST.

    python benchmarks/feature_cache.py --train-images 10000 --test-images 2000 --epochs 20

Bundled EfficientNet-Lite0, `--strategy features`, 64px. Rows: uncached (the backbone runs on
every image every epoch, with the default augmentation, as other toolkits' frozen phases do),
cached with one plain view per image (tlkit's default), cached with 4 augmented views. Prints a
Markdown table of the median wall time per epoch after the first, the one-off extraction time,
the speed-up and the test top-1.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from fashion_mnist import write_fashion_mnist  # noqa: E402

from tlkit import FinetuneConfig, finetune  # noqa: E402

ROWS = {
    "uncached, default augmentation": {"cache": False, "augment": True},
    "cached, 1 plain view (default)": {"cache": True},
    "cached, 4 augmented views": {"cache": True, "augment": True, "cache_augmented_views": 4},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/bench-feature-cache")
    parser.add_argument("--train-images", type=int, default=10000)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    arguments = parser.parse_args()

    work = Path(arguments.work)
    data = write_fashion_mnist(work / "data", arguments.train_images, arguments.test_images)
    results = {}
    for index, (name, options) in enumerate(ROWS.items()):
        config = FinetuneConfig(
            data_dir=str(data),
            out=str(work / f"row{index}"),
            pretrained="bundled",
            strategy="features",
            epochs=arguments.epochs,
            patience=arguments.epochs,
            img_size=arguments.img_size,
            lr=arguments.lr,
            **options,
        )
        results[name] = finetune(config, enable_progress_bar=False).to_dict()
    (work / "results.json").write_text(json.dumps(results, indent=2))

    def steady_epoch(summary: dict) -> float:
        return statistics.median(record["seconds"] for record in summary["history"][1:])

    baseline = steady_epoch(next(iter(results.values())))
    print(
        f"\nFashion-MNIST {arguments.train_images} train (10% held out) / "
        f"{arguments.test_images} test, {arguments.img_size}px, {arguments.epochs} epochs, "
        f"features strategy; {platform.machine()}, {torch.get_num_threads()} threads, "
        f"{time.strftime('%Y-%m-%d')}\n"
    )
    print(
        "| row | s/epoch after the first (median) | speed-up | extraction (s) | "
        "total wall (s) | test top-1 |"
    )
    print("|---|---|---|---|---|---|")
    for name, summary in results.items():
        epoch = steady_epoch(summary)
        cache = summary["feature_cache"]
        extraction = f"{cache['extraction_s']:.1f}" if cache else "-"
        print(
            f"| {name} | {epoch:.2f} | {baseline / epoch:.1f}x | {extraction} | "
            f"{summary['wall_time_s']:.0f} | {summary['test_acc']:.4f} |"
        )


if __name__ == "__main__":
    main()
