"""Lightning callbacks of a tlkit run: the progress bar, the per-epoch summary line and the
divergence stop."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, TQDMProgressBar
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
