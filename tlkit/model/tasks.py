"""Tasks: what a model learns from its labels. One entry of `TASKS` per task, holding all that
differs between them, so that no command assumes softmax and accuracy:

- ``single-label``: one class per image. Softmax over the classes, cross-entropy; top-1,
  top-5, balanced accuracy and macro-F1; a prediction is the top-k classes.
- ``multi-label``: any number of classes per image (none included). A sigmoid per class,
  binary cross-entropy; mAP (no threshold), and macro-F1, micro-F1 and exact match at
  per-class thresholds chosen on validation; a prediction is every class at or above its
  threshold.

An entry gives the label kind (reading and batching labels, `tlkit.data.labels`), the loss and
output activation, the epoch metrics and the metric that selects the best checkpoint, the
evaluation, the prediction row, the exported network's last layer, how test-time views average
(`logits_of`: probabilities back to logits), the sanity checks' expectations, and the linear
probe's score. A new task is one entry, its name in `config.Task`, and its label kind.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from tlkit.config import BALANCED_MONITOR_ABOVE_RATIO, ClassWeights, Task
from tlkit.data.labels import LABEL_KINDS, LABEL_SEPARATOR, LabelKind
from tlkit.errors import ConfigError
from tlkit.metrics import (
    ACCURACY,
    BALANCED_ACCURACY,
    EXACT_MATCH,
    MACRO_F1,
    MEAN_AVERAGE_PRECISION,
    MICRO_F1,
    TOP_K,
    TOP_K_ACCURACY,
    ClassificationMetrics,
    ConfusionMatrixScore,
    MultilabelMetrics,
    balanced_accuracy_bound,
    classification_metrics,
    mean_average_precision,
    mean_average_precision_bound,
    multilabel_metrics,
)


@dataclass(frozen=True)
class Decision:
    """A choice made from the data, with its reason (the monitored metric)."""

    value: str
    reason: str


@dataclass(frozen=True)
class TaskDefinition:
    """Everything one task does its own way (see the module's docstring)."""

    name: Task
    labels: LabelKind
    activation: Callable[[torch.Tensor], torch.Tensor]  # logits -> probabilities
    logits_of: Callable[[torch.Tensor], torch.Tensor]  # probabilities -> logits (+ a constant)
    output_layer: Callable[[], nn.Module]  # the exported network's last layer
    output_semantics: str  # the export card's description of the output
    # (logits, targets, per-class loss weights or None, label smoothing) -> mean loss
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, float], torch.Tensor]
    # (training images per class, training images) -> the classifier's bias at initialisation
    # (None: zero); the loss at initialisation is that of this constant prediction
    initial_bias: Callable[[list[int], int], list[float] | None]
    loss_at_init: Callable[[int], str]  # classes -> what the loss at initialisation is
    # (training images per class, training images) -> `--class-weights balanced`'s weights
    balanced_loss_weights: Callable[[list[int], int], list[float]]
    train_metrics: Callable[[int], dict[str, Metric]]  # classes -> epoch metrics of training
    epoch_metrics: Callable[[int], dict[str, Metric]]  # ... of validation and test
    # the validation and test scores come from all of an epoch's predictions (`evaluate`),
    # where thresholds are chosen, instead of `epoch_metrics`
    scores_from_predictions: bool
    monitorable: tuple[str, ...]  # the validation metrics that may select the best checkpoint
    choose_monitor: Callable[[float | None], Decision]  # training class ratio -> monitor
    # (probabilities, targets, classes, thresholds or None) -> the evaluation
    evaluate: Callable[..., ClassificationMetrics | MultilabelMetrics]
    # (one image's probabilities, classes, top k, thresholds) -> its prediction's columns
    prediction_row: Callable[[torch.Tensor, list[str], int, list[float]], dict[str, Any]]
    thresholded: bool  # a class is predicted at a per-class probability threshold
    # the per-image score: what the sanity check's overfit run must bring to its target, and
    # what `--tta auto`'s choice counts per preset
    fit_metric: str
    # the linear probe's and k-NN's score (a metric name), which picks the penalty and k, and
    # which auto's `features` runs compare the trained head on
    probe_metric: str
    probe_score: Callable[[torch.Tensor, torch.Tensor], float]  # (scores, targets) -> it
    # auto's evidence from the probe: (logits, targets, classes) -> (score, its one-sided 95%
    # lower bound), and the score's name
    probe_evidence: Callable[[torch.Tensor, torch.Tensor, int], tuple[float, float]]
    probe_evidence_metric: str
    # targets -> one stratum per image, dealt evenly round cross-validation's folds
    probe_strata: Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Single-label


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.softmax(dim=-1)


def _log(probabilities: torch.Tensor) -> torch.Tensor:
    return probabilities.clamp_min(1e-30).log()


def _cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None, smoothing: float
) -> torch.Tensor:
    return F.cross_entropy(logits, targets, weight=weights, label_smoothing=smoothing)


def _zero_bias(counts: list[int], images: int) -> None:
    """Equal probabilities at initialisation: every logit 0, the loss ln(C) whatever the class
    counts (the balanced-accuracy monitor and class weights judge every class alike)."""
    return None


