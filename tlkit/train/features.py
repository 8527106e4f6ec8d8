"""Cached-feature fast path for the frozen-backbone (`features`) strategy.

With a frozen backbone in eval mode, an image's features never change, yet the usual loop runs
the whole backbone on every image in every epoch. Here the backbone runs once per image (per
cached view), the pooled features are stored in a safetensors file, and the head trains on them
through the same Lightning Trainer, callbacks and run folder; the checkpoint is an ordinary
`TransferClassifier` (the backbone's weights included), so evaluate, predict, TTA and export
use it unchanged.

Extraction happens in the data module's `prepare_data`, which Lightning runs inside
`trainer.fit` on one process (on that process's device) while the others wait; every process
then loads the files in `setup`. So under DDP the features are extracted once, not once per
process. A file lock around each file's extraction gives the same guarantee to callers outside
a Trainer (`tlkit.train.probe.probe_features`, run by every process before any process group
exists): one process extracts, the others wait and read the file.

A cache file is keyed by everything its features depend on: backbone, weights (a SHA-256 of
the backbone's tensors, whatever their source), input size and preprocessing, the transform (and
augmented view count), the exact file list with each file's size and modification time, and the
torch, timm and tlkit versions (a new implementation can compute other features from the same
weights). Any change gives a new key and a new file; a file whose key, shapes or contents do not
check out is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import timm
import torch
from filelock import FileLock
from pytorch_lightning.utilities.seed import isolate_rng
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm import tqdm

from tlkit import __version__
from tlkit.data.augment import eval_transform
from tlkit.data.datamodule import BaseImageDataModule
from tlkit.data.datasets import LabelledImages, drops_last_batch, process_sampler
from tlkit.model.backbones import weights_digest
from tlkit.model.classifier import TransferClassifier

logger = logging.getLogger(__name__)


def cache_key(
    model: TransferClassifier,
    samples: list[tuple[str, int]],
    transform,
    views: int,
    seed: int | None,
    shards: str | None = None,
) -> str:
    """SHA-256 of everything the cached features depend on (`seed`: of random augmentation).

    Image files are keyed by path, label, size and modification time; images of a converted
    dataset by path and label and `shards`, the fingerprint of the LitData split holding them
    (`LabelledImages.fingerprint`)."""
    if shards is None:
        files = [(path, label, *_size_and_mtime(path)) for path, label in samples]
    else:
        files = [(path, label) for path, label in samples]
    description = {
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "tlkit": __version__},
        "backbone": model.hparams.backbone,
        "weights": weights_digest(model.backbone),
        "augmentation_seed": seed,
        "preprocessing": asdict(model.preprocessing),
        "transform": repr(transform),
        "views": views,
        "files": files,
    }
    if shards is not None:
        description["shards"] = shards
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _size_and_mtime(path: str) -> tuple[int, int]:
    status = os.stat(path)
    return status.st_size, status.st_mtime_ns


@torch.no_grad()
def extract(
    backbone: torch.nn.Module,
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    num_workers: int,
    progress: bool = True,
    description: str = "features",
    channels_last: bool = False,
) -> torch.Tensor:
    """(N, D) pooled float32 features of a dataset, computed on `device` in eval mode (with
    `channels_last`, in that memory format, as `TransferClassifier` trains with it).

    A plain inference loop, not `Trainer.predict`: it runs inside `trainer.fit`
    (`CachedFeatureDataModule.prepare_data`), where the fitting Trainer cannot also predict.
    The random state is left as it was, so training draws the same numbers cached or not.
    """
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    backbone.eval().to(device, memory_format=memory_format)
    batches = []
    with isolate_rng():
        for images, _labels in tqdm(loader, desc=description, disable=not progress, leave=False):
            batch = images.to(device, memory_format=memory_format)
            batches.append(backbone(batch).float().cpu())
    return torch.cat(batches)


def load_or_extract(
    path: Path,
    key: str,
    make: Callable[[], torch.Tensor],
    expected_rows: int,
) -> tuple[torch.Tensor, bool]:
    """The cached features at `path` if their key and shape check out; else `make()` them and
    write them atomically. Returns (features, reused).

    Processes that ask for the same file at once (several ranks, several runs sharing a cache
    folder) take turns: the first extracts, the others then find the file written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(path.name + ".lock")):
        return _load_or_extract_locked(path, key, make, expected_rows)


def _load_or_extract_locked(
    path: Path, key: str, make: Callable[[], torch.Tensor], expected_rows: int
) -> tuple[torch.Tensor, bool]:
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as handle:
                stored_key = (handle.metadata() or {}).get("key")
                features = handle.get_tensor("features")
            if stored_key == key and features.shape[-2] == expected_rows:
                return features, True
            logger.warning(f"feature cache {path} does not match; rebuilding")
        except (SafetensorError, OSError, ValueError) as error:
            logger.warning(f"feature cache {path} is unreadable ({error}); rebuilding")
    features = make()
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
        temporary = Path(tmp.name)
    save_file({"features": features.contiguous()}, str(temporary), metadata={"key": key})
    os.replace(temporary, path)
    return features, False


