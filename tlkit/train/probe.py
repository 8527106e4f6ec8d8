"""The linear probe and k-NN classifier on cached backbone features: transfer measured cheaply.

A frozen backbone's pooled features, cached once (tlkit/train/features.py, the same files as the
`features` strategy), say in seconds how far a linear head gets (the linear probe) and how well
the features cluster by class (k-NN). LP-FT (Kumar et al. 2022) starts fine-tuning from the
probe's head, and `--strategy auto` reads both accuracies as evidence.

The probe follows the classic linear-probe protocol (CLIP, BiT): multinomial logistic
regression on standardised features, its L2 penalty chosen on the validation split from a short
grid. For a multi-label task it is one-vs-rest logistic regression (the task's loss, binary
cross-entropy per class, fitted jointly) and its evidence is mAP, not top-1; k-NN scores a class
by its neighbours' similarity-weighted votes for it (`TaskDefinition.probe_score`).

It is fitted by full-batch L-BFGS in torch (`torch.optim.LBFGS`, strong-Wolfe line
search), warm-started along the grid from the strongest penalty to the weakest, 20 iterations
per penalty. Measured on an idle 2-core CPU on 9,979 train / 1,133 validation vectors of 1,280
features (Lite0, Fashion-MNIST, 64px): the three fits in 1.2 s, validation top-1 0.8703
(docs/benchmarks.md, "Cached features"). Timed side by side on a loaded machine,
scikit-learn's LogisticRegression (lbfgs) took as long for one penalty of the same problem as
this fit for all three, and returns numpy arrays to move back into the head.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tlkit.data.datamodule import BaseImageDataModule
from tlkit.errors import ConfigError, DatasetError
from tlkit.model.classifier import TransferClassifier
from tlkit.model.tasks import TaskDefinition, task_of
from tlkit.train.features import CachedFeatureDataModule

logger = logging.getLogger(__name__)

# L2 penalties tried (on the mean cross-entropy over standardised features), strongest first.
L2_PENALTIES = (1e-1, 1e-2, 1e-3)
# k-NN neighbour counts tried (DINO's k-NN evaluation uses 20).
KNN_NEIGHBOURS = (1, 5, 10, 20, 50)
LBFGS_ITERATIONS = 20  # per penalty: within 0.2 points of convergence (measured), 66 evaluations
KNN_CHUNK = 1024  # validation rows per similarity matmul (bounds memory at chunk x train rows)


@dataclass
class ProbeResult:
    """A fitted linear probe and the k-NN classifier's score on the same features: validation
    top-1, or for a multi-label task mAP (`metric`)."""

    linear_val_acc: float  # validation score (`metric`) of the linear probe
    knn_val_acc: float  # validation score of the k-NN classifier (cosine, same features)
    knn_k: int
    fit_seconds: float  # time to fit the linear probe (not extraction)
    weight: torch.Tensor  # (num_classes, feature_dim): the head's classifier weight
    bias: torch.Tensor  # (num_classes,)
    l2_penalty: float = 0.0  # the penalty chosen on validation
    metric: str = "top-1"

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
            "metric": self.metric,
        }


def fit_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    seed: int = 0,
    task: str = "single-label",
) -> ProbeResult:
    """Fit the linear probe (penalty chosen on validation) and measure k-NN on the same features.
    Labels are the task's targets: (N,) class indices, or (N, C) 0/1 rows for multi-label.

    Deterministic for the same inputs (full-batch L-BFGS from zero weights; `seed` fixes torch's
    generator for anything random), so every DDP process fitting it gets the same head.
    The returned weight and bias act on the raw features: the standardisation is folded in.
    """
    definition = task_of(task)
    _check_features(train_x, train_y, val_x, val_y, num_classes)
    train_x, val_x = train_x.float().cpu(), val_x.float().cpu()
    train_y, val_y = train_y.cpu(), val_y.cpu()
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean = train_x.mean(0)
        std = train_x.std(0).clamp_min(1e-6)  # a dead feature (all zero) stays zero
        train_z, val_z = (train_x - mean) / std, (val_x - mean) / std
        weight = torch.zeros(num_classes, train_x.shape[1], requires_grad=True)
        bias = torch.zeros(num_classes, requires_grad=True)
        best: tuple[float, float, torch.Tensor, torch.Tensor] | None = None
        for penalty in L2_PENALTIES:
            _minimise(train_z, train_y, weight, bias, penalty, definition)
            with torch.no_grad():
                accuracy = definition.probe_score(val_z @ weight.T + bias, val_y)
            if best is None or accuracy > best[0]:  # ties: the stronger penalty, tried first
                best = (accuracy, penalty, weight.detach().clone(), bias.detach().clone())
    accuracy, penalty, weight, bias = best
    fit_seconds = time.perf_counter() - started
    # logits = W (x - mean) / std + b = (W / std) x + (b - (W / std) mean)
    folded_weight = weight / std
    folded_bias = bias - folded_weight @ mean
    knn_accuracy, knn_k = knn_accuracy_best_k(
        train_x, train_y, val_x, val_y, num_classes, task=task
    )
    return ProbeResult(
        linear_val_acc=accuracy,
        knn_val_acc=knn_accuracy,
        knn_k=knn_k,
        fit_seconds=fit_seconds,
        weight=folded_weight,
        bias=folded_bias,
        l2_penalty=penalty,
        metric=definition.probe_metric,
    )


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
    if labels.ndim == 2 and labels.shape[1] != num_classes:
        raise ValueError(f"multi-label targets must have {num_classes} columns")
    if labels.ndim == 1 and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")


def _minimise(
    features: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    penalty: float,
    task: TaskDefinition,
) -> None:
    """The task's mean loss (cross-entropy; multi-label: binary cross-entropy) + penalty / 2 *
    |weight|^2 by full-batch L-BFGS, from the current weight and bias (a warm start)."""
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
        loss = task.loss(features @ weight.T + bias, labels, None, 0.0)
        loss = loss + 0.5 * penalty * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)


@torch.no_grad()
def knn_accuracy_best_k(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    neighbour_counts: tuple[int, ...] = KNN_NEIGHBOURS,
    task: str = "single-label",
) -> tuple[float, int]:
    """(validation score, k) of the best cosine-similarity k-NN classifier over
    `neighbour_counts` (counts above the training size are left out): top-1, or for a
    multi-label task mAP of the votes. Neighbours vote with their similarity (for each of their
    labels), which also breaks ties."""
    score = task_of(task).probe_score
    counts = [k for k in neighbour_counts if k <= len(train_x)] or [len(train_x)]
    train = F.normalize(train_x.float(), dim=1)
    class_indices = train_y.ndim == 1
    # top-1 is a mean over images, summed chunk by chunk; mAP needs every image's votes
    correct = torch.zeros(len(counts))
    votes = [] if class_indices else [torch.zeros(len(val_x), num_classes) for _ in counts]
    for start in range(0, len(val_x), KNN_CHUNK):
        chunk = F.normalize(val_x[start : start + KNN_CHUNK].float(), dim=1)
        similarity, index = (chunk @ train.T).topk(max(counts), dim=1)
        neighbour_labels = train_y[index]
        truth = val_y[start : start + KNN_CHUNK]
        for position, k in enumerate(counts):
            if class_indices:
                chunk_votes = torch.zeros(len(chunk), num_classes)
                chunk_votes.scatter_add_(1, neighbour_labels[:, :k], similarity[:, :k])
                correct[position] += score(chunk_votes, truth) * len(chunk)
            else:  # multi-label 0/1 rows: each neighbour votes for each of its labels
                chunk_votes = torch.einsum("nk,nkc->nc", similarity[:, :k], neighbour_labels[:, :k])
                votes[position][start : start + KNN_CHUNK] = chunk_votes
    if class_indices:
        scores = correct / len(val_x)
    else:
        scores = torch.tensor([score(vote, val_y) for vote in votes])
    best = int(scores.argmax())  # ties: the smaller k
    return float(scores[best]), counts[best]


def probe_features(
    model: TransferClassifier,
    images: BaseImageDataModule,
    cache_dir: str | Path,
    progress: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cached pooled features (plain evaluation view) of the train and validation splits:
    `train_x, train_y, val_x, val_y`.

    Through the `features` strategy's cache (same keys, same files in `cache_dir`): what is
    cached is read, what is not is extracted on `device`. Safe to call from every DDP process
    before any process group exists: a file lock lets one process extract while the others
    wait, then read the file.
    """
    images.setup("fit")
    cache = CachedFeatureDataModule(model, images, cache_dir, device=device, progress=progress)
    train_x, train_y = cache.labelled_features("train")
    val_x, val_y = cache.labelled_features("val")
    return train_x[0], train_y, val_x[0], val_y
