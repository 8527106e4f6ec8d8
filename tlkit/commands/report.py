"""`tlkit report`: one self-contained HTML page that shows how a run learned and where it errs.

The page holds the learning curves (summary.json's per-epoch history, written whichever logger
the run used; the monitored metric), the run's card and, for labelled data, what its task's
entry of `TASK_REPORTS` shows. Single-label: the confusion matrix (counts and row-normalised),
precision, recall, F1 and support per class (worst first), the most confused class pairs and a
grid of the highest-loss wrong predictions (fastai's `ClassificationInterpretation.
plot_top_losses`, wrong ones only). Multi-label: mAP, F1 and exact match at the model's
thresholds, average precision, precision, recall and F1 per class (worst first), each class's
precision-recall curve, and grids of the worst false positives and false negatives. Classes
without images are named, not averaged in. Numbers come from `tlkit.metrics` (torchmetrics, the
same functions `tlkit evaluate` and training use), figures from matplotlib's Agg canvas (no
pyplot state), the page from the Jinja2 templates in tlkit/templates/ with autoescaping (class
names are folder names, i.e. user input). Each figure is written as a PNG beside the page and
embedded in it as a base64 data URI, so `report.html` opens offline, alone, in any browser.
"""

from __future__ import annotations

import base64
import io
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from jinja2 import Environment, PackageLoader, StrictUndefined
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image
from sklearn.metrics import ConfusionMatrixDisplay

from tlkit.config import FinetuneConfig
from tlkit.data.images import DEFAULT_MAX_IMAGE_PIXELS, load_rgb
from tlkit.data.shards import find_converted
from tlkit.data.sources import OtherFiles
from tlkit.errors import ConfigError
from tlkit.infer.predict import (
    LabelledPredictions,
    Predictor,
    load_model,
    predict_labelled,
    resolve_tta,
    tta_choice_metric,
    unmeasured_presets,
)
from tlkit.metrics import (
    ACCURACY,
    CONFIDENCE,
    TITLES,
    ClassificationMetrics,
    ClassMetrics,
    MultilabelMetrics,
    accuracy_interval,
    classification_metrics,
    logged_name,
    multilabel_metrics,
    precision_recall_curves,
)
from tlkit.runfolder import (
    SKIPPED,
    DataFacts,
    RunSummary,
    image_limits,
    open_run,
    scan_options,
)

REPORT_PAGE = "report.html"
REPORT_TEMPLATE = "report.html.j2"  # in tlkit/templates/
LEARNING_CURVES = "learning_curves.png"
CONFUSION_MATRIX = "confusion_matrix.png"
WORST_MISTAKES = "worst_mistakes.png"
PRECISION_RECALL = "precision_recall.png"  # multi-label
FALSE_POSITIVES = "false_positives.png"
FALSE_NEGATIVES = "false_negatives.png"
CONFUSED_PAIRS_SHOWN = 10
SKIPPED_SHOWN = 20
THUMBNAIL_SIZE = 160  # pixels, longest side of an image in the worst-mistakes grid
MISTAKE_COLUMNS = 4
VALUES_IN_CELLS_UP_TO = 30  # classes; larger confusion matrices are shown as colour only


@dataclass
class Mistake:
    """A wrong prediction: the image, its true and predicted label, and the loss it cost."""

    path: str
    true_label: str
    predicted_label: str
    predicted_probability: float
    true_probability: float
    loss: float  # cross-entropy, -ln p(true label)
    image: np.ndarray | None = None  # decoded already (from shards); else read from `path`

    @property
    def title(self) -> str:
        return (
            f"true: {self.true_label}\n"
            f"predicted: {self.predicted_label} ({self.predicted_probability:.2f})\n"
            f"loss {self.loss:.2f}"
        )


@dataclass
class ConfusedPair:
    """How often images of `true_label` were predicted as `predicted_label`."""

    true_label: str
    predicted_label: str
    count: int
    share: float  # of the images of `true_label`


