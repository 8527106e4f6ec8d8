"""The recipes run as users run them, on tiny data."""

import gzip
import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from tlkit.runfolder import read_summary

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def run_recipe(name: str, arguments: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [name, *arguments])
    runpy.run_path(str(RECIPES / name), run_name="__main__")


def test_csv_recipe(colour_folder: Path, tmp_path: Path, monkeypatch):
    rows = ["path,label"] + [
        f"{path.relative_to(colour_folder).as_posix()},{path.parent.name}"
        for path in sorted((colour_folder / "train").rglob("*.*"))
    ]
    csv_file = colour_folder / "train_labels.csv"
    csv_file.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    run_recipe(
        "csv_dataset.py",
        [str(csv_file), "--out", str(out), "--epochs", "1", "--img-size", "32"],
        monkeypatch,
    )
    summary = read_summary(out)
    # 30 images, 10% held out for validation and 10% for test by the stable hashed split: at
    # least one of each per class
    assert summary.train_images + summary.val_images + summary.test_images == 30
    assert summary.val_images >= 3 and summary.test_images >= 3


def test_custom_imagefolder_recipe(colour_folder: Path, tmp_path: Path, monkeypatch, capsys):
    out = tmp_path / "run"
    run_recipe(
        "custom_imagefolder.py",
        [str(colour_folder), "--out", str(out), "--epochs", "1", "--img-size", "32"],
        monkeypatch,
    )
    output = capsys.readouterr().out
    printed = re.search(r"3 classes, (\d+) training images, 0 files skipped", output)
    assert printed and 24 <= int(printed.group(1)) <= 27  # 30 images, at least 1 per class held out
    assert (out / "best.ckpt").is_file()


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(
        size.to_bytes(4, "big") for size in array.shape
    )
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_and_subset(tmp_path: Path):
    sys.path.insert(0, str(RECIPES))
    try:
        import fashion_mnist
    finally:
        sys.path.remove(str(RECIPES))
    images = np.arange(20 * 28 * 28).reshape(20, 28, 28) % 256
    labels = np.arange(20) % 10
    for images_file, labels_file in fashion_mnist.FILES.values():
        write_idx(tmp_path / images_file, images)
        write_idx(tmp_path / labels_file, labels)
    read_images, read_labels = fashion_mnist.load_split("train", tmp_path)
    assert np.array_equal(read_images, images) and np.array_equal(read_labels, labels)
    subset = fashion_mnist.stratified_subset(read_labels, 10, seed=0)
    assert sorted(read_labels[subset]) == list(range(10))
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.load_split("train", tmp_path / "absent")


def test_init_statistics_recipe_shows_the_lecture_results(tmp_path: Path, monkeypatch, capsys):
    sys.path.insert(0, str(RECIPES))
    try:
        import init_statistics
    finally:
        sys.path.remove(str(RECIPES))

    def layers(activation: str, initialisation: str):
        inputs, layers = init_statistics.statistics(
            *init_statistics.layer_outputs(activation, initialisation)
        )
        return inputs.std, layers

    for activation in ("tanh", "relu"):  # small weights: the activations vanish
        input_std, small = layers(activation, "small")
        assert small[-1].std < 1e-3 * input_std and small[-1].vanishing
    for activation, initialisation in (("tanh", "xavier"), ("relu", "he")):  # scale kept
        _, kept = layers(activation, initialisation)
        stds = [layer.std for layer in kept]
        assert max(stds) < 10 * min(stds) and not any(layer.flags for layer in kept)
    _, relu_xavier = layers("relu", "xavier")  # Xavier halves the variance at every ReLU
    assert relu_xavier[-1].std < relu_xavier[0].std / 10
    _, saturated = layers("tanh", "large")
    assert all(layer.saturating for layer in saturated)

    out = tmp_path / "init.png"
    run_recipe("init_statistics.py", ["--out", str(out)], monkeypatch)
    assert out.read_bytes().startswith(b"\x89PNG")
    printed = capsys.readouterr().out
    assert "relu, he initialisation" in printed and "hidden layer 10 had mean" in printed
