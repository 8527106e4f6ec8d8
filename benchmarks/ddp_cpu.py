"""Two DDP processes against one on the CPU: same data, same effective batch, same epochs.

    python benchmarks/ddp_cpu.py DATA_DIR [--epochs 2] [--img-size 64]

DATA_DIR is an image folder with train/ and test/ (for docs/benchmarks.md: the Fashion-MNIST
5,000/2,000 subset written by benchmarks/strategies.py). Runs `tlkit finetune` through the CLI,
once with one process (batch 64) and once with `--devices 2 --dist-strategy ddp` (batch 32 per
process), and prints wall time and test accuracy as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data")
    parser.add_argument("--work", default="runs/bench-ddp-cpu")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--img-size", type=int, default=64)
    arguments = parser.parse_args()

    common = [
        "--pretrained",
        "bundled",
        "--strategy",
        "partial",
        "--epochs",
        str(arguments.epochs),
        "--img-size",
        str(arguments.img_size),
        "--lr",
        "2e-3",
        "--accelerator",
        "cpu",
        "--patience",
        str(arguments.epochs),
    ]
    rows = {
        "1 process, batch 64": ["--devices", "1", "--batch-size", "64"],
        "2 DDP processes, batch 32 each": [
            "--devices",
            "2",
            "--dist-strategy",
            "ddp",
            "--batch-size",
            "32",
        ],
    }
    results = {}
    for index, (name, flags) in enumerate(rows.items()):
        out = Path(arguments.work) / f"row{index}"
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "tlkit.cli",
                "finetune",
                arguments.data,
                "--out",
                str(out),
                *common,
                *flags,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        summary = json.loads((out / "summary.json").read_text())
        results[name] = {"wall_s": time.perf_counter() - started, **summary}

    print(
        f"\n{arguments.data}, partial (2 stages), {arguments.img_size}px, {arguments.epochs} "
        f"epochs, effective batch 64; {platform.machine()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}\n"
    )
    print("| run | wall time incl. start-up (s) | training epochs (s) | test top-1 |")
    print("|---|---|---|---|")
    for name, result in results.items():
        epochs = sum(record["seconds"] for record in result["history"])
        print(f"| {name} | {result['wall_s']:.0f} | {epochs:.0f} | {result['test_acc']:.4f} |")


if __name__ == "__main__":
    main()
