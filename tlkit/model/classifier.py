"""`TransferClassifier`: backbone, new head and transfer strategy as one LightningModule.

Its defaults are `FinetuneConfig`'s; its optimisers are the table `OPTIMIZERS` (name ->
constructor), whose names are `config.Optimizer`'s.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from tlkit.config import FinetuneConfig, Optimizer
from tlkit.data.augment import DEFAULT_TRAINED_SHORT_SIDES
from tlkit.errors import ConfigError
from tlkit.model.backbones import create_backbone, pooled_feature_width, preprocessing
from tlkit.model.heads import ClassifierHead
from tlkit.model.strategies import (
    count_parameters,
    keep_frozen_modules_in_eval,
    optimizer_parameter_groups,
    set_trainable,
)
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

    Cross-entropy (optional label smoothing), AdamW or SGD, linear warm-up then cosine decay
    stepped every batch, top-1/top-5 accuracy from torchmetrics. Frozen parts of the backbone
    stay in eval mode whenever the module is put in train mode. `trained_with_hflip` records
    whether the training data is flipped horizontally: test-time averaging mirrors views only
    then (checkpoints without it come from runs that flipped). `trained_short_sides` records the
    short sides training resized images to, relative to the input size (low, high): test-time
    averaging takes its scales from within them (checkpoints without it come from runs with the
    default 256-480 at 224).
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
        trained_short_sides: Sequence[float] = DEFAULT_TRAINED_SHORT_SIDES,
    ) -> None:
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(f"{len(class_names)} class names for {num_classes} classes")
        self.save_hyperparameters()
        self._resumed_schedule: tuple[SchedulePlan, int] | None = None  # set on --resume
        self.backbone = create_backbone(backbone, pretrained, drop_path_rate, img_size)
        self.head = ClassifierHead(
            pooled_feature_width(self.backbone), num_classes, dropout, head_hidden
        )
        set_trainable(self.backbone, strategy, unfreeze_stages)
        keep_frozen_modules_in_eval(self.backbone)
        top_k = min(5, num_classes)
        self.metrics = nn.ModuleDict(
            {
                f"{split}_{name}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
                for split in ("train", "val", "test")
                for name, k in (("acc", 1), ("acc_top5", top_k))
            }
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

    def on_fit_start(self) -> None:
        if self.hparams.channels_last:
            self.to(memory_format=torch.channels_last)

    def _step(self, batch, split: str) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        smoothing = self.hparams.label_smoothing if split == "train" else 0.0
        loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        if split == "train":
            self.log("train_loss", loss, on_step=True, on_epoch=True, sync_dist=True, prog_bar=True)
        else:
            self.mean_losses[split].update(loss, weight=len(labels))
            self.log(f"{split}_loss", self.mean_losses[split], on_epoch=True, prog_bar=True)
        for name in ("acc", "acc_top5"):
            metric = self.metrics[f"{split}_{name}"]
            metric.update(logits, labels)  # epoch-level only: no per-batch value to compute
            self.log(
                f"{split}_{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "acc"
            )
        return loss

    def training_step(self, batch, batch_index: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_index: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_index: int) -> None:
        self._step(batch, "test")

    def predict_batch(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities of a preprocessed batch (`tlkit.infer.predict.Predictor`)."""
        return self(images).softmax(dim=-1)

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

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """On --resume, remember the schedule and step the run stopped at, so that a longer run
        continues the decay from there (see `SchedulePlan.continued`)."""
        if SCHEDULE_KEY in checkpoint:
            plan = SchedulePlan(**checkpoint[SCHEDULE_KEY])
            self._resumed_schedule = (plan, checkpoint["global_step"])

    def optimizer_and_schedule(
        self,
        total_steps: int,
        steps_per_epoch: int,
        resumed: tuple[SchedulePlan, int] | None = None,
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """The optimiser over the trainable parameters (pretrained layers at the scaled learning
        rate, decayed layer by layer with `layer_decay`) and its per-step schedule: linear
        warm-up, then cosine decay to zero, the same factor for every group's own rate.

        `resumed`: the plan and step of the checkpoint a run resumes from; its schedule is kept,
        and continued to `total_steps` where that changed."""
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
            plan = resumed[0].continued(resumed[1], total_steps)
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


class ScheduleFinishedError(ConfigError):
    """A run whose learning rate has decayed to zero was resumed with more epochs."""


@dataclass(frozen=True)
class SchedulePlan:
    """Linear warm-up from 1 / (warmup_steps + 1) to 1 at `warmup_steps`, then cosine decay from
    `decay_factor` at `decay_start` (default: 1 at the end of warm-up) to 0 at `total_steps`."""

    warmup_steps: int
    total_steps: int
    decay_start: int | None = None
    decay_factor: float = 1.0

    def factor(self, step: int) -> float:
        """The learning rate of optimiser step `step`, over the configured rate."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        start = self.warmup_steps if self.decay_start is None else self.decay_start
        progress = min(1.0, max(0.0, (step - start) / max(1, self.total_steps - start)))
        return self.decay_factor * 0.5 * (1.0 + math.cos(math.pi * progress))

    def continued(self, step: int, total_steps: int) -> SchedulePlan:
        """This plan, resumed at `step` in a run of `total_steps`: the decay goes on from the
        rate it had reached down to 0 at the new end, so the rate never climbs back up."""
        if total_steps == self.total_steps:
            return self
        if step >= self.total_steps:
            raise ScheduleFinishedError(
                f"this run finished its schedule at step {step}: its learning rate decayed to 0, "
                "so more epochs would change nothing. Start a new run with the epochs you want "
                "(another --out)."
            )
        if step <= self.warmup_steps:  # still warming up: the decay starts later anyway
            return replace(self, total_steps=total_steps)
        return SchedulePlan(self.warmup_steps, total_steps, step, self.factor(step))
