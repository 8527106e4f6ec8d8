"""`TransferClassifier`: backbone, new head and transfer strategy as one LightningModule.

Its defaults are `FinetuneConfig`'s; its optimisers are the table `OPTIMIZERS` (name ->
constructor), whose names are `config.Optimizer`'s.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MeanMetric

from tlkit.config import FinetuneConfig, Optimizer
from tlkit.data.augment import DEFAULT_TRAINED_SHORT_SIDES
from tlkit.errors import ConfigError
from tlkit.metrics import (
    DEFAULT_THRESHOLD,
    PredictionsAndTargets,
    f1_optimal_thresholds,
    logged_name,
)
from tlkit.model.backbones import create_backbone, pooled_feature_width, preprocessing
from tlkit.model.heads import ClassifierHead
from tlkit.model.strategies import (
    count_parameters,
    keep_frozen_modules_in_eval,
    optimizer_parameter_groups,
    set_trainable,
)
from tlkit.model.tasks import TaskDefinition, task_of
from tlkit.runfolder import Preprocessing, unsafe_checkpoint

# Defaults are FinetuneConfig's, so that the API and the CLI cannot drift apart; the parameters
# stay spelled out, as Lightning's `save_hyperparameters` records them in the checkpoint.
_default = FinetuneConfig.field_default


def _adamw(groups: list[dict]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups)


def _sgd(groups: list[dict]) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, momentum=0.9, nesterov=True)


# Each optimiser: parameter groups (each with its learning rate and weight decay) -> optimiser.
# The keys are config.Optimizer's choices (a test checks it).
OPTIMIZERS: dict[Optimizer, Callable[[list[dict]], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "sgd": _sgd,
}


class TransferClassifier(pl.LightningModule):
    """Image classifier fine-tuned from a pretrained timm backbone.

    The `task` (model/tasks.py) gives the loss and output activation and the epoch metrics
    (single-label: cross-entropy with optional label smoothing, softmax, accuracies, balanced
    accuracy, macro-F1; multi-label: binary cross-entropy, sigmoids, mAP and F1); AdamW or SGD,
    linear warm-up then cosine decay stepped every batch. `loss_weights` weigh the classes in
    the training loss (`--class-weights`). Frozen parts of the backbone stay in eval mode
    whenever the module is put in train mode. `trained_with_hflip` records whether the training
    data is flipped horizontally: test-time averaging mirrors views only then (checkpoints
    without it come from runs that flipped; without `task`, from single-label runs).
    `trained_short_sides` records the short sides training resized images to, relative to the
    input size (low, high): test-time averaging takes its scales from within them (checkpoints
    without it come from runs with the default 256-480 at 224). `initial_bias`: the head's
    classifier bias at initialisation (the task's `initial_bias` of the training labels;
    None: zero).

    Multi-label: at the end of every validation the per-class thresholds that maximise F1 on
    it are chosen (`decision_thresholds`) and saved with the checkpoint, so best.ckpt holds the
    thresholds of its own validation; test scores are computed at them.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = _default("backbone"),
        pretrained: str = _default("pretrained"),
        strategy: str = _default("strategy"),
        unfreeze_stages: int = _default("unfreeze_stages"),
        backbone_lr_scale: float = _default("backbone_lr_scale"),
        dropout: float = _default("dropout"),
        head_hidden: int = _default("head_hidden"),
        drop_path_rate: float = _default("drop_path_rate"),
        lr: float = _default("lr"),
        weight_decay: float = _default("weight_decay"),
        optimizer: str = _default("optimizer"),
        warmup_epochs: float = _default("warmup_epochs"),
        label_smoothing: float = _default("label_smoothing"),
        layer_decay: float = _default("layer_decay"),
        img_size: int | None = _default("img_size"),
        class_names: list[str] | None = None,
        channels_last: bool = _default("channels_last"),
        trained_with_hflip: bool = True,
        task: str = "single-label",
        loss_weights: list[float] | None = None,
        trained_short_sides: Sequence[float] = DEFAULT_TRAINED_SHORT_SIDES,
        initial_bias: list[float] | None = None,
    ) -> None:
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(f"{len(class_names)} class names for {num_classes} classes")
        if loss_weights is not None and len(loss_weights) != num_classes:
            raise ConfigError(f"{len(loss_weights)} loss weights for {num_classes} classes")
        if initial_bias is not None and len(initial_bias) != num_classes:
            raise ConfigError(f"{len(initial_bias)} initial biases for {num_classes} classes")
        self.save_hyperparameters()
        self.task: TaskDefinition = task_of(task)
        self._resumed_schedule: ResumedSchedule | None = None  # set on --resume
        self.decision_thresholds: list[float] | None = None  # multi-label, chosen on validation
        self.backbone = create_backbone(backbone, pretrained, drop_path_rate, img_size)
        self.head = ClassifierHead(
            pooled_feature_width(self.backbone), num_classes, dropout, head_hidden, initial_bias
        )
        set_trainable(self.backbone, strategy, unfreeze_stages)
        keep_frozen_modules_in_eval(self.backbone)
        weights = None if loss_weights is None else torch.tensor(loss_weights)
        self.register_buffer("class_loss_weights", weights, persistent=False)
        epoch_metrics = {
            "train": self.task.train_metrics(num_classes),
            "val": self.task.epoch_metrics(num_classes),
            "test": self.task.epoch_metrics(num_classes),
        }
        self.metrics = nn.ModuleDict(
            {
                logged_name(split, name): metric
                for split, metrics in epoch_metrics.items()
                for name, metric in metrics.items()
            }
        )
        # each split's first metric is also shown on the progress bar
        self._shown_metrics = {
            logged_name(split, next(iter(metrics)))
            for split, metrics in epoch_metrics.items()
            if metrics
        }
        self.predictions = nn.ModuleDict(
            {split: PredictionsAndTargets() for split in ("val", "test")}
            if self.task.scores_from_predictions
            else {}
        )
        # Validation and test loss as torchmetrics means (sums of loss x images and of images,
        # synchronised across processes): exact with uneven shares of the split, where
        # Lightning's `sync_dist` mean truncates the averaged (integer) image counts.
        self.mean_losses = nn.ModuleDict({split: MeanMetric() for split in ("val", "test")})

    @classmethod
    def load_checkpoint(cls, path, map_location="cpu") -> TransferClassifier:
        """Load a tlkit checkpoint safely (`weights_only=True`), without re-fetching weights."""
        try:
            model = cls.load_from_checkpoint(
                path, map_location=map_location, weights_only=True, pretrained="none"
            )
        except pickle.UnpicklingError as error:
            raise unsafe_checkpoint(path, error) from error
        return model.eval()

    @property
    def preprocessing(self) -> Preprocessing:
        """Resize, crop and normalisation this model expects (the backbone's pretrained config)."""
        return preprocessing(self.backbone, self.hparams.img_size)

    @property
    def trained_with_hflip(self) -> bool:
        return bool(self.hparams.trained_with_hflip)

    @property
    def trained_short_sides(self) -> tuple[float, float]:
        low, high = self.hparams.trained_short_sides
        return float(low), float(high)

    @property
    def class_names(self) -> list[str]:
        names = self.hparams.class_names
        return list(names) if names else [str(i) for i in range(self.hparams.num_classes)]

    @property
    def thresholds(self) -> list[float]:
        """Per class, the probability from which a multi-label prediction includes it: those
        chosen on validation, else `metrics.DEFAULT_THRESHOLD`."""
        chosen = self.decision_thresholds
        return list(chosen) if chosen else [DEFAULT_THRESHOLD] * self.hparams.num_classes

    def trainable_parameters(self) -> int:
        return count_parameters(self, trainable_only=True)

    def train(self, mode: bool = True) -> TransferClassifier:
        super().train(mode)
        if mode:
            keep_frozen_modules_in_eval(self.backbone)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for an image batch (B, C, H, W), or for pooled backbone features (B, D), as
        the cached-feature path (features.py) feeds them."""
        if images.ndim == 2:
            return self.head(images)
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.head(self.backbone(images))

    def setup(self, stage: str) -> None:
        # Before the strategy wraps the model: DDP lays out its gradient buckets like the
        # parameters then, and with parameters converted afterwards it would copy every
        # gradient into its bucket at each step (and warn that the strides do not match).
        if stage == "fit" and self.hparams.channels_last:
            self.to(memory_format=torch.channels_last)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, training: bool) -> torch.Tensor:
        """The task's loss; in training with label smoothing and the class weights."""
        if not training:
            return self.task.loss(logits, targets, None, 0.0)
        return self.task.loss(
            logits, targets, self.class_loss_weights, self.hparams.label_smoothing
        )

    def _step(self, batch, split: str) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = self.loss(logits, labels, training=split == "train")
        if split == "train":
            self.log("train_loss", loss, on_step=True, on_epoch=True, sync_dist=True, prog_bar=True)
        else:
            self.mean_losses[split].update(loss, weight=len(labels))
            self.log(f"{split}_loss", self.mean_losses[split], on_epoch=True, prog_bar=True)
        prefix = logged_name(split, "")
        for name, metric in self.metrics.items():
            if name.startswith(prefix):
                metric.update(logits, labels)  # epoch-level only: no per-batch value to compute
                shown = name in self._shown_metrics
                self.log(name, metric, on_step=False, on_epoch=True, prog_bar=shown)
        if split in self.predictions:
            self.predictions[split].update(self.task.activation(logits), labels)
        return loss

    def on_validation_epoch_end(self) -> None:
        """Multi-label: choose the thresholds on this validation, then score it at them."""
        if "val" in self.predictions:
            probabilities, targets = self.predictions["val"].compute()
            self.decision_thresholds = f1_optimal_thresholds(probabilities, targets)
            self._log_scores("val", probabilities, targets)

    def on_test_epoch_end(self) -> None:
        if "test" in self.predictions:
            self._log_scores("test", *self.predictions["test"].compute())

    def _log_scores(self, split: str, probabilities: torch.Tensor, targets: torch.Tensor) -> None:
        """Log a split's scores, computed from all its predictions (gathered from every
        process, so each computes the same numbers) as `evaluate` computes them."""
        self.predictions[split].reset()
        scores = self.task.evaluate(probabilities, targets, self.class_names, self.thresholds)
        for name, value in scores.scores().items():
            self.log(logged_name(split, name), float(value), sync_dist=True)

    def training_step(self, batch, batch_index: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_index: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_index: int) -> None:
        self._step(batch, "test")

    def predict_batch(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities of a preprocessed batch (`tlkit.infer.predict.Predictor`)."""
        return self.task.activation(self(images))

    def predict_step(self, batch, batch_index: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.predict_batch(images)

    def configure_optimizers(self):
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = max(1, total_steps // max(1, self.trainer.max_epochs or 1))
        optimizer, schedule = self.optimizer_and_schedule(
            total_steps, steps_per_epoch, self._resumed_schedule
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[SCHEDULE_KEY] = asdict(self.schedule_plan)  # plain numbers: weights_only-safe
        if self.decision_thresholds is not None:
            checkpoint[THRESHOLDS_KEY] = [float(value) for value in self.decision_thresholds]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """The checkpoint's decision thresholds; on --resume, also the schedule and the step
        and epoch the run stopped at, so that the decay goes on from there, in a longer run or
        with another epoch length (see `SchedulePlan.continued`)."""
        self.decision_thresholds = checkpoint.get(THRESHOLDS_KEY)
        if SCHEDULE_KEY in checkpoint:
            plan = SchedulePlan(**checkpoint[SCHEDULE_KEY])
            # tlkit's checkpoints are written at an epoch's end: `epoch` is the one just done
            epochs = checkpoint["epoch"] + 1
            self._resumed_schedule = ResumedSchedule(plan, checkpoint["global_step"], epochs)

    def reschedule(self, epochs: int) -> None:
        """At an epoch's start, make the run `epochs` epochs long in all (a budget's re-plan,
        `tlkit.train.budget.FitScheduleToBudget`): the learning rate decays on from where it
        stands to 0 at the new last step (`SchedulePlan.continued`), and the trainer stops
        there."""
        trainer = self.trainer
        done = trainer.current_epoch
        steps_per_epoch = trainer.global_step // max(1, done)
        plan = self.schedule_plan.continued(
            trainer.global_step, done, steps_per_epoch, steps_per_epoch * epochs
        )
        scheduler = self.lr_schedulers()
        # LambdaLR keeps its functions in a list and calls them at every step
        scheduler.lr_lambdas = [plan.factor for _ in scheduler.lr_lambdas]
        self.schedule_plan = plan  # saved with each checkpoint, for --resume
        trainer.fit_loop.max_epochs = epochs

    def optimizer_and_schedule(
        self,
        total_steps: int,
        steps_per_epoch: int,
        resumed: ResumedSchedule | None = None,
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """The optimiser over the trainable parameters (pretrained layers at the scaled learning
        rate, decayed layer by layer with `layer_decay`) and its per-step schedule: linear
        warm-up, then cosine decay to zero, the same factor for every group's own rate.

        `resumed`: the plan, step and epoch of the checkpoint a run resumes from; its schedule
        is kept, converted to `steps_per_epoch` where the epoch length changed (another batch
        size, device count or accumulation) and continued to `total_steps` where the run got
        longer."""
        hp = self.hparams
        scale = hp.backbone_lr_scale if hp.pretrained != "none" else 1.0
        groups = optimizer_parameter_groups(
            self.backbone, self.head, hp.lr, hp.weight_decay, scale, hp.layer_decay
        )
        if hp.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"unknown optimizer '{hp.optimizer}': choose one of {', '.join(OPTIMIZERS)}"
            )
        optimizer = OPTIMIZERS[hp.optimizer](groups)
        if resumed is None:
            warmup_steps = min(
                int(hp.warmup_epochs * steps_per_epoch), int(MAX_WARMUP_SHARE * total_steps)
            )
            plan = SchedulePlan(warmup_steps, total_steps)
        else:
            plan = resumed.plan.continued(
                resumed.step, resumed.epochs, steps_per_epoch, total_steps
            )
        self.schedule_plan = plan
        # LambdaLR's state is the step count alone (a plain function is left out of its
        # state_dict), so the restored step meets this plan, continued or not.
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, plan.factor)


# Warm-up takes at most this share of the run's steps (a warm-up ratio, as Hugging Face's
# `warmup_ratio`). tlkit's default, 1 warm-up epoch of 10, sits at the cap, so only shorter runs
# are affected: without it a 1-epoch run would warm up for all of it and never decay, and a
# 3-epoch search trial would spend a third of its steps warming up.
MAX_WARMUP_SHARE = 0.1


SCHEDULE_KEY = "tlkit_lr_schedule"  # the SchedulePlan in every checkpoint
THRESHOLDS_KEY = "tlkit_decision_thresholds"  # multi-label: per class, chosen on validation


class ScheduleFinishedError(ConfigError):
    """A run whose learning rate has decayed to zero was resumed with more epochs."""


class ResumedSchedule(NamedTuple):
    """What a checkpoint says of its schedule: the plan, the optimiser step it stopped at (the
    count LambdaLR's state restores) and the epochs it completed."""

    plan: SchedulePlan
    step: int
    epochs: int


@dataclass(frozen=True)
class SchedulePlan:
    """Linear warm-up from 1 / (warmup_steps + 1) to 1 at `warmup_steps`, then cosine decay from
    `decay_factor` at `decay_start` (default: 1 at the end of warm-up) to 0 at `total_steps`.

    Steps are the plan's own; the optimiser's step count is `step_offset` behind them (a run
    resumed with another epoch length goes on counting from where its checkpoint's count
    stood, while its plan is in the new steps)."""

    warmup_steps: float  # whole numbers, but for a plan converted to another epoch length
    total_steps: float
    decay_start: float | None = None
    decay_factor: float = 1.0
    step_offset: int = 0

    def factor(self, step: int) -> float:
        """The learning rate of optimiser step `step`, over the configured rate."""
        return self._factor_at(step + self.step_offset)

    def _factor_at(self, position: float) -> float:
        if position < self.warmup_steps:
            return (position + 1) / (self.warmup_steps + 1)
        start = self.warmup_steps if self.decay_start is None else self.decay_start
        progress = min(1.0, max(0.0, (position - start) / max(1, self.total_steps - start)))
        return self.decay_factor * 0.5 * (1.0 + math.cos(math.pi * progress))

    def continued(
        self, step: int, epochs: int, steps_per_epoch: int, total_steps: int
    ) -> SchedulePlan:
        """This plan, resumed at optimiser step `step` after `epochs` whole epochs, in a run of
        `total_steps` steps of `steps_per_epoch` each.

        With another epoch length (batch size, devices, accumulation), the plan is first
        converted to the new steps: every step count scaled by the ratio of the epoch lengths,
        so the run resumes at the same fraction of its schedule, at the rate it had reached.
        With more steps in all (more epochs), the decay goes on from that rate down to 0 at the
        new end, so the rate never climbs back up."""
        position = step + self.step_offset  # in this plan's steps
        old_steps_per_epoch = position / epochs if epochs else steps_per_epoch
        plan = self._scaled(steps_per_epoch / old_steps_per_epoch) if position else self
        resumed_at = epochs * steps_per_epoch  # the same point, in the new steps
        if not math.isclose(total_steps, plan.total_steps):
            if position >= self.total_steps:
                raise ScheduleFinishedError(
                    f"this run finished its schedule at step {step}: its learning rate decayed "
                    "to 0, so more epochs would change nothing. Start a new run with the epochs "
                    "you want (another --out)."
                )
            if resumed_at <= plan.warmup_steps:  # still warming up: the decay starts later
                plan = replace(plan, total_steps=total_steps)
            else:
                rate = plan._factor_at(resumed_at)
                plan = SchedulePlan(plan.warmup_steps, total_steps, resumed_at, rate)
        return replace(plan, step_offset=resumed_at - step)

    def _scaled(self, ratio: float) -> SchedulePlan:
        """This plan with every step count multiplied by `ratio` (not rounded: the rate at
        each point of the schedule stays exactly what it was)."""
        if ratio == 1:
            return self
        start = None if self.decay_start is None else self.decay_start * ratio
        return SchedulePlan(
            self.warmup_steps * ratio, self.total_steps * ratio, start, self.decay_factor
        )
