"""Test-time averaging presets on real data: accuracy gain and cost per preset, and auto's choice.

    python benchmarks/tta.py RUN_DIR DATA_DIR/test [--presets none flip ten-crop multi-scale dense]
        [--all-scales]

RUN_DIR is a tlkit run folder (for docs/tta.md: a Fashion-MNIST 64px `partial` run). Each preset
is evaluated once after one warm-up pass; prints a Markdown table of top-1, views per image,
images/s, views/s, the views/s ratio to `none` and the gain over `none`, then the preset the run
chose on its validation split for `--tta auto` (summary.json's `tta_choice`) with its evidence,
and saves the raw results as JSON beside the run. `--all-scales` adds `multi-scale` at all five
ResNet scales (short side 224 to 640 at 224), as tlkit averaged before it kept to the scales the
run trained at.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from tlkit.infer.predict import evaluate, load_model, predict_labelled
from tlkit.infer.tta import PRESETS, RESNET_SCALES
from tlkit.metrics import classification_metrics
from tlkit.runfolder import read_summary

ALL_SCALES_ROW = "multi-scale, all 5 scales"


def multi_scale_at_all_scales(run: str, data: str, batch_size: int, accelerator: str) -> dict:
    """`multi-scale` over every ResNet scale, whatever the run trained at (tlkit before)."""
    model = load_model(run)
    model.hparams.trained_short_sides = (min(RESNET_SCALES), max(RESNET_SCALES))
    predictions = predict_labelled(model, data, batch_size, accelerator, "multi-scale")
    metrics = classification_metrics(
        predictions.probabilities, predictions.labels, model.class_names
    )
    return {"images": metrics.images, "top1": metrics.top1, "tta": predictions.cost}


def print_choice(choice: dict[str, Any] | None) -> None:
    if choice is None:
        print("\nThe run recorded no choice for --tta auto (trained with --no-choose-tta, or old).")
        return
    print(
        f"\n--tta auto: {choice['preset']}, chosen on {choice['images']} validation images in "
        f"{choice['seconds']:.0f} s ({choice['rule']})\n"
    )
    print("| preset | validation top-1 | views/image | images/s | gain (images) | z |")
    print("|---|---|---|---|---|---|")
    for record in choice["candidates"]:
        gain = (
            f"{record['gain_images']:+d} vs {record['compared_with']}"
            if "compared_with" in record
            else "-"
        )
        print(
            f"| {record['preset']} | {record['top1']:.4f} | {record['views_per_image']} | "
            f"{record['images_per_second']:.1f} | {gain} | {record.get('z', '-')} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run")
    parser.add_argument("data")
    parser.add_argument("--presets", nargs="*", default=list(PRESETS))
    parser.add_argument("--all-scales", action="store_true", help="also multi-scale at 224-640")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--accelerator", default="auto")
    arguments = parser.parse_args()
    run, data = arguments.run, arguments.data

    evaluate(run, data, arguments.batch_size, arguments.accelerator)  # warm-up
    results = {
        preset: evaluate(run, data, arguments.batch_size, arguments.accelerator, preset)
        for preset in arguments.presets
    }
    if arguments.all_scales:
        results[ALL_SCALES_ROW] = multi_scale_at_all_scales(
            run, data, arguments.batch_size, arguments.accelerator
        )
    choice = read_summary(run).tta_choice
    Path(run, "tta_benchmark.json").write_text(
        json.dumps({"presets": results, "tta_choice": choice}, indent=2)
    )

    base = results.get("none")
    first = next(iter(results.values()))
    print(
        f"\n{first['images']} images of {data}, run {run}; {platform.machine()}, "
        f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}\n"
    )
    print(
        "| preset | top-1 | gain over none | scales (px) | views/image | images/s | views/s "
        "| views/s vs none |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for preset, result in results.items():
        cost = result["tta"]
        gain = f"{100 * (result['top1'] - base['top1']):+.2f} pts" if base else "n/a"
        ratio = f"{cost['views_per_second'] / base['tta']['views_per_second']:.2f}x" if base else ""
        plain_view = cost["preset"] in ("none", "flip")  # the evaluation transform's view
        scales = "evaluation" if plain_view else ", ".join(map(str, cost["scale_sizes"]))
        print(
            f"| {preset} | {result['top1']:.4f} | {gain} | {scales} | {cost['views_per_image']} | "
            f"{cost['images_per_second']:.1f} | {cost['views_per_second']:.1f} | {ratio} |"
        )
    print_choice(choice)


if __name__ == "__main__":
    main()