@dataclass(kw_only=True)
class Evaluation(ClassificationMetrics):
    """What the report shows about single-label predictions: the metrics (`per_class` in class
    order, `worst_first` by lowest F1, then lowest recall), the confusions and the worst
    mistakes."""

    worst_first: list[ClassMetrics]
    confused_pairs: list[ConfusedPair]  # most frequent first
    wrong: int
    mistakes: list[Mistake]  # the highest-loss wrong predictions, highest first
    skipped: list[tuple[str, str]]

    def headline(self) -> str:
        return (
            f"top-1 {self.top1:.4f}, balanced accuracy {_number(self.balanced_accuracy, 4)} on "
            f"{self.images} images, {self.wrong} wrong"
        )


@dataclass
class Report:
    """Where the page and its figures were written, and the evaluation they show."""

    page: Path
    figures: list[Path]
    evaluation: Evaluation | MultilabelEvaluation | None


def _worst_first(per_class: list[ClassMetrics]) -> list[ClassMetrics]:
    """Classes without images last; the others by lowest F1, then lowest recall."""
    return sorted(per_class, key=lambda m: (m.support == 0, m.f1 or 0.0, m.recall or 0.0, m.name))


def analyse(predictions: LabelledPredictions, classes: list[str], mistakes: int = 16) -> Evaluation:
    """Single-label: metrics, confusions and the `mistakes` highest-loss wrong predictions."""
    probabilities, labels = predictions.probabilities, predictions.labels
    metrics = classification_metrics(probabilities, labels, classes)

    predicted = probabilities.argmax(dim=1)
    losses = F.nll_loss(probabilities.clamp_min(1e-12).log(), labels, reduction="none")
    wrong = (predicted != labels).nonzero().flatten()
    worst_first = wrong[losses[wrong].argsort(descending=True, stable=True)]
    shown = [
        Mistake(
            path=predictions.paths[index],
            true_label=classes[int(labels[index])],
            predicted_label=classes[int(predicted[index])],
            predicted_probability=float(probabilities[index, predicted[index]]),
            true_probability=float(probabilities[index, labels[index]]),
            loss=float(losses[index]),
            image=predictions.shards.rgb(index) if predictions.shards is not None else None,
        )
        for index in worst_first[:mistakes].tolist()
    ]
    return Evaluation(
        **vars(metrics),
        worst_first=_worst_first(metrics.per_class),
        confused_pairs=most_confused(metrics.confusion, classes),
        wrong=len(wrong),
        mistakes=shown,
        skipped=list(predictions.skipped),
    )


@dataclass
class LabelMistake:
    """A wrong multi-label decision: an image, the class decided wrongly, the image's true
    labels, the model's probability for the class and the threshold it was decided at."""

    path: str
    labels: list[str]
    class_name: str
    probability: float
    threshold: float
    loss: float  # binary cross-entropy of this decision
    image: np.ndarray | None = None

    @property
    def false_positive(self) -> bool:
        return self.class_name not in self.labels

    @property
    def title(self) -> str:
        kind = "false positive" if self.false_positive else "missed"
        truth = ", ".join(self.labels) or "(none)"
        return f"{kind}: {self.class_name}\np {self.probability:.2f} (t {self.threshold:.2f})\n" + (
            f"true: {truth}"
        )


@dataclass(kw_only=True)
class MultilabelEvaluation(MultilabelMetrics):
    """What the report shows about multi-label predictions: the metrics at the model's
    thresholds (`per_class` in class order, `worst_first` by lowest average precision), each
    class's precision-recall curve, and the worst false positives (highest probability where
    the class is absent) and false negatives (lowest probability where it is present)."""

    worst_first: list[ClassMetrics]
    curves: dict[str, tuple[list[float], list[float]]]  # class -> (recall, precision)
    false_positives: list[LabelMistake]
    false_negatives: list[LabelMistake]
    false_positive_count: int
    false_negative_count: int
    skipped: list[tuple[str, str]]

    def headline(self) -> str:
        return (
            f"mAP {_number(self.mean_average_precision, 4)}, macro-F1 "
            f"{_number(self.macro_f1, 4)}, exact match {self.exact_match:.4f} on {self.images} "
            f"images"
        )


