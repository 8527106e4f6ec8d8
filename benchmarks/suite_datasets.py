"""The held-out suite's datasets (benchmarks/suite.py): real images that installed packages ship.

Each builder writes an image folder `ROOT/NAME/train/<class>/*.png` and `ROOT/NAME/test/<class>/
*.png`, the same folder for a given seed, so every row of the suite is scored on the same test
images. Validation is carved from train by tlkit itself, except where a random carve would put
near-copies of training images into it: textures and scenes have a `val/` split of their own.
No validation or test image shares a source image with a training one; the list below says how
each set makes sure. A builder whose source is not installed raises `SourceMissing`, naming the
package to install. After writing, the folder's scan index is built (`tlkit.data.sources.scan`)
so that no timed row pays for the first scan, and `ROOT/NAME/dataset.json` records what was
written (classes, images per split and class, image sizes, build time); a folder with that file
is reused.

- fashion-600, fashion-5000 (dataset-fashion-mnist): 28px grey clothing, 10 classes; a stratified
  subset of the training split, and 2,000 of the official test images.
- digits (scikit-learn's load_digits): 8px handwritten digits, 10 classes; a stratified quarter
  is test.
- textures (scikit-image's bundled photos, the tlkit demo's patches): 64px grey, 6 classes;
  train, val and test patches from separate regions of each photo.
- scenes (visp-images-data): real camera frames, grey, 256-480px short side, of six scenes of
  ViSP's tracking sequences; each sequence split in time into train, val and test, with gaps.
- cards (gnome-cards-data and kdegames-card-data-kf5, drawn by librsvg2-bin's rsvg-convert): 52
  classes (rank and suit), one 128px-tall image per deck design; whole designs held out for test.
- stamps (tuxpaint-stamps-default): Tux Paint's clip art and photo stamps by category, 12
  classes, 128px colour; imbalanced (over 10:1); a stratified quarter is test.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from fashion_mnist import FASHION_MNIST, write_fashion_mnist  # noqa: E402

from tlkit.commands.demo import write_textures_folder  # noqa: E402
from tlkit.data.images import IMAGE_SUFFIXES, write_image_folder  # noqa: E402
from tlkit.data.sources import scan  # noqa: E402

RECORD = "dataset.json"  # in ROOT/NAME: what was written; its presence means the build finished
SPLITS = ("train", "val", "test")
FASHION_TEST_IMAGES = 2000  # of the official 10,000 test images, stratified
TEST_SHARE = 0.25  # digits and stamps: a stratified quarter of the images is the test split

# scenes: ViSP's tracking sequences, real camera frames (grey PGM). Class -> folder. Each
# sequence is split in time, with gaps left out between the parts, so that no validation or
# test frame is a near-copy of a training frame (a random validation carve of a sequence would
# be: its frames' neighbours train).
VISP = Path("/usr/share/visp-images-data/ViSP-images")
SCENE_SEQUENCES = {
    "target": "mire-2",
    "cube-on-table": "mbt/cube",
    "dice-on-posters": "cube",
    "ellipse": "ellipse-1",
    "line": "line",
    "castle-model": "mbt-depth/castel/castel",
}
# split -> (start, end) as shares of the sequence, and the most frames taken, evenly spaced
SCENE_SEGMENTS = {"train": (0.0, 0.6, 120), "val": (0.65, 0.75, 30), "test": (0.8, 1.0, 40)}

# cards: one image per card and deck design; whole designs (and their variants, `CARD_FAMILIES`)
# are held out for test, so a test card is never a training card redrawn.
CARD_DECKS = (Path("/usr/share/aisleriot/cards"), Path("/usr/share/carddecks"))
SUITS = ("club", "diamond", "heart", "spade")
RANKS = ("1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "jack", "queen", "king")
RANK_NAMES = {"1": "ace", "jack": "jack", "queen": "queen", "king": "king"}
CARD_HEIGHT = 128  # px; the width follows the design (about 90px)
CARD_TEST_SHARE = 0.25  # of the deck designs
CARD_DECKS_LEFT_OUT = {"svg-future"}  # circuit-board chips with numbers, not playing cards
# Decks that are variants or copies of one design, or share its court cards (a stem of the
# .svgz file, or the KDE deck's folder; seen side by side): one family, one split.
CARD_FAMILIES = {
    "anglo_bitmap": "anglo",
    "anglo_modern": "anglo",
    "anglo_modern_4_color": "anglo",
    "anglo_poker": "anglo",
    "gnomangelo": "anglo",
    "gnomangelo_bitmap": "anglo",
    "paris": "anglo",
    "svg-gm-paris": "anglo",
    "atlasnye_skat": "atlasnye",
    "Атласные": "atlasnye",
    "neoclassical_4_color": "neoclassical",
    "tango_nuevo": "tango",
    "svg-dondorf": "dondorf",
    "svg-nicu-ornamental": "ornamental",
    "svg-nicu-white": "ornamental",
    "svg-oxygen-air": "oxygen",
    "svg-oxygen-white": "oxygen",
    "svg-tigullio-international": "tigullio",
}

# stamps: Tux Paint's stamps, class = top-level category; categories with fewer stamps are left
# out, and so are the `_mirror` copies and the alphabets (one glyph drawn four ways).
STAMPS = Path("/usr/share/tuxpaint/stamps")
STAMP_MIN_PER_CATEGORY = 12
STAMP_SIZE = 128  # px, square: the stamp on white, padded to a square


class SourceMissing(Exception):
    """A dataset's source is not installed; the message says what to install."""


