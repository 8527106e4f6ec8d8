"""Multi-label data end to end: a `path,labels` CSV trained, evaluated, predicted with its
thresholds, reported, exported and converted to shards."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_multilabel_csv

from tlkit.cli import main
from tlkit.commands.report import build_report
from tlkit.data.datamodule import ImageDataModule
from tlkit.data.shards import open_converted
from tlkit.errors import DatasetError
from tlkit.infer.export import load_exported
from tlkit.infer.predict import evaluate, load_model, predict
from tlkit.runfolder import read_data_facts, read_metrics, read_split, read_summary

CLASSES = ["blue", "green", "red"]
FLAGS = [
    "--pretrained",
    "bundled",
    "--img-size",
    "32",
    "--batch-size",
    "8",
    "--num-workers",
    "0",
    "--val-fraction",
    "0.3",
    "--seed",
    "0",
]


@pytest.fixture(scope="module")
def labels_csv(tmp_path_factory) -> Path:
    return write_multilabel_csv(tmp_path_factory.mktemp("multilabel"), images=60, seed=0)


@pytest.fixture(scope="module")
def run(labels_csv: Path, tmp_path_factory) -> Path:
    """A multi-label run: the head on cached features (quick), three epochs."""
    out = tmp_path_factory.mktemp("runs") / "multilabel"
    flags = [*FLAGS, "--strategy", "features", "--epochs", "3", "--lr", "0.01"]
    assert main(["finetune", str(labels_csv), "--out", str(out), *flags]) == 0
    return out


def csv_labels(labels_csv: Path) -> dict[str, set[str]]:
    with open(labels_csv, newline="") as handle:
        return {
            row["path"]: set(filter(None, row["labels"].split(";")))
            for row in csv.DictReader(handle)
        }


def test_a_labels_column_trains_a_multi_label_model(run: Path, labels_csv: Path):
    summary = read_summary(run)
    assert summary.task == "multi-label" and summary.monitor == "val_map"
    assert set(summary.best_val_metrics) >= {
        "val_map",
        "val_macro_f1",
        "val_micro_f1",
        "val_exact_match",
    }
    assert summary.best_val_acc is None and summary.test_acc is None
    assert list(summary.decision_thresholds) == CLASSES
    assert all(0 < value < 1 for value in summary.decision_thresholds.values())
    # --tta auto's choice counts images whose label set is exactly right, and says so
    assert summary.tta_choice["metric"] == "exact_match"
    assert "val_map" in read_metrics(run)[-1]
    facts = read_data_facts(run)
    assert facts.label_kind == "multi-label" and facts.classes == CLASSES
    truth = csv_labels(labels_csv)
    train = [path for path, split in read_split(run).items() if split == "train"]
    assert facts.images_per_class["train"] == [
        sum(name in truth[path] for path in train) for name in CLASSES
    ]
    split = list(read_split(run).values())
    assert facts.split_images == {name: split.count(name) for name in ("train", "val", "test")}
    assert sum(facts.split_images.values()) == 60
    # each sigmoid started at its label's rate in the training images
    started = torch.sigmoid(
        torch.tensor(yaml.safe_load((run / "hparams.yaml").read_text())["initial_bias"])
    )
    images = facts.split_images["train"]
    rates = [(count + 0.5) / (images + 1) for count in facts.images_per_class["train"]]
    assert started.tolist() == pytest.approx(rates)


def test_evaluate_repeats_the_best_epochs_validation_scores(run: Path, labels_csv: Path, tmp_path):
    """The same definitions and the same thresholds: training's validation scores of the best
    epoch are evaluate's on the validation images."""
    truth = csv_labels(labels_csv)
    val = [path for path, split in read_split(run).items() if split == "val"]
    rows = ["path,labels", *(f"{path},{';'.join(sorted(truth[path]))}" for path in val)]
    for path in val:
        shutil.copyfile(labels_csv.parent / path, tmp_path / path)
    (tmp_path / "val.csv").write_text("\n".join(rows) + "\n")
    result = evaluate(run, tmp_path / "val.csv")
    summary = read_summary(run)
    assert result["task"] == "multi-label" and result["images"] == len(val)
    assert result["thresholds"] == pytest.approx(summary.decision_thresholds)
    for name in ("map", "macro_f1", "micro_f1", "exact_match"):
        assert result[name] == pytest.approx(summary.best_val_metrics[f"val_{name}"], abs=1e-5)
    assert set(result["per_class"]["red"]) >= {"average_precision", "threshold", "f1", "support"}


