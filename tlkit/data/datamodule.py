"""The LightningDataModule of an image folder or CSV: scan, split, datasets and loaders."""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.data import DataLoader

from tlkit.config import FinetuneConfig
from tlkit.data.augment import eval_transform, train_transform
from tlkit.data.datasets import (
    ImageDataset,
    LabelledImages,
    default_num_workers,
    drops_last_batch,
    process_sampler,
    read_load_failures,
    worker_start_context,
)
from tlkit.data.labels import (
    LABEL_KINDS,
    BatchCollator,
    Label,
    class_balanced_weights,
    class_counts,
    resolve_label_kind,
)
from tlkit.data.sources import OtherFiles, ScanResult, data_root, relative_path, scan
from tlkit.data.split import split_samples
from tlkit.errors import DatasetError
from tlkit.runfolder import DataFacts, Preprocessing

_default = FinetuneConfig.field_default
logger = logging.getLogger(__name__)


@rank_zero_only
def _tell(message: str) -> None:
    logger.warning(message)


class BaseImageDataModule(pl.LightningDataModule):
    """Train/validation/test loaders of labelled images with the backbone's transforms: what
    every source shares. `ImageDataModule` (image folders and CSVs) and
    `shards.ShardDataModule` (converted datasets) differ only in how they list the samples of
    each split (`scan_splits`) and read them (`images`).

    `augmentation` holds keyword arguments of `augment.train_transform` (scale range, flip,
    jitter); `augment=False` trains on the evaluation transform. `val_fraction` and
    `test_fraction` are the shares of the images held out where the data has no such split of
    its own (`split.split_samples`). `task` says how the labels are read (`auto`: as the data
    is labelled; `labels.LABEL_KINDS`), `sampling` how the training images are drawn
    (`datasets.TRAINING_SAMPLERS`). `classes`, `label_kind`, `skipped` (unusable image files,
    with the reason), `other_files` (files not read, counted), the datasets and `data_facts()`
    are available after `setup()`. `recorded_split` ({path relative to the data root: train |
    val | test}, a run's split.csv) is the split a resumed run must train on. With
    `load_failure_log`, images that fail to load during training are recorded there
    (`load_failures()`) and skipped instead of stopping the run.
    """

    def __init__(
        self,
        data_dir: str | Path,
        preprocessing: Preprocessing | None,
        batch_size: int = _default("batch_size"),
        num_workers: int = _default("num_workers"),
        val_fraction: float = _default("val_fraction"),
        test_fraction: float = _default("test_fraction"),
        seed: int = _default("seed"),
        augment: bool = _default("augment"),
        augmentation: dict | None = None,
        max_image_pixels: int = _default("max_image_pixels"),
        recorded_split: dict[str, str] | None = None,
        load_failure_log: str | Path | None = None,
        task: str = _default("task"),
        sampling: str = _default("sampling"),
    ) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.preprocessing = preprocessing
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers < 0 else num_workers
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.augment = augment
        self.augmentation = augmentation or {}
        self.max_image_pixels = max_image_pixels
        self.recorded_split = recorded_split
        self.load_failure_log = Path(load_failure_log) if load_failure_log else None
        self.task = task
        self.sampling = sampling
        self.classes: list[str] = []
        self.label_kind = "single-label"
        self.skipped: list[tuple[str, str]] = []
        self.other_files = OtherFiles()
        # (width, height) as stored, by sample path, of the images whose size the scan read
        # (none with --verify none): free evidence of the sources' sizes for --strategy auto
        self.image_sizes: dict[str, tuple[int, int]] = {}
        self.train_set: LabelledImages | None = None
        self.val_set: LabelledImages | None = None
        self.test_set: LabelledImages | None = None

    def scan_splits(self) -> dict[str, list[tuple[str, Label]]]:
        """The `(path, label)` samples of train, val and (where there is one) test; sets
        `classes`, `label_kind`, `skipped`, `other_files` and `image_sizes`."""
        raise NotImplementedError

    def read_as_task(
        self, splits: dict[str, list[tuple[str, Label]]], found: str
    ) -> dict[str, list[tuple[str, Label]]]:
        """The samples with labels of the task's kind (`found`: the data's own); sets
        `label_kind`."""
        self.label_kind = resolve_label_kind(self.task, found, str(self.data_dir))
        if self.label_kind == found:
            return splits
        kind = LABEL_KINDS[self.label_kind]
        return {name: kind.convert(samples, str(self.data_dir)) for name, samples in splits.items()}

    def images(
        self,
        split: str,
        samples: list[tuple[str, Label]],
        transform,
        augmentation_seed: int | None = None,
    ) -> LabelledImages:
        """The dataset of one split's samples, with `transform`."""
        raise NotImplementedError

    def relative_path(self, path: str) -> str:
        """A sample's path as split.csv records it: relative to the data root."""
        return path

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        splits = self.scan_splits()
        evaluation = eval_transform(self.preprocessing)
        if self.augment:
            augmentation = train_transform(self.preprocessing, **self.augmentation)
            self.train_set = self.images("train", splits["train"], augmentation, self.seed)
        else:
            self.train_set = self.images("train", splits["train"], evaluation)
        self.val_set = self.images("val", splits["val"], evaluation)
        if splits.get("test"):
            self.test_set = self.images("test", splits["test"], evaluation)

    def split_rows(self) -> list[tuple[str, str]]:
        """(path relative to the data root, train | val | test) of every image used: split.csv."""
        datasets = {"train": self.train_set, "val": self.val_set, "test": self.test_set}
        return [
            (self.relative_path(path), split)
            for split, dataset in datasets.items()
            if dataset is not None
            for path, _ in dataset.samples
        ]

    def load_failures(self) -> list[tuple[str, str]]:
        """`(path, reason)` of the images that failed to load during training, each once."""
        return read_load_failures(self.load_failure_log) if self.load_failure_log else []

    def data_facts(self, trained_with_hflip: bool) -> DataFacts:
        """What the scanned data says (after `setup`): classes, label kind, images per split
        and per class, the training images' sizes as the scan read them; `trained_with_hflip`:
        whether training shows mirror images."""
        datasets = {"train": self.train_set, "val": self.val_set, "test": self.test_set}
        present = {split: data for split, data in datasets.items() if data is not None}
        sizes = [self.image_sizes.get(path) for path, _ in self.train_set.samples]
        sizes = [size for size in sizes if size]
        return DataFacts(
            classes=list(self.classes),
            label_kind=self.label_kind,
            split_images={split: len(data) for split, data in present.items()},
            images_per_class={
                split: class_counts([label for _, label in data.samples], len(self.classes))
                for split, data in present.items()
            },
            trained_with_hflip=trained_with_hflip,
            source_short_side_median=(
                float(statistics.median(min(size) for size in sizes)) if sizes else None
            ),
            sized_images=len(sizes),
        )

    def collator(self) -> BatchCollator:
        """The loaders' `collate_fn`: images and their labels as the task's targets."""
        return BatchCollator(self.label_kind, len(self.classes))

    def targets(self, labels: list[Label]) -> torch.Tensor:
        """Labels as the loss takes them: class indices, or multi-label 0/1 rows."""
        return LABEL_KINDS[self.label_kind].collate(labels, len(self.classes))

    def sample_weights(self, labels: list[Label]) -> list[float] | None:
        """Per training image, its weight for the balanced sampler (None when shuffling)."""
        if self.sampling == "shuffle":
            return None
        return class_balanced_weights(labels, len(self.classes))

    def _loader(self, dataset: LabelledImages, train: bool) -> DataLoader:
        weights = self.sample_weights([label for _, label in dataset.samples]) if train else None
        sampler = process_sampler(dataset, train, self.seed, self.trainer, self.sampling, weights)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=train and drops_last_batch(len(sampler), self.batch_size),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            multiprocessing_context=worker_start_context(self.num_workers),
            pin_memory=torch.cuda.is_available(),
            collate_fn=self.collator(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            raise DatasetError(f"{self.data_dir}: no test split")
        return self._loader(self.test_set, train=False)


class ImageDataModule(BaseImageDataModule):
    """The data module of an image folder or CSV (see `sources` for the layouts): scanned
    with `verify` and the scan index in `scan_cache`, split stably (`split.split_samples`):
    of a layout without `val/` or `test/` folders, `val_fraction` and `test_fraction` of the
    training images are held out (a given folder is used instead; `test_fraction` 0 holds out
    no test split).
    `preprocessing` may be None where only `scan_splits()` is used (`tlkit convert`).

    A `recorded_split` replaces the computed split: recorded images that are gone are
    skipped, and images not in it are left out, so a resumed run trains and validates on
    exactly the images it started with. The other options are `BaseImageDataModule`'s.
    """

    def __init__(
        self,
        data_dir: str | Path,
        preprocessing: Preprocessing | None,
        verify: str = _default("verify"),
        scan_cache: str = _default("scan_cache"),
        csv_paths_outside_root: bool = _default("csv_paths_outside_root"),
        **options,
    ) -> None:
        super().__init__(Path(data_dir), preprocessing, **options)
        self.verify = verify
        self.scan_cache = scan_cache
        self.csv_paths_outside_root = csv_paths_outside_root
        self.root = data_root(self.data_dir)

    def images(
        self,
        split: str,
        samples: list[tuple[str, Label]],
        transform,
        augmentation_seed: int | None = None,
    ) -> ImageDataset:
        return ImageDataset(
            samples, transform, self.max_image_pixels, augmentation_seed, self.load_failure_log
        )

    def relative_path(self, path: str) -> str:
        return relative_path(path, self.root)

    def scan_splits(self) -> dict[str, list[tuple[str, Label]]]:
        """Scan the data and split it: the `(path, label)` samples of train, val and test
        (empty with `test_fraction` 0 and no test/ folder, or classes too small to hold one
        out). Sets `classes`, `label_kind`, `skipped` and `other_files`. `setup` builds the
        datasets from it; `tlkit convert` writes it into shards (and needs no
        `preprocessing`)."""
        split_dir = self.data_dir / "train"
        train_scan = self._scan(split_dir if split_dir.is_dir() else self.data_dir)
        self.classes = train_scan.classes
        if len(self.classes) < 2:
            raise DatasetError(
                f"{self.data_dir}: found one class ({self.classes[0]}); a classifier needs two"
            )
        self.skipped = list(train_scan.skipped)
        self.image_sizes = dict(train_scan.image_sizes)
        self.other_files = OtherFiles()
        self.other_files.update(train_scan.other_files)
        given = {
            split: self._scan_split(self.data_dir / split).samples
            for split in ("val", "test")
            if split_dir.is_dir() and (self.data_dir / split).is_dir()
        }
        fractions = {"val": self.val_fraction, "test": self.test_fraction}
        held_out = {
            split: fraction
            for split, fraction in fractions.items()
            if split not in given and fraction > 0
        }
        splits = split_samples(train_scan.samples, held_out, self.seed, self.root)
        splits = {"train": splits["train"], "val": [], "test": [], **splits, **given}
        if self.recorded_split is not None:
            splits = self._follow_recorded_split(splits, self.recorded_split)
        return self.read_as_task(splits, train_scan.label_kind)

    def _follow_recorded_split(
        self, scanned: dict[str, list[tuple[str, Label]]], recorded: dict[str, str]
    ) -> dict[str, list[tuple[str, Label]]]:
        """The scanned samples regrouped as `recorded` says; recorded files no longer found
        are added to `skipped`, files found but not recorded are left out (and counted)."""
        by_path = {
            self.relative_path(path): (path, label)
            for samples in scanned.values()
            for path, label in samples
        }
        already_skipped = {self.relative_path(path) for path, _ in self.skipped}
        splits: dict[str, list[tuple[str, Label]]] = {"train": [], "val": [], "test": []}
        for relative, split in recorded.items():
            if relative in by_path:
                splits[split].append(by_path[relative])
            elif relative not in already_skipped:
                reason = "in the run's recorded split.csv but no longer found"
                self.skipped.append((str(self.root / relative), reason))
        left_out = len(by_path.keys() - recorded.keys())
        if left_out:
            _tell(
                f"{self.data_dir}: {left_out} image{'s' if left_out > 1 else ''} not in the "
                "recorded split left out; a resumed run trains on exactly the split it started "
                "with (start a new run to use them)"
            )
        return splits

    def _scan(self, source: Path, classes: list[str] | None = None) -> ScanResult:
        return scan(
            source,
            classes,
            self.max_image_pixels,
            self.csv_paths_outside_root,
            verify=self.verify,
            scan_cache=self.scan_cache,
        )

    def _scan_split(self, folder: Path) -> ScanResult:
        result = self._scan(folder, self.classes)
        self.skipped += result.skipped
        self.other_files.update(result.other_files)
        self.image_sizes |= result.image_sizes
        return result
