"""`finetune(config)`: data module + TransferClassifier + Lightning Trainer -> a run folder.

The CLI's `tlkit finetune` and the recipes call this; users who want their own Trainer build
`ImageDataModule` and `TransferClassifier` directly (see recipes/custom_imagefolder.py).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

from tlkit import __version__
from tlkit.config import FinetuneConfig
from tlkit.console import expected_lightning_warnings_hidden
from tlkit.data.datamodule import BaseImageDataModule
from tlkit.data.datasets import drops_last_batch
from tlkit.errors import ConfigError, OutputExistsError, RunFolderError
from tlkit.model.classifier import TransferClassifier
from tlkit.runfolder import (
    AUTO_DECISION,
    BEST_CHECKPOINT,
    CONFIG,
    LAST_CHECKPOINT,
    LOAD_FAILURES,
    SKIPPED,
    RunSummary,
    read_auto_decision,
    read_checkpoint,
    read_config,
    read_metrics,
    read_split,
    write_atomic,
    write_metrics,
    write_skipped,
    write_split,
    write_summary,
)
from tlkit.train.auto import resolve_auto
from tlkit.train.build import build_datamodule, build_model, cache_folder, check_config
from tlkit.train.callbacks import (
    TRAINING_WEIGHTS_KEY,
    EpochProgressBar,
    EpochSummary,
    ExponentialMovingAverage,
    StopOnNonFiniteLoss,
)
from tlkit.train.features import CachedFeatureDataModule
from tlkit.train.hardware import effective_batch_size, probe_device
from tlkit.train.hardware import trainer_options as distributed_options
from tlkit.train.probe import fit_probe, probe_features

logger = logging.getLogger(__name__)


def build_logger(config: FinetuneConfig, out: Path) -> Logger:
    """RUN_DIR/metrics.csv (csv), or event files in RUN_DIR/tensorboard/ (tensorboard)."""
    if config.logger == "tensorboard":
        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError(
                "--logger tensorboard needs the tensorboard package: "
                "pip install tensorboard (or tlkit[tensorboard])"
            )
        return TensorBoardLogger(save_dir=out, name="tensorboard", version="")
    # flushed at every logging step, so a killed run keeps its metrics on disk
    return CSVLogger(save_dir=out, name="", version="", flush_logs_every_n_steps=1)


def finetune(config: FinetuneConfig, resume: bool = False, **trainer_options: Any) -> RunSummary:
    """Train as the config says; write the run summary (summary.json) and return it.

    With `strategy="auto"`, the data is measured first and the choices left open are made from
    the evidence (tlkit/train/auto.py). With `resume`, continue the run in `config.out` from its
    `last.ckpt` (model, optimiser,
    schedule, epoch and callback states), on the images of its recorded split.csv.
    `trainer_options` are passed to `pytorch_lightning.Trainer` on top of tlkit's own (e.g.
    `enable_progress_bar=False`); `callbacks` given there are added to tlkit's own, and
    `limit_test_batches=0` skips the test-split evaluation.
    """
    if not config.data_dir:
        raise ConfigError("no data: give DATA_DIR (an image folder or a CSV file)")
    started = time.perf_counter()  # auto's measurements count as part of the run
    check_config(config)  # before the data is scanned or measured
    out = Path(config.out)
    resume_from = _check_run_folder(out, resume)
    progress = trainer_options.get("enable_progress_bar", True)
    auto_decision = read_auto_decision(out) if resume_from else None
    if config.strategy == "auto" and auto_decision is not None:  # resumed: as recorded
        recorded = read_config(out)
        open_choices = ["strategy", *config.choices_left_to_auto()]
        config = replace(config, **{name: getattr(recorded, name) for name in open_choices})
    elif config.strategy == "auto":
        config, auto_decision = resolve_auto(config, progress)
        check_config(config)
    if resume_from:
        _check_same_averaging(resume_from, config.ema)
    earlier_metrics = read_metrics(out) if resume_from else []
    logger = build_logger(config, out)
    pl.seed_everything(config.seed, workers=True, verbose=False)
    recorded_split = read_split(out) if resume_from else None
    datamodule = build_datamodule(config, recorded_split, out / LOAD_FAILURES)
    datamodule.setup("fit")
    if resume_from:
        _check_same_classes(resume_from, datamodule.classes)
    _write_at_start(out, config, datamodule, auto_decision)
    model = build_model(config, datamodule.classes)
    linear_probe = None
    if config.lp_ft and not resume_from:  # resumed: the head comes from the checkpoint
        linear_probe = start_from_linear_probe(config, model, datamodule, progress)
    training_data = _training_data(config, model, datamodule, progress)

    summary_callback = EpochSummary()
    callbacks = [
        ModelCheckpoint(
            dirpath=out,
            filename="best",
            monitor="val_acc",
            mode="max",
            auto_insert_metric_name=False,
            enable_version_counter=False,
        ),
        # last.ckpt, for --resume: the state at every epoch's end. (Lightning 2.6's save_last
        # writes it only in epochs whose val_acc improved, so a resume would repeat the others.)
        ModelCheckpoint(
            dirpath=out, filename=Path(LAST_CHECKPOINT).stem, enable_version_counter=False
        ),
        EarlyStopping(monitor="val_acc", mode="max", patience=config.patience),
        LearningRateMonitor(logging_interval="epoch"),
        StopOnNonFiniteLoss(),
        summary_callback,
    ]
    if config.ema:
        callbacks.append(ExponentialMovingAverage(config.ema_decay))
    if progress:
        callbacks.append(EpochProgressBar())
    callbacks += trainer_options.pop("callbacks", [])
    train_images = len(datamodule.train_set)
    # as the training loader counts them (an incomplete last batch is dropped, data.py)
    full_batches_only = drops_last_batch(train_images, config.batch_size)
    steps_per_epoch = train_images // config.batch_size if full_batches_only else 1
    options = {
        "max_epochs": config.epochs,
        **distributed_options(config),
        "callbacks": callbacks,
        "logger": logger,
        "log_every_n_steps": max(1, min(50, steps_per_epoch)),
        "enable_model_summary": False,
        **trainer_options,
    }
    with expected_lightning_warnings_hidden():
        trainer = pl.Trainer(**options)
        _report_settings(trainer, config, model, datamodule)
        pl.seed_everything(config.seed, workers=True, verbose=False)  # same state, cached or not
        trainer.fit(model, datamodule=training_data, ckpt_path=resume_from, weights_only=True)
        if resume_from:
            _keep_earlier_metrics(out, earlier_metrics)
        history = list(summary_callback.history)  # testing the best checkpoint restores its state

        test_metrics: dict[str, float] = {}
        if datamodule.test_set is not None and trainer.limit_test_batches != 0:
            # The best-on-validation checkpoint, named (the first ModelCheckpoint tracks it):
            # "best" would make Lightning warn that two checkpoint callbacks exist.
            best = trainer.checkpoint_callback.best_model_path
            results = trainer.test(model, datamodule=training_data, ckpt_path=best, verbose=False)
            test_metrics = {key: float(value) for key, value in results[0].items()}

    scanned = {path for path, _ in datamodule.skipped}
    skipped = datamodule.skipped + [
        failure for failure in datamodule.load_failures() if failure[0] not in scanned
    ]
    best = max(history, key=lambda record: record["val_acc"]) if history else {}
    summary = RunSummary(
        tlkit_version=__version__,
        backbone=config.backbone,
        weights=config.pretrained,
        strategy=config.strategy,
        unfreeze_stages=config.unfreeze_stages if config.strategy == "partial" else None,
        trainable_parameters=model.trainable_parameters(),
        total_parameters=sum(p.numel() for p in model.parameters()),
        classes=datamodule.classes,
        preprocessing=datamodule.preprocessing,
        train_images=len(datamodule.train_set),
        val_images=len(datamodule.val_set),
        test_images=len(datamodule.test_set) if datamodule.test_set is not None else 0,
        epochs_run=len(history),
        best_epoch=best.get("epoch"),
        best_val_acc=best.get("val_acc"),
        test_acc=test_metrics.get("test_acc"),
        test_acc_top5=test_metrics.get("test_acc_top5"),
        history=history,
        resumed=resume_from is not None,
        feature_cache=getattr(training_data, "report", None),
        auto_decision=auto_decision,
        linear_probe=linear_probe,
        skipped_files=len(skipped),
        wall_time_s=round(time.perf_counter() - started, 2),
    )
    _write_at_end(out, summary, skipped)
    return summary


def _report_settings(
    trainer: pl.Trainer,
    config: FinetuneConfig,
    model: TransferClassifier,
    datamodule: BaseImageDataModule,
) -> None:
    """Log the resolved settings once: model, data, batch size and learning rate; with
    --scale-lr, first scale the learning rate to the effective batch size."""
    effective = effective_batch_size(trainer, config)
    if config.scale_lr:
        model.hparams.lr = config.lr * effective / config.batch_size
    if not trainer.is_global_zero:
        return
    partial = config.strategy == "partial"
    stages = f" (--unfreeze-stages {config.unfreeze_stages})" if partial else ""
    test_images = len(datamodule.test_set) if datamodule.test_set is not None else 0
    logger.info(
        f"Settings: {config.backbone} ({config.pretrained} weights), strategy "
        f"{config.strategy}{stages}, {len(datamodule.classes)} classes, "
        f"{len(datamodule.train_set)} train / {len(datamodule.val_set)} val / {test_images} test "
        f"images at {datamodule.preprocessing.input_size} px, up to {config.epochs} epochs; "
        f"all settings in {Path(config.out) / CONFIG}"
    )
    logger.info(
        f"Effective batch size {effective} ({config.batch_size} per device x "
        f"{trainer.world_size} processes x {config.accumulate_grad_batches} accumulated); "
        f"learning rate {model.hparams.lr:.2e}" + (" (scaled)" if config.scale_lr else "")
    )


def _check_run_folder(out: Path, resume: bool) -> str | None:
    """The checkpoint to resume from, after checking that the folder allows what is asked."""
    last = out / LAST_CHECKPOINT
    if resume:
        if not last.is_file():
            raise RunFolderError(f"{out}: nothing to resume ({LAST_CHECKPOINT} is missing)")
        read_checkpoint(last)  # refuses anything but tensors and plain data, with a clear error
        return str(last)
    existing = [name for name in (BEST_CHECKPOINT, LAST_CHECKPOINT) if (out / name).exists()]
    if existing:
        raise OutputExistsError(
            f"{out} already holds a run ({', '.join(existing)}); continue it with --resume "
            "or choose another --out"
        )
    return None


def _check_same_classes(checkpoint: str, classes: list[str]) -> None:
    """A resumed run must find the classes it was trained on."""
    trained = read_checkpoint(checkpoint).get("hyper_parameters", {}).get("class_names")
    if trained is not None and list(trained) != classes:
        raise RunFolderError(
            f"the data now has the classes {classes}, but the run was trained on {trained}; "
            "a resumed run needs the same classes (start a new run)"
        )


def _check_same_averaging(checkpoint: str, ema: bool) -> None:
    """A run with --ema keeps its training weights beside the averaged ones; resumed without
    --ema it would silently go on from the average (and with it, start one from scratch)."""
    averaged = TRAINING_WEIGHTS_KEY in read_checkpoint(checkpoint)
    if averaged != ema:
        was, now = ("with", "without") if averaged else ("without", "with")
        raise RunFolderError(
            f"the run was trained {was} --ema and is resumed {now} it; resume it as it was "
            "trained (its config.yaml) or start a new run"
        )


def start_from_linear_probe(
    config: FinetuneConfig, model: TransferClassifier, images: BaseImageDataModule, progress: bool
) -> dict[str, Any]:
    """LP-FT (Kumar et al. 2022): fit a linear probe on the cached features of the train split
    (its L2 penalty chosen on validation) and make it the model's classifier, so fine-tuning
    starts from a converged head instead of a zero one, and the early, large gradients of a
    fresh head do not distort the pretrained features. Returns the probe's numbers.

    Every DDP process runs this before the process group exists: one extracts the features (a
    file lock), all fit the same probe from the same files (the fit is deterministic), and
    DDP's start-up broadcast of rank 0's parameters leaves no room for a difference anyway.
    """
    started = time.perf_counter()
    features = probe_features(
        model,
        images,
        config.cache_dir or Path(config.out) / "cache",
        progress,
        device=probe_device(config),
    )
    extraction_s = time.perf_counter() - started
    probe = fit_probe(*features, num_classes=len(images.classes), seed=config.seed)
    probe.copy_into(model)
    if rank_zero_only.rank == 0:
        logger.info(
            f"LP-FT: linear probe on cached features: validation top-1 "
            f"{probe.linear_val_acc:.4f} (k-NN {probe.knn_val_acc:.4f}, k={probe.knn_k}; L2 "
            f"{probe.l2_penalty:g}), fitted in {probe.fit_seconds:.2f} s; fine-tuning starts "
            "from its head"
        )
    return {**probe.summary(), "features_s": round(extraction_s, 2)}


def _training_data(
    config: FinetuneConfig, model: TransferClassifier, images: BaseImageDataModule, progress: bool
) -> pl.LightningDataModule:
    """The image data module, or for a frozen backbone its cached features (unless --no-cache),
    extracted inside `trainer.fit` on each process's own device."""
    if config.strategy != "features" or not config.cache:
        return images
    return CachedFeatureDataModule(
        model,
        images,
        cache_folder(config),
        config.cache_augmented_views,
        progress=progress,
    )


