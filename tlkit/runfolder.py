"""The run folder: what a fine-tuning run leaves behind, written atomically, read back safely.

best.ckpt      best-on-validation checkpoint (the model `evaluate` and `predict` use)
last.ckpt      the latest epoch's state, for --resume
metrics.csv    per-epoch metrics (Lightning's CSVLogger; tensorboard/ with --logger tensorboard)
config.yaml    the configuration, re-runnable with `tlkit finetune --config`
summary.json   backbone, weights, strategy, parameter counts, classes, accuracies (the test
               accuracy with its 95% interval), files not read, timings, the test-time
               averaging preset chosen on validation (`RunSummary`)
auto.json      `--strategy auto`'s decision: its evidence and choices, kept for a resumed run
data.json      what the data says (`DataFacts`): classes, label kind, images per split and per
               class, whether training flips images; read by the model, auto, report and export
split.csv      every image used and its split (train, val or test), paths relative to the data
               root; `--resume` trains on exactly this split
skipped.csv    image files that could not be used, with the reason (at the scan, or while
               training); files that are not images, or images in a format tlkit does not
               read, are only counted (summary.json)
load_failures.csv  files that failed to load during training, appended by the data-loading
               processes; merged into skipped.csv when the run ends

A finished run has best.ckpt, summary.json and config.yaml; `open_run` is the one place that
checks this and reads them back, typed.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import pickle
import tempfile
import types
import typing
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tlkit.config import FinetuneConfig
from tlkit.errors import RunFolderError, UnsafeCheckpointError

BEST_CHECKPOINT = "best.ckpt"
LAST_CHECKPOINT = "last.ckpt"
SUMMARY = "summary.json"
CONFIG = "config.yaml"
SKIPPED = "skipped.csv"
SPLIT = "split.csv"
LOAD_FAILURES = "load_failures.csv"
SPLITS = ("train", "val", "test")
METRICS = "metrics.csv"
AUTO_DECISION = "auto.json"
DATA_FACTS = "data.json"


@dataclass(frozen=True)
class Preprocessing:
    """How the backbone's pretraining fed it images: resize, crop and normalisation."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Preprocessing:
        """From its JSON record (an export card's `preprocessing`); other keys are ignored."""
        return cls(
            input_size=int(values["input_size"]),
            mean=tuple(float(v) for v in values["mean"]),
            std=tuple(float(v) for v in values["std"]),
            interpolation=str(values["interpolation"]),
            crop_pct=float(values["crop_pct"]),
        )


