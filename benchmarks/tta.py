"""Test-time averaging presets on real data: accuracy gain and cost per preset.

    python benchmarks/tta.py RUN_DIR DATA_DIR/test [--presets none flip ten-crop multi-scale dense]

RUN_DIR is a tlkit run folder (for docs/tta.md: the Fashion-MNIST 64px `partial` run made by
benchmarks/strategies.py). Each preset is evaluated once after one warm-up pass; prints a
Markdown table of top-1, views per image, images/s, views/s, the views/s ratio to `none` and the
gain over `none`, and saves the raw results as JSON beside the run.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from tlkit.infer.predict import evaluate
from tlkit.infer.tta import PRESETS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run")
    parser.add_argument("data")
    parser.add_argument("--presets", nargs="*", default=list(PRESETS))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--accelerator", default="auto")
    arguments = parser.parse_args()

    evaluate(arguments.run, arguments.data, arguments.batch_size, arguments.accelerator)  # warm-up
    results = {
        preset: evaluate(
            arguments.run, arguments.data, arguments.batch_size, arguments.accelerator, preset
        )
        for preset in arguments.presets
    }
    Path(arguments.run, "tta_benchmark.json").write_text(json.dumps(results, indent=2))

    base = results.get("none")
    print(
        f"\n{results[arguments.presets[0]]['images']} images of {arguments.data}, run "
        f"{arguments.run}; {platform.machine()}, {torch.get_num_threads()} threads, "
        f"{time.strftime('%Y-%m-%d')}\n"
    )
    print(
        "| preset | top-1 | gain over none | views/image | images/s | views/s | views/s vs none |"
    )
    print("|---|---|---|---|---|---|---|")
    for preset, result in results.items():
        cost = result["tta"]
        gain = f"{100 * (result['top1'] - base['top1']):+.2f} pts" if base else "n/a"
        ratio = f"{cost['views_per_second'] / base['tta']['views_per_second']:.2f}x" if base else ""
        print(
            f"| {preset} | {result['top1']:.4f} | {gain} | {cost['views_per_image']} | "
            f"{cost['images_per_second']:.1f} | {cost['views_per_second']:.1f} | {ratio} |"
        )


if __name__ == "__main__":
    main()
