"""LP-FT against plain fine-tuning on Fashion-MNIST: the same run with and without --lp-ft.

    apt-get install dataset-fashion-mnist
    python benchmarks/lp_ft.py --rows partial-2 full

5,000 train / 1,000 validation / 2,000 test images (6,000 training images written, a sixth held
out for validation), 64px, bundled EfficientNet-Lite0, 5 epochs, no augmentation, tlkit's other
defaults. Each row is trained twice, from the zero head and from the linear probe's head (LP-FT,
Kumar et al. 2022); the probe's cost (feature extraction and fit) is part of the wall time.
Prints a Markdown table of test top-1, best validation top-1, the probe's validation top-1 and
the wall time, and saves the raw summaries as JSON.
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
    "partial-2": {"strategy": "partial", "unfreeze_stages": 2},
    "partial-1": {"strategy": "partial", "unfreeze_stages": 1},
    "full": {"strategy": "full"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/bench-lp-ft")
    parser.add_argument("--train-images", type=int, default=6000, help="train + validation")
    parser.add_argument("--val-fraction", type=float, default=1 / 6)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rows", nargs="*", default=["partial-2"], choices=list(ROWS))
    arguments = parser.parse_args()

    work = Path(arguments.work)
    data = write_fashion_mnist(work / "data", arguments.train_images, arguments.test_images)
    results = {}
    for row in arguments.rows:
        for lp_ft in (False, True):
            name = f"{row}{', LP-FT' if lp_ft else ''}"
            config = FinetuneConfig(
                data_dir=str(data),
                out=str(work / f"{row}{'-lp-ft' if lp_ft else ''}"),
                pretrained="bundled",
                epochs=arguments.epochs,
                patience=arguments.epochs,
                img_size=arguments.img_size,
                lr=arguments.lr,
                val_fraction=arguments.val_fraction,
                augment=False,
                lp_ft=lp_ft,
                **ROWS[row],
            )
            results[name] = finetune(config, enable_progress_bar=False).to_dict()
            print(f"{name}: test top-1 {results[name]['test_acc']:.4f}", flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))

    some = next(iter(results.values()))
    print(
        f"\nFashion-MNIST {some['train_images']:,} train / {some['val_images']:,} validation / "
        f"{some['test_images']:,} test, {arguments.img_size}px, {arguments.epochs} epochs, "
        f"no augmentation, lr {arguments.lr}; {platform.machine()}, "
        f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}\n"
    )
    print("| run | test top-1 | best val | probe val (fit s) | wall time (s) |")
    print("|---|---|---|---|---|")
    for name, summary in results.items():
        probe = summary["linear_probe"]
        probe_cell = f"{probe['linear_val_acc']:.4f} ({probe['fit_seconds']:.1f})" if probe else "-"
        print(
            f"| {name} | {summary['test_acc']:.4f} | {summary['best_val_acc']:.4f} | "
            f"{probe_cell} | {summary['wall_time_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
