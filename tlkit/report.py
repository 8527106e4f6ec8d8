"""`tlkit report`: one self-contained HTML page that shows how a run learned and where it errs.

The page holds the learning curves (summary.json's per-epoch history, written whichever logger
the run used), the confusion matrix (counts and row-normalised), precision, recall, F1 and
support per class (worst first), the most confused class pairs, a grid of the highest-loss wrong
predictions (fastai's `ClassificationInterpretation.plot_top_losses`, wrong ones only) and the
run's card. Numbers come from torchmetrics, figures from matplotlib's Agg canvas (no pyplot
state), the page from a Jinja2 template with autoescaping (class names are folder names, i.e.
user input). Each figure is written as a PNG beside the page and embedded in it as a base64 data
URI, so `report.html` opens offline, alone, in any browser.
"""

from __future__ import annotations

import base64
import csv
import io
import math
import time
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from jinja2 import Environment, StrictUndefined
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image
from sklearn.metrics import ConfusionMatrixDisplay
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from tlkit.data import DEFAULT_MAX_IMAGE_PIXELS, load_rgb
from tlkit.errors import ConfigError
from tlkit.inference import LabelledPredictions, load_model, predict_labelled
from tlkit.runfolder import (
    SKIPPED,
    SUMMARY,
    RunFolderError,
    best_checkpoint,
    image_limits,
    read_config,
    read_summary,
)

REPORT_PAGE = "report.html"
LEARNING_CURVES = "learning_curves.png"
CONFUSION_MATRIX = "confusion_matrix.png"
WORST_MISTAKES = "worst_mistakes.png"
CONFUSED_PAIRS_SHOWN = 10
SKIPPED_SHOWN = 20
THUMBNAIL_SIZE = 160  # pixels, longest side of an image in the worst-mistakes grid
MISTAKE_COLUMNS = 4
VALUES_IN_CELLS_UP_TO = 30  # classes; larger confusion matrices are shown as colour only


@dataclass
class ClassMetrics:
    """Precision, recall and F1 of one class; `predicted` counts images given this label."""

    name: str
    precision: float
    recall: float
    f1: float
    support: int
    predicted: int


@dataclass
class Mistake:
    """A wrong prediction: the image, its true and predicted label, and the loss it cost."""

    path: str
    true_label: str
    predicted_label: str
    predicted_probability: float
    true_probability: float
    loss: float  # cross-entropy, -ln p(true label)


@dataclass
class ConfusedPair:
    """How often images of `true_label` were predicted as `predicted_label`."""

    true_label: str
    predicted_label: str
    count: int
    share: float  # of the images of `true_label`


@dataclass
class Evaluation:
    """What the report shows about predictions on labelled data."""

    classes: list[str]
    images: int
    top1: float
    top_k: int
    top_k_accuracy: float
    macro_f1: float  # over the classes that have images
    confusion: torch.Tensor  # (C, C) counts; rows are true classes, columns predictions
    per_class: list[ClassMetrics]  # worst first: lowest F1, then lowest recall
    confused_pairs: list[ConfusedPair]  # most frequent first
    wrong: int
    mistakes: list[Mistake]  # the highest-loss wrong predictions, highest first
    skipped: list[tuple[str, str]]


@dataclass
class Report:
    """Where the page and its figures were written, and the evaluation they show."""

    page: Path
    figures: list[Path]
    evaluation: Evaluation | None


