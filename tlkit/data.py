"""Image sources (folders, CSV files), robust decoding to 8-bit RGB, and the LightningDataModule.

Every file is checked when the dataset is scanned (`--verify`: decoded, header read, or not at
all), so a broken file is found before training starts: it is skipped, counted and listed
(`ScanResult.skipped`), never a crash in a data-loader worker hours later. What the scan learns
is kept in a cached index (`scan_index`), so each file is checked once, not once per command
and per DDP rank. Layouts understood:

- ``DATA/train/<class>/...`` with optional ``DATA/val/`` and ``DATA/test/``;
- ``DATA/<class>/...``: one folder, split into train/validation (`split_train_val`: stable
  under added and removed files, about the same fraction of every class, seeded);
- ``labels.csv`` with columns ``path,label`` (paths relative to the CSV's folder).

Hidden entries (dot-files and dot-folders such as ``.ipynb_checkpoints``, and macOS archives'
``__MACOSX``) are never classes or images. `find_images` (folder by folder: `walk_images`) is
tlkit's one image discovery, used by training, `predict` and `export`; `csv_rows` its one CSV
reader. A file that breaks after the scan is skipped when it
is loaded and recorded (`ImageDataset`), so training finishes.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import logging
import operator
import os
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, ImageOps
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from tlkit.augment import eval_transform, train_transform
from tlkit.backbones import Preprocessing
from tlkit.config import FinetuneConfig
from tlkit.errors import ConfigError, DatasetError
from tlkit.scan_index import FileCheck, ListedFile, ScanStatistics, checked_files

logger = logging.getLogger(__name__)

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
IMAGE_SUFFIXES = tuple(IMAGE_EXTENSIONS)  # for str.endswith, faster than splitting names
SCAN_DRAFT_SIZE = (64, 64)  # JPEGs are checked with a fast reduced-size decode
DEFAULT_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's decompression-bomb threshold
# What decoding a broken, vanished, oversized or unreadable file raises (Pillow, the OS, numpy)
LOAD_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# What the scan does with every image before training (--verify; docs/data.md measures them)
VERIFY_MODES = {
    "full": "decoded",  # as training will (JPEGs at reduced size): finds every broken file
    "header": "header read",  # format, width and height, the pixel limit; no pixels decoded
    "none": "listed",  # nothing opened: broken files are skipped when loaded, as timm does
}
_default = FinetuneConfig.field_default  # defaults shared with the config are the config's


@dataclass
class ScanResult:
    """Usable samples `(path, class index)`, the class names, and what was skipped and why;
    the stored width and height of each usable image whose header was read (not with verify
    `none`), and how the scan went (`statistics`)."""

    samples: list[tuple[str, int]]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    image_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    statistics: ScanStatistics | None = None


def is_hidden(name: str) -> bool:
    """Dot-files and dot-folders (`.DS_Store`, `.ipynb_checkpoints`, AppleDouble `._x.jpg`) and
    the `__MACOSX` folder of zip files made on macOS: skipped as timm's and fastai's folder
    readers skip them, never a class or an image."""
    return name.startswith(".") or name == "__MACOSX"


def _allow_in_pillow(max_pixels: int) -> None:
    """Let Pillow open images up to `max_pixels`.

    Pillow refuses an image above twice its process-wide `Image.MAX_IMAGE_PIXELS` when opening
    it, before tlkit's own check could accept it; a user's higher limit therefore raises
    Pillow's (it is never lowered: tlkit's own check enforces a lower user limit)."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def load_rgb(
    path: str | Path | BinaryIO,
    draft: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Decode an image file (a path, or a binary file object such as a shard's bytes in a
    `BytesIO`) to an HxWx3 uint8 RGB array.

    EXIF orientation is applied; grayscale, palette, CMYK and 16-bit images become 8-bit RGB;
    transparency is composited onto white. `draft` allows a faster reduced-size JPEG decode.
    Images of more than `max_pixels` pixels are refused before they are decoded (a
    decompression bomb: a small file that expands to gigabytes), whatever Pillow's own limit.
    """
    with _open_image(path, max_pixels) as image:
        return _to_rgb(image, draft)


def _open_image(path: str | Path, max_pixels: int) -> Image.Image:
    """The image at `path`, opened (its header read, no pixels decoded) and within the limit."""
    _allow_in_pillow(max_pixels)
    image = Image.open(path)
    if image.width * image.height > max_pixels:
        image.close()
        raise DatasetError(
            f"{image.width}x{image.height} = {image.width * image.height:,} pixels is above "
            f"the limit of {max_pixels:,} (--max-image-pixels)"
        )
    return image


def _to_rgb(image: Image.Image, draft: tuple[int, int] | None) -> np.ndarray:
    """Decode an opened image as `load_rgb` describes."""
    if draft is not None:
        image.draft("RGB", draft)
    image.load()
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "F":
        raise DatasetError("floating-point images are not supported")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"))


def inspect_image(path: str, verify: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> FileCheck:
    """Check `path` as `verify` says (`full` or `header`): its stored width and height, or why
    it cannot be used as an image."""
    try:
        with _open_image(path, max_pixels) as image:
            width, height = image.size
            if verify == "full":
                _to_rgb(image, SCAN_DRAFT_SIZE)
    except LOAD_ERRORS as error:  # truncated, unreadable, bad header, too large
        return None, None, f"{type(error).__name__}: {error}"
    return width, height, None


def inspect_images(
    paths: list[str], verify: str = "full", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> list[FileCheck]:
    """`inspect_image` of each path, in parallel threads (Pillow releases the GIL while it
    decodes, and reading headers waits on the disk)."""
    workers = min(8, os.cpu_count() or 1)
    check = functools.partial(inspect_image, verify=verify, max_pixels=max_pixels)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(check, paths))


def find_decode_problems(
    paths: list[str], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> list[str | None]:
    """For each path, why it cannot be decoded, or None; decoded in parallel threads."""
    return [problem for _, _, problem in inspect_images(paths, "full", max_pixels)]


def walk_images(
    folder: str | Path,
) -> Iterator[tuple[list[str], list[tuple[str, str]]]]:
    """Per folder below `folder` (itself first, then sub-folders in sorted order; hidden entries
    left out; symbolic links followed once, loops cut): its image files, and its other files
    with the reason each is not used. A caller may stop early (`export` takes a few folders)."""
    for images, others in walk_listed(folder):
        yield [path for path, _, _ in images], others


def walk_listed(folder: str | Path) -> Iterator[tuple[list[ListedFile], list[tuple[str, str]]]]:
    """`walk_images`, with each image's size and modification time (for the scan index).

    Written on `os.scandir` rather than `os.walk`: its entries know their type from the
    directory listing, so telling files from folders costs no system call, and one `stat` per
    image gives its size and time; a warm scan of a large folder is mostly this listing."""
    seen_directories: set[str] = set()

    def visit(directory: str) -> Iterator[tuple[list[ListedFile], list[tuple[str, str]]]]:
        real = os.path.realpath(directory)
        if real in seen_directories:
            return
        seen_directories.add(real)
        try:
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=operator.attrgetter("name"))
        except OSError as error:
            yield [], [(directory, f"unreadable folder: {error.strerror}")]
            return
        images: list[ListedFile] = []
        others: list[tuple[str, str]] = []
        subdirectories = []
        for entry in entries:
            if is_hidden(entry.name):
                continue
            if entry.is_dir():  # follows symbolic links, as is_file() does
                subdirectories.append(entry.path)
            elif not entry.is_file():  # never open a pipe or device: reading could hang
                others.append((entry.path, "not a regular file (dangling link, pipe or device)"))
            elif not entry.name.lower().endswith(IMAGE_SUFFIXES):
                others.append((entry.path, "not an image file extension"))
            else:
                try:
                    status = entry.stat()
                except OSError as error:  # gone since the listing
                    others.append((entry.path, f"unreadable: {error.strerror}"))
                    continue
                images.append((entry.path, status.st_size, status.st_mtime_ns))
        yield images, others
        for subdirectory in subdirectories:
            yield from visit(subdirectory)

    yield from visit(os.fspath(folder))


def find_images(folder: str | Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Every image file below `folder` (`walk_images`), and the other files with reasons."""
    images: list[str] = []
    others: list[tuple[str, str]] = []
    for folder_images, folder_others in walk_images(folder):
        images += folder_images
        others += folder_others
    return images, others


