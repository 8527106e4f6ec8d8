"""Image sources: class-folder trees and `path,label` CSV files, listed and checked (the scan).

Every file is checked when the dataset is scanned (`--verify`: decoded, header read, or not at
all), so a broken file is found before training starts: it is skipped, counted and listed
(`ScanResult.skipped`), never a crash in a data-loader worker hours later. What the scan learns
is kept in a cached index (`scan_index`), so each file is checked once, not once per command
and per DDP rank. Layouts understood:

- ``DATA/train/<class>/...`` with optional ``DATA/val/`` and ``DATA/test/``;
- ``DATA/<class>/...``: one folder, split by `split.split_train_val`;
- ``labels.csv`` with columns ``path,label`` (paths relative to the CSV's folder), or
  ``path,labels`` for multi-label data: each row's class names separated by ``;``, empty for an
  image of none of the classes (`labels.LABEL_KINDS`).

Hidden entries (dot-files and dot-folders such as ``.ipynb_checkpoints``, and macOS archives'
``__MACOSX``) are never classes or images. `find_images` (folder by folder: `walk_images`) is
tlkit's one image discovery, used by training, `predict` and `export`; `csv_rows` its one CSV
reader.
"""

from __future__ import annotations

import csv
import functools
import logging
import operator
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tlkit.config import FinetuneConfig
from tlkit.data.images import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_SUFFIXES, inspect_images
from tlkit.data.labels import LABEL_KINDS, Label
from tlkit.data.scan_index import FileCheck, ListedFile, ScanStatistics, checked_files
from tlkit.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

# What the scan does with every image before training (--verify; docs/data.md measures them)
VERIFY_MODES = {
    "full": "decoded",  # as training will (JPEGs at reduced size): finds every broken file
    "header": "header read",  # format, width and height, the pixel limit; no pixels decoded
    "none": "listed",  # nothing opened: broken files are skipped when loaded, as timm does
}
_default = FinetuneConfig.field_default  # defaults shared with the config are the config's


@dataclass
class ScanResult:
    """Usable samples `(path, label)`, the class names, and what was skipped and why; the
    stored width and height of each usable image whose header was read (not with verify
    `none`), how the scan went (`statistics`), and how the data is labelled (`label_kind`, a
    key of `labels.LABEL_KINDS`)."""

    samples: list[tuple[str, Label]]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    image_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    statistics: ScanStatistics | None = None
    label_kind: str = "single-label"


def is_hidden(name: str) -> bool:
    """Dot-files and dot-folders (`.DS_Store`, `.ipynb_checkpoints`, AppleDouble `._x.jpg`) and
    the `__MACOSX` folder of zip files made on macOS: skipped as timm's and fastai's folder
    readers skip them, never a class or an image."""
    return name.startswith(".") or name == "__MACOSX"


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
    labels: list[Label] = []
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
    """Read `path,label` (or multi-label `path,labels`) rows; paths are relative to the CSV's
    folder and must stay inside it unless `allow_outside_root`. A file listed twice is an error
    naming both lines. The other arguments are `scan`'s."""
    csv_path = Path(csv_path)
    root = csv_path.parent.resolve()
    kind, rows = csv_rows(csv_path)
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
    found = sorted({name for _, _, names in rows for name in names})
    classes = _known_classes(found, classes, csv_path, "labels")
    index_of = {name: index for index, name in enumerate(classes)}
    labels = [LABEL_KINDS[kind].from_indices([index_of[n] for n in names]) for _, _, names in rows]
    checks = _ScanChecks(verify, max_pixels, scan_cache, use_index)
    result = _keep_usable(listed, labels, classes, [], csv_path, str(root), checks)
    result.label_kind = kind
    return result


def csv_rows(csv_path: Path) -> tuple[str, list[tuple[int, str, list[str]]]]:
    """The CSV's label kind (a `label` column: single-label; `labels`: multi-label) and its
    rows: (line number, path, class names). A row with missing or extra fields, an empty path
    or an empty single label is an error naming its line (a multi-label row may have no
    labels). A UTF-8 byte-order mark (Excel's "CSV UTF-8") is accepted."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            columns = [kind.csv_column for kind in LABEL_KINDS.values()]
            given = [column for column in columns if header and column in header]
            if header is None or "path" not in header or len(given) != 1:
                raise DatasetError(
                    f"{csv_path}: needs a header with columns 'path' and either 'label' (one "
                    "class per image) or 'labels' (multi-label, separated by ';')"
                )
            kind = next(k for k in LABEL_KINDS.values() if k.csv_column == given[0])
            path_column, label_column = header.index("path"), header.index(given[0])
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
                path, names = fields[path_column], kind.names_of(fields[label_column])
                if not path.strip():
                    raise DatasetError(f"{where}: empty path")
                if not names and not kind.may_be_unlabelled:
                    raise DatasetError(f"{where}: empty label")
                rows.append((reader.line_num, path, names))
    except UnicodeDecodeError as error:
        raise DatasetError(
            f"{csv_path}: not UTF-8 text ({error}); save it as UTF-8 (Excel: 'CSV UTF-8')"
        ) from error
    return kind.name, rows


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
    labels: list[Label],
    classes: list[str],
    skipped: list[tuple[str, str]],
    source: Path,
    root: str,
    checks: _ScanChecks,
) -> ScanResult:
    """The scan's result: the files that passed their check, the others with the reason."""
    outcomes, statistics = checks.run(listed, source, root)
    samples: list[tuple[str, Label]] = []
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
