"""Time budgets: how fast this device trains a configuration, and the schedule that fits.

`measure_throughput` times a few training steps (after warm-up), a few validation batches and
one checkpoint write of a candidate configuration on the device the run will use, through
Lightning's own Trainer with the run's precision, memory format, loaders and augmentation, so
that what it measures is what the run will do. `fit_schedule` (pure) then sizes the schedule:
the most training images, up to what auto's rule asks for, whose predicted time (training,
a validation pass and two checkpoints per epoch, the test evaluation) fits in the time left
after `--tta auto`'s choice (`tta_choice_s`) and the soup's validations (`soup_s`).
An epoch that the schedule ends part-way through becomes shorter epochs
(`FinetuneConfig.epoch_batches`), so that the cosine decay still ends at the last step and
every epoch is validated. During the run, `FitScheduleToBudget` times its epochs and
re-plans their number at each epoch's start (`replanned_epochs`, pure): a few timed steps
before the run predict its epochs to within a fifth or so, the epochs run so far much closer.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from tlkit.choices import TTA_CHOICE_MAX_IMAGES
from tlkit.config import FinetuneConfig
from tlkit.console import expected_lightning_warnings_hidden
from tlkit.data.datamodule import BaseImageDataModule
from tlkit.infer.tta import candidate_plans, measuring_plans
from tlkit.model.backbones import preprocessing
from tlkit.train.build import build_model, data_facts, trained_short_sides, trains_with_hflip
from tlkit.train.hardware import trainer_options, training_device
from tlkit.train.soup import soup_applies

logger = logging.getLogger(__name__)

WARMUP_STEPS = {"cpu": 2, "cuda": 10}  # untimed: loader workers, allocator, cuDNN autotuning
TIMED_STEPS = {"cpu": 4, "cuda": 20}
VALIDATION_BATCHES = 2
# The predicted time is planned to this share of the budget: the measurement's noise, and
# what no prediction sees (the process's start, the last summary), stay inside the budget.
BUDGET_SHARE = 0.92
# The epoch whose time re-plans the schedule (0-based): the first also starts the loader
# workers and fills the caches, so it runs slower than the epochs after it.
REPLAN_FROM_EPOCH = 1


@dataclass(frozen=True)
class Throughput:
    """How fast one process trains and evaluates a configuration, measured on its device."""

    device: str
    train_images_per_s: float
    eval_images_per_s: float
    checkpoint_s: float  # writing one checkpoint
    measured_s: float  # what the measurement took


class _Clock(pl.Callback):
    """Times training batches after the warm-up, and validation batches, each from the end of
    the batch before it (or the loop's start): the wait for the batch (loading it, starting a
    new epoch) counts with its step, as it does in a run."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.train: list[float] = []
        self.validation: list[float] = []
        self._last = 0.0

    def _lap(self) -> float:
        now = time.perf_counter()
        lap, self._last = now - self._last, now
        return lap

    def on_train_start(self, trainer, module) -> None:
        self._lap()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index: int) -> None:
        lap = self._lap()
        if trainer.global_step > self.warmup:
            self.train.append(lap)

    def on_validation_epoch_start(self, trainer, module) -> None:
        self._lap()

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_index, *_) -> None:
        self.validation.append(self._lap())


