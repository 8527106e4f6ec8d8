"""Evaluate and predict with a run folder's best checkpoint or an exported model.

Both are a `Predictor`: class names, the preprocessing they expect, and class probabilities of a
preprocessed batch. Anything that changes how a batch becomes probabilities (test-time
augmentation, for one) wraps `Predictor.predict_batch` and is then available to both. Images
are found by `data.find_images`, and checkpoints run on `distributed.single_device_trainer`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from tlkit.choices import TTA_CHOICE_MAX_IMAGES
from tlkit.console import expected_lightning_warnings_hidden
from tlkit.data.datasets import ImageDataset, LabelledImages, default_num_workers
from tlkit.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    UNREAD_IMAGE_FORMATS,
    find_decode_problems,
)
from tlkit.data.shards import ConvertedDataset, ShardImages, labelled_split
from tlkit.data.sources import OtherFiles, find_images, scan
from tlkit.errors import ConfigError, DatasetError, InputNotFoundError
from tlkit.infer.export import is_export_folder, load_exported, read_card
from tlkit.infer.tta import (
    AUTO,
    AUTO_RULE,
    ScaleSquares,
    TTAModule,
    candidate_plans,
    choose_preset,
    loader_batch_size,
    plan,
)
from tlkit.metrics import classification_metrics
from tlkit.model.classifier import TransferClassifier
from tlkit.runfolder import (
    SUMMARY,
    Preprocessing,
    best_checkpoint,
    image_limits,
    read_summary,
    scan_options,
)

logger = logging.getLogger(__name__)


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
    def trained_short_sides(self) -> tuple[float, float]:
        """The short sides training resized to, relative to the input size (TTA's scales)."""
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
    num_workers: int | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """(N, K) class probabilities for `(path, label)` samples with a TTA preset, and its cost.

    Mirrored views only for models trained with horizontal flips, scales only within those
    training resized to; the loader's batches are smaller than `batch_size` where the plan's
    views would exceed `tta.TTA_MEMORY_BUDGET`. The samples are image files, or with `source`
    images of that split (a converted one, or a data module's). `num_workers` loader processes
    (default: one per CPU core, at most 8); `progress` shows the progress bar.
    """
    tta_plan = plan(
        tta,
        model.preprocessing,
        scales,
        average,
        model.trained_with_hflip,
        model.trained_short_sides,
    )
    views = ScaleSquares(tta_plan, model.preprocessing)
    if source is not None:
        dataset = source.images_of(samples, views)
    else:
        dataset = ImageDataset(samples, views, max_pixels)
    images_per_batch = loader_batch_size(tta_plan, batch_size)
    workers = default_num_workers() if num_workers is None else num_workers
    loader = DataLoader(dataset, batch_size=images_per_batch, num_workers=workers)
    # At most one loader batch of views per forward pass: larger batches are slower per image
    # on CPUs (measured: 943 img/s at 64, 406 at 256 for Lite0 at 64px); raise --batch-size
    # on GPUs.
    averaging = TTAModule(model, tta_plan, max_views_per_forward=batch_size)
    started = time.perf_counter()
    if isinstance(model, pl.LightningModule):
        trainer = single_device_trainer(accelerator, progress)
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


def choose_tta(
    model: Predictor,
    samples: list[tuple[str, int]],
    batch_size: int = 64,
    accelerator: str = "auto",
    source: LabelledImages | None = None,
    num_workers: int | None = None,
    max_images: int = TTA_CHOICE_MAX_IMAGES,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """`--tta auto`'s choice for a model, measured on labelled samples (a run's validation
    split; at most `max_images` of them, a seeded sample): every preset of
    `tta.candidate_plans`, cheapest first, then `tta.choose_preset`'s rule. Returns the record:
    the preset, the rule, and per candidate its top-1, views per image and images/s."""
    started = time.perf_counter()
    if len(samples) > max_images:
        positions = sorted(random.Random(seed).sample(range(len(samples)), max_images))
        samples = [samples[position] for position in positions]
    labels = torch.tensor([label for _, label in samples])
    correct, costs = {}, {}
    plans = candidate_plans(
        model.preprocessing, model.trained_with_hflip, model.trained_short_sides
    )
    for candidate in plans:
        probabilities, cost = predict_probabilities(
            model,
            samples,
            candidate.preset,
            batch_size,
            accelerator,
            source=source,
            num_workers=num_workers,
            progress=progress,
        )
        correct[candidate.preset] = probabilities.argmax(dim=1) == labels
        costs[candidate.preset] = cost
    chosen, evidence = choose_preset(correct)
    for record in evidence:
        cost = costs[record["preset"]]
        record.update(
            {key: cost[key] for key in ("views_per_image", "images_per_second", "seconds")}
        )
    return {
        "preset": chosen,
        "images": len(samples),
        "rule": AUTO_RULE,
        "candidates": evidence,
        "seconds": round(time.perf_counter() - started, 2),
    }


def recorded_tta_choice(source: str | Path) -> dict[str, Any] | None:
    """The choice `--tta auto` stands for: a run folder's (summary.json's `tta_choice`) or an
    export folder's (its card's `test_time_augmentation`); None where none was recorded."""
    if is_export_folder(source):
        return read_card(source).get("test_time_augmentation")
    if not (Path(source) / SUMMARY).is_file():  # a run still training: no choice yet
        return None
    return read_summary(source).tta_choice


def resolve_tta(tta: str, source: str | Path) -> str:
    """A `--tta` choice as a preset: `auto` is the preset recorded for the run or export
    (`recorded_tta_choice`); where none was recorded (a run trained before tlkit chose, or with
    --no-choose-tta), plain evaluation, `none`, with a warning that says so."""
    if tta != AUTO:
        return tta
    record = recorded_tta_choice(source)
    if record is None:
        logger.warning(
            f"{source} records no test-time averaging choice (trained before tlkit chose one, "
            "or with --no-choose-tta): --tta auto evaluates without averaging (none); name a "
            "preset to average"
        )
        return "none"
    return str(record["preset"])


@dataclass
class LabelledPredictions:
    """Class probabilities per image of a labelled folder or CSV, in the scanned order."""

    paths: list[str]
    labels: torch.Tensor  # (N,) true class indices
    probabilities: torch.Tensor  # (N, C) softmax outputs
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
    probabilities, cost = predict_probabilities(
        model, scanned.samples, tta, batch_size, accelerator, max_pixels=max_pixels
    )
    return LabelledPredictions(
        paths=[path for path, _ in scanned.samples],
        labels=torch.tensor([label for _, label in scanned.samples]),
        probabilities=probabilities,
        skipped=scanned.skipped,
        cost=cost,
        other_files=scanned.other_files,
    )


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
    return LabelledPredictions(
        paths=[path for path, _ in samples],
        labels=torch.tensor([model_label[label] for _, label in samples]),
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
    """Top-1, top-5, per-class accuracy and the confusion matrix on a labelled folder or CSV,
    with the test-time averaging preset `tta` (`auto`: the run's choice, `resolve_tta`) and
    its cost.

    `run_dir` is a run folder or an export folder. `max_image_pixels`,
    `csv_paths_outside_root`, `verify` and `scan_cache` default to the run's own
    (`runfolder.image_limits`, `runfolder.scan_options`).
    """
    model = load_predictor(run_dir)
    preset = resolve_tta(tta, run_dir)
    limits = image_limits(run_dir, max_image_pixels, csv_paths_outside_root)
    options = scan_options(run_dir, verify, scan_cache)
    predictions = predict_labelled(model, data, batch_size, accelerator, preset, *limits, **options)
    metrics = classification_metrics(
        predictions.probabilities, predictions.labels, model.class_names
    )
    ignored_files, unread_images = predictions.other_files.counts()
    return {
        "run": str(run_dir),
        "data": str(data),
        "images": metrics.images,
        "tta": {**predictions.cost, "requested": tta},
        "skipped_files": len(predictions.skipped),
        "skipped": [{"path": path, "reason": reason} for path, reason in predictions.skipped],
        "ignored_files": ignored_files,  # not images, by extension
        "unread_images": unread_images,  # images in formats tlkit does not read, by extension
        "top1": metrics.top1,
        "top5": metrics.top_k_accuracy,  # top-k with k = min(5, classes)
        "per_class_accuracy": {  # a class's accuracy is its recall
            row.name: row.recall if row.support else None for row in metrics.per_class
        },
        "classes": metrics.classes,
        "confusion_matrix": metrics.confusion.tolist(),
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
) -> tuple[list[dict[str, Any]], list[tuple[str, str]], OtherFiles]:
    """Top-k labels and probabilities per image; also the files that could not be used (with
    the reason) and the files not read (not images, or images in a format tlkit does not read:
    counted by extension).
    `inputs` are image files, folders of them, or splits of converted datasets (their images
    follow the files', with the paths they had in the converted folder).

    `run_dir` is a run folder or an export folder; `max_image_pixels` defaults to the run's;
    `tta` is a test-time averaging preset, or `auto` for the run's choice (`resolve_tta`).
    """
    if top_k < 1:
        raise ConfigError(f"top_k must be 1 or more, not {top_k}")
    model = load_predictor(run_dir)
    tta = resolve_tta(tta, run_dir)
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
    k = min(top_k, probabilities.shape[1])
    values, indices = probabilities.topk(k, dim=1)
    classes = model.class_names
    rows = []
    for path, top_values, top_indices in zip(
        usable, values.tolist(), indices.tolist(), strict=True
    ):
        row: dict[str, Any] = {"path": path}
        for rank, (value, index) in enumerate(zip(top_values, top_indices, strict=True), start=1):
            row[f"label_{rank}"] = classes[index]
            row[f"prob_{rank}"] = round(value, 6)
        rows.append(row)
    return rows, skipped, other_files
