"""Build a run's report and photograph it in headless Chromium (the docs' report-example.png).

    apt-get install -y chromium
    python recipes/fashion_mnist.py --data runs/fm-data --out runs/fm-example \
        --train-images 3000 --test-images 1000 --epochs 4
    python benchmarks/render_report.py runs/fm-example runs/fm-data/test \
        --out runs/fm-example/report --screenshot docs/report-example.png

The page is opened from disk with every host name mapped to nothing, so anything it tried to
fetch from elsewhere would be missing from the screenshot. The screenshot is cut below the last
non-white row and reduced to a 256-colour palette to keep it small.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from tlkit.commands.report import build_report

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # running as root, as on the CI and developer machines here
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--host-resolver-rules=MAP * ~NOTFOUND",
]


def screenshot(page: Path, target: Path, width: int, height: int) -> None:
    """Render `page` at width x height CSS pixels with headless Chromium into `target`."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium not found: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--screenshot={target.resolve()}",
                f"--window-size={width},{height}",
                page.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )


def trim_and_shrink(path: Path, margin: int = 24) -> tuple[int, int]:
    """Cut the blank space below the content, store as a palette PNG; returns the new size."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    pixels = np.asarray(rgb)
    content_rows = np.flatnonzero((pixels < 250).any(axis=(1, 2)))
    bottom = min(pixels.shape[0], int(content_rows[-1]) + margin) if len(content_rows) else 1
    page = rgb.crop((0, 0, rgb.width, bottom))
    page.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
    return rgb.width, bottom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="finished run folder")
    parser.add_argument("data", nargs="?", help="labelled data (default: the run's test split)")
    parser.add_argument("--out", help="report folder (default: RUN/report)")
    parser.add_argument("--mistakes", type=int, default=16)
    parser.add_argument("--screenshot", default="report-screenshot.png")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=6000, help="viewport height before trim")
    arguments = parser.parse_args()

    report = build_report(arguments.run, arguments.data, arguments.out, arguments.mistakes)
    target = Path(arguments.screenshot)
    target.parent.mkdir(parents=True, exist_ok=True)
    screenshot(report.page, target, arguments.width, arguments.height)
    width, height = trim_and_shrink(target)
    print(
        f"{report.page} rendered: {target} ({width} x {height} px, "
        f"{target.stat().st_size / 1024:.0f} KiB)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
