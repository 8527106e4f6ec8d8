"""Classification metrics of predictions on labelled images, computed by torchmetrics.

One function, `classification_metrics`, for `tlkit evaluate` and `tlkit report`, so the numbers
a user reads in the terminal and on the report page are the same numbers; and one,
`accuracy_interval`, for how far an accuracy measured on few images can be trusted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.stats import binomtest
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

TOP_K = 5  # the second accuracy reported beside top-1 (fewer with fewer classes)
CONFIDENCE = 0.95  # of the interval given with a test accuracy


@dataclass
class ClassMetrics:
    """Precision, recall and F1 of one class; `predicted` counts images given this label.

    The recall is the class's accuracy: the share of its images classified as it.
    """

    name: str
    precision: float
    recall: float
    f1: float
    support: int
    predicted: int


@dataclass
class ClassificationMetrics:
    """Accuracies, the confusion matrix and per-class scores of predictions on labelled data."""

    classes: list[str]
    images: int
    top1: float
    top_k: int
    top_k_accuracy: float
    macro_f1: float  # over the classes that have images
    confusion: torch.Tensor  # (C, C) counts; rows are true classes, columns predictions
    per_class: list[ClassMetrics]


def classification_metrics(
    probabilities: torch.Tensor, labels: torch.Tensor, classes: list[str]
) -> ClassificationMetrics:
    """Metrics of (N, C) class probabilities against (N,) true class indices; `per_class` is in
    the order of `classes`."""
    num_classes = len(classes)
    top_k = min(TOP_K, num_classes)
    confusion = multiclass_confusion_matrix(probabilities, labels, num_classes)
    scores = [
        score(probabilities, labels, num_classes, average=None).tolist()
        for score in (multiclass_precision, multiclass_recall, multiclass_f1_score)
    ]
    per_class = [
        ClassMetrics(name, precision, recall, f1, int(support), int(predicted))
        for name, precision, recall, f1, support, predicted in zip(
            classes, *scores, confusion.sum(dim=1), confusion.sum(dim=0), strict=True
        )
    ]
    present = [metrics for metrics in per_class if metrics.support > 0]
    return ClassificationMetrics(
        classes=classes,
        images=len(labels),
        top1=float(multiclass_accuracy(probabilities, labels, num_classes, average="micro")),
        top_k=top_k,
        top_k_accuracy=float(
            multiclass_accuracy(probabilities, labels, num_classes, top_k=top_k, average="micro")
        ),
        macro_f1=sum(m.f1 for m in present) / len(present) if present else float("nan"),
        confusion=confusion,
        per_class=per_class,
    )


def accuracy_interval(
    accuracy: float, images: int, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """The Wilson score interval of an accuracy measured on `images` images: where the
    accuracy on all images like them lies, with probability `confidence` (a binomial count of
    correct images; SciPy's `binomtest(...).proportion_ci(method="wilson")`). Unlike the
    normal approximation it stays inside [0, 1] and holds for small counts and accuracies
    near 0 or 1: about 0.70-0.83 for 77% of 146 images."""
    correct = round(accuracy * images)  # an accuracy is correct images / images
    interval = binomtest(correct, images).proportion_ci(confidence, method="wilson")
    return float(interval.low), float(interval.high)
