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
import tempfile
from pathlib import Path
from typing import Any

BEST_CHECKPOINT = "best.ckpt"
LAST_CHECKPOINT = "last.ckpt"
SUMMARY = "summary.json"
CONFIG = "config.yaml"
SKIPPED = "skipped.csv"
METRICS = "metrics.csv"


class RunFolderError(FileNotFoundError):
    """A path given as a run folder is not one."""


def write_atomic(path: str | Path, text: str) -> None:
    """Write via a temporary file and a rename, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(text)
        tmp.flush()
        os.fsync(tmp.fileno())
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


def best_checkpoint(run_dir: str | Path) -> Path:
    """The best-on-validation checkpoint of a run folder, with a clear error if absent."""
    run_dir = Path(run_dir)
    path = run_dir / BEST_CHECKPOINT
    if not path.is_file():
        raise RunFolderError(
            f"{run_dir} is not a finished tlkit run folder: {BEST_CHECKPOINT} is missing"
        )
    return path