def scan_folder(
    root: str | Path,
    classes: list[str] | None = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    *,
    verify: str = _default("verify"),
    scan_cache: str = _default("scan_cache"),
    use_index: bool = True,
) -> ScanResult:
    """Scan `root/<class>/...`; with `classes` given, folder names must be among them. The
    other arguments are `scan`'s."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    class_dirs = sorted(
        entry for entry in root.iterdir() if entry.is_dir() and not is_hidden(entry.name)
    )
    if not class_dirs:
        raise DatasetError(f"{root}: no class sub-folders (expected {root}/<class name>/<images>)")
    classes = _known_classes([entry.name for entry in class_dirs], classes, root, "classes")
    index_of = {name: index for index, name in enumerate(classes)}
    listed: list[ListedFile] = []
    labels: list[int] = []
    skipped: list[tuple[str, str]] = []
    for class_dir in class_dirs:
        count = len(listed)
        for images, others in walk_listed(class_dir):
            listed += images
            skipped += others
        if len(listed) == count:
            raise DatasetError(f"{class_dir}: class '{class_dir.name}' has no image files")
        labels += [index_of[class_dir.name]] * (len(listed) - count)
    checks = _ScanChecks(verify, max_pixels, scan_cache, use_index)
    return _keep_usable(listed, labels, classes, skipped, root, str(root), checks)


def read_csv(
    csv_path: str | Path,
    classes: list[str] | None = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    allow_outside_root: bool = False,
    *,
    verify: str = _default("verify"),
    scan_cache: str = _default("scan_cache"),
    use_index: bool = True,
) -> ScanResult:
    """Read `path,label` rows; paths are relative to the CSV's folder and must stay inside it
    unless `allow_outside_root`. A file listed twice is an error naming both lines. The other
    arguments are `scan`'s."""
    csv_path = Path(csv_path)
    root = csv_path.parent.resolve()
    rows = csv_rows(csv_path)
    if not rows:
        raise DatasetError(f"{csv_path}: no rows")
    missing, outside, listed = [], [], []
    first_line: dict[Path, int] = {}
    for line, relative, _ in rows:
        path = (root / relative).resolve()
        if path in first_line:  # else it could be both trained on and validated on
            raise DatasetError(
                f"{csv_path}: {relative} is listed more than once: lines {first_line[path]} "
                f"and {line}"
            )
        first_line[path] = line
        if not allow_outside_root and not path.is_relative_to(root):
            outside.append(relative)
        else:
            try:
                status = path.stat()
            except OSError:
                status = None
            if status is None or not stat.S_ISREG(status.st_mode):
                missing.append(relative)
            else:
                listed.append((str(path), status.st_size, status.st_mtime_ns))
    if outside:
        raise DatasetError(
            f"{csv_path}: paths outside {root}: {outside[:5]} "
            "(allow them explicitly with --csv-paths-outside-root)"
        )
    if missing:
        raise DatasetError(
            f"{csv_path}: {len(missing)} listed files do not exist, e.g. {missing[:5]}"
        )
    classes = _known_classes(sorted({label for _, _, label in rows}), classes, csv_path, "labels")
    index_of = {name: index for index, name in enumerate(classes)}
    labels = [index_of[label] for _, _, label in rows]
    checks = _ScanChecks(verify, max_pixels, scan_cache, use_index)
    return _keep_usable(listed, labels, classes, [], csv_path, str(root), checks)