def measure_throughput(
    config: FinetuneConfig, images: BaseImageDataModule, progress: bool = False
) -> Throughput:
    """Train a fresh model of `config` for a few steps on `images` (set up, on this process's
    device alone) and time it; the model is thrown away. The median batch time gives the rate,
    so one slow batch (a worker starting late) does not count."""
    started = time.perf_counter()
    device = training_device(config)
    warmup, timed = WARMUP_STEPS[device], TIMED_STEPS[device]
    steps = warmup + timed
    model = build_model(config, data_facts(config, images))
    clock = _Clock(warmup)
    options = {
        **trainer_options(config),
        "devices": 1,
        "num_nodes": 1,
        "strategy": "auto",
        "plugins": None,
        "max_steps": steps,
        "max_epochs": -1,
        "val_check_interval": steps,
        "check_val_every_n_epoch": None,
        "limit_val_batches": VALIDATION_BATCHES,
        "num_sanity_val_steps": 0,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": [clock],
    }
    with expected_lightning_warnings_hidden():
        trainer = pl.Trainer(**options)
        trainer.fit(model, datamodule=images)
        with tempfile.TemporaryDirectory() as folder:
            written = time.perf_counter()
            trainer.save_checkpoint(Path(folder) / "measure.ckpt")
            checkpoint_s = time.perf_counter() - written
    batch = images.batch_size
    train_s = _median(clock.train or [math.inf])
    eval_s = _median(clock.validation or [math.inf])
    return Throughput(
        device=device,
        train_images_per_s=round(batch / train_s, 2),
        eval_images_per_s=round(batch / eval_s, 2),
        checkpoint_s=round(checkpoint_s, 3),
        measured_s=round(time.perf_counter() - started, 2),
    )


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


@dataclass(frozen=True)
class Splits:
    """The images of each split, how many processes share them, and how many of those work
    at once (`parallel`, default: all): on a CPU a node's processes share its cores, so
    together they go no faster than the one process measured on the whole node."""

    train: int
    val: int
    test: int
    processes: int = 1
    parallel: int | None = None

    @property
    def speedup(self) -> int:
        """How many times one measured process's rate the processes reach together."""
        return self.parallel or self.processes


@dataclass(frozen=True)
class Schedule:
    """A planned schedule: epochs of `epoch_batches` batches (0: whole passes), the training
    images it processes, and the seconds it is predicted to take."""

    epochs: int
    epoch_batches: int
    images: int
    predicted_s: float


def epoch_cost_s(splits: Splits, throughput: Throughput, cached: bool) -> float:
    """Seconds of one epoch's validation pass and its two checkpoints (best and last)."""
    validation = 0.0 if cached else splits.val / splits.speedup / throughput.eval_images_per_s
    return validation + 2 * throughput.checkpoint_s


def test_s(splits: Splits, throughput: Throughput) -> float:
    """Seconds of the test evaluation after training."""
    return splits.test / splits.speedup / throughput.eval_images_per_s


def training_time_left_s(
    planned: dict[str, Any], started: float, share: float = (1 + BUDGET_SHARE) / 2
) -> float:
    """Seconds training may still take so that the run ends by `share` of its budget: by
    default where a Lightning `Timer` stops it should the plan's prediction fall short (the
    budget less half the margin the plan kept, `BUDGET_SHARE`); with `BUDGET_SHARE`, the
    plan's own target. Less the time since the run `started` (a `time.perf_counter` reading)
    and the predicted work after training (`after_training_s` of the plan's record: the test
    evaluation and --tta auto's choice)."""
    elapsed = time.perf_counter() - started
    return share * planned["seconds"] - elapsed - planned["after_training_s"]


def fixed_cost_s(splits: Splits, throughput: Throughput, cached: bool) -> float:
    """Seconds spent once: the test evaluation, and for cached features their extraction."""
    evaluated = splits.test + (splits.train + splits.val if cached else 0)
    return evaluated / splits.speedup / throughput.eval_images_per_s


def predicted_s(images: int, splits: Splits, throughput: Throughput, cached: bool) -> float:
    """Predicted seconds of a schedule processing `images` training images (a cached-features
    epoch is taken as free: the head trains on vectors)."""
    epochs = max(1, math.ceil(images / splits.train))
    training = 0.0 if cached else images / splits.speedup / throughput.train_images_per_s
    per_epoch = epoch_cost_s(splits, throughput, cached)
    return training + epochs * per_epoch + fixed_cost_s(splits, throughput, cached)


