"""Converted datasets: LitData shards written once by `tlkit convert`, read by every command.

`convert` scans an image folder or CSV exactly as `tlkit finetune` does (same classes, same
stable split, same skipped files), then writes each split with `litdata.optimize` into
OUT/train, OUT/val and OUT/test: every sample holds the file's original encoded bytes, its class
index, its path relative to the data root and its index in the split (the folder run's order,
which seeds its augmentation). Beside them: classes.txt, skipped.csv, split.csv (path, split,
label, and the width and height the scan read; per split in the shards' own order) and,
written last, the marker `tlkit-shards.json` (classes, counts, split seed, validation and test
fractions, files not read, source, versions). A folder without the marker is never taken for a
converted dataset, so an interrupted conversion cannot look complete; converting into it again
starts over.

Samples are written in a seeded random order: LitData shuffles the order of its chunks and the
items inside a chunk, so chunks written class by class (the scan's order) would give batches of
a single class.

`ShardDataModule` has `ImageDataModule`'s interface and reads a converted dataset: training
streams through LitData's `StreamingDataLoader` (each process and worker reads its own share of
the chunks, reshuffled every epoch from the seed); validation and test read the same shards by
index with Lightning's `UnrepeatedDistributedSampler`, so every image is counted exactly once
on any number of processes. Images are decoded with `data.load_rgb` and augmented with the same
albumentations pipeline and the same per-(seed, epoch, index) seeding as `ImageDataset`.

A location is a local folder or an object-store URL (s3://, gs://): URLs are handed to LitData
untouched, and the small metadata files beside the shards are read and written through LitData's
own storage providers, with the same credentials (the environment's, e.g. AWS_* variables).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import litdata
import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset

# LitData's own S3/GCS client for a URL (private, but the one its readers and optimize use,
# with the same credentials), for the few small files tlkit keeps beside the shards.
from litdata.streaming.fs_provider import _get_fs_provider
from PIL import Image
from torch.utils.data import DataLoader

from tlkit import __version__
from tlkit.choices import SHARD_CHUNK_BYTES
from tlkit.config import FinetuneConfig
from tlkit.data.datamodule import BaseImageDataModule, ImageDataModule
from tlkit.data.datasets import (
    LabelledImages,
    drops_last_batch,
    seed_augmentation,
    worker_start_context,
)
from tlkit.data.images import DEFAULT_MAX_IMAGE_PIXELS, LOAD_ERRORS, load_rgb
from tlkit.data.labels import LABEL_KINDS, Label
from tlkit.data.sources import OtherFiles, relative_path
from tlkit.errors import ConfigError, DatasetError, OutputExistsError, RunFolderError
from tlkit.runfolder import Preprocessing, write_atomic

logger = logging.getLogger(__name__)

MARKER = "tlkit-shards.json"  # written last: its presence means the conversion finished
CONVERTING = "tlkit-converting"  # written first, removed last: an interrupted tlkit conversion
CLASSES = "classes.txt"
SPLIT_TABLE = "split.csv"
SKIPPED = "skipped.csv"
SPLITS = ("train", "val", "test")
FORMAT = "tlkit-litdata-shards"
FORMAT_VERSION = 1
REQUIRED_KEYS = {"classes", "counts", "seed", "val_fraction", "max_image_pixels"}
# The marker's counts of the files not read (`OtherFiles.counts`); markers written before
# tlkit recorded them, or a test fraction, lack the keys (read as none, and as 0).
OTHER_FILES_KEYS = ("ignored_files", "unread_images")


# ---------------------------------------------------------------------------------------------
# Locations: local folders and object-store URLs


def is_url(location: str | Path) -> bool:
    """An object-store location such as s3://bucket/data (kept a string: Path would turn
    "s3://b" into "s3:/b")."""
    return "://" in str(location)


def join(location: str | Path, name: str) -> str:
    location = str(location)
    return f"{location.rstrip('/')}/{name}" if is_url(location) else os.path.join(location, name)


def _parent_and_name(location: str) -> tuple[str, str]:
    if is_url(location):
        parent, _, name = location.rstrip("/").rpartition("/")
        return parent, name
    absolute = os.path.abspath(location)
    return os.path.dirname(absolute), os.path.basename(absolute)


def _read_text(location: str, name: str) -> str | None:
    """The text of the file `name` in `location`, or None if there is none. Remote files are
    fetched with LitData's storage provider for the URL's scheme (the one its readers use)."""
    target = join(location, name)
    if not is_url(location):
        return Path(target).read_text(encoding="utf-8") if os.path.isfile(target) else None
    provider = _get_fs_provider(target)
    if not provider.exists(target):
        return None
    with tempfile.TemporaryDirectory() as folder:
        local = os.path.join(folder, name)
        provider.download_file(target, local)
        return Path(local).read_text(encoding="utf-8")


def _write_text(location: str, name: str, text: str) -> None:
    target = join(location, name)
    if not is_url(location):
        write_atomic(target, text)
        return
    with tempfile.TemporaryDirectory() as folder:
        local = os.path.join(folder, name)
        Path(local).write_text(text, encoding="utf-8")
        _get_fs_provider(target).upload_file(local, target)


def _remove(location: str, name: str) -> None:
    """Delete the file or folder `name` in `location`, if it exists."""
    target = join(location, name)
    if is_url(location):
        provider = _get_fs_provider(target)
        if provider.exists(target):
            provider.delete_file_or_directory(target)
    elif os.path.isdir(target):
        shutil.rmtree(target)
    elif os.path.lexists(target):
        os.unlink(target)


def remote_cache(location: str, chunk_cache_dir: str | None) -> str | None:
    """LitData's `cache_dir` for reading `location`: `chunk_cache_dir` for an object store
    (LitData downloads chunks there, into a folder per URL and upload time, and evicts the
    oldest when the disk fills); None for a local folder, which LitData reads in place."""
    return chunk_cache_dir if is_url(location) else None


def _is_empty(location: str) -> bool:
    if is_url(location):
        return _get_fs_provider(location).is_empty(location)
    return not os.path.exists(location) or (os.path.isdir(location) and not os.listdir(location))


# ---------------------------------------------------------------------------------------------
# A converted dataset


@dataclass
class ConvertedDataset:
    """A finished `tlkit convert` output: its location (folder or URL, as given) and marker."""

    location: str
    metadata: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.metadata["classes"])

    @property
    def counts(self) -> dict[str, int]:
        """Images per split (train, val and, when converted, test)."""
        return dict(self.metadata["counts"])

    @property
    def max_image_pixels(self) -> int:
        return int(self.metadata["max_image_pixels"])

    @property
    def label_kind(self) -> str:
        """How its images are labelled (conversions from before multi-label: single-label)."""
        return str(self.metadata.get("label_kind", "single-label"))

    def split_location(self, split: str) -> str:
        """The LitData dataset (index.json and chunks) of one split."""
        return join(self.location, split)

    def image_sizes(self) -> dict[str, tuple[int, int]]:
        """(width, height) as stored, by relative path, of the images whose size the
        conversion's scan read (none in a conversion made before tlkit recorded them)."""
        text = _read_text(self.location, SPLIT_TABLE) or ""
        return {
            row["path"]: (int(row["width"]), int(row["height"]))
            for row in csv.DictReader(io.StringIO(text))
            if row.get("width") and row.get("height")
        }

    def samples(self) -> dict[str, list[tuple[str, Label]]]:
        """Per split, `(path relative to the data root, label)` in the shards' order."""
        text = _read_text(self.location, SPLIT_TABLE)
        if text is None:
            raise DatasetError(f"{join(self.location, SPLIT_TABLE)} is missing")
        index_of = {name: index for index, name in enumerate(self.classes)}
        kind = LABEL_KINDS[self.label_kind]
        splits: dict[str, list[tuple[str, Label]]] = {split: [] for split in self.counts}
        for row in csv.DictReader(io.StringIO(text)):
            indices = [index_of[name] for name in kind.names_of(row["label"])]
            splits[row["split"]].append((row["path"], kind.from_indices(indices)))
        if {split: len(rows) for split, rows in splits.items()} != self.counts:
            raise DatasetError(f"{self.location}: {SPLIT_TABLE} does not match {MARKER}")
        return splits

    def skipped(self) -> list[tuple[str, str]]:
        """`(path, reason)` of the files the conversion's scan skipped."""
        text = _read_text(self.location, SKIPPED) or ""
        return [(row["path"], row["reason"]) for row in csv.DictReader(io.StringIO(text))]


