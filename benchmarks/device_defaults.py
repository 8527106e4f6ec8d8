"""Precision and memory layout on this device: the training step's images/s for each.

    python benchmarks/device_defaults.py --work runs/bench-epoch --sizes 64 224 --batch-sizes 64 256

On the data of benchmarks/epoch.py (64 px: Fashion-MNIST PNGs; 224 px: photo crops; written
there when missing), for each strategy (partial with its last 2 stages, full), input size,
batch size, precision (32, 16-mixed where the device has no bf16, bf16-mixed) and memory
layout (default, channels-last): epoch.py's step rate, a plain loop of tlkit's model,
optimiser and schedule on preloaded batches on the device, under torch's autocast as
Lightning's mixed-precision plugin runs it. The question it answers is which precision and
layout tlkit should default to on an accelerator (`tlkit.train.hardware.device_defaults`).
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch
from epoch import STRATEGIES, benchmark_data, step_rate

from tlkit import FinetuneConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/bench-epoch")
    parser.add_argument("--strategies", nargs="+", default=["partial", "full"], choices=STRATEGIES)
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 224], choices=[64, 224])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[64])
    parser.add_argument("--precisions", nargs="+", default=["32", "bf16-mixed"])
    parser.add_argument("--step-seconds", type=float, default=2.0)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--preloaded", type=int, default=4, help="batches the steps cycle over")
    parser.add_argument("--train-images", type=int, default=5000)
    parser.add_argument("--val-images", type=int, default=1000)
    parser.add_argument("--photo-train-images", type=int, default=640)
    parser.add_argument("--photo-val-images", type=int, default=128)
    arguments = parser.parse_args()
    data = benchmark_data(Path(arguments.work), arguments)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}\n")
    print("| strategy | px | batch | precision | layout | step images/s |")
    print("|---|---|---|---|---|---|")
    for size in arguments.sizes:
        folder = data[size]()
        for strategy, batch_size, precision, channels_last in itertools.product(
            arguments.strategies, arguments.batch_sizes, arguments.precisions, (False, True)
        ):
            config = FinetuneConfig(
                data_dir=str(folder),
                pretrained="bundled",
                img_size=size,
                batch_size=batch_size,
                precision=precision,
                channels_last=channels_last,
                test_fraction=0.0,
                **STRATEGIES[strategy],
            )
            arguments.batch_size = batch_size
            speed = step_rate(config, arguments)
            layout = "channels-last" if channels_last else "default"
            print(f"| {strategy} | {size} | {batch_size} | {precision} | {layout} | {speed:.0f} |")


if __name__ == "__main__":
    main()
