"""Image sources: class-folder trees and `path,label` CSV files, listed and checked (the scan).

Every image file is checked when the dataset is scanned (`--verify`: decoded, header read, or
not at all), so a broken file is found before training starts: it is skipped, counted and
listed with its reason (`ScanResult.skipped`), never a crash in a data-loader worker hours
later. Files that are not images by their extension (descriptions, sounds) are not skipped but
ignored, and images in formats tlkit does not read (SVG drawings, HEIF photos, camera raw) are
named with what to do: both only counted by extension (`OtherFiles`). What the scan learns
is kept in a cached index (`scan_index`), so each file is checked once, not once per command
and per DDP rank. Layouts understood:

- ``DATA/train/<class>/...`` with optional ``DATA/val/`` and ``DATA/test/``;
- ``DATA/<class>/...``: one folder;
- ``labels.csv`` with columns ``path,label`` (paths relative to the CSV's folder).

(The splits a layout lacks are held out of its training images by `split.split_samples`.)

Hidden entries (dot-files and dot-folders such as ``.ipynb_checkpoints``, and macOS archives'
``__MACOSX``) are never classes or images, and are not counted. `find_images` (folder by
folder: `walk_images`) is tlkit's one image discovery, used by training, `predict` and `export`;
`csv_rows` its one CSV reader.
"""

from __future__ import annotations

import csv
import functools
import logging
import operator
import os
import stat
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tlkit.config import FinetuneConfig
from tlkit.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_SUFFIXES,
    UNREAD_IMAGE_FORMATS,
    inspect_images,
)
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
class OtherFiles:
    """The files beside the images that tlkit does not read, counted by extension (lower case;
    "" for none), never listed one by one: `ignored`, files that are not images (.txt
    descriptions, .ogg sounds), and `unread`, images in a format tlkit does not read
    (`images.UNREAD_IMAGE_FORMATS`: SVG drawings, HEIF photos, camera raw files)."""

    ignored: Counter[str] = field(default_factory=Counter)
    unread: Counter[str] = field(default_factory=Counter)

    @classmethod
    def from_counts(cls, ignored: dict[str, int], unread: dict[str, int]) -> OtherFiles:
        """From `{extension: files}` counts as `counts` gives them (a converted dataset's
        marker keeps them)."""
        return cls(Counter(ignored), Counter(unread))

    def add(self, name: str) -> None:
        """Count the file `name` (a path or a file name): unread if its extension is an image
        format tlkit does not read, else ignored."""
        extension = os.path.splitext(name)[1].lower()
        (self.unread if extension in UNREAD_IMAGE_FORMATS else self.ignored)[extension] += 1

    def update(self, other: OtherFiles) -> None:
        self.ignored.update(other.ignored)
        self.unread.update(other.unread)

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """`(ignored, unread)` as {extension: files}, most files first (summary.json's
        `ignored_files` and `unread_images`)."""
        return _most_first(self.ignored), _most_first(self.unread)

    def messages(self) -> list[str]:
        """What to tell the user: `ignored_message`, then `unread_messages`."""
        ignored = self.ignored_message()
        return ([ignored] if ignored else []) + self.unread_messages()

    def ignored_message(self) -> str | None:
        """One line counting the files that are not images, by extension; None if none."""
        ignored, _ = self.counts()
        if not ignored:
            return None
        return (
            f"Ignored {sum(ignored.values()):,} files that are not images: {_by_extension(ignored)}"
        )

    def unread_messages(self) -> list[str]:
        """One line per kind of image tlkit does not read: the files by extension and what to
        do with them."""
        by_advice: dict[str, dict[str, int]] = {}
        for extension, count in self.counts()[1].items():
            by_advice.setdefault(UNREAD_IMAGE_FORMATS[extension], {})[extension] = count
        return [
            f"Not read: {_by_extension(counts)} files, {advice}"
            for advice, counts in by_advice.items()
        ]

    def log(self, to: logging.Logger) -> None:
        """Log `messages`: the ignored files at INFO, the unread images (which ask the user to
        act) as warnings."""
        ignored = self.ignored_message()
        if ignored:
            to.info(ignored)
        for line in self.unread_messages():
            to.warning(line)


