"""--budget and the device: durations, device defaults, the schedule that fits a budget (pure,
on measured-like numbers), and one tiny run that measures, plans and records."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from conftest import TINY_CONFIG

from tlkit.config import FIXED_CHOICES, FinetuneConfig, parse_duration
from tlkit.errors import ConfigError
from tlkit.runfolder import read_metrics
from tlkit.train import auto, budget, hardware
from tlkit.train import finetune as finetune_module
from tlkit.train.finetune import finetune

# Lite0 at 64 px on a 2-core CPU, roughly: 100 training and 300 evaluation images/s
CPU_LIKE = budget.Throughput("cpu", 100.0, 300.0, checkpoint_s=0.2, measured_s=5.0)


@pytest.mark.parametrize(
    "text, seconds", [("90s", 90), ("10m", 600), ("2h", 7200), ("1h30m", 5400), ("45", 45)]
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["ten minutes", "10x", "0m"])
def test_a_budget_that_is_no_duration_is_refused_by_the_config(text):
    with pytest.raises(ConfigError, match="budget"):
        FinetuneConfig(data_dir="x", budget=text)


def test_device_defaults_follow_the_device_and_keep_what_is_given(monkeypatch):
    cpu = hardware.device_defaults(FinetuneConfig(data_dir="x", accelerator="cpu"))
    assert (cpu.precision, cpu.channels_last) == ("32", True)
    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(hardware.torch.cuda, "is_bf16_supported", lambda: True)
    gpu = hardware.device_defaults(FinetuneConfig(data_dir="x"))
    assert (gpu.precision, gpu.channels_last) == ("bf16-mixed", True)
    monkeypatch.setattr(hardware.torch.cuda, "is_bf16_supported", lambda: False)
    assert hardware.device_defaults(FinetuneConfig(data_dir="x")).precision == "16-mixed"
    given = FinetuneConfig(data_dir="x", precision="32", channels_last=False)
    assert hardware.device_defaults(given) == given


def test_the_schedule_fills_the_budget_up_to_the_wanted_images():
    splits = budget.Splits(train=5000, val=1000, test=2000)
    # test 2000 / 300 = 6.7 s; an epoch's validation and checkpoints 3.7 s; 100 images/s
    roomy = budget.fit_schedule(20_000, splits, 64, CPU_LIKE, seconds_left=10_000)
    assert roomy.images == pytest.approx(20_000, rel=0.02)  # all that is wanted
    tight = budget.fit_schedule(256_000, splits, 64, CPU_LIKE, seconds_left=600)
    assert tight.predicted_s <= 600
    assert tight.images > 500 * 100 * 0.9  # nearly all of the time trains
    assert budget.fit_schedule(256_000, splits, 64, CPU_LIKE, seconds_left=40) is None
    cached = budget.fit_schedule(50_000, splits, 64, CPU_LIKE, seconds_left=40, cached=True)
    assert cached is not None and cached.epochs == 10  # extraction of 8,000 images: 27 s


@pytest.mark.parametrize("train", [453, 1000, 5000])
def test_a_fitted_schedule_is_predicted_within_the_time_left(train):
    """Epochs cut part-way through a pass count whole batches rounded down, so the schedule's
    prediction stays within the seconds it was fitted to (a log once read "68 s of the 64 s
    left")."""
    splits = budget.Splits(train=train, val=train // 10, test=0)
    for seconds_left in range(5, 400, 3):
        fitted = budget.fit_schedule(10**6, splits, 64, CPU_LIKE, seconds_left)
        assert fitted is None or fitted.predicted_s <= seconds_left, seconds_left


def test_cached_features_take_the_epochs_that_fit_after_the_extraction():
    """A budget that holds the extraction (26.7 s) and 3 epochs' checkpoints (0.4 s each), not
    the 10 wanted: 3 epochs, where it used to say that not even one pass fits."""
    splits = budget.Splits(train=5000, val=1000, test=2000)
    fitted = budget.fit_schedule(50_000, splits, 64, CPU_LIKE, seconds_left=28, cached=True)
    assert fitted is not None and (fitted.epochs, fitted.images) == (3, 3 * 4992)
    assert fitted.predicted_s <= 28
    assert budget.fit_schedule(50_000, splits, 64, CPU_LIKE, seconds_left=26, cached=True) is None


def test_the_tta_choice_after_training_is_planned_into_the_budget():
    """The candidate presets' views of at most 1,000 validation images at the evaluation
    rate, each view once: flip's 2 (none's 1 among them) + multi-scale's 30 (ten-crop's 10
    among them) with flips and scale augmentation; none without the choice."""
    config = FinetuneConfig(data_dir="x", strategy="partial", img_size=64)
    rate = CPU_LIKE.eval_images_per_s
    small = budget.Splits(train=500, val=50, test=100)
    assert budget.tta_choice_s(config, small, CPU_LIKE) == pytest.approx(50 * 32 / rate)
    large = budget.Splits(train=50_000, val=5_000, test=100)
    assert budget.tta_choice_s(config, large, CPU_LIKE) == pytest.approx(1000 * 32 / rate)
    plain = FinetuneConfig(data_dir="x", strategy="partial", img_size=64, augment=False)
    assert budget.tta_choice_s(plain, small, CPU_LIKE) == pytest.approx(50 * (1 + 5) / rate)
    off = FinetuneConfig(data_dir="x", strategy="partial", img_size=64, choose_tta=False)
    assert budget.tta_choice_s(off, small, CPU_LIKE) == 0


def test_the_soups_validations_are_planned_into_the_budget():
    """A validation pass for each candidate besides best.ckpt (2 with --soup 3); none where
    no soup is made (the default, --soup 1)."""
    splits = budget.Splits(train=500, val=50, test=100, processes=2)
    rate = CPU_LIKE.eval_images_per_s
    config = FinetuneConfig(data_dir="x", strategy="partial", soup=3)
    assert budget.soup_s(config, splits, CPU_LIKE) == pytest.approx(2 * 25 / rate)
    for alone in ({}, {"soup": 3, "ema": True}, {"soup": 3, "strategy": "features"}):
        assert budget.soup_s(FinetuneConfig(data_dir="x", **alone), splits, CPU_LIKE) == 0


def test_processes_sharing_a_cpu_plan_at_one_processs_rate():
    """Two DDP processes on one CPU node share its cores: they train no faster than the one
    process measured on the whole node (on 2 cores, 3.9 s an epoch either way), so the plan
    fits half the images of two processes that each have a device."""
    on_devices = budget.Splits(train=5000, val=1000, test=0, processes=2)
    on_one_cpu = budget.Splits(train=5000, val=1000, test=0, processes=2, parallel=1)
    assert (on_devices.speedup, on_one_cpu.speedup) == (2, 1)
    apart = budget.fit_schedule(500_000, on_devices, 64, CPU_LIKE, seconds_left=600)
    shared = budget.fit_schedule(500_000, on_one_cpu, 64, CPU_LIKE, seconds_left=600)
    assert apart is not None and shared is not None
    assert 1.9 < apart.images / shared.images < 2.1
    assert shared.predicted_s == pytest.approx(apart.predicted_s, rel=0.1)


def test_a_budgeted_run_measures_plans_re_plans_and_records(
    colour_folder: Path, tmp_path: Path, monkeypatch
):
    """The plan measured before training, then re-planned from the epochs' own times (here
    made to say 5 epochs in all from the third epoch on): the run trains 5 epochs, its
    learning rate decaying to the new end, and records the re-plan in auto.json and
    config.yaml (what --resume reads)."""
    monkeypatch.setattr(budget, "replanned_epochs", lambda *planned_and_timings: 5)
    config = FinetuneConfig(
        data_dir=str(colour_folder),
        out=str(tmp_path / "run"),
        budget="1m",
        accelerator="cpu",
        **{**TINY_CONFIG, "strategy": "auto", "img_size": 32},
    )
    summary = finetune(config, enable_progress_bar=False)
    planned = json.loads((tmp_path / "run" / "auto.json").read_text())["budget"]
    assert planned["seconds"] == 60 and planned["fits"] and not planned["stepped_down"]
    assert planned["tta_choice_s"] > 0  # the choice after training is planned in
    throughput = planned["throughput"]
    assert throughput["device"] == "cpu" and throughput["train_images_per_s"] > 0
    assert 0 < planned["predicted_s"] <= 60 * budget.BUDGET_SHARE
    assert summary.wall_time_s < 60 * 1.15
    assert summary.auto_decision["budget"] == planned
    assert planned["after_training_s"] >= planned["tta_choice_s"] + planned["soup_s"]
    # the budget's patience covers the whole schedule, the re-planned one too
    scheduled = planned["schedule"]["epochs"]
    assert scheduled > 5 and planned["most_epochs"] >= scheduled
    assert summary.auto_decision["choices"]["patience"]["value"] == scheduled
    assert planned["replanned"] == {
        "after_epochs": 2,
        "epoch_s": planned["replanned"]["epoch_s"],
        "epochs_before": scheduled,
        "epochs": 5,
        "replans": 1,
    }
    assert budget.planned_epochs(planned) == summary.epochs_run == 5
    assert not summary.stopped_by_budget
    assert "epochs: 5\n" in (tmp_path / "run" / "config.yaml").read_text()
    # the decay ends at the new last step: the last epoch's rate far below the first epochs'
    # (the 181-epoch plan would still be near its peak)
    rates = [
        float(row["lr-AdamW/pg1"]) for row in read_metrics(tmp_path / "run") if row["lr-AdamW/pg1"]
    ]
    assert len(rates) == 5 and rates[-1] < 0.5 * max(rates) and rates[-1] > 0


def test_a_timed_epoch_re_plans_the_epochs_that_fit():
    """After 2 epochs of 6 s with 132 s of the plan's share left (and 140 s to the clock's
    mark): 22 more, 24 in all; to the nearest epoch, but never past the clock's mark, never
    beyond what auto wanted, always one more. A plan predicted to end within an epoch of the
    target, and before the mark, stands."""
    assert budget.replanned_epochs(30, 2, 6.0, 132.0, 140.0, most_epochs=60) == 24
    assert budget.replanned_epochs(18, 2, 6.0, 132.0, 140.0, most_epochs=60) == 24
    assert budget.replanned_epochs(30, 2, 6.0, 136.0, 140.0, most_epochs=60) == 25  # nearest
    assert budget.replanned_epochs(30, 2, 6.0, 136.0, 137.9, most_epochs=60) == 24  # the mark
    assert budget.replanned_epochs(30, 2, 6.0, 132.0, 140.0, most_epochs=20) == 20
    assert budget.replanned_epochs(30, 2, 60.0, 5.0, 10.0, most_epochs=20) == 3
    assert budget.replanned_epochs(30, 2, 6.0, -3.0, -1.0, most_epochs=20) == 3
    # 23 and 25 planned: 126 s and 138 s to go, within an epoch of 132 s and before the mark
    for standing in (23, 24, 25):
        assert budget.replanned_epochs(standing, 2, 6.0, 132.0, 140.0, most_epochs=60) == standing
    assert budget.replanned_epochs(22, 2, 6.0, 132.0, 140.0, most_epochs=60) == 24  # 120 s
    assert budget.replanned_epochs(25, 2, 6.0, 132.0, 137.0, most_epochs=60) == 24  # past it


def test_the_epochs_planned_in_the_end_are_the_re_plans():
    planned = {"schedule": {"epochs": 25}}
    assert budget.planned_epochs(planned) == 25
    replanned = {**planned, "replanned": {"epochs": 31, "epochs_before": 25}}
    assert budget.planned_epochs(replanned) == 31


def test_the_clock_leaves_the_work_after_training_and_half_the_margin():
    planned = {"seconds": 100.0, "after_training_s": 5.0}
    started = time.perf_counter() - 20  # 20 s ago
    left = budget.training_time_left_s(planned, started)
    assert left == pytest.approx(100 - 4 - 20 - 5, abs=0.5)  # half of the 8% margin kept


def test_the_clock_stops_training_where_the_prediction_falls_short(
    colour_folder: Path, tmp_path: Path, monkeypatch, caplog
):
    """A plan that overruns (here: no time left for training at all) is stopped by the budget's
    clock at the end of an epoch (its first, or the first past the second of grace); the run
    still tests, records and says so."""
    monkeypatch.setattr(finetune_module, "training_time_left_s", lambda planned, started: 0.0)
    config = FinetuneConfig(
        data_dir=str(colour_folder),
        out=str(tmp_path / "run"),
        budget="10m",
        accelerator="cpu",
        **{**TINY_CONFIG, "strategy": "auto", "img_size": 32, "choose_tta": False},
    )
    with caplog.at_level(logging.INFO, logger="tlkit"):
        summary = finetune(config, enable_progress_bar=False)
    planned = budget.planned_epochs(summary.auto_decision["budget"])
    assert summary.stopped_by_budget and 1 <= summary.epochs_run < planned
    assert summary.test_acc is not None
    assert f"training stopped by the budget's clock after {summary.epochs_run} of {planned}" in (
        caplog.text
    )
    unbudgeted = finetune(
        FinetuneConfig(
            data_dir=str(colour_folder),
            out=str(tmp_path / "plain"),
            accelerator="cpu",
            **{**TINY_CONFIG, "epochs": 1},
        ),
        enable_progress_bar=False,
    )
    assert not unbudgeted.stopped_by_budget


def test_only_a_budget_lets_the_planned_schedule_run_past_the_default_patience():
    assert auto.choose_patience().value == FIXED_CHOICES["patience"] == 5
    assert auto.choose_patience(120).value == 120


def test_a_negative_patience_is_refused_by_name():
    with pytest.raises(ConfigError, match="patience=-1"):
        FinetuneConfig(data_dir="data", patience=-1)


def test_a_minimum_of_passes_below_which_the_schedule_does_not_fit():
    """Fine-tuning under a budget needs the default plan's floor of passes: 2 passes fit in
    120 s here (10,000 images at 100/s, with validation and the test), 3 do not."""
    splits = budget.Splits(train=5000, val=1000, test=2000)
    two = budget.fit_schedule(256_000, splits, 64, CPU_LIKE, seconds_left=120)
    assert two is not None and 1.9 < two.images / splits.train < 2.1
    floor = auto.MIN_EPOCHS * splits.train
    assert budget.fit_schedule(256_000, splits, 64, CPU_LIKE, 120, minimum_images=floor) is None
    assert budget.fit_schedule(256_000, splits, 64, CPU_LIKE, 180, minimum_images=floor)
    # given epochs below the floor ask for no more than they want
    assert budget.fit_schedule(10_000, splits, 64, CPU_LIKE, 120, minimum_images=floor)


def test_the_run_clock_counts_from_the_given_start(colour_folder: Path, tmp_path: Path):
    config = FinetuneConfig(
        data_dir=str(colour_folder),
        out=str(tmp_path / "run"),
        accelerator="cpu",
        **{**TINY_CONFIG, "epochs": 1},
    )
    summary = finetune(config, started=time.perf_counter() - 100, enable_progress_bar=False)
    assert summary.wall_time_s >= 100


def test_the_command_line_starts_the_clock_before_its_imports(monkeypatch, tmp_path: Path):
    """`tlkit finetune` passes its own start: importing torch, Lightning and timm (15 s on a
    GPU machine measured here) counts towards --budget."""
    from tlkit import cli

    seen: dict[str, float] = {}
    parse = cli.config_from_arguments

    def parse_and_note(arguments):
        seen["parsing"] = time.perf_counter()
        return parse(arguments)

    def fake_finetune(config, resume=False, started=None):
        seen["started"] = started

    monkeypatch.setattr(cli, "config_from_arguments", parse_and_note)
    monkeypatch.setattr(finetune_module, "finetune", fake_finetune)
    assert cli.main(["finetune", str(tmp_path), "--budget", "1m"]) == 0
    assert seen["started"] is not None and seen["started"] <= seen["parsing"]
