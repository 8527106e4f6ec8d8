"""`--strategy auto`: measure the data cheaply, then choose how to fine-tune.

Before training, `resolve_auto` measures (`measure`): images per class in the training split and
its class ratio (largest over smallest class), the source images' short side (from the file
headers of a seeded sample, nothing decoded), and a linear probe and a k-NN classifier on the
frozen backbone's cached features (tlkit/train/probe.py, validation top-1, or mAP for a
multi-label task; the cache is the `features` strategy's, so choosing `features` reuses it).
From that evidence the pure functions `choose_input_size` and `decide` choose what the user left
open: strategy and stages, the pretrained layers' learning rate, schedule length, input size,
augmentation, LP-FT and the monitored metric. Every choice a
flag or config key gives is kept. The rules and the measurements behind each threshold are in
docs/strategies.md ("How auto decides").

The resolved choices go into the run's config.yaml (a resumed run repeats them without
measuring again), the decision with its evidence into RUN_DIR/auto.json and summary.json, and
a few lines into the log.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError
from pytorch_lightning.utilities import rank_zero_only
from timm.models import get_pretrained_cfg

from tlkit.config import FIXED_CHOICES, FinetuneConfig
from tlkit.model.backbones import layer_groups, preprocessing
from tlkit.model.tasks import resolve_monitor, task_of
from tlkit.train.build import build_datamodule, build_model, cache_folder, data_facts
from tlkit.train.hardware import probe_device
from tlkit.train.probe import fit_probe, probe_features

logger = logging.getLogger(__name__)

SIZE_SAMPLE_FILES = 200  # training files whose headers give the source image sizes

# Input size: sources smaller than the backbone's pretrained input are upsampled to about twice
# their short side, rounded up to a multiple of 32 (the backbones' total stride), at least 64.
UPSAMPLE_FACTOR = 2
SIZE_MULTIPLE = 32
MIN_INPUT_SIZE = 64

# Strategy, by median training images per class and the linear probe's validation accuracy.
FEATURES_BELOW_PER_CLASS = 40  # fewer: only the head trains
PROBE_SOLVED = 0.97  # the frozen features already separate the classes: only the head trains
TWO_STAGES_FROM_PER_CLASS = 400
FULL_FROM_PER_CLASS = 5_000

# Learning rate of the pretrained layers relative to the head's (--backbone-lr-scale). `partial`
# trains only the last, task-specific stages: at the head's rate they gained 4.6 points over a
# tenth of it on the 5,000-image Fashion-MNIST goal set-up (docs/strategies.md). `full` keeps
# the tenth, the discriminative rate that protects the early, generic layers.
PARTIAL_BACKBONE_LR_SCALE = 1.0
FULL_BACKBONE_LR_SCALE = 0.1

# Schedule: BiT's HyperRule by dataset size (Kolesnikov et al. 2020: 500 / 10k / 20k steps of
# 512 images below 20k / up to 500k / above 500k images), scaled to 8% of those images for
# short CPU runs, in epochs between MIN_EPOCHS and MAX_EPOCHS: 4 epochs at 5,000 images, where
# `partial` with its last stages at the head's rate peaked on validation in epoch 3 or 4 of a
# 4- and a 5-epoch run (docs/strategies.md).
HYPERRULE = ((20_000, 500), (500_000, 10_000), (math.inf, 20_000))  # (below N images, steps)
HYPERRULE_BATCH = 512
CPU_SHARE = 0.08
MIN_EPOCHS, MAX_EPOCHS = 3, 30
FEATURES_MIN_EPOCHS = 10  # a cached-features epoch costs well under a second per 1,000 images

# Augmentation: off in HyperRule's small-data regime (short runs underfit with it); above it,
# scale crops sized to the sources: gentle for upsampled small images, ImageNet's for photos.
AUGMENT_FROM_IMAGES = 20_000
GENTLE_CROPS = {"short_side_min": 224, "short_side_max": 288, "color_jitter": 0.0}
IMAGENET_CROPS = {"short_side_min": 256, "short_side_max": 480, "color_jitter": 0.4}


@dataclass(frozen=True)
class Evidence:
    """What `decide` reads: measured on the training split before any training."""

    classes: int
    train_images: int
    images_per_class_min: int
    images_per_class_median: float
    source_short_side_median: float | None  # None: no sampled file had a readable header
    pretrained_input_size: int  # the backbone's, from timm's pretrained config
    backbone_stages: int  # timm layer groups, stem first
    input_size: int  # the size the probe ran at
    linear_val_acc: float | None = None  # None: not probed; the probe's `probe_metric`
    knn_val_acc: float | None = None
    probe_seconds: float | None = None  # extraction (or cache read) and fit
    task: str = "single-label"  # how the data is labelled (model/tasks.py)
    class_ratio: float | None = None  # training split: largest class over smallest (images)
    probe_metric: str = "top-1"  # what linear_val_acc and knn_val_acc measure (mAP: multi-label)


@dataclass(frozen=True)
class Choice:
    value: Any
    reason: str


def choose_input_size(
    source_short_side: float | None, pretrained_input_size: int, fixed_input_size: bool = False
) -> Choice:
    """The input size: the backbone's pretrained size, or smaller for small sources."""
    if fixed_input_size:
        return Choice(pretrained_input_size, "the backbone is built for one input size")
    if source_short_side is None or source_short_side * UPSAMPLE_FACTOR >= pretrained_input_size:
        return Choice(pretrained_input_size, "the backbone's pretrained input size")
    upsampled = math.ceil(source_short_side * UPSAMPLE_FACTOR / SIZE_MULTIPLE) * SIZE_MULTIPLE
    size = max(MIN_INPUT_SIZE, upsampled)
    return Choice(
        size,
        f"sources' short side {source_short_side:.0f} px, upsampled to about "
        f"{UPSAMPLE_FACTOR}x (pretrained size {pretrained_input_size})",
    )


