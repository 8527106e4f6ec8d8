"""The run folder: what a fine-tuning run leaves behind, written atomically, read back safely.

best.ckpt      best-on-validation checkpoint (the model `evaluate` and `predict` use)
last.ckpt      the latest checkpoint
metrics.csv    per-epoch metrics (Lightning's CSVLogger; tensorboard/ with --logger tensorboard)
config.yaml    the configuration, re-runnable with `tlkit finetune --config`
summary.json   backbone, weights, strategy, parameter counts, classes, accuracies, timings
skipped.csv    files that could not be used, with the reason
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

BEST_CHECKPOINT = "best.ckpt"
LAST_CHECKPOINT = "last.ckpt"
SUMMARY = "summary.json"
CONFIG = "config.yaml"
SKIPPED = "skipped.csv"
METRICS = "metrics.csv"


class RunFolderError(FileNotFoundError):
    """A path given as a run folder is not one."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds more than tensors and plain data: it is refused, never unpickled."""


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
