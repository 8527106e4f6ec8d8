"""Datasets of decoded, transformed images, and the samplers that hand them to processes.

A file that breaks after the scan is skipped when it is loaded and recorded (`ImageDataset`),
so training finishes.
"""

from __future__ import annotations

import csv
import io
import os
import random
from pathlib import Path

import albumentations as A
import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, DistributedSampler, Sampler

from tlkit.data.images import DEFAULT_MAX_IMAGE_PIXELS, LOAD_ERRORS, load_rgb
from tlkit.errors import DatasetError


def record_load_failure(log: Path, path: str, reason: str) -> None:
    """Append one `path,reason` row to `log`.

    Data-loading worker processes share no memory with the main process, so failures are
    collected in a file: one write() of a short row to a file opened with O_APPEND, which
    concurrent processes' rows do not interleave with."""
    row = io.StringIO()
    csv.writer(row).writerow([path, reason])
    descriptor = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, row.getvalue().encode())
    finally:
        os.close(descriptor)


def read_load_failures(log: Path) -> list[tuple[str, str]]:
    """The `(path, reason)` rows of a load-failure log, each path once (it fails every epoch)."""
    if not log.is_file():
        return []
    failures: dict[str, str] = {}
    with open(log, newline="", encoding="utf-8") as handle:
        for path, reason in csv.reader(handle):
            failures.setdefault(path, reason)
    return list(failures.items())


