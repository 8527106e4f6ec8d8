"""The learning-rate schedule: warm-up capped to a share of the run, cosine decay to zero, and
`--resume` with more epochs continuing the longer schedule instead of restarting the cosine."""

from pathlib import Path

import pytest
import pytorch_lightning as pl
from conftest import TINY_CONFIG

from tlkit.config import FinetuneConfig
from tlkit.model.classifier import TransferClassifier
from tlkit.runfolder import read_split
from tlkit.train.finetune import finetune


def planned_factors(warmup_epochs: float, epochs: int, steps_per_epoch: int) -> list[float]:
    """The head's learning rate at every step of a run, over the configured --lr."""
    model = TransferClassifier(
        3, pretrained="bundled", strategy="features", img_size=32, warmup_epochs=warmup_epochs
    )
    optimizer, schedule = model.optimizer_and_schedule(epochs * steps_per_epoch, steps_per_epoch)
    factors = []
    for _ in range(epochs * steps_per_epoch):
        factors.append(optimizer.param_groups[-1]["lr"] / model.hparams.lr)
        optimizer.step()
        schedule.step()
    return factors


@pytest.mark.parametrize(
    "epochs, steps_per_epoch, warmup_steps",
    [
        (1, 50, 5),  # a one-epoch run: warm-up capped at 10% of it, then a full decay
        (3, 20, 6),  # a short search trial: 6 steps of warm-up, not a whole third of the run
        (10, 20, 20),  # the defaults (1 of 10 epochs) sit at the cap: one epoch of warm-up
    ],
)
def test_warmup_is_capped_and_the_learning_rate_decays_within_the_run(
    epochs, steps_per_epoch, warmup_steps
):
    factors = planned_factors(1.0, epochs, steps_per_epoch)
    peak = factors.index(max(factors))
    assert peak == warmup_steps and factors[peak] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(factors[:peak], factors[1 : peak + 1], strict=True))
    decay = factors[peak:]
    assert all(later < earlier for earlier, later in zip(decay, decay[1:], strict=False))
    assert factors[-1] < 0.01


class RecordHeadLearningRate(pl.Callback):
    """The head's learning rate (the optimiser's last group) at every training step."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_index) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[-1]["lr"])


def learning_rates(config: FinetuneConfig, resume: bool = False) -> list[float]:
    recorder = RecordHeadLearningRate()
    finetune(
        config,
        resume=resume,
        callbacks=[recorder],
        enable_progress_bar=False,
        limit_test_batches=0,
    )
    return recorder.rates


class StopAfterEpochs(pl.Callback):
    """Ends training after `epochs` epochs, as an interrupted run would have stopped."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def tiny_config(data: Path, out: Path, epochs: int, batch_size: int = 8) -> FinetuneConfig:
    settings = {**TINY_CONFIG, "batch_size": batch_size}
    return FinetuneConfig(data_dir=str(data), out=str(out), epochs=epochs, lr=1e-2, **settings)


def test_resume_with_more_epochs_continues_the_decay(colour_folder, tmp_path: Path):
    run = tmp_path / "run"
    recorder = RecordHeadLearningRate()
    finetune(
        tiny_config(colour_folder, run, 4),
        callbacks=[recorder, StopAfterEpochs(2)],
        enable_progress_bar=False,
        limit_test_batches=0,
    )
    before = recorder.rates
    resumed = learning_rates(tiny_config(colour_folder, run, 6), resume=True)
    steps_per_epoch = len(before) // 2
    assert len(resumed) == 4 * steps_per_epoch
    # The rate goes on from where the 4-epoch schedule had reached: no jump, no climb back
    # towards the peak, a monotone decay to ~0 at the new last step.
    rates = before + resumed
    peak = rates.index(max(rates))
    decay = rates[peak:]
    assert all(later < earlier for earlier, later in zip(decay, decay[1:], strict=False))
    assert resumed[0] < before[-1] and resumed[0] > 0.5 * before[-1]
    assert resumed[-1] < 0.02 * max(rates)


def test_resume_of_a_finished_schedule_with_more_epochs_is_refused(colour_folder, tmp_path):
    run = tmp_path / "run"
    learning_rates(tiny_config(colour_folder, run, 2))
    with pytest.raises(ValueError, match="finished its schedule"):
        learning_rates(tiny_config(colour_folder, run, 4), resume=True)


class RecordFinalLearningRate(pl.Callback):
    """The head's learning rate once training ends: after the last step of the schedule."""

    def on_train_end(self, trainer, module) -> None:
        self.rate = trainer.optimizers[0].param_groups[-1]["lr"]


@pytest.mark.parametrize("batch_sizes", [(4, 8), (8, 4)])
def test_resume_with_another_batch_size_continues_the_decay_in_the_new_steps(
    colour_folder, tmp_path: Path, batch_sizes
):
    """Resumed after 2 of 4 epochs with the other batch size (more or fewer steps per
    epoch), the rate goes on from where it was, decays in every new step and reaches 0 at the
    new end (before the fix: 0 from the resume on, or never 0)."""
    first, then = batch_sizes
    run = tmp_path / "run"
    recorder = RecordHeadLearningRate()
    finetune(
        tiny_config(colour_folder, run, 4, first),
        callbacks=[recorder, StopAfterEpochs(2)],
        enable_progress_bar=False,
        limit_test_batches=0,
    )
    before = recorder.rates
    resumed_recorder, final = RecordHeadLearningRate(), RecordFinalLearningRate()
    finetune(
        tiny_config(colour_folder, run, 4, then),
        resume=True,
        callbacks=[resumed_recorder, final],
        enable_progress_bar=False,
        limit_test_batches=0,
    )
    resumed = resumed_recorder.rates
    train_images = list(read_split(run).values()).count("train")
    assert len(before) == 2 * (train_images // first)
    assert len(resumed) == 2 * (train_images // then) != len(before)
    # halfway through a 4-epoch schedule: the rate the first run had reached at its last step
    peak = max(before)
    assert 0.3 * peak < resumed[0] < before[-1]
    rates = before + resumed
    decay = rates[rates.index(peak) :]
    assert all(later < earlier for earlier, later in zip(decay, decay[1:], strict=False))
    assert min(resumed) > 0 and final.rate < 1e-6 * peak
