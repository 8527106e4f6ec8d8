"""Decoding image files robustly to 8-bit RGB, and checking them without training.

`load_rgb` is tlkit's one decoder (files and shard bytes alike): EXIF orientation applied, any
mode made RGB, decompression bombs refused before decoding. `inspect_image(s)` checks files as
the scan's `--verify` mode says. `IMAGE_EXTENSIONS` are the files tlkit reads as images;
`UNREAD_IMAGE_FORMATS` the image formats it does not read, with what to do with them.
"""

from __future__ import annotations

import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from tlkit.data.scan_index import FileCheck
from tlkit.errors import DatasetError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {
    ".jpg",
    ".jpeg",
    ".jpe",  # JPEG's other extensions
    ".jfif",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".avif",  # decoded by Pillow >= 11.3 (its wheels carry libavif)
    ".ppm",
    ".pgm",
    ".pbm",
}
IMAGE_SUFFIXES = tuple(IMAGE_EXTENSIONS)  # for str.endswith, faster than splitting names
# Images in formats Pillow does not decode (without plug-ins tlkit does not install), and what
# to do with them: a folder that holds them is told so, not left to think they were read.
_VECTOR = (
    "vector drawings: rasterise them to PNG first, e.g. `rsvg-convert -w 512 -o x.png x.svg` "
    "(librsvg) or `inkscape x.svg -o x.png`"
)
_HEIF = "HEIF photos: convert them to JPEG first, e.g. `heif-convert x.heic x.jpg` (libheif)"
_RAW = (
    "camera raw files: develop them to JPEG or TIFF first, e.g. `darktable-cli x.nef x.jpg` "
    "or `dcraw -T x.nef` (writes x.tiff)"
)
UNREAD_IMAGE_FORMATS = {
    ".svg": _VECTOR,
    ".svgz": _VECTOR,
    ".heic": _HEIF,
    ".heif": _HEIF,
    **dict.fromkeys(
        (".arw", ".cr2", ".cr3", ".dng", ".nef", ".nrw", ".orf", ".pef", ".raf", ".rw2", ".srw"),
        _RAW,
    ),
}
SCAN_DRAFT_SIZE = (64, 64)  # JPEGs are checked with a fast reduced-size decode
DEFAULT_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's decompression-bomb threshold
# What decoding a broken, vanished, oversized or unreadable file raises (Pillow, the OS, numpy)
LOAD_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


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
    # in place: no copy of an image that needs no turn (a seventh of a small PNG's load time)
    ImageOps.exif_transpose(image, in_place=True)
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
