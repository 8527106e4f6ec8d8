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
import logging
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pytorch_lightning as pl
import torch

from tlkit.choices import TTA_CHOICE_MAX_IMAGES
from tlkit.console import expected_lightning_warnings_hidden
from tlkit.data.datasets import (
    ImageDataset,
    LabelledImages,
    default_num_workers,
    loader_leaving_out_failures,
)
from tlkit.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    UNREAD_IMAGE_FORMATS,
    find_decode_problems,
)
from tlkit.data.labels import LABEL_KINDS, Label, label_indices
from tlkit.data.shards import ConvertedDataset, ShardImages, labelled_split, open_converted
from tlkit.data.sources import OtherFiles, data_root, find_images, scan
from tlkit.errors import ConfigError, DatasetError, InputNotFoundError
from tlkit.infer.export import is_export_folder, load_exported, read_card
from tlkit.infer.tta import (
    AUTO,
    AUTO_RULE,
    ScaleSquares,
    TTAModule,
    TTAPlan,
    average_scales,
    can_be_outdone,
    candidate_plans,
    choose_preset,
    covers,
    loader_batch_size,
    measuring_plans,
    plan,
    views_of,
)
from tlkit.metrics import ACCURACY, TITLES
from tlkit.model.classifier import TransferClassifier
from tlkit.model.tasks import TaskDefinition
from tlkit.runfolder import (
    SPLIT,
    SUMMARY,
    Preprocessing,
    best_checkpoint,
    image_limits,
    read_config,
    read_split,
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
    def task(self) -> TaskDefinition:
        """What the model's probabilities mean: softmax over classes, or a sigmoid each."""
        ...

    @property
    def thresholds(self) -> list[float]:
        """Per class, the probability from which a multi-label prediction includes it."""
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


@dataclass
class Probabilities:
    """Class probabilities of the samples that loaded, and what it cost."""

    values: torch.Tensor  # (M, K), one row per sample that loaded
    kept: list[int]  # the positions in the samples of those M rows, in order
    skipped: list[tuple[str, str]]  # (path, reason) of the samples that failed to load
    cost: dict[str, Any]  # TTA preset, views per image, images per second


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
    per_view: bool = False,
) -> Probabilities:
    """Class probabilities for `(path, label)` samples with a TTA preset, and its cost;
    `per_view`: those of every view, (M, V, K), unaveraged (`tta.TTAModule`).

    Mirrored views only for models trained with horizontal flips, scales only within those
    training resized to; the loader's batches are smaller than `batch_size` where the plan's
    views would exceed `tta.TTA_MEMORY_BUDGET`. The samples are image files, or with `source`
    images of that split (a converted one, or a data module's). A sample that fails to load
    (a file truncated or gone since the scan) is left out, with its reason. `num_workers`
    loader processes (default: one per CPU core, at most 8); `progress` shows the progress bar.
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
    loader = loader_leaving_out_failures(dataset, images_per_batch, workers)
    # At most one loader batch of views per forward pass: larger batches are slower per image
    # on CPUs (measured: 943 img/s at 64, 406 at 256 for Lite0 at 64px); raise --batch-size
    # on GPUs.
    averaging = TTAModule(model, tta_plan, max_views_per_forward=batch_size, per_view=per_view)
    started = time.perf_counter()
    if isinstance(model, pl.LightningModule):
        trainer = single_device_trainer(accelerator, progress)
        # the progress bar must stay out of stdout
        with contextlib.redirect_stdout(sys.stderr), expected_lightning_warnings_hidden():
            batches = trainer.predict(averaging, dataloaders=loader)
    else:  # exported models run on the CPU, in their own runtime
        with torch.inference_mode():
            batches = [averaging.predict_step(batch, index) for index, batch in enumerate(loader)]
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
    loaded = [(values, positions) for values, positions, _ in batches if values is not None]
    values = [values.float().cpu() for values, _ in loaded]
    return Probabilities(
        values=torch.cat(values)
        if values
        else torch.empty(
            0, *([tta_plan.views_per_image] if per_view else []), len(model.class_names)
        ),
        kept=[position for _, positions in loaded for position in positions.tolist()],
        skipped=[
            (samples[position][0], reason) for *_, failed in batches for position, reason in failed
        ],
        cost=cost,
    )


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
    `tta.candidate_plans`, cheapest first, then `tta.choose_preset`'s rule on which images each
    gets right (`_right`). Each view is computed once: the presets' views come from the
    passes of `tta.measuring_plans` (`flip`'s gives `none`'s, `multi-scale`'s `ten-crop`'s).
    The passes stop once the cheapest preset gets too few images wrong for any other to
    replace it (`tta.can_be_outdone`): the presets left unmeasured are listed. Returns the
    record: the preset, the rule, per measured candidate its accuracy and views per image, the
    unmeasured ones and why, and per pass its views per image and images/s."""
    started = time.perf_counter()
    if len(samples) > max_images:
        positions = sorted(random.Random(seed).sample(range(len(samples)), max_images))
        samples = [samples[position] for position in positions]
    targets = _targets(model, [label for _, label in samples])
    plans = candidate_plans(
        model.preprocessing, model.trained_with_hflip, model.trained_short_sides
    )
    passes = []

    def right_with(candidate: TTAPlan) -> tuple[torch.Tensor, str] | None:
        """Which images `candidate` gets right, and the pass its views came from; None if no
        pass so far has its views."""
        for wide, predicted in passes:
            if covers(wide, candidate):
                views = views_of(wide, candidate, predicted.values)
                probabilities = average_scales(views, candidate.average, model.task)
                kept = torch.tensor(predicted.kept, dtype=torch.int64)
                return _right(model, probabilities, targets[kept]), wide.preset
        return None

    stopped, measuring = None, measuring_plans(plans)
    for wide in measuring:
        predicted = predict_probabilities(
            model,
            samples,
            wide.preset,
            batch_size,
            accelerator,
            source=source,
            num_workers=num_workers,
            progress=progress,
            per_view=True,
        )
        passes.append((wide, predicted))
        cheapest = right_with(plans[0])
        mistakes = int((~cheapest[0]).sum()) if cheapest is not None else None
        if mistakes is not None and not can_be_outdone(mistakes) and len(passes) < len(measuring):
            stopped = (
                f"{plans[0].preset} gets {mistakes} of {len(cheapest[0])} images wrong: no "
                f"costlier preset can gain enough (z at most sqrt({mistakes}) = "
                f"{math.sqrt(mistakes):.2f}); their other views were not computed"
            )
            break
    correct, measured_in = {}, {}
    for candidate in plans:
        measured = right_with(candidate)
        if measured is not None:
            correct[candidate.preset], measured_in[candidate.preset] = measured
    chosen, evidence = choose_preset(correct)
    views_per_image = {candidate.preset: candidate.views_per_image for candidate in plans}
    for record in evidence:
        record.update(
            views_per_image=views_per_image[record["preset"]],
            measured_in=measured_in[record["preset"]],
        )
    return {
        "preset": chosen,
        "images": len(samples),
        "metric": model.task.fit_metric,  # what `_right` counts: top-1, or exact match
        "rule": AUTO_RULE,
        "candidates": evidence,
        "not_measured": [preset for preset in views_per_image if preset not in correct],
        "stopped_early": stopped,
        "passes": [
            {
                key: predicted.cost[key]
                for key in ("preset", "views_per_image", "images_per_second", "seconds")
            }
            for _, predicted in passes
        ],
        "seconds": round(time.perf_counter() - started, 2),
    }