def tta_choice_s(config: FinetuneConfig, splits: Splits, throughput: Throughput) -> float:
    """Seconds of `--tta auto`'s choice after training (`tlkit.infer.predict.choose_tta`):
    the views of the candidate presets (`tta.candidate_plans`), each computed once
    (`tta.measuring_plans`), of at most `TTA_CHOICE_MAX_IMAGES` validation images, on the
    first process alone, each view taken to cost an evaluated image (batching makes views
    cheaper: an upper estimate); 0 with `--no-choose-tta`."""
    if not config.choose_tta or not splits.val:
        return 0.0
    plans = candidate_plans(
        preprocessing(config.backbone, config.img_size),
        trains_with_hflip(config),
        trained_short_sides(config),
    )
    views = sum(plan.views_per_image for plan in measuring_plans(plans))
    return min(splits.val, TTA_CHOICE_MAX_IMAGES) * views / throughput.eval_images_per_s


def soup_s(config: FinetuneConfig, splits: Splits, throughput: Throughput) -> float:
    """Seconds of the greedy soup after training (`tlkit.train.soup.make_soup`): a validation
    pass for each candidate besides best.ckpt; 0 where the run makes no soup."""
    if soup_applies(config) is not None:
        return 0.0
    return (config.soup - 1) * splits.val / splits.speedup / throughput.eval_images_per_s


def fit_schedule(
    wanted_images: int,
    splits: Splits,
    batch_size: int,
    throughput: Throughput,
    seconds_left: float,
    cached: bool = False,
    minimum_images: int | None = None,
) -> Schedule | None:
    """The schedule processing the most training images, up to `wanted_images`, predicted to
    end within `seconds_left`; None when fewer than `minimum_images` (default: one pass over
    the training images, or all that is wanted) fit. With cached features the head's training
    on vectors is taken as free: the epochs are as many as their checkpoints leave time for
    after the extraction."""
    rate = splits.speedup * throughput.train_images_per_s
    best = 0
    for epochs in range(1, math.ceil(wanted_images / splits.train) + 1):
        fixed = epochs * epoch_cost_s(splits, throughput, cached)
        fixed += fixed_cost_s(splits, throughput, cached)
        if fixed > seconds_left:
            break  # every further epoch adds to this
        affordable = wanted_images if cached else int((seconds_left - fixed) * rate)
        images = min(wanted_images, epochs * splits.train, affordable)
        if images > (epochs - 1) * splits.train:  # these images need all those epochs
            best = max(best, images)
    if minimum_images is None:
        minimum_images = splits.train
    if best < min(wanted_images, minimum_images):
        return None
    return schedule_of(best, splits, batch_size, throughput, cached)


