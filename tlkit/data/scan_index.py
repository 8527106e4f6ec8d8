"""The scan index: what the scan learnt about every file, cached so that it is learnt once.

Checking every image before training (`data.scan`) costs a decode per file; the index keeps
each file's outcome (its width and height, or why it is unusable) keyed by its path, size and
modification time (`os.stat`'s `st_mtime_ns`), and the whole index by the check's settings (the
verify mode and `max_image_pixels`). A later scan (another command, a search trial, another DDP
rank) re-checks only files that were added or changed since; removed files leave the index; a
change of settings re-checks everything.

One index per scanned source (a folder or a CSV file, by the SHA-256 of its resolved path) in
a cache folder (`default_cache_dir`), never beside the data, which may be read-only or shared.

Concurrency: readers need no lock, because an index is only ever replaced whole
(`os.replace` of a finished temporary file). A process with files to check takes the index's
file lock (the `filelock` package, which torch itself depends on), reads the index again (the
process that held the lock before may have checked them meanwhile) and checks only what is
still missing. So when every DDP rank, or several commands, scan the same new folder at once,
the first builds the index and the others wait for it and then read it: every file is checked
once in total.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from tlkit.runfolder import write_atomic

logger = logging.getLogger(__name__)

# File format: a first line naming the format and its version, a second line holding the
# SHA-256 of the rest, then the rest, JSON. Why not pickle: loading a pickle runs code, and an
# index lives in a cache folder anyone with write access to it could fill. Why not sqlite3: it
# detects damage only in the pages a query happens to read, and its locking is unreliable on
# the network file systems that shared data lives on; a checksum over the whole file rejects
# any truncation, stray write or foreign file before one entry is believed, and one file
# replaced whole needs no locking to be read.
FORMAT_NAME = "tlkit-scan-index"
FORMAT_VERSION = 1
SAVE_EVERY_S = 60.0  # an interrupted cold scan of a large folder keeps what it had checked
CHECK_CHUNK = 2_000  # files checked between looks at the clock (and progress lines)
LOCK_POLL_S = 5.0  # how often a process waiting for another's scan says it is still waiting
OTHER_SETTINGS = "made with other settings"  # the reason logged (at DEBUG) for a re-check


# A file found by the listing: (path, size, modification time in ns), what identifies its
# content cheaply. Plain tuples: a named tuple costs a Python call per file of a large listing.
ListedFile = tuple[str, int, int]
# The outcome of checking one file: (stored width, stored height, why it is unusable): width and
# height are None where they are unknown (not read, or unreadable), the reason None if usable.
FileCheck = tuple[int | None, int | None, str | None]


@dataclass
class ScanStatistics:
    """How a scan went: files listed, files checked now (`checked`: decoded, or their header
    read), outcomes taken from the index (`reused`), the index file (None: no index used) and
    why an existing index was not used (`rebuilt_because`)."""

    files: int
    checked: int
    reused: int
    index: str | None
    seconds: float
    rebuilt_because: str | None = None


def default_cache_dir() -> Path:
    """`$TLKIT_CACHE/scan`, else `$XDG_CACHE_HOME/tlkit/scan`, else `~/.cache/tlkit/scan`."""
    if os.environ.get("TLKIT_CACHE"):
        return Path(os.environ["TLKIT_CACHE"]) / "scan"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "tlkit" / "scan"


def index_path(source: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The index file of `source` (a folder or CSV file) in `cache_dir` (default: the default)."""
    resolved = str(Path(source).resolve())
    digest = hashlib.sha256(resolved.encode()).hexdigest()[:32]
    return Path(cache_dir or default_cache_dir()) / f"{digest}.index"


@dataclass
class IndexColumns:
    """An index's content: one list per field, in the order of the listing it was made from,
    and the problem of each unusable file by path. (Flat lists rather than one small record
    per file: JSON decodes them several times faster, and a warm scan compares whole lists.)"""

    paths: list[str]
    sizes: list[int]
    mtimes: list[int]
    widths: list[int | None]
    heights: list[int | None]
    problems: dict[str, str]

    @classmethod
    def empty(cls) -> IndexColumns:
        return cls([], [], [], [], [], {})

    def selected(self, positions: list[int]) -> IndexColumns:
        """The entries at `positions` only."""
        paths = [self.paths[position] for position in positions]
        return IndexColumns(
            paths,
            [self.sizes[position] for position in positions],
            [self.mtimes[position] for position in positions],
            [self.widths[position] for position in positions],
            [self.heights[position] for position in positions],
            {path: self.problems[path] for path in paths if path in self.problems},
        )

    def lists_the_same_files_as(self, other: IndexColumns) -> bool:
        """Whether both hold the same paths with the same sizes and times, in the same order
        (three list comparisons, done in C: the whole cost of a warm scan beside the listing)."""
        return (
            self.paths == other.paths and self.sizes == other.sizes and self.mtimes == other.mtimes
        )

    def checks(self) -> list[FileCheck]:
        problem_of = self.problems.get
        return list(zip(self.widths, self.heights, map(problem_of, self.paths), strict=True))


