"""Random hyperparameter search with Optuna, coarse then fine.

Random search, not a grid: when only a few hyperparameters matter, a grid spends most of its
trials repeating the same few values of those, while random trials each try a new value of
every one (Bergstra & Bengio 2012). Learning rate and weight decay are drawn log-uniformly.

- Each trial is an ordinary `tlkit.train.finetune` run (short: `--epochs`), in its own folder under
  `OUT/trials/`; its monitored validation metric (the one that picks its best checkpoint:
  accuracy, balanced accuracy, mAP, ...) is reported to Optuna after every epoch and Optuna's
  `MedianPruner` stops trials that fall below the median of earlier trials at the same epoch.
  Trials of the `features` strategy share one feature cache, `OUT/cache/`.
- A trial that its values make fail (training diverged: a learning rate too high) is recorded
  as failed, with the reason, and the search goes on; other errors stop the search.
- The studies live in SQLite (`OUT/study.db`): run the same command again after an interruption
  and the search continues; finished trials are kept, never repeated.
- `refine=True` runs a second round ("fine") in ranges narrowed around the best trials of the
  first ("coarse").
- Results: `trials.csv` (the score's column named by the monitored metric, e.g. `val_acc`),
  `best.yaml` (a config that `tlkit finetune --config best.yaml` runs) and `search.png` (the
  score against learning rate and weight decay).

Samplers are the table `SAMPLERS` (name -> Optuna sampler class; random by default, TPE on
request). Seeding: the sampler of the k-th trial of a round is seeded from (seed, round, k), so
the same seed gives the same trials, and a search interrupted and resumed gives the same trials
as one that ran straight through. One search process per output folder.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytorch_lightning as pl
import yaml
from matplotlib.figure import Figure
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
    json_to_distribution,
)
from optuna.trial import FrozenTrial, TrialState

from tlkit.config import FinetuneConfig, coerce_value, read_yaml_mapping, value_type
from tlkit.errors import ConfigError, SearchError, TrainingDivergedError
from tlkit.metrics import ACCURACY, TITLES, logged_name
from tlkit.model.strategies import STRATEGIES
from tlkit.runfolder import write_atomic
from tlkit.train.finetune import finetune

logger = logging.getLogger(__name__)

SearchSpace = dict[str, BaseDistribution]

DEFAULT_SPACE: dict[str, Any] = {
    "lr": {"low": 1e-5, "high": 1e-1, "log": True},
    "weight_decay": {"low": 1e-6, "high": 1e-1, "log": True},
    "dropout": {"low": 0.0, "high": 0.7},
    "label_smoothing": {"low": 0.0, "high": 0.2},
    "strategy": {"choices": list(STRATEGIES)},
    "unfreeze_stages": {"low": 1, "high": 4},
    "backbone_lr_scale": {"low": 0.01, "high": 1.0, "log": True},
}
# Parameters that only mean something for some strategies are drawn only for those.
ONLY_FOR_STRATEGIES = {
    "unfreeze_stages": ("partial",),
    "backbone_lr_scale": ("partial", "full"),
}
NOT_SEARCHABLE = ("data_dir", "out", "seed", "accelerator", "devices", "num_workers")
ROUNDS = ("coarse", "fine")
REFINE_TOP_FRACTION = 0.25  # the fine round narrows around the best quarter of coarse trials
REFINE_MARGIN = 0.1  # ... widened by this share of the coarse range on each side
PRUNE_AFTER_EPOCHS = 1  # no pruning on the first epoch: the learning rate is still warming up
# Errors that a trial's values cause: the trial fails, the search goes on.
TRIAL_FAILURES = (TrainingDivergedError,)

STUDY_FILE = "study.db"
FEATURE_CACHE = "cache"
TRIALS_CSV = "trials.csv"
BEST_CONFIG = "best.yaml"
PLOT = "search.png"
FINE_SPACE = "fine_space.yaml"


# ---------------------------------------------------------------------------------------------
# The search space: Optuna distributions over FinetuneConfig fields


def parse_space(
    entries: dict[str, Any], base: FinetuneConfig
) -> tuple[SearchSpace, FinetuneConfig]:
    """Distributions from YAML-style entries, and the base config with the fixed values set.

    An entry is `{low, high[, log]}` (int or float by the config field's type), `{choices:
    [...]}`, a plain value (fixed for every trial) or null (not searched: the base config's
    value). Keys are FinetuneConfig fields; every value is checked against the config's rules.
    """
    hints = {name: value_type(kind) for name, kind in typing.get_type_hints(FinetuneConfig).items()}
    space: SearchSpace = {}
    fixed: dict[str, Any] = {}
    for name, entry in entries.items():
        if name not in hints or name in NOT_SEARCHABLE:
            allowed = sorted(set(hints) - set(NOT_SEARCHABLE))
            raise ConfigError(f"search space: '{name}' is not searchable; use one of {allowed}")
        if entry is None:
            continue
        if not isinstance(entry, (dict, list)):
            fixed[name] = coerce_value(name, entry, hints[name])
            continue
        if isinstance(entry, dict) and set(entry) == {"choices"}:
            space[name] = CategoricalDistribution(list(entry["choices"]))
            candidates = list(entry["choices"])
        elif isinstance(entry, dict) and {"low", "high"} <= set(entry) <= {"low", "high", "log"}:
            if hints[name] not in (int, float):
                raise ConfigError(f"search space: '{name}' is not numeric; give {{choices: [...]}}")
            low, high = (coerce_value(name, entry[key], hints[name]) for key in ("low", "high"))
            distribution = IntDistribution if hints[name] is int else FloatDistribution
            try:
                space[name] = distribution(low, high, log=bool(entry.get("log")))
            except ValueError as error:
                raise ConfigError(f"search space: '{name}': {error}") from error
            candidates = [low, high]
        else:
            raise ConfigError(
                f"search space: '{name}' needs {{low, high[, log]}}, {{choices: [...]}}, "
                f"a fixed value or null, got {entry!r}"
            )
        for value in candidates:
            _check_value(base, name, value)
    for name, value in fixed.items():
        _check_value(base, name, value)
    return space, dataclasses.replace(base, **fixed)


def _check_value(base: FinetuneConfig, name: str, value: Any) -> None:
    try:
        FinetuneConfig.from_dict({**dataclasses.asdict(base), name: value})
    except (ValueError, TypeError) as error:
        message = f"search space: {name}={value!r} is not a valid value: {error}"
        raise ConfigError(message) from error


def load_space(path: str | Path | None, base: FinetuneConfig) -> tuple[SearchSpace, FinetuneConfig]:
    """The default space, updated by the YAML file's entries (see `parse_space`)."""
    entries = dict(DEFAULT_SPACE)
    if path is not None:
        entries.update(read_yaml_mapping(path, "config keys to ranges"))
    return parse_space(entries, base)


def space_to_entries(space: SearchSpace) -> dict[str, Any]:
    """The YAML form of a space (what `--space` reads)."""
    entries: dict[str, Any] = {}
    for name, distribution in space.items():
        if isinstance(distribution, CategoricalDistribution):
            entries[name] = {"choices": list(distribution.choices)}
        else:
            entries[name] = {"low": distribution.low, "high": distribution.high}
            if distribution.log:
                entries[name]["log"] = True
    return entries


def narrow_space(space: SearchSpace, trials: list[FrozenTrial]) -> SearchSpace:
    """The space around the best completed trials: for numbers, the range their values span,
    widened by REFINE_MARGIN of the old range on each side (in log space for log ranges) and
    kept inside it; for choices, those the best trials made."""
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    if not complete:
        raise SearchError("no completed trial to refine around")
    complete.sort(key=lambda trial: trial.value, reverse=True)
    best = complete[: max(2, math.ceil(REFINE_TOP_FRACTION * len(complete)))]
    narrowed: SearchSpace = {}
    for name, distribution in space.items():
        values = [trial.params[name] for trial in best if name in trial.params]
        if not values:
            narrowed[name] = distribution
        elif isinstance(distribution, CategoricalDistribution):
            narrowed[name] = CategoricalDistribution(
                [choice for choice in distribution.choices if choice in values]
            )
        else:
            narrowed[name] = _narrow_range(distribution, min(values), max(values))
    return narrowed


def _narrow_range(distribution, low: float, high: float):
    scale = (np.log, np.exp) if distribution.log else (float, float)
    to_scale, from_scale = scale
    margin = REFINE_MARGIN * (to_scale(distribution.high) - to_scale(distribution.low))
    new_low = max(distribution.low, float(from_scale(to_scale(low) - margin)))
    new_high = min(distribution.high, float(from_scale(to_scale(high) + margin)))
    if isinstance(distribution, IntDistribution):
        return IntDistribution(math.floor(new_low), math.ceil(new_high), log=distribution.log)
    return FloatDistribution(new_low, new_high, log=distribution.log)


def suggest(trial: optuna.Trial, space: SearchSpace, base: FinetuneConfig) -> dict[str, Any]:
    """Draw a trial's values; strategy first, then what that strategy uses."""
    values: dict[str, Any] = {}
    if "strategy" in space:
        values["strategy"] = _suggest(trial, "strategy", space["strategy"])
    strategy = values.get("strategy", base.strategy)
    for name, distribution in space.items():
        if name not in values and strategy in ONLY_FOR_STRATEGIES.get(name, (strategy,)):
            values[name] = _suggest(trial, name, distribution)
    return values


def _suggest(trial: optuna.Trial, name: str, distribution: BaseDistribution) -> Any:
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, log=distribution.log)
    return trial.suggest_float(name, distribution.low, distribution.high, log=distribution.log)


# ---------------------------------------------------------------------------------------------
# Trials


class ReportValidationScore(pl.Callback):
    """Reports the run's monitored validation metric (the one its best checkpoint follows:
    `trainer.checkpoint_callback.monitor`) to the Optuna trial after every epoch and stops
    training when the pruner says so (the trial is then marked pruned).

    Hand-written because optuna-integration's PyTorchLightningPruningCallback is built on the
    `lightning` package, whose Callback class the `pytorch_lightning.Trainer` tlkit uses does
    not accept.
    """

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.pruned_after_epoch: int | None = None

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(trainer.checkpoint_callback.monitor)
        if trainer.sanity_checking or value is None:
            return
        self.trial.report(float(value), step=trainer.current_epoch)
        if self.trial.should_prune():
            self.pruned_after_epoch = trainer.current_epoch + 1
            trainer.should_stop = True


# Each sampler: Optuna's sampler class, built with the trial's seed. The CLI's --sampler choices
# are the keys.
SAMPLERS: dict[str, Callable[..., optuna.samplers.BaseSampler]] = {
    "random": optuna.samplers.RandomSampler,
    "tpe": optuna.samplers.TPESampler,
}


def make_sampler(kind: str, seed: int) -> optuna.samplers.BaseSampler:
    """The named Optuna sampler (`SAMPLERS`), seeded."""
    if kind not in SAMPLERS:
        raise ConfigError(f"unknown sampler '{kind}': choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[kind](seed=seed)


def trial_seed(seed: int, round_index: int, position: int) -> int:
    """The sampler seed of a round's `position`-th trial (interrupted trials do not count)."""
    return int(np.random.SeedSequence([seed, round_index, position]).generate_state(1)[0])


def _is_finished(trial: FrozenTrial) -> bool:
    """Complete, pruned, or failed by its own values: counts towards --trials."""
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or trial.user_attrs.get(
        "failed_by_its_values", False
    )


def _counts_for_seeding(trial: FrozenTrial) -> bool:
    return _is_finished(trial) or "error" in trial.user_attrs


def _finished(study: optuna.Study) -> int:
    return sum(_is_finished(trial) for trial in study.get_trials(deepcopy=False))


def _objective(
    base: FinetuneConfig, space: SearchSpace, folder: Path, round_name: str, trials: int
):
    def objective(trial: optuna.Trial) -> float:
        values = suggest(trial, space, base)
        trial_name = f"{round_name}-{trial.number:03d}"
        run_dir = folder / "trials" / trial_name
        # one feature cache for all trials: its key covers everything the features depend on
        cache_dir = base.cache_dir or str(folder / FEATURE_CACHE)
        # trials keep no weights, so no test-time averaging choice either (best.yaml keeps it)
        config = dataclasses.replace(
            base, **values, out=str(run_dir), cache_dir=cache_dir, choose_tta=False
        )
        shown = ", ".join(f"{name} {_format(value)}" for name, value in values.items())
        position = f"{_finished(trial.study) + 1} / {trials}"
        logger.info(f"Trial {trial_name} ({position}): {shown}")
        trial.set_user_attr("run_dir", str(run_dir))
        report = ReportValidationScore(trial)
        try:
            summary = finetune(
                config, callbacks=[report], enable_progress_bar=False, limit_test_batches=0
            )
        except Exception as error:  # recorded so a resumed search draws new values
            trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:500])
            if isinstance(error, TRIAL_FAILURES):
                trial.set_user_attr("failed_by_its_values", True)
                logger.info(f"Trial {trial_name} failed: {error}")
            raise
        finally:
            for checkpoint in run_dir.glob("*.ckpt"):  # trials keep metrics, not weights
                checkpoint.unlink()
        trial.set_user_attr("epochs_run", summary.epochs_run)
        trial.set_user_attr("monitor", summary.monitor)
        if report.pruned_after_epoch is not None:
            raise optuna.TrialPruned(f"pruned after epoch {report.pruned_after_epoch}")
        return summary.best_monitored

    return objective


def _format(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _open_study(folder: Path, name: str, pruner: optuna.pruners.BasePruner) -> optuna.Study:
    return optuna.create_study(
        study_name=name,
        storage=f"sqlite:///{folder / STUDY_FILE}",
        load_if_exists=True,
        direction="maximize",
        pruner=pruner,
    )


def _check_same_search(study: optuna.Study, key: str, value: str, folder: Path) -> None:
    """A study keeps its base config and space; resuming with others would mix two searches."""
    stored = study.user_attrs.get(key)
    if stored is None:
        study.set_user_attr(key, value)
    elif stored != value:
        raise SearchError(
            f"{folder} holds a search with a different {key.replace('_', ' ')}; "
            "resume it with the same settings or choose another --out"
        )


def _mark_interrupted(study: optuna.Study) -> None:
    """Trials left running by a killed process can never finish: mark them failed."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        logger.info(f"Trial {study.study_name}-{trial.number:03d} was interrupted; marked failed")
        study.tell(trial.number, state=TrialState.FAIL)


def _run_round(
    study: optuna.Study,
    round_index: int,
    space: SearchSpace,
    base: FinetuneConfig,
    folder: Path,
    trials: int,
    sampler: str,
) -> None:
    _mark_interrupted(study)
    objective = _objective(base, space, folder, study.study_name, trials)
    while _finished(study) < trials:
        position = sum(_counts_for_seeding(t) for t in study.get_trials(deepcopy=False))
        study.sampler = make_sampler(sampler, trial_seed(base.seed, round_index, position))
        study.optimize(objective, n_trials=1, catch=TRIAL_FAILURES)


# ---------------------------------------------------------------------------------------------
# The search


def run_search(
    base: FinetuneConfig,
    trials: int = 20,
    sampler: str = "random",
    refine: bool = False,
    space: SearchSpace | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> dict[str, Any]:
    """Search hyperparameters around `base` (its `out` is the search folder); returns the best
    trial's name, validation accuracy and config, and the paths of the result files.

    `space` defaults to `load_space(None, base)[0]`; `pruner` to Optuna's MedianPruner.
    """
    if trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    make_sampler(sampler, 0)  # reject an unknown sampler before any work
    if space is None:
        space, base = load_space(None, base)
    folder = Path(base.out)
    folder.mkdir(parents=True, exist_ok=True)
    pruner = pruner or optuna.pruners.MedianPruner(n_warmup_steps=PRUNE_AFTER_EPOCHS)
    studies = [_open_study(folder, ROUNDS[0], pruner)]
    searched = dataclasses.replace(base, out="")  # the same folder may be named differently
    _check_same_search(studies[0], "base_config", searched.to_yaml(), folder)
    _check_same_search(studies[0], "search_space", _space_json(space), folder)
    logger.info(f"Search space ({ROUNDS[0]}): {json.dumps(space_to_entries(space))}")
    _run_round(studies[0], 0, space, base, folder, trials, sampler)
    if refine:
        fine = _open_study(folder, ROUNDS[1], pruner)
        stored = fine.user_attrs.get("search_space")
        fine_space = _space_from_json(stored) if stored else narrow_space(space, studies[0].trials)
        _check_same_search(fine, "search_space", _space_json(fine_space), folder)
        write_atomic(folder / FINE_SPACE, yaml.safe_dump(space_to_entries(fine_space)))
        logger.info(f"Search space ({ROUNDS[1]}): {json.dumps(space_to_entries(fine_space))}")
        _run_round(fine, 1, fine_space, base, folder, trials, sampler)
        studies.append(fine)
    return write_results(folder, base, studies)


def _space_json(space: SearchSpace) -> str:
    return json.dumps({name: distribution_to_json(d) for name, d in space.items()})


def _space_from_json(text: str) -> SearchSpace:
    return {name: json_to_distribution(d) for name, d in json.loads(text).items()}


# ---------------------------------------------------------------------------------------------
# Results


def write_results(folder: Path, base: FinetuneConfig, studies: list[optuna.Study]) -> dict:
    """trials.csv, best.yaml and search.png from the studies; returns the best trial's facts
    (`best_score`: its monitored validation metric, named by `monitor`)."""
    rows = [(study.study_name, trial) for study in studies for trial in study.trials]
    monitor = next(
        (t.user_attrs["monitor"] for _, t in rows if "monitor" in t.user_attrs),
        logged_name("val", ACCURACY),  # no trial finished yet; searches before it was recorded
    )
    _write_trials_csv(folder / TRIALS_CSV, rows, monitor)
    _plot(folder / PLOT, base, rows, monitor)
    complete = [(name, t) for name, t in rows if t.state == TrialState.COMPLETE]
    if not complete:
        raise SearchError(f"no trial of the search in {folder} completed")
    round_name, best = max(complete, key=lambda item: item[1].value)
    best_name = f"{round_name}-{best.number:03d}"
    config = dataclasses.replace(base, **best.params, out=str(folder / "best-run"))
    header = (
        f"# tlkit search: best trial {best_name}, {monitor} {best.value:.4f} after "
        f"{best.user_attrs.get('epochs_run')} epochs.\n"
        f"# Run it: tlkit finetune --config {folder / BEST_CONFIG} [--epochs N]\n"
    )
    write_atomic(folder / BEST_CONFIG, header + config.to_yaml())
    logger.info(
        f"Best trial {best_name}: {monitor} {best.value:.4f}; wrote "
        f"{folder / TRIALS_CSV}, {folder / BEST_CONFIG}, {folder / PLOT}"
    )
    return {
        "best_trial": best_name,
        "monitor": monitor,
        "best_score": best.value,
        "best_config": config,
        "trials": len(rows),
        "files": [str(folder / name) for name in (TRIALS_CSV, BEST_CONFIG, PLOT)],
    }


def _write_trials_csv(path: Path, rows: list[tuple[str, FrozenTrial]], monitor: str) -> None:
    names = list(dict.fromkeys(name for _, t in rows for name in t.params))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        ["round", "trial", "state", monitor, *names, "epochs_run", "seconds", "run_dir", "reason"]
    )
    for round_name, trial in rows:
        seconds = trial.duration.total_seconds() if trial.duration else None
        writer.writerow(
            [
                round_name,
                trial.number,
                trial.state.name.lower(),
                trial.value,
                *(trial.params.get(name) for name in names),
                trial.user_attrs.get("epochs_run"),
                None if seconds is None else round(seconds, 1),
                trial.user_attrs.get("run_dir"),
                trial.user_attrs.get("error"),
            ]
        )
    write_atomic(path, buffer.getvalue())


def _plot(
    path: Path, base: FinetuneConfig, rows: list[tuple[str, FrozenTrial]], monitor: str
) -> None:
    """The monitored validation metric against learning rate and weight decay (log axes);
    pruned trials hollow, at their last reported value."""
    figure = Figure(figsize=(10, 4), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    colours = dict(zip(ROUNDS, ("tab:blue", "tab:orange"), strict=True))
    for axis, name in zip(axes, ("lr", "weight_decay"), strict=True):
        for round_name in colours:
            for state, filled in ((TrialState.COMPLETE, True), (TrialState.PRUNED, False)):
                chosen = [
                    t
                    for r, t in rows
                    if r == round_name and t.state == state and t.value is not None
                ]
                if not chosen:
                    continue
                axis.scatter(
                    [t.params.get(name, getattr(base, name)) for t in chosen],
                    [t.value for t in chosen],
                    facecolors=colours[round_name] if filled else "none",
                    edgecolors=colours[round_name],
                    label=f"{round_name}, {state.name.lower()}",
                )
        axis.set_xscale("log")
        axis.set_xlabel("learning rate" if name == "lr" else "weight decay")
        axis.grid(True, alpha=0.3)
    metric = monitor.removeprefix("val_")
    axes[0].set_ylabel(f"validation {TITLES.get(metric, metric)}")
    axes[1].legend(fontsize=8)
    figure.suptitle("Hyperparameter search")
    figure.savefig(path, dpi=100)
