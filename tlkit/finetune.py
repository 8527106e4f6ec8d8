"""`finetune(config)`: data module + TransferClassifier + Lightning Trainer -> a run folder.

The CLI's `tlkit finetune` and the recipes call this; users who want their own Trainer build
`ImageDataModule` and `TransferClassifier` directly (see recipes/custom_imagefolder.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    TQDMProgressBar,
)
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities import rank_zero_only

from tlkit import __version__
from tlkit.backbones import preprocessing
from tlkit.config import FinetuneConfig
from tlkit.data import ImageDataModule
from tlkit.module import TransferClassifier
from tlkit.runfolder import (
    BEST_CHECKPOINT,
    CONFIG,
    LAST_CHECKPOINT,
    SKIPPED,
    write_atomic,
    write_skipped,
    write_summary,
)


class EpochSummary(Callback):
    """Prints one line per epoch, in the lecture's style, and keeps the history.

    `Finished epoch 3 / 10: loss 0.4123, train 0.8812, val 0.8710, lr 1.00e-03`
    """

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
        head_lr = trainer.optimizers[0].param_groups[-1]["lr"]
        record = {
            "epoch": trainer.current_epoch + 1,
            "loss": metrics.get("train_loss_epoch", float("nan")),
            "train_acc": metrics.get("train_acc", float("nan")),
            "val_acc": metrics.get("val_acc", float("nan")),
            "lr": head_lr,
        }
        self.history.append(record)
        line = (
            f"Finished epoch {record['epoch']} / {trainer.max_epochs}: "
            f"loss {record['loss']:.4f}, train {record['train_acc']:.4f}, "
            f"val {record['val_acc']:.4f}, lr {head_lr:.2e}"
        )
        if trainer.is_global_zero:
            bar = trainer.progress_bar_callback
            bar.print(line) if bar is not None else print(line, flush=True)


def build_model(config: FinetuneConfig, class_names: list[str]) -> TransferClassifier:
    """The LightningModule a config describes."""
    return TransferClassifier(
        num_classes=len(class_names),
        backbone=config.backbone,
        pretrained=config.pretrained,
        strategy=config.strategy,
        unfreeze_stages=config.unfreeze_stages,
        backbone_lr_scale=config.backbone_lr_scale,
        dropout=config.dropout,
        head_hidden=config.head_hidden,
        drop_path_rate=config.drop_path_rate,
        lr=config.lr,
        weight_decay=config.weight_decay,
        optimizer=config.optimizer,
        warmup_epochs=config.warmup_epochs,
        label_smoothing=config.label_smoothing,
        img_size=config.img_size,
        class_names=class_names,
    )


def build_datamodule(config: FinetuneConfig) -> ImageDataModule:
    """The data module a config describes, with the backbone's own preprocessing."""
    return ImageDataModule(
        config.data_dir,
        preprocessing(config.backbone, config.img_size),
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        val_fraction=config.val_fraction,
        seed=config.seed,
        augment=config.augment,
        augmentation={
            "short_side_range": (config.short_side_min, config.short_side_max),
            "hflip": config.hflip,
            "color_jitter": config.color_jitter,
        },
    )


def _devices(value: str) -> int | str | list[int]:
    if value == "auto":
        return value
    if "," in value:
        return [int(index) for index in value.split(",") if index.strip()]
    return int(value)


def finetune(config: FinetuneConfig, **trainer_options: Any) -> dict[str, Any]:
    """Train as the config says; write and return the run summary.

    `trainer_options` are passed to `pytorch_lightning.Trainer` on top of tlkit's own
    (for example `limit_train_batches` or `enable_progress_bar=False`); `callbacks` given there
    are added to tlkit's own, and `limit_test_batches=0` skips the test-split evaluation.
    """
    if not config.data_dir:
        raise ValueError("no data: give DATA_DIR (an image folder or a CSV file)")
    out = Path(config.out)
    existing = [name for name in (BEST_CHECKPOINT, LAST_CHECKPOINT) if (out / name).exists()]
    if existing:
        raise FileExistsError(
            f"{out} already holds a run ({', '.join(existing)}); choose another --out"
        )
    started = time.perf_counter()
    pl.seed_everything(config.seed, workers=True, verbose=False)
    datamodule = build_datamodule(config)
    datamodule.setup("fit")
    model = build_model(config, datamodule.classes)

    summary_callback = EpochSummary()
    checkpoint = ModelCheckpoint(
        dirpath=out,
        filename="best",
        monitor="val_acc",
        mode="max",
        save_last=True,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    callbacks = [
        checkpoint,
        EarlyStopping(monitor="val_acc", mode="max", patience=config.patience),
        LearningRateMonitor(logging_interval="epoch"),
        summary_callback,
    ]
    if trainer_options.get("enable_progress_bar", True):
        callbacks.append(TQDMProgressBar(leave=True))
    callbacks += trainer_options.pop("callbacks", [])
    steps_per_epoch = -(-len(datamodule.train_set) // config.batch_size)
    options = {
        "max_epochs": config.epochs,
        "accelerator": config.accelerator,
        "devices": _devices(config.devices),
        "callbacks": callbacks,
        "logger": CSVLogger(save_dir=out, name="", version=""),
        "log_every_n_steps": max(1, min(50, steps_per_epoch)),
        "enable_model_summary": False,
        **trainer_options,
    }
    trainer = pl.Trainer(**options)
    trainer.fit(model, datamodule=datamodule)

    test_metrics: dict[str, float] = {}
    if datamodule.test_set is not None and trainer.limit_test_batches != 0:
        results = trainer.test(model, datamodule=datamodule, ckpt_path="best", verbose=False)
        test_metrics = {key: float(value) for key, value in results[0].items()}

    history = summary_callback.history
    best = max(history, key=lambda record: record["val_acc"]) if history else {}
    summary = {
        "tlkit_version": __version__,
        "backbone": config.backbone,
        "weights": config.pretrained,
        "strategy": config.strategy,
        "unfreeze_stages": config.unfreeze_stages if config.strategy == "partial" else None,
        "trainable_parameters": model.trainable_parameters(),
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "classes": datamodule.classes,
        "preprocessing": vars(datamodule.preprocessing),
        "train_images": len(datamodule.train_set),
        "val_images": len(datamodule.val_set),
        "test_images": len(datamodule.test_set) if datamodule.test_set is not None else 0,
        "epochs_run": len(history),
        "best_epoch": best.get("epoch"),
        "best_val_acc": best.get("val_acc"),
        "test_acc": test_metrics.get("test_acc"),
        "test_acc_top5": test_metrics.get("test_acc_top5"),
        "history": history,
        "skipped_files": len(datamodule.skipped),
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    _write_run_files(out, config, summary, datamodule.skipped)
    return summary


@rank_zero_only
def _write_run_files(out: Path, config, summary, skipped) -> None:
    write_atomic(out / CONFIG, config.to_yaml())
    write_skipped(out, skipped)
    write_summary(out, summary)
    if skipped:
        print(f"Skipped {len(skipped)} unusable files, listed in {out / SKIPPED}")
    test = f", test {summary['test_acc']:.4f}" if summary["test_acc"] is not None else ""
    print(
        f"Best val {summary['best_val_acc']:.4f} at epoch {summary['best_epoch']}{test}; "
        f"run folder {out}",
        flush=True,
    )
