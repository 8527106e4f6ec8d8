"""`finetune(config)`: data module + TransferClassifier + Lightning Trainer -> a run folder.

The CLI's `tlkit finetune` and the recipes call this; users who want their own Trainer build
`ImageDataModule` and `TransferClassifier` directly (see recipes/custom_imagefolder.py).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, Timer
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

from tlkit import __version__
from tlkit.choices import TTA_CHOICE_MAX_IMAGES
from tlkit.config import FinetuneConfig
from tlkit.console import expected_lightning_warnings_hidden
from tlkit.data.datamodule import BaseImageDataModule
from tlkit.data.datasets import drops_last_batch
from tlkit.errors import ConfigError, OutputExistsError, RunFolderError
from tlkit.infer.predict import choose_tta, tta_choice_metric, unmeasured_presets
from tlkit.metrics import (
    ACCURACY,
    CONFIDENCE,
    TITLES,
    TOP_K_ACCURACY,
    accuracy_interval,
    f1_optimal_thresholds,
    logged_name,
)
from tlkit.model.classifier import THRESHOLDS_KEY, TransferClassifier
from tlkit.model.tasks import Decision, resolve_monitor
from tlkit.runfolder import (
    AUTO_DECISION,
    BEST_CHECKPOINT,
    CONFIG,
    LAST_CHECKPOINT,
    LOAD_FAILURES,
    SKIPPED,
    DataFacts,
    RunSummary,
    read_auto_decision,
    read_checkpoint,
    read_config,
    read_metrics,
    read_split,
    write_atomic,
    write_checkpoint,
    write_data_facts,
    write_metrics,
    write_skipped,
    write_split,
    write_summary,
)
from tlkit.train.auto import process_count, resolve_auto
from tlkit.train.budget import FitScheduleToBudget, planned_epochs, training_time_left_s
from tlkit.train.build import (
    build_datamodule,
    build_model,
    cache_folder,
    check_config,
    data_facts,
)
from tlkit.train.callbacks import (
    DEVICE_READ_EVERY,
    TRAINING_WEIGHTS_KEY,
    BestCheckpoint,
    EpochProgressBar,
    EpochSummary,
    ExponentialMovingAverage,
    StopOnNonFiniteLoss,
)
from tlkit.train.device_settings import choose_device_settings
from tlkit.train.features import CachedFeatureDataModule
from tlkit.train.hardware import (
    effective_batch_size,
    run_identity,
    training_device,
)
from tlkit.train.hardware import trainer_options as distributed_options
from tlkit.train.probe import ProbeResult, fit_probe, probe_features
from tlkit.train.soup import SOUP_FOLDER, TopCheckpoints, make_soup, soup_applies

logger = logging.getLogger(__name__)


def training_batches_per_epoch(train_images: int, config: FinetuneConfig) -> int:
    """Batches of one process's training epoch, as its loader counts them (its share of the
    images, padded to equal shares; an incomplete last batch dropped where a full one exists:
    data/datasets.py) and as `--epoch-batches` limits them."""
    per_process = math.ceil(train_images / process_count(config))
    batches = (
        per_process // config.batch_size if drops_last_batch(per_process, config.batch_size) else 1
    )
    return min(batches, config.epoch_batches) if config.epoch_batches else batches


def build_logger(config: FinetuneConfig, out: Path) -> Logger:
    """RUN_DIR/metrics.csv (csv), or event files in RUN_DIR/tensorboard/ (tensorboard)."""
    if config.logger == "tensorboard":  # check_config made sure the package is there
        return TensorBoardLogger(save_dir=out, name="tensorboard", version="")
    # flushed at every logging step, so a killed run keeps its metrics on disk
    return CSVLogger(save_dir=out, name="", version="", flush_logs_every_n_steps=1)


def finetune(
    config: FinetuneConfig,
    resume: bool = False,
    started: float | None = None,
    **trainer_options: Any,
) -> RunSummary:
    """Train as the config says; write the run summary (summary.json) and return it.

    With `strategy="auto"`, the data is measured first and the choices left open are made from
    the evidence (tlkit/train/auto.py). With `resume`, continue the run in `config.out` from its
    `last.ckpt` (model, optimiser, schedule, epoch and callback states), on the images of its
    recorded split.csv. `trainer_options` are passed to `pytorch_lightning.Trainer` on top of
    tlkit's own (e.g. `enable_progress_bar=False`); `callbacks` given there are added to
    tlkit's own, and `limit_test_batches=0` skips the test-split evaluation. `started`: the
    `time.perf_counter()` from which the run's clock counts (`--budget`, the wall time; default:
    now; the command line passes its own start, so that its imports count).

    The steps, each a function of its own: `open_run_folder` (resume), `decide`, `build`,
    `fit`, `make_soup` (tlkit/train/soup.py), `test`, `choose_test_time_averaging`,
    `summarise`.
    """
    if not config.data_dir:
        raise ConfigError("no data: give DATA_DIR (an image folder or a CSV file)")
    if started is None:
        started = time.perf_counter()  # auto's measurements count as part of the run
    check_config(config)  # before the data is scanned or measured
    progress = trainer_options.get("enable_progress_bar", True)
    folder = open_run_folder(config, resume)
    config, decision = decide(config, folder, progress, started)
    run = build(config, folder, decision, progress)
    clock = budget_clock(decision, started, folder)
    replan = budget_replan(decision, started, folder, run.config)
    trainer, history = fit(run, folder, trainer_options, [clock, replan])
    if replan is not None and replan.record is not None:
        decision["budget"]["replanned"] = replan.record
    if decision is not None and config.strategy == "features":
        decision = keep_the_better_head(run, trainer, history, decision)
    soup = make_soup(trainer, run.model, run.training_data, run.monitored)
    test_metrics = test(trainer, run)
    tta_choice = choose_test_time_averaging(config, trainer, run)
    # the clock ran out before the planned epochs did (at the last epoch's end it changes nothing)
    ran_out = clock is not None and clock.time_remaining("train") <= 0
    stopped = ran_out and len(history) < trainer.max_epochs
    summary = summarise(
        run, folder, decision, history, test_metrics, started, tta_choice, stopped, soup
    )
    _write_at_end(folder.out, summary, run.skipped_files(), run.data)
    return summary


@dataclass(frozen=True)
class RunFolder:
    """The run folder as training finds it: new, or a run to resume from its `last.ckpt`."""

    out: Path
    resume_from: str | None = None  # the checkpoint; None for a new run
    earlier_metrics: list[dict[str, str]] = field(default_factory=list)
    recorded_split: dict[str, str] | None = None
    auto_decision: dict[str, Any] | None = None  # auto.json of a resumed auto run


def open_run_folder(config: FinetuneConfig, resume: bool) -> RunFolder:
    """Step 1, resume: check that the folder allows what is asked (a new run never overwrites
    one), and for `resume` read what the run left: its checkpoint, metrics, split and auto's
    decision."""
    out = Path(config.out)
    resume_from = _check_run_folder(out, resume)
    if resume_from is None:
        return RunFolder(out)
    _check_same_averaging(resume_from, config.ema)
    return RunFolder(out, resume_from, read_metrics(out), read_split(out), read_auto_decision(out))


def decide(
    config: FinetuneConfig, folder: RunFolder, progress: bool, started: float | None = None
) -> tuple[FinetuneConfig, dict[str, Any] | None]:
    """Step 2: the choices `--strategy auto` leaves open, measured and made (or, resumed, as
    the run recorded them), and auto's decision record; a named strategy is kept as it is.
    Of several processes, the first decides and the others follow its record
    (`follow_first_process`): a budget's measured throughput differs from one process to the
    next, and every process must train the same schedule. `started`: the run's start, from
    which a budget counts."""
    if config.strategy != "auto":
        return config, folder.auto_decision
    if folder.auto_decision is not None:  # resumed: the choices its config.yaml records
        return recorded_choices(config, folder.out), folder.auto_decision
    if rank_zero_only.rank != 0:
        return follow_first_process(config, folder.out)
    resolved, decision = resolve_auto(config, progress, started)
    decision["run"] = run_identity()
    check_config(resolved)
    return resolved, decision


def recorded_choices(config: FinetuneConfig, out: Path) -> FinetuneConfig:
    """`config` with the choices auto left open taken from the run's config.yaml."""
    recorded = read_config(out)
    open_choices = ["strategy", *config.choices_left_to_auto()]
    if "epochs" in open_choices:
        open_choices.append("epoch_batches")  # the schedule auto chose with the epochs
    return replace(config, **{name: getattr(recorded, name) for name in open_choices})