def schedule_epochs(train_images: int, strategy: str) -> Choice:
    """Epochs from BiT's HyperRule steps for the dataset size, at `CPU_SHARE` of its images."""
    steps = next(steps for below, steps in HYPERRULE if train_images < below)
    images_seen = steps * HYPERRULE_BATCH * CPU_SHARE
    lowest = FEATURES_MIN_EPOCHS if strategy == "features" else MIN_EPOCHS
    epochs = min(MAX_EPOCHS, max(lowest, round(images_seen / max(train_images, 1))))
    return Choice(
        epochs,
        f"HyperRule: {steps} steps of {HYPERRULE_BATCH} at {train_images} images, "
        f"x{CPU_SHARE} for CPU, within [{lowest}, {MAX_EPOCHS}]",
    )


def choose_strategy(evidence: Evidence) -> tuple[Choice, Choice | None]:
    """(strategy, unfreeze_stages for partial else None)."""
    per_class = evidence.images_per_class_median
    probe = evidence.linear_val_acc
    if per_class < FEATURES_BELOW_PER_CLASS:
        return Choice("features", f"{per_class:.0f} images per class: too few to fine-tune"), None
    if probe is not None and probe >= PROBE_SOLVED:
        reason = f"linear probe {probe:.3f} >= {PROBE_SOLVED}: frozen features suffice"
        return Choice("features", reason), None
    probed = f", linear probe {probe:.3f}" if probe is not None else ""
    if per_class >= FULL_FROM_PER_CLASS:
        return Choice("full", f"{per_class:.0f} images per class{probed}"), None
    stages = 2 if per_class >= TWO_STAGES_FROM_PER_CLASS else 1
    stages = min(stages, evidence.backbone_stages)
    reason = f"{per_class:.0f} images per class{probed}"
    return Choice("partial", reason), Choice(stages, reason)


def choose_backbone_lr_scale(strategy: str) -> Choice:
    """The pretrained layers' learning rate relative to the head's, by strategy."""
    if strategy == "partial":
        reason = "partial: the last stages adapt to the task at the head's rate"
        return Choice(PARTIAL_BACKBONE_LR_SCALE, reason)
    if strategy == "full":
        reason = "full: the early, generic layers move at a tenth of the head's rate"
        return Choice(FULL_BACKBONE_LR_SCALE, reason)
    return Choice(FULL_BACKBONE_LR_SCALE, "features: the backbone does not train")