class LabelledImages(Dataset):
    """(image tensor, class index) pairs of one split: its samples, a transform, the epoch.

    The base of `ImageDataset` (image files) and `shards.ShardImages` (a converted split):
    they differ only in how a sample's image is read (`read_rgb`) and how a subset is made
    (`subset`); the transform, the augmentation's seeding and the failure log are shared.

    With an `augmentation_seed`, the (random) transform is reseeded for every image from (seed,
    epoch, the image's index in its split): each image's augmentation is the same whichever
    process, worker or batch draws it, and whether it comes from a folder or from shards, so a
    run repeats exactly and a resumed run continues the same stream, and it changes every
    epoch. `set_epoch` writes the epoch to shared memory, so data-loader workers started in an
    earlier epoch (persistent workers) see it too.

    An image that cannot be loaded any more (a file deleted, rewritten or grown since the scan;
    damaged shard bytes) is an error naming it; with a `failure_log` it is instead recorded
    there and replaced by the next loadable sample, as timm's datasets do, so training goes on.
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        transform,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        augmentation_seed: int | None = None,
        failure_log: Path | None = None,
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.max_pixels = max_pixels
        self.augmentation_seed = augmentation_seed
        self.failure_log = failure_log
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def read_rgb(self, position: int) -> tuple[np.ndarray, int]:
        """The decoded image of sample `position` and its index in its whole split."""
        raise NotImplementedError

    def subset(self, positions: list[int]) -> LabelledImages:
        """The samples at `positions`, with this transform, seed and failure log."""
        raise NotImplementedError

    def stored_size(self, position: int) -> tuple[int, int] | None:
        """(width, height) of sample `position` from its header, no pixels decoded; None if
        it cannot be read."""
        raise NotImplementedError

    def fingerprint(self) -> str | None:
        """What identifies these images beyond their paths and labels (a feature cache's key),
        or None: image files are identified by their sizes and modification times."""
        return None

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def with_transform(self, transform, augmentation_seed: int | None = None) -> LabelledImages:
        """The same images with another transform (and augmentation seed)."""
        images = self.subset(list(range(len(self))))
        images.transform, images.augmentation_seed = transform, augmentation_seed
        return images

    def images_of(self, samples: list[tuple[str, int]], transform) -> LabelledImages:
        """Some of these images (`samples` taken from `self.samples`) with `transform`."""
        position_of = {path: position for position, (path, _) in enumerate(self.samples)}
        chosen = self.subset([position_of[path] for path, _ in samples])
        return chosen.with_transform(transform)

    def rgb(self, position: int) -> np.ndarray:
        """Image `position` decoded, untransformed (for display)."""
        return self.read_rgb(position)[0]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self.samples):
            raise IndexError(f"image {index} of {len(self.samples)}")  # ends iteration
        for offset in range(len(self.samples)):
            position = (index + offset) % len(self.samples)
            path, label = self.samples[position]
            try:
                image, split_index = self.read_rgb(position)
            except LOAD_ERRORS as error:
                reason = f"failed to load after the scan: {type(error).__name__}: {error}"
                if self.failure_log is None:
                    raise DatasetError(f"{path} {reason}") from error
                record_load_failure(self.failure_log, path, reason)
                continue
            if self.augmentation_seed is not None:
                seed_augmentation(
                    self.transform, self.augmentation_seed, int(self._epoch), split_index
                )
            return self.transform(image=image)["image"], label
        raise DatasetError(f"none of the {len(self.samples)} images can be loaded any more")


class ImageDataset(LabelledImages):
    """`LabelledImages` from image files: samples are `(path, class index)`."""

    def __init__(
        self,
        samples: list[tuple[str, int]],
        transform,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        augmentation_seed: int | None = None,
        failure_log: Path | None = None,
        split_indices: list[int] | None = None,
    ) -> None:
        super().__init__(samples, transform, max_pixels, augmentation_seed, failure_log)
        self.split_indices = split_indices

    def read_rgb(self, position: int) -> tuple[np.ndarray, int]:
        image = load_rgb(self.samples[position][0], max_pixels=self.max_pixels)
        return image, position if self.split_indices is None else self.split_indices[position]

    def stored_size(self, position: int) -> tuple[int, int] | None:
        try:
            with Image.open(self.samples[position][0]) as image:
                return image.size
        except LOAD_ERRORS:
            return None

    def subset(self, positions: list[int]) -> ImageDataset:
        indices = self.split_indices or range(len(self.samples))
        return ImageDataset(
            [self.samples[position] for position in positions],
            self.transform,
            self.max_pixels,
            self.augmentation_seed,
            self.failure_log,
            [indices[position] for position in positions],
        )


def seed_augmentation(transform: A.Compose, seed: int, epoch: int, index: int) -> None:
    """Seed an albumentations pipeline for one image's augmentation in one epoch: from (run
    seed, epoch, the image's index in its split) alone, so it is the same whichever process,
    worker or batch loads it, and whether the image comes from a folder or from shards
    (`tlkit.data.shards`).

    The pipeline's transforms share one numpy and one Python generator and draw from them in
    turn (albumentations' `set_random_state`). Its `set_random_seed` would give every transform
    generators of its own seeded alike: their equal draws tie the transforms together (a
    flipped image always came out darker; tests/test_data.py) and seeding them all cost
    a quarter of the time an image took to load at 64 px (measured: 166 us against 45 us)."""
    state = int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])
    transform.set_random_state(np.random.default_rng(state), random.Random(state))


class EpochSampler(DistributedSampler):
    """The training sampler: torch's DistributedSampler (this process's share of the images,
    reshuffled every epoch from the seed), which also passes the epoch that Lightning sets on
    it at the start of every epoch on to the dataset's augmentation (`ImageDataset.set_epoch`).

    Lightning would put its own DistributedSampler in place of a plain one and keep the epoch
    to itself; it leaves a DistributedSampler given by the data module as it is.
    """

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        set_dataset_epoch = getattr(self.dataset, "set_epoch", None)
        if set_dataset_epoch is not None:
            set_dataset_epoch(epoch)


def process_sampler(
    dataset: Dataset, train: bool, seed: int, trainer: pl.Trainer | None
) -> Sampler | None:
    """The sampler of one process's loader, from Lightning's process count and rank.

    Training: an `EpochSampler` (shuffled; padded to equal shares, as DDP's gradient averaging
    needs). Validation and test under several processes: Lightning's
    `UnrepeatedDistributedSampler`, which hands every image to exactly one process where
    Lightning's default sampler pads the shares with repeated images, so that the synchronised
    metrics count every image once. None (in order) for one process.
    """
    shard = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}
    processes, rank = shard.get("num_replicas", 1), shard.get("rank", 0)
    if train:
        return EpochSampler(dataset, num_replicas=processes, rank=rank, shuffle=True, seed=seed)
    if processes == 1:
        return None
    if len(dataset) < processes:
        raise DatasetError(
            f"{len(dataset)} evaluation images for {processes} processes: every process needs "
            "at least one; use fewer devices or more validation/test images"
        )
    return UnrepeatedDistributedSampler(dataset, num_replicas=processes, rank=rank, shuffle=False)


def drops_last_batch(images_per_process: int, batch_size: int) -> bool:
    """Training drops an incomplete last batch (as timm does) when a full one exists: a batch
    of one image breaks BatchNorm in train mode and adds a noisy step. Decided on the images
    of one process (its sampler's length), not of the whole dataset."""
    return images_per_process > batch_size


def default_num_workers() -> int:
    return min(8, os.cpu_count() or 1)