# How long another process waits for the first process's decision (it measures the data, and
# with --budget the device, first).
FOLLOW_TIMEOUT_S = 3 * 3600.0


def follow_first_process(config: FinetuneConfig, out: Path) -> tuple[FinetuneConfig, dict]:
    """The decision the first process of this run wrote (auto.json, marked with the run's
    identity, and config.yaml), waited for."""
    deadline = time.monotonic() + FOLLOW_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            decision = read_auto_decision(out)
        except RunFolderError:  # being written
            decision = None
        if decision is not None and decision.get("run") == run_identity():
            return recorded_choices(config, out), decision
        time.sleep(1.0)
    raise RunFolderError(
        f"{out}: the first process wrote no --strategy auto decision in "
        f"{FOLLOW_TIMEOUT_S / 3600:.0f} h; did it fail? (see its log)"
    )


@dataclass
class BuiltRun:
    """What `build` makes: the config as the data resolved it (its monitored metric), what
    the data says, the images, the model, and the data it trains on (the images, or their
    cached features)."""

    config: FinetuneConfig
    data: DataFacts
    monitor: Decision  # the validation metric that picks best.ckpt, and why
    images: BaseImageDataModule
    model: TransferClassifier
    training_data: pl.LightningDataModule
    linear_probe: dict[str, Any] | None  # --lp-ft: the probe the head started from

    @property
    def monitored(self) -> str:
        """The logged name of the monitored validation metric ("val_acc", ...)."""
        return logged_name("val", self.monitor.value)

    def best_record(self, history: list[dict[str, float]]) -> dict[str, float]:
        """The epoch record of best.ckpt: the best of the monitored metric, the latest of tied
        ones as `callbacks.BestCheckpoint` keeps (empty if none)."""

        def monitored(record: dict[str, float]) -> float:
            value = record.get(self.monitored, math.nan)
            return -math.inf if math.isnan(value) else value

        return max(reversed(history), key=monitored) if history else {}

    def skipped_files(self) -> list[tuple[str, str]]:
        """Files the scan skipped, then those that failed to load during training."""
        scanned = {path for path, _ in self.images.skipped}
        failed = [row for row in self.images.load_failures() if row[0] not in scanned]
        return self.images.skipped + failed


