"""The train/validation/test split: stable under added and removed files, recorded in
split.csv, and reused by --resume; the test estimate it gives a run."""

import csv
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import TINY_CONFIG, write_colour_images
from PIL import Image
from pytorch_lightning.callbacks import Callback

from tlkit.config import FinetuneConfig
from tlkit.data.datamodule import ImageDataModule
from tlkit.metrics import accuracy_interval
from tlkit.runfolder import Preprocessing, read_split, read_summary
from tlkit.train.finetune import finetune

PREPROCESSING = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.875)


def split_of(data: Path, seed: int = 0, val_fraction: float = 0.2) -> dict[str, set[str]]:
    """{"train": names, "val": names} of a fresh data module's split, names relative to data."""
    module = ImageDataModule(
        data, PREPROCESSING, num_workers=0, val_fraction=val_fraction, seed=seed
    )
    module.setup()
    return {
        split: {str(Path(path).relative_to(data)) for path, _ in dataset.samples}
        for split, dataset in (("train", module.train_set), ("val", module.val_set))
    }


def test_earlier_validation_images_are_never_trained_on_after_adding_or_removing_files(
    tmp_path: Path,
):
    data = tmp_path / "data"
    write_colour_images(data, per_class=30, seed=0, size=8)
    before = split_of(data)
    # Grow every class by a third: names that sort before, between and after the old ones.
    for colour in ("red", "green", "blue"):
        for index in range(10):
            image = Image.new("RGB", (8, 8), (index * 20, 0, 0))
            image.save(data / colour / f"{index:03d}b.png")
            image.save(data / colour / f"new{index}.png")
    grown = split_of(data)
    assert not before["val"] & grown["train"]
    assert before["val"] <= grown["val"]
    # Remove a third of the old images, validation images among them.
    removed = sorted(before["val"])[::2] + sorted(before["train"])[::3]
    for name in removed:
        (data / name).unlink()
    shrunk = split_of(data)
    assert not grown["val"] & shrunk["train"]
    assert grown["val"] - set(removed) == shrunk["val"]


def test_split_is_stratified_seeded_and_every_class_of_two_images_is_validated(tmp_path: Path):
    data = tmp_path / "data"
    write_colour_images(data, per_class=60, seed=0, size=8)
    (data / "tiny").mkdir()
    for index in range(2):  # a class of two images still gets one validation image
        Image.new("RGB", (8, 8)).save(data / "tiny" / f"{index}.png")
    split = split_of(data, val_fraction=0.2)
    for colour in ("red", "green", "blue"):
        held_out = [name for name in split["val"] if name.startswith(colour)]
        assert 6 <= len(held_out) <= 20  # about 12 of 60 (binomial, 20%)
    assert sum(name.startswith("tiny") for name in split["val"]) == 1
    assert sum(name.startswith("tiny") for name in split["train"]) == 1
    assert split_of(data, seed=0, val_fraction=0.2) == split
    assert split_of(data, seed=1, val_fraction=0.2) != split


class StopAfterFirstEpoch(Callback):
    def on_train_epoch_end(self, trainer, module) -> None:
        trainer.should_stop = True


