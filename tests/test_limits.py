"""--max-image-pixels and --csv-paths-outside-root hold beyond training: feature extraction,
evaluate, predict, report and export verification; and predict's --top-k is validated."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import write_colour_images
from PIL import Image

from tlkit.cli import main
from tlkit.data.datamodule import ImageDataModule
from tlkit.data.images import load_rgb
from tlkit.data.sources import scan_folder
from tlkit.infer.export import export_run
from tlkit.model.classifier import TransferClassifier
from tlkit.train.features import CachedFeatureDataModule

# The colour folder's images are 40 x 40 = 1,600 pixels.
REFUSING = 100  # a user limit below them
PILLOW_LOW = 500  # a Pillow limit that would refuse them (Pillow errors at 2x its limit)


def copy_run(tiny_run: Path, destination: Path, **config: object) -> Path:
    """A copy of the tiny run (without last.ckpt) whose config.yaml has `config` changed."""
    shutil.copytree(tiny_run, destination, ignore=shutil.ignore_patterns("last.ckpt", "report"))
    saved = yaml.safe_load((destination / "config.yaml").read_text())
    (destination / "config.yaml").write_text(yaml.safe_dump({**saved, **config}))
    return destination


@pytest.fixture
def low_pillow_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PILLOW_LOW)


def test_a_higher_user_limit_wins_over_pillows_and_a_lower_one_is_enforced(
    colour_folder: Path, low_pillow_limit
):
    image = colour_folder / "test" / "red" / "000.jpg"
    assert load_rgb(image, max_pixels=10_000).shape == (40, 40, 3)
    assert len(scan_folder(colour_folder / "test", max_pixels=10_000).samples) == 12
    with pytest.raises(ValueError, match="above the limit of 100"):
        load_rgb(image, max_pixels=REFUSING)


def test_feature_extraction_honours_the_limit(colour_folder: Path, tmp_path: Path, caplog):
    data = tmp_path / "data"
    write_colour_images(data, per_class=4, seed=0, size=16)
    model = TransferClassifier(
        num_classes=3, pretrained="bundled", strategy="features", img_size=32
    )
    images = ImageDataModule(
        data, model.preprocessing, num_workers=0, val_fraction=0.3, max_image_pixels=1_000
    )
    images.setup()
    # A training image replaced, after the scan, by one above the limit.
    Image.new("RGB", (100, 100)).save(images.train_set.samples[0][0], format="PNG")
    features = CachedFeatureDataModule(model, images, tmp_path / "cache", 0, "cpu", False)
    features.setup()  # the image is left out with its reason, never decoded or replaced
    assert features.report["train"]["skipped"] == 1
    assert len(features.splits["train"]) == len(images.train_set) - 1
    assert "above the limit of 1,000" in caplog.text


@pytest.mark.parametrize("command", ["evaluate", "report", "predict"])
def test_inference_commands_take_the_limit_from_the_run_and_a_flag_overrides_it(
    tiny_run: Path, colour_folder: Path, tmp_path: Path, command: str, capsys
):
    run = copy_run(tiny_run, tmp_path / "run", max_image_pixels=REFUSING)
    test = str(colour_folder / "test")
    extra = ["--out", str(tmp_path / "out")]
    assert main([command, str(run), test, *extra]) == 2
    assert "above the limit of 100" in capsys.readouterr().err
    assert main([command, str(run), test, *extra, "--max-image-pixels", "10000"]) == 0


@pytest.mark.parametrize("command", ["evaluate", "report", "predict"])
def test_inference_commands_accept_a_user_limit_above_pillows(
    tiny_run: Path, colour_folder: Path, tmp_path: Path, command: str, low_pillow_limit
):
    out = tmp_path / "out"
    test = str(colour_folder / "test")
    assert main([command, str(tiny_run), test, "--out", str(out)]) == 0
    if command == "evaluate":
        assert json.loads(out.read_text())["images"] == 12


@pytest.mark.parametrize("command", ["evaluate", "report"])
def test_csv_paths_outside_the_root_come_from_the_run_or_the_flag(
    tiny_run: Path, colour_folder: Path, tmp_path: Path, command: str, capsys
):
    lists = tmp_path / "lists"
    lists.mkdir()
    labels = lists / "labels.csv"
    test = colour_folder / "test"
    labels.write_text(
        "path,label\n"
        + "".join(f"{test}/{colour}/000.jpg,{colour}\n" for colour in ("red", "green", "blue"))
    )
    out = ["--out", str(tmp_path / "out")]
    assert main([command, str(tiny_run), str(labels), *out]) == 2
    assert "--csv-paths-outside-root" in capsys.readouterr().err
    assert main([command, str(tiny_run), str(labels), *out, "--csv-paths-outside-root"]) == 0
    allowing = copy_run(tiny_run, tmp_path / "allowing", csv_paths_outside_root=True)
    assert main([command, str(allowing), str(labels), *out]) == 0
    assert main([command, str(allowing), str(labels), *out, "--no-csv-paths-outside-root"]) == 2


def test_export_verification_honours_the_runs_limit(tiny_run: Path, tmp_path: Path, monkeypatch):
    refusing = copy_run(tiny_run, tmp_path / "refusing", max_image_pixels=REFUSING)
    card = export_run(refusing, tmp_path / "refused", "safetensors")
    assert "seeded random tensors" in card["verification"]["inputs"]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PILLOW_LOW)
    card = export_run(tiny_run, tmp_path / "accepted", "safetensors")
    assert card["verification"]["inputs"].startswith("8 images from")


@pytest.mark.parametrize("top_k", ["0", "-1"])
def test_predict_top_k_below_one_is_a_usage_error(
    tiny_run: Path, colour_folder: Path, top_k: str, capsys
):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(tiny_run), str(colour_folder / "test"), "--top-k", top_k])
    assert exit_info.value.code == 2
    assert f"--top-k: must be 1 or more, not {top_k}" in capsys.readouterr().err
