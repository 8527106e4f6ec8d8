"""The linear probe and k-NN classifier on cached backbone features: transfer measured cheaply.

A frozen backbone's pooled features, cached once (tlkit/train/features.py, the same files as the
`features` strategy), say in seconds how far a linear head gets (the linear probe) and how well
the features cluster by class (k-NN). LP-FT (Kumar et al. 2022) starts fine-tuning from the
probe's head, and `--strategy auto` reads both accuracies as evidence.

The probe follows the classic linear-probe protocol (CLIP, BiT): multinomial logistic
regression on standardised features, its L2 penalty chosen on the validation split from a short
grid. It is fitted by full-batch L-BFGS in torch (`torch.optim.LBFGS`, strong-Wolfe line
search), warm-started along the grid from the strongest penalty to the weakest, 20 iterations
per penalty. Measured on an idle 2-core CPU on 9,979 train / 1,133 validation vectors of 1,280
features (Lite0, Fashion-MNIST, 64px): the three fits in 1.2 s, validation top-1 0.8703
(docs/benchmarks.md, "Cached features"). Timed side by side on a loaded machine,
scikit-learn's LogisticRegression (lbfgs) took as long for one penalty of the same problem as
this fit for all three, and returns numpy arrays to move back into the head.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tlkit.data.datamodule import BaseImageDataModule
from tlkit.data.datasets import LabelledImages
from tlkit.errors import ConfigError, DatasetError
from tlkit.model.classifier import TransferClassifier
from tlkit.train.features import CachedFeatureDataModule

logger = logging.getLogger(__name__)

# L2 penalties tried (on the mean cross-entropy over standardised features), strongest first.
L2_PENALTIES = (1e-1, 1e-2, 1e-3)
# k-NN neighbour counts tried (DINO's k-NN evaluation uses 20).
KNN_NEIGHBOURS = (1, 5, 10, 20, 50)
LBFGS_ITERATIONS = 20  # per penalty: within 0.2 points of convergence (measured), 66 evaluations
# Fewer validation images than this: the probe's evidence is k-fold cross-validation instead.
CROSS_VALIDATE_BELOW = 200
CROSS_VALIDATION_FOLDS = 5
ONE_SIDED_95 = 1.645  # the normal quantile of a one-sided 95% bound
# k-NN votes: each neighbour's weight is exp(similarity / temperature), as DINO's k-NN
# evaluation weighs them (Caron et al. 2021): always positive, so a dissimilar neighbour votes
# weakly for its class, never against it.
KNN_TEMPERATURE = 0.07
KNN_CHUNK = 1024  # validation rows per similarity matmul (bounds memory at chunk x train rows)


@dataclass
class ProbeResult:
    """A fitted linear probe and the k-NN classifier's accuracy on the same features."""

    linear_val_acc: float  # validation top-1 of the linear probe
    knn_val_acc: float  # validation top-1 of the k-NN classifier (cosine, same features)
    knn_k: int
    fit_seconds: float  # time to fit the linear probe (not extraction)
    weight: torch.Tensor  # (num_classes, feature_dim): the head's classifier weight
    bias: torch.Tensor  # (num_classes,)
    l2_penalty: float = 0.0  # the penalty chosen on validation
    # Balanced accuracy (mean recall over the classes with images) and a one-sided 95% lower
    # bound on it (`balanced_accuracy_bound`), on validation or, where the validation split is
    # small, on out-of-fold predictions of the training features (`evidence`).
    balanced_acc: float = float("nan")
    balanced_lower_bound: float = float("nan")
    evidence: str = "validation"  # or "5-fold cross-validation"
    evidence_images: int = 0  # the predictions behind balanced_acc

    def copy_into(self, model: TransferClassifier) -> None:
        """Make this probe the model's classifier (LP-FT's start); the head must have no hidden
        layer, whose output the probe never saw."""
        if model.hparams.head_hidden:
            raise ConfigError("a linear probe can only start a head without a hidden layer")
        with torch.no_grad():
            model.head.classifier.weight.copy_(self.weight)
            model.head.classifier.bias.copy_(self.bias)

    def summary(self) -> dict[str, float | int]:
        """The probe's numbers, for summary.json and the log."""
        return {
            "linear_val_acc": round(self.linear_val_acc, 4),
            "knn_val_acc": round(self.knn_val_acc, 4),
            "knn_k": self.knn_k,
            "l2_penalty": self.l2_penalty,
            "fit_seconds": round(self.fit_seconds, 3),
            "balanced_acc": round(self.balanced_acc, 4),
            "balanced_lower_bound": round(self.balanced_lower_bound, 4),
            "evidence": self.evidence,
            "evidence_images": self.evidence_images,
        }