def test_predict_gives_the_labels_at_their_thresholds_or_one_given(
    run: Path, labels_csv: Path, tiny_run: Path, capsys
):
    images = sorted(labels_csv.parent.glob("*.png"))[:6]
    model = load_model(run)
    with torch.no_grad():
        rows, _, _ = predict(run, images, top_k=3)
    thresholds = read_summary(run).decision_thresholds
    for row in rows:
        probabilities = {row[f"label_{rank}"]: row[f"prob_{rank}"] for rank in (1, 2, 3)}
        chosen = [
            name for name in CLASSES if probabilities[name] >= round(thresholds[name], 6) - 1e-6
        ]
        assert row["labels"].split(";") == (chosen or [""])
    everything, _, _ = predict(run, images, threshold=0.0)
    assert all(row["labels"] == "blue;green;red" for row in everything)
    nothing, _, _ = predict(run, images, threshold=1.0)
    assert all(row["labels"] == "" for row in nothing)
    assert model.task.name == "multi-label"
    assert main(["predict", str(run), str(images[0]), "--threshold", "0.3"]) == 0
    assert capsys.readouterr().out.startswith("path,labels,label_1,prob_1")
    assert main(["predict", str(tiny_run), str(images[0]), "--threshold", "0.3"]) == 2
    assert "--threshold applies to multi-label models" in capsys.readouterr().err


def test_the_report_shows_average_precision_and_both_kinds_of_mistakes(
    run: Path, labels_csv: Path, tmp_path
):
    report = build_report(run, labels_csv, out=tmp_path / "report", mistakes=4)
    evaluation = report.evaluation
    assert evaluation.mean_average_precision == pytest.approx(evaluate(run, labels_csv)["map"])
    assert [row.name for row in evaluation.per_class] == CLASSES
    page = report.page.read_text()
    for text in (
        "mAP",
        "exact match",
        "Per class, worst first",
        "Precision and recall",
        "Worst false positives",
        "Worst false negatives",
        "val_map",
    ):
        assert text in page, text
    names = {path.name for path in report.figures}
    assert {"learning_curves.png", "precision_recall.png"} <= names
    assert "confusion_matrix.png" not in names
    for mistake in evaluation.false_positives:
        assert mistake.class_name not in mistake.labels and mistake.probability >= mistake.threshold
    for mistake in evaluation.false_negatives:
        assert mistake.class_name in mistake.labels and mistake.probability < mistake.threshold
    losses = [mistake.loss for mistake in evaluation.false_positives]
    assert losses == sorted(losses, reverse=True)


@pytest.mark.parametrize("format", ["safetensors", "torchscript"])
def test_an_export_keeps_the_task_and_thresholds(run: Path, labels_csv: Path, tmp_path, format):
    out = tmp_path / format
    assert main(["export", str(run), "--format", format, "--out", str(out)]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["task"] == "multi-label" and "sigmoid" in card["output"]["semantics"]
    assert card["thresholds"] == pytest.approx(read_summary(run).decision_thresholds)
    exported, model = load_exported(out), load_model(run)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(
            exported.predict_batch(images), model.predict_batch(images), atol=1e-4
        )
    assert exported.task.name == "multi-label" and exported.thresholds == pytest.approx(
        model.thresholds
    )
    pictures = sorted(labels_csv.parent.glob("*.png"))[:4]
    from_export, _, _ = predict(out, pictures)
    from_run, _, _ = predict(run, pictures)
    assert [row["labels"] for row in from_export] == [row["labels"] for row in from_run]


def test_a_converted_multi_label_dataset_trains_and_evaluates(labels_csv: Path, tmp_path):
    shards = tmp_path / "shards"
    assert (
        main(["convert", str(labels_csv), str(shards), "--workers", "1", "--val-fraction", "0.3"])
        == 0
    )
    converted = open_converted(shards)
    assert converted.label_kind == "multi-label" and converted.classes == CLASSES
    truth = csv_labels(labels_csv)
    for path, label in converted.samples()["train"]:
        assert {CLASSES[index] for index in label} == truth[path]
    out = tmp_path / "run"
    flags = [*FLAGS, "--strategy", "partial", "--unfreeze-stages", "1", "--epochs", "1"]
    assert main(["finetune", str(shards), "--out", str(out), *flags]) == 0
    summary = read_summary(out)
    assert summary.task == "multi-label" and "val_map" in summary.best_val_metrics
    assert evaluate(out, shards / "val")["images"] == converted.counts["val"]


def test_the_task_decides_how_labels_are_read(labels_csv: Path, colour_folder: Path):
    single = ImageDataModule(colour_folder, None, task="multi-label")
    splits = single.scan_splits()
    assert single.label_kind == "multi-label"
    assert all(isinstance(label, tuple) and len(label) == 1 for _, label in splits["train"])
    with pytest.raises(DatasetError, match="labels; a single-label task needs exactly one"):
        ImageDataModule(labels_csv, None, task="single-label").scan_splits()
    both = labels_csv.parent / "both.csv"
    both.write_text("path,label,labels\n000.png,red,red\n")
    with pytest.raises(DatasetError, match="either 'label'"):
        ImageDataModule(both, None).scan_splits()