def _ln_classes(num_classes: int) -> str:
    return f"ln {num_classes}"


def _inverse_frequency(counts: list[int], images: int) -> list[float]:
    """scikit-learn's `class_weight="balanced"`: images / (classes x the class's images)."""
    return [images / (len(counts) * count) if count else 0.0 for count in counts]


def _single_label_train_metrics(num_classes: int) -> dict[str, Metric]:
    return {ACCURACY: MulticlassAccuracy(num_classes, top_k=1, average="micro")}


def _single_label_epoch_metrics(num_classes: int) -> dict[str, Metric]:
    return {
        ACCURACY: MulticlassAccuracy(num_classes, top_k=1, average="micro"),
        TOP_K_ACCURACY: MulticlassAccuracy(
            num_classes, top_k=min(TOP_K, num_classes), average="micro"
        ),
        BALANCED_ACCURACY: ConfusionMatrixScore(num_classes, BALANCED_ACCURACY),
        MACRO_F1: ConfusionMatrixScore(num_classes, MACRO_F1),
    }


def _accuracy_unless_imbalanced(class_ratio: float | None) -> Decision:
    limit = BALANCED_MONITOR_ABOVE_RATIO
    if class_ratio is None:
        return Decision(ACCURACY, "training class sizes unknown")
    ratio = f"{class_ratio:.1f}:1" if math.isfinite(class_ratio) else "a class without images"
    if class_ratio > limit:
        return Decision(BALANCED_ACCURACY, f"training classes imbalanced ({ratio} > {limit:g}:1)")
    return Decision(ACCURACY, f"training classes balanced enough ({ratio} <= {limit:g}:1)")


def _evaluate_single_label(
    probabilities: torch.Tensor,
    targets: torch.Tensor,
    classes: list[str],
    thresholds: list[float] | None = None,
) -> ClassificationMetrics:
    return classification_metrics(probabilities, targets, classes)


def _top_k_row(
    probabilities: torch.Tensor, classes: list[str], top_k: int, thresholds: list[float]
) -> dict[str, Any]:
    values, indices = probabilities.topk(min(top_k, len(classes)))
    row: dict[str, Any] = {}
    pairs = zip(values.tolist(), indices.tolist(), strict=True)
    for rank, (value, index) in enumerate(pairs, start=1):
        row[f"label_{rank}"] = classes[index]
        row[f"prob_{rank}"] = round(value, 6)
    return row


def _top1(scores: torch.Tensor, targets: torch.Tensor) -> float:
    return float((scores.argmax(dim=1) == targets).float().mean())


def _balanced_accuracy_of_logits(
    logits: torch.Tensor, targets: torch.Tensor, num_classes: int
) -> tuple[float, float]:
    return balanced_accuracy_bound(logits.argmax(dim=1), targets, num_classes)


def _own_class(targets: torch.Tensor) -> torch.Tensor:
    return targets


# ---------------------------------------------------------------------------------------------
# Multi-label


def _sigmoid(logits: torch.Tensor) -> torch.Tensor:
    return logits.sigmoid()


def _log_odds(probabilities: torch.Tensor) -> torch.Tensor:
    return torch.logit(probabilities.clamp(1e-7, 1 - 1e-7))


def _sigmoid_layer() -> nn.Module:
    return nn.Sigmoid()


def _softmax_layer() -> nn.Module:
    return nn.Softmax(dim=1)


def _binary_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None, smoothing: float
) -> torch.Tensor:
    """Mean binary cross-entropy over images and classes; smoothed targets move towards 1/2;
    `weights` weigh each class's positives (PyTorch's `pos_weight`)."""
    targets = targets * (1 - smoothing) + smoothing / 2
    return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weights)


def _map_of_logits(
    logits: torch.Tensor, targets: torch.Tensor, num_classes: int
) -> tuple[float, float]:
    return mean_average_precision_bound(logits, targets)


def _rarest_class(targets: torch.Tensor) -> torch.Tensor:
    """Each image's rarest class (the number of classes for an image with none), so that
    stratifying by it spreads every class's few images over the folds."""
    frequency = targets.sum(dim=0)
    rarity = torch.where(targets > 0, frequency, math.inf)
    rarest = rarity.argmin(dim=1)
    return torch.where(targets.sum(dim=1) > 0, rarest, targets.shape[1])


def _label_log_odds(counts: list[int], images: int) -> list[float]:
    """Each label's log-odds in the training images, so that its sigmoid starts at the label's
    rate (Karpathy's "init well"; the prior bias of Lin et al. 2017): a zero bias starts every
    label at 1/2, and a short run spends its first steps pushing rare labels down. Counted as
    (count + 1/2) / (images + 1), so that a label on none or all of the images stays finite."""
    return [math.log((count + 0.5) / (images - count + 0.5)) for count in counts]


def _labels_rates(num_classes: int) -> str:
    return "each label's training rate"


def _negatives_over_positives(counts: list[int], images: int) -> list[float]:
    """Each class's positives weighted by its negatives / positives (1 without positives)."""
    return [(images - count) / count if count else 1.0 for count in counts]


