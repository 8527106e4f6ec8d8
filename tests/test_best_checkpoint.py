"""best.ckpt among tied validation scores: the latest of the tied epochs, in the checkpoint
Lightning writes and in the epoch record the summary reports."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from tlkit.model.tasks import Decision
from tlkit.train.callbacks import BestCheckpoint
from tlkit.train.finetune import BuiltRun

SCORES = [0.5, 0.8, 0.7, 0.8, 0.6]  # epochs 2 and 4 tie for the best


class ScriptedScores(pl.LightningModule):
    """Trains nothing of note; logs `SCORES[epoch]` as its validation accuracy."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_index):
        return (self.weight - batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_index):
        self.log("val_acc", SCORES[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.ones(4, 1)), batch_size=4)


def test_the_latest_of_tied_epochs_is_kept(tmp_path: Path):
    best = BestCheckpoint(dirpath=tmp_path, filename="best", monitor="val_acc", mode="max")
    trainer = pl.Trainer(
        max_epochs=len(SCORES),
        callbacks=[best],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(ScriptedScores(), _loader(), _loader())
    saved = torch.load(best.best_model_path, map_location="cpu", weights_only=False)
    assert saved["epoch"] == 3  # the fourth epoch (0-based), not the second
    assert best.best_model_score == 0.8


def test_the_summary_reports_the_epoch_that_best_ckpt_holds():
    history = [{"epoch": epoch, "val_acc": score} for epoch, score in enumerate(SCORES, 1)]
    run = BuiltRun(None, None, Decision("acc", "balanced classes"), None, None, None, None)
    assert run.best_record(history)["epoch"] == 4


def test_resume_finds_the_state_saved_by_lightnings_own_checkpoint(tmp_path: Path):
    arguments = {"dirpath": tmp_path, "filename": "best", "monitor": "val_acc", "mode": "max"}
    assert BestCheckpoint(**arguments).state_key == ModelCheckpoint(**arguments).state_key
