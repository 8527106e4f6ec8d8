"""`--ema`: an exponential moving average of the weights is validated, chosen, tested and saved
in their place, and `--resume` restores it exactly."""

import dataclasses
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY_CONFIG
from timm.utils import ModelEmaV3

from tlkit.config import FinetuneConfig
from tlkit.errors import ConfigError, RunFolderError
from tlkit.model.classifier import TransferClassifier
from tlkit.train.callbacks import TRAINING_WEIGHTS_KEY, ema_decay_at
from tlkit.train.finetune import finetune


@pytest.mark.parametrize("ceiling", [0.9998, 0.99])
def test_decay_warms_up_as_timms_model_ema_v3(ceiling: float):
    timm_ema = ModelEmaV3(torch.nn.Linear(1, 1), decay=ceiling, use_warmup=True)
    for updates_so_far in [0, 1, 2, 10, 390, 8_400, 400_000]:
        # timm numbers the optimiser step of the update; the first update (step 1) copies
        assert ema_decay_at(updates_so_far, ceiling) == pytest.approx(
            timm_ema.get_decay(updates_so_far + 1)
        )


class WeightsAtTest(pl.Callback):
    """The model's state when testing starts."""

    def on_test_start(self, trainer, module) -> None:
        self.state = {key: value.clone() for key, value in module.state_dict().items()}


class SnapshotAfterFirstEpoch(pl.Callback):
    """A copy of the run folder as an interruption after the first epoch would leave it."""

    def __init__(self, run: Path, copy: Path) -> None:
        self.run, self.copy = run, copy

    def on_train_epoch_start(self, trainer, module) -> None:
        if trainer.current_epoch == 1:
            shutil.copytree(self.run, self.copy)


def ema_config(data: Path, out: Path) -> FinetuneConfig:
    # no dropout or augmentation: an interrupted and an uninterrupted run train identically
    options = {**TINY_CONFIG, "augment": False, "dropout": 0.0}
    return FinetuneConfig(
        data_dir=str(data), out=str(out), epochs=2, lr=1e-2, ema=True, unfreeze_stages=1, **options
    )


def assert_same_state(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_ema_is_validated_tested_saved_and_resumed_exactly(colour_folder: Path, tmp_path: Path):
    at_test = WeightsAtTest()
    config = ema_config(colour_folder, tmp_path / "run")
    snapshot = SnapshotAfterFirstEpoch(tmp_path / "run", tmp_path / "resumed")
    summary = finetune(config, callbacks=[at_test, snapshot], enable_progress_bar=False)
    best = torch.load(tmp_path / "run" / "best.ckpt", weights_only=True)
    averaged, training = best["state_dict"], best[TRAINING_WEIGHTS_KEY]
    # The test split was evaluated on the checkpoint's averaged weights, not the training ones.
    assert_same_state(at_test.state, averaged)
    assert summary.test_acc is not None
    trainable = [n for n, p in TransferClassifier.load_checkpoint(
        tmp_path / "run" / "best.ckpt").named_parameters() if p.requires_grad]  # fmt: skip
    assert not any(torch.equal(averaged[n], training[n]) for n in trainable)
    # Frozen layers (BatchNorm statistics included) are exactly the pretrained ones in both.
    pretrained = TransferClassifier(3, pretrained="bundled", img_size=32).state_dict()
    trained_modules = {name.rsplit(".", 1)[0] for name in trainable}
    frozen = [n for n in pretrained if n.rsplit(".", 1)[0] not in trained_modules]
    assert len(frozen) > len(trainable)
    for state in (averaged, training):
        assert all(torch.equal(state[n], pretrained[n]) for n in frozen)

    # Resumed from the run's folder as it was after the first epoch: the same training and
    # averaged weights and update count at the end as the uninterrupted run.
    interrupted = dataclasses.replace(config, out=str(tmp_path / "resumed"))
    finetune(interrupted, resume=True, enable_progress_bar=False, limit_test_batches=0)
    uninterrupted = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == uninterrupted["global_step"] >= 4
    assert_same_state(resumed["averaging_state"], uninterrupted["averaging_state"])
    assert_same_state(resumed[TRAINING_WEIGHTS_KEY], uninterrupted[TRAINING_WEIGHTS_KEY])
    assert_same_state(resumed["state_dict"], uninterrupted["state_dict"])

    # A run resumed without the --ema it was trained with is refused.
    without = dataclasses.replace(interrupted, ema=False)
    with pytest.raises(RunFolderError, match="trained with --ema"):
        finetune(without, resume=True, enable_progress_bar=False)


def test_ema_decay_and_fsdp_are_checked():
    with pytest.raises(ConfigError, match="ema_decay"):
        FinetuneConfig(data_dir="x", img_size=32, ema=True, ema_decay=1.0)
    with pytest.raises(ConfigError, match="FSDP"):
        FinetuneConfig(data_dir="x", img_size=32, ema=True, dist_strategy="fsdp")