def _no_metrics(num_classes: int) -> dict[str, Metric]:
    return {}


def _mean_average_precision(class_ratio: float | None) -> Decision:
    return Decision(MEAN_AVERAGE_PRECISION, "multi-label: mAP ranks without a threshold")


def _labels_at_thresholds(
    probabilities: torch.Tensor, classes: list[str], top_k: int, thresholds: list[float]
) -> dict[str, Any]:
    decisions = zip(classes, probabilities.tolist(), thresholds, strict=True)
    chosen = [name for name, probability, threshold in decisions if probability >= threshold]
    row = _top_k_row(probabilities, classes, top_k, thresholds)
    return {"labels": LABEL_SEPARATOR.join(chosen), **row}


def _evaluate_multi_label(
    probabilities: torch.Tensor,
    targets: torch.Tensor,
    classes: list[str],
    thresholds: list[float] | None = None,
) -> MultilabelMetrics:
    return multilabel_metrics(probabilities, targets, classes, thresholds)


# ---------------------------------------------------------------------------------------------
# The table


# The keys are config.Task's choices (a test checks it).
TASKS: dict[Task, TaskDefinition] = {
    "single-label": TaskDefinition(
        name="single-label",
        labels=LABEL_KINDS["single-label"],
        activation=_softmax,
        logits_of=_log,
        output_layer=_softmax_layer,
        output_semantics=(
            "class probabilities (softmax of the head's logits), one row per image summing to "
            "1, columns in the order of 'classes'; log(probabilities) are the logits up to a "
            "per-row constant"
        ),
        loss=_cross_entropy,
        initial_bias=_zero_bias,
        loss_at_init=_ln_classes,
        balanced_loss_weights=_inverse_frequency,
        train_metrics=_single_label_train_metrics,
        epoch_metrics=_single_label_epoch_metrics,
        scores_from_predictions=False,
        monitorable=(ACCURACY, BALANCED_ACCURACY, MACRO_F1),
        choose_monitor=_accuracy_unless_imbalanced,
        evaluate=_evaluate_single_label,
        prediction_row=_top_k_row,
        thresholded=False,
        fit_metric=ACCURACY,
        probe_metric=ACCURACY,
        probe_score=_top1,
        probe_evidence=_balanced_accuracy_of_logits,
        probe_evidence_metric="balanced accuracy",
        probe_strata=_own_class,
    ),
    "multi-label": TaskDefinition(
        name="multi-label",
        labels=LABEL_KINDS["multi-label"],
        activation=_sigmoid,
        logits_of=_log_odds,
        output_layer=_sigmoid_layer,
        output_semantics=(
            "per-class probabilities (a sigmoid of each logit), one row per image, columns in "
            "the order of 'classes', each independent of the others; a class is predicted "
            "where its probability is at least its entry of 'thresholds'"
        ),
        loss=_binary_cross_entropy,
        initial_bias=_label_log_odds,
        loss_at_init=_labels_rates,
        balanced_loss_weights=_negatives_over_positives,
        train_metrics=_no_metrics,
        epoch_metrics=_no_metrics,
        scores_from_predictions=True,
        monitorable=(MEAN_AVERAGE_PRECISION, MACRO_F1, MICRO_F1, EXACT_MATCH),
        choose_monitor=_mean_average_precision,
        evaluate=_evaluate_multi_label,
        prediction_row=_labels_at_thresholds,
        thresholded=True,
        fit_metric=EXACT_MATCH,
        probe_metric=MEAN_AVERAGE_PRECISION,
        probe_score=mean_average_precision,
        probe_evidence=_map_of_logits,
        probe_evidence_metric="mAP",
        probe_strata=_rarest_class,
    ),
}


def _unweighted(task: TaskDefinition, counts: list[int], images: int) -> list[float] | None:
    return None


def _balanced(task: TaskDefinition, counts: list[int], images: int) -> list[float] | None:
    return task.balanced_loss_weights(counts, images)


# Each way of weighing the classes in the loss: (task, training images per class, training
# images) -> per-class weights, or None for none. The keys are config.ClassWeights's choices.
CLASS_WEIGHTS: dict[
    ClassWeights, Callable[[TaskDefinition, list[int], int], list[float] | None]
] = {
    "none": _unweighted,
    "balanced": _balanced,
}


def task_of(name: str) -> TaskDefinition:
    """The task named `name`, with a clear error for an unknown one."""
    if name not in TASKS:
        raise ConfigError(f"unknown task '{name}': choose one of {', '.join(TASKS)}")
    return TASKS[name]


def resolve_monitor(task: str, given: str, class_ratio: float | None) -> Decision:
    """The validation metric that selects the best checkpoint and stops early: the one given,
    if the task logs it, or for `auto` the task's choice from the training class ratio."""
    definition = task_of(task)
    if given == "auto":
        return definition.choose_monitor(class_ratio)
    if given not in definition.monitorable:
        raise ConfigError(
            f"--monitor {given} is not a {task} metric: choose one of "
            f"{', '.join(definition.monitorable)} (or auto)"
        )
    return Decision(given, "given")
