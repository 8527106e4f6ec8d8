"""`tlkit finetune DATA` with no strategy flags (`--strategy auto`) against the manual rows.

    apt-get install dataset-fashion-mnist
    python benchmarks/auto.py --train-images 6000 --val-fraction 0.1667 --test-images 2000

The issue's set-up: a stratified Fashion-MNIST subset (6,000 training images, a sixth held out
for validation: 5,000 train / 1,000 validation) and 2,000 test images, bundled
EfficientNet-Lite0. Every row is the command line `tlkit finetune DATA` in its own process,
timed from start to exit (auto's measurements included): auto with no strategy, epoch, size or
augmentation flag, and the manual rows at --img-size 64 and --epochs 5 with tlkit's other
defaults. Prints a Markdown table and writes WORK/results.json.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from fashion_mnist import write_fashion_mnist  # noqa: E402

MANUAL = ["--img-size", "64", "--epochs", "5"]
ROWS = {
    "auto (no strategy flags)": [],
    "today's default: partial, 2 stages, default augmentation": [
        "--strategy", "partial", "--unfreeze-stages", "2", *MANUAL
    ],
    "partial, 2 stages, --no-augment": [
        "--strategy", "partial", "--unfreeze-stages", "2", "--no-augment", *MANUAL
    ],
    "full --no-augment": ["--strategy", "full", "--no-augment", *MANUAL],
    "features (cached)": ["--strategy", "features", *MANUAL],
}  # fmt: skip


def run_row(data: Path, out: Path, flags: list[str], common: list[str]) -> dict:
    """One `tlkit finetune` process; its summary.json plus the process's wall time."""
    command = [sys.executable, "-m", "tlkit.cli", "finetune", str(data), "--out", str(out)]
    started = time.perf_counter()
    subprocess.run([*command, *common, *flags], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    summary = json.loads((out / "summary.json").read_text())
    return {"flags": flags, "process_wall_s": round(wall, 1), "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/bench-auto")
    parser.add_argument("--train-images", type=int, default=6000)
    parser.add_argument("--val-fraction", type=float, default=0.1667)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), help="subset of the rows")
    arguments = parser.parse_args()

    work = Path(arguments.work)
    data = write_fashion_mnist(work / "data", arguments.train_images, arguments.test_images)
    common = ["--pretrained", "bundled", "--val-fraction", str(arguments.val_fraction)]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = {}
    for index, name in enumerate(arguments.rows):
        results[name] = run_row(data, work / f"row{index}", ROWS[name], common)
        (work / "results.json").write_text(json.dumps(results, indent=2))
        print(f"{name}: {results[name]['summary']['test_acc']:.4f}", file=sys.stderr)

    print(
        f"\nFashion-MNIST {arguments.train_images} train images ({arguments.val_fraction:.4f} "
        f"held out for validation) / {arguments.test_images} test, bundled "
        f"tf_efficientnet_lite0; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}\n"
    )
    print("| row | strategy | input | epochs run | test top-1 | wall (s) |")
    print("|---|---|---|---|---|---|")
    for name, result in results.items():
        summary = result["summary"]
        strategy = summary["strategy"]
        if summary.get("unfreeze_stages"):
            strategy += f" ({summary['unfreeze_stages']} stages)"
        print(
            f"| {name} | {strategy} | {summary['preprocessing']['input_size']} px | "
            f"{summary['epochs_run']} | {summary['test_acc']:.4f} | {result['process_wall_s']} |"
        )
    for name, result in results.items():
        decision = result["summary"].get("auto_decision")
        if decision:
            print(f"\n{name}: evidence {json.dumps(decision['evidence'])}")
            for field, choice in decision["choices"].items():
                print(f"- {field} = {choice['value']}: {choice['reason']}")


if __name__ == "__main__":
    main()