def analyse_multilabel(
    predictions: LabelledPredictions,
    classes: list[str],
    thresholds: list[float],
    mistakes: int = 16,
) -> MultilabelEvaluation:
    """Multi-label: metrics at `thresholds`, precision-recall curves, and the `mistakes` worst
    false positives and false negatives each."""
    probabilities, targets = predictions.probabilities, predictions.labels
    metrics = multilabel_metrics(probabilities, targets, classes, thresholds)
    limits = torch.tensor(metrics.thresholds)
    decided = probabilities >= limits
    present = targets.bool()
    losses = F.binary_cross_entropy(
        probabilities.clamp(1e-7, 1 - 1e-7), targets.float(), reduction="none"
    )
    curves = {
        classes[index]: (recall.tolist(), precision.tolist())
        for index, (precision, recall, _) in precision_recall_curves(probabilities, targets).items()
    }

    def worst(cells: torch.Tensor) -> list[LabelMistake]:
        """The (image, class) cells of `cells` with the highest loss, highest first."""
        rows, columns = cells.nonzero(as_tuple=True)
        order = losses[rows, columns].argsort(descending=True, stable=True)[:mistakes]
        return [
            LabelMistake(
                path=predictions.paths[row],
                labels=[classes[c] for c in present[row].nonzero().flatten().tolist()],
                class_name=classes[column],
                probability=float(probabilities[row, column]),
                threshold=float(limits[column]),
                loss=float(losses[row, column]),
                image=predictions.shards.rgb(row) if predictions.shards is not None else None,
            )
            for row, column in zip(rows[order].tolist(), columns[order].tolist(), strict=True)
        ]

    return MultilabelEvaluation(
        **vars(metrics),
        worst_first=sorted(
            metrics.per_class,
            key=lambda m: (m.support == 0, m.average_precision or 0.0, m.name),
        ),
        curves=curves,
        false_positives=worst(decided & ~present),
        false_negatives=worst(~decided & present),
        false_positive_count=int((decided & ~present).sum()),
        false_negative_count=int((~decided & present).sum()),
        skipped=list(predictions.skipped),
    )


