"""The greedy soup of the best checkpoints: the averaging, the greedy rule on a scripted run
whose validation score is a known function of its one weight, and a real run's record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY_CONFIG
from torch.utils.data import TensorDataset

from tlkit.commands.report import run_card
from tlkit.config import FinetuneConfig
from tlkit.runfolder import SUMMARY, read_metrics
from tlkit.train.callbacks import BestCheckpoint
from tlkit.train.finetune import final_line, finetune
from tlkit.train.soup import SOUP_FOLDER, TopCheckpoints, average_weights, make_soup, soup_applies

# The weight each epoch ends with; validation scores -(weight - 2)^2. Ranked: epoch 4 (-0.25),
# epoch 2 (-1.0), epoch 3 (-1.44). With epoch 2 the soup (1.25) scores -0.5625: left out;
# with epoch 3 (2.35), -0.1225: kept.
WEIGHTS = [0.0, 1.0, 3.2, 1.5, 5.0]


class ScriptedWeight(pl.LightningModule):
    """Its one weight takes `WEIGHTS[epoch]` at each epoch's start (the optimiser's rate is 0);
    its validation score is -(weight - 2)^2."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.counter = torch.nn.Buffer(torch.zeros(1, dtype=torch.int64))
        self.decision_thresholds = None

    def on_train_epoch_start(self) -> None:
        with torch.no_grad():
            self.weight.fill_(WEIGHTS[self.current_epoch])
            self.counter.fill_(self.current_epoch)

    def training_step(self, batch, batch_index):
        return (self.weight * batch[0]).sum() * 0

    def validation_step(self, batch, batch_index):
        self.log("val_acc", -((self.weight - 2.0) ** 2).sum())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_average_weights_averages_floats_and_keeps_counters():
    first = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(5), "h": torch.tensor([2.0])}
    second = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(9), "h": torch.tensor([4.0])}
    first["h"] = first["h"].half()
    second["h"] = second["h"].half()
    averaged = average_weights([first, second])
    assert torch.equal(averaged["w"], torch.tensor([2.0, 4.0]))
    assert averaged["n"].item() == 5  # BatchNorm's counter: not averaged
    assert averaged["h"].dtype == torch.float16 and averaged["h"].item() == 3.0


def test_the_greedy_soup_keeps_only_the_candidates_that_do_not_lower_validation(tmp_path: Path):
    data = pl.LightningDataModule.from_datasets(
        train_dataset=TensorDataset(torch.ones(4, 1)),
        val_dataset=TensorDataset(torch.ones(4, 1)),
        batch_size=4,
    )
    best = BestCheckpoint(dirpath=tmp_path, filename="best", monitor="val_acc", mode="max")
    top = TopCheckpoints(tmp_path / SOUP_FOLDER, "val_acc", 3)
    trainer = pl.Trainer(
        max_epochs=len(WEIGHTS),
        callbacks=[best, top],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    model = ScriptedWeight()
    trainer.fit(model, datamodule=data)
    record = make_soup(trainer, model, data, "val_acc")

    assert [(item["epoch"], item["kept"]) for item in record["candidates"]] == [
        (2, False),
        (3, True),
    ]
    assert record["epochs"] == [4, 3]
    assert record["val_before"] == -0.25 and record["val_after"] == pytest.approx(-0.1225)
    saved = torch.load(best.best_model_path, map_location="cpu", weights_only=True)
    assert saved["state_dict"]["weight"].item() == pytest.approx((1.5 + 3.2) / 2)
    assert saved["state_dict"]["counter"].item() == 3  # best.ckpt's own (epoch 4, 0-based 3)
    assert saved["epoch"] == 3  # the rest of best.ckpt is kept
    assert not (tmp_path / SOUP_FOLDER).exists()  # the candidates are removed


def test_resume_finds_each_checkpoint_callbacks_own_state(tmp_path: Path):
    best = BestCheckpoint(dirpath=tmp_path, filename="best", monitor="val_acc", mode="max")
    assert TopCheckpoints(tmp_path, "val_acc", 3).state_key != best.state_key


def test_no_soup_where_the_weights_are_averaged_otherwise_or_the_head_trains_alone():
    assert soup_applies(FinetuneConfig(soup=3)) is None
    assert soup_applies(FinetuneConfig()) == "--soup 1"  # off unless asked for
    assert "--ema" in soup_applies(FinetuneConfig(soup=3, ema=True))
    assert "features" in soup_applies(FinetuneConfig(soup=3, strategy="features"))


def test_a_run_records_its_soup_and_leaves_no_candidates_behind(colour_folder, tmp_path: Path):
    out = tmp_path / "run"
    config = FinetuneConfig(
        data_dir=str(colour_folder), out=str(out), epochs=3, soup=3, choose_tta=False, **TINY_CONFIG
    )
    result = finetune(config, enable_progress_bar=False)
    summary = json.loads((out / SUMMARY).read_text())
    soup = summary["soup"]
    assert 1 <= len(soup["candidates"]) <= 2  # at most soup - 1 others than best.ckpt
    assert soup["epochs"][0] == summary["best_epoch"]
    card = dict(run_card(out, result, config, None, None))
    if len(soup["epochs"]) > 1:  # the summary's validation scores are the soup's
        assert summary["best_val_metrics"]["val_acc"] == soup["val_metrics"]["val_acc"]
        assert "in the soup of epochs" in final_line(result, out)
        assert card["weights tested"].startswith("the average of epochs")
    else:
        assert card["weights tested"].startswith(f"epoch {summary['best_epoch']} (best.ckpt; no")
    assert not (out / SOUP_FOLDER).exists()
    validated = [row for row in read_metrics(out) if row.get("val_acc")]
    assert len(validated) == summary["epochs_run"]  # the soups' validations are not logged