def choose_augmentation(evidence: Evidence) -> dict[str, Choice]:
    """Whether to augment, by dataset size; the crop range and jitter, by the sources' size
    against the input (they apply wherever augmentation is on, also when it is given)."""
    images = evidence.train_images
    if images < AUGMENT_FROM_IMAGES:
        augment = Choice(False, f"{images} < {AUGMENT_FROM_IMAGES} images: short runs underfit")
    else:
        augment = Choice(True, f"{images} >= {AUGMENT_FROM_IMAGES} images")
    side, size = evidence.source_short_side_median, evidence.input_size
    if side is not None and side < size:
        reason = f"sources ({side:.0f} px) smaller than the input ({size} px): gentle crops"
        crops = GENTLE_CROPS
    else:
        reason = f"sources at least the input size ({size} px): ImageNet crops"
        crops = IMAGENET_CROPS
    return {"augment": augment} | {name: Choice(value, reason) for name, value in crops.items()}


def choose_lp_ft(strategy: str, linear_head: bool) -> Choice:
    """LP-FT stays off: on the 5,000-image Fashion-MNIST goal set-up, `partial` started from
    the probe's head (fitted without the head's dropout) lost the probe's accuracy in the first
    epoch (training loss 3.9 against ln 10 = 2.3 from a zero head) and ended at 0.7825 test,
    below the probe itself (0.8232 validation) and below fine-tuning from a zero head
    (docs/benchmarks.md, the goal run); with the stages at the head's rate (auto's recipe),
    1.4 points below the same run from a zero head (the ablations there). `--lp-ft` turns it
    on; the choice is recorded with its reason like every other."""
    if strategy == "features":
        return Choice(False, "features: the head is all that trains")
    if not linear_head:
        return Choice(False, "the head has a hidden layer (--head-hidden)")
    return Choice(False, "measured worse than a zero head on the goal set-up (--lp-ft: on)")


def choose_monitor(evidence: Evidence) -> Choice:
    """The validation metric that picks the best checkpoint: the task's rule
    (`tasks.resolve_monitor`), from the training split's class ratio."""
    decision = resolve_monitor(evidence.task, "auto", evidence.class_ratio)
    return Choice(decision.value, decision.reason)


def decide(
    evidence: Evidence, open_choices: list[str], linear_head: bool = True
) -> dict[str, Choice]:
    """Auto's choice for each field in `open_choices` (FinetuneConfig field names; "strategy"
    means the strategy is auto's to choose), from the evidence alone; `linear_head`: the head
    has no hidden layer."""
    choices: dict[str, Choice] = {}
    strategy, stages = choose_strategy(evidence)
    if "unfreeze_stages" not in open_choices:  # given stages: they are to be trained
        strategy, stages = Choice("partial", "--unfreeze-stages given"), None
    if "strategy" in open_choices:
        choices["strategy"] = strategy
        if stages is not None and "unfreeze_stages" in open_choices:
            choices["unfreeze_stages"] = stages
    chosen_strategy = choices.get("strategy", strategy).value
    if "lp_ft" in open_choices:
        choices["lp_ft"] = choose_lp_ft(chosen_strategy, linear_head)
    if "backbone_lr_scale" in open_choices:
        choices["backbone_lr_scale"] = choose_backbone_lr_scale(chosen_strategy)
    if "epochs" in open_choices:
        choices["epochs"] = schedule_epochs(evidence.train_images, chosen_strategy)
    augmentation = choose_augmentation(evidence)
    choices |= {name: choice for name, choice in augmentation.items() if name in open_choices}
    if "monitor" in open_choices:
        choices["monitor"] = choose_monitor(evidence)
    return choices


# ---------------------------------------------------------------------------------------------
# Measuring


def source_short_side(paths: list[str], seed: int) -> tuple[float | None, int]:
    """Median short side of a seeded sample of the files, from their headers (PIL opens lazily
    and decodes nothing here); (None, 0) if no header could be read."""
    sample = random.Random(seed).sample(paths, min(SIZE_SAMPLE_FILES, len(paths)))
    sides = []
    for path in sample:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
        except (OSError, UnidentifiedImageError):
            continue  # the scan has skipped or will skip it
    return (statistics.median(sides) if sides else None), len(sides)


