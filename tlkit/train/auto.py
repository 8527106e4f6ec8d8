"""`--strategy auto`: measure the data cheaply, then choose how to fine-tune.

Before training, `resolve_auto` measures (`measure`): images per class in the training split and
its class ratio (largest over smallest class), the source images' short side (from the file
headers of a seeded sample, nothing decoded), and a linear probe and a k-NN classifier on the
frozen backbone's cached features (tlkit/train/probe.py, validation top-1, or mAP for a
multi-label task; the cache is the `features` strategy's, so choosing `features` reuses it;
with random weights, `--pretrained none`, nothing is probed and every layer trains).
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

from pytorch_lightning.utilities import rank_zero_only
from timm.models import get_pretrained_cfg

from tlkit.config import FIXED_CHOICES, FinetuneConfig, parse_duration
from tlkit.data.datamodule import BaseImageDataModule
from tlkit.metrics import ACCURACY, TITLES
from tlkit.model.backbones import layer_groups, preprocessing
from tlkit.model.classifier import TransferClassifier
from tlkit.model.tasks import resolve_monitor
from tlkit.runfolder import DataFacts
from tlkit.train import budget
from tlkit.train.build import build_datamodule, build_model, cache_folder, data_facts
from tlkit.train.device_settings import choose_device_settings
from tlkit.train.hardware import training_device
from tlkit.train.probe import fit_probe, probe_features

logger = logging.getLogger(__name__)

SIZE_SAMPLE_FILES = 200  # training files whose headers give the source image sizes

# Input size: sources smaller than the backbone's pretrained input are upsampled to about twice
# their short side, rounded up to a multiple of 32 (the backbones' total stride), at least 64.
UPSAMPLE_FACTOR = 2
SIZE_MULTIPLE = 32
MIN_INPUT_SIZE = 64

# Strategy, by median training images per class and the linear probe's balanced accuracy.
# Fewer: only the head trains. Fine-tuning (`partial`, 1 stage at the head's rate) beat the
# frozen features with the probe's head at 9, 26 and 28 images per class on the held-out suite
# (cards at 10 and 31 decks, stamps: docs/strategies.md); below 5, a handful of images, it is
# not measured and the head alone is the safe choice.
FEATURES_BELOW_PER_CLASS = 5
# The frozen features already separate the classes, only the head trains, when the probe's
# balanced accuracy (multi-label: mAP) is at least this with 95% confidence
# (`TaskDefinition.probe_evidence`: a probe that is 90% right and scores 10 of 10 does not
# pass, nor one that ignores a minority).
PROBE_SOLVED = 0.97
TWO_STAGES_FROM_PER_CLASS = 400
FULL_FROM_PER_CLASS = 5_000
# The probe reads at most this many training and validation images per class (a seeded
# sample): its cost stops growing with the dataset (docs/strategies.md measures it).
PROBE_IMAGES_PER_CLASS = 100

# Learning rate of the pretrained layers relative to the head's (--backbone-lr-scale). `partial`
# trains only the last, task-specific stages: at the head's rate they gained 4.6 points over a
# tenth of it on the 5,000-image Fashion-MNIST goal set-up (docs/strategies.md). `full` keeps
# the tenth, the discriminative rate that protects the early, generic layers.
PARTIAL_BACKBONE_LR_SCALE = 1.0
FULL_BACKBONE_LR_SCALE = 0.1

# Random weights (--pretrained none): nothing is pretrained, so nothing is probed or kept
# frozen, and no layer has generic features for a lower rate to protect: every layer trains
# at the head's rate (training from scratch, as timm's train.py does).
FROM_SCRATCH = "no pretrained weights (--pretrained none): every layer learns from the data"
FROM_SCRATCH_BACKBONE_LR_SCALE = 1.0

# Schedule: BiT's HyperRule (Kolesnikov et al. 2020: 500 steps of 512 images below 20k
# training images, 10k steps up to 500k, 20k above), made continuous: the training images a
# run processes grow log-linearly between the rule's points (ImageNet's 1.28M for the last),
# so one more image never changes the plan by more than a fraction of a percent. On an
# accelerator, the rule as it is; on a CPU, `CPU_SHARE` of it (measured: 4 passes at 5,000
# images, where `partial` with its last stages at the head's rate peaked on validation in pass
# 3 or 4 of a 4- and a 5-pass run, docs/strategies.md), within [MIN_EPOCHS, MAX_CPU_EPOCHS]
# passes. A plan that ends part-way through a pass is run as shorter epochs
# (`budget.schedule_of`), so the compute is the plan's. With --budget, the rule's full plan
# is the most a run asks for, and the budget decides how much of it fits.
HYPERRULE_POINTS = ((20_000, 500), (500_000, 10_000), (1_281_167, 20_000))  # (images, steps)
HYPERRULE_BATCH = 512
CPU_SHARE = 0.08
MIN_EPOCHS, MAX_CPU_EPOCHS = 3, 30
FEATURES_MIN_EPOCHS = 10  # a cached-features epoch costs well under a second per 1,000 images

# Augmentation: on when the plan makes enough passes over the data for it to pay (short runs
# underfit with it: off at 4 passes over 5,000 Fashion-MNIST images, docs/strategies.md);
# scale crops sized to the sources: gentle for upsampled small images, ImageNet's for photos.
AUGMENT_FROM_EPOCHS = 20
GENTLE_CROPS = {"short_side_min": 224, "short_side_max": 288, "color_jitter": 0.0}
IMAGENET_CROPS = {"short_side_min": 256, "short_side_max": 480, "color_jitter": 0.4}


@dataclass(frozen=True)
class Evidence:
    """What `decide` reads: measured on the training and validation splits before training."""

    classes: int
    train_images: int
    images_per_class_min: int
    images_per_class_median: float
    source_short_side_median: float | None  # None: no file's size is known
    pretrained_input_size: int  # the backbone's, from timm's pretrained config
    backbone_stages: int  # timm layer groups, stem first
    input_size: int  # the size the probe ran at
    linear_val_acc: float | None = None  # None: not probed; the probe's `probe_metric`
    knn_val_acc: float | None = None
    probe_seconds: float | None = None  # extraction (or cache read) and fit
    task: str = "single-label"  # how the data is labelled (model/tasks.py)
    class_ratio: float | None = None  # training split: largest class over smallest (images)
    probe_metric: str = ACCURACY  # what linear_val_acc and knn_val_acc measure (map: multi-label)
    # what probe_balanced_acc and its bound measure: balanced accuracy, or mAP (multi-label)
    probe_evidence_metric: str = "balanced accuracy"
    images_per_class_max: int | None = None
    val_images: int = 0
    probe_balanced_acc: float | None = None
    probe_balanced_lower_bound: float | None = None  # one-sided 95%
    probe_evidence: str = "validation"  # or k-fold cross-validation, on a small validation split
    probe_images: int = 0  # training images the probe was fitted on (a per-class sample)
    device: str = "cpu"  # where the run trains: "cuda" or "cpu"
    processes: int = 1  # processes sharing the training images (DDP)
    fixed_input_size: bool = False  # the backbone is built for one input size (ViTs)
    pretrained: bool = True  # False: random weights (--pretrained none), nothing to probe


@dataclass(frozen=True)
class Choice:
    """A value auto chose, and why; `applies`: whether it takes effect in this run (a crop
    range does not without augmentation): the log lists only those that do."""

    value: Any
    reason: str
    applies: bool = True


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


def hyperrule_images(train_images: int) -> float:
    """The training images BiT's HyperRule processes for a dataset of `train_images`, made
    continuous: log-linear between its points, flat below the first and above the last."""
    points = [(images, steps * HYPERRULE_BATCH) for images, steps in HYPERRULE_POINTS]
    if train_images <= points[0][0]:
        return float(points[0][1])
    for (low, low_seen), (high, high_seen) in zip(points, points[1:], strict=False):
        if train_images <= high:
            share = math.log(train_images / low) / math.log(high / low)
            return low_seen * (high_seen / low_seen) ** share
    return float(points[-1][1])


def planned_images(train_images: int, strategy: str, device: str) -> Choice:
    """The training images the default schedule processes (not counting epochs of cached
    features), by dataset size and device."""
    images = hyperrule_images(train_images)
    share = CPU_SHARE if device == "cpu" else 1.0
    lowest = FEATURES_MIN_EPOCHS if strategy == "features" else MIN_EPOCHS
    passes = max(lowest, images * share / max(train_images, 1))
    if device == "cpu":
        passes = min(passes, max(lowest, MAX_CPU_EPOCHS))
    where = f"x{CPU_SHARE} on a CPU" if device == "cpu" else f"on {device}"
    reason = (
        f"HyperRule, continuous: {images:,.0f} images at {train_images:,} training images, "
        f"{where}: {passes:.2f} passes planned"
    )
    return Choice(round(passes * train_images), reason)


def evidence_splits(evidence: Evidence) -> budget.Splits:
    """The training and validation split sizes and processes the evidence was measured on."""
    return budget.Splits(evidence.train_images, evidence.val_images, 0, evidence.processes)


def choose_schedule(
    evidence: Evidence, strategy: str, batch_size: int
) -> tuple[Choice, Choice, budget.Schedule]:
    """(epochs, epoch_batches, the schedule) of the default plan (`planned_images`)."""
    images = planned_images(evidence.train_images, strategy, evidence.device)
    schedule = budget.schedule_of(images.value, evidence_splits(evidence), batch_size)
    epochs = Choice(schedule.epochs, images.reason)
    batches = Choice(schedule.epoch_batches, images.reason, applies=schedule.epoch_batches > 0)
    return epochs, batches, schedule


def choose_strategy(evidence: Evidence, lp_ft: bool = False) -> tuple[Choice, Choice | None]:
    """(strategy, unfreeze_stages for partial else None); `lp_ft`: LP-FT was asked for, which
    fine-tunes from the probe, so the strategy is not `features`. Random weights: `full`, as
    frozen random layers hold nothing to transfer."""
    if not evidence.pretrained:
        return Choice("full", FROM_SCRATCH), None
    per_class = evidence.images_per_class_median
    bound = evidence.probe_balanced_lower_bound
    metric = evidence.probe_evidence_metric  # balanced accuracy; multi-label: mAP
    if not lp_ft and per_class < FEATURES_BELOW_PER_CLASS:
        return Choice("features", f"{per_class:.0f} images per class: too few to fine-tune"), None
    if not lp_ft and bound is not None and bound >= PROBE_SOLVED:
        reason = (
            f"linear probe's {metric} {evidence.probe_balanced_acc:.3f}, at least "
            f"{bound:.3f} with 95% confidence >= {PROBE_SOLVED}: frozen features suffice"
        )
        return Choice("features", reason), None
    probed = f", probe's {metric} {evidence.probe_balanced_acc:.3f}" if bound else ""
    lp_ft_note = " (--lp-ft: fine-tuned from the probe)" if lp_ft else ""
    if per_class >= FULL_FROM_PER_CLASS:
        return Choice("full", f"{per_class:.0f} images per class{probed}{lp_ft_note}"), None
    stages = 2 if per_class >= TWO_STAGES_FROM_PER_CLASS else 1
    stages = min(stages, evidence.backbone_stages)
    reason = f"{per_class:.0f} images per class{probed}{lp_ft_note}"
    return Choice("partial", reason), Choice(stages, reason)


def choose_backbone_lr_scale(strategy: str, pretrained: bool = True) -> Choice:
    """The pretrained layers' learning rate relative to the head's, by strategy; with random
    weights (not `pretrained`) every trained layer learns at the head's rate."""
    if not pretrained and strategy != "features":
        return Choice(FROM_SCRATCH_BACKBONE_LR_SCALE, FROM_SCRATCH)
    if strategy == "partial":
        reason = "partial: the last stages adapt to the task at the head's rate"
        return Choice(PARTIAL_BACKBONE_LR_SCALE, reason)
    if strategy == "full":
        reason = "full: the early, generic layers move at a tenth of the head's rate"
        return Choice(FULL_BACKBONE_LR_SCALE, reason)
    return Choice(FULL_BACKBONE_LR_SCALE, "features: the backbone does not train", applies=False)