def build(
    config: FinetuneConfig, folder: RunFolder, decision: dict[str, Any] | None, progress: bool
) -> BuiltRun:
    """Step 3: scan and split the data (a resumed run: its recorded split), choose the
    monitored metric from what it says, write the run folder's first files, build the model
    (LP-FT: from a linear probe's head) and the data it trains on."""
    pl.seed_everything(config.seed, workers=True, verbose=False)
    images = build_datamodule(config, folder.recorded_split, folder.out / LOAD_FAILURES)
    images.setup("fit")
    if folder.resume_from:
        _check_same_classes(folder.resume_from, images.classes)
    data = data_facts(config, images)
    config, _ = choose_device_settings(config, data)  # where auto has not chosen them
    monitor = resolve_monitor(data.label_kind, config.monitor, data.class_ratio)
    chosen_by_auto = ((decision or {}).get("choices") or {}).get("monitor")
    if chosen_by_auto:  # --strategy auto chose it: its reason, not "given"
        monitor = Decision(monitor.value, chosen_by_auto["reason"])
    config = replace(config, monitor=monitor.value)  # config.yaml records the choice
    _write_at_start(folder.out, config, images, decision, data)
    model = build_model(config, data)
    linear_probe = None
    if config.lp_ft and not folder.resume_from:  # resumed: the head comes from the checkpoint
        linear_probe = start_from_linear_probe(config, model, images, progress)
    training_data = _training_data(config, model, images, progress)
    return BuiltRun(config, data, monitor, images, model, training_data, linear_probe)


