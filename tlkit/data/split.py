"""The stable train/validation split: a file's side depends on its path and the seed alone."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tlkit.data.sources import relative_path
from tlkit.errors import DatasetError


def split_position(relative: str, seed: int) -> float:
    """A file's place in [0, 1) for the train/validation split: a seeded SHA-256 of its path
    relative to the data root, so it depends on that path and the seed alone."""
    digest = hashlib.sha256(f"{seed}\n{relative}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_train_val(
    samples: list[tuple[str, int]], val_fraction: float, seed: int, root: str | Path
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Split training samples into train and validation, stably under added and removed files.

    A file is held out when its `split_position` is below `val_fraction`; that depends on the
    file alone, so adding or removing files never moves another file between train and
    validation, and every class holds out about `val_fraction` of its images (a binomial
    count). So that every class of two or more images is both validated and trained on, a
    class with no position below the fraction holds out its lowest-position image, and one with
    all of them below trains on its highest-position image; only these corrections can change
    when files are added to such a small class. A class of one image is trained on.
    """
    positions = {path: split_position(relative_path(path, root), seed) for path, _ in samples}
    by_class: dict[int, list[str]] = {}
    for path, label in samples:
        by_class.setdefault(label, []).append(path)
    held_out: set[str] = set()
    for paths in by_class.values():
        if len(paths) < 2:
            continue
        ranked = sorted(paths, key=positions.__getitem__)
        below = sum(positions[path] < val_fraction for path in paths)
        held_out.update(ranked[: min(max(below, 1), len(paths) - 1)])
    if not held_out:
        raise DatasetError(
            f"cannot split {len(samples)} images into train/validation: no class has two "
            "images; add images or provide a val/ folder"
        )
    train = [sample for sample in samples if sample[0] not in held_out]
    val = [sample for sample in samples if sample[0] in held_out]
    return train, val