def augments_at(passes: float) -> bool:
    """Whether a schedule of `passes` over the training images augments them."""
    return passes >= AUGMENT_FROM_EPOCHS


def choose_augmentation(evidence: Evidence, passes: float, strategy: str) -> dict[str, Choice]:
    """Whether to augment, by the passes over the data the schedule makes; the crop range and
    jitter, by the sources' size against the input. (For `features`, whose head trains on one
    cached view of each image, and without augmentation, the crops are recorded but do not
    apply.)"""
    made = f"{passes:.1f} passes over the data in whole batches"
    if not augments_at(passes):
        augment = Choice(False, f"{made} < {AUGMENT_FROM_EPOCHS}: short runs underfit")
    else:
        augment = Choice(True, f"{made} >= {AUGMENT_FROM_EPOCHS}")
    side, size = evidence.source_short_side_median, evidence.input_size
    if side is not None and side < size:
        reason = f"sources ({side:.0f} px) smaller than the input ({size} px): gentle crops"
        crops = GENTLE_CROPS
    else:
        reason = f"sources at least the input size ({size} px): ImageNet crops"
        crops = IMAGENET_CROPS
    applies = augment.value and strategy != "features"
    augment = dataclasses.replace(augment, applies=strategy != "features")
    return {"augment": augment} | {
        name: Choice(value, reason, applies=applies) for name, value in crops.items()
    }