def budget_clock(
    decision: dict[str, Any] | None, started: float, folder: RunFolder
) -> Timer | None:
    """With --budget, Lightning's Timer that stops training where the run would overrun its
    budget (`budget.training_time_left_s`), should the plan's prediction fall short: at an
    epoch's end, so that every epoch run is validated and best.ckpt exists (at most one epoch
    past the mark); None without a budget, and on --resume (the budget was the first run's)."""
    planned = (decision or {}).get("budget")
    if planned is None or folder.resume_from is not None:
        return None
    # Lightning's Timer also checks at fit start: a second's grace lets one epoch run where
    # no time is left (as the plan then trains one pass, auto.fit_to_budget)
    seconds = max(1.0, training_time_left_s(planned, started))
    return Timer(duration=timedelta(seconds=seconds), interval="epoch")


def budget_replan(
    decision: dict[str, Any] | None, started: float, folder: RunFolder, config: FinetuneConfig
) -> FitScheduleToBudget | None:
    """With --budget, where auto chose the epochs: the callback that re-plans them from a
    timed epoch (`budget.FitScheduleToBudget`), recording the new count in config.yaml (what
    --resume reads); None otherwise, and on --resume."""
    planned = (decision or {}).get("budget")
    if planned is None or "most_epochs" not in planned or folder.resume_from is not None:
        return None

    def record(epochs: int) -> None:
        if rank_zero_only.rank == 0:
            write_atomic(folder.out / CONFIG, replace(config, epochs=epochs).to_yaml())

    return FitScheduleToBudget(planned, started, on_replan=record)


