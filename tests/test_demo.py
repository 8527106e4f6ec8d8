"""The demo's data set (texture patches split by region) and its classic baseline."""

from __future__ import annotations

import numpy as np

from tlkit.commands.demo import (
    GRID,
    PATCH_SIZE,
    PATCHES_PER_REGION,
    SPLITS,
    TEXTURE_SOURCES,
    VAL_REGIONS,
    PatchSplit,
    classic_baseline,
    region_splits,
    texture_patches,
)


def test_every_row_and_column_has_one_test_region_and_the_split_is_seeded():
    assignment = region_splits(np.random.default_rng(3))
    test = assignment == "test"
    assert test.sum(axis=0).tolist() == [1] * GRID and test.sum(axis=1).tolist() == [1] * GRID
    assert (assignment == "val").sum() == VAL_REGIONS
    again = region_splits(np.random.default_rng(3))
    assert (assignment == again).all()


def test_patches_are_balanced_deterministic_and_no_region_is_in_two_splits():
    patches = texture_patches(seed=0)
    classes = len(TEXTURE_SOURCES)
    test_regions, val_regions = GRID, VAL_REGIONS
    expected = {
        "train": (GRID * GRID - test_regions - val_regions) * PATCHES_PER_REGION,
        "val": val_regions * PATCHES_PER_REGION,
        "test": test_regions * PATCHES_PER_REGION,
    }
    for split, data in patches.items():
        assert data.images.shape == (classes * expected[split], PATCH_SIZE, PATCH_SIZE)
        assert data.images.dtype == np.uint8 and data.images.std() > 10  # real images, not blank
        assert np.bincount(data.labels).tolist() == [expected[split]] * classes
    regions = {split: set(patches[split].regions.tolist()) for split in SPLITS}
    assert not regions["train"] & regions["test"]
    assert not regions["train"] & regions["val"] and not regions["val"] & regions["test"]
    assert len(regions["train"] | regions["val"] | regions["test"]) == classes * GRID * GRID

    again = texture_patches(seed=0)
    assert all((patches[split].images == again[split].images).all() for split in SPLITS)
    other = texture_patches(seed=1)
    assert not (patches["test"].images == other["test"].images).all()


def test_the_baseline_is_tuned_on_train_and_scored_once_on_test():
    rng = np.random.default_rng(0)

    def split(count: int) -> PatchSplit:
        """Two classes, dark and bright noise, 8 patches per region."""
        labels = np.arange(count) % 2
        images = rng.normal(80 + 100 * labels[:, None, None], 20, size=(count, 8, 8))
        return PatchSplit(np.clip(images, 0, 255).astype(np.uint8), labels, np.arange(count) // 8)

    result = classic_baseline(split(64), split(40))
    assert result.test_acc == 1.0 and result.test_images == 40
    assert set(result.settings) == {"C", "gamma"} and result.method == "SVC on raw pixels"
