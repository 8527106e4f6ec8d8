"""The stable train/validation/test split: a file's side depends on its path and the seed alone."""

from __future__ import annotations

import hashlib
from itertools import accumulate
from pathlib import Path

from tlkit.data.sources import relative_path
from tlkit.errors import DatasetError


def split_position(relative: str, seed: int) -> float:
    """A file's place in [0, 1) for the split: a seeded SHA-256 of its path relative to the
    data root, so it depends on that path and the seed alone."""
    digest = hashlib.sha256(f"{seed}\n{relative}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_samples(
    samples: list[tuple[str, int]], fractions: dict[str, float], seed: int, root: str | Path
) -> dict[str, list[tuple[str, int]]]:
    """Split samples into `train` and the held-out splits of `fractions` (in its order, e.g.
    `{"val": 0.1, "test": 0.1}`), stably under added and removed files.

    The held-out splits take consecutive bands of `split_position`: with val 0.1 and test 0.1,
    a file is validation below 0.1, test from 0.1 to 0.2, train above. That depends on the
    file alone, so adding or removing files never moves another file between splits, and every
    class holds out about each fraction of its images (binomial counts). Per class, ranked by
    position, the first held-out splits get at least one image each while one is left to
    train: with val and test, a class of three or more images is trained, validated and tested
    on, a class of two trained and validated on, a class of one only trained on. The
    correction gives a split that drew no image the lowest-ranked image after the earlier
    splits', and one that drew all of them hands the highest-ranked back to the later splits
    and train; only these corrections can change when files are added to such a small class.
    A validation split that would be empty (no class of two images) is an error.
    """
    positions = {path: split_position(relative_path(path, root), seed) for path, _ in samples}
    by_class: dict[int, list[str]] = {}
    for path, label in samples:
        by_class.setdefault(label, []).append(path)
    held_out = list(fractions)
    bounds = list(accumulate(fractions.values()))
    side: dict[str, str] = {}
    for paths in by_class.values():
        ranked = sorted(paths, key=positions.__getitem__)
        guaranteed = min(len(held_out), len(ranked) - 1)  # held-out splits sure of an image
        start = 0
        for number, (split, bound) in enumerate(zip(held_out, bounds, strict=True), start=1):
            drawn = sum(positions[path] < bound for path in ranked)  # the band's natural end
            lowest = start + 1 if number <= guaranteed else start
            highest = len(ranked) - 1 - max(0, guaranteed - number)
            end = min(max(drawn, lowest), highest)
            side.update(dict.fromkeys(ranked[start:end], split))
            start = end
    splits: dict[str, list[tuple[str, int]]] = {"train": [], **{name: [] for name in held_out}}
    for sample in samples:
        splits[side.get(sample[0], "train")].append(sample)
    if "val" in fractions and not splits["val"]:  # an empty test split only costs the estimate
        raise DatasetError(
            f"cannot split {len(samples)} images into train/validation: no class has two "
            "images; add images or provide a val/ folder"
        )
    return splits
