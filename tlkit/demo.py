"""The embedded default job: fine-tune the bundled EfficientNet-Lite0 on scikit-learn's digits.

scikit-learn ships 1,797 real 8x8 handwritten digits (no download); they are written out as an
ordinary image folder (train/ and test/, stratified and seeded) so the demo exercises exactly the
path a user's own folder takes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from tlkit.config import FinetuneConfig
from tlkit.data import write_image_folder

DEMO_TEST_FRACTION = 0.2


def write_digits_folder(root: str | Path, seed: int = 0) -> Path:
    """Write the digits as PNGs into `root/train/<digit>/` and `root/test/<digit>/`."""
    root = Path(root)
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # values are 0..16
    indices = np.arange(len(images))
    train, test = train_test_split(
        indices, test_size=DEMO_TEST_FRACTION, stratify=digits.target, random_state=seed
    )
    class_names = [str(digit) for digit in digits.target_names]
    for split, split_indices in (("train", train), ("test", test)):
        write_image_folder(
            images[split_indices], digits.target[split_indices], class_names, root / split
        )
    return root


def demo_config(out: str | Path = "runs/demo", **overrides) -> FinetuneConfig:
    """The demo's settings: bundled weights, 64px, a few epochs that fit 2 CPU cores."""
    values = {
        "data_dir": str(Path(out).parent / f"{Path(out).name}-digits"),
        "out": str(out),
        "backbone": "tf_efficientnet_lite0",
        "pretrained": "bundled",
        "strategy": "partial",
        "unfreeze_stages": 3,
        "img_size": 64,
        "epochs": 5,
        "batch_size": 32,
        "lr": 2e-3,
        # Digits are not mirror-symmetric, colourless and fill the frame: no flip, no colour
        # jitter, milder scale crops than the ImageNet recipe.
        "hflip": 0.0,
        "color_jitter": 0.0,
        "short_side_min": 224,
        "short_side_max": 288,
    }
    return FinetuneConfig.from_dict({**values, **overrides})
