"""Test-time averaging: several views of each image, one averaged prediction.

The lecture's protocol (ResNet): resize the image at several scales, short side in
S x {1, 256/224, 384/224, 480/224, 640/224}; at each scale take ten SxS crops (four corners,
centre, and the horizontal flips of those five); average the predictions.

Presets (views per image):

| preset        | views   | what                                                               |
|---------------|---------|--------------------------------------------------------------------|
| `none`        | 1       | the plain evaluation transform (resize to S/crop_pct, centre crop) |
| `flip`        | 2       | that view and its mirror image                                     |
| `ten-crop`    | 10      | corners + centre + flips at one scale, S/crop_pct                  |
| `multi-scale` | 10 x n  | ten-crop at each of n scales (default the five above: 50 views)    |
| `dense`       | n       | the whole square image at each scale through global pooling        |

Non-square images: the views are taken from the central square of the resized image (the same
square the plain centre crop comes from), so every view of a batch has one shape.

How it is computed: the data loader produces, per image, one normalised square tensor per scale
(albumentations, the same resize as evaluation). On the model's device, the crops of a whole batch
are tensor slices and the flips a `torch.flip`, with no loop over images; all views of a chunk of
images go through the network as one batch, chunked to bound memory. Hand-written because ttach
(the usual library) runs one forward pass per transform, merges only same-size views and has no
corner crops.
"""

from __future__ import annotations

from dataclasses import dataclass

import albumentations as A
import pytorch_lightning as pl
import torch
from albumentations.pytorch import ToTensorV2
from torch import nn

from tlkit.augment import eval_transform, interpolation_flag
from tlkit.backbones import Preprocessing

RESNET_SCALES = (224 / 224, 256 / 224, 384 / 224, 480 / 224, 640 / 224)
PRESETS = ("none", "flip", "ten-crop", "multi-scale", "dense")
AVERAGES = ("probabilities", "geometric")


@dataclass(frozen=True)
class TTAPlan:
    """A preset resolved for one input size: the square sizes to load and how to take views."""

    preset: str
    input_size: int
    scale_sizes: tuple[int, ...]  # short side (and square size) of each loaded scale
    views: str  # "single", "flip", "ten", "whole"
    average: str = "probabilities"

    @property
    def views_per_image(self) -> int:
        per_scale = {"single": 1, "flip": 2, "ten": 10, "whole": 1}[self.views]
        return per_scale * len(self.scale_sizes)


def plan(
    preset: str,
    preprocessing: Preprocessing,
    scales: tuple[float, ...] | None = None,
    average: str = "probabilities",
) -> TTAPlan:
    """Resolve a preset name for the model's preprocessing; `scales` overrides the ResNet set
    (relative to the input size) for `multi-scale` and `dense`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown TTA preset '{preset}': choose one of {', '.join(PRESETS)}")
    if average not in AVERAGES:
        raise ValueError(f"unknown TTA average '{average}': choose one of {', '.join(AVERAGES)}")
    size = preprocessing.input_size
    resize = round(size / preprocessing.crop_pct)
    if preset in ("none", "flip"):
        sizes, views = (size,), "single" if preset == "none" else "flip"
    elif preset == "ten-crop":
        sizes, views = (resize,), "ten"
    else:
        relative = scales or RESNET_SCALES
        sizes = tuple(sorted({max(size, round(size * factor)) for factor in relative}))
        views = "ten" if preset == "multi-scale" else "whole"
    return TTAPlan(preset, size, sizes, views, average)


class ScaleSquares:
    """albumentations-style transform: `image` -> one normalised square tensor per scale.

    Preset `none`/`flip` load the plain evaluation view itself, so `none` equals evaluation.
    """

    def __init__(self, tta: TTAPlan, preprocessing: Preprocessing) -> None:
        if tta.views in ("single", "flip"):
            self.pipelines = [eval_transform(preprocessing)]
        else:
            self.pipelines = [
                A.Compose(
                    [
                        A.SmallestMaxSize(
                            max_size=side, interpolation=interpolation_flag(preprocessing)
                        ),
                        A.CenterCrop(side, side),
                        A.Normalize(mean=preprocessing.mean, std=preprocessing.std),
                        ToTensorV2(),
                    ]
                )
                for side in tta.scale_sizes
            ]

    def __call__(self, image) -> dict[str, tuple[torch.Tensor, ...]]:
        return {"image": tuple(pipeline(image=image)["image"] for pipeline in self.pipelines)}


def ten_crops(squares: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, L, L) -> (B, 10, C, size, size): corners, centre, then the same five mirrored."""
    side = squares.shape[-1]
    far, middle = side - size, (side - size) // 2
    offsets = ((0, 0), (0, far), (far, 0), (far, far), (middle, middle))
    crops = torch.stack([squares[..., y : y + size, x : x + size] for y, x in offsets], dim=1)
    return torch.cat([crops, crops.flip(-1)], dim=1)


