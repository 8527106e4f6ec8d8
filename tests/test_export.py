"""Export to ONNX, TorchScript and safetensors: round trips, the card, integrity, served docs."""

import contextlib
import dataclasses
import hashlib
import io
import json
import re
import shutil
import stat
import sys
from pathlib import Path

import cv2
import onnxruntime
import pytest
import torch
from PIL import Image

from tlkit.cli import main
from tlkit.data.augment import INTERPOLATIONS, eval_transform
from tlkit.data.images import load_rgb
from tlkit.errors import ExportError
from tlkit.infer import export as export_module
from tlkit.infer.export import (
    CARD,
    OPENCV_INTERPOLATIONS,
    TOLERANCE,
    export_run,
    load_exported,
    verification_images,
)
from tlkit.infer.predict import Predictor, evaluate, load_model, predict
from tlkit.runfolder import read_config, read_summary

FORMATS = ["onnx", "torchscript", "safetensors"]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "export.md"


@pytest.fixture(scope="module")
def export_folder(tiny_run: Path, tmp_path_factory):
    """`export_folder(format)`: the tiny run exported through the CLI, once per format."""
    folders: dict[str, Path] = {}

    def get(format: str) -> Path:
        if format not in folders:
            out = tmp_path_factory.mktemp("exports") / format
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                arguments = ["export", str(tiny_run), "--format", format, "--out", str(out)]
                assert main(arguments) == 0
            assert "max |probability difference|" in printed.getvalue()
            folders[format] = out
        return folders[format]

    return get


@pytest.fixture(scope="module")
def run_predictions(tiny_run: Path, colour_folder: Path) -> list[dict]:
    rows, skipped, _ = predict(tiny_run, [colour_folder / "test"], top_k=3, accelerator="cpu")
    assert len(rows) == 12 and not skipped
    return rows


