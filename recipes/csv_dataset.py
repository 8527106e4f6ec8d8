"""Fine-tune from a CSV of `path,label` rows with `tlkit.train.finetune` and a config object.

    python recipes/csv_dataset.py labels.csv [--out runs/csv] [--epochs 10]

Paths in the CSV are relative to the CSV's folder and must stay inside it. 10% of the rows
(stratified by label) are held out for validation and 10% for a test split, evaluated once at
the end; evaluate on another CSV afterwards with `tlkit evaluate RUN_DIR other.csv`.
"""

from __future__ import annotations

import argparse

from tlkit import FinetuneConfig, finetune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv")
    parser.add_argument("--out", default="runs/csv")
    parser.add_argument("--pretrained", default="bundled")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--img-size", type=int, default=224)
    arguments = parser.parse_args()

    config = FinetuneConfig(
        data_dir=arguments.csv,
        out=arguments.out,
        pretrained=arguments.pretrained,
        epochs=arguments.epochs,
        img_size=arguments.img_size,
    )
    summary = finetune(config)
    if summary.test_acc is None:  # classes too small to hold out a test image
        estimate = "none (no test split)"
    else:
        low, high = summary.test_acc_interval
        estimate = (
            f"{summary.test_acc:.4f} on {summary.test_images} held-out images "
            f"(95% interval {low:.3f}-{high:.3f})"
        )
    print(
        f"test accuracy {estimate}; best validation accuracy {summary.best_val_acc:.4f} at "
        f"epoch {summary.best_epoch}; run folder {arguments.out}"
    )


if __name__ == "__main__":
    main()
