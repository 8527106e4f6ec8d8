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
| `multi-scale` | 30      | ten-crop at each of those scales the model was trained at          |
| `dense`       | n       | the whole square image at each of those scales (global pooling)    |

A preset is one entry of `PRESETS`: its name (the CLI's --tta choice) and the function that
resolves it to the squares to load and the views to cut from them. `auto` is no preset: it
stands for the preset chosen on the run's validation split at the end of training
(`choose_preset`, the rule; `tlkit.infer.predict.choose_tta`, the measurement).

Only views the model was trained on: a model trained without horizontal flips (`--hflip 0`,
`--no-augment`) gets no mirror images (ten-crop: the five crops; multi-scale: five per scale),
and `flip`, which only adds the mirror image, is refused for it. Likewise `multi-scale` and
`dense` use only the scales whose short side lies within the range training resized images to
(`trained_short_sides`, relative to the input size: 256/224 to 480/224 by default, so 256, 384
and 480 of the five ResNet scales), and always the evaluation scale S / crop_pct: larger
scales show objects larger than the model ever saw them (FixRes, Touvron et al. 2019). A model
trained without scale augmentation saw the evaluation resize only: its `multi-scale` is
`ten-crop`.

No duplicate views: at a scale whose square is the crop size (the first ResNet scale, ten-crop
with crop_pct 1) the five crops are one and the same view, computed once (with its mirror).
Each scale still weighs 1/n in the average, however many distinct views it has, so the result
is the lecture's mean over ten views at every scale.

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

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import albumentations as A
import pytorch_lightning as pl
import torch
from albumentations.pytorch import ToTensorV2
from torch import nn

from tlkit.choices import TTA_AUTO as AUTO
from tlkit.data.augment import DEFAULT_TRAINED_SHORT_SIDES, eval_transform, interpolation_flag
from tlkit.data.datasets import LoadedBatch
from tlkit.errors import ConfigError
from tlkit.model.tasks import TASKS, TaskDefinition
from tlkit.runfolder import Preprocessing

# The ResNet paper's test scales (short side at 224px inputs), relative to the input size: the
# candidates of `multi-scale` and `dense`, of which a model gets those it was trained at.
RESNET_SCALES = (224 / 224, 256 / 224, 384 / 224, 480 / 224, 640 / 224)
# float32 bytes one loader batch may hold: the squares of every scale of its images, plus the
# views made on the device from its largest scale (views are made one scale at a time). Each
# loader worker prefetches 2 batches, so the loader holds at most (2 x workers + 1) of them.
# 224px multi-scale needs 17 MB per image: batches of 15 instead of 64 (1.1 GB).
TTA_MEMORY_BUDGET = 256 * 2**20
FLOAT32_BYTES = 4


@dataclass(frozen=True)
class TTAPlan:
    """A preset resolved for one input size: the square sizes to load and how to take views."""

    preset: str
    input_size: int
    scale_sizes: tuple[int, ...]  # short side (and square size) of each loaded scale
    views: str  # "single" (the square), "crops" (corners and centre), "whole" (the square)
    mirrored: bool  # each view also mirrored
    average: str = "probabilities"

    def views_at(self, side: int) -> int:
        """Distinct views of a square of `side` pixels: corners and centre coincide when the
        square is the crop."""
        crops = 5 if self.views == "crops" and side > self.input_size else 1
        return crops * (2 if self.mirrored else 1)

    @property
    def views_per_image(self) -> int:
        return sum(self.views_at(side) for side in self.scale_sizes)

    @property
    def bytes_per_image(self) -> int:
        """float32 bytes of one image's squares plus the views of its largest scale."""
        squares = sum(3 * side**2 for side in self.scale_sizes)
        views = max(
            self.views_at(side) * 3 * (side if self.views == "whole" else self.input_size) ** 2
            for side in self.scale_sizes
        )
        return FLOAT32_BYTES * (squares + views)


# What a preset takes from an image: the square sizes to load, how views are cut from them,
# and whether each view is also mirrored.
Views = tuple[tuple[int, ...], str, bool]


def _plain(preprocessing: Preprocessing, scales: tuple[float, ...], mirrored: bool) -> Views:
    return (preprocessing.input_size,), "single", False


def _flip(preprocessing: Preprocessing, scales: tuple[float, ...], mirrored: bool) -> Views:
    if not mirrored:
        # Refused rather than run as `none`: results labelled `flip` would silently be `none`'s.
        raise ConfigError(
            "TTA preset 'flip' only adds the mirror image, and this model was trained without "
            "horizontal flips (--hflip 0 or --no-augment): it never saw a mirror image. "
            "Use 'none', or 'ten-crop' for five crops without mirror images."
        )
    return (preprocessing.input_size,), "single", True


def _ten_crop(preprocessing: Preprocessing, scales: tuple[float, ...], mirrored: bool) -> Views:
    return (round(preprocessing.input_size / preprocessing.crop_pct),), "crops", mirrored


def _multi_scale(preprocessing: Preprocessing, scales: tuple[float, ...], mirrored: bool) -> Views:
    return _scale_sizes(preprocessing.input_size, scales), "crops", mirrored


def _dense(preprocessing: Preprocessing, scales: tuple[float, ...], mirrored: bool) -> Views:
    return _scale_sizes(preprocessing.input_size, scales), "whole", False


def _scale_sizes(size: int, scales: tuple[float, ...]) -> tuple[int, ...]:
    return tuple(sorted({max(size, round(size * factor)) for factor in scales}))


def trained_scales(
    preprocessing: Preprocessing,
    candidates: tuple[float, ...],
    trained_short_sides: tuple[float, float],
) -> tuple[float, ...]:
    """The candidate scales whose short side, in pixels at the input size, lies within the
    range training resized images to (rounded as the augmentation rounds it), and the
    evaluation scale S / crop_pct, which every model was validated at."""
    size = preprocessing.input_size
    low, high = (round(size * factor) for factor in trained_short_sides)
    inside = tuple(factor for factor in candidates if low <= round(size * factor) <= high)
    return (*inside, 1 / preprocessing.crop_pct)


# Each preset: (the model's preprocessing, the scales relative to its input size that it was
# trained at, whether it was trained on mirror images) -> its views. The CLI's --tta choices are
# the keys.
PRESETS: dict[str, Callable[[Preprocessing, tuple[float, ...], bool], Views]] = {
    "none": _plain,
    "flip": _flip,
    "ten-crop": _ten_crop,
    "multi-scale": _multi_scale,
    "dense": _dense,
}


def plan(
    preset: str,
    preprocessing: Preprocessing,
    scales: tuple[float, ...] | None = None,
    average: str = "probabilities",
    mirrored: bool = True,
    trained_short_sides: tuple[float, float] = DEFAULT_TRAINED_SHORT_SIDES,
) -> TTAPlan:
    """Resolve a preset name for the model's preprocessing; `scales` replaces the ResNet set of
    candidate scales (relative to the input size) of `multi-scale` and `dense`, of which those
    within `trained_short_sides` (the short sides training resized to, relative to the input
    size) are used, with the evaluation scale. `mirrored=False` (a model trained without
    horizontal flips) leaves the mirror images out."""
    if preset not in PRESETS:
        if preset == AUTO:
            raise ConfigError(
                f"--tta {AUTO} stands for the preset chosen on a run's validation split; resolve "
                "it first (tlkit.infer.predict.resolve_tta)"
            )
        raise ConfigError(f"unknown TTA preset '{preset}': choose one of {', '.join(PRESETS)}")
    if average not in AVERAGES:
        raise ConfigError(f"unknown TTA average '{average}': choose one of {', '.join(AVERAGES)}")
    candidates = trained_scales(preprocessing, scales or RESNET_SCALES, trained_short_sides)
    sizes, views, mirrored = PRESETS[preset](preprocessing, candidates, mirrored)
    return TTAPlan(preset, preprocessing.input_size, sizes, views, mirrored, average)


# --tta auto ---------------------------------------------------------------------------------

# The presets auto chooses among, cheapest first. Not `dense`: its views are larger than the
# crops the model was trained on, and it only runs on backbones that take any input size.
AUTO_CANDIDATES = ("none", "flip", "ten-crop", "multi-scale")
# A costlier preset replaces a cheaper choice when its validation top-1 is higher by more than
# `AUTO_MIN_Z` standard errors of the paired difference (McNemar's z): the z that a gain reaches
# by luck alone with this chance, one-sided (5%: z 1.645). Measured on the held-out suite
# (docs/benchmarks.md, "Test-time averaging chosen on validation"): at z 2 fashion-600's
# ten-crop (z 1.67 on 66 validation images) was left out, and it scored 2.5 points above none
# on 2,000 test images; no other dataset's preset came near the line (z 0.56 and below).
AUTO_CHANCE_OF_A_LUCKY_GAIN = 0.05
AUTO_MIN_Z = NormalDist().inv_cdf(1 - AUTO_CHANCE_OF_A_LUCKY_GAIN)
AUTO_RULE = (
    "the cheapest preset, unless a costlier one's validation top-1 is higher than the current "
    f"choice's by more than {AUTO_MIN_Z:.3f} standard errors of the paired difference, "
    "sqrt(b + c) / n, where b and c count the images only one of the two gets right (McNemar)"
)


def candidate_plans(
    preprocessing: Preprocessing,
    mirrored: bool = True,
    trained_short_sides: tuple[float, float] = DEFAULT_TRAINED_SHORT_SIDES,
) -> list[TTAPlan]:
    """The presets auto may choose for a model, cheapest first: `AUTO_CANDIDATES` without
    `flip` for a model trained without flips, and without a preset whose views repeat a
    cheaper one's (`multi-scale` of a model trained at one scale is `ten-crop`)."""
    plans: list[TTAPlan] = []
    for preset in AUTO_CANDIDATES:
        if preset == "flip" and not mirrored:
            continue
        candidate = plan(
            preset, preprocessing, None, "probabilities", mirrored, trained_short_sides
        )
        views = (candidate.scale_sizes, candidate.views, candidate.mirrored)
        if all(views != (known.scale_sizes, known.views, known.mirrored) for known in plans):
            plans.append(candidate)
    return plans


def covers(wide: TTAPlan, narrow: TTAPlan) -> bool:
    """Whether `wide`'s views include every view of `narrow`: the same views cut from the same
    squares (`ScaleSquares` loads a square of a given side one way), at a subset of its
    scales, mirrored only where `wide` is (`flip` covers `none`; `multi-scale` covers
    `ten-crop`, whose scale, the evaluation scale, every `multi-scale` has)."""
    return (
        wide.input_size == narrow.input_size
        and wide.views == narrow.views
        and set(narrow.scale_sizes) <= set(wide.scale_sizes)
        and (wide.mirrored or not narrow.mirrored)
    )


def measuring_plans(plans: list[TTAPlan]) -> list[TTAPlan]:
    """The plans whose views are computed to measure all of `plans` once each: those not
    covered by another plan with more views (`covers`); the others' views are taken from
    them (`views_of`), so no view is computed twice."""
    return [
        narrow
        for narrow in plans
        if not any(
            covers(wide, narrow) and wide.views_per_image > narrow.views_per_image for wide in plans
        )
    ]


def views_of(wide: TTAPlan, narrow: TTAPlan, per_view: torch.Tensor) -> list[torch.Tensor]:
    """`narrow`'s views, per scale ((B, V_s, K) each, for `average_scales`), taken from the
    (B, V, K) probabilities of every view of `wide` (`TTAModule(per_view=True)`), which
    `covers` it: at each of its scales all views, or the unmirrored first half
    (`make_views` puts the mirrored ones last)."""
    if not covers(wide, narrow):
        raise ValueError(f"the views of '{wide.preset}' do not include those of '{narrow.preset}'")
    per_scale, start = [], 0
    for side in wide.scale_sizes:
        count = wide.views_at(side)
        if side in narrow.scale_sizes:
            per_scale.append(per_view[:, start : start + narrow.views_at(side)])
        start += count
    return per_scale


def choose_preset(correct: dict[str, torch.Tensor]) -> tuple[str, list[dict[str, float]]]:
    """The preset to use from each candidate's correct predictions (bool, one per image, the
    same images), cheapest first: the cheapest, replaced by each costlier one whose top-1 is
    higher than the current choice's by more than `AUTO_MIN_Z` standard errors of the paired
    difference, sqrt(b + c) / n, where b and c count the images only one of the two gets right
    (McNemar's test). Returns the choice and, per candidate, its evidence."""
    chosen, evidence = None, []
    for preset, hits in correct.items():
        record = {"preset": preset, "top1": int(hits.sum()) / len(hits), "correct": int(hits.sum())}
        if chosen is None:
            chosen = preset
        else:
            gain = int(hits.sum()) - int(correct[chosen].sum())
            disagreements = int((hits != correct[chosen]).sum())
            z = gain / math.sqrt(disagreements) if disagreements else 0.0
            record.update(compared_with=chosen, gain_images=gain, z=round(z, 2))
            if z > AUTO_MIN_Z:
                chosen = preset
        evidence.append(record)
    if chosen is None:
        raise ValueError("no candidate preset to choose from")
    return chosen, evidence


def can_be_outdone(mistakes: int) -> bool:
    """Whether any costlier preset could replace a choice that gets `mistakes` validation
    images wrong under `choose_preset`'s rule. A candidate's gain is the images it fixes less
    those it breaks, both disagreements, so its z is at most sqrt(fixed) <= sqrt(mistakes):
    with 2 mistakes or fewer (z at most 1.41) nothing can, and no other view need be computed."""
    return math.sqrt(mistakes) > AUTO_MIN_Z


def loader_batch_size(tta: TTAPlan, batch_size: int) -> int:
    """Images per loader batch: `batch_size`, fewer when their squares and views would take more
    than `TTA_MEMORY_BUDGET` bytes, at least 1."""
    return max(1, min(batch_size, TTA_MEMORY_BUDGET // tta.bytes_per_image))


class ScaleSquares:
    """albumentations-style transform: `image` -> one normalised square tensor per scale.

    Preset `none`/`flip` load the plain evaluation view itself, so `none` equals evaluation.
    """

    def __init__(self, tta: TTAPlan, preprocessing: Preprocessing) -> None:
        if tta.views == "single":
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


def five_crops(squares: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, L, L) -> (B, 5, C, size, size): the four corners and the centre; (B, 1, C, L, L)
    when L is `size`, where all five are the square itself."""
    side = squares.shape[-1]
    if side == size:
        return squares.unsqueeze(1)
    far, middle = side - size, (side - size) // 2
    offsets = ((0, 0), (0, far), (far, 0), (far, far), (middle, middle))
    return torch.stack([squares[..., y : y + size, x : x + size] for y, x in offsets], dim=1)


def make_views(squares: torch.Tensor, tta: TTAPlan) -> torch.Tensor:
    """All views of a batch at one scale: (B, V, C, H, W), the mirrored ones last."""
    views = five_crops(squares, tta.input_size) if tta.views == "crops" else squares.unsqueeze(1)
    return torch.cat([views, views.flip(-1)], dim=1) if tta.mirrored else views


def _mean(probabilities: torch.Tensor, weights: torch.Tensor, task: TaskDefinition) -> torch.Tensor:
    return (probabilities * weights).sum(dim=1)


def _mean_logits(
    probabilities: torch.Tensor, weights: torch.Tensor, task: TaskDefinition
) -> torch.Tensor:
    return task.activation((task.logits_of(probabilities) * weights).sum(dim=1))


# Each average: (B, V, K) probabilities of the views, their (1, V, 1) weights and the model's
# task -> (B, K).
AVERAGES: dict[str, Callable[[torch.Tensor, torch.Tensor, TaskDefinition], torch.Tensor]] = {
    "probabilities": _mean,
    "geometric": _mean_logits,
}


def average_scales(
    per_scale: list[torch.Tensor], average: str, task: TaskDefinition
) -> torch.Tensor:
    """Per scale, (B, V_s, K) probabilities of its views -> (B, K) (`average_views`): every
    scale weighs the same, however many distinct views it has."""
    weights = torch.cat(
        [
            torch.full((views.shape[1],), 1 / (views.shape[1] * len(per_scale)))
            for views in per_scale
        ]
    )
    return average_views(torch.cat(per_scale, dim=1).float(), average, weights, task)


def average_views(
    probabilities: torch.Tensor,
    average: str,
    weights: torch.Tensor | None = None,
    task: TaskDefinition = TASKS["single-label"],
) -> torch.Tensor:
    """(B, V, K) class probabilities of every view -> (B, K), each view weighted by `weights`
    (V,), which sum to 1 (default: equal weights).

    `probabilities`: their weighted mean (per class, for either task). `geometric`: the task's
    activation of the weighted mean logits, recovered from the probabilities
    (`TaskDefinition.logits_of`): for softmax the renormalised weighted geometric mean (each
    view's log-probabilities differ from its logits by a constant per view), for sigmoids the
    mean log-odds.
    """
    if weights is None:
        weights = probabilities.new_full(probabilities.shape[1:2], 1 / probabilities.shape[1])
    return AVERAGES[average](probabilities, weights.to(probabilities).view(1, -1, 1), task)


def check_accepts_any_size(model, tta: TTAPlan) -> None:
    """`dense` feeds whole images larger than the training size: refuse fixed-size models."""
    if tta.views == "whole" and not isinstance(model, nn.Module):
        raise ConfigError(
            "TTA preset 'dense' needs the PyTorch model of a run folder; an exported model "
            "takes its fixed input size. Use 'multi-scale' (fixed-size crops) instead."
        )
    backbone = getattr(model, "backbone", model)
    config = getattr(backbone, "pretrained_cfg", {})
    fixed = config.get("fixed_input_size", False) and not getattr(
        backbone, "dynamic_img_size", False
    )
    if tta.views == "whole" and fixed:
        raise ConfigError(
            f"TTA preset 'dense' needs a backbone that accepts any input size; "
            f"{config.get('architecture')} has a fixed input size. "
            "Use 'multi-scale' (fixed-size crops) instead."
        )


class TTAModule(pl.LightningModule):
    """Wraps a classifier so that `Trainer.predict` returns TTA-averaged probabilities.

    `model` is anything with `predict_batch(images) -> probabilities` (`tlkit.infer.predict.
    Predictor`): a `TransferClassifier`, or an exported model called directly.
    """

    def __init__(
        self, model, tta: TTAPlan, max_views_per_forward: int = 256, per_view: bool = False
    ) -> None:
        super().__init__()
        check_accepts_any_size(model, tta)
        self.model = model
        self.tta = tta
        self.max_views_per_forward = max_views_per_forward
        self.per_view = per_view

    def forward(self, scales: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Per-scale batches of squares -> (B, K) averaged probabilities (`average_scales`);
        with `per_view`, the probabilities of every view, (B, V, K), scale after scale in
        `tta.scale_sizes`' order (`views_of` takes a narrower plan's from them)."""
        views = [self._view_probabilities(make_views(s, self.tta)) for s in scales]
        if self.per_view:
            return torch.cat(views, dim=1)
        return average_scales(views, self.tta.average, self.model.task)

    def _view_probabilities(self, views: torch.Tensor) -> torch.Tensor:
        per_image = views.shape[1]
        images_per_forward = max(1, self.max_views_per_forward // per_image)
        chunks = [
            self.model.predict_batch(chunk.flatten(0, 1)).unflatten(0, (-1, per_image))
            for chunk in views.split(images_per_forward)
        ]
        return torch.cat(chunks)

    def predict_step(
        self, batch: LoadedBatch, batch_index: int
    ) -> tuple[torch.Tensor | None, torch.Tensor, list[tuple[int, str]]]:
        """The averaged probabilities of the images of the batch that loaded (None if none
        did), with their positions and the failures of the others (`data.LoadedBatch`)."""
        probabilities = self(batch.images) if batch.images is not None else None
        return probabilities, batch.positions, batch.failures