def csv_rows(csv_path: Path) -> list[tuple[int, str, str]]:
    """(line number, path, label) of each row; a row with missing or extra fields or an empty
    path or label is an error naming its line. A UTF-8 byte-order mark (Excel's "CSV UTF-8")
    is accepted."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None or not {"path", "label"} <= set(header):
                raise DatasetError(f"{csv_path}: needs a header with columns 'path' and 'label'")
            path_column, label_column = header.index("path"), header.index("label")
            rows = []
            for fields in reader:
                where = f"{csv_path}, line {reader.line_num}"
                if not fields:  # a blank line
                    continue
                if len(fields) != len(header):
                    raise DatasetError(
                        f"{where}: expected {len(header)} fields ({','.join(header)}), "
                        f"found {len(fields)}"
                    )
                path, label = fields[path_column], fields[label_column]
                for name, value in (("path", path), ("label", label)):
                    if not value.strip():
                        raise DatasetError(f"{where}: empty {name}")
                rows.append((reader.line_num, path, label))
    except UnicodeDecodeError as error:
        raise DatasetError(
            f"{csv_path}: not UTF-8 text ({error}); save it as UTF-8 (Excel: 'CSV UTF-8')"
        ) from error
    return rows


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
    *,
    verify: str = _default("verify"),
    scan_cache: str = _default("scan_cache"),
    use_index: bool = True,
) -> ScanResult:
    """A CSV file or a class-folder tree, every image checked as `verify` says
    (`VERIFY_MODES`). The outcome of each check is kept in the source's scan index in
    `scan_cache` (default: `scan_index.default_cache_dir()`), so a file is checked again only
    when it changed; `use_index=False` checks every file without the index."""
    source = Path(source)
    options = {"verify": verify, "scan_cache": scan_cache, "use_index": use_index}
    if source.suffix.lower() == ".csv" and source.is_file():
        return read_csv(source, classes, max_pixels, allow_outside_root, **options)
    if not source.exists():
        raise DatasetError(f"{source}: no such file or folder")
    return scan_folder(source, classes, max_pixels, **options)


@dataclass
class _ScanChecks:
    """How a scan checks its files (`scan`'s arguments)."""

    verify: str
    max_pixels: int
    scan_cache: str
    use_index: bool

    def run(self, listed: list[ListedFile], source: Path, root: str) -> tuple[list, ScanStatistics]:
        """The `FileCheck` of every listed file, and how the checking went."""
        if self.verify not in VERIFY_MODES:
            raise ConfigError(f"verify must be one of {', '.join(VERIFY_MODES)}")
        started = time.perf_counter()
        if self.verify == "none":
            checks: list[FileCheck] = [(None, None, None)] * len(listed)
            return checks, ScanStatistics(len(listed), 0, 0, None, time.perf_counter() - started)
        check = functools.partial(inspect_images, verify=self.verify, max_pixels=self.max_pixels)
        if not self.use_index:
            checks = check([path for path, _, _ in listed])
            seconds = time.perf_counter() - started
            return checks, ScanStatistics(len(listed), len(listed), 0, None, seconds)
        settings = {"verify": self.verify, "max_image_pixels": self.max_pixels}
        return checked_files(listed, source, root, settings, check, self.scan_cache or None)


def _keep_usable(
    listed: list[ListedFile],
    labels: list[int],
    classes: list[str],
    skipped: list[tuple[str, str]],
    source: Path,
    root: str,
    checks: _ScanChecks,
) -> ScanResult:
    """The scan's result: the files that passed their check, the others with the reason."""
    outcomes, statistics = checks.run(listed, source, root)
    samples: list[tuple[str, int]] = []
    image_sizes: dict[str, tuple[int, int]] = {}
    skipped = list(skipped)
    for (path, _, _), label, (width, height, problem) in zip(listed, labels, outcomes, strict=True):
        if problem is not None:
            skipped.append((path, problem))
            continue
        samples.append((path, label))
        if width is not None:
            image_sizes[path] = (width, height)
    # DEBUG (shown with `tlkit -v`): INFO lines go to standard output, which `evaluate` keeps
    # for its JSON.
    if checks.verify == "none":
        logger.debug(
            f"Listed {source}: {statistics.files:,} images, none opened (--verify none: a "
            "broken file is skipped when it fails to load)"
        )
    else:
        logger.debug(
            f"Scanned {source}: {statistics.files:,} images, {statistics.checked:,} "
            f"{VERIFY_MODES[checks.verify]} now, {statistics.reused:,} known from the scan index"
            f" ({statistics.seconds:.2f} s)"
        )
    if not samples:
        example = f", e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise DatasetError(f"{source}: no usable image ({len(skipped)} files skipped{example})")
    return ScanResult(samples, classes, skipped, image_sizes, statistics)


def data_root(source: str | Path) -> Path:
    """The folder that split.csv's paths are relative to: a CSV's folder, or the data folder."""
    source = Path(source)
    return source.parent.resolve() if source.suffix.lower() == ".csv" else source


def relative_path(path: str, root: str | Path) -> str:
    """`path` relative to `root`, with forward slashes on every system."""
    return Path(os.path.relpath(path, root)).as_posix()


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


class ImageDataset(Dataset):
    """(image tensor, class index) pairs from scanned samples and an albumentations transform.

    With an `augmentation_seed`, the (random) transform is reseeded for every image from (seed,
    epoch, image index): each image's augmentation is the same whichever process, worker or
    batch draws it, so a run repeats exactly and a resumed run continues the same stream, and it
    changes every epoch. `set_epoch` writes the epoch to shared memory, so data-loader workers
    started in an earlier epoch (persistent workers) see it too.

    A file that cannot be loaded any more (deleted, rewritten or grown since the scan) is an
    error naming it; with a `failure_log` it is instead recorded there and replaced by the next
    loadable sample, as timm's datasets do, so training goes on.
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

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def with_transform(self, transform, augmentation_seed: int | None = None) -> ImageDataset:
        """The same images with another transform (and augmentation seed)."""
        return ImageDataset(self.samples, transform, self.max_pixels, augmentation_seed)

    def images_of(self, samples: list[tuple[str, int]], transform) -> ImageDataset:
        """Some of these images (`samples` taken from `self.samples`) with `transform`."""
        return ImageDataset(samples, transform, self.max_pixels)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for offset in range(len(self.samples)):
            position = (index + offset) % len(self.samples)
            path, label = self.samples[position]
            try:
                image = load_rgb(path, max_pixels=self.max_pixels)
            except LOAD_ERRORS as error:
                reason = f"failed to load after the scan: {type(error).__name__}: {error}"
                if self.failure_log is None:
                    raise DatasetError(f"{path} {reason}") from error
                record_load_failure(self.failure_log, path, reason)
                continue
            if self.augmentation_seed is not None:
                self.transform.set_random_seed(self._image_seed(position))
            return self.transform(image=image)["image"], label
        raise DatasetError(f"none of the {len(self.samples)} images can be loaded any more")

    def _image_seed(self, index: int) -> int:
        return augmentation_seed(self.augmentation_seed, int(self._epoch), index)


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one image's augmentation in one epoch: from (run seed, epoch, the image's
    index in its split) alone, so it is the same whichever process, worker or batch loads it,
    and whether the image comes from a folder or from shards (`tlkit.shards`)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


@rank_zero_only
def _tell(message: str) -> None:
    logger.warning(message)


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
    datasets are available after `setup()`; `preprocessing` may be None where only
    `scan_splits()` is used (`tlkit convert`).

    `recorded_split` ({path relative to the data root: train | val | test}, a run's split.csv)
    replaces the computed split: recorded images that are gone are skipped, and images not in
    it are left out, so a resumed run trains and validates on exactly the images it started
    with. With `load_failure_log`, files that fail to load during training are recorded there
    (`load_failures()`) and skipped instead of stopping the run.
    """

    def __init__(
        self,
        data_dir: str | Path,
        preprocessing: Preprocessing | None,
        batch_size: int = _default("batch_size"),
        num_workers: int = _default("num_workers"),
        val_fraction: float = _default("val_fraction"),
        seed: int = _default("seed"),
        augment: bool = _default("augment"),
        augmentation: dict | None = None,
        max_image_pixels: int = _default("max_image_pixels"),
        verify: str = _default("verify"),
        scan_cache: str = _default("scan_cache"),
        csv_paths_outside_root: bool = _default("csv_paths_outside_root"),
        recorded_split: dict[str, str] | None = None,
        load_failure_log: str | Path | None = None,
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
        self.verify = verify
        self.scan_cache = scan_cache
        self.csv_paths_outside_root = csv_paths_outside_root
        self.recorded_split = recorded_split
        self.load_failure_log = Path(load_failure_log) if load_failure_log else None
        self.root = data_root(self.data_dir)
        self.classes: list[str] = []
        self.skipped: list[tuple[str, str]] = []
        self.train_set: ImageDataset | None = None
        self.val_set: ImageDataset | None = None
        self.test_set: ImageDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        splits = self.scan_splits()
        evaluation = eval_transform(self.preprocessing)
        options = {"max_pixels": self.max_image_pixels, "failure_log": self.load_failure_log}
        if self.augment:
            augmentation = train_transform(self.preprocessing, **self.augmentation)
            self.train_set = ImageDataset(
                splits["train"], augmentation, augmentation_seed=self.seed, **options
            )
        else:
            self.train_set = ImageDataset(splits["train"], evaluation, **options)
        self.val_set = ImageDataset(splits["val"], evaluation, **options)
        if splits.get("test"):
            self.test_set = ImageDataset(splits["test"], evaluation, **options)

    def scan_splits(self) -> dict[str, list[tuple[str, int]]]:
        """Scan the data and split it: the `(path, class index)` samples of train, val and (with
        a test/ folder) test. Sets `classes` and `skipped`. `setup` builds the datasets from it;
        `tlkit convert` writes it into shards (and needs no `preprocessing`)."""
        split_dir = self.data_dir / "train"
        train_scan = self._scan(split_dir if split_dir.is_dir() else self.data_dir)
        self.classes = train_scan.classes
        if len(self.classes) < 2:
            raise DatasetError(
                f"{self.data_dir}: found one class ({self.classes[0]}); a classifier needs two"
            )
        self.skipped = list(train_scan.skipped)
        val_dir, test_dir = self.data_dir / "val", self.data_dir / "test"
        splits: dict[str, list[tuple[str, int]]] = {}
        if split_dir.is_dir() and val_dir.is_dir():
            splits["train"] = train_scan.samples
            splits["val"] = self._scan_split(val_dir).samples
        else:
            splits["train"], splits["val"] = split_train_val(
                train_scan.samples, self.val_fraction, self.seed, self.root
            )
        if split_dir.is_dir() and test_dir.is_dir():
            splits["test"] = self._scan_split(test_dir).samples
        if self.recorded_split is not None:
            splits = self._follow_recorded_split(splits, self.recorded_split)
        return splits

    def _follow_recorded_split(
        self, scanned: dict[str, list[tuple[str, int]]], recorded: dict[str, str]
    ) -> dict[str, list[tuple[str, int]]]:
        """The scanned samples regrouped as `recorded` says; recorded files no longer found
        are added to `skipped`, files found but not recorded are left out (and counted)."""
        by_path = {
            relative_path(path, self.root): (path, label)
            for samples in scanned.values()
            for path, label in samples
        }
        already_skipped = {relative_path(path, self.root) for path, _ in self.skipped}
        splits: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
        for relative, split in recorded.items():
            if relative in by_path:
                splits[split].append(by_path[relative])
            elif relative not in already_skipped:
                reason = "in the run's recorded split.csv but no longer found"
                self.skipped.append((str(self.root / relative), reason))
        left_out = len(by_path.keys() - recorded.keys())
        if left_out:
            _tell(
                f"{self.data_dir}: {left_out} image{'s' if left_out > 1 else ''} not in the "
                "recorded split left out; a resumed run trains on exactly the split it started "
                "with (start a new run to use them)"
            )
        return splits

    def split_rows(self) -> list[tuple[str, str]]:
        """(path relative to the data root, train | val | test) of every image used: split.csv."""
        datasets = {"train": self.train_set, "val": self.val_set, "test": self.test_set}
        return [
            (relative_path(path, self.root), split)
            for split, dataset in datasets.items()
            if dataset is not None
            for path, _ in dataset.samples
        ]

    def load_failures(self) -> list[tuple[str, str]]:
        """`(path, reason)` of the files that failed to load during training, each once."""
        return read_load_failures(self.load_failure_log) if self.load_failure_log else []

    def _scan(self, source: Path, classes: list[str] | None = None) -> ScanResult:
        return scan(
            source,
            classes,
            self.max_image_pixels,
            self.csv_paths_outside_root,
            verify=self.verify,
            scan_cache=self.scan_cache,
        )

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