def fit(
    run: BuiltRun,
    folder: RunFolder,
    trainer_options: dict[str, Any],
    budget_callbacks: list[pl.Callback | None] | None = None,
) -> tuple[pl.Trainer, list[dict[str, float]]]:
    """Step 4: Lightning's Trainer with tlkit's callbacks (and the budget's clock and re-plan,
    where given) fits the model (from the checkpoint, when resumed); returns the Trainer and
    the per-epoch history."""
    config = run.config
    trainer_options = dict(trainer_options)
    train_metric = next((name for name in run.model.metrics if name.startswith("train_")), None)
    summary_callback = EpochSummary(run.monitored, train_metric)
    read_every = DEVICE_READ_EVERY[training_device(config)]  # reads of the loss wait for it
    callbacks = [
        BestCheckpoint(
            dirpath=folder.out,
            filename="best",
            monitor=run.monitored,
            mode="max",
            auto_insert_metric_name=False,
            enable_version_counter=False,
        ),
        # last.ckpt, for --resume: the state at every epoch's end. (Lightning 2.6's save_last
        # writes it only in epochs whose metric improved, so a resume would repeat the others.)
        ModelCheckpoint(
            dirpath=folder.out, filename=Path(LAST_CHECKPOINT).stem, enable_version_counter=False
        ),
        EarlyStopping(monitor=run.monitored, mode="max", patience=config.patience),
        LearningRateMonitor(logging_interval="epoch"),
        StopOnNonFiniteLoss(check_every=read_every),
        summary_callback,
    ]
    if config.ema:
        callbacks.append(ExponentialMovingAverage(config.ema_decay))
    if soup_applies(config) is None:
        callbacks.append(TopCheckpoints(folder.out / SOUP_FOLDER, run.monitored, config.soup))
    if trainer_options.get("enable_progress_bar", True):
        callbacks.append(EpochProgressBar(refresh_rate=read_every))
    callbacks += [callback for callback in budget_callbacks or [] if callback is not None]
    callbacks += trainer_options.pop("callbacks", [])
    steps_per_epoch = training_batches_per_epoch(len(run.images.train_set), config)
    options = {
        "max_epochs": config.epochs,
        "limit_train_batches": config.epoch_batches or 1.0,
        **distributed_options(config),
        "callbacks": callbacks,
        "logger": build_logger(config, folder.out),
        "log_every_n_steps": max(1, min(50, steps_per_epoch)),
        "enable_model_summary": False,
        **trainer_options,
    }
    with expected_lightning_warnings_hidden():
        trainer = pl.Trainer(**options)
        _report_settings(trainer, run)
        pl.seed_everything(config.seed, workers=True, verbose=False)  # same state, cached or not
        trainer.fit(
            run.model,
            datamodule=run.training_data,
            ckpt_path=folder.resume_from,
            weights_only=True,
        )
    if folder.resume_from:
        _keep_earlier_metrics(folder.out, folder.earlier_metrics)
    return trainer, list(summary_callback.history)


def keep_the_better_head(
    run: BuiltRun,
    trainer: pl.Trainer,
    history: list[dict[str, float]],
    decision: dict[str, Any],
) -> dict[str, Any]:
    """Step 4b, for auto's `features` runs: the linear probe, fitted by L-BFGS (its penalty
    chosen on validation) on the run's cached features of every training image, competes on
    the validation split with best.ckpt's head on the run's monitored metric; the better one
    is kept in best.ckpt (ties: the trained one; multi-label: with thresholds chosen on the
    probe's validation probabilities), and the decision records both scores."""
    config = run.config
    if config.head_hidden or not config.cache or not history:
        return decision
    features = run.training_data
    train_x, train_y = features.labelled_features("train")
    val_x, val_y = features.labelled_features("val")
    probe = fit_probe(
        train_x[0],
        train_y,
        val_x[0],
        val_y,
        num_classes=len(run.images.classes),
        seed=config.seed,
        device=training_device(config),
        task=run.data.label_kind,
    )
    task, metric = run.model.task, run.monitor.value
    probabilities = task.activation(val_x[0].float().cpu() @ probe.weight.T + probe.bias)
    val_y = val_y.cpu()
    # multi-label: thresholds chosen on the probe's own validation probabilities
    thresholds = f1_optimal_thresholds(probabilities, val_y) if task.thresholded else None
    evaluation = task.evaluate(probabilities, val_y, run.images.classes, thresholds)
    probe_score = evaluation.scores()[metric]
    trained = run.best_record(history).get(run.monitored, -math.inf)
    kept = "probe" if probe_score > trained else "trained"
    if kept == "probe":
        best = trainer.checkpoint_callback.best_model_path
        if trainer.is_global_zero:
            _write_head(best, run.model, probe, thresholds)
        trainer.strategy.barrier()  # every process tests the checkpoint as written
    head = {
        "metric": metric,  # the monitored metric, which both scores are
        "probe_val_acc": round(probe_score, 4),  # named as when only accuracy was compared
        "trained_val_acc": trained,
        # every validation score of the probe's head, which best.ckpt holds if it is kept
        "probe_val_metrics": {
            logged_name("val", name): value for name, value in evaluation.scores().items()
        },
    }
    if trainer.is_global_zero:
        logger.info(
            f"Auto head: linear probe {probe_score:.4f} against the trained head "
            f"{trained:.4f} on validation {TITLES[metric]}: the {kept} one is kept"
        )
    return {**decision, "head": {**head, "kept": kept}}