def choose_lp_ft(strategy: str, linear_head: bool) -> Choice:
    """LP-FT stays off: on the 5,000-image Fashion-MNIST goal set-up, `partial` started from
    the probe's head (fitted without the head's dropout) lost the probe's accuracy in the first
    epoch (training loss 3.9 against ln 10 = 2.3 from a zero head) and ended at 0.7825 test,
    below the probe itself (0.8232 validation) and below fine-tuning from a zero head
    (docs/benchmarks.md, the goal run); with the stages at the head's rate (auto's recipe),
    1.4 points below the same run from a zero head (the ablations there). `--lp-ft` turns it
    on; the choice is recorded with its reason like every other."""
    if strategy == "features":
        return Choice(False, "features: the head is all that trains", applies=False)
    if not linear_head:
        return Choice(False, "the head has a hidden layer (--head-hidden)")
    return Choice(False, "measured worse than a zero head on the goal set-up (--lp-ft: on)")


def choose_monitor(evidence: Evidence) -> Choice:
    """The validation metric that picks the best checkpoint: the task's rule
    (`tasks.resolve_monitor`), from the training split's class ratio."""
    decision = resolve_monitor(evidence.task, "auto", evidence.class_ratio)
    return Choice(decision.value, decision.reason)


def choose_patience(budget_epochs: int | None = None, scratch_epochs: int | None = None) -> Choice:
    """Early stopping's patience: the default; under a budget the whole planned schedule
    (`budget_epochs`), so that the cosine decay the budget sized reaches its end; with random
    weights the whole schedule too (`scratch_epochs`): training from scratch stays near chance
    on validation for many epochs before it learns."""
    default = FIXED_CHOICES["patience"]
    if budget_epochs is None and scratch_epochs is not None:
        return Choice(
            scratch_epochs,
            "random weights: validation stays near chance for many epochs before the network "
            f"learns, so the schedule runs to its end instead of stopping after {default} "
            "epochs without improvement (best.ckpt keeps the best epoch)",
        )
    if budget_epochs is None:
        return Choice(default, f"the default: {default} epochs without improvement end the run")
    return Choice(
        budget_epochs,
        "the budget sized the cosine schedule: it runs to its end instead of stopping "
        f"after {default} epochs without improvement (best.ckpt keeps the best epoch)",
    )


