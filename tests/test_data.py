import io
import os
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from conftest import write_colour_images, write_identical_images
from lightning_fabric.utilities.data import _set_sampler_epoch
from PIL import Image

from tlkit.data.augment import eval_transform, train_transform
from tlkit.data.datamodule import ImageDataModule
from tlkit.data.datasets import seed_augmentation
from tlkit.data.images import load_rgb
from tlkit.data.sources import OtherFiles, read_csv, scan_folder
from tlkit.data.split import split_samples
from tlkit.errors import DatasetError
from tlkit.runfolder import Preprocessing

PREPROCESSING = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.875)


def save(image: Image.Image, path: Path, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def test_grayscale_palette_and_16_bit_images_become_8_bit_rgb(tmp_path: Path):
    gray = save(Image.new("L", (5, 4), 100), tmp_path / "gray.png")
    assert load_rgb(gray).shape == (4, 5, 3) and load_rgb(gray).dtype == np.uint8
    sixteen = save(Image.fromarray(np.full((4, 5), 65535, np.uint16)), tmp_path / "16.png")
    assert Image.open(sixteen).mode.startswith("I")
    assert (load_rgb(sixteen) == 255).all()
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.putpixel((1, 1), 1)
    path = save(palette, tmp_path / "palette.png", transparency=0)
    pixels = load_rgb(path)
    assert tuple(pixels[0, 0]) == (255, 255, 255)  # transparent: composited onto white
    assert tuple(pixels[1, 1]) == (10, 200, 30)


def test_cmyk_jpeg_and_exif_rotation(tmp_path: Path):
    cmyk = save(Image.new("CMYK", (6, 3), (0, 255, 255, 0)), tmp_path / "cmyk.jpg")
    red = load_rgb(cmyk)
    assert red.shape == (3, 6, 3) and red[..., 0].mean() > 200 and red[..., 1].mean() < 60
    image = Image.new("RGB", (6, 3), (0, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated = save(image, tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert load_rgb(rotated).shape == (6, 3, 3)


def test_jpeg_aliases_and_avif_are_read_as_images(tmp_path: Path):
    """Cameras and browsers save .jfif, .jpe and .avif: they are images, not ignored files."""
    for suffix, image_format in ((".jfif", "JPEG"), (".jpe", "JPEG"), (".avif", "AVIF")):
        save(
            Image.new("RGB", (16, 16), (200, 10, 10)),
            tmp_path / "red" / f"a{suffix}",
            format=image_format,
        )
        save(
            Image.new("RGB", (16, 16), (10, 10, 200)),
            tmp_path / "blue" / f"b{suffix}",
            format=image_format,
        )
    result = scan_folder(tmp_path)
    assert len(result.samples) == 6 and not result.skipped
    assert result.other_files.counts() == ({}, {})
    assert load_rgb(result.samples[0][0]).shape == (16, 16, 3)


def test_broken_files_are_skipped_counted_and_named(tmp_path: Path):
    write_colour_images(tmp_path, per_class=2, seed=0)
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, format="JPEG")
    (tmp_path / "red" / "truncated.jpg").write_bytes(good.getvalue()[:300])
    (tmp_path / "red" / "empty.jpg").write_bytes(b"")
    (tmp_path / "green" / "notes.jpg").write_text("not an image")
    (tmp_path / "green" / "readme.txt").write_text("hello")
    save(Image.new("RGB", (8, 8)), tmp_path / "blue" / "really_a_png.jpg", format="PNG")
    result = scan_folder(tmp_path)
    skipped = {Path(path).name: reason for path, reason in result.skipped}
    assert set(skipped) == {"truncated.jpg", "empty.jpg", "notes.jpg"}
    assert result.other_files.counts() == ({".txt": 1}, {})  # not an image: ignored
    used = {Path(path).name for path, _ in result.samples}
    assert "really_a_png.jpg" in used and len(result.samples) == 7
    assert result.classes == ["blue", "green", "red"]


def test_files_beside_the_images_are_counted_by_kind_not_skipped(tmp_path: Path):
    """A collection as it ships (tuxpaint's stamps): descriptions, data files and sounds beside
    the images are ignored, counted by extension; SVG drawings are named with what to do; only
    a broken image is skipped, with its reason."""
    write_colour_images(tmp_path, per_class=2, seed=0, size=8)
    nested = tmp_path / "red" / "sub"
    nested.mkdir()
    for name in ("a.txt", "b.txt", "a.ogg", "b.ogg", "c.OGG", "a.dat", "LICENSE"):
        (nested / name).write_text("not an image")
    (tmp_path / "blue" / "star.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    (tmp_path / "blue" / ".hidden.txt").write_text("never seen")
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(png, format="PNG")
    (nested / "truncated.png").write_bytes(png.getvalue()[:60])
    result = scan_folder(tmp_path)
    assert [Path(path).name for path, _ in result.skipped] == ["truncated.png"]
    assert result.skipped[0][1] == "OSError: image file is truncated"
    ignored, unread = result.other_files.counts()
    assert ignored == {".ogg": 3, ".txt": 2, "": 1, ".dat": 1}  # most first, then by name
    assert unread == {".svg": 1}
    ignored_line, svg_line = result.other_files.messages()
    assert ignored_line == (
        "Ignored 7 files that are not images: 3 .ogg, 2 .txt, 1 (no extension), 1 .dat"
    )
    assert svg_line.startswith("Not read: 1 .svg files, vector drawings") and "PNG" in svg_line
    assert "rsvg-convert" in svg_line
    assert len(result.samples) == 6
    # A class of nothing but drawings is an error that says why.
    (tmp_path / "drawings").mkdir()
    (tmp_path / "drawings" / "a.svgz").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"'drawings' has no image files\. Not read: 1 \.svgz"):
        scan_folder(tmp_path)


def test_unread_formats_in_a_csv_are_counted_not_checked(tmp_path: Path):
    write_colour_images(tmp_path / "images", per_class=2, seed=0, size=8)
    (tmp_path / "images" / "photo.HEIC").write_bytes(b"")
    rows = ["path,label", "images/red/000.jpg,red", "images/red/001.png,red"]
    rows += ["images/green/000.jpg,green", "images/photo.HEIC,green"]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    result = read_csv(tmp_path / "labels.csv")
    assert len(result.samples) == 3 and result.skipped == []
    assert result.other_files.counts() == ({}, {".heic": 1})
    assert "heif-convert" in result.other_files.messages()[0]
    assert OtherFiles.from_counts(*result.other_files.counts()) == result.other_files


def test_symlink_loop_does_not_hang(tmp_path: Path):
    write_colour_images(tmp_path, per_class=2, seed=0)
    os.symlink(tmp_path / "red", tmp_path / "red" / "loop")
    result = scan_folder(tmp_path)
    assert len(result.samples) == 6


def test_folder_problems_are_clear_errors(tmp_path: Path):
    with pytest.raises(DatasetError, match="not a folder"):
        scan_folder(tmp_path / "missing")
    with pytest.raises(DatasetError, match="no class sub-folders"):
        scan_folder(tmp_path)
    (tmp_path / "cats").mkdir()
    with pytest.raises(DatasetError, match="'cats' has no image files"):
        scan_folder(tmp_path)
    (tmp_path / "cats" / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match="no usable image"):
        scan_folder(tmp_path)


def test_a_single_class_is_a_clear_error(tmp_path: Path):
    write_colour_images(tmp_path / "one", per_class=4, seed=0)
    for colour in ("green", "blue"):
        for file in (tmp_path / "one" / colour).iterdir():
            file.unlink()
        (tmp_path / "one" / colour).rmdir()
    module = ImageDataModule(tmp_path / "one", PREPROCESSING, num_workers=0)
    with pytest.raises(DatasetError, match="one class"):
        module.setup()


def test_evaluation_folder_with_an_unknown_class_is_rejected(tmp_path: Path):
    write_colour_images(tmp_path, per_class=1, seed=0)
    with pytest.raises(DatasetError, match=r"classes \['blue'\] were not in the training"):
        scan_folder(tmp_path, classes=["green", "red"])


def test_csv_source(tmp_path: Path):
    write_colour_images(tmp_path / "images", per_class=2, seed=0)
    rows = ["path,label"] + [
        f"images/{colour}/{index:03d}{'.png' if index % 2 else '.jpg'},{colour}"
        for colour in ("red", "green")
        for index in range(2)
    ]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    result = read_csv(tmp_path / "labels.csv")
    assert result.classes == ["green", "red"] and len(result.samples) == 4
    with pytest.raises(DatasetError, match=r"labels \['green'\] were not in the training"):
        read_csv(tmp_path / "labels.csv", classes=["red", "blue"])
    (tmp_path / "missing.csv").write_text("path,label\nimages/red/nope.png,red\n")
    with pytest.raises(DatasetError, match="1 listed files do not exist"):
        read_csv(tmp_path / "missing.csv")
    (tmp_path / "escape.csv").write_text("path,label\n../../etc/passwd,red\n")
    with pytest.raises(DatasetError, match="paths outside"):
        read_csv(tmp_path / "escape.csv")
    (tmp_path / "noheader.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="columns 'path' and either 'label'"):
        read_csv(tmp_path / "noheader.csv")


def test_train_val_split_is_stratified_and_seeded():
    samples = [(f"{i}.png", i % 3) for i in range(30)]
    split = split_samples(samples, {"val": 0.2}, seed=0, root=".")
    train, val = split["train"], split["val"]
    assert {label for _, label in val} == {0, 1, 2}
    assert sorted(train + val) == sorted(samples)
    assert split_samples(samples, {"val": 0.2}, seed=0, root=".") == split
    assert split_samples(samples, {"val": 0.2}, seed=1, root=".") != split
    with pytest.raises(DatasetError, match="cannot split"):
        split_samples([("a.png", 0), ("b.png", 1)], {"val": 0.5}, seed=0, root=".")


def test_datamodule_layouts(colour_folder: Path, tmp_path: Path):
    module = ImageDataModule(colour_folder, PREPROCESSING, num_workers=0, val_fraction=0.2)
    module.setup()
    assert module.classes == ["blue", "green", "red"]
    assert (len(module.train_set) + len(module.val_set), len(module.test_set)) == (30, 12)
    assert {label for _, label in module.val_set.samples} == {0, 1, 2}
    images, labels = next(iter(module.train_dataloader()))
    assert images.shape == (len(module.train_set), 3, 32, 32)  # one batch: < batch size 64
    assert labels.dtype == torch.int64
    single = ImageDataModule(colour_folder / "train", PREPROCESSING, num_workers=0)
    single.setup()  # one folder: validation and test held out of it (10% each by default)
    sizes = [len(single.train_set), len(single.val_set), len(single.test_set)]
    assert sum(sizes) == 30 and min(sizes) >= 3  # every class of 10 in every split
    assert {label for _, label in single.test_set.samples} == {0, 1, 2}
    untested = ImageDataModule(colour_folder / "train", PREPROCESSING, test_fraction=0)
    untested.setup()
    assert untested.test_set is None and len(untested.train_set) + len(untested.val_set) == 30


def test_transforms_scale_with_the_input_size_and_are_seeded():
    photo = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    first = train_transform(PREPROCESSING, seed=3)(image=photo)["image"]
    again = train_transform(PREPROCESSING, seed=3)(image=photo)["image"]
    assert first.shape == (3, 32, 32) and torch.equal(first, again)
    evaluated = eval_transform(PREPROCESSING)(image=photo)["image"]
    assert evaluated.shape == (3, 32, 32)
    assert -1.0 <= float(evaluated.min()) and float(evaluated.max()) <= 1.0  # mean=std=0.5
    with pytest.raises(ValueError, match="short side range"):
        train_transform(PREPROCESSING, short_side_range=(100, 480))


def test_the_transforms_of_a_seeded_augmentation_draw_independently():
    """Each image's pipeline is seeded anew; its transforms must not draw equal numbers. (Seeded
    with albumentations' `set_random_seed`, every transform got generators seeded alike: every
    flipped image came out darker and every other one brighter.)"""
    dark_to_bright = np.tile(np.linspace(40, 210, 16), (16, 1)).astype(np.uint8)
    image = np.repeat(dark_to_bright[..., None], 3, axis=2)
    jitter = A.ColorJitter(brightness=0.4, contrast=0, saturation=0, hue=0, p=1.0)
    pipeline = A.Compose([A.HorizontalFlip(p=0.5), jitter])  # as train_transform's
    flipped, darker = [], []
    for index in range(400):
        seed_augmentation(pipeline, seed=0, epoch=0, index=index)
        augmented = pipeline(image=image)["image"].astype(float)
        flipped.append(augmented[:, 0].mean() > augmented[:, -1].mean())
        darker.append(augmented.mean() < image.mean())
    assert 0.4 < np.mean(flipped) < 0.6 and 0.4 < np.mean(darker) < 0.6
    assert abs(np.corrcoef(flipped, darker)[0, 1]) < 0.15


def test_augmentation_follows_seed_epoch_and_image_not_workers(tmp_path: Path):
    """Each image's augmentation is drawn from (seed, epoch, image): a new draw every epoch,
    persistent workers included, and the same draw with any number of workers (or after a
    resume)."""
    folder = write_identical_images(tmp_path / "data", {"a": 6, "b": 6})

    def training_loader(workers: int):
        module = ImageDataModule(
            folder, PREPROCESSING, batch_size=4, num_workers=workers, val_fraction=0.25, seed=0
        )
        module.setup()
        return module.train_dataloader()

    def epoch_images(loader, epoch: int) -> torch.Tensor:
        _set_sampler_epoch(loader, epoch)  # what Lightning's fit loop calls at each epoch start
        return torch.cat([images for images, _ in loader])

    def drawn(images: torch.Tensor) -> list[float]:
        """The epoch's augmentations in any order (the same image in every file)."""
        return sorted(image.sum().item() for image in images)

    persistent = training_loader(workers=2)
    assert persistent.persistent_workers
    first, second = epoch_images(persistent, 0), epoch_images(persistent, 1)
    assert drawn(first) != drawn(second)
    assert torch.equal(epoch_images(training_loader(workers=0), 1), second)
