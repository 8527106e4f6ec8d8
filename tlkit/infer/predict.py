"""Evaluate and predict with a run folder's best checkpoint or an exported model.

Both are a `Predictor`: class names, the preprocessing they expect, the task (what the
probabilities mean, how they are scored and turned into predictions: `model.tasks.TASKS`), and
class probabilities of a preprocessed batch. Anything that changes how a batch becomes
probabilities (test-time augmentation, for one) wraps `Predictor.predict_batch` and is then
available to both. Images are found by `data.find_images`, and checkpoints run on
`single_device_trainer`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from tlkit.console import expected_lightning_warnings_hidden
from tlkit.data.datasets import ImageDataset, LabelledImages, default_num_workers
from tlkit.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    UNREAD_IMAGE_FORMATS,
    find_decode_problems,
)
from tlkit.data.labels import LABEL_KINDS, Label, images_only, label_indices
from tlkit.data.shards import ConvertedDataset, ShardImages, labelled_split
from tlkit.data.sources import OtherFiles, find_images, scan
from tlkit.errors import ConfigError, DatasetError, InputNotFoundError
from tlkit.infer.export import is_export_folder, load_exported
from tlkit.infer.tta import ScaleSquares, TTAModule, loader_batch_size, plan
from tlkit.model.classifier import TransferClassifier
from tlkit.model.tasks import TaskDefinition
from tlkit.runfolder import Preprocessing, best_checkpoint, image_limits, scan_options


@runtime_checkable
class Predictor(Protocol):
    """What evaluate and predict need from a model (`TransferClassifier`, `ExportedModel`)."""

    @property
    def class_names(self) -> list[str]: ...

    @property
    def preprocessing(self) -> Preprocessing: ...

    @property
    def trained_with_hflip(self) -> bool:
        """Whether training showed the model mirror images (TTA mirrors views only then)."""
        ...

    @property
    def task(self) -> TaskDefinition:
        """What the model's probabilities mean: softmax over classes, or a sigmoid each."""
        ...

    @property
    def thresholds(self) -> list[float]:
        """Per class, the probability from which a multi-label prediction includes it."""
        ...

    def predict_batch(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, C) of a preprocessed batch (N, 3, S, S)."""
        ...


def single_device_trainer(
    accelerator: str = "auto", progress: bool = True, **options: Any
) -> pl.Trainer:
    """A Trainer on one device that writes nothing (no logger, checkpoints or model summary):
    the Trainer of evaluate, predict and report, and of the sanity checks' overfit run.
    `options` are further `pytorch_lightning.Trainer` arguments."""
    return pl.Trainer(
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        **options,
    )


def load_model(run_dir: str | Path) -> TransferClassifier:
    """The best-on-validation model of a run folder, in eval mode, loaded with weights_only."""
    return TransferClassifier.load_checkpoint(best_checkpoint(run_dir))


def load_predictor(source: str | Path) -> Predictor:
    """An exported model if `source` holds an export card, else the run folder's checkpoint."""
    return load_exported(source) if is_export_folder(source) else load_model(source)


