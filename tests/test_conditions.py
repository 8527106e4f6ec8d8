"""The conditions matrix: every command, end to end, on several backbone families.

Each family trains for one epoch at its own pretrained input size (no --img-size), then is
evaluated, predicted from and exported, so that a break specific to one family (input size,
layer groups, fixed-size models, export tracing) shows here. timm's `test_*` models are the real
architectures at a tiny width, with random weights (`--pretrained none`): the bundled weights
exist for EfficientNet-Lite0 only.
"""

import csv
import json
from pathlib import Path

import pytest
from timm.models import get_pretrained_cfg

from tlkit.cli import main
from tlkit.runfolder import read_summary

FAMILIES = [
    # (timm model, export format): the formats rotate so each is traced through one family
    ("test_efficientnet", "torchscript"),
    ("test_resnet", "onnx"),
    ("test_convnext", "safetensors"),
    ("test_vit", "torchscript"),  # fixed input size: timm must be built at it
    ("mobilenetv3_small_050", "torchscript"),
    ("regnetx_002", "safetensors"),
]


@pytest.mark.slow
@pytest.mark.parametrize("backbone, export_format", FAMILIES)
def test_finetune_evaluate_predict_export(
    backbone: str, export_format: str, colour_folder: Path, tmp_path: Path, capsys
):
    own_size = get_pretrained_cfg(backbone).input_size[-1]
    run = tmp_path / "run"
    flags = ["--backbone", backbone, "--pretrained", "none", "--epochs", "1"]
    flags += ["--batch-size", "8", "--num-workers", "0", "--val-fraction", "0.3"]
    flags += ["--strategy", "partial", "--unfreeze-stages", "1", "--out", str(run)]
    assert main(["finetune", str(colour_folder), *flags]) == 0
    summary = read_summary(run)
    assert summary.preprocessing.input_size == own_size
    assert summary.epochs_run == 1 and summary.test_images == 12
    assert 0 < summary.trainable_parameters < summary.total_parameters

    capsys.readouterr()
    assert main(["evaluate", str(run), str(colour_folder / "test"), "--accelerator", "cpu"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["images"] == 12 and 0 <= results["top1"] <= 1

    predictions = tmp_path / "predictions.csv"
    test_images = str(colour_folder / "test")
    predict = ["predict", str(run), test_images, "--accelerator", "cpu", "--out", str(predictions)]
    assert main(predict) == 0
    with open(predictions, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 and {row["label_1"] for row in rows} <= {"blue", "green", "red"}

    exported = tmp_path / "exported"
    assert main(["export", str(run), "--format", export_format, "--out", str(exported)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(exported), test_images, "--accelerator", "cpu"]) == 0
    from_export = json.loads(capsys.readouterr().out)
    assert from_export["top1"] == pytest.approx(results["top1"])
