import os
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY_CONFIG, write_colour_images

from tlkit import FinetuneConfig, finetune
from tlkit.data.datamodule import ImageDataModule
from tlkit.infer.predict import evaluate, load_model
from tlkit.model.classifier import TransferClassifier
from tlkit.runfolder import read_summary
from tlkit.train.features import CachedFeatureDataModule, cache_key

SETTINGS = {
    **TINY_CONFIG,
    "epochs": 2,
    "strategy": "features",
    "augment": False,
    "lr": 1e-2,
    "seed": 0,
}


def test_cached_and_uncached_training_reach_the_same_head(colour_folder: Path, tmp_path: Path):
    cached = finetune(
        FinetuneConfig(data_dir=str(colour_folder), out=str(tmp_path / "cached"), **SETTINGS),
        enable_progress_bar=False,
    )
    plain = finetune(
        FinetuneConfig(
            data_dir=str(colour_folder), out=str(tmp_path / "plain"), cache=False, **SETTINGS
        ),
        enable_progress_bar=False,
    )
    assert cached.feature_cache["train"]["reused"] is False and plain.feature_cache is None
    heads = [load_model(tmp_path / name).head for name in ("cached", "plain")]
    for first, second in zip(heads[0].parameters(), heads[1].parameters(), strict=True):
        assert torch.allclose(first, second, atol=1e-5)
    assert cached.test_acc == pytest.approx(plain.test_acc)
    # The checkpoint is an ordinary TransferClassifier: evaluation on images works unchanged.
    assert evaluate(tmp_path / "cached", colour_folder / "test")["top1"] == pytest.approx(
        cached.test_acc
    )


def feature_data(folder: Path, cache: Path, model: TransferClassifier, views: int = 0):
    images = ImageDataModule(
        folder, model.preprocessing, batch_size=8, num_workers=0, seed=0, val_fraction=0.3
    )
    images.setup()
    features = CachedFeatureDataModule(model, images, cache, views, "cpu", progress=False)
    features.setup()
    return features


@pytest.fixture()
def own_folder(tmp_path: Path) -> Path:
    write_colour_images(tmp_path / "data", per_class=5, seed=0, size=24)
    return tmp_path / "data"


def frozen_model(backbone_weights: str = "bundled", img_size: int = 32) -> TransferClassifier:
    return TransferClassifier(
        num_classes=3, pretrained=backbone_weights, strategy="features", img_size=img_size
    )


def test_cache_is_reused_and_invalidated_by_files_backbone_and_size(own_folder, tmp_path):
    cache = tmp_path / "cache"
    model = frozen_model()
    first = feature_data(own_folder, cache, model)
    assert first.report["train"]["reused"] is False
    again = feature_data(own_folder, cache, model)
    assert again.report["train"]["reused"] is True
    assert torch.equal(again.splits["train"].tensors[0], first.splits["train"].tensors[0])

    samples = first.images.train_set.samples
    key = cache_key(model, samples, "transform", 1, None)
    changed = samples[0][0]
    stat = os.stat(changed)
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cache_key(model, samples, "transform", 1, None) != key
    assert feature_data(own_folder, cache, model).report["train"]["reused"] is False
    assert cache_key(frozen_model("none"), samples, "transform", 1, None) != key
    assert cache_key(frozen_model(img_size=40), samples, "transform", 1, None) != key
    assert cache_key(model, samples[1:], "transform", 1, None) != key


def test_cache_key_follows_the_torch_and_timm_versions(own_folder: Path, monkeypatch):
    """A new torch or timm can compute different features from the same weights."""
    model = frozen_model()
    samples = [(str(path), 0) for path in sorted(own_folder.rglob("*.png"))]
    keys = [cache_key(model, samples, "transform", 1, None)]
    monkeypatch.setattr(timm, "__version__", "0.0.1")
    keys.append(cache_key(model, samples, "transform", 1, None))
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    keys.append(cache_key(model, samples, "transform", 1, None))
    assert len(set(keys)) == 3


def test_corrupt_cache_is_detected_and_rebuilt(own_folder, tmp_path, caplog):
    cache = tmp_path / "cache"
    model = frozen_model()
    path = Path(feature_data(own_folder, cache, model).report["train"]["path"])
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # a half-written file where a good one was
    rebuilt = feature_data(own_folder, cache, model)
    assert rebuilt.report["train"]["reused"] is False
    assert "unreadable" in caplog.text  # a logged warning, whatever handlers are set up
    assert path.read_bytes() == good
    assert not list(cache.glob("*.tmp"))


def test_augmented_views_are_cached_and_sampled(own_folder, tmp_path):
    model = frozen_model()
    data = feature_data(own_folder, tmp_path / "cache", model, views=3)
    train = data.splits["train"]
    assert train.views.shape[:2] == (3, len(train))
    assert not torch.equal(train.views[0], train.views[1])  # different augmentations
    features, label = train[0]
    assert any(torch.equal(features, train.views[view, 0]) for view in range(3))
    assert data.report["val"]["views"] == 1


def test_features_run_with_augmented_views_completes(colour_folder: Path, tmp_path: Path):
    out = tmp_path / "run"
    finetune(
        FinetuneConfig(
            data_dir=str(colour_folder),
            out=str(out),
            **{**SETTINGS, "augment": True, "epochs": 1},
            cache_augmented_views=2,
        ),
        enable_progress_bar=False,
    )
    assert read_summary(out).feature_cache["train"]["views"] == 2
