"""Images that fail to load after the scan (truncated, or gone): training substitutes a random
loadable image of the split, trying and recording each failure once in all; extraction
and evaluation leave the image out with its label, record it and count it."""

import csv
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_colour_images
from PIL import Image
from torch.utils.data import DataLoader

from tlkit.data import datasets
from tlkit.data.augment import eval_transform
from tlkit.data.datamodule import ImageDataModule
from tlkit.data.datasets import ImageDataset, read_load_failures
from tlkit.data.images import load_rgb
from tlkit.infer.predict import evaluate
from tlkit.model.classifier import TransferClassifier
from tlkit.train.features import CachedFeatureDataModule
from tlkit.train.probe import probe_features


def numbered_images(folder: Path, classes: int, per_class: int) -> list[tuple[str, int]]:
    """`folder/<class>/<i>.png`, 4x4 grey images whose value is the sample's position: an image
    says which sample it is. Returns the samples in the scan's (class by class) order."""
    samples = []
    for label in range(classes):
        (folder / f"class{label}").mkdir(parents=True)
        for index in range(per_class):
            position = len(samples)
            path = folder / f"class{label}" / f"{index:03d}.png"
            Image.fromarray(np.full((4, 4), position, np.uint8)).save(path)
            samples.append((str(path), label))
    return samples


def counted_opens(monkeypatch) -> Counter[str]:
    """How often each file is opened by the datasets (of this process) from now on."""
    opened: Counter[str] = Counter()

    def counted(path, *arguments, **options):
        opened[path] += 1
        return load_rgb(path, *arguments, **options)

    monkeypatch.setattr(datasets, "load_rgb", counted)
    return opened


def untransformed(image: np.ndarray) -> dict[str, np.ndarray]:
    return {"image": image}


def sample_shown(image: np.ndarray) -> int:
    return int(image[0, 0, 0])


def test_files_that_vanish_together_are_opened_and_recorded_once(tmp_path: Path, monkeypatch):
    """200 of 225 files vanish: each is opened once and recorded once, not B(B+1)/2 times."""
    samples = numbered_images(tmp_path / "data", classes=9, per_class=25)
    for path, label in samples:
        if label < 8:
            Path(path).unlink()
    opened = counted_opens(monkeypatch)
    log = tmp_path / "load_failures.csv"
    dataset = ImageDataset(samples, untransformed, failure_log=log)
    for epoch in range(2):
        dataset.set_epoch(epoch)
        shown = [sample_shown(dataset[index][0]) for index in range(len(dataset))]
        assert all(samples[position][1] == 8 for position in shown)  # only class8 is left
    with open(log, newline="") as handle:
        rows = list(csv.reader(handle))
    assert len(rows) == 200 and len(read_load_failures(log)) == 200  # was 20,100 per epoch
    vanished = [path for path, label in samples if label < 8]
    assert [opened[path] for path in vanished] == [1] * 200  # never tried again


def test_a_workers_failures_are_known_to_the_main_process_and_later_epochs(
    tmp_path: Path, monkeypatch
):
    """A persistent data-loader worker meets the 200 vanished files in two epochs: 200 rows;
    then the main process (another process) opens none of them and records nothing more."""
    samples = numbered_images(tmp_path / "data", classes=9, per_class=25)
    vanished = {path for path, label in samples if label < 8}
    for path in vanished:
        Path(path).unlink()
    log = tmp_path / "load_failures.csv"
    dataset = ImageDataset(samples, untransformed, failure_log=log)
    loader = DataLoader(dataset, batch_size=25, num_workers=1, persistent_workers=True)
    for epoch in range(2):
        dataset.set_epoch(epoch)
        assert sum(len(labels) for _, labels in loader) == 225
    assert len(log.read_text().splitlines()) == 200
    opened = counted_opens(monkeypatch)  # in this process, after the worker's epochs
    assert len([dataset[index] for index in range(len(dataset))]) == 225
    assert not vanished & set(opened) and opened.total() == 225  # class8's files only
    assert len(log.read_text().splitlines()) == 200


class SeedableIdentity:
    """A transform with albumentations' `set_random_state` that returns the image unchanged."""

    def set_random_state(self, numpy_generator, python_generator) -> None:
        pass

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        return {"image": image}


