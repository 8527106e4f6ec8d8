"""The evidence `--strategy auto` measures, on several real datasets and input sizes.

    apt-get install dataset-fashion-mnist
    python benchmarks/auto_evidence.py --datasets textures --sizes auto
    python benchmarks/auto_evidence.py --datasets "Fashion-MNIST 600" digits --sizes 32 64 128

For each dataset and input size (`auto`: the size auto chooses), `tlkit.train.auto.measure` runs
exactly as before a `tlkit finetune --strategy auto` run: images per class, the sources' short
side, the linear probe and k-NN validation accuracy on cached features of the bundled
EfficientNet-Lite0, and the time the probe took (extraction and fit); the last column is what
`tlkit.train.auto.decide` chooses from that evidence. Datasets: Fashion-MNIST subsets (28px
grayscale clothing), scikit-learn's digits (8px), and texture patches (64px) cut from scikit-image's
brick, grass, gravel and moon photos, training patches from the top three quarters of each
photo and validation patches from the bottom quarter (no overlap).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import skimage.data
import torch
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from fashion_mnist import write_fashion_mnist  # noqa: E402

from tlkit import FinetuneConfig  # noqa: E402
from tlkit.data.images import write_image_folder  # noqa: E402
from tlkit.train.auto import decide, measure  # noqa: E402

TEXTURES = ("brick", "grass", "gravel", "moon")
PATCH, STRIDE = 64, 32


def write_digits(root: Path) -> Path:
    """scikit-learn's 1,797 digits (8x8, values 0-16) as one image folder."""
    if not (root / ".complete").exists():
        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        names = [str(digit) for digit in digits.target_names]
        write_image_folder(images, digits.target, names, root)
        (root / ".complete").touch()
    return root


def write_textures(root: Path) -> Path:
    """DATA/train and DATA/val patches of scikit-image's texture photos, split by region."""
    if (root / ".complete").exists():
        return root
    for split, rows in (("train", slice(0, 384)), ("val", slice(384, 512))):
        patches, labels = [], []
        for label, name in enumerate(TEXTURES):
            photo = getattr(skimage.data, name)()[rows]
            for top in range(0, photo.shape[0] - PATCH + 1, STRIDE):
                for left in range(0, photo.shape[1] - PATCH + 1, STRIDE):
                    patches.append(photo[top : top + PATCH, left : left + PATCH])
                    labels.append(label)
        write_image_folder(np.stack(patches), np.array(labels), list(TEXTURES), root / split)
    (root / ".complete").touch()
    return root


# name: (folder in WORK, writes the image folder there, validation fraction)
DATASETS = {
    "Fashion-MNIST 600": ("fashion-600", lambda root: write_fashion_mnist(root, 600, 100), 1 / 6),
    "Fashion-MNIST 6000": (
        "fashion-6000",
        lambda root: write_fashion_mnist(root, 6000, 100),
        1 / 6,
    ),
    "digits": ("digits", write_digits, 0.2),
    "textures": ("textures", write_textures, 0.1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/bench-auto-evidence")
    parser.add_argument("--sizes", nargs="*", default=["auto", "32", "64", "128"])
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS), help="subset")
    arguments = parser.parse_args()

    work = Path(arguments.work)
    results = work / "evidence.json"
    rows = json.loads(results.read_text()) if results.exists() else []  # earlier invocations
    for name in arguments.datasets:
        folder, write, val_fraction = DATASETS[name]
        data = write(work / folder)
        for size in arguments.sizes:
            config = FinetuneConfig(
                data_dir=str(data),
                out=str(work / "runs" / name),
                cache_dir=str(work / "cache"),
                pretrained="bundled",
                img_size=None if size == "auto" else int(size),
                val_fraction=val_fraction,
                num_workers=0,
            )
            evidence, chosen_size, _sampled = measure(config, progress=False)
            choices = decide(evidence, ["strategy", "unfreeze_stages", "epochs", "augment"])
            decision = ", ".join(f"{field} {choice.value}" for field, choice in choices.items())
            rows.append({"dataset": name, "size": size, **vars(evidence), "decision": decision})
            results.write_text(json.dumps(rows, indent=2))
            print(f"{name} {size}: {rows[-1]}", file=sys.stderr)

    print(
        f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"{time.strftime('%Y-%m-%d')}\n"
    )
    print(
        "| dataset | train images | per class (min-median) | source short side | input | "
        "linear probe | k-NN | probe (s) | auto's decision |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        size = f"{row['input_size']}" + (" (auto)" if row["size"] == "auto" else "")
        print(
            f"| {row['dataset']} | {row['train_images']} | {row['images_per_class_min']}-"
            f"{row['images_per_class_median']:.0f} | {row['source_short_side_median']:.0f} | "
            f"{size} | {row['linear_val_acc']:.4f} | {row['knn_val_acc']:.4f} | "
            f"{row['probe_seconds']:.1f} | {row['decision']} |"
        )


if __name__ == "__main__":
    main()
