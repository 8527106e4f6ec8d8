"""Datasets of decoded, transformed images, and the samplers that hand them to processes.

A file that breaks after the scan is skipped when it is loaded and recorded
(`LabelledImages`): training takes a substitute and finishes; extraction and evaluation
(`loader_leaving_out_failures`) leave it out and say so.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import multiprocessing
import os
import random
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any, NamedTuple

import albumentations as A
import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed
from PIL import Image
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from tlkit.config import Sampling
from tlkit.data.images import DEFAULT_MAX_IMAGE_PIXELS, LOAD_ERRORS, load_rgb
from tlkit.data.labels import Label
from tlkit.errors import ConfigError, DatasetError


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
    """(image tensor, label) pairs of one split: its samples, a transform, the epoch.

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
    damaged shard bytes) is an error naming it. With a `failure_log`, training goes on instead,
    as timm's datasets do: the image is recorded there and replaced by a substitute
    (`substitute_positions`: a random loadable sample of the same split, drawn from (seed,
    epoch, index), so not biased towards the next class). A sample that failed once is marked
    in shared memory, so that no process (the main one, any data-loader worker, in any later
    epoch) opens it again, and it is recorded once. Extraction and evaluation never substitute,
    since a substitute would pair one image with another's label or name: they read the images
    through `loader_leaving_out_failures`, which leaves a failed image out and says so.
    """

    def __init__(
        self,
        samples: list[tuple[str, Label]],
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
        # The samples found to fail to load in training, in shared memory like the epoch: the
        # data-loader workers (started before or after) and the main process all see them.
        self._failed = torch.zeros(len(samples), dtype=torch.bool).share_memory_()

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

    def images_of(self, samples: list[tuple[str, Label]], transform) -> LabelledImages:
        """Some of these images (`samples` taken from `self.samples`) with `transform`."""
        position_of = {path: position for position, (path, _) in enumerate(self.samples)}
        chosen = self.subset([position_of[path] for path, _ in samples])
        return chosen.with_transform(transform)

    def rgb(self, position: int) -> np.ndarray:
        """Image `position` decoded, untransformed (for display)."""
        return self.read_rgb(position)[0]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, position: int) -> tuple[torch.Tensor, Label] | str:
        """Sample `position` decoded and transformed, with its label; or, if it cannot be
        loaded, why not."""
        try:
            image, split_index = self.read_rgb(position)
        except LOAD_ERRORS as error:
            return f"failed to load after the scan: {type(error).__name__}: {error}"
        if self.augmentation_seed is not None:
            seed_augmentation(self.transform, self.augmentation_seed, int(self._epoch), split_index)
        return self.transform(image=image)["image"], self.samples[position][1]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Label]:
        if not 0 <= index < len(self.samples):
            raise IndexError(f"image {index} of {len(self.samples)}")  # ends iteration
        if self.failure_log is None:
            loaded = self.load(index)
            if isinstance(loaded, str):
                raise DatasetError(f"{self.samples[index][0]} {loaded}")
            return loaded
        seed = 0 if self.augmentation_seed is None else self.augmentation_seed
        substitutes = substitute_positions(len(self.samples), seed, int(self._epoch), index)
        for position in itertools.chain([index], substitutes):
            if self._failed[position]:
                continue  # known to fail: not opened again
            loaded = self.load(position)
            if isinstance(loaded, tuple):
                return loaded
            self._failed[position] = True
            record_load_failure(self.failure_log, self.samples[position][0], loaded)
        raise DatasetError(f"none of the {len(self.samples)} images can be loaded any more")


def substitute_positions(samples: int, seed: int, epoch: int, index: int) -> Iterator[int]:
    """Every position of a split of `samples` once, in a random order drawn from (seed,
    epoch, index): the candidates, in turn, to stand in for sample `index` when it fails to
    load. The walk start + k * step (mod samples), with a step coprime to the count, is a
    permutation that costs nothing to draw; its start is uniform, so a failed sample's
    substitute is any loadable sample of the split, not the next one (the next class)."""
    generator = np.random.default_rng([seed, epoch, index, SUBSTITUTE_STREAM])
    start = int(generator.integers(samples))
    step = int(generator.integers(1, samples)) if samples > 1 else 1
    while math.gcd(step, samples) != 1:
        step += 1
    for k in range(samples):
        yield (start + k * step) % samples


SUBSTITUTE_STREAM = 1  # keeps substitute draws apart from augmentation seeds of the same numbers


class LoadedBatch(NamedTuple):
    """A batch for extraction or evaluation: the samples that loaded and which they were
    (`positions` in the dataset: their labels are the samples' own, of either label kind),
    and the samples that did not, left out: `failures`, the `(position, reason)` of each."""

    images: Any  # the collated images (a tensor, or a tuple of per-scale tensors); None: none
    positions: torch.Tensor
    failures: list[tuple[int, str]]


class _FailuresLeftOut(Dataset):
    """`images`, each item `(position, loaded)`: `LabelledImages.load`'s image and label, or
    why it failed to load."""

    def __init__(self, images: LabelledImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, position: int) -> tuple[int, tuple[torch.Tensor, Label] | str]:
        return position, self.images.load(position)


def _collate_loaded(items: list[tuple[int, tuple[torch.Tensor, Label] | str]]) -> LoadedBatch:
    loaded = [(position, pair[0]) for position, pair in items if isinstance(pair, tuple)]
    failures = [(position, reason) for position, reason in items if isinstance(reason, str)]
    images = default_collate([image for _, image in loaded]) if loaded else None
    positions = torch.tensor([position for position, _ in loaded], dtype=torch.int64)
    return LoadedBatch(images, positions, failures)


def loader_leaving_out_failures(
    images: LabelledImages, batch_size: int, num_workers: int
) -> DataLoader:
    """A loader of `images` in order, for extraction and evaluation, whose batches are
    `LoadedBatch`es: an image that fails to load is left out, its position and reason passed
    on, never replaced by another (whose features or prediction would then be filed under
    this image's label or name)."""
    return DataLoader(
        _FailuresLeftOut(images),
        batch_size=batch_size,
        num_workers=num_workers,
        multiprocessing_context=worker_start_context(num_workers),
        collate_fn=_collate_loaded,
    )


class ImageDataset(LabelledImages):
    """`LabelledImages` from image files: samples are `(path, label)`."""

    def __init__(
        self,
        samples: list[tuple[str, Label]],
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


class ClassBalancedSampler(EpochSampler):
    """The training sampler of `--sampler balanced`: each epoch draws as many images as the
    dataset holds, with replacement, image i with probability proportional to `weights[i]`
    (`labels.class_balanced_weights`: every class about equally often).

    Hand-written because torch's `WeightedRandomSampler` serves one process only: here the
    whole epoch is drawn from (seed, epoch), the same on every process, and each takes every
    `num_replicas`-th draw from its rank on, as `DistributedSampler` shares its permutation; a
    new epoch (Lightning's `set_epoch`) draws anew and reseeds the augmentation as
    `EpochSampler` does."""

    def __init__(
        self, dataset: Dataset, weights: Sequence[float], num_replicas: int, rank: int, seed: int
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        if len(weights) != len(dataset):
            raise ValueError(f"{len(weights)} sampling weights for {len(dataset)} images")
        self.weights = torch.as_tensor(weights, dtype=torch.double)

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        drawn = torch.multinomial(self.weights, self.total_size, True, generator=generator)
        return iter(drawn[self.rank : self.total_size : self.num_replicas].tolist())


def _shuffled(
    dataset: Dataset, processes: int, rank: int, seed: int, weights: Sequence[float] | None
) -> EpochSampler:
    return EpochSampler(dataset, num_replicas=processes, rank=rank, shuffle=True, seed=seed)


def _class_balanced(
    dataset: Dataset, processes: int, rank: int, seed: int, weights: Sequence[float] | None
) -> ClassBalancedSampler:
    if weights is None:
        raise ConfigError("the balanced sampler needs each image's sampling weight")
    return ClassBalancedSampler(dataset, weights, processes, rank, seed)


# Each training sampler: (dataset, processes, this process's rank, seed, per-image sampling
# weights) -> the sampler of this process's share. The keys are config.Sampling's.
TRAINING_SAMPLERS: dict[Sampling, Callable[..., EpochSampler]] = {
    "shuffle": _shuffled,
    "balanced": _class_balanced,
}


def process_sampler(
    dataset: Dataset,
    train: bool,
    seed: int,
    trainer: pl.Trainer | None,
    sampler: str = "shuffle",
    sample_weights: Sequence[float] | None = None,
) -> Sampler | None:
    """The sampler of one process's loader, from Lightning's process count and rank.

    Training: `TRAINING_SAMPLERS[sampler]`, an `EpochSampler` (shuffled, or drawn by
    `sample_weights`; padded to equal shares, as DDP's gradient averaging needs). Validation
    and test under several processes: Lightning's `UnrepeatedDistributedSampler`, which hands
    every image to exactly one process where Lightning's default sampler pads the shares with
    repeated images, so that the synchronised metrics count every image once. None (in order)
    for one process.
    """
    shard = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}
    processes, rank = shard.get("num_replicas", 1), shard.get("rank", 0)
    if train:
        if sampler not in TRAINING_SAMPLERS:
            choices = ", ".join(TRAINING_SAMPLERS)
            raise ConfigError(f"unknown sampler '{sampler}': choose one of {choices}")
        return TRAINING_SAMPLERS[sampler](dataset, processes, rank, seed, sample_weights)
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


# What a loader's worker unpickles its dataset and transforms from: imported once, by the fork
# server, so that each worker it forks starts as fast as a fork of the training process.
WORKER_MODULES = ["tlkit.data.datasets", "tlkit.data.shards"]


def worker_start_context(num_workers: int) -> BaseContext | None:
    """How a loader starts its worker processes: from a fork server inside a distributed
    process (a process group is initialised), else as the platform does (fork on Linux).

    A distributed process runs threads of its own (the process group's, Lightning's), and on
    Python 3.11 and older a fork while one of them holds the interpreter's thread-state lock
    leaves the child waiting on that lock for ever (CPython gh-112275; here a two-process run
    hung in `Trainer.test` in 1 of 14 tries on Python 3.11.7). A fork server is a fresh
    single-threaded interpreter that forks the workers instead; it starts once per process
    (seconds: it imports `WORKER_MODULES`). None: the DataLoader's default."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if num_workers == 0 or not distributed:
        return None
    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows: spawn already
        return None
    multiprocessing.set_forkserver_preload(WORKER_MODULES)
    return multiprocessing.get_context("forkserver")
