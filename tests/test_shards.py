"""Converted datasets (`tlkit convert`, LitData shards): the conversion, and every command
reading them as it reads a folder."""

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY_CONFIG, write_colour_images
from ddp_probe import RecordBatches, fingerprint
from litdata import StreamingDataset

from tlkit.cli import main
from tlkit.commands.report import build_report
from tlkit.commands.sanity import subset_loader
from tlkit.config import FinetuneConfig
from tlkit.data import shards
from tlkit.data.augment import eval_transform
from tlkit.data.datamodule import ImageDataModule
from tlkit.data.datasets import ImageDataset
from tlkit.data.shards import MARKER, ShardDataModule, convert, labelled_split, open_converted
from tlkit.errors import DatasetError, OutputExistsError
from tlkit.infer.predict import evaluate, predict
from tlkit.model.backbones import preprocessing
from tlkit.runfolder import read_split, read_summary
from tlkit.train.build import augmentation_options, build_datamodule, build_model
from tlkit.train.features import CachedFeatureDataModule, extract
from tlkit.train.finetune import finetune

# As tiny_run (conftest.TINY_RUN_FLAGS) trains on the colour folder.
RUN_CONFIG = {
    **TINY_CONFIG,
    "epochs": 2,
    "seed": 0,
    "strategy": "partial",
    "unfreeze_stages": 1,
    "lr": 3e-3,
}
# One batch of all 20 training images per epoch and no dropout: runs that see the same augmented
# images in another order train alike.
FULL_BATCH = dict(RUN_CONFIG, batch_size=32, dropout=0.0, lr=1e-2, warmup_epochs=0.0)


@pytest.fixture(scope="module")
def converted(colour_folder: Path, tmp_path_factory) -> Path:
    """The colour folder (train/ split 70/30 into train and val, test/) converted."""
    out = tmp_path_factory.mktemp("converted") / "colours"
    convert(colour_folder, out, workers=1, val_fraction=0.3, seed=0, progress=False)
    return out