def read_index(path: Path, source: str, settings: dict) -> tuple[IndexColumns, str | None]:
    """The content of the index at `path`, and why it cannot be used if it cannot (then an
    empty one): unreadable, damaged, another format or version, another source's, or made with
    other settings."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return IndexColumns.empty(), None
    except OSError as error:
        return IndexColumns.empty(), f"unreadable ({error.strerror})"
    header, _, rest = data.partition(b"\n")
    checksum, _, body = rest.partition(b"\n")
    name, _, version = header.decode("ascii", "replace").partition(" ")
    reason = None
    if name != FORMAT_NAME:
        reason = "not a tlkit scan index"
    elif version != str(FORMAT_VERSION):
        reason = f"written in format version {version!r}; this tlkit reads {FORMAT_VERSION}"
    elif hashlib.sha256(body).hexdigest().encode() != checksum:
        reason = "damaged (its checksum does not match: truncated or overwritten)"
    if reason:
        return IndexColumns.empty(), reason
    try:  # the checksum matched, so tlkit wrote it; a damaged structure is still not trusted
        content = json.loads(body)
        columns = IndexColumns(**content["columns"])
        lengths = {len(getattr(columns, name)) for name in ("sizes", "mtimes", "widths", "heights")}
        if lengths != {len(columns.paths)} or not isinstance(columns.problems, dict):
            raise ValueError("columns of unequal lengths")
        indexed_source, indexed_settings = content["source"], content["settings"]
    except (ValueError, TypeError, KeyError):
        return IndexColumns.empty(), "not a valid index (its content has the wrong structure)"
    if indexed_source != source:
        return IndexColumns.empty(), f"the index of another source ({indexed_source!r})"
    if indexed_settings != settings:
        return IndexColumns.empty(), f"{OTHER_SETTINGS} ({indexed_settings}, now {settings})"
    return columns, None


def write_index(path: Path, source: str, settings: dict, columns: IndexColumns) -> None:
    """Write the index atomically (`runfolder.write_atomic`: a temporary file, then a rename)."""
    content = {"source": source, "settings": settings, "columns": dataclasses.asdict(columns)}
    body = json.dumps(content, separators=(",", ":"))
    checksum = hashlib.sha256(body.encode()).hexdigest()  # JSON escapes non-ASCII: text = bytes
    write_atomic(path, f"{FORMAT_NAME} {FORMAT_VERSION}\n{checksum}\n{body}")


def checked_files(
    files: list[ListedFile],
    source: str | Path,
    root: str,
    settings: dict,
    check: Callable[[list[str]], list[FileCheck]],
    cache_dir: str | Path | None = None,
) -> tuple[list[FileCheck], ScanStatistics]:
    """The check of every file in `files` (in their order): from the index of `source` where
    the file's size and modification time are unchanged, else from `check` (which checks a
    list of paths), and the index brought up to date. Files are indexed by their path relative
    to `root` (the string their paths start with; others by their whole path). `settings`
    (JSON-serialisable) are the check's own: an index made with other settings is not used.

    A cache folder that cannot be created or written to costs the index, not the scan, and
    never a second check of a file: what a readable index knows is still used, every other
    file is checked once, and the user is told once per cache folder that the index could not
    be saved."""
    started = time.perf_counter()
    source = str(Path(source).resolve())
    prefix = root.rstrip(os.sep) + os.sep
    listing = IndexColumns(
        paths=[path[len(prefix) :] if path.startswith(prefix) else path for path, _, _ in files],
        sizes=[size for _, size, _ in files],
        mtimes=[mtime_ns for _, _, mtime_ns in files],
        widths=[None] * len(files),
        heights=[None] * len(files),
        problems={},
    )
    path = index_path(source, cache_dir)
    index, _ = read_index(path, source, settings)
    rebuilt_because = None
    saved = True
    if index.lists_the_same_files_as(listing):  # the warm scan: nothing added, changed, removed
        checks, checked = index.checks(), 0
    else:
        lock = _lock_or_none(path, source)
        try:
            if lock is not None:
                # Read again: as the process that held the lock before (if one did) left it.
                index, rebuilt_because = read_index(path, source, settings)
                if rebuilt_because:
                    level = logging.DEBUG if OTHER_SETTINGS in rebuilt_because else logging.WARNING
                    logger.log(level, f"Scan index {path} of {source} rebuilt: {rebuilt_because}")
            known = _reuse(index, listing)
            checked = known.count(False)
            saver = _IndexSaver(path, source, settings, listing, known) if lock else None
            _check_into(listing, known, files, check, saver.save if saver else None)
            saved = saver is not None and saver.save()
        finally:
            if lock is not None:
                lock.release()
        checks = listing.checks()
    statistics = ScanStatistics(
        files=len(files),
        checked=checked,
        reused=len(files) - checked,
        index=str(path) if saved else None,
        seconds=time.perf_counter() - started,
        rebuilt_because=rebuilt_because,
    )
    return checks, statistics


# Cache folders whose index could not be saved, told once per process (a run scans its train,
# val and test folders, auto's measurement and the run itself scan the same folder).
_UNSAVED_TOLD: set[str] = set()


def _tell_unsaved(path: Path, source: str, error: OSError) -> None:
    folder = str(path.parent)
    level = logging.DEBUG if folder in _UNSAVED_TOLD else logging.WARNING
    _UNSAVED_TOLD.add(folder)
    logger.log(
        level,
        f"Scan index of {source} cannot be saved in {folder} ({error}); every file is checked "
        "once now and again by the next command (choose a writable folder with --scan-cache)",
    )


def _lock_or_none(path: Path, source: str) -> FileLock | None:
    """The index's file lock, held (`_acquire`); None, told, if the cache folder cannot hold
    it (a file where the folder should be, a read-only or full file system)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return _acquire(path, source)
    except OSError as error:
        _tell_unsaved(path, source, error)
        return None