def test_split_csv_is_written_and_resume_trains_on_the_recorded_split(tmp_path: Path, caplog):
    data = tmp_path / "data"
    write_colour_images(data / "train", per_class=6, seed=0, size=16)
    write_colour_images(data / "test", per_class=2, seed=1, size=16)
    config = FinetuneConfig(data_dir=str(data), out=str(tmp_path / "run"), epochs=2, **TINY_CONFIG)
    finetune(config, callbacks=[StopAfterFirstEpoch()], enable_progress_bar=False)
    out = Path(config.out)
    with open(out / "split.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "split"]
    recorded = {row["path"]: row["split"] for row in rows}
    assert len(recorded) == 24 and sorted(set(recorded.values())) == ["test", "train", "val"]
    assert all(not Path(path).is_absolute() and (data / path).is_file() for path in recorded)
    assert sum(split == "test" for split in recorded.values()) == 6
    assert read_split(out) == recorded

    # Between the runs: the recorded split is edited, one recorded image vanishes and one new
    # image appears. The resumed run trains on exactly the recorded split.
    moved = next(path for path, split in recorded.items() if split == "train")
    recorded[moved] = "val"
    vanished = next(path for path, split in recorded.items() if split == "train")
    (data / vanished).unlink()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(data / "train" / "red" / "new.png")
    with open(out / "split.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "split"])
        writer.writerows(recorded.items())
    caplog.clear()
    summary = finetune(config, resume=True, enable_progress_bar=False)
    counts = {split: sum(s == split for s in recorded.values()) for split in ("train", "val")}
    assert summary.train_images == counts["train"] - 1  # the vanished one
    assert summary.val_images == counts["val"]
    assert summary.skipped_files == 1
    with open(out / "skipped.csv", newline="") as handle:
        skipped = {row["path"]: row["reason"] for row in csv.DictReader(handle)}
    assert list(skipped) == [str(data / vanished)]
    assert "split.csv" in skipped[str(data / vanished)]
    assert "train/red/new.png" not in read_split(out)
    assert "1 image not in the recorded split" in caplog.text
    assert read_summary(out).resumed is True


def test_resume_without_a_recorded_split_is_a_clear_error(tmp_path: Path):
    data = tmp_path / "data"
    write_colour_images(data, per_class=4, seed=0, size=16)
    config = FinetuneConfig(data_dir=str(data), out=str(tmp_path / "run"), epochs=2, **TINY_CONFIG)
    finetune(config, callbacks=[StopAfterFirstEpoch()], enable_progress_bar=False)
    (Path(config.out) / "split.csv").unlink()
    with pytest.raises(FileNotFoundError, match="split.csv"):
        finetune(config, resume=True, enable_progress_bar=False)


def split_sides(data: Path, **options) -> dict[str, str]:
    """{name relative to data: train | val | test} of a fresh data module's split."""
    module = ImageDataModule(data, PREPROCESSING, num_workers=0, **options)
    module.setup()
    datasets = {"train": module.train_set, "val": module.val_set, "test": module.test_set}
    return {
        str(Path(path).relative_to(data)): split
        for split, dataset in datasets.items()
        if dataset is not None
        for path, _ in dataset.samples
    }


def test_a_folder_without_a_test_split_gets_one_stable_under_added_files(tmp_path: Path):
    data = tmp_path / "data"
    write_colour_images(data, per_class=20, seed=0, size=8)
    for size in (1, 2, 3):  # small classes: what each is guaranteed
        (data / f"small{size}").mkdir()
        for index in range(size):
            Image.new("RGB", (8, 8), (index, 0, 0)).save(data / f"small{size}" / f"{index}.png")
    before = split_sides(data, val_fraction=0.2, test_fraction=0.2)
    validation_only = split_sides(data, val_fraction=0.2, test_fraction=0)
    assert {name for name, side in validation_only.items() if side == "val"} == {
        name for name, side in before.items() if side == "val"
    }  # the test split leaves the validation split as it was
    assert "test" not in validation_only.values()

    def sides_of(split: dict[str, str], folder: str) -> list[str]:
        return sorted(side for name, side in split.items() if name.startswith(f"{folder}/"))

    for colour in ("red", "green", "blue"):
        tested = sides_of(before, colour).count("test")
        assert 1 <= tested <= 10  # about 4 of 20 (binomial, 20%)
    assert sides_of(before, "small3") == ["test", "train", "val"]
    assert sides_of(before, "small2") == ["train", "val"]
    assert sides_of(before, "small1") == ["train"]

    # Grow the large classes by half: no earlier file changes side.
    for colour in ("red", "green", "blue"):
        for index in range(10):
            Image.new("RGB", (8, 8), (index * 20, 0, 0)).save(data / colour / f"new{index}.png")
    grown = split_sides(data, val_fraction=0.2, test_fraction=0.2)
    assert {name: grown[name] for name in before} == before
    assert len(grown) == len(before) + 30


def test_given_folders_win_and_the_missing_splits_are_held_out(tmp_path: Path):
    data = tmp_path / "data"
    write_colour_images(data / "train", per_class=10, seed=0, size=8)
    carved = split_sides(data)  # train/ alone: validation and test held out of it
    assert set(carved.values()) == {"train", "val", "test"}
    write_colour_images(data / "val", per_class=2, seed=1, size=8)
    with_val = split_sides(data)  # train/ + val/: test held out of train/
    assert {name for name, side in with_val.items() if side == "val"} == {
        name for name in with_val if name.startswith("val/")
    }
    assert {name for name, side in with_val.items() if side == "test"} and all(
        name.startswith("train/") for name, side in with_val.items() if side == "test"
    )
    write_colour_images(data / "test", per_class=2, seed=2, size=8)
    given = split_sides(data)  # train/ + val/ + test/: nothing held out
    assert all(name.startswith(f"{side}/") for name, side in given.items())
    shutil.rmtree(data / "val")
    with_test = split_sides(data)  # train/ + test/: validation held out of train/, as before
    assert {name for name, side in with_test.items() if side == "test"} == {
        name for name in with_test if name.startswith("test/")
    }
    assert "val" in with_test.values()


def test_the_run_reports_its_test_estimate_or_says_what_its_number_is(tmp_path: Path, caplog):
    data = tmp_path / "data"
    write_colour_images(data, per_class=8, seed=0, size=16)
    tested = FinetuneConfig(
        data_dir=str(data), out=str(tmp_path / "tested"), epochs=1, **TINY_CONFIG
    )
    with caplog.at_level(logging.INFO, logger="tlkit"):
        summary = finetune(tested, enable_progress_bar=False)
    recorded = read_split(Path(tested.out))
    assert summary.test_images == sum(side == "test" for side in recorded.values()) >= 3
    written = json.loads((Path(tested.out) / "summary.json").read_text())
    assert written["test_images"] == summary.test_images
    low, high = written["test_acc_interval"]
    assert [low, high] == [
        round(bound, 4) for bound in accuracy_interval(summary.test_acc, summary.test_images)
    ]
    final = caplog.records[-1].getMessage()
    assert f"test {summary.test_acc:.4f} on {summary.test_images} held-out images" in final
    assert f"95% interval {low:.3f}-{high:.3f}" in final

    caplog.clear()
    untested = replace(tested, out=str(tmp_path / "untested"), test_fraction=0.0)
    with caplog.at_level(logging.INFO, logger="tlkit"):
        summary = finetune(untested, enable_progress_bar=False)
    assert summary.test_images == 0 and summary.test_acc is None
    assert summary.test_acc_interval is None
    assert "test" not in read_split(Path(untested.out)).values()
    final = caplog.records[-1].getMessage()
    assert final.startswith(f"Best val {summary.best_val_acc:.4f} at epoch")
    assert "no test split, so this validation score is the only estimate" in final
    assert "the same images chose the checkpoint" in final and "--test-fraction" in final
