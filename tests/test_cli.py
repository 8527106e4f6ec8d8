"""End to end through the command line: finetune, evaluate, predict, config handling."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_RUN_FLAGS

from tlkit.cli import main
from tlkit.runfolder import read_summary


def test_finetune_writes_a_complete_run_folder(tiny_run: Path):
    for name in (
        "best.ckpt",
        "last.ckpt",
        "metrics.csv",
        "summary.json",
        "config.yaml",
        "skipped.csv",
    ):
        assert (tiny_run / name).is_file(), name
    summary = read_summary(tiny_run)
    assert summary.backbone == "tf_efficientnet_lite0" and summary.weights == "bundled"
    assert summary.strategy == "partial" and summary.classes == ["blue", "green", "red"]
    assert 0 < summary.trainable_parameters < summary.total_parameters
    assert summary.epochs_run == 2 and [h["epoch"] for h in summary.history] == [1, 2]
    assert summary.test_images == 12 and 0.0 <= summary.test_acc <= 1.0
    low, high = summary.test_acc_interval  # 95%, Wilson: wide at 12 images
    assert 0 <= low <= summary.test_acc <= high <= 1 and high - low > 0.2
    assert summary.best_val_acc == max(h["val_acc"] for h in summary.history)
    checkpoint = torch.load(tiny_run / "best.ckpt", weights_only=True, map_location="cpu")
    assert checkpoint["epoch"] + 1 == summary.best_epoch


def test_evaluate_prints_metrics_as_json(tiny_run: Path, colour_folder: Path, capsys, tmp_path):
    out = tmp_path / "results.json"
    assert main(["evaluate", str(tiny_run), str(colour_folder / "test"), "--out", str(out)]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results == json.loads(out.read_text())
    assert results["images"] == 12
    assert sum(map(sum, results["confusion_matrix"])) == 12
    assert set(results["per_class_accuracy"]) == {"blue", "green", "red"}
    assert results["top5"] == 1.0  # three classes: the true one is always in the top 5
    assert results["top1"] == pytest.approx(read_summary(tiny_run).test_acc)


def test_predict_writes_top_k_csv_and_reports_unreadable_files(
    tiny_run: Path, colour_folder: Path, tmp_path: Path, capsys
):
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    folder = tmp_path / "folder"
    shutil.copytree(colour_folder / "test" / "red", folder)
    for name in ("a.txt", "b.txt", "a.ogg"):
        (folder / name).write_text("not an image")
    (folder / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    out = tmp_path / "predictions.csv"
    inputs = [str(folder), str(broken)]
    assert main(["predict", str(tiny_run), *inputs, "--top-k", "2", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4
    assert list(rows[0]) == ["path", "label_1", "prob_1", "label_2", "prob_2"]
    assert all(float(row["prob_1"]) >= float(row["prob_2"]) for row in rows)
    errors = capsys.readouterr().err.splitlines()
    skipped = [line for line in errors if line.startswith("skipped ")]
    assert len(skipped) == 2 and skipped[0].startswith(f"skipped {broken}: ")
    assert skipped[1] == "skipped 1 unreadable files"
    # the files that are not images are not listed one by one, but counted
    assert "Ignored 3 files that are not images: 2 .txt, 1 .ogg" in errors
    assert any(line.startswith("Not read: 1 .svg files, vector drawings") for line in errors)


def test_seeded_runs_are_repeatable(colour_folder: Path, tiny_run: Path, tmp_path: Path):
    again = tmp_path / "again"
    assert main(["finetune", str(colour_folder), "--out", str(again), *TINY_RUN_FLAGS]) == 0

    def learning(summary: dict) -> list[dict]:
        return [{k: v for k, v in record.items() if k != "seconds"} for record in summary.history]

    assert learning(read_summary(again)) == learning(read_summary(tiny_run))


def test_saved_config_reruns_and_flags_override_it(tiny_run: Path, capsys):
    config = tiny_run / "config.yaml"
    assert main(["finetune", "--config", str(config), "--lr", "0.5", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    saved = yaml.safe_load(config.read_text())
    assert printed == {**saved, "lr": 0.5}


def test_user_errors_exit_2_with_a_message(tmp_path: Path, tiny_run: Path, capsys):
    assert main(["finetune", str(tmp_path / "nowhere"), "--pretrained", "bundled"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["finetune", str(tmp_path), "--out", str(tiny_run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path), str(tmp_path)]) == 2
    assert "best.ckpt is missing" in capsys.readouterr().err
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("learning_rate: 0.1\n")
    assert main(["finetune", "--config", str(bad_config), "--print-config"]) == 2
    assert "unknown config keys: learning_rate" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_the_embedded_default(tmp_path: Path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1"]) == 0
    summary = read_summary(out)
    baseline = json.loads((out / "baseline.json").read_text())
    assert summary.weights == "bundled" and summary.test_images == baseline["test_images"] == 288
    assert summary.test_acc > 0.5  # six classes: chance is 1/6
    printed = capsys.readouterr().out
    assert f"transfer learning, tf_efficientnet_lite0 (features): {summary.test_acc:.4f}" in printed
    assert f"classic baseline, SVC on raw pixels (C={baseline['settings']['C']:.3g}" in printed


def test_yaml_numbers_without_a_dot_are_read_as_numbers(tmp_path: Path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 1e-4\nepochs: '3'\n")  # YAML 1.1 reads 1e-4 as a string
    assert main(["finetune", "--config", str(config), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["lr"] == 1e-4 and printed["epochs"] == 3
    config.write_text("lr: fast\n")
    assert main(["finetune", "--config", str(config), "--print-config"]) == 2
    assert "config key lr: 'fast' is not a float" in capsys.readouterr().err
