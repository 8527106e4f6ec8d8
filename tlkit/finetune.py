"""`finetune(config)`: data module + TransferClassifier + Lightning Trainer -> a run folder.

The CLI's `tlkit finetune` and the recipes call this; users who want their own Trainer build
`ImageDataModule` and `TransferClassifier` directly (see recipes/custom_imagefolder.py).
`build_model` and `build_datamodule` pass the config's fields on by parameter name
(`config.config_kwargs`), so neither copies a field by hand.
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
import torch
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

from tlkit import __version__
from tlkit.augment import train_transform
from tlkit.auto import resolve_auto
from tlkit.backbones import create_backbone, preprocessing
from tlkit.callbacks import (
    TRAINING_WEIGHTS_KEY,
    EpochProgressBar,
    EpochSummary,
    ExponentialMovingAverage,
    StopOnNonFiniteLoss,
)
from tlkit.config import FinetuneConfig, config_kwargs
from tlkit.console import expected_lightning_warnings_hidden
from tlkit.data import ImageDataModule, drops_last_batch
from tlkit.distributed import effective_batch_size
from tlkit.distributed import trainer_options as distributed_options
from tlkit.errors import ConfigError, OutputExistsError
from tlkit.features import CachedFeatureDataModule
from tlkit.module import TransferClassifier
from tlkit.probe import fit_probe, probe_features
from tlkit.runfolder import (
    AUTO_DECISION,
    BEST_CHECKPOINT,
    CONFIG,
    LAST_CHECKPOINT,
    LOAD_FAILURES,
    SKIPPED,
    RunFolderError,
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
from tlkit.shards import ShardDataModule, open_converted
from tlkit.strategies import trainable_parameter_names

logger = logging.getLogger(__name__)


def build_model(config: FinetuneConfig, class_names: list[str]) -> TransferClassifier:
    """The LightningModule a config describes."""
    return TransferClassifier(
        num_classes=len(class_names),
        class_names=class_names,
        trained_with_hflip=trains_with_hflip(config),
        **config_kwargs(config, TransferClassifier),
    )


def augmentation_options(config: FinetuneConfig) -> dict[str, Any]:
    """`augment.train_transform`'s keyword arguments (its scale range is two config fields)."""
    return {
        "short_side_range": (config.short_side_min, config.short_side_max),
        "hflip": config.hflip,
        "color_jitter": config.color_jitter,
    }


def trains_with_hflip(config: FinetuneConfig) -> bool:
    """Whether the model sees mirror images in training: the train augmentation flips, and the
    `features` strategy's head trains on augmented views (cache_augmented_views) only."""
    flips = config.augment and config.hflip > 0
    return flips and (config.strategy != "features" or config.cache_augmented_views > 0)


def provisional_strategy(config: FinetuneConfig) -> str:
    """For checks before `--strategy auto` has measured: partial where --unfreeze-stages is
    given (auto then trains those stages), else full, which every layer group takes part in."""
    return "partial" if config.unfreeze_stages is not None else "full"


def check_config(config: FinetuneConfig) -> None:
    """Configuration errors that need the backbone but no data, raised before the data scan
    (which can take minutes): the model at this size, the stage count, the scale range. With
    `--strategy auto`, of its provisional strategy and the open choices' fixed values."""
    if config.strategy == "auto":
        config = replace(config, strategy=provisional_strategy(config))
    try:
        with torch.device("meta"):  # the architecture only: no memory, no weights
            backbone = create_backbone(
                config.backbone, "none", config.drop_path_rate, config.img_size
            )
    except TypeError as error:  # timm hands options a model does not take to its class
        raise ConfigError(f"{config.backbone} cannot be built as configured: {error}") from error
    trainable_parameter_names(backbone, config.strategy, config.unfreeze_stages)
    if config.lp_ft and config.strategy == "features":
        raise ConfigError(
            "--lp-ft starts partial or full fine-tuning from a linear probe; the features "
            "strategy trains that linear head itself"
        )
    if config.lp_ft and config.head_hidden > 0:
        raise ConfigError(
            "--lp-ft initialises the classifier from a linear probe of the pooled features, "
            "which a head with a hidden layer (--head-hidden) does not see: use one or the other"
        )
    if config.augment:
        train_transform(
            preprocessing(config.backbone, config.img_size), **augmentation_options(config)
        )


def build_datamodule(
    config: FinetuneConfig,
    recorded_split: dict[str, str] | None = None,
    load_failure_log: Path | None = None,
) -> ImageDataModule | ShardDataModule:
    """The data module a config describes, with the backbone's own preprocessing (and the
    `ImageDataModule` options `recorded_split` and `load_failure_log`): a `ShardDataModule`
    for a dataset converted by `tlkit convert` (found by its marker file), else an
    `ImageDataModule` for an image folder or CSV. The one place that tells them apart."""
    if open_converted(config.data_dir) is not None:
        kind, options = ShardDataModule, {"chunk_cache_dir": cache_folder(config) / "shards"}
    else:
        kind, options = ImageDataModule, {}
    return kind(
        preprocessing=preprocessing(config.backbone, config.img_size),
        augmentation=augmentation_options(config),
        recorded_split=recorded_split,
        load_failure_log=load_failure_log,
        **options,
        **config_kwargs(config, kind),
    )


def cache_folder(config: FinetuneConfig) -> Path:
    """--cache-dir, else OUT/cache: cached features (features strategy) and, in shards/, the
    chunks LitData downloads from an object store."""
    return Path(config.cache_dir or Path(config.out) / "cache")


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
    the evidence (tlkit/auto.py). With `resume`, continue the run in `config.out` from its
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
    datamodule: ImageDataModule,
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


def probe_device(config: FinetuneConfig) -> str:
    """Where the probe's features are extracted, before any Trainer exists: the GPU if the
    run may use one."""
    gpu = config.accelerator in ("auto", "gpu") and torch.cuda.is_available()
    return "cuda" if gpu else "cpu"


def start_from_linear_probe(
    config: FinetuneConfig, model: TransferClassifier, images: ImageDataModule, progress: bool
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
    config: FinetuneConfig, model: TransferClassifier, images: ImageDataModule, progress: bool
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
    datamodule: ImageDataModule,
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
