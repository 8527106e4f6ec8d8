"""Random search: seeded and repeatable, resumable without repeats, pruning, coarse to fine."""

import csv
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml
from conftest import TINY_CONFIG
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from tlkit.cli import main
from tlkit.commands import search as search_module
from tlkit.commands.search import STUDY_FILE, load_space, narrow_space, run_search
from tlkit.config import FinetuneConfig
from tlkit.runfolder import read_summary

# The tiny run's settings (tests/conftest.py) less what the search draws.
SEARCH_FLAGS = ["--pretrained", "bundled", "--img-size", "32", "--epochs", "2"]
SEARCH_FLAGS += ["--batch-size", "8", "--num-workers", "0", "--val-fraction", "0.3"]


def base_config(data: Path, out: Path) -> FinetuneConfig:
    return FinetuneConfig(data_dir=str(data), out=str(out), epochs=2, **TINY_CONFIG)


def read_trials(folder: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((folder / "trials.csv").open()))


def finished(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The finished trials' values and results, without names and timings."""
    drop = ("trial", "seconds", "run_dir")
    return [
        {key: value for key, value in row.items() if key not in drop}
        for row in rows
        if row["state"] in ("complete", "pruned")
    ]


@pytest.fixture(scope="module")
def coarse_to_fine(colour_folder: Path, tmp_path_factory) -> Path:
    """`tlkit search --refine`: two rounds of two trials, run straight through."""
    out = tmp_path_factory.mktemp("search") / "straight"
    arguments = ["search", str(colour_folder), "--out", str(out), "--trials", "2", "--refine"]
    assert main([*arguments, *SEARCH_FLAGS]) == 0
    return out


def test_search_writes_trials_best_config_and_plot(coarse_to_fine: Path):
    rows = read_trials(coarse_to_fine)
    assert [(row["round"], row["state"]) for row in rows] == [
        ("coarse", "complete"),
        ("coarse", "complete"),
        ("fine", "complete"),
        ("fine", "complete"),
    ]
    assert all(0 <= float(row["val_acc"]) <= 1 and row["epochs_run"] == "2" for row in rows)
    lrs = [float(row["lr"]) for row in rows]
    assert len(set(lrs)) == 4 and all(1e-5 <= lr <= 1e-1 for lr in lrs)
    for row in rows:  # trials keep their metrics, not their weights
        run = Path(row["run_dir"])
        assert read_summary(run).epochs_run == 2 and not list(run.glob("*.ckpt"))
    assert (coarse_to_fine / "search.png").read_bytes().startswith(b"\x89PNG")
    fine = yaml.safe_load((coarse_to_fine / "fine_space.yaml").read_text())
    coarse_lrs = sorted(lrs[:2])
    assert fine["lr"]["low"] < coarse_lrs[0] and coarse_lrs[1] < fine["lr"]["high"]
    assert fine["lr"]["high"] / fine["lr"]["low"] < 1e-1 / 1e-5


def test_best_yaml_is_accepted_by_finetune(coarse_to_fine: Path, tmp_path: Path):
    best = coarse_to_fine / "best.yaml"
    rows = read_trials(coarse_to_fine)
    top = max(rows, key=lambda row: float(row["val_acc"]))
    config = yaml.safe_load(best.read_text())
    assert config["lr"] == pytest.approx(float(top["lr"]))
    assert config["strategy"] == top["strategy"]
    out = tmp_path / "best-run"
    assert main(["finetune", "--config", str(best), "--out", str(out), "--epochs", "1"]) == 0
    assert read_summary(out).strategy == top["strategy"]


def test_seeded_search_is_repeatable_and_resumes_without_repeating(
    coarse_to_fine: Path, colour_folder: Path, tmp_path: Path, monkeypatch
):
    real_finetune = search_module.finetune
    calls: list[str] = []

    def interrupted_on_second_trial(config, **options):
        calls.append(config.out)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C
        return real_finetune(config, **options)

    monkeypatch.setattr(search_module, "finetune", interrupted_on_second_trial)
    config = base_config(colour_folder, tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        run_search(config, trials=2, refine=True)
    # A process killed mid-trial leaves its trial running in the study.
    storage = f"sqlite:///{tmp_path / 'resumed' / STUDY_FILE}"
    optuna.load_study(study_name="coarse", storage=storage).ask()

    run_search(config, trials=2, refine=True)
    assert len(calls) == 2 + 3  # the second coarse trial again, the two fine ones; not trial 0
    rows = read_trials(tmp_path / "resumed")
    assert [(row["round"], row["trial"], row["state"]) for row in rows] == [
        ("coarse", "0", "complete"),
        ("coarse", "1", "fail"),  # interrupted
        ("coarse", "2", "fail"),  # killed
        ("coarse", "3", "complete"),
        ("fine", "0", "complete"),
        ("fine", "1", "complete"),
    ]
    # Same seed, same trials and results as the search that ran straight through.
    assert finished(rows) == finished(read_trials(coarse_to_fine))


class PruneTrialOne(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return trial.number == 1


def test_trials_report_every_epoch_and_pruned_trials_stop(colour_folder: Path, tmp_path: Path):
    config = base_config(colour_folder, tmp_path / "pruned")
    result = run_search(config, trials=2, pruner=PruneTrialOne())
    study = optuna.load_study(
        study_name="coarse", storage=f"sqlite:///{tmp_path / 'pruned/study.db'}"
    )
    complete, pruned = study.trials
    assert complete.state == TrialState.COMPLETE and sorted(complete.intermediate_values) == [0, 1]
    assert complete.value == max(complete.intermediate_values.values())
    assert pruned.state == TrialState.PRUNED and list(pruned.intermediate_values) == [0]
    assert pruned.user_attrs["epochs_run"] == 1
    assert result["best_trial"] == "coarse-000"
    assert [row["state"] for row in read_trials(tmp_path / "pruned")] == ["complete", "pruned"]


def test_a_different_seed_draws_different_trials(colour_folder: Path, tmp_path: Path, monkeypatch):
    def instant_finetune(config, **options):
        return SimpleNamespace(
            best_monitored=config.lr, monitor="val_acc", epochs_run=config.epochs
        )

    monkeypatch.setattr(search_module, "finetune", instant_finetune)
    draws = []
    for seed in (0, 1):
        base = base_config(colour_folder, tmp_path / f"seed{seed}")
        base.seed = seed
        run_search(base, trials=3, sampler="tpe")
        draws.append([row["lr"] for row in read_trials(Path(base.out))])
    assert len(set(draws[0] + draws[1])) == 6


def test_a_resumed_search_must_keep_its_settings(colour_folder: Path, tmp_path: Path, monkeypatch):
    finished = SimpleNamespace(best_monitored=0.5, monitor="val_acc", epochs_run=2)
    monkeypatch.setattr(search_module, "finetune", lambda config, **options: finished)
    run_search(base_config(colour_folder, tmp_path), trials=1)
    changed = base_config(colour_folder, tmp_path)
    changed.epochs = 3
    with pytest.raises(ValueError, match="different base config"):
        run_search(changed, trials=1)


def test_space_yaml_overrides_the_default_space(tmp_path: Path, colour_folder: Path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(
        "lr: {low: 1e-4, high: 1e-2, log: true}\n"  # YAML 1.1 reads 1e-4 as a string
        "dropout: 0.2\n"
        "label_smoothing: null\n"
        "strategy: {choices: [features, partial]}\n"
        "head_hidden: {low: 0, high: 256}\n"
        "weight_decay: 1e-5\n"
    )
    base = base_config(colour_folder, tmp_path / "out")
    space, fixed = load_space(space_file, base)
    assert space["lr"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert space["head_hidden"] == IntDistribution(0, 256)
    assert space["strategy"] == CategoricalDistribution(["features", "partial"])
    assert "dropout" not in space and fixed.dropout == 0.2
    assert "label_smoothing" not in space and fixed.label_smoothing == base.label_smoothing
    assert "weight_decay" not in space and fixed.weight_decay == 1e-5
    assert space["backbone_lr_scale"] == FloatDistribution(0.01, 1.0, log=True)  # a default


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lrr: {low: 0.1, high: 1}", "'lrr' is not searchable"),
        ("out: elsewhere", "'out' is not searchable"),
        ("dropout: {low: 0.0, high: 1.5}", "dropout=1.5 is not a valid value"),
        ("strategy: {choices: [features, everything]}", "strategy='everything'"),
        ("lr: {low: 1e-2, high: 1e-4, log: true}", "'lr'"),
        ("lr: [1, 2]", "needs {low, high[, log]}"),
    ],
)
def test_bad_space_entries_are_refused_by_name(text, message, tmp_path, colour_folder):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(text + "\n")
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("{", r"\{")):
        load_space(space_file, base_config(colour_folder, tmp_path))


def test_refine_narrows_around_the_best_trials():
    space = {
        "lr": FloatDistribution(1e-5, 1e-1, log=True),
        "dropout": FloatDistribution(0.0, 0.7),
        "strategy": CategoricalDistribution(["features", "partial", "full"]),
        "unfreeze_stages": IntDistribution(1, 4),
    }
    results = [  # (lr, dropout, strategy, validation accuracy)
        (1e-3, 0.1, "features", 0.90),
        (3e-3, 0.2, "features", 0.95),
        (1e-5, 0.6, "full", 0.20),
        (1e-1, 0.7, "full", 0.10),
        (5e-5, 0.5, "full", 0.30),
        (2e-2, 0.4, "features", 0.40),
        (1e-4, 0.0, "full", 0.35),
        (7e-2, 0.3, "full", 0.15),
    ]
    trials = [
        create_trial(
            params={"lr": lr, "dropout": dropout, "strategy": strategy},
            distributions={name: space[name] for name in ("lr", "dropout", "strategy")},
            value=value,
        )
        for lr, dropout, strategy, value in results
    ]
    fine = narrow_space(space, trials)
    # The best quarter (2 of 8): lr 1e-3 and 3e-3, widened by 10% of the 4 decades on each side.
    assert fine["lr"].low == pytest.approx(1e-3 / 10**0.4)
    assert fine["lr"].high == pytest.approx(3e-3 * 10**0.4)
    assert fine["dropout"].low == pytest.approx(0.03) and fine["dropout"].high == pytest.approx(
        0.27
    )
    assert fine["strategy"].choices == ("features",)
    assert fine["unfreeze_stages"] == space["unfreeze_stages"]  # no best trial used it
    with pytest.raises(ValueError, match="no completed trial"):
        narrow_space(space, [])


def test_a_diverging_trial_is_recorded_as_failed_and_the_search_goes_on(
    colour_folder: Path, tmp_path: Path, monkeypatch
):
    real_finetune = search_module.finetune

    def first_trial_diverges(config, **options):
        if config.out.endswith("coarse-000"):  # SGD at this rate overflows within a few steps
            config = dataclasses.replace(config, optimizer="sgd", lr=1e30)
        return real_finetune(config, **options)

    monkeypatch.setattr(search_module, "finetune", first_trial_diverges)
    out = tmp_path / "diverging"
    result = run_search(base_config(colour_folder, out), trials=2)
    rows = read_trials(out)
    assert [row["state"] for row in rows] == ["fail", "complete"]
    assert rows[0]["reason"].startswith("TrainingDivergedError: training diverged")
    assert rows[0]["val_acc"] == "" and rows[1]["reason"] == ""
    assert result["best_trial"] == "coarse-001"
    assert yaml.safe_load((out / "best.yaml").read_text())["lr"] == pytest.approx(
        float(rows[1]["lr"])
    )


def test_feature_trials_share_one_cache(colour_folder: Path, tmp_path: Path):
    out = tmp_path / "features"
    fixed = tmp_path / "space.yaml"
    fixed.write_text("strategy: features\n")
    space, base = load_space(fixed, base_config(colour_folder, out))
    run_search(base, trials=2, space=space)
    runs = [Path(row["run_dir"]) for row in read_trials(out)]
    assert [read_summary(run).feature_cache["train"]["reused"] for run in runs] == [False, True]
    assert not [run for run in runs if (run / "cache").exists()]
    assert {Path(read_summary(run).feature_cache["train"]["path"]).parent for run in runs} == {
        out / "cache"
    }