class _IndexSaver:
    """Saves what is known of `listing` to the index at `path`; after a failed save (the
    folder became unwritable, the disk is full) it tells the user once and saves no more, and
    the scan goes on with what it has checked."""

    def __init__(
        self, path: Path, source: str, settings: dict, listing: IndexColumns, known: list[bool]
    ) -> None:
        self.path, self.source, self.settings = path, source, settings
        self.listing, self.known = listing, known
        self.failed = False

    def save(self) -> bool:
        """Save the files checked so far; whether the index is saved."""
        if self.failed:
            return False
        done = [position for position, known in enumerate(self.known) if known]
        try:
            write_index(self.path, self.source, self.settings, self.listing.selected(done))
        except OSError as error:
            self.failed = True
            _tell_unsaved(self.path, self.source, error)
        return not self.failed


def _reuse(index: IndexColumns, listing: IndexColumns) -> list[bool]:
    """Copy into `listing` the index's outcome of every file whose size and modification time
    are unchanged; whether each file's outcome is known."""
    position_in_index = {path: position for position, path in enumerate(index.paths)}
    known = []
    for position, path in enumerate(listing.paths):
        at = position_in_index.get(path)
        same = (
            at is not None
            and index.sizes[at] == listing.sizes[position]
            and index.mtimes[at] == listing.mtimes[position]
        )
        if same:
            listing.widths[position] = index.widths[at]
            listing.heights[position] = index.heights[at]
            if path in index.problems:
                listing.problems[path] = index.problems[path]
        known.append(same)
    return known


def _check_into(
    listing: IndexColumns,
    known: list[bool],
    files: list[ListedFile],
    check: Callable[[list[str]], list[FileCheck]],
    save: Callable[[], bool] | None,
) -> None:
    """Check the files whose outcome is not `known` in chunks, putting each outcome into
    `listing`; with `save`, save what is known every `SAVE_EVERY_S` seconds and say how far the
    scan is."""
    to_check = [position for position, done in enumerate(known) if not done]
    last_save = time.perf_counter()
    for start in range(0, len(to_check), CHECK_CHUNK):
        chunk = to_check[start : start + CHECK_CHUNK]
        outcomes = check([files[position][0] for position in chunk])
        for position, (width, height, problem) in zip(chunk, outcomes, strict=True):
            listing.widths[position], listing.heights[position] = width, height
            if problem is not None:
                listing.problems[listing.paths[position]] = problem
            known[position] = True
        if save is not None and time.perf_counter() - last_save > SAVE_EVERY_S:
            saved = save()
            last_save = time.perf_counter()
            done = start + len(chunk)
            note = " (index saved)" if saved else ""
            logger.debug(f"Scan: {done:,} of {len(to_check):,} files checked{note}")


def _acquire(path: Path, source: str) -> FileLock:
    """Take the index's file lock; while another process holds it (scanning the same source),
    wait, saying so every `LOCK_POLL_S` seconds, never silently."""
    lock = FileLock(f"{path}.lock")
    timeout = 0.0
    while True:
        try:
            lock.acquire(timeout=timeout)
            return lock
        except Timeout:
            logger.warning(f"Waiting for another process scanning {source} ({lock.lock_file})")
            timeout = LOCK_POLL_S
