"""Channels-last is tlkit's default memory format on CPUs and GPUs (faster convolutions on
both: docs/benchmarks.md): a run trains in it, cached features are extracted in it, and
--print-config says so."""

from pathlib import Path

import pytorch_lightning as pl
import torch
from conftest import TINY_CONFIG

from tlkit import FinetuneConfig, finetune
from tlkit.cli import main
from tlkit.config import DEVICE_DEFAULTS
from tlkit.data.augment import eval_transform
from tlkit.data.datasets import ImageDataset
from tlkit.model.backbones import create_backbone
from tlkit.runfolder import Preprocessing
from tlkit.train.features import extract


class FirstConvolutionLayouts(pl.Callback):
    """Whether the backbone's first convolution gets channels-last weights and batches."""

    def __init__(self) -> None:
        self.layouts: list[tuple[bool, bool]] = []

    def on_train_start(self, trainer, module) -> None:
        convolution = next(m for m in module.backbone.modules() if isinstance(m, torch.nn.Conv2d))
        convolution.register_forward_pre_hook(self._record)

    def _record(self, convolution: torch.nn.Conv2d, inputs: tuple[torch.Tensor]) -> None:
        weights, batch = convolution.weight, inputs[0]
        self.layouts.append(
            (
                weights.is_contiguous(memory_format=torch.channels_last),
                batch.is_contiguous(memory_format=torch.channels_last),
            )
        )


def test_a_default_run_trains_in_channels_last(colour_folder: Path, tmp_path: Path):
    layouts = FirstConvolutionLayouts()
    config = FinetuneConfig(
        data_dir=str(colour_folder), out=str(tmp_path / "run"), **{**TINY_CONFIG, "epochs": 1}
    )
    finetune(config, callbacks=[layouts], enable_progress_bar=False, limit_test_batches=0)
    assert layouts.layouts and all(weights and batch for weights, batch in layouts.layouts)


def test_features_extracted_in_channels_last_equal_the_plain_layouts(colour_folder: Path):
    torch.manual_seed(0)
    files = sorted((colour_folder / "train").rglob("*.png"))[:6]
    preprocessing = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", 0.875)
    images = ImageDataset([(str(path), 0) for path in files], eval_transform(preprocessing))
    backbone = create_backbone("test_efficientnet", "none")
    plain, _, _ = extract(backbone, images, 4, torch.device("cpu"), 0, progress=False)
    assert backbone.conv_stem.weight.is_contiguous()
    converted, _, _ = extract(
        backbone, images, 4, torch.device("cpu"), 0, progress=False, channels_last=True
    )
    assert backbone.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert plain.shape == converted.shape == (6, backbone.num_features)
    assert torch.allclose(plain, converted, atol=1e-5)


def test_print_config_says_channels_last_is_set_on_and_the_flag_turns_it_off(capsys):
    assert main(["finetune", "--print-config"]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "channels_last" in line]
    assert line == f"channels_last: null  # {DEVICE_DEFAULTS['channels_last']}"
    assert main(["finetune", "--no-channels-last", "--print-config"]) == 0
    assert "channels_last: false\n" in capsys.readouterr().out
