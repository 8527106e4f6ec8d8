"""Fine-tune on Fashion-MNIST from Debian's `dataset-fashion-mnist` package (no download).

    apt-get install dataset-fashion-mnist
    python recipes/fashion_mnist.py --data runs/fashion-mnist-data --out runs/fashion-mnist \
        --train-images 5000 --test-images 2000 --strategy partial --epochs 5

The package's IDX files are read directly; a stratified, seeded subset is written as an image
folder (`DATA/train/<class>/`, `DATA/test/<class>/`) inside --data and nowhere else, then the
ordinary `tlkit.train.finetune` runs on it.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from tlkit import FinetuneConfig, finetune
from tlkit.data.images import write_image_folder

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSES = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
]
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format): big-endian dims after a 4-byte magic number."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dimensions = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dimensions))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dimensions).reshape(shape)


def load_split(split: str, root: Path = FASHION_MNIST) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = FILES[split]
    if not (root / images_file).is_file():
        raise SystemExit(f"{root / images_file} missing: apt-get install dataset-fashion-mnist")
    return read_idx(root / images_file), read_idx(root / labels_file)


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Indices of a class-balanced random subset (all indices when size covers the split)."""
    indices = np.arange(len(labels))
    if size >= len(labels):
        return indices
    subset, _ = train_test_split(indices, train_size=size, stratify=labels, random_state=seed)
    return np.sort(subset)


def write_fashion_mnist(data: Path, train_images: int, test_images: int, seed: int = 0) -> Path:
    """Write the subset as an image folder once; an existing complete folder is reused."""
    marker = data / f".complete-{train_images}-{test_images}-{seed}"
    if marker.exists():
        return data
    for split, size in (("train", train_images), ("test", test_images)):
        images, labels = load_split(split)
        chosen = stratified_subset(labels, size, seed)
        write_image_folder(images[chosen], labels[chosen], CLASSES, data / split)
    marker.touch()
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="runs/fashion-mnist-data", help="image folder to write")
    parser.add_argument("--out", default="runs/fashion-mnist", help="run folder")
    parser.add_argument("--train-images", type=int, default=5000)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--strategy", default="partial", choices=["features", "partial", "full"])
    parser.add_argument("--unfreeze-stages", type=int, default=2)
    parser.add_argument("--pretrained", default="bundled")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()

    data = write_fashion_mnist(
        Path(arguments.data), arguments.train_images, arguments.test_images, arguments.seed
    )
    summary = finetune(
        FinetuneConfig(
            data_dir=str(data),
            out=arguments.out,
            pretrained=arguments.pretrained,
            strategy=arguments.strategy,
            unfreeze_stages=arguments.unfreeze_stages,
            epochs=arguments.epochs,
            img_size=arguments.img_size,
            lr=arguments.lr,
            seed=arguments.seed,
        )
    )
    print(f"Fashion-MNIST test accuracy: {summary.test_acc:.4f}")


if __name__ == "__main__":
    main()
