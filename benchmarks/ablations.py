"""Ablations of fine-tuning options, each row against the same run without it.

    apt-get install dataset-fashion-mnist
    python benchmarks/ablations.py --rows partial partial+layer-decay partial+ema partial+lp-ft

Fashion-MNIST from Debian's `dataset-fashion-mnist`: a stratified, seeded 5,000-image training
set, 1,000 validation images (drawn from the official training split, disjoint from the 5,000)
and 2,000 test images, upscaled to --img-size; bundled EfficientNet-Lite0, --epochs for every
row, no augmentation, the pretrained layers at --backbone-lr-scale (auto's choice for `partial`,
1.0). A row is a base run (`partial`: last 2 stages; `full`), optionally with additions joined
by `+`: `layer-decay` (`--layer-decay`), `ema` (`--ema`), `lp-ft` (`--lp-ft`: the head starts
from the linear probe's; its extraction and fit count in the wall time). A new option is one
entry of `additions`. Every row is an ordinary `tlkit.finetune` run in WORK/<row>; the table of
test top-1 and wall time (with the load average over each row: other work on shared cores slows
a row) is printed and written to WORK/results.md, the raw summaries to WORK/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from fashion_mnist import CLASSES, load_split, stratified_subset  # noqa: E402

from tlkit import FinetuneConfig, finetune  # noqa: E402
from tlkit.data.images import write_image_folder  # noqa: E402

BASES: dict[str, dict[str, Any]] = {
    "partial": {"strategy": "partial", "unfreeze_stages": 2},
    "full": {"strategy": "full"},
}


def additions(arguments: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """What each addition changes in the base run's config."""
    return {
        "layer-decay": {"layer_decay": arguments.layer_decay},
        "ema": {"ema": True, "ema_decay": arguments.ema_decay},
        "lp-ft": {"lp_ft": True},
    }


# EfficientNet-Lite0 has 17 fine timm layer groups (stem, 16 blocks; conv_head joins the last):
# at 0.8 the stem trains at 0.8^16 = 2.8% of the last block's rate, the span of BEiT's and MAE's
# 0.75 over a ViT-B's 12 blocks (0.75^12 = 3.2%); 0.7 would leave the stem at 0.33%.
DEFAULT_LAYER_DECAY = 0.8
DEFAULT_ROWS = ["partial", "partial+layer-decay", "partial+ema", "partial+lp-ft"]


def write_data(folder: Path, train: int, val: int, test: int, seed: int = 0) -> Path:
    """DATA/train, DATA/val (disjoint from train, from the official training split) and
    DATA/test image folders, stratified and seeded; a complete folder is reused."""
    marker = folder / f".complete-{train}-{val}-{test}-{seed}"
    if marker.exists():
        return folder
    images, labels = load_split("train")
    chosen = stratified_subset(labels, train + val, seed)
    held_out = chosen[stratified_subset(labels[chosen], val, seed)]
    training = np.setdiff1d(chosen, held_out)
    test_images, test_labels = load_split("test")
    tested = stratified_subset(test_labels, test, seed)
    for split, split_images, split_labels in (
        ("train", images[training], labels[training]),
        ("val", images[held_out], labels[held_out]),
        ("test", test_images[tested], test_labels[tested]),
    ):
        write_image_folder(split_images, split_labels, CLASSES, folder / split)
    marker.touch()
    return folder


def row_config(row: str, data: Path, out: Path, arguments: argparse.Namespace) -> FinetuneConfig:
    base, *added = row.split("+")
    options = {**BASES[base]}
    for name in added:
        options.update(additions(arguments)[name])
    return FinetuneConfig(
        data_dir=str(data),
        out=str(out),
        pretrained="bundled",
        augment=False,
        epochs=arguments.epochs,
        patience=arguments.epochs,
        img_size=arguments.img_size,
        lr=arguments.lr,
        backbone_lr_scale=arguments.backbone_lr_scale,
        batch_size=64,
        channels_last=True,  # 1.6x faster fine-tuning on this CPU (benchmarks/fashion_mnist.py)
        seed=arguments.seed,
        **options,
    )


def check_rows(rows: list[str], arguments: argparse.Namespace) -> None:
    known = additions(arguments)
    for row in rows:
        base, *added = row.split("+")
        if base not in BASES or any(name not in known for name in added):
            raise SystemExit(
                f"unknown row '{row}': a base ({', '.join(BASES)}) and additions joined by + "
                f"({', '.join(known)})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/bench-ablations")
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, help="BASE[+ADDITION...]")
    parser.add_argument("--train-images", type=int, default=5000)
    parser.add_argument("--val-images", type=int, default=1000)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--backbone-lr-scale", type=float, default=1.0, help="auto's choice for partial"
    )
    parser.add_argument("--layer-decay", type=float, default=DEFAULT_LAYER_DECAY)
    ema_decay = FinetuneConfig.field_default("ema_decay")
    parser.add_argument("--ema-decay", type=float, default=ema_decay)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    check_rows(arguments.rows, arguments)

    work = Path(arguments.work)
    data = write_data(
        work / "data", arguments.train_images, arguments.val_images, arguments.test_images
    )
    heading = (
        f"Fashion-MNIST {arguments.train_images} train / {arguments.val_images} val / "
        f"{arguments.test_images} test, {arguments.img_size}px, bundled EfficientNet-Lite0, "
        f"{arguments.epochs} epochs, lr {arguments.lr} (pretrained layers x"
        f"{arguments.backbone_lr_scale}), no augmentation, layer decay "
        f"{arguments.layer_decay}, EMA decay ceiling {arguments.ema_decay}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}"
    )
    lines = [
        heading,
        "",
        "| row | test top-1 | best val | best epoch | wall time (s) | load average |",
        "|---|---|---|---|---|---|",
    ]
    results = {}
    for row in arguments.rows:
        out = work / row
        shutil.rmtree(out, ignore_errors=True)
        load_before = os.getloadavg()[0]
        summary = finetune(row_config(row, data, out, arguments), enable_progress_bar=False)
        load = (load_before + os.getloadavg()[0]) / 2  # 1-minute averages at start and end
        results[row] = {**summary.to_dict(), "load_average": round(load, 2)}
        lines.append(
            f"| {row} | {summary.test_acc:.4f} | {summary.best_val_acc:.4f} | "
            f"{summary.best_epoch} | {summary.wall_time_s:.0f} | {load:.1f} |"
        )
        (work / "results.json").write_text(json.dumps(results, indent=2))
        (work / "results.md").write_text("\n".join(lines) + "\n")
        print(lines[-1], flush=True)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
