"""The scan before training: today's full decode of every file against the cached scan index.

    apt-get install dataset-fashion-mnist
    python benchmarks/scan.py --work /tmp/tlkit-scan-bench

Writes the 60,000 Fashion-MNIST training images as PNGs (once; reused when the study runs
again) and 2,000 photo-sized JPEGs (500x375, cut from scikit-image's bundled photos), then
times `tlkit.data.scan` on them in one run, side by side: without an index (verify full is
today's path: every file decoded by every command and rank), the cold scans that build an index
(verify full and header), listing only (verify none), the warm scan, and the warm scan after
1% of the files were touched. Per-file costs are projected to 1.28 M files (ImageNet's training
set). Last, a folder with one file of each kind of damage shows what each verify mode catches
at the scan and what is left to the data loader. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from fashion_mnist import CLASSES, load_split  # noqa: E402

from tlkit.data.images import LOAD_ERRORS, load_rgb, write_image_folder
from tlkit.data.sources import ScanResult, scan  # noqa: E402

PROJECTED_FILES = 1_280_000
PHOTO_SIZE = (500, 375)  # about an ImageNet training photo's size


def fashion_mnist_folder(work: Path, images: int) -> Path:
    """`work/fashion-mnist-<n>/<class>/<i>.png`, written once."""
    folder = work / f"fashion-mnist-{images}"
    marker = folder / ".complete"
    if not marker.exists():
        pixels, labels = load_split("train")
        write_image_folder(pixels[:images], labels[:images], CLASSES, folder)
        marker.touch()
    return folder


def photo_folder(work: Path, images: int, seed: int = 0) -> Path:
    """`work/photos-<n>/<photo>/<i>.jpg`: random crops of scikit-image's photos, resized to
    `PHOTO_SIZE`, JPEG quality 90; written once."""
    from skimage import data

    folder = work / f"photos-{images}"
    marker = folder / ".complete"
    if marker.exists():
        return folder
    rng = np.random.default_rng(seed)
    sources = {name: getattr(data, name)() for name in ("astronaut", "chelsea", "coffee")}
    for index in range(images):
        name = list(sources)[index % len(sources)]
        photo = sources[name]
        height, width = photo.shape[:2]
        top, left = rng.integers(0, height // 4), rng.integers(0, width // 4)
        crop = Image.fromarray(photo[top : top + 3 * height // 4, left : left + 3 * width // 4])
        (folder / name).mkdir(parents=True, exist_ok=True)
        crop.resize(PHOTO_SIZE).save(folder / name / f"{index:05d}.jpg", quality=90)
    marker.touch()
    return folder


def timed(run: Callable[[], ScanResult], repeats: int = 1) -> tuple[float, float, ScanResult]:
    """The median wall time and the median CPU time (all threads of this process) of
    `repeats` runs, and the last result. CPU time is the steadier measure on a shared machine."""
    walls, cpus = [], []
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        result = run()
        walls.append(time.perf_counter() - started)
        cpus.append(time.process_time() - started_cpu)
    return statistics.median(walls), statistics.median(cpus), result


def touch(paths: list[str], fraction: float, seed: int = 0) -> int:
    """Move the modification time of `fraction` of the files 1 s on; returns how many."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(paths), size=max(1, int(len(paths) * fraction)), replace=False)
    for index in chosen:
        status = os.stat(paths[index])
        os.utime(paths[index], ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))
    return len(chosen)


def scan_rows(folder: Path, cache: Path, touch_fraction: float) -> tuple[int, list[tuple]]:
    """(files, rows of label, seconds, CPU seconds, files checked now) for one folder."""
    rows = []

    def add(label: str, run: Callable[[], ScanResult], repeats: int = 1) -> ScanResult:
        seconds, cpu_seconds, result = timed(run, repeats)
        rows.append((label, seconds, cpu_seconds, result.statistics.checked))
        print(f"  {label}: {seconds:.3f} s, CPU {cpu_seconds:.3f} s", flush=True)
        return result

    def indexed(verify: str, name: str) -> Callable[[], ScanResult]:
        return lambda: scan(folder, verify=verify, scan_cache=str(cache / name))

    def unindexed(verify: str) -> Callable[[], ScanResult]:
        return lambda: scan(folder, verify=verify, use_index=False)

    add("no index, verify full (today: every command, every rank)", unindexed("full"))
    add("no index, verify header", unindexed("header"))
    add("verify none (listing only)", indexed("none", "none"), repeats=3)
    add("cold index, verify full", indexed("full", "full"))
    add("cold index, verify header", indexed("header", "header"))
    result = add("warm index, verify full", indexed("full", "full"), repeats=3)
    add("warm index, verify header", indexed("header", "header"), repeats=3)
    touched = touch([path for path, _ in result.samples], touch_fraction)
    add(f"warm index, verify full, {touched:,} files touched", indexed("full", "full"))
    return len(result.samples), rows