def open_converted(location: str | Path) -> ConvertedDataset | None:
    """The converted dataset at `location`, or None if it is not one (a plain image folder or
    CSV). A conversion that did not finish, or a marker tlkit cannot read, is a `DatasetError`."""
    location = str(location)
    if not is_url(location) and not os.path.isdir(location):
        return None
    text = _read_text(location, MARKER)
    if text is None:
        if _read_text(location, CONVERTING) is not None:
            raise DatasetError(
                f"{location}: an interrupted `tlkit convert` ({MARKER} was never written); "
                "run tlkit convert again"
            )
        return None
    try:
        metadata = json.loads(text)
        if metadata.get("format") != FORMAT:
            raise ValueError(f"format {metadata.get('format')!r}, expected {FORMAT!r}")
        if int(metadata.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError("written by a newer tlkit; upgrade tlkit")
        missing = sorted(REQUIRED_KEYS - metadata.keys())
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
    except (ValueError, TypeError, AttributeError) as error:
        raise DatasetError(
            f"{join(location, MARKER)}: not a tlkit dataset marker ({error})"
        ) from None
    return ConvertedDataset(location, metadata)


def find_converted(location: str | Path) -> tuple[ConvertedDataset, str | None] | None:
    """A converted dataset's root (split None) or one of its split folders (OUT/test), or None
    for anything else."""
    location = str(location)
    converted = open_converted(location)
    if converted is not None:
        return converted, None
    parent, name = _parent_and_name(location)
    if name in SPLITS and (is_url(location) or os.path.isdir(location)):
        converted = open_converted(parent)
        if converted is not None and name in converted.counts:
            return converted, name
    return None


# ---------------------------------------------------------------------------------------------
# Conversion


def encoded_sample(item: tuple[str, int | str, str, int]) -> dict[str, Any]:
    """One shard sample (run by `litdata.optimize`'s worker processes): the file's bytes as
    stored, never re-encoded, with its label (as `LabelKind.stored` gives it), relative path
    and index in its split."""
    path, label, relative, index = item
    return {"index": index, "image": Path(path).read_bytes(), "label": label, "path": relative}


def convert(
    data: str | Path,
    out: str | Path,
    workers: int = 1,
    chunk_bytes: str | int = SHARD_CHUNK_BYTES,
    seed: int = FinetuneConfig.field_default("seed"),
    val_fraction: float = FinetuneConfig.field_default("val_fraction"),
    test_fraction: float = FinetuneConfig.field_default("test_fraction"),
    max_image_pixels: int = FinetuneConfig.field_default("max_image_pixels"),
    csv_paths_outside_root: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> ConvertedDataset:
    """Scan `data` as `tlkit finetune` does and write its splits as LitData shards into `out`
    (a folder or an s3:// or gs:// URL). `out` must be new, empty, or an interrupted
    conversion; a finished one is replaced only with `overwrite`."""
    if is_url(data):
        raise ConfigError(f"{data}: tlkit convert reads a local image folder or CSV")
    out = str(out)
    _check_output(out, overwrite)
    images = ImageDataModule(
        data,
        None,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        max_image_pixels=max_image_pixels,
        csv_paths_outside_root=csv_paths_outside_root,
    )
    splits = images.scan_splits()
    kind = LABEL_KINDS[images.label_kind]
    _write_text(out, CONVERTING, f"tlkit convert {data} started {_now()}\n")
    for name in (MARKER, *SPLITS):  # what an overwritten or interrupted conversion left
        _remove(out, name)
    images.other_files.log(logger)
    rows: list[tuple[str, str, str]] = []
    counts: dict[str, int] = {}
    for split_number, (split, samples) in enumerate(splits.items()):
        if not samples:
            continue
        # A seeded random order, so that every chunk holds a mix of classes.
        order = np.random.default_rng([seed, split_number]).permutation(len(samples))
        chosen = [samples[index] for index in order.tolist()]
        items = [
            (path, kind.stored(label), relative_path(path, images.root), int(index))
            for index, (path, label) in zip(order.tolist(), chosen, strict=True)
        ]
        logger.info(f"Writing {len(items)} {split} images to {join(out, split)}")
        _optimize(items, join(out, split), workers, chunk_bytes, progress)
        rows += [
            (
                relative,
                split,
                kind.text(label, images.classes),
                *images.image_sizes.get(path, ("", "")),
            )
            for (path, _, relative, _), (_, label) in zip(items, chosen, strict=True)
        ]
        counts[split] = len(items)

    _write_text(out, CLASSES, "".join(f"{name}\n" for name in images.classes))
    table = io.StringIO()
    csv.writer(table).writerows([("path", "split", "label", "width", "height"), *rows])
    _write_text(out, SPLIT_TABLE, table.getvalue())
    skipped = io.StringIO()
    csv.writer(skipped).writerows([("path", "reason"), *images.skipped])
    _write_text(out, SKIPPED, skipped.getvalue())
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tlkit_version": __version__,
        "litdata_version": litdata.__version__,
        "created": _now(),
        "source": os.path.abspath(data),
        "classes": images.classes,
        "label_kind": images.label_kind,
        "counts": counts,
        "skipped_files": len(images.skipped),
        **dict(zip(OTHER_FILES_KEYS, images.other_files.counts(), strict=True)),
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "max_image_pixels": max_image_pixels,
        "csv_paths_outside_root": csv_paths_outside_root,
        "chunk_bytes": chunk_bytes,
    }
    _write_text(out, MARKER, json.dumps(metadata, indent=2) + "\n")  # last: now it is complete
    _remove(out, CONVERTING)
    return ConvertedDataset(out, metadata)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_output(out: str, overwrite: bool) -> None:
    """Refuse to write into a finished conversion (unless `overwrite`) or into a folder that
    holds anything but an interrupted tlkit conversion."""
    if _read_text(out, MARKER) is not None:
        if not overwrite:
            raise OutputExistsError(
                f"{out} already holds a converted dataset; choose another OUT or --overwrite"
            )
    elif not _is_empty(out) and _read_text(out, CONVERTING) is None:
        raise OutputExistsError(f"{out} exists and is not empty; choose a new or empty OUT")


def _optimize(
    items: list[tuple[str, int | str, str, int]],
    output_dir: str,
    workers: int,
    chunk_bytes: str | int,
    progress: bool,
) -> None:
    """`litdata.optimize` in the items' order (`keep_data_ordered`: sample i of the shards is
    row i of the split in split.csv)."""
    start_method = multiprocessing.get_start_method(allow_none=True)
    # optimize stages chunks for an object store in one machine-wide folder (/tmp/chunks) and
    # empties it when it starts, so two conversions at once (into any output) would delete
    # each other's chunks: give each conversion its own staging folders.
    staging = tempfile.TemporaryDirectory(prefix="tlkit-convert-")
    variables = {
        "DATA_OPTIMIZER_CACHE_FOLDER": os.path.join(staging.name, "chunks"),
        "DATA_OPTIMIZER_DATA_CACHE_FOLDER": os.path.join(staging.name, "data"),
    }
    earlier = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        litdata.optimize(
            fn=encoded_sample,
            inputs=items,
            output_dir=output_dir,
            num_workers=workers,
            chunk_bytes=chunk_bytes,
            keep_data_ordered=True,
            reorder_files=False,
            mode="overwrite",
            verbose=progress,
            # Writers forked from this process start at once; spawned ones would import torch
            # and tlkit again, seconds per split (litdata's default outside notebooks).
            start_method="fork" if sys.platform == "linux" else None,
        )
    finally:
        # optimize sets the process-wide start method to "spawn" (force=True); put it back so
        # that later data loaders in this process start their workers as before.
        multiprocessing.set_start_method(start_method, force=True)
        for name, value in earlier.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        staging.cleanup()
    # optimize reports success even when a worker process died: count what it wrote.
    index = json.loads(_read_text(output_dir, "index.json") or '{"chunks": []}')
    written = sum(chunk["chunk_size"] for chunk in index.get("chunks", []))
    if written != len(items):
        raise DatasetError(
            f"litdata.optimize wrote {written} of {len(items)} samples to {output_dir} "
            "(a writer process failed: see its messages above)"
        )


# ---------------------------------------------------------------------------------------------
# Reading: datasets and the data module


def decode_sample(
    sample: dict[str, Any],
    transform,
    seed: int | None,
    epoch: int,
    max_pixels: int,
    location: str,
    label_kind: str = "single-label",
) -> tuple[torch.Tensor, Label]:
    """(image tensor, label) of a shard sample: `load_rgb` on its bytes, then `transform`,
    reseeded per (seed, epoch, index) as `ImageDataset` does when `seed` is given; the label
    read as `label_kind` stores it."""
    try:
        image = load_rgb(io.BytesIO(sample["image"]), max_pixels=max_pixels)
    except LOAD_ERRORS as error:  # the bytes decoded at conversion: the shard is damaged
        raise DatasetError(
            f"{sample['path']} in {location}: {type(error).__name__}: {error}"
        ) from error
    if seed is not None:
        seed_augmentation(transform, seed, epoch, int(sample["index"]))
    return transform(image=image)["image"], LABEL_KINDS[label_kind].from_stored(sample["label"])


class ShardImages(LabelledImages):
    """`LabelledImages` of one converted split, read by index: the shards' twin of
    `ImageDataset` for evaluation, inference and subsets (sanity checks).

    `samples` are `(relative path, label)` in the shards' order. The `StreamingDataset`
    is opened on first use in each process (data-loader workers open their own), so nothing
    of LitData's reader state is copied between processes. `chunk_cache_dir`: where LitData
    keeps the chunks it downloads from an object store (None: LitData's default).
    """

    def __init__(
        self,
        location: str,
        samples: list[tuple[str, Label]],
        transform,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        augmentation_seed: int | None = None,
        positions: list[int] | None = None,
        chunk_cache_dir: str | None = None,
        failure_log: Path | None = None,
    ) -> None:
        self.positions = list(range(len(samples))) if positions is None else positions
        chosen = [samples[position] for position in self.positions]
        super().__init__(chosen, transform, max_pixels, augmentation_seed, failure_log)
        self.location = location
        self.chunk_cache_dir = chunk_cache_dir
        self._all_samples = samples
        self._streaming: StreamingDataset | None = None

    def subset(self, positions: list[int]) -> ShardImages:
        return ShardImages(
            self.location,
            self._all_samples,
            self.transform,
            self.max_pixels,
            self.augmentation_seed,
            [self.positions[position] for position in positions],
            self.chunk_cache_dir,
            self.failure_log,
        )

    def fingerprint(self) -> str:
        """SHA-256 of the split's LitData index (its chunk files, their sizes and sample
        counts): what identifies these images where files have sizes and modification times."""
        index = _read_text(self.location, "index.json")
        if index is None:
            raise DatasetError(f"{join(self.location, 'index.json')} is missing")
        return hashlib.sha256(index.encode()).hexdigest()

    def read_rgb(self, position: int) -> tuple[np.ndarray, int]:
        sample = self._sample(position)
        image = load_rgb(io.BytesIO(sample["image"]), max_pixels=self.max_pixels)
        return image, int(sample["index"])

    def stored_size(self, position: int) -> tuple[int, int] | None:
        try:
            with Image.open(io.BytesIO(self._sample(position)["image"])) as image:
                return image.size
        except LOAD_ERRORS:
            return None

    def _sample(self, position: int) -> dict[str, Any]:
        if self._streaming is None:
            self._streaming = StreamingDataset(
                self.location, cache_dir=remote_cache(self.location, self.chunk_cache_dir)
            )
        return self._streaming[self.positions[position]]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_streaming": None}


class ShardTrainingDataset(StreamingDataset):
    """The training split as LitData streams it: each process and worker reads its share of
    the chunks, reshuffled every epoch from `seed`; each sample is decoded and augmented as in
    `ImageDataset`, seeded by (seed, epoch, the sample's index in the split); its label read
    as the converted dataset's `label_kind` stores it, then as the task's."""

    def __init__(
        self,
        location: str,
        image_transform,
        seed: int,
        augmentation_seed: int | None,
        max_pixels: int,
        drop_last: bool,
        chunk_cache_dir: str | None = None,
        stored_kind: str = "single-label",
        label_kind: str = "single-label",
    ) -> None:
        super().__init__(
            location,
            cache_dir=remote_cache(location, chunk_cache_dir),
            shuffle=True,
            seed=seed,
            drop_last=drop_last,
        )
        # Not `self.transform`: StreamingDataset applies an attribute of that name to raw items.
        self.image_transform = image_transform
        self.augmentation_seed = augmentation_seed
        self.max_pixels = max_pixels
        self.location = location
        self.stored_kind = stored_kind
        self.label_kind = label_kind

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, Label]:
        sample = super().__getitem__(index)
        # LitData counts epochs from 1 (StreamingDataLoader sets it, and its worker copies
        # advance it themselves); Lightning and ImageDataset count from 0.
        epoch = self.current_epoch - 1
        image, label = decode_sample(
            sample,
            self.image_transform,
            self.augmentation_seed,
            epoch,
            self.max_pixels,
            self.location,
            self.stored_kind,
        )
        if self.stored_kind != self.label_kind:  # e.g. single-label data, multi-label task
            ((_, label),) = LABEL_KINDS[self.label_kind].convert([(sample["path"], label)], "")
        return image, label


