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

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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


OTHER_SETTINGS = "made with other settings"


class ListedFile(NamedTuple):
    """A file found by the listing, with what identifies its content cheaply."""

    path: str
    size: int
    mtime_ns: int


class FileCheck(NamedTuple):
    """The outcome of checking one file: its stored width and height (None if unknown, such as
    for a file the header of which could not be read), and why it is unusable (None: usable)."""

    width: int | None
    height: int | None
    problem: str | None


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


# size, mtime_ns, width, height, problem
Entry = tuple[int, int, int | None, int | None, str | None]


def read_index(path: Path, source: str, settings: dict) -> tuple[dict[str, Entry], str | None]:
    """The entries of the index at `path`, and why it cannot be used if it cannot (then no
    entries): missing, damaged, another format or version, another source's, other settings."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}, None
    except OSError as error:
        return {}, f"unreadable ({error.strerror})"
    header, _, rest = data.partition(b"\n")
    checksum, _, body = rest.partition(b"\n")
    name, _, version = header.decode("ascii", "replace").partition(" ")
    if name != FORMAT_NAME:
        return {}, "not a tlkit scan index"
    if version != str(FORMAT_VERSION):
        return {}, f"written in format version {version!r}, this tlkit reads {FORMAT_VERSION}"
    if hashlib.sha256(body).hexdigest().encode() != checksum:
        return {}, "damaged (its checksum does not match: truncated or overwritten)"
    try:  # the checksum matched, so tlkit wrote it; a damaged structure is still not trusted
        content = json.loads(body)
        entries = {key: tuple(entry) for key, entry in content["files"].items()}
        if any(len(entry) != len(Entry.__args__) for entry in entries.values()):
            raise ValueError("an entry of another shape")
        indexed_source, indexed_settings = content["source"], content["settings"]
    except (ValueError, TypeError, KeyError, AttributeError):
        return {}, "not a valid index (its content has the wrong structure)"
    if indexed_source != source:
        return {}, f"the index of another source ({indexed_source!r})"
    if indexed_settings != settings:
        return {}, f"{OTHER_SETTINGS} ({indexed_settings}, now {settings})"
    return entries, None


def write_index(path: Path, source: str, settings: dict, entries: dict[str, Entry]) -> None:
    """Write the index atomically (`runfolder.write_atomic`: a temporary file, then a rename)."""
    content = {"source": source, "settings": settings, "files": entries}
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

    A cache folder that cannot be created or written to costs the index, not the scan: the
    files are checked without one, with a warning."""
    started = time.perf_counter()
    source = str(Path(source).resolve())
    prefix = root.rstrip(os.sep) + os.sep
    keys = [path[len(prefix) :] if path.startswith(prefix) else path for path, _, _ in files]
    path = index_path(source, cache_dir)
    entries, _ = read_index(path, source, settings)
    to_check = _to_check(files, keys, entries)
    rebuilt_because = None
    if to_check or len(entries) != len(set(keys)):  # new or changed files, or removed ones
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with _locked(path, source):
                # Read again: as the process that held the lock before (if one did) left it.
                entries, rebuilt_because = read_index(path, source, settings)
                if rebuilt_because:
                    level = logging.INFO if OTHER_SETTINGS in rebuilt_because else logging.WARNING
                    logger.log(level, f"Scan index {path} of {source} rebuilt: {rebuilt_because}")
                to_check = _to_check(files, keys, entries)
                entries = {key: entries[key] for key in keys if key in entries}

                def save() -> None:
                    write_index(path, source, settings, entries)

                _check_into(entries, to_check, files, keys, check, save)
                save()
        except OSError as error:
            logger.warning(
                f"Scan index of {source} not usable ({error}); checking every file without it "
                "(choose a writable folder with --scan-cache)"
            )
            entries, to_check, path = {}, list(range(len(files))), None
            _check_into(entries, to_check, files, keys, check, None)
    results = [FileCheck(*entries[key][2:]) for key in keys]
    statistics = ScanStatistics(
        files=len(files),
        checked=len(to_check),
        reused=len(files) - len(to_check),
        index=str(path) if path else None,
        seconds=time.perf_counter() - started,
        rebuilt_because=rebuilt_because,
    )
    return results, statistics


def _to_check(files: list[ListedFile], keys: list[str], entries: dict[str, Entry]) -> list[int]:
    """Positions of the files that the index has no entry for at their size and mtime."""
    return [
        position
        for position, (key, (_, size, mtime_ns)) in enumerate(zip(keys, files, strict=True))
        if (entry := entries.get(key)) is None or entry[0] != size or entry[1] != mtime_ns
    ]


def _check_into(
    entries: dict[str, Entry],
    positions: list[int],
    files: list[ListedFile],
    keys: list[str],
    check: Callable[[list[str]], list[FileCheck]],
    save: Callable[[], None] | None,
) -> None:
    """Check the files at `positions` in chunks, putting each outcome into `entries`; with
    `save`, save the entries every `SAVE_EVERY_S` seconds and say how far the scan is."""
    last_save = time.perf_counter()
    for start in range(0, len(positions), CHECK_CHUNK):
        chunk = positions[start : start + CHECK_CHUNK]
        outcomes = check([files[position].path for position in chunk])
        for position, outcome in zip(chunk, outcomes, strict=True):
            _, size, mtime_ns = files[position]
            entries[keys[position]] = (size, mtime_ns, *outcome)
        if save is not None and time.perf_counter() - last_save > SAVE_EVERY_S:
            save()
            last_save = time.perf_counter()
            done = start + len(chunk)
            logger.info(f"Scan: {done:,} of {len(positions):,} files checked (index saved)")


@contextmanager
def _locked(path: Path, source: str) -> Iterator[None]:
    """Hold the index's file lock; while another process holds it (scanning the same source),
    wait, saying so every `LOCK_POLL_S` seconds, never silently."""
    lock = FileLock(f"{path}.lock")
    timeout = 0.0
    while True:
        try:
            lock.acquire(timeout=timeout)
            break
        except Timeout:
            logger.info(f"Waiting for another process scanning {source} (lock {lock.lock_file})")
            timeout = LOCK_POLL_S
    try:
        yield
    finally:
        lock.release()
