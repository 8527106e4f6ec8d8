"""Frozen-backbone training with and without the feature cache, on Fashion-MNIST.

    python benchmarks/feature_cache.py --train-images 10000 --test-images 2000 --epochs 20
    python benchmarks/feature_cache.py --train-images 1112 --epochs 6 --rows uncached cached

Bundled EfficientNet-Lite0, `--strategy features`, 64px. Rows: uncached (the backbone runs on
every image every epoch, with the default augmentation, as other toolkits' frozen phases do),
cached with one plain view per image (tlkit's default), cached with 4 augmented views. Prints a
Markdown table of the median wall time per epoch after the first, the one-off extraction time,
the speed-up and the test top-1; then the time `tlkit.train.probe.fit_probe` takes on the cached
train and validation features (the linear probe of LP-FT and `--strategy auto`), best and median
of three fits.
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
from tlkit.runfolder import read_config, read_data_facts  # noqa: E402
from tlkit.train.build import build_datamodule, build_model  # noqa: E402
from tlkit.train.probe import fit_probe, probe_features  # noqa: E402

ROWS = {
    "uncached, default augmentation": {"cache": False, "augment": True},
    "cached, 1 plain view (default)": {"cache": True},
    "cached, 4 augmented views": {"cache": True, "augment": True, "cache_augmented_views": 4},
}
ROW_KEYS = dict(zip(["uncached", "cached", "augmented-views"], ROWS, strict=True))
PROBE_FITS = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/bench-feature-cache")
    parser.add_argument("--train-images", type=int, default=10000)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rows", nargs="*", default=list(ROW_KEYS), choices=list(ROW_KEYS))
    arguments = parser.parse_args()

    work = Path(arguments.work)
    data = write_fashion_mnist(work / "data", arguments.train_images, arguments.test_images)
    results = {}
    for index, (name, options) in enumerate(ROWS.items()):
        if name not in [ROW_KEYS[row] for row in arguments.rows]:
            continue
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
    cached_run = work / "row1"
    if (cached_run / "cache").is_dir():
        print_probe_fit_time(cached_run)


def print_probe_fit_time(run: Path) -> None:
    """Time the linear probe on a finished cached run's train and validation features."""
    config = read_config(run)
    images = build_datamodule(config)
    model = build_model(config, read_data_facts(run))
    features = probe_features(model, images, run / "cache")
    fits = [fit_probe(*features, num_classes=len(images.classes)) for _ in range(PROBE_FITS)]
    seconds = sorted(fit.fit_seconds for fit in fits)
    print(
        f"\nLinear probe (tlkit.train.probe.fit_probe) on {len(features[0]):,} train / "
        f"{len(features[2]):,} validation vectors of {features[0].shape[1]:,} features: "
        f"{seconds[0]:.2f} s best, {statistics.median(seconds):.2f} s median of {PROBE_FITS}; "
        f"validation top-1 {fits[0].linear_val_acc:.4f} (k-NN {fits[0].knn_val_acc:.4f}, "
        f"k={fits[0].knn_k})"
    )


if __name__ == "__main__":
    main()