def _most_first(counts: Counter[str]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _by_extension(counts: dict[str, int]) -> str:
    """`7,858 .ogg, 952 .txt` (files without an extension: `(no extension)`)."""
    return ", ".join(
        f"{count:,} {extension or '(no extension)'}" for extension, count in counts.items()
    )


@dataclass
class ScanResult:
    """Usable samples `(path, class index)`, the class names, and what was skipped and why;
    the stored width and height of each usable image whose header was read (not with verify
    `none`), how the scan went (`statistics`) and the files it did not read (`other_files`)."""

    samples: list[tuple[str, int]]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    image_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    statistics: ScanStatistics | None = None
    other_files: OtherFiles = field(default_factory=OtherFiles)


def is_hidden(name: str) -> bool:
    """Dot-files and dot-folders (`.DS_Store`, `.ipynb_checkpoints`, AppleDouble `._x.jpg`) and
    the `__MACOSX` folder of zip files made on macOS: skipped as timm's and fastai's folder
    readers skip them, never a class or an image."""
    return name.startswith(".") or name == "__MACOSX"


# What `walk_images` yields per folder: its image files, the entries it skipped with the
# reason (unreadable folders, pipes, dangling links), and its other files, counted.
FolderListing = tuple[list[str], list[tuple[str, str]], OtherFiles]


def walk_images(folder: str | Path) -> Iterator[FolderListing]:
    """Per folder below `folder` (itself first, then sub-folders in sorted order; hidden entries
    left out; symbolic links followed once, loops cut): its image files (by extension,
    `images.IMAGE_EXTENSIONS`), the entries skipped with the reason each is not used, and the
    other files counted by extension (`OtherFiles`). A caller may stop early (`export` takes a
    few folders)."""
    for images, skipped, other_files in walk_listed(folder):
        yield [path for path, _, _ in images], skipped, other_files


def walk_listed(
    folder: str | Path,
) -> Iterator[tuple[list[ListedFile], list[tuple[str, str]], OtherFiles]]:
    """`walk_images`, with each image's size and modification time (for the scan index).

    Written on `os.scandir` rather than `os.walk`: its entries know their type from the
    directory listing, so telling files from folders costs no system call, and one `stat` per
    image gives its size and time; a warm scan of a large folder is mostly this listing."""
    seen_directories: set[str] = set()

    def visit(
        directory: str,
    ) -> Iterator[tuple[list[ListedFile], list[tuple[str, str]], OtherFiles]]:
        real = os.path.realpath(directory)
        if real in seen_directories:
            return
        seen_directories.add(real)
        try:
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=operator.attrgetter("name"))
        except OSError as error:
            yield [], [(directory, f"unreadable folder: {error.strerror}")], OtherFiles()
            return
        images: list[ListedFile] = []
        skipped: list[tuple[str, str]] = []
        other_files = OtherFiles()
        subdirectories = []
        for entry in entries:
            if is_hidden(entry.name):
                continue
            if entry.is_dir():  # follows symbolic links, as is_file() does
                subdirectories.append(entry.path)
            elif not entry.is_file():  # never open a pipe or device: reading could hang
                skipped.append((entry.path, "not a regular file (dangling link, pipe or device)"))
            elif not entry.name.lower().endswith(IMAGE_SUFFIXES):
                other_files.add(entry.name)
            else:
                try:
                    status = entry.stat()
                except OSError as error:  # gone since the listing
                    skipped.append((entry.path, f"unreadable: {error.strerror}"))
                    continue
                images.append((entry.path, status.st_size, status.st_mtime_ns))
        yield images, skipped, other_files
        for subdirectory in subdirectories:
            yield from visit(subdirectory)

    yield from visit(os.fspath(folder))


