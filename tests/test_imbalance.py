"""Class imbalance: the balanced sampler (per process, per epoch), balanced class weights, the
monitored metric auto chooses and records, and one definition of balanced accuracy and macro-F1
for training and evaluate when the validation data lacks a class."""

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import write_colour_images
from test_auto import evidence

from tlkit.config import FinetuneConfig
from tlkit.data.datamodule import ImageDataModule
from tlkit.data.datasets import ClassBalancedSampler, EpochSampler, process_sampler
from tlkit.data.labels import class_balanced_weights
from tlkit.infer.predict import evaluate, load_model
from tlkit.model.tasks import TASKS
from tlkit.runfolder import read_data_facts, read_summary
from tlkit.train.auto import decide, log_decision
from tlkit.train.finetune import finetune


class Labelled:
    """A dataset of labels only, with the epoch the sampler passes on."""

    def __init__(self, labels: list[int]) -> None:
        self.samples = [(f"{index}.png", label) for index, label in enumerate(labels)]
        self.epochs: list[int] = []

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)


def test_the_balanced_sampler_draws_classes_equally_each_process_its_share():
    dataset = Labelled([0] * 90 + [1] * 10)
    weights = class_balanced_weights([label for _, label in dataset.samples], 2)
    drawn_per_epoch = []
    for epoch in range(4):
        shares = []
        for rank in (0, 1):
            sampler = process_sampler(dataset, True, 7, None, "balanced", weights)
            sampler.num_replicas, sampler.rank = 2, rank  # as Lightning's DDP shards it
            sampler.num_samples, sampler.total_size = 50, 100
            sampler.set_epoch(epoch)
            shares.append(list(sampler))
        assert [len(share) for share in shares] == [50, 50]
        drawn_per_epoch.append([index for pair in zip(*shares, strict=True) for index in pair])
    assert dataset.epochs[-1] == 3  # the epoch reaches the augmentation's seeding
    assert len({tuple(drawn) for drawn in drawn_per_epoch}) == 4  # a new draw every epoch
    labels = Counter(dataset.samples[index][1] for drawn in drawn_per_epoch for index in drawn)
    assert abs(labels[1] / 400 - 0.5) < 0.1  # 10% of the images, half of the draws
    again = ClassBalancedSampler(dataset, weights, num_replicas=1, rank=0, seed=7)
    again.set_epoch(2)
    alone = ClassBalancedSampler(dataset, weights, num_replicas=1, rank=0, seed=7)
    alone.set_epoch(2)
    assert list(again) == list(alone) and len(again) == 100  # seeded: the same draw
    assert isinstance(process_sampler(dataset, True, 7, None), EpochSampler)


def test_the_data_module_samples_training_images_by_class(colour_folder: Path):
    images = ImageDataModule(colour_folder, None, sampling="balanced", val_fraction=0.3)
    images.scan_splits()
    weights = images.sample_weights([(0,)] * 3 + [(1,)])
    assert weights == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])
    assert ImageDataModule(colour_folder, None).sample_weights([0, 1]) is None


def test_auto_chooses_and_records_the_monitored_metric_from_the_class_ratio(caplog):
    imbalanced = decide(evidence(class_ratio=10.0), ["strategy", "monitor"])
    assert imbalanced["monitor"].value == "balanced_acc"
    assert "imbalanced (10.0:1 > 3:1)" in imbalanced["monitor"].reason
    assert decide(evidence(class_ratio=2.0), ["monitor"])["monitor"].value == "acc"
    multi = decide(evidence(class_ratio=10.0, task="multi-label"), ["monitor"])
    assert multi["monitor"].value == "map"
    assert "monitor" not in decide(evidence(class_ratio=10.0), ["strategy"])  # given
    record = {
        "evidence": {**vars(evidence(class_ratio=10.0)), "sampled_files": 200},
        "choices": {name: vars(choice) for name, choice in imbalanced.items()},
        "given": [],
    }
    with caplog.at_level("INFO", logger="tlkit"):
        log_decision(record)
    assert "class ratio 10.0:1, single-label" in caplog.text
    assert "Auto choice: monitor = balanced_acc (training classes imbalanced" in caplog.text


@pytest.fixture(scope="module")
def imbalanced_run(tmp_path_factory) -> Path:
    """An auto run on train/ with 12 red, 3 green and 3 blue images (ratio 4:1) and val/
    without blue, with balanced class weights and sampling."""
    data = tmp_path_factory.mktemp("imbalanced")
    write_colour_images(data / "train", per_class=12, seed=0, size=32)
    for name in ("green", "blue"):
        for path in sorted((data / "train" / name).iterdir())[3:]:
            path.unlink()
    write_colour_images(data / "val", per_class=3, seed=1, size=32)
    shutil.rmtree(data / "val" / "blue")
    out = data / "run"
    config = FinetuneConfig(
        data_dir=str(data),
        out=str(out),
        pretrained="bundled",
        batch_size=4,
        num_workers=0,
        epochs=2,
        test_fraction=0.0,  # train/ keeps its 12:3:3 images
        class_weights="balanced",
        sampling="balanced",
    )
    finetune(config, enable_progress_bar=False)
    return out


def test_an_imbalanced_auto_run_records_the_ratio_and_monitors_balanced_accuracy(
    imbalanced_run: Path,
):
    decision = json.loads((imbalanced_run / "auto.json").read_text())
    assert decision["evidence"]["class_ratio"] == 4.0
    assert decision["choices"]["monitor"]["value"] == "balanced_acc"
    summary = read_summary(imbalanced_run)
    assert summary.monitor == "val_balanced_acc"
    assert summary.best_monitored == summary.best_val_metrics["val_balanced_acc"]
    assert yaml.safe_load((imbalanced_run / "config.yaml").read_text())["monitor"] == "balanced_acc"
    facts = read_data_facts(imbalanced_run)
    assert facts.images_per_class == {"train": [3, 3, 12], "val": [0, 3, 3]}
    assert facts.classes_without_images("val") == ["blue"]
    # the sources' sizes, from the scan: every training image's header, 32 px squares
    assert facts.sized_images == 18 and facts.source_short_side_median == 32
    assert decision["evidence"]["source_short_side_median"] == 32
    assert decision["evidence"]["sampled_files"] == 18
    expected = TASKS["single-label"].balanced_loss_weights([3, 3, 12], 18)
    assert load_model(imbalanced_run).hparams.loss_weights == pytest.approx(expected)


def test_training_and_evaluate_agree_on_a_validation_split_without_a_class(
    imbalanced_run: Path,
):
    result = evaluate(imbalanced_run, imbalanced_run.parent / "val")
    summary = read_summary(imbalanced_run)
    assert result["classes_without_images"] == ["blue"]
    assert result["per_class"]["blue"]["recall"] is None
    for name in ("balanced_accuracy", "macro_f1"):
        logged = {"balanced_accuracy": "val_balanced_acc", "macro_f1": "val_macro_f1"}[name]
        assert result[name] == pytest.approx(summary.best_val_metrics[logged], abs=1e-6)
    assert result["top1"] == pytest.approx(summary.best_val_acc, abs=1e-6)