def analyse(predictions: LabelledPredictions, classes: list[str], mistakes: int = 16) -> Evaluation:
    """Metrics, confusions and the `mistakes` highest-loss wrong predictions."""
    probabilities, labels = predictions.probabilities, predictions.labels
    num_classes = len(classes)
    top_k = min(5, num_classes)
    confusion = multiclass_confusion_matrix(probabilities, labels, num_classes)
    support = confusion.sum(dim=1)
    predicted_counts = confusion.sum(dim=0)
    scores = [
        score(probabilities, labels, num_classes, average=None).tolist()
        for score in (multiclass_precision, multiclass_recall, multiclass_f1_score)
    ]
    per_class = [
        ClassMetrics(name, precision, recall, f1, int(count), int(predicted))
        for name, precision, recall, f1, count, predicted in zip(
            classes, *scores, support, predicted_counts, strict=True
        )
    ]
    present = [metrics for metrics in per_class if metrics.support > 0]
    per_class.sort(key=lambda m: (m.support == 0, m.f1, m.recall, m.name))

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
        )
        for index in worst_first[:mistakes].tolist()
    ]
    return Evaluation(
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
        confused_pairs=most_confused(confusion, classes),
        wrong=len(wrong),
        mistakes=shown,
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


def learning_curves_figure(history: list[dict[str, float]], best_epoch: int | None) -> Figure:
    """Training (and validation) loss, train and validation accuracy, head learning rate."""
    epochs = [record["epoch"] for record in history]

    def series(key: str) -> list[float] | None:
        values = [float(record.get(key, math.nan)) for record in history]
        return None if all(math.isnan(value) for value in values) else values

    figure = _figure(13, 3.6)
    loss_axes, accuracy_axes, lr_axes = figure.subplots(1, 3)
    panels = (
        (loss_axes, "loss (cross-entropy)", (("loss", "train"), ("val_loss", "validation"))),
        (accuracy_axes, "top-1 accuracy", (("train_acc", "train"), ("val_acc", "validation"))),
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


def _thumbnail(path: str, max_pixels: int) -> np.ndarray:
    image = Image.fromarray(load_rgb(path, max_pixels=max_pixels))
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    return np.asarray(image)


def worst_mistakes_figure(
    mistakes: list[Mistake],
    columns: int = MISTAKE_COLUMNS,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Figure:
    """The images of `mistakes`, each titled with rank, true and predicted label, probability."""
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
        axes.imshow(_thumbnail(mistake.path, max_pixels))
        axes.set_title(
            f"#{rank} true: {mistake.true_label}\n"
            f"predicted: {mistake.predicted_label} ({mistake.predicted_probability:.2f})\n"
            f"loss {mistake.loss:.2f}",
            fontsize=9,
        )
    return figure


def _read_skipped(run_dir: Path) -> list[tuple[str, str]]:
    path = run_dir / SKIPPED
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return [(row["path"], row["reason"]) for row in csv.DictReader(handle)]


def _strategy(summary: dict[str, Any], config: dict[str, Any]) -> str:
    strategy = summary.get("strategy", "?")
    if strategy == "features":
        return "features: frozen backbone, new head trained"
    if strategy == "partial":
        return f"partial: last {summary.get('unfreeze_stages')} stage(s) and the head trained" + (
            f", backbone lr x{config['backbone_lr_scale']}" if "backbone_lr_scale" in config else ""
        )
    if strategy == "full":
        scale = config.get("backbone_lr_scale")
        return "full: everything trained" + (f", backbone lr x{scale}" if scale else "")
    return str(strategy)


def _augmentation(config: dict[str, Any]) -> str:
    if not config:
        return "not recorded (no config.yaml)"
    if not config.get("augment", True):
        return "off: training used the evaluation transform"
    return (
        f"short side resized to {config.get('short_side_min')}-{config.get('short_side_max')} "
        f"(given at 224 px, scaled to {config.get('img_size')} px), random "
        f"{config.get('img_size')} px crop, horizontal flip p={config.get('hflip')}, "
        f"colour jitter {config.get('color_jitter')}"
    )


def run_card(
    run_dir: Path,
    summary: dict[str, Any],
    config: dict[str, Any],
    evaluation_seconds: float | None,
    evaluation: Evaluation | None,
    tta_cost: dict[str, Any] | None = None,
) -> list[tuple[str, str]]:
    """(label, value) rows that describe the run: model, weights, training, data, timings."""
    trainable, total = summary.get("trainable_parameters"), summary.get("total_parameters")
    counted = trainable is not None and bool(total)
    preprocessing = summary.get("preprocessing", {})
    classes = summary.get("classes", [])
    best_val = summary.get("best_val_acc")
    test_acc = summary.get("test_acc")
    best = f"{best_val:.4f} at epoch {summary.get('best_epoch')}" if best_val is not None else "?"
    rows = [
        ("run folder", str(run_dir)),
        ("backbone", str(summary.get("backbone"))),
        ("weights", str(summary.get("weights"))),
        ("strategy", _strategy(summary, config)),
        (
            "trainable parameters",
            f"{trainable:,} of {total:,} ({trainable / total:.1%})" if counted else "?",
        ),
        (
            "classes",
            f"{len(classes)}: " + ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else ""),
        ),
        (
            "input",
            f"{preprocessing.get('input_size')} px, mean {preprocessing.get('mean')}, "
            f"std {preprocessing.get('std')}, {preprocessing.get('interpolation')}, "
            f"crop fraction {preprocessing.get('crop_pct')}",
        ),
        ("augmentation", _augmentation(config)),
        (
            "optimisation",
            f"{config.get('optimizer')}, lr {config.get('lr')}, weight decay "
            f"{config.get('weight_decay')}, batch size {config.get('batch_size')}, warm-up "
            f"{config.get('warmup_epochs')} epoch(s), label smoothing "
            f"{config.get('label_smoothing')}, early-stopping patience {config.get('patience')}",
        ),
        (
            "images",
            f"train {summary.get('train_images')}, validation {summary.get('val_images')}, "
            f"test {summary.get('test_images')}",
        ),
        (
            "result",
            f"{summary.get('epochs_run')} of {config.get('epochs', '?')} epochs; best validation "
            + best
            + (f"; test {test_acc:.4f} (at training time)" if test_acc is not None else ""),
        ),
        ("test-time augmentation", _tta_description(tta_cost)),
        ("training time", f"{summary.get('wall_time_s')} s"),
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
            f"training {summary.get('skipped_files', 0)} (listed in {SKIPPED})"
            + evaluation_skipped,
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


def _shown_path(path: str, data: Path) -> str:
    """`path` relative to the evaluated folder (or the CSV's folder) when it lies inside."""
    root = (data.parent if data.is_file() else data).resolve()
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return path


def _default_data(config: dict[str, Any]) -> Path | None:
    """The run's own DATA_DIR/test, when it has one."""
    test = Path(config.get("data_dir") or ".") / "test"
    return test if config.get("data_dir") and test.is_dir() else None


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
) -> Report:
    """Write `report.html` and its PNGs for a finished run folder into `out`.

    `data` is a labelled folder or CSV (default: the run's DATA_DIR/test, when it exists);
    without data the page holds the learning curves and the run card only. `out` defaults to
    RUN_DIR/report. `mistakes` is how many of the highest-loss wrong predictions to show;
    `tta` is the test-time averaging preset used for the predictions. `max_image_pixels` and
    `csv_paths_outside_root` default to the run's own.
    """
    run_dir = Path(run_dir)
    best_checkpoint(run_dir)  # a clear error before any work if this is not a run folder
    if not (run_dir / SUMMARY).is_file():
        raise RunFolderError(f"{run_dir} is not a finished tlkit run folder: {SUMMARY} is missing")
    if mistakes < 0:
        raise ConfigError(f"--mistakes must be 0 or more, not {mistakes}")
    summary = read_summary(run_dir)
    config = read_config(run_dir)
    max_pixels, outside_root = image_limits(run_dir, max_image_pixels, csv_paths_outside_root)
    data = _default_data(config) if data is None else Path(data)
    out = Path(out) if out is not None else run_dir / "report"

    evaluation, evaluation_seconds, tta_cost = None, None, None
    if data is not None:
        model = load_model(run_dir)
        started = time.perf_counter()
        predictions = predict_labelled(
            model, data, batch_size, accelerator, tta, max_pixels, outside_root
        )
        evaluation_seconds = time.perf_counter() - started
        tta_cost = predictions.cost
        evaluation = analyse(predictions, model.class_names, mistakes)

    # Class names and file names become text in figures: no $...$ mathtext, no TeX.
    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
        figures: dict[str, Figure] = {}
        if summary.get("history"):
            figures[LEARNING_CURVES] = learning_curves_figure(
                summary["history"], summary.get("best_epoch")
            )
        if evaluation is not None:
            figures[CONFUSION_MATRIX] = confusion_matrix_figure(
                evaluation.confusion, evaluation.classes
            )
            if evaluation.mistakes:
                figures[WORST_MISTAKES] = worst_mistakes_figure(
                    evaluation.mistakes, max_pixels=max_pixels
                )
        pngs = {name: _png(figure) for name, figure in figures.items()}

    out.mkdir(parents=True, exist_ok=True)
    for name, png in pngs.items():
        (out / name).write_bytes(png)
    page = _TEMPLATE.render(
        run_name=run_dir.resolve().name,
        data=str(data) if data is not None else None,
        summary=summary,
        card=run_card(run_dir, summary, config, evaluation_seconds, evaluation, tta_cost),
        evaluation=evaluation,
        mistake_paths=[_shown_path(m.path, data) for m in evaluation.mistakes]
        if evaluation is not None
        else [],
        images={
            name: "data:image/png;base64," + base64.b64encode(png).decode("ascii")
            for name, png in pngs.items()
        },
        training_skipped=_read_skipped(run_dir)[:SKIPPED_SHOWN],
        skipped_shown=SKIPPED_SHOWN,
        names={
            "curves": LEARNING_CURVES,
            "confusion": CONFUSION_MATRIX,
            "mistakes": WORST_MISTAKES,
        },
    )
    (out / REPORT_PAGE).write_text(page, encoding="utf-8")
    return Report(out / REPORT_PAGE, [out / name for name in pngs], evaluation)


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


_ENVIRONMENT = Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=True)
_ENVIRONMENT.filters["number"] = _number
_TEMPLATE = _ENVIRONMENT.from_string(
    """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tlkit report: {{ run_name }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       max-width: 1320px; margin: 0 auto; padding: 1.5rem 2rem 3rem; color: #1d2330;
       line-height: 1.45; }
h1 { font-size: 1.7rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.25rem; margin-top: 2.2rem; border-bottom: 1px solid #d8dce3;
     padding-bottom: 0.3rem; }
.subtitle, .note { color: #5b6475; }
.note { font-size: 0.9rem; }
.headline { display: flex; flex-wrap: wrap; gap: 0.8rem; margin: 1.2rem 0; }
.headline div { background: #f1f4f8; border-radius: 6px; padding: 0.6rem 1.1rem; }
.headline b { display: block; font-size: 1.5rem; }
table { border-collapse: collapse; font-size: 0.9rem; }
th, td { padding: 0.3rem 0.75rem; border-bottom: 1px solid #e3e6eb; text-align: left;
         vertical-align: top; }
th { background: #f7f8fa; }
.card th { background: none; white-space: nowrap; color: #5b6475; font-weight: normal; }
.number { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; }
code { font-size: 0.85rem; }
</style>
</head>
<body>
<h1>tlkit report: {{ run_name }}</h1>
<p class="subtitle">{{ summary.backbone }}, {{ summary.strategy }} strategy,
{% if data %}evaluated on <code>{{ data }}</code>{% else %}no evaluation data{% endif %}</p>

{% if evaluation %}
<div class="headline">
  <div>top-1 accuracy<b>{{ evaluation.top1 | number(4) }}</b></div>
  <div>top-{{ evaluation.top_k }} accuracy<b>{{ evaluation.top_k_accuracy | number(4) }}</b></div>
  <div>macro F1<b>{{ evaluation.macro_f1 | number(4) }}</b></div>
  <div>images<b>{{ evaluation.images }}</b></div>
  <div>wrong<b>{{ evaluation.wrong }}</b></div>
</div>
{% else %}
<p class="note">No labelled evaluation data: the run's data has no <code>test/</code> folder.
Give one (<code>tlkit report RUN_DIR DATA_DIR/test</code>) for the confusion matrix, the
per-class table and the worst mistakes.</p>
{% endif %}

<h2>Run</h2>
<table class="card">
{% for label, value in card %}
  <tr><th>{{ label }}</th><td>{{ value }}</td></tr>
{% endfor %}
</table>

<h2>Learning curves</h2>
{% if names.curves in images %}
<img src="{{ images[names.curves] }}" alt="learning curves: loss, accuracy, learning rate">
<p class="note">Per epoch, from <code>summary.json</code>: training loss and accuracy averaged
over the epoch (augmented images), validation at its end, the head's learning rate at its end.
The dotted line marks the best-on-validation epoch, whose checkpoint (<code>best.ckpt</code>)
is the model evaluated here.</p>
{% else %}
<p class="note">The run recorded no epochs.</p>
{% endif %}

{% if evaluation %}
<h2>Confusion matrix</h2>
<img src="{{ images[names.confusion] }}" alt="confusion matrix, counts and row-normalised">
<p class="note">Rows are true classes, columns predictions; {{ evaluation.images }} images.</p>

<h2>Per class, worst first</h2>
<table>
  <tr><th>class</th><th class="number">F1</th><th class="number">precision</th>
      <th class="number">recall</th><th class="number">support</th>
      <th class="number">predicted</th></tr>
{% for row in evaluation.per_class %}
  <tr><td>{{ row.name }}</td>
      <td class="number">{{ row.f1 | number if row.support else "–" }}</td>
      <td class="number">{{ row.precision | number if row.predicted else "–" }}</td>
      <td class="number">{{ row.recall | number if row.support else "–" }}</td>
      <td class="number">{{ row.support }}</td>
      <td class="number">{{ row.predicted }}</td></tr>
{% endfor %}
</table>
<p class="note">Support: test images of the class; predicted: images given its label.
A dash marks a score without images to compute it on.</p>

<h2>Most confused pairs</h2>
{% if evaluation.confused_pairs %}
<table>
  <tr><th>true class</th><th>predicted as</th><th class="number">images</th>
      <th class="number">share of the true class</th></tr>
{% for pair in evaluation.confused_pairs %}
  <tr><td>{{ pair.true_label }}</td><td>{{ pair.predicted_label }}</td>
      <td class="number">{{ pair.count }}</td>
      <td class="number">{{ (100 * pair.share) | number(1) }}%</td></tr>
{% endfor %}
</table>
{% else %}
<p class="note">No confusions: every image was classified correctly.</p>
{% endif %}

<h2>Worst mistakes</h2>
{% if evaluation.mistakes %}
<p class="note">The {{ evaluation.mistakes | length }} wrong predictions with the highest loss
(of {{ evaluation.wrong }} wrong); the probability is the model's for its predicted class.</p>
<img src="{{ images[names.mistakes] }}" alt="grid of the highest-loss wrong predictions">
<p class="note">Files relative to <code>{{ data }}</code>.</p>
<table class="mistakes">
  <tr><th class="number">#</th><th>file</th><th>true</th><th>predicted</th>
      <th class="number">p(predicted)</th><th class="number">p(true)</th>
      <th class="number">loss</th></tr>
{% for mistake in evaluation.mistakes %}
  <tr><td class="number">{{ loop.index }}</td><td><code>{{ mistake_paths[loop.index0] }}</code></td>
      <td>{{ mistake.true_label }}</td><td>{{ mistake.predicted_label }}</td>
      <td class="number">{{ mistake.predicted_probability | number }}</td>
      <td class="number">{{ mistake.true_probability | number }}</td>
      <td class="number">{{ mistake.loss | number(2) }}</td></tr>
{% endfor %}
</table>
{% elif evaluation.wrong %}
<p class="note">{{ evaluation.wrong }} wrong predictions; none shown (--mistakes 0).</p>
{% else %}
<p class="note">No wrong predictions on these {{ evaluation.images }} images.</p>
{% endif %}
{% endif %}

{% if training_skipped or (evaluation and evaluation.skipped) %}
<h2>Skipped files</h2>
<table>
  <tr><th>when</th><th>file</th><th>reason</th></tr>
{% for path, reason in training_skipped %}
  <tr><td>training</td><td><code>{{ path }}</code></td><td>{{ reason }}</td></tr>
{% endfor %}
{% if evaluation %}
{% for path, reason in evaluation.skipped[:skipped_shown] %}
  <tr><td>evaluation</td><td><code>{{ path }}</code></td><td>{{ reason }}</td></tr>
{% endfor %}
{% endif %}
</table>
<p class="note">At most {{ skipped_shown }} of each are listed; the run's full list is in
<code>skipped.csv</code>.</p>
{% endif %}
</body>
</html>
"""
)