def predict_probabilities(
    model: Predictor,
    samples: list[tuple[str, int]],
    tta: str = "none",
    batch_size: int = 64,
    accelerator: str = "auto",
    scales: tuple[float, ...] | None = None,
    average: str = "probabilities",
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    source: LabelledImages | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """(N, K) class probabilities for `(path, label)` samples with a TTA preset, and its cost.

    Mirrored views only for models trained with horizontal flips; the loader's batches are
    smaller than `batch_size` where the plan's views would exceed `tta.TTA_MEMORY_BUDGET`.
    The samples are image files, or with `source` images of that converted split.
    """
    tta_plan = plan(tta, model.preprocessing, scales, average, model.trained_with_hflip)
    views = ScaleSquares(tta_plan, model.preprocessing)
    if source is not None:
        dataset = source.images_of(samples, views)
    else:
        dataset = ImageDataset(samples, views, max_pixels)
    images_per_batch = loader_batch_size(tta_plan, batch_size)
    loader = DataLoader(
        dataset,
        batch_size=images_per_batch,
        num_workers=default_num_workers(),
        collate_fn=images_only,
    )
    # At most one loader batch of views per forward pass: larger batches are slower per image
    # on CPUs (measured: 943 img/s at 64, 406 at 256 for Lite0 at 64px); raise --batch-size
    # on GPUs.
    averaging = TTAModule(model, tta_plan, max_views_per_forward=batch_size)
    started = time.perf_counter()
    if isinstance(model, pl.LightningModule):
        trainer = single_device_trainer(accelerator)
        # the progress bar must stay out of stdout
        with contextlib.redirect_stdout(sys.stderr), expected_lightning_warnings_hidden():
            batches = trainer.predict(averaging, dataloaders=loader)
    else:  # exported models run on the CPU, in their own runtime
        with torch.inference_mode():
            batches = [averaging(scales) for scales, _ in loader]
    seconds = time.perf_counter() - started
    images_per_second = len(samples) / seconds
    cost = {
        "preset": tta_plan.preset,
        "average": tta_plan.average,
        "scale_sizes": list(tta_plan.scale_sizes),
        "views_per_image": tta_plan.views_per_image,
        "mirrored": tta_plan.mirrored,
        "loader_batch_size": images_per_batch,
        "seconds": round(seconds, 3),
        "images_per_second": round(images_per_second, 2),
        "views_per_second": round(images_per_second * tta_plan.views_per_image, 2),
    }
    return torch.cat(batches).float().cpu(), cost


@dataclass
class LabelledPredictions:
    """Class probabilities per image of a labelled folder or CSV, in the scanned order."""

    paths: list[str]
    labels: torch.Tensor  # the task's targets: (N,) class indices, or (N, C) 0/1 rows
    probabilities: torch.Tensor  # (N, C): the task's activation of the logits
    skipped: list[tuple[str, str]]  # (path, reason) of the image files that could not be used
    cost: dict[str, Any] = field(default_factory=dict)  # TTA preset, views/image, images/s
    shards: ShardImages | None = None  # the converted split the images come from, if any
    other_files: OtherFiles = field(default_factory=OtherFiles)  # files not read, counted


def predict_labelled(
    model: TransferClassifier,
    data: str | Path,
    batch_size: int = 64,
    accelerator: str = "auto",
    tta: str = "none",
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    csv_paths_outside_root: bool = False,
    **scan_options: str,
) -> LabelledPredictions:
    """Run `model` over labelled data (class folders, a path,label CSV, or a split of a
    converted dataset: `shards.labelled_split`) and keep every image; `scan_options` are
    `data.scan`'s `verify` and `scan_cache`."""
    converted = labelled_split(data)
    if converted is not None:
        return _predict_converted(model, *converted, batch_size, accelerator, tta, max_pixels)
    scanned = scan(data, model.class_names, max_pixels, csv_paths_outside_root, **scan_options)
    samples = model.task.labels.convert(scanned.samples, str(data))
    probabilities, cost = predict_probabilities(
        model, samples, tta, batch_size, accelerator, max_pixels=max_pixels
    )
    return LabelledPredictions(
        paths=[path for path, _ in samples],
        labels=_targets(model, [label for _, label in samples]),
        probabilities=probabilities,
        skipped=scanned.skipped,
        cost=cost,
        other_files=scanned.other_files,
    )


def _targets(model: Predictor, labels: list[Label]) -> torch.Tensor:
    """Labels as the model's task scores them: class indices, or 0/1 rows."""
    return model.task.labels.collate(labels, len(model.class_names))


def _predict_converted(
    model: TransferClassifier,
    converted: ConvertedDataset,
    split: str,
    batch_size: int,
    accelerator: str,
    tta: str,
    max_pixels: int,
) -> LabelledPredictions:
    """`predict_labelled` on one split of a converted dataset, labels mapped to the model's
    classes. Its skipped files are those the conversion skipped in that split's own folder
    (DATA/test/...), as a scan of that folder would list them."""
    unknown = [name for name in converted.classes if name not in model.class_names]
    if unknown:
        raise DatasetError(
            f"{converted.location}: classes {unknown} were not in the training classes "
            f"{model.class_names}"
        )
    model_label = [model.class_names.index(name) for name in converted.classes]
    samples = converted.samples()[split]
    images = ShardImages(converted.split_location(split), samples, None, max_pixels)
    probabilities, cost = predict_probabilities(
        model, samples, tta, batch_size, accelerator, max_pixels=max_pixels, source=images
    )
    split_folder = os.path.join(converted.metadata["source"], split) + os.sep
    stored = LABEL_KINDS[converted.label_kind]
    in_model_classes = [
        (path, stored.from_indices([model_label[index] for index in label_indices(label)]))
        for path, label in samples
    ]
    labels = [label for _, label in model.task.labels.convert(in_model_classes, str(split))]
    return LabelledPredictions(
        paths=[path for path, _ in samples],
        labels=_targets(model, labels),
        probabilities=probabilities,
        skipped=[row for row in converted.skipped() if row[0].startswith(split_folder)],
        cost=cost,
        shards=images,
    )


def evaluate(
    run_dir: str | Path,
    data: str | Path,
    batch_size: int = 64,
    accelerator: str = "auto",
    tta: str = "none",
    max_image_pixels: int | None = None,
    csv_paths_outside_root: bool | None = None,
    verify: str | None = None,
    scan_cache: str | None = None,
) -> dict[str, Any]:
    """The model's task's evaluation on a labelled folder or CSV (single-label: top-1, top-5,
    balanced accuracy, macro-F1, per-class scores, the confusion matrix; multi-label: mAP,
    macro- and micro-F1, exact match and per-class scores at the model's thresholds; classes
    without images listed, not averaged in), with the test-time averaging preset `tta` and
    its cost.

    `run_dir` is a run folder or an export folder. `max_image_pixels`,
    `csv_paths_outside_root`, `verify` and `scan_cache` default to the run's own
    (`runfolder.image_limits`, `runfolder.scan_options`).
    """
    model = load_predictor(run_dir)
    limits = image_limits(run_dir, max_image_pixels, csv_paths_outside_root)
    options = scan_options(run_dir, verify, scan_cache)
    predictions = predict_labelled(model, data, batch_size, accelerator, tta, *limits, **options)
    metrics = model.task.evaluate(
        predictions.probabilities, predictions.labels, model.class_names, model.thresholds
    )
    ignored_files, unread_images = predictions.other_files.counts()
    return {
        "run": str(run_dir),
        "data": str(data),
        "task": model.task.name,
        "tta": predictions.cost,
        "skipped_files": len(predictions.skipped),
        "skipped": [{"path": path, "reason": reason} for path, reason in predictions.skipped],
        "ignored_files": ignored_files,  # not images, by extension
        "unread_images": unread_images,  # images in formats tlkit does not read, by extension
        **metrics.summary(),
    }


def image_paths(
    inputs: list[str | Path],
) -> tuple[list[str], list[tuple[str, str]], OtherFiles]:
    """Files as given and the image files found below folders, in a stable order; the entries
    of the folders skipped with the reason (unreadable folders, pipes); the files not read,
    counted (`data.find_images`: hidden entries left out; other files counted by extension,
    as are files given in an image format tlkit does not read)."""
    paths: list[str] = []
    skipped: list[tuple[str, str]] = []
    other_files = OtherFiles()
    for item in map(Path, inputs):
        if item.is_dir():
            found, found_skipped, found_other_files = find_images(item)
            paths += found
            skipped += found_skipped
            other_files.update(found_other_files)
        elif item.is_file():
            if item.suffix.lower() in UNREAD_IMAGE_FORMATS:
                other_files.add(item.name)
            else:  # named by the user: read whatever its extension, skipped if it fails
                paths.append(str(item))
        else:
            raise InputNotFoundError(f"{item}: no such file or folder")
    return paths, skipped, other_files


def predict(
    run_dir: str | Path,
    inputs: list[str | Path],
    top_k: int = 3,
    batch_size: int = 64,
    accelerator: str = "auto",
    tta: str = "none",
    max_image_pixels: int | None = None,
    threshold: float | None = None,
) -> tuple[list[dict[str, Any]], list[tuple[str, str]], OtherFiles]:
    """The task's prediction per image (single-label: the top-k labels and probabilities;
    multi-label: the labels at or above their thresholds, then the top k); also the files that
    could not be used (with the reason) and the files not read (not images, or images in a
    format tlkit does not read: counted by extension). `inputs` are image files, folders of
    them, or splits of converted datasets (their images follow the files', with the paths they
    had in the converted folder).

    `run_dir` is a run folder or an export folder; `max_image_pixels` defaults to the run's;
    `threshold` replaces a multi-label model's per-class thresholds (chosen on validation).
    """
    if top_k < 1:
        raise ConfigError(f"top_k must be 1 or more, not {top_k}")
    if threshold is not None and not 0 <= threshold <= 1:
        raise ConfigError(f"--threshold must lie between 0 and 1, not {threshold}")
    model = load_predictor(run_dir)
    if threshold is not None and not model.task.thresholded:
        raise ConfigError(
            f"--threshold applies to multi-label models; this one is {model.task.name} (it "
            "predicts the most probable classes)"
        )
    classes = model.class_names
    thresholds = model.thresholds if threshold is None else [threshold] * len(classes)
    max_pixels, _ = image_limits(run_dir, max_image_pixels)
    converted = [labelled_split(item) for item in inputs]
    files = [item for item, found in zip(inputs, converted, strict=True) if not found]
    paths, skipped, other_files = image_paths(files)
    problems = find_decode_problems(paths, max_pixels)
    usable = [path for path, problem in zip(paths, problems, strict=True) if problem is None]
    skipped += [(path, problem) for path, problem in zip(paths, problems, strict=True) if problem]
    predict_options = (tta, batch_size, accelerator)
    batches = []
    if usable:
        samples = [(path, -1) for path in usable]
        batches.append(
            predict_probabilities(model, samples, *predict_options, max_pixels=max_pixels)[0]
        )
    for found in filter(None, converted):  # a converted split: the images in its shards
        labelled = _predict_converted(model, *found, batch_size, accelerator, tta, max_pixels)
        usable += labelled.paths
        batches.append(labelled.probabilities)
    if not usable:
        return [], skipped, other_files
    probabilities = torch.cat(batches)
    rows = [
        {"path": path, **model.task.prediction_row(row, classes, top_k, thresholds)}
        for path, row in zip(usable, probabilities, strict=True)
    ]
    return rows, skipped, other_files