def find_images(folder: str | Path) -> FolderListing:
    """Every image file below `folder`, the entries skipped with reasons, and the other files
    counted (`walk_images`, all folders together)."""
    images: list[str] = []
    skipped: list[tuple[str, str]] = []
    other_files = OtherFiles()
    for folder_images, folder_skipped, folder_other_files in walk_images(folder):
        images += folder_images
        skipped += folder_skipped
        other_files.update(folder_other_files)
    return images, skipped, other_files


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
    other_files = OtherFiles()
    for class_dir in class_dirs:
        count = len(listed)
        class_other_files = OtherFiles()
        for images, folder_skipped, folder_other_files in walk_listed(class_dir):
            listed += images
            skipped += folder_skipped
            class_other_files.update(folder_other_files)
        if len(listed) == count:
            raise DatasetError(
                f"{class_dir}: class '{class_dir.name}' has no image files"
                + "".join(f". {line}" for line in class_other_files.messages())
            )
        labels += [index_of[class_dir.name]] * (len(listed) - count)
        other_files.update(class_other_files)
    checks = _ScanChecks(verify, max_pixels, scan_cache, use_index)
    return _keep_usable(listed, labels, classes, skipped, other_files, root, str(root), checks)


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
    unless `allow_outside_root`. A file listed twice is an error naming both lines. Rows naming
    an image format tlkit does not read are counted (`OtherFiles`), not checked. The other
    arguments are `scan`'s."""
    csv_path = Path(csv_path)
    root = csv_path.parent.resolve()
    rows = csv_rows(csv_path)
    if not rows:
        raise DatasetError(f"{csv_path}: no rows")
    missing, outside, listed, listed_labels = [], [], [], []
    other_files = OtherFiles()
    first_line: dict[Path, int] = {}
    for line, relative, label in rows:
        path = (root / relative).resolve()
        if path in first_line:  # else it could be both trained on and validated on
            raise DatasetError(
                f"{csv_path}: {relative} is listed more than once: lines {first_line[path]} "
                f"and {line}"
            )
        first_line[path] = line
        if not allow_outside_root and not path.is_relative_to(root):
            outside.append(relative)
        elif path.suffix.lower() in UNREAD_IMAGE_FORMATS:
            other_files.add(path.name)
        else:
            try:
                status = path.stat()
            except OSError:
                status = None
            if status is None or not stat.S_ISREG(status.st_mode):
                missing.append(relative)
            else:
                listed.append((str(path), status.st_size, status.st_mtime_ns))
                listed_labels.append(label)
    if outside:
        raise DatasetError(
            f"{csv_path}: paths outside {root}: {outside[:5]} "
            "(allow them explicitly with --csv-paths-outside-root)"
        )
    if missing:
        raise DatasetError(
            f"{csv_path}: {len(missing)} listed files do not exist, e.g. {missing[:5]}"
        )
    unread_only = sorted({label for _, _, label in rows} - set(listed_labels))
    if unread_only:
        raise DatasetError(
            f"{csv_path}: labels {unread_only} have no image in a format tlkit reads"
            + "".join(f". {line}" for line in other_files.messages())
        )
    classes = _known_classes(sorted({label for _, _, label in rows}), classes, csv_path, "labels")
    index_of = {name: index for index, name in enumerate(classes)}
    labels = [index_of[label] for label in listed_labels]
    checks = _ScanChecks(verify, max_pixels, scan_cache, use_index)
    return _keep_usable(listed, labels, classes, [], other_files, csv_path, str(root), checks)


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
    other_files: OtherFiles,
    source: Path,
    root: str,
    checks: _ScanChecks,
) -> ScanResult:
    """The scan's result: the files that passed their check, the others with the reason, and
    the files not read (`other_files`, as the listing counted them)."""
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
        raise DatasetError(
            f"{source}: no usable image ({len(skipped)} files skipped{example})"
            + "".join(f". {line}" for line in other_files.messages())
        )
    return ScanResult(samples, classes, skipped, image_sizes, statistics, other_files)


def data_root(source: str | Path) -> Path:
    """The folder that split.csv's paths are relative to: a CSV's folder, or the data folder."""
    source = Path(source)
    return source.parent.resolve() if source.suffix.lower() == ".csv" else source


def relative_path(path: str, root: str | Path) -> str:
    """`path` relative to `root`, with forward slashes on every system."""
    return Path(os.path.relpath(path, root)).as_posix()
