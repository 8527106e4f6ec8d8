"""What `--strategy auto`'s probe costs, and how it grows with classes and images.

    apt-get install dataset-fashion-mnist
    python benchmarks/probe_cost.py --work /tmp/probe-cost
    python benchmarks/probe_cost.py --work /tmp/probe-cost --fits-only

1. The probe as a run measures it (`tlkit.train.auto.measure`: the scan, a per-class sample
   of at most `auto.PROBE_IMAGES_PER_CLASS` training and validation images, their features
   extracted by the bundled EfficientNet-Lite0 at 64 px, the L-BFGS fit, the k-NN), on a folder
   of 100 classes x 100 training (and 20 validation) images: real Fashion-MNIST images, each
   of the 10 classes dealt into 10 arbitrary sub-classes (a cost measurement: the labels are
   not meant to be learnt). Twice: cold (extraction) and warm (the features read back from
   the cache).
2. The fit alone (`tlkit.train.probe.fit_probe`) on random 1,280-d feature vectors, at the
   sizes the per-class sample allows: C classes x min(images per class, the sample) vectors,
   for C = 10, 100, 1,000; what it would cost without the sample is the same fit at the
   dataset's full size (given for the sizes that fit in memory and time here).

The extraction grows with C x the sample (at most 100 per class), not with the dataset; the
fit with C x the sample x C (its gradient is an (N x D) by (D x C) product), 20 L-BFGS
iterations per penalty. docs/strategies.md extrapolates from these numbers.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from fashion_mnist import read_idx  # noqa: E402

from tlkit import FinetuneConfig  # noqa: E402
from tlkit.data.images import write_image_folder  # noqa: E402
from tlkit.train import auto  # noqa: E402
from tlkit.train.probe import fit_probe  # noqa: E402

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 100, 100, 20
FASHION = Path("/usr/share/datasets/fashion-mnist")


def write_hundred_classes(root: Path) -> Path:
    """ROOT/train and ROOT/val: 100 classes of Fashion-MNIST images (10 per real class)."""
    if (root / ".complete").exists():
        return root
    images = read_idx(FASHION / "train-images-idx3-ubyte.gz")
    labels = read_idx(FASHION / "train-labels-idx1-ubyte.gz")
    per_class = TRAIN_PER_CLASS + VAL_PER_CLASS
    chosen, classes = [], []
    for real in range(10):
        members = np.flatnonzero(labels == real)[: 10 * per_class]
        for sub in range(10):
            chosen.append(members[sub * per_class : (sub + 1) * per_class])
            classes.append(f"{real}-{sub}")
    for split, part in (
        ("train", slice(0, TRAIN_PER_CLASS)),
        ("val", slice(TRAIN_PER_CLASS, None)),
    ):
        indices = np.concatenate([members[part] for members in chosen])
        names = np.repeat(np.arange(len(chosen)), len(chosen[0][part]))
        write_image_folder(images[indices], names, classes, root / split)
    (root / ".complete").touch()
    return root


def time_measure(data: Path, work: Path) -> list[str]:
    rows = []
    shutil.rmtree(work / "run", ignore_errors=True)
    config = FinetuneConfig(
        data_dir=str(data), out=str(work / "run"), pretrained="bundled", img_size=64
    )
    for label in ("cold (extraction)", "warm (cache read)"):
        started = time.perf_counter()
        evidence, _size, _sized, _images = auto.measure(config, progress=False)
        total = time.perf_counter() - started
        rows.append(
            f"| {label} | {evidence.classes} x {evidence.probe_images // evidence.classes} | "
            f"{evidence.probe_seconds:.1f} | {total:.1f} |"
        )
    return rows


def time_fits(sizes: list[tuple[int, int]]) -> list[str]:
    rows = []
    generator = torch.Generator().manual_seed(0)
    for classes, per_class in sizes:
        count = classes * per_class
        train_x = torch.randn(count, 1280, generator=generator)
        train_y = torch.arange(count) % classes
        val_x = torch.randn(classes * 20, 1280, generator=generator)
        val_y = torch.arange(classes * 20) % classes
        started = time.perf_counter()
        probe = fit_probe(train_x, train_y, val_x, val_y, num_classes=classes)
        total = time.perf_counter() - started
        rows.append(
            f"| {classes} | {per_class} | {count:,} | {probe.fit_seconds:.2f} | {total:.2f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/probe-cost", help="folder for data and runs")
    parser.add_argument("--fits-only", action="store_true", help="only part 2, the fits")
    arguments = parser.parse_args()
    work = Path(arguments.work)
    print(f"{platform.node()}, {torch.get_num_threads()} torch threads, {time.ctime()}")
    if not arguments.fits_only:
        data = write_hundred_classes(work / "hundred-classes")
        print("\n| probe | classes x images probed | probe s | measure s |\n|---|---|---|---|")
        print("\n".join(time_measure(data, work)))
    print(
        "\n| classes | vectors per class | vectors | fit s | with k-NN s |\n|---|---|---|---|---|"
    )
    sizes = [(10, 100), (100, 100), (1000, 100), (10, 1000), (100, 1000)]
    print("\n".join(time_fits(sizes)))


if __name__ == "__main__":
    main()
