"""Lightning callbacks of a tlkit run: the best checkpoint, the progress bar, the per-epoch
summary line, the divergence stop and the exponential moving average of the weights."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, TQDMProgressBar, WeightAveraging
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm
from pytorch_lightning.trainer.states import TrainerFn

from tlkit.errors import TrainingDivergedError

logger = logging.getLogger(__name__)


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint for one best checkpoint, which keeps the latest of epochs
    whose monitored score ties the best (Lightning's keeps the first). A small validation split
    ties often, and saturates (every image right from some epoch on); the later of tied epochs
    has trained further down the schedule: on the held-out suite the first of the tied epochs
    scored 0.8525 (Fashion-MNIST, 5,000 images) and 0.9412 (scenes) on test, the last 0.8860
    and 1.0000 (docs/benchmarks.md, "Ties on validation"). Early stopping still needs a strict
    improvement, so a saturated split ends the run as before."""

    def check_monitor_top_k(self, trainer: pl.Trainer, current: torch.Tensor | None = None) -> bool:
        if current is None or self.save_top_k != 1 or not self.best_k_models:
            return super().check_monitor_top_k(trainer, current)
        best = self.best_k_models[self.kth_best_model_path]
        at_least_as_good = current >= best if self.mode == "max" else current <= best
        # every process decides alike under DDP, as Lightning's own comparison does
        return trainer.strategy.reduce_boolean_decision(bool(at_least_as_good))

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key, so that --resume finds the state of runs checkpointed before
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)


# Steps between the reads of the training loss that wait for the device (the progress bar's
# loss, the divergence check), by device. On a CPU a read costs nothing; on a GPU each one
# stops the host from queueing the next step: on an H200, Lite0's training step at 64 px ran
# at 3,604 images/s when the host waited for every step and 8,025 when it did not
# (docs/benchmarks.md, "Precision and memory layout on a GPU"). 20 is Lightning's own refresh
# rate where it finds the bar's updates costly (Colab).
DEVICE_READ_EVERY = {"cpu": 1, "cuda": 20}


class EpochProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, one per training epoch, left on screen; the sanity check's and
    validation's own bars are off (Lightning's documented way: a disabled bar in their place),
    since the epoch's bar and summary line show their results. `refresh_rate`: batches
    between updates (each update reads the logged loss)."""

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=True)

    def init_sanity_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)


class EpochSummary(Callback):
    """Logs one line per epoch, in the lecture's style, and keeps the history: per epoch, the
    training loss, the learning rate, the time, and every epoch metric logged for training and
    validation (by their logged names).

    `Finished epoch 3 / 10: loss 0.4123, train acc 0.8812, val acc 0.8710, lr 1.00e-03`: the
    line shows `train_metric` (none for a task without one) and the `monitored` metric.
    """

    def __init__(self, monitored: str, train_metric: str | None = None) -> None:
        self.monitored = monitored
        self.train_metric = train_metric
        self.history: list[dict[str, float]] = []
        self._epoch_started = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._epoch_started = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
        head_lr = trainer.optimizers[0].param_groups[-1]["lr"]
        epoch_metrics = {
            key: value
            for key, value in metrics.items()
            if key.startswith(("train_", "val_")) and not key.startswith("train_loss")
        }
        record = {
            "epoch": trainer.current_epoch + 1,
            "loss": metrics.get("train_loss_epoch", float("nan")),
            **epoch_metrics,
            "val_loss": metrics.get("val_loss", float("nan")),
            "lr": head_lr,
            "seconds": round(time.perf_counter() - self._epoch_started, 3),
        }
        self.history.append(record)
        shown = [self.train_metric] if self.train_metric else []
        values = ", ".join(
            f"{name.replace('_', ' ', 1)} {record.get(name, float('nan')):.4f}"
            for name in (*shown, self.monitored)
        )
        line = (
            f"Finished epoch {record['epoch']} / {trainer.max_epochs}: "
            f"loss {record['loss']:.4f}, {values}, lr {head_lr:.2e}"
        )
        if trainer.is_global_zero:
            logger.info(line)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}  # kept in checkpoints, so a resumed run has it all

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])


class StopOnNonFiniteLoss(Callback):
    """Stops training at the first NaN or infinite training loss, on every rank at once.

    The losses are read every `check_every` steps and at each epoch's last batch (a read waits
    for the device: `DEVICE_READ_EVERY`), so training stops at most that many steps after the
    loss diverged, and the error names the first non-finite step. No checkpoint is written for
    the diverged state, so `last.ckpt` and `best.ckpt` stay the last good ones.
    """

    def __init__(self, check_every: int = 1) -> None:
        self.check_every = check_every
        # since the last check: (loss on its device, epoch, step, batch of the epoch, rate)
        self._unchecked: list[tuple[torch.Tensor, int, int, int, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        learning_rate = trainer.optimizers[0].param_groups[-1]["lr"]
        epoch, step = trainer.current_epoch, trainer.global_step
        self._unchecked.append((loss.detach(), epoch, step, batch_index, learning_rate))
        epoch_ends = batch_index + 1 >= trainer.num_training_batches
        if len(self._unchecked) >= self.check_every or epoch_ends:
            self._check(trainer)

    def on_train_epoch_end(self, trainer, module) -> None:
        if self._unchecked:  # an epoch cut short (--epoch-batches, a limit)
            self._check(trainer)

    def _check(self, trainer) -> None:
        losses = torch.stack([entry[0] for entry in self._unchecked]).float().cpu()
        unchecked, self._unchecked = self._unchecked, []
        bad = [index for index, value in enumerate(losses.tolist()) if not math.isfinite(value)]
        # every process decides alike (DDP): one collective per check, not per step
        if not trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            return
        _, epoch, step, batch_index, learning_rate = unchecked[bad[0] if bad else 0]
        value = losses[bad[0]].item() if bad else "non-finite on another process"
        raise TrainingDivergedError(
            f"training diverged: loss {value} at epoch {epoch + 1}, "
            f"step {step} (batch {batch_index + 1} of the epoch), "
            f"learning rate {learning_rate:.2e}. The last good checkpoints are kept in "
            "the run folder. Try a lower --lr, and run `tlkit sanity` to check the set-up."
        )


# Where Lightning's WeightAveraging keeps the training weights in a checkpoint whose
# "state_dict" holds the averaged ones.
TRAINING_WEIGHTS_KEY = "current_model_state"


def ema_decay_at(updates_so_far: int, ceiling: float) -> float:
    """The decay of the EMA update that follows `updates_so_far` updates: timm's ModelEmaV3
    warm-up (`use_warmup=True`, gamma 1, power 2/3), 1 - (1 + t)^(-2/3), up to `ceiling`.
    (Written out because ModelEmaV3 computes it on an instance holding a copy of the model.)"""
    return min(ceiling, 1.0 - (1.0 + updates_so_far) ** (-2.0 / 3.0))


class ExponentialMovingAverage(WeightAveraging):
    """An exponential moving average of the weights and buffers (BatchNorm statistics too, as
    timm's ModelEmaV3 does), updated after every optimiser step.

    Lightning's `WeightAveraging` does the rest: validation runs on the averaged weights (so the
    best checkpoint and early stopping follow them), every checkpoint's `state_dict` holds them
    (so evaluate, predict and export use them as they are), the training weights and the update
    count travel in the same checkpoint for --resume, and at the end of training the model
    holds the average. Every DDP process keeps the same average of the same synchronised
    weights. Frozen tensors are averaged too: a lerp towards an equal value leaves them exactly
    as they were, at the cost of one element-wise pass over them per step.

    Lightning's own `EMAWeightAveraging` has a fixed decay; in a short fine-tuning run the
    weights of the first steps (the untrained head) would dominate the average, hence the
    warm-up (`ema_decay_at`).
    """

    def __init__(self, decay: float) -> None:
        super().__init__(multi_avg_fn=self._update)
        self.decay = decay

    @torch.no_grad()
    def _update(
        self,
        averaged: list[torch.Tensor],
        current: list[torch.Tensor],
        updates_so_far: torch.Tensor,
    ) -> None:
        """The foreach lerp of torch's `get_ema_multi_avg_fn` and timm's ModelEmaV3, at this
        update's warmed-up decay, for one device's tensors of one dtype. Integer buffers
        (BatchNorm's num_batches_tracked) are counters: copied, as ModelEmaV3 does (torch's
        function would average and truncate them)."""
        if averaged[0].is_floating_point():
            decay = ema_decay_at(int(updates_so_far), self.decay)
            torch._foreach_lerp_(averaged, current, 1.0 - decay)
        else:
            torch._foreach_copy_(averaged, current)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Restore the training weights and the average when a fit resumes, and only then.

        Lightning calls this whenever its Trainer loads a checkpoint, testing included: after
        fitting, `trainer.test(ckpt_path=...)` would otherwise swap the training weights in for
        the averaged ones it is meant to test."""
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, module, checkpoint)