def decide(
    evidence: Evidence,
    open_choices: list[str],
    linear_head: bool = True,
    lp_ft: bool = False,
    batch_size: int = 64,
    forced: dict[str, Choice] | None = None,
    given_epochs: int | None = None,
    given_epoch_batches: int = 0,
) -> dict[str, Choice]:
    """Auto's choice for each field in `open_choices` (FinetuneConfig field names; "strategy"
    means the strategy is auto's to choose), from the evidence alone: the default schedule,
    before any budget (`resolve_auto` fits it to one). `linear_head`: the head has no hidden
    layer; `lp_ft`: --lp-ft was given; `forced`: a strategy (and stages) a budget stepped
    down to; `given_epochs`, `given_epoch_batches`: --epochs and --epoch-batches, where
    --epochs is given."""
    choices: dict[str, Choice] = {}
    strategy, stages = choose_strategy(evidence, lp_ft)
    if forced is not None:
        strategy, stages = forced["strategy"], forced.get("unfreeze_stages")
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
        choices["backbone_lr_scale"] = choose_backbone_lr_scale(
            chosen_strategy, evidence.pretrained
        )
    epochs, batches, schedule = choose_schedule(evidence, chosen_strategy, batch_size)
    if "epochs" in open_choices:
        choices["epochs"] = epochs
        choices["epoch_batches"] = batches
    run_images = schedule.images
    if given_epochs is not None:  # augmentation follows the passes the run will make
        splits = evidence_splits(evidence)
        run_images = budget.images_processed(given_epochs, given_epoch_batches, splits, batch_size)
    passes = run_images / max(evidence.train_images, 1)
    augmentation = choose_augmentation(evidence, passes, chosen_strategy)
    choices |= {name: choice for name, choice in augmentation.items() if name in open_choices}
    if "monitor" in open_choices:
        choices["monitor"] = choose_monitor(evidence)
    if "patience" in open_choices:
        run_epochs = epochs.value if given_epochs is None else given_epochs
        choices["patience"] = choose_patience(
            scratch_epochs=None if evidence.pretrained else run_epochs
        )
    return choices