def test_a_substitute_is_a_random_loadable_image_of_the_split_repeatable_per_epoch(
    tmp_path: Path,
):
    """The files of the middle class vanish: their places go to images of both other classes
    (not only the next one), the same ones for the same (seed, epoch, index)."""
    samples = numbered_images(tmp_path / "data", classes=3, per_class=20)
    for path, label in samples:
        if label == 1:
            Path(path).unlink()

    def substitutes(epoch: int, seed: int) -> list[int]:
        log = tmp_path / f"log-{seed}"
        dataset = ImageDataset(samples, SeedableIdentity(), failure_log=log, augmentation_seed=seed)
        dataset.set_epoch(epoch)
        return [sample_shown(dataset[index][0]) for index in range(20, 40)]

    first = substitutes(epoch=0, seed=0)
    labels = Counter(samples[position][1] for position in first)
    assert labels[0] >= 4 and labels[2] >= 4 and labels[1] == 0
    assert substitutes(epoch=0, seed=0) == first  # a new process draws the same
    assert substitutes(epoch=1, seed=0) != first  # another epoch, other substitutes
    assert substitutes(epoch=0, seed=1) != first


@pytest.fixture()
def folder_with_truncated_file(tmp_path: Path) -> tuple[Path, Path]:
    """3 colour classes of 6 images (24 px), and a truncated PNG in green: its header reads,
    its pixels do not, so `--verify header` and `none` let it through."""
    folder = tmp_path / "data"
    write_colour_images(folder, per_class=6, seed=0, size=24)
    truncated = folder / "green" / "truncated.png"
    encoded = (folder / "green" / "001.png").read_bytes()
    truncated.write_bytes(encoded[: len(encoded) // 2])
    return folder, truncated


@pytest.mark.parametrize("verify", ["header", "none"])
def test_extraction_leaves_an_unloadable_image_out_with_its_label(
    folder_with_truncated_file, tmp_path: Path, verify: str
):
    folder, truncated = folder_with_truncated_file
    model = TransferClassifier(3, pretrained="bundled", strategy="features", img_size=32)
    log = tmp_path / "load_failures.csv"
    images = ImageDataModule(
        folder,
        model.preprocessing,
        batch_size=4,
        num_workers=0,
        val_fraction=0.3,
        verify=verify,
        load_failure_log=log,
    )
    images.setup()
    split = "train" if str(truncated) in dict(images.train_set.samples) else "val"
    samples = getattr(images, f"{split}_set").samples
    good = [(path, label) for path, label in samples if path != str(truncated)]
    transform = eval_transform(model.preprocessing)
    with torch.no_grad():
        good_images = torch.stack([transform(image=load_rgb(path))["image"] for path, _ in good])
        expected = model.backbone.eval()(good_images)
    for attempt in ("extracted", "read back from the cache"):
        cache = CachedFeatureDataModule(model, images, tmp_path / "cache", progress=False)
        features, labels = cache.labelled_features(split)
        assert torch.allclose(features[0], expected, atol=1e-5), attempt
        assert labels.tolist() == [label for _, label in good], attempt
        assert cache.report[split]["skipped"] == 1 and cache.report[split]["reused"] == (
            attempt != "extracted"
        )
        assert [path for path, _ in read_load_failures(log)] == [str(truncated)]
        log.unlink()
    train_x, train_y, val_x, val_y = probe_features(model, images, tmp_path / "cache")
    assert (len(train_x), len(val_x)) == (len(train_y), len(val_y))
    assert len(train_x) + len(val_x) == len(images.train_set) + len(images.val_set) - 1


@pytest.mark.parametrize("verify", ["header", "none"])
def test_evaluate_leaves_an_unloadable_image_out_and_lists_it(
    tiny_run: Path, colour_folder: Path, tmp_path: Path, verify: str
):
    folder = tmp_path / "test"
    shutil.copytree(colour_folder / "test", folder)
    encoded = (folder / "green" / "001.png").read_bytes()
    (folder / "green" / "truncated.png").write_bytes(encoded[: len(encoded) // 2])
    clean = evaluate(tiny_run, colour_folder / "test", accelerator="cpu")
    result = evaluate(tiny_run, folder, accelerator="cpu", verify=verify)
    assert result["images"] == clean["images"] == 12
    assert result["confusion_matrix"] == clean["confusion_matrix"]
    assert result["skipped_files"] == 1
    [skipped] = result["skipped"]
    assert skipped["path"] == str(folder / "green" / "truncated.png")
    assert "failed to load" in skipped["reason"]