class ShardDataModule(BaseImageDataModule):
    """The data module of a converted dataset (`tlkit convert`); the options are
    `BaseImageDataModule`'s.

    `setup` reads only the metadata (classes, counts, split table, skipped files); the
    LitData datasets are created in the `*_dataloader` methods, which Lightning calls once the
    process group exists. Created earlier (`finetune` calls `setup` before the Trainer
    exists), a `StreamingDataset` would take its rank and world size from environment variables
    that torchrun and Lightning's launcher do not all set (GLOBAL_RANK), and every process would
    read the same data (litData issues #250, #411).

    The split is the one fixed at conversion; `val_fraction` and `test_fraction` are only
    compared with the conversion's, and `recorded_split` (a resumed run's split.csv) must match it.
    `chunk_cache_dir`: where LitData keeps the chunks of a dataset in an object store (None:
    LitData's default, ~/.lightning/chunks or $LITDATA_CACHE_DIR).

    The training loader's position (LitData's `StreamingDataLoader.state_dict`: its epoch) is
    this module's state in every checkpoint, and a resumed run's new loader starts from it
    (`load_state_dict`), so it continues with the next epoch's shuffle and augmentation.
    (Lightning restores a loader's own state only when a run resumes mid-epoch; tlkit's
    last.ckpt is written at an epoch's end.)
    """

    def __init__(
        self,
        data_dir: str | Path,
        preprocessing: Preprocessing,
        chunk_cache_dir: str | Path | None = None,
        **options,
    ) -> None:
        super().__init__(str(data_dir), preprocessing, **options)
        self.chunk_cache_dir = str(chunk_cache_dir) if chunk_cache_dir else None
        self.converted: ConvertedDataset | None = None
        self._train_loader: StreamingDataLoader | None = None
        self._train_loader_state: dict[str, Any] | None = None

    def scan_splits(self) -> dict[str, list[tuple[str, Label]]]:
        converted = open_converted(self.data_dir)
        if converted is None:
            raise DatasetError(f"{self.data_dir}: not a converted dataset ({MARKER} is missing)")
        if self.max_image_pixels < converted.max_image_pixels:
            raise ConfigError(
                f"--max-image-pixels {self.max_image_pixels:,} is below the conversion's "
                f"{converted.max_image_pixels:,}: convert again with the lower limit"
            )
        metadata = converted.metadata
        converted_split = (
            metadata["seed"],
            metadata["val_fraction"],
            metadata.get("test_fraction", 0.0),
        )
        if converted_split != (self.seed, self.val_fraction, self.test_fraction):
            logger.info(
                f"{self.data_dir}: the split fixed by tlkit convert is used (seed "
                f"{converted_split[0]}, val fraction {converted_split[1]}, test fraction "
                f"{converted_split[2]})"
            )
        self.converted = converted
        self.classes = converted.classes
        self.skipped = converted.skipped()
        self.other_files = OtherFiles.from_counts(
            *(metadata.get(key, {}) for key in OTHER_FILES_KEYS)
        )
        self.image_sizes = converted.image_sizes()
        samples = converted.samples()
        if self.recorded_split is not None:
            self._check_recorded_split(samples)
        return self.read_as_task(samples, converted.label_kind)

    def images(
        self,
        split: str,
        samples: list[tuple[str, Label]],
        transform,
        augmentation_seed: int | None = None,
    ) -> ShardImages:
        return ShardImages(
            self.converted.split_location(split),
            samples,
            transform,
            self.max_image_pixels,
            augmentation_seed,
            chunk_cache_dir=self.chunk_cache_dir,
            failure_log=self.load_failure_log,
        )

    def _check_recorded_split(self, samples: dict[str, list[tuple[str, Label]]]) -> None:
        converted = {path: split for split, rows in samples.items() for path, _ in rows}
        if converted != self.recorded_split:
            raise RunFolderError(
                f"{self.data_dir} no longer holds the split the run started with (converted "
                "again?); a resumed run needs the same images (start a new run)"
            )

    def train_dataloader(self) -> StreamingDataLoader | DataLoader:
        """LitData's streaming loader; for `--sampler balanced`, which draws images by their
        weights, the training shards read by index as validation reads them."""
        if self.sampling != "shuffle":
            return super().train_dataloader()
        processes = self.trainer.world_size if self.trainer is not None else 1
        images = len(self.train_set)
        per_process = images // processes
        if processes > 1 and per_process < self.batch_size:
            raise DatasetError(
                f"{images} training images for {processes} processes of batch size "
                f"{self.batch_size}: LitData gives every process whole batches only; lower "
                "--batch-size"
            )
        # Full batches only when more than one exists, as ImageDataModule decides; under DDP
        # LitData always does so, so that every process runs the same number of steps (up to
        # processes x batch size - 1 images, a different few each epoch, wait for the next).
        # Dropped by the dataset, not by the loader: the loader's state in the checkpoint then
        # counts a whole epoch, and a resumed run starts the next one.
        drop_last = processes > 1 or drops_last_batch(per_process, self.batch_size)
        dataset = ShardTrainingDataset(
            self.train_set.location,
            self.train_set.transform,
            self.seed,
            self.train_set.augmentation_seed,
            self.max_image_pixels,
            drop_last,
            self.chunk_cache_dir,
            self.converted.label_kind,
            self.label_kind,
        )
        self._train_loader = StreamingDataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            multiprocessing_context=worker_start_context(self.num_workers),
            pin_memory=torch.cuda.is_available(),
            collate_fn=self.collator(),
        )
        if self._train_loader_state is not None:
            self._train_loader.load_state_dict(self._train_loader_state)
        return self._train_loader

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position, for the checkpoint (empty before training)."""
        if self._train_loader is None:
            return {}
        return {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed run's training loader starts where the checkpoint's stopped."""
        self._train_loader_state = state_dict.get("train_loader")


def labelled_split(location: str | Path) -> tuple[ConvertedDataset, str] | None:
    """For evaluation: the converted split at `location` (OUT/val, OUT/test), or for a converted
    root its test split; None if `location` is not converted data."""
    found = find_converted(location)
    if found is None:
        return None
    converted, split = found
    if split is None:
        if "test" not in converted.counts:
            raise DatasetError(
                f"{location} has no test split; name the split to use, e.g. "
                f"{converted.split_location('val')}"
            )
        split = "test"
    return converted, split
