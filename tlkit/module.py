"""`TransferClassifier`: backbone, new head and transfer strategy as one LightningModule."""

from __future__ import annotations

import pickle

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from tlkit.backbones import Preprocessing, create_backbone, preprocessing
from tlkit.errors import ConfigError
from tlkit.heads import ClassifierHead
from tlkit.runfolder import unsafe_checkpoint
from tlkit.strategies import (
    count_parameters,
    keep_frozen_modules_in_eval,
    optimizer_parameter_groups,
    set_trainable,
)


class TransferClassifier(pl.LightningModule):
    """Image classifier fine-tuned from a pretrained timm backbone.

    Cross-entropy (optional label smoothing), AdamW or SGD, linear warm-up then cosine decay
    stepped every batch, top-1/top-5 accuracy from torchmetrics. Frozen parts of the backbone
    stay in eval mode whenever the module is put in train mode. `trained_with_hflip` records
    whether the training data is flipped horizontally: test-time averaging mirrors views only
    then (checkpoints without it come from runs that flipped).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "tf_efficientnet_lite0",
        pretrained: str = "hub",
        strategy: str = "partial",
        unfreeze_stages: int = 2,
        backbone_lr_scale: float = 0.1,
        dropout: float = 0.5,
        head_hidden: int = 0,
        drop_path_rate: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        optimizer: str = "adamw",
        warmup_epochs: float = 1.0,
        label_smoothing: float = 0.0,
        img_size: int | None = None,
        class_names: list[str] | None = None,
        channels_last: bool = False,
        trained_with_hflip: bool = True,
    ) -> None:
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.save_hyperparameters()
        self.backbone = create_backbone(backbone, pretrained, drop_path_rate)
        self.head = ClassifierHead(self.backbone.num_features, num_classes, dropout, head_hidden)
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
        """Class probabilities of a preprocessed batch (`tlkit.inference.Predictor`)."""
        return self(images).softmax(dim=-1)

    def predict_step(self, batch, batch_index: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.predict_batch(images)

    def configure_optimizers(self):
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = max(1, total_steps // max(1, self.trainer.max_epochs or 1))
        optimizer, schedule = self.optimizer_and_schedule(total_steps, steps_per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def optimizer_and_schedule(
        self, total_steps: int, steps_per_epoch: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """The optimiser over the trainable parameters (pretrained layers at the scaled learning
        rate) and its per-step schedule: linear warm-up, then cosine decay to zero."""
        hp = self.hparams
        scale = hp.backbone_lr_scale if hp.pretrained != "none" else 1.0
        groups = optimizer_parameter_groups(self.backbone, self.head, hp.lr, hp.weight_decay, scale)
        if hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups)
        elif hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, momentum=0.9, nesterov=True)
        else:
            raise ConfigError(f"unknown optimizer '{hp.optimizer}': choose adamw or sgd")
        # With any warm-up asked for, the schedule has the same structure however short the run,
        # so a checkpoint's scheduler state always fits it on --resume.
        warmup_steps = max(1, int(hp.warmup_epochs * steps_per_epoch)) if hp.warmup_epochs else 0
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, total_steps - warmup_steps)
        )
        if warmup_steps == 0:
            return optimizer, cosine
        warmup = torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=1.0 / (warmup_steps + 1), total_iters=warmup_steps
        )
        schedule = torch.optim.lr_scheduler.SequentialLR(
            optimizer, [warmup, cosine], milestones=[warmup_steps]
        )
        return optimizer, schedule