def _write_head(
    checkpoint_path: str,
    model: TransferClassifier,
    probe: ProbeResult,
    thresholds: list[float] | None,
) -> None:
    """Put the probe's weights in place of the classifier's in a checkpoint (multi-label: and
    its decision thresholds), atomically."""
    checkpoint = read_checkpoint(checkpoint_path)
    prefix = next(name for name, module in model.named_modules() if module is model.head.classifier)
    checkpoint["state_dict"][f"{prefix}.weight"] = probe.weight
    checkpoint["state_dict"][f"{prefix}.bias"] = probe.bias
    if thresholds is not None:
        checkpoint[THRESHOLDS_KEY] = [float(value) for value in thresholds]
    write_checkpoint(checkpoint_path, checkpoint)


def test(trainer: pl.Trainer, run: BuiltRun) -> dict[str, float]:
    """Step 5: the best-on-validation checkpoint on the test split, if there is one (and
    `limit_test_batches` is not 0); its metrics by name."""
    if run.images.test_set is None or trainer.limit_test_batches == 0:
        return {}
    # The best-on-validation checkpoint, named (the first ModelCheckpoint tracks it): "best"
    # would make Lightning warn that two checkpoint callbacks exist.
    best = trainer.checkpoint_callback.best_model_path
    with expected_lightning_warnings_hidden():
        results = trainer.test(
            run.model, datamodule=run.training_data, ckpt_path=best, verbose=False
        )
    return {key: float(value) for key, value in results[0].items()}


def choose_test_time_averaging(
    config: FinetuneConfig, trainer: pl.Trainer, run: BuiltRun
) -> dict[str, Any] | None:
    """Step 6: `--tta auto`'s preset: the best-on-validation checkpoint evaluated on the
    validation split with each test-time averaging preset that suits it, the choice by
    `tlkit.infer.tta.choose_preset`'s rule (`tlkit.infer.predict.choose_tta`), on the first
    process only. None with --no-choose-tta, without a best checkpoint, and on other ranks."""
    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None else ""
    if not (config.choose_tta and trainer.is_global_zero and best and run.images.val_set):
        return None
    model = TransferClassifier.load_checkpoint(best)
    validation = run.images.val_set
    logger.info(
        f"Choosing test-time averaging for --tta auto on the validation split "
        f"(at most {TTA_CHOICE_MAX_IMAGES:,} images; --no-choose-tta skips it)"
    )
    with expected_lightning_warnings_hidden():
        choice = choose_tta(  # its bars would go to stderr, beside a run's clean output
            model,
            validation.samples,
            config.batch_size,
            config.accelerator,
            source=validation,
            num_workers=run.images.num_workers,
            seed=config.seed,
            progress=False,
        )
    measured = ", ".join(
        f"{record['preset']} {record['top1']:.4f} ({record['views_per_image']} views)"
        for record in choice["candidates"]
    )
    passes = " and ".join(
        f"{record['preset']}'s {record['views_per_image']} ({record['images_per_second']:.0f} "
        "images/s)"
        for record in choice["passes"]
    )
    logger.info(
        f"Test-time averaging on {choice['images']} validation images "
        f"({tta_choice_metric(choice)}): {measured}, from the "
        f"views of {'; '.join([passes, *unmeasured_presets(choice)])}; --tta auto uses "
        f"{choice['preset']} ({choice['seconds']:.0f} s)"
    )
    return choice


