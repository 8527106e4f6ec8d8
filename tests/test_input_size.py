"""The input size comes from the backbone (timm's pretrained config), reaches timm for models
with a fixed input size, and configuration errors are reported before any data is scanned."""

from pathlib import Path

import pytest
import torch
import yaml

from tlkit.cli import main
from tlkit.config import FinetuneConfig
from tlkit.data.datamodule import ImageDataModule
from tlkit.model.classifier import TransferClassifier


def test_img_size_defaults_to_the_backbones_pretrained_size(capsys):
    """With a named strategy; --strategy auto chooses the size (tests/test_auto.py)."""
    assert FinetuneConfig(strategy="partial").img_size == 224  # tf_efficientnet_lite0
    assert FinetuneConfig(strategy="full", backbone="efficientnet_b3").img_size == 288
    override = FinetuneConfig(strategy="full", backbone="efficientnet_b3", img_size=64)
    assert override.img_size == 64
    flags = ["--backbone", "vit_tiny_patch16_384", "--strategy", "features", "--print-config"]
    assert main(["finetune", *flags]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["img_size"] == 384


def test_a_fixed_size_vit_is_built_and_run_at_the_resolved_size():
    config = FinetuneConfig(backbone="test_vit", pretrained="none", img_size=64)
    model = TransferClassifier(2, config.backbone, config.pretrained, img_size=config.img_size)
    assert model.backbone.patch_embed.img_size == (64, 64)
    assert model.preprocessing.input_size == 64
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 2)


@pytest.fixture()
def scan_forbidden(monkeypatch):
    """Any scan of the data fails the test: the errors must come first."""

    def scan(self, stage=None):
        raise AssertionError("the data was scanned before the configuration was checked")

    monkeypatch.setattr(ImageDataModule, "setup", scan)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--strategy", "partial", "--unfreeze-stages", "9"], "between 1 and 8"),
        (["--short-side-min", "300", "--short-side-max", "200"], "short side range"),
        (["--img-size", "8"], "img_size=8"),
    ],
)
def test_configuration_errors_come_before_the_scan(
    flags, message, scan_forbidden, colour_folder: Path, tmp_path: Path, capsys
):
    arguments = ["finetune", str(colour_folder), "--out", str(tmp_path / "run")]
    assert main([*arguments, "--pretrained", "none", *flags]) == 2
    error = capsys.readouterr().err
    assert "tlkit finetune: error:" in error and message in error
