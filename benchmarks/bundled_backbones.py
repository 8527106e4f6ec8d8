"""The bundled backbones on this machine: load time and forward-pass throughput.

    python benchmarks/bundled_backbones.py [--batch-size 16] [--repeats 3] [--img-size 64]

For each backbone of `tlkit.model.backbones.bundled_backbones()` (cheapest first): the time
`create_backbone(name, "bundled")` takes (reading the package's file, renaming its tensors,
timm's loader), then images/s of the feature extractor's forward pass on a random batch at the
backbone's own input size, or at `--img-size` for all (auto's size for small sources), in eval
mode under `torch.inference_mode`, after one warm-up pass, the best of `--repeats`. Prints a
Markdown table beside the published ImageNet top-1 and multiply-adds.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from tlkit.model.backbones import bundled_backbones, create_backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--img-size", type=int, help="one input size for all (default: their own)")
    arguments = parser.parse_args()

    rows = []
    for bundled in bundled_backbones():
        started = time.perf_counter()
        backbone = create_backbone(bundled.architecture, "bundled").eval()
        load_seconds = time.perf_counter() - started
        size = arguments.img_size or bundled.input_size
        images = torch.randn(arguments.batch_size, 3, size, size)
        with torch.inference_mode():
            backbone(images)  # warm-up
            seconds = []
            for _ in range(arguments.repeats):
                started = time.perf_counter()
                backbone(images)
                seconds.append(time.perf_counter() - started)
        rows.append((bundled, size, load_seconds, arguments.batch_size / min(seconds)))

    print(
        f"\nbatch {arguments.batch_size}, best of {arguments.repeats}; "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"{time.strftime('%Y-%m-%d')}\n"
    )
    print("| backbone | input size | load (s) | images/s | ImageNet top-1 | multiply-adds |")
    print("|---|---|---|---|---|---|")
    for bundled, size, load_seconds, images_per_second in rows:
        print(
            f"| {bundled.architecture} | {size} | {load_seconds:.2f} | "
            f"{images_per_second:.1f} | {bundled.imagenet_top1}% | "
            f"{bundled.multiply_adds / 1e6:.0f}M |"
        )


if __name__ == "__main__":
    main()