@rank_zero_only
def _write_at_start(
    out: Path,
    config: FinetuneConfig,
    datamodule: BaseImageDataModule,
    auto_decision: dict[str, Any] | None,
) -> None:
    write_atomic(out / CONFIG, config.to_yaml())  # there from the start, for --resume
    if auto_decision is not None:  # for the summary of a resumed run
        write_atomic(out / AUTO_DECISION, json.dumps(auto_decision, indent=2) + "\n")
    write_split(out, datamodule.split_rows())
    write_skipped(out, datamodule.skipped)
    # The scan has just found every file that is broken now; older load failures are stale.
    (out / LOAD_FAILURES).unlink(missing_ok=True)


@rank_zero_only
def _keep_earlier_metrics(out: Path, earlier: list[dict[str, str]]) -> None:
    """Lightning's CSVLogger starts metrics.csv afresh; put back the epochs before the resume."""
    resumed = read_metrics(out)
    first_resumed_epoch = min((_epoch(row) for row in resumed if row.get("epoch")), default=0)
    kept = [row for row in earlier if row.get("epoch") and _epoch(row) < first_resumed_epoch]
    write_metrics(out, kept + resumed)


def _epoch(row: dict[str, str]) -> int:
    return int(float(row["epoch"]))


@rank_zero_only
def _write_at_end(out: Path, summary: RunSummary, skipped: list[tuple[str, str]]) -> None:
    write_skipped(out, skipped)  # with the files that failed to load during training
    write_summary(out, summary)
    if skipped:
        logger.info(f"Skipped {len(skipped)} unusable files, listed in {out / SKIPPED}")
    test = f", test {summary.test_acc:.4f}" if summary.test_acc is not None else ""
    logger.info(
        f"Best val {summary.best_val_acc:.4f} at epoch {summary.best_epoch}{test}; run folder {out}"
    )
