"""The learning-rate schedule: warm-up capped to a share of the run, cosine decay to zero, and
`--resume` with more epochs continuing the longer schedule instead of restarting the cosine."""

from pathlib import Path

import pytest
import pytorch_lightning as pl
from conftest import TINY_CONFIG

from tlkit.config import FinetuneConfig
from tlkit.finetune import finetune
from tlkit.module import TransferClassifier


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


def test_resume_with_more_epochs_continues_the_longer_schedule(colour_folder, tmp_path: Path):
    def config(epochs: int, out: Path) -> FinetuneConfig:
        return FinetuneConfig(
            data_dir=str(colour_folder), out=str(out), epochs=epochs, lr=1e-2, **TINY_CONFIG
        )

    first = learning_rates(config(2, tmp_path / "run"))
    resumed = learning_rates(config(4, tmp_path / "run"), resume=True)
    planned = learning_rates(config(4, tmp_path / "planned"))  # 4 epochs from the start
    assert len(first) + len(resumed) == len(planned)
    # From the step it stopped at, the run follows the 4-epoch schedule: the decay goes on,
    # down to ~0 at the new last step, instead of the old cosine climbing back to its peak.
    assert resumed == pytest.approx(planned[len(first) :])
    assert all(later < earlier for earlier, later in zip(resumed, resumed[1:], strict=False))
    assert resumed[-1] < 0.1 * max(planned)
