"""Shared fixtures: tiny real image folders made on the spot, and one tiny finished run."""

import os

# No model hub here or in CI: make hub look-ups fail at once instead of retrying for a minute.
# (huggingface_hub reads this when it is imported, so it is set before anything imports it.)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


def write_colour_images(folder: Path, per_class: int, seed: int, size: int = 40) -> None:
    """Noisy single-colour images, one class per colour: easy, real PNG/JPEG files."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        class_dir = folder / name
        class_dir.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = rng.normal(0, 25, (size, size, 3)) + np.array(colour)
            image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
            suffix = ".png" if index % 2 else ".jpg"
            image.save(class_dir / f"{index:03d}{suffix}")


def write_multilabel_csv(folder: Path, images: int, seed: int, size: int = 32) -> Path:
    """`folder/labels.csv` (`path,labels`) over `images` PNGs in `folder`: each image holds
    one to three vertical stripes of the COLOURS, its labels are the colours it shows (a few
    images show none: grey, no labels)."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["path,labels"]
    for index in range(images):
        shown = [] if index % 10 == 9 else sorted(rng.choice(3, rng.integers(1, 4), False))
        pixels = np.full((size, size, 3), 128.0)
        for stripe, colour in enumerate(shown):
            width = size // len(shown)
            pixels[:, stripe * width : (stripe + 1) * width] = COLOURS[names[colour]]
        pixels += rng.normal(0, 20, pixels.shape)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{index:03d}.png")
        rows.append(f"{index:03d}.png," + ";".join(names[colour] for colour in shown))
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


def write_identical_images(folder: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """`folder/<class>/<i>.png`, every file the same image: whatever differs between two
    training batches is the augmentation, and a model predicts one class for all of them."""
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    for name, count in counts.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            Image.fromarray(pixels).save(folder / name / f"{index:03d}.png")
    return folder


@pytest.fixture(scope="session", autouse=True)
def scan_index_folder(tmp_path_factory) -> Path:
    """Scan indexes (tlkit.data.scan_index) go to the session's temporary folder, never to the
    user's cache; set in the environment, so subprocesses (the CLI, DDP ranks) use it too."""
    folder = tmp_path_factory.mktemp("tlkit-cache")
    os.environ["TLKIT_CACHE"] = str(folder)
    return folder / "scan"


@pytest.fixture(scope="session")
def colour_folder(tmp_path_factory) -> Path:
    """DATA/train/<colour>/ (10 per class) and DATA/test/<colour>/ (4 per class)."""
    root = tmp_path_factory.mktemp("colours")
    write_colour_images(root / "train", per_class=10, seed=0)
    write_colour_images(root / "test", per_class=4, seed=1)
    return root


# The settings most tests train with: bundled weights, 32px, small batches, no worker processes,
# a named strategy (--strategy auto measures the data first: tests/test_auto.py covers it).
TINY_CONFIG = dict(
    pretrained="bundled",
    img_size=32,
    batch_size=8,
    num_workers=0,
    val_fraction=0.3,
    strategy="partial",
)

TINY_RUN_FLAGS = [
    "--pretrained",
    "bundled",
    "--img-size",
    "32",
    "--epochs",
    "2",
    "--batch-size",
    "8",
    "--num-workers",
    "0",
    "--val-fraction",
    "0.3",
    "--seed",
    "0",
    "--strategy",
    "partial",
    "--unfreeze-stages",
    "1",
    "--lr",
    "3e-3",
]


@pytest.fixture(scope="session")
def tiny_run(colour_folder, tmp_path_factory) -> Path:
    """A finished run folder from `tlkit finetune` on the colour folder."""
    from tlkit.cli import main

    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["finetune", str(colour_folder), "--out", str(out), *TINY_RUN_FLAGS]) == 0
    return out


def finetune_killed_after_first_checkpoint(data: Path, out: Path, flags: list[str]) -> int:
    """Run `tlkit finetune` in a new process group and SIGKILL all of it (every DDP process)
    as soon as its first last.ckpt exists; returns the epochs that checkpoint completed."""
    import torch

    command = [sys.executable, "-m", "tlkit.cli", "finetune", str(data), "--out", str(out)]
    process = subprocess.Popen(
        [*command, *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not (out / "last.ckpt").exists() and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # no chance to clean up: like a lost machine
    process.wait()
    assert not (out / "summary.json").exists()
    return torch.load(out / "last.ckpt", weights_only=True)["epoch"] + 1