def summarise(
    run: BuiltRun,
    folder: RunFolder,
    decision: dict[str, Any] | None,
    history: list[dict[str, float]],
    test_metrics: dict[str, float],
    started: float,
    tta_choice: dict[str, Any] | None = None,
    stopped_by_budget: bool = False,
    soup: dict[str, Any] | None = None,
) -> RunSummary:
    """Step 7: the run summary (summary.json) from what the other steps made."""
    config, images, model = run.config, run.images, run.model
    best = run.best_record(history)
    head = (decision or {}).get("head")
    if head and head["kept"] == "probe":  # best.ckpt holds the probe's head: its scores
        best = {**best, **head["probe_val_metrics"]}
    if soup and soup["val_metrics"]:  # best.ckpt holds the soup: its scores
        best = {**best, **soup["val_metrics"]}
    best_checkpoint = folder.out / BEST_CHECKPOINT
    thresholds = (
        read_checkpoint(best_checkpoint, mmap=True).get(THRESHOLDS_KEY)
        if best_checkpoint.is_file()
        else None
    )
    test_images = len(images.test_set) if images.test_set is not None else 0
    test_acc = test_metrics.get(logged_name("test", ACCURACY))
    interval = accuracy_interval(test_acc, test_images) if test_acc is not None else None
    ignored_files, unread_images = images.other_files.counts()
    return RunSummary(
        tlkit_version=__version__,
        backbone=config.backbone,
        weights=config.pretrained,
        strategy=config.strategy,
        unfreeze_stages=config.unfreeze_stages if config.strategy == "partial" else None,
        trainable_parameters=model.trainable_parameters(),
        total_parameters=sum(p.numel() for p in model.parameters()),
        classes=images.classes,
        preprocessing=images.preprocessing,
        train_images=len(images.train_set),
        val_images=len(images.val_set),
        test_images=test_images,
        epochs_run=len(history),
        best_epoch=best.get("epoch"),
        best_val_acc=best.get(logged_name("val", ACCURACY)),
        test_acc=test_acc,
        test_acc_interval=[round(bound, 4) for bound in interval] if interval else None,
        test_acc_top5=test_metrics.get(logged_name("test", TOP_K_ACCURACY)),
        history=history,
        resumed=folder.resume_from is not None,
        feature_cache=getattr(run.training_data, "report", None),
        auto_decision=decision,
        linear_probe=run.linear_probe,
        tta_choice=tta_choice,
        stopped_by_budget=stopped_by_budget,
        soup=soup,
        skipped_files=len(run.skipped_files()),
        ignored_files=ignored_files,
        unread_images=unread_images,
        wall_time_s=round(time.perf_counter() - started, 2),
        task=run.data.label_kind,
        monitor=run.monitored,
        best_val_metrics={key: value for key, value in best.items() if key.startswith("val_")},
        test_metrics={key: value for key, value in test_metrics.items() if key.startswith("test_")},
        decision_thresholds=(
            dict(zip(images.classes, thresholds, strict=True)) if thresholds else None
        ),
    )