@dataclass(frozen=True)
class Dataset:
    """One dataset of the suite: how to write it and what it needs."""

    description: str
    needs: dict[str, Path]  # Debian package -> a path it installs (checked before building)
    write: Callable[[Path, int], None]  # writes train/ [val/] test/ into the (new) folder


def write_fashion(train_images: int) -> Callable[[Path, int], None]:
    """A stratified Fashion-MNIST subset (recipes/fashion_mnist.py) and 2,000 test images."""

    def write(folder: Path, seed: int) -> None:
        write_fashion_mnist(folder, train_images, FASHION_TEST_IMAGES, seed)

    return write


def write_digits(folder: Path, seed: int) -> None:
    """scikit-learn's 1,797 digits (8x8, 0-16 scaled to 0-255); a stratified quarter is test."""
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    names = [str(digit) for digit in digits.target_names]
    train, test = train_test_split(
        np.arange(len(images)), test_size=TEST_SHARE, stratify=digits.target, random_state=seed
    )
    for split, chosen in (("train", train), ("test", test)):
        write_image_folder(images[chosen], digits.target[chosen], names, folder / split)


def write_textures(folder: Path, seed: int) -> None:
    """The demo's texture patches (tlkit/commands/demo.py) with its train/val/test regions."""
    write_textures_folder(folder, seed)


def sequence_split(frames: int) -> dict[str, np.ndarray]:
    """Split -> indices of its frames in a sequence of `frames` frames (SCENE_SEGMENTS)."""
    split = {}
    for name, (start_share, end_share, most) in SCENE_SEGMENTS.items():
        start, end = round(frames * start_share), round(frames * end_share)
        indices = np.linspace(start, end - 1, min(most, end - start)).round().astype(int)
        split[name] = np.unique(indices)
    return split


def write_scenes(folder: Path, seed: int) -> None:
    """ViSP's camera sequences split in time (SCENE_SEGMENTS); the seed is not used."""
    for name, sequence in SCENE_SEQUENCES.items():
        frames = sorted((VISP / sequence).glob("*.pgm"))
        for split, indices in sequence_split(len(frames)).items():
            (folder / split / name).mkdir(parents=True)
            for index in indices:
                Image.open(frames[index]).save(folder / split / name / f"{frames[index].stem}.png")


def card_decks() -> dict[str, Path]:
    """Deck name -> .svgz file: aisleriot's themes by file stem, KDE's decks by folder."""
    decks = {path.stem: path for path in sorted(CARD_DECKS[0].glob("*.svgz"))}
    decks |= {path.parent.name: path for path in sorted(CARD_DECKS[1].glob("*/*.svgz"))}
    return {name: path for name, path in decks.items() if name not in CARD_DECKS_LEFT_OUT}


def card_element(deck: Path, suit: str, rank: str) -> str:
    """The SVG id of a card: aisleriot writes `suit_rank`, KDE's decks `rank_suit`."""
    return f"{suit}_{rank}" if deck.parent == CARD_DECKS[0] else f"{rank}_{suit}"