# ---------------------------------------------------------------------------------------------
# Measuring


def source_short_side(
    images: BaseImageDataModule, facts: DataFacts, seed: int
) -> tuple[float | None, int]:
    """Median short side of the training images and how many files it rests on: the sizes the
    scan stored for every file (`DataFacts`; folders, CSVs and converted datasets alike); where
    the scan read none (--verify none), the headers of a seeded sample of the files."""
    if facts.sized_images:
        return facts.source_short_side_median, facts.sized_images
    samples = images.train_set.samples
    sizes: list[tuple[int, int]] = []
    if samples:
        count = min(SIZE_SAMPLE_FILES, len(samples))
        positions = random.Random(seed).sample(range(len(samples)), count)
        sizes = [size for size in map(images.train_set.stored_size, positions) if size]
    return (statistics.median(min(size) for size in sizes) if sizes else None), len(sizes)


def measure(
    config: FinetuneConfig, progress: bool = True
) -> tuple[Evidence, Choice, int, BaseImageDataModule]:
    """Scan and split the data as training will, take the sources' sizes from the scan, choose
    the input size (unless given) and, with pretrained weights, probe the frozen backbone's
    features at it (`probe_evidence`). Returns the evidence, the input size choice, the
    number of files sized and the data module."""
    # The scan and the split need no input size; the probe's transform comes from the model.
    backbone_defaults = preprocessing(config.backbone)
    probe_config = dataclasses.replace(
        config,
        strategy="features",
        img_size=config.img_size or backbone_defaults.input_size,
        augment=False,
        epochs=1,
    )
    images = build_datamodule(probe_config)
    images.setup("fit")
    facts = data_facts(probe_config, images)
    per_class = facts.images_per_class["train"]
    side, sized = source_short_side(images, facts, config.seed)
    fixed = bool(getattr(get_pretrained_cfg(config.backbone), "fixed_input_size", False))
    size = (
        Choice(config.img_size, "given")
        if config.img_size is not None
        else choose_input_size(side, backbone_defaults.input_size, fixed)
    )
    model = build_model(dataclasses.replace(probe_config, img_size=size.value), facts)
    device = training_device(config)
    pretrained_weights = config.pretrained != "none"
    ratio = facts.class_ratio
    evidence = Evidence(
        classes=len(images.classes),
        train_images=len(images.train_set),
        images_per_class_min=min(per_class),
        images_per_class_median=statistics.median(per_class),
        source_short_side_median=side,
        pretrained_input_size=backbone_defaults.input_size,
        backbone_stages=len(layer_groups(model.backbone)),
        input_size=size.value,
        task=facts.label_kind,
        class_ratio=round(ratio, 2) if ratio is not None and math.isfinite(ratio) else None,
        images_per_class_max=max(per_class),
        val_images=len(images.val_set),
        device=device,
        processes=process_count(config),
        fixed_input_size=fixed,
        pretrained=pretrained_weights,
        **(
            probe_evidence(config, model, images, facts.label_kind, device, progress)
            if pretrained_weights
            else {}
        ),
    )
    return evidence, size, sized, images


def probe_evidence(
    config: FinetuneConfig,
    model: TransferClassifier,
    images: BaseImageDataModule,
    task: str,
    device: str,
    progress: bool,
) -> dict[str, Any]:
    """`Evidence`'s probe fields: a linear probe and k-NN on the frozen backbone's features of
    a per-class sample (`PROBE_IMAGES_PER_CLASS`) for the `task` (how the data is labelled),
    on the run's device."""
    started = time.perf_counter()
    features = probe_features(
        model,
        images,
        cache_folder(config),
        progress,
        device=device,
        per_class=PROBE_IMAGES_PER_CLASS,
        seed=config.seed,
    )
    probe = fit_probe(
        *features,
        num_classes=len(images.classes),
        seed=config.seed,
        device=device,
        task=task,
    )
    return {
        "linear_val_acc": round(probe.linear_val_acc, 4),
        "knn_val_acc": round(probe.knn_val_acc, 4),
        "probe_seconds": round(time.perf_counter() - started, 2),
        "probe_metric": probe.metric,
        "probe_evidence_metric": probe.evidence_metric,
        "probe_balanced_acc": round(probe.balanced_acc, 4),
        "probe_balanced_lower_bound": round(probe.balanced_lower_bound, 4),
        "probe_evidence": probe.evidence,
        "probe_images": len(features[0]),
    }