def full_batches(splits: Splits, batch_size: int) -> int:
    """Whole batches in one process's pass over the training images (the last partial batch is
    dropped)."""
    return max(1, splits.train // splits.processes // batch_size)


def images_processed(epochs: int, epoch_batches: int, splits: Splits, batch_size: int) -> int:
    """Training images that `epochs` epochs of `epoch_batches` batches per process (0: whole
    passes) process on all processes together."""
    whole = full_batches(splits, batch_size)
    batches = min(epoch_batches, whole) if epoch_batches else whole
    per_batch = min(batch_size, splits.train // splits.processes)  # no full batch: one smaller
    return epochs * batches * per_batch * splits.processes


def schedule_of(
    images: int,
    splits: Splits,
    batch_size: int,
    throughput: Throughput | None = None,
    cached: bool = False,
) -> Schedule:
    """Whole epochs where `images` is a whole number of passes, else the same number of
    shorter epochs of equal length (batches per process), ending at the last step."""
    epochs = max(1, math.ceil(images / splits.train - 1e-9))
    # whole batches, rounded down: a schedule fitted to the time left stays within it
    batches = max(1, int(images / splits.processes / batch_size / epochs))
    epoch_batches = 0 if batches >= full_batches(splits, batch_size) else batches
    processed = images_processed(epochs, epoch_batches, splits, batch_size)
    seconds = predicted_s(processed, splits, throughput, cached) if throughput else math.nan
    return Schedule(epochs, epoch_batches, processed, round(seconds, 1))


def with_schedule(config: FinetuneConfig, schedule: Schedule) -> FinetuneConfig:
    return replace(config, epochs=schedule.epochs, epoch_batches=schedule.epoch_batches)


def planned_epochs(planned: dict[str, Any]) -> int:
    """The epochs a budgeted run planned in the end: its schedule's, or its re-plan's."""
    return (planned.get("replanned") or planned["schedule"])["epochs"]


def replanned_epochs(
    planned_epochs: int,
    epochs_done: int,
    epoch_s: float,
    target_s: float,
    limit_s: float,
    most_epochs: int,
) -> int:
    """The epochs a run should have in all, re-planned after `epochs_done` of its
    `planned_epochs` from the measured time of one (`epoch_s`, its validation and checkpoints
    included). The plan stands while its remaining epochs are predicted to end within an epoch
    before `target_s` (what the plan's share of the budget leaves for training) and not past
    `limit_s` (the budget clock's mark, where training would be cut before its decay ends):
    one epoch's noise does not move it back and forth. Otherwise as many more as fit in
    `target_s`, to the nearest epoch but never past `limit_s`; at least one more, at most
    `most_epochs` in all."""
    remaining_s = (planned_epochs - epochs_done) * epoch_s
    if target_s - epoch_s <= remaining_s <= limit_s and planned_epochs <= most_epochs:
        return planned_epochs
    more = min(round(target_s / epoch_s), math.floor(limit_s / epoch_s))
    return max(epochs_done + 1, min(most_epochs, epochs_done + more))


class FitScheduleToBudget(pl.Callback):
    """With --budget: from the epoch after `REPLAN_FROM_EPOCH` on, at each epoch's start, time
    the epochs since then (training, validation, checkpoints: their mean) and make the run as
    many epochs long as then fit (`replanned_epochs`), the learning rate's decay stretched or
    shortened to end at the new last step (`TransferClassifier.reschedule`). The first
    process decides for all. `record` holds what was re-planned (None while nothing was);
    `on_replan` is called with each new number of epochs (to record it in config.yaml)."""

    def __init__(
        self,
        planned: dict[str, Any],
        started: float,
        on_replan: Callable[[int], None] | None = None,
    ) -> None:
        self.planned = planned
        self.started = started
        self.on_replan = on_replan
        self.record: dict[str, Any] | None = None
        self._timed_from = 0.0  # the start of epoch REPLAN_FROM_EPOCH

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        epoch, now = trainer.current_epoch, time.perf_counter()
        if epoch == REPLAN_FROM_EPOCH:
            self._timed_from = now
        if epoch <= REPLAN_FROM_EPOCH:
            return
        epoch_s = (now - self._timed_from) / (epoch - REPLAN_FROM_EPOCH)
        planned_epochs = trainer.max_epochs
        epochs = replanned_epochs(
            planned_epochs,
            epoch,
            epoch_s,
            training_time_left_s(self.planned, self.started, share=BUDGET_SHARE),
            training_time_left_s(self.planned, self.started),
            max(planned_epochs, self.planned.get("most_epochs", planned_epochs)),
        )
        epochs = trainer.strategy.broadcast(epochs, src=0)  # every process trains as many
        if epochs == planned_epochs:
            return
        if self.record is None and trainer.is_global_zero:
            logger.info(
                f"Budget: epochs take {epoch_s:.1f} s (validation and checkpoints included); "
                f"{epochs} epochs in all instead of {planned_epochs}, the learning rate's "
                "decay ending at the new last epoch"
            )
        module.reschedule(epochs)
        stopper = trainer.early_stopping_callback
        if stopper is not None and stopper.patience >= planned_epochs:  # the budget's: all
            stopper.patience = epochs
        self.record = {
            "after_epochs": epoch,
            "epoch_s": round(epoch_s, 3),
            "epochs_before": (self.record or {}).get("epochs_before", planned_epochs),
            "epochs": epochs,
            "replans": (self.record or {}).get("replans", 0) + 1,
        }
        if self.on_replan is not None:
            self.on_replan(epochs)
