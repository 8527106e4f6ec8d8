"""The run folder's contract: the typed summary, and one way to open a finished run."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from tlkit.config import FinetuneConfig
from tlkit.errors import RunFolderError
from tlkit.infer.predict import evaluate
from tlkit.metrics import accuracy_interval
from tlkit.runfolder import (
    DATA_FACTS,
    SUMMARY,
    FinishedRun,
    Preprocessing,
    RunSummary,
    open_run,
    read_data_facts,
    read_skipped,
    read_summary,
    write_skipped,
    write_summary,
)

# The keys of the first summary.json tlkit wrote; `resumed`, `feature_cache` and `linear_probe`
# came later.
FIRST_SUMMARY = {
    "tlkit_version": "0.1.0",
    "backbone": "tf_efficientnet_lite0",
    "weights": "bundled",
    "strategy": "partial",
    "unfreeze_stages": 1,
    "trainable_parameters": 1_000,
    "total_parameters": 4_000,
    "classes": ["blue", "green", "red"],
    "preprocessing": {
        "input_size": 32,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "interpolation": "bicubic",
        "crop_pct": 0.875,
    },
    "train_images": 21,
    "val_images": 9,
    "test_images": 12,
    "epochs_run": 1,
    "best_epoch": 1,
    "best_val_acc": 0.5,
    "test_acc": None,
    "test_acc_top5": None,
    "history": [{"epoch": 1, "loss": 1.1, "train_acc": 0.4, "val_acc": 0.5, "lr": 0.001}],
    "skipped_files": 0,
    "wall_time_s": 3.5,
}


def test_summary_round_trips_through_json(tmp_path: Path):
    values = {
        **FIRST_SUMMARY,
        "resumed": True,
        "feature_cache": {"train": {"reused": False}},
        "auto_decision": {"choices": {"strategy": {"value": "partial", "reason": "why"}}},
        "linear_probe": {"linear_val_acc": 0.9, "knn_val_acc": 0.8, "knn_k": 20},
        "task": "multi-label",
        "monitor": "val_map",
        "best_val_metrics": {"val_map": 0.75, "val_exact_match": 0.5},
        "test_metrics": {"test_map": 0.7},
        "decision_thresholds": {"blue": 0.4, "green": 0.5, "red": 0.6},
        "test_acc": 0.75,
        "test_acc_interval": [0.4677, 0.9111],
        "ignored_files": {".ogg": 7858, ".txt": 952},
        "unread_images": {".svg": 248},
        "tta_choice": {"preset": "ten-crop", "images": 50, "rule": "why", "candidates": []},
        "stopped_by_budget": True,
        "soup": {
            "metric": "val_map",
            "candidates": [{"epoch": 2, "val": 0.7, "soup_val": 0.76, "kept": True}],
            "epochs": [3, 2],
            "val_before": 0.75,
            "val_after": 0.76,
            "val_metrics": {"val_map": 0.76},
            "seconds": 1.5,
        },
    }
    summary = RunSummary.from_dict(values)
    assert summary.best_monitored == 0.75
    assert summary.preprocessing == Preprocessing(32, (0.5,) * 3, (0.5,) * 3, "bicubic", 0.875)
    write_summary(tmp_path, summary)
    assert read_summary(tmp_path) == summary
    assert json.loads((tmp_path / SUMMARY).read_text()) == values


def test_an_older_summary_loads_with_defaults_and_unknown_keys_are_kept(tmp_path: Path):
    summary = RunSummary.from_dict(FIRST_SUMMARY)
    assert summary.resumed is False and summary.feature_cache is None
    assert summary.task == "single-label" and summary.monitor == "val_acc"
    assert summary.best_monitored == 0.5  # best_val_acc, as older runs monitored it
    assert summary.test_acc_interval is None and summary.tta_choice is None
    assert summary.ignored_files == {} and summary.unread_images == {}

    newer = RunSummary.from_dict({**FIRST_SUMMARY, "written_by_a_newer_tlkit": [1, 2]})
    assert newer.extra == {"written_by_a_newer_tlkit": [1, 2]}
    assert newer.to_dict()["written_by_a_newer_tlkit"] == [1, 2]


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (
            json.dumps({k: v for k, v in FIRST_SUMMARY.items() if k != "classes"}),
            "missing: classes",
        ),
        (json.dumps({**FIRST_SUMMARY, "epochs_run": "two"}), "epochs_run"),
        (json.dumps({**FIRST_SUMMARY, "preprocessing": {"size": 3}}), "preprocessing"),
    ],
)
def test_a_broken_summary_is_a_clear_error(tmp_path: Path, text: str, message: str):
    (tmp_path / SUMMARY).write_text(text)
    with pytest.raises(RunFolderError, match=message) as raised:
        read_summary(tmp_path)
    assert str(tmp_path / SUMMARY) in str(raised.value)


def test_the_test_accuracy_interval_is_the_wilson_score_interval():
    # By hand, 8 of 10 correct, z = 1.959964: centre (0.8 + z^2/20) / (1 + z^2/10) = 0.716740,
    # half-width z / (1 + z^2/10) * sqrt(0.8 * 0.2 / 10 + z^2/400) = 0.226578.
    assert accuracy_interval(0.8, 10) == pytest.approx((0.49016, 0.94332), abs=1e-5)
    low, high = accuracy_interval(0.77, 146)  # the example: about +-7 points
    assert high - low == pytest.approx(0.137, abs=0.002) and low < 0.77 < high
    assert accuracy_interval(1.0, 12)[1] == 1.0 and accuracy_interval(0.0, 12)[0] == 0.0


def test_skipped_files_round_trip(tmp_path: Path):
    assert read_skipped(tmp_path) == []  # no skipped.csv: nothing was skipped
    skipped = [("a,b.jpg", "truncated"), ("緑/c.png", 'not an image: "x"')]
    write_skipped(tmp_path, skipped)
    assert read_skipped(tmp_path) == skipped


def test_open_run_reads_a_finished_run(tiny_run: Path):
    run = open_run(tiny_run)
    assert isinstance(run, FinishedRun) and run.folder == tiny_run
    assert run.best_checkpoint == tiny_run / "best.ckpt"
    assert run.summary == read_summary(tiny_run) and run.summary.classes == ["blue", "green", "red"]
    assert run.config == FinetuneConfig.from_yaml(tiny_run / "config.yaml")
    assert run.skipped == []


def test_open_run_refuses_what_is_not_a_finished_run(tiny_run: Path, tmp_path: Path):
    with pytest.raises(RunFolderError, match="not a finished tlkit run folder: best.ckpt is"):
        open_run(tmp_path)
    unfinished = tmp_path / "unfinished"  # killed before the end: checkpoints, no summary
    shutil.copytree(tiny_run, unfinished, ignore=shutil.ignore_patterns(SUMMARY, "report"))
    with pytest.raises(RunFolderError, match="summary.json is missing"):
        open_run(unfinished)
    (unfinished / SUMMARY).write_bytes((tiny_run / SUMMARY).read_bytes())
    (unfinished / "config.yaml").write_text("learning_rate: 0.1\n")
    with pytest.raises(RunFolderError, match="config.yaml: unknown config keys: learning_rate"):
        open_run(unfinished)


def test_an_old_run_without_a_task_or_data_record_still_evaluates(
    tiny_run: Path, colour_folder: Path, tmp_path: Path
):
    """A run from before tasks: no data.json, a summary without the task's fields, a
    checkpoint without `task` and `loss_weights`: read as single-label."""
    old = tmp_path / "old"
    shutil.copytree(tiny_run, old, ignore=shutil.ignore_patterns(DATA_FACTS, "report"))
    summary = json.loads((old / SUMMARY).read_text())
    for key in ("task", "monitor", "best_val_metrics", "test_metrics", "decision_thresholds"):
        del summary[key]
    (old / SUMMARY).write_text(json.dumps(summary))
    checkpoint = torch.load(old / "best.ckpt", weights_only=True)
    for key in ("task", "loss_weights"):
        del checkpoint["hyper_parameters"][key]
    torch.save(checkpoint, old / "best.ckpt")

    facts = read_data_facts(old)
    assert facts.label_kind == "single-label" and facts.classes == ["blue", "green", "red"]
    counts = {split: summary[f"{split}_images"] for split in ("train", "val", "test")}
    assert facts.split_images == counts and counts["train"] > 0  # from summary.json
    assert facts.images_per_class == {} and facts.class_ratio is None
    assert open_run(old).data == facts and open_run(old).summary.monitor == "val_acc"
    result = evaluate(old, colour_folder / "test")
    assert result["task"] == "single-label" and result == {
        **evaluate(tiny_run, colour_folder / "test"),
        "run": str(old),
        "tta": result["tta"],
    }
