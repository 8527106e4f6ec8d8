"""The scan index: each file checked once, re-checked only when it changes, never trusted when
damaged, shared by concurrent processes; and what each verify mode skips."""

import io
import logging
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_colour_images
from filelock import FileLock
from PIL import Image

from tlkit.data import images as data_module
from tlkit.data import scan_index
from tlkit.data.datasets import ImageDataset, read_load_failures
from tlkit.data.sources import scan
from tlkit.data.split import split_samples


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """3 classes x 3 images (40x40 PNG and JPEG)."""
    write_colour_images(tmp_path / "data", per_class=3, seed=0)
    return tmp_path / "data"


def recording_checks(monkeypatch) -> list[str]:
    """Patch the scan's per-file check to record the paths it is given."""
    checked: list[str] = []
    inspect = data_module.inspect_image

    def recording(path, verify, max_pixels=data_module.DEFAULT_MAX_IMAGE_PIXELS):
        checked.append(path)
        return inspect(path, verify, max_pixels)

    monkeypatch.setattr(data_module, "inspect_image", recording)
    return checked


def test_a_warm_scan_decodes_nothing(folder: Path, tmp_path: Path, monkeypatch):
    cache = tmp_path / "cache"
    cold = scan(folder, scan_cache=str(cache))
    assert cold.statistics.checked == 9 and cold.statistics.reused == 0
    assert Path(cold.statistics.index).parent == cache
    assert set(cold.image_sizes.values()) == {(40, 40)} and len(cold.image_sizes) == 9

    def fail(*arguments, **options):
        raise AssertionError("a warm scan decoded a file")

    monkeypatch.setattr(data_module, "inspect_image", fail)
    warm = scan(folder, scan_cache=str(cache))
    assert warm.statistics.checked == 0 and warm.statistics.reused == 9
    assert (warm.samples, warm.skipped, warm.image_sizes) == (
        cold.samples,
        cold.skipped,
        cold.image_sizes,
    )


def test_only_changed_and_added_files_are_checked_and_removed_ones_leave(
    folder: Path, tmp_path: Path, monkeypatch
):
    cache = str(tmp_path / "cache")
    scan(folder, scan_cache=cache)
    changed, removed = folder / "red" / "000.jpg", folder / "blue" / "001.png"
    changed.write_bytes(b"no longer an image")
    status = changed.stat()  # a new time even where the clock's step is coarse
    os.utime(changed, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))
    removed.unlink()
    added = folder / "green" / "new.png"
    Image.new("RGB", (50, 30)).save(added)
    checked = recording_checks(monkeypatch)

    result = scan(folder, scan_cache=cache)
    assert sorted(checked) == sorted([str(changed), str(added)])
    assert result.statistics.checked == 2 and result.statistics.reused == 7
    assert [path for path, _ in result.skipped] == [str(changed)]
    assert str(removed) not in {path for path, _ in result.samples}
    assert result.image_sizes[str(added)] == (50, 30)

    checked.clear()
    again = scan(folder, scan_cache=cache)
    assert checked == [] and again.samples == result.samples and again.skipped == result.skipped


