"""albumentations pipelines for training and evaluation.

Training follows the ResNet recipe, scaled to the model's input size S: resize the short side
to a length drawn from [256/224*S, 480/224*S], take a random SxS crop, flip horizontally, jitter
brightness, contrast and saturation. Evaluation resizes the short side to S / crop_pct and takes
the centre SxS crop. Both normalise with the backbone's own mean and std.
"""

from __future__ import annotations

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from tlkit.config import FinetuneConfig
from tlkit.errors import ConfigError
from tlkit.runfolder import Preprocessing

INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}
REFERENCE_SIZE = 224  # the sizes of the ResNet recipe are given for 224px crops
_default = FinetuneConfig.field_default  # the augmentation's defaults are the config's


def relative_short_sides(short_side_range: tuple[int, int]) -> tuple[float, float]:
    """A scale augmentation's short-side range, given in pixels at 224px inputs, as factors of
    the input size (what the range is at any input size)."""
    low, high = short_side_range
    return low / REFERENCE_SIZE, high / REFERENCE_SIZE


# The short sides tlkit's training augmentation resizes to by default (the ResNet recipe's 256
# to 480 at 224px), relative to the input size: always so before runs recorded their own range.
DEFAULT_TRAINED_SHORT_SIDES = relative_short_sides(
    (_default("short_side_min"), _default("short_side_max"))
)


def interpolation_flag(preprocessing: Preprocessing) -> int:
    """The OpenCV interpolation flag for the backbone's interpolation name."""
    return INTERPOLATIONS.get(preprocessing.interpolation, cv2.INTER_LINEAR)


def _normalise_to_tensor(preprocessing: Preprocessing) -> list[A.BasicTransform]:
    return [
        A.Normalize(mean=preprocessing.mean, std=preprocessing.std, max_pixel_value=255.0),
        ToTensorV2(),
    ]


def train_transform(
    preprocessing: Preprocessing,
    short_side_range: tuple[int, int] = (_default("short_side_min"), _default("short_side_max")),
    hflip: float = _default("hflip"),
    color_jitter: float = _default("color_jitter"),
    seed: int | None = None,
) -> A.Compose:
    """Random scale crop, flip and colour jitter; `short_side_range` is given at 224px."""
    size = preprocessing.input_size
    low, high = (round(side * size / REFERENCE_SIZE) for side in short_side_range)
    if not size <= low <= high:
        raise ConfigError(f"short side range {short_side_range} must satisfy 224 <= low <= high")
    transforms: list[A.BasicTransform] = [
        A.SmallestMaxSize(
            max_size=list(range(low, high + 1)), interpolation=interpolation_flag(preprocessing)
        ),
        A.RandomCrop(size, size),
        A.HorizontalFlip(p=hflip),
    ]
    if color_jitter > 0:
        transforms.append(
            A.ColorJitter(
                brightness=color_jitter,
                contrast=color_jitter,
                saturation=color_jitter,
                hue=0.0,
                p=1.0,
            )
        )
    return A.Compose(transforms + _normalise_to_tensor(preprocessing), seed=seed)


def eval_transform(preprocessing: Preprocessing) -> A.Compose:
    """Resize the short side to S / crop_pct, centre crop SxS, normalise."""
    size = preprocessing.input_size
    return A.Compose(
        [
            A.SmallestMaxSize(
                max_size=round(size / preprocessing.crop_pct),
                interpolation=interpolation_flag(preprocessing),
            ),
            A.CenterCrop(size, size),
            *_normalise_to_tensor(preprocessing),
        ]
    )