def _report_settings(trainer: pl.Trainer, run: BuiltRun) -> None:
    """Log the resolved settings once: model, data, batch size and learning rate, the
    monitored metric; with --scale-lr, first scale the learning rate to the effective batch
    size."""
    config, model, datamodule = run.config, run.model, run.images
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
    balancing = [
        f"--class-weights {config.class_weights}" if config.class_weights != "none" else "",
        f"--sampling {config.sampling}" if config.sampling != "shuffle" else "",
    ]
    balanced = ", ".join(filter(None, balancing))
    logger.info(
        f"{run.data.label_kind.capitalize()} task; best.ckpt and early stopping follow "
        f"{run.monitored} ({run.monitor.reason})" + (f"; {balanced}" if balanced else "")
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
        cache_folder(config),
        progress,
        device=training_device(config),
    )
    extraction_s = time.perf_counter() - started
    probe = fit_probe(
        *features, num_classes=len(images.classes), seed=config.seed, task=images.label_kind
    )
    probe.copy_into(model)
    if rank_zero_only.rank == 0:
        logger.info(
            f"LP-FT: linear probe on cached features: validation {TITLES[probe.metric]} "
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
    data: DataFacts,
) -> None:
    write_atomic(out / CONFIG, config.to_yaml())  # there from the start, for --resume
    write_data_facts(out, data)
    if auto_decision is not None:  # for the summary of a resumed run
        write_atomic(out / AUTO_DECISION, json.dumps(auto_decision, indent=2) + "\n")
    write_split(out, datamodule.split_rows())
    write_skipped(out, datamodule.skipped)
    # The scan has just found every file that is broken now; older load failures are stale.
    (out / LOAD_FAILURES).unlink(missing_ok=True)
    datamodule.other_files.log(logger)


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
def _write_at_end(
    out: Path, summary: RunSummary, skipped: list[tuple[str, str]], data: DataFacts
) -> None:
    write_skipped(out, skipped)  # with the files that failed to load during training
    if summary.auto_decision is not None:  # with what training added (the head kept)
        write_atomic(out / AUTO_DECISION, json.dumps(summary.auto_decision, indent=2) + "\n")
    write_summary(out, summary)
    if skipped:
        logger.info(f"Skipped {len(skipped)} unusable image files, listed in {out / SKIPPED}")
    for split in ("val", "test"):
        absent = data.classes_without_images(split) if split in data.split_images else []
        if absent:
            logger.info(
                f"The {split} split has no images of {len(absent)} classes, left out of its "
                f"averages: {', '.join(absent)}"
            )
    planned = (summary.auto_decision or {}).get("budget")
    if planned is not None:
        stopped = (
            f"; training stopped by the budget's clock after {summary.epochs_run} of "
            f"{planned_epochs(planned)} planned epochs"
            if summary.stopped_by_budget
            else ""
        )
        logger.info(
            f"Budget {planned['seconds']:.0f} s: predicted {planned['predicted_s']:.0f} s, "
            f"took {summary.wall_time_s:.0f} s{stopped}"
        )
    logger.info(final_line(summary, out))


def final_line(summary: RunSummary, out: Path) -> str:
    """The run's last word: the best validation score of the monitored metric; the test
    accuracy with its image count and 95% interval (and the monitored metric's test score), or
    a multi-label run's monitored test score; or, with no test split, what the validation score
    is (it also chose the model) and how to get an honest estimate."""
    metric = summary.monitor.removeprefix("val_")
    named = "" if metric == ACCURACY else f"{TITLES.get(metric, metric)} "
    souped = (summary.soup or {}).get("epochs", [])
    held = (
        f"in the soup of epochs {', '.join(map(str, souped))}"
        if len(souped) > 1
        else f"at epoch {summary.best_epoch}"
    )
    best = f"Best val {named}{_accuracy(summary.best_monitored)} {held}"
    test_value = summary.test_metrics.get(logged_name("test", metric))
    if summary.test_acc is not None:
        low, high = summary.test_acc_interval
        monitored = f"; test {named}{test_value:.4f}" if named and test_value is not None else ""
        return (
            f"{best}; test {summary.test_acc:.4f} on {summary.test_images} held-out images "
            f"({CONFIDENCE:.0%} interval {low:.3f}-{high:.3f}){monitored}; run folder {out}"
        )
    if test_value is not None:  # multi-label: no accuracy
        return (
            f"{best}; test {named}{test_value:.4f} on {summary.test_images} held-out images; "
            f"run folder {out}"
        )
    if summary.test_images:  # held out, not evaluated (limit_test_batches=0: search trials)
        return f"{best}; the {summary.test_images} test images not evaluated; run folder {out}"
    return (
        f"{best}; no test split, so this validation score is the only estimate, and it flatters "
        "the model: the same images chose the checkpoint and when to stop (and, with --strategy "
        "auto, the settings). For an honest estimate keep a test split (--test-fraction, "
        f"default {FinetuneConfig.field_default('test_fraction')}, or a DATA/test/ folder); "
        f"run folder {out}"
    )


def _accuracy(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "?"