def damage(index: Path, how: str, other_index: Path) -> None:
    data = index.read_bytes()
    if how == "garbage":
        index.write_bytes(np.random.default_rng(0).bytes(300))
    elif how == "truncated":
        index.write_bytes(data[: len(data) // 2])
    elif how == "other version":  # its checksum still matches: only the version line differs
        index.write_bytes(data.replace(b"tlkit-scan-index 1\n", b"tlkit-scan-index 0\n", 1))
    else:  # another folder's intact index under this folder's name
        index.write_bytes(other_index.read_bytes())


@pytest.mark.parametrize(
    "how, note",
    [
        ("garbage", "not a tlkit scan index"),
        ("truncated", "checksum does not match"),
        ("other version", "format version '0'"),
        ("another source", "the index of another source"),
    ],
)
def test_a_damaged_or_foreign_index_is_rebuilt_with_a_note(
    folder: Path, tmp_path: Path, caplog, how: str, note: str
):
    cache = str(tmp_path / "cache")
    other = tmp_path / "other"
    write_colour_images(other, per_class=1, seed=1)
    expected = scan(folder, scan_cache=cache)
    other_index = Path(scan(other, scan_cache=cache).statistics.index)
    damage(Path(expected.statistics.index), how, other_index)

    with caplog.at_level(logging.WARNING, logger="tlkit"):
        rebuilt = scan(folder, scan_cache=cache)
    assert rebuilt.statistics.checked == 9 and note in rebuilt.statistics.rebuilt_because
    assert any("rebuilt" in line and note in line for line in caplog.messages)
    assert (rebuilt.samples, rebuilt.skipped) == (expected.samples, expected.skipped)
    assert scan(folder, scan_cache=cache).statistics.checked == 0  # the new index is sound


def test_other_settings_recheck_every_file(folder: Path, tmp_path: Path):
    def checked(**settings) -> int:
        return scan(folder, scan_cache=str(tmp_path / "cache"), **settings).statistics.checked

    assert checked() == 9
    assert checked(max_pixels=2_000) == 9  # another --max-image-pixels
    assert checked(max_pixels=2_000) == 0
    assert checked(max_pixels=2_000, verify="header") == 9  # another --verify
    assert checked(max_pixels=2_000, verify="header") == 0


def write_damaged_files(bad: Path) -> dict[str, Path]:
    """One file of each kind of damage; 'too large' is 100x100, over a limit of 5,000 pixels."""
    bad.mkdir(parents=True)
    encoded = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(encoded, format="PNG")
    files = {
        "truncated": (bad / "truncated.png", encoded.getvalue()[:-40]),
        "not an image": (bad / "notes.jpg", b"<html>not an image</html>"),
        "zero bytes": (bad / "empty.png", b""),
    }
    for path, content in files.values():
        path.write_bytes(content)
    Image.new("RGB", (100, 100)).save(bad / "large.png")
    return {**{kind: path for kind, (path, _) in files.items()}, "too large": bad / "large.png"}


@pytest.mark.parametrize(
    "verify, skipped_by_the_scan",
    [
        ("full", {"truncated", "not an image", "zero bytes", "too large"}),
        ("header", {"not an image", "zero bytes", "too large"}),
        ("none", set()),
    ],
)
def test_each_verify_mode_skips_at_the_scan_or_at_load(
    folder: Path, tmp_path: Path, verify: str, skipped_by_the_scan: set[str]
):
    damaged = write_damaged_files(folder / "red" / "bad")
    result = scan(folder, max_pixels=5_000, verify=verify, scan_cache=str(tmp_path / "cache"))
    kind_of = {str(path): kind for kind, path in damaged.items()}
    assert {kind_of[path] for path, _ in result.skipped} == skipped_by_the_scan
    header_read = {path for path, _ in result.samples} if verify != "none" else set()
    assert set(result.image_sizes) == header_read  # with header: the truncated file's too

    # What the scan let through is skipped and recorded when training loads it (timm's way).
    log = tmp_path / "load_failures.csv"
    dataset = ImageDataset(result.samples, lambda image: {"image": image}, 5_000, failure_log=log)
    for index in range(len(dataset)):
        dataset[index]
    failed_at_load = {kind_of[path] for path, _ in read_load_failures(log)}
    assert failed_at_load == set(damaged) - skipped_by_the_scan


def test_the_split_is_the_same_with_and_without_the_index(folder: Path, tmp_path: Path):
    cache = str(tmp_path / "cache")
    without = scan(folder, use_index=False)
    cold, warm = scan(folder, scan_cache=cache), scan(folder, scan_cache=cache)
    assert without.samples == cold.samples == warm.samples
    fractions = {"val": 0.3, "test": 0.1}
    splits = [split_samples(result.samples, fractions, 0, folder) for result in (without, warm)]
    assert splits[0] == splits[1]


def test_nothing_is_written_into_the_data_folder_and_an_unusable_cache_is_no_error(
    folder: Path, tmp_path: Path, caplog
):
    def contents() -> dict[str, int]:
        return {str(path): path.stat().st_mtime_ns for path in folder.rglob("*")}

    before = contents()
    result = scan(folder, scan_cache=str(tmp_path / "cache"))
    assert contents() == before and Path(result.statistics.index).is_file()
    blocked = tmp_path / "a-file"
    blocked.write_text("a file where the cache folder would be")
    with caplog.at_level(logging.WARNING, logger="tlkit"):
        without = scan(folder, scan_cache=str(blocked / "scan"))
    assert without.statistics.index is None and without.samples == result.samples
    assert any("checking every file without it" in line for line in caplog.messages)


def scan_logging_to(folder: str, cache: str, log: str) -> int:
    """In a new process: scan `folder`, logging to `log`; the files this process checked."""
    logging.basicConfig(filename=log, level=logging.INFO)
    return scan(folder, scan_cache=cache).statistics.checked


def test_two_processes_scanning_a_new_folder_check_each_file_once(folder: Path, tmp_path: Path):
    """Both processes list the folder, find no index and wait for its lock (held here until both
    wait); the first to get it checks the 9 files, the second finds them in the index."""
    cache = tmp_path / "cache"
    cache.mkdir()
    logs = [tmp_path / f"process{index}.log" for index in range(2)]
    lock = FileLock(f"{scan_index.index_path(folder, cache)}.lock")
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        with lock:
            runs = [
                pool.apply_async(scan_logging_to, (str(folder), str(cache), str(log)))
                for log in logs
            ]
            deadline = time.monotonic() + 120
            while not all(log.is_file() and "Waiting for" in log.read_text() for log in logs):
                assert time.monotonic() < deadline, "the processes never waited for the lock"
                time.sleep(0.2)
        assert sorted(run.get(timeout=120) for run in runs) == [0, 9]