def test_conversion_keeps_the_folder_runs_classes_split_and_bytes(
    converted: Path, colour_folder: Path, tiny_run: Path
):
    dataset = open_converted(converted)
    folder = ImageDataModule(colour_folder, None, val_fraction=0.3, seed=0)
    scanned = folder.scan_splits()
    assert dataset.classes == folder.classes == ["blue", "green", "red"]
    assert dataset.counts == {split: len(samples) for split, samples in scanned.items()}
    with open(converted / "split.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["path"]: row["split"] for row in rows} == read_split(tiny_run)
    # Sample i of a split's shards is row i of that split in split.csv, with the file's bytes.
    train = [row for row in rows if row["split"] == "train"]
    stored = StreamingDataset(str(converted / "train"))
    assert len(stored) == len(train) == 20
    for position, row in enumerate(train):
        sample = stored[position]
        assert sample["path"] == row["path"]
        assert dataset.classes[sample["label"]] == row["label"] == Path(row["path"]).parent.name
        assert sample["image"] == (colour_folder / row["path"]).read_bytes()
    with pytest.raises(OutputExistsError, match="already holds a converted dataset"):
        convert(colour_folder, converted, progress=False)


def test_a_one_folder_conversion_holds_out_the_same_test_split(tmp_path: Path, caplog):
    data = tmp_path / "data"
    write_colour_images(data, per_class=5, seed=0, size=8)
    (data / "red" / "about.txt").write_text("not an image")
    out = tmp_path / "converted"
    dataset = convert(data, out, workers=1, progress=False)
    folder = ImageDataModule(data, None).scan_splits()
    assert dataset.counts == {split: len(samples) for split, samples in folder.items()}
    assert dataset.counts["test"] >= 3  # one per class at least
    assert dataset.metadata["test_fraction"] == 0.1
    assert (dataset.metadata["ignored_files"], dataset.metadata["unread_images"]) == (
        {".txt": 1},
        {},
    )
    images = ShardDataModule(out, None, test_fraction=0.2)
    with caplog.at_level("INFO", logger="tlkit"):
        assert images.scan_splits() == dataset.samples()
    assert "split fixed by tlkit convert is used (seed 0, val fraction 0.1, test fraction 0.1)" in (
        caplog.text
    )
    assert images.other_files.counts() == ({".txt": 1}, {})
    # A marker written before tlkit held out test splits has no test fraction: read as 0.
    marker = json.loads((out / MARKER).read_text())
    del marker["test_fraction"], marker["ignored_files"], marker["unread_images"]
    (out / MARKER).write_text(json.dumps(marker))
    caplog.clear()
    older = ShardDataModule(out, None, test_fraction=0.0)
    with caplog.at_level("INFO", logger="tlkit"):
        older.scan_splits()
    assert "split fixed by tlkit convert" not in caplog.text
    assert older.other_files.counts() == ({}, {})


def test_an_interrupted_conversion_never_looks_complete(
    colour_folder: Path, tmp_path: Path, monkeypatch, capsys
):
    out = tmp_path / "out"

    def interrupted(fn, inputs, output_dir, **options):
        Path(output_dir).mkdir(parents=True)
        (Path(output_dir) / "chunk-0-0.bin").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(shards.litdata, "optimize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(colour_folder, out, progress=False)
    assert (out / "train").is_dir() and not (out / MARKER).exists()
    with pytest.raises(DatasetError, match="interrupted `tlkit convert`"):
        open_converted(out)
    assert main(["finetune", str(out), "--out", str(tmp_path / "run")]) == 2
    assert "run tlkit convert again" in capsys.readouterr().err

    def completes(fn, inputs, output_dir, **options):  # a stand-in writer: index.json only
        Path(output_dir).mkdir(parents=True)
        index = {"chunks": [{"chunk_size": len(inputs)}]}
        (Path(output_dir) / "index.json").write_text(json.dumps(index))

    monkeypatch.setattr(shards.litdata, "optimize", completes)
    convert(colour_folder, out, progress=False)  # an interrupted conversion is redone
    assert open_converted(out).counts["test"] == 12
    assert not (out / "train" / "chunk-0-0.bin").exists()
    (tmp_path / "other" / "notes.txt").parent.mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not empty"):
        convert(colour_folder, tmp_path / "other", progress=False)


def test_shards_give_the_folders_augmentation(converted: Path, colour_folder: Path):
    """Image for image, the same augmented tensors as ImageDataset (same seed and epoch)."""
    config = FinetuneConfig(data_dir=str(converted), **RUN_CONFIG)
    from_shards = build_datamodule(config)
    assert isinstance(from_shards, ShardDataModule)
    from_shards.setup()
    from_folder = build_datamodule(dataclasses.replace(config, data_dir=str(colour_folder)))
    from_folder.setup()
    position_in_folder = {
        os.path.relpath(path, colour_folder): index
        for index, (path, _) in enumerate(from_folder.train_set.samples)
    }
    for epoch in (0, 1):
        from_shards.train_set.set_epoch(epoch)
        from_folder.train_set.set_epoch(epoch)
        for position in (0, 7):
            image, label = from_shards.train_set[position]
            relative = from_shards.train_set.samples[position][0]
            expected = from_folder.train_set[position_in_folder[relative]]
            assert label == expected[1] and torch.equal(image, expected[0])
    # the sanity checks' subsets read the same images from shards as from files
    subset = from_shards.train_set.samples[:3]
    files = [(str(colour_folder / path), label) for path, label in subset]
    pre = from_shards.preprocessing
    shard_batch = next(iter(subset_loader(subset, pre, 8, source=from_shards.train_set)))
    file_batch = next(iter(subset_loader(files, pre, 8)))
    assert torch.equal(shard_batch[0], file_batch[0])


class StopAfterFirstEpoch(pl.Callback):
    """Ends training at the first epoch's end, after its last.ckpt: an interrupted run."""

    def on_train_epoch_end(self, trainer, module) -> None:
        trainer.should_stop = True


def uninterrupted_order(config: FinetuneConfig, epochs: int) -> list[list[str]]:
    """What the shard loader yields epoch by epoch when nothing interrupts it."""
    data = ShardDataModule(
        config.data_dir,
        preprocessing(config.backbone, config.img_size),
        batch_size=config.batch_size,
        num_workers=0,
        seed=config.seed,
        augmentation=augmentation_options(config),
    )
    data.setup()
    loader = data.train_dataloader()
    return [[fingerprint(image) for images, _ in loader for image in images] for _ in range(epochs)]


@pytest.fixture(scope="module")
def resumed_shard_run(converted: Path, tmp_path_factory) -> tuple[Path, list[list[str]]]:
    """A shard run stopped after its first epoch and resumed; the images each part trained on."""
    out = tmp_path_factory.mktemp("shard-runs") / "resumed"
    probe = tmp_path_factory.mktemp("probe")
    config = FinetuneConfig(data_dir=str(converted), out=str(out), **FULL_BATCH)
    first, second = RecordBatches(probe), RecordBatches(probe)
    options = {"enable_progress_bar": False, "limit_test_batches": 0}
    finetune(config, callbacks=[first, StopAfterFirstEpoch()], **options)
    finetune(config, resume=True, callbacks=[second], **options)
    return out, first.train_images + second.train_images


def test_a_resumed_shard_run_sees_the_uninterrupted_order(resumed_shard_run, converted: Path):
    out, trained = resumed_shard_run
    expected = uninterrupted_order(FinetuneConfig.from_yaml(out / "config.yaml"), 2)
    assert trained == expected
    assert read_summary(out).resumed and read_summary(out).epochs_run == 2
    assert len(trained[1]) == 20
    assert trained[0] != trained[1]  # reshuffled and augmented anew every epoch


def test_shard_and_folder_runs_agree(resumed_shard_run, colour_folder: Path, tmp_path: Path):
    """The interrupted and resumed shard run trains as an uninterrupted folder run: the same
    augmented images in another order, in one batch."""
    out, _ = resumed_shard_run
    config = FinetuneConfig(data_dir=str(colour_folder), out=str(tmp_path / "folder"), **FULL_BATCH)
    folder_run = finetune(config, enable_progress_bar=False, limit_test_batches=0)
    shard_run = read_summary(out)
    assert read_split(out) == read_split(tmp_path / "folder")
    for shard_epoch, folder_epoch in zip(shard_run.history, folder_run.history, strict=True):
        assert shard_epoch["val_acc"] == folder_epoch["val_acc"]
        # equal but for the order of floating-point sums over the batch
        assert shard_epoch["val_loss"] == pytest.approx(folder_epoch["val_loss"], rel=1e-4)


def test_the_feature_cache_reads_shards(converted: Path, colour_folder: Path, tmp_path: Path):
    """Features cached from shards (keyed by the shards' index, not file times) equal those
    of the image files, and are found again."""
    config = FinetuneConfig(**dict(RUN_CONFIG, strategy="features", data_dir=str(converted)))
    images = build_datamodule(config)
    images.setup()
    model = build_model(config, images.classes)
    reused = []
    for _ in range(2):
        cached = CachedFeatureDataModule(model, images, tmp_path, progress=False)
        cached.setup()
        reused.append(cached.report["val"]["reused"])
    assert reused == [False, True]
    files = [(str(colour_folder / path), label) for path, label in images.val_set.samples]
    dataset = ImageDataset(files, eval_transform(images.preprocessing))
    from_files = extract(model.backbone, dataset, 8, torch.device("cpu"), 0, progress=False)
    assert torch.allclose(cached.splits["val"].tensors[0], from_files, atol=1e-6)


def test_evaluate_predict_and_report_read_converted_splits(
    converted: Path, tiny_run: Path, resumed_shard_run
):
    from_shards = evaluate(tiny_run, converted / "test", accelerator="cpu")
    # the run's own test evaluation, from the image files
    assert from_shards["images"] == read_summary(tiny_run).test_images == 12
    assert from_shards["top1"] == pytest.approx(read_summary(tiny_run).test_acc)
    assert labelled_split(converted)[1] == labelled_split(converted / "test")[1] == "test"

    rows, skipped, _ = predict(tiny_run, [converted / "test"], accelerator="cpu")
    test_paths = {path for path, split in read_split(tiny_run).items() if split == "test"}
    assert not skipped and {row["path"] for row in rows} == test_paths

    out, _ = resumed_shard_run
    report = build_report(out, accelerator="cpu")  # its data: the converted test split
    assert report.evaluation.images == 12 and report.page.is_file()


@pytest.fixture(scope="module")
def converted_for_ddp(tmp_path_factory) -> Path:
    """train/ 24 images (3 whole batches of 4 per process), val/ 3 (not a multiple of 2), no
    test split held out of train/."""
    root = tmp_path_factory.mktemp("ddp-data")
    write_colour_images(root / "train", per_class=8, seed=2, size=32)
    write_colour_images(root / "val", per_class=1, seed=3, size=32)
    out = root / "converted"
    convert(root, out, workers=1, test_fraction=0.0, progress=False)
    return out


@pytest.mark.slow
def test_two_process_ddp_over_shards_reads_each_image_once(converted_for_ddp: Path, tmp_path: Path):
    """torchrun, 2 processes x 2 loader workers: every epoch the processes train on disjoint
    shares that together are all 24 images; validation counts its 3 images once; the Trainer's
    step estimate is per process."""
    out, probe = tmp_path / "run", tmp_path / "probe"
    config = FinetuneConfig(
        data_dir=str(converted_for_ddp),
        out=str(out),
        pretrained="bundled",
        img_size=32,
        batch_size=4,
        num_workers=2,
        epochs=2,
        patience=9,
        augment=False,  # each image then has one tensor, and so one fingerprint
        strategy="partial",
        unfreeze_stages=1,
        accelerator="cpu",
        devices="2",
        dist_strategy="ddp",
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    result = subprocess.run(
        [*torchrun, "--nproc-per-node", "2", str(Path(__file__).with_name("ddp_probe.py"))]
        + [json.dumps(dataclasses.asdict(config)), str(probe)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((probe / f"rank{rank}.json").read_text()) for rank in (0, 1)]

    train = ShardDataModule(converted_for_ddp, preprocessing("tf_efficientnet_lite0", 32))
    train.setup()
    every_image = {
        fingerprint(image)
        for image, _ in train.train_set.with_transform(eval_transform(train.preprocessing))
    }
    assert len(every_image) == 24
    for epoch in (0, 1):
        seen = [ranks[rank]["train_images"][epoch] for rank in (0, 1)]
        assert len(seen[0]) == len(seen[1]) == 12
        assert set(seen[0]).isdisjoint(seen[1]) and set(seen[0]) | set(seen[1]) == every_image
    assert ranks[0]["train_images"][0] != ranks[0]["train_images"][1]  # reshuffled
    assert [rank["estimated_steps"] for rank in ranks] == [2 * 3, 2 * 3]
    validated = [rank["val_images"] for rank in ranks]  # per epoch
    assert [a + b for a, b in zip(*validated, strict=True)] == [3, 3]
    assert read_summary(out).val_images == 3
