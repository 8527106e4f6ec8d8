"""What loading a training image costs, stage by stage: decoding, then each transform of tlkit's
training pipeline, in one process, per image.

    apt-get install dataset-fashion-mnist
    python benchmarks/loading.py --images 500

Sources: the epoch benchmark's data (benchmarks/epoch.py: Fashion-MNIST's 28 px PNGs trained at
64 px, square photo crops of 224-512 px as JPEG trained at 224 px) and a 3000x2000 photo
(scikit-image's cat, upscaled, as PNG) trained at 224 px. For each: the decode (`load_rgb`),
each transform of `train_transform` alone on the previous stage's outputs, the whole pipeline,
and the pipeline that resized the whole image before cropping (`SmallestMaxSize` then
`RandomCrop`, as tlkit did before `ShortSideScaleCrop`), alternated with the whole pipeline.
Each figure is the fastest of --repeats passes over the images (microseconds per image), so
other work on the machine moves it less. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import skimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from epoch import benchmark_data  # noqa: E402

from tlkit.data.augment import REFERENCE_SIZE, interpolation_flag, train_transform  # noqa: E402
from tlkit.data.images import load_rgb  # noqa: E402
from tlkit.model.backbones import preprocessing as backbone_preprocessing  # noqa: E402

BACKBONE = "tf_efficientnet_lite0"


def large_photos(folder: Path, count: int) -> list[Path]:
    """`count` copies of scikit-image's cat upscaled to 3000x2000, as PNG (a phone photo's size)."""
    folder.mkdir(parents=True, exist_ok=True)
    large = cv2.resize(skimage.data.chelsea(), (3000, 2000), interpolation=cv2.INTER_CUBIC)
    paths = [folder / f"{index}.png" for index in range(count)]
    for path in paths:
        if not path.is_file():
            cv2.imwrite(str(path), large[:, :, ::-1])
    return paths


def fastest_us(work: Callable[[], object], items: int, repeats: int) -> float:
    """The fastest of `repeats` runs of `work` (which handles `items` images), in us an image."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return 1e6 * min(times) / items


def resize_first(pipeline: A.Compose, size: int, interpolation: int) -> A.Compose:
    """`pipeline` with its scale crop done as tlkit did before: the whole image resized to the
    drawn short side, then the crop."""
    low, high = (round(side * size / REFERENCE_SIZE) for side in (256, 480))
    return A.Compose(
        [
            A.SmallestMaxSize(max_size=list(range(low, high + 1)), interpolation=interpolation),
            A.RandomCrop(size, size),
            *list(pipeline.transforms)[1:],
        ],
        seed=0,
    )


def stage_costs(paths: list[Path], size: int, repeats: int) -> list[tuple[str, float]]:
    """(stage, us an image) for decoding, each transform, the pipeline and its resize-first
    form."""
    preprocessing = backbone_preprocessing(BACKBONE, size)
    pipeline = train_transform(preprocessing, seed=0)
    images = [load_rgb(path) for path in paths]
    costs = [("decode", fastest_us(lambda: [load_rgb(p) for p in paths], len(paths), repeats))]
    stage = images
    for transform in pipeline.transforms:
        alone = A.Compose([transform], seed=0)
        outputs = [alone(image=image)["image"] for image in stage]
        cost = fastest_us(lambda s=stage, t=alone: [t(image=i) for i in s], len(stage), repeats)
        costs.append((type(transform).__name__, cost))
        stage = outputs
    before = resize_first(pipeline, size, interpolation_flag(preprocessing))
    whole, old = [], []
    for _ in range(repeats):  # alternated, so that both see the same machine
        whole.append(fastest_us(lambda: [pipeline(image=i) for i in images], len(images), 1))
        old.append(fastest_us(lambda: [before(image=i) for i in images], len(images), 1))
    costs += [("whole pipeline", min(whole)), ("whole, resized before the crop", min(old))]
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/bench-loading")
    parser.add_argument("--images", type=int, default=500, help="of each source (20 large)")
    parser.add_argument("--repeats", type=int, default=5)
    arguments = parser.parse_args()
    work = Path(arguments.work)
    data_arguments = argparse.Namespace(
        train_images=arguments.images,
        val_images=10,
        photo_train_images=arguments.images,
        photo_val_images=8,
    )
    writers = benchmark_data(work, data_arguments)
    sources = {
        "Fashion-MNIST 28 px PNG -> 64 px": (sorted((writers[64]() / "train").rglob("*.png")), 64),
        "photo crops JPEG -> 224 px": (sorted((writers[224]() / "train").rglob("*.jpg")), 224),
        "3000x2000 PNG -> 224 px": (large_photos(work / "large", 20), 224),
    }
    columns = {
        name: dict(stage_costs(paths, size, arguments.repeats))
        for name, (paths, size) in sources.items()
    }
    print(
        f"\n{platform.machine()}, {np.__name__} {np.__version__}, albumentations "
        f"{A.__version__}, opencv {cv2.__version__}, {time.strftime('%Y-%m-%d %H:%M')}; "
        f"fastest of {arguments.repeats}, us an image\n"
    )
    stages = list(next(iter(columns.values())))
    print("| stage | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for stage in stages:
        print(
            f"| {stage} | "
            + " | ".join(f"{column[stage]:.0f}" for column in columns.values())
            + " |"
        )


if __name__ == "__main__":
    main()