def decide_options(config: FinetuneConfig, open_choices: list[str]) -> dict[str, Any]:
    """What `decide` reads from the config besides the evidence."""
    return {
        "linear_head": config.head_hidden == 0,
        "lp_ft": bool(config.lp_ft),
        "batch_size": config.batch_size,
        "given_epochs": None if "epochs" in open_choices else config.epochs,
        "given_epoch_batches": config.epoch_batches,
    }


def resolve_auto(
    config: FinetuneConfig, progress: bool = True, started: float | None = None
) -> tuple[FinetuneConfig, dict[str, Any]]:
    """Measure the data, decide, and return the config with every open choice filled in, and
    the decision's record (evidence, choices with reasons, the choices given; with --budget,
    the measured throughput and the planned schedule). `started`: when the run started
    (`time.perf_counter()`), from which a budget counts; default now."""
    started = time.perf_counter() if started is None else started
    monitor = ["monitor"] if config.monitor == "auto" else []
    open_choices = ["strategy", *config.choices_left_to_auto(), *monitor]
    evidence, size, sized, images = measure(config, progress)
    choices = decide(evidence, open_choices, **decide_options(config, open_choices))
    if "img_size" in open_choices:
        choices["img_size"] = size
    # the precision and layout this device trains fastest in, for the budget to measure
    chosen = dataclasses.replace(config, **{name: choice.value for name, choice in choices.items()})
    settings, device_record = choose_device_settings(chosen, data_facts(chosen, images))
    config = dataclasses.replace(
        config, precision=settings.precision, channels_last=settings.channels_last
    )
    planned = None
    if config.budget:
        choices, planned = fit_to_budget(config, evidence, choices, open_choices, images, started)
    resolved = dataclasses.replace(
        config, **{name: choice.value for name, choice in choices.items()}
    )
    record = {
        "evidence": dataclasses.asdict(evidence) | {"sampled_files": sized},
        "choices": {name: dataclasses.asdict(choice) for name, choice in choices.items()},
        "given": [name for name in (*FIXED_CHOICES, "monitor") if name not in open_choices],
        "seconds": round(time.perf_counter() - started, 2),
    }
    if planned is not None:
        record["budget"] = planned
    if device_record is not None:
        record["device_settings"] = device_record
    log_decision(record)
    return resolved, record


def process_count(config: FinetuneConfig) -> int:
    """Processes the run's training images are shared by (devices x nodes), where the config
    says how many devices; 1 for 'auto'."""
    devices = config.devices.strip()
    count = len([part for part in devices.split(",") if part.strip()]) if "," in devices else 1
    if devices.isdigit():
        count = max(1, int(devices))
    return count * config.num_nodes


# ---------------------------------------------------------------------------------------------
# Fitting a time budget

# Ways to make a run cheaper, tried in this order when the planned schedule does not fit the
# budget even for one pass over the data: fewer trained stages, a smaller input, then only
# the head on cached features.
MAX_STEP_DOWNS = 6


def plan_schedule(
    candidate: FinetuneConfig,
    open_choices: list[str],
    wanted: int,
    splits: budget.Splits,
    throughput: budget.Throughput,
    seconds_left: float,
    minimum_images: int | None = None,
) -> tuple[budget.Schedule | None, float, float]:
    """(the schedule that fits, the seconds it leaves for `--tta auto`'s choice, the seconds
    left for training) within `seconds_left`. The choice weighs flipped and rescaled views only
    after augmented training, so where augmentation is auto's to choose its time follows the
    augmentation the schedule itself turns on or off (`choose_augmentation`, by its passes);
    with `--epochs` given, the candidate's (decided by those epochs)."""
    cached = candidate.strategy == "features" and candidate.cache

    def fitted(augment: bool) -> tuple[budget.Schedule | None, float, float]:
        config = dataclasses.replace(candidate, augment=augment)
        tta_s = budget.tta_choice_s(config, splits, throughput)
        left = seconds_left - tta_s
        schedule = budget.fit_schedule(
            wanted, splits, candidate.batch_size, throughput, left, cached, minimum_images
        )
        return schedule, tta_s, left

    schedule_decides = {"augment", "epochs"} <= set(open_choices)
    if not schedule_decides or candidate.strategy == "features":
        return fitted(candidate.augment)
    plain = fitted(False)
    if plain[0] is None or not augments_at(plain[0].images / splits.train):
        return plain
    # its passes turn augmentation on: plan with its views (if fewer passes then fit,
    # augmentation stays off and the choice's time is an upper estimate)
    return fitted(True)


