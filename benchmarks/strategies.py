"""Transfer strategies on real data: Fashion-MNIST, bundled EfficientNet-Lite0, equal epochs.

    apt-get install dataset-fashion-mnist
    python benchmarks/strategies.py --train-images 5000 --test-images 2000 --epochs 5

Rows: random init (full training from scratch), features (frozen backbone), partial (last 2
stages), full (backbone at 0.1x the head's learning rate). Prints a Markdown table of test top-1,
wall time and trainable parameters, and saves the raw summaries as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from fashion_mnist import write_fashion_mnist  # noqa: E402

from tlkit import FinetuneConfig, finetune  # noqa: E402

ROWS = {
    "random init, full": {"pretrained": "none", "strategy": "full"},
    "features (frozen backbone)": {"pretrained": "bundled", "strategy": "features"},
    "partial (last 2 stages)": {
        "pretrained": "bundled",
        "strategy": "partial",
        "unfreeze_stages": 2,
    },
    "full (backbone lr x0.1)": {"pretrained": "bundled", "strategy": "full"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/bench-strategies")
    parser.add_argument("--train-images", type=int, default=5000)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), help="subset of the rows")
    arguments = parser.parse_args()

    work = Path(arguments.work)
    data = write_fashion_mnist(work / "data", arguments.train_images, arguments.test_images)
    results = {}
    for name in arguments.rows:
        out = work / name.split(" ")[0]
        config = FinetuneConfig(
            data_dir=str(data),
            out=str(out),
            epochs=arguments.epochs,
            patience=arguments.epochs,
            img_size=arguments.img_size,
            lr=arguments.lr,
            batch_size=64,
            **ROWS[name],
        )
        results[name] = finetune(config, enable_progress_bar=False).to_dict()
    (work / "results.json").write_text(json.dumps(results, indent=2))

    print(
        f"\nFashion-MNIST {arguments.train_images} train (10% held out for validation) / "
        f"{arguments.test_images} test, {arguments.img_size}px, {arguments.epochs} epochs, "
        f"lr {arguments.lr}; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}\n"
    )
    print("| row | test top-1 | best val | wall time (s) | trainable parameters |")
    print("|---|---|---|---|---|")
    for name, summary in results.items():
        print(
            f"| {name} | {summary['test_acc']:.4f} | {summary['best_val_acc']:.4f} | "
            f"{summary['wall_time_s']:.0f} | {summary['trainable_parameters']:,} |"
        )


if __name__ == "__main__":
    main()
