"""The embedded default job: texture patches from scikit-image's bundled photos, a classic
baseline, and the bundled EfficientNet-Lite0 fine-tuned on the same split.

scikit-image ships its sample photos inside the wheel (no download). Six of them are
textures or texture-like scenes; each is cut into a 4x4 grid of regions, and every region
belongs to exactly one split (train, val or test), so no test patch shares a pixel with a
training one. Patches of random size, quarter-turn and mirror are cut inside their region and
written out as an ordinary image folder (train/, val/, test/), so the demo exercises exactly
the path a user's own folder takes.

The baseline is what a newcomer would try first: an RBF support-vector machine on the raw
pixels, its C and gamma chosen by cross-validation on the training split alone (folds grouped
by region, so validation patches never overlap the patches of their fold's training part).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import skimage.data
from skimage.color import rgb2gray
from sklearn.model_selection import GridSearchCV, GroupKFold
from sklearn.svm import SVC

from tlkit.config import FinetuneConfig
from tlkit.data.images import write_image_folder
from tlkit.runfolder import RunSummary, write_atomic
from tlkit.train.finetune import finetune

logger = logging.getLogger(__name__)

# Class name -> the `skimage.data` function whose photo it is cut from (all bundled in the wheel).
TEXTURE_SOURCES = {
    "brick": "brick",
    "grass": "grass",
    "gravel": "gravel",
    "moon": "moon",
    "stars": "hubble_deep_field",
    "tissue": "immunohistochemistry",
}
SOURCE_SIDE = 512  # every photo is brought to 512x512 grey levels first
GRID = 4  # 4x4 regions of 128x128 pixels per photo
PATCH_SIZE = 64  # the written patches' side
PATCHES_PER_REGION = 12
VAL_REGIONS = 2  # per photo; the test split takes one region per grid row, the rest is train
SPLITS = ("train", "val", "test")
BASELINE_FILE = "baseline.json"  # in the run folder, beside summary.json


@dataclass(frozen=True)
class PatchSplit:
    """One split of the patch dataset: images, integer labels, and the region each came from."""

    images: np.ndarray  # N x PATCH_SIZE x PATCH_SIZE uint8 grey levels
    labels: np.ndarray  # N integer labels, indices into TEXTURE_SOURCES
    regions: np.ndarray  # N region ids, unique across photos


def source_photo(name: str) -> np.ndarray:
    """The bundled photo `skimage.data.<name>()` as SOURCE_SIDE x SOURCE_SIDE uint8 grey levels
    (short side resized to SOURCE_SIDE, centre crop). Colour is dropped so the classes differ
    by texture, not by a tint any classifier would read off the mean pixel."""
    photo = getattr(skimage.data, name)()
    grey = np.round(rgb2gray(photo) * 255).astype(np.uint8) if photo.ndim == 3 else photo
    height, width = grey.shape
    scale = SOURCE_SIDE / min(height, width)
    size = (max(SOURCE_SIDE, round(width * scale)), max(SOURCE_SIDE, round(height * scale)))
    grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
    top = (grey.shape[0] - SOURCE_SIDE) // 2
    left = (grey.shape[1] - SOURCE_SIDE) // 2
    return grey[top : top + SOURCE_SIDE, left : left + SOURCE_SIDE]


def region_splits(rng: np.random.Generator) -> np.ndarray:
    """A GRID x GRID array of split names: one test region per row, each in its own column
    (a shifted diagonal, so the test regions cover every row and column of the photo), then
    VAL_REGIONS random regions for validation; the rest is train."""
    assignment = np.full((GRID, GRID), "train", dtype=object)
    shift = rng.integers(GRID)
    for row in range(GRID):
        assignment[row, (row + shift) % GRID] = "test"
    train_cells = np.flatnonzero(assignment.ravel() == "train")
    assignment.ravel()[rng.choice(train_cells, VAL_REGIONS, replace=False)] = "val"
    return assignment


def cut_patch(region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random square inside `region` (side between half and all of the region's), turned by
    a random quarter-turn, mirrored at random, resized to PATCH_SIZE."""
    side = region.shape[0]
    crop = rng.integers(side // 2, side + 1)
    top, left = rng.integers(0, side - crop + 1, size=2)
    patch = np.rot90(region[top : top + crop, left : left + crop], k=rng.integers(4))
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    return cv2.resize(
        np.ascontiguousarray(patch), (PATCH_SIZE, PATCH_SIZE), interpolation=cv2.INTER_AREA
    )


def texture_patches(seed: int = 0) -> dict[str, PatchSplit]:
    """The patch dataset, split by region; the same seed gives the same patches."""
    rng = np.random.default_rng(seed)
    region_side = SOURCE_SIDE // GRID
    collected: dict[str, list[tuple[np.ndarray, int, int]]] = {split: [] for split in SPLITS}
    for label, source in enumerate(TEXTURE_SOURCES.values()):
        photo = source_photo(source)
        assignment = region_splits(rng)
        for row in range(GRID):
            for column in range(GRID):
                region = photo[
                    row * region_side : (row + 1) * region_side,
                    column * region_side : (column + 1) * region_side,
                ]
                region_id = (label * GRID + row) * GRID + column
                for _ in range(PATCHES_PER_REGION):
                    collected[assignment[row, column]].append(
                        (cut_patch(region, rng), label, region_id)
                    )
    return {
        split: PatchSplit(
            np.stack([patch for patch, _, _ in rows]),
            np.array([label for _, label, _ in rows]),
            np.array([region for _, _, region in rows]),
        )
        for split, rows in collected.items()
    }


def write_textures_folder(root: str | Path, seed: int = 0) -> dict[str, PatchSplit]:
    """Write the patches as PNGs into `root/{train,val,test}/<class>/`; return the arrays."""
    root = Path(root)
    patches = texture_patches(seed)
    class_names = list(TEXTURE_SOURCES)
    for split, data in patches.items():
        write_image_folder(data.images, data.labels, class_names, root / split)
    return patches


@dataclass(frozen=True)
class BaselineResult:
    """The classic baseline's test accuracy and the settings cross-validation chose."""

    method: str
    test_acc: float
    settings: dict[str, float]
    test_images: int
    seconds: float  # wall time of the search, the refit and the test scoring


def pixel_features(images: np.ndarray) -> np.ndarray:
    """Raw pixels scaled to [0, 1], one row per image."""
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def classic_baseline(train: PatchSplit, test: PatchSplit, folds: int = 4) -> BaselineResult:
    """An RBF SVM on raw pixels, C and gamma chosen by grouped cross-validation on `train` only,
    refitted on all of `train` and scored once on `test`."""
    started = time.perf_counter()
    features = pixel_features(train.images)
    # gamma around scikit-learn's own 'scale' heuristic, 1 / (features x variance).
    scale = 1.0 / (features.shape[1] * features.var())
    grid = {"C": [1.0, 10.0, 100.0], "gamma": [scale * factor for factor in (0.1, 1.0, 10.0)]}
    search = GridSearchCV(SVC(), grid, cv=GroupKFold(n_splits=folds))
    search.fit(features, train.labels, groups=train.regions)
    test_acc = float(search.score(pixel_features(test.images), test.labels))
    seconds = time.perf_counter() - started
    settings = {name: float(value) for name, value in search.best_params_.items()}
    logger.info(
        "Classic baseline, SVC on raw pixels (%s, chosen by %d-fold cross-validation on the "
        "training patches): test accuracy %.4f in %.0f s",
        ", ".join(f"{name}={value:.3g}" for name, value in settings.items()),
        folds,
        test_acc,
        seconds,
    )
    return BaselineResult("SVC on raw pixels", test_acc, settings, len(test.labels), seconds)


def demo_config(out: str | Path = "runs/demo", **overrides) -> FinetuneConfig:
    """The demo's settings: bundled weights, 64px patches, everything else `--strategy auto`'s.

    Auto measures the patches first (a linear probe on cached frozen features: it classifies
    every validation patch) and so trains only the head, on the features it has already
    extracted. The input stays at the patches' own 64px: auto would upsample them to 128px,
    which quadruples the extraction on 2 CPU cores for no accuracy to gain."""
    values = {
        "data_dir": str(Path(out).parent / f"{Path(out).name}-textures"),
        "out": str(out),
        "backbone": "tf_efficientnet_lite0",
        "pretrained": "bundled",
        "strategy": "auto",
        "img_size": 64,
    }
    return FinetuneConfig.from_dict({**values, **overrides})


def run_demo(config: FinetuneConfig, seed: int = 0) -> tuple[RunSummary, BaselineResult]:
    """Write the patch folder to `config.data_dir`, score the classic baseline on its split,
    train as `config` says; the baseline is written to the run folder as baseline.json."""
    patches = write_textures_folder(config.data_dir, seed)
    counts = ", ".join(f"{len(data.labels)} {split}" for split, data in patches.items())
    logger.info(
        "Demo data: %d texture classes cut from scikit-image's photos, split by region "
        "(%s patches) in %s",
        len(TEXTURE_SOURCES),
        counts,
        config.data_dir,
    )
    baseline = classic_baseline(patches["train"], patches["test"])
    summary = finetune(config)
    write_atomic(
        Path(config.out) / BASELINE_FILE, json.dumps(dataclasses.asdict(baseline), indent=2) + "\n"
    )
    return summary, baseline