def tta_choice_metric(choice: dict[str, Any]) -> str:
    """The title of the score a `choose_tta` record compares its presets on (records made
    before it was recorded counted top-1)."""
    return TITLES[choice.get("metric", ACCURACY)]


def unmeasured_presets(choice: dict[str, Any]) -> list[str]:
    """What a `choose_tta` record left unmeasured and why, as a phrase to list (none when every
    pass ran); runs recorded before the early stop have no such fields."""
    if not choice.get("stopped_early"):
        return []
    return [f"{' and '.join(choice['not_measured'])} not measured: {choice['stopped_early']}"]


def _right(model: Predictor, probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per image, whether the model's prediction is right: its most probable class
    (single-label), or exactly the true classes at the model's thresholds (multi-label)."""
    if model.task.thresholded:
        predicted = probabilities >= torch.tensor(model.thresholds)
        return (predicted == targets.bool()).all(dim=1)
    return probabilities.argmax(dim=1) == targets


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
    labels: torch.Tensor  # the task's targets: (N,) class indices, or (N, C) 0/1 rows
    probabilities: torch.Tensor  # (N, C): the task's activation of the logits
    skipped: list[tuple[str, str]]  # (path, reason) of the image files that could not be used
    cost: dict[str, Any] = field(default_factory=dict)  # TTA preset, views/image, images/s
    shards: ShardImages | None = None  # the converted split the images come from, if any
    root: str | None = None  # the folder `paths` are relative to (shards' source); None: files
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
    predicted = predict_probabilities(
        model, samples, tta, batch_size, accelerator, max_pixels=max_pixels
    )
    kept = [scanned.samples[position] for position in predicted.kept]
    return LabelledPredictions(
        paths=[path for path, _ in kept],
        labels=_targets(model, [label for _, label in kept]),
        probabilities=predicted.values,
        skipped=scanned.skipped + predicted.skipped,
        cost=predicted.cost,
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
    predicted = predict_probabilities(
        model, samples, tta, batch_size, accelerator, max_pixels=max_pixels, source=images
    )
    split_folder = os.path.join(converted.metadata["source"], split) + os.sep
    converted_skipped = [row for row in converted.skipped() if row[0].startswith(split_folder)]
    stored = LABEL_KINDS[converted.label_kind]
    kept = [samples[position] for position in predicted.kept]
    in_model_classes = [
        (path, stored.from_indices([model_label[index] for index in label_indices(label)]))
        for path, label in kept
    ]
    labels = [label for _, label in model.task.labels.convert(in_model_classes, str(split))]
    return LabelledPredictions(
        paths=[path for path, _ in kept],
        labels=_targets(model, labels),
        probabilities=predicted.values,
        skipped=converted_skipped + predicted.skipped,
        cost=predicted.cost,
        shards=images.subset(predicted.kept),
        root=str(data_root(converted.metadata["source"])),
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
    without images listed, not averaged in), with the test-time averaging preset `tta`
    (`auto`: the run's choice, `resolve_tta`) and
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
    metrics = model.task.evaluate(
        predictions.probabilities, predictions.labels, model.class_names, model.thresholds
    )
    seen = images_seen_in_training(run_dir, predictions)
    if seen and any(seen.values()):
        logger.warning(
            f"{sum(seen.values())} of the {metrics.images} images evaluated are the run's own, "
            f"in its split.csv as train ({seen['train']}) or val ({seen['val']}) images: these "
            "numbers overstate how the model does on new images; evaluate on held-out data "
            "(such as DATA/test)"
        )
    ignored_files, unread_images = predictions.other_files.counts()
    return {
        "run": str(run_dir),
        "data": str(data),
        "task": model.task.name,
        "images": metrics.images,
        "images_seen_in_training": seen,
        "tta": {**predictions.cost, "requested": tta},
        "skipped_files": len(predictions.skipped),
        "skipped": [{"path": path, "reason": reason} for path, reason in predictions.skipped],
        "ignored_files": ignored_files,  # not images, by extension
        "unread_images": unread_images,  # images in formats tlkit does not read, by extension
        **metrics.summary(),
    }


def images_seen_in_training(
    run_dir: str | Path, predictions: LabelledPredictions
) -> dict[str, int] | None:
    """How many of the evaluated images the run trained on (`train`) and chose its best
    checkpoint on (`val`), by its split.csv; None where the split is unknown (an export folder,
    a run from before split.csv).

    Images are compared by their real paths: split.csv's relative to the run's data root (a
    converted dataset's: its source's), so the evaluated folder may be the run's data folder,
    a folder in it (DATA/train) or a conversion of it. A relative DATA_DIR is taken as relative
    to the current folder, as the run took it."""
    if not (Path(run_dir) / SPLIT).is_file():
        return None
    data_dir = read_config(run_dir).data_dir
    try:
        converted = open_converted(data_dir)
    except (DatasetError, OSError):  # an unfinished or unreachable conversion: the split's own
        converted = None
    root = data_root(converted.metadata["source"] if converted is not None else data_dir)
    split_of = {
        os.path.realpath(os.path.join(root, relative)): split
        for relative, split in read_split(run_dir).items()
        if split in ("train", "val")
    }
    folder = predictions.root
    paths = (
        predictions.paths
        if folder is None
        else [os.path.join(folder, p) for p in predictions.paths]
    )
    found = Counter(split_of.get(os.path.realpath(path)) for path in paths)
    return {"train": found["train"], "val": found["val"]}


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
    `tta` is a test-time averaging preset, or `auto` for the run's choice (`resolve_tta`).
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
        predicted = predict_probabilities(model, samples, *predict_options, max_pixels=max_pixels)
        usable = [usable[position] for position in predicted.kept]
        skipped += predicted.skipped
        batches.append(predicted.values)
    for found in filter(None, converted):  # a converted split: the images in its shards
        labelled = _predict_converted(model, *found, batch_size, accelerator, tta, max_pixels)
        usable += labelled.paths
        at_conversion = set(found[0].skipped())  # listed are the images failing now, only
        skipped += [row for row in labelled.skipped if row not in at_conversion]
        batches.append(labelled.probabilities)
    if not usable:
        return [], skipped, other_files
    probabilities = torch.cat(batches)
    rows = [
        {"path": path, **model.task.prediction_row(row, classes, top_k, thresholds)}
        for path, row in zip(usable, probabilities, strict=True)
    ]
    return rows, skipped, other_files