class _AugmentedViews(Dataset):
    """K cached views per image; each access draws one view, so each epoch sees a fresh mix."""

    def __init__(self, views: torch.Tensor, labels: torch.Tensor) -> None:
        self.views = views  # (K, N, D)
        self.labels = labels

    def __len__(self) -> int:
        return self.views.shape[1]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        view = int(torch.randint(self.views.shape[0], ()))
        return self.views[view, index], self.labels[index]


class CachedFeatureDataModule(pl.LightningDataModule):
    """Train/validation/test loaders of cached backbone features for `TransferClassifier`.

    Attached to a Trainer, `prepare_data` extracts what the cache lacks on the first process
    and its device (`prepare_data_per_node = False`: the cache folder, like the run folder, is
    on storage every node sees) and `setup` loads the files on every process. Used on its own,
    `setup` extracts on `device`.
    """

    def __init__(
        self,
        model: TransferClassifier,
        images: BaseImageDataModule,
        cache_dir: str | Path,
        augmented_views: int = 0,
        device: str | torch.device = "cpu",
        progress: bool = True,
        splits: dict[str, LabelledImages] | None = None,
    ) -> None:
        super().__init__()
        self.prepare_data_per_node = False
        self.model = model
        self.images = images
        self.cache_dir = Path(cache_dir)
        self.augmented_views = augmented_views
        self.device = torch.device(device)
        self.progress = progress
        self.chosen_splits = splits  # the images of each split, where not the data module's
        self.report: dict[str, Any] = {}
        self.splits: dict[str, Dataset] = {}
        self._keys: dict[str, str] = {}

    def prepare_data(self) -> None:
        started = time.perf_counter()
        for split in self._sources():
            self._features(split)
        # `trainer.test` prepares again (finding everything cached): keep the first time
        self.report.setdefault("extraction_s", round(time.perf_counter() - started, 2))

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        for split in self._sources():
            features, labels = self.labelled_features(split)
            if self._augmented(split):
                self.splits[split] = _AugmentedViews(features, labels)
            else:
                self.splits[split] = TensorDataset(features[0], labels)

    def _sources(self) -> dict[str, LabelledImages]:
        if self.chosen_splits is not None:
            return self.chosen_splits
        sources = {"train": self.images.train_set, "val": self.images.val_set}
        if self.images.test_set is not None:
            sources["test"] = self.images.test_set
        return sources

    def _augmented(self, split: str) -> bool:
        return split == "train" and self.augmented_views > 0

    def labelled_features(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The split's cached (views, N, D) features, extracted first if needed, and its (N,)
        labels."""
        labels = torch.tensor([label for _, label in self._sources()[split].samples])
        return self._features(split), labels

    def _features(self, split: str) -> torch.Tensor:
        """The split's (views, N, D) features from the cache, extracted first if needed."""
        source = self._sources()[split]
        samples = source.samples
        augmented = self._augmented(split)
        transform = (
            self.images.train_set.transform
            if augmented
            else eval_transform(self.model.preprocessing)
        )
        views = self.augmented_views if augmented else 1
        seed = self.images.seed if augmented else None
        if split not in self._keys:  # hashing the weights takes a while for large backbones
            fingerprint = source.fingerprint()
            self._keys[split] = cache_key(self.model, samples, transform, views, seed, fingerprint)
        key = self._keys[split]
        path = self.cache_dir / f"features-{split}-{key[:20]}.safetensors"
        device = self.trainer.strategy.root_device if self.trainer is not None else self.device

        def make() -> torch.Tensor:
            dataset = source.with_transform(transform, augmentation_seed=seed)
            passes = []
            for view in range(views):
                dataset.set_epoch(view)  # view k: the augmentation of epoch k without the cache
                passes.append(
                    extract(
                        self.model.backbone,
                        dataset,
                        self.images.batch_size,
                        device,
                        self.images.num_workers,
                        self.progress,
                        f"Extracting {split} features on {device}",
                        self.model.hparams.channels_last,
                    )
                )
            return torch.stack(passes)

        features, reused = load_or_extract(path, key, make, len(samples))
        # the first look decides: extracted in prepare_data, then loaded in setup, is not reused
        self.report.setdefault(split, {"path": str(path), "reused": reused, "views": views})
        return features

    def _loader(self, split: str, train: bool) -> DataLoader:
        dataset, batch_size = self.splits[split], self.images.batch_size
        sampler = process_sampler(dataset, train, self.images.seed, self.trainer)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=train and drops_last_batch(len(sampler), batch_size),  # as for images
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
