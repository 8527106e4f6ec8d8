"""Image sources (folders, CSV files), robust decoding to 8-bit RGB, and the LightningDataModule.

Every file is decoded once when the dataset is scanned, so a broken file is found before
training starts: it is skipped, counted and listed (`ScanResult.skipped`), never a crash in a
data-loader worker hours later. Layouts understood:

- ``DATA/train/<class>/...`` with optional ``DATA/val/`` and ``DATA/test/``;
- ``DATA/<class>/...``: one folder, split into train/validation (stratified, seeded);
- ``labels.csv`` with columns ``path,label`` (paths relative to the CSV's folder).
"""

from __future__ import annotations

import csv
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from tlkit.augment import eval_transform, train_transform
from tlkit.backbones import Preprocessing

IMAGE_EXTENSIONS = {
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
}
SCAN_DRAFT_SIZE = (64, 64)  # JPEGs are checked with a fast reduced-size decode
DEFAULT_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's decompression-bomb threshold


class DatasetError(ValueError):
    """The data cannot be used as given; the message names the problem and the path."""


@dataclass
class ScanResult:
    """Usable samples `(path, class index)`, the class names, and what was skipped and why."""

    samples: list[tuple[str, int]]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def load_rgb(
    path: str | Path,
    draft: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Decode an image file to an HxWx3 uint8 RGB array.

    EXIF orientation is applied; grayscale, palette, CMYK and 16-bit images become 8-bit RGB;
    transparency is composited onto white. `draft` allows a faster reduced-size JPEG decode.
    Images of more than `max_pixels` pixels are refused before they are decoded (a
    decompression bomb: a small file that expands to gigabytes).
    """
    with Image.open(path) as image:
        if image.width * image.height > max_pixels:
            raise ValueError(
                f"{image.width}x{image.height} = {image.width * image.height:,} pixels is above "
                f"the limit of {max_pixels:,} (--max-image-pixels)"
            )
        if draft is not None:
            image.draft("RGB", draft)
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            values = np.asarray(image, dtype=np.float64)
            gray = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
            return np.repeat(gray[..., None], 3, axis=2)
        if image.mode == "F":
            raise ValueError("floating-point images are not supported")
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA", "PA", "RGBa"):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        return np.asarray(image.convert("RGB"))


def _problem_decoding(path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> str | None:
    """Why `path` cannot be used as an image, or None if it decodes."""
    try:
        load_rgb(path, draft=SCAN_DRAFT_SIZE, max_pixels=max_pixels)
    except (UnidentifiedImageError, Image.DecompressionBombError) as error:
        return f"{type(error).__name__}: {error}"
    except (OSError, ValueError, SyntaxError) as error:  # truncated, unreadable, bad header
        return f"{type(error).__name__}: {error}"
    return None


def find_decode_problems(
    paths: list[str], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> list[str | None]:
    """For each path, why it cannot be decoded, or None; decoded in parallel threads."""
    workers = min(8, os.cpu_count() or 1)
    check = functools.partial(_problem_decoding, max_pixels=max_pixels)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL releases the GIL while decoding
        return list(pool.map(check, paths))


def _walk_images(folder: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files below `folder` (symlinks followed once, loops cut) and non-image files."""
    images, others = [], []
    seen_directories: set[str] = set()

    def unreadable(error: OSError) -> None:
        others.append((error.filename, f"unreadable folder: {error.strerror}"))

    for directory, subdirectories, files in os.walk(folder, onerror=unreadable, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen_directories:
            subdirectories[:] = []
            continue
        seen_directories.add(real)
        subdirectories.sort()
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(directory, name)
            if not os.path.isfile(path):  # never open a pipe or device: reading could hang
                others.append((path, "not a regular file (dangling link, pipe or device)"))
            elif Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                images.append(path)
            else:
                others.append((path, "not an image file extension"))
    return images, others


def scan_folder(
    root: str | Path,
    classes: list[str] | None = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> ScanResult:
    """Scan `root/<class>/...`; with `classes` given, folder names must be among them."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    class_dirs = sorted(entry for entry in root.iterdir() if entry.is_dir())
    if not class_dirs:
        raise DatasetError(f"{root}: no class sub-folders (expected {root}/<class name>/<images>)")
    classes = _known_classes([entry.name for entry in class_dirs], classes, root, "classes")
    index_of = {name: index for index, name in enumerate(classes)}
    paths, labels, skipped = [], [], []
    for class_dir in class_dirs:
        images, others = _walk_images(class_dir)
        if not images:
            raise DatasetError(f"{class_dir}: class '{class_dir.name}' has no image files")
        skipped += others
        paths += images
        labels += [index_of[class_dir.name]] * len(images)
    return _keep_decodable(paths, labels, classes, skipped, root, max_pixels)


def read_csv(
    csv_path: str | Path,
    classes: list[str] | None = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    allow_outside_root: bool = False,
) -> ScanResult:
    """Read `path,label` rows; paths are relative to the CSV's folder and must stay inside it
    unless `allow_outside_root`."""
    csv_path = Path(csv_path)
    root = csv_path.parent.resolve()
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
            raise DatasetError(f"{csv_path}: needs a header with columns 'path' and 'label'")
        rows = [(row["path"], row["label"]) for row in reader]
    if not rows:
        raise DatasetError(f"{csv_path}: no rows")
    missing, outside, paths = [], [], []
    for relative, _ in rows:
        path = (root / relative).resolve()
        if not allow_outside_root and not path.is_relative_to(root):
            outside.append(relative)
        elif not path.is_file():
            missing.append(relative)
        paths.append(str(path))
    if outside:
        raise DatasetError(
            f"{csv_path}: paths outside {root}: {outside[:5]} "
            "(allow them explicitly with --csv-paths-outside-root)"
        )
    if missing:
        raise DatasetError(
            f"{csv_path}: {len(missing)} listed files do not exist, e.g. {missing[:5]}"
        )
    classes = _known_classes(sorted({label for _, label in rows}), classes, csv_path, "labels")
    index_of = {name: index for index, name in enumerate(classes)}
    labels = [index_of[label] for _, label in rows]
    return _keep_decodable(paths, labels, classes, [], csv_path, max_pixels)


def _known_classes(
    found: list[str], classes: list[str] | None, source: Path, what: str
) -> list[str]:
    """The class list: `found` for training data; for evaluation data, the training `classes`,
    which must include every class found."""
    if classes is None:
        return found
    unknown = [name for name in found if name not in classes]
    if unknown:
        raise DatasetError(f"{source}: {what} {unknown} were not in the training classes {classes}")
    return classes


def scan(
    source: str | Path,
    classes: list[str] | None = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    allow_outside_root: bool = False,
) -> ScanResult:
    """A CSV file or a class-folder tree."""
    source = Path(source)
    if source.suffix.lower() == ".csv" and source.is_file():
        return read_csv(source, classes, max_pixels, allow_outside_root)
    if not source.exists():
        raise DatasetError(f"{source}: no such file or folder")
    return scan_folder(source, classes, max_pixels)


def _keep_decodable(
    paths: list[str],
    labels: list[int],
    classes: list[str],
    skipped: list[tuple[str, str]],
    source: Path,
    max_pixels: int,
) -> ScanResult:
    problems = find_decode_problems(paths, max_pixels)
    samples = [
        (p, y) for p, y, problem in zip(paths, labels, problems, strict=True) if problem is None
    ]
    skipped = skipped + [
        (p, problem) for p, problem in zip(paths, problems, strict=True) if problem
    ]
    if not samples:
        raise DatasetError(f"{source}: no usable image ({len(skipped)} files skipped)")
    return ScanResult(samples, classes, skipped)


def split_train_val(
    samples: list[tuple[str, int]], val_fraction: float, seed: int
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Stratified, seeded split of training samples into train and validation."""
    labels = [label for _, label in samples]
    try:
        train, val = train_test_split(
            samples, test_size=val_fraction, stratify=labels, random_state=seed
        )
    except ValueError as error:
        raise DatasetError(
            f"cannot split {len(samples)} images into train/validation with "
            f"--val-fraction {val_fraction} ({error}); add images, change the fraction, "
            "or provide a val/ folder"
        ) from error
    return list(train), list(val)


def write_image_folder(
    images: np.ndarray, labels: np.ndarray, class_names: list[str], root: str | Path
) -> Path:
    """Write an array source (N x H x W [x 3] uint8, integer labels) as `root/<class>/<i>.png`."""
    root = Path(root)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / class_names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index:05d}.png")
    return root


class ImageDataset(Dataset):
    """(image tensor, class index) pairs from scanned samples and an albumentations transform.

    With an `augmentation_seed`, the (random) transform is reseeded for every image from (seed,
    epoch, image index): each image's augmentation is the same whichever process, worker or
    batch draws it, so a run repeats exactly and a resumed run continues the same stream, and it
    changes every epoch. `set_epoch` writes the epoch to shared memory, so data-loader workers
    started in an earlier epoch (persistent workers) see it too.
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        transform,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        augmentation_seed: int | None = None,
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.max_pixels = max_pixels
        self.augmentation_seed = augmentation_seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            image = load_rgb(path, max_pixels=self.max_pixels)
        except Exception as error:
            raise RuntimeError(f"{path} decoded at scan time but not now: {error}") from error
        if self.augmentation_seed is not None:
            self.transform.set_random_seed(self._image_seed(index))
        return self.transform(image=image)["image"], label

    def _image_seed(self, index: int) -> int:
        entropy = [self.augmentation_seed, int(self._epoch), index]
        return int(np.random.SeedSequence(entropy).generate_state(1)[0])


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


class ImageDataModule(pl.LightningDataModule):
    """Train/validation/test loaders for an image folder or CSV, with the backbone's transforms.

    `augmentation` holds keyword arguments of `augment.train_transform` (scale range, flip,
    jitter); `augment=False` trains on the evaluation transform. `classes`, `skipped` and the
    datasets are available after `setup()`.
    """

    def __init__(
        self,
        data_dir: str | Path,
        preprocessing: Preprocessing,
        batch_size: int = 64,
        num_workers: int = -1,
        val_fraction: float = 0.1,
        seed: int = 0,
        augment: bool = True,
        augmentation: dict | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        csv_paths_outside_root: bool = False,
    ) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        self.preprocessing = preprocessing
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers < 0 else num_workers
        self.val_fraction = val_fraction
        self.seed = seed
        self.augment = augment
        self.augmentation = augmentation or {}
        self.max_image_pixels = max_image_pixels
        self.csv_paths_outside_root = csv_paths_outside_root
        self.classes: list[str] = []
        self.skipped: list[tuple[str, str]] = []
        self.train_set: ImageDataset | None = None
        self.val_set: ImageDataset | None = None
        self.test_set: ImageDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        split_dir = self.data_dir / "train"
        train_scan = self._scan(split_dir if split_dir.is_dir() else self.data_dir)
        self.classes = train_scan.classes
        if len(self.classes) < 2:
            raise DatasetError(
                f"{self.data_dir}: found one class ({self.classes[0]}); a classifier needs two"
            )
        self.skipped = list(train_scan.skipped)
        val_dir, test_dir = self.data_dir / "val", self.data_dir / "test"
        if split_dir.is_dir() and val_dir.is_dir():
            train_samples = train_scan.samples
            val_samples = self._scan_split(val_dir).samples
        else:
            train_samples, val_samples = split_train_val(
                train_scan.samples, self.val_fraction, self.seed
            )
        evaluation = eval_transform(self.preprocessing)
        limit = self.max_image_pixels
        if self.augment:
            augmentation = train_transform(self.preprocessing, **self.augmentation)
            self.train_set = ImageDataset(train_samples, augmentation, limit, self.seed)
        else:
            self.train_set = ImageDataset(train_samples, evaluation, limit)
        self.val_set = ImageDataset(val_samples, evaluation, limit)
        if split_dir.is_dir() and test_dir.is_dir():
            self.test_set = ImageDataset(self._scan_split(test_dir).samples, evaluation, limit)

    def _scan(self, source: Path, classes: list[str] | None = None) -> ScanResult:
        return scan(source, classes, self.max_image_pixels, self.csv_paths_outside_root)

    def _scan_split(self, folder: Path) -> ScanResult:
        result = self._scan(folder, self.classes)
        self.skipped += result.skipped
        return result

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        sampler = process_sampler(dataset, train, self.seed, self.trainer)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=train and drops_last_batch(len(sampler), self.batch_size),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            raise DatasetError(f"{self.data_dir}: no test/ split")
        return self._loader(self.test_set, train=False)
