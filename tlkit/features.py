"""Cached-feature fast path for the frozen-backbone (`features`) strategy.

With a frozen backbone in eval mode, an image's features never change, yet the usual loop runs
the whole backbone on every image in every epoch. Here the backbone runs once per image (per
cached view) through `Trainer.predict`, the pooled features are stored in a safetensors file,
and the head trains on them through the same Lightning Trainer, callbacks and run folder; the
checkpoint is an ordinary `TransferClassifier` (the backbone's weights included), so evaluate,
predict, TTA and export use it unchanged.

A cache file is keyed by everything its features depend on: backbone, weights (a SHA-256 of
the backbone's tensors, whatever their source), input size and preprocessing, the transform (and
augmented view count), and the exact file list with each file's size and modification time. Any
change gives a new key and a new file; a file whose key, shapes or contents do not check out is
rebuilt, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, TensorDataset

from tlkit.augment import eval_transform, seed_worker_transform
from tlkit.data import ImageDataModule, ImageDataset, drops_last_batch
from tlkit.module import TransferClassifier


class _BackboneFeatures(pl.LightningModule):
    """`Trainer.predict` adapter: pooled backbone features of an image batch."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def predict_step(self, batch, batch_index: int) -> torch.Tensor:
        images, _labels = batch
        return self.backbone(images)


def _weights_digest(backbone: torch.nn.Module) -> str:
    """SHA-256 of the backbone's tensors: identifies the weights whatever their source."""
    digest = hashlib.sha256()
    for name, tensor in backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_key(
    model: TransferClassifier,
    samples: list[tuple[str, int]],
    transform,
    views: int,
    seed: int | None,
) -> str:
    """SHA-256 of everything the cached features depend on (`seed`: of random augmentation)."""
    files = [(path, label, *_size_and_mtime(path)) for path, label in samples]
    description = {
        "backbone": model.hparams.backbone,
        "weights": _weights_digest(model.backbone),
        "augmentation_seed": seed,
        "preprocessing": asdict(model.preprocessing),
        "transform": repr(transform),
        "views": views,
        "files": files,
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _size_and_mtime(path: str) -> tuple[int, int]:
    status = os.stat(path)
    return status.st_size, status.st_mtime_ns


def extract(
    backbone: torch.nn.Module,
    dataset: Dataset,
    batch_size: int,
    accelerator: str,
    num_workers: int,
    progress: bool = True,
) -> torch.Tensor:
    """(N, D) pooled features of a dataset, computed on the chosen device in eval mode."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        worker_init_fn=seed_worker_transform,
    )
    # Under DDP every process extracts (identical files, each written atomically); on GPUs each
    # uses its own device.
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=[local_rank] if accelerator in ("gpu", "cuda") else 1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
    )
    backbone.eval()
    with contextlib.redirect_stdout(sys.stderr):
        batches = trainer.predict(_BackboneFeatures(backbone), dataloaders=loader)
    return torch.cat(batches).float().cpu()


def load_or_extract(
    path: Path,
    key: str,
    make: Callable[[], torch.Tensor],
    expected_rows: int,
) -> tuple[torch.Tensor, bool]:
    """The cached features at `path` if their key and shape check out; else `make()` them and
    write them atomically. Returns (features, reused)."""
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as handle:
                stored_key = (handle.metadata() or {}).get("key")
                features = handle.get_tensor("features")
            if stored_key == key and features.shape[-2] == expected_rows:
                return features, True
            print(f"feature cache {path} does not match; rebuilding", file=sys.stderr)
        except (SafetensorError, OSError, ValueError) as error:
            print(f"feature cache {path} is unreadable ({error}); rebuilding", file=sys.stderr)
    features = make()
    path.parent.mkdir(parents=True, exist_ok=True)
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
    """Train/validation/test loaders of cached backbone features for `TransferClassifier`."""

    def __init__(
        self,
        model: TransferClassifier,
        images: ImageDataModule,
        cache_dir: str | Path,
        augmented_views: int = 0,
        accelerator: str = "auto",
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.images = images
        self.cache_dir = Path(cache_dir)
        self.augmented_views = augmented_views
        self.accelerator = accelerator
        self.progress = progress
        self.report: dict[str, Any] = {}
        self.splits: dict[str, Dataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        evaluation = eval_transform(self.model.preprocessing)
        sources = {"train": self.images.train_set, "val": self.images.val_set}
        if self.images.test_set is not None:
            sources["test"] = self.images.test_set
        for split, dataset in sources.items():
            augmented = split == "train" and self.augmented_views > 0
            self.splits[split] = self._cached(split, dataset.samples, evaluation, augmented)

    def _cached(self, split: str, samples, evaluation, augmented: bool) -> Dataset:
        transform = self.images.train_set.transform if augmented else evaluation
        views = self.augmented_views if augmented else 1
        seed = self.images.seed
        key = cache_key(self.model, samples, transform, views, seed if augmented else None)
        path = self.cache_dir / f"features-{split}-{key[:20]}.safetensors"

        def make() -> torch.Tensor:
            passes = []
            for view in range(views):
                if augmented:
                    transform.set_random_seed(seed + view)
                dataset = ImageDataset(samples, transform, self.images.max_image_pixels)
                passes.append(
                    extract(
                        self.model.backbone,
                        dataset,
                        self.images.batch_size,
                        self.accelerator,
                        self.images.num_workers,
                        self.progress,
                    )
                )
            return torch.stack(passes)

        features, reused = load_or_extract(path, key, make, len(samples))
        self.report[split] = {"path": str(path), "reused": reused, "views": views}
        labels = torch.tensor([label for _, label in samples])
        if augmented:
            return _AugmentedViews(features, labels)
        return TensorDataset(features[0], labels)

    def _loader(self, split: str, train: bool) -> DataLoader:
        dataset, batch_size = self.splits[split], self.images.batch_size
        drop_last = train and drops_last_batch(len(dataset), batch_size)  # as the image loader
        return DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=drop_last)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
