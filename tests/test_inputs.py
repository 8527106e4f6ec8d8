"""Awkward inputs: CSV files as spreadsheets write them, hidden entries, and files that change
after the scan."""

import csv
import json
from pathlib import Path

import pytest
from conftest import TINY_CONFIG, write_colour_images
from PIL import Image
from pytorch_lightning.callbacks import Callback

from tlkit.config import FinetuneConfig
from tlkit.data.datamodule import ImageDataModule
from tlkit.data.sources import read_csv, scan_folder
from tlkit.errors import DatasetError
from tlkit.infer.predict import image_paths
from tlkit.runfolder import Preprocessing
from tlkit.train.finetune import finetune

PREPROCESSING = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.875)


@pytest.fixture
def csv_images(tmp_path: Path) -> Path:
    write_colour_images(tmp_path / "images", per_class=2, seed=0, size=8)
    return tmp_path


def write_csv(folder: Path, text: str, encoding: str = "utf-8") -> Path:
    path = folder / "labels.csv"
    path.write_text(text, encoding=encoding)
    return path


def test_csv_with_a_utf8_byte_order_mark_is_read(csv_images: Path):
    text = "path,label\nimages/red/000.jpg,red\nimages/blue/001.png,blue\n"
    result = read_csv(write_csv(csv_images, text, encoding="utf-8-sig"))  # Excel's "CSV UTF-8"
    assert result.classes == ["blue", "red"] and len(result.samples) == 2


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            ["images/red/000.jpg,red", "images/blue/000.jpg,blue", "images/red/000.jpg,red"],
            r"images/red/000.jpg is listed more than once: lines 2 and 4",
        ),
        (
            ["images/red/000.jpg,red", "./images/red/000.jpg,blue"],
            r"images/red/000.jpg is listed more than once: lines 2 and 3",
        ),
        (
            ["images/red/000.jpg,red", "images/blue/000.jpg"],
            r"line 3: expected 2 fields \(path,label\), found 1",
        ),
        (
            ["images/red/000.jpg,red,extra", "images/blue/000.jpg,blue"],
            r"line 2: expected 2 fields \(path,label\), found 3",
        ),
        (["images/red/000.jpg,red", ",blue"], r"line 3: empty path"),
        (["images/red/000.jpg,", "images/blue/000.jpg,blue"], r"line 2: empty label"),
    ],
)
def test_duplicate_and_malformed_csv_rows_are_errors_naming_the_line(
    csv_images: Path, rows: list[str], message: str
):
    path = write_csv(csv_images, "\n".join(["path,label", *rows]) + "\n")
    with pytest.raises(DatasetError, match=message):
        read_csv(path)


def add_hidden_entries(root: Path) -> None:
    """What notebooks, macOS and zip files leave behind, with images inside."""
    image = Image.new("RGB", (8, 8), (200, 40, 40))
    for folder in (".ipynb_checkpoints", "__MACOSX", ".cache", "red/.thumbnails", "red/__MACOSX"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        image.save(root / folder / "000.png")
    image.save(root / "red" / "._000.jpg", format="PNG")  # AppleDouble companion
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "red" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")


def test_hidden_entries_are_neither_classes_nor_images(tmp_path: Path):
    data = tmp_path / "data"
    write_colour_images(data / "train", per_class=3, seed=0, size=8)
    write_colour_images(data / "test", per_class=1, seed=1, size=8)
    add_hidden_entries(data)
    add_hidden_entries(data / "train")
    add_hidden_entries(data / "test")

    result = scan_folder(data / "train")
    assert result.classes == ["blue", "green", "red"]
    assert len(result.samples) == 9 and result.skipped == []
    assert result.other_files.counts() == ({}, {})  # hidden files are not even counted
    module = ImageDataModule(data, PREPROCESSING, num_workers=0, val_fraction=0.3)
    module.setup()
    assert module.classes == ["blue", "green", "red"] and module.skipped == []
    assert len(module.train_set) + len(module.val_set) == 9 and len(module.test_set) == 3
    found, _, other_files = image_paths([data / "test"])
    assert other_files.counts() == ({}, {})
    assert len(found) == 3 and not any("/." in path or "__MACOSX" in path for path in found)


class BreakFilesAfterTheScan(Callback):
    """Once the data is scanned, delete one training image and corrupt one validation image."""

    def __init__(self) -> None:
        self.broken: list[str] = []

    def on_fit_start(self, trainer, module) -> None:
        datamodule = trainer.datamodule
        deleted = datamodule.train_set.samples[0][0]
        corrupted = datamodule.val_set.samples[0][0]
        Path(deleted).unlink()
        Path(corrupted).write_bytes(b"no longer an image")
        self.broken = [deleted, corrupted]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_file_that_breaks_after_the_scan_is_skipped_recorded_and_the_run_finishes(
    tmp_path: Path, num_workers: int
):
    data = tmp_path / "data"
    write_colour_images(data, per_class=5, seed=0, size=16)
    config = FinetuneConfig(
        data_dir=str(data),
        out=str(tmp_path / "run"),
        epochs=2,
        **{**TINY_CONFIG, "num_workers": num_workers},
    )
    breaker = BreakFilesAfterTheScan()
    summary = finetune(config, callbacks=[breaker], enable_progress_bar=False)
    assert summary.epochs_run == 2
    assert summary.skipped_files == 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_files"] == 2
    with open(tmp_path / "run" / "skipped.csv", newline="") as handle:
        skipped = {row["path"]: row["reason"] for row in csv.DictReader(handle)}
    assert sorted(skipped) == sorted(breaker.broken)
    assert all("after the scan" in reason for reason in skipped.values())
