"""`tlkit finetune --logger csv|tensorboard`: where the training log goes."""

import importlib.util
from pathlib import Path

import pytest
from conftest import TINY_RUN_FLAGS
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tlkit.cli import main
from tlkit.config import FinetuneConfig
from tlkit.runfolder import read_summary


def test_tensorboard_logger_writes_event_files_and_the_run_keeps_its_history(
    colour_folder: Path, tmp_path: Path
):
    out = tmp_path / "run"
    flags = [*TINY_RUN_FLAGS, "--epochs", "1", "--logger", "tensorboard"]
    assert main(["finetune", str(colour_folder), "--out", str(out), *flags]) == 0
    assert not (out / "metrics.csv").exists()
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"train_loss_epoch", "train_acc", "val_acc", "val_loss"} <= set(events.Tags()["scalars"])
    assert len(read_summary(out).history) == 1  # what `tlkit report` draws its curves from


def test_tensorboard_logger_without_the_package_is_a_clear_error(
    colour_folder: Path, tmp_path: Path, monkeypatch, capsys
):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "tensorboard" else find_spec(name, *args),
    )
    out = tmp_path / "run"
    flags = [*TINY_RUN_FLAGS, "--logger", "tensorboard"]
    assert main(["finetune", str(colour_folder), "--out", str(out), *flags]) == 2
    assert "needs the tensorboard package: pip install tensorboard" in capsys.readouterr().err
    assert not out.exists()


def test_csv_is_the_default_logger_and_others_are_refused():
    assert FinetuneConfig().logger == "csv"
    with pytest.raises(ValueError, match="logger must be one of csv, tensorboard"):
        FinetuneConfig(logger="wandb")