@pytest.mark.parametrize("format", FORMATS)
def test_export_writes_a_verified_model_and_its_card(export_folder, tiny_run: Path, format):
    folder = export_folder(format)
    card = json.loads((folder / CARD).read_text())
    model_file = folder / card["model_file"]
    assert sorted(path.name for path in folder.iterdir()) == sorted([CARD, model_file.name])
    assert card["format"] == format
    assert card["sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest()
    summary = read_summary(tiny_run)
    assert card["classes"] == summary.classes == ["blue", "green", "red"]
    preprocessing = card["preprocessing"]
    for key in ("input_size", "interpolation", "crop_pct", "mean", "std"):
        assert preprocessing[key] == pytest.approx(getattr(summary.preprocessing, key))
    assert preprocessing["resize_short_side"] == round(32 / 0.875)
    assert card["input"]["shape"] == ["batch", 3, 32, 32]
    assert card["output"]["name"] == "probabilities" and "softmax" in card["output"]["semantics"]
    assert card["output"]["shape"] == ["batch", 3]
    assert card["model"]["backbone"] == "tf_efficientnet_lite0"
    assert card["model"]["weights"] == "bundled" and card["model"]["strategy"] == "partial"
    assert card["metrics"]["test_acc"] == summary.test_acc
    assert card["metrics"]["best_val_acc"] == summary.best_val_acc
    assert {"tlkit", "torch", "timm"} <= set(card["versions"])
    verification = card["verification"]
    assert verification["inputs"].startswith("8 images from")  # the run's real images
    assert verification["batch_sizes"] == [8, 1]
    assert 0 <= verification["max_abs_difference"] <= TOLERANCE
    for path in (folder / CARD, model_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.mark.parametrize("format", FORMATS)
def test_exported_predictions_equal_the_run_folders(
    export_folder, colour_folder, run_predictions, format
):
    rows, skipped, _ = predict(export_folder(format), [colour_folder / "test"], top_k=3)
    assert not skipped and len(rows) == len(run_predictions)
    for exported, original in zip(rows, run_predictions, strict=True):
        assert exported.keys() == original.keys() and exported["path"] == original["path"]
        for rank in (1, 2, 3):
            assert exported[f"label_{rank}"] == original[f"label_{rank}"]
            assert exported[f"prob_{rank}"] == pytest.approx(original[f"prob_{rank}"], abs=1e-5)


def test_predict_cli_gives_the_same_csv_for_an_export_folder(
    export_folder, tiny_run: Path, colour_folder: Path, tmp_path: Path
):
    csv_files = {}
    for name, source in (("run", tiny_run), ("export", export_folder("onnx"))):
        csv_files[name] = tmp_path / f"{name}.csv"
        images = str(colour_folder / "test" / "green")
        arguments = ["predict", str(source), images, "--top-k", "2", "--out", str(csv_files[name])]
        assert main(arguments) == 0
    run_lines = csv_files["run"].read_text().splitlines()
    export_lines = csv_files["export"].read_text().splitlines()
    assert run_lines[0] == export_lines[0] == "path,label_1,prob_1,label_2,prob_2"
    assert len(export_lines) == 5
    for run_line, export_line in zip(run_lines[1:], export_lines[1:], strict=True):
        run_values, export_values = run_line.split(","), export_line.split(",")
        assert run_values[::2] == export_values[::2]  # path and labels
        for run_value, export_value in zip(run_values[2::2], export_values[2::2], strict=True):
            assert float(export_value) == pytest.approx(float(run_value), abs=1e-5)


def test_evaluate_accepts_an_export_folder(export_folder, tiny_run: Path, colour_folder: Path):
    results = evaluate(export_folder("safetensors"), colour_folder / "test")
    assert results["images"] == 12
    assert results["top1"] == pytest.approx(read_summary(tiny_run).test_acc)


def test_onnx_batch_axis_is_dynamic(export_folder, tiny_run: Path):
    folder = export_folder("onnx")
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"))
    assert session.get_inputs()[0].shape == ["batch", 3, 32, 32]
    exported, checkpoint = load_exported(folder), load_model(tiny_run)
    generator = torch.Generator().manual_seed(1)
    for batch_size in (1, 5):
        images = torch.randn(batch_size, 3, 32, 32, generator=generator)
        with torch.inference_mode():
            expected = checkpoint.predict_batch(images)
        probabilities = exported.predict_batch(images)
        assert probabilities.shape == (batch_size, 3)
        assert torch.allclose(probabilities, expected, atol=TOLERANCE, rtol=0)
        assert torch.allclose(probabilities.sum(dim=1), torch.ones(batch_size))


def test_run_checkpoints_and_exports_are_both_predictors(export_folder, tiny_run: Path):
    exported = load_exported(export_folder("torchscript"))
    assert isinstance(exported, Predictor) and isinstance(load_model(tiny_run), Predictor)
    probabilities = exported.predict_batch(torch.zeros(2, 3, 32, 32))
    assert probabilities.shape == (2, 3)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(2))


@pytest.mark.parametrize("format", FORMATS)
def test_a_tampered_model_file_is_refused(export_folder, tmp_path: Path, format, capsys):
    folder = tmp_path / "tampered"
    shutil.copytree(export_folder(format), folder)
    model_file = folder / json.loads((folder / CARD).read_text())["model_file"]
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, deep inside the weights
    model_file.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="SHA-256 mismatch"):
        load_exported(folder)
    assert main(["predict", str(folder), str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "SHA-256 mismatch" in error and len(error.strip().splitlines()) == 1


def test_bad_cards_and_folders_are_clear_errors(
    export_folder, tiny_run: Path, tmp_path: Path, capsys
):
    folder = export_folder("safetensors")
    assert main(["export", str(tiny_run), "--format", "onnx", "--out", str(folder)]) == 2
    assert "already holds an exported model" in capsys.readouterr().err
    assert main(["export", str(tiny_run), "--out", str(tiny_run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "best.ckpt is missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: exit 2 with the valid choices
        main(["export", str(tiny_run), "--format", "pickle", "--out", str(tmp_path / "out")])
    card = json.loads((folder / CARD).read_text())
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    for text, message in (
        ("{not json", "not valid JSON"),
        (json.dumps({"format": "onnx"}), "missing model_file, sha256"),
        (json.dumps({**card, "format": "pickle"}), "unknown format 'pickle'"),
        (json.dumps({**card, "model_file": "../model.safetensors"}), "must be a file name"),
    ):
        (broken / CARD).write_text(text)
        with pytest.raises(ExportError, match=re.escape(message)):
            load_exported(broken)


def test_onnx_without_its_extra_says_how_to_install_it(export_folder, monkeypatch):
    folder = export_folder("onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(ExportError, match=re.escape("pip install 'tlkit[onnx]'")):
        load_exported(folder)


def test_a_failed_verification_keeps_nothing(tiny_run: Path, tmp_path: Path, monkeypatch):
    safetensors = export_module.FORMATS["safetensors"]

    def write_perturbed(network, example, path):
        with torch.no_grad():
            network.head.classifier.bias[0] += 0.01  # the checkpoint's network, changed
        safetensors.write(network, example, path)

    monkeypatch.setitem(
        export_module.FORMATS,
        "safetensors",
        dataclasses.replace(safetensors, write=write_perturbed),
    )
    out = tmp_path / "export"
    with pytest.raises(ExportError, match="differs from the checkpoint by up to"):
        export_run(tiny_run, out, "safetensors")
    assert list(out.iterdir()) == []


def test_verification_images_come_from_the_runs_data_or_a_seeded_generator(
    tiny_run: Path, colour_folder: Path, tmp_path: Path
):
    preprocessing = load_model(tiny_run).preprocessing
    data = tmp_path / "data"
    data.mkdir()
    for name in ("000.jpg", "001.png"):
        shutil.copy(colour_folder / "test" / "red" / name, data / name)
    shutil.copy(colour_folder / "test" / "red" / "002.jpg", tmp_path / "outside.jpg")
    (data / "broken.jpg").write_text("not an image")
    labels = data / "labels.csv"
    labels.write_text("path,label\n../outside.jpg,red\nbroken.jpg,red\n000.jpg,red\n001.png,red\n")
    for source, expected in ((labels, "2 images from"), (tmp_path / "gone", "8 seeded random")):
        config = dataclasses.replace(read_config(tiny_run), data_dir=str(source))
        images, description = verification_images(config, preprocessing)
        assert description.startswith(expected) and images.shape[1:] == (3, 32, 32)
    again, _ = verification_images(config, preprocessing)
    assert torch.equal(images, again)
    interleaved = export_module._images_by_class(colour_folder / "test", 8)
    assert [Path(path).parent.name for path in interleaved[:4]] == ["blue", "green", "red", "blue"]
    assert len(interleaved) == 12


def _snippet(name: str) -> str:
    match = re.search(rf"<!-- snippet: {name} -->\n```python\n(.*?)```", DOCS.read_text(), re.S)
    assert match, f"docs/export.md has no snippet '{name}'"
    return match.group(1)


@pytest.mark.parametrize(
    ("format", "snippet"), [("onnx", "serve-onnx"), ("torchscript", "serve-torchscript")]
)
def test_the_serving_snippets_in_the_docs_run_and_agree_with_tlkit(
    export_folder, colour_folder: Path, tmp_path: Path, monkeypatch, capsys, format, snippet
):
    code = _snippet(snippet)
    assert len(code.splitlines()) < 20
    assert "tlkit" not in code  # served from the card alone
    photo = tmp_path / "photo.jpg"  # not square: the resize rounds one side
    Image.open(colour_folder / "test" / "blue" / "000.jpg").resize((61, 45)).save(photo)
    (tmp_path / "exported").symlink_to(export_folder(format))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(DOCS), "exec"), namespace)
    printed_label = capsys.readouterr().out.split()[0]
    exported = load_exported(export_folder(format))
    expected = eval_transform(exported.preprocessing)(image=load_rgb(photo))["image"]
    served_batch = torch.as_tensor(namespace["batch"])
    assert served_batch.shape == (1, 3, 32, 32)
    assert torch.allclose(served_batch[0], expected, atol=1e-5, rtol=0)  # same pixels as tlkit
    (row,), _, _ = predict(export_folder(format), [photo], top_k=3)
    assert printed_label == row["label_1"]
    served = dict(zip(exported.class_names, map(float, namespace["probabilities"]), strict=True))
    for rank in (1, 2, 3):
        assert served[row[f"label_{rank}"]] == pytest.approx(row[f"prob_{rank}"], abs=1e-5)


def test_the_cards_opencv_flags_are_the_ones_tlkit_resizes_with():
    assert OPENCV_INTERPOLATIONS.keys() == INTERPOLATIONS.keys()
    for name, flag in INTERPOLATIONS.items():
        assert getattr(cv2, OPENCV_INTERPOLATIONS[name]) == flag


def test_the_safetensors_snippet_rebuilds_the_network(export_folder, tmp_path: Path, monkeypatch):
    folder = export_folder("safetensors")
    (tmp_path / "exported").symlink_to(folder)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_snippet("load-safetensors"), str(DOCS), "exec"), namespace)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        rebuilt = namespace["network"](images)
    assert torch.equal(rebuilt, load_exported(folder).predict_batch(images))