def fit_to_budget(
    config: FinetuneConfig,
    evidence: Evidence,
    choices: dict[str, Choice],
    open_choices: list[str],
    images: BaseImageDataModule,
    started: float,
) -> tuple[dict[str, Choice], dict[str, Any]]:
    """The choices with the schedule sized to `config.budget`: the candidate configuration's
    throughput measured on this device (`budget.measure_throughput`), the most training
    images up to the HyperRule's full plan whose predicted time fits what is left of the
    budget, stepping down (`step_down`) while fewer than the default plan's `MIN_EPOCHS`
    passes fit (one pass of extraction for cached features); where nothing cheaper is open,
    the most that fits. Returns the choices and the record of the plan (throughput, schedule,
    predicted seconds, steps down)."""
    budget_s = parse_duration(config.budget)
    stepped_down: list[str] = []
    size_choice = choices.get("img_size")
    # a node's processes share its cores on a CPU; on accelerators each has its own device
    parallel = config.num_nodes if training_device(config) == "cpu" else evidence.processes
    splits = budget.Splits(
        evidence.train_images,
        evidence.val_images,
        len(images.test_set or []),
        evidence.processes,
        parallel=min(parallel, evidence.processes),
    )
    while True:
        candidate = dataclasses.replace(
            config, **{name: choice.value for name, choice in choices.items()}
        )
        strategy = candidate.strategy
        cached = strategy == "features" and candidate.cache
        trained = build_datamodule(dataclasses.replace(candidate, epochs=1))
        trained.setup("fit")
        throughput = budget.measure_throughput(candidate, trained)
        wanted = wanted_images(candidate, evidence, "epochs" in open_choices)
        souping_s = budget.soup_s(candidate, splits, throughput)
        seconds_left = budget_s * budget.BUDGET_SHARE - (time.perf_counter() - started) - souping_s
        # fine-tuning below the default plan's floor of passes ends far from what a cheaper
        # configuration reaches (a 2-minute budget's 1.5 passes at 224 px: docs/strategies.md)
        floor = splits.train * (1 if cached else MIN_EPOCHS)
        fitting = (candidate, open_choices, wanted, splits, throughput, seconds_left)
        schedule, choosing_tta_s, left = plan_schedule(*fitting, minimum_images=floor)
        lower = None if schedule else step_down(candidate, open_choices, evidence)
        if lower is None:
            break
        changed, reason = lower
        stepped_down.append(reason)
        size = changed.get("img_size", candidate.img_size)
        evidence = dataclasses.replace(evidence, input_size=size)
        forced = {name: Choice(value, reason) for name, value in changed.items()}
        choices = decide(
            evidence, open_choices, forced=forced, **decide_options(config, open_choices)
        )
        size_choice = forced.get("img_size", size_choice)
        if size_choice is not None:
            choices["img_size"] = size_choice
    if schedule is None:  # nothing cheaper is open: the most that fits, if one pass does
        schedule, choosing_tta_s, left = plan_schedule(*fitting)
    fits = schedule is not None
    if not fits:  # even the cheapest candidate overruns: one pass, and say so
        schedule = budget.schedule_of(
            min(wanted, splits.train), splits, candidate.batch_size, throughput, cached
        )
    elapsed = time.perf_counter() - started
    reason = (
        f"--budget {config.budget}: {throughput.train_images_per_s:.0f} training, "
        f"{throughput.eval_images_per_s:.0f} evaluation images/s measured on "
        f"{throughput.device}; {schedule.images / splits.train:.2f} passes predicted to take "
        f"{schedule.predicted_s:.0f} s of the {left:.0f} s left"
    )
    if "epochs" in open_choices:
        choices["epochs"] = Choice(schedule.epochs, reason)
        choices["epoch_batches"] = Choice(
            schedule.epoch_batches, reason, applies=schedule.epoch_batches > 0
        )
        passes = schedule.images / splits.train
        augmentation = choose_augmentation(evidence, passes, strategy)
        choices |= {name: choice for name, choice in augmentation.items() if name in open_choices}
        if "patience" in open_choices:
            choices["patience"] = choose_patience(schedule.epochs)
    record = {
        "seconds": budget_s,
        "throughput": dataclasses.asdict(throughput),
        "schedule": dataclasses.asdict(schedule),
        "tta_choice_s": round(choosing_tta_s, 1),
        "soup_s": round(souping_s, 1),
        "after_training_s": round(
            budget.test_s(splits, throughput) + choosing_tta_s + souping_s, 1
        ),
        "predicted_s": round(elapsed + schedule.predicted_s + choosing_tta_s + souping_s, 1),
        "fits": fits,
        "stepped_down": stepped_down,
    }
    if "epochs" in open_choices:  # the run may re-plan its epochs up to the wanted images
        epoch_images = schedule.images / schedule.epochs
        record["most_epochs"] = max(schedule.epochs, math.floor(wanted / epoch_images + 1e-9))
    if not fits:
        logger.warning(
            f"--budget {config.budget}: even one pass over the training images with the "
            f"cheapest configuration ({strategy}) is predicted to take "
            f"{schedule.predicted_s:.0f} s, beyond the {left:.0f} s left; training one pass"
        )
    return choices, record