def render_element(svg: Path, element: str, zoom: float) -> Image.Image:
    """One element of an SVG drawn alone (by rsvg-convert: no installed Python package draws
    one element of an SVG by its id), cropped to what it covers, on white."""
    with tempfile.TemporaryDirectory() as scratch:
        png = Path(scratch) / "card.png"
        command = ["rsvg-convert", "--export-id", element, "--zoom", f"{zoom:.4f}", str(svg)]
        subprocess.run([*command, "--output", str(png)], check=True, capture_output=True)
        drawn = Image.open(png).convert("RGBA")
    drawn = drawn.crop(drawn.getchannel("A").getbbox())
    page = Image.new("RGBA", drawn.size, "white")
    return Image.alpha_composite(page, drawn).convert("RGB")


def write_deck(deck: Path, folder: Path, scratch: Path) -> None:
    """Every card of one deck at CARD_HEIGHT px, as `folder/<card>/<deck>.png`; nothing (and
    a message saying so) when rsvg-convert cannot draw one of its cards."""
    svg = scratch / f"{deck.parent.name}-{deck.stem}.svg"
    svg.write_bytes(gzip.decompress(deck.read_bytes()))  # rsvg-convert reads plain SVG
    name = deck.parent.name if deck.parent != CARD_DECKS[0] else deck.stem
    try:
        first = render_element(svg, card_element(deck, SUITS[0], RANKS[0]), 1.0)
        zoom = 2 * CARD_HEIGHT / first.height  # drawn at twice the size, then downsampled
        cards = {
            f"{RANK_NAMES.get(rank, rank)}-of-{suit}s": render_element(
                svg, card_element(deck, suit, rank), zoom
            )
            for suit in SUITS
            for rank in RANKS
        }
    except subprocess.CalledProcessError as error:
        print(f"cards: deck {name} left out: {error.stderr.decode().strip()}", file=sys.stderr)
        return
    for card_name, card in cards.items():
        width = round(card.width * CARD_HEIGHT / card.height)
        (folder / card_name).mkdir(parents=True, exist_ok=True)
        card.resize((width, CARD_HEIGHT), Image.Resampling.LANCZOS).save(
            folder / card_name / f"{name}.png"
        )


def held_out_families(families: list[str], share: float, seed: int) -> set[str]:
    """Families whose decks are the test split: a seeded shuffle of the sorted families, taken
    in order until `share` of the decks is reached."""
    counts = Counter(families)
    order = sorted(counts)
    np.random.default_rng(seed).shuffle(order)
    held: set[str] = set()
    for family in order:
        if sum(counts[f] for f in held) >= share * len(families):
            break
        held.add(family)
    return held


def write_cards(folder: Path, seed: int) -> None:
    """52 classes (rank and suit), one image per deck design; whole families held out."""
    decks = card_decks()
    family = {name: CARD_FAMILIES.get(name, name) for name in decks}
    test = held_out_families(list(family.values()), CARD_TEST_SHARE, seed)
    with tempfile.TemporaryDirectory() as scratch, ThreadPoolExecutor(os.cpu_count()) as pool:
        jobs = [
            pool.submit(
                write_deck, deck, folder / ("test" if family[name] in test else "train"),
                Path(scratch),
            )
            for name, deck in decks.items()
        ]  # fmt: skip
        for job in jobs:
            job.result()


def stamp_files() -> dict[str, list[Path]]:
    """Category -> its stamps (see STAMPS), the categories with enough of them."""
    by_category: dict[str, list[Path]] = {}
    for path in sorted(STAMPS.rglob("*.png")):
        relative = path.relative_to(STAMPS)
        if path.stem.endswith("_mirror") or relative.parts[:2] == ("symbols", "alphabets"):
            continue
        by_category.setdefault(relative.parts[0], []).append(path)
    return {c: files for c, files in by_category.items() if len(files) >= STAMP_MIN_PER_CATEGORY}