def fit_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> ProbeResult:
    """Fit the linear probe (penalty chosen on validation) and measure k-NN on the same features.

    Deterministic for the same inputs (full-batch L-BFGS from zero weights; `seed` fixes torch's
    generator for anything random), so every DDP process fitting it gets the same head.
    The returned weight and bias act on the raw features (on the CPU): the standardisation is
    folded in. Its balanced accuracy comes with a lower confidence bound; where the validation
    split holds fewer than `CROSS_VALIDATE_BELOW` images, that evidence comes from k-fold
    cross-validation on the training and validation features together instead.
    """
    _check_features(train_x, train_y, val_x, val_y, num_classes)
    device = torch.device(device)
    train_x, val_x = train_x.float().to(device), val_x.float().to(device)
    train_y, val_y = train_y.long().to(device), val_y.long().to(device)
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fitted = _fit_penalties(train_x, train_y, num_classes)
        scored = [(_accuracy(head(val_x), val_y), penalty, head) for penalty, head in fitted]
        # the best on validation; ties: the stronger penalty, tried first
        accuracy, penalty, head = max(scored, key=lambda row: (row[0], row[1]))
        predicted = head(val_x).argmax(1)
        balanced, bound = balanced_accuracy_bound(predicted, val_y, num_classes)
        evidence, evidence_images = "validation", len(val_y)
        if len(val_y) < CROSS_VALIDATE_BELOW:
            balanced, bound, evidence_images = _cross_validated(
                torch.cat([train_x, val_x]), torch.cat([train_y, val_y]), num_classes, seed
            )
            evidence = f"{CROSS_VALIDATION_FOLDS}-fold cross-validation"
    fit_seconds = time.perf_counter() - started
    knn_accuracy, knn_k = knn_accuracy_best_k(train_x, train_y, val_x, val_y, num_classes)
    return ProbeResult(
        linear_val_acc=accuracy,
        knn_val_acc=knn_accuracy,
        knn_k=knn_k,
        fit_seconds=fit_seconds,
        weight=head.weight.cpu(),
        bias=head.bias.cpu(),
        l2_penalty=penalty,
        balanced_acc=balanced,
        balanced_lower_bound=bound,
        evidence=evidence,
        evidence_images=evidence_images,
    )