def measure(config: FinetuneConfig, progress: bool = True) -> tuple[Evidence, Choice, int]:
    """Scan and split the data as training will, read the sizes of a sample of its files,
    choose the input size (unless given) and probe the frozen backbone's features at it.
    Returns the evidence, the input size choice and the number of files sized."""
    # The scan and the split need no input size; the probe's transform comes from the model.
    pretrained = preprocessing(config.backbone)
    probe_config = dataclasses.replace(
        config,
        strategy="features",
        img_size=config.img_size or pretrained.input_size,
        augment=False,
        epochs=1,
    )
    images = build_datamodule(probe_config)
    images.setup("fit")
    facts = data_facts(probe_config, images)
    per_class = facts.images_per_class["train"]
    paths = [path for path, _label in images.train_set.samples]
    side, sampled = source_short_side(paths, config.seed)
    fixed = bool(getattr(get_pretrained_cfg(config.backbone), "fixed_input_size", False))
    size = (
        Choice(config.img_size, "given")
        if config.img_size is not None
        else choose_input_size(side, pretrained.input_size, fixed)
    )
    model = build_model(dataclasses.replace(probe_config, img_size=size.value), facts)
    cache_dir = cache_folder(config)
    probe_started = time.perf_counter()
    probe = fit_probe(
        *probe_features(model, images, cache_dir, progress, device=probe_device(config)),
        num_classes=len(images.classes),
        seed=config.seed,
        task=facts.label_kind,
    )
    ratio = facts.class_ratio
    evidence = Evidence(
        classes=len(images.classes),
        train_images=len(images.train_set),
        images_per_class_min=min(per_class),
        images_per_class_median=statistics.median(per_class),
        source_short_side_median=side,
        pretrained_input_size=pretrained.input_size,
        backbone_stages=len(layer_groups(model.backbone)),
        input_size=size.value,
        linear_val_acc=round(probe.linear_val_acc, 4),
        knn_val_acc=round(probe.knn_val_acc, 4),
        probe_seconds=round(time.perf_counter() - probe_started, 2),
        task=facts.label_kind,
        class_ratio=round(ratio, 2) if ratio is not None and math.isfinite(ratio) else None,
        probe_metric=task_of(facts.label_kind).probe_metric,
    )
    return evidence, size, sampled


def resolve_auto(
    config: FinetuneConfig, progress: bool = True
) -> tuple[FinetuneConfig, dict[str, Any]]:
    """Measure the data, decide, and return the config with every open choice filled in, and
    the decision's record (evidence, choices with reasons, the choices given)."""
    started = time.perf_counter()
    monitor = ["monitor"] if config.monitor == "auto" else []
    open_choices = ["strategy", *config.choices_left_to_auto(), *monitor]
    evidence, size, sampled = measure(config, progress)
    choices = decide(evidence, open_choices, linear_head=config.head_hidden == 0)
    if "img_size" in open_choices:
        choices["img_size"] = size
    resolved = dataclasses.replace(
        config, **{name: choice.value for name, choice in choices.items()}
    )
    record = {
        "evidence": dataclasses.asdict(evidence) | {"sampled_files": sampled},
        "choices": {name: dataclasses.asdict(choice) for name, choice in choices.items()},
        "given": [name for name in (*FIXED_CHOICES, "monitor") if name not in open_choices],
        "seconds": round(time.perf_counter() - started, 2),
    }
    log_decision(record)
    return resolved, record


@rank_zero_only
def log_decision(record: dict[str, Any]) -> None:
    """A few lines: the evidence, then each choice with its reason."""
    evidence = record["evidence"]
    side = evidence["source_short_side_median"]
    ratio = evidence.get("class_ratio")
    logger.info(
        f"Auto evidence: {evidence['train_images']} train images, {evidence['classes']} classes "
        f"({evidence['images_per_class_min']}-{evidence['images_per_class_median']:.0f} per "
        f"class, min-median; class ratio "
        + (f"{ratio:.1f}:1" if ratio is not None else "unknown")
        + f", {evidence.get('task', 'single-label')}); sources' short side "
        + (f"{side:.0f} px" if side is not None else "unknown")
        + f" (median of {evidence['sampled_files']} files); linear probe "
        f"{evidence['linear_val_acc']:.4f}, k-NN {evidence['knn_val_acc']:.4f} "
        f"({evidence.get('probe_metric', 'top-1')}) at "
        f"{evidence['input_size']} px ({evidence['probe_seconds']:.1f} s)"
    )
    by_reason: dict[str, list[str]] = {}  # choices made for one reason share a line
    for name, choice in record["choices"].items():
        by_reason.setdefault(choice["reason"], []).append(f"{name} = {choice['value']}")
    for reason, values in by_reason.items():
        logger.info(f"Auto choice: {', '.join(values)} ({reason})")
    if record["given"]:
        logger.info(f"Auto kept as given: {', '.join(record['given'])}")