def wanted_images(config: FinetuneConfig, evidence: Evidence, epochs_open: bool) -> int:
    """The training images a run under a budget asks for at most: HyperRule's full plan (as on
    an accelerator; for cached features, whose epochs cost little, the default plan), or the
    given epochs' passes."""
    if not epochs_open:
        return config.epochs * evidence.train_images
    device = evidence.device if config.strategy == "features" else "cuda"
    return planned_images(evidence.train_images, config.strategy, device).value


def step_down(
    config: FinetuneConfig, open_choices: list[str], evidence: Evidence
) -> tuple[dict[str, Any], str] | None:
    """The next cheaper configuration among the open choices (strategy, stages, input size),
    and why; None when nothing cheaper is open. Random weights keep `full` (frozen random
    layers transfer nothing): only the input size steps down."""
    strategy_open = "strategy" in open_choices and evidence.pretrained
    if strategy_open:
        if config.strategy == "full":
            return {"strategy": "partial", "unfreeze_stages": 2}, "full did not fit: partial"
        if config.strategy == "partial" and (config.unfreeze_stages or 1) > 1:
            if "unfreeze_stages" in open_choices:
                return {"strategy": "partial", "unfreeze_stages": 1}, "2 stages did not fit: 1"
    fixed = evidence.fixed_input_size  # a model built for one input size keeps it
    if "img_size" in open_choices and config.img_size > MIN_INPUT_SIZE and not fixed:
        smaller = max(MIN_INPUT_SIZE, round(config.img_size / 2 / SIZE_MULTIPLE) * SIZE_MULTIPLE)
        reason = f"{config.img_size} px did not fit: {smaller} px"
        return {"strategy": config.strategy, "img_size": smaller}, reason
    if strategy_open and config.strategy != "features":
        return {"strategy": "features"}, f"{config.strategy} did not fit: cached features"
    return None


def _probe_clause(evidence: dict[str, Any]) -> str:
    """The probe's part of the evidence line: its scores, input size and time, or why none."""
    if evidence.get("linear_val_acc") is None:
        return "no probe (random weights: no features to measure)"
    scores = f"linear probe {evidence['linear_val_acc']:.4f}"
    if evidence.get("probe_balanced_acc") is not None:
        scores += (
            f" ({TITLES[evidence.get('probe_metric', ACCURACY)]}; "
            f"{evidence.get('probe_evidence_metric', 'balanced accuracy')} "
            f"{evidence['probe_balanced_acc']:.4f}, at least "
            f"{evidence['probe_balanced_lower_bound']:.4f} with 95% confidence, on "
            f"{evidence['probe_evidence']})"
        )
    return (
        f"{scores}, k-NN {evidence['knn_val_acc']:.4f} at {evidence['input_size']} px "
        f"({evidence['probe_seconds']:.1f} s)"
    )


@rank_zero_only
def log_decision(record: dict[str, Any]) -> None:
    """A few lines: the evidence, then each choice that takes effect with its reason (choices
    made for one reason share a line), the choices given, and a budget's plan."""
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
        + f" (median of {evidence['sampled_files']} files); {_probe_clause(evidence)}"
    )
    by_reason: dict[str, list[str]] = {}
    for name, choice in record["choices"].items():
        if choice.get("applies", True):
            by_reason.setdefault(choice["reason"], []).append(f"{name} = {choice['value']}")
    for reason, values in by_reason.items():
        logger.info(f"Auto choice: {', '.join(values)} ({reason})")
    if record["given"]:
        logger.info(f"Auto kept as given: {', '.join(record['given'])}")
    planned = record.get("budget")
    if planned is not None:
        steps = "; ".join(planned["stepped_down"])
        logger.info(
            f"Auto budget: {planned['seconds']:.0f} s, the run predicted to end after "
            f"{planned['predicted_s']:.0f} s" + (f" (stepped down: {steps})" if steps else "")
        )
