"""Reads of the training loss wait for the device (on a GPU, each one stops the host from
queueing the next step), so on an accelerator the progress bar and the divergence check read
it every few steps (tlkit/train/callbacks.py, DEVICE_READ_EVERY); the check still names the
first non-finite step and stops every process at once."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tlkit.errors import TrainingDivergedError
from tlkit.train.callbacks import DEVICE_READ_EVERY, StopOnNonFiniteLoss


class StubTrainer:
    """What the divergence check reads of Lightning's Trainer; counts its collective calls."""

    def __init__(self, batches: int) -> None:
        self.current_epoch, self.global_step, self.num_training_batches = 0, 0, batches
        self.optimizers = [SimpleNamespace(param_groups=[{"lr": 1e-3}])]
        self.decisions: list[bool] = []
        self.strategy = SimpleNamespace(reduce_boolean_decision=self._decide)

    def _decide(self, decision: bool, all: bool = True) -> bool:
        self.decisions.append(decision)
        return decision


def feed(
    check: StopOnNonFiniteLoss, trainer: StubTrainer, losses: list[float], start: int = 0
) -> None:
    for index, value in enumerate(losses, start):
        trainer.global_step = index + 1
        check.on_train_batch_end(trainer, None, {"loss": torch.tensor(value)}, None, index)


def test_losses_are_read_every_few_steps_and_the_first_bad_one_is_named():
    trainer, check = StubTrainer(batches=100), StopOnNonFiniteLoss(check_every=4)
    feed(check, trainer, [2.3, 2.2, math.nan])
    assert trainer.decisions == []  # three steps, nothing read yet
    with pytest.raises(TrainingDivergedError, match=r"loss nan at epoch 1, step 3 \(batch 3 "):
        feed(check, trainer, [math.inf], start=3)
    assert trainer.decisions == [True]  # one read, one collective, for the four steps


def test_the_epochs_last_batch_is_always_checked():
    trainer, check = StubTrainer(batches=3), StopOnNonFiniteLoss(check_every=20)
    with pytest.raises(TrainingDivergedError, match=r"step 3 \(batch 3 of the epoch\)"):
        feed(check, trainer, [2.3, 2.2, math.inf])  # before the epoch's checkpoints


def test_finite_losses_pass_and_another_process_can_stop_this_one():
    trainer, check = StubTrainer(batches=100), StopOnNonFiniteLoss(check_every=2)
    feed(check, trainer, [2.3, 2.2, 2.1, 2.0])
    assert trainer.decisions == [False, False]
    trainer.strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: True)
    with pytest.raises(TrainingDivergedError, match="non-finite on another process"):
        feed(check, trainer, [1.9, 1.8])


def test_a_cpu_reads_every_step_and_a_gpu_every_few():
    assert DEVICE_READ_EVERY["cpu"] == 1 and DEVICE_READ_EVERY["cuda"] > 1