def most_confused(
    confusion: torch.Tensor, classes: list[str], limit: int = CONFUSED_PAIRS_SHOWN
) -> list[ConfusedPair]:
    """The off-diagonal cells of the confusion matrix with the most images, largest first."""
    off_diagonal = confusion.clone()
    off_diagonal.fill_diagonal_(0)
    counts, cells = off_diagonal.flatten().sort(descending=True, stable=True)
    support = confusion.sum(dim=1)
    num_classes = len(classes)
    return [
        ConfusedPair(
            true_label=classes[cell // num_classes],
            predicted_label=classes[cell % num_classes],
            count=count,
            share=count / int(support[cell // num_classes]),
        )
        for count, cell in zip(counts[:limit].tolist(), cells[:limit].tolist(), strict=True)
        if count > 0
    ]


def _figure(width: float, height: float, layout: str = "constrained") -> Figure:
    """A matplotlib figure drawn by the Agg canvas, outside pyplot's global state."""
    figure = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def learning_curves_figure(
    history: list[dict[str, float]], best_epoch: int | None, monitor: str = "val_acc"
) -> Figure:
    """Training (and validation) loss, the monitored metric (for training too where it is
    logged), head learning rate."""
    epochs = [record["epoch"] for record in history]
    metric = monitor.removeprefix("val_")

    def series(key: str) -> list[float] | None:
        values = [float(record.get(key, math.nan)) for record in history]
        return None if all(math.isnan(value) for value in values) else values

    figure = _figure(13, 3.6)
    loss_axes, metric_axes, lr_axes = figure.subplots(1, 3)
    panels = (
        (loss_axes, "loss", (("loss", "train"), ("val_loss", "validation"))),
        (
            metric_axes,
            TITLES.get(metric, metric),
            ((logged_name("train", metric), "train"), (monitor, "validation")),
        ),
        (lr_axes, "learning rate (new head)", (("lr", "head"),)),
    )
    for axes, title, lines in panels:
        for key, label in lines:
            values = series(key)
            if values is not None:
                axes.plot(epochs, values, marker="o", label=label)
        if best_epoch is not None:
            axes.axvline(best_epoch, color="grey", linestyle=":", label=f"best.ckpt ({best_epoch})")
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    return figure


def precision_recall_figure(evaluation: MultilabelEvaluation) -> Figure:
    """Each class's precision-recall curve, its chosen threshold's point marked."""
    figure = _figure(7, 5)
    axes = figure.subplots()
    for row in evaluation.per_class:
        if row.name not in evaluation.curves:
            continue
        recall, precision = evaluation.curves[row.name]
        (line,) = axes.plot(
            recall, precision, label=f"{row.name} (AP {_number(row.average_precision)})"
        )
        if row.recall is not None and row.precision is not None:
            axes.plot(row.recall, row.precision, "o", color=line.get_color())
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1.01), ylim=(0, 1.01))
    axes.set_title("precision-recall per class (dot: at its threshold)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower left")
    return figure


def confusion_matrix_figure(confusion: torch.Tensor, classes: list[str]) -> Figure:
    """Counts and row-normalised confusion matrices side by side, class names on both axes."""
    panel = min(14.0, max(5.0, 0.5 * len(classes) + 3.0))
    figure = _figure(2 * panel, panel, layout="compressed")  # colour bars as tall as the grids
    counts = confusion.numpy()
    normalised = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    show_values = len(classes) <= VALUES_IN_CELLS_UP_TO
    for axes, matrix, values_format, limits, title in (
        (figure.add_subplot(1, 2, 1), counts, "d", {}, "counts"),
        (
            figure.add_subplot(1, 2, 2),
            normalised,
            ".2f",
            {"vmin": 0.0, "vmax": 1.0},
            "row-normalised (recall on the diagonal)",
        ),
    ):
        ConfusionMatrixDisplay(matrix, display_labels=classes).plot(
            ax=axes,
            cmap="Blues",
            values_format=values_format,
            include_values=show_values,
            im_kw=limits,
        )
        axes.set_title(title)
        axes.set_xlabel("predicted class")
        axes.set_ylabel("true class")
        axes.tick_params(labelsize=min(10.0, max(4.0, 280 / len(classes))))
        for label in axes.get_xticklabels():
            label.set(rotation=45, horizontalalignment="right", rotation_mode="anchor")
    return figure


def _thumbnail(mistake: Mistake | LabelMistake, max_pixels: int) -> np.ndarray:
    pixels = mistake.image
    image = Image.fromarray(
        pixels if pixels is not None else load_rgb(mistake.path, max_pixels=max_pixels)
    )
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    return np.asarray(image)


def worst_mistakes_figure(
    mistakes: list[Mistake] | list[LabelMistake],
    columns: int = MISTAKE_COLUMNS,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Figure:
    """The images of `mistakes`, each titled with its rank and what went wrong (true and
    predicted label, probability, loss)."""
    columns = min(columns, len(mistakes))
    rows = math.ceil(len(mistakes) / columns)
    figure = _figure(2.6 * columns, 3.1 * rows)
    for axes, (rank, mistake) in zip_longest(
        figure.subplots(rows, columns, squeeze=False).flat,
        enumerate(mistakes, start=1),
        fillvalue=(0, None),
    ):
        axes.set_axis_off()
        if mistake is None:
            continue
        axes.imshow(_thumbnail(mistake, max_pixels))
        axes.set_title(f"#{rank} {mistake.title}", fontsize=9)
    return figure


def single_label_figures(evaluation: Evaluation, max_pixels: int) -> dict[str, Figure]:
    figures = {CONFUSION_MATRIX: confusion_matrix_figure(evaluation.confusion, evaluation.classes)}
    if evaluation.mistakes:
        figures[WORST_MISTAKES] = worst_mistakes_figure(evaluation.mistakes, max_pixels=max_pixels)
    return figures


def multi_label_figures(evaluation: MultilabelEvaluation, max_pixels: int) -> dict[str, Figure]:
    figures = {PRECISION_RECALL: precision_recall_figure(evaluation)}
    for name, mistakes in (
        (FALSE_POSITIVES, evaluation.false_positives),
        (FALSE_NEGATIVES, evaluation.false_negatives),
    ):
        if mistakes:
            figures[name] = worst_mistakes_figure(mistakes, max_pixels=max_pixels)
    return figures


def _analyse_single_label(
    predictions: LabelledPredictions, model: Predictor, mistakes: int
) -> Evaluation:
    return analyse(predictions, model.class_names, mistakes)


def _analyse_multi_label(
    predictions: LabelledPredictions, model: Predictor, mistakes: int
) -> MultilabelEvaluation:
    return analyse_multilabel(predictions, model.class_names, model.thresholds, mistakes)


@dataclass(frozen=True)
class TaskReport:
    """What the page shows of one task's predictions: the analysis, its figures, and the
    template of its sections (macros `headline` and `sections`, in tlkit/templates/)."""

    analyse: Callable[[LabelledPredictions, Predictor, int], Any]
    figures: Callable[[Any, int], dict[str, Figure]]
    template: str


# One entry per task of model/tasks.py TASKS (a test keeps the keys equal).
TASK_REPORTS: dict[str, TaskReport] = {
    "single-label": TaskReport(
        _analyse_single_label, single_label_figures, "report_single_label.html.j2"
    ),
    "multi-label": TaskReport(
        _analyse_multi_label, multi_label_figures, "report_multi_label.html.j2"
    ),
}


def _strategy(summary: RunSummary, config: FinetuneConfig) -> str:
    if summary.strategy == "features":
        return "features: frozen backbone, new head trained"
    if summary.strategy == "partial":
        return (
            f"partial: last {summary.unfreeze_stages} stage(s) and the head trained, "
            f"backbone lr x{config.backbone_lr_scale}"
        )
    if summary.strategy == "full":
        scale = config.backbone_lr_scale
        return "full: everything trained" + (f", backbone lr x{scale}" if scale else "")
    return summary.strategy


def _augmentation(config: FinetuneConfig) -> str:
    if not config.augment:
        return "off: training used the evaluation transform"
    return (
        f"short side resized to {config.short_side_min}-{config.short_side_max} "
        f"(given at 224 px, scaled to {config.img_size} px), random "
        f"{config.img_size} px crop, horizontal flip p={config.hflip}, "
        f"colour jitter {config.color_jitter}"
    )


def _class_balance(data: DataFacts, config: FinetuneConfig) -> str:
    """The training split's class sizes and what training did about their imbalance."""
    counts = data.images_per_class.get("train")
    if not counts:
        balance = "training images per class not recorded"
    else:
        ratio = data.class_ratio
        shown = f"{ratio:.1f}:1" if ratio is not None and math.isfinite(ratio) else "unbounded"
        balance = f"{min(counts)}-{max(counts)} training images per class (ratio {shown})"
    return f"{balance}; class weights {config.class_weights}, sampling {config.sampling}"


def run_card(
    run_dir: Path,
    summary: RunSummary,
    config: FinetuneConfig,
    evaluation_seconds: float | None,
    evaluation: Evaluation | MultilabelEvaluation | None,
    tta_cost: dict[str, Any] | None = None,
    data: DataFacts | None = None,
) -> list[tuple[str, str]]:
    """(label, value) rows that describe the run: model, weights, training, data, timings."""
    trainable, total = summary.trainable_parameters, summary.total_parameters
    preprocessing = summary.preprocessing
    classes = summary.classes
    data = data or DataFacts(list(classes))
    metric = summary.monitor.removeprefix("val_")
    best_val = summary.best_monitored
    best = f"{best_val:.4f} at epoch {summary.best_epoch}" if best_val is not None else "?"
    rows = [
        ("run folder", str(run_dir)),
        ("backbone", summary.backbone),
        ("weights", summary.weights),
        ("strategy", _strategy(summary, config)),
        (
            "trainable parameters",
            f"{trainable:,} of {total:,} ({trainable / total:.1%})" if total else "?",
        ),
        (
            "classes",
            f"{len(classes)}: " + ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else ""),
        ),
        (
            "input",
            f"{preprocessing.input_size} px, mean {list(preprocessing.mean)}, "
            f"std {list(preprocessing.std)}, {preprocessing.interpolation}, "
            f"crop fraction {preprocessing.crop_pct}",
        ),
        ("augmentation", _augmentation(config)),
        (
            "optimisation",
            f"{config.optimizer}, lr {config.lr}, weight decay {config.weight_decay}, batch "
            f"size {config.batch_size}, warm-up {config.warmup_epochs} epoch(s), label "
            f"smoothing {config.label_smoothing}, early-stopping patience {config.patience}",
        ),
        (
            "images",
            f"train {summary.train_images}, validation {summary.val_images}, "
            f"test {summary.test_images}",
        ),
        ("task", summary.task),
        ("class balance", _class_balance(data, config)),
        (
            "result",
            f"{summary.epochs_run} of {config.epochs} epochs; best validation "
            f"{TITLES.get(metric, metric)} (the monitored metric) {best}",
        ),
        ("weights tested", _soup_description(summary)),
        ("test estimate", _test_estimate(summary, metric)),
        ("test-time augmentation", _tta_description(tta_cost)),
        ("chosen for --tta auto", _tta_choice_description(summary.tta_choice)),
        ("training time", f"{summary.wall_time_s} s"),
    ]
    if evaluation is not None and evaluation_seconds is not None:
        rate = evaluation.images / evaluation_seconds if evaluation_seconds > 0 else math.nan
        rows.append(
            (
                "evaluation time",
                f"{evaluation_seconds:.1f} s for {evaluation.images} images "
                f"({rate:.0f} images/s, decoding and set-up included)",
            )
        )
    evaluation_skipped = f", evaluation {len(evaluation.skipped)}" if evaluation else ""
    rows.append(
        (
            "skipped files",
            f"training {summary.skipped_files} (listed in {SKIPPED})" + evaluation_skipped,
        )
    )
    other_files = OtherFiles.from_counts(summary.ignored_files, summary.unread_images)
    if other_files.messages():
        rows.append(("files not read", "; ".join(other_files.messages())))
    return rows


def _test_estimate(summary: RunSummary, metric: str) -> str:
    """The test accuracy at training time with its image count and interval (computed for
    summaries written before tlkit recorded it) and the monitored `metric`'s test score; a
    multi-label run's monitored metric; or why there is none."""
    test_value = summary.test_metrics.get(logged_name("test", metric))
    monitored = (
        f"; {TITLES.get(metric, metric)} {test_value:.4f}"
        if test_value is not None and metric != ACCURACY
        else ""
    )
    if summary.test_acc is None:
        if test_value is not None:  # multi-label: no accuracy
            return (
                f"{TITLES.get(metric, metric)} {test_value:.4f} on {summary.test_images} "
                "held-out images, at training time"
            )
        if summary.test_images:
            return f"none: the {summary.test_images} test images were not evaluated"
        return (
            "none: no test split; the best validation score also chose the checkpoint and "
            "when to stop, so it flatters the model (keep a test split: --test-fraction)"
        )
    low, high = summary.test_acc_interval or accuracy_interval(
        summary.test_acc, summary.test_images
    )
    return (
        f"{summary.test_acc:.4f} on {summary.test_images} held-out images, {CONFIDENCE:.0%} "
        f"interval {low:.3f}-{high:.3f} (Wilson){monitored}, at training time"
    )


def auto_decision_rows(decision: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    """(what, value, why) rows of `--strategy auto`'s decision: its evidence, then each choice
    with its reason and the choices the user gave; empty for a run that named its strategy."""
    if not decision:
        return []
    evidence = decision.get("evidence", {})
    side = evidence.get("source_short_side_median")
    rows = [
        (
            "images per class",
            f"{evidence.get('images_per_class_min')} min, "
            f"{evidence.get('images_per_class_median')} median",
            f"{evidence.get('train_images')} training images, {evidence.get('classes')} classes",
        ),
        (
            "class ratio",
            _number(evidence.get("class_ratio"), 1) + ":1",
            "training split: the largest class's images over the smallest's",
        ),
        (
            "source short side",
            f"{side} px" if side is not None else "unknown",
            f"median of {evidence.get('sampled_files')} files' headers",
        ),
    ]
    if evidence.get("linear_val_acc") is None:
        rows.append(
            ("linear probe / k-NN", "–", "not measured: random weights (--pretrained none)")
        )
    else:
        rows.append(
            (
                "linear probe / k-NN",
                f"{_number(evidence.get('linear_val_acc'), 4)} / "
                f"{_number(evidence.get('knn_val_acc'), 4)}",
                f"validation {TITLES.get(evidence.get('probe_metric'), 'top-1 accuracy')} on "
                f"cached features at {evidence.get('input_size')} px "
                f"({evidence.get('probe_seconds')} s)",
            )
        )
    if evidence.get("probe_balanced_acc") is not None:
        rows.append(
            (
                f"probe's {evidence.get('probe_evidence_metric', 'balanced accuracy')}",
                f"{_number(evidence['probe_balanced_acc'], 4)}, at least "
                f"{_number(evidence['probe_balanced_lower_bound'], 4)}",
                f"95% confidence, on {evidence.get('probe_evidence')} "
                f"({evidence.get('probe_images')} training images probed)",
            )
        )
    for name, choice in decision.get("choices", {}).items():
        if choice.get("applies", True):
            rows.append((f"chose {name}", str(choice.get("value")), str(choice.get("reason"))))
    if decision.get("given"):
        rows.append(("kept as given", ", ".join(decision["given"]), "flags or config keys"))
    planned = decision.get("budget")
    if planned:
        throughput = planned["throughput"]
        steps = "; ".join(planned["stepped_down"]) or "none"
        replanned = planned.get("replanned")
        replan = (
            f"; re-planned from {replanned['epochs_before']} to {replanned['epochs']} epochs "
            f"(epochs of {replanned['epoch_s']:.1f} s)"
            if replanned
            else ""
        )
        rows.append(
            (
                "budget",
                f"{planned['seconds']:.0f} s, predicted {planned['predicted_s']:.0f} s",
                f"{throughput['train_images_per_s']:.0f} training, "
                f"{throughput['eval_images_per_s']:.0f} evaluation images/s measured on "
                f"{throughput['device']}; stepped down: {steps}{replan}",
            )
        )
    head = decision.get("head")
    if head:
        rows.append(
            (
                "head kept",
                head["kept"],
                f"validation {TITLES.get(head.get('metric'), 'top-1 accuracy')}: linear probe "
                f"{_number(head['probe_val_acc'], 4)}, trained head "
                f"{_number(head['trained_val_acc'], 4)}",
            )
        )
    return rows


def _tta_description(cost: dict[str, Any] | None) -> str:
    if cost is None:
        return "no evaluation"
    if cost["preset"] == "none":
        return "none: one centre crop per image"
    return (
        f"{cost['preset']}: {cost['views_per_image']} views per image averaged "
        f"({cost['average']}), {cost['views_per_second']:.0f} views/s"
    )


def _soup_description(summary: RunSummary) -> str:
    """Which epochs' weights best.ckpt holds: the best epoch's, or a greedy soup's."""
    soup = summary.soup
    if not soup:
        return f"epoch {summary.best_epoch} (best.ckpt)"
    tried = ", ".join(
        f"epoch {item['epoch']} {item['soup_val']:.4f} ({'kept' if item['kept'] else 'left out'})"
        for item in soup["candidates"]
    )
    return (
        f"the average of epochs {', '.join(map(str, soup['epochs']))} (greedy soup, "
        f"validation {TITLES.get(soup['metric'].removeprefix('val_'), soup['metric'])} "
        f"{soup['val_before']:.4f} for epoch {soup['epochs'][0]} alone; with {tried})"
        if len(soup["epochs"]) > 1
        else f"epoch {summary.best_epoch} (best.ckpt; no soup with {tried} validated as well)"
    )


def _tta_choice_description(choice: dict[str, Any] | None) -> str:
    if choice is None:
        return "nothing chosen (--tta auto evaluates without averaging)"
    measured = ", ".join(
        f"{record['preset']} {record['top1']:.4f}" for record in choice["candidates"]
    )
    listed = "; ".join([measured, *unmeasured_presets(choice)])
    return (
        f"{choice['preset']}, on {choice['images']} validation images "
        f"({tta_choice_metric(choice)}: {listed}): " + choice["rule"]
    )


def _shown_path(path: str, data: str | Path) -> str:
    """`path` relative to the evaluated folder (or the CSV's folder) when it lies inside; a
    converted dataset's paths are relative already."""
    if not os.path.isabs(path):
        return path
    data = Path(data)
    root = (data.parent if data.is_file() else data).resolve()
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return path


def _default_data(config: FinetuneConfig) -> str | Path | None:
    """The run's own DATA_DIR/test, when it has one (of a converted dataset: its test split)."""
    if not config.data_dir:
        return None
    converted = find_converted(config.data_dir)
    if converted is not None:
        dataset = converted[0]
        return dataset.split_location("test") if "test" in dataset.counts else None
    test = Path(config.data_dir) / "test"
    return test if test.is_dir() else None


def build_report(
    run_dir: str | Path,
    data: str | Path | None = None,
    out: str | Path | None = None,
    mistakes: int = 16,
    batch_size: int = 64,
    accelerator: str = "auto",
    tta: str = "none",
    max_image_pixels: int | None = None,
    csv_paths_outside_root: bool | None = None,
    verify: str | None = None,
    scan_cache: str | None = None,
) -> Report:
    """Write `report.html` and its PNGs for a finished run folder into `out`.

    `data` is a labelled folder or CSV (default: the run's DATA_DIR/test, when it exists);
    without data the page holds the learning curves and the run card only. `out` defaults to
    RUN_DIR/report. `mistakes` is how many of the highest-loss wrong predictions to show;
    `tta` is the test-time averaging preset used for the predictions (`auto`: the run's
    choice). `max_image_pixels`,
    `csv_paths_outside_root`, `verify` and `scan_cache` default to the run's own.
    """
    run = open_run(run_dir)  # a clear error before any work if this is not a finished run
    run_dir, summary, config = run.folder, run.summary, run.config
    if mistakes < 0:
        raise ConfigError(f"--mistakes must be 0 or more, not {mistakes}")
    max_pixels, outside_root = image_limits(run_dir, max_image_pixels, csv_paths_outside_root)
    data = _default_data(config) if data is None else data
    out = Path(out) if out is not None else run_dir / "report"

    evaluation, evaluation_seconds, tta_cost = None, None, None
    task_report = TASK_REPORTS[summary.task]
    if data is not None:
        model = load_model(run_dir)
        started = time.perf_counter()
        predictions = predict_labelled(
            model,
            data,
            batch_size,
            accelerator,
            resolve_tta(tta, run_dir),
            max_pixels,
            outside_root,
            **scan_options(run_dir, verify, scan_cache),
        )
        evaluation_seconds = time.perf_counter() - started
        tta_cost = predictions.cost
        evaluation = task_report.analyse(predictions, model, mistakes)

    # Class names and file names become text in figures: no $...$ mathtext, no TeX.
    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
        figures: dict[str, Figure] = {}
        if summary.history:
            figures[LEARNING_CURVES] = learning_curves_figure(
                summary.history, summary.best_epoch, summary.monitor
            )
        if evaluation is not None:
            figures |= task_report.figures(evaluation, max_pixels)
        pngs = {name: _png(figure) for name, figure in figures.items()}

    out.mkdir(parents=True, exist_ok=True)
    for name, png in pngs.items():
        (out / name).write_bytes(png)

    def shown_paths(mistakes: list[Mistake] | list[LabelMistake]) -> list[str]:
        return [_shown_path(mistake.path, data) for mistake in mistakes]

    page = _ENVIRONMENT.get_template(REPORT_TEMPLATE).render(
        run_name=run_dir.resolve().name,
        data=str(data) if data is not None else None,
        summary=summary,
        card=run_card(run_dir, summary, config, evaluation_seconds, evaluation, tta_cost, run.data),
        auto_rows=auto_decision_rows(summary.auto_decision),
        evaluation=evaluation,
        task_template=task_report.template,
        shown_paths=shown_paths,
        images={
            name: "data:image/png;base64," + base64.b64encode(png).decode("ascii")
            for name, png in pngs.items()
        },
        training_skipped=run.skipped[:SKIPPED_SHOWN],
        skipped_shown=SKIPPED_SHOWN,
        names={
            "curves": LEARNING_CURVES,
            "confusion": CONFUSION_MATRIX,
            "mistakes": WORST_MISTAKES,
            "precision_recall": PRECISION_RECALL,
            "false_positives": FALSE_POSITIVES,
            "false_negatives": FALSE_NEGATIVES,
        },
        titles=TITLES,
    )
    (out / REPORT_PAGE).write_text(page, encoding="utf-8")
    return Report(out / REPORT_PAGE, [out / name for name in pngs], evaluation)


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


# Autoescaped: class names are folder names and file names, i.e. user input.
_ENVIRONMENT = Environment(
    loader=PackageLoader("tlkit", "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
)
_ENVIRONMENT.filters["number"] = _number