DAMAGE = {
    "truncated PNG": "png",
    "truncated JPEG": "jpg",
    "text file named .jpg": "jpg",
    "zero-byte .png": "png",
    "decompression bomb (10,000 x 10,000 PNG, 1 bit)": "png",
}


def damaged_folder(work: Path) -> dict[str, str]:
    """One file of each kind of `DAMAGE` in `work/damaged/bad/`, beside good images."""
    good, bad = work / "damaged" / "good", work / "damaged" / "bad"
    for folder in (good, bad):
        folder.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for suffix in ("png", "jpg"):
        Image.fromarray(pixels).save(good / f"good.{suffix}")
    encoded = {}
    for suffix, format in (("png", "PNG"), ("jpg", "JPEG")):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=format)
        encoded[suffix] = buffer.getvalue()
    bomb = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(bomb, format="PNG")
    contents = {
        "truncated PNG": encoded["png"][: len(encoded["png"]) // 2],
        "truncated JPEG": encoded["jpg"][: len(encoded["jpg"]) // 2],
        "text file named .jpg": b"<html>not an image</html>\n",
        "zero-byte .png": b"",
        "decompression bomb (10,000 x 10,000 PNG, 1 bit)": bomb.getvalue(),
    }
    paths = {}
    for index, (kind, content) in enumerate(contents.items()):
        path = bad / f"{index}.{DAMAGE[kind]}"
        path.write_bytes(content)
        paths[kind] = str(path)
    return paths


def caught_by(work: Path) -> dict[str, dict[str, str]]:
    """Per kind of damage and verify mode: `scan` (skipped by the scan), `load` (passes the
    scan, skipped when the data loader fails to load it) or `missed` (loads)."""
    paths = damaged_folder(work)
    outcome: dict[str, dict[str, str]] = {kind: {} for kind in paths}
    for verify in ("full", "header", "none"):
        result = scan(work / "damaged", verify=verify, use_index=False)
        skipped = {path for path, _ in result.skipped}
        for kind, path in paths.items():
            if path in skipped:
                outcome[kind][verify] = "scan"
                continue
            try:
                load_rgb(path)
                outcome[kind][verify] = "missed"
            except LOAD_ERRORS:
                outcome[kind][verify] = "load"
    return outcome


def markdown(name: str, files: int, rows: list[tuple]) -> str:
    _, baseline, baseline_cpu, _ = rows[0]
    lines = [
        f"**{name}** ({files:,} files)",
        "",
        "| scan | files checked now | wall (s) | CPU (s) | vs today: wall / CPU "
        f"| CPU per file (ms) | projected to {PROJECTED_FILES / 1e6:.2f} M files: CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, seconds, cpu_seconds, checked in rows:
        projected = cpu_seconds / files * PROJECTED_FILES
        lines.append(
            f"| {label} | {checked:,} | {seconds:.3f} | {cpu_seconds:.3f} | "
            f"{baseline / seconds:.1f}x / {baseline_cpu / cpu_seconds:.1f}x | "
            f"{1000 * cpu_seconds / files:.3f} | {projected / 60:.1f} min |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/tlkit-scan-bench", help="folder for the images")
    parser.add_argument("--images", type=int, default=60_000, help="Fashion-MNIST PNGs")
    parser.add_argument("--photos", type=int, default=2_000, help="500x375 JPEGs")
    parser.add_argument("--touch-fraction", type=float, default=0.01, help="files touched")
    arguments = parser.parse_args()
    work = Path(arguments.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores")
    tables = []
    for name, folder in (
        ("Fashion-MNIST PNGs, 28x28", fashion_mnist_folder(work, arguments.images)),
        ("photo JPEGs, 500x375", photo_folder(work, arguments.photos)),
    ):
        print(name, flush=True)
        with tempfile.TemporaryDirectory(dir=work) as cache:
            files, rows = scan_rows(folder, Path(cache), arguments.touch_fraction)
        tables.append(markdown(name, files, rows))
    outcome = caught_by(work)
    lines = ["| damaged file | full | header | none |", "|---|---|---|---|"]
    for kind, by_mode in outcome.items():
        lines.append(f"| {kind} | {by_mode['full']} | {by_mode['header']} | {by_mode['none']} |")
    print("\n\n".join([*tables, "\n".join(lines)]))


if __name__ == "__main__":
    main()
