"""The run folder: what a fine-tuning run leaves behind, written atomically, read back safely.

best.ckpt      best-on-validation checkpoint (the model `evaluate` and `predict` use)
last.ckpt      the latest checkpoint
metrics.csv    per-epoch metrics (Lightning's CSVLogger; tensorboard/ with --logger tensorboard)
config.yaml    the configuration, re-runnable with `tlkit finetune --config`
summary.json   backbone, weights, strategy, parameter counts, classes, accuracies, timings
split.csv      every image used and its split (train, val or test), paths relative to the data
               root; `--resume` trains on exactly this split
skipped.csv    files that could not be used, with the reason (at the scan, or while training)
load_failures.csv  files that failed to load during training, appended by the data-loading
               processes; merged into skipped.csv when the run ends
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml

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


def write_atomic(path: str | Path, text: str) -> None:
    """Write via a temporary file and a rename, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(text)
        tmp.flush()
        os.fsync(tmp.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp.name, 0o666 & ~umask)  # a plain file's permissions, not the temp file's 0600
    os.replace(tmp.name, path)


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """config.yaml as a plain mapping; keys from other tlkit versions are kept, not rejected,
    and a folder without one (an export folder) gives an empty mapping."""
    path = Path(run_dir) / CONFIG
    loaded = yaml.safe_load(path.read_text()) if path.is_file() else None
    return loaded if isinstance(loaded, dict) else {}


def image_limits(
    run_dir: str | Path,
    max_image_pixels: int | None = None,
    csv_paths_outside_root: bool | None = None,
) -> tuple[int, bool]:
    """`(max_image_pixels, csv_paths_outside_root)` for reading images with a run's model: the
    values given here, else the run's own (config.yaml), else `FinetuneConfig`'s defaults."""
    config, defaults = read_config(run_dir), FinetuneConfig()
    if max_image_pixels is None:
        max_image_pixels = int(config.get("max_image_pixels", defaults.max_image_pixels))
    if csv_paths_outside_root is None:
        csv_paths_outside_root = bool(
            config.get("csv_paths_outside_root", defaults.csv_paths_outside_root)
        )
    return max_image_pixels, csv_paths_outside_root


def write_summary(run_dir: str | Path, summary: dict[str, Any]) -> None:
    write_atomic(Path(run_dir) / SUMMARY, json.dumps(summary, indent=2) + "\n")


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / SUMMARY).read_text())


def write_skipped(run_dir: str | Path, skipped: list[tuple[str, str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "reason"])
    writer.writerows(skipped)
    write_atomic(Path(run_dir) / SKIPPED, buffer.getvalue())


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


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint loaded with `weights_only=True`: objects that could run code are refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
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