@dataclass(frozen=True)
class DataFacts:
    """What the data says, as the scan (of folders, CSVs or converted shards) found it: the
    classes, how images are labelled (`label_kind`: a task name, `config.Task`), images per
    split and, per split, per class (multi-label: images carrying the class), the training
    images' median short side as stored (over the `sized_images` whose size the scan read), and
    whether training shows the model mirror images. Made by the data module after its scan
    (`BaseImageDataModule.data_facts`), stored in the run folder (data.json), and read by the
    model, auto, the report and export, so no caller threads these facts through by hand.

    Counts are empty where unknown: a run from before data.json (`read_data_facts`) or a
    model built without data."""

    classes: list[str]
    label_kind: str = "single-label"
    split_images: dict[str, int] = field(default_factory=dict)
    images_per_class: dict[str, list[int]] = field(default_factory=dict)
    trained_with_hflip: bool = True
    source_short_side_median: float | None = None  # None: the scan read no size
    sized_images: int = 0

    @property
    def class_ratio(self) -> float | None:
        """The training split's largest class over its smallest (images); infinite if a class
        has none, None where the counts are unknown."""
        counts = self.images_per_class.get("train")
        if not counts:
            return None
        return max(counts) / min(counts) if min(counts) else math.inf

    def classes_without_images(self, split: str) -> list[str]:
        """The classes a split holds no image of (none where its counts are unknown)."""
        counts = self.images_per_class.get(split, [])
        return [name for name, count in zip(self.classes, counts, strict=True) if not count]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = DATA_FACTS) -> DataFacts:
        """From data.json's object; other keys (a newer tlkit's) are ignored."""
        try:
            return cls(
                classes=[str(name) for name in values["classes"]],
                label_kind=str(values.get("label_kind", "single-label")),
                split_images={k: int(v) for k, v in values.get("split_images", {}).items()},
                images_per_class={
                    split: [int(count) for count in counts]
                    for split, counts in values.get("images_per_class", {}).items()
                },
                trained_with_hflip=bool(values.get("trained_with_hflip", True)),
                source_short_side_median=values.get("source_short_side_median"),
                sized_images=int(values.get("sized_images", 0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise RunFolderError(f"{source}: not a tlkit data record ({error!r})") from None


def write_atomic(path: str | Path, text: str | bytes) -> None:
    """Write text (or bytes) via a temporary file and a rename, so a crash never leaves a
    half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(text, bytes) else "w"
    with tempfile.NamedTemporaryFile(mode, dir=path.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(text)
        tmp.flush()
        os.fsync(tmp.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp.name, 0o666 & ~umask)  # a plain file's permissions, not the temp file's 0600
    os.replace(tmp.name, path)


def write_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Save a checkpoint dict (`torch.save`) atomically (`write_atomic`)."""
    written = io.BytesIO()
    torch.save(checkpoint, written)
    write_atomic(path, written.getvalue())


def read_auto_decision(run_dir: str | Path) -> dict[str, Any] | None:
    """`--strategy auto`'s recorded decision (auto.json), or None for a run that named its
    strategy."""
    path = Path(run_dir) / AUTO_DECISION
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise RunFolderError(f"{path}: not valid JSON ({error})") from None


def read_config(run_dir: str | Path) -> FinetuneConfig:
    """A run's config.yaml, read strictly as `--config` reads it (unknown keys are an error)."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise RunFolderError(f"{run_dir} is not a tlkit run folder: {CONFIG} is missing")
    try:
        return FinetuneConfig.from_yaml(path)
    except ValueError as error:
        raise RunFolderError(f"{path}: {error}") from error


def image_limits(
    run_dir: str | Path,
    max_image_pixels: int | None = None,
    csv_paths_outside_root: bool | None = None,
) -> tuple[int, bool]:
    """`(max_image_pixels, csv_paths_outside_root)` for reading images with a run's model: the
    values given here, else the run's own (config.yaml), else `FinetuneConfig`'s defaults (an
    export folder has no config.yaml)."""
    config = read_config(run_dir) if (Path(run_dir) / CONFIG).is_file() else FinetuneConfig()
    if max_image_pixels is None:
        max_image_pixels = config.max_image_pixels
    if csv_paths_outside_root is None:
        csv_paths_outside_root = config.csv_paths_outside_root
    return max_image_pixels, csv_paths_outside_root


def scan_options(
    run_dir: str | Path, verify: str | None = None, scan_cache: str | None = None
) -> dict[str, str]:
    """`verify` and `scan_cache` for scanning data with a run's model (`data.scan`'s keyword
    arguments): the values given here, else the run's own, else `FinetuneConfig`'s defaults."""
    config = read_config(run_dir) if (Path(run_dir) / CONFIG).is_file() else FinetuneConfig()
    return {
        "verify": config.verify if verify is None else verify,
        "scan_cache": config.scan_cache if scan_cache is None else scan_cache,
    }


@dataclass
class RunSummary:
    """summary.json: what a finished run was and how it did.

    Keys added after the first release have defaults, so older summaries still load. Keys this
    version does not know (a newer tlkit wrote them) are kept in `extra` and written back, not
    rejected: a summary is tlkit's own output, not user input where a typo must be caught, and
    an older tlkit should still be able to report on a newer run.
    """

    tlkit_version: str
    backbone: str
    weights: str
    strategy: str
    unfreeze_stages: int | None  # partial only
    trainable_parameters: int
    total_parameters: int
    classes: list[str]
    preprocessing: Preprocessing
    train_images: int
    val_images: int
    test_images: int
    epochs_run: int
    best_epoch: int | None  # None: no epoch finished
    best_val_acc: float | None
    test_acc: float | None  # None: no test split, or its evaluation was skipped
    test_acc_top5: float | None
    history: list[dict[str, float]]  # one record per epoch (callbacks.EpochSummary)
    skipped_files: int
    wall_time_s: float
    # Added after the first release, so older summaries lack them:
    resumed: bool = False
    feature_cache: dict[str, Any] | None = None  # features strategy: the cache per split
    auto_decision: dict[str, Any] | None = None  # --strategy auto: evidence, choices, reasons
    linear_probe: dict[str, Any] | None = None  # --lp-ft: the probe the head started from
    task: str = "single-label"  # model/tasks.py TASKS
    monitor: str = "val_acc"  # the logged metric that chose best.ckpt and stopped early
    best_val_metrics: dict[str, float] = field(default_factory=dict)  # at the best epoch
    test_metrics: dict[str, float] = field(default_factory=dict)  # logged names
    # multi-label: per class, the probability from which it is predicted (chosen on validation)
    decision_thresholds: dict[str, float] | None = None
    # test_acc's 95% interval [low, high] (Wilson score, metrics.accuracy_interval)
    test_acc_interval: list[float] | None = None
    # files not read, by extension: not images (.txt, .ogg), and images in formats tlkit does
    # not read (.svg); data.sources.OtherFiles
    ignored_files: dict[str, int] = field(default_factory=dict)
    unread_images: dict[str, int] = field(default_factory=dict)
    # --tta auto's preset, chosen on the validation split, with its evidence
    # (tlkit.infer.predict.choose_tta); None: not chosen (--no-choose-tta, or an older run)
    tta_choice: dict[str, Any] | None = None
    # --budget: Lightning's Timer ended training before the planned schedule (the prediction
    # fell short; train.budget.training_time_left_s)
    stopped_by_budget: bool = False
    # the greedy soup that best.ckpt holds (tlkit.train.soup.make_soup): the epochs averaged,
    # every candidate tried; None: no candidate tried (--soup 1, or an older run)
    soup: dict[str, Any] | None = None

    extra: dict[str, Any] = field(default_factory=dict)  # keys unknown to this version

    @property
    def best_monitored(self) -> float | None:
        """The monitored validation metric at the best epoch (older runs: best_val_acc)."""
        if self.monitor in self.best_val_metrics:
            return self.best_val_metrics[self.monitor]
        return self.best_val_acc if self.monitor == "val_acc" else None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of summary.json (unknown keys kept from reading included)."""
        values = dataclasses.asdict(self)
        return {**values.pop("extra"), **values}

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = SUMMARY) -> RunSummary:
        """A summary from its JSON object; `RunFolderError` naming `source` if it is not one."""
        if not isinstance(values, dict):
            raise RunFolderError(f"{source}: expected a JSON object, not {type(values).__name__}")
        fields = {item.name: item for item in dataclasses.fields(cls) if item.name != "extra"}
        missing = [
            name
            for name, item in fields.items()
            if name not in values
            and item.default is dataclasses.MISSING
            and item.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise RunFolderError(
                f"{source}: not a tlkit run summary, missing: {', '.join(missing)}"
            )
        hints = typing.get_type_hints(cls)
        known = {name: value for name, value in values.items() if name in fields}
        for name, value in known.items():
            if name != "preprocessing" and not isinstance(value, _json_types(hints[name])):
                raise RunFolderError(f"{source}: {name} is {value!r}, expected {hints[name]}")
        try:
            preprocessing = dict(values["preprocessing"])
            for channels in ("mean", "std"):  # JSON arrays; Preprocessing holds tuples
                preprocessing[channels] = tuple(preprocessing[channels])
            known["preprocessing"] = Preprocessing(**preprocessing)
        except (KeyError, TypeError, ValueError) as error:
            raise RunFolderError(f"{source}: preprocessing is not valid ({error!r})") from error
        extra = {name: value for name, value in values.items() if name not in fields}
        return cls(**known, extra=extra)


def _json_types(hint: Any) -> tuple[type, ...]:
    """The Python types JSON gives for a field typed `hint` (an int is a valid float)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    kinds = tuple(typing.get_origin(option) or option for option in options)
    return kinds + (int,) if float in kinds else kinds


def write_data_facts(run_dir: str | Path, facts: DataFacts) -> None:
    write_atomic(Path(run_dir) / DATA_FACTS, json.dumps(facts.to_dict(), indent=2) + "\n")


def read_data_facts(run_dir: str | Path) -> DataFacts:
    """A run's data.json; for a run from before it, a single-label record of what its
    summary.json (classes, images per split) and best checkpoint (horizontal flips) say."""
    path = Path(run_dir) / DATA_FACTS
    if path.is_file():
        try:
            return DataFacts.from_dict(json.loads(path.read_text(encoding="utf-8")), str(path))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RunFolderError(f"{path}: not valid JSON ({error})") from error
    summary = read_summary(run_dir)
    checkpoint = Path(run_dir) / BEST_CHECKPOINT
    hyperparameters = (
        read_checkpoint(checkpoint, mmap=True).get("hyper_parameters", {})
        if checkpoint.is_file()
        else {}
    )
    sizes = {"train": summary.train_images, "val": summary.val_images}
    return DataFacts(
        classes=list(summary.classes),
        split_images=sizes | ({"test": summary.test_images} if summary.test_images else {}),
        trained_with_hflip=bool(hyperparameters.get("trained_with_hflip", True)),
    )


def write_summary(run_dir: str | Path, summary: RunSummary) -> None:
    write_atomic(Path(run_dir) / SUMMARY, json.dumps(summary.to_dict(), indent=2) + "\n")


def read_summary(run_dir: str | Path) -> RunSummary:
    """A run's summary.json, checked against `RunSummary`."""
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        raise RunFolderError(
            f"{run_dir} is not a finished tlkit run folder: {SUMMARY} is missing (a run "
            "writes it when training ends)"
        )
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunFolderError(f"{path}: not valid JSON ({error})") from error
    return RunSummary.from_dict(values, source=str(path))


def write_skipped(run_dir: str | Path, skipped: list[tuple[str, str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "reason"])
    writer.writerows(skipped)
    write_atomic(Path(run_dir) / SKIPPED, buffer.getvalue())


def read_skipped(run_dir: str | Path) -> list[tuple[str, str]]:
    """The `(path, reason)` rows of a run's skipped.csv (none if there is no such file)."""
    path = Path(run_dir) / SKIPPED
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return [(row["path"], row["reason"]) for row in csv.DictReader(handle)]


def write_split(run_dir: str | Path, rows: list[tuple[str, str]]) -> None:
    """split.csv: one `path,split` row per image used (paths relative to the data root)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "split"])
    writer.writerows(rows)
    write_atomic(Path(run_dir) / SPLIT, buffer.getvalue())


def read_split(run_dir: str | Path) -> dict[str, str]:
    """The recorded split of a run: {path relative to the data root: train | val | test}."""
    path = Path(run_dir) / SPLIT
    if not path.is_file():
        raise RunFolderError(
            f"{path} is missing: the run's split is unknown, so it cannot be resumed on the same "
            "images (runs started before tlkit recorded split.csv); start a new run"
        )
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"path", "split"} <= set(reader.fieldnames):
            raise RunFolderError(f"{path}: needs a header with columns 'path' and 'split'")
        split = {}
        for row in reader:
            if row["split"] not in SPLITS:
                raise RunFolderError(
                    f"{path}, line {reader.line_num}: split {row['split']!r} is not one of "
                    f"{', '.join(SPLITS)}"
                )
            split[row["path"]] = row["split"]
    return split


def unsafe_checkpoint(path: str | Path, error: Exception) -> UnsafeCheckpointError:
    """The error for a checkpoint that `torch.load(weights_only=True)` refused."""
    return UnsafeCheckpointError(
        f"{path} holds objects other than tensors and plain data; tlkit never unpickles "
        f"those (weights_only=True). Only load checkpoints you trust. ({error})"
    )


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint loaded with `weights_only=True`: objects that could run code are refused.
    `mmap`: tensors are mapped from the file, not read (for its small records alone)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise unsafe_checkpoint(path, error) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile) as error:
        raise RunFolderError(f"{path} is not a readable checkpoint: {error}") from error


def read_metrics(run_dir: str | Path) -> list[dict[str, str]]:
    """The rows of a run's metrics.csv (empty if there is none yet)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_metrics(run_dir: str | Path, rows: list[dict[str, str]]) -> None:
    """Write metrics rows (columns: the union of their keys, sorted as Lightning does)."""
    columns = sorted({key for row in rows for key in row})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(Path(run_dir) / METRICS, buffer.getvalue())


def best_checkpoint(run_dir: str | Path) -> Path:
    """The best-on-validation checkpoint of a run folder, with a clear error if absent."""
    run_dir = Path(run_dir)
    path = run_dir / BEST_CHECKPOINT
    if not path.is_file():
        raise RunFolderError(
            f"{run_dir} is not a finished tlkit run folder: {BEST_CHECKPOINT} is missing"
        )
    return path


@dataclass(frozen=True)
class FinishedRun:
    """A finished run folder, read back: its summary, its config, the files it skipped and
    what its data says."""

    folder: Path
    summary: RunSummary
    config: FinetuneConfig
    skipped: list[tuple[str, str]]
    data: DataFacts

    @property
    def best_checkpoint(self) -> Path:
        return self.folder / BEST_CHECKPOINT


def open_run(run_dir: str | Path) -> FinishedRun:
    """A finished run folder (best.ckpt, summary.json, config.yaml), with a clear error naming
    what is missing or malformed otherwise."""
    run_dir = Path(run_dir)
    best_checkpoint(run_dir)
    return FinishedRun(
        run_dir,
        read_summary(run_dir),
        read_config(run_dir),
        read_skipped(run_dir),
        read_data_facts(run_dir),
    )