@dataclass(frozen=True)
class _LinearHead:
    """A fitted probe on raw features: logits = x W^T + b."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight.T + self.bias


def _fit_penalties(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> list[tuple[float, _LinearHead]]:
    """The probe fitted at each of `L2_PENALTIES` (strongest first, each warm-started from the
    last) on standardised features, each folded back to act on the raw features."""
    mean = features.mean(0)
    std = features.std(0).clamp_min(1e-6)  # a dead feature (all zero) stays zero
    standardised = (features - mean) / std
    weight = torch.zeros(num_classes, features.shape[1], requires_grad=True, device=features.device)
    bias = torch.zeros(num_classes, requires_grad=True, device=features.device)
    fitted = []
    for penalty in L2_PENALTIES:
        _minimise(standardised, labels, weight, bias, penalty)
        # logits = W (x - mean) / std + b = (W / std) x + (b - (W / std) mean)
        folded = weight.detach() / std
        fitted.append((penalty, _LinearHead(folded, bias.detach() - folded @ mean)))
    return fitted


def _cross_validated(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int
) -> tuple[float, float, int]:
    """(balanced accuracy, its lower bound, images) of out-of-fold predictions: stratified
    k-fold, each fold predicted by the probe fitted on the others at the penalty that is best
    over all folds."""
    generator = torch.Generator().manual_seed(seed)
    fold_of = torch.empty(len(labels), dtype=torch.long)
    for label in labels.unique():  # each class dealt round the folds in a seeded order
        members = (labels == label).nonzero().flatten().cpu()
        members = members[torch.randperm(len(members), generator=generator)]
        fold_of[members] = torch.arange(len(members)) % CROSS_VALIDATION_FOLDS
    fold_of = fold_of.to(labels.device)
    predictions = {penalty: torch.empty_like(labels) for penalty in L2_PENALTIES}
    for fold in range(CROSS_VALIDATION_FOLDS):
        held_out = fold_of == fold
        if held_out.all() or not held_out.any():
            continue
        for penalty, head in _fit_penalties(features[~held_out], labels[~held_out], num_classes):
            predictions[penalty][held_out] = head(features[held_out]).argmax(1)
    scores = [
        balanced_accuracy_bound(predicted, labels, num_classes)
        for predicted in predictions.values()
    ]
    balanced, bound = max(scores)
    return balanced, bound, len(labels)


def balanced_accuracy_bound(
    predicted: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[float, float]:
    """(balanced accuracy, its one-sided 95% lower bound) of predicted against true labels.

    Balanced accuracy is the mean recall over the classes that have images. The bound is the
    normal approximation to the mean of the per-class binomial proportions, each smoothed as
    Laplace's rule of succession does ((k + 1) / (n + 2)), so that a class of 10 images all
    right still counts as uncertain: 10 of 10 right in each of two classes bounds the balanced
    accuracy at 0.90, 100 of 100 at 0.99.
    """
    recalls, variances = [], []
    for label in range(num_classes):
        members = labels == label
        count = int(members.sum())
        if count == 0:
            continue
        right = int((predicted[members] == label).sum())
        recalls.append(right / count)
        smoothed = (right + 1) / (count + 2)
        variances.append(smoothed * (1 - smoothed) / count)
    balanced = sum(recalls) / len(recalls)
    spread = math.sqrt(sum(variances)) / len(recalls)
    return balanced, max(0.0, balanced - ONE_SIDED_95 * spread)


def _check_features(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
) -> None:
    if len(train_x) == 0 or len(val_x) == 0:
        raise DatasetError("the linear probe needs training and validation images; one is empty")
    if train_x.ndim != 2 or val_x.shape[1:] != train_x.shape[1:]:
        raise ValueError(f"features must be (N, D): got {train_x.shape} and {val_x.shape}")
    if len(train_y) != len(train_x) or len(val_y) != len(val_x):
        raise ValueError("one label per feature vector expected")
    labels = torch.cat([train_y, val_y])
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes})")


def _minimise(
    features: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    penalty: float,
) -> None:
    """Mean cross-entropy + penalty / 2 * |weight|^2 by full-batch L-BFGS, from the current
    weight and bias (a warm start)."""
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=LBFGS_ITERATIONS,
        history_size=10,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, labels)
        loss = loss + 0.5 * penalty * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


@torch.no_grad()
def knn_accuracy_best_k(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    neighbour_counts: tuple[int, ...] = KNN_NEIGHBOURS,
) -> tuple[float, int]:
    """(validation top-1, k) of the best cosine-similarity k-NN classifier over `neighbour_counts`
    (counts above the training size are left out). Neighbours vote with exp(similarity /
    `KNN_TEMPERATURE`): the nearest count most, none counts against its class."""
    counts = [k for k in neighbour_counts if k <= len(train_x)] or [len(train_x)]
    train = F.normalize(train_x.float(), dim=1)
    train_y = train_y.to(train.device)
    correct = torch.zeros(len(counts))
    for start in range(0, len(val_x), KNN_CHUNK):
        chunk = F.normalize(val_x[start : start + KNN_CHUNK].float(), dim=1)
        similarity, index = (chunk @ train.T).topk(max(counts), dim=1)
        neighbour_labels = train_y[index]
        weights = (similarity / KNN_TEMPERATURE).exp()
        truth = val_y[start : start + KNN_CHUNK].to(train.device)
        for position, k in enumerate(counts):
            votes = torch.zeros(len(chunk), num_classes, device=train.device)
            votes.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
            correct[position] += (votes.argmax(1) == truth).sum().cpu()
    accuracies = correct / len(val_x)
    best = int(accuracies.argmax())  # ties: the smaller k
    return float(accuracies[best]), counts[best]


def probe_features(
    model: TransferClassifier,
    images: BaseImageDataModule,
    cache_dir: str | Path,
    progress: bool = False,
    device: str | torch.device = "cpu",
    per_class: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cached pooled features (plain evaluation view) of the train and validation splits:
    `train_x, train_y, val_x, val_y`; with `per_class`, of a seeded sample of at most that many
    images of each class in each split (`per_class_sample`), which bounds the probe's cost
    whatever the dataset's size.

    Through the `features` strategy's cache (same keys, same files in `cache_dir`): what is
    cached is read, what is not is extracted on `device`. Safe to call from every DDP process
    before any process group exists: a file lock lets one process extract while the others
    wait, then read the file.
    """
    images.setup("fit")
    splits = {"train": images.train_set, "val": images.val_set}
    if per_class is not None:
        splits = {name: per_class_sample(split, per_class, seed) for name, split in splits.items()}
    cache = CachedFeatureDataModule(
        model, images, cache_dir, device=device, progress=progress, splits=splits
    )
    train_x, train_y = cache.labelled_features("train")
    val_x, val_y = cache.labelled_features("val")
    return train_x[0], train_y, val_x[0], val_y


def per_class_sample(images: LabelledImages, per_class: int, seed: int) -> LabelledImages:
    """At most `per_class` images of each class, drawn with a seeded generator (the same sample
    every time, so its cached features are found again); all of them if none has more."""
    by_class: dict[int, list[int]] = {}
    for position, (_path, label) in enumerate(images.samples):
        by_class.setdefault(label, []).append(position)
    if all(len(positions) <= per_class for positions in by_class.values()):
        return images
    generator = random.Random(seed)
    chosen = []
    for positions in by_class.values():
        chosen += (
            positions if len(positions) <= per_class else generator.sample(positions, per_class)
        )
    return images.subset(sorted(chosen))
