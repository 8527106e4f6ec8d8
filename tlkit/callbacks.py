"""Lightning callbacks of a tlkit run: the progress bar, the per-epoch summary line, the
divergence stop and the resume checkpoint."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, Checkpoint, TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm

from tlkit.errors import TrainingDivergedError

logger = logging.getLogger(__name__)


class EpochProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, one per training epoch, left on screen; the sanity check's and
    validation's own bars are off (Lightning's documented way: a disabled bar in their place),
    since the epoch's bar and summary line show their results."""

    def __init__(self) -> None:
        super().__init__(leave=True)

    def init_sanity_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)


class EpochSummary(Callback):
    """Logs one line per epoch, in the lecture's style, and keeps the history.

    `Finished epoch 3 / 10: loss 0.4123, train 0.8812, val 0.8710, lr 1.00e-03`
    """

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []
        self._epoch_started = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._epoch_started = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
        head_lr = trainer.optimizers[0].param_groups[-1]["lr"]
        record = {
            "epoch": trainer.current_epoch + 1,
            "loss": metrics.get("train_loss_epoch", float("nan")),
            "train_acc": metrics.get("train_acc", float("nan")),
            "val_acc": metrics.get("val_acc", float("nan")),
            "val_loss": metrics.get("val_loss", float("nan")),
            "lr": head_lr,
            "seconds": round(time.perf_counter() - self._epoch_started, 3),
        }
        self.history.append(record)
        line = (
            f"Finished epoch {record['epoch']} / {trainer.max_epochs}: "
            f"loss {record['loss']:.4f}, train {record['train_acc']:.4f}, "
            f"val {record['val_acc']:.4f}, lr {head_lr:.2e}"
        )
        if trainer.is_global_zero:
            logger.info(line)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}  # kept in checkpoints, so a resumed run has it all

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])


class StopOnNonFiniteLoss(Callback):
    """Stops training at the first NaN or infinite training loss, on every rank at once.

    No checkpoint is written for the diverged state, so `last.ckpt` and `best.ckpt` stay the
    last good ones.
    """

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        value = float(loss.detach())
        diverged = trainer.strategy.reduce_boolean_decision(not math.isfinite(value), all=False)
        if diverged:
            learning_rate = trainer.optimizers[0].param_groups[-1]["lr"]
            raise TrainingDivergedError(
                f"training diverged: loss {value} at epoch {trainer.current_epoch + 1}, "
                f"step {trainer.global_step} (batch {batch_index + 1} of the epoch), "
                f"learning rate {learning_rate:.2e}. The last good checkpoints are kept in "
                "the run folder. Try a lower --lr, and run `tlkit sanity` to check the set-up."
            )


class ResumeCheckpoint(Checkpoint):
    """last.ckpt, for --resume: the run's state at an epoch's end, written unless writing it would
    cost more than `max_overhead` of the training time since the last write; always at the
    first epoch's end (which measures the write) and when training ends.

    A full checkpoint (backbone included) takes tens of milliseconds to write, while an epoch
    of the cached `features` strategy on 1,000 images takes less than that: writing at every
    epoch's end made the checkpoint the largest cost of such an epoch. Epochs of a few
    seconds or more are written every time, as before; a killed run loses at most about
    1 / `max_overhead` writes' worth of training. (Lightning's ModelCheckpoint offers time
    intervals only within epochs, and its `save_last` writes only in epochs that improved.)

    A `Checkpoint` subclass, so that Lightning runs it after the other callbacks: the state it
    writes includes their updates of the epoch (early stopping, the best checkpoint).
    """

    def __init__(self, path: str | Path, max_overhead: float = 0.1) -> None:
        self.path = Path(path)
        self.max_overhead = max_overhead
        self._write_seconds: float | None = None  # measured at the first write
        self._trained_since_write = 0.0
        self._epoch_started = 0.0
        self._unwritten_epoch = False

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._epoch_started = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._trained_since_write += time.perf_counter() - self._epoch_started
        due = (
            self._write_seconds is None
            or self._write_seconds <= self.max_overhead * self._trained_since_write
        )
        # every process must take the same decision: writing is collective (a barrier)
        if trainer.strategy.broadcast(due, src=0):
            self._write(trainer)
        else:
            self._unwritten_epoch = True

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self._unwritten_epoch:
            self._write(trainer)

    def _write(self, trainer: pl.Trainer) -> None:
        started = time.perf_counter()
        trainer.save_checkpoint(self.path, weights_only=False)  # a full state: optimiser too
        self._write_seconds = time.perf_counter() - started
        self._trained_since_write = 0.0
        self._unwritten_epoch = False