def make_views(squares: torch.Tensor, tta: TTAPlan) -> torch.Tensor:
    """All views of a batch at one scale: (B, V, C, H, W)."""
    if tta.views == "single" or tta.views == "whole":
        return squares.unsqueeze(1)
    if tta.views == "flip":
        return torch.stack([squares, squares.flip(-1)], dim=1)
    return ten_crops(squares, tta.input_size)


def average_views(probabilities: torch.Tensor, average: str) -> torch.Tensor:
    """(B, V, K) class probabilities of every view -> (B, K).

    `probabilities`: their mean. `geometric`: the renormalised geometric mean, which equals the
    softmax of the mean logits (each view's log-probabilities differ from its logits by a
    constant per view).
    """
    if average == "geometric":
        return probabilities.clamp_min(1e-30).log().mean(dim=1).softmax(dim=-1)
    return probabilities.mean(dim=1)


def check_accepts_any_size(model, tta: TTAPlan) -> None:
    """`dense` feeds whole images larger than the training size: refuse fixed-size models."""
    if tta.views == "whole" and not isinstance(model, nn.Module):
        raise ValueError(
            "TTA preset 'dense' needs the PyTorch model of a run folder; an exported model "
            "takes its fixed input size. Use 'multi-scale' (fixed-size crops) instead."
        )
    backbone = getattr(model, "backbone", model)
    config = getattr(backbone, "pretrained_cfg", {})
    fixed = config.get("fixed_input_size", False) and not getattr(
        backbone, "dynamic_img_size", False
    )
    if tta.views == "whole" and fixed:
        raise ValueError(
            f"TTA preset 'dense' needs a backbone that accepts any input size; "
            f"{config.get('architecture')} has a fixed input size. "
            "Use 'multi-scale' (fixed-size crops) instead."
        )


class TTAModule(pl.LightningModule):
    """Wraps a classifier so that `Trainer.predict` returns TTA-averaged probabilities.

    `model` is anything with `predict_batch(images) -> probabilities` (`tlkit.inference.
    Predictor`): a `TransferClassifier`, or an exported model called directly.
    """

    def __init__(self, model, tta: TTAPlan, max_views_per_forward: int = 256) -> None:
        super().__init__()
        check_accepts_any_size(model, tta)
        self.model = model
        self.tta = tta
        self.max_views_per_forward = max_views_per_forward

    def forward(self, scales: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Per-scale batches of squares -> (B, K) averaged probabilities."""
        views = [self._view_probabilities(make_views(s, self.tta)) for s in scales]
        return average_views(torch.cat(views, dim=1).float(), self.tta.average)

    def _view_probabilities(self, views: torch.Tensor) -> torch.Tensor:
        per_image = views.shape[1]
        images_per_forward = max(1, self.max_views_per_forward // per_image)
        chunks = [
            self.model.predict_batch(chunk.flatten(0, 1)).unflatten(0, (-1, per_image))
            for chunk in views.split(images_per_forward)
        ]
        return torch.cat(chunks)

    def predict_step(self, batch, batch_index: int) -> torch.Tensor:
        scales, _labels = batch
        return self(scales)