def square_stamp(path: Path) -> Image.Image:
    """The stamp on white, centred in a square, STAMP_SIZE px."""
    stamp = Image.open(path).convert("RGBA")
    side = max(stamp.size)
    page = Image.new("RGBA", (side, side), "white")
    page.alpha_composite(stamp, ((side - stamp.width) // 2, (side - stamp.height) // 2))
    return page.convert("RGB").resize((STAMP_SIZE, STAMP_SIZE), Image.Resampling.LANCZOS)


def write_stamps(folder: Path, seed: int) -> None:
    """Tux Paint stamps by category; a stratified quarter of each category is test."""
    files = [(category, path) for category, paths in stamp_files().items() for path in paths]
    train, test = train_test_split(
        files, test_size=TEST_SHARE, stratify=[c for c, _ in files], random_state=seed
    )
    for split, chosen in (("train", train), ("test", test)):
        for category, path in chosen:
            relative = path.relative_to(STAMPS / category).with_suffix("")
            (folder / split / category).mkdir(parents=True, exist_ok=True)
            target = folder / split / category / f"{'-'.join(relative.parts)}.png"
            square_stamp(path).save(target)


DATASETS = {
    "fashion-600": Dataset(
        "Fashion-MNIST, 600 training images (28px grey)",
        {"dataset-fashion-mnist": FASHION_MNIST},
        write_fashion(600),
    ),
    "fashion-5000": Dataset(
        "Fashion-MNIST, 5,000 training images (28px grey)",
        {"dataset-fashion-mnist": FASHION_MNIST},
        write_fashion(5000),
    ),
    "digits": Dataset("scikit-learn's digits (8px grey)", {}, write_digits),
    "textures": Dataset("the demo's texture patches (64px grey)", {}, write_textures),
    "scenes": Dataset(
        "ViSP camera frames of six scenes (grey, 256-480px short side)",
        {"visp-images-data": VISP},
        write_scenes,
    ),
    "cards": Dataset(
        "playing cards, 52 classes, 43 deck designs (128px tall)",
        {
            "gnome-cards-data": CARD_DECKS[0],
            "kdegames-card-data-kf5": CARD_DECKS[1],
            "librsvg2-bin": Path("/usr/bin/rsvg-convert"),
        },
        write_cards,
    ),
    "stamps": Dataset(
        "Tux Paint stamps by category, imbalanced (128px colour)",
        {"tuxpaint-stamps-default": STAMPS},
        write_stamps,
    ),
}


def missing_packages(name: str) -> list[str]:
    """The Debian packages dataset `name` needs that are not installed."""
    return [package for package, path in DATASETS[name].needs.items() if not path.exists()]


def build(name: str, root: Path, seed: int = 0) -> tuple[Path, dict]:
    """Write dataset `name` into ROOT/NAME (once; a finished folder is reused) and return the
    folder and its record (`describe`, the seed and the build's seconds)."""
    folder = root / name
    record_file = folder / RECORD
    if record_file.exists():
        record = json.loads(record_file.read_text())
        if record["seed"] == seed:
            return folder, record
    missing = missing_packages(name)
    if missing:
        raise SourceMissing(
            f"{name}: needs {', '.join(missing)}: apt-get install -y {' '.join(missing)}"
        )
    if folder.exists():  # an interrupted build or another seed: start again
        shutil.rmtree(folder)
    started = time.perf_counter()
    folder.mkdir(parents=True)
    DATASETS[name].write(folder, seed)
    for split in SPLITS:
        if (folder / split).is_dir():
            scan(folder / split)  # the scan index, so no timed row pays for the first scan
    record = {"seed": seed, **describe(folder), "build_s": round(time.perf_counter() - started, 1)}
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    return folder, record


def describe(folder: Path) -> dict:
    """Classes, images per split, images per class in train (min / median / max) and the
    images' short sides in pixels (min / median / max, all splits)."""
    counts: dict[str, Counter] = {}
    short_sides = []
    for split in SPLITS:
        if not (folder / split).is_dir():
            continue
        counts[split] = Counter()
        for path in (folder / split).rglob("*"):
            if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
                counts[split][path.parent.name] += 1
                with Image.open(path) as image:  # the header only
                    short_sides.append(min(image.size))
    train = sorted(counts["train"].values())
    return {
        "classes": len(counts["train"]),
        "images": {split: sum(counter.values()) for split, counter in counts.items()},
        "train_per_class": [train[0], statistics.median(train), train[-1]],
        "short_side": [min(short_sides), statistics.median(short_sides), max(short_sides)],
    }
